"""The CPU decode plan: the draft's decoding forward with its weights resolved once per `generate` call.

A greedy tree level or a chain step is one draft forward over 1-20 rows. On a CPU its kernels take ~0.5 ms, and
walking the modules around them (module calls, attribute lookups) took another ~0.25 ms, while `F.linear` and
`F.rms_norm` run such small products far below the machine's speed. While `generate` runs the weights cannot
change, so `DecodePlan` resolves once every tensor `SpecVLMDraftModel.decode_step` / `draft_logits` read and runs
the same computation as straight-line code with faster kernels for few rows:

* q/k/v and gate/up stacked into one product each, every product through a oneDNN-prepacked weight on CPU
  (`packed_linear`);
* the fusion `fc([embed(x) ; f])` split as `W_e embed(x) + W_f f`, the first term read from a per-vocabulary
  table (`token_table`), which halves the fusion's cost;
* RMSNorm on a few CPU rows as one layer_norm kernel over `[x ; -x]` (`few_rows_rms_norm`).

Its outputs equal the draft's own methods to rounding (`tests/test_decode_plan.py`); the draft's modules, in
`draft/modeling_specvlm.py`, are the definition. It covers drafts of both architectures ("eagle", "eagle3") built
from that file's modules, and steps aside (the modules run) for anything else: modules with hooks or patched
forwards (peft, accelerate), a subclass that overrides the draft's decoding methods, mixed dtypes, autograd,
autocast. It reads the draft by structure and never imports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .packed_linear import (
    TARGET_COPY_MAX_ELEMENTS,
    bound_linear,
    bound_shared_linear,
    bound_stacked_linear,
    derived_from_weights,
    plain_embedding,
    plain_linear,
)

# where the draft's modules are defined: the plan stands in only for their own methods and forwards
MODELING_MODULE = "specvlm_hf.draft.modeling_specvlm"
DRAFT_CLASS = "SpecVLMDraftModel"
# draft methods the plan stands in for; a draft where any is overridden, patched or replaced runs its modules
PLANNED_METHODS = ("fuse", "decode_rows", "decode_step", "compute_logits", "draft_logits", "embed_tokens")

# a (V, h) table of W_e @ embed(v) is kept for vocabularies up to this size (the bound on copies of target-sized
# tensors)
TOKEN_TABLE_MAX_ELEMENTS = TARGET_COPY_MAX_ELEMENTS

# RMSNorm on a CPU: `F.rms_norm` is ~8 small kernels, layer_norm over [x ; -x] (mean exactly 0, variance mean(x^2):
# the same normalisation) one fused kernel, 1.5-2x faster up to about this many rows (measured here: 2 rows
# 22 -> 14 us, 60 rows equal, 300 rows slower)
FEW_ROWS = 32


def few_rows_rms_norm(x: torch.Tensor, doubled_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x (..., h) with weight w as layer_norm over [x ; -x] with weight [w ; w], first half kept.
    Agrees with `F.rms_norm` to rounding (float32: ~2e-7 relative; bfloat16: an occasional 1-ulp flip)."""
    h = x.shape[-1]
    return F.layer_norm(torch.cat([x, -x], dim=-1), (2 * h,), doubled_weight, None, eps)[..., :h]


def _norm(module, dtype: torch.dtype):
    """`module(x)` (an RMSNorm with `weight`, `eps`) for inputs of `dtype`, its weights cast once."""
    weight, shape, eps = module.weight.to(dtype), module.weight.shape, module.eps
    doubled = torch.cat([weight, weight])

    def norm(x):
        if x.device.type == "cpu" and x.numel() <= FEW_ROWS * x.shape[-1]:
            return few_rows_rms_norm(x, doubled, eps)
        return F.rms_norm(x, shape, weight, eps)

    return norm


def token_table(draft) -> torch.Tensor | None:
    """(V, h) = embed(v) @ W_e^T for every target token v, or None where it does not apply or would be too big
    (or the target's embedding is quantized, offloaded or hooked: then the plan calls it as a module)."""
    if draft.config.draft_architecture != "eagle" or draft.training:
        return None
    module = draft._bound_parts()[1]
    if not plain_embedding(module):
        return None
    embed = module.weight  # (V, h), the target's frozen token embedding
    h = draft.config.hidden_size
    if embed.shape[0] * h > TOKEN_TABLE_MAX_ELEMENTS or embed.shape[1] != h:
        return None
    w = draft.fc.weight

    def build():
        with torch.no_grad():  # through the module's forward (Gemma's embedding scales its rows itself)
            rows = module(torch.arange(embed.shape[0], device=embed.device))  # (V, h)
            return (rows.to(w.device, torch.float32) @ w[:, :h].float().t()).to(w.dtype)

    return derived_from_weights(draft, "token_table", [embed, w], build)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    # x * cos + rotate_half(x) * sin, the sign of rotate_half kept in the table (as the draft's rotary module)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * signed_sin


class _LayerPlan:
    """One decoder layer (a plain layer, or EAGLE-3's first layer over `[embed ; g]` rows)."""

    __slots__ = ("norm1", "hidden_norm", "qkv", "o", "norm2", "gate_up", "down", "shape", "inter", "index")

    def __init__(self, layer: nn.Module, dtype: torch.dtype):
        attn, mlp = layer.self_attn, layer.mlp
        self.norm1 = _norm(layer.input_layernorm, dtype)
        eagle3_first = hasattr(layer, "hidden_norm")
        self.hidden_norm = _norm(layer.hidden_norm, dtype) if eagle3_first else None
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
        bsz, q_len, _ = x.shape
        heads, kv_heads, d = self.shape
        qkv = self.qkv(attn_in)  # (B, T, (heads + 2 kv_heads) * d)
        qk = qkv[..., : (heads + kv_heads) * d].view(bsz, q_len, heads + kv_heads, d).transpose(1, 2)
        qk = _rope(qk, cos, sin)  # RoPE on q and k in one pass
        v = qkv[..., (heads + kv_heads) * d :].view(bsz, q_len, kv_heads, d).transpose(1, 2)
        q, k = qk[:, :heads], qk[:, heads:]
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.index)
        causal = attention_mask is None and q_len > 1
        if causal and k.shape[2] != q_len:  # queries are the last q_len keys
            allowed = torch.ones(q_len, k.shape[2], dtype=torch.bool, device=x.device).tril(
                k.shape[2] - q_len
            )
            attention_mask, causal = (
                torch.zeros_like(allowed, dtype=q.dtype).masked_fill(~allowed, torch.finfo(q.dtype).min),
                False,
            )
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, is_causal=causal, enable_gqa=kv_heads != heads
        )
        x = x + self.o(out.transpose(1, 2).reshape(bsz, q_len, heads * d))
        gate_up = self.gate_up(self.norm2(x))
        return x + self.down(F.silu(gate_up[..., : self.inter]) * gate_up[..., self.inter :])


class DecodePlan:
    """`decode_step` and `draft_logits` for one draft whose weights stay as they are while the plan is used."""

    def __init__(self, draft):
        h = draft.config.hidden_size
        self.eagle3 = draft.config.draft_architecture == "eagle3"
        dtype = draft.norm.weight.dtype  # (one dtype for all: `plannable`)
        self.hidden_size, self.dtype = h, dtype
        self.rotary = draft.rotary_emb.forward
        _, embed, lm_head = draft._bound_parts()
        self.embed = embed
        # target features wider than h: "eagle" projects them with feature_proj, "eagle3" with fc (the modeling
        # file's docstring); "eagle" then fuses [embed ; f] with fc and input_norm
        widen = draft.fc if self.eagle3 else draft.feature_proj
        self.feature_proj = None if widen is None else bound_linear(widen, "packed", widen.weight, widen.bias)
        self.token_table = None
        if not self.eagle3:
            self.fc = bound_linear(draft.fc, "packed", draft.fc.weight, draft.fc.bias)
            self.input_norm = _norm(draft.input_norm, dtype)
            self.token_table = token_table(draft)
            if self.token_table is not None:  # (only then is the feature half multiplied on its own)
                w_feature = draft.fc.weight[:, h:]
                self.fc_feature = bound_linear(draft.fc, "feature_half", w_feature, sources=[draft.fc.weight])
            self.fc_bias = draft.fc.bias
        self.layers = [_LayerPlan(layer, dtype) for layer in draft.layers]
        # "eagle" outputs are normed; "eagle3" outputs are pre-norm and the head norms them
        self.norm = _norm(draft.norm, dtype)
        # the draft's own head over its reduced vocabulary, or the target's lm_head (packed, a copy the draft owns,
        # when plain and small); a quantized, offloaded or hooked lm_head runs as the draft's own `draft_logits`
        # runs it (through its forward, in the device and dtype it takes)
        reduced = draft.draft_lm_head is not None
        head = draft.draft_lm_head if reduced else lm_head
        if reduced:
            self.head = bound_linear(head, "packed", head.weight, head.bias)
        else:
            self.head = bound_shared_linear(draft, "lm_head", head, TARGET_COPY_MAX_ELEMENTS)
        self.module_logits = draft.draft_logits if self.head is None else None
        self.head_dtype, self.head_device = head.weight.dtype, head.weight.device
        self.vocab_ids = draft.draft_vocab_ids if reduced else None

    @classmethod
    def build(cls, draft) -> DecodePlan | None:
        """The plan for `draft`, or None where the modules must run (module docstring)."""
        if not plannable(draft):
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
        """`SpecVLMDraftModel.decode_step`: token_ids (T,), hidden_states (T, n*h or h) -> last_hidden_state (T, h);
        or a batch: (B, T), (B, T, n*h or h) -> (B, T, h)."""
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
        batched = token_ids.dim() == 2
        x = fused if self.eagle3 else self.input_norm(fused)
        if not batched:
            x = x[None]
        if position_ids is None:
            start = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(start, start + x.shape[1], device=x.device)[None]
        cos, sin = self.rotary(position_ids, x.dtype, max_position)
        if attention_mask is not None and attention_mask.dtype != x.dtype:
            attention_mask = attention_mask.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attention_mask, past_key_values)
        x = x if self.eagle3 else self.norm(x)
        return x if batched else x[0]

    def draft_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`SpecVLMDraftModel.draft_logits`: (logits (..., Vd), target id of each column or None)."""
        if self.module_logits is not None:
            return self.module_logits(hidden)
        if self.eagle3:
            hidden = self.norm(hidden)
        return self.head(hidden.to(self.head_device, self.head_dtype)), self.vocab_ids


def _defined_in_modeling(function, owner: str) -> bool:
    """Whether `function` is `owner`'s own method as the modeling file defines it (not a subclass override, a
    class patch or a wrapper)."""
    return (
        getattr(function, "__module__", None) == MODELING_MODULE
        and getattr(function, "__qualname__", None) == f"{owner}.{function.__name__}"
    )


def plannable(draft) -> bool:
    """Whether `DecodePlan` may stand in for `draft`'s decoding methods (module docstring)."""
    cls = type(draft)
    if cls.__name__ != DRAFT_CLASS or cls.__module__ != MODELING_MODULE:
        return False  # a subclass may override anything
    if draft.training or draft._bound is None or draft.norm.weight.device.type == "meta":
        return False
    if torch.is_autocast_enabled(draft.norm.weight.device.type):  # autocast re-types every product per call
        return False
    # the draft's own methods: not patched on the class, not replaced on the instance
    if not all(_defined_in_modeling(getattr(cls, name), DRAFT_CLASS) for name in PLANNED_METHODS):
        return False
    if any(name in draft.__dict__ for name in PLANNED_METHODS):
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
            if not plain_linear(module):
                return False
        elif isinstance(module, nn.ModuleList):
            continue
        elif (
            type(module).__module__ != MODELING_MODULE  # not one of the draft's own modules
            or not _defined_in_modeling(type(module).forward, type(module).__name__)  # its forward patched
            or module._forward_hooks
            or module._forward_pre_hooks
            or "forward" in module.__dict__
        ):
            return False
    dtypes = {p.dtype for name, p in draft.named_parameters() if not name.startswith("compressor.")}
    return len(dtypes) == 1
