"""The ``specvlm`` command: ``demo``, ``train``, ``regenerate``, ``bench``, ``push``.

Every subcommand imports its heavy dependencies (torch, transformers) only when it runs, so
``specvlm --help`` is instant.
"""

from __future__ import annotations

import argparse
import sys

COMPRESSOR_CHOICES = (
    "none",
    "select",
    "weighted",
    "concat",
    "prune",
    "pool",
    "conv",
    "resampler",
    "text_only",
)
# `--quantization` names (specvlm_hf.targets.loading.QUANTIZATION_CHOICES; kept here so that --help imports no torch)
QUANTIZATION_CHOICES = ("bnb-8bit", "bnb-nf4", "torchao-int8", "quanto-int8")


def _compressor(value: str) -> str | None:
    if value not in COMPRESSOR_CHOICES:
        raise argparse.ArgumentTypeError(
            f"invalid compressor mode {value!r}; choose from {COMPRESSOR_CHOICES}"
        )
    return None if value == "none" else value


def _add_target_args(p: argparse.ArgumentParser, default_size: str) -> None:
    p.add_argument(
        "--target",
        default=None,
        help="target VLM: a Hub id or local path (needs network for Hub ids). Default: the built-in toy target.",
    )
    p.add_argument(
        "--toy-size",
        default=default_size,
        choices=("tiny", "medium", "llava7b"),
        help=f"size of the built-in toy target when --target is not given (default: {default_size}; bench: llava7b "
        "is the tiny target widened exactly to LLaVA-1.5-7B's decoder shape, for GPUs).",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where toy targets and drafts are cached (default: $SPECVLM_HF_CACHE or ~/.cache/specvlm_hf).",
    )
    p.add_argument(
        "--quantization",
        default=None,
        choices=QUANTIZATION_CHOICES,
        help="load the target quantized, as from_pretrained(quantization_config=...) does (the draft stays in the "
        "compute dtype): bitsandbytes 8-bit / nf4, torchao int8 weight-only, quanto int8 "
        "(specvlm_hf.targets.loading). Needs the library: pip install 'specvlm_hf[quant]'.",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0).")


def _add_train_budget_args(p: argparse.ArgumentParser, steps: int, batch_flag: str = "--batch-size") -> None:
    p.add_argument(
        "--train-steps", type=int, default=steps, help=f"draft distillation steps (default: {steps})."
    )
    p.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="stop draft training after this many seconds, whatever --train-steps says.",
    )
    p.add_argument(
        batch_flag, dest="train_batch_size", type=int, default=8, help="training batch size (default: 8)."
    )
    p.add_argument("--learning-rate", type=float, default=3e-3, help="learning rate (default: 3e-3).")


def _int_list(value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers (e.g. 1,4,8), got {value!r}"
        )
    return sizes


def _add_tree_args(p: argparse.ArgumentParser) -> None:
    # default: what `generate` does without a budget (the automatic one, learned from the steps it runs); a value
    # fixes that part of the tree, as the same generate kwarg does
    auto = "default: automatic, chosen per step from measured costs"
    p.add_argument("--tree-top-k", type=int, default=None, help=f"tree top-k ({auto}).")
    p.add_argument("--tree-depth", type=int, default=None, help=f"tree depth ({auto}).")
    p.add_argument("--tree-total-tokens", type=int, default=None, help=f"tree size ({auto}).")


def _add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype the medium toy target is timed in (default: auto = bfloat16 where this machine multiplies "
        "it natively, as VLMs are shipped and served; float32 elsewhere).",
    )


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="where the target and drafts run (default: cuda when a GPU is available, cpu otherwise).",
    )


def _dtype_list(value: str) -> str:
    names = [name.strip() for name in value.split(",") if name.strip()]
    bad = [name for name in names if name not in DTYPE_CHOICES]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"invalid dtype list {value!r}; comma-separated names from {DTYPE_CHOICES}"
        )
    return ",".join(names)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specvlm",
        description="Lossless speculative decoding for vision-language models (SpecVLM / EAGLE-2) in transformers.",
    )
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"specvlm_hf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,train,regenerate,bench,push}")

    # ------------------------------------------------------------------ demo
    demo = sub.add_parser(
        "demo",
        help="offline demo: toy VLM, distilled draft, plain vs speculative generation side by side",
        description=(
            "Offline demo. Trains (first run) or loads (cached) the built-in toy LLaVA target, distills a SpecVLM "
            "draft for it, then generates for a few image prompts with plain greedy generate and with speculative "
            "decoding, printing both side by side. Exits with status 1 if any output differs."
        ),
    )
    _add_target_args(demo, "tiny")
    demo.add_argument(
        "--draft", default=None, help="a trained draft (Hub id or local path) instead of training one."
    )
    _add_train_budget_args(demo, 1200)
    demo.add_argument(
        "--compressor", type=_compressor, default="none", help="compressor mode of a newly trained draft."
    )
    demo.add_argument("--prompts", type=int, default=4, help="number of image prompts (default: 4).")
    demo.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer (default: 64).")
    demo.add_argument("--decoding-mode", choices=("tree", "chain"), default="tree")
    demo.add_argument(
        "--time-on",
        choices=("medium", "tiny"),
        default="medium",
        help="toy target the comparison is timed on (default: medium, the tiny target and its draft widened "
        "exactly to ~157M parameters: same outputs, the per-token cost of a real small model).",
    )
    _add_tree_args(demo)
    _add_dtype_arg(demo)
    _add_device_arg(demo)
    demo.add_argument(
        "--quick",
        "--smoke",
        action="store_true",
        help="CI smoke test: tiny training budget, 2 prompts, 24 tokens; still checks identical outputs.",
    )
    demo.add_argument("--retrain", action="store_true", help="ignore a cached draft and train again.")
    demo.set_defaults(func=_run_demo)

    # ----------------------------------------------------------------- train
    train = sub.add_parser(
        "train",
        help="distill a SpecVLM draft for a target and save it",
        description=(
            "Train a SpecVLM draft by online logit distillation from a frozen target and save it with "
            "save_pretrained. Default data: the toy vision-chat dataset; --dataset takes a Hub dataset or a "
            "local datasets folder/JSON file with rows {'images': [...], 'messages': [...]}."
        ),
    )
    _add_target_args(train, "tiny")
    train.add_argument("--output-dir", required=True, help="where the trained draft is saved.")
    train.add_argument(
        "--dataset", default=None, help="training rows (Hub id, local folder or .json/.jsonl file)."
    )
    train.add_argument("--dataset-split", default="train")
    train.add_argument(
        "--num-examples", type=int, default=2000, help="toy rows / cap on dataset rows (default: 2000)."
    )
    _add_train_budget_args(train, 500)
    train.add_argument("--compressor", type=_compressor, default="none", help="compressor mode of the draft.")
    train.add_argument("--num-layers", type=int, default=1, help="draft decoder layers (default: 1).")
    train.add_argument("--max-length", type=int, default=None, help="truncate training sequences.")
    train.add_argument(
        "--servable",
        action="store_true",
        help="train a draft that vLLM serves exactly: draft_architecture='eagle3' with target layers below the "
        "target's layer count (export.servable_target_layers); export it with "
        "`export_draft(draft, dir, format='speculators')` (docs/serving.md). Trained with --unroll-steps 3 "
        "unless told otherwise.",
    )
    train.add_argument(
        "--unroll-steps",
        type=int,
        default=None,
        help="EAGLE-3 training-time test: step j of the loss feeds the draft its own step j-1 outputs (default: 3 "
        "with --servable, whose multi-layer draft otherwise learns only its first drafted token; 1 = teacher "
        "forcing otherwise, the default draft's best recipe on the toy target, docs/training.md).",
    )
    train.add_argument(
        "--image-folder",
        default=None,
        help="folder the dataset's image paths start from (LLaVA's --image_folder; default: the data file's "
        "folder). LLaVA/ShareGPT rows ({'image': path, 'conversations': [{'from': 'human', 'value': "
        "'<image>\\n...'}, ...]}) are read as they are.",
    )
    train.add_argument(
        "--streaming",
        action="store_true",
        help="stream --dataset (rows are read as training goes, never all in memory); under several processes "
        "each rank reads its own part (its own files when there are at least as many files as ranks).",
    )
    train.add_argument(
        "--target-sharding",
        choices=("none", "fsdp"),
        default="none",
        help="fsdp: shard the frozen target's parameters across the ranks with FSDP2 (run under `torchrun "
        "--nproc_per_node N --no-python specvlm train ...`); the embedding and lm_head the draft shares stay "
        "whole on every rank. Default none: every rank holds the whole target.",
    )
    train.add_argument(
        "--bf16",
        action="store_true",
        help="mixed precision as on GPUs: the target in bfloat16, the draft's master weights float32 with its "
        "forward under bfloat16 autocast.",
    )
    train.set_defaults(func=_run_train)

    # ------------------------------------------------------------ regenerate
    regen = sub.add_parser(
        "regenerate",
        help="replace every assistant turn of a dataset by the target's own answer (self-distillation data)",
        description=(
            "Answer every assistant turn of a vision-chat dataset with the target itself (multi-turn rows turn by "
            "turn, each turn conditioned on the regenerated history), in left-padded batches, with lossless "
            "speculative decoding when --draft is given. Writes a dataset folder that `specvlm train --dataset DIR` "
            "reads, with its provenance in DIR/regeneration.json. Resumable: rerun the same command after an "
            "interruption and it continues where it stopped."
        ),
    )
    _add_target_args(regen, "tiny")
    regen.add_argument("--output-dir", required=True, help="the regenerated dataset's folder.")
    regen.add_argument(
        "--dataset",
        default=None,
        help="source rows (Hub id, local folder or .json/.jsonl file). Default: the toy dataset.",
    )
    regen.add_argument("--dataset-split", default="train")
    regen.add_argument(
        "--num-examples", type=int, default=2000, help="toy rows / cap on dataset rows (default: 2000)."
    )
    regen.add_argument(
        "--draft",
        default=None,
        help="a SpecVLM draft of the target (local path or Hub id): speculative decoding, same greedy answers.",
    )
    regen.add_argument("--batch-size", type=int, default=8, help="conversations per batch (default: 8).")
    regen.add_argument("--max-new-tokens", type=int, default=128, help="longest answer (default: 128).")
    regen.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample at this temperature."
    )
    regen.add_argument(
        "--samples-per-prompt",
        type=int,
        default=1,
        help="sampled answers per source row (needs --temperature > 0; default: 1).",
    )
    regen.add_argument(
        "--shard-size",
        type=int,
        default=256,
        help="rows per output shard: at most this much work is redone after a kill (default: 256).",
    )
    regen.set_defaults(func=_run_regenerate)

    # ----------------------------------------------------------------- bench
    bench = sub.add_parser(
        "bench",
        help="benchmark plain, assisted, prompt-lookup, EagleVLM and SpecVLM decoding side by side",
        description=(
            "Benchmark decoding methods on the same prompts in one process: plain generate, transformers' "
            "assisted generation with a small independent draft, prompt-lookup decoding, EagleVLM (no compressor) "
            "and SpecVLM drafts in chain and tree mode, greedy and sampling. Without arguments it runs the medium "
            "toy target with a distilled draft (trained and cached on first use)."
        ),
    )
    _add_target_args(bench, "medium")
    _add_device_arg(bench)
    bench.add_argument(
        "--draft",
        action="append",
        default=None,
        help="SpecVLM/EagleVLM draft (Hub id or local path); repeat for several. Default: toy drafts.",
    )
    bench.add_argument(
        "--assistant",
        default=None,
        help="independent small draft model for transformers' assisted generation (Hub id or path).",
    )
    bench.add_argument("--prompts", type=int, default=8, help="number of prompts (default: 8).")
    bench.add_argument("--max-new-tokens", type=int, default=64)
    bench.add_argument(
        "--temperatures",
        default="0,1",
        help="comma-separated temperatures; 0 is greedy (default: 0,1).",
    )
    bench.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of: plain,assisted,assisted_peer,prompt_lookup,eagle_chain,eagle_tree,"
        "specvlm_chain,specvlm_tree (a method's --sweep budgets come with it)",
    )
    bench.add_argument(
        "--output-dir", default=None, help="write results.json, results.md and results.png here."
    )
    bench.add_argument(
        "--dataset", default=None, help="prompt rows (Hub id, local folder or .json/.jsonl file)."
    )
    bench.add_argument(
        "--prompt-mix",
        choices=("stratified", "random"),
        default="stratified",
        help="toy prompts: tasks in exact proportion to the toy world's task weights (default), or independent "
        "random draws (a small draw can be far from the weights).",
    )
    bench.add_argument("--warmup", type=int, default=1, help="untimed warm-up generations per method.")
    bench.add_argument(
        "--first-call-prompts",
        type=int,
        default=4,
        help="before any warm-up, time each method's first call (what it learned forgotten) against plain's on "
        "this many prompts (fixed budgets: the first only); 0: skip.",
    )
    bench.add_argument(
        "--tune",
        action="store_true",
        help="measure verify cost vs tree size, pick the tree budget with the best estimated tokens/s, save it in the draft config.",
    )
    bench.add_argument(
        "--sweep",
        action="store_true",
        help="also run every draft at fixed budgets, interleaved with the default-settings methods: chain lengths "
        "2,3,4,6,8 x confidence cut-offs 0,0.4 and trees (total/depth/top-k) 6/4/2, 8/5/2, 12/6/2, 16/8/2; prints "
        "each default mode's speedup / the best fixed budget's and the better default / assisted_peer.",
    )
    _add_train_budget_args(bench, 4000, batch_flag="--train-batch-size")
    bench.add_argument(
        "--batch-size",
        type=_int_list,
        default=None,
        help="comma-separated batch sizes (e.g. 1,4,8): instead of the per-method table, the throughput of plain "
        "batched generate vs SpecVLM tree and chain decoding on the same left-padded batches (new tokens/s over "
        "the whole batch), per batch size.",
    )
    bench.add_argument(
        "--dtype",
        type=_dtype_list,
        default=None,
        help="comma-separated dtypes to time in, each a full set of records with its own plain reference (auto, "
        "float32, bfloat16). Default: bfloat16,float32 for the medium toy target; the target as loaded otherwise.",
    )
    bench.add_argument(
        "--tree-top-k",
        type=int,
        default=None,
        help="tree top-k for every draft (default: each draft's config).",
    )
    bench.add_argument(
        "--tree-depth",
        type=int,
        default=None,
        help="tree depth for every draft (default: each draft's config).",
    )
    bench.add_argument(
        "--tree-total-tokens",
        type=int,
        default=None,
        help="tree size for every draft (default: each draft's config).",
    )
    for key, what in (
        ("total-tokens", "size"),
        ("depth", "spine length"),
        ("top-k", "children per spine node"),
    ):
        bench.add_argument(
            f"--sampling-tree-{key}",
            type=int,
            default=None,
            help=f"sampled-tree {what} at temperature > 0 (default: the greedy tree's setting).",
        )
    bench.set_defaults(func=_run_bench)

    # ------------------------------------------------------------------ push
    push = sub.add_parser(
        "push",
        help="upload a trained draft to the Hugging Face Hub with a model card",
        description=(
            "Upload a trained draft (weights + config + model card + custom_generate) to the Hub. With --local-dir, "
            "write the folder that would be uploaded instead (no network)."
        ),
    )
    push.add_argument("draft", help="local folder of a trained draft (save_pretrained output).")
    push.add_argument("repo_id", nargs="?", default=None, help="Hub repository, e.g. org/name.")
    push.add_argument(
        "--metrics", default=None, help="a results.json from `specvlm bench` for the model card."
    )
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in token / $HF_TOKEN).")
    push.add_argument("--local-dir", default=None, help="only write the Hub folder here; do not upload.")
    push.set_defaults(func=_run_push)
    return parser


# ---------------------------------------------------------------------------------------------- commands


def _run_demo(args: argparse.Namespace) -> int:
    from .toy.demo import run_demo

    return run_demo(args)


def _run_train(args: argparse.Namespace) -> int:
    from .toy.train_command import run_train

    return run_train(args)


def _run_regenerate(args: argparse.Namespace) -> int:
    from .toy.regenerate_command import run_regenerate

    return run_regenerate(args)


def _run_bench(args: argparse.Namespace) -> int:
    from .toy.bench import run_bench_cli

    return run_bench_cli(args)


def _run_push(args: argparse.Namespace) -> int:
    import json

    from .draft.modeling_specvlm import SpecVLMDraftModel

    if args.repo_id is None and args.local_dir is None:
        print(
            "specvlm push: give a repo_id to upload, or --local-dir to only write the folder.",
            file=sys.stderr,
        )
        return 2
    metrics = None
    if args.metrics:
        with open(args.metrics, encoding="utf-8") as f:
            metrics = json.load(f)
    draft = SpecVLMDraftModel.from_pretrained(args.draft)
    from .sharing import hub

    if args.local_dir is not None:
        folder = hub.save_for_hub(draft, args.local_dir, metrics, repo_id=args.repo_id)
        print(f"wrote {folder}")
        return 0
    commit = hub.push_draft_to_hub(
        draft, args.repo_id, metrics=metrics, private=args.private, token=args.token
    )
    print(f"pushed to https://huggingface.co/{args.repo_id} ({getattr(commit, 'commit_url', commit)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
