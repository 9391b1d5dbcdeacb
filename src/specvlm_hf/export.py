"""Export a SpecVLM draft to other checkpoint formats.

`export_draft(draft, out_dir, format="speculators")` writes the EAGLE (v1/v2/HASS) layout of vLLM's
`speculators` library: a `config.json` with `speculators_model_type="eagle"`, `architectures`,
`transformer_layer_config` (a LlamaConfig dict), the fusion settings (`layernorms`, `fusion_bias`) and a
`speculators_config` block (algorithm, token proposal methods, default method, verifier = the target), plus
`model.safetensors` with the weights under the names speculators' `EagleSpeculator` uses:

    SpecVLM draft                      speculators EAGLE
    fc.weight                      ->  fusion_fc.weight          (2h -> h over [embed(x_t+1) ; f_t])
    layers.0.<...>                 ->  transformer.<...>         (one LlamaDecoderLayer)
    norm.weight                    ->  pre_lm_head_layernorm.weight
    input_norm.weight              ->  fusion_layernorm.weight   (SpecVLM's RMSNorm after fc; see below)
    compressor.*                   ->  dropped (draft-side visual compressor; no equivalent)

What does not carry over, stated in the exported README too:
- The elastic visual compressor is draft-side only and has no speculators equivalent; the export drops it, so
  the exported draft sees every visual token (still lossless, possibly slower drafting on long image prompts).
- SpecVLM's RMSNorm on the fused input (`fusion_layernorm`) has no slot in speculators' EAGLE classes, whose
  optional `layernorms` are an embedding norm before `fc` (`embedding_layernorm`, which SpecVLM does not have
  and which is not written), the layer's input norm and a norm before `lm_head`. A consumer that ignores
  `fusion_layernorm.weight` computes a different function from the trained draft (verification keeps the
  output exact, but acceptance drops). The checkpoint records this in `specvlm.fusion_layernorm`.
- speculators >= 0.4 and current vLLM implement EAGLE-3 only; the "eagle" model type loads with the
  speculators releases that still ship `EagleSpeculator` (0.3.0 is the one checked here).
- Only one decoder layer, one fused target layer (`target_layers=[-1]`) and the full target vocabulary map.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ._version import __version__

EXPORT_FORMATS = ("speculators",)
SPECULATORS_SCHEMA_VERSION = "0.3.0"  # last speculators release checked to ship the "eagle" model type


def speculators_weight_name(name: str) -> str | None:
    """SpecVLM draft state-dict key -> speculators EAGLE key (None: dropped)."""
    if name.startswith("compressor."):
        return None
    if name == "fc.weight" or name == "fc.bias":
        return "fusion_" + name
    if name.startswith("layers.0."):
        return "transformer." + name[len("layers.0.") :]
    if name == "norm.weight":
        return "pre_lm_head_layernorm.weight"
    if name == "input_norm.weight":
        return "fusion_layernorm.weight"
    raise ValueError(f"no speculators EAGLE name for draft weight {name!r}")


def _transformer_layer_config(config) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": config.attention_bias,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": getattr(config, "bos_token_id", None),
        "eos_token_id": getattr(config, "eos_token_id", None),
        "pad_token_id": getattr(config, "pad_token_id", None),
    }


def speculators_config_dict(draft) -> dict[str, Any]:
    """The speculators `config.json` for `draft` (see the module docstring)."""
    config = draft.config
    dtype = str(next(draft.parameters()).dtype).removeprefix("torch.")
    return {
        "architectures": ["EagleSpeculator", "LlamaDecoderLayer"],
        "speculators_model_type": "eagle",
        "speculators_version": SPECULATORS_SCHEMA_VERSION,
        "transformer_layer_architecture": "LlamaDecoderLayer",
        "transformer_layer_config": _transformer_layer_config(config),
        # True keeps the layer's input_layernorm and the norm before lm_head (both in SpecVLM's draft); it also
        # asks for an `embedding_layernorm`, which SpecVLM does not have and which is therefore not written.
        "layernorms": True,
        "fusion_bias": draft.fc.bias is not None,
        "dtype": dtype,
        "speculators_config": {
            "algorithm": "eagle",
            "proposal_methods": [
                {
                    "proposal_type": "greedy",
                    "speculative_tokens": config.num_draft_tokens,
                    "verifier_accept_k": 1,
                    "accept_tolerance": 0.0,
                }
            ],
            "default_proposal_method": "greedy",
            "verifier": {
                "name_or_path": config.target_name_or_path,
                "architectures": [config.target_architecture] if config.target_architecture else [],
            },
        },
        "specvlm": {
            "exported_by": f"specvlm_hf {__version__}",
            "fusion_layernorm": True,
            "fusion_layernorm_position": "after fusion_fc, before transformer.input_layernorm",
            "pre_lm_head_layernorm": True,
            "transformer_input_layernorm": True,
            "target_layers": list(config.target_layers),
            "image_token_ids": list(config.image_token_ids),
            "compressor_dropped": config.compressor_mode is not None,
            "compressor_mode": config.compressor_mode,
            "target_model_type": config.target_model_type,
            "target_family": config.target_family,
            "tree": {
                "top_k": config.tree_top_k,
                "depth": config.tree_depth,
                "total_tokens": config.tree_total_tokens,
            },
        },
    }


def _check_exportable(draft) -> None:
    config = draft.config
    problems = []
    if config.num_hidden_layers != 1:
        problems.append(f"num_hidden_layers={config.num_hidden_layers} (speculators EAGLE has one layer)")
    if list(config.target_layers) != [-1]:
        problems.append(f"target_layers={config.target_layers} (EAGLE fuses the last target layer only)")
    if config.draft_vocab_size is not None:
        problems.append(f"draft_vocab_size={config.draft_vocab_size} (EAGLE uses the target vocabulary)")
    if problems:
        raise ValueError(
            "This draft cannot be exported to the speculators EAGLE format: " + "; ".join(problems)
        )


def _readme(config_dict: dict[str, Any], draft) -> str:
    target = draft.config.target_name_or_path
    compressor = (
        f"The draft's elastic visual compressor (`{draft.config.compressor_mode}`) is draft-side only and is "
        "**dropped** in this export: the exported draft reads every visual token."
        if draft.config.compressor_mode is not None
        else "The draft has no visual compressor (the compressor is draft-side; it would be dropped here)."
    )
    return f"""---
base_model: {target}
library_name: speculators
tags:
- speculative-decoding
- eagle
- specvlm
- speculators
---

# SpecVLM draft for `{target}` (speculators EAGLE layout)

Exported from `specvlm_hf` {__version__} with `export_draft(draft, out_dir, format="speculators")`.
Verifier: `{target}` (`{draft.config.target_architecture}`). Only draft weights are stored; the verifier's
token embedding and `lm_head` are attached at load time.

- {compressor}
- SpecVLM adds an RMSNorm after the fusion layer (`fusion_layernorm.weight`, recorded under
  `specvlm.fusion_layernorm` in config.json). speculators' `EagleSpeculator` has no such norm and ignores the
  weight, and its `layernorms=True` variant expects an `embedding_layernorm` that SpecVLM does not have (not
  written), so it does not reproduce the trained draft exactly: verification keeps the output exact, acceptance
  is lower. For the exact draft, use `specvlm_hf` (`SpecVLMDraftModel`).
- `speculators_model_type="eagle"` (EAGLE-1/2/HASS) is implemented by speculators releases up to
  {SPECULATORS_SCHEMA_VERSION}; later releases and current vLLM implement EAGLE-3 only.

Config summary: `{json.dumps(config_dict["speculators_config"]["proposal_methods"])}`
"""


def export_draft(draft, out_dir: str | Path, format: str = "speculators") -> Path:
    """Write `draft` to `out_dir` in another checkpoint format; returns `out_dir`.

    format: "speculators" (vLLM speculators EAGLE layout; see this module's docstring for what carries over).
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export_draft: unknown format={format!r}; expected one of {EXPORT_FORMATS}")
    _check_exportable(draft)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in draft.state_dict().items():
        new_name = speculators_weight_name(name)
        if new_name is not None:
            tensors[new_name] = tensor.detach().to("cpu").contiguous()
    config_dict = speculators_config_dict(draft)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=False) + "\n")
    (out_dir / "README.md").write_text(_readme(config_dict, draft))
    return out_dir


__all__ = ["EXPORT_FORMATS", "export_draft", "speculators_config_dict", "speculators_weight_name"]
