"""The draft's real acceptance, measured during training: the number that decides speed, next to its proxies.

Top-1 agreement under teacher forcing is a proxy: deeper drafted tokens read the draft's own features, which the
training loss never feeds it. `EvalAcceptance` measures what decoding gets instead: at every evaluation, a few
held-out prompts are answered by the frozen target with speculative decoding (`vlm.generate(...,
assistant_model=draft)`, lossless) in chain mode with a fixed number of drafted tokens and in tree mode with the
automatic budget, and the mean accepted length per verify step (bonus token included) of each is logged:

    eval_accepted_length_chain{k}   chain drafting of exactly k tokens per step (greedy)
    eval_accepted_length_tree       the automatic tree (`generation/budget.py`: its size follows the measured costs
                                    of this machine, so it is comparable between evaluations of one run)

`SpecVLMDistillationTrainer` measures it inside its evaluation loop (so it is in the logs, in the metrics
`evaluate()` returns and in ``trainer_state.json``'s ``log_history``) whenever the evaluation rows are vision-chat
rows and the collator can render prompts (`SpecVLMDataCollator.encode_prompts`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .collator import content_images


def check_positive_int(owner: str, name: str, value) -> None:
    """Raise a ValueError that names ``owner``, the setting and its value unless ``value`` is an integer >= 1: a
    count or a length in a settings object."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: invalid {name}={value!r}; expected an integer >= 1.")


@dataclass(frozen=True)
class EvalAcceptance:
    """Settings of the acceptance measured at each evaluation.

    num_prompts: the first rows of the evaluation set that are measured (their first assistant turn is the one
        answered); chain_tokens: the fixed chain length k; tree: also measure the automatic tree;
    max_new_tokens: the length of each answer.
    """

    num_prompts: int = 4
    chain_tokens: int = 8
    tree: bool = True
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        for name in ("num_prompts", "chain_tokens", "max_new_tokens"):
            check_positive_int("EvalAcceptance", name, getattr(self, name))

    def prompts(self, dataset, collator) -> list[dict]:
        """Batch-1 generation prompts from the first ``num_prompts`` rows with an assistant turn (empty when the
        rows are no vision-chat rows or the collator cannot render prompts)."""
        if dataset is None or not hasattr(collator, "encode_prompts"):
            return []
        prompts = []
        for row in dataset:
            if len(prompts) == self.num_prompts:
                break
            messages = row.get("messages") if isinstance(row, dict) else None
            if not messages:
                return []
            first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
            if first is None or first == 0:
                continue
            history = list(messages[:first])
            images = list(row.get("images") or [])[: sum(content_images(m) for m in history)]
            prompts.append(collator.encode_prompts([(history, images)], padding_side="left"))
        return prompts

    def settings(self, tree: bool | None = None) -> dict[str, dict]:
        """metric name -> the decoding settings of one `generate` call (tree: override ``self.tree``)."""
        out = {
            f"accepted_length_chain{self.chain_tokens}": {
                "decoding_mode": "chain",
                "num_draft_tokens": self.chain_tokens,
                "draft_confidence_threshold": 0.0,
            }
        }
        if self.tree if tree is None else tree:
            out["accepted_length_tree"] = {"decoding_mode": "tree"}
        return out

    @torch.no_grad()
    def measure(self, draft, prompts: list[dict], tree: bool | None = None) -> dict[str, float]:
        """Mean accepted length per verify step over all ``prompts`` (every step of every prompt weighs the same),
        per setting; greedy, the draft in eval mode (restored after)."""
        if not prompts:
            return {}
        target = draft.target
        device = next(target.parameters()).device
        was_training = draft.training
        draft.eval()
        results = {}
        try:
            for name, kwargs in self.settings(tree).items():
                accepted = []
                for inputs in prompts:
                    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
                    target.generate(
                        **inputs,
                        assistant_model=draft,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        **kwargs,
                    )
                    accepted += list(draft.last_generation_stats.accepted_lengths)
                if accepted:
                    results[name] = sum(accepted) / len(accepted)
        finally:
            draft.train(was_training)
        return results


__all__ = ["EvalAcceptance"]
