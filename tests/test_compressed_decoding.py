"""Elastic visual compressor x speculative decoding: lossless greedy output for every compressor mode, the
visual-token statistics against the compressor formulas, and exact acceptance with a compressing forced draft
(compression is draft-side only: the target always sees every visual token)."""

from __future__ import annotations

import math

import pytest
import torch

from forced_draft import expected_accepted_lengths, make_forced_draft
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.draft.compression import split_trailing
from specvlm_hf.targets import families as targets
from tiny_models import IMAGE_ID, VIDEO_ID, make_inputs, make_tiny_target, make_video_inputs

ALL_MODES = ["prune", "pool", "conv", "resampler", "text_only", "select", "weighted", "concat"]
FIXED = ["prune", "pool", "conv", "resampler", "text_only"]
CASES = [(family, mode) for family in ("llava", "qwen2_vl") for mode in ALL_MODES] + [
    (family, mode)
    for family in ("llava_next", "idefics3", "paligemma", "mistral3", "gemma3")
    for mode in ("select", "pool")
]
N_NEW = 8
# transformers 5.24's generate() pops every get_image_features argument (image_sizes, pixel_values_videos)
# before the decoding loop runs; generation.py keeps them for the draft (test_visual_layout_reaches_the_compressor).

# Tiny LLaVA: one 4x4 grid of 16 image tokens after the text head (default compressor settings:
# prune ratio 16, pool kernel 4, conv ratio 3 -> stride (1, 3), 2 resampler queries).
LLAVA_EXPECTED = {
    "prune": 1,  # ceil(16 / 16)
    "pool": 1,  # ceil(4/4) * ceil(4/4)
    "conv": 8,  # ceil(4/1) * ceil(4/3)
    "resampler": 2,
    "text_only": 0,
    "weighted": 1,  # every mixed primitive at the pool count
    "concat": 1 + 1 + 8 + 2 + 0,
}


@pytest.fixture(scope="module")
def world():
    """family -> (target, inputs, plain greedy reference), built on first use."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            model = make_tiny_target(family)
            inputs = make_inputs(family, model, seed=5)
            reference = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False)
            cache[family] = (model, inputs, reference)
        return cache[family]

    return get


# ------------------------------------------------------------------- counts from the documented formulas
def _conv_stride(ratio: int) -> tuple[int, int]:
    sh = 1
    for d in range(1, ratio + 1):
        if ratio % d == 0 and d * d <= ratio:
            sh = d
    return sh, ratio // sh


def _window_rows(span, kh: int, kw: int) -> int:
    if span.grid is None:
        return math.ceil(span.length / (kh * kw))
    t, h, w = span.grid
    return t * math.ceil(h / kh) * (math.ceil(w / kw) + (1 if span.newline_every else 0))


def _primitive_rows(primitive: str, span, config) -> int:
    rows = span.length - 1 if span.start == 0 else span.length  # the first token has no draft row
    k = config.compressor_pool_kernel
    if primitive == "prune":
        return min(math.ceil(rows / config.compressor_prune_ratio), rows)
    if primitive == "pool":
        return _window_rows(span, k, k)
    if primitive == "conv":
        return _window_rows(span, *_conv_stride(config.compressor_conv_ratio))
    if primitive == "resampler":
        return config.compressor_resampler_queries
    if primitive == "text_only":
        return 0
    raise AssertionError(primitive)


def expected_draft_visual_tokens(spans, config, choice: str) -> int:
    spans = split_trailing(spans)  # a OneVision video's trailing newline row is a 1-D span of its own
    if choice == "weighted":
        return sum(_primitive_rows("pool", s, config) for s in spans)
    if choice == "concat":
        return sum(_primitive_rows(p, s, config) for s in spans for p in config.compressor_primitives)
    return sum(_primitive_rows(choice, s, config) for s in spans)


def _placeholders(inputs) -> int:
    return int(torch.isin(inputs["input_ids"], torch.tensor([IMAGE_ID, VIDEO_ID])).sum())


def _check_stats(stats, family, mode, model, inputs, config):
    if mode == "select":
        assert stats.compressor_choice in config.compressor_primitives
    else:
        assert stats.compressor_choice == mode
    if stats.compressor_choice == "text_only":
        assert stats.draft_visual_tokens == 0
    elif stats.compressor_choice != "concat":
        assert 0 < stats.draft_visual_tokens < stats.visual_tokens
    _check_exact_counts(stats, family, model, inputs, config)


def _check_exact_counts(stats, family, model, inputs, config):
    spans = targets.visual_spans(model, inputs["input_ids"], inputs)
    assert spans, family
    assert stats.visual_tokens == sum(s.length for s in spans)
    if family == "mistral3":
        # the spans also carry the [IMG_BREAK]/[IMG_END] token closing each row (compressed with the grid)
        rows = spans[0].grid[1]
        assert stats.visual_tokens == _placeholders(inputs) + rows
    else:
        assert stats.visual_tokens == _placeholders(inputs)
    expected = expected_draft_visual_tokens(spans, config, stats.compressor_choice)
    assert stats.draft_visual_tokens == expected
    if family == "llava":
        assert stats.draft_visual_tokens == LLAVA_EXPECTED[stats.compressor_choice]


@pytest.mark.parametrize("family,mode", CASES)
def test_compressing_random_draft_is_lossless(family, mode, world):
    model, inputs, reference = world(family)
    config = SpecVLMDraftConfig.from_target(model, compressor_mode=mode)
    torch.manual_seed(0)
    draft = SpecVLMDraftModel(config).bind(model).eval()
    assert draft.compressor is not None
    choices = []
    for decoding_mode in ("tree", "chain"):
        out = model.generate(
            **inputs,
            max_new_tokens=N_NEW,
            do_sample=False,
            assistant_model=draft,
            decoding_mode=decoding_mode,
        )
        assert torch.equal(out, reference), f"{family}/{mode}/{decoding_mode}"
        stats = draft.last_generation_stats
        assert stats.decoding_mode == decoding_mode
        assert stats.new_tokens == N_NEW
        _check_stats(stats, family, mode, model, inputs, config)
        choices.append(stats.compressor_choice)
    assert choices[0] == choices[1]  # same input, same choice in both decoding modes
    if mode == "select":  # deterministic at inference: an identical second call makes the same choice
        out = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, assistant_model=draft)
        assert torch.equal(out, reference)
        assert draft.last_generation_stats.compressor_choice == choices[0]


FIXED_SETTINGS = dict(
    compressor_prune_ratio=5.0,
    compressor_pool_kernel=3,
    compressor_conv_ratio=6,
    compressor_resampler_queries=3,
)
# 4x4 llava grid with the settings above: prune ceil(16/5); pool ceil(4/3)^2; conv stride (2, 3): 2 * 2
LLAVA_EXPECTED_NONDEFAULT = {"prune": 4, "pool": 4, "conv": 4, "resampler": 3}


@pytest.mark.parametrize("primitive", sorted(LLAVA_EXPECTED_NONDEFAULT))
def test_fixed_primitive_counts_with_non_default_settings(primitive, world):
    model, inputs, reference = world("llava")
    config = SpecVLMDraftConfig.from_target(model, compressor_mode=primitive, **FIXED_SETTINGS)
    draft = SpecVLMDraftModel(config).bind(model).eval()
    out = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, assistant_model=draft)
    assert torch.equal(out, reference)
    stats = draft.last_generation_stats
    assert stats.visual_tokens == 16
    assert stats.compressor_choice == primitive
    assert stats.draft_visual_tokens == LLAVA_EXPECTED_NONDEFAULT[primitive]


def test_select_among_a_subset_reports_a_configured_primitive(world):
    model, inputs, reference = world("llava")
    config = SpecVLMDraftConfig.from_target(
        model, compressor_mode="select", compressor_primitives=["conv", "pool"]
    )
    draft = SpecVLMDraftModel(config).bind(model).eval()
    choices = set()
    for _ in range(2):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, assistant_model=draft)
        assert torch.equal(out, reference[:, : out.shape[1]])
        choices.add(draft.last_generation_stats.compressor_choice)
    assert len(choices) == 1 and choices <= {"conv", "pool"}
    assert draft.last_generation_stats.draft_visual_tokens == LLAVA_EXPECTED[choices.pop()]


# ------------------------------------------------------------------- forced draft with a compressor
@pytest.mark.parametrize("decoding_mode", ["tree", "chain"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "mistral3", "paligemma"])
def test_forced_draft_with_compressor_accepts_exactly(family, decoding_mode, world):
    model, _, _ = world(family)
    n = 20
    inputs = make_inputs(family, model, seed=3)
    reference = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    wrong = {prompt_len + 4, prompt_len + 11}
    lookahead = 4
    settings = dict(tree_depth=lookahead, tree_top_k=3, tree_total_tokens=10, num_draft_tokens=lookahead)
    draft = make_forced_draft(model, reference[0], wrong, compressor_mode="pool")
    assert draft.compressor is not None
    out = model.generate(
        **inputs,
        max_new_tokens=n,
        do_sample=False,
        assistant_model=draft,
        decoding_mode=decoding_mode,
        **settings,
    )
    assert torch.equal(out, reference)
    stats = draft.last_generation_stats
    assert stats.accepted_lengths == expected_accepted_lengths(prompt_len, n, wrong, lookahead)
    assert stats.compressor_choice == "pool"
    assert 0 < stats.draft_visual_tokens < stats.visual_tokens


LAYOUT_CASES = [("llava_next", "image"), ("llava_onevision", "image"), ("mistral3", "image")]
LAYOUT_CASES += [("llava_onevision", "video"), ("qwen2_vl", "video")]


@pytest.mark.parametrize("decoding_mode", ["tree", "chain"])
@pytest.mark.parametrize("family,modality", LAYOUT_CASES)
def test_visual_layout_reaches_the_compressor(family, modality, decoding_mode, request):
    model = make_tiny_target(family)
    make = make_inputs if modality == "image" else make_video_inputs
    inputs = make(family, model, seed=2)
    reference = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    config = SpecVLMDraftConfig.from_target(model, compressor_mode="pool", compressor_pool_kernel=2)
    draft = SpecVLMDraftModel(config).bind(model).eval()
    out = model.generate(
        **inputs, max_new_tokens=3, do_sample=False, assistant_model=draft, decoding_mode=decoding_mode
    )
    assert torch.equal(out, reference)  # lossless either way
    _check_exact_counts(draft.last_generation_stats, family, model, inputs, config)
