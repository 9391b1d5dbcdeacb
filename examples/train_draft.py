# python examples/train_draft.py --output-dir runs/toy-draft --steps 300
#
# Train a SpecVLM draft for the built-in toy LLaVA (offline, CPU) by online distillation, then check that
# speculative decoding with it is lossless and report the mean accepted length.
#   - the toy target is trained and cached on first use (about a minute or two on 2 CPU cores);
#   - scale out: `accelerate launch --num_processes 2 examples/train_draft.py ...` (DDP wraps only the draft);
#   - resume after an interruption: add `--resume runs/toy-draft/checkpoint-100`.
# For a real target, replace `load_toy_target()` by `LlavaForConditionalGeneration.from_pretrained(...)` and its
# `AutoProcessor`, and the toy dataset by any dataset of rows in the vision-chat format (see docs/training.md).
from __future__ import annotations

import argparse
import time

import torch
from transformers import TrainingArguments

from specvlm_hf import SpecVLMDataCollator, SpecVLMDistillationTrainer, SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.toy.world import load_toy_target, make_toy_dataset, toy_generate_inputs, toy_prompts
from specvlm_hf.training.regenerate import load_regenerated_dataset, regenerate_dataset


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output-dir", default="runs/toy-draft")
    p.add_argument("--size", default="tiny", choices=["tiny", "medium"], help="toy target size")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--num-rows", type=int, default=2000, help="training rows (toy vision-chat dataset)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--compressor-mode", default=None, help='e.g. "select", "pool"; default: none')
    p.add_argument("--unroll-steps", type=int, default=1, help="> 1: EAGLE-3 training-time test")
    p.add_argument("--feature-noise-std", type=float, default=0.0)
    p.add_argument("--self-distill", action="store_true", help="train on the target's own greedy answers")
    p.add_argument("--eval-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--resume", default=None, help="checkpoint directory to resume from")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    vlm, processor = load_toy_target(size=args.size)
    torch.manual_seed(args.seed)
    config = SpecVLMDraftConfig.from_target(vlm, compressor_mode=args.compressor_mode)
    draft = SpecVLMDraftModel(config).bind(vlm)
    print(
        f"target: {sum(p.numel() for p in vlm.parameters()) / 1e6:.1f}M parameters; "
        f"draft: {sum(p.numel() for p in draft.parameters()) / 1e6:.2f}M trainable"
    )

    train_rows = make_toy_dataset(args.num_rows, seed=args.seed)
    if args.self_distill:
        # the target answers every training row once, before training (resumable; `specvlm regenerate` does the same)
        regenerated = f"{args.output_dir}/regenerated"
        regenerate_dataset(vlm, processor, train_rows, regenerated, max_new_tokens=128)
        train_rows = load_regenerated_dataset(regenerated)
    collator = SpecVLMDataCollator(processor, max_length=512)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=min(20, args.steps // 10),
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        max_grad_norm=0.5,
        logging_steps=10,
        save_steps=100,
        save_total_limit=2,
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = SpecVLMDistillationTrainer(
        model=draft,
        target_model=vlm,
        args=training_args,
        train_dataset=train_rows,
        eval_dataset=make_toy_dataset(32, seed=args.seed, split="eval"),
        data_collator=collator,
        feature_noise_std=args.feature_noise_std,
        unroll_steps=args.unroll_steps,
    )
    trainer.train(resume_from_checkpoint=args.resume)
    print(trainer.evaluate())
    if not trainer.is_world_process_zero():
        return
    trainer.save_model(f"{args.output_dir}/draft")  # the draft alone: weights + config
    print(f"saved the draft to {args.output_dir}/draft")

    # speculative decoding with the trained draft: identical greedy output, fewer target forwards
    draft.eval()
    identical, accepted, plain_s, spec_s = 0, [], 0.0, 0.0
    for row in toy_prompts(args.eval_prompts, seed=args.seed):
        inputs = {k: v.to(vlm.device) for k, v in toy_generate_inputs(processor, row).items()}
        start = time.perf_counter()
        plain = vlm.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        plain_s += time.perf_counter() - start
        start = time.perf_counter()
        spec = vlm.generate(
            **inputs, assistant_model=draft, max_new_tokens=args.max_new_tokens, do_sample=False
        )
        spec_s += time.perf_counter() - start
        identical += int(torch.equal(plain, spec))
        accepted.append(draft.last_generation_stats.mean_accepted_length)
    n = args.eval_prompts
    print(
        f"greedy outputs identical: {identical}/{n} | mean accepted length {sum(accepted) / n:.2f} | "
        f"time plain {plain_s:.2f}s, speculative {spec_s:.2f}s"
    )


if __name__ == "__main__":
    main()
