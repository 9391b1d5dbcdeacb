"""Batched speculative decoding (issue #17): a left-padded batch gives what plain batched `generate` gives.

1. Plain batched greedy `generate` on these left-padded batches equals every row generated alone, for every family
   (measured with transformers 5.24: it does, for all 14 families; so the speculative cases below compare with
   plain batched output and with every row alone).
2. Greedy equality, float32, token for token: B in {2, 3, 5} x every family x {tree, chain} x draft (untrained, or
   forced: `forced_draft.make_batched_forced_draft` proposes each row's own greedy continuation except at chosen
   "wrong" positions, so acceptance is deep and ragged across rows) x fixed random budgets or the automatic one x
   an EOS token that ends one row early (possibly others too: whatever plain does). Targets are
   `sharp_models` ones; every case also checks that ignoring the padding (an all-ones attention mask) changes
   plain's output, and the module asserts most cases could fail that way. The full matrix is `slow`;
   `CI_CASES` is a stratified subset.
   Stop strings that end rows at different steps (plain extends a stopped row until all have stopped).
3. Per-row statistics (`GenerationStats.rows`): exact ragged acceptance, a finished row (EOS or its length limit)
   takes part in no more forwards; and the refusal of a batch with a filled cache.
5. Rows whose images differ in size (LLaVA-NeXT any-res patch counts, Qwen2-VL grids, so each row's visual block
   and M-RoPE positions differ): equal to plain batched and to each row alone; taking the M-RoPE positions from the
   attention mask instead of the prefill's position ids makes the Qwen cases fail (checked once).
4. Sampling, B = 2, with temperature / top-k / top-p / repetition penalty: each row's first two tokens follow the
   exact law plain sampling gives that row (chi-square at significance 1e-3, `test_sampling_processors`' method;
   plain batched sampling passes the same test: p = 0.95 and 0.44 for the two rows, measured).

Forced drafts key their reference by a row's real-token position, so the rows' decoding ranges must not overlap:
prompts of 6, 34, 62, 90 and 118 text tokens (plus the family's fixed visual block) with at most 16 new tokens and
tree depth at most 7 keep them 28 positions apart.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
import torch

from batched_inputs import generated_rows, make_batch_inputs, pad_id, real_lengths
from forced_draft import expected_accepted_lengths, make_batched_forced_draft, merged_reference
from sharp_models import make_sharp_target
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from test_lossless_matrix import _word_tokenizer as word_tokenizer
from test_sampling_processors import PROCESSING
from test_sampling_processors import _chi_square_p_value as chi_square_p_value
from test_sampling_processors import _exact_joint_law as exact_joint_law
from tiny_models import FAMILIES, TEXT_HIGH, TEXT_LOW, make_inputs, make_tiny_target

MODES = ("tree", "chain")
BATCH_SIZES = (2, 3, 5)
DISJOINT_LENS = (6, 34, 62, 90, 118)  # text tokens per row for forced drafts (see module docstring)
MAX_NEW = 16
MAX_DEPTH = 7

_TARGETS: dict = {}
_SENSITIVE: list[bool] = []


def _target(family: str):
    if family not in _TARGETS:
        _TARGETS[family] = make_sharp_target(family)
    return _TARGETS[family]


def _plain(model, batch: dict, **opts) -> torch.Tensor:
    return model.generate(**batch, do_sample=False, **opts)


def _alone(family: str, model, seed: int, prompt_len: int, **opts) -> list[int]:
    inputs = make_inputs(family, model, seed=seed, prompt_len=prompt_len)
    out = model.generate(**inputs, do_sample=False, **opts)
    return generated_rows(out, inputs["input_ids"].shape[1], pad_id(model), opts.get("eos_token_id"))[0]


# ---------------------------------------------------------------------------------------------------------------
# 1. plain batched generate vs rows alone (no draft: holds today)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_batched_greedy_equals_rows_alone(family):
    model = _target(family)
    seeds, lens = [11, 12, 13, 14, 15], [6, 40, 17, 3, 25]
    batch = make_batch_inputs(family, model, seeds, lens)
    width, pad = batch["input_ids"].shape[1], pad_id(model)
    out = _plain(model, batch, max_new_tokens=10)
    assert out.shape == (5, width + 10)
    rows = generated_rows(out, width, pad)
    for b, (seed, n) in enumerate(zip(seeds, lens)):
        assert rows[b] == _alone(family, model, seed, n, max_new_tokens=10), f"{family} row {b}"
    # an EOS that ends row 1 at its third token: the others go on, row 1 is filled with the pad id
    eos = rows[1][2]
    out = _plain(model, batch, max_new_tokens=10, eos_token_id=eos)
    rows = generated_rows(out, width, pad, eos)
    for b, (seed, n) in enumerate(zip(seeds, lens)):
        alone = _alone(family, model, seed, n, max_new_tokens=10, eos_token_id=eos)
        assert rows[b] == alone, f"{family} row {b} (eos {eos})"
        assert out[b, width + len(alone) :].eq(pad).all(), f"{family} row {b}: pad fill after EOS"
    # the comparison can fail: attending to the pads (a wrong mask) changes some row
    ignored = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]))
    assert not torch.equal(_plain(model, ignored, max_new_tokens=10), _plain(model, batch, max_new_tokens=10))


# ---------------------------------------------------------------------------------------------------------------
# 2. greedy speculative == plain batched (== every row alone)


@dataclass(frozen=True)
class Case:
    family: str
    mode: str
    batch_size: int
    seed: int
    draft: str  # "random" | "forced"
    max_new_tokens: int
    eos_row: int | None  # the row whose third generated token (plain, no EOS) becomes eos_token_id
    auto_budget: bool
    top_k: int
    depth: int
    total: int
    chain_k: int

    @property
    def id(self) -> str:
        budget = "auto" if self.auto_budget else f"k{self.top_k}d{self.depth}t{self.total}c{self.chain_k}"
        return (
            f"{self.family}-{self.mode}-B{self.batch_size}-s{self.seed}-{self.draft}-n{self.max_new_tokens}-"
            f"eos{self.eos_row}-{budget}"
        )

    def prompt_lens(self) -> list[int]:
        rng = random.Random(self.seed)
        if self.draft == "forced":  # disjoint decoding ranges, in a random row order
            return rng.sample(DISJOINT_LENS, self.batch_size)
        return [rng.randint(3, 40) for _ in range(self.batch_size)]

    def seeds(self) -> list[int]:
        return [1000 * self.seed + b for b in range(self.batch_size)]


def _case(rng: random.Random, family: str, mode: str, batch_size: int, draft: str, index: int) -> Case:
    forced = draft == "forced"
    depth = rng.randint(2 if forced else 1, MAX_DEPTH)
    return Case(
        family=family,
        mode=mode,
        batch_size=batch_size,
        seed=index,
        draft=draft,
        max_new_tokens=rng.randint(6 if forced else 3, MAX_NEW),
        eos_row=rng.randrange(batch_size) if rng.random() < 0.35 else None,
        auto_budget=rng.random() < 0.3,
        top_k=rng.randint(1, 6),
        depth=depth,
        total=rng.randint(depth, 40),
        chain_k=rng.randint(2 if forced else 1, 8),
    )


def build_slow_cases(per_cell: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []
    for family in FAMILIES:
        for mode in MODES:
            for batch_size in BATCH_SIZES:
                for draft in ("random", "forced"):
                    cases += [
                        _case(rng, family, mode, batch_size, draft, len(cases)) for _ in range(per_cell)
                    ]
    return cases


def build_ci_cases(seed: int) -> list[Case]:
    """Every family x mode twice (once per draft kind), batch sizes cycling so each family sees two of them."""
    rng = random.Random(seed)
    cases: list[Case] = []
    for f, family in enumerate(FAMILIES):
        for m, mode in enumerate(MODES):
            for d, draft in enumerate(("random", "forced")):
                batch_size = BATCH_SIZES[(f + m + 2 * d) % len(BATCH_SIZES)]
                cases.append(_case(rng, family, mode, batch_size, draft, 50_000 + len(cases)))
    return cases


SLOW_CASES = build_slow_cases(per_cell=3, seed=17)  # 14 x 2 x 3 x 2 x 3 = 504
CI_CASES = build_ci_cases(seed=1700)  # 56


def _budget_kwargs(case: Case) -> dict:
    if case.auto_budget:
        return {"decoding_mode": case.mode}
    return dict(
        decoding_mode=case.mode,
        tree_top_k=case.top_k,
        tree_depth=case.depth,
        tree_total_tokens=case.total,
        num_draft_tokens=case.chain_k,
    )


def _wrong_positions(case: Case, starts: list[int]) -> set[int]:
    rng = random.Random(case.seed + 1)
    wrong = set()
    for start in starts:  # a different number of wrong positions per row: ragged acceptance
        k = rng.randint(0, 3)
        wrong |= {start + w for w in rng.sample(range(1, MAX_NEW + 1), k)}
    return wrong


def _mean_row_accepted(stats) -> float:
    lengths = [n for row in stats.rows for n in row.accepted_lengths]
    return sum(lengths) / len(lengths) if lengths else 0.0


def run_case(case: Case) -> None:
    model = _target(case.family)
    seeds, lens = case.seeds(), case.prompt_lens()
    batch = make_batch_inputs(case.family, model, seeds, lens)
    width, pad = batch["input_ids"].shape[1], pad_id(model)
    opts = {"max_new_tokens": case.max_new_tokens}
    if case.eos_row is not None:
        probe = generated_rows(_plain(model, batch, **opts), width, pad)[case.eos_row]
        opts["eos_token_id"] = probe[min(2, len(probe) - 1)]
    reference = _plain(model, batch, **opts)
    rows = generated_rows(reference, width, pad, opts.get("eos_token_id"))
    ignored = dict(batch, attention_mask=torch.ones_like(batch["attention_mask"]))
    _SENSITIVE.append(not torch.equal(_plain(model, ignored, **opts), reference))

    if case.draft == "forced":
        starts = real_lengths(batch)
        wrong = _wrong_positions(case, starts)
        overrides = {"tree_top_k": None} if case.auto_budget else {}
        draft = make_batched_forced_draft(model, merged_reference(rows, starts), wrong, **overrides)
    else:
        draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
    out = model.generate(**batch, **opts, do_sample=False, assistant_model=draft, **_budget_kwargs(case))
    assert out.shape == reference.shape, f"{case.id}: shape {tuple(out.shape)} vs {tuple(reference.shape)}"
    for b in range(case.batch_size):
        assert torch.equal(out[b], reference[b]), (
            f"{case.id} row {b} (prompt {lens[b]}, seed {seeds[b]}): "
            f"{out[b, width:].tolist()} vs plain {reference[b, width:].tolist()}"
        )
    # plain batched == every row alone (test 1), so the speculative rows equal them too
    for b in range(case.batch_size):
        assert rows[b] == _alone(case.family, model, seeds[b], lens[b], **opts), f"{case.id} row {b} alone"

    stats = draft.last_generation_stats
    assert len(stats.rows) == case.batch_size, case.id
    assert [r.new_tokens for r in stats.rows] == [len(r) for r in rows], case.id
    assert stats.new_tokens == sum(len(r) for r in rows), case.id
    for b, row in enumerate(stats.rows):
        assert sum(row.accepted_lengths) == row.new_tokens - 1, (case.id, b, row.accepted_lengths)
        assert row.target_forwards == len(row.accepted_lengths) + 1, (case.id, b)
    assert stats.target_forwards == max(row.target_forwards for row in stats.rows), case.id
    if case.draft == "forced" and not case.auto_budget:  # deep, ragged acceptance really happened
        # (the automatic budget may rightly back off to plain steps on a CPU, where verifying costs more)
        assert _mean_row_accepted(stats) > 1.5, (case.id, [r.accepted_lengths for r in stats.rows])


@pytest.mark.parametrize("case", CI_CASES, ids=lambda c: c.id)
def test_batched_greedy_ci(case):
    run_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: c.id)
def test_batched_greedy_full(case):
    run_case(case)


def test_batched_cases_can_fail():
    """Runs after the cases above (same module, file order): most of them change when the padding is ignored."""
    if len(_SENSITIVE) < 10:
        pytest.skip("run together with the batched cases")
    assert sum(_SENSITIVE) >= 0.7 * len(_SENSITIVE), (sum(_SENSITIVE), len(_SENSITIVE))


def test_batched_case_sets():
    assert len(SLOW_CASES) == 504
    cells = {(c.family, c.mode) for c in CI_CASES}
    assert cells == {(f, m) for f in FAMILIES for m in MODES}
    for mode in MODES:
        assert {c.batch_size for c in CI_CASES if c.mode == mode} == set(BATCH_SIZES)
    assert {c.draft for c in CI_CASES} == {"random", "forced"}
    assert any(c.auto_budget for c in CI_CASES) and any(not c.auto_budget for c in CI_CASES)
    assert any(c.eos_row is not None for c in CI_CASES)
    for case in SLOW_CASES + CI_CASES:
        if case.draft == "forced":
            lens = sorted(case.prompt_lens())
            gaps = [b - a for a, b in zip(lens, lens[1:])]
            assert all(g > case.max_new_tokens + MAX_DEPTH + 2 for g in gaps), case.id


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma"])
def test_batched_stop_string_ends_rows_as_plain(family, mode):
    """Stop strings (no EOS) that the rows emit at different steps: plain batched generate keeps extending a row
    that stopped until every row has stopped (no pad fill); speculative decoding must give the same tensor."""
    model = _target(family)
    seeds, lens = [31, 32, 33], [34, 90, 6]
    batch = make_batch_inputs(family, model, seeds, lens)
    width, pad = batch["input_ids"].shape[1], pad_id(model)
    free = generated_rows(_plain(model, batch, max_new_tokens=12), width, pad)
    stops = [f"w{free[b][step]}" for b, step in enumerate((6, 2, 4))]
    opts = dict(max_new_tokens=12, stop_strings=stops, tokenizer=word_tokenizer(model))
    reference = _plain(model, batch, **opts)
    assert reference.shape[1] < width + 12  # every row stopped before the length limit
    starts = real_lengths(batch)
    wrong = {starts[0] + 2, starts[2] + 1, starts[2] + 6}
    forced = make_batched_forced_draft(
        model, merged_reference(generated_rows(reference, width, pad), starts), wrong
    )
    untrained = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
    for draft in (forced, untrained):
        out = model.generate(
            **batch, **opts, do_sample=False, assistant_model=draft, decoding_mode=mode, **FIXED
        )
        assert torch.equal(out, reference), (
            type(draft).__name__,
            out[:, width:].tolist(),
            reference[:, width:].tolist(),
        )


# ---------------------------------------------------------------------------------------------------------------
# 3. per-row statistics, exact ragged acceptance, refusal


LOOKAHEAD = 4
FIXED = dict(tree_top_k=3, tree_depth=LOOKAHEAD, tree_total_tokens=10, num_draft_tokens=LOOKAHEAD)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_per_row_stats_and_exact_ragged_acceptance(family, mode):
    """Forced drafts with a different set of wrong positions per row: each row accepts exactly what it would
    alone (`expected_accepted_lengths`), a row that hits EOS stops taking part, and the totals add up."""
    model = _target(family)
    seeds, lens = [7, 8, 9], [62, 6, 34]
    batch = make_batch_inputs(family, model, seeds, lens)
    width, pad = batch["input_ids"].shape[1], pad_id(model)
    n = 14
    free = generated_rows(_plain(model, batch, max_new_tokens=n), width, pad)
    eos = free[1][4]  # row 1 ends at its fifth token (others too if they emit it: whatever plain does)
    reference = _plain(model, batch, max_new_tokens=n, eos_token_id=eos)
    rows = generated_rows(reference, width, pad, eos)
    starts = real_lengths(batch)
    offsets = [{2, 3, 9}, {1}, {6}]
    wrong = {s + w for s, ws in zip(starts, offsets) for w in ws}
    draft = make_batched_forced_draft(model, merged_reference(rows, starts), wrong)
    out = model.generate(
        **batch,
        max_new_tokens=n,
        eos_token_id=eos,
        do_sample=False,
        assistant_model=draft,
        decoding_mode=mode,
        **FIXED,
    )
    assert torch.equal(out, reference)
    stats = draft.last_generation_stats
    assert len(stats.rows) == 3
    for b, row in enumerate(stats.rows):
        assert row.new_tokens == len(rows[b]), b
        assert sum(row.accepted_lengths) == row.new_tokens - 1, (b, row.accepted_lengths)
        assert row.target_forwards == len(row.accepted_lengths) + 1, b  # verify forwards + the prefill
        expected = expected_accepted_lengths(starts[b], len(rows[b]), wrong, LOOKAHEAD)
        assert row.accepted_lengths == expected, (b, row.accepted_lengths, expected)
    assert stats.new_tokens == sum(r.new_tokens for r in stats.rows)
    # a batched forward serves every row still running; a finished row takes part in none
    assert stats.target_forwards == max(r.target_forwards for r in stats.rows)
    assert len({r.target_forwards for r in stats.rows}) > 1  # ragged: rows finished at different forwards
    assert _mean_row_accepted(stats) > 1.5


@pytest.mark.parametrize("mode", MODES)
def test_row_that_reaches_max_new_tokens_first_stops_taking_part(mode):
    """No EOS: every row ends at max_new_tokens, but a row whose draft is always right gets there in fewer
    forwards than one whose draft is often wrong; from then on it takes part in no forward and emits nothing."""
    model = _target("llava")
    seeds, lens = [21, 22], [6, 34]
    batch = make_batch_inputs("llava", model, seeds, lens)
    width, pad = batch["input_ids"].shape[1], pad_id(model)
    n = 10
    reference = _plain(model, batch, max_new_tokens=n)
    rows = generated_rows(reference, width, pad)
    starts = real_lengths(batch)
    wrong = {starts[1] + w for w in (1, 2, 3, 5, 7)}  # row 0: never wrong; row 1: often
    draft = make_batched_forced_draft(model, merged_reference(rows, starts), wrong)
    out = model.generate(
        **batch, max_new_tokens=n, do_sample=False, assistant_model=draft, decoding_mode=mode, **FIXED
    )
    assert torch.equal(out, reference)
    fast, slow = draft.last_generation_stats.rows
    assert fast.accepted_lengths == expected_accepted_lengths(starts[0], n, wrong, LOOKAHEAD) == [5, 4]
    assert slow.accepted_lengths == expected_accepted_lengths(starts[1], n, wrong, LOOKAHEAD)
    assert (fast.target_forwards, slow.target_forwards) == (3, len(slow.accepted_lengths) + 1)
    assert draft.last_generation_stats.target_forwards == slow.target_forwards


@pytest.mark.parametrize("mode", MODES)
def test_batch_of_one_has_no_row_stats(mode):
    model = _target("llava")
    inputs = make_inputs("llava", model, seed=3)
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
    model.generate(**inputs, max_new_tokens=5, do_sample=False, assistant_model=draft, decoding_mode=mode)
    assert draft.last_generation_stats.rows == []
    assert draft.last_generation_stats.new_tokens == 5


@pytest.mark.parametrize("mode", MODES)
def test_batch_with_a_filled_cache_is_refused_before_any_work(mode):
    model = _target("llava")
    batch = make_batch_inputs("llava", model, [1, 2], [6, 20])
    first = model.generate(**batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    turn = torch.randint(TEXT_LOW, TEXT_HIGH, (2, 4), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([first.sequences, turn], 1)
    mask = torch.cat(
        [batch["attention_mask"], torch.ones(2, ids.shape[1] - batch["attention_mask"].shape[1])], 1
    )
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="(?i)cache"):
            model.generate(
                input_ids=ids,
                attention_mask=mask.long(),
                cache=first.cache,
                max_new_tokens=3,
                do_sample=False,
                assistant_model=draft,
                decoding_mode=mode,
            )
    finally:
        handle.remove()
    assert calls == []


# ---------------------------------------------------------------------------------------------------------------
# 4. sampling, B = 2: each row's first two tokens have the law plain sampling gives that row


N_DRAWS = 400
ALPHA = 1e-3
SAMPLING_LENS, SAMPLING_SEEDS = [6, 34], [4, 5]


@pytest.fixture(scope="module")
def sampling_vlm():
    model = make_tiny_target("llava")
    with torch.no_grad():  # peaked but far from one-hot next-token laws (as in test_sampling_processors)
        model.lm_head.weight.mul_(6.0)
    batch = make_batch_inputs("llava", model, SAMPLING_SEEDS, SAMPLING_LENS)
    # plain batched == rows alone (test 1), so each row's exact law is computed from the row alone
    laws = [
        exact_joint_law(model, make_inputs("llava", model, seed=s, prompt_len=p))
        for s, p in zip(SAMPLING_SEEDS, SAMPLING_LENS)
    ]
    return model, batch, laws


def _sampling_draft(model, batch, kind: str, mode: str):
    budget = dict(tree_depth=3, tree_total_tokens=5, tree_top_k=2, num_draft_tokens=3)
    if kind == "greedy-continuation":  # proposals the target often takes: accepted paths, ragged across rows
        width = batch["input_ids"].shape[1]
        greedy = generated_rows(
            model.generate(**batch, max_new_tokens=6, do_sample=False), width, pad_id(model)
        )
        return make_batched_forced_draft(model, merged_reference(greedy, real_lengths(batch)), (), **budget)
    torch.manual_seed(1)  # confidently wrong proposals: rejections and residual draws
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model, **budget)).bind(model)
    with torch.no_grad():
        draft.fc.weight.mul_(5.0)
    return draft


SAMPLING_CASES = [
    ("tree", "greedy-continuation"),
    ("chain", "untrained"),
    pytest.param("tree", "untrained", marks=pytest.mark.slow),
    pytest.param("chain", "greedy-continuation", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("mode", "kind"), SAMPLING_CASES)
def test_batched_sampling_has_each_rows_target_law(sampling_vlm, mode, kind):
    model, batch, laws = sampling_vlm
    width = batch["input_ids"].shape[1]
    draft = _sampling_draft(model, batch, kind, mode)
    torch.manual_seed(2)
    counts = [Counter(), Counter()]
    accepted = []
    for _ in range(N_DRAWS):
        # three tokens, so that the step after the prefill may draft and verify (two would leave one token
        # to emit, which an implementation may serve with a plain step); the first two are compared
        out = model.generate(
            **batch, max_new_tokens=3, do_sample=True, assistant_model=draft, decoding_mode=mode, **PROCESSING
        )
        for b in range(2):
            counts[b][tuple(out[b, width : width + 2].tolist())] += 1
        accepted += [n for row in draft.last_generation_stats.rows for n in row.accepted_lengths]
    for b in range(2):
        p_value = chi_square_p_value(counts[b], laws[b], N_DRAWS)
        assert p_value > ALPHA, (
            f"{mode}/{kind} row {b}: first two tokens differ from plain sampling, p = {p_value:.2e}"
        )
    if kind == "greedy-continuation":
        assert max(accepted) >= 2  # draft tokens were accepted: the rejection rule really ran


# ---------------------------------------------------------------------------------------------------------------
# 5. images of different sizes per row (any-res patch counts, Qwen grids): each row's visual block differs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "family, sizes",
    [("llava_next", [(40, 56), (56, 30), (30, 90)]), ("qwen2_vl", [(1, 4, 6), (1, 2, 4), (1, 4, 8)])],
)
def test_rows_with_images_of_different_sizes(family, sizes, mode):
    from batched_inputs import combine

    model = _target(family)
    rows = [make_inputs(family, model, seed=70 + b, prompt_len=10, image_size=s) for b, s in enumerate(sizes)]
    visual = [int((r["input_ids"] == 300).sum()) for r in rows]
    assert len(set(visual)) == len(visual), f"rows should differ in visual tokens: {visual}"
    batch = combine(family, rows, pad_id(model))
    opts = dict(max_new_tokens=10)
    plain = _plain(model, batch, **opts)
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
    budget = dict(tree_top_k=3, tree_depth=4, tree_total_tokens=10, num_draft_tokens=3)
    spec = model.generate(
        **batch, do_sample=False, assistant_model=draft, decoding_mode=mode, **budget, **opts
    )
    assert torch.equal(spec, plain)
    width = batch["input_ids"].shape[1]
    for b, row in enumerate(rows):
        alone = model.generate(**row, do_sample=False, **opts)[0, row["input_ids"].shape[1] :]
        assert plain[b, width:].tolist() == alone.tolist(), f"row {b}: plain batched != alone"
    assert [r.visual_tokens for r in draft.last_generation_stats.rows] == visual
