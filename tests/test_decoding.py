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


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("budget", ["fixed", "auto"])
def test_no_node_is_drafted_deeper_than_the_tokens_left(batch, budget):
    """A step's path of d nodes adds d + 1 tokens: near max_new_tokens, deeper nodes cost verify time and can add
    nothing, so none is drafted (one token left: a plain step). Every verify forward's deepest node (its positions
    past the root's) is checked against the tokens its rows have left."""
    model = make_tiny_target("llava")
    inputs = make_inputs("llava", model, seed=4)
    inputs = {k: torch.cat([v] * batch) if torch.is_tensor(v) else v for k, v in inputs.items()}
    n = 11
    reference = _plain(model, inputs, n)
    prompt_len = inputs["input_ids"].shape[1]
    cap = prompt_len + n
    if budget == "fixed":
        draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
        settings = {"tree_depth": 6, "tree_top_k": 2, "tree_total_tokens": 8}
    else:  # an all-correct draft: the planner's chains grow as deep as they may
        draft, settings = make_forced_draft(model, reference[0], (), tree_top_k=None), {}
    depths = []  # (deepest node, tokens the row could still use beyond the bonus one) per verify forward

    def record(module, args, kwargs):
        positions = kwargs.get("position_ids")
        root = None if positions is None else positions.reshape(batch, -1)[:, 0]
        if (
            root is not None and int(root.min()) >= prompt_len
        ):  # a verify forward (the root: a row's length - 1)
            deepest = (positions.reshape(batch, -1) - root[:, None]).max()
            depths.append((int(deepest), int(cap - (root.max() + 1) - 1)))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for _ in range(2):  # the automatic budget's second call plans from what the first learned
            out = model.generate(
                **inputs, max_new_tokens=n, do_sample=False, assistant_model=draft, **settings
            )
            assert torch.equal(out, reference)
    finally:
        handle.remove()
    assert depths and all(deepest <= max(left, 0) for deepest, left in depths), depths
    assert any(deepest > 1 for deepest, _ in depths), depths  # the cap bites near the end, not everywhere


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("budget", ["fixed", "auto"])
def test_nothing_is_drafted_below_an_end_of_answer_token(batch, budget):
    """Generation stops at EOS, so nodes below an EOS candidate can never be emitted: none is drafted. The draft
    here proposes the reference continuation confidently right through the EOS (as a draft that never saw what
    follows an answer's end may); every verify forward's deepest position stays at the EOS's."""
    model = make_tiny_target("llava")
    inputs = make_inputs("llava", model, seed=4)
    inputs = {k: torch.cat([v] * batch) if torch.is_tensor(v) else v for k, v in inputs.items()}
    prompt_len = inputs["input_ids"].shape[1]
    free = _plain(model, inputs, 20)[0, prompt_len:].tolist()  # no EOS configured: the model runs on
    end = next(
        j for j in range(6, 20) if free[j] not in free[:j]
    )  # a token first seen there: the answer's end
    eos = free[end]
    reference = model.generate(**inputs, max_new_tokens=20, do_sample=False, eos_token_id=eos)
    assert reference.shape[1] == prompt_len + end + 1  # plain stops at it
    if budget == "fixed":
        settings = {"tree_depth": 9, "tree_top_k": 1, "tree_total_tokens": 9}
        draft = make_forced_draft(model, torch.tensor(inputs["input_ids"][0].tolist() + free), ())
    else:
        settings = {}
        draft = make_forced_draft(
            model, torch.tensor(inputs["input_ids"][0].tolist() + free), (), tree_top_k=None
        )
    below_eos = []  # verify forwards with a node whose ancestors include an EOS node (the 4-D mask's tree part)
    verified = []

    def record(module, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        if mask is None or mask.dim() != 4 or int(kwargs["position_ids"].min()) < prompt_len:
            return
        n = ids.shape[1]
        tree = mask[:, 0, :, -n:]
        sees = tree if tree.dtype == torch.bool else tree == 0  # (B, n, n): node i sees node j
        ancestors = sees & ~torch.eye(n, dtype=torch.bool, device=ids.device)
        below_eos.append(bool((ancestors & (ids == eos)[:, None, :]).any()))
        verified.append(n)

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for _ in range(2):
            out = model.generate(
                **inputs,
                max_new_tokens=20,
                do_sample=False,
                eos_token_id=eos,
                assistant_model=draft,
                **settings,
            )
            assert torch.equal(out, reference)
    finally:
        handle.remove()
    assert verified and not any(below_eos), (verified, below_eos)
