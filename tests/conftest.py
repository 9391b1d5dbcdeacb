"""Shared test setup: one intra-op thread; tiny targets shared within a test module; the cached toy target.

The models in these tests are tiny; on a 2-core machine two torch threads only add synchronisation, and when
anything else runs at the same time they make every forward many times slower (measured here: 50-100x).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ["OMP_NUM_THREADS"] = "1"  # subprocesses (DDP, kill-and-resume) compute with the same thread count
# the automatic budget's times are not kept across test processes (`saved_costs`): every test's first call is a
# first call on a new machine (tests/test_saved_costs.py turns it on in a temporary cache)
os.environ["SPECVLM_HF_BUDGET_CACHE"] = "0"
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


@pytest.fixture
def cached_toy_target() -> list[Path]:
    """The tiny toy LLaVA targets saved in the toy cache (`specvlm_hf.toy.world.toy_cache_dir`), the folders that
    hold a ``config.json``; skips the test when there is none (`specvlm demo --quick` builds one, in minutes)."""
    from specvlm_hf.toy.world import toy_cache_dir

    found = [
        toy for toy in sorted(toy_cache_dir().glob("toy-llava-tiny-*")) if (toy / "config.json").exists()
    ]
    if not found:
        pytest.skip("toy target not cached yet (run `specvlm demo --quick` once)")
    return found


@pytest.fixture
def toy_cache_with_target(cached_toy_target, tmp_path) -> Path:
    """A fresh toy cache folder (``tmp_path``) that links to the cached tiny toy targets: a test run with
    ``--cache-dir`` on it reuses the target and leaves the drafts it trains in ``tmp_path``."""
    for toy in cached_toy_target:
        (tmp_path / toy.name).symlink_to(toy, target_is_directory=True)
    return tmp_path
