"""Drafts for the toy commands: a fresh draft bound to a target, online distillation for a step/time budget, and
the on-disk cache of trained drafts (keyed by target, compressor, budget and training recipe).

Shared by `specvlm demo` (`demo.py`), `specvlm train` (`train_command.py`), the bench and its assisted peer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .world import toy_cache_dir

# cached toy drafts are keyed by the training recipe they were made with (bump it when training changes what a
# draft learns), not by the library version
TRAINING_RECIPE = "0.1.0"


@dataclass
class TrainBudget:
    steps: int = 300
    seconds: float | None = None
    batch_size: int = 8
    learning_rate: float = 3e-3

    @classmethod
    def from_args(cls, args) -> TrainBudget:
        """The budget the command line's training flags give (`specvlm demo`, `specvlm train`)."""
        return cls(
            steps=args.train_steps,
            seconds=args.train_seconds,
            batch_size=args.train_batch_size,
            learning_rate=args.learning_rate,
        )


def distill_draft(
    draft,
    target,
    processor,
    dataset,
    budget: TrainBudget,
    seed: int = 0,
    progress: bool = True,
    max_length: int | None = None,
    args_overrides: dict[str, Any] | None = None,
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Train ``draft`` by online distillation from ``target`` for a step/time budget; returns final metrics.

    args_overrides: extra `TrainingArguments` (e.g. ``bf16=True``). trainer_kwargs: passed to
    `SpecVLMDistillationTrainer` (e.g. ``unroll_steps``, ``target_sharding``)."""
    from transformers import TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from ..training.collator import SpecVLMDataCollator
    from ..training.trainer import SpecVLMDistillationTrainer

    class _TimeBudget(TrainerCallback):
        def __init__(self, seconds: float | None):
            self.seconds, self.start = seconds, time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.seconds is not None and time.perf_counter() - self.start > self.seconds:
                control.should_training_stop = True
            return control

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="specvlm-train-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=budget.steps,
            per_device_train_batch_size=budget.batch_size,
            learning_rate=budget.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, budget.steps // 20),
            weight_decay=0.0,
            logging_steps=max(1, budget.steps // 5),
            save_strategy="no",
            report_to=[],
            disable_tqdm=not progress,
            seed=seed,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            remove_unused_columns=False,
            **(args_overrides or {}),
        )
        trainer = SpecVLMDistillationTrainer(
            model=draft,
            target_model=target,
            args=args,
            train_dataset=dataset,
            data_collator=SpecVLMDataCollator(processor, max_length=max_length),
            callbacks=[_TimeBudget(budget.seconds)],
            **trainer_kwargs,
        )
        start = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small models train much faster on one thread than on two contending ones
        try:
            trainer.train()
        finally:
            torch.set_num_threads(threads)
        elapsed = time.perf_counter() - start
    hf_logging.set_verbosity(verbosity)
    draft.eval()
    logs = [entry for entry in trainer.state.log_history if "top1_agreement" in entry]
    metrics: dict[str, Any] = {"train_steps": trainer.state.global_step, "train_time_s": round(elapsed, 1)}
    if logs:
        for key in ("loss", "ce", "feature", "top1_agreement", "accepted_length_estimate"):
            if key in logs[-1]:
                metrics[key] = logs[-1][key]
        for key in sorted(k for k in logs[-1] if k.startswith("top1_agreement_step")):  # unrolled training
            metrics[key] = logs[-1][key]
    return metrics


def new_draft(
    target, compressor_mode: str | None = None, num_layers: int = 1, seed: int = 0, servable: bool = False
):
    """A fresh draft bound to `target`. servable: an "eagle3" draft that vLLM serves exactly (`export.py`)."""
    from ..draft.configuration_specvlm import SpecVLMDraftConfig
    from ..draft.modeling_specvlm import SpecVLMDraftModel

    torch.manual_seed(seed)
    overrides = {}
    if servable:
        from ..sharing.export import servable_target_layers
        from ..targets import families as targets

        n_layers = targets.target_num_layers(targets.unwrap_target(target))
        overrides = {"draft_architecture": "eagle3", "target_layers": servable_target_layers(n_layers)}
    config = SpecVLMDraftConfig.from_target(
        target, compressor_mode=compressor_mode, num_hidden_layers=num_layers, **overrides
    )
    return SpecVLMDraftModel(config).bind(target)


def load_draft(path: str | os.PathLike, target):
    from ..draft.modeling_specvlm import SpecVLMDraftModel

    return SpecVLMDraftModel.from_pretrained(str(path), target=target).eval()


def draft_cache_path(
    label: str, compressor_mode: str | None, budget: TrainBudget, seed: int, cache_dir=None
) -> Path:
    name = f"{label}__{compressor_mode or 'eagle'}__s{budget.steps}-b{budget.batch_size}-seed{seed}-v{TRAINING_RECIPE}"
    return toy_cache_dir(cache_dir) / "drafts" / name


def save_draft(draft, path: Path, metrics: dict | None = None) -> None:
    """``save_pretrained`` into ``path`` atomically (a concurrent process may write the same draft)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp"))
    draft.save_pretrained(tmp)
    if metrics is not None:
        (tmp / "training_metrics.json").write_text(json.dumps(metrics, indent=2))
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    try:
        tmp.rename(path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def load_or_train_draft(
    target,
    processor,
    label: str,
    compressor_mode: str | None,
    budget: TrainBudget,
    seed: int = 0,
    cache_dir=None,
    retrain: bool = False,
    num_examples: int = 2000,
    progress: bool = True,
    log=print,
):
    """The cached draft for (target, compressor, budget), trained with the toy dataset on first use."""
    path = draft_cache_path(label, compressor_mode, budget, seed, cache_dir)
    if (path / "config.json").exists() and not retrain:
        log(f"loading cached draft {path}")
        return load_draft(path, target), path, _read_metrics(path)
    budget_text = f"{budget.steps} steps" + (f" or {budget.seconds:.0f} s" if budget.seconds else "")
    log(
        f"distilling a draft ({compressor_mode or 'EagleVLM, no compressor'}) online from the target: {budget_text}"
    )
    from .world import make_toy_dataset  # (`demo.load_rows(None, n, seed)`: the toy dataset)

    draft = new_draft(target, compressor_mode, seed=seed)
    # enough rows for the budget (each row seen about once), at most num_examples
    dataset = make_toy_dataset(max(64, min(num_examples, budget.steps * budget.batch_size)), seed)
    metrics = distill_draft(draft, target, processor, dataset, budget, seed=seed, progress=progress)
    save_draft(draft, path, metrics)
    log(f"draft trained in {metrics['train_time_s']} s, cached at {path}")
    return draft, path, metrics


def _read_metrics(path: Path) -> dict:
    file = path / "training_metrics.json"
    return json.loads(file.read_text()) if file.exists() else {}
