"""Compare `specvlm train` recipes on the tiny toy target at equal training steps (docs/training.md, "Which recipe").

    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/compare_train_recipes.py NAME ARCH LAYERS UNROLL STEPS [OUT [N]]

e.g. `a_eagle eagle '[-1]' 1 2000` or `c_eagle3 eagle3 '[0,1,-1]' 3 2000`. Trains a draft like `specvlm train`
(2000 toy rows, batch 8, lr 3e-3, cosine, one thread), saves it to OUT/NAME (default /tmp/e3), then in float32 and
greedy on held-out prompts: the top-1 agreement of 3 unrolled steps (the trainer's own evaluation on 64 eval-split
rows) and the mean accepted length per verify step of chain mode (k = 2, 3, 5) and a 4/4/12 tree on 24 stratified
eval prompts (64 new tokens), with P(accepted length > j) and a lossless check against plain greedy generate.
Writes OUT/NAME.json. With STEPS = 0 it only re-measures the unrolled agreement of the saved OUT/NAME draft, and
with a 7th argument N its acceptance on N prompts (OUT/NAME_pN.json).
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import TrainingArguments

from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.toy.data import make_toy_rows
from specvlm_hf.toy.demo import load_rows, load_target, prompt_inputs
from specvlm_hf.toy.drafts import TrainBudget, distill_draft
from specvlm_hf.training.collator import SpecVLMDataCollator
from specvlm_hf.training.trainer import SpecVLMDistillationTrainer

SETTINGS = {
    "chain2": dict(decoding_mode="chain", num_draft_tokens=2),
    "chain3": dict(decoding_mode="chain", num_draft_tokens=3),
    "chain5": dict(decoding_mode="chain", num_draft_tokens=5),
    "tree4x4x12": dict(decoding_mode="tree", tree_top_k=4, tree_depth=4, tree_total_tokens=12),
}


def unrolled_agreement(draft, vlm, processor, root: str, steps: int = 3) -> list[float]:
    """Top-1 agreement of each of `steps` unrolled steps on 64 held-out rows (the trainer's evaluation)."""
    args = TrainingArguments(
        output_dir=f"{root}/tmp",
        per_device_eval_batch_size=8,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = SpecVLMDistillationTrainer(
        draft, vlm, args, data_collator=SpecVLMDataCollator(processor), unroll_steps=steps
    )
    metrics = trainer.evaluate(eval_dataset=make_toy_rows(64, 0, split="eval"))
    draft.eval()
    return [metrics[f"eval_top1_agreement_step{j}"] for j in range(1, steps + 1)]


def acceptance(draft, vlm, processor, n_prompts: int = 24, max_new_tokens: int = 64) -> dict:
    prompts = [prompt_inputs(processor, r) for r in load_rows(None, n_prompts, 0, eval_rows=True)]
    results = {}
    with torch.no_grad():
        plain = [vlm.generate(**p, max_new_tokens=max_new_tokens, do_sample=False) for p in prompts]
        for key, kwargs in SETTINGS.items():
            accepted, lossless = [], True
            for p, ref in zip(prompts, plain):
                out = vlm.generate(
                    **p, assistant_model=draft, max_new_tokens=max_new_tokens, do_sample=False, **kwargs
                )
                lossless &= torch.equal(out, ref)
                accepted += list(draft.last_generation_stats.accepted_lengths)
            results[key] = {
                "mean_accepted_length": sum(accepted) / len(accepted),
                "verify_steps": len(accepted),
                "lossless": lossless,
                "p_accept_ge": [round(sum(a > j for a in accepted) / len(accepted), 3) for j in range(1, 6)],
            }
            print(key, json.dumps(results[key]), flush=True)
    return results


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    name, arch, layers, unroll, steps = argv[0], argv[1], json.loads(argv[2]), int(argv[3]), int(argv[4])
    root = argv[5] if len(argv) > 5 else "/tmp/e3"
    out = f"{root}/{name}"
    vlm, processor, _ = load_target(None, "tiny", None, 0, progress=False)
    vlm = vlm.float()
    if steps == 0:
        draft = SpecVLMDraftModel.from_pretrained(out, target=vlm)
        print(name, "eval_agreement", unrolled_agreement(draft, vlm, processor, root), flush=True)
        if len(argv) > 6:  # and the acceptance on N_PROMPTS prompts
            n_prompts = int(argv[6])
            with open(f"{root}/{name}_p{n_prompts}.json", "w") as f:
                json.dump(acceptance(draft, vlm, processor, n_prompts), f, indent=1)
        return
    torch.manual_seed(0)
    config = SpecVLMDraftConfig.from_target(vlm, draft_architecture=arch, target_layers=layers)
    draft = SpecVLMDraftModel(config).bind(vlm)
    budget = TrainBudget(steps=steps, batch_size=8, learning_rate=3e-3)
    rows = load_rows(None, 2000, 0)
    train = distill_draft(draft, vlm, processor, rows, budget, seed=0, progress=False, unroll_steps=unroll)
    draft.save_pretrained(out)
    print(name, "train", json.dumps(train), flush=True)
    agreement = unrolled_agreement(draft, vlm, processor, root)
    print(name, "eval_agreement", agreement, flush=True)
    record = {
        "name": name,
        "arch": arch,
        "layers": layers,
        "unroll": unroll,
        "train": train,
        "eval_agreement": agreement,
        "accept": acceptance(draft, vlm, processor),
    }
    with open(f"{root}/{name}.json", "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
