"""What `specvlm train` does: load the target, bind a fresh draft to it, distill the draft on the toy or given
rows, save it with its training metrics.

The training is `drafts.distill_draft`; this module resolves the command line (rows, launch: processes, target
sharding, bf16, quantization) and writes the draft (rank 0).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .demo import load_rows, load_target
from .drafts import TrainBudget, distill_draft, new_draft

# `specvlm train --servable`: an "eagle3" draft on several target layers trained with teacher forcing alone almost
# never has its second drafted token accepted; unrolled 3 steps it drafts as deep as the default draft (toy target,
# docs/training.md "Which recipe")
SERVABLE_UNROLL_STEPS = 3


def _launch_overrides(world: int, bf16: bool) -> dict[str, Any]:
    """`TrainingArguments` for how the command was launched: without CUDA, the CPU (several processes over gloo;
    else accelerate would start each process as a lone run, and bf16 would be refused); `--bf16`: bf16 autocast."""
    overrides: dict[str, Any] = {"bf16": True} if bf16 else {}
    if not torch.cuda.is_available():
        overrides["use_cpu"] = True
        if world > 1:
            overrides["ddp_backend"] = "gloo"
    return overrides


def _peak_memory_mib() -> float:
    """This process's peak memory: CUDA allocations on a GPU, else the resident set (MiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_train(args) -> int:
    torch.manual_seed(args.seed)
    sharding = getattr(args, "target_sharding", "none")
    bf16 = getattr(args, "bf16", False)
    quantization = getattr(args, "quantization", None)
    if quantization and sharding == "fsdp":
        raise SystemExit(
            "--quantization and --target-sharding fsdp cannot be combined: FSDP shards dense parameters. Shard a "
            "bf16 target across ranks, or train on one device from a quantized target."
        )
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # a sharded target stays on the CPU until the trainer shards it block by block onto each rank's device
    vlm, processor, label = load_target(
        args.target,
        args.toy_size,
        args.cache_dir,
        args.seed,
        progress=rank == 0,
        to_device=sharding != "fsdp",
        quantization=quantization,
    )
    if bf16 and not quantization:
        vlm = vlm.to(torch.bfloat16)
    servable = getattr(args, "servable", False)
    draft = new_draft(vlm, args.compressor, num_layers=args.num_layers, seed=args.seed, servable=servable)
    unroll_steps = getattr(args, "unroll_steps", None)
    if unroll_steps is None:  # the servable (multi-layer eagle3) draft needs the training-time test
        unroll_steps = SERVABLE_UNROLL_STEPS if servable else 1
    streaming, image_folder = getattr(args, "streaming", False), getattr(args, "image_folder", None)
    if args.dataset is None:
        dataset = load_rows(None, args.num_examples, args.seed)
    else:
        from ..training.rows import load_training_rows

        dataset = load_training_rows(
            args.dataset,
            split=args.dataset_split,
            image_folder=image_folder,
            streaming=streaming,
            num_examples=args.num_examples,
            seed=args.seed,
        )
    arch = f", eagle3 target_layers={draft.config.target_layers} (servable)" if servable else ""
    rows = "streamed rows" if streaming else f"{len(dataset)} rows"
    if rank == 0:
        print(
            f"training a draft for {label}: {rows}, {args.train_steps} steps, compressor={args.compressor}"
            f"{arch}, unroll_steps={unroll_steps}, {world} process(es), target_sharding={sharding}"
            f"{', bf16' if bf16 else ''}"
        )
    metrics = distill_draft(
        draft,
        vlm,
        processor,
        dataset,
        TrainBudget.from_args(args),
        seed=args.seed,
        progress=rank == 0,
        max_length=args.max_length,
        unroll_steps=unroll_steps,
        target_sharding=None if sharding == "none" else sharding,
        args_overrides=_launch_overrides(world, bf16),
    )
    metrics["unroll_steps"] = unroll_steps
    if world > 1 or sharding == "fsdp":
        from ..training.sharding import target_parameter_bytes

        held = target_parameter_bytes(vlm)
        print(
            f"rank {rank}: target parameters held {held.local / 2**20:.2f} MiB of {held.full / 2**20:.2f} MiB "
            f"(whole embedding + lm_head {held.whole / 2**20:.2f} MiB, shards {held.sharded / 2**20:.2f} MiB); "
            f"peak {_peak_memory_mib():.0f} MiB",
            flush=True,
        )
    metrics["target_quantization"] = quantization  # top1_agreement is measured against this very target
    if rank != 0:  # every rank ends with the same draft (DDP); one writes it
        return 0
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    draft.save_pretrained(out)
    (out / "training_metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"saved draft to {out}: {json.dumps(metrics)}")
    return 0
