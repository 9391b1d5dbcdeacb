"""Routing `vlm.generate(..., assistant_model=draft)` to SpecVLM speculative decoding.

`install(target)` (called by `draft.bind`) routes the target's `generate` (through `hf_private.install_routing`,
the one module touching private transformers API): when `assistant_model` is a SpecVLM draft, stock `generate`
runs with our tree decoding loop as its `custom_generate` callable (tree mode) or with stock assisted decoding and
our chain candidate generator (chain mode); otherwise it is exactly the class's own `generate`. Per-call overrides:
`decoding_mode`, `tree_top_k`, `tree_depth`, `tree_total_tokens`, `num_draft_tokens`,
`draft_confidence_threshold` can be passed to `generate`.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from transformers.generation.stopping_criteria import StoppingCriteriaList, StopStringCriteria

from .. import backends, hf_private
from ..targets.families import unwrap_target
from .batch import batch_decoding
from .chain import SpecVLMChainCandidateGenerator, chain_decoding
from .settings import DecodingSettings
from .tree import tree_decoding

LAYOUT_KWARGS = (
    "image_sizes",
    "image_grid_thw",
    "video_grid_thw",
    "pixel_values_videos",
    "vision_feature_select_strategy",
)

# per-call decoding overrides accepted by generate(): exactly the fields of DecodingSettings
DRAFT_GENERATE_KWARGS = tuple(DecodingSettings.__dataclass_fields__)


def is_specvlm_draft(model: Any) -> bool:
    """A SpecVLM draft (by its config's model type: the generation code never imports the draft's classes)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "specvlm_draft"


def check_supported() -> None:
    """Refuse (before any work) a transformers release outside the tested range or lacking what we rely on."""
    hf_private.check_transformers(SpecVLMChainCandidateGenerator)


def install(target) -> None:
    """Route `target.generate(assistant_model=<SpecVLM draft>)` to SpecVLM decoding. Idempotent."""
    hf_private.install_routing(target, is_specvlm_draft, _generate_with_draft, SpecVLMChainCandidateGenerator)


def _generate_with_draft(target, draft, args, kwargs):
    if draft._bound is None:
        raise ValueError(
            "This SpecVLM draft is not bound to a target. Call `draft.bind(vlm)` once, then "
            "`vlm.generate(**inputs, assistant_model=draft)`."
        )
    if draft._bound[0] is not unwrap_target(target):
        raise ValueError(
            "This SpecVLM draft is bound to a different model than the one generating. Call "
            "`draft.bind(vlm)` with the model whose generate() you call."
        )
    if kwargs.get("custom_generate") is not None:
        raise ValueError("`custom_generate` cannot be combined with a SpecVLM `assistant_model`.")
    options = {name: kwargs.pop(name) for name in DRAFT_GENERATE_KWARGS if name in kwargs}
    settings = draft.decoding_settings(**options)
    batched = _batch_size(args, kwargs) > 1
    _move_stop_strings_to_criteria(target, kwargs)
    # A callable `custom_generate` only receives generate's prepared inputs, not the draft or the streamer.
    routed = {"assistant_model": draft, "streamer": kwargs.get("streamer"), "settings": settings}
    # generate() consumes the image-encoder arguments (image_sizes, ...) before the decoding loop; keep the ones
    # that describe the visual layout for the draft's compressor and stats
    draft._layout_kwargs = {key: kwargs[key] for key in LAYOUT_KWARGS if kwargs.get(key) is not None}
    if batched:  # both modes: our own loop (transformers' assisted loop runs one sequence)
        hf_private.check_mask_attention(target)
        decoding = functools.partial(batch_decoding, **routed)
    elif settings.decoding_mode == "tree":
        hf_private.check_mask_attention(target)
        decoding = functools.partial(tree_decoding, **routed)
    else:
        decoding = functools.partial(chain_decoding, **routed)
    was_training = draft.training
    draft.eval()  # inference behaviour (e.g. the compressor gate's argmax), whatever mode training left it in
    try:
        with backends.accelerated(
            draft
        ):  # the draft's decoding forward through a faster backend where one applies
            return type(target).generate(target, *args, custom_generate=decoding, **kwargs)
    finally:
        draft.train(was_training)


def _move_stop_strings_to_criteria(target, kwargs) -> None:
    """generate() drops `tokenizer` before a callable `custom_generate` builds its stopping criteria, so stop
    strings would fail there; build their criterion here, exactly as generate would, and pass it explicitly."""
    config = kwargs.get("generation_config")
    stop_strings = kwargs.pop("stop_strings", None)
    if stop_strings is None:
        source = config if config is not None else target.generation_config
        stop_strings = getattr(source, "stop_strings", None)
        if stop_strings is not None:
            config = copy.deepcopy(source)
            config.stop_strings = None
            kwargs["generation_config"] = config
    if stop_strings is None:
        return
    tokenizer = kwargs.pop("tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            "Generating with stop strings needs the model's tokenizer: pass `tokenizer=` to generate."
        )
    criteria = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
    criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    kwargs["stopping_criteria"] = criteria


def _batch_size(args, kwargs) -> int:
    """The number of prompts; refuses (before any work) what batched speculative decoding cannot take."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
        input_ids = kwargs.get("inputs")
    if input_ids is None or not hasattr(input_ids, "shape") or input_ids.dim() != 2:
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[0] > 1:
            raise ValueError(
                f"SpecVLM speculative decoding on a batch ({embeds.shape[0]} prompts) needs input_ids: the draft "
                "reads each row's tokens. Pass input_ids, or generate one prompt at a time."
            )
        return 1
    size = input_ids.shape[0]
    if size == 1:
        return 1
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError(
            f"SpecVLM speculative decoding on a batch ({size} prompts) needs input_ids and no inputs_embeds: the "
            "draft reads each row's tokens. Pass input_ids, or generate one prompt at a time."
        )
    mask = kwargs.get("attention_mask")
    if (
        mask is not None
        and mask.dim() == 2
        and not (bool((mask.diff(dim=1) >= 0).all()) and bool(mask[:, -1].all()))
    ):
        raise ValueError(
            f"SpecVLM speculative decoding on a batch ({size} prompts) needs left padding (each attention_mask row "
            "zeros, then ones). Pad on the left: processor(..., padding=True, padding_side='left')."
        )
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
        raise ValueError(
            f"SpecVLM speculative decoding on a batch ({size} prompts) cannot continue from a filled cache "
            "(multi-turn cache reuse runs one sequence at a time). Generate each conversation on its own, or pass "
            "the whole batch without `cache`."
        )
    return size
