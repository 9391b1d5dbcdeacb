from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

from specvlm_hf.targets import families as targets
from tiny_models import (
    BOS_ID,
    FAMILIES,
    IMAGE_ID,
    VIDEO_FAMILIES,
    VIDEO_ID,
    make_inputs,
    make_tiny_target,
    make_video_inputs,
)

EXPECTED_FAMILY = {"llama": "causal_lm", "qwen2": "causal_lm"}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, make_tiny_target(request.param)


def _check_spans(spans, input_ids, placeholder_ids):
    """Spans are sorted, disjoint, cover every placeholder, and grids multiply out to lengths."""
    ids = input_ids[0]
    is_placeholder = torch.isin(ids, torch.tensor(placeholder_ids or [-1]))
    covered = torch.zeros_like(is_placeholder)
    for prev, span in zip(spans, spans[1:]):
        assert prev.start + prev.length <= span.start
    for span in spans:
        assert span.modality in ("image", "video")
        assert span.length > 0 and 0 <= span.start and span.start + span.length <= ids.numel()
        covered[span.start : span.start + span.length] = True
        assert is_placeholder[span.start]
        if span.grid is not None:
            t, h, w = span.grid
            newlines = t * h if span.newline_every else 0
            assert span.length == t * h * w + newlines + span.trailing
            if span.newline_every:
                assert span.newline_every == w
    assert torch.equal(covered & is_placeholder, is_placeholder)  # every placeholder is in a span
    return int(covered.sum())


def test_every_family_resolves(family_model):
    family, model = family_model
    spec = targets.get_target_spec(model)
    assert spec.family == EXPECTED_FAMILY.get(family, family)
    assert spec.family in targets.SUPPORTED_FAMILIES
    assert model.config.model_type in spec.model_types
    assert spec.has_vision == (spec.family != "causal_lm")
    assert spec.position_scheme == ("mrope" if family.startswith("qwen") and family != "qwen2" else "1d")


def test_sizes_and_parts(family_model):
    family, model = family_model
    text = model.config.get_text_config()
    assert targets.text_config(model) is text
    assert targets.target_hidden_size(model) == text.hidden_size == 32
    assert targets.target_vocab_size(model) == model.get_output_embeddings().weight.shape[0]
    assert targets.target_num_layers(model) == text.num_hidden_layers
    dims = targets.target_head_dims(model)
    assert dims["num_attention_heads"] * dims["head_dim"] >= 16
    assert text.num_attention_heads % dims["num_key_value_heads"] == 0
    assert dims["rope_theta"] > 0 and dims["rms_norm_eps"] > 0 and dims["intermediate_size"] == 64
    assert targets.output_embeddings(model) is model.get_output_embeddings()
    assert targets.input_embeddings(model) is model.get_input_embeddings()
    ids = targets.image_token_ids(model)
    if family in ("llama", "qwen2"):
        assert ids == []
    else:
        assert ids[0] == IMAGE_ID
        assert set(ids) <= {IMAGE_ID, VIDEO_ID}


def test_scaled_embedding_flag_matches_module(family_model):
    family, model = family_model
    spec = targets.get_target_spec(model)
    embed = targets.input_embeddings(model)
    ids = torch.tensor([[5, 6, 7]])
    raw = embed.weight[ids]
    scale = math.sqrt(targets.target_hidden_size(model)) if spec.scaled_embedding else 1.0
    torch.testing.assert_close(embed(ids), raw * scale)


@torch.no_grad()
def test_decoder_receives_inputs_embeds(family_model):
    family, model = family_model
    inputs = make_inputs(family, model)
    seen = []

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:  # plain *ForCausalLM passes input_ids to its decoder
            embeds = targets.input_embeddings(model)(kwargs["input_ids"])
        seen.append(embeds)

    handle = targets.decoder(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0] is not None
    assert seen[0].shape == (1, inputs["input_ids"].shape[1], targets.target_hidden_size(model))


def test_visual_spans_cover_placeholders(family_model):
    family, model = family_model
    inputs = make_inputs(family, model)
    spans = targets.visual_spans(model, inputs["input_ids"], inputs)
    placeholders = targets.image_token_ids(model)
    n_placeholders = int(torch.isin(inputs["input_ids"], torch.tensor(placeholders or [-1])).sum())
    if family in ("llama", "qwen2"):
        assert spans == []
        return
    assert spans and all(s.grid is not None for s in spans)
    covered = _check_spans(spans, inputs["input_ids"], placeholders)
    if family == "mistral3":  # the [IMG_BREAK]/[IMG_END] positions are inside the span, not placeholders
        assert covered == n_placeholders + sum(s.grid[1] for s in spans)
    else:
        assert covered == n_placeholders
    assert targets.visual_spans(model, inputs["input_ids"][0], inputs) == spans  # 1-D input_ids too


def test_visual_spans_text_only_prompt(family_model):
    family, model = family_model
    assert targets.visual_spans(model, torch.tensor([[BOS_ID, 5, 6, 7]]), {}) == []


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_visual_spans_video(family):
    model = make_tiny_target(family)
    inputs = make_video_inputs(family, model)
    spans = targets.visual_spans(model, inputs["input_ids"], inputs)
    assert [s.modality for s in spans] == ["video"]
    covered = _check_spans(spans, inputs["input_ids"], targets.image_token_ids(model))
    assert covered == int((inputs["input_ids"] == VIDEO_ID).sum())
    assert spans[0].grid[0] == 2


def test_visual_spans_qwen3_video_one_span_per_temporal_patch():
    model = make_tiny_target("qwen3_vl")
    # two temporal patches of 2x2 merged tokens, separated by timestamp text, as the processor writes
    frame = [302, VIDEO_ID, VIDEO_ID, VIDEO_ID, VIDEO_ID, 303]
    ids = torch.tensor([[BOS_ID, 10, 11, *frame, 12, 13, *frame, 14]])
    spans = targets.visual_spans(model, ids, {"video_grid_thw": torch.tensor([[2, 4, 4]])})
    assert [(s.start, s.length, s.grid, s.modality) for s in spans] == [
        (4, 4, (1, 2, 2), "video"),
        (12, 4, (1, 2, 2), "video"),
    ]


def test_visual_spans_two_images_and_fallback():
    model = make_tiny_target("llava")
    image = [IMAGE_ID] * 16
    ids = torch.tensor([[BOS_ID, 10, *image, 11, *image, *image, 12]])
    spans = targets.visual_spans(model, ids, {})
    assert [(s.start, s.length, s.grid) for s in spans] == [
        (2, 16, (1, 4, 4)),
        (19, 16, (1, 4, 4)),
        (35, 16, (1, 4, 4)),
    ]
    # a run that does not fit the layout falls back to one grid-less span per run
    ids = torch.tensor([[BOS_ID, *image[:10], 12]])
    assert [(s.start, s.length, s.grid) for s in targets.visual_spans(model, ids, {})] == [(1, 10, None)]
    # LLaVA-NeXT without image_sizes: layout unknown, placeholders still covered
    model = make_tiny_target("llava_next")
    inputs = make_inputs("llava_next", model)
    spans = targets.visual_spans(model, inputs["input_ids"], {})
    assert len(spans) == 1 and spans[0].grid is None
    assert spans[0].length == int((inputs["input_ids"] == IMAGE_ID).sum())


@pytest.mark.parametrize(
    "model",
    [
        GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)),
        BertModel(
            BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        ),
    ],
    ids=["gpt2", "bert"],
)
def test_unsupported_model_lists_families(model):
    with pytest.raises(ValueError) as err:
        targets.get_target_spec(model)
    message = str(err.value)
    assert type(model).__name__ in message and repr(model.config.model_type) in message
    for family in targets.SUPPORTED_FAMILIES:
        assert family in message


def test_peft_model_resolves_to_base():
    from peft import LoraConfig, get_peft_model

    base = make_tiny_target("llama")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert targets.unwrap_target(peft_model) is base
    assert targets.get_target_spec(peft_model).family == "causal_lm"
    assert targets.target_vocab_size(peft_model) == targets.target_vocab_size(base)
    assert targets.decoder(peft_model) is base.get_decoder()
    assert targets.unwrap_target(base) is base


def test_hybrid_recurrent_target_is_refused_with_the_reason():
    from transformers import AutoModelForCausalLM, Qwen3NextConfig

    config = Qwen3NextConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        head_dim=16,
        linear_num_value_heads=2,
        linear_num_key_heads=1,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_experts=2,
        num_experts_per_tok=1,
        layer_types=["linear_attention", "full_attention"],
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="recurrent layers \\(linear_attention\\)"):
        targets.get_target_spec(model)
