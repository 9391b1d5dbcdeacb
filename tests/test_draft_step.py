"""The decoding draft step (`backends.draft_step`): the per-vocabulary fusion table computes the plain fusion."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel, backends
from specvlm_hf.backends import decode_plan
from specvlm_hf.backends.packed_linear import cached_derived
from tiny_models import make_tiny_target


def _draft():
    target = make_tiny_target("llava")
    torch.manual_seed(0)
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(target)).bind(target).eval()
    with torch.no_grad():
        draft.fc.weight.mul_(3.0)
    return draft


def _plain_step(draft, ids, hidden, positions):
    return draft(
        inputs_embeds=draft.embed_tokens(ids)[None],
        hidden_states=hidden[None],
        position_ids=positions,
        past_key_values=DynamicCache(),
    ).last_hidden_state[0]


def test_token_table_matches_plain_fusion_and_follows_weight_updates():
    draft = _draft()
    h = draft.config.hidden_size
    ids = torch.tensor([3, 17, 5, 3])
    hidden = torch.randn(4, h)
    positions = torch.arange(4)[None]
    with torch.no_grad(), backends.accelerated(draft):  # the table belongs to the decode plan
        expected = _plain_step(draft, ids, hidden, positions)
        got = backends.draft_step(draft, ids, hidden, position_ids=positions, past_key_values=DynamicCache())
        assert cached_derived(draft, "token_table") is not None  # the table path really ran
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the table is rebuilt when the fusion weights change (e.g. more training), for the next generate call
    with torch.no_grad():
        draft.fc.weight.add_(0.05 * torch.randn_like(draft.fc.weight))
    with torch.no_grad(), backends.accelerated(draft):
        expected = _plain_step(draft, ids, hidden, positions)
        got = backends.draft_step(draft, ids, hidden, position_ids=positions, past_key_values=DynamicCache())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_token_table_skipped_when_too_big(monkeypatch):
    draft = _draft()
    monkeypatch.setattr(decode_plan, "TOKEN_TABLE_MAX_ELEMENTS", 10)
    h = draft.config.hidden_size
    ids, hidden, positions = torch.tensor([1, 2]), torch.randn(2, h), torch.arange(2)[None]
    with torch.no_grad(), backends.accelerated(draft):
        got = backends.draft_step(draft, ids, hidden, position_ids=positions, past_key_values=DynamicCache())
        torch.testing.assert_close(got, _plain_step(draft, ids, hidden, positions))
    assert cached_derived(draft, "token_table") is None


def test_rope_table_built_in_inference_mode_does_not_break_training():
    """Decoding runs under inference_mode; the RoPE table it builds must not leak into a later training step."""
    draft = _draft()
    h = draft.config.hidden_size
    e, f = torch.randn(1, 5, h), torch.randn(1, 5, h)
    with torch.inference_mode():
        before = draft(inputs_embeds=e, hidden_states=f).last_hidden_state.clone()
    draft.train()
    out = draft(inputs_embeds=e, hidden_states=f).last_hidden_state
    out.sum().backward()
    assert draft.fc.weight.grad is not None
    torch.testing.assert_close(out.detach(), before)
