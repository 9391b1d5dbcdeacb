"""Shared test setup: one intra-op thread; tiny targets shared within a test module.

The models in these tests are tiny; on a 2-core machine two torch threads only add synchronisation, and when
anything else runs at the same time they make every forward many times slower (measured here: 50-100x).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ["OMP_NUM_THREADS"] = "1"  # subprocesses (DDP, kill-and-resume) compute with the same thread count
torch.set_num_threads(1)
# SPECVLM_TEST_DEVICE=cuda (scripts/gpu_check.sh): tensors and models the tests create land on that device
if os.environ.get("SPECVLM_TEST_DEVICE"):
    torch.set_default_device(os.environ["SPECVLM_TEST_DEVICE"])


@pytest.fixture(scope="module")
def targets_cache():
    """One tiny target per family (`tiny_models.make_tiny_target`), built on first use, shared by a module's tests."""
    from tiny_models import make_tiny_target

    cache: dict[str, torch.nn.Module] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_tiny_target(family)
        return cache[family]

    return get
