"""Counting host-device synchronizations on a CPU (test support).

On a GPU every read of a device value on the host waits for the work queued before it. A CPU run cannot see those
waits, but it can count the calls that would cause them: `count_host_syncs()` wraps the Tensor methods that return
a device value to the host (`.tolist()`, `.item()`, `bool()`, `int()`, `float()`, `.cpu()`, `.numpy()`) and
`.nonzero()` (its output size depends on the values), and records where each call came from."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter

import torch

READS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")


class HostSyncs:
    def __init__(self):
        self.sites: Counter = Counter()  # (file, line, method) -> calls

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def in_package(self, package: str = "specvlm_hf") -> int:
        """Calls made by `package`'s own code (not transformers' forward)."""
        return sum(n for (file, _, _), n in self.sites.items() if f"/{package}/" in file)

    def report(self) -> str:
        return "\n".join(
            f"{n:5d}  {file}:{line} {name}" for (file, line, name), n in self.sites.most_common()
        )


@contextlib.contextmanager
def count_host_syncs():
    syncs = HostSyncs()
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    active = [True]

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if active[0] and (self.numel() > 0 or name != "nonzero"):
                frame = sys._getframe(1)
                syncs.sites[(frame.f_code.co_filename, frame.f_lineno, name)] += 1
            active[0] = False  # reads inside a read (e.g. tolist calling item) count once
            try:
                return original(self, *args, **kwargs)
            finally:
                active[0] = True

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield syncs
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
