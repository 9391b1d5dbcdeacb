"""How the bench's records read: markdown cells (`bench.py`'s per-method table, `batch_bench.py`'s per-batch one),
the per-method table, and the summary lines (sweep against the best fixed budget, first calls against plain's)."""

from __future__ import annotations

import math

from .greedy_check import describe_divergence


def format_cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def markdown_lines(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table's lines: the header, its rule, a line per row (cells as `str` makes them)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def markdown_table(records: list[dict]) -> str:
    header = [
        "method",
        "dtype",
        "T",
        "lossless",
        "speedup",
        "speedup (decode)",
        "tokens/s",
        "accepted len",
        "accepted len (no bonus)",
        "target fwd / token",
        "draft s",
        "verify s",
        "prefill s",
        "other s",
        "draft ms / step",
        "verify ms / step",
        "draft / target fwd",
        "bound",
        "of bound",
        "status",
    ]
    rows = []
    for r in records:
        status = r.get("status", "ok")
        if status != "ok":
            status = f"{status}: {r.get('error') or r.get('note', '')}"
        elif r.get("note"):
            status = f"ok ({r['note']})"
        row = [
            r["method"],
            r.get("dtype") or "-",
            format_cell(r["temperature"], 1),
            _fmt_lossless(r),
            format_cell(r.get("speedup")),
            format_cell(r.get("speedup_decode")),
            format_cell(r.get("tokens_per_second"), 1),
            format_cell(r.get("mean_accepted_length")),
            format_cell(r.get("mean_accepted_length_no_bonus")),
            format_cell(r.get("target_forwards_per_token")),
            format_cell(r.get("draft_time_s")),
            format_cell(r.get("verify_time_s")),
            format_cell(r.get("prefill_time_s")),
            format_cell(r.get("other_time_s")),
            format_cell(r.get("draft_ms_per_step"), 1),
            format_cell(r.get("verify_ms_per_step"), 1),
            format_cell(r.get("draft_vs_target_forward")),
            format_cell(r.get("bound_speedup")),
            format_cell(r.get("bound_fraction")),
            status.replace("|", "/"),
        ]
        rows.append(row)
    lines = markdown_lines(header, rows)
    ties = [(r, t) for r in records for t in r.get("lossless_ties", [])]
    if ties:
        lines.append("")
        lines.append(
            "tie: greedy output left plain's at a numerical tie -- the target, recomputed over plain's prefix in one "
            "forward, scores both tokens within rounding of its top logit:"
        )
        for r, t in ties:
            lines.append(f"- {r['method']}, prompt {t['prompt']}, {describe_divergence(t)}")
    return "\n".join(lines) + "\n"


def _fmt_lossless(record: dict) -> str:
    if record.get("lossless") == "numerical-tie":
        return f"tie ({len(record['lossless_ties'])})"
    if record.get("sampling_p_value") is not None:
        return f"{format_cell(record.get('lossless'))} (p={record['sampling_p_value']:.2g})"
    return format_cell(record.get("lossless"))


def _draft_key(name: str) -> str:
    """``specvlm_tree[pool]@16/8/2`` -> ``specvlm[pool]``: which draft a method decodes with."""
    base = name.split("@")[0]
    for mode in ("_chain", "_tree"):
        base = base.replace(mode, "")
    return base


def sweep_summary(records: list[dict]) -> list[str]:
    """Per dtype, temperature and draft: each default-settings method's speedup (chain and tree mode) against the
    best fixed budget's, and the better one's against the assisted peer's (with sweep records); and the untrained
    draft's speedup over plain."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("speedup")]
    lines = []
    groups = dict.fromkeys((r.get("dtype"), r["temperature"]) for r in ok)
    for dtype, temperature in groups:
        group = [r for r in ok if r.get("dtype") == dtype and r["temperature"] == temperature]
        peer = next((r for r in group if r["method"] == "assisted_peer"), None)
        for key in dict.fromkeys(_draft_key(r["method"]) for r in group if r.get("kind") == "spec"):
            mine = [r for r in group if r.get("kind") == "spec" and _draft_key(r["method"]) == key]
            defaults = [r for r in mine if not r.get("budget")]
            fixed = [r for r in mine if r.get("budget")]
            if not defaults or not fixed:
                continue
            default = max(defaults, key=lambda r: r["speedup"])
            best = max(fixed, key=lambda r: r["speedup"])
            each = ", ".join(
                f"{r['method']} {r['speedup']:.2f}x = {r['speedup'] / best['speedup']:.2f}" for r in defaults
            )
            line = (
                f"sweep {dtype} T={temperature:g} {key}: default {each} of best fixed budget {best['method']} "
                f"{best['speedup']:.2f}x"
            )
            if peer is not None:
                line += (
                    f"; best default / assisted_peer {default['speedup']:.2f}x / {peer['speedup']:.2f}x = "
                    f"{default['speedup'] / peer['speedup']:.2f}"
                )
            lines.append(line)
        for r in group:
            if r["method"].startswith("untrained_"):
                lines.append(
                    f"untrained draft {dtype} T={temperature:g}: {r['method']} {r['speedup']:.2f}x plain"
                )
    return lines


def first_call_summary(records: list[dict]) -> list[str]:
    """One line per dtype: every method's first calls against plain's on the same prompts (summed), and plain's
    against itself -- the noise of the measurement."""
    lines = []
    for dtype in dict.fromkeys(r.get("dtype") for r in records):
        mine = [r for r in records if r.get("dtype") == dtype and "first_call_vs_plain" in r]
        if mine:
            prompts = max(len(r["first_call_ratios"]) for r in mine)
            parts = ", ".join(
                f"{r['method']} {r['first_call_vs_plain']:.2f}x" for r in mine if r["kind"] != "plain"
            )
            noise = "".join(
                f"; plain against itself {r['first_call_vs_plain']:.2f}x"
                for r in mine
                if r["kind"] == "plain"
            )
            lines.append(
                f"first call {dtype} (time / plain's on the same {prompts} prompt(s), summed, no warm-up, fixed "
                f"budgets on the first only{noise}): {parts}"
            )
    return lines
