"""Where each target family keeps its parts: decoder, embedding, lm_head, visual placeholders, positions.

One explicit table (`_SPECS`), no guessing from class names. Measured with transformers 5.24 on tiny
random models of every family (``tests/tiny_models.py``, ``tests/test_tiny_models.py``):

=================  ===============================  ========  ======  ===================================
family             model_type(s)                    position  scaled  visual layout (``visual_spans``)
=================  ===============================  ========  ======  ===================================
causal_lm          llama, mistral, qwen2, qwen3     1d        no      none (text only)
llava              llava                            1d        no      square grid per image
llava_next         llava_next                       1d        no      base square grid + any-res grid
                                                                      with a newline feature per row
llava_onevision    llava_onevision                  1d        no      as llava_next (any-res grid may be
                                                                      downscaled, ``vision_aspect_ratio``);
                                                                      video: (frames, ceil(s/2), ceil(s/2))
                                                                      + one trailing newline feature
qwen2_vl           qwen2_vl                         mrope     no      (t, h, w) / merge from *_grid_thw
qwen2_5_vl         qwen2_5_vl                       mrope     no      as qwen2_vl
qwen3_vl           qwen3_vl                         mrope     no      images as qwen2_vl; a video is one
                                                                      span per temporal patch (frames are
                                                                      separated by timestamp text)
gemma3             gemma3                           1d        yes     square grid (mm_tokens_per_image)
idefics3           idefics3                         1d        no      square grid per tile (one span each)
smolvlm            smolvlm                          1d        no      as idefics3
paligemma          paligemma                        1d (+1)   yes     square grid, image first
internvl           internvl                         1d        no      square grid per tile (tiles of one
                                                                      image are contiguous: chopped)
mistral3           mistral3                         1d        no      rows of [IMG] separated by
                                                                      [IMG_BREAK], ending with [IMG_END]
=================  ===============================  ========  ======  ===================================

Facts every caller of a target forward must know (the tests re-check them):

* Every family accepts a float 4-D additive mask (B, 1, q, kv) (0 = attend, finfo.min = masked) with
  explicit ``position_ids`` and a prefilled ``DynamicCache``, under "sdpa" and "eager".
* ``position_scheme == "mrope"``: ``position_ids`` is (3, B, q) (temporal, height, width); a text
  continuation uses ``cache_len + arange(q) + model.model.rope_deltas`` on all three rows. (4, B, q)
  is also accepted (row 0 the 1-D text position). The prefill needs ``mm_token_type_ids``.
* ``position_offset``: PaliGemma positions are 1-indexed.
* ``outputs.hidden_states[-1]`` is the input of ``lm_head`` (after the final norm) for every family.
* ``prefill_bidirectional``: Gemma 3 attends bidirectionally inside each image block and PaliGemma over
  the whole prompt prefix during the prefill (driven by ``token_type_ids``); later tokens are causal.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TargetSpec:
    """How one target family exposes its parts. Each field is a measured fact, not a default."""

    family: str
    """"llava", "qwen2_vl", ... ("causal_lm" for plain text *ForCausalLM)."""
    model_types: tuple[str, ...]
    """``config.model_type`` values that map to this family."""
    position_scheme: str
    """"1d": ``position_ids`` (B, q). "mrope": (3, B, q) multimodal RoPE (Qwen VL families)."""
    scaled_embedding: bool
    """The embedding module itself multiplies by sqrt(hidden) (Gemma 3, PaliGemma's Gemma backbone):
    ``input_embeddings(model)(ids)`` is already what the decoder adds up; do not scale again."""
    has_vision: bool
    """The model takes images (``pixel_values``)."""
    needs_token_type_ids: bool
    """The processor returns ``token_type_ids`` and the prefill uses them to build its mask
    (Gemma 3: 1 on image tokens; PaliGemma: 0 = prompt prefix, 1 = suffix). A custom 4-D mask
    replaces that logic."""
    needs_mm_token_type_ids: bool = False
    """Qwen VL: the prefill raises without ``mm_token_type_ids`` (0 text, 1 image, 2 video) when
    ``image_grid_thw``/``video_grid_thw`` is given; it is how M-RoPE positions are computed."""
    position_offset: int = 0
    """Added to 0-based positions when passing explicit ``position_ids`` (PaliGemma: 1)."""
    prefill_bidirectional: str | None = None
    """None: the prefill is causal. "image": each image block attends to itself bidirectionally
    (Gemma 3). "prefix": the whole prompt attends bidirectionally (PaliGemma)."""
    has_video: bool = False
    """The model takes videos (``pixel_values_videos``)."""


_SPECS: tuple[TargetSpec, ...] = (
    TargetSpec("causal_lm", ("llama", "mistral", "qwen2", "qwen3"), "1d", False, False, False),
    TargetSpec("llava", ("llava",), "1d", False, True, False),
    TargetSpec("llava_next", ("llava_next",), "1d", False, True, False),
    TargetSpec("llava_onevision", ("llava_onevision",), "1d", False, True, False, has_video=True),
    TargetSpec("qwen2_vl", ("qwen2_vl",), "mrope", False, True, False, True, has_video=True),
    TargetSpec("qwen2_5_vl", ("qwen2_5_vl",), "mrope", False, True, False, True, has_video=True),
    TargetSpec("qwen3_vl", ("qwen3_vl",), "mrope", False, True, False, True, has_video=True),
    TargetSpec("gemma3", ("gemma3",), "1d", True, True, True, prefill_bidirectional="image"),
    TargetSpec("idefics3", ("idefics3",), "1d", False, True, False),
    TargetSpec("smolvlm", ("smolvlm",), "1d", False, True, False),
    TargetSpec(
        "paligemma", ("paligemma",), "1d", True, True, True, position_offset=1, prefill_bidirectional="prefix"
    ),
    TargetSpec("internvl", ("internvl",), "1d", False, True, False),
    TargetSpec("mistral3", ("mistral3",), "1d", False, True, False),
)
_BY_MODEL_TYPE = {model_type: spec for spec in _SPECS for model_type in spec.model_types}

SUPPORTED_FAMILIES: tuple[str, ...] = tuple(spec.family for spec in _SPECS)


# ----------------------------------------------------------------------------------------------------
# resolving a target


def unwrap_target(model) -> nn.Module:
    """A ``PeftModel`` (any task subclass) -> the transformers model inside it; anything else unchanged."""
    if "peft" in sys.modules:  # a model can only be a PeftModel if peft was imported
        from peft import PeftModel

        if isinstance(model, PeftModel):
            return model.get_base_model()
    return model


def _recurrent_layer_types(config) -> list[str]:
    """Layer types other than (sliding-window) attention in ``config`` or its text config (hybrid models such as
    Qwen3.5 or Jamba: linear attention, mamba)."""
    found = set()
    for cfg in (config, getattr(config, "text_config", None)):
        for kind in getattr(cfg, "layer_types", None) or ():
            if isinstance(kind, str) and kind not in (
                "full_attention",
                "sliding_attention",
                "chunked_attention",
            ):
                found.add(kind)
    return sorted(found)


def get_target_spec(model) -> TargetSpec:
    """The `TargetSpec` of ``model``; ValueError naming its class/model_type if it is not supported."""
    model = unwrap_target(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = _BY_MODEL_TYPE.get(model_type)
    if spec is None or (spec.family == "causal_lm" and not type(model).__name__.endswith("ForCausalLM")):
        supported = ", ".join(f"{s.family} ({'/'.join(s.model_types)})" for s in _SPECS)
        recurrent = _recurrent_layer_types(model.config)
        why = (
            f" Its decoder has recurrent layers ({', '.join(recurrent)}): their state cannot be rolled back to the "
            "accepted branch of a draft tree, so speculative decoding with a SpecVLM draft is not supported for it."
            if recurrent
            else ""
        )
        raise ValueError(
            f"{type(model).__name__} (model_type={model_type!r}) is not a supported target.{why} "
            f"Supported families (model_types): {supported}; plain text models must be *ForCausalLM."
        )
    return spec


def text_config(model):
    """The text (decoder) config: ``model.config.get_text_config()``."""
    return unwrap_target(model).config.get_text_config()


def target_hidden_size(model) -> int:
    return int(text_config(model).hidden_size)


def target_vocab_size(model) -> int:
    """Text vocabulary size: rows of ``lm_head`` (may differ from ``config.vocab_size`` after resizing); its
    ``out_features`` where it has them (a quantized head's ``weight`` is packed storage of another shape: bitsandbytes
    4-bit keeps (V * h / 2, 1) bytes)."""
    head = output_embeddings(model)
    return int(getattr(head, "out_features", None) or head.weight.shape[0])


def target_num_layers(model) -> int:
    return int(text_config(model).num_hidden_layers)


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(params, dict):
        if "rope_theta" in params:
            return float(params["rope_theta"])
        # Gemma 3: {"full_attention": {...}, "sliding_attention": {...}}
        for key in ("full_attention", *params):
            sub = params.get(key)
            if isinstance(sub, dict) and "rope_theta" in sub:
                return float(sub["rope_theta"])
    return float(getattr(cfg, "rope_theta", None) or 10000.0)


def target_head_dims(model) -> dict:
    """Attention/MLP sizes of the text decoder (what a draft layer shaped like the target needs)."""
    cfg = text_config(model)
    heads = int(cfg.num_attention_heads)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    eps = getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_eps", None) or 1e-6
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "intermediate_size": int(cfg.intermediate_size),
        "rms_norm_eps": float(eps),
        "rope_theta": _rope_theta(cfg),
        "max_position_embeddings": int(getattr(cfg, "max_position_embeddings", None) or 8192),
    }


_PLACEHOLDER_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")


def image_token_ids(model) -> list[int]:
    """Image then video placeholder ids from the config (empty for a text-only target)."""
    config = unwrap_target(model).config
    if not get_target_spec(model).has_vision:
        return []
    ids: list[int] = []
    for name in _PLACEHOLDER_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def input_embeddings(model) -> nn.Module:
    """The token embedding (Gemma 3 / PaliGemma: already scales by sqrt(hidden), see `TargetSpec`)."""
    return unwrap_target(model).get_input_embeddings()


def output_embeddings(model) -> nn.Module:
    """``lm_head``."""
    return unwrap_target(model).get_output_embeddings()


def decoder(model) -> nn.Module:
    """The text decoder (``get_decoder()``).

    VLMs call it with ``inputs_embeds`` (visual features already merged in). A plain *ForCausalLM
    calls it with ``input_ids`` instead: embed them with `input_embeddings` to get the same thing.
    """
    return unwrap_target(model).get_decoder()


# ----------------------------------------------------------------------------------------------------
# visual spans


@dataclass
class VisualSpan:
    """A run of positions in ``input_ids`` that carries one visual unit (an image, tile, video or frame).

    When ``grid`` is known: ``length == t*h*w + (t*h if newline_every else 0) + trailing``, and the
    grid cells fill the span in row-major (t, h, w) order, skipping the newline positions.
    """

    start: int
    """Index of the first position of the span in input_ids."""
    length: int
    """Number of consecutive positions in the span."""
    grid: tuple[int, int, int] | None
    """(t, h, w) layout of the grid cells, or None when unknown."""
    modality: str
    """"image" or "video"."""
    newline_every: int | None = None
    """If set (== w): after every ``w`` grid cells one extra position ends the row. LLaVA-NeXT/OneVision
    any-res part: the learned ``image_newline`` feature, at an image placeholder id. Mistral3: the
    [IMG_BREAK] token (and [IMG_END] after the last row), a text token, not a placeholder."""
    trailing: int = 0
    """Extra positions after the grid (LLaVA-OneVision video: one ``image_newline`` feature)."""


def _runs(ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of ``token_id`` in ids."""
    runs, start = [], None
    for i, tok in enumerate([*ids, None]):
        if tok == token_id and start is None:
            start = i
        elif tok != token_id and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def _chop(runs, units, modality) -> list[VisualSpan] | None:
    """Cut runs into consecutive units [(length, grid, newline_every, trailing)]; None if they do not fit."""
    spans, queue = [], list(units)
    for start, length in runs:
        pos, end = start, start + length
        while pos < end:
            if not queue:
                return None
            n, grid, newline, trailing = queue.pop(0)
            if pos + n > end:
                return None
            spans.append(VisualSpan(pos, n, grid, modality, newline, trailing))
            pos += n
    return spans if not queue else None


def _fallback(runs, modality) -> list[VisualSpan]:
    return [VisualSpan(start, length, None, modality) for start, length in runs]


def _square(n: int) -> tuple[int, int, int] | None:
    side = math.isqrt(n)
    return (1, side, side) if side * side == n else None


def _as_list(x) -> list:
    return x.tolist() if isinstance(x, torch.Tensor) else [list(v) for v in x]


def _per_image_units(family: str, config, model_kwargs: dict, n_runs_tokens: int) -> list | None:
    """The units (length, grid, newline_every, trailing) of all images in order, None when unknown."""
    vc = getattr(config, "vision_config", None)
    if family in ("llava", "paligemma", "gemma3", "internvl", "idefics3", "smolvlm"):
        if family == "gemma3":
            n = int(config.mm_tokens_per_image)
        elif family == "internvl":
            side = int(_first(vc.image_size) // _first(vc.patch_size) * config.downsample_ratio)
            n = side * side
        elif family in ("idefics3", "smolvlm"):
            side = _first(vc.image_size) // _first(vc.patch_size) // config.scale_factor
            n = side * side
        else:
            side = _first(vc.image_size) // _first(vc.patch_size)
            n = side * side
            if family == "llava" and getattr(config, "vision_feature_select_strategy", "default") == "full":
                n += int(getattr(vc, "model_type", "").startswith("clip"))  # CLIP's CLS token kept
        if n <= 0 or n_runs_tokens % n:
            return None
        return [(n, _square(n), None, 0)] * (n_runs_tokens // n)
    if family in ("llava_next", "llava_onevision"):
        if model_kwargs.get("image_sizes") is None:
            return None
        return [
            u for size in _as_list(model_kwargs["image_sizes"]) for u in _anyres_units(family, config, size)
        ]
    if family == "mistral3":
        if model_kwargs.get("image_sizes") is None:
            return None
        step = _first(vc.patch_size) * config.spatial_merge_size
        units = []
        for height, width in _as_list(model_kwargs["image_sizes"]):
            rows, cols = int(height) // step, int(width) // step
            units.append((rows * (cols + 1), (1, rows, cols), cols, 0))
        return units
    return None


def _first(x) -> int:
    return int(x[0]) if isinstance(x, (list, tuple)) else int(x)


def _anyres_units(family: str, config, image_size) -> list:
    """LLaVA-NeXT / OneVision: base image (square) + any-res grid with one newline feature per row."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    base = (side * side, (1, side, side), None, 0)
    n_h, n_w = get_anyres_image_grid_shape(list(image_size), config.image_grid_pinpoints, vc.image_size)
    height, width = unpad_image(torch.empty(1, n_h * side, n_w * side), list(image_size)).shape[1:]
    if family == "llava_onevision":  # downscaled when larger than anyres_max_N base images
        max_patches = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        ratio = math.sqrt(height * width / (max_patches * side**2))
        if ratio > 1.1:
            height, width = int(height // ratio), int(width // ratio)
    return [base, (height * (width + 1), (1, height, width), width, 0)]


def _qwen_units(family: str, config, grids) -> list:
    merge = config.vision_config.spatial_merge_size
    units = []
    for t, h, w in _as_list(grids):
        h, w = int(h) // merge, int(w) // merge
        if family == "qwen3_vl" and t > 1:  # one span per temporal patch (timestamp text in between)
            units += [(h * w, (1, h, w), None, 0)] * int(t)
        else:
            units.append((int(t) * h * w, (int(t), h, w), None, 0))
    return units


def visual_spans(model, input_ids: torch.LongTensor, model_kwargs: dict) -> list[VisualSpan]:
    """The visual spans of one sequence, in order, with their layouts where known.

    input_ids:    (1, L) or (L,) for one sequence.
    model_kwargs: the rest of the target's inputs (``image_grid_thw``, ``video_grid_thw``,
                  ``image_sizes``, ``pixel_values_videos``, ...), as the processor returned them.
    Every placeholder position is covered by exactly one span. Where the layout cannot be derived
    (unusual processor settings), each run of placeholders becomes one span with ``grid=None``.
    """
    spec = get_target_spec(model)
    if not spec.has_vision:
        return []
    config = unwrap_target(model).config
    ids = (input_ids[0] if input_ids.dim() == 2 else input_ids).tolist()
    image_id = getattr(config, "image_token_id", None)
    video_id = getattr(config, "video_token_id", None)
    image_runs = _runs(ids, image_id) if image_id is not None else []
    video_runs = _runs(ids, video_id) if video_id is not None and video_id != image_id else []

    spans: list[VisualSpan] = []
    if image_runs:
        family = spec.family
        if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            grids = model_kwargs.get("image_grid_thw")
            units = _qwen_units(family, config, grids) if grids is not None else None
        else:
            units = _per_image_units(family, config, model_kwargs, sum(n for _, n in image_runs))
        if family == "mistral3" and units is not None:
            image_spans = _mistral3_spans(ids, image_id, units)
        else:
            image_spans = _chop(image_runs, units, "image") if units is not None else None
        spans += image_spans if image_spans is not None else _fallback(image_runs, "image")
    if video_runs:
        units = None
        if (
            spec.family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
            and model_kwargs.get("video_grid_thw") is not None
        ):
            units = _qwen_units(spec.family, config, model_kwargs["video_grid_thw"])
        elif spec.family == "llava_onevision" and model_kwargs.get("pixel_values_videos") is not None:
            vc = config.vision_config
            pooled = math.ceil(vc.image_size // vc.patch_size / 2)  # 2x2 bilinear pooling per frame
            frames = int(model_kwargs["pixel_values_videos"].shape[1])
            n_videos = int(model_kwargs["pixel_values_videos"].shape[0])
            units = [(frames * pooled * pooled + 1, (frames, pooled, pooled), None, 1)] * n_videos
        video_spans = _chop(video_runs, units, "video") if units is not None else None
        spans += video_spans if video_spans is not None else _fallback(video_runs, "video")
    return sorted(spans, key=lambda s: s.start)


def _mistral3_spans(ids: list[int], image_id: int, units: list) -> list[VisualSpan] | None:
    """Mistral3: each image is ``rows`` runs of ``cols`` [IMG] ids, each run followed by one break/end token."""
    positions = [i for i, tok in enumerate(ids) if tok == image_id]
    spans, k = [], 0
    for length, (_, rows, cols), _, _ in units:
        if k + rows * cols > len(positions):
            return None
        start = positions[k]
        expected = [start + r * (cols + 1) + c for r in range(rows) for c in range(cols)]
        if positions[k : k + rows * cols] != expected:
            return None
        spans.append(VisualSpan(start, length, (1, rows, cols), "image", cols))
        k += rows * cols
    return spans if k == len(positions) else None
