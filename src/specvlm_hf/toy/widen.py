"""The medium toy target and its drafts: the tiny ones' exact function in a wider, deeper network.

`widen_toy_target` and `widen_draft` implement the construction described in `specvlm_hf.toy.world`'s docstring
(zero-padded weights, rescaled RMSNorm weights, identity residual blocks), so the medium target gives the CPU
cost of a ~157M-parameter model while its outputs, and its drafts' acceptance, are the tiny pair's.
"""

from __future__ import annotations

import math

import torch

MEDIUM_DIMS = {"hidden": 1024, "intermediate": 2816, "heads": 32, "layers": 12}


@torch.no_grad()
def widen_toy_target(tiny, size: str = "medium", dims: dict | None = None):
    """A bigger ``LlavaForConditionalGeneration`` computing the tiny target's function (see `specvlm_hf.toy.world`).

    ``dims`` (keys hidden, intermediate, heads, layers; optional kv_heads, default heads) overrides the sizes of
    ``size``. Heads and MLP units beyond the tiny model's are zero; ``heads * head_dim`` may stay below the hidden
    size (a lean layer: only the residual width grows, as `widen_draft` does for drafts).
    """
    from transformers import LlavaForConditionalGeneration

    if dims is None and size != "medium":
        raise ValueError(f"size={size!r}: the toy world widens to 'medium' (or pass dims=)")
    dims = dims or MEDIUM_DIMS
    tiny_text = tiny.config.text_config
    d, dd = tiny_text.hidden_size, dims["hidden"]
    n_tiny, n_big = tiny_text.num_hidden_layers, dims["layers"]
    kv_heads = dims.get("kv_heads", dims["heads"])
    if (
        dd % d
        or n_big % n_tiny
        or dims["heads"] < tiny_text.num_attention_heads
        or kv_heads < tiny_text.num_key_value_heads
        or dims["intermediate"] < tiny_text.intermediate_size
    ):
        raise ValueError(f"cannot widen hidden {d} -> {dd} / layers {n_tiny} -> {n_big} / dims {dims}")
    norm_scale = math.sqrt(d / dd)
    config = tiny.config.__class__.from_dict(tiny.config.to_dict())
    text = config.text_config
    text.hidden_size, text.intermediate_size = dd, dims["intermediate"]
    text.num_attention_heads, text.num_key_value_heads = dims["heads"], kv_heads
    text.num_hidden_layers = n_big
    text.rms_norm_eps = tiny_text.rms_norm_eps * d / dd
    config.name_or_path = f"specvlm-toy-llava-{size}"
    big = LlavaForConditionalGeneration(config).eval()
    big.generation_config = tiny.generation_config

    def pad_(dst: torch.Tensor, src: torch.Tensor) -> None:  # src in the top-left block, zeros elsewhere
        dst.zero_()
        dst[tuple(slice(0, n) for n in src.shape)] = src

    big.model.vision_tower.load_state_dict(tiny.model.vision_tower.state_dict())
    tp, bp = tiny.model.multi_modal_projector, big.model.multi_modal_projector
    for name in ("linear_1", "linear_2"):
        pad_(getattr(bp, name).weight, getattr(tp, name).weight)
        pad_(getattr(bp, name).bias, getattr(tp, name).bias)
    tl, bl = tiny.model.language_model, big.model.language_model
    pad_(bl.embed_tokens.weight, tl.embed_tokens.weight)
    pad_(big.lm_head.weight, tiny.lm_head.weight)
    bl.norm.weight.copy_(torch.cat([tl.norm.weight * norm_scale, torch.zeros(dd - d)]))
    per = n_big // n_tiny
    for i, big_layer in enumerate(bl.layers):
        if i % per:  # identity residual block: its outputs into the residual stream are zero
            big_layer.self_attn.o_proj.weight.zero_()
            big_layer.mlp.down_proj.weight.zero_()
            continue
        small = tl.layers[i // per]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w = getattr(small, norm).weight * norm_scale
            getattr(big_layer, norm).weight.copy_(torch.cat([w, torch.zeros(dd - d)]))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            pad_(getattr(big_layer.self_attn, proj).weight, getattr(small.self_attn, proj).weight)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            pad_(getattr(big_layer.mlp, proj).weight, getattr(small.mlp, proj).weight)
    for p in big.parameters():
        p.requires_grad_(False)
    return big


def widen_draft(tiny_draft, big_target):
    """A draft for the widened target (`widen_toy_target`) computing `tiny_draft`'s function exactly.

    Same construction as the target's widening: every weight goes in the top-left block of the bigger one
    with zeros elsewhere (the fusion layer and the gate keep their two input blocks), RMSNorm weights are
    scaled by sqrt(h_tiny / h_big) (the config's eps is already eps_tiny * h_tiny / h_big, taken from the
    widened target). The widened draft's features are the tiny draft's padded with zeros, so it proposes the
    same tokens at the real cost of a draft of the big width (its decoder layer keeps the small draft's heads and
    MLP width: a lean draft, as one would pick for a CPU). The resampler's LayerNorms do not widen
    exactly, so drafts that can use it are refused.
    """
    from ..draft.configuration_specvlm import SpecVLMDraftConfig
    from ..draft.modeling_specvlm import SpecVLMDraftModel, SpecVLMRMSNorm
    from ..generation.settings import DecodingSettings

    small_cfg = tiny_draft.config
    if small_cfg.compressor_mode == "resampler" or (
        small_cfg.compressor_mode in ("select", "weighted", "concat")
        and "resampler" in small_cfg.compressor_primitives
    ):
        raise ValueError("widen_draft: the resampler compressor cannot be widened exactly")
    if small_cfg.target_layers != [-1]:
        raise ValueError("widen_draft supports single-layer fusion (target_layers=[-1]) only")
    keep = (
        "compressor_mode",
        "compressor_primitives",
        "compressor_prune_ratio",
        "compressor_pool_kernel",
        "compressor_conv_ratio",
        "compressor_prune_score",
        "num_hidden_layers",
        "draft_vocab_size",
        *DecodingSettings.__dataclass_fields__,
    )
    # the decoder layer keeps the small draft's heads and MLP width (a lean draft): only the residual width grows
    lean = {
        k: getattr(small_cfg, k)
        for k in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
    }
    config = SpecVLMDraftConfig.from_target(big_target, **{k: getattr(small_cfg, k) for k in keep}, **lean)
    big = SpecVLMDraftModel(config)
    d, dd = small_cfg.hidden_size, config.hidden_size
    scale = math.sqrt(d / dd)
    norms = {name for name, m in big.named_modules() if isinstance(m, SpecVLMRMSNorm)}
    small_params = dict(tiny_draft.named_parameters())
    with torch.no_grad():
        for name, param in big.named_parameters():
            src = small_params[name]
            module = name.rsplit(".", 1)[0]
            param.zero_()
            if module in norms:
                param[:d] = src * scale
            elif name in ("fc.weight", "compressor.gate.proj.weight"):
                n_in = src.shape[1] // d
                for block in range(n_in):  # input blocks [embed ; feature] (fc) or [question ; visual] (gate)
                    param[: src.shape[0], block * dd : block * dd + d] = src[:, block * d : (block + 1) * d]
            else:
                param[tuple(slice(0, n) for n in src.shape)] = src
        for name, buffer in tiny_draft.named_buffers():
            if name == "draft_vocab_ids":  # the reduced vocabulary's index map
                big.draft_vocab_ids.copy_(buffer)
    return big.eval()
