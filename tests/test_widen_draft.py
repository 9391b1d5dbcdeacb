"""The widened draft (for the widened toy target) computes exactly what the small draft computes."""

from __future__ import annotations

import pytest
import torch

from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.targets import families as targets
from specvlm_hf.targets import features as target_features
from specvlm_hf.toy.world import widen_draft, widen_toy_target
from tiny_models import make_inputs, make_tiny_target


@pytest.mark.parametrize("compressor_mode", [None, "pool", "conv", "select"])
def test_widened_draft_matches_small_draft(compressor_mode):
    torch.manual_seed(0)
    small = make_tiny_target("llava")
    text = small.config.text_config
    dims = {
        "hidden": 2 * text.hidden_size,
        "intermediate": 2 * text.intermediate_size,
        "heads": 2 * text.hidden_size // text.head_dim,
        "layers": 2 * text.num_hidden_layers,
    }
    big = widen_toy_target(small, dims=dims)
    overrides = {"compressor_mode": compressor_mode}
    if compressor_mode == "select":
        overrides["compressor_primitives"] = ["pool", "conv", "prune", "text_only"]
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(small, **overrides)).bind(small)
    with torch.no_grad():  # move away from the init so the comparison means something
        for p in draft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    draft.eval()
    wide = widen_draft(draft, big).bind(big)
    inputs = make_inputs("llava", small, seed=1)
    with torch.no_grad(), target_features.capture_decoder_inputs(small) as captured:
        out = small(**inputs, output_hidden_states=True)
    feats = out.hidden_states[-1]
    h, hh = text.hidden_size, 2 * text.hidden_size
    pad = lambda x: torch.cat([x, x.new_zeros(*x.shape[:-1], hh - h)], dim=-1)  # noqa: E731
    spans = [targets.visual_spans(small, inputs["input_ids"], inputs)]
    ids = inputs["input_ids"]
    with torch.no_grad():
        ctx_s = draft.prepare_context(ids, captured[0], feats, spans=spans)
        ctx_b = wide.prepare_context(ids, pad(captured[0]), pad(feats), spans=spans)
        hid_s = draft(fused_inputs=ctx_s.fused, position_ids=ctx_s.position_ids).last_hidden_state
        hid_b = wide(fused_inputs=ctx_b.fused, position_ids=ctx_b.position_ids).last_hidden_state
    assert ctx_s.choices == ctx_b.choices and ctx_s.kept_visual_tokens == ctx_b.kept_visual_tokens
    torch.testing.assert_close(hid_b[..., :h], hid_s, atol=1e-4, rtol=1e-4)
    assert hid_b[..., h:].abs().max() < 1e-6
    torch.testing.assert_close(wide.compute_logits(hid_b), draft.compute_logits(hid_s), atol=1e-4, rtol=1e-4)
