"""The frozen target sharded across ranks (FSDP2, `target_sharding="fsdp"`): checks in one process, and 2-process
gloo runs on CPU (`torchrun --nproc_per_node 2`) against the unsharded DDP run they must reproduce."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.training import sharding
from specvlm_hf.training.trainer import SpecVLMDistillationTrainer
from test_trainer import collate_tensors, family_rows, make_draft, state, training_args
from tiny_models import make_tiny_target

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------- one process
def test_invalid_target_sharding_is_refused_before_any_work(tmp_path):
    target = make_tiny_target("llava", seed=0)
    with pytest.raises(ValueError, match="target_sharding='zero3'.*'fsdp'"):
        SpecVLMDistillationTrainer(
            make_draft(target),
            target,
            training_args(tmp_path, max_steps=1),
            data_collator=collate_tensors,
            target_sharding="zero3",
        )


def test_shard_target_needs_torch_distributed():
    target = make_tiny_target("llava", seed=0).requires_grad_(False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node N"):
        sharding.shard_target(target)


def test_units_are_the_blocks_and_the_shared_parts_stay_whole():
    target = make_tiny_target("llava", seed=0)
    units = sharding.shard_units(target)
    names = sorted({type(u).__name__ for u in units})
    assert names == ["CLIPEncoderLayer", "CLIPVisionEmbeddings", "LlamaDecoderLayer"]
    assert len(units) == 2 + 2 + 1  # 2 decoder layers, 2 vision layers, the vision embeddings
    whole = sharding.whole_parameters(target)
    assert whole == {target.get_input_embeddings().weight, target.get_output_embeddings().weight}


def test_one_process_keeps_the_target_whole(tmp_path):
    """No process group (a plain `python` run): "fsdp" has nothing to shard across and trains as before."""
    target = make_tiny_target("llava", seed=0)
    trainer = SpecVLMDistillationTrainer(
        make_draft(target),
        target,
        training_args(tmp_path, max_steps=1),
        data_collator=collate_tensors,
        train_dataset=family_rows("llava", target),
        target_sharding="fsdp",
    )
    trainer.train()
    assert not sharding.is_sharded(target)


# ------------------------------------------------------------------------------------- two processes
SCRIPT = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
import torch
import test_trainer as t
from tiny_models import make_tiny_target
from torch.nn.parallel import DistributedDataParallel
from transformers import TrainerCallback
from specvlm_hf.training import sharding

mode, out = sys.argv[1], {out!r}
rank = int(os.environ["RANK"])


class Hang(TrainerCallback):  # wrote the step-3 checkpoint: tell the parent, then wait to be killed
    def on_save(self, args, state, control, **kwargs):
        if rank == 0:
            open(os.path.join(out, "saved"), "w").write(str(state.global_step))
        time.sleep(600)


def run(target, sharding_mode, folder, resume=None, callbacks=None, **overrides):
    rows = t.family_rows("llava", make_tiny_target("llava", seed=0), n=10)  # 5 steps x 2 ranks x 1 row
    if target.dtype == torch.bfloat16:
        rows = [{{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in r.items()}} for r in rows]
    draft = t.make_draft(target)
    kwargs = dict(max_steps=5, per_device_train_batch_size=1, logging_steps=1, ddp_backend="gloo",
                  save_strategy="steps", save_steps=3)
    kwargs.update(overrides)
    trainer = t.SpecVLMDistillationTrainer(
        draft, target, t.training_args(os.path.join(out, folder), **kwargs), data_collator=t.collate_tensors,
        train_dataset=rows, feature_noise_std=0.05, target_sharding=sharding_mode, callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    assert isinstance(trainer.model_wrapped, DistributedDataParallel) and trainer.model_wrapped.module is draft
    return trainer, draft


def record(name, trainer, draft):
    logs = [h for h in trainer.state.log_history if "loss" in h]
    if rank == 0:
        json.dump(logs, open(os.path.join(out, name + "_logs.json"), "w"))
    torch.save({{k: v.detach().clone() for k, v in draft.state_dict().items()}}, os.path.join(out, f"{{name}}_rank{{rank}}.pt"))


def streamed_ids(files, name):
    # which rows of a streamed LLaVA-format dataset each rank's training dataloader yields (one pass)
    from specvlm_hf.training.rows import load_training_rows

    seen = []

    def collate(rows):
        seen.extend(row["id"] for row in rows)
        assert all(len(row["images"]) == 1 and row["messages"][0]["role"] == "user" for row in rows)
        return {{"input_ids": torch.zeros(len(rows), 1, dtype=torch.long)}}

    target = make_tiny_target("llava", seed=0)
    trainer = t.SpecVLMDistillationTrainer(
        t.make_draft(target), target, t.training_args(os.path.join(out, name), max_steps=4, ddp_backend="gloo"),
        data_collator=collate, train_dataset=load_training_rows(files, streaming=True), target_sharding="fsdp",
    )
    for _ in trainer.get_train_dataloader():
        pass
    json.dump(seen, open(os.path.join(out, f"{{name}}_rank{{rank}}.json"), "w"))


if mode == "train":
    from specvlm_hf.toy.data import write_llava_json

    if rank == 0:  # 16 rows in one file, and in two files
        write_llava_json(os.path.join(out, "one"), 16, files=1)
        write_llava_json(os.path.join(out, "two"), 16, files=2)
    from accelerate import PartialState

    PartialState(backend="gloo").wait_for_everyone()
    streamed_ids(os.path.join(out, "one", "llava_toy-0.jsonl"), "stream_one_file")
    streamed_ids(os.path.join(out, "two", "llava_toy-*.jsonl"), "stream_two_files")
    # the whole target on both ranks (DDP), then the same run with the target sharded
    record("ddp", *run(make_tiny_target("llava", seed=0), None, "ddp"))
    target = make_tiny_target("llava", seed=0)
    trainer, draft = run(target, "fsdp", "fsdp")
    assert sharding.is_sharded(target) and not isinstance(trainer.target_model, DistributedDataParallel)
    record("fsdp", trainer, draft)
    nbytes = sharding.target_parameter_bytes(target)
    json.dump(dict(whole=nbytes.whole, sharded=nbytes.sharded, full=nbytes.full),
              open(os.path.join(out, f"bytes_rank{{rank}}.json"), "w"))
    trainer.save_model(os.path.join(out, "final"))  # the draft, from rank 0: a plain save_pretrained folder
    # as users run it: a bf16 target, the draft's master weights fp32, autocast
    bf16 = make_tiny_target("llava", seed=0).to(torch.bfloat16)
    trainer, draft = run(bf16, "fsdp", "bf16", max_steps=2, save_strategy="no", bf16=True)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(p.dtype == torch.float32 for p in draft.parameters())
    assert sharding.is_sharded(bf16) and all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    if rank == 0:
        json.dump(logs, open(os.path.join(out, "bf16_logs.json"), "w"))
    # a run killed after its step-3 checkpoint (the parent kills it; the sharded target is reused)
    run(target, "fsdp", "killed", callbacks=[Hang()])
elif mode == "resume":
    target = make_tiny_target("llava", seed=0)
    folder = os.path.join(out, "killed")
    record("resumed", *run(target, "fsdp", "killed", resume=os.path.join(folder, "checkpoint-3")))
"""


def _launch(tmp: Path, mode: str, port: int) -> subprocess.Popen:
    script = tmp / "fsdp_train.py"
    script.write_text(textwrap.dedent(SCRIPT).format(tests=str(ROOT / "tests"), out=str(tmp)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    log = open(tmp / f"{mode}.log", "w")  # a file, not a pipe: a full pipe would stall the ranks
    return subprocess.Popen(
        [*cmd, str(script), mode], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """One `torchrun --nproc_per_node 2`: DDP run, FSDP run, bf16 FSDP run, then an FSDP run killed (SIGKILL to
    the whole process group) once its step-3 checkpoint is written."""
    tmp = tmp_path_factory.mktemp("fsdp")
    proc = _launch(tmp, "train", 29541)
    marker = tmp / "saved"
    try:
        deadline = time.time() + 400
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail("the 2-process run died before its checkpoint:\n" + _tail(tmp / "train.log"))
            assert time.time() < deadline, "no checkpoint after 400 s"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)  # a hard kill, no clean-up
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert marker.read_text() == "3"
    return tmp


def _tail(path: Path) -> str:
    return path.read_text()[-6000:]


def _losses(path: Path) -> list[dict]:
    return json.loads(path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["one_file", "two_files"])
def test_streamed_rows_are_split_across_ranks(fsdp_runs, layout):
    """A streamed LLaVA-format dataset: each rank gets its own rows (two files: its own file), none twice."""
    seen = [json.loads((fsdp_runs / f"stream_{layout}_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 8
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"toy-{i:06d}" for i in range(16)]


@pytest.mark.slow
def test_sharded_target_gives_the_losses_of_the_whole_one(fsdp_runs):
    """Same seed, same rows: the sharded target's 5 steps log the DDP run's losses and end at its weights."""
    ddp, fsdp = _losses(fsdp_runs / "ddp_logs.json"), _losses(fsdp_runs / "fsdp_logs.json")
    assert [h["step"] for h in fsdp] == [1, 2, 3, 4, 5]
    for a, b in zip(ddp, fsdp):
        for key in ("loss", "ce", "feature", "top1_agreement"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
    assert fsdp[-1]["loss"] != fsdp[0]["loss"]  # it trained
    for rank in (0, 1):
        a = torch.load(fsdp_runs / f"ddp_rank{rank}.pt")
        b = torch.load(fsdp_runs / f"fsdp_rank{rank}.pt")
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_each_rank_holds_half_of_the_sharded_target(fsdp_runs):
    target = make_tiny_target("llava", seed=0)
    full = sum(p.numel() * p.element_size() for p in target.parameters())
    shared = sum(p.numel() * p.element_size() for p in sharding.whole_parameters(target))
    per_rank = [json.loads((fsdp_runs / f"bytes_rank{r}.json").read_text()) for r in (0, 1)]
    for nbytes in per_rank:
        assert nbytes["full"] == full and nbytes["whole"] == shared  # embedding + lm_head, whole on each rank
        # the rest split in two (FSDP pads each parameter's first dimension to a multiple of 2)
        assert abs(nbytes["sharded"] - (full - shared) / 2) <= 0.01 * (full - shared)
    assert sum(n["sharded"] for n in per_rank) == full - shared  # no parameter on both ranks


@pytest.mark.slow
def test_bf16_target_with_fp32_draft(fsdp_runs):
    logs = _losses(fsdp_runs / "bf16_logs.json")
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)


@pytest.mark.slow
def test_sharded_run_resumes_exactly_after_a_kill(fsdp_runs):
    assert (fsdp_runs / "killed" / "checkpoint-3").is_dir()
    assert not (fsdp_runs / "killed" / "checkpoint-5").exists()
    proc = _launch(fsdp_runs, "resume", 29542)
    try:
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, _tail(fsdp_runs / "resume.log")
    for rank in (0, 1):
        uninterrupted = torch.load(fsdp_runs / f"fsdp_rank{rank}.pt")
        resumed = torch.load(fsdp_runs / f"resumed_rank{rank}.pt")
        assert resumed.keys() == uninterrupted.keys()
        for key in resumed:
            torch.testing.assert_close(resumed[key], uninterrupted[key], atol=1e-6, rtol=0)


@pytest.mark.slow
def test_sharded_run_saves_a_plain_draft_folder(fsdp_runs):
    """What `save_model` wrote is a normal save_pretrained folder that loads on one device, whole target."""
    reloaded = AutoModel.from_pretrained(fsdp_runs / "final")
    assert isinstance(reloaded, SpecVLMDraftModel)
    target = make_tiny_target("llava", seed=0)
    reloaded.bind(target)
    trained = torch.load(fsdp_runs / "fsdp_rank0.pt")
    assert set(reloaded.state_dict()) == set(trained)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert not torch.equal(trained["fc.weight"], state(make_draft(target))["fc.weight"])


@pytest.mark.slow
@pytest.mark.usefixtures("cached_toy_target")
def test_cli_trains_with_a_sharded_target_on_streamed_llava_rows(tmp_path):
    """`torchrun --nproc_per_node 2 ... specvlm train --target-sharding fsdp --streaming` on LLaVA-format rows."""
    from specvlm_hf.toy.data import write_llava_json

    write_llava_json(tmp_path / "data", 16, files=2)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29543"]
    cmd += ["-m", "specvlm_hf.cli", "train", "--target-sharding", "fsdp", "--streaming"]
    cmd += [
        "--dataset",
        str(tmp_path / "data" / "llava_toy-*.jsonl"),
        "--image-folder",
        str(tmp_path / "data"),
    ]
    cmd += ["--train-steps", "3", "--batch-size", "2", "--output-dir", str(tmp_path / "draft")]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "2 process(es), target_sharding=fsdp" in result.stdout
    held = re.findall(r"target parameters held ([\d.]+) MiB of ([\d.]+) MiB", result.stdout)
    assert len(held) == 2 and all(float(mine) < 0.8 * float(full) for mine, full in held), held
    assert (tmp_path / "draft" / "config.json").exists()
    draft = AutoModel.from_pretrained(tmp_path / "draft")
    assert isinstance(draft, SpecVLMDraftModel)
