"""Lossless speculative decoding through vlm.generate(assistant_model=draft), every family, chain and tree."""

from __future__ import annotations

import pytest
import torch

from forced_draft import expected_accepted_lengths, make_forced_draft
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from tiny_models import FAMILIES, make_inputs, make_tiny_target

MODES = ["tree", "chain"]
TREE_FAMILIES_WINDOW_LIMITED = {"gemma3"}


@pytest.fixture(scope="module", params=FAMILIES)
def family_target(request):
    torch.manual_seed(0)
    return request.param, make_tiny_target(request.param)


def _plain(model, inputs, n):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("mode", MODES)
def test_random_draft_greedy_equals_plain(family_target, mode):
    family, model = family_target
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
    for seed, n in [(1, 12), (2, 20)]:
        inputs = make_inputs(family, model, seed=seed)
        reference = _plain(model, inputs, n)
        out = model.generate(
            **inputs, max_new_tokens=n, do_sample=False, assistant_model=draft, decoding_mode=mode
        )
        assert torch.equal(out, reference), f"{family}/{mode}/seed{seed}"
        stats = draft.last_generation_stats
        assert stats.new_tokens == n
        assert stats.decoding_mode == mode


@pytest.mark.parametrize("mode", MODES)
def test_forced_draft_accepts_exactly_as_expected(family_target, mode):
    family, model = family_target
    n = 24
    inputs = make_inputs(family, model, seed=3)
    reference = _plain(model, inputs, n)
    prompt_len = inputs["input_ids"].shape[1]
    wrong = {prompt_len + 5, prompt_len + 6, prompt_len + 14}
    lookahead = 4
    settings = {
        "tree_depth": lookahead,
        "tree_top_k": 3,
        "tree_total_tokens": 10,
        "num_draft_tokens": lookahead,
    }
    draft = make_forced_draft(model, reference[0], wrong)
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, assistant_model=draft, decoding_mode=mode, **settings
    )
    assert torch.equal(out, reference), f"{family}/{mode}"
    stats = draft.last_generation_stats
    expected = expected_accepted_lengths(prompt_len, n, wrong, lookahead)
    assert stats.accepted_lengths == expected, (stats.accepted_lengths, expected)
    assert stats.target_forwards == 1 + len(expected)
    # all-correct draft: every step accepts the full lookahead (apart from the length limit)
    draft_all = make_forced_draft(model, reference[0], ())
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, assistant_model=draft_all, decoding_mode=mode, **settings
    )
    assert torch.equal(out, reference)
    assert draft_all.last_generation_stats.accepted_lengths == expected_accepted_lengths(
        prompt_len, n, (), lookahead
    )
    assert draft_all.last_generation_stats.mean_accepted_length > 4.0


@pytest.mark.parametrize("mode", MODES)
def test_sliding_window_target_past_the_window(mode):
    """Gemma 3 mixes sliding-window and full layers (tiny window: 64); decode well past the window."""
    model = make_tiny_target("gemma3")
    inputs = make_inputs("gemma3", model, seed=4)
    n = 110
    reference = _plain(model, inputs, n)
    prompt_len = inputs["input_ids"].shape[1]
    assert prompt_len + n > 2 * 64
    draft = make_forced_draft(model, reference[0], {prompt_len + 30, prompt_len + 61})
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, assistant_model=draft, decoding_mode=mode
    )
    assert torch.equal(out, reference)
    assert draft.last_generation_stats.mean_accepted_length > 3.0
