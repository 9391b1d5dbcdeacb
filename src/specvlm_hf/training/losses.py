"""Distillation losses for the SpecVLM draft (pure functions, no state).

The draft is trained online against the frozen target (EAGLE-style teacher forcing):

    loss = ce_weight * soft_CE(p_target, q_draft) + feature_weight * SmoothL1(f_draft, f_target_next) + gate_cost

with the paper's weights `ce_weight=0.1`, `feature_weight=1.0`. Every reduction is a mean over the masked
positions (response tokens), so the value does not depend on padding or prompt length.

Shapes: logits (..., V), features (..., h), mask (...) bool/0-1 over the same leading dims (None = all).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _mask_like(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mask as float over the leading dims of `x` (all ones when None)."""
    if mask is None:
        return torch.ones(x.shape[:-1], dtype=torch.float32, device=x.device)
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match leading dims {tuple(x.shape[:-1])}")
    return mask.to(device=x.device, dtype=torch.float32)


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # sum over masked positions / number of masked positions; 0 (with a graph) when nothing is masked
    return (per_position * mask).sum() / mask.sum().clamp(min=1.0)


def soft_cross_entropy(
    target_logits: torch.Tensor,
    draft_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean over masked positions of  -sum_v p(v) log q(v),  p = softmax(target/T), q = softmax(draft/T).

    target_logits, draft_logits: (..., V); mask: (...). Computed in float32. The target side carries no gradient.
    """
    if temperature <= 0:
        raise ValueError(f"soft_cross_entropy: invalid temperature={temperature!r}; expected a number > 0.")
    p = F.softmax(target_logits.detach().float() / temperature, dim=-1)  # target probs
    log_q = F.log_softmax(draft_logits.float() / temperature, dim=-1)  # draft log-probs
    per_position = -(p * log_q).sum(-1)  # (...)
    return _masked_mean(per_position, _mask_like(draft_logits, mask))


def draft_vocab_soft_cross_entropy(
    target_logits: torch.Tensor,
    draft_logits: torch.Tensor,
    draft_vocab_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Soft cross-entropy of a reduced-vocabulary draft head against the target restricted to that vocabulary.

    target_logits: (..., V) full target logits; draft_logits: (..., Vd); draft_vocab_ids: (Vd,) target id of each
    draft column. The target's probabilities restricted to the draft vocabulary and renormalised,
    p_d(j) = p(ids[j]) / sum_i p(ids[i]), are exactly softmax(target_logits[..., ids]), so this is
    soft_cross_entropy on the gathered target logits: mean over masked positions of -sum_j p_d(j) log q(j).
    """
    ids = draft_vocab_ids.to(target_logits.device)
    restricted = target_logits.index_select(-1, ids).to(draft_logits.device)  # (..., Vd)
    return soft_cross_entropy(restricted, draft_logits, mask, temperature=temperature)


def feature_smooth_l1(
    draft_features: torch.Tensor,
    target_features: torch.Tensor,
    mask: torch.Tensor | None = None,
    beta: float = 1.0,
) -> torch.Tensor:
    """SmoothL1 (Huber with `beta`) averaged over the feature dim, then over masked positions (as EAGLE does).

    draft_features, target_features: (..., h); mask: (...).
    """
    per_element = F.smooth_l1_loss(
        draft_features.float(), target_features.detach().float(), reduction="none", beta=beta
    )
    return _masked_mean(per_element.mean(-1), _mask_like(draft_features, mask))


def top1_agreement(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    draft_vocab_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fraction of masked positions where argmax(draft) == argmax(target) (greedy acceptance rate). No grad.

    draft_vocab_ids: (Vd,) target id of each draft column when draft_logits are (..., Vd) (reduced vocabulary).
    """
    with torch.no_grad():
        draft_top = draft_logits.argmax(-1)
        if draft_vocab_ids is not None:
            draft_top = draft_vocab_ids.to(draft_top.device)[draft_top]  # draft column -> target token id
        agree = (draft_top.to(target_logits.device) == target_logits.argmax(-1)).float()
        return _masked_mean(agree, _mask_like(draft_logits, mask))


def expected_accepted_length(
    per_step_agreement: Sequence[float] | torch.Tensor, depth: int | None = None
) -> float:
    """Estimated mean accepted length of greedy chain drafting from per-depth top-1 agreement.

    With a_j the probability that the draft's depth-j token matches the target given that tokens 1..j-1 matched,
    a chain of `depth` drafted tokens is accepted up to the first mismatch, and every verification step also
    yields the target's own next token, so

        E[accepted length] = 1 + sum_{j=1}^{depth} prod_{i=1}^{j} a_i

    (the paper's "mean accepted length", bonus token included; 1 = no speedup, depth + 1 = every draft accepted).
    `depth` defaults to the number of given rates; when it is larger, the last rate is repeated (a single
    teacher-forced agreement a gives 1 + a + a^2 + ... + a^depth). Teacher-forced agreement is measured with the
    target's true features, so it is an optimistic estimate for depths > 1 unless the rates come from unrolled
    ("training-time test") steps.
    """
    rates = [
        float(a)
        for a in (per_step_agreement.tolist() if torch.is_tensor(per_step_agreement) else per_step_agreement)
    ]
    if not rates:
        return 1.0
    if any(not 0.0 <= a <= 1.0 for a in rates):
        raise ValueError(f"expected_accepted_length: agreement rates must lie in [0, 1], got {rates!r}.")
    depth = len(rates) if depth is None else depth
    if depth < 0:
        raise ValueError(f"expected_accepted_length: invalid depth={depth!r}; expected an integer >= 0.")
    rates = (rates + [rates[-1]] * depth)[:depth]
    length, prefix = 1.0, 1.0
    for a in rates:
        prefix *= a  # probability that the first j drafted tokens are all accepted
        length += prefix
    return length


def distillation_loss(
    draft_logits: torch.Tensor,
    draft_features: torch.Tensor,
    target_logits: torch.Tensor,
    target_next_features: torch.Tensor,
    mask: torch.Tensor | None = None,
    ce_weight: float = 0.1,
    feature_weight: float = 1.0,
    gate_cost: torch.Tensor | None = None,
    temperature: float = 1.0,
    draft_vocab_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """SpecVLM's online distillation objective.

    draft_logits (..., V), draft_features (..., h): the draft's outputs at rows whose targets are
    target_logits (..., V) (the target's distribution for the same next token) and target_next_features (..., h).
    gate_cost: the compressor's (already weighted) compute cost term, added as is; None counts as 0.
    draft_vocab_ids: (Vd,) for a reduced-vocabulary draft whose draft_logits are (..., Vd): the CE term is then
    `draft_vocab_soft_cross_entropy` (target restricted to the draft vocabulary, renormalised).
    Returns {"loss", "ce", "feature", "gate_cost"} (scalar tensors; "loss" carries the gradient).
    """
    if draft_vocab_ids is None:
        ce = soft_cross_entropy(target_logits, draft_logits, mask, temperature=temperature)
    else:
        ce = draft_vocab_soft_cross_entropy(
            target_logits, draft_logits, draft_vocab_ids, mask, temperature=temperature
        )
    feature = feature_smooth_l1(draft_features, target_next_features, mask)
    if gate_cost is None:
        gate_cost = torch.zeros((), device=ce.device)
    loss = ce_weight * ce + feature_weight * feature + gate_cost.to(ce.device, torch.float32)
    return {"loss": loss, "ce": ce, "feature": feature, "gate_cost": gate_cost}


__all__ = [
    "soft_cross_entropy",
    "draft_vocab_soft_cross_entropy",
    "feature_smooth_l1",
    "distillation_loss",
    "top1_agreement",
    "expected_accepted_length",
]
