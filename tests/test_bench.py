"""The benchmark harness on a tiny random LLaVA with random drafts: records, lossless flags, output files."""

from __future__ import annotations

import json

import pytest

from specvlm_hf.toy import bench, methods, tuning
from specvlm_hf.toy.drafts import new_draft
from tiny_models import make_inputs, make_tiny_target


@pytest.fixture(scope="module")
def setup():
    vlm = make_tiny_target("llava")
    drafts = {"eagle": new_draft(vlm), "select": new_draft(vlm, "select")}
    prompts = [make_inputs("llava", vlm, seed=0)]
    return vlm, drafts, prompts


def test_benchmark_records_and_files(setup, tmp_path):
    vlm, drafts, prompts = setup
    from specvlm_hf.toy.peer import new_peer

    assistant = make_tiny_target("llava", seed=1)  # same vocabulary, independent weights
    peer = new_peer(vlm, 48)
    methods = bench.default_methods(drafts, assistant=assistant, peer=peer, untrained=new_draft(vlm, seed=1))
    methods = [m for m in methods if not (m.draft is drafts["select"] and m.decoding_mode == "chain")]
    records = bench.run_benchmark(
        vlm, prompts, methods, (0.0, 1.0), max_new_tokens=6, warmup=0, progress=False
    )
    names = {r["method"] for r in records}
    assert {
        "plain",
        "assisted",
        "assisted_peer",
        "prompt_lookup",
        "eagle_chain",
        "eagle_tree",
        "specvlm_tree[select]",
        "untrained_chain",
        "untrained_tree",
    } <= names
    floor = [line for line in bench.sweep_summary(records) if line.startswith("untrained draft")]
    assert len(floor) == 4 and "untrained_tree" in floor[1]  # chain and tree, T=0 and T=1
    assert len(records) == 2 * len(methods)
    for r in records:
        for key in bench.REQUIRED_KEYS:
            assert key in r, (r["method"], key)
        assert r["status"] == "ok", r
        assert r["dtype"] == "float32"
        assert r["tokens_per_second"] > 0 and r["speedup"] > 0
        assert r["mean_accepted_length"] >= 1.0
        if r["temperature"] == 0:
            assert r["lossless"] is True, r["method"]
            assert "sampling_p_value" not in r
        else:  # a measured check, not a label
            assert r["sampling_tokens"] == 6 and 0.0 <= r["sampling_p_value"] <= 1.0
            assert r["lossless"] is (r["sampling_p_value"] >= bench.SAMPLING_ALPHA) or r["method"] == "plain"
        plain = next(p for p in records if p["method"] == "plain" and p["temperature"] == r["temperature"])
        # c(1) is plain's decode time per token: total minus the prefill estimate (a busy machine can leave none)
        c1_known = plain["total_time_s"] > plain["prefill_estimate_s"]
        if r["method"] == "plain" or not c1_known:
            assert r["bound_speedup"] is None
        else:  # every speculative method: its bound, and the fraction of it reached
            assert r["bound_speedup"] > 0, r["method"]
            # decode-only speed needs a positive time after subtracting the prefill (a tiny model may not have one)
            assert (r["bound_fraction"] > 0) if r["speedup_decode"] else r["bound_fraction"] is None
            assert r["verify_ms_per_step"] > 0, r["method"]
    tree = next(r for r in records if r["method"] == "eagle_tree" and r["temperature"] == 0)
    assert tree["draft_time_s"] > 0 and tree["verify_time_s"] > 0
    for name in ("assisted", "assisted_peer"):  # timed by hooks on the assistant and the target
        r = next(r for r in records if r["method"] == name and r["temperature"] == 0)
        assert r["draft_ms_per_step"] > 0 and r["target_ms_per_step"] > 0 and r["tokens_per_step"] >= 1
        if r["bound_speedup"] is None:
            continue
        c1 = r["target_forward_ms"]
        expected = r["tokens_per_step"] * c1 / (r["verify_ms_per_step"] + r["draft_ms_per_step"])
        assert abs(r["bound_speedup"] - expected) < 1e-9
        if r["speedup_decode"]:
            assert abs(r["bound_fraction"] - r["speedup_decode"] / r["bound_speedup"]) < 1e-9

    paths = bench.write_results(records, tmp_path, meta={"target": "tiny-llava"})
    loaded = json.loads(paths["json"].read_text())
    assert isinstance(loaded, list) and len(loaded) == len(records)
    assert set(bench.REQUIRED_KEYS) <= set(loaded[0])
    table = paths["md"].read_text()
    assert "| method |" in table and "eagle_tree" in table and "| bound | of bound |" in table
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


def test_sweep_methods_pass_explicit_budgets_and_are_summarised(setup):
    vlm, drafts, prompts = setup
    sweep = methods.sweep_methods({"eagle": drafts["eagle"]})
    assert len(sweep) == len(methods.SWEEP_CHAIN_LENGTHS) * len(methods.SWEEP_CONFIDENCE) + len(
        methods.SWEEP_TREES
    )
    chain = next(m for m in sweep if m.name == "eagle_chain@k4/c0.4")
    assert chain.gen_kwargs == {"num_draft_tokens": 4, "draft_confidence_threshold": 0.4}
    tree = next(m for m in sweep if m.name == "eagle_tree@16/8/2")
    assert tree.gen_kwargs == {"tree_total_tokens": 16, "tree_depth": 8, "tree_top_k": 2} and tree.budget
    # --methods selects a method together with its sweep
    picked = bench.default_methods({"eagle": drafts["eagle"]}, only=["eagle_tree"], sweep=True)
    assert [m.name for m in picked] == ["plain", "eagle_tree"] + [
        f"eagle_tree@{t}/{d}/{k}" for t, d, k in methods.SWEEP_TREES
    ]
    run = [picked[0], picked[1], picked[2], next(m for m in sweep if m.name == "eagle_chain@k2/c0")]
    records = bench.run_benchmark(vlm, prompts, run, (0.0,), max_new_tokens=5, warmup=0, progress=False)
    by_name = {r["method"]: r for r in records}
    small = by_name["eagle_tree@6/4/2"]
    assert (
        small["budget"] == "tree 6/4/2" and small["tree"]["total_tokens"] == 6 and small["lossless"] is True
    )
    assert by_name["eagle_chain@k2/c0"]["chain"] == {"num_draft_tokens": 2, "confidence_threshold": 0.0}
    (line,) = bench.sweep_summary(records)
    assert line.startswith("sweep float32 T=0 eagle: default eagle_tree ") and "of best fixed budget" in line
    fake_peer = {"method": "assisted_peer", "kind": "assisted", "status": "ok", "speedup": 0.5}
    (line,) = bench.sweep_summary(records + [{**fake_peer, "dtype": "float32", "temperature": 0.0}])
    assert "best default / assisted_peer" in line
    assert bench.sweep_summary([r for r in records if not r.get("budget")]) == []


def test_first_calls_are_fresh_on_each_prompt_summed_and_paired_with_plain(setup, monkeypatch):
    from specvlm_hf.generation import budget

    vlm, drafts, prompts = setup
    prompts = prompts + [make_inputs("llava", vlm, seed=1)]
    auto = methods.spec_methods({"eagle": drafts["eagle"]}, modes=("tree",))
    fixed = next(m for m in methods.sweep_methods({"eagle": drafts["eagle"]}) if m.budget)
    plain = methods.Method("plain", "plain")
    forgotten = []
    forget = budget.forget_learned
    monkeypatch.setattr(budget, "forget_learned", lambda draft: forgotten.append(draft) or forget(draft))
    firsts = methods.first_calls(vlm, prompts, [plain, *auto, fixed], max_new_tokens=4, count=2)
    assert len(firsts["eagle_tree"].seconds) == len(firsts["eagle_tree"].plain_s) == 2  # every prompt, fresh
    assert len(firsts[fixed.name].seconds) == 1  # a fixed budget learns nothing: the first prompt only
    assert len(firsts["plain"].seconds) == 2  # plain against itself: the noise
    assert len(forgotten) == 3
    calls = firsts["eagle_tree"]
    assert calls.ratio == pytest.approx(sum(calls.seconds) / sum(calls.plain_s))
    records = bench.run_benchmark(
        vlm, prompts, [plain, *auto], (0.0,), 4, warmup=0, progress=False, first_call=2
    )
    assert all(len(r["first_call_ratios"]) == 2 for r in records)
    (line,) = bench.first_call_summary(records)
    assert "same 2 prompt(s)" in line and "plain against itself" in line and "eagle_tree" in line


def test_lossless_failures_excuse_low_precision_ties_only():
    def rec(lossless, dtype="bfloat16", t=0.0):
        return {"method": "m", "status": "ok", "temperature": t, "lossless": lossless, "dtype": dtype}

    assert bench.lossless_failures([rec(True), rec("numerical-tie"), rec(False, t=1.0)]) == []
    assert len(bench.lossless_failures([rec(False)])) == 1
    assert len(bench.lossless_failures([rec("numerical-tie", dtype="float32")])) == 1


def test_sampling_check_accepts_the_target_and_catches_a_biased_sampler():
    """Randomized PIT + KS: uniform p-values for exact samples, tiny ones for a sampler leaning to the argmax."""
    import torch

    from specvlm_hf.toy.sampling_check import ks_uniform_p_value, sampling_check

    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, 3.0])

    def model(**inputs):  # every position scores the same distribution
        n = inputs["input_ids"].shape[1]
        return type("Out", (), {"logits": logits.expand(1, n, -1)})()

    inputs = {"input_ids": torch.tensor([[7, 8]]), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    p = torch.softmax(logits, -1)
    exact = [torch.multinomial(p, 40, replacement=True, generator=gen).tolist() for _ in range(20)]
    ok = sampling_check(model, [inputs] * 20, exact, 1.0, seed=1)
    assert ok["sampling_tokens"] == 800 and ok["sampling_p_value"] > bench.SAMPLING_ALPHA
    biased = 0.5 * p + 0.5 * torch.nn.functional.one_hot(p.argmax(), 6)  # TV 0.22 towards the argmax
    draws = [torch.multinomial(biased, 40, replacement=True, generator=gen).tolist() for _ in range(20)]
    assert sampling_check(model, [inputs] * 20, draws, 1.0, seed=1)["sampling_p_value"] < 1e-6
    # the same draws are exact for the temperature that produced them, not for another one
    hot = torch.softmax(logits / 2.0, -1)
    draws = [torch.multinomial(hot, 40, replacement=True, generator=gen).tolist() for _ in range(20)]
    assert sampling_check(model, [inputs] * 20, draws, 2.0, seed=1)["sampling_p_value"] > bench.SAMPLING_ALPHA
    assert sampling_check(model, [inputs] * 20, draws, 1.0, seed=1)["sampling_p_value"] < 1e-3
    # KS p-values of uniform samples are themselves roughly uniform: about 5% under 0.05
    hits = sum(ks_uniform_p_value(torch.rand(200, generator=gen))[1] < 0.05 for _ in range(400))
    assert 5 <= hits <= 40


@pytest.mark.slow
@pytest.mark.parametrize("break_greedy", [False, True])
def test_bench_cli_two_dtypes_peer_and_exit_status(break_greedy, monkeypatch, toy_cache_with_target):
    """`specvlm bench` on the cached tiny toy target: a record set per dtype, the trained peer, exit status 1 when a
    greedy output differs (the greedy check forced to report a real difference)."""
    from specvlm_hf import cli

    tmp_path = toy_cache_with_target
    if break_greedy:
        monkeypatch.setattr(bench, "greedy_check", lambda *a: {"lossless": False, "lossless_differences": []})
    argv = [
        "bench",
        "--toy-size",
        "tiny",
        "--cache-dir",
        str(tmp_path),
        "--train-steps",
        "4",
        "--prompts",
        "1",
    ]
    argv += ["--max-new-tokens", "6", "--methods", "plain,assisted_peer,eagle_tree", "--temperatures", "0"]
    argv += ["--dtype", "float32,bfloat16", "--output-dir", str(tmp_path / "out"), "--warmup", "0"]
    assert cli.main(argv) == (1 if break_greedy else 0)
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {(r["method"], r["dtype"]) for r in records} == {
        (m, d) for m in ("plain", "assisted_peer", "eagle_tree") for d in ("float32", "bfloat16")
    }
    assert any(
        p.name.startswith("toy-llava-tiny-seed0__assisted-peer") for p in (tmp_path / "drafts").iterdir()
    )
