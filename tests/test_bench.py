"""The benchmark harness on a tiny random LLaVA with random drafts: records, lossless flags, output files."""

from __future__ import annotations

import json

import pytest

from specvlm_hf.toy import bench, methods, tuning
from specvlm_hf.toy.demo import new_draft
from tiny_models import make_inputs, make_tiny_target


@pytest.fixture(scope="module")
def setup():
    vlm = make_tiny_target("llava")
    drafts = {"eagle": new_draft(vlm), "select": new_draft(vlm, "select")}
    prompts = [make_inputs("llava", vlm, seed=0)]
    return vlm, drafts, prompts


def test_benchmark_records_and_files(setup, tmp_path):
    vlm, drafts, prompts = setup
    assistant = make_tiny_target("llava", seed=1)  # same vocabulary, independent weights
    methods = bench.default_methods(drafts, assistant=assistant)
    methods = [m for m in methods if not (m.draft is drafts["select"] and m.decoding_mode == "chain")]
    records = bench.run_benchmark(
        vlm, prompts, methods, (0.0, 1.0), max_new_tokens=6, warmup=0, progress=False
    )
    names = {r["method"] for r in records}
    assert {
        "plain",
        "assisted",
        "prompt_lookup",
        "eagle_chain",
        "eagle_tree",
        "specvlm_tree[select]",
    } <= names
    assert len(records) == 2 * len(methods)
    for r in records:
        for key in bench.REQUIRED_KEYS:
            assert key in r, (r["method"], key)
        assert r["status"] == "ok", r
        assert r["tokens_per_second"] > 0 and r["speedup"] > 0
        assert r["mean_accepted_length"] >= 1.0
        if r["temperature"] == 0:
            assert r["lossless"] is True, r["method"]
        elif r["method"] != "plain":
            assert r["lossless"] == "distribution"
    tree = next(r for r in records if r["method"] == "eagle_tree" and r["temperature"] == 0)
    assert tree["draft_time_s"] > 0 and tree["verify_time_s"] > 0

    paths = bench.write_results(records, tmp_path, meta={"target": "tiny-llava"})
    loaded = json.loads(paths["json"].read_text())
    assert isinstance(loaded, list) and len(loaded) == len(records)
    assert set(bench.REQUIRED_KEYS) <= set(loaded[0])
    table = paths["md"].read_text()
    assert "| method |" in table and "eagle_tree" in table
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prompt_lookup_cuts_candidates_at_image_tokens(setup):
    """Prompt lookup copies n-grams from the prompt, which contains <image> placeholders: cut there."""
    vlm, _, prompts = setup
    inputs = prompts[0]
    image_ids = methods._image_token_ids(vlm)
    assert image_ids and bool((inputs["input_ids"] == image_ids[0]).any())
    method = bench.Method("prompt_lookup", "prompt_lookup", gen_kwargs={"prompt_lookup_num_tokens": 10})
    plain = vlm.generate(**inputs, max_new_tokens=6, do_sample=False)
    out = methods._generate(vlm, method, inputs, 6, 0.0)
    assert out.tolist() == plain.tolist()
    assert "_get_candidate_generator" not in vlm.__dict__ or callable(vlm._get_candidate_generator)


def test_skipped_and_failed_methods_are_reported(setup):
    vlm, drafts, prompts = setup

    class Broken:
        config = drafts["eagle"].config

    methods = [
        bench.Method("plain", "plain"),
        bench.Method("assisted", "skip", note="no assistant"),
        bench.Method("broken", "spec", draft=Broken(), decoding_mode="tree"),
    ]
    records = bench.run_benchmark(vlm, prompts, methods, (0.0,), max_new_tokens=4, warmup=0, progress=False)
    by_name = {r["method"]: r for r in records}
    assert by_name["assisted"]["status"] == "skipped"
    assert by_name["broken"]["status"] == "failed" and by_name["broken"]["error"]
    assert "skipped" in bench.markdown_table(records)


def test_tune_picks_a_grid_point(setup):
    vlm, drafts, prompts = setup
    grid = ((4, 2, 2), (8, 3, 3))
    best, rows, costs = tuning.tune_tree(
        vlm, drafts["eagle"], prompts, max_new_tokens=4, grid=grid, progress=False
    )
    assert set(costs) == set(tuning.TUNE_SIZES) and all(c > 0 for c in costs.values())
    assert len(rows) == 2 and best in rows
    assert (best["tree_total_tokens"], best["tree_depth"], best["tree_top_k"]) in grid


class _FixedLogits:
    """A stand-in target whose next-token logits are fixed (the greedy check only reads the last position)."""

    def __init__(self, logits, dtype):
        self.logits, self.dtype, self.calls = logits, dtype, []

    def __call__(self, **inputs):
        self.calls.append(inputs["input_ids"].tolist())
        return type("Out", (), {"logits": self.logits.view(1, 1, -1)})()


def test_greedy_check_tells_numerical_ties_from_real_differences():
    import torch

    inputs = {"input_ids": torch.tensor([[7, 8]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    logits = torch.tensor([0.0, 11.6875, 11.625, 3.0])  # tokens 1 and 2 one bfloat16 step apart
    model = _FixedLogits(logits, torch.bfloat16)
    assert bench.greedy_check(model, [inputs], [[3, 2, 2]], [[3, 2, 2]]) == {"lossless": True}
    tie = bench.greedy_check(model, [inputs], [[3, 2, 2]], [[3, 1, 0]])
    assert tie["lossless"] == "numerical-tie" and tie["lossless_ties"][0]["position"] == 1
    assert model.calls[-1] == [
        [7, 8, 3]
    ]  # recomputed over the prompt and plain's tokens before the divergence
    # the same gap is not a tie in float32, and a far-off token is never one
    assert (
        bench.greedy_check(_FixedLogits(logits, torch.float32), [inputs], [[2]], [[1]])["lossless"] is False
    )
    assert bench.greedy_check(model, [inputs], [[1]], [[3]])["lossless"] is False
    # stopping at another length is a difference, not a tie
    assert bench.greedy_check(model, [inputs], [[1, 2]], [[1]])["lossless"] is False
    assert "tie (1)" in bench.markdown_table([{"method": "x", "temperature": 0.0, "status": "ok", **tie}])


def test_tune_breaks_ties_towards_the_cheaper_step():
    def row(tps, verify, draft):
        return {"measured_tokens_per_second": tps, "verify_cost_s": verify, "draft_s_per_step": draft}

    deep, lean, slow = row(100.0, 0.035, 0.011), row(99.0, 0.035, 0.008), row(90.0, 0.020, 0.004)
    assert tuning.pick_budget([deep, lean, slow]) is lean  # 1% apart: tied, the cheaper step wins
    assert tuning.pick_budget([deep, lean, slow], tie=0.0) is deep
    assert tuning.pick_budget([deep, slow]) is deep  # 10% apart: the faster one, however costly


def test_write_results_without_matplotlib(monkeypatch, tmp_path, capsys):
    """No matplotlib: json and md are written, the plot is skipped with a one-line note (no crash at the end)."""
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    records = [{"method": "plain", "temperature": 0.0, "status": "ok", "speedup": 1.0, "lossless": True}]
    paths = bench.write_results(records, tmp_path)
    assert set(paths) == {"json", "md"} and not (tmp_path / "results.png").exists()
    assert json.loads(paths["json"].read_text())[0]["method"] == "plain"
    notes = [line for line in capsys.readouterr().out.splitlines() if "matplotlib" in line]
    assert len(notes) == 1 and "skipped" in notes[0]
