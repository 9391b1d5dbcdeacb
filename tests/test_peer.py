"""The assisted peer (`toy.peer`): built from the target, same trainable parameters as our draft, trains, widens
exactly, and runs in transformers' assisted generation with the prompt's image."""

from __future__ import annotations

import itertools

import pytest
import torch

from specvlm_hf.toy import peer as peer_mod
from specvlm_hf.toy.drafts import TrainBudget, new_draft
from tiny_models import make_inputs, make_tiny_target


@pytest.fixture(scope="module")
def target():
    return make_tiny_target("llava")


def _batch(vlm, seed=0):
    inputs = make_inputs("llava", vlm, seed=seed)
    response = torch.zeros_like(inputs["input_ids"])
    response[:, -4:] = 1
    return {**inputs, "response_mask": response}


def test_peer_matches_the_draft_parameter_budget_and_starts_from_the_target(target):
    draft = new_draft(target)
    text = target.config.text_config
    size = peer_mod.peer_intermediate_size(sum(p.numel() for p in draft.parameters()), text)
    peer = peer_mod.new_peer(target, size)
    assert peer.config.text_config.num_hidden_layers == 1
    assert peer.config.text_config.hidden_size == text.hidden_size
    trainable = peer_mod.peer_trainable_parameters(peer)
    draft_params = sum(p.numel() for p in draft.parameters())
    assert abs(trainable - draft_params) <= 3 * text.hidden_size / 2 + 1  # rounding of the MLP width
    names = [n for n, p in peer.named_parameters() if p.requires_grad]
    assert names and all(
        "language_model.layers.0" in n or n.endswith("language_model.norm.weight") for n in names
    )
    torch.testing.assert_close(peer.lm_head.weight, target.lm_head.weight)
    # at init the peer is the target truncated to its first layer (extra MLP units have a zero down_proj)
    ref = type(target)(target.config.__class__.from_dict(target.config.to_dict())).eval()
    ref.load_state_dict(target.state_dict())
    del ref.model.language_model.layers[1:]
    inputs = make_inputs("llava", target, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(peer(**inputs).logits, ref(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_peer_training_lowers_the_distillation_loss(target):
    peer = peer_mod.new_peer(target, 80)
    batch = _batch(target)
    before, _ = peer_mod.peer_distillation_loss(peer, target, batch)
    metrics = peer_mod.train_peer(
        peer, target, itertools.repeat(batch), TrainBudget(steps=30, learning_rate=3e-3)
    )
    after, _ = peer_mod.peer_distillation_loss(peer, target, batch)
    assert metrics["train_steps"] == 30 and after.item() < before.item()
    assert not peer.training


def test_widened_peer_computes_the_tiny_peer(target):
    peer = peer_mod.new_peer(target, 80)
    with torch.no_grad():
        for p in peer.model.language_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    text = target.config.text_config
    dims = {"hidden": 2 * text.hidden_size, "intermediate": 2 * text.intermediate_size, "layers": 4}
    dims["heads"] = dims["hidden"] // text.head_dim
    dims["kv_heads"] = dims["heads"]
    from specvlm_hf.toy.widen import widen_toy_target

    big = widen_toy_target(target, dims=dims)
    wide = peer_mod.widen_peer(peer, big)
    wt = wide.config.text_config
    assert wt.hidden_size == 2 * text.hidden_size and wt.intermediate_size == 80
    assert (
        wt.num_attention_heads == text.num_attention_heads
        and wt.num_key_value_heads == text.num_key_value_heads
    )
    inputs = make_inputs("llava", target, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(wide(**inputs).logits, peer(**inputs).logits, atol=1e-4, rtol=1e-4)


def test_assisted_peer_sees_the_image_and_stays_lossless(target):
    """transformers gives an assistant no image: the bench hands the peer the prompt's pixel values in its prefill."""
    from specvlm_hf.toy import methods

    peer = peer_mod.new_peer(target, 48)
    calls = []
    handle = peer.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    inputs = make_inputs("llava", target, seed=0)
    plain = target.generate(**inputs, max_new_tokens=6, do_sample=False)
    try:
        blind = methods.Method("assisted", "assisted", assistant=peer)
        assert methods._generate(target, blind, inputs, 6, 0.0).tolist() == plain.tolist()
        assert not calls  # stock assisted generation: the assistant never sees the image
        seeing = methods.Method("assisted_peer", "assisted", assistant=peer, assistant_sees_images=True)
        assert methods._generate(target, seeing, inputs, 6, 0.0).tolist() == plain.tolist()
        assert len(calls) == 1  # once, in the assistant's prefill
    finally:
        handle.remove()
