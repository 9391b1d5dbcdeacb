"""specvlm_hf: lossless speculative decoding for vision-language models inside Hugging Face transformers.

Importing the package registers the draft's model type ("specvlm_draft") with `AutoConfig` / `AutoModel`;
everything else is imported lazily on first use.
"""

from __future__ import annotations

import importlib

from transformers import AutoConfig, AutoModel

from ._version import __version__
from .draft.configuration_specvlm import SpecVLMDraftConfig
from .draft.modeling_specvlm import SpecVLMDraftModel

AutoConfig.register(SpecVLMDraftConfig.model_type, SpecVLMDraftConfig, exist_ok=True)
AutoModel.register(SpecVLMDraftConfig, SpecVLMDraftModel, exist_ok=True)

_LAZY = {
    "SpecVLMDistillationTrainer": "training.trainer",
    "SpecVLMDataCollator": "training.collator",
    "push_draft_to_hub": "sharing.hub",
    "save_for_hub": "sharing.hub",
    "export_draft": "sharing.export",
    "GenerationStats": "generation.settings",
}


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'specvlm_hf' has no attribute {name!r}")


__all__ = ["SpecVLMDraftConfig", "SpecVLMDraftModel", "__version__", *_LAZY]
