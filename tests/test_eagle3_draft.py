"""The EAGLE-3 draft architecture (`draft_architecture="eagle3"`): structure, lossless decoding, save/load, training."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

import specvlm_hf  # noqa: F401  (registers the Auto classes)
from forced_draft import ForcedDraft, expected_accepted_lengths
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.targets.features import capture_decoder_inputs, select_features
from specvlm_hf.training.trainer import SpecVLMDistillationTrainer
from test_trainer import collate_tensors, family_rows, training_args
from tiny_models import HIDDEN, make_inputs, make_tiny_target

FAMILIES = ["llava", "qwen2_vl"]
MODES = ["tree", "chain"]
# (id, config overrides): three fused target layers through fc, and one target layer (no fc) with a reduced vocab
VARIANTS = [
    ("three_layers", dict(target_layers=[0, 1, -1])),
    ("one_layer_reduced_vocab", dict(target_layers=[-1], draft_vocab_size=64, num_hidden_layers=2)),
]


def eagle3_draft(target, seed: int = 0, **overrides) -> SpecVLMDraftModel:
    torch.manual_seed(seed)
    config = SpecVLMDraftConfig.from_target(target, draft_architecture="eagle3", **overrides)
    draft = SpecVLMDraftModel(config).bind(target)
    if config.draft_vocab_size is not None:
        draft.set_draft_vocab(torch.randperm(config.vocab_size)[: config.draft_vocab_size])
    return draft


# ------------------------------------------------------------------------------------------------ config
def test_invalid_architecture_raises_naming_the_value():
    with pytest.raises(ValueError, match=re.escape("invalid draft_architecture='eagle4'")):
        SpecVLMDraftConfig(
            hidden_size=32, num_attention_heads=4, intermediate_size=64, draft_architecture="eagle4"
        )
    with pytest.raises(ValueError, match=re.escape("invalid draft_architecture='EAGLE3'")):
        SpecVLMDraftConfig.from_target(make_tiny_target("llama"), draft_architecture="EAGLE3")


def test_from_target_defaults_to_eagle3_layers():
    deep = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4
        )
    )
    assert SpecVLMDraftConfig.from_target(deep, draft_architecture="eagle3").target_layers == [2, 4, 5]
    assert SpecVLMDraftConfig.from_target(deep).target_layers == [-1]  # the default draft is unchanged
    explicit = SpecVLMDraftConfig.from_target(deep, draft_architecture="eagle3", target_layers=[-1])
    assert explicit.target_layers == [-1]
    # a 2-layer target has no three distinct EAGLE-3 layers: the last hidden state
    assert SpecVLMDraftConfig.from_target(
        make_tiny_target("llama"), draft_architecture="eagle3"
    ).target_layers == [-1]


# ------------------------------------------------------------------------------------------------ model
def test_structure_and_weight_names(targets_cache):
    target = targets_cache("llava")
    multi = eagle3_draft(target, target_layers=[0, 1, -1], num_hidden_layers=2)
    names = set(multi.state_dict())
    assert multi.fc.weight.shape == (HIDDEN, 3 * HIDDEN)
    assert {"layers.0.hidden_norm.weight", "layers.0.input_layernorm.weight", "norm.weight"} <= names
    assert "layers.1.hidden_norm.weight" not in names  # later layers are plain Llama layers
    assert multi.layers[0].self_attn.q_proj.weight.shape[1] == 2 * HIDDEN
    assert multi.layers[1].self_attn.q_proj.weight.shape[1] == HIDDEN
    assert multi.feature_proj is None and multi.input_norm is None
    assert not any(n.startswith(("input_norm", "feature_proj")) for n in names)
    single = eagle3_draft(target)
    assert single.fc is None and not any(n.startswith("fc.") for n in single.state_dict())
    assert single.config.fused_size == 2 * HIDDEN and "eagle3" in repr(single)


def test_forward_is_eagle3(targets_cache):
    """The forward, written out: g = fc(f), layer 0 attends over [norm(e) ; norm(g)] with residual g, no final norm;
    the logits norm it. Deeper steps feed the h-wide output back into the feature slot without fc."""
    target = targets_cache("llava")
    draft = eagle3_draft(target, target_layers=[0, 1, -1]).eval()
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.1 * torch.randn_like(p))
    layer = draft.layers[0]
    e, f = torch.randn(1, 5, HIDDEN), torch.randn(1, 5, 3 * HIDDEN)
    pos = torch.arange(5)[None]
    with torch.no_grad():
        out = draft(inputs_embeds=e, hidden_states=f, position_ids=pos).last_hidden_state
        g = draft.fc(f)
        cos, sin = draft.rotary_emb(pos, e.dtype)
        x = g + layer.self_attn(
            torch.cat([layer.input_layernorm(e), layer.hidden_norm(g)], -1), cos, sin, None, None
        )
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        torch.testing.assert_close(out, x)
        torch.testing.assert_close(draft.compute_logits(out), target.lm_head(draft.norm(out)))
        fused = draft.fuse(e, f)
        assert fused.shape == (1, 5, 2 * HIDDEN)
        torch.testing.assert_close(fused, torch.cat([e, g], -1))
        torch.testing.assert_close(draft(fused_inputs=fused, position_ids=pos).last_hidden_state, out)
        # a draft output (h wide) goes straight into the feature slot
        torch.testing.assert_close(draft.fuse(e, out), torch.cat([e, out], -1))


def test_forward_on_real_features_and_prepare_context(targets_cache):
    target = targets_cache("qwen2_vl")
    draft = eagle3_draft(target, target_layers=[0, 1, -1], compressor_mode="pool").eval()
    inputs = make_inputs("qwen2_vl", target)
    with torch.no_grad(), capture_decoder_inputs(target) as captured:
        out = target(**inputs, output_hidden_states=True)
    features = select_features(out.hidden_states, draft.config.target_layers)
    ids = inputs["input_ids"]
    with torch.no_grad():
        ctx = draft.prepare_context(ids, captured[0], features)
        assert ctx.fused.shape == (1, ids.shape[1] - 1, 2 * HIDDEN)
        hidden = draft(fused_inputs=ctx.fused, position_ids=ctx.position_ids).last_hidden_state
        direct = draft(
            inputs_embeds=captured[0][:, 1:], hidden_states=features[:, :-1], position_ids=ctx.position_ids
        ).last_hidden_state
    torch.testing.assert_close(direct, hidden)
    assert torch.isfinite(draft.compute_logits(hidden)).all()


# ------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("variant", [v for _, v in VARIANTS], ids=[i for i, _ in VARIANTS])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_plain(family, variant, targets_cache):
    target = targets_cache(family)
    draft = eagle3_draft(target, **variant)
    for seed, n in [(1, 12), (2, 20)]:
        inputs = make_inputs(family, target, seed=seed)
        reference = target.generate(**inputs, max_new_tokens=n, do_sample=False)
        for mode in MODES:
            out = target.generate(
                **inputs, max_new_tokens=n, do_sample=False, assistant_model=draft, decoding_mode=mode
            )
            assert torch.equal(out, reference), f"{family}/{mode}/seed{seed}"
            assert draft.last_generation_stats.new_tokens == n


@pytest.mark.parametrize("compressor_mode", ["select", "conv", "resampler"])
def test_greedy_equals_plain_with_compressor(compressor_mode, targets_cache):
    target = targets_cache("llava")
    draft = eagle3_draft(target, target_layers=[0, 1, -1], compressor_mode=compressor_mode)
    inputs = make_inputs("llava", target, seed=1)
    reference = target.generate(**inputs, max_new_tokens=10, do_sample=False)
    for mode in MODES:
        out = target.generate(
            **inputs, max_new_tokens=10, do_sample=False, assistant_model=draft, decoding_mode=mode
        )
        assert torch.equal(out, reference), mode
        stats = draft.last_generation_stats
        assert stats.draft_visual_tokens < stats.visual_tokens


@pytest.mark.parametrize("mode", MODES)
def test_forced_eagle3_draft_accepts_exactly_as_expected(mode, targets_cache):
    """The eagle3 forward and its feedback path under real acceptance (multi-token accepts, cache compaction)."""
    target = targets_cache("llava")
    n, lookahead = 24, 4
    inputs = make_inputs("llava", target, seed=3)
    reference = target.generate(**inputs, max_new_tokens=n, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    wrong = {prompt_len + 5, prompt_len + 6, prompt_len + 14}
    config = SpecVLMDraftConfig.from_target(target, draft_architecture="eagle3", target_layers=[0, 1, -1])
    draft = ForcedDraft(config).bind(target).force(reference[0], wrong)
    settings = dict(tree_depth=lookahead, tree_top_k=3, tree_total_tokens=10, num_draft_tokens=lookahead)
    out = target.generate(
        **inputs, max_new_tokens=n, do_sample=False, assistant_model=draft, decoding_mode=mode, **settings
    )
    assert torch.equal(out, reference)
    assert draft.last_generation_stats.accepted_lengths == expected_accepted_lengths(
        prompt_len, n, wrong, lookahead
    )


def test_sampling_runs(targets_cache):
    target = targets_cache("llava")
    draft = eagle3_draft(target, target_layers=[0, 1, -1], draft_vocab_size=64)
    inputs = make_inputs("llava", target, seed=1)
    for mode in MODES:
        torch.manual_seed(0)
        out = target.generate(
            **inputs,
            max_new_tokens=8,
            do_sample=True,
            temperature=0.7,
            assistant_model=draft,
            decoding_mode=mode,
        )
        assert out.shape[1] == inputs["input_ids"].shape[1] + 8


# ------------------------------------------------------------------------------------------- save/load
@pytest.mark.parametrize("variant", [v for _, v in VARIANTS], ids=[i for i, _ in VARIANTS])
def test_save_load_round_trip(variant, targets_cache, tmp_path):
    target = targets_cache("llava")
    draft = eagle3_draft(target, **variant).eval()
    draft.save_pretrained(tmp_path)
    assert '"draft_architecture": "eagle3"' in (tmp_path / "config.json").read_text()
    e, f = torch.randn(1, 4, HIDDEN), torch.randn(1, 4, draft.config.num_fused_layers * HIDDEN)
    with torch.no_grad():
        expected = draft.compute_logits(draft(inputs_embeds=e, hidden_states=f).last_hidden_state)
    for loaded in (
        SpecVLMDraftModel.from_pretrained(tmp_path, target=target),
        AutoModel.from_pretrained(tmp_path).bind(target),
    ):
        assert loaded.config.draft_architecture == "eagle3"
        assert loaded.config.target_layers == draft.config.target_layers
        assert set(loaded.state_dict()) == set(draft.state_dict())
        for name, tensor in draft.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        with torch.no_grad():
            got = loaded.eval().compute_logits(loaded(inputs_embeds=e, hidden_states=f).last_hidden_state)
        assert torch.equal(got, expected)


def test_default_config_file_has_no_architecture_field(targets_cache, tmp_path):
    """Configs of default drafts re-save byte for byte (hub_configs/); loading fills in "eagle"."""
    config = SpecVLMDraftConfig.from_target(targets_cache("llava"))
    config.save_pretrained(tmp_path)
    assert "draft_architecture" not in (tmp_path / "config.json").read_text()
    assert SpecVLMDraftConfig.from_pretrained(tmp_path).draft_architecture == "eagle"
    assert config.to_dict()["draft_architecture"] == "eagle"


# ------------------------------------------------------------------------------------------- training
def test_training_loss_decreases(targets_cache, tmp_path):
    target = targets_cache("llava")
    draft = eagle3_draft(target, target_layers=[0, 1, -1])
    args = training_args(tmp_path, max_steps=24, logging_steps=3)
    rows = family_rows("llava", target) * 20
    trainer = SpecVLMDistillationTrainer(
        draft, target, args, data_collator=collate_tensors, train_dataset=rows
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < 0.9 * logs[0]["loss"], logs
    assert logs[-1]["top1_agreement"] >= logs[0]["top1_agreement"]
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in draft.parameters()}


def test_unrolled_training_with_one_target_layer(targets_cache, tmp_path):
    """EAGLE-3's training-time test: the draft's own output in the feature slot (no fc with one layer)."""
    target = targets_cache("llava")
    draft = eagle3_draft(target, target_layers=[-1], compressor_mode="select")
    args = training_args(tmp_path, max_steps=2, logging_steps=1)
    trainer = SpecVLMDistillationTrainer(
        draft,
        target,
        args,
        data_collator=collate_tensors,
        train_dataset=family_rows("llava", target),
        unroll_steps=2,
    )
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert "top1_agreement_step2" in log and torch.isfinite(torch.tensor(log["loss"]))


def test_unrolled_training_with_several_target_layers(targets_cache, tmp_path):
    """The training-time test with three fused layers: step 1 reads fc(target layers), later steps the draft's
    own h-wide outputs in the same slot; every step's agreement is logged and the loss falls."""
    target = targets_cache("llava")
    draft = eagle3_draft(target, target_layers=[0, 1, -1])
    fc_before = draft.fc.weight.detach().clone()
    args = training_args(tmp_path, max_steps=24, logging_steps=3)
    trainer = SpecVLMDistillationTrainer(
        draft,
        target,
        args,
        data_collator=collate_tensors,
        train_dataset=family_rows("llava", target) * 20,
        unroll_steps=3,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < 0.95 * logs[0]["loss"], logs
    assert {f"top1_agreement_step{j}" for j in (1, 2, 3)} <= set(logs[-1])
    assert logs[-1]["top1_agreement_step3"] >= logs[0]["top1_agreement_step3"]
    assert not torch.equal(draft.fc.weight.detach(), fc_before)  # fc is trained through the projected rows
