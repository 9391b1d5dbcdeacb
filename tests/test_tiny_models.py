from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from tiny_models import FAMILIES, VIDEO_FAMILIES, make_inputs, make_tiny_target, make_video_inputs

MROPE_FAMILIES = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, make_tiny_target(request.param)


def test_generate_adds_new_tokens(family_model):
    family, model = family_model
    inputs = make_inputs(family, model)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 8)


def test_inputs_vary_with_seed(family_model):
    family, model = family_model
    a = make_inputs(family, model, seed=0)["input_ids"]
    b = make_inputs(family, model, seed=1)["input_ids"]
    assert a.shape == b.shape and not torch.equal(a, b)


def test_same_seed_same_weights():
    a, b = make_tiny_target("llava", seed=3), make_tiny_target("llava", seed=3)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


@torch.no_grad()
def test_last_hidden_state_is_lm_head_input(family_model):
    family, model = family_model
    out = model(**make_inputs(family, model), output_hidden_states=True)
    assert len(out.hidden_states) == model.config.get_text_config().num_hidden_layers + 1
    logits = model.get_output_embeddings()(out.hidden_states[-1])
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)


def _causal_4d(q_len: int, kv_len: int) -> torch.Tensor:
    # 0 = attend, finfo.min = masked; query i sits at absolute position kv_len - q_len + i
    mask = torch.full((q_len, kv_len), torch.finfo(torch.float32).min)
    offset = kv_len - q_len
    mask = mask.triu(offset + 1)
    return mask[None, None]  # (1, 1, q, kv)


def _prefix_kwargs(inputs: dict, split: int) -> dict:
    kwargs = dict(inputs)
    for key in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"):
        if key in kwargs:
            kwargs[key] = kwargs[key][:, :split]
    return kwargs


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@torch.no_grad()
def test_4d_mask_with_cache_matches_causal_forward(family_model, attn_implementation):
    family, model = family_model
    model.set_attn_implementation(attn_implementation)
    try:
        inputs = make_inputs(family, model)
        length = inputs["input_ids"].shape[1]
        k = 3  # continuation length; the last k tokens are plain text
        split = length - k
        ref_inputs = dict(inputs)
        if family == "paligemma":
            # PaliGemma: token_type_ids 0 = bidirectional prefix, 1 = causal suffix (generated tokens)
            ref_inputs["token_type_ids"] = inputs["token_type_ids"].clone()
            ref_inputs["token_type_ids"][:, split:] = 1
        reference = model(**ref_inputs).logits  # (1, L, V)

        cache = DynamicCache(config=model.config)
        model(**_prefix_kwargs(inputs, split), past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == split

        position_ids = torch.arange(split, length)[None]  # (1, k)
        if family == "paligemma":
            position_ids = position_ids + 1  # PaliGemma positions are 1-indexed
        if family in MROPE_FAMILIES:
            # text continuation after images: all three M-RoPE rows are arange + rope_deltas
            position_ids = (position_ids + model.model.rope_deltas).expand(3, 1, k)  # (3, 1, k)
        out = model(
            input_ids=inputs["input_ids"][:, split:],
            attention_mask=_causal_4d(k, length),
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        torch.testing.assert_close(out.logits, reference[:, split:], atol=1e-5, rtol=1e-4)
    finally:
        model.set_attn_implementation("sdpa")


@torch.no_grad()
def test_4d_mask_masks_something(family_model):
    """A non-causal 4-D mask (hide one cached token) must change the logits: the mask is really used."""
    family, model = family_model
    inputs = make_inputs(family, model)
    length = inputs["input_ids"].shape[1]
    k, split = 2, length - 2
    logits = []
    for hide in (False, True):
        cache = DynamicCache(config=model.config)
        model(**_prefix_kwargs(inputs, split), past_key_values=cache, use_cache=True)
        mask = _causal_4d(k, length)
        if hide:
            mask[..., 1] = torch.finfo(torch.float32).min
        position_ids = torch.arange(split, length)[None] + int(family == "paligemma")
        if family in MROPE_FAMILIES:
            position_ids = (position_ids + model.model.rope_deltas).expand(3, 1, k)
        out = model(
            input_ids=inputs["input_ids"][:, split:],
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=cache,
        )
        logits.append(out.logits)
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_generate(family):
    model = make_tiny_target(family)
    inputs = make_video_inputs(family, model)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


@pytest.mark.parametrize("family", sorted(MROPE_FAMILIES))
@torch.no_grad()
def test_mrope_accepts_four_row_position_ids(family):
    """(4, 1, q) position ids: row 0 = 1-D text position (for the mask), rows 1-3 = M-RoPE ids."""
    model = make_tiny_target(family)
    inputs = make_inputs(family, model)
    reference = model(**inputs).logits
    length = inputs["input_ids"].shape[1]
    k, split = 3, length - 3
    cache = DynamicCache(config=model.config)
    model(**_prefix_kwargs(inputs, split), past_key_values=cache)
    text_pos = torch.arange(split, length)[None]  # (1, k)
    mrope = (text_pos + model.model.rope_deltas).expand(3, 1, k)  # (3, 1, k)
    position_ids = torch.cat([text_pos[None], mrope], dim=0)  # (4, 1, k)
    out = model(
        input_ids=inputs["input_ids"][:, split:],
        attention_mask=_causal_4d(k, length),
        position_ids=position_ids,
        past_key_values=cache,
    )
    torch.testing.assert_close(out.logits, reference[:, split:], atol=1e-5, rtol=1e-4)
