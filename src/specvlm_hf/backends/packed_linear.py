"""Linear products for the decode plan: weights derived once per set of weights, oneDNN-prepacked on CPU.

While decoding, a draft forward multiplies 1-20 rows by each weight matrix. On a CPU, `F.linear` runs such small
products far below the machine's speed: measured on this project's 2-core AVX512-BF16 machine for a (5632, 1024)
bfloat16 weight, 0.30-0.35 ms for 1-4 rows against 0.10-0.15 ms with the weight reordered once into oneDNN's
blocked layout (float32: 1.5-5 ms against 0.3-0.4 ms), with results equal to rounding. `linear` takes that path
whenever no autograd graph is recorded and the input is a CPU tensor of the weight's dtype; the packed copy is
cached on the owning module and rebuilt when the weight changes. Autograd always uses `F.linear`.

Only `decode_plan` uses this: the draft's own weights, and the target's `lm_head` when it is small
(`bound_shared_linear`; the copy is the draft's, the target model is never changed). The packed copies live beside
the parameters, which stay for training and saving. Set ``SPECVLM_HF_PACKED_LINEAR=0`` to turn packing off.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..targets.loading import dense_weight

logger = logging.getLogger(__name__)

# the draft keeps derived copies of tensors it shares with the target (the target lm_head's packed copy, the
# decoding token table) only up to this many entries (32M: 64 MB in bf16)
TARGET_COPY_MAX_ELEMENTS = 1 << 25

_LINEAR_FORWARD = nn.Linear.forward  # as torch defines it (a patched class forward is called, never bypassed)

# dtype -> whether the packed path works here (checked once against F.linear on first use)
_PACKED_OK: dict[torch.dtype, bool] = {}


class _DerivedCache(dict):
    """Per-module store of derived tensors. Copies and pickles of the module start empty: the tensors are rebuilt on
    use, and oneDNN-packed ones cannot be copied or saved at all."""

    def __deepcopy__(self, memo):
        return _DerivedCache()

    def __reduce__(self):
        return (_DerivedCache, ())


def derived_from_weights(owner, name: str, weights, build):
    """`build()`, cached on `owner` under `name` until one of `weights` changes (storage, in-place update, dtype,
    device, shape) or inference mode is switched (inference-mode tensors cannot enter autograd)."""
    key = tuple((w.data_ptr(), w._version, w.dtype, w.device, w.shape) for w in weights)
    key += (torch.is_inference_mode_enabled(),)
    store = owner.__dict__.get("_specvlm_derived")
    if store is None:
        store = owner.__dict__["_specvlm_derived"] = _DerivedCache()
    cached = store.get(name)
    if cached is None or cached[0] != key:
        cached = store[name] = (key, build())
    return cached[1]


def cached_derived(owner, name: str):
    """What `derived_from_weights` last cached on `owner` under `name`, or None."""
    entry = owner.__dict__.get("_specvlm_derived", {}).get(name)
    return None if entry is None else entry[1]


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _packing_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN-prepacked linears run here for `dtype` and agree with F.linear (checked once per dtype)."""
    ok = _PACKED_OK.get(dtype)
    if ok is None:
        ok = False
        if (
            os.environ.get("SPECVLM_HF_PACKED_LINEAR", "1") != "0"
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and (dtype == torch.float32 or (dtype == torch.bfloat16 and _bf16_native()))
        ):
            try:  # (outside autocast, which would re-type the reference product)
                with torch.no_grad(), torch.autocast("cpu", enabled=False):
                    gen = torch.Generator().manual_seed(0)
                    x = torch.randn(3, 2, 64, generator=gen).to(dtype)
                    w = torch.randn(48, 64, generator=gen).to(dtype)
                    b = torch.randn(48, generator=gen).to(dtype)
                    got = _packed_linear(x, _pack(w), b)
                    ok = got.shape == (3, 2, 48) and torch.allclose(
                        got.float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-2
                    )
            except Exception as error:  # an op missing or changed in this torch build: use F.linear
                logger.debug("oneDNN packed linear unavailable for %s: %s", dtype, error)
        _PACKED_OK[dtype] = ok
    return ok


def _bf16_native() -> bool:
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:
        return False


def _packable(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        weight.device.type == "cpu"
        and (bias is None or bias.dtype == weight.dtype)
        and _packing_works(weight.dtype)
    )


def _use_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and not torch.is_autocast_enabled(
            "cpu"
        )  # autocast picks the product's dtype per call: F.linear follows it
        and x.dtype == weight.dtype
        and _packable(weight, bias)
    )


def linear(owner: nn.Module, name: str, x: torch.Tensor, weight: torch.Tensor, bias=None, sources=None):
    """`F.linear(x, weight, bias)`; without autograd on CPU, through a oneDNN-prepacked copy of `weight` cached on
    `owner` under `name` (see the module docstring). A derived `weight` (e.g. a slice) names the parameters it
    comes from as `sources`: the packed copy is rebuilt when they change."""
    if not _use_packed(x, weight, bias):
        return F.linear(x, weight, bias)
    packed = derived_from_weights(owner, name, sources or [weight], lambda: _pack(weight))
    return _packed_linear(x, packed, bias)


def plain_linear(module) -> bool:
    """An `nn.Linear` whose call is its own forward: no hooks, no patched forward (accelerate), no wrapper (peft),
    and a dense weight (not quantized storage, a tensor subclass such as torchao's, or an offloaded meta tensor)."""
    return (
        type(module) is nn.Linear
        and nn.Linear.forward is _LINEAR_FORWARD
        and _unhooked(module)
        and dense_weight(module.weight)
        and (module.bias is None or dense_weight(module.bias))
    )


def plain_embedding(module) -> bool:
    """An `nn.Embedding` (or a subclass, e.g. Gemma's scaled one) that is not hooked or patched and whose weight is
    dense: its rows may be computed once from its forward."""
    return isinstance(module, nn.Embedding) and _unhooked(module) and dense_weight(module.weight)


def _unhooked(module) -> bool:
    return not module._forward_hooks and not module._forward_pre_hooks and "forward" not in module.__dict__


def _copyable(module: nn.Module, max_elements: int) -> bool:
    """Whether a borrowed module may run through a copy of its weight (plain and small enough)."""
    return plain_linear(module) and module.weight.numel() <= max_elements


def bound_linear(owner: nn.Module, name: str, weight: torch.Tensor, bias=None, sources=None):
    """`x -> F.linear(x, weight, bias)` for inputs of `weight`'s dtype and device, run without autograd, with the
    choice `linear` makes per call (a packed copy on CPU) made once, now: for a caller that runs the same product
    many times and has checked that the weights stay put meanwhile (`decode_plan`). Same cache names as `linear`."""
    if _packable(weight, bias):
        packed = derived_from_weights(owner, name, sources or [weight], lambda: _pack(weight))
        return lambda x: _packed_linear(x, packed, bias)
    return lambda x: F.linear(x, weight, bias)


def bound_shared_linear(owner: nn.Module, name: str, module: nn.Module, max_elements: int):
    """`x -> module(x)` for a module `owner` borrows (the target's `lm_head`), bound once like `bound_linear`: a
    packed copy cached on `owner` only when the weight is plain and has at most `max_elements` entries (a copy of a
    large vocabulary's head costs real memory; a draft for one has a reduced draft vocabulary, whose own head is
    packed); None otherwise (the caller runs the module as the draft does: quantized or offloaded heads take their
    input in their own device and dtype)."""
    if not _copyable(module, max_elements):
        return None
    return bound_linear(owner, name, module.weight, module.bias)


def bound_stacked_linear(owner: nn.Module, linears: tuple[nn.Linear, ...]):
    """`x -> torch.cat([lin(x) for lin in linears], -1)` as ONE matmul (packed on CPU), bound once like `bound_linear`
    (for plain linears): on small row counts one product costs a fraction of several. Cached on `owner`."""
    weights, sources, build = _stacking(linears)
    if _packable(weights[0], None) and _same_dtype(sources):
        packed, bias = derived_from_weights(owner, "stacked_packed", sources, lambda: _pack_pair(build()))
        return lambda x: _packed_linear(x, packed, bias)
    weight, bias = derived_from_weights(owner, "stacked", sources, build)
    return lambda x: F.linear(x, weight, bias)


def _stacking(linears):
    """The weights of `linears`, the tensors a stacked copy depends on (weights and biases), and a function stacking
    them into one (weight, bias); a member without a bias gets zeros there when another has one."""
    weights = [lin.weight for lin in linears]
    biases = [lin.bias for lin in linears]
    sources = weights + [b for b in biases if b is not None]

    def build():
        if all(b is None for b in biases):
            return torch.cat(weights), None
        parts = [b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)]
        return torch.cat(weights), torch.cat(parts).detach()

    return weights, sources, build


def _same_dtype(tensors) -> bool:
    return len({t.dtype for t in tensors}) == 1


def _pack_pair(weight_bias):
    weight, bias = weight_bias
    return _pack(weight), bias
