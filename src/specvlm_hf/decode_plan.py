"""The draft's decoding forward with its weights resolved once per `generate` call.

A greedy tree level or a chain step is one draft forward over 1-20 rows. On a CPU its kernels take ~0.5 ms, and
walking the modules around them (module calls, attribute lookups, a weight check per linear) took another
~0.25 ms. While `generate` runs the weights cannot change, so `DecodePlan` resolves once every tensor the decoding
forward reads (the stacked and prepacked weights of `inference_linear`, the norm weights, the token table of
`decoding.draft_step`) and runs the same operations as the modules, in the same order, as straight-line code:
its outputs equal the module path's exactly (`tests/test_decode_plan.py`).

It covers drafts of both architectures ("eagle", "eagle3") built from this package's own modules. Anything else
runs through the modules, which never bypass a hook or an adapter: modules with hooks or patched forwards (peft,
accelerate), a subclass that overrides the draft's forward or its logits, mixed dtypes, autograd.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from .inference_linear import (
    TARGET_COPY_MAX_ELEMENTS,
    _plain_linear,
    bound_linear,
    bound_shared_linear,
    bound_stacked_linear,
)
from .modeling_specvlm import (
    SpecVLMAttention,
    SpecVLMDecoderLayer,
    SpecVLMDraftModel,
    SpecVLMEagle3FirstLayer,
    SpecVLMMLP,
    SpecVLMRMSNorm,
    SpecVLMRotaryEmbedding,
    attend,
    few_rows_on_cpu,
    few_rows_rms_norm,
    run_decoder,
    split_qkv_rope,
)

# draft methods the plan stands in for, and the forwards of the modules it stands in for, as this package defines
# them; a draft where any is overridden, patched or replaced decodes through its modules
_PLANNED_METHODS = {
    name: getattr(SpecVLMDraftModel, name)
    for name in ("fuse", "decode_rows", "compute_logits", "draft_logits", "embed_tokens")
}
_PLAIN_FORWARDS = {
    cls: cls.forward
    for cls in (
        SpecVLMDecoderLayer,
        SpecVLMEagle3FirstLayer,
        SpecVLMAttention,
        SpecVLMMLP,
        SpecVLMRMSNorm,
        SpecVLMRotaryEmbedding,
    )
}


class _LayerPlan:
    """One decoder layer (`SpecVLMDecoderLayer`, or EAGLE-3's first layer over `[embed ; g]` rows)."""

    __slots__ = ("norm1", "hidden_norm", "qkv", "o", "norm2", "gate_up", "down", "shape", "inter", "index")

    def __init__(self, layer: SpecVLMDecoderLayer | SpecVLMEagle3FirstLayer, dtype: torch.dtype):
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1 = _norm(layer.input_layernorm, dtype)
        eagle3 = isinstance(layer, SpecVLMEagle3FirstLayer)
        self.hidden_norm = _norm(layer.hidden_norm, dtype) if eagle3 else None
        self.qkv = bound_stacked_linear(attn, (attn.q_proj, attn.k_proj, attn.v_proj))
        self.o = bound_linear(attn.o_proj, "packed", attn.o_proj.weight, attn.o_proj.bias)
        self.norm2 = _norm(layer.post_attention_layernorm, dtype)
        self.gate_up = bound_stacked_linear(mlp, (mlp.gate_proj, mlp.up_proj))
        self.down = bound_linear(mlp.down_proj, "packed", mlp.down_proj.weight, mlp.down_proj.bias)
        self.shape = (attn.num_heads, attn.num_kv_heads, attn.head_dim)
        self.inter = mlp.gate_proj.out_features
        self.index = attn.layer_idx

    def __call__(self, x, cos, sin, attention_mask, past_key_values):
        if self.hidden_norm is None:
            attn_in = self.norm1(x)
        else:  # EAGLE-3: attention reads [input_layernorm(embed) ; hidden_norm(g)], the residual stream starts at g
            embeds, x = x.chunk(2, dim=-1)
            attn_in = torch.cat([self.norm1(embeds), self.hidden_norm(x)], dim=-1)
        q, k, v = split_qkv_rope(self.qkv(attn_in), cos, sin, *self.shape)
        x = x + self.o(attend(q, k, v, attention_mask, past_key_values, self.index))
        gate_up = self.gate_up(self.norm2(x))
        return x + self.down(F.silu(gate_up[..., : self.inter]) * gate_up[..., self.inter :])


class DecodePlan:
    """`draft_step` and `draft_logits` for one draft whose weights stay as they are while the plan is used."""

    def __init__(self, draft: SpecVLMDraftModel):
        from .decoding import _token_table

        h = draft.config.hidden_size
        self.eagle3 = draft.is_eagle3
        dtype = draft.norm.weight.dtype  # (= fc's: one dtype, `_plannable`)
        self.hidden_size, self.dtype = h, dtype
        self.rotary = draft.rotary_emb.forward
        _, embed, lm_head = draft._bound_parts()
        self.embed = embed
        # target features wider than h: "eagle" projects them with feature_proj, "eagle3" with fc (module docstring
        # of modeling_specvlm); "eagle" then fuses [embed ; f] with fc and input_norm
        widen = draft.fc if self.eagle3 else draft.feature_proj
        self.feature_proj = None if widen is None else bound_linear(widen, "packed", widen.weight, widen.bias)
        self.token_table = None
        if not self.eagle3:
            self.fc = bound_linear(draft.fc, "packed", draft.fc.weight, draft.fc.bias)
            self.input_norm = _norm(draft.input_norm, dtype)
            # the fusion split as `W_e embed(x) + W_f f`, the first term read from a per-vocabulary table
            self.token_table = _token_table(draft)
            if self.token_table is not None:  # (only then is the feature half multiplied on its own)
                w_feature = draft.fc.weight[:, h:]
                self.fc_feature = bound_linear(draft.fc, "feature_half", w_feature, sources=[draft.fc.weight])
            self.fc_bias = draft.fc.bias
        self.layers = [_LayerPlan(layer, dtype) for layer in draft.layers]
        # "eagle" outputs are normed; "eagle3" outputs are pre-norm and the head norms them
        self.norm = _norm(draft.norm, dtype)
        # the draft's own head over its reduced vocabulary, or the target's lm_head (packed, a copy the draft owns,
        # when plain and small; else called as it is)
        reduced = draft.draft_lm_head is not None
        head = draft.draft_lm_head if reduced else lm_head
        if reduced:
            self.head = bound_linear(head, "packed", head.weight, head.bias)
        else:
            self.head = bound_shared_linear(draft, "lm_head", head, TARGET_COPY_MAX_ELEMENTS)
        self.head_dtype, self.head_device = head.weight.dtype, head.weight.device
        self.vocab_ids = draft.draft_vocab_ids if reduced else None

    @classmethod
    def build(cls, draft) -> DecodePlan | None:
        """The plan for `draft`, or None where the module path must run (module docstring)."""
        if not _plannable(draft):
            return None
        return cls(draft)

    def step(
        self,
        token_ids: torch.Tensor,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        max_position: int | None = None,
    ) -> torch.Tensor:
        """`decoding.draft_step`: token_ids (T,), hidden_states (T, n*h or h) -> last_hidden_state (T, h)."""
        h = self.hidden_size
        features = hidden_states.to(self.dtype)
        if self.token_table is not None and features.shape[-1] == h:
            fused = self.token_table[token_ids] + self.fc_feature(features)
            if self.fc_bias is not None:
                fused = fused + self.fc_bias
        else:
            if self.feature_proj is not None and features.shape[-1] != h:
                features = self.feature_proj(features)
            fused = torch.cat([self.embed(token_ids).to(self.dtype), features], dim=-1)
            if not self.eagle3:
                fused = self.fc(fused)
        x = fused if self.eagle3 else self.input_norm(fused)
        return self.decode_rows(x[None], position_ids, attention_mask, past_key_values, max_position)[0]

    def decode_rows(self, x, position_ids, attention_mask, past_key_values, max_position):
        """`SpecVLMDraftModel.decode_rows` on fused rows x (B, T, fused_size) -> (B, T, h)."""
        final_norm = None if self.eagle3 else self.norm
        return run_decoder(
            self.layers,
            self.rotary,
            final_norm,
            x,
            position_ids,
            attention_mask,
            past_key_values,
            max_position,
        )

    def draft_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`SpecVLMDraftModel.draft_logits`: (logits (..., Vd), target id of each column or None)."""
        if self.eagle3:
            hidden = self.norm(hidden)
        return self.head(hidden.to(self.head_device, self.head_dtype)), self.vocab_ids


def _norm(module: SpecVLMRMSNorm, dtype: torch.dtype):
    """`module(x)` for inputs of `dtype` (`SpecVLMRMSNorm.forward` with its weights cast once)."""
    weight, shape, eps = module.weight.to(dtype), module.weight.shape, module.eps
    doubled = torch.cat([weight, weight])

    def norm(x):
        if few_rows_on_cpu(x):
            return few_rows_rms_norm(x, doubled, eps)
        return F.rms_norm(x, shape, weight, eps)

    return norm


def _plannable(draft) -> bool:
    if not isinstance(draft, SpecVLMDraftModel) or draft.training or draft._bound is None:
        return False
    device = draft.norm.weight.device.type
    if torch.is_autocast_enabled(device):  # autocast re-types every product; the modules follow it per call
        return False
    # the draft's own methods: neither overridden (subclass, class patch) nor replaced on the instance
    if any(getattr(type(draft), name) is not method for name, method in _PLANNED_METHODS.items()):
        return False
    if any(name in draft.__dict__ for name in _PLANNED_METHODS):
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    if draft._forward_hooks or draft._forward_pre_hooks:
        return False
    compressor = {id(m) for m in draft.compressor.modules()} if draft.compressor is not None else set()
    for module in draft.modules():
        if (
            module is draft or id(module) in compressor
        ):  # the compressor runs only in the prefill, as a module
            continue
        if isinstance(module, nn.Linear):
            if not _plain_linear(module):
                return False
        elif isinstance(module, nn.ModuleList):
            continue
        elif (
            _PLAIN_FORWARDS.get(type(module)) is not type(module).forward  # not ours, or its forward patched
            or module._forward_hooks
            or module._forward_pre_hooks
            or "forward" in module.__dict__
        ):
            return False
    dtypes = {p.dtype for name, p in draft.named_parameters() if not name.startswith("compressor.")}
    return len(dtypes) == 1


# draft id -> (draft, its active plan), per thread and per asyncio task (generate calls in parallel each see their own)
# (a new dict for every change, never mutated)
_ACTIVE: ContextVar[dict[int, tuple] | None] = ContextVar("specvlm_active_plans", default=None)


def active_plan(draft) -> DecodePlan | None:
    """The plan `planned_decoding` set for `draft` here, if any (never while autograd records: it is inference-only)."""
    plans = _ACTIVE.get()
    entry = plans.get(id(draft)) if plans else None
    plan = entry[1] if entry is not None and entry[0] is draft else None
    return None if plan is None or torch.is_grad_enabled() else plan


@contextmanager
def planned_decoding(draft):
    """Within this block `decoding.draft_step` / `decoding.draft_logits` on `draft` run through its `DecodePlan`
    (when one applies). The decoding loops wrap a whole `generate` call; nothing may change the draft meanwhile."""
    with torch.no_grad():
        plan = DecodePlan.build(draft)
    token = _ACTIVE.set({**(_ACTIVE.get() or {}), id(draft): (draft, plan)})
    try:
        yield
    finally:
        _ACTIVE.reset(token)
