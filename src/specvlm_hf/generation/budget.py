"""The draft budget when none is given: chosen per step from measured costs and the draft's own probabilities.

Speculation pays when the tokens a step emits outnumber what its time would buy with plain decoding. One step that
verifies n draft tokens emits, in expectation, `E(n) = 1 + sum of w over the n nodes` tokens, w a node's
worth: the probability that the target accepts the path to it, by the chain rule its parent's worth times the rate
at which the target accepted, after an accepted parent, nodes of its kind (its parent's first choice, or a sibling)
and about its draft probability given the parent (`NodeCalibration`), and costs `T(n) = c(n + 1) + (levels + 1) *
d`: one target forward over the root and n nodes, plus the draft's tree levels and its pass over the accepted
tokens. `c` is learned on the machine at hand from the verify forwards decoding runs anyway (`VerifyCosts`: no forward is run to measure it,
so a first call costs what plain generate costs; a prior from the prompt's prefill time per token until steps are
seen, a plain first step measuring c(1); kept per target, device, dtype and batch size across calls), `d`
likewise; on a GPU every time comes from CUDA events read once per step (`clock.py`). A step verifies at most twice
the largest size measured so far (2, 4, 8, ... tokens on a fresh state), so what a first call stakes on an
extrapolated cost is one step at most twice the size it knows. The planner then

* grows the tree level by level while a level can still raise the best rate `E / T` the tree can reach (the best
  size with the level's candidates and the levels after it -- falling as the draft's confidence falls, or as the
  target measurably goes on along the draft's first choices -- against the best without them: on a CPU one level
  rarely pays for the steep first tokens of the curve or its bumps, the deeper tree it leads to does),
* keeps the n best candidates that maximise `E(n) / T(n)` (a GPU, where c is flat to ~64 tokens, keeps big
  trees; a CPU, where c grows with n, small ones),
* backs off to plain decoding steps (no drafting at all) when speculation does not pay -- measured speed-up over
  `1 / c(1)` below 1 -- and probes again after 4, 8, ... up to 64 plain steps.

Sampling draws a spine (`tree_policy.build_sampled_tree`): its depth D maximises `E(D) / T(D)` with
`E(D) = sum_{i <= D} alpha^i`, alpha the measured probability that a drawn child is accepted.

Chain mode (inside transformers' assisted loop, which owns the target's cache and timing) drafts up to
`AUTO_CHAIN_TOKENS` (2 on a fresh state, doubling as chains that long are accepted whole: `ChainBackOff.reach`), cut
where the chain's cumulative draft probability falls below what one more token costs
relative to a plain step (`chain_cut`, from the costs tree mode measured for this target; `AUTO_CHAIN_CUMULATIVE`
before any are measured).

Explicit `tree_*` / `num_draft_tokens` (config or per call) turn all of this off for that call: the budget is obeyed.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..targets import families
from . import saved_costs

# target forward sizes measured once per target, device and dtype (new tokens on the prompt's cache)
COST_SIZES = (1, 2, 4, 8, 16, 32, 64)
MAX_TREE_TOKENS = 64  # an automatic tree never verifies more (the paper's GPU budget is 60)
MAX_DEPTH = 12
MAX_SPINE = 16
# chain mode without a budget: up to this many tokens, cut where the chain's cumulative draft probability no longer
# pays for one more draft forward and verified token (`BudgetPlanner.chain_cut`; this when nothing is measured yet)
AUTO_CHAIN_TOKENS, AUTO_CHAIN_CUMULATIVE = 8, 0.1
# chain mode backs off when its running mean of accepted draft tokens per step falls below this
CHAIN_BACKOFF_ACCEPTED = 0.3
# plain steps before the next probe, doubling while speculation does not pay
BACKOFF_START, BACKOFF_MAX = 4, 64
EXPLORE = (
    0.5  # beyond the largest verified size, c grows at this fraction of its estimated slope (`VerifyCosts`)
)
# weight of a speculative step's measured speed-up in the running one that decides backing off: one failed step of a
# good draft does not back off, two or three in a row do
SPEEDUP_WEIGHT = 0.2
# node calibration: bins of a verified node's draft probability given its parent (upper edges), and how many
# nodes' worth of evidence a bin's rate leans on its kind's rate with (a kind's on the rate over all nodes, that on
# the draft's word)
CALIBRATION_EDGES = (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 1.0)
CALIBRATION_PRIOR = 2.0  # nodes (at the bin's middle probability)
_PRIOR_MASS = tuple(
    CALIBRATION_PRIOR * (lo + hi) / 2 for lo, hi in zip((0.0, *CALIBRATION_EDGES[:-1]), CALIBRATION_EDGES)
)
DECAY = 0.9  # weight of the past in the running estimates (calibration, acceptance, draft level time)


@dataclass
class VerifyCosts:
    """c(n): seconds of one target forward over n new tokens per sequence on the cached prompt, learned from the
    verify forwards decoding runs anyway (nothing is run to measure it).

    `observed` holds a running estimate per verified size; between observed sizes c is linear, and beyond them it
    follows `per_token` (the prior slope, seconds per extra token per sequence: the prompt's prefill time per
    token, a fair compute cost on a CPU and an upper bound on a GPU, where small forwards cost the same), or the
    observed points' own slope where that is smaller. Before anything is observed c(1) is `base`, and the first
    step of a fresh state is a plain one (`BudgetPlanner.plain_step`) that measures it: a step plain generate
    runs too, so learning costs nothing."""

    per_token: float
    base: float = 0.0
    observed: dict[int, float] = field(default_factory=dict)
    # the prompt's prefill (seconds, tokens per sequence), until c(1) is observed: then the prior slope is the
    # prefill's time beyond a one-token forward, per further token (its fixed cost is not a per-token cost)
    prefill: tuple[float, int] | None = None
    sizes: tuple[int, ...] = COST_SIZES  # the sizes reported (`stats.budget_costs_ms`) and `top_k` compares

    @classmethod
    def from_curve(cls, sizes, seconds) -> VerifyCosts:
        """A fully measured curve (bench, tests)."""
        sizes, seconds = list(sizes), list(seconds)
        slope = (seconds[-1] - seconds[-2]) / (sizes[-1] - sizes[-2]) if len(sizes) > 1 else 0.0
        return cls(
            per_token=max(slope, 0.0), base=seconds[0], observed=dict(zip(sizes, seconds)), sizes=tuple(sizes)
        )

    @property
    def seconds(self) -> list[float]:
        return [self(n) for n in self.sizes]

    def _points(self) -> list[tuple[int, float]]:
        points = sorted(self.observed.items())
        if not points:
            return [(1, self.base)]
        for i in range(len(points) - 2, -1, -1):  # a smaller forward never costs more than a larger one
            points[i] = (points[i][0], min(points[i][1], points[i + 1][1]))
        if points[0][0] > 1:  # below the smallest observed size: the prior slope down to c(1)
            n0, s0 = points[0]
            points.insert(0, (1, max(s0 - self.per_token * (n0 - 1), 0.5 * s0)))
        return points

    def slope(self, points=None) -> float:
        """Seconds per extra token beyond the largest observed size: the observed secant where it is flatter than
        the prior (GPUs: flat to ~64 tokens), halved -- beyond what was seen, c is estimated optimistically, so
        the planner tries a bigger tree (at most twice the largest size seen, `explore_limit`) and learns its
        real cost; within the seen sizes c is measured. (On a CPU small forwards cost far more per token than the
        prefill does, and then flatten: only trying the sizes finds the flat part.)"""
        points = points or self._points()
        (n0, s0), (n1, s1) = points[0], points[-1]
        slope = self.per_token
        if n1 > n0:
            slope = min(slope, max((s1 - s0) / (n1 - n0), 0.0))
        return EXPLORE * slope

    @property
    def explore_limit(self) -> int:
        """The largest verify (tokens per sequence, root included) the planner may choose now: twice the largest
        size measured. A fresh state grows 2, 4, 8, ... tokens, each step only as far as the sizes measured so far
        say it pays, so a first call never stakes a big forward on an extrapolated cost."""
        return 2 * max(self.observed, default=1)

    def __call__(self, n: int) -> float:
        return self._at(self._points(), n)

    def table(self, largest: int) -> list[float]:
        """[c(0), c(1), ..., c(largest)] (c(0) = c(1)) in one pass over the curve: the planner prices every size of
        a tree each level."""
        points = self._points()
        return [self._at(points, max(n, 1)) for n in range(largest + 1)]

    def _at(self, points: list[tuple[int, float]], n: int) -> float:
        if n <= points[0][0]:
            return points[0][1]
        for (n0, s0), (n1, s1) in zip(points, points[1:]):
            if n <= n1:
                return s0 + (s1 - s0) * (n - n0) / (n1 - n0)
        last_n, last_s = points[-1]
        return last_s + self.slope(points) * (n - last_n)

    def observe(self, n: int, seconds: float) -> None:
        """A verify forward over n tokens per sequence took `seconds` (synchronized timing, `clock.StepClock`). A
        lower time is taken at once (a stall of the machine only ever adds time); a higher one moves the estimate
        a tenth of the way (the cache grows, the machine's load changes)."""
        old = self.observed.get(n)
        self.observed[n] = seconds if old is None or seconds < old else DECAY * old + (1 - DECAY) * seconds
        if n == 1 and self.prefill is not None:
            prefill_s, tokens = self.prefill
            if tokens > 1:
                self.per_token = min(self.per_token, max(prefill_s - seconds, 0.0) / (tokens - 1))
            self.prefill = None


def measure_verify_costs(forward, sizes=COST_SIZES, repeats: int = 3, device=None) -> VerifyCosts:
    """`forward(n)` runs the target over n new tokens on the cache and undoes it; returns the measured curve (the
    bench's report of c(n); decoding never calls this).

    Sizes are timed in rounds (every size once per round) and each keeps its fastest time: a stall of the machine
    only ever adds time, and hits one sample of one size instead of every sample of a size."""
    device = torch.device(device or "cpu")
    for n in sizes:  # warm-up: first calls of a shape set up kernels
        forward(n)
    seconds = [float("inf")] * len(sizes)
    for _ in range(repeats):
        for i, n in enumerate(sizes):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            forward(n)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[i] = min(seconds[i], time.perf_counter() - start)
    for i in range(len(seconds) - 2, -1, -1):  # a smaller forward never costs more than a larger one
        seconds[i] = min(seconds[i], seconds[i + 1])
    return VerifyCosts.from_curve(sizes, seconds)


@dataclass
class BackOff:
    """Plain steps to run before the next probe: 4, then 8, ... up to 64 while probes keep not paying (tree and
    chain mode alike)."""

    left: int = 0
    length: int = BACKOFF_START

    def start(self) -> None:
        self.left, self.length = self.length, min(2 * self.length, BACKOFF_MAX)

    def paid(self) -> None:
        """Speculation paid: the next back-off starts short again."""
        self.length = BACKOFF_START

    def take(self) -> bool:
        """Whether this step is a plain one (consumes it)."""
        if self.left > 0:
            self.left -= 1
            return True
        return False


@dataclass
class ChainBackOff(BackOff):
    """Chain mode's back-off and its running acceptance (accepted drafts per speculative step, halved weight per
    step), both kept across `generate` calls: a draft that did not pay starts the next call backed off instead of
    paying two failed probes to learn it again. `reach`: the longest chain drafted now, 2 at first and doubling each
    time a chain that long is accepted whole (up to `AUTO_CHAIN_TOKENS`): the assisted loop times nothing, so a
    first call does not stake an 8-token verify before the draft has shown it is right that far (where each
    verified token costs most of a plain step, a CPU in emulated bf16, that stake lost 1.6x plain's time)."""

    accepted_ema: float = 1.0
    reach: int = 2


FIRST, SIBLING = 0, 1  # a node's kind: its parent's most likely child, or one of the others
_EDGES: dict = {}  # CALIBRATION_EDGES per device


@dataclass
class NodeCalibration:
    """What a verified draft node is worth, by the chain rule: a node is accepted only where its parent is, so its
    worth is its parent's (the root's: 1) times the rate at which the target accepted nodes of its kind, offered
    after an accepted parent, about its own draft probability q (the draft's probability of its token given its
    parent's path: cumulative probability over the parent's). Per kind and bin of q: accepted nodes / their summed
    q (running sums where a bin's past weighs `DECAY` per step that observes it). A bin with little evidence leans
    on its kind's rate (`CALIBRATION_PRIOR` nodes' worth), a kind on the rate over all nodes, and that on the
    draft's word (rate 1) until nodes are seen.

    The kinds: a trained draft is often under-confident along its first choices (toy pair: first children rated ~0.5
    accepted ~2 times in 3) and over-confident in its second ones (siblings): one scale for every node cannot say
    both (batches of 4 on a CPU: 0.84x chain mode). The chain rule: binned by cumulative probability, a deep node of
    a good draft sat in the low bins that only deep nodes reach, which the planner rarely verified, so it kept
    valuing them at the draft's word: chains of an under-confident draft stayed short (a float32 CPU sweep: the
    automatic tree 1.19x against a fixed chain of 8's 1.41x, accepting 3.5 tokens where the chain accepted 5.3);
    by q, every level's first choices teach the same bins."""

    accepted: list[list[float]] = field(
        default_factory=lambda: [[0.0] * len(CALIBRATION_EDGES) for _ in range(2)]
    )
    expected: list[list[float]] = field(
        default_factory=lambda: [[0.0] * len(CALIBRATION_EDGES) for _ in range(2)]
    )
    # first children whose parent the target accepted (the root included), and how many of them it accepted too
    offered: float = 0.0
    continued: float = 0.0

    def __post_init__(self):
        self._rates()

    @staticmethod
    def _bin(p: float) -> int:
        return min(bisect_left(CALIBRATION_EDGES, p), len(CALIBRATION_EDGES) - 1)

    @property
    def overall(self) -> float:
        """Accepted nodes per unit of draft probability over every node (1 before any node is seen)."""
        hits = sum(map(sum, self.accepted))
        return (hits + CALIBRATION_PRIOR) / (sum(map(sum, self.expected)) + CALIBRATION_PRIOR)

    def _rates(self) -> None:
        """Each kind's and bin's rate, worked out when the sums change (the planner values nodes every step)."""
        overall = self.overall
        self.rates = []
        for hits, expected in zip(self.accepted, self.expected):
            kind = (sum(hits) + CALIBRATION_PRIOR * overall) / (sum(expected) + CALIBRATION_PRIOR)
            self.rates.append([(h + m * kind) / (e + m) for h, e, m in zip(hits, expected, _PRIOR_MASS)])
        self._tables: dict = {}

    def __call__(self, q: float, kind: int = FIRST) -> float:
        """P(accepted | parent accepted) for a node of this kind and draft probability q given its parent."""
        return min(q * self.rates[kind][self._bin(q)], 1.0)

    def log_rates(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(bin edges (bins,), log rates (2, bins)) on `device`, for valuing a tree's candidates where they are
        drafted (`tree_policy.build_trees`); made once per device until the rates change."""
        if device not in self._tables:
            rates = torch.tensor(self.rates, dtype=torch.float32).clamp_(min=1e-12).log_()
            if device not in _EDGES:  # (constant: copied to a device once)
                _EDGES[device] = torch.tensor(CALIBRATION_EDGES).to(device)
            self._tables[device] = (_EDGES[device], rates.to(device))
        return self._tables[device]

    @property
    def continuation(self) -> float | None:
        """How often the target went on along the draft's first choice where it had accepted the parent (None
        before any is seen): what a chain's next level is worth relative to the one before, measured."""
        return self.continued / self.offered if self.offered > 0 else None

    def observe(self, probs: list[float], kinds: list[int], parents: list[int], accepted: set[int]) -> None:
        """One sequence's verified nodes: `probs[i]` is node i's draft probability given its parent, `kinds[i]` its
        kind (`FIRST` / `SIBLING`), `parents[i]` its parent (an index into probs, -1: the root), `accepted` the nodes
        the target accepted (indices into probs). Only nodes whose parent was accepted teach the rates (the others
        were never the target's choice to make)."""
        sums: dict[tuple[int, int], list[float]] = {}
        offered = continued = 0
        for i, (p, kind) in enumerate(zip(probs, kinds)):
            parent = parents[i]
            if parent >= 0 and parent not in accepted:
                continue
            total = sums.setdefault((kind, self._bin(p)), [0.0, 0.0])
            total[0] += i in accepted
            total[1] += p
            if kind == FIRST:
                offered += 1
                continued += i in accepted
        self.offered = DECAY * self.offered + offered
        self.continued = DECAY * self.continued + continued
        for (kind, b), (hits, expected) in sums.items():
            self.accepted[kind][b] = DECAY * self.accepted[kind][b] + hits
            self.expected[kind][b] = DECAY * self.expected[kind][b] + expected
        self._rates()

    def copy(self) -> NodeCalibration:
        return NodeCalibration(
            [list(r) for r in self.accepted], [list(r) for r in self.expected], self.offered, self.continued
        )


@dataclass
class BudgetState:
    """What the planner learns, kept on the draft across `generate` calls (per target, device and dtype)."""

    costs: VerifyCosts
    overhead_s: float = 0.0  # per verify step beyond the forward (mask, acceptance, cache compaction)
    level_s: float | None = None  # one draft level (a batched draft forward plus its head)
    # running sums: accepted draft tokens / the planner's worth of the verified nodes (reported: `calibration`)
    accepted: float = 1.0
    predicted: float = 1.0
    nodes: NodeCalibration = field(default_factory=NodeCalibration)  # what the planner values a node at
    spine_offered: float = 2.0  # sampled spines: drawn children offered / accepted (alpha)
    spine_accepted: float = 1.4
    # running measured speed-up of speculative steps over 1 / c(1); starts optimistic so that one bad first step
    # alone does not back off
    speedup: float = 1.3
    backoff: BackOff = field(default_factory=BackOff)
    # the file this state's times are kept in across processes (`saved_costs`; None: not kept), and what it holds
    saved_path: Path | None = None
    saved_sizes: frozenset = frozenset()
    saved_at: float = 0.0

    def restore(self, saved: dict | None) -> None:
        """Start from the times a previous process saved (`saved_costs.load`): the cost curve (its first step is
        then a speculative one), the draft level time and the step overhead."""
        if not saved or not saved["observed"]:
            return
        costs = self.costs
        costs.observed = dict(saved["observed"])
        costs.per_token = min(costs.per_token, saved["per_token"])
        costs.prefill = None
        self.overhead_s = saved["overhead_s"]
        self.level_s = saved["level_s"] if saved["level_s"] is not None else self.level_s
        self.saved_sizes, self.saved_at = frozenset(costs.observed), time.monotonic()

    def save(self) -> None:
        """Keep the times for later processes: after a call that measured a size the file lacks, else at most every
        `saved_costs.SAVE_EVERY_S` (the running estimates move slowly)."""
        sizes = frozenset(self.costs.observed)
        if self.saved_path is None or (
            sizes <= self.saved_sizes and time.monotonic() - self.saved_at < saved_costs.SAVE_EVERY_S
        ):
            return
        costs = self.costs
        if saved_costs.save(self.saved_path, costs.observed, costs.per_token, self.overhead_s, self.level_s):
            self.saved_sizes, self.saved_at = sizes, time.monotonic()

    @property
    def level_time(self) -> float:
        """One draft level's time, measured; a tenth of a one-token target forward before any measurement."""
        return self.level_s if self.level_s is not None else 0.1 * self.costs(1)

    @property
    def calibration(self) -> float:
        """Accepted draft tokens per predicted one, over recent steps (reported in `stats.budget_calibration`; the
        planner values each node through `nodes`)."""
        return self.accepted / max(self.predicted, 1e-6)

    @property
    def alpha(self) -> float:
        return min(max(self.spine_accepted / max(self.spine_offered, 1e-6), 0.0), 0.98)


class BudgetPlanner:
    """Per-step budget decisions for one `generate` call (module docstring)."""

    def __init__(self, state: BudgetState):
        self.state = state
        self.steps: list[tuple[str, int]] = []  # this call's choices per step: ("spec", n) or ("plain", 0)
        self.stats = None  # the call's GenerationStats (`report`)

    def report(self) -> None:
        """The cost curve as it stands, into the call's stats (`budget_costs_ms`)."""
        if self.stats is not None:
            costs = self.state.costs
            self.stats.budget_costs_ms = {n: 1e3 * costs(n) for n in costs.sizes}

    def finish(self) -> None:
        """At the end of the call: the cost curve, the steps' choices and the calibration into the call's stats;
        the times kept for later processes (`BudgetState.save`)."""
        self.report()
        if self.stats is not None:
            self.stats.budget_steps = self.steps
            self.stats.budget_calibration = self.state.calibration
        self.state.save()

    # --------------------------------------------------------------------------------------------- cost
    def step_time(self, n: int, levels: int) -> float:
        s = self.state
        return s.costs(n + 1) + s.overhead_s + (levels + 1) * s.level_time

    def plain_rate(self) -> float:
        return 1.0 / (self.state.costs(1) + self.state.overhead_s)

    # --------------------------------------------------------------------------------------------- greedy tree
    def max_tree_tokens(self) -> int:
        """The most draft tokens a step may verify now: `MAX_TREE_TOKENS`, within the measured sizes' reach
        (`VerifyCosts.explore_limit`)."""
        return min(MAX_TREE_TOKENS, self.state.costs.explore_limit - 1)

    def top_k(self) -> int:
        """Children per expanded node: wide where a big tree costs about what a small one does (GPU), narrow
        where every verified token costs time (CPU), and one -- a chain, spending every verified token on depth --
        where even two tokens cost half as much again as one (a CPU's small products), or before any size beyond
        one is measured (a first call starts as a chain and widens as measured sizes show big trees cheap)."""
        costs = self.state.costs
        affordable = max((n for n in costs.observed if costs(n) <= 1.5 * costs(1)), default=1)
        return 1 if affordable < 2 else int(min(max(affordable // 6, 2), 10))

    def best_size(
        self, values: list[float], levels: int, depths: list[int] | None = None
    ) -> tuple[int, float]:
        """values: candidates' worth, best first (each the probability that the target accepts the path to it:
        `NodeCalibration`'s rates multiplied along the path, so no more than its parent's). Returns (n, rate E(n) /
        T(n)). levels: the draft levels the tree has run; depths (optional, beside values): each candidate's depth,
        where keeping it takes more levels."""
        s = self.state
        values = values[: self.max_tree_tokens()]
        verify = s.costs.table(len(values) + 1)  # verify[n + 1]: the root and n nodes
        level_s, fixed = s.level_time, s.overhead_s

        def step_time(n: int, levels: int) -> float:  # `BudgetPlanner.step_time`, from the table
            return verify[n + 1] + fixed + (levels + 1) * level_s

        best_n, best_rate, mass = 0, 1.0 / step_time(0, levels), 0.0
        for n, value in enumerate(values, start=1):
            mass += value
            if depths is not None:
                levels = max(levels, depths[n - 1] - 1)
            rate = (1.0 + mass) / step_time(n, levels)
            if rate > best_rate:
                best_n, best_rate = n, rate
        return best_n, best_rate

    def keep_growing(
        self,
        values: list[float],
        level_values: list[float],
        levels: int,
        ratio: float,
        max_depth: int = MAX_DEPTH,
    ) -> bool:
        """Whether one more level can raise the best rate the tree reaches. values: the candidates' worth so far;
        level_values: the worth of the rows the level would expand (their children are worth no more);
        levels: draft levels run so far; ratio: how the best worth fell from the level before to this one;
        max_depth: the deepest level the tree may reach (the tokens left, `tree.room`).

        The level is judged by the tree it leads to, not by its own nodes: the levels after it are taken to fall
        at `ratio` per level, or at the measured rate the target goes on along the draft's first choices
        (`NodeCalibration.continuation`) where that is higher (one unsure token does not make the next ones
        unsure), and the best size over the candidates with them (each size charged the levels it needs) is set
        against the best without. On a CPU the cost curve is steep for a few tokens and then flat, with bumps: one
        level, or one more node of a chain, rarely pays for the next stretch of the curve, the deeper tree does."""
        if levels + 1 >= max_depth or not level_values:
            return False
        _, rate = self.best_size(values, levels)
        # the draft's word for this step, or what was measured, if more
        ratio = min(max(ratio, self.state.nodes.continuation or 0.0, 0.0), 0.95)
        grown = [(v, 0) for v in values]
        scale = 1.0
        for depth in range(levels + 2, max_depth + 1):
            grown += [(v * scale, depth) for v in level_values]
            scale *= ratio
            if scale * level_values[0] < 1e-3:
                break
        grown.sort(key=lambda item: -item[0])
        _, rate_grown = self.best_size([v for v, _ in grown], levels, [d for _, d in grown])
        return rate_grown > rate

    def chain_cut(self) -> float:
        """The cumulative draft probability below which one more chain token does not pay: its expected value
        (probability x the plain step it saves) against its cost (a draft forward and one more verified token)."""
        costs = self.state.costs
        marginal = self.state.level_time + (costs(AUTO_CHAIN_TOKENS + 1) - costs(1)) / AUTO_CHAIN_TOKENS
        return min(max(marginal / (costs(1) + self.state.overhead_s), 0.01), 0.5)

    # --------------------------------------------------------------------------------------------- sampling
    def spine_depth(self) -> int:
        alpha = self.state.alpha
        best_d, best_rate, expected, reach = 1, 0.0, 1.0, 1.0
        for d in range(1, min(MAX_SPINE, self.max_tree_tokens()) + 1):
            reach *= alpha
            expected += reach
            rate = expected / self.step_time(d, d)
            if rate > best_rate:
                best_d, best_rate = d, rate
        return best_d

    # --------------------------------------------------------------------------------------------- back-off
    def plain_step(self, last: bool = False) -> bool:
        """Whether this step should be a plain decoding step (no drafting): one token left (`last`), backing off,
        or the first step of a fresh state, which measures c(1) (`observe_plain`)."""
        if last or 1 not in self.state.costs.observed or self.state.backoff.take():
            self.steps.append(("plain", 0))
            return True
        return False

    def observe_plain(self, forward_s: float) -> None:
        """After a plain step: its forward is a one-token verify."""
        self.state.costs.observe(1, forward_s)

    def observe(
        self,
        *,
        n: int,
        levels: int,
        predicted: float | None,
        drafted: int,
        accepted: int,
        emitted: int,
        forward_s: float,
        overhead_s: float,
        draft_s: float,
        spine: bool = False,
        nodes: list[tuple[list[float], list[int], list[int], set[int]]] | None = None,
    ) -> None:
        """After a speculative step: refine costs, calibration and acceptance, and decide whether to back off.

        predicted: the verified nodes' summed worth as the planner valued them (greedy trees); drafted: draft
        tokens offered along the accepted path's spine (sampled trees); accepted: draft tokens accepted; nodes: per
        sequence, its verified nodes' cumulative draft probabilities, kinds, parents and which of them were accepted
        (greedy trees built by the planner, `DraftTree.verified_nodes`)."""
        s = self.state
        self.steps.append(("spec", n))
        s.costs.observe(n + 1, forward_s)
        s.overhead_s = DECAY * s.overhead_s + (1 - DECAY) * overhead_s if s.overhead_s else overhead_s
        if levels > 0:
            per_level = draft_s / (levels + 1)
            s.level_s = per_level if s.level_s is None else DECAY * s.level_s + (1 - DECAY) * per_level
        if predicted is not None:
            s.accepted = DECAY * s.accepted + accepted
            s.predicted = DECAY * s.predicted + predicted
        for probs, kinds, parents, hits in nodes or ():
            s.nodes.observe(probs, kinds, parents, hits)
        if spine:
            s.spine_offered = DECAY * s.spine_offered + drafted
            s.spine_accepted = DECAY * s.spine_accepted + accepted
        step_s = forward_s + overhead_s + draft_s
        speedup = emitted / step_s / self.plain_rate()
        s.speedup = (1 - SPEEDUP_WEIGHT) * s.speedup + SPEEDUP_WEIGHT * speedup
        if s.speedup < 1.0:
            s.backoff.start()
            s.speedup = 1.0  # the probe after the back-off starts from a neutral estimate
        elif speedup >= 1.0:
            s.backoff.paid()


def _key(target, device, batch_size: int, mode: str) -> tuple:
    model = families.unwrap_target(target)
    return (id(model), str(device), str(next(model.parameters()).dtype), batch_size, mode)


def budget_state(draft, target, device, batch_size: int = 1, mode: str = "tree") -> BudgetState | None:
    """What the planner learned for this target, device, dtype, batch size and decoding mode (a batch's chain mode
    is planned too), kept on the draft across generate calls."""
    return draft.__dict__.get("_specvlm_budget_states", {}).get(_key(target, device, batch_size, mode))


def store_budget_state(
    draft, target, device, state: BudgetState, batch_size: int = 1, mode: str = "tree"
) -> None:
    draft.__dict__.setdefault("_specvlm_budget_states", {})[_key(target, device, batch_size, mode)] = state


def _nearest_known(draft, target, device, batch_size: int, mode: str) -> BudgetState | None:
    """The state learned for this target, device and dtype at the batch size nearest to `batch_size`, in this
    decoding mode where there is one, else in the other, if any."""
    key = _key(target, device, batch_size, mode)
    known = [
        (k[4] != mode, abs(k[3] - batch_size), state)
        for k, state in draft.__dict__.get("_specvlm_budget_states", {}).items()
        if k[:3] == key[:3]
    ]
    return min(known, key=lambda item: item[:2])[2] if known else None


def planner_for(
    draft,
    target,
    device,
    stats,
    prefill_s: float,
    prompt_tokens: int,
    batch_size: int = 1,
    mode: str = "tree",
):
    """The planner for one generate call: what was learned for this target, device, dtype, batch size and decoding
    mode, or a fresh state from a prior (nothing is run to measure): the cost of one more verified token is the
    prompt's prefill time per token (`prefill_s` over `prompt_tokens` per sequence: synchronized timing);
    acceptance and draft level time come from another batch size's (or mode's) state where one was learned. The
    fresh state's first step is a plain one, which measures c(1). Each mode learns its own costs and back-off: a
    tree's failed probes do not back a chain off, and each mode's first call at a batch size is what a process
    running only that mode meets. Records the cost curve as it stands in `stats.budget_costs_ms`."""
    state = budget_state(draft, target, device, batch_size, mode)
    per_token = prefill_s / max(prompt_tokens, 1)
    if state is not None:  # the least seen: a process's first prefill also pays one-time set-up
        state.costs.per_token = min(state.costs.per_token, per_token)
    else:
        prior = _nearest_known(draft, target, device, batch_size, mode)
        state = BudgetState(
            VerifyCosts(per_token=per_token, base=prefill_s, prefill=(prefill_s, max(prompt_tokens, 1)))
        )
        if (
            prior is not None
        ):  # what the draft and the machine showed at another batch size or in the other mode
            state.level_s = prior.level_s
            state.accepted, state.predicted = prior.accepted, prior.predicted
            state.nodes = prior.nodes.copy()
            state.spine_offered, state.spine_accepted = prior.spine_offered, prior.spine_accepted
        # what an earlier process measured here, if anything
        state.saved_path = saved_costs.path_for(draft, target, device, batch_size, mode)
        state.restore(saved_costs.load(state.saved_path))
        store_budget_state(draft, target, device, state, batch_size, mode)
    planner = BudgetPlanner(state)
    planner.stats = stats
    planner.report()
    return planner


def forget_learned(draft) -> None:
    """Drop what the automatic budget learned on `draft` (every target, device, dtype and batch size): its next call
    starts as a new process's first call does (the bench's first-call rows). Times saved for later processes
    (`saved_costs`) stay: with them turned off (the bench turns them off) it is a first call on a new machine."""
    draft.__dict__.pop("_specvlm_budget_states", None)
    draft.__dict__.pop("_specvlm_chain_backoff", None)


def chain_backoff(draft, target, device) -> ChainBackOff:
    """Chain mode's back-off for this target, device and dtype, kept on the draft across generate calls (as the
    tree planner's is), so a draft that does not pay keeps its long back-off in the next call instead of probing
    from scratch."""
    states = draft.__dict__.setdefault("_specvlm_chain_backoff", {})
    return states.setdefault(_key(target, device, 1, "chain"), ChainBackOff())
