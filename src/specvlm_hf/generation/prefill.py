"""The draft's context: the target's prefill as plain generate runs it, the draft's pass over the prompt's features,
and the draft consuming verified tokens (`feed_draft`)."""

from __future__ import annotations

import dataclasses

import torch

from ..backends import draft_step
from ..targets import families as targets
from ..targets import features as target_features
from .masks import additive_mask
from .settings import GenerationStats


def uncached_length(input_ids: torch.Tensor, model_kwargs: dict) -> int | None:
    """How many trailing prompt tokens the prefill must run when `generate` got a filled cache (multi-turn reuse);
    None: all of them. The rule of plain generate's prefill: with a cache of P positions and input_ids spanning the
    attention mask (the whole conversation), only input_ids[:, P:] are new."""
    cache = model_kwargs.get("cache")
    past = cache.get_seq_length() if cache is not None else 0
    if past == 0:
        return None
    embeds = model_kwargs.get("inputs_embeds")
    if embeds is not None:
        return embeds.shape[1] - past  # inputs_embeds always hold the whole conversation
    mask = model_kwargs.get("attention_mask")
    if mask is not None and mask.shape[1] != input_ids.shape[1]:
        return None  # only the new tokens were passed
    return input_ids.shape[1] - past


def draft_prompt_ids(input_ids: torch.Tensor, n: int, pad_id: int = 0) -> torch.Tensor:
    """(1, n): the ids of the n prompt positions the prefill ran, for the draft's context. With `inputs_embeds`
    and no `input_ids` the ids are unknown: pad ids stand in (the draft reads the target's embeddings, not the
    ids; no visual span is found, so no visual compression)."""
    if input_ids.shape[1] >= n:
        return input_ids[:, input_ids.shape[1] - n :]
    missing = input_ids.new_full((input_ids.shape[0], n - input_ids.shape[1]), pad_id)
    return torch.cat([missing, input_ids], dim=1)


def target_prefill(model, draft, input_ids: torch.Tensor, model_kwargs: dict):
    """Run the target on the prompt as plain generate would, returning what the draft needs.

    Returns (outputs, inputs_embeds (1, S, h), features (1, S, n*h)) for the S prompt tokens the forward ran: all
    of them, or only those after a reused cache (`uncached_length`).
    """
    model_inputs = model.prepare_inputs_for_generation(
        input_ids,
        next_sequence_length=uncached_length(input_ids, model_kwargs),
        is_first_iteration=True,
        **model_kwargs,
    )
    model_inputs["output_hidden_states"] = target_features.hidden_state_request(draft.config.target_layers)
    if "logits_to_keep" in model_inputs:
        model_inputs["logits_to_keep"] = 1
    with target_features.capture_decoder_inputs(model) as captured:
        outputs = model(**model_inputs)
    features = target_features.select_features(outputs.hidden_states, draft.config.target_layers)
    return outputs, captured[0], features


def last_prompt_positions(model, model_kwargs: dict, lengths: torch.Tensor) -> torch.Tensor:
    """Each sequence's position of its last cached prompt token as the prefill saw it: from the prefill's own
    `position_ids` where generate made them ((..., B, 1); M-RoPE), else `lengths - 1` (lengths (B, 1): prompt tokens
    per sequence, padding excluded); plus the family's offset (PaliGemma's prepare_inputs_for_generation adds 1 to
    0-based positions). Decoding continues from there."""
    position_ids = model_kwargs.get("position_ids")
    last = position_ids[..., -1:].clone() if position_ids is not None else lengths - 1
    return last + targets.get_target_spec(model).position_offset


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


def feed_draft(draft, draft_cache, tokens, feats: torch.Tensor, row_position: int) -> torch.Tensor:
    """The draft consumes verified tokens (m,), each paired with the target feature before it (m, n*h), at draft
    positions row_position.. ; returns the draft output of the last row (1, 1, h): the root of the next draft."""
    tokens = torch.as_tensor(tokens, device=feats.device)
    m = tokens.shape[0]
    return draft_step(
        draft,
        tokens,
        feats,
        position_ids=torch.arange(row_position, row_position + m, device=feats.device)[None],
        max_position=row_position + m - 1,
        past_key_values=draft_cache,
    )[None, -1:]


def batch_visual_spans(model, input_ids: torch.Tensor, valid: torch.Tensor, layout: dict) -> list[list]:
    """Each row's visual spans (in its unpadded token indices). The image tensors of a batch hold every row's
    images in row order, so the spans are found once over the rows laid end to end (a separator between rows) and
    handed back to their rows."""
    rows = [input_ids[b][valid[b]].tolist() for b in range(input_ids.shape[0])]
    joined, starts = [], []
    for ids in rows:
        starts.append(len(joined))
        joined += ids + [-1]
    spans = targets.visual_spans(model, torch.tensor([joined]), layout)
    per_row: list[list] = [[] for _ in rows]
    for span in spans:
        b = max(i for i, start in enumerate(starts) if start <= span.start)
        per_row[b].append(dataclasses.replace(span, start=span.start - starts[b]))
    return per_row


def feed_rows(
    draft, draft_cache, cache_valid, tokens, feats, counts, row_positions, max_position: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sequence's draft consumes its verified tokens in one forward.

    tokens (R, m), feats (R, m, n*h): row r's counts[r] tokens (each with the target feature before it) right-
    aligned, padding on the left; cache_valid (R, P) over the draft cache; row_positions (R,) draft position of
    each row's first token; max_position: the largest position fed, where the caller knows it on the host. Returns (the draft output of each row's last token (R, h), the new cache_valid)."""
    rows, m = tokens.shape
    device = tokens.device
    arange = torch.arange(m, device=device)
    real = arange[None] >= (m - counts)[:, None]  # (R, m): False on the left padding
    positions = (row_positions[:, None] + arange[None] - (m - counts)[:, None]).clamp_min(0)
    causal = torch.ones(m, m, dtype=torch.bool, device=device).tril()
    allowed = torch.cat(
        [cache_valid[:, None, :].expand(rows, m, -1), causal[None] & real[:, None, :]], dim=2
    )  # a padding row sees the valid prefix: never an empty row
    out = draft_step(
        draft,
        tokens,
        feats,
        position_ids=positions,
        max_position=int(positions.max()) if max_position is None else max_position,
        attention_mask=additive_mask(allowed, feats.dtype)[:, None],
        past_key_values=draft_cache,
    )
    return out[:, -1], torch.cat([cache_valid, real], dim=1)
