# python examples/quickstart.py
"""SpecVLM in a few lines, offline: toy LLaVA target, a briefly distilled draft, lossless speculative generate.

The toy target is trained and cached on first use (``$SPECVLM_HF_CACHE`` or ``~/.cache/specvlm_hf``).
Swap in any supported VLM and its processor (e.g. ``llava-hf/llava-1.5-7b-hf``) for real use.
"""

from __future__ import annotations

import torch
from transformers import TrainingArguments

from specvlm_hf import SpecVLMDataCollator, SpecVLMDistillationTrainer, SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.toy.world import load_toy_target, make_toy_dataset, toy_generate_inputs, toy_prompts


def main() -> None:
    torch.manual_seed(0)
    vlm, processor = load_toy_target("tiny")

    # 1. a draft sized for the target (EagleVLM + the elastic visual compressor in "select" mode)
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(vlm, compressor_mode="select")).bind(vlm)

    # 2. online distillation from the frozen target (a short run; train much longer for real speed-ups)
    args = TrainingArguments(
        output_dir="/tmp/specvlm-quickstart",
        max_steps=100,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        save_strategy="no",
        report_to=[],
        logging_steps=25,
    )
    trainer = SpecVLMDistillationTrainer(
        model=draft,
        target_model=vlm,
        args=args,
        train_dataset=make_toy_dataset(800, seed=0),
        data_collator=SpecVLMDataCollator(processor),
    )
    trainer.train()
    draft.eval()

    # 3. speculative decoding through the target's own generate: greedy output is identical to plain generate
    row = toy_prompts(1, seed=0)[0]
    inputs = toy_generate_inputs(processor, row)
    with torch.inference_mode():
        plain = vlm.generate(**inputs, max_new_tokens=48, do_sample=False)
        fast = vlm.generate(**inputs, max_new_tokens=48, do_sample=False, assistant_model=draft)
    prompt_len = inputs["input_ids"].shape[1]
    print("answer   :", processor.tokenizer.decode(fast[0, prompt_len:], skip_special_tokens=True))
    print("identical:", torch.equal(plain, fast))
    stats = draft.last_generation_stats
    print(
        f"mean accepted length {stats.mean_accepted_length:.2f}, target forwards {stats.target_forwards}, "
        f"new tokens {stats.new_tokens}"
    )


if __name__ == "__main__":
    main()
