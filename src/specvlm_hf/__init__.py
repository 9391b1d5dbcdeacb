"""specvlm_hf: lossless speculative decoding for vision-language models inside Hugging Face transformers."""

from transformers import AutoConfig, AutoModel

from ._version import __version__
from .configuration_specvlm import SpecVLMDraftConfig
from .modeling_specvlm import SpecVLMDraftModel

AutoConfig.register(SpecVLMDraftConfig.model_type, SpecVLMDraftConfig, exist_ok=True)
AutoModel.register(SpecVLMDraftConfig, SpecVLMDraftModel, exist_ok=True)

__all__ = ["SpecVLMDraftConfig", "SpecVLMDraftModel", "__version__"]
