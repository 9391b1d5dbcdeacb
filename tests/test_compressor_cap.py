"""A visual compressor never gives the draft more rows than a span has (issue #15: "concat" kept 6 of 4)."""

from __future__ import annotations

import pytest
import torch

from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.targets import families as targets
from specvlm_hf.targets import features as target_features
from tiny_models import FAMILIES, make_inputs, make_tiny_target

VISION_FAMILIES = [f for f in FAMILIES if f not in ("llama", "qwen2")]
MODES = ["concat", "select", "weighted", "prune", "pool", "conv", "resampler"]


@pytest.mark.parametrize("family", VISION_FAMILIES)
def test_compressor_keeps_at_most_every_span_row(family):
    model = make_tiny_target(family)
    inputs = make_inputs(family, model, seed=0)
    model_kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    spans = targets.visual_spans(model, inputs["input_ids"], model_kwargs)
    assert spans
    for mode in MODES:
        draft = (
            SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model, compressor_mode=mode)).bind(model).eval()
        )
        with torch.no_grad(), target_features.capture_decoder_inputs(model) as captured:
            out = model(**inputs, output_hidden_states=True)
            embeds = captured[0]
            feats = target_features.select_features(out.hidden_states, draft.config.target_layers)
            for span in spans:  # one span at a time: the cap holds per span
                ctx = draft.prepare_context(inputs["input_ids"], embeds, feats, spans=[[span]])
                assert ctx.kept_visual_tokens[0] <= span.length, (family, mode, span.length)
