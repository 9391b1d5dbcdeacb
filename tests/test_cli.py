"""The `specvlm` command: argparse wiring, help texts, and the demo's plain-vs-speculative comparison."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specvlm_hf import cli

SUBCOMMANDS = ("demo", "train", "regenerate", "bench", "push")


def test_parser_has_every_subcommand():
    parser = cli.build_parser()
    for name in SUBCOMMANDS:
        extra = {
            "push": ["some/folder", "org/name"],
            "train": ["--output-dir", "out"],
            "regenerate": ["--output-dir", "out"],
        }.get(name, [])
        args = parser.parse_args([name, *extra])
        assert args.command == name
        assert callable(args.func)


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    assert f"specvlm {name}" in capsys.readouterr().out


def test_no_subcommand_prints_help(capsys):
    assert cli.main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_demo_quick_flag_and_defaults():
    args = cli.build_parser().parse_args(["demo", "--quick", "--compressor", "select"])
    assert args.quick and args.compressor == "select" and args.target is None and args.draft is None
    args = cli.build_parser().parse_args(["bench"])
    assert args.toy_size == "medium" and args.output_dir is None and not args.tune
    args = cli.build_parser().parse_args(["demo", "--compressor", "none"])
    assert args.compressor is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--compressor", "bogus"])


def test_push_needs_repo_or_local_dir(capsys):
    assert cli.main(["push", "some/folder"]) == 2


@pytest.mark.skipif(shutil.which("specvlm") is None, reason="console script not installed")
def test_console_script_help():
    out = subprocess.run(["specvlm", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "bench" in out.stdout


def test_compare_one_identical_on_tiny_llava():
    """The demo's comparison on a tiny random LLaVA with a random draft: greedy outputs are identical."""
    import torch

    from specvlm_hf.toy.demo import compare_one
    from specvlm_hf.toy.drafts import new_draft
    from tiny_models import make_inputs, make_tiny_target

    vlm = make_tiny_target("llava")
    draft = new_draft(vlm)

    class _Tok:  # the tiny targets have no processor
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(int(i)) for i in ids)

    inputs = make_inputs("llava", vlm, seed=0)
    c = compare_one(vlm, draft, _Tok(), inputs, max_new_tokens=8, decoding_mode="tree")
    assert c.identical and c.plain_tokens == c.spec_tokens > 0
    assert c.mean_accepted_length >= 1.0
    assert torch.isfinite(torch.tensor(c.spec_time_s))


def test_demo_quick_runs(toy_cache_with_target):
    """`specvlm demo --quick` on the cached tiny toy target: trains a small draft, outputs identical."""
    tmp_path = toy_cache_with_target  # reuses the cached target, keeps new drafts here
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "specvlm_hf.cli", "demo", "--quick", "--train-steps", "8"]
    out = subprocess.run(
        [*cmd, "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=600, env=env
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "identical outputs: yes" in out.stdout
    assert any((tmp_path / "drafts").iterdir())


def test_bench_dtype_list_and_sweep_flags():
    from specvlm_hf.toy.bench import bench_dtypes

    args = cli.build_parser().parse_args(["bench"])
    assert args.dtype is None and not args.sweep
    assert bench_dtypes(args.dtype, toy_medium=True) == [torch_dtype("bfloat16"), torch_dtype("float32")]
    assert bench_dtypes(None, toy_medium=False) == [None]
    args = cli.build_parser().parse_args(["bench", "--dtype", "float32, bfloat16,float32", "--sweep"])
    assert args.sweep and bench_dtypes(args.dtype, True) == [torch_dtype("float32"), torch_dtype("bfloat16")]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--dtype", "float64"])


def torch_dtype(name):
    import torch

    return getattr(torch, name)
