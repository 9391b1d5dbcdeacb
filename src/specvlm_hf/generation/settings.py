"""Per-call decoding settings and the statistics of one speculative `generate` call."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from ..draft.configuration_specvlm import PAPER_TREE_BUDGET


@dataclass(frozen=True)
class DecodingSettings:
    """Decoding knobs for one `generate` call: the draft config's defaults, overridable per call."""

    decoding_mode: str
    tree_top_k: int | None  # None: automatic (`budget.py`); see `auto_tree`
    tree_depth: int | None
    tree_total_tokens: int | None
    num_draft_tokens: int | None
    draft_confidence_threshold: float

    @classmethod
    def from_config(cls, config, **overrides) -> DecodingSettings:
        values = {name: overrides.pop(name, getattr(config, name)) for name in cls.__dataclass_fields__}
        if overrides:
            raise TypeError(f"Unknown decoding settings: {sorted(overrides)}")
        # Reuse the config's validation so a bad per-call value gets the same clear error.
        probe = config.__class__(**{**config.to_dict(), **values})
        del probe
        tree = (values["tree_top_k"], values["tree_depth"], values["tree_total_tokens"])
        if any(v is not None for v in tree):  # a fixed tree budget: unset fields from the paper's
            top_k, depth, total = (v if v is not None else d for v, d in zip(tree, PAPER_TREE_BUDGET))
            if values["tree_total_tokens"] is None:
                total = max(total, depth)
            values.update(tree_top_k=top_k, tree_depth=depth, tree_total_tokens=total)
        return cls(**values)

    @property
    def auto_tree(self) -> bool:
        """No tree budget given: chosen per step from measured costs (`budget.BudgetPlanner`)."""
        return self.tree_top_k is None

    @property
    def auto_chain(self) -> bool:
        return self.num_draft_tokens is None


def refuse_inexact_processors(generation_config) -> None:
    """Raise, before any work, for logits processing speculative verification cannot reproduce exactly.

    Every other processor is a function of (tokens so far, logits) and is applied to the target's logits at each
    verified position exactly as plain generate applies it. Classifier-free guidance is not: it runs its own
    unconditional model forward, with its own cache, once per generated token."""
    scale = getattr(generation_config, "guidance_scale", None)
    if scale is not None and scale != 1:
        raise ValueError(
            f"guidance_scale={scale} (classifier-free guidance) runs an unconditional forward with its own cache "
            "for every generated token, which speculative verification cannot reproduce exactly. Generate without "
            "assistant_model, or drop guidance_scale."
        )


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
    verify_time_s: float = 0.0  # everything below (tree mode)
    verify_forward_time_s: float = 0.0  # the target forward itself
    verify_mask_time_s: float = 0.0  # building the tree attention mask and positions
    accept_time_s: float = 0.0  # the acceptance walk (greedy or rejection sampling)
    compact_time_s: float = 0.0  # cache compaction and picking the accepted rows' hidden states
    # per verify step ("spec", verified draft tokens) or ("plain", 0) for a back-off step without drafting (tree
    # mode: with the automatic budget; chain mode: always); and the cost model the automatic tree budget used
    budget_steps: list[tuple[str, int]] = field(default_factory=list)
    budget_costs_ms: dict[int, float] = field(default_factory=dict)  # target forward over n new tokens
    budget_calibration: float | None = None  # measured / predicted accepted draft tokens
    # the target's forward over the prompt (tree mode; chain mode: inside generate, not measured apart)
    prefill_time_s: float = 0.0
    draft_prefill_time_s: float = 0.0  # the draft over the prompt's features (with visual compression)
    total_time_s: float = 0.0
    visual_tokens: int = 0  # visual tokens in the prompt
    # visual tokens the draft kept after compression, and its compressor's choice (0 and None when the draft never
    # ran: chain mode runs it at the first speculative step, a call that stays backed off never does)
    draft_visual_tokens: int = 0
    compressor_choice: str | None = None
    # a batch (generate on B > 1 prompts): these fields hold the totals (`new_tokens` summed over rows,
    # `target_forwards` the batched forwards, `accepted_lengths` every row's steps) and `rows` each row's own
    rows: list[GenerationStats] = field(default_factory=list)

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
