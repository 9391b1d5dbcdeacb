"""Benchmark harness behind `specvlm bench`: decoding methods side by side on the same prompts.

Methods (one process, same prompts, same target, batch 1):

* ``plain``: ``vlm.generate`` (the reference for speed and for the lossless check);
* ``assisted``: transformers' assisted generation with an independent small draft model (same tokenizer);
* ``assisted_peer`` (toy targets): transformers' assisted generation with a draft of our draft's budget -- one
  decoder layer at the target's width with as many trainable parameters as our EagleVLM draft, initialised from the
  target and distilled from it on the same rows for the same steps (`toy.peer`); it is given the prompt's image;
* ``prompt_lookup``: transformers' prompt-lookup decoding. On LLaVA-style prompts the lookup proposes
  ``<image>`` placeholder tokens copied from the prompt and the target's forward rejects them; we truncate
  each candidate run at the first placeholder token. Candidates are only proposals that the target verifies,
  so this is lossless (``suppress_tokens`` would avoid the crash but changes the target's distribution);
* ``eagle_chain`` / ``eagle_tree``: a SpecVLM draft without compressor (EagleVLM), chain or tree decoding;
* ``specvlm_chain[mode]`` / ``specvlm_tree[mode]``: a SpecVLM draft with compressor ``mode``;
* ``--sweep``: the same drafts at fixed budgets passed per call (``name@k4/c0.4``: chain of 4, confidence cut-off 0.4;
  ``name@16/8/2``: tree total tokens / depth / top-k), in the same interleaved run; ``budget`` labels them.

With several dtypes (``--dtype bfloat16,float32``) each dtype is a full run with its own plain reference; every
record has ``dtype`` and its speedups are relative to plain in that dtype.

Definitions (per method and temperature, summed over prompts):

* ``tokens_per_second`` = new tokens / wall time of the ``generate`` calls (end to end: prefill included);
* ``speedup`` = tokens_per_second / plain's; ``speedup_decode`` does the same after subtracting the target's
  prompt cost, measured once per prompt as plain ``generate(max_new_tokens=1)``;
* ``target_forwards_per_token`` counts every target forward (a hook on the target);
* ``mean_accepted_length``: tokens emitted per verify forward, bonus token included (SpecVLM: from
  ``draft.last_generation_stats``; other methods: new tokens / target forwards); ``..._no_bonus`` = that - 1;
* ``draft_ms_per_step`` / ``verify_ms_per_step`` (SpecVLM methods): draft time (tree or chain drafting plus
  feeding the accepted tokens back) and verify time (the target forward plus cache compaction) per verify step;
  the draft's pass over the prompt is ``draft_prefill_time_s``, counted in ``prefill_time_s`` (target and draft
  over the prompt) and not per step; ``draft_vs_target_forward`` = draft time per step / plain's decode time per
  token (one single-token forward); ``target_ms_per_step`` (every method): the target's forward time per forward after
  the prefill, timed by hooks on the target; chain mode, assisted and prompt lookup take it as their
  ``verify_ms_per_step``; assisted methods' ``draft_ms_per_step`` is the assistant's forward time (hooks, its pass
  over the prompt excluded) per target forward after the prefill; ``tokens_per_step`` = (new tokens - 1) / (target
  forwards - 1);
* ``bound_speedup`` = tau * c(1) / (c(verify) + draft): tau = ``mean_accepted_length`` (spec methods) or
  ``tokens_per_step`` (assisted, prompt lookup), c(1) = plain's decode time per token (``target_forward_ms``),
  c(verify) = ``verify_ms_per_step``, draft = ``draft_ms_per_step`` (prompt lookup: its n-gram lookup is not timed
  and counts as 0, so its bound is an upper bound); the decode-only speedup a method would reach with no other
  per-step cost. ``bound_fraction`` = ``speedup_decode`` / ``bound_speedup`` (the decode-only speed counts the
  prefill's token too, so on very short runs the fraction can exceed 1 by about 1 / (verify steps * tau));
* ``lossless``: greedy: ``True`` when token-identical to plain for every prompt; ``"numerical-tie"`` when every
  difference starts at a numerical tie (`first_divergence`: at the first differing position the target itself,
  recomputed over the plain prefix in one forward, scores both tokens within rounding of its top logit -- in
  bfloat16 a forward over several tokens and plain's one-token forward round differently, so a near-tie can fall
  either way; ``lossless_ties`` lists them); ``False`` otherwise. ``specvlm bench`` exits with status 1 when a
  greedy record is ``False``, or a float32 record is anything but ``True`` (a tie is excused in bf16/fp16 only).
  Sampling (T > 0): a measured check, `sampling_check`: for every sampled token the target (one teacher-forced
  forward per generation) gives its distribution p_t = softmax(logits / T); the randomized probability integral
  transform u_t = F_t(x_t-) + V * p_t(x_t) (vocabulary by decreasing p_t, V ~ U(0, 1)) is i.i.d. U(0, 1) over all
  tokens of all prompts exactly when every token was drawn from the target's distribution given its prefix; a
  Kolmogorov-Smirnov test of the u_t against U(0, 1) gives ``sampling_p_value`` (``sampling_ks``: the statistic,
  ``sampling_tokens``: how many u_t). ``lossless`` = ``sampling_p_value >= SAMPLING_ALPHA`` (0.001). False-alarm
  rate: 0.001 per record for a lossless method (the test is exact under the null up to the KS asymptotics, ~1e-3 in
  p for n >= 30; the check forward and the generation's forwards round differently, which moves u_t by about the
  dtype's rounding of p_t, far below the KS threshold ~1.95 / sqrt(n)); plain's own p-value is reported as a
  control. A per-token error that moves total variation delta towards more (or less) likely tokens shifts the
  u_t's distribution by about delta, detected about half the time at delta ~ 2 / sqrt(n) and almost always at twice
  that (n = tokens tested: 512 for 8 prompts of 64 tokens, so delta ~ 0.09). A sampling failure prints a WARNING (a statistical test; the exit status follows
  the greedy check only).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .greedy_check import greedy_check, lossless_failures
from .methods import (
    FIRST_CALL_PROMPTS,
    Method,
    _ForwardCounter,
    _MethodRun,
    _progress,
    default_methods,
    first_calls,
    sweep_methods,
    untrained_draft,
)
from .sampling_check import sampling_check
from .tables import first_call_summary, markdown_table, sweep_summary

__all__ = ["Method", "default_methods", "sweep_methods", "run_benchmark", "greedy_check", "write_results"]

METHOD_NAMES = (
    "plain",
    "assisted",
    "assisted_peer",
    "prompt_lookup",
    "eagle_chain",
    "eagle_tree",
    "specvlm_chain",
    "specvlm_tree",
)
REQUIRED_KEYS = ("method", "temperature", "speedup", "mean_accepted_length", "tokens_per_second", "lossless")
SAMPLING_ALPHA = 1e-3  # a sampled record fails its check below this p-value (false-alarm rate per record)


# ---------------------------------------------------------------------------------------------- benchmark


def run_benchmark(
    model,
    prompts: list[dict],
    methods: list[Method],
    temperatures=(0.0, 1.0),
    max_new_tokens: int = 64,
    warmup: int = 1,
    seed: int = 0,
    progress: bool = True,
    first_call: int = FIRST_CALL_PROMPTS,
) -> list[dict]:
    """Run every method on every prompt at every temperature; returns one record per (method, temperature).

    Every record has ``dtype`` (the target's); greedy records get the greedy check, sampled ones `sampling_check`.

    Methods are interleaved prompt by prompt (prompt 1 with every method, then prompt 2, ...), so a machine whose
    speed drifts during the run (shared CPUs, thermal limits) slows every method alike and the ratios hold.

    first_call: before any warm-up, each method's first call on that many prompts (`first_calls`; 0: none) --
    ``first_call_s``, ``first_call_plain_s`` (summed), ``first_call_vs_plain`` (their ratio) and
    ``first_call_ratios`` (per prompt) in its greedy record.
    """
    records: list[dict] = []
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    counter = _ForwardCounter(model)
    try:
        with torch.inference_mode():
            firsts = first_calls(model, prompts, methods, max_new_tokens, first_call) if first_call else {}
            for temperature in temperatures:
                runs = [_MethodRun(method) for method in methods]
                for run in runs:
                    for _ in range(warmup):
                        run.call(model, prompts[0], min(8, max_new_tokens), temperature, counter, warm=True)
                prefill_s = 0.0
                for i, inputs in enumerate(_progress(prompts, f"T={temperature:g}", progress)):
                    # the target's prompt cost (for decode-only speed): plain generate of one token
                    t0 = time.perf_counter()
                    model.generate(**inputs, max_new_tokens=1, do_sample=False)
                    prefill_s += time.perf_counter() - t0
                    for run in runs:
                        torch.manual_seed(seed + i)
                        run.call(model, inputs, max_new_tokens, temperature, counter)
                reference = runs[0].tokens if methods and methods[0].kind == "plain" else None
                plain_record = None
                for run in runs:
                    record = run.record(temperature, len(prompts), max_new_tokens)
                    record["dtype"] = dtype
                    record["prefill_estimate_s"] = prefill_s
                    if record["status"] == "ok" and temperature > 0:
                        record.update(sampling_check(model, prompts, run.tokens, temperature, seed))
                    if run.method.kind == "plain":
                        plain_record = record
                        record["lossless"] = True  # the reference (its sampling p-value is a control)
                    elif record["status"] == "ok":
                        if temperature > 0:
                            p = record["sampling_p_value"]
                            record["lossless"] = bool(p >= SAMPLING_ALPHA) if not math.isnan(p) else None
                        else:
                            record.update(greedy_check(model, prompts, reference, run.tokens))
                    records.append(record)
                    _add_speedups(record, plain_record)
                    if temperature == temperatures[0] and run.method.name in firsts:
                        calls = firsts[run.method.name]
                        record["first_call_s"], record["first_call_plain_s"] = (
                            sum(calls.seconds),
                            sum(calls.plain_s),
                        )
                        record["first_call_vs_plain"] = calls.ratio
                        record["first_call_ratios"] = [s / p for s, p in zip(calls.seconds, calls.plain_s)]
    finally:
        counter.remove()
    return records


def _add_speedups(record: dict, plain: dict | None) -> None:
    if record.get("status") != "ok" or plain is None or not plain.get("tokens_per_second"):
        record.setdefault("speedup", None)
        record.setdefault("speedup_decode", None)
        record.setdefault("bound_speedup", None)
        record.setdefault("bound_fraction", None)
        return
    record["speedup"] = record["tokens_per_second"] / plain["tokens_per_second"]
    prefill = record["prefill_estimate_s"]

    def decode_tps(r):
        t = r["total_time_s"] - prefill
        return r["new_tokens"] / t if t > 0 else None

    a, b = decode_tps(record), decode_tps(plain)
    record["speedup_decode"] = a / b if a and b else None
    if b and record.get("draft_ms_per_step") is not None:
        # one plain decode step ~ one single-token target forward (plus generate's own per-token work)
        record["target_forward_ms"] = 1000 / b
        record["draft_vs_target_forward"] = record["draft_ms_per_step"] / record["target_forward_ms"]
    _add_bound(record, 1000 / b if b else None)


def _add_bound(record: dict, c1_ms: float | None) -> None:
    """``bound_speedup`` = tau * c(1) / (c(verify) + draft) and ``bound_fraction`` (see the module docstring)."""
    record["bound_speedup"] = record["bound_fraction"] = None
    kind = record.get("kind")
    if kind not in ("spec", "assisted", "prompt_lookup") or not c1_ms:
        return
    tau = record.get("mean_accepted_length") if kind == "spec" else record.get("tokens_per_step")
    verify = record.get("verify_ms_per_step")
    draft = 0.0 if kind == "prompt_lookup" else record.get("draft_ms_per_step")
    if tau is None or verify is None or draft is None or verify + draft <= 0:
        return
    record["bound_speedup"] = tau * c1_ms / (verify + draft)
    if record.get("speedup_decode"):
        record["bound_fraction"] = record["speedup_decode"] / record["bound_speedup"]


# ---------------------------------------------------------------------------------------------- output


def plot_results(records: list[dict], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok"]
    several = len({r.get("dtype") for r in ok}) > 1

    def label(r):
        return f"{r['method']} ({r.get('dtype')})" if several else r["method"]

    methods = list(dict.fromkeys(label(r) for r in ok))
    temps = sorted({r["temperature"] for r in ok})
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * max(len(methods), 4) + 1.5))
    height = 0.8 / max(len(temps), 1)
    for panel, (key, title) in zip(
        axes, (("speedup", "speedup vs plain"), ("mean_accepted_length", "accepted length"))
    ):
        for j, t in enumerate(temps):
            values = []
            for m in methods:
                r = next((x for x in ok if label(x) == m and x["temperature"] == t), None)
                values.append((r or {}).get(key) or 0.0)
            ys = [i + j * height for i in range(len(methods))]
            panel.barh(ys, values, height=height, label=f"T={t:g}")
        panel.set_yticks([i + 0.4 - height / 2 for i in range(len(methods))])
        panel.set_yticklabels(methods)
        panel.invert_yaxis()
        panel.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
        panel.set_title(title)
        panel.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(
    records: list[dict], output_dir: str | Path, meta: dict | None = None, summary: list[str] | None = None
) -> dict[str, Path]:
    """``results.json`` (list of records), ``results.md`` (table) and ``results.png`` (plot) in ``output_dir``.

    Without matplotlib the plot is skipped with a one-line note (``results.png`` is then not in the result)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md"}
    paths["json"].write_text(json.dumps(records, indent=2, default=str))
    text = ""
    if meta:
        text += "".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n"
    text += "".join(f"{line}\n\n" for line in summary or [])
    paths["md"].write_text(text + markdown_table(records))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("note: matplotlib is not installed, so results.png is skipped (pip install matplotlib)")
    else:
        paths["png"] = plot_results(records, out / "results.png")
    return paths


# ---------------------------------------------------------------------------------------------- command


def bench_dtypes(value: str | None, toy_medium: bool) -> list[torch.dtype | None]:
    """``--dtype``: comma-separated dtypes, each timed in the same run (None: the target as loaded).

    Default: bfloat16 and float32 for the medium toy target, the loaded dtype otherwise."""
    from .demo import timing_dtype

    if value is None:
        return [torch.bfloat16, torch.float32] if toy_medium else [None]
    return list(dict.fromkeys(timing_dtype(name.strip()) for name in value.split(",") if name.strip()))


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def run_bench_cli(args) -> int:
    import copy
    import os

    # the bench measures a machine meeting these models for the first time: what earlier processes measured here
    # (`generation.saved_costs`) is neither read nor written, unless asked for with SPECVLM_HF_BUDGET_CACHE=1
    os.environ.setdefault("SPECVLM_HF_BUDGET_CACHE", "0")

    from ..targets.loading import reload_quantized
    from .demo import (
        LLAVA7B_DIMS,
        load_rows,
        load_target,
        pick_device,
        prompt_inputs,
        unrouted_copy,
        widen_draft_for_timing,
        widen_for_timing,
    )
    from .drafts import TrainBudget, load_draft, load_or_train_draft
    from .tuning import print_tune, tune_tree

    device = pick_device(getattr(args, "device", None))
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    # the medium toy target, or the tiny one widened to LLaVA-1.5-7B's decoder shape ("llava7b")
    toy_medium = args.target is None and args.toy_size in ("medium", "llava7b")
    dims = LLAVA7B_DIMS if args.toy_size == "llava7b" else None
    dtypes = bench_dtypes(getattr(args, "dtype", None), toy_medium)
    only = args.methods.split(",") if args.methods else None
    quantization = getattr(args, "quantization", None)
    if quantization and not toy_medium and getattr(args, "dtype", None):  # a quantized model is never re-cast
        raise SystemExit(
            f"--quantization {quantization} times the target in the dtype it is loaded in (a quantized model cannot "
            "be cast after loading): drop --dtype, or save the checkpoint in the dtype to time."
        )
    if toy_medium:
        # drafts are distilled on the tiny toy target (fast) and widened exactly with it: the medium toy target
        # is the tiny one widened (toy.widen_toy_target), so outputs and acceptance are the tiny pair's, while
        # every forward costs what a ~157M-parameter target and its draft cost
        train_target, processor, train_label = load_target(None, "tiny", args.cache_dir, args.seed)
        base = None
    else:
        base, processor, train_label = load_target(
            args.target, args.toy_size, args.cache_dir, args.seed, quantization=quantization
        )
        train_target = base
    budget = TrainBudget(args.train_steps, args.train_seconds, args.train_batch_size, args.learning_rate)
    trained: dict[str, Any] = {}  # drafts of the training target (tiny toy target for the medium one)
    draft_paths: dict[str, Path] = {}
    if args.draft:
        for path in args.draft:
            draft_paths[path] = Path(path)
            if toy_medium:  # a draft of the tiny toy target, widened with it below like the toy drafts
                trained[path] = load_draft(path, train_target)
    else:
        # the resampler does not widen exactly, so the widened toy bench uses a fixed pooling compressor
        modes = [None] if args.tune else [None, "pool" if toy_medium else "select"]
        for mode in modes:
            draft, path, _ = load_or_train_draft(
                train_target, processor, train_label, mode, budget, args.seed, args.cache_dir
            )
            trained[mode or "eagle"] = draft
            draft_paths[mode or "eagle"] = path

    def build(dtype):
        """(target, label, drafts) timed in ``dtype``, on ``device``."""
        vlm, label, drafts = _build(dtype)
        for model in (vlm, *drafts.values()):  # (in place: a draft keeps sharing its target's modules)
            if not (quantization and model is vlm):  # a quantized model is placed by its loader, never moved
                model.to(device)
        return vlm, label, drafts

    def _build(dtype):
        if toy_medium:
            vlm = widen_for_timing(train_target, dtype, dims, device)
            label = f"toy-llava-{args.toy_size}-seed{args.seed}-{_dtype_name(dtype)}"
            if quantization:  # the widened target loaded back quantized, as from_pretrained does it
                vlm, label = reload_quantized(vlm, quantization), f"{label}-{quantization}"
            return vlm, label, {name: widen_draft_for_timing(d, vlm) for name, d in trained.items()}
        loaded = next(base.parameters()).dtype
        vlm = base if dtype in (None, loaded) else unrouted_copy(base).to(dtype)
        label = train_label if dtype in (None, loaded) else f"{train_label}-{_dtype_name(dtype)}"
        drafts = {}
        for name, path in draft_paths.items():
            if dtype in (None, loaded) and name in trained:
                drafts[name] = trained[name]
            else:
                drafts[name] = load_draft(path, vlm).to(next(vlm.parameters()).dtype).bind(vlm)
        return vlm, label, drafts

    vlm, label, drafts = build(dtypes[0])
    _resolve_tree_budgets(args, drafts)
    stratified = getattr(args, "prompt_mix", "stratified") == "stratified"
    rows = load_rows(args.dataset, args.prompts, args.seed, eval_rows=True, stratified=stratified)
    prompts = [prompt_inputs(processor, row, device) for row in rows]

    if getattr(args, "batch_size", None):
        from .batch_bench import run_batch_bench_cli

        return run_batch_bench_cli(args, vlm, label, drafts, build, dtypes, rows, processor, start)

    if args.tune:
        print(f"target: {label}")
        for name, draft in drafts.items():
            best, table, costs = tune_tree(vlm, draft, prompts, args.max_new_tokens)
            print(f"\ndraft {name}:")
            print_tune(best, table, costs)
            for key in ("tree_total_tokens", "tree_depth", "tree_top_k"):
                setattr(draft.config, key, best[key])
            if draft_paths[name].is_dir():
                from ..draft.configuration_specvlm import SpecVLMDraftConfig

                saved = SpecVLMDraftConfig.from_pretrained(draft_paths[name])
                for key in ("tree_total_tokens", "tree_depth", "tree_top_k"):
                    setattr(saved, key, best[key])
                saved.save_pretrained(draft_paths[name])
                print(f"saved the tuned tree budget in {draft_paths[name] / 'config.json'}")
        return 0

    peer_tiny = None
    if args.target is None and (only is None or "assisted_peer" in only):
        from .peer import load_or_train_peer, peer_intermediate_size

        # as many trainable parameters as our EagleVLM draft at the width it is timed at (toy.peer)
        reference = drafts.get("eagle") or next(iter(drafts.values()))
        size = peer_intermediate_size(
            sum(p.numel() for p in reference.parameters()),
            train_target.config.get_text_config(),
            hidden=vlm.config.get_text_config().hidden_size,
        )
        peer_tiny, _ = load_or_train_peer(
            train_target, processor, train_label, size, budget, args.seed, args.cache_dir
        )

    records: list[dict] = []
    labels = []
    for i, dtype in enumerate(dtypes):
        if i:
            vlm, label, drafts = build(dtype)
            _resolve_tree_budgets(args, drafts)
        labels.append(label)
        target_dtype = next(vlm.parameters()).dtype
        print(f"target: {label} ({sum(p.numel() for p in vlm.parameters()) / 1e6:.1f}M parameters)")
        assistant = None
        if args.assistant is not None:
            assistant, _, _ = load_target(args.assistant, cache_dir=args.cache_dir, seed=args.seed)
            assistant = assistant.to(device, target_dtype)
        elif args.target is None and (only is None or "assisted" in only):
            # an independently trained small toy VLM with the target's tokenizer (toy.load_toy_assistant)
            from .world import load_toy_assistant

            assistant = load_toy_assistant(args.cache_dir, args.seed).to(device, target_dtype)
        peer = None
        if peer_tiny is not None:
            from .peer import peer_trainable_parameters, widen_peer

            peer = widen_peer(peer_tiny, vlm) if toy_medium else copy.deepcopy(peer_tiny).to(target_dtype)
            peer.to(device)
            mine = sum(p.numel() for p in next(iter(drafts.values())).parameters()) if drafts else 0
            theirs = peer_trainable_parameters(peer)
            print(
                f"assisted peer: 1 decoder layer, {theirs / 1e6:.2f}M trainable parameters (our draft: {mine / 1e6:.2f}M)"
            )
        untrained = None
        if only is None or any(name.startswith("untrained") for name in only):
            untrained = untrained_draft(train_target, vlm, toy_medium, args.seed).to(device)
        methods = default_methods(
            drafts, assistant=assistant, only=only, peer=peer, sweep=args.sweep, untrained=untrained
        )
        # sampled trees are a spine with siblings (generation.tree.build_sampled_tree): their best budget differs
        # from greedy's; fixed budgets (--sweep) are passed explicitly and hold at every temperature
        sampling_tree = {
            key: getattr(args, f"sampling_{key}")
            for key in ("tree_total_tokens", "tree_depth", "tree_top_k")
            if getattr(args, f"sampling_{key}", None) is not None
        }
        for method in methods:
            if method.kind == "spec" and method.decoding_mode == "tree" and method.budget is None:
                method.sampling_kwargs = dict(sampling_tree)
        temperatures = [float(t) for t in args.temperatures.split(",")]
        records += run_benchmark(
            vlm,
            prompts,
            methods,
            temperatures,
            args.max_new_tokens,
            warmup=args.warmup,
            seed=args.seed,
            first_call=args.first_call_prompts,
        )
        del vlm, drafts, assistant, peer, methods, untrained
    print()
    print(markdown_table(records))
    summary = sweep_summary(records) + first_call_summary(records)
    for line in summary:
        print(line)
    if args.output_dir:
        meta = {
            "target": ", ".join(labels),
            "prompts": len(prompts),
            "max_new_tokens": args.max_new_tokens,
            "device": str(device),
            "threads": torch.get_num_threads(),
        }
        paths = write_results(records, args.output_dir, meta, summary)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    print(f"bench time: {time.perf_counter() - start:.1f} s")
    sampled_bad = [r for r in records if r["temperature"] > 0 and r.get("lossless") is False]
    for r in sampled_bad:
        print(
            f"WARNING: {r['method']} ({r['dtype']}, T={r['temperature']:g}): sampled tokens fail the distribution "
            f"check, p = {r['sampling_p_value']:.2g} < {SAMPLING_ALPHA:g} ({r['sampling_test']})"
        )
    failures = lossless_failures(records)
    for r in failures:
        why = "a float32 numerical tie" if r.get("lossless") == "numerical-tie" else "not a numerical tie"
        print(
            f"ERROR: greedy output of {r['method']} ({r['dtype']}) differs from plain generate's ({why})",
            file=sys.stderr,
        )
    return 1 if failures else 0


def _resolve_tree_budgets(args, drafts: dict[str, Any]) -> None:
    """The tree budgets a run uses: none by default (each draft's automatic budget, `generation/budget.py`,
    chooses per step from measured costs); a budget given on the command line holds for every draft, greedy and
    sampled (``--sampling-tree-*`` for sampling only); a budget `--tune` stored in a draft's config is its own."""
    keys = ("tree_total_tokens", "tree_depth", "tree_top_k")
    for draft in drafts.values():
        for key in keys:
            if getattr(args, key, None) is not None:
                setattr(draft.config, key, getattr(args, key))
