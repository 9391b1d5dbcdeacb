"""SpecVLM draft model: an EAGLE-2 style draft that reads the target's own features.

The whole draft forward reads top to bottom in this file. Default architecture ("eagle", `config.draft_architecture`):

    fused_t = RMSNorm( fc( [ embed(x_{t+1}) ; f_t ] ) )     # f_t: target feature(s) at position t
    h       = DecoderLayer^N( fused )                        # RoPE, grouped-query attention, SwiGLU
    out_t   = RMSNorm( h )                                   # predicts f_{t+1}; lm_head(out_t) predicts x_{t+2}

`embed` and `lm_head` are the bound target's own modules, held by reference (frozen, never saved with the
draft). Rows whose next token is a visual placeholder carry the target's visual features as `embed(x_{t+1})`
and may be reduced by the elastic visual compressor (`compression.py`) before they enter the decoder.

EAGLE-3 architecture ("eagle3"), the draft of vLLM `speculators` (`Eagle3DraftModel`) with the same weight names:

    g_t     = fc( [ f^1_t ; ... ; f^n_t ] )                  # n > 1 target layers (n*h -> h); n == 1: g_t = f_t
    fused_t = [ embed(x_{t+1}) ; g_t ]                        # (2h,) rows; the compressor works on these
    a       = Attn( [ input_layernorm(embed(x_{t+1})) ; hidden_norm(g_t) ] )   # q/k/v read 2h
    h       = g_t + a;  h = h + MLP( post_attention_layernorm(h) )              # residual stream starts at g_t
    h       = DecoderLayer^(N-1)( h )                         # further layers: plain Llama layers
    out_t   = h                                               # returned as `last_hidden_state` (no final norm)
    logits  = head( norm( out_t ) )                           # `compute_logits` / `draft_logits` apply `norm`

Deeper draft steps (tree levels, chain steps) put the draft's own h-wide output `out_t` in the feature slot g,
exactly as EAGLE-3's training-time test and vLLM do; n*h-wide target features go through `fc` first (the width
tells them apart, which is why a one-layer EAGLE-3 draft has no `fc`: it exports `fc` as the identity).
`fused_inputs` (what `prepare_context` returns and the compressor reduces) is always the first layer's input:
(.., h) rows for "eagle", (.., 2h) `[embed ; g]` rows for "eagle3" (`config.fused_size`); a compressed
"eagle3" row is split back into its embedding half and feature half by the first layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..targets.loading import dense_linear_rows, dense_weight, execution_device, module_inputs
from .compression import DraftContext, build_compressor
from .configuration_specvlm import SpecVLMDraftConfig


class SpecVLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # weight * x / sqrt(mean(x^2) + eps)
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, self.weight.shape, weight, self.eps)


class SpecVLMRotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype, max_position: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> (cos, signed sin), each (B, 1, T, head_dim), for `apply_rope`.

        Read from a table of every position so far (decoding calls this once per draft step; a lookup instead of
        five elementwise kernels). The sin table carries rotate-half's sign: [-sin ; sin] over the two halves.
        max_position: the largest position in `position_ids` when the caller knows it (the decoding loops do):
        saves reading it back from the device, a host sync per draft forward on a GPU.
        """
        if max_position is None:
            max_position = int(position_ids.max()) if position_ids.numel() else 0
        cos, sin = self._table(max_position + 1, dtype)
        return cos[position_ids][:, None], sin[position_ids][:, None]

    def _table(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cached = getattr(self, "_cos_sin", None)
        device = self.inv_freq.device
        # inference-mode tensors cannot enter autograd: a table built inside generate() is rebuilt for training
        key = (dtype, device, self.inv_freq._version, torch.is_inference_mode_enabled())
        if cached is None or cached[0] < length or cached[1] != key:
            size = max(length, 2 * cached[0] if cached is not None else 512)
            freqs = torch.arange(size, device=device, dtype=torch.float32)[:, None] * self.inv_freq
            cos = torch.cat([freqs, freqs], dim=-1).cos()  # (size, head_dim)
            signed_sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)
            cached = (size, key, cos.to(dtype), signed_sin.to(dtype))
            self._cos_sin = cached
        return cached[2], cached[3]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE: x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = [x2 ; x1] * [-sin ; sin] (the sign lives
    in the table). x: (B, heads, T, d); cos, signed_sin: (B, 1, T, d) from `SpecVLMRotaryEmbedding`."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * signed_sin


class SpecVLMAttention(nn.Module):
    def __init__(self, config: SpecVLMDraftConfig, layer_idx: int, input_size: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        d_in = input_size or config.hidden_size  # 2h for EAGLE-3's first layer
        self.q_proj = nn.Linear(d_in, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_in, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_in, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
    ) -> torch.Tensor:
        bsz, q_len, _ = x.shape
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(bsz, q_len, heads, d).transpose(1, 2)  # (B, heads, T, d)
        k = self.k_proj(x).view(bsz, q_len, kv_heads, d).transpose(1, 2)  # (B, kv_heads, T, d)
        v = self.v_proj(x).view(bsz, q_len, kv_heads, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.o_proj(attend(q, k, v, attention_mask, past_key_values, self.layer_idx))


def attend(q, k, v, attention_mask: torch.Tensor | None, past_key_values: Cache | None, layer_idx: int):
    """Scaled dot-product attention of q (B, heads, T, d) over the cache plus k, v (B, kv_heads, T, d), which are
    appended to `past_key_values` (layer `layer_idx`). attention_mask: (B, 1, T, kv_len) additive float mask, or
    None for plain causal attention. Returns (B, T, heads * d), ready for `o_proj`."""
    bsz, heads, q_len, d = q.shape
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, layer_idx)
    if attention_mask is None:
        is_causal = q_len > 1
        if is_causal and k.shape[2] != q_len:
            attention_mask = causal_mask(q_len, k.shape[2], dtype=q.dtype, device=q.device)
            is_causal = False
    else:
        is_causal = False
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=attention_mask, is_causal=is_causal, enable_gqa=k.shape[1] != heads
    )
    return out.transpose(1, 2).reshape(bsz, q_len, heads * d)


class SpecVLMMLP(nn.Module):
    def __init__(self, config: SpecVLMDraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SwiGLU: down(silu(gate(x)) * up(x))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SpecVLMDecoderLayer(nn.Module):
    def __init__(self, config: SpecVLMDraftConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = SpecVLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SpecVLMAttention(config, layer_idx)
        self.post_attention_layernorm = SpecVLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SpecVLMMLP(config)

    def forward(self, x, cos, sin, attention_mask, past_key_values):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention_mask, past_key_values)
        return x + self.mlp(self.post_attention_layernorm(x))


class SpecVLMEagle3FirstLayer(nn.Module):
    """EAGLE-3's first decoder layer: attention over `[input_layernorm(embed) ; hidden_norm(g)]`, residual from g."""

    def __init__(self, config: SpecVLMDraftConfig, layer_idx: int = 0):
        super().__init__()
        h = config.hidden_size
        self.input_layernorm = SpecVLMRMSNorm(h, config.rms_norm_eps)  # on the token embedding half
        self.hidden_norm = SpecVLMRMSNorm(h, config.rms_norm_eps)  # on the feature half
        self.self_attn = SpecVLMAttention(config, layer_idx, input_size=2 * h)
        self.post_attention_layernorm = SpecVLMRMSNorm(h, config.rms_norm_eps)
        self.mlp = SpecVLMMLP(config)

    def forward(self, x, cos, sin, attention_mask, past_key_values):
        # x: (B, T, 2h) = [embed(x_{t+1}) ; g_t]
        embeds, g = x.chunk(2, dim=-1)
        attn_in = torch.cat([self.input_layernorm(embeds), self.hidden_norm(g)], dim=-1)
        x = g + self.self_attn(attn_in, cos, sin, attention_mask, past_key_values)
        return x + self.mlp(self.post_attention_layernorm(x))


def run_decoder(layers, rotary, final_norm, x, position_ids, attention_mask, past_key_values, max_position):
    """The decoder stack on fused rows x (B, T, fused_size) -> (B, T, h):
    RoPE tables, the mask in x's dtype, each `layer(x, cos, sin, mask, cache)`, then `final_norm` (None: none)."""
    bsz, q_len, _ = x.shape
    if position_ids is None:
        start = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = torch.arange(start, start + q_len, device=x.device)[None].expand(bsz, -1)
    cos, sin = rotary(position_ids, x.dtype, max_position)
    if attention_mask is not None and attention_mask.dtype != x.dtype:
        attention_mask = attention_mask.to(x.dtype)
    for layer in layers:
        x = layer(x, cos, sin, attention_mask, past_key_values)
    return x if final_norm is None else final_norm(x)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" mask -> additive float mask (0 where allowed, the dtype's minimum elsewhere)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def causal_mask(
    q_len: int,
    kv_len: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    key_padding: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive causal mask (1, 1, q_len, kv_len) for queries that are the last `q_len` of `kv_len` keys.

    key_padding: optional (B, kv_len) bool, True where a key is real; gives a (B, 1, q_len, kv_len) mask.
    """
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    allowed = torch.arange(kv_len, device=device)[None, :] <= q_pos  # (q, kv)
    allowed = allowed[None, None]
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :]
    return additive_mask(allowed, dtype)


class _UnboundDraftError(AttributeError):
    """Raised when an unbound draft reaches transformers' stock assisted decoding (it asks for generation_config).

    An AttributeError, so `hasattr(draft, "generation_config")` stays False for code that probes it.
    """


class SpecVLMPreTrainedModel(PreTrainedModel):
    config_class = SpecVLMDraftConfig
    config: SpecVLMDraftConfig
    base_model_prefix = "specvlm_draft"
    main_input_name = "inputs_embeds"
    supports_gradient_checkpointing = False
    _no_split_modules = ["SpecVLMDecoderLayer", "SpecVLMEagle3FirstLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, SpecVLMRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, SpecVLMRotaryEmbedding):
            # a non-persistent buffer: from_pretrained builds it on the meta device and never loads it, so it is
            # recomputed here (without this a loaded draft's RoPE frequencies were uninitialised memory)
            with torch.no_grad():
                module.inv_freq.copy_(module.compute_inv_freq().to(module.inv_freq.device))
        elif hasattr(module, "reset_compressor_parameters"):
            module.reset_compressor_parameters()


class SpecVLMDraftModel(SpecVLMPreTrainedModel):
    """The SpecVLM draft. Bind it to its target with `draft.bind(vlm)` before use."""

    def __init__(self, config: SpecVLMDraftConfig):
        super().__init__(config)
        h = config.hidden_size
        self.is_eagle3 = config.draft_architecture == "eagle3"
        multi = config.num_fused_layers > 1
        if self.is_eagle3:
            # fc: the fused target layers -> one h-wide feature g (absent for one layer: g is the feature itself)
            self.feature_proj, self.input_norm = None, None
            self.fc = nn.Linear(config.num_fused_layers * h, h, bias=False) if multi else None
            self.layers = nn.ModuleList(
                [SpecVLMEagle3FirstLayer(config, 0)]
                + [SpecVLMDecoderLayer(config, i) for i in range(1, config.num_hidden_layers)]
            )
        else:
            # several target layers (EAGLE-3 style) are first projected to one h-wide feature, so that deeper tree
            # levels can feed the draft its own h-wide output in the same slot
            self.feature_proj = nn.Linear(config.num_fused_layers * h, h, bias=False) if multi else None
            self.fc = nn.Linear(2 * h, h, bias=False)
            self.input_norm = SpecVLMRMSNorm(h, config.rms_norm_eps)
            self.layers = nn.ModuleList(
                SpecVLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)
            )
        self.norm = SpecVLMRMSNorm(h, config.rms_norm_eps)
        self.rotary_emb = SpecVLMRotaryEmbedding(config.head_dim, config.rope_theta)
        self.compressor = None
        if config.compressor_mode is not None:
            self.compressor = build_compressor(config)
        # reduced draft vocabulary (EAGLE-3 style): the draft's own head over Vd target tokens, and the target id of
        # each of its rows (saved with the draft; `arange(Vd)` until the trainer or `set_draft_vocab` sets it)
        self.draft_lm_head = None
        if config.draft_vocab_size is not None:
            self.draft_lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
            self.register_buffer("draft_vocab_ids", torch.arange(config.draft_vocab_size), persistent=True)
        self.last_generation_stats = None
        self._bound = None  # (target, embed, lm_head); a plain tuple so the target is never a submodule
        self.post_init()

    # ----------------------------------------------------------------- binding
    @property
    def is_bound(self) -> bool:
        return self._bound is not None

    @property
    def target(self):
        if self._bound is None:
            raise RuntimeError(
                "This SpecVLM draft is not bound to a target model. Call `draft.bind(vlm)` (or load it with "
                "`SpecVLMDraftModel.from_pretrained(path, target=vlm)`) before using it."
            )
        return self._bound[0]

    def bind(self, target) -> SpecVLMDraftModel:
        """Attach the draft to its target: shares the target's embedding and lm_head, routes `target.generate`.

        Raises `ValueError` if the target does not match the one the draft was made for, and
        `UnsupportedTransformersError` (before touching anything) outside the supported transformers range.
        """
        from ..generation import routing
        from ..targets import families as targets

        routing.check_supported()  # the installed transformers first: nothing is touched when it is refused
        model = targets.unwrap_target(target)
        spec = targets.get_target_spec(model)
        cfg = self.config
        problems = []
        if targets.target_hidden_size(model) != cfg.hidden_size:
            problems.append(f"hidden size {targets.target_hidden_size(model)} != draft's {cfg.hidden_size}")
        if targets.target_vocab_size(model) != cfg.vocab_size:
            problems.append(f"vocabulary size {targets.target_vocab_size(model)} != draft's {cfg.vocab_size}")
        if cfg.target_family is not None and spec.family != cfg.target_family:
            problems.append(f"family {spec.family!r} != draft's {cfg.target_family!r}")
        n_layers = targets.target_num_layers(model)
        bad_layers = [i for i in cfg.target_layers if not -1 <= i <= n_layers]
        if bad_layers:
            problems.append(f"target_layers {bad_layers} out of range for a {n_layers}-layer target")
        if problems:
            raise ValueError(
                f"This draft was made for {cfg.target_name_or_path or cfg.target_architecture!r} "
                f"({cfg.target_architecture}) but was bound to {type(model).__name__} "
                f"({getattr(model.config, '_name_or_path', '') or 'unnamed'}): " + "; ".join(problems) + ". "
                "Use a draft trained for this target, or make one with "
                "`SpecVLMDraftModel(SpecVLMDraftConfig.from_target(vlm)).bind(vlm)`."
            )
        quantized = [name for name, p in self.named_parameters() if not dense_weight(p)]
        if quantized:
            raise ValueError(
                f"The draft's own weights must be dense floating tensors; {quantized[:3]} are not (was the draft "
                "loaded with a quantization_config or a device_map?). Load the draft without them: it is small and "
                "stays in the compute dtype; only the target is quantized or offloaded."
            )
        embed, lm_head = targets.input_embeddings(model), targets.output_embeddings(model)
        self._bound = (model, embed, lm_head)
        # where lm_head computes: its weight's device, or an accelerate hook's execution device when it is
        # offloaded (its weight then lies on the meta device)
        device = execution_device(lm_head)
        if self.norm.weight.device != device:
            self.to(device)
        routing.install(model)
        return self

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, target=None, **kwargs):
        """`from_pretrained(path_or_repo, target=vlm)` loads and binds in one step."""
        draft = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        return draft.bind(target) if target is not None else draft

    # ------------------------------------------------------------- target parts
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The target's token embedding (frozen, shared by reference)."""
        return self._bound_parts()[1](input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full target-vocabulary logits (..., V) from draft outputs (..., h).

        Without a reduced vocabulary: the target's `lm_head` (frozen). With one: the draft head's Vd logits placed
        at their target ids, -inf (probability 0) everywhere else. Drafting itself uses `draft_logits` (O(h*Vd)).
        An "eagle3" draft applies its final `norm` first (its outputs are pre-norm; module docstring).
        """
        if self.draft_lm_head is None:
            lm_head = self._bound_parts()[2]
            if self.is_eagle3:
                hidden = self.norm(hidden.to(self.norm.weight.device))
            # through lm_head's forward, in the device and dtype it takes (it may be quantized or offloaded)
            return lm_head(hidden.to(*module_inputs(lm_head, self.norm.weight.dtype)))
        logits, ids = self.draft_logits(hidden)
        return self.full_vocab_logits(logits, ids)

    def draft_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draft's output distribution in its own vocabulary: (logits (..., Vd), ids (Vd,)).

        ids[j] is the target token id of column j. Without a reduced vocabulary the logits are the target
        `lm_head`'s (..., V) and ids is None (column j is token j).
        """
        if self.draft_lm_head is None:
            return self.compute_logits(hidden), None
        if self.is_eagle3:
            hidden = self.norm(hidden)
        head = self.draft_lm_head
        return head(hidden.to(head.weight.dtype)), self.draft_vocab_ids

    def full_vocab_logits(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Scatter draft-vocabulary logits (..., Vd) into a (..., V) tensor that is -inf outside the draft vocab."""
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        full[..., ids] = logits
        return full

    @property
    def has_draft_vocab_map(self) -> bool:
        """True when a reduced draft vocabulary has its index map set (anything but the default `arange`)."""
        if self.draft_lm_head is None:
            return False
        ids = self.draft_vocab_ids
        return not torch.equal(ids, torch.arange(ids.numel(), device=ids.device))

    @torch.no_grad()
    def set_draft_vocab(self, token_ids, init_from_target: bool = False) -> SpecVLMDraftModel:
        """Set the target token id of each draft-vocabulary row (`token_ids`: Vd distinct ids in [0, vocab_size)).

        init_from_target: also copy the target `lm_head` rows of those tokens into the draft head (a bound draft;
        the target's head has no bias), so an untrained head starts as the target's head restricted to them. A
        quantized or offloaded `lm_head` gives them through its forward, dequantized (`dense_linear_rows`).
        """
        if self.draft_lm_head is None:
            raise ValueError(
                "This draft uses the full target vocabulary (config.draft_vocab_size is None); build it with "
                "`SpecVLMDraftConfig.from_target(vlm, draft_vocab_size=...)` to give it a reduced vocabulary."
            )
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().to(self.draft_vocab_ids.device)
        size, vocab = self.config.draft_vocab_size, self.config.vocab_size
        if ids.numel() != size:
            raise ValueError(
                f"set_draft_vocab: got {ids.numel()} token ids; expected draft_vocab_size={size}."
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"set_draft_vocab: token ids must lie in [0, vocab_size={vocab}).")
        if ids.unique().numel() != size:
            raise ValueError("set_draft_vocab: token ids must be distinct.")
        self.draft_vocab_ids.copy_(ids)
        if init_from_target:
            lm_head, head = self._bound_parts()[2], self.draft_lm_head.weight
            if dense_weight(lm_head.weight):
                rows = lm_head.weight[ids.to(lm_head.weight.device)]
            else:  # quantized or offloaded storage: the rows through the module's forward, made once
                rows = dense_linear_rows(lm_head, ids, head.dtype)
            head.copy_(rows.to(head))
        return self

    def _bound_parts(self):
        if self._bound is None:
            _ = self.target  # raises the bind() error
        return self._bound

    # ------------------------------------------------------------------ forward
    def feature_slot(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What the fused row's feature slot holds: (.., n*h) target features -> (.., h); h-wide rows unchanged.

        Several fused target layers go through `fc` ("eagle3", g_t) or `feature_proj` ("eagle"); one target layer
        and the draft's own outputs are already h wide. `fuse` does the same; the trainer's unrolled steps call
        this to mix the draft's outputs with projected target features in one (.., h) tensor.
        """
        proj = self.fc if self.is_eagle3 else self.feature_proj
        if proj is None or hidden_states.shape[-1] == self.config.hidden_size:
            return hidden_states
        return proj(hidden_states.to(proj.weight.dtype))

    def fuse(self, inputs_embeds: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """[embed(x_{t+1}) ; f_t] -> fused draft input rows. (B, T, h) + (B, T, n*h or h) -> (B, T, fused_size).

        With several fused target layers, target features (n*h wide) go through `feature_proj` ("eagle") or
        `fc` ("eagle3") first; the draft's own h-wide outputs (fed back while drafting) go straight into the
        feature slot. "eagle" rows are `RMSNorm(fc([embed ; f]))` (h wide), "eagle3" rows `[embed ; g]` (2h wide).
        """
        if self.is_eagle3:
            dtype = self.norm.weight.dtype
            g = self.feature_slot(hidden_states.to(dtype))  # g_t = fc([f^1_t ; ... ; f^n_t])
            return torch.cat([inputs_embeds.to(dtype), g], dim=-1)
        dtype = self.fc.weight.dtype
        hidden_states = self.feature_slot(hidden_states.to(dtype))
        x = torch.cat([inputs_embeds.to(dtype), hidden_states], dim=-1)
        return self.input_norm(self.fc(x))

    def forward(
        self,
        inputs_embeds: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        fused_inputs: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Run the draft decoder.

        inputs_embeds: (B, T, h) target embedding of x_{t+1}; hidden_states: (B, T, n*h) target features f_t
        (or (B, T, h) draft outputs fed back). Or `fused_inputs` (B, T, fused_size) already fused (e.g. after visual
        compression).
        position_ids: (B, T) RoPE positions (default: continuing the cache).
        attention_mask: (B, 1, T, kv_len) additive float mask (tree or padding), or None for causal.
        Returns `last_hidden_state` (B, T, h): the draft's prediction of the target's next features ("eagle",
        after the final norm), or the pre-norm state EAGLE-3 feeds back ("eagle3"; `compute_logits` norms it).
        """
        x = fused_inputs if fused_inputs is not None else self.fuse(inputs_embeds, hidden_states)
        out = self.decode_rows(x, position_ids, attention_mask, past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=out, past_key_values=past_key_values)

    def decode_rows(
        self,
        fused: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        max_position: int | None = None,
    ) -> torch.Tensor:
        """The decoder on fused input rows (B, T, fused_size) -> `last_hidden_state` (B, T, h): `forward` without
        the fusion and the output wrapper (the decoding loops call it once per draft step; they pass the largest
        position as `max_position`, see `SpecVLMRotaryEmbedding.forward`)."""
        final_norm = None if self.is_eagle3 else self.norm
        return run_decoder(
            self.layers,
            self.rotary_emb,
            final_norm,
            fused,
            position_ids,
            attention_mask,
            past_key_values,
            max_position,
        )

    def decode_step(
        self, token_ids: torch.Tensor, hidden_states: torch.Tensor, **decoder_kwargs
    ) -> torch.Tensor:
        """One decoding forward over rows: row i pairs token_ids[i] (its embedding) with hidden_states[i].

        token_ids: (T,) target token ids, or (B, T) for a batch of sequences; hidden_states: (T, n*h) / (B, T, n*h)
        target features or (T, h) / (B, T, h) the draft's own outputs.
        decoder_kwargs: `decode_rows`'s position_ids, attention_mask, past_key_values, max_position.
        Returns the draft's last_hidden_state (T, h) / (B, T, h). The decoding loops reach this through
        `specvlm_hf.backends.draft_step`, which may run an equivalent faster implementation instead.
        """
        if token_ids.dim() == 2:
            rows = self.fuse(self.embed_tokens(token_ids), hidden_states)
            return self.decode_rows(rows, **decoder_kwargs)
        rows = self.fuse(self.embed_tokens(token_ids)[None], hidden_states[None])
        return self.decode_rows(rows, **decoder_kwargs)[0]

    # ---------------------------------------------------------- prompt context
    def prepare_context(
        self,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor,
        features: torch.Tensor,
        next_embeds: torch.Tensor | None = None,
        spans: list[list] | None = None,
        valid: torch.Tensor | None = None,
    ) -> DraftContext:
        """Build the draft's input rows for a batch of sequences, compressing visual rows if configured.

        input_ids:     (B, L) target tokens x_0..x_{L-1}
        inputs_embeds: (B, L, h) what the target embedded at each position (visual features at placeholders)
        features:      (B, L, n*h) target features f_0..f_{L-1}
        next_embeds:   (B, 1, h) embedding of x_L (the token after the last one), or None to drop the last row
        spans:         per sequence, the `targets.families.VisualSpan`s of input_ids (None: no visual compression)
        valid:         (B, L) bool, False on padding (right padding only)
        Row t of the result pairs f_t with embed(x_{t+1}); a visual span [s, s+n) of tokens becomes rows [s-1, s-1+n).
        """
        bsz, seq_len = input_ids.shape
        if next_embeds is not None:
            shifted = torch.cat([inputs_embeds[:, 1:], next_embeds.to(inputs_embeds.dtype)], dim=1)
            feats = features
        else:
            shifted, feats = inputs_embeds[:, 1:], features[:, :-1]
            seq_len -= 1
        fused = self.fuse(shifted, feats)  # (B, L, h)
        device = fused.device
        if valid is None:
            valid = torch.ones(bsz, seq_len, dtype=torch.bool, device=device)
        else:
            valid = valid[:, :seq_len].to(device)
        positions = torch.arange(seq_len, device=device)[None].expand(bsz, -1)
        row_index = torch.where(valid, positions, torch.full_like(positions, -1))
        ctx = DraftContext(fused, positions, row_index, valid)
        if self.compressor is None or spans is None:
            n_vis = [sum(s.length for s in seq_spans) for seq_spans in (spans or [[] for _ in range(bsz)])]
            ctx.visual_tokens, ctx.kept_visual_tokens, ctx.choices = n_vis, list(n_vis), [None] * bsz
            return ctx
        return self.compressor.compress_batch(ctx, spans)

    # ------------------------------------------------------------- decoding
    def decoding_settings(self, **overrides):
        """This draft's decoding settings (`decoding_mode`, `tree_*`, `num_draft_tokens`, ...), with overrides."""
        from ..generation.settings import DecodingSettings

        return DecodingSettings.from_config(self.config, **overrides)

    @property
    def generation_config(self):
        """Drafts have no generation config of their own: stock assisted decoding reaching here means unbound."""
        raise _UnboundDraftError(
            "This SpecVLM draft is not bound to the model generating with it. Call `draft.bind(vlm)` once, then "
            "`vlm.generate(**inputs, assistant_model=draft)`."
        )

    @generation_config.setter
    def generation_config(self, value):
        pass  # PreTrainedModel.__init__ assigns one; a draft keeps none

    def __getattr__(self, name: str):
        if (
            name == "generation_config"
        ):  # the property raised: keep its message instead of nn.Module's generic one
            raise _UnboundDraftError(
                "This SpecVLM draft is not bound to the model generating with it. Call `draft.bind(vlm)` once, "
                "then `vlm.generate(**inputs, assistant_model=draft)`."
            )
        return super().__getattr__(name)

    def generate(self, *args, **kwargs):
        """A draft does not generate on its own: it is passed to its target's generate."""
        raise RuntimeError(
            "A SpecVLM draft is used through its target: call `draft.bind(vlm)` once, then "
            "`vlm.generate(**inputs, assistant_model=draft)`. If you did bind it, pass it to the generate() of the "
            "same model object you bound it to."
        )

    # ---------------------------------------------------------------- misc
    def extra_repr(self) -> str:
        arch = f"draft_architecture={self.config.draft_architecture!r}, " if self.is_eagle3 else ""
        return f"{arch}bound={self.is_bound}, decoding_mode={self.config.decoding_mode!r}"


__all__ = [
    "SpecVLMDraftModel",
    "SpecVLMPreTrainedModel",
    "SpecVLMEagle3FirstLayer",
    "additive_mask",
    "causal_mask",
]
