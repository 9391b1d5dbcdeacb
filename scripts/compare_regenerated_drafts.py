"""Accepted length of drafts trained on different data, on the tiny toy target (docs/training.md, "Training data").

    PYTHONPATH=src python scripts/compare_regenerated_drafts.py OUT.json NAME=DRAFT_DIR [NAME=DRAFT_DIR ...]

For every draft, in float32 on held-out stratified toy prompts (64 new tokens; `--prompts N`, default 32): the mean
accepted length per verify step (bonus token included, every step of every prompt weighing the same) of chain
decoding with exactly 8 drafted tokens (confidence cut-off 0), of the automatic tree and of a fixed 16/6/4 tree
(`--settings` picks), greedy (T=0, each output
checked against plain greedy generate) and sampling at T=1 (pure temperature sampling, each prompt seeded). The
drafts are measured prompt by prompt, interleaved, so they see the same machine state. Writes OUT.json.
"""

from __future__ import annotations

import argparse
import json

import torch

from specvlm_hf.toy.demo import load_rows, load_target, prompt_inputs
from specvlm_hf.toy.drafts import load_draft

SETTINGS = {
    "chain8": {"decoding_mode": "chain", "num_draft_tokens": 8, "draft_confidence_threshold": 0.0},
    "tree_auto": {"decoding_mode": "tree"},
    # a fixed tree (the CLI's CPU default budget): acceptance without the automatic budget's choices
    "tree16_6_4": {"decoding_mode": "tree", "tree_total_tokens": 16, "tree_depth": 6, "tree_top_k": 4},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("drafts", nargs="+", help="NAME=DIR")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {list(SETTINGS)}"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    vlm, processor, _ = load_target(None, "tiny", None, 0, progress=False)
    vlm = vlm.float()
    drafts = {}
    for item in args.drafts:
        name, path = item.split("=", 1)
        drafts[name] = load_draft(path, vlm)
    prompts = [prompt_inputs(processor, r) for r in load_rows(None, args.prompts, 0, eval_rows=True)]
    settings = {name: SETTINGS[name] for name in args.settings.split(",")}
    accepted = {(n, s, t): [] for n in drafts for s in settings for t in (0.0, 1.0)}
    identical = {f"{n}/{s}": 0 for n in drafts for s in settings}
    with torch.inference_mode():
        for i, inputs in enumerate(prompts):
            plain = vlm.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            for name, draft in drafts.items():
                for setting, kwargs in settings.items():
                    for temperature in (0.0, 1.0):
                        sampling = (
                            {"do_sample": False}
                            if temperature == 0
                            else {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
                        )
                        torch.manual_seed(1000 + i)
                        out = vlm.generate(
                            **inputs,
                            assistant_model=draft,
                            max_new_tokens=args.max_new_tokens,
                            **sampling,
                            **kwargs,
                        )
                        accepted[(name, setting, temperature)] += draft.last_generation_stats.accepted_lengths
                        if temperature == 0:
                            identical[f"{name}/{setting}"] += int(torch.equal(out, plain))
            print(f"prompt {i + 1}/{len(prompts)}", flush=True)
    result = {
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "greedy_identical_to_plain": identical,
        "mean_accepted_length": {
            f"{n}/{s}/T={t:g}": round(sum(v) / len(v), 3) for (n, s, t), v in accepted.items() if v
        },
        "verify_steps": {f"{n}/{s}/T={t:g}": len(v) for (n, s, t), v in accepted.items()},
    }
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
