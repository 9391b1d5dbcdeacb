"""Host-device synchronizations of the decoding loops, and the timing the automatic budget's planner reads.

On a GPU every read of a device value on the host waits for the queued work, so the loops must read only what the
algorithm needs: per verify step one transfer of the tree layout (tree and batch mode: kept candidates, parents and
tokens together), one of the target's choices, and the stopping check per emitted token (plain generate checks
per token too); chain mode reads each drafted token's stopping check and its confidence only where a cut-off uses
it. `host_syncs.count_host_syncs` counts the reads on a CPU (it fails when, e.g., the tree layout goes back to
separate transfers or chain mode reads the confidence with a fixed budget: checked once).

The planner's times must come from synchronized device timing (`generation/clock.py`): a fake CUDA timeline (events
whose timestamps include work the host does not wait for) shows that the verify costs it learns include the
device's work, and that a fixed budget creates no events and never waits."""

from __future__ import annotations

import time

import pytest
import torch

from batched_inputs import make_batch_inputs
from host_syncs import count_host_syncs
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.generation import budget, clock
from tiny_models import make_inputs, make_tiny_target

NEW = 20
FIXED_TREE = dict(tree_top_k=3, tree_depth=4, tree_total_tokens=8)


@pytest.fixture(scope="module")
def target():
    return make_tiny_target("llava")


def _draft(target):
    torch.manual_seed(0)
    return SpecVLMDraftModel(SpecVLMDraftConfig.from_target(target)).bind(target).eval()


CASES = {
    # name: (batch rows, generate options, allowed package reads per verify step beyond the per-token checks)
    "tree-fixed": (1, FIXED_TREE, 2),
    "tree-auto": (1, {}, 2 + budget.MAX_DEPTH),  # + the planner's read of each level's probabilities
    "chain-fixed": (
        1,
        dict(decoding_mode="chain", num_draft_tokens=4),
        2 + 4,
    ),  # + a stop check per draft token
    "chain-auto": (
        1,
        dict(decoding_mode="chain"),
        2 + 2 * budget.AUTO_CHAIN_TOKENS,
    ),  # + confidence per token
    "batch-fixed": (3, FIXED_TREE, 2),
    "batch-auto": (3, {}, 2 + budget.MAX_DEPTH),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_host_reads_per_decoding_step(target, case):
    rows, options, per_step = CASES[case]
    if rows == 1:
        inputs = make_inputs("llava", target, seed=3)
    else:
        inputs = make_batch_inputs("llava", target, [1, 2, 3], [6, 34, 62])
    draft = _draft(target)
    for _ in range(2):  # the second call: what was learned is kept (the automatic budget's steady state)
        with count_host_syncs() as syncs:
            target.generate(**inputs, max_new_tokens=NEW, do_sample=False, assistant_model=draft, **options)
    stats = draft.last_generation_stats
    steps = stats.target_forwards - 1
    if case.endswith("auto"):
        spec = sum(kind == "spec" for kind, _ in stats.budget_steps)
        allowed = 2 * steps + (per_step - 2) * spec
    else:
        allowed = per_step * steps
    allowed += rows * (NEW + 4) + 8  # per emitted token per row: its stopping check; a few per row and call
    assert syncs.in_package() <= allowed, (
        f"{syncs.in_package()} > {allowed} ({steps} steps)\n{syncs.report()}"
    )


class _FakeCudaTimeline:
    """CUDA events on a fake device that runs `work_s` behind the host for every target forward."""

    def __init__(self, work_s: float):
        self.work_s, self.lag, self.events, self.waits = work_s, 0.0, 0, 0
        timeline = self

        class Event:
            def __init__(self, enable_timing=False):
                timeline.events += 1
                self.time = None

            def record(self, stream=None):
                self.time = time.perf_counter() + timeline.lag

            def synchronize(self):
                timeline.waits += 1

            def elapsed_time(self, end):
                return 1e3 * (end.time - self.time)

        self.Event = Event

    def forward_hook(self, module, args, output):
        self.lag += self.work_s  # the host returns at once; the device finishes later


@pytest.fixture
def fake_cuda(monkeypatch, target):
    timeline = _FakeCudaTimeline(work_s=0.2)
    monkeypatch.setattr(torch.cuda, "Event", timeline.Event)
    original = clock.StepClock.__init__

    def on_cuda(self, device, enabled=True):
        original(self, device, enabled)
        self.cuda = enabled  # as on a CUDA device

    monkeypatch.setattr(clock.StepClock, "__init__", on_cuda)
    handle = target.register_forward_hook(timeline.forward_hook)
    yield timeline
    handle.remove()


@pytest.mark.parametrize("rows", [1, 3])
def test_planner_verify_costs_come_from_synchronized_device_timing(target, fake_cuda, rows):
    if rows == 1:
        inputs = make_inputs("llava", target, seed=3)
    else:
        inputs = make_batch_inputs("llava", target, [1, 2, 3], [6, 34, 62])
    draft = _draft(target)
    # a fixed budget: the planner reads nothing, so nothing is timed or waited for
    target.generate(**inputs, max_new_tokens=8, do_sample=False, assistant_model=draft, **FIXED_TREE)
    assert fake_cuda.events == 0 and fake_cuda.waits == 0
    target.generate(**inputs, max_new_tokens=12, do_sample=False, assistant_model=draft)
    state = budget.budget_state(draft, target, target.device, rows)
    # every verify cost the planner learned holds the device's work, which a host timer around the call misses
    assert state.costs.observed and min(state.costs.observed.values()) >= fake_cuda.work_s, (
        state.costs.observed
    )
    assert state.costs.per_token > 0
    steps = draft.last_generation_stats.target_forwards - 1
    assert fake_cuda.waits <= steps + 1  # one wait per step (and the prefill's), where the numbers are read
