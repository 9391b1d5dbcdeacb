"""Export a SpecVLM draft to other checkpoint formats.

`export_draft(draft, out_dir, format="speculators")` writes a checkpoint of vLLM's `speculators` library. The
layout follows the draft's `config.draft_architecture`.

**"eagle3" drafts -> speculators EAGLE-3** (`speculators_model_type="eagle3"`, implemented by speculators 0.9.0
and vLLM). An exact mapping: speculators' `Eagle3DraftModel` with these weights computes what the draft computes
(checked by `scripts/validate_speculators_export.sh`). `config.json` holds `architectures`, the decoder's
`transformer_layer_config` (a LlamaConfig dict, target vocabulary, explicit `head_dim`), `draft_vocab_size`,
`eagle_aux_hidden_state_layer_ids`, the EAGLE-3 norm switches (all off: `norm_before_residual`, `norm_before_fc`,
`fc_norm`, `norm_output`), a `speculators_config` block (algorithm "eagle3", greedy proposals, verifier = the
target) and a `specvlm` provenance block. `model.safetensors`:

    SpecVLM "eagle3" draft             speculators EAGLE-3
    fc.weight                      ->  fc.weight                 (n*h -> h; a one-layer draft has none:
                                                                  written as the h x h identity)
    layers.<i>.<...>               ->  layers.<i>.<...>          (same names; layer 0 has hidden_norm and
                                                                  2h-wide q/k/v; o_proj.bias zeros if the
                                                                  config has attention_bias)
    norm.weight                    ->  norm.weight
    draft_lm_head.weight           ->  lm_head.weight            (rows sorted by target id, as d2t/t2d require)
    draft_vocab_ids                ->  d2t (Vd,), t2d (V,)       (d2t[i] = target id - i; t2d: bool mask)
    (full vocabulary)              ->  lm_head.weight            (a copy of the target's lm_head)
    (the target's token embedding) ->  embed_tokens.weight       (a copy; see below)
    compressor.*                   ->  dropped

The export needs the draft bound to its target. It stores copies of the target's token embedding (and, for a
full-vocabulary draft, of its lm_head), as speculators' own `save_pretrained` does: speculators 0.9.0 with
transformers 5 leaves a verifier weight that is missing from the checkpoint uninitialised instead of loading it
from the verifier (measured with the validation script: `embed_tokens.weight` came back as garbage, up to 5e34).

`target_layers` become `eagle_aux_hidden_state_layer_ids`, in increasing order (vLLM concatenates the target's
layers in layer order; `fc`'s column blocks are permuted to match), and `transformer_layer_config` gets
`num_aux_hidden_states` (vLLM 0.32 sizes `fc` from it and otherwise assumes 3 layers: a one- or two-layer export
was refused). Index i >= 0 of the target's `hidden_states` is the residual stream entering decoder layer i, which
is vLLM's auxiliary layer id i. -1 (transformers' last hidden state, after the target's final norm) has no vLLM
equivalent: vLLM's layer L is the last decoder layer's output before the final norm. Such a draft is refused
unless `allow_inexact=True` (then -1 is written as L); `servable_target_layers(L)` picks layers that serve
exactly (checked end to end in vLLM by `scripts/serve_vllm_check.sh`). What does not carry over,
stated in the exported README too: the visual compressor (dropped: the exported draft reads every visual token)
and the tree settings (speculators proposes greedy chains; recorded under `specvlm.tree`).

**Default "eagle" drafts -> speculators EAGLE (v1/v2/HASS)**, only with `allow_inexact=True` (the export computes
a different function, see below; by default it is refused with a pointer to `draft_architecture="eagle3"`): a
`config.json` with `speculators_model_type="eagle"`,
`architectures`, `transformer_layer_config` (a LlamaConfig dict), the fusion settings (`layernorms`,
`fusion_bias`) and a `speculators_config` block (algorithm, token proposal methods, default method, verifier = the
target), plus `model.safetensors` with the weights under the names speculators' `EagleSpeculator` uses:

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
  speculators releases that still ship `EagleSpeculator` (0.3.0 is the one checked here). For an exact export
  that current vLLM loads, build the draft with `draft_architecture="eagle3"`.
- Only one decoder layer, one fused target layer (`target_layers=[-1]`) and the full target vocabulary map.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .._version import __version__
from ..draft.configuration_specvlm import DEFAULT_CHAIN_TOKENS, PAPER_TREE_BUDGET
from ..targets.loading import dense_copy

EXPORT_FORMATS = ("speculators",)
SPECULATORS_SCHEMA_VERSION = "0.3.0"  # last speculators release checked to ship the "eagle" model type
SPECULATORS_EAGLE3_VERSION = "0.9.0"  # speculators release the "eagle3" export is checked against


def speculators_weight_name(name: str, draft_architecture: str = "eagle") -> str | None:
    """SpecVLM draft state-dict key -> speculators key (None: dropped or converted, e.g. `draft_vocab_ids`).

    draft_architecture: "eagle" (speculators EAGLE names) or "eagle3" (speculators EAGLE-3 names).
    """
    if name.startswith("compressor."):
        return None
    if draft_architecture == "eagle3":
        if name == "draft_lm_head.weight":
            return "lm_head.weight"
        if name == "draft_vocab_ids":
            return None  # written as d2t / t2d
        if name == "fc.weight" or name == "norm.weight" or name.startswith("layers."):
            return name
        raise ValueError(f"no speculators EAGLE-3 name for draft weight {name!r}")
    if name == "fc.weight" or name == "fc.bias":
        return "fusion_" + name
    if name.startswith("layers.0."):
        return "transformer." + name[len("layers.0.") :]
    if name == "norm.weight":
        return "pre_lm_head_layernorm.weight"
    if name == "input_norm.weight":
        return "fusion_layernorm.weight"
    raise ValueError(f"no speculators EAGLE name for draft weight {name!r}")


def _transformer_layer_config(config, num_hidden_layers: int = 1) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": num_hidden_layers,
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


def _verifier_block(config) -> dict[str, Any]:
    return {
        "name_or_path": config.target_name_or_path,
        "architectures": [config.target_architecture] if config.target_architecture else [],
    }


def _greedy_proposals(config) -> list[dict[str, Any]]:
    return [
        {
            "proposal_type": "greedy",
            "speculative_tokens": config.num_draft_tokens or DEFAULT_CHAIN_TOKENS,
            "verifier_accept_k": 1,
            "accept_tolerance": 0.0,
        }
    ]


def _tree_block(config) -> dict[str, int]:
    # a serving engine runs on GPUs: an automatic budget is written as the paper's GPU budget
    values = (config.tree_top_k, config.tree_depth, config.tree_total_tokens)
    top_k, depth, total = (v if v is not None else d for v, d in zip(values, PAPER_TREE_BUDGET))
    return {"top_k": top_k, "depth": depth, "total_tokens": total}


def aux_layer_ids(draft) -> list[int]:
    """`config.target_layers` as speculators / vLLM auxiliary layer ids (see the module docstring)."""
    layers = list(draft.config.target_layers)
    if any(i < 0 for i in layers):
        if not draft.is_bound:
            raise ValueError(
                f"target_layers={layers} has negative indices; bind the draft to its target (`draft.bind(vlm)`) so "
                "the export can write them as the target's layer numbers."
            )
        from ..targets import families as targets

        n_layers = targets.target_num_layers(draft.target)
        # hidden_states has L + 1 entries: -1 -> L
        layers = [i if i >= 0 else n_layers + 1 + i for i in layers]
    return layers


def servable_target_layers(n_layers: int) -> list[int]:
    """`target_layers` for an "eagle3" draft that vLLM serves exactly, for an `n_layers`-layer target.

    EAGLE-3's default low / middle / high layers `[2, n // 2, n - 3]` when those are three distinct layers; for a
    shallower target up to three distinct layers spread over `[0, n)`. Never -1 (or n): vLLM's auxiliary layer n
    is the last decoder layer's output *before* the target's final norm, transformers' -1 is after it.
    """
    if n_layers < 1:
        raise ValueError(f"servable_target_layers: a target with {n_layers} layers has no layer to read")
    layers = [2, n_layers // 2, n_layers - 3]
    if layers[0] < layers[1] < layers[2]:
        return layers
    return sorted({round(i * (n_layers - 1) / 2) for i in range(3)})


def _vllm_problems(draft) -> list[str]:
    """Why vLLM would compute a different function from this "eagle3" draft (empty: it serves it exactly)."""
    from ..targets import families as targets

    n_layers = targets.target_num_layers(draft.target)
    layers = list(draft.config.target_layers)
    last = [i for i in layers if i in (-1, n_layers)]
    if not last:
        return []
    return [
        f"target_layers={layers} reads transformers' hidden state {last[0]} (the last one, after the target's "
        f"final norm); vLLM's auxiliary layer {n_layers} of this {n_layers}-layer target is the last decoder "
        "layer's output before that norm, so vLLM would feed the draft different features. Train with target "
        f"layers below {n_layers}, e.g. target_layers={servable_target_layers(n_layers)} "
        "(`specvlm train --servable`, or `export.servable_target_layers(n_layers)`)"
    ]


def speculators_config_dict(draft) -> dict[str, Any]:
    """The speculators `config.json` for `draft` (see the module docstring)."""
    if draft.config.draft_architecture == "eagle3":
        return _eagle3_config_dict(draft)
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
            "proposal_methods": _greedy_proposals(config),
            "default_proposal_method": "greedy",
            "verifier": _verifier_block(config),
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
            "tree": _tree_block(config),
        },
    }


def _eagle3_config_dict(draft) -> dict[str, Any]:
    config = draft.config
    dtype = str(next(draft.parameters()).dtype).removeprefix("torch.")
    layer_config = _transformer_layer_config(config, num_hidden_layers=config.num_hidden_layers)
    layer_config["dtype"] = dtype
    # vLLM sizes fc from this (fc input = n * h); without it, vLLM 0.32 assumes 3 target layers
    layer_config["num_aux_hidden_states"] = config.num_fused_layers
    return {
        "architectures": [
            "Eagle3DraftModel"
        ],  # the class speculators 0.9.0 registers (and writes) for "eagle3"
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_EAGLE3_VERSION,
        "transformer_layer_config": layer_config,
        "draft_vocab_size": config.draft_vocab_size or config.vocab_size,
        "target_hidden_size": None,  # the draft is as wide as the target
        # increasing: vLLM concatenates the target's layers in layer order (fc's column blocks follow)
        "eagle_aux_hidden_state_layer_ids": sorted(aux_layer_ids(draft)),
        # SpecVLM's "eagle3" draft is plain EAGLE-3: none of speculators' optional extra norms
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "embed_requires_grad": False,
        "tie_word_embeddings": False,
        "dtype": dtype,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": _greedy_proposals(config),
            "default_proposal_method": "greedy",
            "verifier": _verifier_block(config),
        },
        "specvlm": {
            "exported_by": f"specvlm_hf {__version__}",
            "draft_architecture": "eagle3",
            "target_layers": list(config.target_layers),
            "fc_identity": draft.fc is None,  # one target layer: fc written as the identity
            "lm_head": "draft head" if draft.draft_lm_head is not None else "copy of the target's lm_head",
            "embed_tokens": "copy of the target's token embedding",
            "image_token_ids": list(config.image_token_ids),
            "compressor_dropped": config.compressor_mode is not None,
            "compressor_mode": config.compressor_mode,
            "target_model_type": config.target_model_type,
            "target_family": config.target_family,
            "decoding_mode": config.decoding_mode,
            "tree": _tree_block(config),
        },
    }


def _eagle3_tensors(draft) -> dict[str, torch.Tensor]:
    """The speculators EAGLE-3 state dict of an "eagle3" draft (see the module docstring)."""
    config = draft.config
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in draft.state_dict().items():
        new_name = speculators_weight_name(name, "eagle3")
        if new_name is not None:
            tensors[new_name] = tensor.detach()
    dtype = draft.norm.weight.dtype
    _, embed, lm_head = draft._bound_parts()
    # (copies of the target's modules, dense even when the target is loaded quantized or offloaded)
    tensors["embed_tokens.weight"] = dense_copy(embed, dtype)
    if draft.fc is None:  # g = f: fc is the identity
        tensors["fc.weight"] = torch.eye(config.hidden_size, dtype=dtype)
    else:  # column blocks in increasing layer order, as the layer ids are written
        order = sorted(range(config.num_fused_layers), key=aux_layer_ids(draft).__getitem__)
        blocks = tensors["fc.weight"].split(config.hidden_size, dim=1)
        tensors["fc.weight"] = torch.cat([blocks[j] for j in order], dim=1)
    if config.attention_bias:  # Llama's o_proj has a bias when attention_bias; SpecVLM's has none (= zeros)
        for i in range(config.num_hidden_layers):
            tensors[f"layers.{i}.self_attn.o_proj.bias"] = torch.zeros(config.hidden_size, dtype=dtype)
    if draft.draft_lm_head is not None:
        ids = draft.draft_vocab_ids.detach().cpu()
        order = torch.argsort(ids)  # speculators' draft vocabulary is in increasing target-id order
        sorted_ids = ids[order]
        tensors["lm_head.weight"] = tensors["lm_head.weight"][order.to(tensors["lm_head.weight"].device)]
        tensors["d2t"] = sorted_ids - torch.arange(sorted_ids.numel())  # target id = i + d2t[i]
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[sorted_ids] = True
        tensors["t2d"] = t2d
    else:
        tensors["lm_head.weight"] = dense_copy(lm_head, dtype)
    return {k: v.to("cpu").contiguous() for k, v in tensors.items()}


def _check_exportable(draft, allow_inexact: bool = False) -> None:
    config = draft.config
    if config.draft_architecture == "eagle3":
        if not draft.is_bound:
            raise ValueError(
                "Exporting to the speculators EAGLE-3 format needs the draft bound to its target "
                "(`draft.bind(vlm)`): the checkpoint carries the target's token embedding (and lm_head for a "
                "full-vocabulary draft) and its layer count."
            )
        layers = aux_layer_ids(draft)
        if len(set(layers)) != len(layers):
            raise ValueError(
                f"This draft cannot be exported to the speculators EAGLE-3 format: target_layers="
                f"{config.target_layers} name the same target layer twice (layer ids {layers})."
            )
        problems = _vllm_problems(draft)
        if problems and not allow_inexact:
            raise ValueError(
                "export_draft refuses to write a speculators EAGLE-3 checkpoint that computes a different "
                "function from this draft in vLLM: "
                + "; ".join(problems)
                + ". (allow_inexact=True writes it "
                "anyway: verification keeps outputs exact, acceptance drops.)"
            )
        return
    if not allow_inexact:
        raise ValueError(
            "export_draft refuses to export this draft_architecture='eagle' draft (SpecVLM's EAGLE-2 draft): its "
            "RMSNorm after fc (`input_norm`) has no slot in speculators' EAGLE layout, so the exported draft "
            "would compute a different function (lower acceptance), and current vLLM does not load the "
            "speculators 'eagle' type at all. For a draft that vLLM serves exactly, train one with "
            "draft_architecture='eagle3' and target layers below the target's layer count: "
            "`specvlm train --servable`, or SpecVLMDraftConfig.from_target(vlm, draft_architecture='eagle3', "
            "target_layers=export.servable_target_layers(n_layers)). allow_inexact=True writes the inexact "
            "'eagle' layout anyway (speculators <= 0.3.0)."
        )
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


def _compressor_note(config) -> str:
    if config.compressor_mode is not None:
        return (
            f"The draft's elastic visual compressor (`{config.compressor_mode}`) is draft-side only and is "
            "**dropped** in this export: the exported draft reads every visual token."
        )
    return "The draft has no visual compressor (the compressor is draft-side; it would be dropped here)."


def _readme_eagle3(config_dict: dict[str, Any], draft) -> str:
    config = draft.config
    target = config.target_name_or_path
    spec = config_dict["specvlm"]
    vocab = (
        f"a reduced draft vocabulary of {config.draft_vocab_size} target tokens (the draft's own head as "
        "`lm_head.weight`, rows in increasing target-id order, with the `d2t` / `t2d` maps)"
        if config.draft_vocab_size is not None
        else "the target's full vocabulary (`lm_head.weight` is a copy of the target's `lm_head`)"
    )
    return f"""---
base_model: {target}
library_name: speculators
tags:
- speculative-decoding
- eagle3
- specvlm
- speculators
---

# SpecVLM EAGLE-3 draft for `{target}` (speculators EAGLE-3 layout)

Exported from `specvlm_hf` {__version__} with `export_draft(draft, out_dir, format="speculators")` for
speculators {SPECULATORS_EAGLE3_VERSION} (`speculators_model_type="eagle3"`). Verifier: `{target}`
(`{config.target_architecture}`).

What carries over, exactly: the draft's EAGLE-3 decoder (`fc`, {config.num_hidden_layers} decoder layer(s), `norm`)
under speculators' own weight names; with these weights speculators' `Eagle3DraftModel` computes what the
SpecVLM draft computes. Auxiliary target layers: `eagle_aux_hidden_state_layer_ids={config_dict["eagle_aux_hidden_state_layer_ids"]}` (SpecVLM `target_layers={list(config.target_layers)}`; index
i >= 0 is the residual stream entering target layer i; -1, transformers' last hidden state after the target's
final norm, is written as the layer count).{" The draft fuses one target layer, so `fc.weight` is the identity." if spec["fc_identity"] else ""}
Vocabulary: {vocab}. `embed_tokens.weight` is a copy of the target's token embedding (speculators 0.9.0 does
not attach a missing one from the verifier).

What does not carry over:
- {_compressor_note(config)}
- SpecVLM's dynamic tree settings (`{json.dumps(spec["tree"])}`) are recorded under `specvlm.tree`; speculators
  describes greedy chains (`{json.dumps(config_dict["speculators_config"]["proposal_methods"])}`).
- Visual rows: SpecVLM feeds the draft the target's merged input embeddings (visual features at image
  placeholders). A runtime that embeds token ids with `embed_tokens` alone gives image rows the placeholder's
  embedding instead; targets that scale their embeddings (Gemma) differ from a plain lookup too.
"""


def _readme(config_dict: dict[str, Any], draft) -> str:
    target = draft.config.target_name_or_path
    compressor = _compressor_note(draft.config)
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


def export_draft(
    draft, out_dir: str | Path, format: str = "speculators", allow_inexact: bool = False
) -> Path:
    """Write `draft` to `out_dir` in another checkpoint format; returns `out_dir`.

    format: "speculators" (vLLM speculators: the EAGLE-3 layout for a `draft_architecture="eagle3"` draft, the
    EAGLE layout otherwise; see this module's docstring for what carries over).
    allow_inexact: by default a draft whose export would compute a different function is refused with a
    `ValueError` saying how to train one that exports exactly: every "eagle" draft (its fusion RMSNorm has no
    speculators slot) and an "eagle3" draft reading the target's last hidden state (`target_layers` with -1: vLLM
    reads that layer before the final norm). True writes those anyway.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export_draft: unknown format={format!r}; expected one of {EXPORT_FORMATS}")
    _check_exportable(draft, allow_inexact)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_dict = speculators_config_dict(draft)
    if draft.config.draft_architecture == "eagle3":
        tensors = _eagle3_tensors(draft)
        readme = _readme_eagle3(config_dict, draft)
    else:
        tensors = {}
        for name, tensor in draft.state_dict().items():
            new_name = speculators_weight_name(name)
            if new_name is not None:
                tensors[new_name] = tensor.detach().to("cpu").contiguous()
        readme = _readme(config_dict, draft)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=False) + "\n")
    (out_dir / "README.md").write_text(readme)
    return out_dir


__all__ = [
    "EXPORT_FORMATS",
    "aux_layer_ids",
    "export_draft",
    "servable_target_layers",
    "speculators_config_dict",
    "speculators_weight_name",
]
