"""Per-call decoding settings and the statistics of one speculative `generate` call."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


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
