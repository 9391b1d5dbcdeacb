"""The automatic budget's times kept across processes (`generation/saved_costs.py`): a later process starts from
what an earlier one measured on the same machine with the same models, and never from another machine's or
model's."""

from __future__ import annotations

import json

import pytest
import torch

from forced_draft import make_forced_draft
from specvlm_hf.generation import saved_costs
from specvlm_hf.generation.budget import budget_state, forget_learned
from tiny_models import make_inputs, make_tiny_target


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECVLM_HF_CACHE", str(tmp_path))
    monkeypatch.setenv("SPECVLM_HF_BUDGET_CACHE", "1")
    return tmp_path / "budget"


@pytest.fixture(scope="module")
def target():
    return make_tiny_target("llava")


def _call(target, draft, inputs, reference):
    """One greedy call with the automatic budget; returns its stats (the output checked against plain's)."""
    out = target.generate(**inputs, max_new_tokens=16, do_sample=False, assistant_model=draft)
    assert torch.equal(out, reference)
    return draft.last_generation_stats


def test_a_later_process_starts_from_the_times_an_earlier_one_saved(target, cache):
    inputs = make_inputs("llava", target, seed=3)
    reference = target.generate(**inputs, max_new_tokens=16, do_sample=False)

    def new_process_draft():  # a draft object with nothing learned in memory: what a new process has
        return make_forced_draft(target, reference[0], set(), tree_top_k=None)

    first = new_process_draft()
    stats = _call(target, first, inputs, reference)
    assert stats.budget_steps[0] == ("plain", 0)  # nothing saved yet: the first step measures c(1)
    (path,) = cache.glob("*.json")
    saved = json.loads(path.read_text())
    measured = budget_state(first, target, target.device).costs.observed
    assert {int(n) for n in saved["observed"]} == set(measured) and max(measured) > 1
    assert saved["level_s"] is not None

    later = new_process_draft()
    stats = _call(target, later, inputs, reference)
    assert stats.budget_steps[0] != ("plain", 0)  # c(1) and more already known
    restored = budget_state(later, target, target.device)
    assert set(saved["observed"]) <= {str(n) for n in restored.costs.observed}
    assert restored.costs.prefill is None  # the prefill prior is not needed

    # forgetting what was learned in memory leaves the saved times: the next call is a later process's first
    forget_learned(later)
    assert _call(target, later, inputs, reference).budget_steps[0] != ("plain", 0)


def test_another_machine_or_model_never_reads_them_and_a_broken_file_is_ignored(target, cache, monkeypatch):
    inputs = make_inputs("llava", target, seed=3)
    reference = target.generate(**inputs, max_new_tokens=16, do_sample=False)
    draft = make_forced_draft(target, reference[0], set(), tree_top_k=None)
    _call(target, draft, inputs, reference)
    (path,) = cache.glob("*.json")

    same = saved_costs.path_for(draft, target, target.device, 1, "tree")
    assert same == path
    assert saved_costs.path_for(draft, target, target.device, 4, "tree") != path  # batch size
    assert saved_costs.path_for(draft, target, target.device, 1, "chain") != path  # decoding mode
    other_model = make_tiny_target("llava", seed=1)
    other_model.config.text_config.num_hidden_layers += 1  # another shape
    assert saved_costs.path_for(draft, other_model, other_model.device, 1, "tree") != path
    monkeypatch.setattr(saved_costs.platform, "node", lambda: "another-host")
    assert saved_costs.path_for(draft, target, target.device, 1, "tree") != path
    monkeypatch.undo()
    monkeypatch.setenv("SPECVLM_HF_CACHE", str(cache.parent))
    monkeypatch.setenv("SPECVLM_HF_BUDGET_CACHE", "1")

    path.write_text("{not json")  # a broken (or older) file: as if none were saved
    fresh = make_forced_draft(target, reference[0], set(), tree_top_k=None)
    assert _call(target, fresh, inputs, reference).budget_steps[0] == ("plain", 0)
    assert json.loads(path.read_text())["version"] == saved_costs.VERSION  # rewritten


@pytest.mark.parametrize("why", ["turned off", "no key"])
def test_turned_off_or_without_a_key_nothing_is_read_or_written(why, target, cache, monkeypatch):
    if why == "turned off":
        monkeypatch.setenv("SPECVLM_HF_BUDGET_CACHE", "0")
    else:  # a config or device the key cannot be worked out for: decoding goes on, nothing is kept

        def broken(*args):
            raise TypeError("not serialisable")

        monkeypatch.setattr(saved_costs, "_models", broken)
    inputs = make_inputs("llava", target, seed=3)
    reference = target.generate(**inputs, max_new_tokens=16, do_sample=False)
    draft = make_forced_draft(target, reference[0], set(), tree_top_k=None)
    _call(target, draft, inputs, reference)
    assert not cache.exists()
    assert budget_state(draft, target, target.device).saved_path is None


def test_a_file_with_missing_or_odd_fields_is_ignored(tmp_path, cache):
    path = tmp_path / "budget.json"
    good = {"version": saved_costs.VERSION, "observed": {"1": 0.05}, "per_token": 0.01, "overhead_s": 0.001}
    for contents in (good, {**good, "level_s": "fast"}, {**good, "level_s": None, "observed": [1]}):
        path.write_text(json.dumps(contents))
        assert saved_costs.load(path) is None
    path.write_text(json.dumps({**good, "level_s": None}))
    assert saved_costs.load(path) == {
        "observed": {1: 0.05},
        "per_token": 0.01,
        "overhead_s": 0.001,
        "level_s": None,
    }
