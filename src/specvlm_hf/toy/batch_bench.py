"""`specvlm bench --batch-size 1,4,8`: throughput of plain batched `generate` against SpecVLM tree and chain decoding
on the same batches.

For every batch size B the prompts are cut into batches of B, each left-padded by the processor as a user would
(`processor.apply_chat_template([...], padding=True)` with the tokenizer padding on the left), and every batch runs
with every method back to back (interleaved, so a drifting machine slows all alike). Per (batch size, method,
temperature):

* ``tokens_per_second`` = new tokens over the whole batch / wall time of the `generate` calls; a row's new tokens
  end at its EOS (plain generate's pad fill after it is not counted, for any method);
* ``speedup`` = tokens_per_second / plain batched generate's at the same batch size;
* ``mean_accepted_length``: tokens a row emits per verify forward (bonus included), over every row's steps;
* ``draft_ms_per_step`` / ``verify_ms_per_step``: the draft's and the verify's time per batched verify step
  (the verify step: the target forward over every row's tree plus mask, acceptance and compaction);
* ``lossless`` (greedy): every row token-identical to plain batched generate's (bf16: a difference starting at a
  numerical tie of the target counts as a tie, see `greedy_check`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from .greedy_check import greedy_check, lossless_failures
from .tables import format_cell, markdown_lines

BATCH_METHODS = (("plain", None), ("tree", "tree"), ("chain", "chain"))


def batch_inputs(processor, rows: list[dict], device) -> dict:
    """A left-padded batch for `vlm.generate(**inputs)` from vision-chat rows (their first user turn and image)."""
    from .world import _with_image

    conversations = []
    for row in rows:
        user_turn = [m for m in row["messages"] if m["role"] == "user"][:1]
        conversations.append(_with_image(user_turn, row["images"][0]))
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        inputs = processor.apply_chat_template(
            conversations,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            processor_kwargs={"padding": True},
        )
    finally:
        tokenizer.padding_side = side
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in dict(inputs).items()}


def _new_tokens(out: torch.Tensor, prompt_len: int, eos: set[int]) -> list[list[int]]:
    """Each row's generated tokens up to and including its first EOS."""
    rows = []
    for row in out[:, prompt_len:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:end])
    return rows


def run_batch_benchmark(
    model,
    processor,
    rows: list[dict],
    draft,
    batch_sizes: list[int],
    temperatures=(0.0,),
    max_new_tokens: int = 64,
    seed: int = 0,
    warmup: int = 1,
) -> list[dict]:
    """One record per (batch size, method, temperature); see the module docstring. warmup: untimed calls per batch
    size and method first (0: every batch size's first call is timed, as a process meets it)."""
    device = next(model.parameters()).device
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    records = []
    with torch.inference_mode():
        for size in batch_sizes:
            batches = [batch_inputs(processor, rows[i : i + size], device) for i in range(0, len(rows), size)]
            for temperature in temperatures:
                opts = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0)
                if temperature > 0:
                    opts["temperature"] = temperature
                totals = {name: _Totals() for name, _ in BATCH_METHODS}
                for _ in range(warmup):
                    for _name, mode in BATCH_METHODS:  # warm-up (kernels, what the automatic budget learns)
                        spec = {} if mode is None else dict(assistant_model=draft, decoding_mode=mode)
                        model.generate(**batches[0], **dict(opts, max_new_tokens=8), **spec)
                for i, inputs in enumerate(batches):
                    prompt_len = inputs["input_ids"].shape[1]
                    for name, mode in BATCH_METHODS:
                        spec = {} if mode is None else dict(assistant_model=draft, decoding_mode=mode)
                        torch.manual_seed(seed + i)
                        t0 = time.perf_counter()
                        out = model.generate(**inputs, **opts, **spec)
                        wall = time.perf_counter() - t0
                        totals[name].add(
                            out, prompt_len, eos, wall, draft.last_generation_stats if mode else None
                        )
                plain = totals["plain"]
                for name, mode in BATCH_METHODS:
                    record = totals[name].record(name, size, temperature, dtype)
                    record["speedup"] = record["tokens_per_second"] / plain.tokens_per_second
                    if mode is not None and temperature == 0:
                        record.update(_check(model, batches, plain.outputs, totals[name].outputs, eos))
                    records.append(record)
    return records


def _check(model, batches, reference, outputs, eos: set[int]) -> dict:
    """Greedy: every row against plain batched generate's row (a difference is excused only at a numerical tie in
    low precision; the tie is judged on the row's own unpadded prompt)."""
    prompts, ref_rows, out_rows = [], [], []
    for inputs, ref, out in zip(batches, reference, outputs):
        size, length = inputs["input_ids"].shape
        for b in range(size):
            keep = inputs["attention_mask"][b].bool()
            row = {
                k: v[b : b + 1] for k, v in inputs.items() if hasattr(v, "shape") and v.shape[:1] == (size,)
            }
            row["input_ids"] = inputs["input_ids"][b : b + 1, keep]
            row["attention_mask"] = torch.ones_like(row["input_ids"])
            prompts.append(row)
            ref_rows.append(_new_tokens(ref[b : b + 1], length, eos)[0])
            out_rows.append(_new_tokens(out[b : b + 1], length, eos)[0])
    return greedy_check(model, prompts, ref_rows, out_rows)


class _Totals:
    def __init__(self):
        self.wall, self.new, self.outputs = 0.0, 0, []
        self.draft_s = self.verify_s = 0.0
        self.steps, self.accepted = 0, []

    def add(self, out, prompt_len, eos, wall, stats) -> None:
        self.wall += wall
        self.new += sum(len(r) for r in _new_tokens(out, prompt_len, eos))
        self.outputs.append(out)
        if stats is not None:
            self.draft_s += stats.draft_time_s
            self.verify_s += stats.verify_time_s
            self.steps += max(stats.target_forwards - 1, 0)
            self.accepted += list(stats.accepted_lengths)

    @property
    def tokens_per_second(self) -> float:
        return self.new / self.wall if self.wall else 0.0

    def record(self, name: str, size: int, temperature: float, dtype: str) -> dict[str, Any]:
        record = {
            "status": "ok",  # (`greedy_check.lossless_failures` reads greedy records with this status)
            "batch_size": size,
            "method": name,
            "dtype": dtype,
            "temperature": temperature,
            "new_tokens": self.new,
            "wall_s": self.wall,
            "tokens_per_second": self.tokens_per_second,
        }
        if self.steps:
            record["mean_accepted_length"] = sum(self.accepted) / len(self.accepted)
            record["draft_ms_per_step"] = 1e3 * self.draft_s / self.steps
            record["verify_ms_per_step"] = 1e3 * self.verify_s / self.steps
        return record


def batch_table(records: list[dict]) -> str:
    header = [
        "batch",
        "method",
        "dtype",
        "T",
        "lossless",
        "tokens/s",
        "speedup",
        "accepted len",
        "draft ms/step",
        "verify ms/step",
    ]
    fmt = format_cell
    rows = []
    for r in records:
        row = [
            r["batch_size"],
            r["method"],
            r["dtype"],
            fmt(r["temperature"], 1),
            fmt(r.get("lossless")) if r["method"] != "plain" else "ref",
            fmt(r["tokens_per_second"], 1),
            fmt(r["speedup"]),
            fmt(r.get("mean_accepted_length")),
            fmt(r.get("draft_ms_per_step"), 1),
            fmt(r.get("verify_ms_per_step"), 1),
        ]
        rows.append(row)
    return "\n".join(markdown_lines(header, rows)) + "\n"


def run_batch_bench_cli(args, vlm, label, drafts, build, dtypes, rows, processor, start: float) -> int:
    """`specvlm bench --batch-size ...`: `run_batch_benchmark` per dtype with the EagleVLM draft; prints the table,
    writes results.json / results.md with --output-dir; exit status 1 when a greedy row differs from plain's."""
    import json
    from pathlib import Path

    records, labels = [], []
    temperatures = [float(t) for t in args.temperatures.split(",")]
    for i, dtype in enumerate(dtypes):
        if i:
            vlm, label, drafts = build(dtype)
        labels.append(label)
        draft = drafts.get("eagle") or next(iter(drafts.values()))
        print(f"target: {label}; batch sizes {args.batch_size}")
        records += run_batch_benchmark(
            vlm,
            processor,
            rows,
            draft,
            args.batch_size,
            temperatures,
            args.max_new_tokens,
            args.seed,
            warmup=args.warmup,
        )
    table = batch_table(records)
    summary = batch_summary(records)
    print()
    print(table)
    for line in summary:
        print(line)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "target": ", ".join(labels),
            "prompts": len(rows),
            "max_new_tokens": args.max_new_tokens,
            "threads": torch.get_num_threads(),
        }
        (out / "results.json").write_text(json.dumps(records, indent=2, default=str))
        text = "".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n" + "".join(f"{x}\n\n" for x in summary)
        (out / "results.md").write_text(text + table)
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    print(f"bench time: {time.perf_counter() - start:.1f} s")
    failures = lossless_failures(records)
    for r in failures:
        print(
            f"ERROR: batch {r['batch_size']} {r['method']} ({r['dtype']}) differs from plain batched generate"
        )
    return 1 if failures else 0


def batch_summary(records: list[dict]) -> list[str]:
    """Per dtype and temperature: each method's speedup over plain batched generate at every batch size."""
    lines = []
    groups = dict.fromkeys((r["dtype"], r["temperature"]) for r in records)
    for dtype, temperature in groups:
        group = [r for r in records if r["dtype"] == dtype and r["temperature"] == temperature]
        for method in ("tree", "chain"):
            parts = [f"B={r['batch_size']}: {r['speedup']:.2f}x" for r in group if r["method"] == method]
            lines.append(f"{dtype} T={temperature:g} {method} vs plain batched generate: " + ", ".join(parts))
    return lines
