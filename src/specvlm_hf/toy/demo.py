"""What `specvlm demo` does: load a target, distill (or load) a draft, compare plain and speculative decoding.

The helpers here (`load_target`, `load_rows`, `prompt_inputs`, the timing set-up such as `widen_for_timing`) are
shared with `bench.py`, `train_command.py` and `regenerate_command.py`; drafts come from `drafts.py`. Everything
runs offline with the built-in toy target; `--target` / `--draft` take Hub ids or paths.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .drafts import TrainBudget, load_draft, load_or_train_draft
from .world import toy_cache_dir

QUICK_STEPS = 40
QUICK_PROMPTS = 2
QUICK_TOKENS = 24


# ---------------------------------------------------------------------------------------------- targets


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


def run_demo(args) -> int:
    if args.quick:
        args.train_steps = min(args.train_steps, QUICK_STEPS)
        args.prompts = min(args.prompts, QUICK_PROMPTS)
        args.max_new_tokens = min(args.max_new_tokens, QUICK_TOKENS)
    device = pick_device(getattr(args, "device", None))
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    what = args.target or f"the built-in toy LLaVA target ({args.toy_size})"
    print(f"specvlm demo: target = {what}; cache = {toy_cache_dir(args.cache_dir)}")
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
            TrainBudget.from_args(args),
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
