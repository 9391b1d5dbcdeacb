"""`specvlm bench --tune`: fit the draft tree to the hardware at hand.

On a GPU verifying 60 tokens costs about what one token costs; on a CPU it does not (a 157M-parameter bf16 target
here: 1 token ~32 ms, 16 tokens ~57 ms, 32 tokens ~64 ms). `measure_verify_cost` times the target on a prefilled
cache for several tree sizes; `tune_tree` runs short generations over a grid of tree budgets and keeps the one
with the highest measured tokens/s (printed beside the estimate accepted length / (verify + draft time)).
"""

from __future__ import annotations

import copy
import time

import torch

from .methods import Method, _ForwardCounter, _MethodRun, _progress

TUNE_SIZES = (1, 8, 16, 32, 60)
TUNE_TIE = 0.02  # relative tokens/s gap under which two budgets count as equally fast
# (tree_total_tokens, tree_depth, tree_top_k) candidates for --tune
TUNE_GRID = (
    (8, 4, 2),
    (8, 6, 2),
    (10, 6, 3),
    (12, 5, 3),
    (12, 6, 2),
    (12, 8, 2),
    (16, 5, 4),
    (16, 6, 3),
    (16, 8, 2),
    (20, 8, 3),
    (12, 10, 2),
    (16, 10, 2),
    (16, 12, 2),
    (20, 12, 2),
    (24, 6, 4),
    (32, 8, 4),
    (60, 7, 10),
)


@torch.no_grad()
def measure_verify_cost(model, inputs: dict, sizes=TUNE_SIZES, repeats: int = 3) -> dict[int, float]:
    """Seconds of one target forward of ``n`` new tokens on a prefilled KV cache, for each ``n`` in ``sizes``."""
    out = model(**inputs, use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    prompt_len = inputs["input_ids"].shape[1]
    device = inputs["input_ids"].device
    vocab_high = min(1000, model.config.get_text_config().vocab_size)
    costs = {}
    for n in sizes:
        ids = torch.randint(5, vocab_high, (1, n), device=device)
        position_ids = torch.arange(prompt_len, prompt_len + n, device=device)[None]
        attention_mask = torch.ones(1, prompt_len + n, dtype=torch.long, device=device)
        times = []
        for _ in range(repeats):
            c = copy.deepcopy(cache)
            t0 = time.perf_counter()
            model(
                input_ids=ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=c,
                use_cache=True,
            )
            times.append(time.perf_counter() - t0)
        costs[n] = sorted(times)[len(times) // 2]
    return costs


def _interp_cost(costs: dict[int, float], n: int) -> float:
    xs = sorted(costs)
    if n <= xs[0]:
        return costs[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if n <= b:
            return costs[a] + (costs[b] - costs[a]) * (n - a) / (b - a)
    a, b = xs[-2], xs[-1]
    return costs[b] + (costs[b] - costs[a]) * (n - b) / (b - a)


def tune_tree(model, draft, prompts: list[dict], max_new_tokens: int = 32, grid=TUNE_GRID, progress=True):
    """Pick (tree_total_tokens, tree_depth, tree_top_k) maximising measured tokens/s.

    estimated tokens/s = accepted length / (verify cost(total_tokens + 1) + draft time per step), with the accepted
    length and draft time from a short run and the verify cost measured on a prefilled cache. Returns
    ``(best, rows, costs)``; the caller stores ``best`` in the draft config.
    """
    costs = measure_verify_cost(model, prompts[0])
    runs = [
        _MethodRun(
            Method(
                f"tree {total}/{depth}/{top_k}",
                "spec",
                draft=draft,
                decoding_mode="tree",
                gen_kwargs={"tree_total_tokens": total, "tree_depth": depth, "tree_top_k": top_k},
            )
        )
        for total, depth, top_k in grid
    ]
    counter = _ForwardCounter(model)
    try:
        with torch.inference_mode():
            # every budget on a prompt before the next prompt (as the bench does): drift then hits all alike
            for inputs in _progress(prompts, "tune", progress):
                for run in runs:
                    run.call(model, inputs, max_new_tokens, 0.0, counter)
                    if run.error is not None:
                        raise RuntimeError(f"--tune: {run.method.name} failed: {run.error}")
    finally:
        counter.remove()
    rows = []
    for (total, depth, top_k), run in zip(grid, runs):
        steps = max(len(run.accepted), 1)
        tau = sum(run.accepted) / steps
        verify_s = _interp_cost(costs, total + 1)
        rows.append(
            {
                "tree_total_tokens": total,
                "tree_depth": depth,
                "tree_top_k": top_k,
                "accepted_length": tau,
                "verify_cost_s": verify_s,
                "draft_s_per_step": run.draft_s / steps,
                "estimated_tokens_per_second": tau / (verify_s + run.draft_s / steps),
                "measured_tokens_per_second": run.new / run.wall if run.wall else 0.0,
            }
        )
    # the measured rate includes everything a real call pays (Python, masks, cache compaction); the estimate
    # (acceptance x verify cost) is printed beside it to show where the time goes
    return pick_budget(rows), rows, costs


def pick_budget(rows: list[dict], tie: float = TUNE_TIE) -> dict:
    """The fastest measured budget; budgets within `tie` (relative) of it count as equally fast (run-to-run noise
    here is a few %), and of those the one with the cheapest step (verify + draft time) wins."""
    fastest = max(r["measured_tokens_per_second"] for r in rows)
    tied = [r for r in rows if r["measured_tokens_per_second"] >= (1 - tie) * fastest]
    return min(tied, key=lambda r: r["verify_cost_s"] + r["draft_s_per_step"])


def print_tune(best: dict, rows: list[dict], costs: dict[int, float]) -> None:
    print("\ntarget verify cost on a prefilled cache:")
    print("  " + "  ".join(f"{n:>3d} tok: {c * 1000:6.1f} ms" for n, c in costs.items()))
    print(
        f"\n{'total':>6s}{'depth':>6s}{'top_k':>6s}{'acc len':>9s}{'verify ms':>11s}{'draft ms':>10s}"
        f"{'est tok/s':>11s}{'meas tok/s':>12s}"
    )
    for r in rows:
        mark = "  <- best" if r is best else ""
        print(
            f"{r['tree_total_tokens']:>6d}{r['tree_depth']:>6d}{r['tree_top_k']:>6d}{r['accepted_length']:>9.2f}"
            f"{r['verify_cost_s'] * 1000:>11.1f}{r['draft_s_per_step'] * 1000:>10.1f}"
            f"{r['estimated_tokens_per_second']:>11.1f}{r['measured_tokens_per_second']:>12.1f}{mark}"
        )
