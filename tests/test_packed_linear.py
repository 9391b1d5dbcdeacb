"""The decode plan's linears (`backends.packed_linear`): packed on CPU without autograd, F.linear otherwise."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specvlm_hf.backends import packed_linear as inference_linear
from specvlm_hf.backends.packed_linear import bound_stacked_linear, cached_derived, linear, plain_linear


def module_linear(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`lin(x)` through the packed path, its copy cached on the module itself (as the decode plan does)."""
    return linear(lin, "packed", x, lin.weight, lin.bias)


def stacked_linear(owner: nn.Module, linears, x: torch.Tensor) -> torch.Tensor:
    return bound_stacked_linear(owner, linears)(x)


DTYPES = [torch.float32] + ([torch.bfloat16] if inference_linear._bf16_native() else [])


def _lin(i, o, bias, dtype):
    torch.manual_seed(o)
    return nn.Linear(i, o, bias=bias).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear_and_follows_weight_updates(dtype, bias):
    lin = _lin(64, 96, bias, dtype)
    x = torch.randn(1, 5, 64).to(dtype)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(module_linear(lin, x), lin(x), **tol)
        assert (cached_derived(lin, "packed") is not None) == inference_linear._packing_works(dtype)
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # an in-place update (an optimizer step) must not leave a stale packed copy
        torch.testing.assert_close(module_linear(lin, x), lin(x), **tol)


def test_packed_path_is_really_taken_on_this_cpu():
    # the speed-up the draft relies on here; fails loudly if a torch upgrade removes the oneDNN ops
    assert inference_linear._packing_works(torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "first_bias, changed", [(True, "weight"), (False, "bias")], ids=["all-biases", "one-bias-missing"]
)
def test_stacked_linear_is_the_concatenation(dtype, first_bias, changed):
    owner = nn.Module()
    linears = (_lin(32, 16, first_bias, dtype), _lin(32, 8, True, dtype), _lin(32, 8, True, dtype))
    x = torch.randn(3, 32).to(dtype)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)

    def check():
        expect = torch.cat([lin(x) for lin in linears], dim=-1)
        torch.testing.assert_close(stacked_linear(owner, linears, x), expect, **tol)

    with torch.no_grad():
        check()
        getattr(linears[2], changed).add_(
            1.0
        )  # a weight, or a bias alone, changes: the stacked copy is rebuilt
        check()


def test_packed_path_steps_aside_under_autocast_and_patched_linears_are_not_plain(monkeypatch):
    lin = _lin(16, 8, True, torch.float32)
    x = torch.randn(2, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert (
            module_linear(lin, x).dtype == lin(x).dtype == torch.bfloat16
        )  # autocast's product, as the module
    assert plain_linear(lin)
    original = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, x: original(self, x))
    assert not plain_linear(lin)  # the decode plan steps aside: the patched forward is called, never bypassed


def test_autograd_runs_the_module_and_gradients_flow():
    lin = _lin(16, 8, True, torch.float32)
    x = torch.randn(4, 16, requires_grad=True)
    module_linear(lin, x).sum().backward()
    assert lin.weight.grad is not None and x.grad is not None
    assert cached_derived(lin, "packed") is None  # nothing packed while training


def test_hooked_or_wrapped_modules_are_not_plain():
    lin = _lin(16, 8, False, torch.float32)
    lin.register_forward_hook(lambda module, args, out: None)
    assert not plain_linear(lin)  # the decode plan steps aside for it (tests/test_decode_plan.py)


def test_modules_with_packed_caches_copy_and_pickle():
    lin = _lin(16, 8, False, torch.float32)
    with torch.no_grad():
        module_linear(lin, torch.randn(2, 16))
    twin = copy.deepcopy(lin)  # oneDNN tensors cannot be copied: the cache starts empty in the copy
    assert cached_derived(twin, "packed") is None
    torch.save(lin, io.BytesIO())
    again = pickle.loads(pickle.dumps(lin))
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(module_linear(again, x), F.linear(x, lin.weight, lin.bias))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("SPECVLM_HF_PACKED_LINEAR", "0")
    monkeypatch.setattr(inference_linear, "_PACKED_OK", {})
    lin = _lin(16, 8, False, torch.float32)
    with torch.no_grad():
        module_linear(lin, torch.randn(2, 16))
    assert cached_derived(lin, "packed") is None


def test_wrapped_members_are_not_plain():
    class Scaled(
        nn.Linear
    ):  # stands in for an adapter-wrapped projection (a different class, its own forward)
        def forward(self, x):
            return 2 * super().forward(x)

    assert not plain_linear(Scaled(8, 4)) and plain_linear(nn.Linear(8, 4))
