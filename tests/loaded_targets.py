"""A tiny position-sensitive LLaVA loaded the ways users load big ones: quantized or offloaded (test support).

`make_sharp_target("llava")` is 32 wide; bitsandbytes' CPU kernels need linears with at least 64 input features, so
this one is 64 wide throughout (vision tower, projector, decoder, head), sharpened the same way
(`sharp_models.sharpen`), saved once per process and loaded back with `from_pretrained` as a user would:

* "bnb-8bit", "bnb-nf4", "torchao-int8", "quanto-int8": `specvlm_hf.targets.loading.quantization_config` (the
  libraries' defaults keep `lm_head` dense; 8-bit with `llm_int8_threshold=INT8_THRESHOLD`, see there);
* "bnb-8bit-head", "bnb-nf4-head", "quanto-int8-head": `lm_head` quantized too (only the vision side skipped). None
  of the three libraries quantizes the token embedding here (torchao's `include_input_output_embeddings` left both
  dense in torchao 0.18 / transformers 5.25);
* "offload-layers": a `device_map` with decoder layer 1 on disk and layer 0 on CPU (accelerate hooks; their weights
  lie on the meta device outside their forward); "offload-head": `lm_head` and the token embedding on disk.
"""

from __future__ import annotations

import functools
import tempfile

import pytest
import torch
from transformers import AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, LlavaConfig

from sharp_models import sharpen
from specvlm_hf.targets.loading import quantization_config
from tiny_models import IMAGE_ID, PAD_ID, _text_kwargs

WIDTH = 64
# LLM.int8's default outlier threshold (6.0) computes the input columns where ANY row of a forward exceeds it in
# float16 and the rest in int8, so a token's logits depend on the other tokens of its forward: a verify forward over
# n tokens then differs slightly from n one-token forwards (plain generate itself changes with the batch). Exactness
# is tested without that decomposition (each row quantized on its own); `test_loaded_targets` states the fact.
INT8_THRESHOLD = 0.0
QUANTIZED = ("bnb-8bit", "bnb-nf4", "torchao-int8", "quanto-int8")
QUANTIZED_HEADS = ("bnb-8bit-head", "bnb-nf4-head", "quanto-int8-head")
OFFLOADED = ("offload-layers", "offload-head")
LIBRARY = {"bnb": "bitsandbytes", "torchao": "torchao", "quanto": "optimum.quanto"}

_LAYERS = [f"model.language_model.layers.{i}" for i in range(2)]
_REST = ["model.vision_tower", "model.multi_modal_projector", "model.language_model.norm"]
DEVICE_MAPS = {
    "offload-layers": {
        **{name: "cpu" for name in _REST},
        "model.language_model.embed_tokens": "cpu",
        _LAYERS[0]: "cpu",
        _LAYERS[1]: "disk",
        "lm_head": "cpu",
    },
    "offload-head": {
        **{name: "cpu" for name in _REST + _LAYERS},
        "model.language_model.embed_tokens": "disk",
        "lm_head": "disk",
    },
}


def _config() -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=WIDTH,
    )
    text = LlamaConfig(**_text_kwargs(hidden_size=WIDTH, intermediate_size=2 * WIDTH))
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        image_seq_length=16,
        pad_token_id=PAD_ID,
    )


@functools.cache
def saved_target() -> str:
    """Directory of the dense float32 64-wide sharp LLaVA (built and saved once per process)."""
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(
        _config(), attn_implementation="sdpa", dtype=torch.float32
    )
    sharpen(model)
    path = tempfile.mkdtemp(prefix="specvlm-loaded-target-")
    model.save_pretrained(path)
    return path


def require(scheme: str) -> None:
    """Skip the calling test when the library `scheme` needs is not installed."""
    library = scheme.split("-")[0]
    if library in LIBRARY:
        pytest.importorskip(LIBRARY[library])


def _kwargs(scheme: str) -> dict:
    if scheme in DEVICE_MAPS:
        return {
            "device_map": DEVICE_MAPS[scheme],
            "offload_folder": tempfile.mkdtemp(prefix="specvlm-offload-"),
        }
    if scheme == "dense":
        return {}
    skip = (
        ["vision_tower", "multi_modal_projector"] if scheme.endswith("-head") else None
    )  # head quantized too
    config = quantization_config(scheme.removesuffix("-head"), skip_modules=skip)
    if scheme.startswith("bnb-8bit"):
        config.llm_int8_threshold = INT8_THRESHOLD
    return {"quantization_config": config}


def load_target(scheme: str):
    """The saved target loaded with `scheme` (module docstring), float32 compute, eval mode, generating exactly
    `max_new_tokens` (no EOS)."""
    require(scheme)
    model = AutoModelForImageTextToText.from_pretrained(
        saved_target(), dtype=torch.float32, attn_implementation="sdpa", **_kwargs(scheme)
    ).eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = None
    return model
