"""Markdown cells of the bench's records (`bench.py`'s per-method table, `batch_bench.py`'s per-batch one)."""

from __future__ import annotations

import math


def format_cell(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)
