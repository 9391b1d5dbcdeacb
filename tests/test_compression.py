from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.draft.compression import (
    ConvCompressor,
    build_compressor,
    conv_stride,
    prune_rows,
    span_layout,
    window_compress,
)
from specvlm_hf.draft.modeling_specvlm import DraftContext

try:
    from specvlm_hf.targets.families import VisualSpan
except ImportError:  # targets.py not there yet: a compatible stand-in

    @dataclass
    class VisualSpan:
        start: int
        length: int
        grid: tuple[int, int, int] | None
        modality: str
        newline_every: int | None = None


HIDDEN = 32
PRIMITIVES = ("prune", "pool", "conv", "resampler", "text_only")
MODES = (*PRIMITIVES, "select", "weighted", "concat")
# Small settings so that every primitive leaves a different, non-trivial count.
SETTINGS = dict(
    compressor_prune_ratio=4.0,
    compressor_pool_kernel=2,
    compressor_conv_ratio=3,
    compressor_resampler_queries=2,
)

# name -> (number of tokens L, spans)
LAYOUTS = {
    "square": (30, [VisualSpan(5, 16, (1, 4, 4), "image")]),
    "qwen_grid_thw": (36, [VisualSpan(3, 24, (1, 4, 6), "image")]),
    "video_frames": (44, [VisualSpan(4, 32, (2, 4, 4), "video")]),
    "several_images": (
        60,
        [VisualSpan(3, 16, (1, 4, 4), "image"), VisualSpan(25, 24, (1, 4, 6), "image")],
    ),
    "newline": (34, [VisualSpan(2, 4 * (5 + 1), (1, 4, 5), "image", newline_every=5)]),
    "newline_no_grid": (34, [VisualSpan(2, 3 * (4 + 1), None, "image", newline_every=4)]),
    "grid_none": (30, [VisualSpan(6, 20, None, "image")]),
    "span_at_row_0": (24, [VisualSpan(0, 16, (1, 4, 4), "image")]),
}


def make_config(mode: str | None, **overrides) -> SpecVLMDraftConfig:
    kwargs = dict(
        hidden_size=HIDDEN,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        compressor_mode=mode,
        **SETTINGS,
    )
    kwargs.update(overrides)
    return SpecVLMDraftConfig(**kwargs)


def expected_count(primitive: str, span: VisualSpan, cfg: SpecVLMDraftConfig) -> int:
    """The documented count formulas, written independently of the implementation."""
    rows = span.length - (1 if span.start == 0 else 0)  # at row 0 the first visual token has no draft row
    k = cfg.compressor_pool_kernel
    grid, newline = span.grid, span.newline_every
    if grid is None and newline:
        grid = (1, span.length // (newline + 1), newline)

    def windows(kh: int, kw: int) -> int:
        if grid is None:
            return math.ceil(span.length / (kh * kw))
        t, h, w = grid
        return t * math.ceil(h / kh) * (math.ceil(w / kw) + (1 if newline else 0))

    if primitive == "prune":
        return math.ceil(rows / cfg.compressor_prune_ratio)
    if primitive == "pool":
        return windows(k, k)
    if primitive == "conv":
        return windows(*conv_stride(cfg.compressor_conv_ratio))
    if primitive == "resampler":
        return cfg.compressor_resampler_queries
    return 0


def make_ctx(lengths: list[int], seq_len: int, seed: int = 0) -> DraftContext:
    g = torch.Generator().manual_seed(seed)
    bsz = len(lengths)
    fused = torch.randn(bsz, seq_len, HIDDEN, generator=g)
    valid = torch.arange(seq_len)[None] < torch.tensor(lengths)[:, None]
    positions = torch.arange(seq_len)[None].expand(bsz, -1)
    row_index = torch.where(valid, positions, torch.full_like(positions, -1))
    return DraftContext(fused, positions, row_index, valid)


def check_context(before: DraftContext, after: DraftContext, spans, counts: list[list[int]]) -> None:
    """Text rows untouched and in place, each span replaced by `counts` rows inside its positions, padding."""
    bsz = before.fused.shape[0]
    assert after.fused.shape[0] == after.position_ids.shape[0] == after.row_index.shape[0] == bsz
    assert after.fused.shape[:2] == after.position_ids.shape == after.row_index.shape == after.valid.shape
    for b in range(bsz):
        n_before = int(before.valid[b].sum())
        visual = torch.zeros(n_before, dtype=torch.bool)
        ranges = []
        for span in spans[b]:
            r0, r1 = max(span.start - 1, 0), min(span.start - 1 + span.length, n_before)
            visual[r0:r1] = True
            ranges.append((r0, r1))
        # expected row_index sequence: text rows keep their index, span k becomes counts[b][k] rows of -1
        expected, blocks, cursor = [], [], 0
        for (r0, r1), m in sorted(zip(ranges, counts[b])):
            expected += list(range(cursor, r0))
            blocks.append((len(expected), m, r0, r1))
            expected += [-1] * m
            cursor = r1
        expected += list(range(cursor, n_before))
        n_after = int(after.valid[b].sum())
        assert n_after == len(expected)
        assert bool(after.valid[b, :n_after].all()) and not bool(after.valid[b, n_after:].any())
        assert after.row_index[b, :n_after].tolist() == expected
        # padding: row_index -1, position 0
        assert (after.row_index[b, n_after:] == -1).all() and (after.position_ids[b, n_after:] == 0).all()
        # text rows: same features, same positions
        text = after.row_index[b, :n_after] >= 0
        src = after.row_index[b, :n_after][text]
        torch.testing.assert_close(after.fused[b, :n_after][text], before.fused[b, src])
        assert torch.equal(after.position_ids[b, :n_after][text], before.position_ids[b, src])
        # compressed rows: positions inside their span's position range, monotone over the whole sequence
        for start, m, r0, r1 in blocks:
            pos = after.position_ids[b, start : start + m]
            assert (pos >= before.position_ids[b, r0]).all() and (pos <= before.position_ids[b, r1 - 1]).all()
        pos = after.position_ids[b, :n_after]
        assert (pos[1:] >= pos[:-1]).all()
        # the prompt still ends at the same position: decoding continues exactly as without compression
        if n_before and not visual[-1]:
            assert after.position_ids[b, n_after - 1] == before.position_ids[b, n_before - 1]
        assert after.visual_tokens[b] == int(visual.sum())
        assert after.kept_visual_tokens[b] == sum(counts[b])


def mode_counts(mode: str, spans, cfg: SpecVLMDraftConfig, choice: str | None) -> list[int]:
    if mode == "select":
        return [expected_count(choice, s, cfg) for s in spans]
    if mode == "weighted":
        return [expected_count("pool", s, cfg) for s in spans]
    if mode == "concat":  # whole outputs in order, as many as fit in the span's rows
        counts = []
        for s in spans:
            rows, total = s.length - (1 if s.start == 0 else 0), 0
            for p in cfg.compressor_primitives:
                n = expected_count(p, s, cfg)
                total += n if total + n <= rows else 0
            counts.append(total if total else rows)
        return counts
    return [expected_count(mode, s, cfg) for s in spans]


# ------------------------------------------------------------------------------------------ counts
def test_count_formulas_spot_values():
    cfg = make_config("pool")
    square = LAYOUTS["square"][1][0]
    assert [expected_count(p, square, cfg) for p in PRIMITIVES] == [4, 4, 8, 2, 0]
    video = LAYOUTS["video_frames"][1][0]
    assert [expected_count(p, video, cfg) for p in PRIMITIVES] == [8, 8, 16, 2, 0]
    newline = LAYOUTS["newline"][1][0]
    assert [expected_count(p, newline, cfg) for p in PRIMITIVES] == [6, 8, 12, 2, 0]
    assert conv_stride(3) == (1, 3) and conv_stride(4) == (2, 2) and conv_stride(6) == (2, 3)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_on_every_layout(mode, layout):
    seq_len, spans = LAYOUTS[layout]
    cfg = make_config(mode)
    compressor = build_compressor(cfg).eval()
    before = make_ctx([seq_len], seq_len)
    with torch.no_grad():
        after = compressor.compress_batch(before, [spans])
    choice = after.choices[0]
    if mode == "select":
        assert choice in cfg.compressor_primitives
    else:
        assert choice == mode
    check_context(before, after, [spans], [mode_counts(mode, spans, cfg, choice)])
    assert after.fused.shape[-1] == HIDDEN
    assert after.gate_cost.shape == ()
    if mode not in ("select", "weighted"):
        assert float(after.gate_cost) == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_batch_of_two_with_padding(mode):
    cfg = make_config(mode)
    compressor = build_compressor(cfg).eval()
    spans = [
        [VisualSpan(2, 24, (1, 4, 6), "image"), VisualSpan(30, 16, None, "image")],
        [VisualSpan(0, 16, (1, 4, 4), "image")],
    ]
    before = make_ctx([52, 21], 56)
    with torch.no_grad():
        after = compressor.compress_batch(before, spans)
    counts = [mode_counts(mode, s, cfg, c) for s, c in zip(spans, after.choices)]
    check_context(before, after, spans, counts)


def test_sequence_without_visual_tokens_is_unchanged():
    compressor = build_compressor(make_config("select")).eval()
    before = make_ctx([20, 12], 20)
    with torch.no_grad():
        after = compressor.compress_batch(before, [[VisualSpan(4, 9, (1, 3, 3), "image")], []])
    assert after.choices[1] is None and after.visual_tokens[1] == 0 and after.kept_visual_tokens[1] == 0
    torch.testing.assert_close(after.fused[1, :12], before.fused[1, :12])
    assert after.row_index[1, :12].tolist() == list(range(12))


# ------------------------------------------------------------------------------------- primitives
def test_untrained_conv_equals_pooling():
    x = torch.randn(24, HIDDEN)
    layout = span_layout(VisualSpan(3, 24, (1, 4, 6), "image"), 40)
    conv = ConvCompressor(HIDDEN, (2, 2))
    torch.testing.assert_close(conv(x, layout), window_compress(x, layout, 2, 2))


def test_pool_is_window_average_with_partial_windows():
    x = torch.randn(
        2 * 3 * 3, HIDDEN
    )  # two 3x3 frames, kernel 2 -> 2x2 windows per frame, partial ones counted
    layout = span_layout(VisualSpan(1, 18, (2, 3, 3), "video"), 30)
    out = window_compress(x, layout, 2, 2).view(2, 2, 2, HIDDEN)
    grid = x.view(2, 3, 3, HIDDEN)
    torch.testing.assert_close(out[1, 0, 0], grid[1, :2, :2].mean((0, 1)))
    torch.testing.assert_close(out[0, 1, 1], grid[0, 2, 2])  # the corner window holds one token
    torch.testing.assert_close(out[0, 0, 1], grid[0, :2, 2].mean(0))


def test_pool_newline_layout_keeps_one_newline_per_output_row():
    w = 5
    x = torch.randn(4 * (w + 1), HIDDEN)
    layout = span_layout(VisualSpan(2, 24, (1, 4, w), "image", newline_every=w), 40)
    out = window_compress(x, layout, 2, 2).view(2, 4, HIDDEN)  # 2 output rows of 3 pooled + 1 newline
    grid = x.view(4, w + 1, HIDDEN)
    torch.testing.assert_close(out[0, 0], grid[:2, :2].mean((0, 1)))
    torch.testing.assert_close(out[0, 3], grid[:2, w].mean(0))
    torch.testing.assert_close(out[1, 2], grid[2:, 4].mean(0))


def test_span_at_row_0_ignores_the_missing_first_token():
    # PaliGemma: tokens [0, 16) -> rows [0, 15); the first pooled window averages its 3 real rows only
    layout = span_layout(VisualSpan(0, 16, (1, 4, 4), "image"), 30)
    assert (layout.row_start, layout.row_end, layout.offset) == (0, 15, 1)
    rows = torch.randn(15, HIDDEN)
    out = window_compress(rows, layout, 2, 2)
    full = torch.cat([torch.zeros(1, HIDDEN), rows]).view(4, 4, HIDDEN)
    torch.testing.assert_close(out[0], (full[0, 1] + full[1, 0] + full[1, 1]) / 3)
    torch.testing.assert_close(out[3], full[2:, 2:].mean((0, 1)))


def test_prune_keeps_top_scores_in_order():
    x = torch.randn(10, HIDDEN)
    scale = torch.tensor([1, 9, 1, 1, 7, 1, 1, 8, 1, 1.0])[:, None]
    x = x / x.norm(dim=-1, keepdim=True) * scale
    torch.testing.assert_close(prune_rows(x, 3, "norm"), x[[1, 4, 7]])
    question = x[4] * 2
    assert torch.equal(prune_rows(x, 1, "question", question), x[[4]])


def test_resampler_output_shape_and_gradient():
    cfg = make_config("resampler", compressor_resampler_queries=3)
    compressor = build_compressor(cfg)
    rows = torch.randn(20, HIDDEN, requires_grad=True)
    out = compressor.resampler(rows)
    assert out.shape == (3, HIDDEN)
    out.sum().backward()
    assert rows.grad is not None and compressor.resampler.queries.grad is not None


def test_resampler_is_standard_cross_attention():
    """The folded key projection equals plain multi-head cross-attention with K = W_k LN(x), V = x."""
    resampler = build_compressor(make_config("resampler", compressor_resampler_queries=3)).resampler
    with torch.no_grad():
        resampler.queries.normal_()  # non-uniform attention
        rows = torch.randn(11, HIDDEN)
        nh, hd = resampler.num_heads, HIDDEN // resampler.num_heads
        q = resampler.queries.view(3, nh, hd).transpose(0, 1)
        k = resampler.k_proj(resampler.key_norm(rows)).view(11, nh, hd).transpose(0, 1)
        v = rows.view(11, nh, hd).transpose(0, 1)
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(3, HIDDEN)
        reference = attn + resampler.mlp(resampler.mlp_norm(attn))
        torch.testing.assert_close(resampler(rows), reference, atol=1e-5, rtol=1e-5)


def test_untrained_resampler_starts_near_the_span_mean():
    resampler = build_compressor(make_config("resampler")).resampler
    rows = torch.randn(16, HIDDEN)
    with torch.no_grad():
        out = resampler(rows)
    assert (out - rows.mean(0)).abs().max() < 0.1


# ------------------------------------------------------------------------------------------- gate
def test_gate_is_deterministic_in_eval():
    compressor = build_compressor(make_config("select")).eval()
    seq_len, spans = LAYOUTS["several_images"]
    ctx = make_ctx([seq_len], seq_len, seed=1)
    with torch.no_grad():
        a = compressor.compress_batch(ctx, [spans])
        b = compressor.compress_batch(ctx, [spans])
    assert a.choices == b.choices
    torch.testing.assert_close(a.fused, b.fused)


def test_gate_is_stochastic_in_training():
    torch.manual_seed(0)
    compressor = build_compressor(make_config("select")).train()
    seq_len, spans = LAYOUTS["square"]
    ctx = make_ctx([seq_len], seq_len, seed=2)
    with torch.no_grad():
        choices = {compressor.compress_batch(ctx, [spans]).choices[0] for _ in range(15)}
    assert len(choices) > 1


def test_select_training_gradient_reaches_gate():
    torch.manual_seed(0)
    cfg = make_config("select", compressor_primitives=["prune", "pool", "conv", "resampler"])
    compressor = build_compressor(cfg).train()
    seq_len, spans = LAYOUTS["qwen_grid_thw"]
    ctx = make_ctx([seq_len, seq_len], seq_len, seed=3)
    ctx.fused.requires_grad_(True)
    out = compressor.compress_batch(ctx, [spans, spans])
    # a loss on the compressed rows only (gate_cost excluded): the gradient comes through the straight-through weight
    loss = (out.fused * out.valid[..., None]).pow(2).sum()
    loss.backward()
    grad = compressor.gate.out.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert ctx.fused.grad is not None


def test_weighted_training_gradient_reaches_gate():
    compressor = build_compressor(make_config("weighted")).train()
    seq_len, spans = LAYOUTS["video_frames"]
    out = compressor.compress_batch(make_ctx([seq_len], seq_len, seed=4), [spans])
    out.fused.pow(2).sum().backward()
    assert compressor.gate.out.weight.grad.abs().sum() > 0
    assert compressor.conv.depthwise.grad is not None


@pytest.mark.parametrize("mode", ["select", "weighted"])
@pytest.mark.parametrize("training", [False, True])
def test_gate_cost_in_range(mode, training):
    weight = 0.5
    compressor = build_compressor(make_config(mode, compressor_cost_weight=weight)).train(training)
    seq_len, spans = LAYOUTS["several_images"]
    out = compressor.compress_batch(make_ctx([seq_len, 10], seq_len), [spans, []])
    assert out.gate_cost.shape == ()
    assert 0.0 <= float(out.gate_cost.detach()) <= weight
    if training:
        out.gate_cost.backward()
        assert compressor.gate.out.weight.grad is not None


def test_overlapping_spans_are_rejected():
    compressor = build_compressor(make_config("pool"))
    spans = [[VisualSpan(2, 10, None, "image"), VisualSpan(8, 10, None, "image")]]
    with pytest.raises(ValueError, match="overlapping"):
        compressor.compress_batch(make_ctx([30], 30), spans)


# ------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize(
    "mode, with_next", [(mode, True) for mode in MODES] + [("pool", False), ("select", False)]
)
def test_prepare_context_end_to_end(mode, with_next):
    cfg = make_config(mode)
    draft = SpecVLMDraftModel(cfg).eval()
    assert draft.compressor is not None
    if draft.compressor.conv is not None:  # post_init() keeps the averaging initialisation
        sh, sw = draft.compressor.conv.stride
        assert torch.equal(
            draft.compressor.conv.depthwise, torch.full_like(draft.compressor.conv.depthwise, 1 / (sh * sw))
        )
        assert torch.equal(draft.compressor.conv.pointwise, torch.eye(HIDDEN))
    g = torch.Generator().manual_seed(5)
    bsz, seq_len = 2, 48
    input_ids = torch.randint(0, 100, (bsz, seq_len), generator=g)
    inputs_embeds = torch.randn(bsz, seq_len, HIDDEN, generator=g)
    features = torch.randn(bsz, seq_len, HIDDEN, generator=g)
    next_embeds = torch.randn(bsz, 1, HIDDEN, generator=g) if with_next else None
    valid = torch.ones(bsz, seq_len, dtype=torch.bool)
    valid[1, 40:] = False
    spans = [
        [VisualSpan(3, 16, (1, 4, 4), "image"), VisualSpan(22, 20, None, "image")],
        [VisualSpan(0, 4 * 6, (1, 4, 5), "image", newline_every=5), VisualSpan(28, 8, (2, 2, 2), "video")],
    ]
    with torch.no_grad():
        plain = SpecVLMDraftModel.prepare_context(
            draft, input_ids, inputs_embeds, features, next_embeds, None, valid
        )
        after = draft.prepare_context(input_ids, inputs_embeds, features, next_embeds, spans, valid)
        # the draft decoder runs on the compressed rows
        hidden = draft(fused_inputs=after.fused, position_ids=after.position_ids).last_hidden_state
    assert hidden.shape == after.fused.shape
    counts = [mode_counts(mode, s, cfg, c) for s, c in zip(spans, after.choices)]
    check_context(plain, after, spans, counts)


def test_position_rule_is_documented():
    import specvlm_hf.draft.compression as compression

    doc = " ".join(compression.__doc__.split())
    assert (
        "compressed tokens occupy the image span of the draft's sequence; text positions and the "
        "positions after the prompt are unaffected" in doc
    )


def test_compressor_weights_survive_save_and_load(tmp_path):
    draft = SpecVLMDraftModel(make_config("concat"))
    with torch.no_grad():
        draft.compressor.conv.depthwise.add_(1.0)
        draft.compressor.resampler.queries.add_(1.0)
    draft.save_pretrained(tmp_path)
    loaded = SpecVLMDraftModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(draft.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
