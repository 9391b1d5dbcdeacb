"""SpecVLMDistillationTrainer and SpecVLMDataCollator on tiny random targets (CPU, no network)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, TrainerCallback, TrainingArguments
from transformers.utils import logging as hf_logging

import specvlm_hf  # noqa: F401  (registers the Auto classes)
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.draft.configuration_specvlm import DEFAULT_CHAIN_TOKENS
from specvlm_hf.training.collator import SpecVLMDataCollator
from specvlm_hf.training.trainer import SpecVLMDistillationTrainer
from tiny_models import PAD_ID, make_inputs, make_tiny_target

ROOT = Path(__file__).resolve().parents[1]
SEQUENCE_KEYS = ("input_ids", "attention_mask", "response_mask", "mm_token_type_ids")

hf_logging.set_verbosity_error()


# ------------------------------------------------------------------------------------------------ helpers
def family_rows(family: str, target, n: int = 2) -> list[dict]:
    """n batch-1 rows of different lengths; the second half of each sequence is the "response"."""
    rows = []
    for seed in range(n):
        x = make_inputs(family, target, seed=seed, prompt_len=20 + 4 * (seed % 2))
        length = x["input_ids"].shape[1]
        response = torch.zeros_like(x["input_ids"])
        response[:, length // 2 :] = 1
        rows.append({**x, "response_mask": response})
    return rows


def collate_tensors(rows: list[dict]) -> dict:
    """Right-pad the sequence tensors, concatenate the per-image ones (what a processor batch looks like)."""
    length = max(r["input_ids"].shape[1] for r in rows)
    batch = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key in SEQUENCE_KEYS:
            fill = PAD_ID if key == "input_ids" else 0
            values = [
                torch.cat([v, torch.full((1, length - v.shape[1]), fill, dtype=v.dtype)], dim=1)
                for v in values
            ]
        batch[key] = torch.cat(values, dim=0)
    return batch


def make_draft(target, seed: int = 0, **overrides) -> SpecVLMDraftModel:
    torch.manual_seed(seed)
    return SpecVLMDraftModel(SpecVLMDraftConfig.from_target(target, **overrides))


def training_args(out, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def llava():
    target = make_tiny_target("llava", seed=0)
    return target, family_rows("llava", target, n=4)


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("family,steps", [("llava", 24), ("qwen2_vl", 12)])
def test_loss_decreases_and_target_is_frozen(family, steps, tmp_path):
    target = make_tiny_target(family, seed=0)
    before = state(target)
    draft = make_draft(target)
    args = training_args(tmp_path, max_steps=steps, logging_steps=3)
    assert args.remove_unused_columns  # the trainer switches it off for us
    trainer = SpecVLMDistillationTrainer(
        draft, target, args, data_collator=collate_tensors, train_dataset=family_rows(family, target) * 20
    )
    assert trainer.args.remove_unused_columns is False
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < 0.9 * logs[0]["loss"], logs
    for key in ("ce", "feature", "gate_cost", "top1_agreement", "accepted_length_estimate"):
        assert key in logs[-1]
    assert (
        1.0
        <= logs[-1]["accepted_length_estimate"]
        <= 1 + (draft.config.num_draft_tokens or DEFAULT_CHAIN_TOKENS)
    )
    # the target: bit for bit unchanged, frozen, in eval mode, and not trained
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not target.training and not any(p.requires_grad for p in target.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in draft.parameters()}
    assert not optimized & {id(p) for p in target.parameters()}


def test_checkpoint_holds_only_the_draft_and_reloads(llava, tmp_path):
    target, rows = llava
    draft = make_draft(target)
    args = training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = SpecVLMDistillationTrainer(
        draft, target, args, data_collator=collate_tensors, train_dataset=rows
    )
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(draft.state_dict())
    target_keys = set(target.state_dict())
    assert not keys & target_keys
    assert not any(("lm_head" in k or "embed_tokens" in k or "vision" in k) for k in keys)

    reloaded = AutoModel.from_pretrained(ckpt)
    assert isinstance(reloaded, SpecVLMDraftModel)
    reloaded.bind(target)
    for key, value in draft.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value)


def test_unrolled_training_and_compressor(llava, tmp_path):
    target, rows = llava
    draft = make_draft(target, compressor_mode="select")
    args = training_args(tmp_path, max_steps=4, logging_steps=2)
    trainer = SpecVLMDistillationTrainer(
        draft,
        target,
        args,
        data_collator=collate_tensors,
        train_dataset=rows,
        unroll_steps=2,
        feature_noise_std=0.1,
    )
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert "top1_agreement_step2" in log and "visual_keep_ratio" in log
    assert 0.0 <= log["visual_keep_ratio"] <= 1.0
    assert torch.isfinite(torch.tensor(log["loss"]))
    metrics = trainer.evaluate(eval_dataset=rows[:2])
    assert "eval_loss" in metrics and "eval_top1_agreement" in metrics


def test_unrolled_training_with_several_layers_default_architecture(llava, tmp_path):
    """ "eagle" with several target layers: `feature_proj` makes the slot h wide, the draft's outputs go there."""
    target, rows = llava
    draft = make_draft(target, target_layers=[1, -1])
    slot = draft.feature_slot(torch.randn(2, 5, 2 * draft.config.hidden_size))
    assert slot.shape == (2, 5, draft.config.hidden_size)
    args = training_args(tmp_path, max_steps=2, logging_steps=1)
    trainer = SpecVLMDistillationTrainer(
        draft, target, args, data_collator=collate_tensors, train_dataset=rows, unroll_steps=3
    )
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert {"top1_agreement_step1", "top1_agreement_step3"} <= set(log)
    assert torch.isfinite(torch.tensor(log["loss"]))


def test_peft_lora_target(tmp_path):
    peft = pytest.importorskip("peft")
    base = make_tiny_target("llava", seed=0)
    rows = family_rows("llava", base)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    target = peft.get_peft_model(base, lora)
    before = state(target)
    draft = make_draft(base)
    trainer = SpecVLMDistillationTrainer(
        draft,
        target,
        training_args(tmp_path, max_steps=3),
        data_collator=collate_tensors,
        train_dataset=rows * 2,
    )
    trainer.train()
    after = target.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora" in k for k in draft.state_dict())
    # the draft reads the adapted target's features, not the base model's
    batch = collate_tensors(rows)
    _, _, last, logits = trainer._target_outputs(batch)
    with torch.no_grad():
        adapted = target(**{k: v for k, v in batch.items() if k != "response_mask"}).logits
        with target.disable_adapter():
            plain = target(**{k: v for k, v in batch.items() if k != "response_mask"}).logits
    assert torch.allclose(logits, adapted, atol=1e-5)
    assert not torch.allclose(logits, plain, atol=1e-3)


# --------------------------------------------------------------------------------------------- resume
def _run(target, rows, out, max_steps, resume=None, callbacks=None):
    draft = make_draft(target)
    args = training_args(out, max_steps=max_steps, save_strategy="steps", save_steps=3, logging_steps=1)
    trainer = SpecVLMDistillationTrainer(
        draft,
        target,
        args,
        data_collator=collate_tensors,
        train_dataset=rows,
        feature_noise_std=0.05,  # exercises the RNG state restored on resume
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return state(draft)


@pytest.fixture(scope="module")
def uninterrupted(llava, tmp_path_factory):
    target, rows = llava
    return _run(target, rows, tmp_path_factory.mktemp("full"), max_steps=6)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


def test_resume_matches_uninterrupted_run(llava, uninterrupted, tmp_path):
    target, rows = llava

    class Stop(TrainerCallback):  # an interruption right after the step-3 checkpoint
        def on_save(self, args, state, control, **kwargs):
            control.should_training_stop = True

    _run(target, rows, tmp_path, max_steps=6, callbacks=[Stop()])
    assert (tmp_path / "checkpoint-3").is_dir() and not (tmp_path / "checkpoint-6").exists()
    resumed = _run(target, rows, tmp_path, max_steps=6, resume=str(tmp_path / "checkpoint-3"))
    _assert_same(resumed, uninterrupted)
    init = state(make_draft(target))
    assert not torch.equal(resumed["fc.weight"], init["fc.weight"])


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from transformers import TrainerCallback
import test_trainer as t
from tiny_models import make_tiny_target

class Hang(TrainerCallback):  # written the checkpoint: tell the parent, then wait to be killed
    def on_save(self, args, state, control, **kwargs):
        open({marker!r}, "w").write(str(state.global_step))
        time.sleep(600)

target = make_tiny_target("llava", seed=0)
t._run(target, t.family_rows("llava", target, n=4), {out!r}, max_steps=6, callbacks=[Hang()])
"""


def test_resume_after_kill(llava, uninterrupted, tmp_path):
    target, rows = llava
    out, marker = tmp_path / "run", tmp_path / "saved"
    script = tmp_path / "train_and_hang.py"
    script.write_text(
        textwrap.dedent(KILL_SCRIPT).format(tests=str(ROOT / "tests"), marker=str(marker), out=str(out))
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not marker.exists():
            assert proc.poll() is None, "the training subprocess died before writing its checkpoint"
            assert time.time() < deadline, "no checkpoint after 300 s"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)  # a hard kill, no clean-up
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert marker.read_text() == "3"
    resumed = _run(target, rows, out, max_steps=6, resume=str(out / "checkpoint-3"))
    _assert_same(resumed, uninterrupted)


# ------------------------------------------------------------------------------------------------ DDP
DDP_SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
import test_trainer as t
from tiny_models import make_tiny_target
from torch.nn.parallel import DistributedDataParallel

target = make_tiny_target("llava", seed=0)
rows = t.family_rows("llava", target, n=4)
draft = t.make_draft(target)
args = t.training_args({out!r}, max_steps=4, per_device_train_batch_size=1, logging_steps=2, ddp_backend="gloo")
trainer = t.SpecVLMDistillationTrainer(
    draft, target, args, data_collator=t.collate_tensors, train_dataset=rows, feature_noise_std=0.1
)
trainer.train()
assert isinstance(trainer.model_wrapped, DistributedDataParallel), type(trainer.model_wrapped)
assert trainer.model_wrapped.module is draft and not isinstance(trainer.target_model, DistributedDataParallel)
assert trainer.accelerator.num_processes == 2
logs = [h for h in trainer.state.log_history if "loss" in h]
assert len(logs) == 2 and "top1_agreement" in logs[0], logs  # metrics averaged over both ranks
rank = trainer.accelerator.process_index
torch.save({{k: v.detach().clone() for k, v in draft.state_dict().items()}}, os.path.join({out!r}, f"rank{{rank}}.pt"))
"""


@pytest.mark.slow  # ~20 s; 2-process runs are also in test_target_sharding (slow)
def test_ddp_two_processes(tmp_path):
    """`torchrun --nproc_per_node 2` on CPU (gloo): both ranks end with the same draft weights (~40 s here)."""
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT).format(tests=str(ROOT / "tests"), out=str(tmp_path)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    result = subprocess.run([*cmd, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    _assert_same(rank0, rank1)
    target = make_tiny_target("llava", seed=0)
    init = state(make_draft(target))
    assert not torch.equal(rank0["fc.weight"], init["fc.weight"])


# ------------------------------------------------------------------------------------------- collator
@pytest.fixture(scope="module")
def toy_processor():
    from specvlm_hf.toy.world import build_toy_processor

    return build_toy_processor(seed=0)


@pytest.fixture(scope="module")
def toy_vocab_llava(toy_processor):
    """A tiny random LLaVA whose vocabulary and image geometry match the toy processor (9 image tokens)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = toy_processor.tokenizer
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=96,
        patch_size=32,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=9,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def _text_row(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
    }


def test_collator_response_mask(toy_processor):
    from specvlm_hf.toy.data import make_toy_rows

    rows = make_toy_rows(2, seed=0) + [_text_row("Hello there", "A red circle.")]
    batch = SpecVLMDataCollator(toy_processor)(rows)
    tok = toy_processor.tokenizer
    assert batch["pixel_values"].shape[0] == 2
    assert batch["input_ids"].shape == batch["response_mask"].shape
    for b, row in enumerate(rows):
        n = int(batch["attention_mask"][b].sum())
        assert (
            batch["attention_mask"][b, :n].all() and not batch["attention_mask"][b, n:].any()
        )  # right padding
        response = batch["input_ids"][b][batch["response_mask"][b].bool()]
        answer = row["messages"][1]["content"][0]["text"]
        assert tok.decode(response).strip() == answer + tok.eos_token
        assert not batch["response_mask"][b, n:].any()
    image_id = tok.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"][0] == image_id).sum()) == 9


def test_collator_multi_turn_and_truncation(toy_processor):
    from specvlm_hf.toy.data import make_toy_rows

    row = make_toy_rows(1, seed=1)[0]
    row = {
        "images": row["images"],
        "messages": row["messages"]
        + [
            {"role": "user", "content": [{"type": "text", "text": "Are you sure?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
        ],
    }
    tok = toy_processor.tokenizer
    batch = SpecVLMDataCollator(toy_processor)([row])
    text = tok.decode(batch["input_ids"][0][batch["response_mask"][0].bool()])
    assert text.endswith("Yes." + tok.eos_token) and "Are you sure" not in text
    short = SpecVLMDataCollator(toy_processor, max_length=14)([row])
    assert short["input_ids"].shape[1] >= 14  # never cuts the 9 image tokens
    image_id = tok.convert_tokens_to_ids("<image>")
    assert int((short["input_ids"][0] == image_id).sum()) == 9
    assert short["input_ids"].shape[1] <= batch["input_ids"].shape[1]


def test_trainer_on_vision_chat_rows(toy_processor, toy_vocab_llava, tmp_path):
    """The whole path: datasets.Dataset of vision-chat rows -> collator -> trainer (processing_class only)."""
    from specvlm_hf.toy.data import make_toy_dataset

    dataset = make_toy_dataset(4, seed=0)
    draft = make_draft(toy_vocab_llava)
    trainer = SpecVLMDistillationTrainer(
        draft,
        toy_vocab_llava,
        training_args(tmp_path, max_steps=4, logging_steps=2),
        train_dataset=dataset,
        processing_class=toy_processor,
    )
    assert isinstance(trainer.data_collator, SpecVLMDataCollator)
    trainer.train()
    assert [h for h in trainer.state.log_history if "loss" in h]


def test_batch_visual_spans_splits_per_image_tensors():
    """Each row gets exactly its own images' `image_grid_thw` (Qwen2-VL), so every span keeps its layout."""
    from specvlm_hf.targets import families as targets
    from specvlm_hf.training.trainer import batch_visual_spans

    target = make_tiny_target("qwen2_vl", seed=0)
    rows = family_rows("qwen2_vl", target, n=3)
    batch = collate_tensors(rows)
    per_row = batch_visual_spans(target, batch["input_ids"], batch)
    assert len(per_row) == 3
    for row, spans in zip(rows, per_row):
        own = targets.visual_spans(target, row["input_ids"], {"image_grid_thw": row["image_grid_thw"]})
        assert spans == own and spans and all(s.grid is not None for s in spans)


def test_unrolled_mask_follows_decoding():
    """Step j's row q continues the chain decoding starts at row q - j: step 0's rows <= q - j (not padding), then
    one row of each later step (q - j + i of step i)."""
    from specvlm_hf.training.trainer import unrolled_mask

    valid = torch.tensor([[True, True, True, True, True], [True, True, True, False, False]])
    allowed = unrolled_mask(5, 2, valid, dtype=torch.float32)[:, 0] == 0  # (B, 5, 15)
    assert allowed.shape == (2, 5, 15)
    step0, step1, step2 = allowed[..., :5], allowed[..., 5:10], allowed[..., 10:]
    assert step0[0, 4].tolist() == [True, True, True, False, False]  # rows <= 4 - 2
    assert step1[0, 4].tolist() == [False, False, False, True, False]  # row 3 of step 1
    assert step2[0, 4].tolist() == [False, False, False, False, True]  # itself
    assert not step0[0, 1].any() and step1[0, 1, 0] and step2[0, 1, 1]  # a chain from before row 0
    assert step0[1, 4].tolist() == [True, True, True, False, False] and not step0[1, :, 3:].any()
    assert bool((allowed.sum(-1) >= 1).all())  # every query sees at least itself
