"""Shared test setup: one intra-op thread.

The models in these tests are tiny; on a 2-core machine two torch threads only add synchronisation, and when
anything else runs at the same time they make every forward many times slower (measured here: 50-100x).
"""

from __future__ import annotations

import os

import torch

os.environ["OMP_NUM_THREADS"] = "1"  # subprocesses (DDP, kill-and-resume) compute with the same thread count
torch.set_num_threads(1)
