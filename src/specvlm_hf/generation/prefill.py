"""The prompt: the target's prefill as plain generate runs it, and the draft's pass over the prompt's features."""

from __future__ import annotations

import torch

from ..targets import features as target_features
from .settings import GenerationStats


def target_prefill(model, draft, input_ids: torch.Tensor, model_kwargs: dict):
    """Run the target on the prompt as plain generate would, returning what the draft needs.

    Returns (outputs, inputs_embeds (1, L, h), features (1, L, n*h)).
    """
    model_inputs = model.prepare_inputs_for_generation(input_ids, is_first_iteration=True, **model_kwargs)
    model_inputs["output_hidden_states"] = target_features.hidden_state_request(draft.config.target_layers)
    if "logits_to_keep" in model_inputs:
        model_inputs["logits_to_keep"] = 1
    with target_features.capture_decoder_inputs(model) as captured:
        outputs = model(**model_inputs)
    features = target_features.select_features(outputs.hidden_states, draft.config.target_layers)
    return outputs, captured[0], features


def draft_prefill(
    draft, prompt_ids, prompt_embeds, prompt_feats, next_token, spans, cache, stats: GenerationStats
):
    """Run the draft over the prompt (compressing its visual rows if it has a compressor) into `cache`.

    next_token: (1, 1) the token after the prompt (the first generated one). Records the visual-token stats and
    returns the draft output of the last row, (1, 1, h): the root of the first draft.
    """
    compressed = draft.compressor is not None
    ctx = draft.prepare_context(
        prompt_ids,
        prompt_embeds,
        prompt_feats,
        next_embeds=draft.embed_tokens(next_token),
        spans=[spans] if compressed else None,
    )
    stats.visual_tokens = sum(s.length for s in spans)
    stats.draft_visual_tokens = ctx.kept_visual_tokens[0] if compressed else stats.visual_tokens
    stats.compressor_choice = ctx.choices[0] if ctx.choices else None
    out = draft(fused_inputs=ctx.fused, position_ids=ctx.position_ids, past_key_values=cache)
    return out.last_hidden_state[:, -1:]
