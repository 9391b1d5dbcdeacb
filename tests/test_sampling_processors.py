"""Sampling in tree mode on a VLM with temperature, top-k, top-p and a repetition penalty has exactly the target's
distribution: the joint law of the first two emitted tokens is compared with the exact law plain sampling has.

The exact law: plain generate's processed scores (`output_scores`) for the first token, and for every first token
with non-zero probability, those of the second token after it. The test is a chi-square goodness-of-fit test over
the joint cells (cells with expected count < 5 pooled) at significance 1e-3: a correct implementation fails it once
in a thousand runs (seeds are fixed, so the run is deterministic). A draft drawing from another distribution than it
reports, or a biased acceptance rule, moves the statistic far past the threshold (checked once by breaking the
residual update in `accept_sampled` made the untrained-draft case fail with p = 1.5e-4).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from forced_draft import make_forced_draft
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from tiny_models import make_inputs, make_tiny_target

PROCESSING = dict(temperature=0.8, top_k=4, top_p=0.95, repetition_penalty=1.3)
N_DRAWS = 500
ALPHA = 1e-3


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    model = make_tiny_target("llava")
    with torch.no_grad():  # peaked but far from one-hot next-token laws
        model.lm_head.weight.mul_(6.0)
    return model, make_inputs("llava", model, seed=4)


def _first_token_law(model, inputs) -> dict[int, float]:
    out = model.generate(
        **inputs,
        max_new_tokens=1,
        do_sample=True,
        output_scores=True,
        return_dict_in_generate=True,
        **PROCESSING,
    )
    probs = torch.softmax(out.scores[0][0].double(), dim=-1)
    return {int(t): float(probs[t]) for t in probs.nonzero().flatten()}


def _exact_joint_law(model, inputs) -> dict[tuple[int, int], float]:
    joint = {}
    for t1, p1 in _first_token_law(model, inputs).items():
        extended = dict(inputs)
        extended["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[t1]])], dim=1)
        extended["attention_mask"] = torch.ones_like(extended["input_ids"])
        for t2, p2 in _first_token_law(model, extended).items():
            joint[(t1, t2)] = p1 * p2
    return joint


def _chi_square_p_value(counts: Counter, law: dict, n: int) -> float:
    cells = sorted(law, key=law.get, reverse=True)
    observed, expected, pool_o, pool_e = [], [], 0.0, 0.0
    for cell in cells:
        if law[cell] * n >= 5:
            observed.append(counts[cell])
            expected.append(law[cell] * n)
        else:
            pool_o, pool_e = pool_o + counts[cell], pool_e + law[cell] * n
    outside = n - sum(counts[c] for c in cells)  # draws the exact law gives probability 0
    assert outside == 0, f"{outside} draws outside the target's support"
    if pool_e > 0:
        observed.append(pool_o)
        expected.append(pool_e)
    o, e = torch.tensor(observed, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64)
    statistic, dof = float(((o - e) ** 2 / e).sum()), len(observed) - 1
    # chi-square survival function: the regularised upper incomplete gamma Q(dof / 2, statistic / 2)
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2.0)))


@pytest.mark.parametrize("draft_kind", ["greedy-continuation", "untrained"])
def test_tree_sampling_with_processors_has_the_target_law(vlm, draft_kind):
    model, inputs = vlm
    law = _exact_joint_law(model, inputs)
    prompt_len = inputs["input_ids"].shape[1]
    if draft_kind == "greedy-continuation":  # proposals the target often takes: long accepted paths
        reference = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        draft = make_forced_draft(model, reference[0], set(), tree_depth=3, tree_total_tokens=5, tree_top_k=2)
    else:  # confidently wrong proposals: rejections and residual draws
        torch.manual_seed(1)
        draft = SpecVLMDraftModel(
            SpecVLMDraftConfig.from_target(model, tree_depth=3, tree_total_tokens=5, tree_top_k=2)
        ).bind(model)
        with torch.no_grad():
            draft.fc.weight.mul_(5.0)
    torch.manual_seed(2)
    counts: Counter = Counter()
    accepted = []
    for _ in range(N_DRAWS):
        # three tokens, so a verify step can accept a draft token; the first two are compared
        out = model.generate(**inputs, max_new_tokens=3, do_sample=True, assistant_model=draft, **PROCESSING)
        counts[tuple(out[0, prompt_len : prompt_len + 2].tolist())] += 1
        accepted += draft.last_generation_stats.accepted_lengths
    p_value = _chi_square_p_value(counts, law, N_DRAWS)
    assert p_value > ALPHA, (
        f"joint law of the first two tokens differs from plain sampling: p = {p_value:.2e}"
    )
    if draft_kind == "greedy-continuation":
        assert max(accepted) >= 2  # draft tokens were accepted: the rejection rule really ran


def test_classifier_free_guidance_is_refused_before_any_work(vlm):
    model, inputs = vlm
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for mode in ("tree", "chain"):
            with pytest.raises(ValueError, match="guidance_scale"):
                model.generate(
                    **inputs, max_new_tokens=2, assistant_model=draft, decoding_mode=mode, guidance_scale=1.5
                )
    finally:
        handle.remove()
    assert calls == []
