"""Issue #15, "lossless everywhere we claim it": one regression test per hole, on position-sensitive targets."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sharp_models import make_sharp_target, shifted_generate
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from tiny_models import TEXT_HIGH, TEXT_LOW, make_inputs

MODES = ["tree", "chain"]


def _draft(model):
    return SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)


def test_paligemma_tree_positions_are_one_indexed():
    """PaliGemma's prefill positions are 1-indexed: the tree verify must continue them, not restart 0-based."""
    model = make_sharp_target("paligemma")
    draft = _draft(model)
    for seed in (0, 1):
        inputs = make_inputs("paligemma", model, seed=seed)
        reference = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        assert not torch.equal(shifted_generate(model, inputs, 10), reference)  # the case can fail
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False, assistant_model=draft)
        assert torch.equal(out, reference), seed


def _second_turn(first_sequences, seed: int, n: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    turn = torch.randint(TEXT_LOW, TEXT_HIGH, (1, n), generator=gen)
    return torch.cat([first_sequences, turn], dim=1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["llama", "llava", "gemma3"])
def test_returned_cache_holds_exactly_the_sequence_and_is_reusable(family, mode):
    """return_dict_in_generate: the cache holds len(sequences) - 1 positions, as plain generate's does, and a
    second turn on it (input_ids = whole first turn + new text) gives plain generate's second turn."""
    model = make_sharp_target(family)
    draft = _draft(model)
    inputs = make_inputs(family, model, seed=2)
    opts = {"max_new_tokens": 9, "do_sample": False, "return_dict_in_generate": True}
    plain = model.generate(**inputs, **opts)
    spec = model.generate(**inputs, **opts, assistant_model=draft, decoding_mode=mode)
    assert torch.equal(spec.sequences, plain.sequences)
    assert plain.cache.get_seq_length() == plain.sequences.shape[1] - 1
    assert spec.cache.get_seq_length() == plain.cache.get_seq_length()
    for layer_p, layer_s in zip(plain.cache.layers, spec.cache.layers, strict=True):
        assert layer_s.keys.shape == layer_p.keys.shape
        torch.testing.assert_close(layer_s.keys, layer_p.keys, rtol=1e-4, atol=1e-4)

    ids = _second_turn(plain.sequences, seed=3)
    second = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": 8,
        "do_sample": False,
    }
    plain2 = model.generate(**second, cache=plain.cache)
    spec2 = model.generate(**second, cache=spec.cache, assistant_model=draft, decoding_mode=mode)
    assert torch.equal(spec2, plain2)


_FLEX_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from sharp_models import make_sharp_target
from tiny_models import make_inputs
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
model = make_sharp_target({family!r})
inputs = make_inputs({family!r}, model, seed=1)
reference = model.generate(**inputs, max_new_tokens=8, do_sample=False)
model.set_attn_implementation("flex_attention")
draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
out = model.generate(**inputs, max_new_tokens=8, do_sample=False, assistant_model=draft, decoding_mode="tree")
assert model.config.get_text_config()._attn_implementation == "flex_attention", "not restored"
print("EQUAL" if torch.equal(out, reference) else "DIFFERENT", flush=True)
"""


# (paligemma, ~40 s of flex_attention compiling, is slow: llama's run guards the same switch in CI)
@pytest.mark.parametrize("family", ["llama", pytest.param("paligemma", marks=pytest.mark.slow)])
def test_flex_attention_target_tree_mode_runs_and_is_exact(family):
    """A 4-D tree mask under flex_attention crashed the process on CPU: the verify forward now runs through sdpa
    (the prefill keeps the user's implementation); run in a subprocess, since the failure mode is a segfault."""
    script = _FLEX_SCRIPT.format(tests=os.path.dirname(__file__), family=family)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "EQUAL" in proc.stdout.split(), proc.stdout


def _flash_like(module, query, key, value, attention_mask, **kwargs):
    """Stands in for a flash-attention kernel (not installable here): causal only, no 4-D mask."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.dim() == 4:
        raise RuntimeError("flash-attention kernels cannot take a 4-D attention mask")
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=query.shape[2] > 1, **kwargs)


@pytest.mark.parametrize("name", ["flash_attention_2", "flash_attention_3"])
@pytest.mark.parametrize("family", ["llama", "llava"])
def test_tree_verify_switches_flash_attention_and_restores_it(family, name, monkeypatch):
    """A target loaded with a flash kernel: the verify forwards run through sdpa, the setting comes back after."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, name, _flash_like)
    model = make_sharp_target(family)
    draft = _draft(model)
    inputs = make_inputs(family, model, seed=4)
    reference = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = model.config.get_text_config()
    text._attn_implementation_internal = name  # as if loaded with attn_implementation=name
    if family == "llama":
        assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False), reference)
    out = model.generate(
        **inputs, max_new_tokens=8, do_sample=False, assistant_model=draft, decoding_mode="tree"
    )
    assert text._attn_implementation == name  # restored
    assert torch.equal(out, reference)
    length = inputs["input_ids"].shape[1]
    with pytest.raises(RuntimeError, match="4-D"), torch.no_grad():  # the stand-in really refuses a 4-D mask
        model(**{**inputs, "attention_mask": torch.zeros(1, 1, length, length)})


def test_tree_verify_refuses_before_work_when_attention_cannot_switch(monkeypatch):
    model = make_sharp_target("llama")
    draft = _draft(model)
    model.config._attn_implementation_internal = "flash_attention_2"
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    calls = []
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        model.generate(**make_inputs("llama", model), max_new_tokens=4, assistant_model=draft)
    assert calls == []  # refused before any forward


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_inputs_embeds_without_input_ids(family, mode):
    """generate(inputs_embeds=...) returns only the new tokens, as plain generate does (failed with an unrelated
    size mismatch: the draft took its context length from the empty input_ids)."""
    model = make_sharp_target(family)
    draft = _draft(model)
    inputs = make_inputs(family, model, seed=5)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()
    opts = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"], "max_new_tokens": 9}
    reference = model.generate(**opts, do_sample=False)
    assert reference.shape == (1, 9)
    out = model.generate(**opts, do_sample=False, assistant_model=draft, decoding_mode=mode)
    assert torch.equal(out, reference)
