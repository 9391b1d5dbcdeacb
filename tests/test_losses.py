from __future__ import annotations

import math

import pytest
import torch

from specvlm_hf.training.losses import (
    distillation_loss,
    expected_accepted_length,
    feature_smooth_l1,
    soft_cross_entropy,
    top1_agreement,
)

LN3 = math.log(3.0)


def test_soft_cross_entropy_hand_values():
    # p = softmax([0, ln 3]) = [1/4, 3/4]
    target = torch.tensor([[[0.0, LN3], [0.0, LN3]]])
    # q = [1/2, 1/2] -> CE = ln 2;  q = [3/4, 1/4] -> CE = -(1/4 ln 3/4 + 3/4 ln 1/4)
    draft = torch.tensor([[[0.0, 0.0], [LN3, 0.0]]])
    ce_second = -(0.25 * math.log(0.75) + 0.75 * math.log(0.25))
    assert soft_cross_entropy(target, draft, torch.tensor([[1, 0]])).item() == pytest.approx(
        math.log(2), abs=1e-6
    )
    assert soft_cross_entropy(target, draft, torch.tensor([[0, 1]])).item() == pytest.approx(
        ce_second, abs=1e-6
    )
    both = (math.log(2) + ce_second) / 2
    assert soft_cross_entropy(target, draft, torch.tensor([[True, True]])).item() == pytest.approx(
        both, abs=1e-6
    )
    assert soft_cross_entropy(target, draft).item() == pytest.approx(both, abs=1e-6)


def test_soft_cross_entropy_temperature_and_minimum():
    target = torch.tensor([[0.0, 2 * LN3]])
    # T = 2 -> p = [1/4, 3/4]; draft logits 2*[0, ln 3] at T = 2 -> q = p -> CE = entropy(p)
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    got = soft_cross_entropy(target, target.clone(), temperature=2.0)
    assert got.item() == pytest.approx(entropy, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        soft_cross_entropy(target, target, temperature=0.0)


def test_soft_cross_entropy_gradient_only_on_draft():
    target = torch.randn(2, 3, 7, requires_grad=True)
    draft = torch.randn(2, 3, 7, requires_grad=True)
    soft_cross_entropy(target, draft).backward()
    assert target.grad is None and draft.grad is not None


def test_empty_mask_gives_zero_with_graph():
    draft = torch.randn(1, 2, 5, requires_grad=True)
    loss = soft_cross_entropy(torch.randn(1, 2, 5), draft, torch.zeros(1, 2))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(draft.grad == 0)


def test_feature_smooth_l1_hand_values():
    # |d| = 0.5 -> 0.5 * 0.5^2 = 0.125 ; |d| = 2 -> 2 - 0.5 = 1.5 ; mean over h = 0.8125
    draft = torch.tensor([[[0.5, -2.0], [10.0, 10.0]]])
    target = torch.zeros(1, 2, 2)
    assert feature_smooth_l1(draft, target, torch.tensor([[1, 0]])).item() == pytest.approx(0.8125)
    assert feature_smooth_l1(draft, target).item() == pytest.approx((0.8125 + 9.5) / 2)
    with pytest.raises(ValueError, match="mask shape"):
        feature_smooth_l1(draft, target, torch.ones(2, 2))


def test_top1_agreement():
    draft = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    target = torch.tensor([[[2.0, 0.0], [3.0, 0.0], [0.0, 1.0]]])
    assert top1_agreement(draft, target).item() == pytest.approx(1 / 3)
    assert top1_agreement(draft, target, torch.tensor([[1, 1, 0]])).item() == pytest.approx(0.5)


def test_expected_accepted_length():
    assert expected_accepted_length([0.5, 0.5]) == pytest.approx(1.75)  # 1 + 0.5 + 0.25
    assert expected_accepted_length([0.8], depth=3) == pytest.approx(1 + 0.8 + 0.64 + 0.512)
    assert expected_accepted_length(torch.tensor([1.0, 1.0, 1.0])) == pytest.approx(4.0)
    assert expected_accepted_length([0.0, 1.0]) == pytest.approx(1.0)
    assert expected_accepted_length([0.9, 0.5], depth=1) == pytest.approx(1.9)
    assert expected_accepted_length([]) == 1.0
    with pytest.raises(ValueError):
        expected_accepted_length([1.5])


def test_distillation_loss_combines_parts():
    target_logits = torch.tensor([[[0.0, LN3]]])
    draft_logits = torch.tensor([[[0.0, 0.0]]], requires_grad=True)
    draft_feat = torch.tensor([[[0.5, -2.0]]], requires_grad=True)
    target_feat = torch.zeros(1, 1, 2)
    out = distillation_loss(draft_logits, draft_feat, target_logits, target_feat, torch.ones(1, 1))
    assert out["ce"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out["feature"].item() == pytest.approx(0.8125)
    assert out["gate_cost"].item() == 0.0
    assert out["loss"].item() == pytest.approx(0.1 * math.log(2) + 0.8125, abs=1e-6)
    out = distillation_loss(
        draft_logits,
        draft_feat,
        target_logits,
        target_feat,
        None,
        ce_weight=1.0,
        feature_weight=0.5,
        gate_cost=torch.tensor(0.25),
    )
    assert out["loss"].item() == pytest.approx(math.log(2) + 0.5 * 0.8125 + 0.25, abs=1e-6)
    out["loss"].backward()
    assert draft_logits.grad is not None and draft_feat.grad is not None
