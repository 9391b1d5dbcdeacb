"""Every use of transformers' private API, in one place, each with its reason and a check that names it.

transformers has no public hook that routes `generate(assistant_model=...)` to a custom decoding loop, no public
way to drive its assisted-decoding loop with our candidate generator, and no public cache operation that keeps a
scattered subset of positions. What specvlm_hf relies on beyond the public API is here and nowhere else, and each
piece is listed in `PRIVATE_USES` with a one-line reason and a check (run at `bind` by `check_transformers`, and one
test per use in tests/test_hf_private.py, so a transformers release that changes one fails by its name):

* `install_routing`: instance attributes `generate` and `_get_candidate_generator` on the target (transformers
  picks candidate generators in `_get_candidate_generator`, a fixed if-chain);
* `assisted_decoding`: the model class's `_assisted_decoding` loop, and what that loop reads from a candidate
  generator (`assisted_loop_reads`: our chain generator must provide every one of them);
* `wrap_candidate_generator`: a temporary wrapper around the candidate generator a `generate` call builds (bench);
* `compact_cache`, `realign_cache`, `start_past_recording`: cache layer internals (`keys`, `values`, sliding-window
  bookkeeping);
* `record_decoder_inputs`: a forward pre-hook on the target's text decoder reading the `inputs_embeds` keyword it
  is called with (the projected visual features at placeholders; how each VLM calls its decoder is internal);
* `use_mask_attention`: switching the text decoder's attention implementation for the tree verify (public
  `set_attn_implementation`, private `_can_set_attn_implementation`) and restoring every config's private
  `_attn_implementation_internal` exactly;
* `prefill_only_uncached`: an instance wrapper of `prepare_inputs_for_generation` for one assisted call, setting
  its `next_sequence_length` on the `is_first_iteration` call.

Supported transformers: `SUPPORTED_TRANSFORMERS`, the same range as pyproject's dependency (a test keeps them
equal); its upper bound is the newest minor CI has passed (README, "Supporting a new transformers release").
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .targets import families

# The transformers versions CI has passed (keep equal to pyproject.toml's `transformers` dependency).
SUPPORTED_RANGE = ">=5.24,<5.26"
SUPPORTED_TRANSFORMERS = SpecifierSet(SUPPORTED_RANGE)


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers is outside the tested range, or lacks a private piece specvlm_hf relies on."""


def _parameters(function) -> set[str]:
    return set(inspect.signature(function).parameters)


def _needs_parameters(function, names: set[str]) -> str | None:
    missing = names - _parameters(function)
    return f"{function.__qualname__} lost parameters {sorted(missing)}" if missing else None


@functools.cache  # read once per process: bind runs every check, and two of them scan the same loop
def _source(function) -> str | None:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):  # no source shipped: nothing to scan (the version range still guards)
        return None


# what transformers' assisted loop reads from a candidate generator only after an isinstance check for its own
# AssistedCandidateGenerator family (the heuristic schedule's write-back): not asked of ours
_READS_OF_ASSISTED_GENERATORS_ONLY = frozenset({"assistant_model", "num_assistant_tokens"})


def assisted_loop_reads() -> set[str]:
    """Attributes and methods transformers' assisted-decoding loop reads from its candidate generator (scanned
    from the installed release's source; empty when no source is shipped)."""
    source = _source(GenerationMixin._assisted_decoding) or ""
    return set(re.findall(r"candidate_generator\.(\w+)", source)) - _READS_OF_ASSISTED_GENERATORS_ONLY


def _check_assisted_loop() -> str | None:
    problem = _needs_parameters(
        GenerationMixin._assisted_decoding,
        {"logits_processor", "stopping_criteria", "generation_config", "streamer"},
    )
    source = _source(GenerationMixin._assisted_decoding)
    if problem is None and source is not None:
        # our generator learns the target's outputs and accepted count from these keywords of get_candidates
        lost = [
            k
            for k in ("model_kwargs=", "model_outputs=", "is_first_iteration=", "n_last_matches=")
            if k not in source
        ]
        if "self._get_candidate_generator(" not in source:
            lost.append("self._get_candidate_generator(...)")
        if lost:
            problem = f"_assisted_decoding no longer passes {lost}"
    return problem


def _check_cache_layers() -> str | None:
    # compact_cache / realign_cache rewrite layer.keys / layer.values and the sliding window's cumulative_length
    full, window = DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=4)
    states = torch.zeros(1, 1, 2, 2)
    for layer in (full, window):
        layer.update(states, states)
        if not all(isinstance(getattr(layer, name, None), torch.Tensor) for name in ("keys", "values")):
            return f"{type(layer).__name__} no longer keeps tensors `keys` / `values`"
    missing = [n for n in ("cumulative_length", "sliding_window") if not hasattr(window, n)]
    return f"DynamicSlidingWindowLayer lost {missing}" if missing else None


def _check_attention_switch() -> str | None:
    missing = [
        n
        for n in ("_can_set_attn_implementation", "set_attn_implementation")
        if not hasattr(PreTrainedModel, n)
    ]
    config = PretrainedConfig()
    if not hasattr(config, "_attn_implementation_internal") or not hasattr(config, "_attn_implementation"):
        missing.append("PretrainedConfig._attn_implementation_internal")
    return f"lost {missing}" if missing else None


@dataclass(frozen=True)
class PrivateUse:
    name: str
    reason: str  # why there is no public way
    check: Callable[
        [], str | None
    ]  # None when the installed transformers still provides it, else what changed


PRIVATE_USES: tuple[PrivateUse, ...] = (
    PrivateUse(
        "get_candidate_generator",
        "no public hook routes assistant_model to a custom candidate generator (a fixed if-chain)",
        lambda: _needs_parameters(
            GenerationMixin._get_candidate_generator,
            {"generation_config", "logits_processor", "model_kwargs"},
        ),
    ),
    PrivateUse(
        "assisted_decoding",
        "chain mode runs transformers' own assisted loop; there is no public entry taking a candidate generator",
        _check_assisted_loop,
    ),
    PrivateUse(
        "cache_layers",
        "a tree verify keeps a scattered subset of the positions it appended; Cache.crop only drops a suffix",
        _check_cache_layers,
    ),
    PrivateUse(
        "attention_switch",
        "the tree verify needs a 4-D mask kernel; restoring the user's implementation exactly needs the private field",
        _check_attention_switch,
    ),
    PrivateUse(
        "prepare_inputs_first_iteration",
        "stock assisted decoding re-runs a reused cache's whole prompt; plain generate's prefill runs only new tokens",
        lambda: _needs_parameters(
            GenerationMixin.prepare_inputs_for_generation, {"next_sequence_length", "is_first_iteration"}
        ),
    ),
    PrivateUse(
        "custom_generate_callable",
        "tree and batch loops run inside generate() (its input preparation, processors and stopping criteria)",
        lambda: _needs_parameters(GenerationMixin.generate, {"custom_generate"}),
    ),
)


def check_transformers(candidate_generator: type | None = None) -> None:
    """Raise `UnsupportedTransformersError` naming the supported range (and what changed) when the installed
    transformers is outside the tested range or lacks a private piece specvlm_hf relies on."""
    installed = transformers.__version__
    if Version(installed) not in SUPPORTED_TRANSFORMERS:
        raise UnsupportedTransformersError(
            f"specvlm_hf supports transformers{SUPPORTED_RANGE} (the versions its CI has passed); installed: "
            f"{installed}. Install a supported version: pip install 'transformers{SUPPORTED_RANGE}'."
        )
    changed = [f"{use.name}: {problem}" for use in PRIVATE_USES if (problem := use.check()) is not None]
    if candidate_generator is not None:
        lacking = sorted(n for n in assisted_loop_reads() if not hasattr(candidate_generator, n))
        if lacking:
            changed.append(f"candidate generator contract: the assisted loop reads {lacking}")
    if changed:
        raise UnsupportedTransformersError(
            f"transformers {installed} changed what specvlm_hf relies on ({'; '.join(changed)}). Install a tested "
            f"version (pip install 'transformers{SUPPORTED_RANGE}') and report this at the specvlm_hf issue "
            "tracker."
        )


class _Routed:
    """An instance attribute standing in for a method of the target's class: a callable object, not a closure, so
    that `copy.deepcopy(target)` gives the copy its own routing (a closure would keep calling the original)."""

    def __init__(self, target, method: str, is_ours: Callable[[Any], bool], ours: Callable):
        self.target, self.method, self.is_ours, self.ours = target, method, is_ours, ours
        functools.update_wrapper(self, getattr(type(target), method))

    def __call__(self, *args, **kwargs):
        draft = kwargs.get("assistant_model")
        if not self.is_ours(draft):
            return getattr(type(self.target), self.method)(self.target, *args, **kwargs)
        return self.ours(self.target, draft, *args, **kwargs)


def _routed_candidate_generator(candidate_generator: Callable):
    def make(target, draft, *args, **kwargs):
        return candidate_generator(
            target,
            draft,
            generation_config=kwargs["generation_config"],
            logits_processor=kwargs["logits_processor"],
            model_kwargs=kwargs["model_kwargs"],
        )

    return make


def install_routing(
    target,
    is_ours: Callable[[Any], bool],
    generate_with: Callable,
    candidate_generator: Callable,
) -> None:
    """Route `target.generate(assistant_model=m)` with `is_ours(m)` to `generate_with(target, m, args, kwargs)`,
    and transformers' choice of candidate generator for such an `m` to `candidate_generator(target, m, **kwargs)`.
    Any other call is exactly the class's own. Idempotent; weights, config and `save_pretrained` are untouched."""
    if getattr(target, "_specvlm_routing_installed", False):
        return
    target.generate = _Routed(target, "generate", is_ours, lambda t, d, *a, **k: generate_with(t, d, a, k))
    target._get_candidate_generator = _Routed(
        target, "_get_candidate_generator", is_ours, _routed_candidate_generator(candidate_generator)
    )
    target._specvlm_routing_installed = True


def assisted_decoding(model, input_ids: torch.Tensor, **kwargs):
    """transformers' assisted-decoding loop of `model`'s class (the candidate generator comes from
    `_get_candidate_generator`, routed by `install_routing`)."""
    return type(model)._assisted_decoding(model, input_ids, **kwargs)


@contextlib.contextmanager
def wrap_candidate_generator(model, wrap: Callable):
    """Within the block, every candidate generator `model.generate` builds is passed through `wrap(generator)`."""
    had_attr = "_get_candidate_generator" in model.__dict__
    previous = model.__dict__.get("_get_candidate_generator")
    original = model._get_candidate_generator

    def get_candidate_generator(*args, **kwargs):
        return wrap(original(*args, **kwargs))

    model._get_candidate_generator = get_candidate_generator
    try:
        yield
    finally:
        if had_attr:
            model._get_candidate_generator = previous
        else:
            del model._get_candidate_generator


def start_past_recording(cache) -> Callable[[], None]:
    """Sliding-window cache layers keep states that fall out of the window until `compact_cache` (a tree verify
    appends rejected nodes that must not push accepted keys out). Returns the function that puts the layers'
    recording back as the caller's cache had it."""
    recording = [getattr(layer, "record_past", None) for layer in cache.layers]
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()

    def restore() -> None:
        for layer, record in zip(cache.layers, recording):
            if record is not None:
                layer.record_past = record

    return restore


def compact_cache(cache, n_tail: int, keep: torch.Tensor) -> None:
    """Keep, of the last `n_tail` cached positions, only those at `keep` (indices into the tail, ascending), in
    place. Keeping all of them (a plain step, a fully accepted chain) copies nothing."""
    # ascending distinct indices into n_tail positions: all of them, in order
    keep_all = keep.numel() == n_tail
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        if not keep_all:
            head_k, tail_k = layer.keys[:, :, :-n_tail], layer.keys[:, :, -n_tail:]
            head_v, tail_v = layer.values[:, :, :-n_tail], layer.values[:, :, -n_tail:]
            layer.keys = torch.cat([head_k, tail_k.index_select(2, keep)], dim=2)
            layer.values = torch.cat([head_v, tail_v.index_select(2, keep)], dim=2)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length -= n_tail - keep.numel()
            window = layer.sliding_window
            if layer.keys.shape[2] > window - 1:
                layer.keys, layer.values = layer.keys[:, :, -window + 1 :], layer.values[:, :, -window + 1 :]


def realign_cache(
    cache, rows: torch.Tensor | None, n_tail: int, keep: torch.Tensor, kept: torch.Tensor
) -> None:
    """Batched `compact_cache`, in place: keep only the batch rows `rows` ((R,) indices; None: all), and of each
    one's last `n_tail` cached positions only those at keep[r, :kept[r]] (indices into the tail, ascending; keep is
    (R, m) right-padded, m = kept.max()). Row r becomes `m - kept[r]` filler positions (copies of position 0, for
    the caller to mask) + its head + its kept positions: every row ends with its newest token at the same index
    and holes only ever sit on the left, like a left-padded batch. Sliding-window layers then keep their window."""
    m = keep.shape[1]
    device = keep.device
    offset = (m - kept)[:, None]  # (R, 1) fillers per row
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        keys, values = layer.keys, layer.values
        if rows is not None:
            keys, values = keys.index_select(0, rows), values.index_select(0, rows)
        head = keys.shape[2] - n_tail
        j = torch.arange(head + m, device=device)[None] - offset  # (R, head + m): index into head + kept
        if m:
            tail = keep.gather(1, (j - head).clamp(0, m - 1))
            index = torch.where(j < 0, 0, torch.where(j < head, j, head + tail))
        else:  # keep no tail position: drop the tail
            index = j
        index = index[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
        layer.keys, layer.values = keys.gather(2, index), values.gather(2, index)
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length += m - n_tail
            window = layer.sliding_window
            if layer.keys.shape[2] > window - 1:
                layer.keys, layer.values = layer.keys[:, :, -window + 1 :], layer.values[:, :, -window + 1 :]


def record_decoder_inputs(target, sink: list, once: bool = False):
    """Register a hook appending to `sink` the (B, T, h) `inputs_embeds` the target's text decoder receives.

    Returns the hook handle; with `once=True` the hook removes itself after the first forward.
    """
    model = families.unwrap_target(target)
    decoder = families.decoder(model)

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            input_ids = kwargs.get("input_ids")
            if input_ids is None and args:
                input_ids = args[0]
            embeds = families.input_embeddings(model)(input_ids)
        sink.append(embeds)
        if once:
            handle.remove()

    handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    return handle


# attention implementations whose kernels take the verify forward's 4-D additive tree mask as given
MASK_ATTENTION = ("sdpa", "eager")


def _mask_attention_for(model) -> str | None:
    """None when the target's text decoder takes a 4-D tree mask as loaded; else the implementation to verify with
    (flex_attention segfaults on such a mask on CPU, flash-attention kernels cannot take one, paged ones need a
    paged cache)."""
    if families.text_config(model)._attn_implementation in MASK_ATTENTION:
        return None
    return "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"


def check_mask_attention(model) -> None:
    """Raise (before any work) if the target's attention implementation cannot verify a tree and cannot be switched."""
    model = families.unwrap_target(model)
    if _mask_attention_for(model) is not None and not model._can_set_attn_implementation():
        loaded = families.text_config(model)._attn_implementation
        raise ValueError(
            f"SpecVLM tree decoding verifies a draft tree with a 4-D attention mask, which attn_implementation="
            f"{loaded!r} cannot take, and {type(model).__name__} cannot switch its attention implementation at run "
            "time. Load the target with attn_implementation='sdpa' (or 'eager'), or pass decoding_mode='chain'."
        )


def _config_path(root, wanted) -> tuple[str, ...] | None:
    """Sub-config keys leading from `root` to the config object `wanted` (() when it is root)."""
    queue = [((), root)]
    while queue:
        path, config = queue.pop(0)
        if config is wanted:
            return path
        for key in getattr(config, "sub_configs", {}):
            sub = getattr(config, key, None)
            if sub is not None:
                queue.append(((*path, key), sub))
    return None


def use_mask_attention(model) -> Callable[[], None]:
    """Switch the target's text decoder to an attention implementation that takes the tree mask (public
    `set_attn_implementation`, text decoder only); returns the function that restores every config as it was."""
    model = families.unwrap_target(model)
    replacement = _mask_attention_for(model)
    if replacement is None:
        return lambda: None
    check_mask_attention(model)
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    stack = [model.config]
    while stack:  # and the sub-configs no module owns
        config = stack.pop()
        configs.setdefault(id(config), config)
        stack += [
            getattr(config, key) for key in getattr(config, "sub_configs", {}) if getattr(config, key, None)
        ]
    saved = [(config, config._attn_implementation_internal) for config in configs.values()]

    def restore() -> None:
        for config, value in saved:
            config._attn_implementation_internal = value

    text = families.text_config(model)
    request = replacement
    for key in reversed(_config_path(model.config, text) or ()):
        request = {key: request}
    try:
        model.set_attn_implementation(request)
        if text._attn_implementation != replacement:
            raise ValueError(
                f"Could not switch {type(model).__name__}'s text decoder to attn_implementation={replacement!r} for "
                "SpecVLM tree verification. Load the target with attn_implementation='sdpa', or pass "
                "decoding_mode='chain'."
            )
    except BaseException:
        restore()
        raise
    return restore


def prefill_only_uncached(model, n_new: int | None) -> Callable[[], None]:
    """Make the first `prepare_inputs_for_generation` call of the next `generate` run only the last `n_new` prompt
    tokens, as plain generate's prefill does on a reused cache (None: no change). Returns the undo."""
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

    def restore() -> None:
        if had_own:
            model.prepare_inputs_for_generation = original
        else:
            del model.prepare_inputs_for_generation

    return restore
