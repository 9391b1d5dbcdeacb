# OMP_NUM_THREADS=1 python examples/compressor_bench.py --steps 200
#
# Elastic visual compressor, one mode at a time. Part 1 (toy world): distill one draft per compressor mode with
# the same budget, seed and data from the toy LLaVA target, then measure on the same held-out prompts the draft
# prefill time (prepare_context + draft forward over the prompt, from features captured in one target forward),
# the draft KV cache after prefill, the visual tokens the draft keeps, the "select" gate's choices and the mean
# accepted length of greedy tree decoding (checked equal to plain greedy generate). The toy image has only 9
# visual tokens, so part 2 times the prefill on a random LLaVA with a 576-token image (CLIP 336 px, patch 14)
# and a hidden-256 Llama, with untrained drafts (cost and cache size only). Writes
# docs/results/compressor_bench.json and docs/results/compressor_bench.md.
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import transformers
from transformers.cache_utils import DynamicCache
from transformers.utils import logging as hf_logging

from specvlm_hf.generation.tree_policy import build_tree
from specvlm_hf.targets import families as targets
from specvlm_hf.targets.features import capture_decoder_inputs
from specvlm_hf.toy.demo import load_rows, load_target, prompt_inputs
from specvlm_hf.toy.drafts import TrainBudget, distill_draft, new_draft

MODES = [None, "prune", "pool", "conv", "resampler", "text_only", "select"]
TREE_SETTINGS = {
    "default": {},  # the config's tree: top_k 10, depth 7, total_tokens 60
    "k4_d8_t24": {"tree_top_k": 4, "tree_depth": 8, "tree_total_tokens": 24},
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Compare the elastic visual compressor modes.")
    p.add_argument("--steps", type=int, default=200, help="training steps per draft (same for every mode)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=TrainBudget.learning_rate)
    p.add_argument("--prompts", type=int, default=12, help="held-out prompts for decoding and prefill timing")
    p.add_argument("--gate-prompts", type=int, default=200, help="held-out prompts for the gate's choices")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=21, help="timing repeats (median)")
    p.add_argument(
        "--large-hidden",
        default="256,1024",
        help="text hidden sizes of the synthetic LLaVA (comma-separated)",
    )
    p.add_argument("--large-text-tokens", type=int, default=48, help="text tokens around the 576-token image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output-dir", default="docs/results")
    p.add_argument("--skip-toy", action="store_true", help="only the synthetic large-image part")
    return p.parse_args()


def mode_name(mode: str | None) -> str:
    return mode or "none (EagleVLM)"


# ------------------------------------------------------------------------------------------ measuring
@torch.inference_mode()
def target_pass(vlm, inputs: dict) -> dict:
    """One target forward over the prompt: what the draft's prefill consumes (not timed)."""
    with capture_decoder_inputs(vlm) as captured:
        out = vlm(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
    root = int(out.logits[0, -1].argmax())
    spans = targets.visual_spans(targets.unwrap_target(vlm), inputs["input_ids"], inputs)
    return {
        "input_ids": inputs["input_ids"],
        "embeds": captured[0],
        "features": out.hidden_states[-1],  # target_layers == [-1]: last hidden state after the final norm
        "root": torch.tensor([root]),
        "spans": spans,
        "visual_tokens": sum(s.length for s in spans),
    }


@torch.inference_mode()
def draft_prefill(draft, cap: dict):
    """What tree decoding does after the target's prefill: the draft's context rows and its forward over them."""
    cache = DynamicCache()
    ctx = draft.prepare_context(
        cap["input_ids"],
        cap["embeds"],
        cap["features"],
        next_embeds=draft.embed_tokens(cap["root"])[None],
        spans=[cap["spans"]] if draft.compressor is not None else None,
    )
    hidden = draft(fused_inputs=ctx.fused, position_ids=ctx.position_ids, past_key_values=cache)
    return ctx, cache, hidden.last_hidden_state[:, -1:]


def cache_size(cache: DynamicCache) -> tuple[int, int]:
    """(rows, bytes) of a draft cache: rows per layer, bytes of every key and value tensor."""
    rows = cache.get_seq_length()
    nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)
    return rows, nbytes


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def prefill_cost(draft, cap: dict, repeats: int, tree: bool = False) -> dict:
    """Median draft prefill time, cache size, kept visual rows; optionally the median time of one draft tree."""
    draft_prefill(draft, cap)  # warm-up
    prefill_s = median_time(lambda: draft_prefill(draft, cap), repeats)
    shifted = torch.cat([cap["embeds"][:, 1:], draft.embed_tokens(cap["root"])[None]], dim=1)
    fuse_s = median_time(lambda: draft.fuse(shifted, cap["features"]), repeats)
    ctx, cache, root_hidden = draft_prefill(draft, cap)
    rows, nbytes = cache_size(cache)
    kept = ctx.kept_visual_tokens[0] if draft.compressor is not None else cap["visual_tokens"]
    result = {
        "draft_prefill_ms": prefill_s * 1e3,
        "fuse_ms": fuse_s * 1e3,  # of which: fc + norm over every prompt row (runs before any compression)
        "draft_context_rows": int(ctx.fused.shape[1]),
        "draft_kv_rows": rows,
        "draft_kv_bytes": nbytes,
        "visual_tokens": cap["visual_tokens"],
        "draft_visual_tokens": kept,
        "choice": ctx.choices[0] if ctx.choices else None,
    }
    if tree:  # one dynamic tree (default settings) grown on top of that cache: the per-step drafting cost
        settings = draft.decoding_settings()
        row_position = cap["input_ids"].shape[1]

        def grow():
            build_tree(draft, copy.deepcopy(cache), root_hidden, cap["root"], row_position, settings)

        grow()
        times = []
        for _ in range(repeats):
            fresh = copy.deepcopy(cache)
            t0 = time.perf_counter()
            build_tree(draft, fresh, root_hidden, cap["root"], row_position, settings)
            times.append(time.perf_counter() - t0)
        result["draft_tree_ms"] = statistics.median(times) * 1e3
    return result


@torch.inference_mode()
def decode_eval(vlm, draft, processor, rows, plain_outputs, max_new_tokens: int) -> dict:
    result = {}
    for name, settings in TREE_SETTINGS.items():
        accepted, forwards, new_tokens, kept, visual, choices = [], 0, 0, [], [], Counter()
        for row, plain in zip(rows, plain_outputs):
            inputs = prompt_inputs(processor, row)
            spec = vlm.generate(
                **inputs, assistant_model=draft, max_new_tokens=max_new_tokens, do_sample=False, **settings
            )
            if spec.tolist() != plain.tolist():
                raise AssertionError(
                    f"{draft.config.compressor_mode}: tree decoding changed the greedy output"
                )
            stats = draft.last_generation_stats
            accepted.append(stats.mean_accepted_length)
            forwards += stats.target_forwards
            new_tokens += stats.new_tokens
            kept.append(stats.draft_visual_tokens)
            visual.append(stats.visual_tokens)
            choices[str(stats.compressor_choice)] += 1
        result[name] = {
            "mean_accepted_length": sum(accepted) / len(accepted),
            "tokens_per_target_forward": new_tokens / forwards,
            "stats_visual_tokens_mean": sum(visual) / len(visual),
            "stats_draft_visual_tokens_mean": sum(kept) / len(kept),
            "stats_compressor_choice": dict(choices),
        }
    return result


# ------------------------------------------------------------------------------------------ part 1: toy
def toy_part(args) -> dict:
    vlm, processor, label = load_target(None, "tiny", seed=args.seed, progress=False)
    rows = load_rows(None, args.prompts, args.seed, eval_rows=True)
    gate_rows = load_rows(None, args.gate_prompts, args.seed, eval_rows=True)
    dataset = load_rows(None, max(64, min(2000, args.steps * args.batch_size)), args.seed)
    budget = TrainBudget(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate)
    with torch.inference_mode():
        plain_outputs = [
            vlm.generate(**prompt_inputs(processor, row), max_new_tokens=args.max_new_tokens, do_sample=False)
            for row in rows
        ]
    caps = [target_pass(vlm, prompt_inputs(processor, row)) for row in rows]
    target_ms = statistics.mean(
        median_time(lambda r=row: target_pass(vlm, prompt_inputs(processor, r)), 5) * 1e3 for row in rows[:3]
    )
    results = []
    for mode in MODES:
        draft = new_draft(vlm, mode, seed=args.seed)
        metrics = distill_draft(draft, vlm, processor, dataset, budget, seed=args.seed, progress=False)
        draft.eval()
        costs = [prefill_cost(draft, cap, args.repeats) for cap in caps]
        entry = {
            "mode": mode,
            "train": metrics,
            "draft_parameters": sum(p.numel() for p in draft.parameters()),
            "draft_prefill_ms": statistics.mean(c["draft_prefill_ms"] for c in costs),
            "draft_context_rows": statistics.mean(c["draft_context_rows"] for c in costs),
            "draft_kv_rows": statistics.mean(c["draft_kv_rows"] for c in costs),
            "draft_kv_bytes": statistics.mean(c["draft_kv_bytes"] for c in costs),
            "visual_tokens": statistics.mean(c["visual_tokens"] for c in costs),
            "draft_visual_tokens": statistics.mean(c["draft_visual_tokens"] for c in costs),
            "decode": decode_eval(vlm, draft, processor, rows, plain_outputs, args.max_new_tokens),
        }
        if mode == "select":
            choices = Counter()
            for row in gate_rows:
                ctx, _, _ = draft_prefill(draft, target_pass(vlm, prompt_inputs(processor, row)))
                choices[str(ctx.choices[0])] += 1
            entry["gate_choices"] = dict(choices)
            entry["gate_prompts"] = len(gate_rows)
        results.append(entry)
        dec = entry["decode"]["default"]
        print(
            f"[toy] {mode_name(mode):16s} train {metrics['train_time_s']:6.1f} s | prefill "
            f"{entry['draft_prefill_ms']:.2f} ms | kv rows {entry['draft_kv_rows']:.1f} | visual kept "
            f"{entry['draft_visual_tokens']:.1f}/{entry['visual_tokens']:.0f} | acc len {dec['mean_accepted_length']:.2f}"
            + (f" | gate {entry['gate_choices']}" if mode == "select" else ""),
            flush=True,
        )
    return {
        "target": label,
        "prompt_tokens_mean": statistics.mean(c["input_ids"].shape[1] for c in caps),
        "target_forward_ms": target_ms,
        "modes": results,
    }


# ------------------------------------------------------------------------------ part 2: large image
def large_llava(hidden: int, seed: int):
    """A random LlavaForConditionalGeneration with a 576-token image (CLIP 336 px, patch 14)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vocab, image_id = 1024, 1000
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=336,
            patch_size=14,
            projection_dim=64,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 11 // 4,
            num_hidden_layers=2,
            num_attention_heads=max(1, hidden // 64),
            num_key_value_heads=max(1, hidden // 64),
            max_position_embeddings=2048,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        image_token_index=image_id,
        image_seq_length=576,
        pad_token_id=0,
    )
    config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config).eval()
    return model, image_id


def large_part(args, hidden: int) -> dict:
    vlm, image_id = large_llava(hidden, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    n_text = args.large_text_tokens
    before = torch.randint(3, 900, (n_text // 4,), generator=gen)
    after = torch.randint(3, 900, (n_text - n_text // 4,), generator=gen)
    input_ids = torch.cat([torch.tensor([1]), before, torch.full((576,), image_id), after])[
        None
    ]  # (1, L): <s> text <image>*576 question
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(1, 3, 336, 336, generator=gen),
    }
    cap = target_pass(vlm, inputs)
    target_ms = median_time(lambda: target_pass(vlm, inputs), 5) * 1e3
    results = []
    for mode in MODES:
        draft = new_draft(vlm, mode, seed=args.seed).eval()
        cost = prefill_cost(draft, cap, args.repeats, tree=True)
        cost["mode"] = mode
        cost["draft_parameters"] = sum(p.numel() for p in draft.parameters())
        results.append(cost)
        print(
            f"[576, h{hidden}] {mode_name(mode):16s} prefill {cost['draft_prefill_ms']:.2f} ms | kv rows "
            f"{cost['draft_kv_rows']} ({cost['draft_kv_bytes'] / 1024:.0f} KiB) | visual kept "
            f"{cost['draft_visual_tokens']}/{cost['visual_tokens']} | tree {cost['draft_tree_ms']:.2f} ms"
            + (f" | choice {cost['choice']}" if mode == "select" else ""),
            flush=True,
        )
    text_config = vlm.config.text_config
    return {
        "hidden": hidden,
        "target": (
            f"random LlavaForConditionalGeneration: CLIP 336 px / patch 14 (576 image tokens), Llama hidden "
            f"{text_config.hidden_size}, {text_config.num_hidden_layers} layers, {text_config.num_attention_heads} "
            f"heads, vocab {text_config.vocab_size}"
        ),
        "prompt_tokens": int(input_ids.shape[1]),
        "target_forward_ms": target_ms,
        "modes": results,
    }


# ------------------------------------------------------------------------------------------ report
def write_markdown(path: Path, record: dict) -> None:
    lines = [
        "# Elastic visual compressor: cost and accepted length per mode",
        "",
        f"Command: `{record['command']}`. CPU, {record['threads']} thread(s), torch {record['environment']['torch']},"
        f" transformers {record['environment']['transformers']}. Draft prefill = `draft.prepare_context` + the"
        " draft forward over the prompt rows (from features captured in one target forward), median of"
        f" {record['repeats']} repeats. Draft KV = rows in the draft's cache after prefill (prompt rows after"
        " compression, +1 for the root token) and the bytes of its keys and values.",
        "",
    ]
    toy = record.get("toy")
    if toy:
        lines += [
            f"## Toy target ({toy['target']}), trained drafts",
            "",
            f"Every draft: {record['steps']} steps, batch {record['batch_size']}, lr {record['learning_rate']},"
            f" seed {record['seed']}, same rows. {record['prompts']} held-out prompts"
            f" ({toy['prompt_tokens_mean']:.1f} tokens, 9 of them visual); one target forward over the prompt"
            f" takes {toy['target_forward_ms']:.2f} ms. Accepted length: greedy tree decoding, max_new_tokens"
            f" {record['max_new_tokens']}, every output equal to plain greedy generate.",
            "",
            "| mode | train s | top-1 agr. (train) | draft prefill ms | KV rows | KV KiB | visual kept "
            "| acc. len (k10 d7 t60) | acc. len (k4 d8 t24) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for m in toy["modes"]:
            agr = m["train"].get("top1_agreement")
            lines.append(
                f"| {mode_name(m['mode'])} | {m['train']['train_time_s']:.1f} | "
                f"{agr:.3f} | {m['draft_prefill_ms']:.2f} | {m['draft_kv_rows']:.1f} | "
                f"{m['draft_kv_bytes'] / 1024:.1f} | {m['draft_visual_tokens']:.1f} / {m['visual_tokens']:.0f} | "
                f"{m['decode']['default']['mean_accepted_length']:.2f} | "
                f"{m['decode']['k4_d8_t24']['mean_accepted_length']:.2f} |"
            )
        select = next((m for m in toy["modes"] if m["mode"] == "select"), None)
        if select is not None:
            dist = ", ".join(f"{k}: {v}" for k, v in sorted(select["gate_choices"].items()))
            lines += [
                "",
                f'"select" gate choices (argmax) on {select["gate_prompts"]} held-out prompts: {dist}. '
                f"On the {record['prompts']} decoding prompts: "
                f"{select['decode']['default']['stats_compressor_choice']}.",
            ]
        none = next((m for m in toy["modes"] if m["mode"] is None), None)
        if (
            none is not None
            and none["decode"]["default"]["stats_draft_visual_tokens_mean"] != none["visual_tokens"]
        ):
            lines += [
                "",
                "Note: `last_generation_stats.draft_visual_tokens` reports "
                f"{none['decode']['default']['stats_draft_visual_tokens_mean']:g} for the draft without a compressor,"
                f" which keeps all {none['visual_tokens']:g} visual rows; the table counts the rows the draft keeps.",
            ]
        lines.append("")
    for large in record.get("large", []):
        lines += [
            f"## Synthetic large image (576 visual tokens), text hidden {large['hidden']}, untrained drafts",
            "",
            f"{large['target']}; prompt of {large['prompt_tokens']} tokens. One target forward over it takes"
            f" {large['target_forward_ms']:.1f} ms. Draft tree = one dynamic tree (k10 d7 t60) grown on the"
            " prefilled cache (per-step drafting cost, attention over the cached rows). Fuse = `draft.fuse` (fc +"
            " RMSNorm) over all prompt rows, which `prepare_context` runs before compressing.",
            "",
            "| mode | draft prefill ms | of which fuse ms | context rows | KV rows | KV KiB | visual kept "
            "| draft tree ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for m in large["modes"]:
            mode = mode_name(m["mode"]) + (f" (chose {m['choice']})" if m["mode"] == "select" else "")
            lines.append(
                f"| {mode} | {m['draft_prefill_ms']:.2f} | {m['fuse_ms']:.2f} | {m['draft_context_rows']} | {m['draft_kv_rows']} | "
                f"{m['draft_kv_bytes'] / 1024:.0f} | {m['draft_visual_tokens']} / {m['visual_tokens']} | "
                f"{m['draft_tree_ms']:.2f} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    record: dict = {
        "command": f"OMP_NUM_THREADS={args.threads} python examples/compressor_bench.py --steps {args.steps}",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "threads": args.threads,
        "tree_settings": TREE_SETTINGS,
        "environment": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    record["large"] = [large_part(args, int(h)) for h in args.large_hidden.split(",")]
    if not args.skip_toy:
        record["toy"] = toy_part(args)
        record["lossless"] = True
    record["total_seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compressor_bench.json").write_text(json.dumps(record, indent=2, default=str))
    write_markdown(out / "compressor_bench.md", record)
    print(f"done in {record['total_seconds']} s: wrote {out / 'compressor_bench.json'} and .md")


if __name__ == "__main__":
    main()
