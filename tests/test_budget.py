"""The automatic draft budget (`generation/budget.py`): the cost model, the per-step choices, the back-off, and
that generate with it stays lossless and reports what it chose."""

from __future__ import annotations

import pytest
import torch

from forced_draft import make_forced_draft
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.generation.budget import (
    BACKOFF_START,
    FIRST,
    SIBLING,
    BudgetPlanner,
    BudgetState,
    NodeCalibration,
    VerifyCosts,
    budget_state,
    measure_verify_costs,
)
from tiny_models import make_inputs, make_tiny_target

SIZES = [1, 2, 4, 8, 16, 32, 64]
GPU_LIKE = VerifyCosts.from_curve(SIZES, [10.0, 10.0, 10.1, 10.2, 10.4, 10.8, 11.5])  # flat to 64 tokens
CPU_LIKE = VerifyCosts.from_curve(SIZES, [81.0, 83.0, 123.0, 156.0, 150.0, 180.0, 231.0])  # a measured curve


def _planner(costs: VerifyCosts, level_s: float) -> BudgetPlanner:
    return BudgetPlanner(
        BudgetState(costs=VerifyCosts.from_curve(costs.sizes, costs.seconds), level_s=level_s)
    )


def test_costs_interpolate_and_stay_monotone():
    assert CPU_LIKE(1) == 81.0 and CPU_LIKE(3) == pytest.approx(103.0) and CPU_LIKE(128) > CPU_LIKE(64)
    calls = []
    costs = measure_verify_costs(lambda n: calls.append(n), sizes=(1, 4, 8), repeats=2)
    assert calls == [1, 4, 8] * 3  # a warm-up round, then rounds of every size
    assert costs.seconds == sorted(costs.seconds)


def test_the_same_code_picks_a_big_tree_on_a_flat_curve_and_a_small_one_on_a_steep_curve():
    # a good draft: 40 candidates whose cumulative probabilities fall slowly
    probs = [0.9**i for i in range(1, 41)]
    gpu, cpu = _planner(GPU_LIKE, level_s=0.5), _planner(CPU_LIKE, level_s=6.0)
    assert gpu.top_k() == 10 and cpu.top_k() == 2
    # a chain where even two tokens cost half as much again as one, and before any size beyond one is measured
    steep_pair = _planner(
        VerifyCosts.from_curve(SIZES, [75.0, 121.0, 166.0, 190.0, 230.0, 320.0, 500.0]), 6.0
    )
    fresh = BudgetPlanner(BudgetState(costs=VerifyCosts(per_token=0.01, base=10.0)))
    fresh.observe_plain(10.0)
    assert steep_pair.top_k() == 1 and fresh.top_k() == 1
    n_gpu, _ = gpu.best_size(probs, levels=6)
    n_cpu, _ = cpu.best_size(probs, levels=6)
    assert n_gpu >= 30 and n_cpu < n_gpu, (n_gpu, n_cpu)
    steep = _planner(VerifyCosts.from_curve(SIZES, [1.0 + 0.25 * n for n in SIZES]), level_s=0.1)
    assert steep.best_size(probs, levels=6)[0] <= 8
    # growing: another level of likely children pays on the GPU; unlikely ones never pay
    assert gpu.keep_growing(probs[:10], [0.5] * 10, levels=2, ratio=0.9)
    assert not cpu.keep_growing(probs[:10], [0.01, 0.01], levels=2, ratio=0.1)


def test_a_level_is_worth_what_the_whole_tree_with_it_can_reach():
    """A CPU's curve is steep for a few tokens, then flat: one level's own nodes do not pay for the steep part, the
    deeper tree they lead to does (judged one level at a time, trees stopped at one node and speculation lost)."""
    steep_then_flat = VerifyCosts.from_curve(SIZES, [80.0, 126.0, 196.0, 244.0, 257.0, 379.0, 546.0])
    planner = _planner(steep_then_flat, level_s=6.0)
    level_one = [0.95, 0.03]  # the root's two children; the likely one leads on
    assert planner.best_size(level_one, levels=0)[0] == 1
    assert planner.keep_growing(level_one, [0.95, 0.03], levels=0, ratio=0.95)
    assert not planner.keep_growing(level_one, [0.02, 0.01], levels=0, ratio=0.02)  # unlikely rows never pay


def test_a_chain_grows_through_a_bump_of_the_cost_curve_to_the_flat_part_beyond():
    """Measured on this project's CPU: c(3) = 200 ms, a bump at c(4) = 292 ms, then flat to c(8) = 316 ms. One more
    node of a confident chain does not pay for the bump; the five after it do. Judged one level ahead, chains
    stopped at two nodes (batch 1: 1.07x plain against chain mode's 1.58x)."""
    bumpy = VerifyCosts.from_curve([1, 2, 3, 4, 8, 16], [85.0, 176.0, 200.0, 292.0, 316.0, 364.0])
    planner = _planner(bumpy, level_s=6.0)
    chain = [0.9, 0.85]  # two levels drafted, each node the first choice of its parent
    assert planner.best_size(chain + [0.8], levels=2)[0] == 2  # the third node alone does not pay
    assert planner.keep_growing(chain, [0.8], levels=1, ratio=0.94)  # the chain it leads to does
    # ... unless the tokens left cut that chain short: one more node fits, and it alone does not pay
    assert not planner.keep_growing(chain, [0.8], levels=1, ratio=0.94, max_depth=3)
    assert planner.keep_growing(chain, [0.8], levels=1, ratio=0.94, max_depth=5)
    assert not planner.keep_growing(chain, [0.3], levels=1, ratio=0.35)  # an unsure draft stops
    # one unsure token (the draft's own word falls to half) does not make the next ones unsure where the target
    # has been going on along the draft's first choices: the measured rate carries the chain past it
    assert not planner.keep_growing(chain, [0.6], levels=1, ratio=0.5)
    nodes = planner.state.nodes
    nodes.observe([0.6, 0.5, 0.4, 0.3, 0.1], [FIRST] * 4 + [SIBLING], [-1, 0, 1, 2, -1], {0, 1})
    assert nodes.continuation == pytest.approx(2 / 3)  # the third first choice was offered and rejected
    nodes.observe([0.6, 0.5, 0.4, 0.3], [FIRST] * 4, [-1, 0, 1, 2], {0, 1, 2, 3})
    assert nodes.continuation == pytest.approx((0.9 * 2 + 4) / (0.9 * 3 + 4))
    assert planner.keep_growing(chain, [0.6], levels=1, ratio=0.5)


def test_a_fresh_state_verifies_at_most_twice_the_largest_size_measured():
    """Beyond the measured sizes c is extrapolated (optimistically, to find a flat part); a fresh state stakes at
    most one step twice the size it knows on that extrapolation: 2, 4, 8, ... tokens."""
    fresh = BudgetPlanner(BudgetState(costs=VerifyCosts(per_token=1.0, base=80.0)))
    sure = [0.99**i for i in range(1, 65)]  # a draft that is always right
    fresh.observe_plain(80.0)  # the first (plain) step measured c(1)
    limits = []
    for _ in range(7):
        n, _ = fresh.best_size(sure, levels=12)
        limits.append(n + 1)
        fresh.state.costs.observe(n + 1, 80.0 + 0.5 * n)
    assert limits == [2, 4, 8, 16, 32, 64, 65], limits


def test_nodes_are_valued_at_the_acceptance_measured_for_their_kind_and_probability():
    """An under-confident draft along its first choices (first children rated ~0.5 always accepted) and an
    over-confident tail (siblings rated ~0.15 never accepted): each kind and probability range is valued at what the
    target accepted there, and the planner keeps the likely nodes it would have dropped at the draft's word."""
    planner = _planner(VerifyCosts.from_curve(SIZES, [1.0 + n for n in SIZES]), level_s=0.1)  # steep
    nodes = planner.state.nodes
    assert nodes(0.5) == 0.5 and nodes(0.01, SIBLING) == 0.01  # the prior: the draft taken at its word
    # cumulative; worth by the chain rule: each node's given its parent, times its parent's
    chain = [0.5, 0.45, 0.4, 0.36]
    before, _ = planner.best_size(_chain_worth(nodes, chain), levels=4)
    for _ in range(10):  # probabilities given the parent
        nodes.observe([0.5, 0.9, 0.15, 0.45], [FIRST, FIRST, SIBLING, SIBLING], [-1, 0, -1, 0], {0, 1})
    assert nodes(0.5) > 0.9 and nodes(0.9) == 1.0 and nodes(0.15, SIBLING) < 0.5 * 0.15
    assert nodes(0.45, SIBLING) < 0.1 * 0.45  # the same probability, the other kind: hardly ever accepted
    # a range never verified: valued like its kind's nodes overall (first children: under-confident)
    assert nodes(0.05) > 0.05 and nodes(0.05, SIBLING) < 0.05
    after, _ = planner.best_size(_chain_worth(nodes, chain), levels=4)
    assert after > before, (before, after)


def _chain_worth(nodes, cumulative):
    worth, parent, values = 1.0, 1.0, []
    for p in cumulative:
        worth *= nodes(p / parent)
        parent = p
        values.append(worth)
    return values


def test_a_deep_first_choice_is_valued_by_what_its_own_level_taught():
    """By the chain rule a node is worth its parent's worth times the acceptance measured, after an accepted parent,
    for nodes of its kind and draft probability given the parent: every level's first choices teach the same rates.
    Binned by cumulative probability instead, deep nodes of a good draft fell in low bins that only they reach and
    were valued at the draft's word (a float32 CPU sweep: chains cut at 3.5 accepted tokens where a fixed chain of 8
    accepted 5.3)."""
    nodes = NodeCalibration()
    chain = [
        0.6 ** (i + 1) for i in range(6)
    ]  # cumulative: each first choice 0.6 given its parent, all accepted
    for _ in range(10):
        nodes.observe([0.6] * 6, [FIRST] * 6, [-1, 0, 1, 2, 3, 4], set(range(6)))
    assert nodes(0.6) > 0.99  # what the target showed, at every depth
    assert _chain_worth(nodes, chain)[-1] > 0.99
    # only nodes whose parent was accepted teach: a rejected parent's child says nothing about its own rate
    fresh = NodeCalibration()
    for _ in range(10):
        fresh.observe([0.6, 0.6], [FIRST, FIRST], [-1, 0], set())
    rounds = sum(0.9**i for i in range(10))  # one node offered per round, the root's child (DECAY 0.9)
    assert fresh.offered == pytest.approx(rounds) and fresh(0.6) < 0.2
    assert fresh.expected[FIRST][fresh._bin(0.6)] == pytest.approx(0.6 * rounds)


def test_a_tree_ranks_candidates_by_their_worth_and_stays_ancestor_closed():
    """The tree builder values every candidate where it is drafted (`tree_policy._worth`): a deep first child of a
    well-accepted kind outranks a shallow sibling the target keeps rejecting (ranked by probability alone, the
    sibling would be verified and the grandchild not), and no child is worth more than its parent."""
    from specvlm_hf.generation.tree_policy import _best_candidates, _worth

    nodes = NodeCalibration()
    for _ in range(20):  # first choices at 0.3 and 0.5 (given the parent) accepted; siblings at 0.3 not
        nodes.observe([0.3, 0.5, 0.3], [FIRST, FIRST, SIBLING], [-1, 0, -1], {0, 1})
    table = nodes.log_rates(torch.device("cpu"))
    k = 2
    level_one = torch.tensor([[0.6, 0.3]]).log()  # the root's two children: a first choice and a sibling
    worth_one = _worth(level_one, torch.zeros(1, 1), k, table)
    given_parent = torch.tensor([[0.4, 0.3, 0.5, 0.4]]).log()
    children = (level_one.repeat_interleave(k, dim=-1) + given_parent).exp()
    worth_two = _worth(given_parent, worth_one, k, table)
    assert torch.all(worth_two <= worth_one.repeat_interleave(k, dim=-1))  # never above the parent
    ranks = torch.cat([worth_one, worth_two], dim=1)
    depths = torch.tensor([1, 1, 2, 2, 2, 2])
    keep = _best_candidates(ranks, depths, total=2)[0].tolist()
    # by worth: the first choice and ITS first child (0.4 given its parent, where first children are accepted
    # about twice as often as the draft says)
    assert keep == [True, False, True, False, False, False], keep
    by_probability = _best_candidates(torch.cat([level_one, children.log()], dim=1), depths, total=2)[0]
    assert by_probability.tolist() == [True, True, False, False, False, False]  # the sibling (0.3) over 0.24


def test_spine_depth_follows_the_measured_acceptance():
    planner = _planner(CPU_LIKE, level_s=6.0)
    planner.state.spine_offered, planner.state.spine_accepted = 10.0, 9.0
    deep = planner.spine_depth()
    planner.state.spine_offered, planner.state.spine_accepted = 10.0, 2.0
    assert planner.spine_depth() < deep


def test_back_off_when_speculation_does_not_pay_and_probe_again():
    planner = _planner(CPU_LIKE, level_s=6.0)
    step = dict(levels=3, predicted=2.0, drafted=3, accepted=0, emitted=1, forward_s=150.0, overhead_s=5.0)
    planner.observe(n=8, draft_s=20.0, **step)  # one failed step of a (so far) good draft: no back-off
    assert planner.state.backoff.left == 0
    for _ in range(2):  # a draft that is never right: one token per (slower) step
        planner.observe(n=8, draft_s=20.0, **step)
    assert planner.state.backoff.left == BACKOFF_START
    plain = [planner.plain_step() for _ in range(BACKOFF_START + 1)]
    assert plain == [True] * BACKOFF_START + [False]  # then a probe
    planner.observe(n=8, draft_s=20.0, **step)
    assert planner.state.backoff.left == 2 * BACKOFF_START  # still bad: longer back-off
    good = dict(step, accepted=6, emitted=7)
    for _ in range(BACKOFF_START * 2):
        planner.plain_step()
    planner.observe(n=8, draft_s=20.0, **good)
    assert planner.state.backoff.left == 0 and planner.state.calibration > 0


@pytest.fixture(scope="module")
def target():
    return make_tiny_target("llava")


def test_automatic_budget_is_lossless_and_reports_its_choices(target):
    inputs = make_inputs("llava", target, seed=3)
    reference = target.generate(**inputs, max_new_tokens=24, do_sample=False)
    forced = make_forced_draft(target, reference[0], set(), tree_top_k=None)  # always right
    assert forced.config.tree_top_k is None  # no budget given: automatic
    out = target.generate(**inputs, max_new_tokens=24, do_sample=False, assistant_model=forced)
    assert torch.equal(out, reference)
    stats = forced.last_generation_stats
    assert stats.budget_costs_ms and set(stats.budget_costs_ms) >= {1, 8, 64}
    assert stats.budget_steps and all(kind in ("spec", "plain") for kind, _ in stats.budget_steps)
    assert stats.verify_forward_time_s > 0 and stats.accept_time_s > 0
    # an untrained draft: lossless too, and it backs off to plain steps
    torch.manual_seed(0)
    untrained = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(target)).bind(target).eval()
    out = target.generate(**inputs, max_new_tokens=24, do_sample=False, assistant_model=untrained)
    assert torch.equal(out, reference)
    assert ("plain", 0) in untrained.last_generation_stats.budget_steps


def test_an_explicit_budget_is_obeyed(target):
    inputs = make_inputs("llava", target, seed=3)
    torch.manual_seed(0)
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(target)).bind(target).eval()
    target.generate(**inputs, max_new_tokens=8, do_sample=False, assistant_model=draft, tree_total_tokens=5)
    stats = draft.last_generation_stats
    assert stats.budget_steps == [] and stats.budget_costs_ms == {}  # no planner
    sampled = target.generate(
        **inputs, max_new_tokens=8, do_sample=True, assistant_model=draft, tree_depth=3, tree_total_tokens=3
    )
    assert sampled.shape[1] == inputs["input_ids"].shape[1] + 8


def test_an_automatic_chain_backs_off_with_an_untrained_draft(target, monkeypatch):
    from specvlm_hf.generation import chain, prefill

    inputs = make_inputs("llava", target, seed=3)
    reference = target.generate(**inputs, max_new_tokens=40, do_sample=False)
    torch.manual_seed(0)
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(target)).bind(target).eval()
    forwards = []
    original = chain.draft_step
    for module in (chain, prefill):  # drafting, and consuming the verified tokens
        monkeypatch.setattr(module, "draft_step", lambda *a, **k: forwards.append(1) or original(*a, **k))
    out = target.generate(
        **inputs, max_new_tokens=40, do_sample=False, assistant_model=draft, decoding_mode="chain"
    )
    assert torch.equal(out, reference)
    steps = len(draft.last_generation_stats.accepted_lengths)
    assert steps >= 30 and len(forwards) < steps  # most steps drafted nothing; the draft caught up in batches


def test_a_fresh_automatic_chain_reaches_further_only_as_its_chains_are_accepted_whole(target):
    """Chain mode cannot time its verify (transformers' assisted loop runs it): a fresh state drafts 2 tokens, then
    4, then 8, each only after a chain that long was accepted whole; a draft wrong at every second token
    stays at 2 (it used to draft 8 from the first step)."""
    inputs = make_inputs("llava", target, seed=3)
    reference = target.generate(**inputs, max_new_tokens=24, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]

    def chain_sizes(wrong):
        forced = make_forced_draft(target, reference[0], wrong, tree_top_k=None, num_draft_tokens=None)
        out = target.generate(
            **inputs, max_new_tokens=24, do_sample=False, assistant_model=forced, decoding_mode="chain"
        )
        assert torch.equal(out, reference)
        return [n for kind, n in forced.last_generation_stats.budget_steps if kind == "spec"]

    assert chain_sizes(set())[:3] == [2, 4, 8]
    sizes = chain_sizes({prompt_len + i for i in range(2, 24, 2)})  # every second token wrong
    assert sizes and max(sizes) <= 2, sizes


def test_an_automatic_chain_stays_backed_off_across_calls(target):
    """A draft that did not pay in one call starts the next one backed off (no two failed probes per call), and
    chain mode records its per-step choices."""
    inputs = make_inputs("llava", target, seed=3)
    reference = target.generate(**inputs, max_new_tokens=40, do_sample=False)
    torch.manual_seed(0)
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(target)).bind(target).eval()
    for call in range(3):
        out = target.generate(
            **inputs, max_new_tokens=40, do_sample=False, assistant_model=draft, decoding_mode="chain"
        )
        assert torch.equal(out, reference)
        steps = draft.last_generation_stats.budget_steps
        assert len(steps) == len(draft.last_generation_stats.accepted_lengths)
        probes = [kind for kind, _ in steps if kind == "spec"]
        if call > 0:  # backed off from the start, at most one probe per long back-off
            assert steps[0] == ("plain", 0) and len(probes) <= 2, steps


def test_the_first_call_runs_no_forward_beyond_decoding_and_learns_from_its_steps(target):
    """No stall: the automatic budget measures nothing up front (it used to time 28 synthetic target forwards per
    target and batch size before the first token); it starts from a prior, its first step is a plain one (which
    measures c(1)), and it learns c(n) from the verify steps it runs. A new batch size starts from what was
    learned at another (draft level time, acceptance), again without extra forwards."""
    from batched_inputs import generated_rows, make_batch_inputs, pad_id, real_lengths
    from forced_draft import make_batched_forced_draft, merged_reference

    inputs = make_inputs("llava", target, seed=3)
    reference = target.generate(**inputs, max_new_tokens=24, do_sample=False)
    forced = make_forced_draft(target, reference[0], set(), tree_top_k=None)  # always right
    forwards = []
    handle = target.register_forward_hook(lambda *args: forwards.append(1))
    try:
        out = target.generate(**inputs, max_new_tokens=24, do_sample=False, assistant_model=forced)
        stats = forced.last_generation_stats
        assert torch.equal(out, reference)
        assert len(forwards) == stats.target_forwards  # every target forward is a decoding step
        assert stats.budget_steps[0] == ("plain", 0)  # the fresh state's first step measures c(1)
        largest = 1  # every verify at most twice the largest size measured before it
        for _, n in stats.budget_steps:
            assert n + 1 <= 2 * largest, stats.budget_steps
            largest = max(largest, n + 1)
        assert any(kind == "spec" and n > 0 for kind, n in stats.budget_steps), stats.budget_steps
        state = budget_state(forced, target, target.device)
        assert 1 in state.costs.observed and max(state.costs.observed) > 1 and state.level_s is not None
        # the next call starts from what was learned: no plain first step
        forwards.clear()
        target.generate(**inputs, max_new_tokens=24, do_sample=False, assistant_model=forced)
        assert forced.last_generation_stats.budget_steps[0] != ("plain", 0)
        assert len(forwards) == forced.last_generation_stats.target_forwards

        # a batch: rows 6 and 34 tokens long, a new batch size for this draft's planner
        batch = make_batch_inputs("llava", target, [1, 2], [6, 34])
        plain = target.generate(**batch, max_new_tokens=10, do_sample=False)
        width = batch["input_ids"].shape[1]
        rows = generated_rows(plain, width, pad_id(target))
        batched = make_batched_forced_draft(
            target, merged_reference(rows, real_lengths(batch)), (), tree_top_k=None
        )
        batched.__dict__["_specvlm_budget_states"] = forced.__dict__[
            "_specvlm_budget_states"
        ]  # what B=1 learned
        forwards.clear()
        out = target.generate(**batch, max_new_tokens=10, do_sample=False, assistant_model=batched)
        assert torch.equal(out, plain)
        assert len(forwards) == batched.last_generation_stats.target_forwards
        new = budget_state(batched, target, target.device, 2)
        assert new is not None and new is not state and new.level_s is not None
    finally:
        handle.remove()
