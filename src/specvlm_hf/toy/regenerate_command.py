"""What `specvlm regenerate` does: load the target (the toy one by default), its draft and the rows, regenerate.

The work is `training.regenerate.regenerate_dataset`; this module only resolves the command line's names. With the
medium toy target (``--toy-size medium``, the tiny one widened exactly) a draft of the tiny toy target is widened with
it, as `specvlm bench` does.
"""

from __future__ import annotations

import json

import torch


def run_regenerate(args) -> int:
    from ..training.regenerate import RegenerationSettings, regenerate_dataset
    from .demo import load_rows, load_target, widen_draft_for_timing, widen_for_timing
    from .drafts import load_draft

    # bad settings fail before the target is loaded
    RegenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        samples_per_prompt=args.samples_per_prompt,
        batch_size=args.batch_size,
        seed=args.seed,
    ).validate()
    torch.manual_seed(args.seed)
    toy_medium = args.target is None and args.toy_size == "medium"
    vlm, processor, label = load_target(
        args.target, "tiny" if toy_medium else args.toy_size, args.cache_dir, args.seed
    )
    tiny = vlm
    if toy_medium:
        vlm = widen_for_timing(tiny, torch.float32)
        label = f"toy-llava-medium-seed{args.seed}"
    draft = None
    if args.draft is not None:
        draft = load_draft(args.draft, tiny)
        if toy_medium:
            draft = widen_draft_for_timing(draft, vlm)
    dataset = load_rows(args.dataset, args.num_examples, args.seed, split=args.dataset_split)
    source = args.dataset or f"toy dataset ({args.num_examples} rows, seed {args.seed})"
    print(
        f"regenerating {source} with {label}"
        + (f" and draft {args.draft} (speculative decoding)" if draft is not None else " (plain generate)")
        + f" into {args.output_dir}"
    )
    record = regenerate_dataset(
        vlm,
        processor,
        dataset,
        args.output_dir,
        draft=draft,
        draft_name=args.draft,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        samples_per_prompt=args.samples_per_prompt,
        seed=args.seed,
        shard_size=args.shard_size,
        target_name=args.target or label,
        source_name=source,
    )
    run = record["runs"][-1]
    print(
        f"{record['status']}: {json.dumps(record['counts'])}; this run {run['rows']} rows in {run['seconds']} s "
        f"({run['rows_per_second']} rows/s)"
    )
    return 0
