"""Pieces shared by chain and tree decoding: per-call settings, statistics, the target prefill."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from . import target_features
from .decode_plan import active_plan
from .inference_linear import TARGET_COPY_MAX_ELEMENTS, derived_from_weights, linear


@dataclass(frozen=True)
class DecodingSettings:
    """Decoding knobs for one `generate` call: the draft config's defaults, overridable per call."""

    decoding_mode: str
    tree_top_k: int
    tree_depth: int
    tree_total_tokens: int
    num_draft_tokens: int
    draft_confidence_threshold: float

    @classmethod
    def from_config(cls, config, **overrides) -> DecodingSettings:
        values = {name: overrides.pop(name, getattr(config, name)) for name in cls.__dataclass_fields__}
        if overrides:
            raise TypeError(f"Unknown decoding settings: {sorted(overrides)}")
        # Reuse the config's validation so a bad per-call value gets the same clear error.
        probe = config.__class__(**{**config.to_dict(), **values})
        del probe
        return cls(**values)


@dataclass
class GenerationStats:
    """What one speculative `generate` call did (`draft.last_generation_stats`)."""

    decoding_mode: str
    target_forwards: int = 0  # including the prefill
    new_tokens: int = 0
    accepted_lengths: list[int] = field(
        default_factory=list
    )  # tokens emitted per verify forward (bonus included)
    draft_time_s: float = 0.0  # drafting and feeding accepted tokens back, per step (not the prompt)
    verify_time_s: float = 0.0
    # the target's forward over the prompt (tree mode; chain mode: inside generate, not measured apart)
    prefill_time_s: float = 0.0
    draft_prefill_time_s: float = 0.0  # the draft over the prompt's features (with visual compression)
    total_time_s: float = 0.0
    visual_tokens: int = 0  # visual tokens in the prompt
    draft_visual_tokens: int = 0  # visual tokens the draft kept after compression
    compressor_choice: str | None = None

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify forward, bonus token included."""
        return sum(self.accepted_lengths) / len(self.accepted_lengths) if self.accepted_lengths else 0.0

    @property
    def target_forwards_per_token(self) -> float:
        return self.target_forwards / self.new_tokens if self.new_tokens else 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["mean_accepted_length"] = self.mean_accepted_length
        out["target_forwards_per_token"] = self.target_forwards_per_token
        return out


class Timer:
    """Accumulates wall time into a stats field: `with Timer(stats, "draft_time_s"): ...`."""

    def __init__(self, stats: GenerationStats, name: str):
        self.stats, self.name = stats, name

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        setattr(self.stats, self.name, getattr(self.stats, self.name) + time.perf_counter() - self.start)
        return False


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


# a (V, h) table of W_e @ embed(v) is kept for vocabularies up to this size (the bound on copies of target-sized
# tensors, `inference_linear.TARGET_COPY_MAX_ELEMENTS`)
TOKEN_TABLE_MAX_ELEMENTS = TARGET_COPY_MAX_ELEMENTS


def draft_step(draft, token_ids: torch.Tensor, hidden_states: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """One draft forward on decoding rows: row i pairs token_ids[i] (its embedding) with hidden_states[i].

    token_ids: (T,) target token ids; hidden_states: (T, n*h) target features or (T, h) the draft's own outputs.
    Returns the draft's last_hidden_state (T, h). The fusion `fc([embed(x) ; f])` splits as
    `W_e embed(x) + W_f f`; while decoding, the first term is read from a per-vocabulary table (computed once
    per set of weights) instead of multiplying every row by W_e, which halves the fusion layer's cost.
    """
    plan = active_plan(draft)
    if plan is not None:  # inside generate: the same forward with its weights resolved once (decode_plan.py)
        return plan.step(token_ids, hidden_states, **forward_kwargs)
    table = _token_table(draft)
    if table is not None and hidden_states.shape[-1] == draft.config.hidden_size:
        h = draft.config.hidden_size
        w_feature = draft.fc.weight[:, h:]  # (h, h): the feature half of fc
        features = hidden_states.to(w_feature.dtype)
        fused = table[token_ids] + linear(
            draft.fc, "feature_half", features, w_feature, sources=[draft.fc.weight]
        )
        if draft.fc.bias is not None:
            fused = fused + draft.fc.bias
        return draft.decode_rows(draft.input_norm(fused)[None], **forward_kwargs)[0]
    rows = draft.fuse(draft.embed_tokens(token_ids)[None], hidden_states[None])
    return draft.decode_rows(rows, **forward_kwargs)[0]


def draft_logits(draft, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`draft.draft_logits(hidden)`, through the active `DecodePlan` inside generate."""
    plan = active_plan(draft)
    return plan.draft_logits(hidden) if plan is not None else draft.draft_logits(hidden)


def _token_table(draft) -> torch.Tensor | None:
    """(V, h) = embed(v) @ W_e^T for every target token v, or None where it does not apply or would be too big."""
    if getattr(draft.config, "draft_architecture", "eagle") != "eagle" or draft.training:
        return None
    embed = draft._bound_parts()[1].weight  # (V, h), the target's (frozen) token embedding
    h = draft.config.hidden_size
    if embed.shape[0] * h > TOKEN_TABLE_MAX_ELEMENTS or embed.shape[1] != h:
        return None
    w = draft.fc.weight

    def build():
        with torch.no_grad():
            return (embed.to(w.device, torch.float32) @ w[:, :h].float().t()).to(w.dtype)

    return derived_from_weights(draft, "token_table", [embed, w], build)
