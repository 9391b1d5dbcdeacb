"""Write `hub_configs/<org>__<name>/config.json`: ready SpecVLM draft configs for popular public VLM targets.

    python scripts/make_hub_configs.py            # (re)write every config
    python scripts/make_hub_configs.py --check    # exit 1 if a written file differs from what this table gives

Each file is exactly what `SpecVLMDraftConfig(...).save_pretrained(dir)` writes. The sizes below are copied from
the targets' published `config.json` (text decoder: hidden size, heads, MLP width, norm epsilon, RoPE base,
`lm_head` rows) and the image/video placeholder ids; the draft is one decoder layer with the target's head
layout, as `SpecVLMDraftConfig.from_target(vlm)` would build it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from specvlm_hf import SpecVLMDraftConfig

ROOT = Path(__file__).resolve().parents[1] / "hub_configs"

# Vicuna-7B (Llama-2) text decoder, shared by LLaVA-1.5-7B and LLaVA-NeXT-Vicuna-7B; llava-hf added <image>
# (32000) and <pad> (32001) and rounded the vocabulary to 32064 rows.
_VICUNA_7B: dict[str, Any] = {
    "hidden_size": 4096,
    "vocab_size": 32064,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "head_dim": 128,
    "intermediate_size": 11008,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "image_token_ids": [32000],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 32001,
}
# Qwen2-7B text decoder (Qwen2-VL-7B, Qwen2.5-VL-7B; LLaVA-OneVision-7B has a 152128-row head).
_QWEN2_7B: dict[str, Any] = {
    "hidden_size": 3584,
    "vocab_size": 152064,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "intermediate_size": 18944,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "image_token_ids": [151655, 151656],  # <|image_pad|>, <|video_pad|>
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

TARGETS: dict[str, dict[str, Any]] = {
    "llava-hf/llava-1.5-7b-hf": {
        **_VICUNA_7B,
        "target_architecture": "LlavaForConditionalGeneration",
        "target_model_type": "llava",
        "target_family": "llava",
    },
    "llava-hf/llava-1.5-13b-hf": {
        **_VICUNA_7B,
        "hidden_size": 5120,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "intermediate_size": 13824,
        "target_architecture": "LlavaForConditionalGeneration",
        "target_model_type": "llava",
        "target_family": "llava",
    },
    "llava-hf/llava-v1.6-vicuna-7b-hf": {
        **_VICUNA_7B,
        "target_architecture": "LlavaNextForConditionalGeneration",
        "target_model_type": "llava_next",
        "target_family": "llava_next",
    },
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": {
        **_QWEN2_7B,
        "vocab_size": 152128,
        "image_token_ids": [151646, 151647],  # <image>, <video>
        "target_architecture": "LlavaOnevisionForConditionalGeneration",
        "target_model_type": "llava_onevision",
        "target_family": "llava_onevision",
    },
    "Qwen/Qwen2-VL-7B-Instruct": {
        **_QWEN2_7B,
        "target_architecture": "Qwen2VLForConditionalGeneration",
        "target_model_type": "qwen2_vl",
        "target_family": "qwen2_vl",
    },
    "Qwen/Qwen2.5-VL-7B-Instruct": {
        **_QWEN2_7B,
        "max_position_embeddings": 128000,
        "target_architecture": "Qwen2_5_VLForConditionalGeneration",
        "target_model_type": "qwen2_5_vl",
        "target_family": "qwen2_5_vl",
    },
    "Qwen/Qwen3-VL-8B-Instruct": {
        "hidden_size": 4096,
        "vocab_size": 151936,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 12288,
        "rms_norm_eps": 1e-6,
        "rope_theta": 5000000.0,
        "max_position_embeddings": 262144,
        "image_token_ids": [151655, 151656],
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "target_architecture": "Qwen3VLForConditionalGeneration",
        "target_model_type": "qwen3_vl",
        "target_family": "qwen3_vl",
    },
    "google/gemma-3-4b-it": {
        "hidden_size": 2560,
        "vocab_size": 262208,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "intermediate_size": 10240,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,  # global-attention layers (local layers use 10000)
        "max_position_embeddings": 131072,
        "image_token_ids": [262144],  # <image_soft_token>
        "bos_token_id": 2,
        "eos_token_id": [1, 106],  # <eos>, <end_of_turn>
        "pad_token_id": 0,
        "target_architecture": "Gemma3ForConditionalGeneration",
        "target_model_type": "gemma3",
        "target_family": "gemma3",
    },
    "HuggingFaceTB/SmolVLM-Instruct": {
        "hidden_size": 2048,
        "vocab_size": 49155,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 64,
        "intermediate_size": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 273768.0,
        "max_position_embeddings": 16384,
        "image_token_ids": [49153],  # <image>
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "target_architecture": "Idefics3ForConditionalGeneration",
        "target_model_type": "idefics3",
        "target_family": "idefics3",
    },
    "google/paligemma2-3b-pt-224": {
        "hidden_size": 2304,
        "vocab_size": 257216,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "intermediate_size": 9216,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 8192,
        "image_token_ids": [257152],  # <image>
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "target_architecture": "PaliGemmaForConditionalGeneration",
        "target_model_type": "paligemma",
        "target_family": "paligemma",
    },
}


def config_dir(target: str) -> Path:
    return ROOT / target.replace("/", "__")


def build_config(target: str) -> SpecVLMDraftConfig:
    return SpecVLMDraftConfig(num_hidden_layers=1, target_name_or_path=target, **TARGETS[target])


def rendered(target: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        build_config(target).save_pretrained(tmp)
        return (Path(tmp) / "config.json").read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for target in TARGETS:
        path = config_dir(target) / "config.json"
        text = rendered(target)
        if args.check:
            if not path.exists() or json.loads(path.read_text()) != json.loads(text):
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if stale:
        print("stale (rerun scripts/make_hub_configs.py):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
