"""What `specvlm demo` and `specvlm train` do: load a target, distill (or load) a draft, compare decoding.

The helpers here (`load_target`, `distill_draft`, `load_or_train_draft`, `prompt_inputs`) are shared with
`bench.py`. Everything runs offline with the built-in toy target; `--target` / `--draft` take Hub ids or paths.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

QUICK_STEPS = 40
QUICK_PROMPTS = 2
QUICK_TOKENS = 24


# ---------------------------------------------------------------------------------------------- targets


# cached toy drafts are keyed by the training recipe they were made with (bump it when training changes what a
# draft learns), not by the library version
TRAINING_RECIPE = "0.1.0"
# `specvlm train --servable`: an "eagle3" draft on several target layers trained with teacher forcing alone almost
# never has its second drafted token accepted; unrolled 3 steps it drafts as deep as the default draft (toy target,
# docs/training.md "Which recipe")
SERVABLE_UNROLL_STEPS = 3


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$SPECVLM_HF_CACHE``, else ``~/.cache/specvlm_hf`` (as the toy target uses)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("SPECVLM_HF_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "specvlm_hf"


def load_target(
    target: str | None = None,
    toy_size: str = "tiny",
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    to_device: bool = True,
    quantization: str | None = None,
):
    """``(model, processor, label)``: the toy target (``target=None``) or a Hub id / local path; loaded quantized
    with scheme `quantization` (`specvlm_hf.targets.loading.QUANTIZATION_CHOICES`) when given.

    to_device: move a Hub / local target to CUDA when there is one (False: leave it on the CPU, e.g. for the
    trainer to shard it block by block)."""
    from ..targets.loading import quantization_config, reload_quantized

    suffix = f"-{quantization}" if quantization else ""
    if target is None:
        from .world import load_toy_target

        model, processor = load_toy_target(toy_size, cache_dir=cache_dir, seed=seed, progress=progress)
        if quantization:
            model = reload_quantized(model, quantization)
        return model.eval(), processor, f"toy-llava-{toy_size}-seed{seed}{suffix}"
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    kwargs = {}
    if quantization:  # (bitsandbytes places a quantized model itself: device_map, never .to())
        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        kwargs["quantization_config"] = quantization_config(quantization, compute_dtype=compute)
        kwargs["device_map"] = "auto" if torch.cuda.is_available() else None
    try:
        model = AutoModelForImageTextToText.from_pretrained(target, dtype="auto", **kwargs)
    except ValueError:  # a plain causal LM
        model = AutoModelForCausalLM.from_pretrained(target, dtype="auto", **kwargs)
    processor = AutoProcessor.from_pretrained(target)
    if to_device and torch.cuda.is_available() and not quantization:
        model = model.to("cuda")
    model.eval().requires_grad_(False)
    return model, processor, target.rstrip("/").replace("/", "--") + suffix


def prompt_inputs(processor, row: dict, device: torch.device | str = "cpu") -> dict:
    """Tensors for ``vlm.generate(**inputs)`` from a vision-chat row (its first user turn and image)."""
    from .world import toy_generate_inputs

    inputs = toy_generate_inputs(processor, row)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}


def row_question(row: dict) -> str:
    for message in row["messages"]:
        if message["role"] == "user":
            content = message["content"]
            if isinstance(content, str):
                return content
            return " ".join(item.get("text", "") for item in content if item.get("type") == "text")
    return ""


def load_rows(
    dataset: str | None,
    n: int,
    seed: int = 0,
    split: str = "train",
    eval_rows: bool = False,
    stratified: bool = True,
):
    """Vision-chat rows: the toy dataset, or a Hub dataset / local folder / .json(l) file / `specvlm regenerate`
    output folder.

    stratified: toy evaluation rows follow the task weights exactly (`world.toy_prompts`)."""
    if dataset is None:
        if eval_rows:
            from .world import toy_prompts

            return toy_prompts(n, seed, stratified=stratified)
        from .world import make_toy_dataset

        return make_toy_dataset(n, seed)
    import datasets

    from ..training.regenerate import PROVENANCE_FILE, load_regenerated_dataset

    if (Path(dataset) / PROVENANCE_FILE).exists():  # `specvlm regenerate`'s output folder
        ds = load_regenerated_dataset(dataset)
    elif dataset.endswith((".json", ".jsonl")):
        ds = datasets.load_dataset("json", data_files=dataset, split="train")
    elif Path(dataset).is_dir() and (Path(dataset) / "dataset_info.json").exists():
        ds = datasets.load_from_disk(dataset)
    else:
        ds = datasets.load_dataset(dataset, split=split)
    if n is not None and len(ds) > n:
        ds = ds.shuffle(seed=seed).select(range(n))
    return [ds[i] for i in range(len(ds))] if eval_rows else ds


# ---------------------------------------------------------------------------------------------- drafts


@dataclass
class TrainBudget:
    steps: int = 300
    seconds: float | None = None
    batch_size: int = 8
    learning_rate: float = 3e-3


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
    return cache_root(cache_dir) / "drafts" / name


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
    draft = new_draft(target, compressor_mode, seed=seed)
    # enough rows for the budget (each row seen about once), at most num_examples
    dataset = load_rows(None, max(64, min(num_examples, budget.steps * budget.batch_size)), seed)
    metrics = distill_draft(draft, target, processor, dataset, budget, seed=seed, progress=progress)
    save_draft(draft, path, metrics)
    log(f"draft trained in {metrics['train_time_s']} s, cached at {path}")
    return draft, path, metrics


def _read_metrics(path: Path) -> dict:
    file = path / "training_metrics.json"
    return json.loads(file.read_text()) if file.exists() else {}


# ---------------------------------------------------------------------------------------------- compare


@dataclass
class Comparison:
    question: str
    plain_text: str
    spec_text: str
    plain_tokens: int
    spec_tokens: int
    plain_time_s: float
    spec_time_s: float
    identical: bool  # greedy outputs token-identical in the float32 comparison (the demo's verdict)
    mean_accepted_length: float
    target_forwards: int
    timing_dtype: str = "float32"
    timing_identical: bool = True  # the timed (e.g. bfloat16) run's outputs were identical too
    # where a timed low-precision run differed while float32 is identical: `greedy_check.first_divergence` there
    timing_divergence: dict | None = None

    @property
    def tie(self) -> dict | None:
        """The timed run's numerical tie, when that is why it differed (float32 outputs identical)."""
        info = self.timing_divergence
        return info if info is not None and info.get("tie") else None


def _greedy_pair(vlm, draft, inputs: dict, max_new_tokens: int, spec_kwargs: dict):
    """(plain new tokens, speculative new tokens, plain seconds, speculative seconds)."""
    prompt_len = inputs["input_ids"].shape[1]
    common = {"max_new_tokens": max_new_tokens, "do_sample": False}
    with torch.inference_mode():
        t0 = time.perf_counter()
        plain = vlm.generate(**inputs, **common)
        t1 = time.perf_counter()
        spec = vlm.generate(**inputs, **common, assistant_model=draft, **spec_kwargs)
        t2 = time.perf_counter()
    return plain[0, prompt_len:], spec[0, prompt_len:], t1 - t0, t2 - t1


def compare_one(
    vlm, draft, processor, inputs: dict, max_new_tokens: int, check=None, **spec_kwargs
) -> Comparison:
    """Greedy plain generate vs speculative generate on one prompt: texts, times, identical tokens.

    ``vlm`` / ``draft`` are timed. ``check``: a float32 ``(vlm, draft)`` pair the outputs are compared on (None:
    the timed pair is float32 itself, or is compared as it is). Float32 outputs must be identical; a timed
    low-precision run may differ from a numerical tie on, which is reported (``timing_divergence``) only when the
    float32 outputs are identical.
    """
    plain_new, spec_new, plain_s, spec_s = _greedy_pair(vlm, draft, inputs, max_new_tokens, spec_kwargs)
    stats = draft.last_generation_stats
    timing_identical = plain_new.tolist() == spec_new.tolist()
    plain_ref, spec_ref = plain_new, spec_new
    if check is not None:
        plain_ref, spec_ref, _, _ = _greedy_pair(*check, inputs, max_new_tokens, spec_kwargs)
    identical = plain_ref.tolist() == spec_ref.tolist()
    divergence = None
    if identical and not timing_identical:
        from .greedy_check import first_divergence

        with torch.inference_mode():
            divergence = first_divergence(vlm, inputs, plain_new.tolist(), spec_new.tolist())
    tokenizer = getattr(processor, "tokenizer", processor)
    return Comparison(
        question="",
        plain_text=tokenizer.decode(plain_ref, skip_special_tokens=True).strip(),
        spec_text=tokenizer.decode(spec_ref, skip_special_tokens=True).strip(),
        plain_tokens=int(plain_new.numel()),
        spec_tokens=int(spec_new.numel()),
        plain_time_s=plain_s,
        spec_time_s=spec_s,
        identical=identical,
        mean_accepted_length=stats.mean_accepted_length if stats is not None else float("nan"),
        target_forwards=stats.target_forwards if stats is not None else 0,
        timing_dtype=str(next(vlm.parameters()).dtype).removeprefix("torch."),
        timing_identical=timing_identical,
        timing_divergence=divergence,
    )


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def print_comparison(i: int, n: int, c: Comparison, width: int = 100) -> None:
    plain_tps = c.plain_tokens / c.plain_time_s if c.plain_time_s else 0.0
    spec_tps = c.spec_tokens / c.spec_time_s if c.spec_time_s else 0.0
    print(f"\n[{i}/{n}] Q: {_short(c.question, width)}")
    print(f"  plain   | {c.plain_tokens:3d} tok {plain_tps:7.1f} tok/s | {_short(c.plain_text, width - 30)}")
    print(f"  specvlm | {c.spec_tokens:3d} tok {spec_tps:7.1f} tok/s | {_short(c.spec_text, width - 30)}")
    speedup = c.plain_time_s / c.spec_time_s if c.spec_time_s else 0.0
    print(
        f"  identical: {'yes' if c.identical else 'no'} | mean accepted length {c.mean_accepted_length:.2f} "
        f"| target forwards {c.target_forwards} | speedup {speedup:.2f}x"
    )
    info = c.timing_divergence
    if info is not None:  # float32 identical, the timed low-precision run not
        from .greedy_check import describe_divergence

        if info.get("tie"):
            why = (
                f"a numerical tie, which {c.timing_dtype} forwards over 1 and several tokens break differently: "
                f"{describe_divergence(info)}"
            )
        else:
            why = f"{c.timing_dtype} rounding from new token {info['position']} on"
        print(f"  (the {c.timing_dtype} timing run differs: {why}; the float32 outputs are identical)")


def demo_ok(results: list[Comparison]) -> bool:
    """Every output identical to plain's in the float32 comparison."""
    return all(c.identical for c in results)


def print_summary(results: list[Comparison]) -> None:
    plain_tokens = sum(c.plain_tokens for c in results)
    spec_tokens = sum(c.spec_tokens for c in results)
    plain_time = sum(c.plain_time_s for c in results)
    spec_time = sum(c.spec_time_s for c in results)
    accepted = [c.mean_accepted_length for c in results]
    all_identical = all(c.identical for c in results)
    print("\n" + "=" * 72)
    print(f"{'':22s}{'plain generate':>18s}{'speculative (SpecVLM)':>26s}")
    print(f"{'new tokens':22s}{plain_tokens:>18d}{spec_tokens:>26d}")
    print(f"{'time (s)':22s}{plain_time:>18.2f}{spec_time:>26.2f}")
    print(
        f"{'tokens/s':22s}{plain_tokens / max(plain_time, 1e-9):>18.1f}"
        f"{spec_tokens / max(spec_time, 1e-9):>26.1f}"
    )
    print(f"{'mean accepted length':22s}{'1.00':>18s}{sum(accepted) / max(len(accepted), 1):>26.2f}")
    differ = sum(not c.timing_identical for c in results if c.identical)
    timed = results[0].timing_dtype if results else "float32"
    note = f"; {differ} {timed} timing run(s) differ from a numerical tie or rounding on" if differ else ""
    verdict = "yes" if all_identical else "NO"
    print(
        f"identical outputs: {verdict} ({sum(c.identical for c in results)}/{len(results)} in float32{note})"
    )
    print(f"speedup: {plain_time / max(spec_time, 1e-9):.2f}x (end to end, greedy, batch 1)")
    print("=" * 72)


# ---------------------------------------------------------------------------------------------- commands


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


def _budget(args) -> TrainBudget:
    return TrainBudget(
        steps=args.train_steps,
        seconds=args.train_seconds,
        batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
    )


def run_demo(args) -> int:
    if args.quick:
        args.train_steps = min(args.train_steps, QUICK_STEPS)
        args.prompts = min(args.prompts, QUICK_PROMPTS)
        args.max_new_tokens = min(args.max_new_tokens, QUICK_TOKENS)
    device = pick_device(getattr(args, "device", None))
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    what = args.target or f"the built-in toy LLaVA target ({args.toy_size})"
    print(f"specvlm demo: target = {what}; cache = {cache_root(args.cache_dir)}")
    vlm, processor, label = load_target(args.target, args.toy_size, args.cache_dir, args.seed)
    print(
        f"target ready ({time.perf_counter() - start:.1f} s): {type(vlm).__name__}, "
        f"{sum(p.numel() for p in vlm.parameters()) / 1e6:.1f}M parameters"
    )
    if args.draft is not None:
        draft = load_draft(args.draft, vlm)
        print(f"loaded draft {args.draft}")
    else:
        draft, _, metrics = load_or_train_draft(
            vlm,
            processor,
            label,
            args.compressor,
            _budget(args),
            seed=args.seed,
            cache_dir=args.cache_dir,
            retrain=args.retrain,
        )
        if metrics.get("top1_agreement") is not None:
            print(
                f"draft top-1 agreement with the target (training batches): {metrics['top1_agreement']:.2f}"
            )
    print(
        f"draft ready ({time.perf_counter() - start:.1f} s): "
        f"{sum(p.numel() for p in draft.parameters()) / 1e6:.1f}M parameters, "
        f"compressor={draft.config.compressor_mode}, decoding={args.decoding_mode}"
    )

    tiny_vlm, tiny_draft = vlm, draft
    widened = False
    if args.target is None and args.toy_size == "tiny" and getattr(args, "time_on", "tiny") == "medium":
        vlm, draft = _widen_for_timing(vlm, draft, timing_dtype(getattr(args, "dtype", "auto")))
        widened = vlm is not tiny_vlm
    check = None  # the float32 pair outputs are compared on (None: the timed pair is float32)
    if next(vlm.parameters()).dtype != torch.float32:
        if widened:
            big = widen_for_timing(tiny_vlm, torch.float32)
            check = (big, widen_draft_for_timing(tiny_draft, big))
        else:
            check = float32_copy(vlm, draft)
        print(
            "greedy outputs are compared in float32 (a float32 copy of the target and draft); timed as loaded"
        )
    spec_kwargs = {"decoding_mode": args.decoding_mode}
    if args.decoding_mode == "tree":  # only what was given: unset, the draft's own (automatic) budget applies
        tree = dict(
            tree_top_k=args.tree_top_k, tree_depth=args.tree_depth, tree_total_tokens=args.tree_total_tokens
        )
        spec_kwargs.update({k: v for k, v in tree.items() if v is not None})

    rows = load_rows(None, args.prompts, args.seed, eval_rows=True)
    for model in (vlm, draft, *(check or ())):  # (in place: a draft keeps sharing its target's modules)
        model.to(device)
    print(f"device: {device}")
    # warm-up (first-call allocations), not timed
    warm = prompt_inputs(processor, rows[0], device)
    with torch.inference_mode():
        vlm.generate(**warm, max_new_tokens=4, do_sample=False)
        vlm.generate(**warm, max_new_tokens=4, do_sample=False, assistant_model=draft, **spec_kwargs)
    results = []
    for i, row in enumerate(rows, start=1):
        inputs = prompt_inputs(processor, row, device)
        c = compare_one(vlm, draft, processor, inputs, args.max_new_tokens, check=check, **spec_kwargs)
        c.question = row_question(row)
        results.append(c)
        print_comparison(i, len(rows), c)
    print_summary(results)
    print(f"total demo time: {time.perf_counter() - start:.1f} s")
    if not demo_ok(results):
        print("ERROR: speculative decoding changed the greedy output (float32 comparison).", file=sys.stderr)
        return 1
    return 0


def unrouted_copy(model):
    """``copy.deepcopy(model)`` without the generate routing a bound draft installed on the original.

    The routing lives in instance attributes overriding class methods, whose closures hold the original model
    (`hf_private.install_routing`); a deep copy keeps them, so the copy's ``generate`` would decode with the
    original. Binding a draft to the copy installs its own."""
    import copy

    twin = copy.deepcopy(model)
    for name, value in list(vars(twin).items()):
        if callable(value) and not isinstance(value, torch.nn.Module) and hasattr(type(twin), name):
            del twin.__dict__[name]  # an instance override of a class method: the routing
    twin.__dict__.pop("_specvlm_routing_installed", None)
    return twin


def float32_copy(vlm, draft):
    """A float32 copy of a target and its draft, the draft bound to the copy (the originals are untouched)."""
    target = unrouted_copy(vlm).float().eval()
    twin = type(draft)(draft.config)
    twin.load_state_dict(draft.state_dict())
    return target, twin.float().eval().bind(target)


def timing_dtype(choice: str = "auto") -> torch.dtype:
    """The dtype the medium toy target (and its draft) is timed in.

    "auto": bfloat16 -- the dtype public VLMs ship and are served in -- where this machine multiplies it natively
    (a GPU, or a CPU with AVX512-BF16 / AMX), float32 elsewhere (emulated bf16 matmuls are slower than fp32).
    """
    if choice == "auto":
        native = torch.cuda.is_available() or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        return torch.bfloat16 if native else torch.float32
    if choice not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype {choice!r}: choose 'auto', 'float32', 'bfloat16' or 'float16'")
    return getattr(torch, choice)


def pick_device(choice: str | None = None) -> torch.device:
    """``--device``: "cpu", "cuda", or None (cuda where a GPU is available, cpu otherwise). Raises before any work
    when cuda is asked for and torch sees no GPU."""
    if choice is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False; a CPU-only torch "
            "build, or no driver). Install a CUDA build of torch, or pass --device cpu."
        )
    if choice not in ("cpu", "cuda"):
        raise ValueError(f"--device {choice!r}: choose 'cpu' or 'cuda'")
    return torch.device(choice)


# LLaVA-1.5-7B's decoder shape (`--toy-size llava7b`): the tiny toy target widened exactly to it, so acceptance stays
# the toy pair's while every target forward costs what a 7B's does
LLAVA7B_DIMS = {"hidden": 4096, "intermediate": 11008, "heads": 32, "layers": 32}


def widen_for_timing(tiny_target, dtype: torch.dtype, dims: dict | None = None, device=None):
    """The medium toy target (or `dims`' shape): the tiny one widened exactly (`widen.widen_toy_target`), cast to
    `dtype`; built directly on `device` when given (a 7B-shaped target is built in seconds on a GPU)."""
    from .world import widen_toy_target

    if device is None or torch.device(device).type == "cpu":
        return widen_toy_target(tiny_target, "medium", dims).to(dtype).eval()
    source = unrouted_copy(tiny_target).to(device)
    with torch.device(device):
        big = widen_toy_target(source, "medium", dims)
    return big.to(dtype).eval()


def widen_draft_for_timing(tiny_draft, medium_target):
    """A draft of the tiny target widened exactly for `widen_for_timing`'s target, in its dtype, bound to it.

    Raises ValueError for a draft that does not widen exactly (the resampler)."""
    from .world import widen_draft

    dtype = next(medium_target.parameters()).dtype
    return widen_draft(tiny_draft, medium_target).to(dtype).bind(medium_target)


def _widen_for_timing(vlm, draft, dtype: torch.dtype):
    big = widen_for_timing(vlm, dtype)
    try:
        wide = widen_draft_for_timing(draft, big)
    except ValueError as err:  # e.g. a resampler draft does not widen exactly
        print(f"timing on the tiny target ({err})")
        return vlm, draft
    print(
        f"timing on the medium toy target ({str(dtype).removeprefix('torch.')}): the tiny target and draft widened "
        f"exactly, {sum(p.numel() for p in big.parameters()) / 1e6:.0f}M target / "
        f"{sum(p.numel() for p in wide.parameters()) / 1e6:.1f}M draft parameters"
    )
    return big, wide


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
        _budget(args),
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
