"""Is a greedy output identical to plain generate's, and where not, is the first difference a numerical tie?

Used by the demo and the bench (`bench.py`'s docstring defines the record fields).
"""

from __future__ import annotations

import torch

LOW_PRECISION = ("bfloat16", "float16")  # dtypes whose greedy ties are excused


def first_divergence(model, inputs: dict, reference: list[int], got: list[int]) -> dict | None:
    """Where greedy output `got` first leaves `reference` (plain's), and whether that is a numerical tie.

    The target is recomputed in one forward over the prompt and plain's tokens before that position; the
    divergence is a tie when both tokens score within 2 * eps(dtype) * |top logit| of that forward's top logit
    (a rounding difference, not a decoding error). Returns None when the outputs are identical.
    """
    if got == reference:
        return None
    j = next((i for i, (a, b) in enumerate(zip(reference, got)) if a != b), min(len(reference), len(got)))
    info = {"position": j, "plain_token": None, "got_token": None, "tie": False}
    if j >= len(reference) or j >= len(got):
        return info  # one output stopped where the other went on: not a tie between two tokens
    info.update(plain_token=reference[j], got_token=got[j])
    ids = inputs["input_ids"]
    prefix = torch.cat([ids, ids.new_tensor([reference[:j]]).view(1, -1)], dim=1)
    forward_inputs = {**inputs, "input_ids": prefix}
    if "attention_mask" in inputs:
        forward_inputs["attention_mask"] = torch.ones_like(prefix)
    logits = model(**forward_inputs).logits[0, -1].float()
    top = float(logits.max())
    tol = 2 * torch.finfo(model.dtype).eps * max(abs(top), 1.0)
    plain_logit, got_logit = float(logits[reference[j]]), float(logits[got[j]])
    info.update(plain_logit=plain_logit, got_logit=got_logit, top_logit=top, tolerance=tol)
    info["tie"] = top - plain_logit <= tol and top - got_logit <= tol
    return info


def describe_divergence(info: dict) -> str:
    """One line for a `first_divergence` result that reached two tokens."""
    return (
        f"new token {info['position']}: plain {info['plain_token']} ({info['plain_logit']:.4f}) vs "
        f"{info['got_token']} ({info['got_logit']:.4f}), top {info['top_logit']:.4f}, "
        f"tolerance {info['tolerance']:.4f}"
    )


def greedy_check(model, prompts: list[dict], reference: list[list[int]], tokens: list[list[int]]) -> dict:
    """The greedy lossless fields of a record (see the module docstring)."""
    if tokens == reference:
        return {"lossless": True}
    diffs = []
    for i, (inputs, ref, got) in enumerate(zip(prompts, reference, tokens)):
        info = first_divergence(model, inputs, ref, got)
        if info is not None:
            diffs.append({"prompt": i, **info})
    if len(tokens) == len(reference) and diffs and all(d["tie"] for d in diffs):
        return {"lossless": "numerical-tie", "lossless_ties": diffs}
    return {"lossless": False, "lossless_differences": diffs}


def lossless_failures(records: list[dict]) -> list[dict]:
    """Greedy records whose outputs differ from plain's for a reason other than a low-precision numerical tie."""
    bad = []
    for r in records:
        if r.get("temperature", 0) > 0 or r.get("status") != "ok":
            continue
        verdict = r.get("lossless")
        if verdict is False or (verdict == "numerical-tie" and r.get("dtype") not in LOW_PRECISION):
            bad.append(r)
    return bad
