# OMP_NUM_THREADS=1 python examples/training_curve.py --steps 600 --checkpoints 25,50,100,200,400,600
#
# Training-time scaling on the toy world: distill one EagleVLM draft (no compressor) online from the toy
# LLaVA target, snapshot it at several step counts (recording the wall-clock training time at each), then
# measure the mean accepted length of greedy tree decoding for every snapshot on the same held-out prompts,
# checking that every speculative output equals plain greedy generate. Writes
# docs/results/training_curve.json and docs/results/training_curve.md.
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

from specvlm_hf import SpecVLMDataCollator, SpecVLMDistillationTrainer
from specvlm_hf.toy.demo import load_rows, load_target, prompt_inputs
from specvlm_hf.toy.drafts import TrainBudget, new_draft

TREE_SETTINGS = {
    "default": {},  # the config's tree: top_k 10, depth 7, total_tokens 60
    "k4_d8_t24": {"tree_top_k": 4, "tree_depth": 8, "tree_total_tokens": 24},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Accepted length vs. distillation steps (toy target).")
    p.add_argument("--steps", type=int, default=600, help="total training steps (one cosine schedule)")
    p.add_argument("--checkpoints", default="25,50,100,200,400,600", help="step counts to snapshot")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=TrainBudget.learning_rate)
    p.add_argument("--num-rows", type=int, default=2000, help="toy training rows")
    p.add_argument("--prompts", type=int, default=12, help="held-out evaluation prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output-dir", default="docs/results")
    p.add_argument("--name", default="training_curve", help="output file stem (NAME.json, NAME.md)")
    p.add_argument("--save-dir", default=None, help="also save_pretrained every snapshot here")
    return p.parse_args()


class Snapshots(TrainerCallback):
    """Copies the draft's weights at the chosen global steps, with the training wall time so far."""

    def __init__(self, draft, steps: list[int]):
        self.draft, self.steps = draft, set(steps)
        self.taken: dict[int, dict] = {}
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            seconds = time.perf_counter() - self.start
            weights = {k: v.detach().clone() for k, v in self.draft.state_dict().items()}
            logs = [e for e in state.log_history if "top1_agreement" in e]
            self.taken[state.global_step] = {
                "train_seconds": seconds,
                "state_dict": weights,
                "top1_agreement_last_log": logs[-1]["top1_agreement"] if logs else None,
            }
        return control


def train_with_snapshots(vlm, processor, args, checkpoints: list[int]):
    draft = new_draft(vlm, None, seed=args.seed)
    dataset = load_rows(None, args.num_rows, args.seed)
    snaps = Snapshots(draft, checkpoints)
    tmp = tempfile.TemporaryDirectory(prefix="specvlm-curve-")
    training_args = TrainingArguments(
        output_dir=tmp.name,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 20),
        weight_decay=0.0,
        logging_steps=25,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=args.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        remove_unused_columns=False,
    )
    trainer = SpecVLMDistillationTrainer(
        model=draft,
        target_model=vlm,
        args=training_args,
        train_dataset=dataset,
        data_collator=SpecVLMDataCollator(processor),
        callbacks=[snaps],
    )
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    tmp.cleanup()
    draft.eval()
    return draft, snaps.taken, total, trainer.state.log_history


@torch.inference_mode()
def evaluate(vlm, draft, processor, rows, plain_outputs, max_new_tokens: int) -> dict:
    result = {}
    for name, settings in TREE_SETTINGS.items():
        accepted, forwards, new_tokens, seconds = [], 0, 0, 0.0
        for row, plain in zip(rows, plain_outputs):
            inputs = prompt_inputs(processor, row)
            t0 = time.perf_counter()
            spec = vlm.generate(
                **inputs, assistant_model=draft, max_new_tokens=max_new_tokens, do_sample=False, **settings
            )
            seconds += time.perf_counter() - t0
            if spec.tolist() != plain.tolist():
                raise AssertionError(f"tree decoding ({name}) changed the greedy output")
            stats = draft.last_generation_stats
            accepted.append(stats.mean_accepted_length)
            forwards += stats.target_forwards
            new_tokens += stats.new_tokens
        result[name] = {
            "mean_accepted_length": sum(accepted) / len(accepted),
            "tokens_per_target_forward": new_tokens / forwards,
            "target_forwards": forwards,
            "new_tokens": new_tokens,
            "generate_seconds": seconds,
        }
    return result


def accepted_length_ceiling(new_tokens: list[int], depth: int) -> float:
    """Best mean accepted length a perfect draft could reach on these answers with a depth-`depth` tree.

    The prefill emits the first token; each verify forward then emits at most depth + 1 tokens (bonus included),
    so n new tokens need ceil((n - 1) / (depth + 1)) verify forwards.
    """
    per_prompt = [(n - 1) / math.ceil((n - 1) / (depth + 1)) for n in new_tokens if n > 1]
    return sum(per_prompt) / len(per_prompt)


def write_markdown(path: Path, record: dict) -> None:
    names = list(TREE_SETTINGS)
    lines = [
        "# Training-time scaling on the toy target",
        "",
        f"Command: `{record['command']}`",
        "",
        f"One EagleVLM draft (1 layer, no compressor) distilled online from `{record['target']}` for "
        f"{record['total_steps']} steps (batch {record['batch_size']}, lr {record['learning_rate']}, cosine "
        f"schedule over the whole run, seed {record['seed']}); rows below are snapshots of that one run. "
        f"Evaluation: greedy tree decoding on {record['prompts']} held-out toy prompts, "
        f"max_new_tokens {record['max_new_tokens']}; every output equals plain greedy generate. "
        f"Accepted length = tokens emitted per verify forward (bonus included), averaged over prompts; "
        f"tokens/fwd = all new tokens / all target forwards (prefill included). "
        f"CPU, {record['threads']} thread(s); total training {record['total_train_seconds']:.1f} s.",
        "",
        "| step | train s | acc. len (default: k10 d7 t60) | tokens/fwd (default) "
        "| acc. len (k4 d8 t24) | tokens/fwd (k4 d8 t24) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in record["checkpoints"]:
        cells = [str(row["step"]), f"{row['train_seconds']:.1f}"]
        for name in names:
            ev = row["eval"][name]
            cells += [f"{ev['mean_accepted_length']:.2f}", f"{ev['tokens_per_target_forward']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    ceiling = record["accepted_length_ceiling"]
    lines += [
        "",
        f"Answer lengths of the {record['prompts']} prompts (plain greedy): {record['answer_tokens']}. A perfect "
        "draft's accepted length is capped by them: "
        + ", ".join(f"{name} {value:.2f}" for name, value in ceiling.items())
        + " (mean over prompts of (n-1) / ceil((n-1) / (depth+1))).",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    checkpoints = sorted({int(s) for s in args.checkpoints.split(",") if int(s) <= args.steps})
    hf_logging.set_verbosity_error()
    vlm, processor, label = load_target(None, "tiny", seed=args.seed, progress=False)
    rows = load_rows(None, args.prompts, args.seed, eval_rows=True)
    with torch.inference_mode():
        plain_outputs = [
            vlm.generate(**prompt_inputs(processor, row), max_new_tokens=args.max_new_tokens, do_sample=False)
            for row in rows
        ]

    answer_tokens = [
        int(out.shape[1] - prompt_inputs(processor, row)["input_ids"].shape[1])
        for row, out in zip(rows, plain_outputs)
    ]
    print(f"training {args.steps} steps, snapshots at {checkpoints}", flush=True)
    draft, taken, total, log_history = train_with_snapshots(vlm, processor, args, checkpoints)
    print(f"trained in {total:.1f} s", flush=True)

    results = []
    for step in checkpoints:
        snap = taken[step]
        model = copy.deepcopy(draft)
        model.load_state_dict(snap["state_dict"])
        model.bind(vlm).eval()
        if args.save_dir:
            model.save_pretrained(Path(args.save_dir) / f"step-{step}")
        ev = evaluate(vlm, model, processor, rows, plain_outputs, args.max_new_tokens)
        entry = {
            "step": step,
            "train_seconds": round(snap["train_seconds"], 2),
            "top1_agreement_last_log": snap["top1_agreement_last_log"],
            "eval": ev,
        }
        results.append(entry)
        summary = ", ".join(f"{k}: {v['mean_accepted_length']:.2f}" for k, v in ev.items())
        print(f"step {step:4d} ({snap['train_seconds']:.0f} s): {summary}", flush=True)

    record = {
        "command": "OMP_NUM_THREADS=1 python examples/training_curve.py "
        f"--steps {args.steps} --checkpoints {','.join(map(str, checkpoints))}",
        "target": label,
        "total_steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "num_rows": args.num_rows,
        "seed": args.seed,
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "tree_settings": TREE_SETTINGS,
        "total_train_seconds": round(total, 2),
        "answer_tokens": answer_tokens,
        "accepted_length_ceiling": {
            name: accepted_length_ceiling(answer_tokens, settings.get("tree_depth", draft.config.tree_depth))
            for name, settings in TREE_SETTINGS.items()
        },
        "lossless": True,
        "checkpoints": results,
        "train_log": [e for e in log_history if "loss" in e],
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=2))
    write_markdown(out / f"{args.name}.md", record)
    print(f"wrote {out / args.name}.json and .md")


if __name__ == "__main__":
    main()
