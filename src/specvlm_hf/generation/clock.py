"""Timing the automatic budget's planner reads: on the device's own timeline, synchronized where it is consumed.

On a GPU, a host timer around a forward measures the kernel launches, not the work: the host waits for the work
later, wherever a value comes back (the acceptance walk). `StepClock` marks points with CUDA events on the current
stream; `seconds(start, end)` waits for the `end` event (by then the step's own reads have waited for it already,
so this adds no stall) and returns the device time between the marks. On a CPU the marks are `perf_counter`
readings. A disabled clock (a fixed budget: no planner reads times) marks nothing and never synchronizes.
"""

from __future__ import annotations

import time

import torch


class StepClock:
    def __init__(self, device, enabled: bool = True):
        device = torch.device(device)
        self.enabled = enabled
        self.cuda = enabled and device.type == "cuda"
        self.marks = 0  # marks made so far
        self.done = 0  # marks up to this one are known finished (waited for)

    def mark(self):
        """A point on the device's timeline (None when disabled)."""
        if not self.enabled:
            return None
        self.marks += 1
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()  # on the current stream, where the decoding loop's work runs
            return self.marks, event
        return self.marks, time.perf_counter()

    def seconds(self, start, end) -> float:
        """Seconds between two marks, once the work before `end` is done (0.0 when disabled). Waits at most once
        for a group of marks read together: read the latest first."""
        if not self.enabled:
            return 0.0
        (_, start), (index, end) = start, end
        if not self.cuda:
            return end - start
        if index > self.done:  # the number is consumed now: the work it measures must be finished
            end.synchronize()
            self.done = index
        return start.elapsed_time(end) / 1e3
