"""Targets as users load them (issue #25): quantized with bitsandbytes (8-bit, nf4), torchao (int8 weight-only) and
quanto (int8), or dispatched by accelerate with decoder layers / the embedding and lm_head offloaded to CPU and disk.

"Lossless" is against plain `generate` of the same loaded model. Each case runs a forced draft (proposes the target's
own greedy continuation except at chosen positions, so trees and chains are accepted deep and the verify forward's
masks, positions and cache crops on the loaded target all matter) and a real untrained draft (shares the target's
embedding and lm_head, runs through the CPU backend's decode plan, which must step aside for quantized or offloaded
modules). The target is `loaded_targets`' 64-wide sharp LLaVA; `test_cases_can_fail` checks that shifting decode
positions by one changes its greedy output under every loading.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from batched_inputs import generated_rows, make_batch_inputs, pad_id, real_lengths
from forced_draft import make_batched_forced_draft, make_forced_draft, merged_reference
from loaded_targets import OFFLOADED, QUANTIZED, QUANTIZED_HEADS, load_target, require
from sharp_models import shifted_generate
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel, backends
from specvlm_hf.targets.loading import dense_linear_rows, execution_device, is_offloaded
from test_sampling_processors import PROCESSING
from test_sampling_processors import _chi_square_p_value as chi_square_p_value
from test_sampling_processors import _exact_joint_law as exact_joint_law
from tiny_models import make_inputs

MAX_NEW = 14
SEEDS, LENS = [3, 4], [6, 30]  # two rows whose decode position ranges are disjoint (the batched forced draft)
BUDGET = dict(tree_top_k=3, tree_depth=4, tree_total_tokens=10, num_draft_tokens=4)
SCHEMES = QUANTIZED + QUANTIZED_HEADS + OFFLOADED

_TARGETS: dict[str, torch.nn.Module] = {}


def _target(scheme: str):
    require(scheme)
    if scheme not in _TARGETS:
        _TARGETS[scheme] = load_target(scheme)
    return _TARGETS[scheme]


def _inputs(model, batch: int) -> dict:
    if batch == 1:
        return make_inputs("llava", model, seed=SEEDS[0], prompt_len=LENS[0])
    return make_batch_inputs("llava", model, SEEDS, LENS)


def _real_draft(model, mode: str, **config) -> SpecVLMDraftModel:
    torch.manual_seed(0)
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model, decoding_mode=mode, **BUDGET, **config))
    return draft.bind(model).eval()


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("mode", ["tree", "chain"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_greedy_equals_plain_generate_of_the_same_loaded_target(scheme, mode, batch):
    model = _target(scheme)
    inputs = _inputs(model, batch)
    width = inputs["input_ids"].shape[1]
    reference = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)

    rows = generated_rows(reference, width, pad_id(model))
    starts = real_lengths(inputs)
    wrong = {start + offset for start in starts for offset in (3, 9)}
    forced = make_batched_forced_draft(model, merged_reference(rows, starts), wrong, **BUDGET)
    out = model.generate(
        **inputs, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=forced, decoding_mode=mode
    )
    assert torch.equal(out, reference), (scheme, mode, batch, out[:, width:].tolist(), rows)
    stats = forced.last_generation_stats
    lengths = (
        [n for row in stats.rows for n in row.accepted_lengths] if stats.rows else stats.accepted_lengths
    )
    assert max(lengths) >= 3, (scheme, mode, lengths)  # deep acceptance really happened on this target

    draft = _real_draft(model, mode)
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=draft)
    assert torch.equal(out, reference), (scheme, mode, batch, "real draft")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_cases_can_fail(scheme):
    """Every loading keeps the target position-sensitive: off-by-one decode positions change its greedy output."""
    model = _target(scheme)
    inputs = _inputs(model, 1)
    plain = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    assert not torch.equal(shifted_generate(model, inputs, MAX_NEW), plain)


@pytest.mark.parametrize("scheme", ["bnb-nf4-head", "offload-head", "quanto-int8-head"])
def test_decode_plan_uses_shared_modules_through_their_forward(scheme):
    """The CPU backend's plan still runs for the draft's own weights, and its logits over a quantized or offloaded
    lm_head equal the draft's own `draft_logits` (the module called in its own dtype and device)."""
    model = _target(scheme)
    draft = _real_draft(model, "tree")
    assert draft.norm.weight.device == execution_device(model.lm_head)  # never the meta device
    hidden = torch.randn(3, draft.config.hidden_size)
    ids = torch.tensor([5, 9, 11])
    with torch.no_grad():
        expected = draft.draft_logits(draft.decode_step(ids, hidden))[0]
        with backends.accelerated(draft):
            assert backends.active_plan(draft) is not None
            got = backends.draft_logits(draft, backends.draft_step(draft, ids, hidden))[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with (
        torch.no_grad()
    ):  # and they are the head's own logits of the draft's output, taken in the head's dtype
        out = draft.decode_step(ids, hidden)
        torch.testing.assert_close(expected, model.lm_head(out).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["bnb-8bit-head", "bnb-nf4-head", "quanto-int8-head", "offload-head"])
def test_reduced_vocabulary_head_from_a_quantized_or_offloaded_lm_head(scheme):
    """`set_draft_vocab(init_from_target=True)` copies the selected lm_head rows dequantized through the module's
    forward (never its packed storage): they reproduce the head's own logits on those columns; decoding with the
    reduced vocabulary stays lossless."""
    model = _target(scheme)
    draft = _real_draft(model, "tree", draft_vocab_size=64)
    ids = torch.arange(100, 164)
    draft.set_draft_vocab(ids, init_from_target=True)
    x = torch.randn(4, draft.config.hidden_size)
    with torch.no_grad():
        head_logits = model.lm_head(x)[:, ids]
        own = draft.draft_lm_head(x)
    tol = 0.1 if scheme == "bnb-8bit-head" else 1e-4  # LLM.int8 also rounds the input x to int8
    torch.testing.assert_close(own, head_logits.float(), rtol=tol, atol=tol)
    inputs = _inputs(model, 1)
    reference = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=draft)
    assert torch.equal(out, reference)


def test_dense_linear_rows_of_a_plain_linear_are_its_weight_rows():
    lin = torch.nn.Linear(8, 5, bias=True)
    rows = torch.tensor([4, 0, 2])
    torch.testing.assert_close(dense_linear_rows(lin, rows, torch.float32), lin.weight[rows].detach())


@pytest.mark.parametrize("scheme", QUANTIZED_HEADS)
def test_the_draft_sees_the_target_vocabulary_not_the_packed_head_shape(scheme):
    """bitsandbytes 4-bit stores lm_head as (V * h / 2, 1) bytes: the draft's vocabulary is the head's out_features."""
    model = _target(scheme)
    assert SpecVLMDraftConfig.from_target(model).vocab_size == model.lm_head.out_features == 320


def test_offloaded_modules_are_seen_as_offloaded():
    require("offload-head")
    model = _target("offload-head")
    assert model.lm_head.weight.device.type == "meta" and is_offloaded(model.lm_head)
    assert execution_device(model.lm_head).type == "cpu"


def test_a_quantized_draft_is_refused_at_bind():
    model = _target("bnb-nf4")
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model))
    draft.layers[0].mlp.down_proj.weight = torch.nn.Parameter(
        torch.zeros_like(draft.layers[0].mlp.down_proj.weight, dtype=torch.int8), requires_grad=False
    )
    with pytest.raises(ValueError, match="dense floating tensors"):
        draft.bind(model)


N_DRAWS = 300
ALPHA = 1e-3


@pytest.mark.slow  # ~17 s each
@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_sampling_on_a_quantized_target_has_its_law(mode):
    """Speculative sampling on the nf4 target (lm_head nf4 too) draws the first two tokens with the exact law of the
    same quantized model (chi-square, as tests/test_sampling_processors.py)."""
    model = _target("bnb-nf4-head")
    inputs = make_inputs("llava", model, seed=SEEDS[0], prompt_len=LENS[0])
    width = inputs["input_ids"].shape[1]
    law = exact_joint_law(model, inputs)  # (under PROCESSING: temperature, top-k, top-p, repetition penalty)
    reference = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    draft = make_forced_draft(model, reference[0], set(), tree_depth=3, tree_total_tokens=5, tree_top_k=2)
    torch.manual_seed(2)
    counts: Counter = Counter()
    accepted = []
    for _ in range(N_DRAWS):
        out = model.generate(
            **inputs,
            max_new_tokens=3,
            do_sample=True,
            assistant_model=draft,
            decoding_mode=mode,
            num_draft_tokens=3,
            **PROCESSING,
        )
        counts[tuple(out[0, width : width + 2].tolist())] += 1
        accepted += draft.last_generation_stats.accepted_lengths
    p_value = chi_square_p_value(counts, law, N_DRAWS)
    cells = sorted(law, key=law.get, reverse=True)[:6]
    seen = [(c, round(law[c] * N_DRAWS, 1), counts[c]) for c in cells]
    assert sum(law[c] * N_DRAWS >= 5 for c in law) >= 3, f"too peaked a law to test: {seen}"
    assert p_value > ALPHA, (
        f"{mode}: first two tokens differ from the target's law, p = {p_value:.2e}: {seen}"
    )
    assert max(accepted) >= 2  # draft tokens were accepted: the rejection rule really ran


def test_distillation_from_a_4bit_target_measures_it_and_resumes_exactly(tmp_path):
    """SpecVLMDistillationTrainer with an nf4 target: the target logits it distils from and measures top-1 agreement
    against are the quantized model's own (not the dense checkpoint's), the loss falls, and a run stopped at its
    step-3 checkpoint and resumed ends with the same draft as an uninterrupted one."""
    from transformers import TrainerCallback

    from specvlm_hf.training.trainer import SpecVLMDistillationTrainer
    from test_trainer import _assert_same, _run, collate_tensors, family_rows, make_draft, training_args

    target, dense = _target("bnb-nf4"), load_target("dense")
    rows = family_rows("llava", target, n=4)
    args = training_args(tmp_path / "curve", max_steps=12, logging_steps=3)
    trainer = SpecVLMDistillationTrainer(
        make_draft(target), target, args, data_collator=collate_tensors, train_dataset=rows * 6
    )
    batch = collate_tensors(rows[:2])
    logits = trainer._target_outputs(batch)[3]
    plain = {k: v for k, v in batch.items() if k != "response_mask"}
    with torch.no_grad():
        torch.testing.assert_close(logits, target(**plain).logits)
        assert not torch.allclose(logits, dense(**plain).logits, atol=1e-3)  # nf4 really changed the target
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < logs[0]["loss"] and "top1_agreement" in logs[-1], logs

    class Stop(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            control.should_training_stop = True

    full = _run(target, rows, tmp_path / "full", max_steps=6)
    _run(target, rows, tmp_path / "cut", max_steps=6, callbacks=[Stop()])
    resumed = _run(target, rows, tmp_path / "cut", max_steps=6, resume=str(tmp_path / "cut" / "checkpoint-3"))
    _assert_same(resumed, full)


@pytest.mark.parametrize("scheme", ["bnb-nf4-head", "offload-head"])
def test_export_writes_dense_copies_of_a_quantized_or_offloaded_target_head(scheme, tmp_path):
    """`export_draft` writes copies of the target's embedding and lm_head: dense values (the offloaded weights
    loaded by their hook, the nf4 head dequantized through its forward), never packed storage or meta tensors."""
    from safetensors.torch import load_file

    from specvlm_hf.sharing.export import export_draft

    model, dense = _target(scheme), load_target("dense")
    config = SpecVLMDraftConfig.from_target(model, draft_architecture="eagle3", target_layers=[1])
    draft = SpecVLMDraftModel(config).bind(model).eval()
    weights = load_file(export_draft(draft, tmp_path) / "model.safetensors")
    torch.testing.assert_close(weights["embed_tokens.weight"], dense.model.language_model.embed_tokens.weight)
    head = dense.lm_head.weight
    if scheme == "bnb-nf4-head":  # what bitsandbytes itself dequantizes the nf4 head to
        import bitsandbytes.functional as bnbf

        packed = model.lm_head.weight
        head = bnbf.dequantize_4bit(packed.data, packed.quant_state)
    torch.testing.assert_close(weights["lm_head.weight"], head.float(), rtol=1e-5, atol=1e-5)


def test_quantization_flag_names_the_tested_schemes():
    from specvlm_hf import cli
    from specvlm_hf.targets.loading import QUANTIZATION_CHOICES, quantization_config

    assert set(cli.QUANTIZATION_CHOICES) == set(QUANTIZATION_CHOICES)
    for command in ("train", "bench"):
        args = cli.build_parser().parse_args([command, "--quantization", "bnb-nf4", "--output-dir", "out"])
        assert args.quantization == "bnb-nf4"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--quantization", "gptq"])
    with pytest.raises(ValueError, match="choose from"):
        quantization_config("int3")


def test_llm_int8_outlier_threshold_makes_a_token_depend_on_its_forward():
    """Why 8-bit targets are tested with `llm_int8_threshold=0`: with the default 6.0 one row's output of an int8
    linear changes with the other rows of the same forward (outlier columns are chosen over all of them), so no
    decoding that verifies several tokens in one forward can equal plain generate bit for bit; at 0 it can."""
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from loaded_targets import saved_target

    require("bnb-8bit")
    torch.manual_seed(0)
    x = torch.randn(5, 64) * 4
    for threshold, independent in ((6.0, False), (0.0, True)):
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
        model = AutoModelForImageTextToText.from_pretrained(saved_target(), quantization_config=config)
        linear = model.model.language_model.layers[0].mlp.gate_proj
        with torch.no_grad():
            together, alone = linear(x), torch.cat([linear(x[i : i + 1]) for i in range(5)])
        assert torch.equal(together, alone) == independent, threshold


def test_the_plan_never_packs_a_tensor_subclass_weight():
    """torchao keeps `nn.Linear` and swaps its weight for a quantized tensor subclass: not a plain linear for the
    plan (packing it would read its storage)."""
    from specvlm_hf.backends.packed_linear import plain_linear

    torchao_quantization = pytest.importorskip("torchao.quantization")
    linear = torch.nn.Linear(64, 64)
    assert plain_linear(linear)
    torchao_quantization.quantize_(linear, torchao_quantization.Int8WeightOnlyConfig())
    assert type(linear) is torch.nn.Linear and not plain_linear(linear)
