"""Driver of scripts/serve_vllm_check.sh: a SpecVLM eagle3 draft served by vLLM (CPU), end to end.

Modes (the shell script runs them in this order; each writes JSON under --out):

  prepare  (main env, specvlm_hf) distil an eagle3 draft (`new_draft(servable=True)`) on the toy world with our
           trainer (cached), save the toy LLaVA's language model as its own LlamaForCausalLM (same weights; checked
           against the VLM's logits), bind the draft to it, export it with export_draft(format="speculators"), and
           decode held-out toy prompts (their text: the <image> placeholders removed) with transformers: plain
           greedy, and our chain mode (decoding_mode="chain", num_draft_tokens=k). -> prepare.json
  vllm     (vLLM venv) the same prompts with vLLM on the text LM, greedy, without the draft (--no-draft) or with it
           (speculative_config eagle3, k tokens); the spec-decode counters from llm.get_metrics(). -> vllm_*.json
  vlm      (vLLM venv) the toy LLaVA itself with an image prompt; records the failure if vLLM cannot run it.
  report   (any python) the checks: vLLM greedy with the draft == without; vLLM's mean acceptance length within
           --tolerance of our chain mode's. Prints the numbers; exit status 1 on a failed check.

vLLM spawns an engine process, so `LLM(...)` is only created under `if __name__ == "__main__"` (this file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- prepare


def save_text_lm(vlm, tokenizer, out: Path):
    """The VLM's language model as its own LlamaForCausalLM (same weights), saved to `out`; returns it."""
    import torch
    from transformers import LlamaForCausalLM

    text_config = vlm.config.text_config
    text_config.architectures = ["LlamaForCausalLM"]
    lm = LlamaForCausalLM(text_config).eval()
    state = {"model." + k: v for k, v in vlm.model.language_model.state_dict().items()}
    state["lm_head.weight"] = vlm.lm_head.weight
    missing, unexpected = lm.load_state_dict(state, strict=True), None
    del missing, unexpected
    lm.generation_config.bos_token_id = tokenizer.bos_token_id
    lm.generation_config.eos_token_id = tokenizer.eos_token_id
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    lm.requires_grad_(False)
    # same function as the VLM on text: compare logits on a text-only prompt
    ids = torch.tensor([tokenizer("USER: how many red circles?\nASSISTANT:").input_ids])
    with torch.no_grad():
        a, b = vlm(input_ids=ids).logits, lm(input_ids=ids).logits
    assert torch.equal(a, b), f"text LM differs from the VLM: {(a - b).abs().max()}"
    return lm


def held_out_prompts(processor, n: int, seed: int) -> list[dict]:
    """Toy evaluation rows (disjoint from training) as text prompts: the chat prompt without <image> tokens."""
    from specvlm_hf.toy.world import toy_generate_inputs, toy_prompts

    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    prompts = []
    for row in toy_prompts(n, seed=seed):
        ids = toy_generate_inputs(processor, row)["input_ids"][0].tolist()
        text_ids = [t for t in ids if t != image_id]
        prompts.append({"vlm_ids": ids, "ids": text_ids, "text": processor.tokenizer.decode(text_ids)})
    return prompts


# The drafts checked: what `specvlm train --servable` trains (three target layers, EAGLE-3's training-time test
# over toy.train_command.SERVABLE_UNROLL_STEPS = 3 steps; the vLLM venv cannot import specvlm_hf, hence the
# literal), and a one-target-layer draft (fc exported as the identity) trained with the training-time test as well.
VARIANTS = {
    "eagle3_3layers_ttt": {"layers": "servable", "unroll_steps": 3},
    "eagle3_1layer_ttt": {"layers": "last_servable", "unroll_steps": 3},
}


def train_or_load_draft(vlm, processor, variant: str, args, log):
    import torch

    from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel, __version__
    from specvlm_hf.sharing.export import servable_target_layers
    from specvlm_hf.targets import families as targets
    from specvlm_hf.toy.demo import load_rows
    from specvlm_hf.toy.drafts import TrainBudget, distill_draft, new_draft, save_draft
    from specvlm_hf.toy.world import toy_cache_dir

    spec = VARIANTS[variant]
    name = f"toy-tiny-{variant}-s{args.train_steps}-t{args.train_seconds}-seed{args.seed}-v{__version__}"
    path = toy_cache_dir() / "serve_vllm_check" / name
    if (path / "config.json").exists() and not args.retrain:
        log(f"{variant}: loading the cached draft {path}")
        draft = SpecVLMDraftModel.from_pretrained(str(path), target=vlm).eval()
        metrics = json.loads((path / "training_metrics.json").read_text())
        return draft, metrics, True
    if spec["layers"] == "servable":
        draft = new_draft(vlm, seed=args.seed, servable=True)  # = `specvlm train --servable`
    else:
        torch.manual_seed(args.seed)
        layer = servable_target_layers(targets.target_num_layers(vlm))[-1]
        config = SpecVLMDraftConfig.from_target(vlm, draft_architecture="eagle3", target_layers=[layer])
        draft = SpecVLMDraftModel(config).bind(vlm)
    log(
        f"{variant}: distilling an eagle3 draft (target_layers={draft.config.target_layers}, unroll_steps="
        f"{spec['unroll_steps']}) for the toy LLaVA: {args.train_steps} steps or {args.train_seconds} s"
    )
    budget = TrainBudget(steps=args.train_steps, seconds=args.train_seconds, batch_size=8)
    dataset = load_rows(None, min(2000, args.train_steps * 8), args.seed)
    metrics = distill_draft(
        draft,
        vlm,
        processor,
        dataset,
        budget,
        seed=args.seed,
        progress=False,
        unroll_steps=spec["unroll_steps"],
    )
    save_draft(draft, path, metrics)
    return draft, metrics, False


def vlm_image_prompts(vlm, processor, out: Path, args, n: int = 2) -> list[dict]:
    """A few held-out toy prompts with their images (PNG) for the VLM case, with transformers' greedy answers."""
    import torch

    from specvlm_hf.toy.world import toy_generate_inputs, toy_prompts

    rows = []
    for i, row in enumerate(toy_prompts(n, seed=args.prompt_seed + 1)):
        inputs = toy_generate_inputs(processor, row)
        with torch.no_grad():
            ref = vlm.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        image = out / f"image_{i}.png"
        row["images"][0].save(image)
        text = processor.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=False)
        rows.append(
            {
                "image": str(image),
                "text": text,
                "transformers": ref[0, inputs["input_ids"].shape[1] :].tolist(),
            }
        )
    return rows


def chain_stats(lengths: list[list[int]], k: int) -> dict:
    """Our chain-mode numbers from `accepted_lengths` (tokens per verify step, bonus included)."""
    flat = [n for per_prompt in lengths for n in per_prompt]
    steps, tokens = len(flat), sum(flat)
    return {
        "k": k,
        "steps": steps,
        "tokens": tokens,
        "mean_acceptance_length": tokens / steps,
        "accepted_per_step": (tokens - steps) / steps,
        "accepted_per_position": [sum(n - 1 > j for n in flat) for j in range(k)],
    }


def run_prepare(args) -> int:
    import torch

    from specvlm_hf.sharing.export import export_draft
    from specvlm_hf.toy.world import load_toy_target

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[prepare] {msg}", flush=True)

    t0 = time.perf_counter()
    vlm, processor = load_toy_target("tiny", seed=args.seed)
    vlm.eval()
    text_dir = out / "text_lm"
    lm = save_text_lm(vlm, processor.tokenizer, text_dir)
    log(f"saved the toy LLaVA's language model as LlamaForCausalLM to {text_dir} (logits equal the VLM's)")
    prompts = held_out_prompts(processor, args.prompts, args.prompt_seed)
    plain = []
    for p in prompts:
        ids = torch.tensor([p["ids"]])
        with torch.no_grad():
            ref = lm.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        plain.append(ref[0, ids.shape[1] :].tolist())
    seconds = {"target": round(time.perf_counter() - t0, 1)}
    vlm_prompts = vlm_image_prompts(vlm, processor, out, args)

    variants = {}
    for variant in VARIANTS:
        t1 = time.perf_counter()
        draft, train_metrics, cached = train_or_load_draft(vlm, processor, variant, args, log)
        seconds[f"{variant}_train"] = round(time.perf_counter() - t1, 1)
        log(f"{variant}: draft ready ({'cached' if cached else 'trained'}): {json.dumps(train_metrics)}")
        # the draft, unchanged, now serves the text LM: same embedding, lm_head and hidden states on text
        config = draft.config
        config.target_family = None
        config.target_name_or_path = str(text_dir)
        config.target_architecture = "LlamaForCausalLM"
        config.target_model_type = "llama"
        draft.bind(lm).eval()
        export_dir = export_draft(draft, out / variant, format="speculators")
        exported = json.loads((export_dir / "config.json").read_text())
        log(
            f"{variant}: exported to {export_dir} (eagle_aux_hidden_state_layer_ids "
            f"{exported['eagle_aux_hidden_state_layer_ids']}, fc {'identity' if draft.fc is None else 'trained'})"
        )
        t2 = time.perf_counter()
        chain, lengths = [], []
        for p in prompts:
            ids = torch.tensor([p["ids"]])
            with torch.no_grad():
                spec = lm.generate(
                    ids,
                    assistant_model=draft,
                    decoding_mode="chain",
                    num_draft_tokens=args.k,
                    max_new_tokens=args.max_new_tokens,
                    do_sample=False,
                )
            chain.append(spec[0, ids.shape[1] :].tolist())
            lengths.append(list(draft.last_generation_stats.accepted_lengths))
        seconds[f"{variant}_chain_decode"] = round(time.perf_counter() - t2, 1)
        ours = chain_stats(lengths, args.k)
        ours["lossless"] = chain == plain
        log(
            f"{variant}: transformers chain mode k={args.k}: {ours['steps']} verify steps, {ours['tokens']} tokens, "
            f"mean acceptance length {ours['mean_acceptance_length']:.3f}; output == plain greedy: {ours['lossless']}"
        )
        variants[variant] = {
            "draft_export": str(export_dir),
            "target_layers": list(config.target_layers),
            "aux_layer_ids": exported["eagle_aux_hidden_state_layer_ids"],
            "unroll_steps": VARIANTS[variant]["unroll_steps"],
            "draft_cached": cached,
            "train_metrics": train_metrics,
            "transformers_chain": chain,
            "accepted_lengths": lengths,
            "ours": ours,
        }
    _write(
        out / "prepare.json",
        {
            "text_lm": str(text_dir),
            "vlm": str(vlm.config._name_or_path or ""),
            "k": args.k,
            "prompts": prompts,
            "transformers_plain": plain,
            "vlm_prompts": vlm_prompts,
            "variants": variants,
            "seconds": seconds,
        },
    )
    return 0


# ---------------------------------------------------------------------------------------------- vLLM


def _spec_counters(metrics) -> dict:
    out = {}
    for m in metrics:
        if m.name.startswith("vllm:spec_decode"):
            value = getattr(m, "value", None)
            out[m.name] = value if value is not None else list(getattr(m, "values", []))
    return out


def run_vllm(args) -> int:
    from vllm import LLM, SamplingParams

    out = Path(args.out)
    prep = json.loads((out / "prepare.json").read_text())
    spec = None
    if args.variant:
        spec = {
            "method": "eagle3",
            "model": prep["variants"][args.variant]["draft_export"],
            "num_speculative_tokens": args.k,
        }
    t0 = time.perf_counter()
    llm = LLM(
        model=prep["text_lm"],
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        seed=0,
        disable_log_stats=False,
        speculative_config=spec,
    )
    t_start = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
    prompts = [{"prompt_token_ids": p["ids"]} for p in prep["prompts"]]
    t1 = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    t_gen = time.perf_counter() - t1
    outputs = [list(r.outputs[0].token_ids) for r in results]
    counters = _spec_counters(llm.get_metrics())
    name = f"vllm_{args.variant or 'nodraft'}.json"
    _write(
        out / name,
        {
            "speculative_config": spec,
            "outputs": outputs,
            "counters": counters,
            "seconds": {"startup": round(t_start, 1), "generate": round(t_gen, 1)},
        },
    )
    print(f"[vllm] {name}: startup {t_start:.1f} s, generate {t_gen:.1f} s, counters {counters}", flush=True)
    return 0


def run_vlm(args) -> int:
    """The toy LLaVA itself in vLLM, with images: vLLM's own LLaVA (`--impl vllm`) or its Transformers backend
    (`--impl transformers`), optionally with a draft; records the outputs or the failure."""
    out = Path(args.out)
    prep = json.loads((out / "prepare.json").read_text())
    name = f"vlm_{args.impl}_{args.variant or 'nodraft'}"
    record = {"model": prep["vlm"], "impl": args.impl, "variant": args.variant, "ok": False}
    try:
        from PIL import Image
        from vllm import LLM, SamplingParams

        spec = None
        if args.variant:
            export = prep["variants"][args.variant]["draft_export"]
            spec = {"method": "eagle3", "model": export, "num_speculative_tokens": args.k}
        llm = LLM(
            model=prep["vlm"],
            dtype="float32",
            enforce_eager=True,
            max_model_len=512,
            seed=0,
            limit_mm_per_prompt={"image": 1},
            model_impl="transformers" if args.impl == "transformers" else "auto",
            disable_log_stats=False,
            speculative_config=spec,
        )
        prompts = [
            {"prompt": p["text"], "multi_modal_data": {"image": Image.open(p["image"]).convert("RGB")}}
            for p in prep["vlm_prompts"]
        ]
        params = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens)
        results = llm.generate(prompts, params, use_tqdm=False)
        record.update(
            ok=True,
            outputs=[list(r.outputs[0].token_ids) for r in results],
            counters=_spec_counters(llm.get_metrics()),
        )
    except BaseException as e:  # noqa: BLE001 - recorded, reported by `report`
        record["exception"] = f"{type(e).__name__}: {e}"
    _write(out / f"{name}.json", record)
    print(f"[vlm] {name}: ok={record['ok']}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- report


def _root_cause(log_text: str) -> str | None:
    """The innermost `SomethingError: message` of a log, past vLLM's wrappers (the registry inspects models in a
    subprocess and re-raises), with the vLLM module whose import failed when there is one."""
    import re

    wrappers = (
        "CalledProcessError",
        "Error raised in subprocess",
        "Error in inspecting",
        "initialization failed",
        "failed to be inspected",
        "Worker failed with error",
        "EngineCore encountered",
        "[vlm]",
    )
    lines = log_text.splitlines()
    found = None
    for i, line in enumerate(lines):
        m = re.search(r"\b([A-Za-z_.]*(?:Error|Exception)): (.+)$", line)
        if m and not any(w in line for w in wrappers):
            found = (i, f"{m.group(1)}: {m.group(2).strip()}")
    if found is None:
        return None
    i, cause = found
    frames = [re.search(r'File ".*/(vllm/[^"]+)", line (\d+)', line) for line in lines[:i]]
    frames = [f"{m.group(1)}:{m.group(2)}" for m in frames if m]
    return f"{cause} (last vLLM frame: {frames[-1]})" if frames else cause


def run_report(args) -> int:
    out = Path(args.out)
    prep = json.loads((out / "prepare.json").read_text())
    nodraft = json.loads((out / "vllm_nodraft.json").read_text())
    n, k = len(prep["prompts"]), prep["k"]
    ok = True
    secs = {**prep["seconds"], "vllm_nodraft": nodraft["seconds"]}
    print("== results")
    print(
        f"{n} held-out toy prompts as text (the <image> tokens removed), greedy, max {args.max_new_tokens} tokens"
    )
    same_tf = sum(a == b for a, b in zip(nodraft["outputs"], prep["transformers_plain"]))
    print(f"(info) vLLM without a draft == transformers greedy on the same text LM: {same_tf}/{n} prompts")
    for variant, info in prep["variants"].items():
        run = json.loads((out / f"vllm_{variant}.json").read_text())
        secs[f"vllm_{variant}"] = run["seconds"]
        ours = info["ours"]
        print(
            f"-- {variant}: target_layers {info['target_layers']} -> eagle_aux_hidden_state_layer_ids "
            f"{info['aux_layer_ids']}, trained with unroll_steps={info['unroll_steps']}, k={k}"
        )
        same = sum(a == b for a, b in zip(run["outputs"], nodraft["outputs"]))
        print(f"(a) vLLM greedy with the draft == without it: {same}/{n} prompts identical")
        print(f"    (info) our chain mode == transformers greedy: {ours['lossless']}")
        ok &= same == n
        c = run["counters"]
        drafts = c.get("vllm:spec_decode_num_drafts", 0)
        accepted = c.get("vllm:spec_decode_num_accepted_tokens", 0)
        if not drafts:
            print("(b) vLLM reported no spec-decode drafts: FAIL")
            ok = False
            continue
        vllm_len, vllm_acc = 1 + accepted / drafts, accepted / drafts
        per_pos = c.get("vllm:spec_decode_num_accepted_tokens_per_pos") or []
        print(
            f"(b) vLLM: {drafts} steps, {c.get('vllm:spec_decode_num_draft_tokens', 0)} draft tokens, {accepted} "
            f"accepted: {vllm_acc:.3f} accepted per step, mean acceptance length {vllm_len:.3f}, acceptance per "
            f"position {[round(x / drafts, 3) for x in per_pos]}"
        )
        print(
            f"    ours (transformers chain mode): {ours['steps']} steps, {ours['tokens'] - ours['steps']} accepted: "
            f"{ours['accepted_per_step']:.3f} accepted per step, mean acceptance length "
            f"{ours['mean_acceptance_length']:.3f}, acceptance per position "
            f"{[round(x / ours['steps'], 3) for x in ours['accepted_per_position']]}"
        )
        rel = abs(vllm_len - ours["mean_acceptance_length"]) / ours["mean_acceptance_length"]
        rel_acc = abs(vllm_acc - ours["accepted_per_step"]) / max(ours["accepted_per_step"], 1e-9)
        good = rel <= args.tolerance and rel_acc <= args.tolerance
        print(
            f"    gap: acceptance length {100 * rel:.1f}%, accepted per step {100 * rel_acc:.1f}% "
            f"(limit {100 * args.tolerance:.0f}% each): {'OK' if good else 'FAIL'}"
        )
        ok &= good
    print("(c) the toy LLaVA itself (images) in vLLM:")
    for path in sorted(out.glob("vlm_*.json")):
        vlm = json.loads(path.read_text())
        what = f"{'vLLM LLaVA' if vlm['impl'] == 'vllm' else 'Transformers backend'}, {vlm['variant'] or 'no draft'}"
        if vlm.get("ok"):
            same = sum(a == p["transformers"] for a, p in zip(vlm["outputs"], prep["vlm_prompts"]))
            extra = f", spec-decode counters {vlm['counters']}" if vlm["counters"] else ""
            print(
                f"    {what}: runs; output == transformers' VLM greedy: {same}/{len(vlm['outputs'])}{extra}"
            )
        else:
            log = path.with_suffix(".log")
            cause = _root_cause(log.read_text(errors="replace")) if log.exists() else None
            print(f"    {what}: fails: {cause or vlm.get('exception')}")
    print(f"seconds: {json.dumps(secs)}")
    print("OK: vLLM serves the exported drafts exactly" if ok else "FAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("prepare", "vllm", "vlm", "report"))
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=3, help="draft tokens per step (default 3)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-seed", type=int, default=123)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=600)
    p.add_argument("--train-seconds", type=float, default=240.0)
    p.add_argument("--retrain", action="store_true")
    p.add_argument(
        "--variant", choices=tuple(VARIANTS), default=None, help="vllm mode: the draft (default: none)"
    )
    p.add_argument("--tolerance", type=float, default=0.15)
    p.add_argument("--impl", choices=("vllm", "transformers"), default="vllm", help="vlm mode: model_impl")
    args = p.parse_args(argv)
    return {"prepare": run_prepare, "vllm": run_vllm, "vlm": run_vlm, "report": run_report}[args.mode](args)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    sys.exit(main())
