"""Routing `vlm.generate(..., assistant_model=draft)` to SpecVLM speculative decoding.

This is the one module that touches private transformers API. `install(target)` (called by `draft.bind`)
puts two instance attributes on the target, nothing else (weights, config and what `save_pretrained` writes
are untouched):

* `target.generate`: when `assistant_model` is a SpecVLM draft, runs stock `generate` with our decoding loop as
  its `custom_generate` callable (tree mode) or stock assisted decoding (chain mode); otherwise it is exactly the
  class's own `generate`. Per-call overrides: `decoding_mode`, `tree_top_k`, `tree_depth`, `tree_total_tokens`,
  `num_draft_tokens`, `draft_confidence_threshold` can be passed to `generate`.
* `target._get_candidate_generator`: returns our chain `CandidateGenerator` for a SpecVLM draft (transformers
  chooses candidate generators through a fixed if-chain with no public hook).
"""

from __future__ import annotations

import copy
import functools
import inspect
import time
from typing import Any

import torch
import transformers
from packaging import version
from transformers.generation.stopping_criteria import (
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)

from .decode_plan import planned_decoding
from .decoding import DecodingSettings

# The private pieces relied on, checked once at install time so a transformers upgrade fails loudly and early.
_REQUIRED_PRIVATE_API = ("_get_candidate_generator", "_assisted_decoding", "prepare_inputs_for_generation")
_TESTED_RANGE = (version.parse("5.23"), version.parse("6.0"))

LAYOUT_KWARGS = (
    "image_sizes",
    "image_grid_thw",
    "video_grid_thw",
    "pixel_values_videos",
    "vision_feature_select_strategy",
)

# per-call decoding overrides accepted by generate(): exactly the fields of DecodingSettings
DRAFT_GENERATE_KWARGS = tuple(DecodingSettings.__dataclass_fields__)


def _check_transformers(target) -> None:
    installed = version.parse(transformers.__version__)
    if not (_TESTED_RANGE[0] <= installed < _TESTED_RANGE[1]):
        raise RuntimeError(
            f"specvlm_hf needs transformers>=5.23,<6 (installed: {transformers.__version__}). "
            "Install a supported version: pip install 'transformers>=5.23,<6'."
        )
    missing = [name for name in _REQUIRED_PRIVATE_API if not hasattr(type(target), name)]
    params = inspect.signature(type(target).generate).parameters
    if "custom_generate" not in params:
        missing.append("generate(custom_generate=...)")
    if missing:
        raise RuntimeError(
            f"transformers {transformers.__version__} no longer provides {missing}, which specvlm_hf relies on. "
            "Please report this at the specvlm_hf issue tracker and pin transformers to a tested version."
        )


def is_specvlm_draft(model: Any) -> bool:
    from .modeling_specvlm import SpecVLMDraftModel

    return isinstance(model, SpecVLMDraftModel)


def install(target) -> None:
    """Route `target.generate(assistant_model=<SpecVLM draft>)` to SpecVLM decoding. Idempotent."""
    if getattr(target, "_specvlm_routing_installed", False):
        return
    _check_transformers(target)
    cls = type(target)

    @functools.wraps(cls.generate)
    def generate(*args, **kwargs):
        draft = kwargs.get("assistant_model")
        if not is_specvlm_draft(draft):
            return cls.generate(target, *args, **kwargs)
        return _generate_with_draft(target, draft, args, kwargs)

    def _get_candidate_generator(*args, **kwargs):
        draft = kwargs.get("assistant_model")
        if is_specvlm_draft(draft):
            from .candidate_generator import SpecVLMChainCandidateGenerator

            return SpecVLMChainCandidateGenerator(
                target=target,
                draft=draft,
                generation_config=kwargs["generation_config"],
                logits_processor=kwargs["logits_processor"],
                model_kwargs=kwargs["model_kwargs"],
            )
        return cls._get_candidate_generator(target, *args, **kwargs)

    target.generate = generate
    target._get_candidate_generator = _get_candidate_generator
    target._specvlm_routing_installed = True


def _generate_with_draft(target, draft, args, kwargs):
    if draft._bound is None:
        raise ValueError(
            "This SpecVLM draft is not bound to a target. Call `draft.bind(vlm)` once, then "
            "`vlm.generate(**inputs, assistant_model=draft)`."
        )
    if draft._bound[0] is not _unwrap(target):
        raise ValueError(
            "This SpecVLM draft is bound to a different model than the one generating. Call "
            "`draft.bind(vlm)` with the model whose generate() you call."
        )
    if kwargs.get("custom_generate") is not None:
        raise ValueError("`custom_generate` cannot be combined with a SpecVLM `assistant_model`.")
    options = {name: kwargs.pop(name) for name in DRAFT_GENERATE_KWARGS if name in kwargs}
    settings = draft.decoding_settings(**options)
    _check_batch(args, kwargs)
    _move_stop_strings_to_criteria(target, kwargs)
    # A callable `custom_generate` only receives generate's prepared inputs, not the draft or the streamer.
    routed = {"assistant_model": draft, "streamer": kwargs.get("streamer"), "settings": settings}
    # generate() consumes the image-encoder arguments (image_sizes, ...) before the decoding loop; keep the ones
    # that describe the visual layout for the draft's compressor and stats
    draft._layout_kwargs = {key: kwargs[key] for key in LAYOUT_KWARGS if kwargs.get(key) is not None}
    if settings.decoding_mode == "tree":
        from .tree import check_mask_attention, tree_decoding

        check_mask_attention(target)
        decoding = functools.partial(tree_decoding, **routed)
    else:
        decoding = functools.partial(_chain_decoding, **routed)
    was_training = draft.training
    draft.eval()  # inference behaviour (e.g. the compressor gate's argmax), whatever mode training left it in
    try:
        with planned_decoding(draft):  # the draft's decoding forward with its weights resolved once
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


def _check_batch(args, kwargs) -> None:
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
        input_ids = kwargs.get("inputs")
    if (
        input_ids is not None
        and hasattr(input_ids, "shape")
        and input_ids.dim() == 2
        and input_ids.shape[0] > 1
    ):
        raise ValueError(
            f"SpecVLM speculative decoding runs one sequence at a time, got a batch of {input_ids.shape[0]}. "
            "Call generate once per prompt (batched trees are not supported yet)."
        )


def _unwrap(model):
    from .targets import unwrap_target

    return unwrap_target(model)


class _StopAtAnyNewToken(StoppingCriteria):
    """Stock assisted decoding checks stopping criteria once per chunk, at its end; plain generate checks after
    every token. This checks every position added since the last call, so the loop ends on the chunk holding
    the stop; the caller then cuts the chunk where plain generate would have stopped."""

    def __init__(self, criteria: StoppingCriteriaList, checked_len: int):
        self.criteria, self.checked_len = criteria, checked_len

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for end in range(self.checked_len + 1, input_ids.shape[1] + 1):
            done |= self.criteria(input_ids[:, :end], scores)
            if bool(done.all()):
                break
        self.checked_len = input_ids.shape[1]
        return done


def first_stop(criteria: StoppingCriteriaList, sequence: torch.Tensor, start: int) -> int:
    """Length at which plain generate would have stopped, scanning positions after `start`."""
    for end in range(start + 1, sequence.shape[1] + 1):
        if bool(criteria(sequence[:, :end], None).any()):
            return end
    return sequence.shape[1]


class _ExactStreamer:
    """Forwards chunks to the user's streamer, cut at the first token where plain generate would stop."""

    def __init__(self, streamer, criteria: StoppingCriteriaList, input_ids: torch.Tensor):
        self.streamer, self.criteria, self.sequence, self.stopped = streamer, criteria, input_ids, False

    def put(self, value):
        if self.stopped:
            return
        start = self.sequence.shape[1]
        self.sequence = torch.cat([self.sequence, value.to(self.sequence.device).view(1, -1)], dim=1)
        end = first_stop(self.criteria, self.sequence, start)
        self.stopped = end < self.sequence.shape[1] or bool(self.criteria(self.sequence[:, :end], None).any())
        self.sequence = self.sequence[:, :end]
        self.streamer.put(value.view(-1)[: end - start])

    def end(self):
        self.streamer.end()


def _chain_decoding(
    model,
    input_ids,
    logits_processor,
    stopping_criteria,
    generation_config,
    *,
    assistant_model,
    settings,
    streamer=None,
    **kwargs,
):
    """Chain mode: transformers' own assisted-decoding loop with our candidate generator."""
    draft = assistant_model
    kwargs.pop("assistant_model", None)
    kwargs.pop("streamer", None)
    draft._active_settings = settings
    draft._active_stopping_criteria = stopping_criteria
    start = time.perf_counter()
    prompt_len = input_ids.shape[1]
    loop_criteria = StoppingCriteriaList([_StopAtAnyNewToken(stopping_criteria, prompt_len)])
    if streamer is not None:
        streamer = _ExactStreamer(streamer, stopping_criteria, input_ids)
    restore_prefill = _prefill_only_uncached(model, input_ids, kwargs)
    try:
        result = type(model)._assisted_decoding(
            model,
            input_ids,
            logits_processor=logits_processor,
            stopping_criteria=loop_criteria,
            generation_config=generation_config,
            assistant_model=draft,
            streamer=streamer,
            **kwargs,
        )
    finally:
        restore_prefill()
        draft._active_settings = None
        draft._active_stopping_criteria = None
    sequences = result if isinstance(result, torch.Tensor) else result.sequences
    sequences = sequences[:, : first_stop(stopping_criteria, sequences, prompt_len)]
    if isinstance(result, torch.Tensor):
        result = sequences
    else:
        result.sequences = sequences
    _finish_chain_stats(draft.last_generation_stats, sequences.shape[1] - prompt_len)
    draft.last_generation_stats.total_time_s = time.perf_counter() - start
    return result


def _prefill_only_uncached(model, input_ids, model_kwargs):
    """Stock assisted decoding's first forward runs the whole prompt even when `generate` got a filled cache
    (multi-turn reuse), duplicating the cached positions; plain generate's prefill runs only the uncached tokens.
    Make the first `prepare_inputs_for_generation` call slice them as plain generate does, for this call only.
    Returns the function that undoes it."""
    from .decoding import uncached_length

    n_new = uncached_length(input_ids, model_kwargs)
    if n_new is None:
        return lambda: None
    had_own = "prepare_inputs_for_generation" in vars(model)
    original = model.prepare_inputs_for_generation

    @functools.wraps(original)
    def prepare_inputs_for_generation(*args, **kwargs):
        if kwargs.get("is_first_iteration") and kwargs.get("next_sequence_length") is None:
            kwargs["next_sequence_length"] = n_new
        return original(*args, **kwargs)

    model.prepare_inputs_for_generation = prepare_inputs_for_generation

    def restore():
        if had_own:
            model.prepare_inputs_for_generation = original
        else:
            del model.prepare_inputs_for_generation

    return restore


def _finish_chain_stats(stats, total_new: int) -> None:
    """The candidate generator sees every verify forward but the last one; account for it here."""
    if stats.target_forwards == 0:  # generation ended with the prefill's token
        stats.target_forwards, stats.new_tokens = 1, total_new
        return
    missing = total_new - stats.new_tokens
    if missing > 0:
        stats.accepted_lengths.append(missing)
        stats.new_tokens = total_new
        stats.target_forwards += 1
