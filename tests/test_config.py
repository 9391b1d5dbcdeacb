"""SpecVLMDraftConfig: validation of every checked field, from_target on unsupported models, save/load."""

from __future__ import annotations

import re

import pytest
from transformers import AutoConfig, BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

import specvlm_hf  # noqa: F401  (registers "specvlm_draft" with AutoConfig / AutoModel)
from specvlm_hf import SpecVLMDraftConfig
from specvlm_hf.draft.configuration_specvlm import (
    COMPRESSOR_MODES,
    COMPRESSOR_PRIMITIVES,
    DECODING_MODES,
    DRAFT_ARCHITECTURES,
)
from specvlm_hf.generation.settings import DecodingSettings

SMALL = dict(hidden_size=32, vocab_size=320, num_attention_heads=4, intermediate_size=64)


def _config(**overrides) -> SpecVLMDraftConfig:
    return SpecVLMDraftConfig(**{**SMALL, **overrides})


def test_defaults_are_valid_and_documented_values():
    config = _config()
    assert config.model_type == "specvlm_draft"
    assert config.decoding_mode == "tree"
    # no budget: chosen per step for the hardware at hand (generation/budget.py); a partly given one is filled
    # from the paper's (10, 7, 60)
    assert (config.tree_top_k, config.tree_depth, config.tree_total_tokens, config.num_draft_tokens) == (
        None,
    ) * 4
    settings = DecodingSettings.from_config(config, tree_depth=9)
    assert (settings.tree_top_k, settings.tree_depth, settings.tree_total_tokens) == (10, 9, 60)
    assert settings.auto_tree is False and DecodingSettings.from_config(config).auto_tree is True
    assert config.compressor_mode is None
    assert config.compressor_primitives == list(COMPRESSOR_PRIMITIVES)
    assert config.target_layers == [-1]
    assert config.num_fused_layers == 1
    assert config.draft_architecture == "eagle" and config.fused_size == 32
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.head_dim == 32 // 4
    assert config.specvlm_hf_version == specvlm_hf.__version__
    assert config.tie_word_embeddings is False


@pytest.mark.parametrize("mode", DECODING_MODES)
def test_every_decoding_mode_is_accepted(mode):
    assert _config(decoding_mode=mode).decoding_mode == mode


@pytest.mark.parametrize("arch", DRAFT_ARCHITECTURES)
def test_every_draft_architecture_is_accepted(arch):
    config = _config(draft_architecture=arch)
    assert config.draft_architecture == arch
    assert config.fused_size == (64 if arch == "eagle3" else 32)


@pytest.mark.parametrize("mode", COMPRESSOR_MODES)
def test_every_compressor_mode_is_accepted(mode):
    assert _config(compressor_mode=mode).compressor_mode == mode


INVALID = [
    ("decoding_mode", dict(decoding_mode="beam")),
    ("draft_architecture", dict(draft_architecture="eagle4")),
    ("draft_architecture", dict(draft_architecture=None)),
    ("tree_top_k", dict(tree_top_k=0)),
    ("tree_depth", dict(tree_depth=0)),
    ("tree_total_tokens", dict(tree_total_tokens=3, tree_depth=5)),
    ("num_draft_tokens", dict(num_draft_tokens=0)),
    ("compressor_mode", dict(compressor_mode="zip")),
    ("compressor_primitives", dict(compressor_primitives=["foo"])),
    ("compressor_primitives", dict(compressor_primitives=[])),
    ("draft_vocab_size", dict(draft_vocab_size=321)),
    ("draft_vocab_size", dict(draft_vocab_size=0)),
    ("draft_confidence_threshold", dict(draft_confidence_threshold=1.5)),
    ("draft_confidence_threshold", dict(draft_confidence_threshold=-0.1)),
    ("num_key_value_heads", dict(num_key_value_heads=3)),
    ("target_layers", dict(target_layers=[])),
    ("hidden_size", dict(hidden_size=0)),
    ("vocab_size", dict(vocab_size=-1)),
    ("compressor_prune_ratio", dict(compressor_prune_ratio=0.5)),
    ("compressor_pool_kernel", dict(compressor_pool_kernel=0)),
    ("compressor_conv_ratio", dict(compressor_conv_ratio=0)),
    ("compressor_resampler_queries", dict(compressor_resampler_queries=0)),
    ("compressor_prune_score", dict(compressor_prune_score="entropy")),
    ("compressor_gumbel_tau", dict(compressor_gumbel_tau=0.0)),
    ("compressor_cost_weight", dict(compressor_cost_weight=-1.0)),
]


@pytest.mark.parametrize("field,values", INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_value_raises_naming_the_field(field, values):
    bad_value = values[field]
    with pytest.raises(ValueError, match=re.escape(f"invalid {field}={bad_value!r}")):
        _config(**values)


def test_validation_applies_to_from_target_overrides():
    from tiny_models import make_tiny_target

    model = make_tiny_target("llama")
    with pytest.raises(ValueError, match="invalid draft_vocab_size=321"):
        SpecVLMDraftConfig.from_target(model, draft_vocab_size=321)
    with pytest.raises(ValueError, match="invalid tree_top_k=0"):
        SpecVLMDraftConfig.from_target(model, tree_top_k=0)
    assert SpecVLMDraftConfig.from_target(model, draft_vocab_size=320).draft_vocab_size == 320


def _gpt2():
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    return GPT2LMHeadModel(config)


def _bert():
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    return BertForMaskedLM(config)


@pytest.mark.parametrize("make", [_gpt2, _bert], ids=["gpt2", "bert"])
def test_from_target_on_unsupported_model_lists_supported_families(make):
    model = make()
    with pytest.raises(ValueError) as info:
        SpecVLMDraftConfig.from_target(model)
    message = str(info.value)
    assert type(model).__name__ in message
    assert repr(model.config.model_type) in message
    assert "Supported families" in message
    for family in ("causal_lm", "llava", "llava_next", "qwen2_vl", "gemma3", "paligemma", "mistral3"):
        assert family in message


def test_from_target_on_a_base_decoder_without_lm_head_is_rejected():
    from transformers import LlamaConfig, LlamaModel

    model = LlamaModel(
        LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(ValueError, match=r"ForCausalLM"):
        SpecVLMDraftConfig.from_target(model)


def test_save_load_round_trip_keeps_every_field(tmp_path):
    config = _config(
        decoding_mode="chain",
        tree_top_k=4,
        tree_depth=3,
        tree_total_tokens=9,
        num_draft_tokens=6,
        draft_confidence_threshold=0.25,
        compressor_mode="select",
        compressor_primitives=["pool", "text_only"],
        compressor_pool_kernel=2,
        target_layers=[1, -1],
        image_token_ids=[300, 301],
        target_name_or_path="org/tiny-vlm",
        target_architecture="LlavaForConditionalGeneration",
        target_model_type="llava",
        target_family="llava",
        num_key_value_heads=2,
        draft_architecture="eagle3",
    )
    config.save_pretrained(tmp_path)
    for loaded in (SpecVLMDraftConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, SpecVLMDraftConfig)
        ours = {
            k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "_name_or_path")
        }
        theirs = {
            k: v for k, v in loaded.to_dict().items() if k not in ("transformers_version", "_name_or_path")
        }
        assert theirs == ours
        assert loaded.num_fused_layers == 2
        assert loaded.draft_architecture == "eagle3"
