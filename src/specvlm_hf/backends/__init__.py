"""Optional faster implementations of the draft's decoding forward, behind one seam.

The decoding loops (`specvlm_hf.generation`) run the draft only through `draft_step` and `draft_logits` here.
Inside `accelerated(draft)` (the loops wrap a whole `generate` call in it) these run the draft's `DecodePlan`
(`decode_plan.py`: the same computation with weights resolved once, prepacked on CPU); everywhere else, and
whenever the plan does not apply, they call the draft's own `decode_step` / `draft_logits`
(`draft/modeling_specvlm.py`, the definition). Switches: ``SPECVLM_HF_BACKEND=none`` turns the plan off (the
modules run); ``SPECVLM_HF_PACKED_LINEAR=0`` keeps the plan but not oneDNN packing.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from .decode_plan import DecodePlan

# draft id -> (draft, its active plan), per thread and per asyncio task (generate calls in parallel each see their
# own); a new dict for every change, never mutated
_ACTIVE: ContextVar[dict[int, tuple] | None] = ContextVar("specvlm_active_plans", default=None)


def enabled() -> bool:
    """Whether the decode plan may be used (``SPECVLM_HF_BACKEND``, read per call: "none" turns it off)."""
    return os.environ.get("SPECVLM_HF_BACKEND", "plan").lower() not in ("none", "off", "0")


def _on_cpu(draft) -> bool:
    """The plan is a CPU speed-up (oneDNN prepacking, fewer host-side ops): never used for a draft on a GPU."""
    return not any(p.device.type not in ("cpu", "meta") for p in draft.parameters())


def active_plan(draft) -> DecodePlan | None:
    """The plan `accelerated` set for `draft` here, if any (never while autograd records: it is inference-only)."""
    plans = _ACTIVE.get()
    entry = plans.get(id(draft)) if plans else None
    plan = entry[1] if entry is not None and entry[0] is draft else None
    return None if plan is None or torch.is_grad_enabled() else plan


@contextmanager
def accelerated(draft):
    """Within this block `draft_step` / `draft_logits` on `draft` run through its `DecodePlan` (where one applies).
    Nothing may change the draft meanwhile."""
    with torch.no_grad():  # (a CPU speed-up: a draft on a GPU runs its own modules)
        plan = DecodePlan.build(draft) if enabled() and _on_cpu(draft) else None
    token = _ACTIVE.set({**(_ACTIVE.get() or {}), id(draft): (draft, plan)})
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def draft_step(draft, token_ids: torch.Tensor, hidden_states: torch.Tensor, **decoder_kwargs) -> torch.Tensor:
    """`draft.decode_step(token_ids, hidden_states, **decoder_kwargs)`: (T,), (T, n*h or h) -> (T, h)."""
    plan = active_plan(draft)
    if plan is not None:
        return plan.step(token_ids, hidden_states, **decoder_kwargs)
    return draft.decode_step(token_ids, hidden_states, **decoder_kwargs)


def draft_logits(draft, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`draft.draft_logits(hidden)`: (logits (..., Vd), target id of each column or None)."""
    plan = active_plan(draft)
    return plan.draft_logits(hidden) if plan is not None else draft.draft_logits(hidden)


__all__ = ["DecodePlan", "accelerated", "active_plan", "draft_logits", "draft_step", "enabled"]
