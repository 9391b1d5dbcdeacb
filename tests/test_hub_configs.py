"""The ready draft configs in `hub_configs/` load, build a draft, and are exactly what save_pretrained writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

import specvlm_hf
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.targets import families as targets

HUB_CONFIGS = Path(__file__).resolve().parents[1] / "hub_configs"
CONFIG_DIRS = sorted(p.parent for p in HUB_CONFIGS.glob("*/config.json"))
FAMILIES = set(targets.SUPPORTED_FAMILIES) - {"causal_lm"}  # the VLM families hub configs may name


def _without_version(text: str) -> dict:
    data = json.loads(text)
    data.pop("transformers_version", None)
    return data


def test_there_are_hub_configs():
    assert len(CONFIG_DIRS) >= 10


@pytest.mark.parametrize("config_dir", CONFIG_DIRS, ids=lambda p: p.name)
def test_hub_config_loads_builds_and_resaves(config_dir: Path, tmp_path: Path):
    config = SpecVLMDraftConfig.from_pretrained(config_dir)
    auto = AutoConfig.from_pretrained(config_dir)
    assert isinstance(auto, SpecVLMDraftConfig)
    assert {k: v for k, v in auto.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in config.to_dict().items() if k != "_name_or_path"
    }

    # Provenance: the directory name is the target, and every field the draft needs is there.
    assert config.target_name_or_path == config_dir.name.replace("__", "/")
    assert config.target_architecture.endswith("ForConditionalGeneration")
    assert config.target_family in FAMILIES
    assert config.target_model_type
    assert config.image_token_ids and all(0 <= i < config.vocab_size for i in config.image_token_ids)
    assert config.eos_token_id is not None
    assert config.num_attention_heads * config.head_dim >= config.hidden_size // 2
    assert config.specvlm_hf_version == specvlm_hf.__version__

    # Byte-identical re-save (the transformers version field aside).
    config.save_pretrained(tmp_path)
    original = (config_dir / "config.json").read_text()
    resaved = (tmp_path / "config.json").read_text()
    assert _without_version(resaved) == _without_version(original)
    if json.loads(original).get("transformers_version") == json.loads(resaved).get("transformers_version"):
        assert resaved == original

    # The draft builds without memory (meta device); a one-layer draft is a few hundred million parameters.
    with torch.device("meta"):
        draft = SpecVLMDraftModel(config)
    n_params = sum(p.numel() for p in draft.parameters())
    h, inter = config.hidden_size, config.intermediate_size
    attn = h * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    expected = 2 * h * h + attn + 3 * h * inter + 4 * h  # fc + attention + MLP + four RMSNorms
    assert n_params == expected
    assert 50e6 < n_params < 600e6, f"{config_dir.name}: {n_params / 1e6:.1f}M parameters"
    # No target weights in the draft: neither an embedding table nor an lm_head.
    assert all(p.shape[0] != config.vocab_size for p in draft.parameters())
