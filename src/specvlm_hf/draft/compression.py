"""Elastic visual compressor: reduces the draft's visual rows (the target always sees every visual token).

Row convention (see `modeling_specvlm.py`): draft row t pairs the target feature f_t with the embedding of
token x_{t+1}, so a visual span of tokens [s, s+n) is carried by draft rows [s-1, s-1+n). When the image
comes first (PaliGemma, s == 0) the first visual token has no row and the span's rows are [0, n-1).

Position rule: compressed tokens occupy the image span of the draft's sequence; text positions and the
positions after the prompt are unaffected. A span whose rows sit at positions p_0 <= ... <= p_{r-1} and that
is compressed to m rows gives compressed row i the position p_{floor((i + 0.5) * r / m)}: evenly spread
over the span, monotone, never outside it. Text rows keep their position and `row_index`; compressed rows
get `row_index` -1. The draft therefore continues decoding at the same positions as without compression.

Primitives, on one span of n tokens (r draft rows; r == n except at row 0) with layout (t, h, w):

- ``prune``: keep ceil(r / compressor_prune_ratio) rows with the highest score ("norm": L2 norm, "question":
  cosine similarity to the mean of the sequence's non-visual rows, "random"), in their original order.
- ``pool``: k x k average pooling (k = compressor_pool_kernel) over each frame, partial windows counted
  (ceil mode): t * ceil(h/k) * ceil(w/k) rows. Layout unknown: 1-D pooling with window k*k, ceil(n / k^2).
- ``conv``: depthwise strided conv (kernel = stride = (sh, sw) with sh * sw = compressor_conv_ratio, sh the
  largest divisor of the ratio not above its square root: 3 -> (1, 3), 4 -> (2, 2), 6 -> (2, 3)) followed by a
  pointwise (1x1) conv: t * ceil(h/sh) * ceil(w/sw) rows, or ceil(n / (sh*sw)) in 1-D. Initialised to
  averaging + identity, so an untrained conv is exactly average pooling with that window.
- ``resampler``: one cross-attention layer with q = compressor_resampler_queries learned queries over the
  span's rows, plus a residual MLP: q rows. Initialised so that it starts as (near) mean pooling.
- ``text_only``: 0 rows.

Newline layouts (LLaVA-NeXT any-res `image_newline`, Mistral3 [IMG_BREAK]/[IMG_END]; `newline_every` = w):
the span holds t * h * (w + 1) tokens; pool and conv drop the newline rows, compress the grid and keep one
newline row per output grid row (the mean of the newline rows it covers), adding t * ceil(h/kh) rows.
A grid that does not match the span length is ignored (1-D treatment).

Modes (`config.compressor_mode`): a fixed primitive; "select" (a gate, an MLP on [mean of the question rows;
mean of the visual rows], picks one primitive of `compressor_primitives` per sequence for all its spans:
Gumbel-softmax with a hard straight-through one-hot in training, so the chosen output rows are multiplied by
the one-hot weight and the gate learns from the distillation loss; argmax in eval, deterministic);
"weighted" (gated mix sum_k w_k * out_k, w = softmax(gate logits), of prune/pool/conv, all three at the pool
count: prune keeps that many rows and the conv uses stride (k, k)); "concat" (the outputs of all configured
primitives, concatenated within the span, as many whole outputs, in order, as fit in the span's rows).
No mode gives a span more rows than it has: an output that would is replaced by the span's own rows. `gate_cost` = compressor_cost_weight * the expected fraction of
visual rows kept under the gate's probabilities (each primitive's fraction capped at 1; mean over the
sequences with visual rows): a scalar in [0, weight], zero without a gate.

Initialisation: every compressor module sets its own weights in `reset_compressor_parameters()` (called in
its constructor); the draft's `_init_weights` only re-draws the `nn.Linear`s with the same N(0, 0.02) rule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .configuration_specvlm import SpecVLMDraftConfig

if TYPE_CHECKING:
    from ..targets.families import VisualSpan

GRID_PRIMITIVES = ("prune", "pool", "conv")  # the ones "weighted" mode mixes


@dataclass
class DraftContext:
    """Draft-side view of a batch of prompts, after the (optional) visual compression.

    fused:        (B, L', fused_size) fused draft input rows, right-padded (h wide; 2h `[embed ; g]` for "eagle3")
    position_ids: (B, L') RoPE positions (text rows keep their original positions; see compression.py)
    row_index:    (B, L') original draft row of each kept row (row t pairs f_t with x_{t+1}); -1 for compressed or
                  padded rows
    valid:        (B, L') bool, False on padding
    kept_visual_tokens, visual_tokens: per sequence; choices: compressor primitive chosen per sequence
    gate_cost:    scalar tensor, the compressor's compute cost term (0 without a gate)
    """

    fused: torch.Tensor
    position_ids: torch.Tensor
    row_index: torch.Tensor
    valid: torch.Tensor
    kept_visual_tokens: list[int] = field(default_factory=list)
    visual_tokens: list[int] = field(default_factory=list)
    choices: list[str | None] = field(default_factory=list)
    gate_cost: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class SpanLayout:
    """Where one visual span sits in the draft rows and how its tokens are laid out (all host-side ints).

    n:          tokens in the span
    row_start:  first draft row of the span (clipped at row 0), row_end exclusive (clipped at the sequence end)
    offset:     index inside the span of the token carried by row_start (1 when the span starts at token 0)
    grid:       (t, h, w) when known and consistent with n, else None (1-D layout)
    newline:    True when every grid row is followed by one newline row (n == t * h * (w + 1))
    """

    n: int
    row_start: int
    row_end: int
    offset: int
    grid: tuple[int, int, int] | None
    newline: bool

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start


def split_trailing(spans):
    """Spans with `trailing` rows after their grid (a OneVision video's final newline) become two spans: the
    grid part, compressed with its 2-D layout, and the trailing rows as a 1-D span of their own."""
    out = []
    for span in spans:
        trailing = int(getattr(span, "trailing", 0) or 0)
        if trailing <= 0 or trailing >= span.length:
            out.append(span)
            continue
        body = dataclasses.replace(span, length=span.length - trailing, trailing=0)
        tail = dataclasses.replace(
            span,
            start=span.start + span.length - trailing,
            length=trailing,
            grid=None,
            newline_every=None,
            trailing=0,
        )
        out += [body, tail]
    return out


def span_layout(span: VisualSpan, num_rows: int) -> SpanLayout | None:
    """Layout of `span` in a sequence of `num_rows` draft rows; None when no draft row carries it."""
    n = int(span.length)
    row_start, row_end = max(span.start - 1, 0), min(span.start - 1 + n, num_rows)
    if n <= 0 or row_end <= row_start:
        return None
    grid = tuple(int(v) for v in span.grid) if span.grid is not None else None
    every = getattr(span, "newline_every", None)
    newline = False
    if every:
        if grid is None and n % (every + 1) == 0:
            grid = (1, n // (every + 1), every)  # infer the rows of a newline layout
        newline = grid is not None and grid[2] == every and grid[0] * grid[1] * (grid[2] + 1) == n
        if not newline:
            grid = None
    if grid is not None and not newline and (len(grid) != 3 or math.prod(grid) != n or min(grid) < 1):
        grid = None
    return SpanLayout(n, row_start, row_end, row_start - (span.start - 1), grid, newline)


def conv_stride(ratio: int) -> tuple[int, int]:
    """(sh, sw) with sh * sw == ratio, sh the largest divisor of ratio with sh <= sqrt(ratio)."""
    sh = max(d for d in range(1, math.isqrt(ratio) + 1) if ratio % d == 0)
    return sh, ratio // sh


def window_count(layout: SpanLayout, kh: int, kw: int) -> int:
    """Rows left by a (kh, kw) window (ceil mode) over the layout; 1-D: window kh * kw over the n tokens."""
    if layout.grid is None:
        return math.ceil(layout.n / (kh * kw))
    t, h, w = layout.grid
    return t * math.ceil(h / kh) * (math.ceil(w / kw) + int(layout.newline))


def _full_span(rows: torch.Tensor, layout: SpanLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(r, d) rows -> (n, d) span tensor (zeros where no row carries a token) and its (n,) presence mask.

    The mask is None when every token of the span has a row (the common case: nothing to mask).
    """
    if layout.offset == 0 and layout.num_rows == layout.n:
        return rows, None
    full = rows.new_zeros(layout.n, rows.shape[-1])
    full[layout.offset : layout.offset + layout.num_rows] = rows
    mask = rows.new_zeros(layout.n)
    mask[layout.offset : layout.offset + layout.num_rows] = 1
    return full, mask


def _window_mean(
    x: torch.Tensor, mask: torch.Tensor | None, kh: int, kw: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Masked (kh, kw) window mean in ceil mode. x: (t, H, W, d), mask: (t, H, W) or None -> (t, H', W', d).

    H' = ceil(H / kh), W' = ceil(W / kw). weight: optional depthwise kernel (d, 1, kh, kw) used instead of the
    plain average (the conv primitive; kernel == stride). The window sum is divided by the number of present
    tokens (not kh * kw), so partial windows at the border or at a clipped first token are not diluted.
    """
    t, H, W, d = x.shape
    ph, pw = (-H) % kh, (-W) % kw
    if mask is not None:
        x = x * mask[..., None]
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    x = x.permute(0, 3, 1, 2)  # (t, d, H+, W+), channels-last in memory: no copy
    if weight is None:
        out = F.avg_pool2d(x, (kh, kw))  # mean over kh * kw
    else:  # depthwise conv, kernel == stride (weights 1 / (kh * kw) at init: the same mean)
        out = F.conv2d(x, weight.to(x.dtype), stride=(kh, kw), groups=d)
    out = out.permute(0, 2, 3, 1)  # (t, H', W', d)
    if mask is None and not (ph or pw):
        return out
    present = mask if mask is not None else out.new_ones(t, H, W)
    count = F.pad(present, (0, pw, 0, ph)).reshape(t, (H + ph) // kh, kh, (W + pw) // kw, kw).sum(dim=(2, 4))
    return out * ((kh * kw) / count.clamp_min(1.0))[..., None]  # mean over the present tokens only


def window_compress(
    rows: torch.Tensor, layout: SpanLayout, kh: int, kw: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Pool (weight None) or depthwise-conv one span's rows (r, d) with a (kh, kw) window -> (m, d)."""
    full, mask = _full_span(rows, layout)
    d = full.shape[-1]

    def grid_mask(*shape: int) -> torch.Tensor | None:
        return None if mask is None else mask.view(*shape)

    if layout.grid is None:  # 1-D: one row of n tokens, window kh * kw
        w1 = None if weight is None else weight.reshape(d, 1, 1, kh * kw)
        out = _window_mean(full.view(1, 1, layout.n, d), grid_mask(1, 1, layout.n), 1, kh * kw, w1)
        return out.view(-1, d)
    t, h, w = layout.grid
    if not layout.newline:
        return _window_mean(full.view(t, h, w, d), grid_mask(t, h, w), kh, kw, weight).reshape(-1, d)
    grid, gmask = full.view(t, h, w + 1, d), grid_mask(t, h, w + 1)
    body_mask, newline_mask = (None, None) if gmask is None else (gmask[:, :, :w], gmask[:, :, w:])
    body = _window_mean(grid[:, :, :w], body_mask, kh, kw, weight)  # (t, h', w', d)
    newline = _window_mean(grid[:, :, w:], newline_mask, kh, 1)  # (t, h', 1, d): one per output row
    return torch.cat([body, newline], dim=2).reshape(-1, d)


def prune_rows(
    rows: torch.Tensor,
    keep: int,
    score: str,
    question: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep the `keep` highest-scoring rows of (r, d), in their original order (rows with mask 0 come last)."""
    if score == "norm":
        s = torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32)
    elif score == "question":  # cosine similarity to the question mean (its norm does not change the ranking)
        s = (rows @ question.to(rows.dtype)).float() / torch.linalg.vector_norm(
            rows, dim=-1, dtype=torch.float32
        ).clamp_min(1e-6)
    else:
        s = torch.rand(rows.shape[0], device=rows.device)
    if mask is not None:
        s = s.masked_fill(mask == 0, float("-inf"))
    keep = min(keep, rows.shape[0])
    idx = s.topk(keep).indices.sort().values
    return rows[idx]


# -------------------------------------------------------------------------------------------- modules
class ConvCompressor(nn.Module):
    """Depthwise strided conv (kernel = stride) + pointwise (1x1) conv; starts as average pooling."""

    def __init__(self, hidden_size: int, stride: tuple[int, int]):
        super().__init__()
        self.stride = stride
        self.depthwise = nn.Parameter(torch.empty(hidden_size, 1, *stride))
        self.pointwise = nn.Parameter(torch.empty(hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(hidden_size))
        self.reset_compressor_parameters()

    @torch.no_grad()
    def reset_compressor_parameters(self) -> None:
        self.depthwise.fill_(1.0 / (self.stride[0] * self.stride[1]))  # averaging
        self.pointwise.copy_(torch.eye(self.pointwise.shape[0]))  # identity
        self.bias.zero_()

    def forward(self, rows: torch.Tensor, layout: SpanLayout) -> torch.Tensor:
        x = window_compress(rows, layout, *self.stride, weight=self.depthwise)
        return F.linear(x, self.pointwise.to(x.dtype), self.bias.to(x.dtype))


class ResamplerCompressor(nn.Module):
    """One cross-attention layer: q learned queries attend over the span's rows, then a residual MLP.

    Values are the (unprojected) rows, so with the small initial queries/keys attention is uniform and every
    query starts as the span mean; the MLP adds a small residual.
    """

    def __init__(self, hidden_size: int, num_queries: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads if hidden_size % num_heads == 0 else 1
        self.queries = nn.Parameter(torch.empty(num_queries, hidden_size))
        self.key_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )
        self.reset_compressor_parameters()

    @torch.no_grad()
    def reset_compressor_parameters(self) -> None:
        nn.init.normal_(self.queries, std=0.02)
        for module in (self.k_proj, self.mlp[0], self.mlp[2]):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                module.bias.zero_()
        for norm in (self.key_norm, self.mlp_norm):
            norm.reset_parameters()

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        # rows: (r, d) -> (q, d)
        r, d = rows.shape
        nh, hd = self.num_heads, d // self.num_heads
        x = rows.to(self.k_proj.weight.dtype)
        q = self.queries.view(-1, nh, hd).transpose(0, 1)  # (nh, q, hd)
        # logits = q_h . (W_k LN(x))_h = (W_k,h^T q_h) . LN(x): fold the key projection into the queries,
        # O(q * r * d) instead of projecting every row (O(r * d^2))
        u = torch.einsum("hqe,hed->hqd", q, self.k_proj.weight.view(nh, hd, d))  # (nh, q, d)
        logits = torch.einsum("hqd,rd->hqr", u, self.key_norm(x)) / math.sqrt(hd)  # (nh, q, r)
        v = x.view(r, nh, hd).transpose(0, 1)  # (nh, r, hd): values are the rows themselves
        out = (logits.softmax(-1) @ v).transpose(0, 1).reshape(-1, d)  # (q, d)
        return (out + self.mlp(self.mlp_norm(out))).to(rows.dtype)


class CompressorGate(nn.Module):
    """MLP on [mean of question rows ; mean of visual rows] -> one logit per primitive."""

    def __init__(self, hidden_size: int, num_choices: int, gate_hidden: int = 256):
        super().__init__()
        gate_hidden = min(gate_hidden, 2 * hidden_size)
        self.proj = nn.Linear(2 * hidden_size, gate_hidden)
        self.out = nn.Linear(gate_hidden, num_choices)
        self.reset_compressor_parameters()

    @torch.no_grad()
    def reset_compressor_parameters(self) -> None:
        for module in (self.proj, self.out):
            nn.init.normal_(module.weight, std=0.02)
            module.bias.zero_()

    def forward(self, question: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        # question, visual: (B, d) -> logits (B, num_choices)
        x = torch.cat([question, visual], dim=-1).to(self.proj.weight.dtype)
        return self.out(F.silu(self.proj(x)))


class ElasticVisualCompressor(nn.Module):
    """The draft-side visual compressor for one `compressor_mode` (see the module docstring)."""

    def __init__(self, config: SpecVLMDraftConfig):
        super().__init__()
        mode = config.compressor_mode
        if mode is None:
            raise ValueError("ElasticVisualCompressor needs a compressor_mode; got None.")
        self.mode = mode
        self.prune_ratio = float(config.compressor_prune_ratio)
        self.prune_score = config.compressor_prune_score
        self.pool_kernel = int(config.compressor_pool_kernel)
        self.cost_weight = float(config.compressor_cost_weight)
        self.gumbel_tau = float(config.compressor_gumbel_tau)
        if mode in ("select", "concat"):
            self.primitives = list(config.compressor_primitives)
        elif mode == "weighted":
            self.primitives = [p for p in GRID_PRIMITIVES if p in config.compressor_primitives] or list(
                GRID_PRIMITIVES
            )
        else:
            self.primitives = [mode]
        h = config.fused_size  # width of the draft's fused rows (2 * hidden_size for an "eagle3" draft)
        k = self.pool_kernel
        stride = (k, k) if mode == "weighted" else conv_stride(int(config.compressor_conv_ratio))
        self.conv = ConvCompressor(h, stride) if "conv" in self.primitives else None
        self.resampler = (
            ResamplerCompressor(h, config.compressor_resampler_queries, config.num_attention_heads)
            if "resampler" in self.primitives
            else None
        )
        self.gate = CompressorGate(h, len(self.primitives)) if mode in ("select", "weighted") else None

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, primitives={self.primitives}"

    # ------------------------------------------------------------------------------------ counts
    def expected_count(self, primitive: str, layout: SpanLayout) -> int:
        """Rows `primitive` leaves for a span (host-side; equals the compressed row count)."""
        k = self.pool_kernel
        if self.mode == "weighted":  # all three mixed primitives output the pool count
            return window_count(layout, k, k)
        if primitive == "prune":
            return min(math.ceil(layout.num_rows / self.prune_ratio), layout.num_rows)
        if primitive == "pool":
            return window_count(layout, k, k)
        if primitive == "conv":
            return window_count(layout, *self.conv.stride)
        if primitive == "resampler":
            return self.resampler.queries.shape[0]
        if primitive == "text_only":
            return 0
        raise ValueError(f"Unknown compressor primitive {primitive!r}.")

    # ---------------------------------------------------------------------------------- one span
    def compress_span(
        self, primitive: str, rows: torch.Tensor, layout: SpanLayout, question: torch.Tensor
    ) -> torch.Tensor:
        """Apply one primitive to one span's rows (r, d) -> (m, d), m == expected_count(primitive, layout)."""
        k = self.pool_kernel
        if primitive == "prune":
            keep = self.expected_count("prune", layout)
            if keep > layout.num_rows:  # weighted mode with a clipped span: prune the zero-filled full span
                full, mask = _full_span(rows, layout)
                return prune_rows(full, keep, self.prune_score, question, mask)
            return prune_rows(rows, keep, self.prune_score, question)
        if primitive == "pool":
            return window_compress(rows, layout, k, k)
        if primitive == "conv":
            return self.conv(rows, layout)
        if primitive == "resampler":
            return self.resampler(rows)
        if primitive == "text_only":
            return rows[:0]
        raise ValueError(f"Unknown compressor primitive {primitive!r}.")

    # --------------------------------------------------------------------------------- the batch
    def compress_batch(self, ctx: DraftContext, spans: list[list[VisualSpan]]) -> DraftContext:
        """Replace each visual span's draft rows by its compressed rows; see the module docstring."""
        fused = ctx.fused  # (B, L, d)
        bsz, seq_len, _ = fused.shape
        if len(spans) != bsz:
            raise ValueError(f"compress_batch: got spans for {len(spans)} sequences, batch has {bsz}.")
        lengths = ctx.valid.sum(dim=1).tolist()  # right padding: valid rows are a prefix
        layouts: list[list[SpanLayout]] = []
        visual = torch.zeros(bsz, seq_len, dtype=torch.bool, device=fused.device)
        for b, seq_spans in enumerate(spans):
            lay = sorted(
                (x for x in (span_layout(s, lengths[b]) for s in split_trailing(seq_spans)) if x is not None),
                key=lambda x: x.row_start,
            )
            for prev, nxt in zip(lay, lay[1:]):
                if nxt.row_start < prev.row_end:
                    raise ValueError(
                        f"compress_batch: overlapping visual spans in sequence {b}: {prev}, {nxt}."
                    )
            for x in lay:
                visual[b, x.row_start : x.row_end] = True
            layouts.append(lay)
        visual_tokens = [sum(x.num_rows for x in lay) for lay in layouts]

        # question rows: valid non-visual rows; their mean conditions the gate and the "question" prune score
        text = (ctx.valid & ~visual).to(fused.dtype)  # (B, L)
        question = torch.einsum("bl,bld->bd", text, fused) / text.sum(1, keepdim=True).clamp_min(1.0)

        gate_cost = fused.new_zeros(())
        choice_idx: list[int | None] = [None] * bsz
        hard = weights = None
        if self.gate is not None:
            vis = visual.to(fused.dtype)
            visual_mean = torch.einsum("bl,bld->bd", vis, fused) / vis.sum(1, keepdim=True).clamp_min(1.0)
            logits = self.gate(question, visual_mean).float()  # (B, P)
            probs = logits.softmax(-1)
            if self.mode == "select":
                if self.training:  # hard one-hot forward, soft Gumbel-softmax gradient (straight-through)
                    hard = F.gumbel_softmax(logits, tau=self.gumbel_tau, hard=True)
                    choice_idx = hard.argmax(-1).tolist()
                else:
                    choice_idx = logits.argmax(-1).tolist()
            else:
                weights = probs
            # expected kept fraction: sum_p probs[b, p] * min(1, kept_p / visual_b), over sequences with visual rows
            frac = [
                [min(1.0, sum(self.expected_count(p, x) for x in lay) / max(n, 1)) for p in self.primitives]
                for lay, n in zip(layouts, visual_tokens)
            ]
            has_visual = torch.tensor([n > 0 for n in visual_tokens], device=fused.device)
            if any(visual_tokens):
                expected = (probs * torch.tensor(frac, device=fused.device)).sum(-1)
                gate_cost = (expected[has_visual].mean() * self.cost_weight).to(fused.dtype)

        # per sequence: pieces (text row range [a, b) or compressed rows), positions and row indices
        pieces: list[list[tuple[int, int] | torch.Tensor]] = []
        seq_pos, seq_idx, kept, choices = [], [], [], []
        for b, lay in enumerate(layouts):
            if not lay:
                choices.append(None)
            elif self.mode == "select":
                choices.append(self.primitives[choice_idx[b]])
            elif self.mode in ("weighted", "concat"):
                choices.append(self.mode)
            else:
                choices.append(self.primitives[0])
            seq_pieces, pos, idx, cursor, n_kept = [], [], [], 0, 0
            bounds = [(x.row_start, x) for x in lay] + [(lengths[b], None)]
            for row_start, x in bounds:
                if row_start > cursor:  # text rows before the span (or after the last one), unchanged
                    seq_pieces.append((cursor, row_start))
                    pos.append(ctx.position_ids[b, cursor:row_start])
                    idx.append(ctx.row_index[b, cursor:row_start])
                if x is None:
                    break
                out = self._compress_one(
                    b, fused[b, x.row_start : x.row_end], x, question[b], choice_idx[b], hard, weights
                )
                if (
                    out.shape[0] > x.num_rows
                ):  # never more rows than the span (a resampler's queries on a tiny one)
                    out = fused[b, x.row_start : x.row_end]
                m = out.shape[0]
                if m:
                    # compressed row i -> position of span row floor((i + 0.5) * r / m): inside the span, monotone
                    rel = ((torch.arange(m, device=fused.device) + 0.5) * (x.num_rows / m)).long()
                    rel = rel.clamp_(max=x.num_rows - 1)
                    seq_pieces.append(out)
                    pos.append(ctx.position_ids[b, x.row_start : x.row_end][rel])
                    idx.append(torch.full((m,), -1, dtype=ctx.row_index.dtype, device=fused.device))
                n_kept += m
                cursor = x.row_end
            pieces.append(seq_pieces)
            seq_pos.append(torch.cat(pos) if pos else ctx.position_ids[b, :0])
            seq_idx.append(torch.cat(idx) if idx else ctx.row_index[b, :0])
            kept.append(n_kept)

        new_lengths = [p.shape[0] for p in seq_pos]
        max_len = max(new_lengths)
        out_rows = fused.new_zeros(bsz, max_len, fused.shape[-1])  # one copy of every kept row, right-padded
        for b, seq_pieces in enumerate(pieces):
            at = 0
            for piece in seq_pieces:
                src = fused[b, piece[0] : piece[1]] if isinstance(piece, tuple) else piece
                out_rows[b, at : at + src.shape[0]] = src
                at += src.shape[0]
        valid = (
            torch.arange(max_len, device=fused.device)[None]
            < torch.tensor(new_lengths, device=fused.device)[:, None]
        )
        return DraftContext(
            fused=out_rows,
            position_ids=pad_sequence(seq_pos, batch_first=True, padding_value=0),
            row_index=pad_sequence(seq_idx, batch_first=True, padding_value=-1),
            valid=valid,
            kept_visual_tokens=kept,
            visual_tokens=visual_tokens,
            choices=choices,
            gate_cost=gate_cost,
        )

    def _compress_one(
        self,
        b: int,
        rows: torch.Tensor,
        layout: SpanLayout,
        question: torch.Tensor,
        choice: int | None,
        hard: torch.Tensor | None,
        weights: torch.Tensor | None,
    ) -> torch.Tensor:
        if self.mode == "select":
            out = self.compress_span(self.primitives[choice], rows, layout, question)
            # straight-through: the forward value is 1, the gradient reaches the gate's logits
            return out * hard[b, choice].to(out.dtype) if hard is not None else out
        if self.mode == "weighted":
            outs = [self.compress_span(p, rows, layout, question) for p in self.primitives]
            return sum(w.to(o.dtype) * o for w, o in zip(weights[b], outs))
        if self.mode == "concat":
            # the primitives' outputs in order, as many whole ones as fit in the span's rows: on a small span the
            # concatenation would give the draft more rows than the span has
            outs, total = [], 0
            for primitive in self.primitives:
                out = self.compress_span(primitive, rows, layout, question)
                if total + out.shape[0] > rows.shape[0]:
                    continue
                outs.append(out)
                total += out.shape[0]
            return torch.cat(outs) if outs else rows
        return self.compress_span(self.primitives[0], rows, layout, question)


def build_compressor(config: SpecVLMDraftConfig) -> ElasticVisualCompressor:
    """The compressor for `config.compressor_mode` (not None)."""
    return ElasticVisualCompressor(config)


__all__ = [
    "ElasticVisualCompressor",
    "SpanLayout",
    "build_compressor",
    "conv_stride",
    "span_layout",
    "window_count",
]
