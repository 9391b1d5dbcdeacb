"""`scripts/gpu_check.sh --device cpu --quick` runs here, so the GPU check cannot rot (slow: it runs the bench)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specvlm_hf.toy.methods import base_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu_quick(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "scripts" / "gpu_check.sh"),
            "--device",
            "cpu",
            "--quick",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("gpu_check cpu: tests ok, bench ok"), line
    records = json.loads((tmp_path / "medium" / "results.json").read_text())
    methods = {base_name(r["method"]) for r in records}  # (a draft's compressor is in its name: [pool])
    assert {"plain", "specvlm_tree", "specvlm_chain"} <= methods, methods
    assert all("first_call_vs_plain" in r for r in records if r["method"] != "plain"), records
    assert (tmp_path / "summary.txt").read_text().strip() == line
