"""Tiny random targets of every supported family, with matching ``generate()`` inputs.

Test-support module (not a test file): ``make_tiny_target(family)`` builds a float32, eval-mode model
from a config (random weights, no Hub access) and ``make_inputs(family, model)`` builds a batch-1
prompt with the right number of visual placeholder tokens. Every model uses the same small
vocabulary layout (``VOCAB_SIZE`` rows): ids 0/1/2 are pad/bos/eos, random text is drawn from
``[TEXT_LOW, TEXT_HIGH)`` and the special multimodal ids live above ``TEXT_HIGH``.

Per-family facts measured with transformers 5.24 on these tiny models (``tests/test_tiny_models.py``
re-checks all of them):

* 4-D masks: every family accepts a float32 additive mask of shape (1, 1, q_len, kv_len)
  (0 = attend, ``torch.finfo(float32).min`` = masked) together with explicit ``position_ids`` and a
  prefilled ``DynamicCache``, under both "eager" and "sdpa"; the models here use "sdpa" (except the
  vision tower of Pixtral/Mistral3, which is built with the same setting and works). A plain causal
  4-D mask reproduces the logits of the normal causal forward (atol 1e-5).
* transformers 5.24 renamed the forward's cache argument: ``past_key_values=`` still works but emits a
  FutureWarning on the VLM classes (removal planned for 5.40); ``cache=`` works silently. The tests
  keep ``past_key_values=`` because it also works on 5.23.
* Position ids: 1-D families take ``position_ids`` of shape (1, q) (PaliGemma: 1-indexed, below). The Qwen VL families use M-RoPE:
  pass (3, 1, q) (temporal, height, width); for text continuation all three rows are equal to
  ``cache_len + arange(q) + rope_deltas`` where ``rope_deltas = model.model.rope_deltas`` (set by the
  prefill; it is negative when the prompt has images, because a whole image only advances the
  position by max(h, w)). A (4, 1, q) tensor is also accepted: row 0 is then the 1-D "text position"
  used to build the causal mask, rows 1-3 the M-RoPE ids. Qwen3-VL is the same as Qwen2-VL here
  (3 rows, interleaved sections handled inside the rotary module).
* ``mm_token_type_ids`` (0 text, 1 image, 2 video) is required by the Qwen VL families' prefill
  whenever ``image_grid_thw``/``video_grid_thw`` is passed (transformers 5.23+ raises otherwise).
* Gemma3: ``token_type_ids`` (1 on image tokens, 0 elsewhere) makes each image block bidirectional
  in the prefill mask; generate() works with or without it; we pass it, as the processor does.
* PaliGemma: ``token_type_ids`` means something else: 0 = prefix (image + prompt), 1 = suffix. The
  processor returns all zeros for a prompt, so the WHOLE prompt prefill is bidirectional; generate()
  then appends 1s (causal suffix). A continuation after the prefill is causal, so a reference full
  forward must mark the continuation tokens with token_type_ids 1 to be comparable. Without
  token_type_ids the forward is bidirectional too (same logits as all zeros). With a custom 4-D
  mask, token_type_ids is ignored. PaliGemma position ids are 1-indexed: pass
  ``cache_len + arange(q) + 1`` (the model adds the 1 itself only when it builds them).
* ``outputs.hidden_states[-1]`` is the input of ``lm_head`` (after the final norm) for every family
  here: transformers 5 replaces the last collected hidden state with the normed output.
  (Measured: ``lm_head(hidden_states[-1]) == logits`` for all families, with Gemma3's
  ``final_logit_softcapping`` left at None.)
* Gemma3: the embedding module (``Gemma3TextScaledWordEmbedding``) multiplies by sqrt(hidden) itself.
  PaliGemma's Gemma backbone scales inside the decoder forward instead (``normalizer``), so
  ``get_input_embeddings()(ids)`` is *not* scaled there.
* Mistral3: the processor inserts [IMG_BREAK] after each row of [IMG] tokens and [IMG_END] after the
  last row; the model only replaces [IMG] ids. The break/end ids are not in the model config (they
  come from the tokenizer); we use ``MISTRAL3_IMG_BREAK_ID`` / ``MISTRAL3_IMG_END_ID``.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3TextConfig,
    GemmaConfig,
    Idefics3Config,
    InternVLConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaNextConfig,
    LlavaOnevisionConfig,
    Mistral3Config,
    MistralConfig,
    PaliGemmaConfig,
    PixtralVisionConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen3VLConfig,
    SiglipVisionConfig,
    SmolVLMConfig,
)

FAMILIES: list[str] = [
    "llama",
    "qwen2",
    "llava",
    "llava_next",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "gemma3",
    "idefics3",
    "smolvlm",
    "paligemma",
    "internvl",
    "mistral3",
]
VIDEO_FAMILIES: list[str] = ["qwen2_vl", "llava_onevision"]

VOCAB_SIZE = 320
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TEXT_LOW, TEXT_HIGH = 3, 290  # random text ids are drawn from [TEXT_LOW, TEXT_HIGH)
IMAGE_ID = 300
VIDEO_ID = 301
BOI_ID = 302  # Gemma3 begin-of-image; Qwen vision_start
EOI_ID = 303  # Gemma3 end-of-image; Qwen vision_end
MISTRAL3_IMG_BREAK_ID = 306
MISTRAL3_IMG_END_ID = 307
FAKE_AROUND_ID = 308  # Idefics3/SmolVLM <fake_token_around_image>
INTERNVL_IMG_START_ID, INTERNVL_IMG_END_ID = 309, 310

HIDDEN = 32
ATTN = "sdpa"


def _text_kwargs(**overrides) -> dict:
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return kwargs


def _vit_kwargs(**overrides) -> dict:
    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    kwargs.update(overrides)
    return kwargs


def _config(family: str):
    if family == "llama":
        return LlamaConfig(**_text_kwargs())
    if family == "qwen2":
        return Qwen2Config(**_text_kwargs())
    if family == "llava":
        # 32 / 8 = 4 -> 16 image tokens ("default" strategy drops CLIP's CLS token)
        return LlavaConfig(
            vision_config=CLIPVisionConfig(**_vit_kwargs(image_size=32, patch_size=8, projection_dim=32)),
            text_config=LlamaConfig(**_text_kwargs()),
            image_token_index=IMAGE_ID,
            image_seq_length=16,
            pad_token_id=PAD_ID,
        )
    if family == "llava_next":
        return LlavaNextConfig(
            vision_config=CLIPVisionConfig(**_vit_kwargs(image_size=32, patch_size=8, projection_dim=32)),
            text_config=LlamaConfig(**_text_kwargs()),
            image_token_index=IMAGE_ID,
            image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
            image_seq_length=16,
            pad_token_id=PAD_ID,
        )
    if family == "llava_onevision":
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(**_vit_kwargs(image_size=32, patch_size=8)),
            text_config=Qwen2Config(**_text_kwargs()),
            image_token_index=IMAGE_ID,
            video_token_index=VIDEO_ID,
            image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
            vision_aspect_ratio="anyres_max_1",  # small max so the tiny any-res grid gets downscaled too
            pad_token_id=PAD_ID,
        )
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}  # head_dim 8
        text = _text_kwargs(rope_parameters=rope)
        ids = dict(
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            vision_start_token_id=BOI_ID,
            vision_end_token_id=EOI_ID,
        )
        if family == "qwen2_vl":
            vision = dict(depth=1, embed_dim=32, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2, patch_size=4)
            return Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
        if family == "qwen2_5_vl":
            vision = dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=HIDDEN,
                patch_size=4,
                window_size=16,
                fullatt_block_indexes=[1],
            )
            return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        rope["mrope_interleaved"] = True
        text = _text_kwargs(rope_parameters=rope, head_dim=8)
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=HIDDEN,
            patch_size=4,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        )
        return Qwen3VLConfig(vision_config=vision, text_config=text, **ids)
    if family == "gemma3":
        # 32 / 4 = 8x8 patches, pooled to mm_tokens_per_image = 16 (4x4)
        text = Gemma3TextConfig(
            **_text_kwargs(
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=16,
                query_pre_attn_scalar=16,
                sliding_window=64,
                layer_types=["sliding_attention", "full_attention"],
            )
        )
        return Gemma3Config(
            vision_config=SiglipVisionConfig(**_vit_kwargs(image_size=32, patch_size=4)),
            text_config=text,
            mm_tokens_per_image=16,
            boi_token_index=BOI_ID,
            eoi_token_index=EOI_ID,
            image_token_index=IMAGE_ID,
            tie_word_embeddings=False,
        )
    if family in ("idefics3", "smolvlm"):
        # 32 / 8 = 4x4 patches per tile, pixel shuffle by scale_factor 2 -> 4 tokens (2x2) per tile
        cls = Idefics3Config if family == "idefics3" else SmolVLMConfig
        return cls(
            vision_config=_vit_kwargs(image_size=32, patch_size=8),
            text_config=_text_kwargs(model_type="llama"),
            image_token_id=IMAGE_ID,
            scale_factor=2,
            pad_token_id=PAD_ID,
        )
    if family == "paligemma":
        return PaliGemmaConfig(
            vision_config=SiglipVisionConfig(**_vit_kwargs(image_size=32, patch_size=8)),
            text_config=GemmaConfig(**_text_kwargs(head_dim=8)),
            image_token_index=IMAGE_ID,
            projection_dim=HIDDEN,
            hidden_size=HIDDEN,
            vocab_size=VOCAB_SIZE,
            pad_token_id=PAD_ID,
        )
    if family == "internvl":
        # 32 / 8 = 4x4 patches, pixel shuffle by 0.5 -> 4 tokens (2x2) per tile
        return InternVLConfig(
            vision_config=_vit_kwargs(image_size=[32, 32], patch_size=[8, 8]),
            text_config=_text_kwargs(model_type="qwen2"),
            image_token_id=IMAGE_ID,
            image_seq_length=4,
            downsample_ratio=0.5,
            tie_word_embeddings=False,
        )
    if family == "mistral3":
        return Mistral3Config(
            vision_config=PixtralVisionConfig(**_vit_kwargs(image_size=64, patch_size=4, head_dim=8)),
            text_config=MistralConfig(**_text_kwargs(head_dim=8, sliding_window=None)),
            image_token_index=IMAGE_ID,
            spatial_merge_size=2,
            tie_word_embeddings=False,
        )
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def make_tiny_target(family: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random float32 model of ``family`` in eval mode (same seed -> same weights)."""
    config = _config(family)
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM._from_config(config, attn_implementation=ATTN, dtype=torch.float32)
    elif family == "qwen2":
        model = Qwen2ForCausalLM._from_config(config, attn_implementation=ATTN, dtype=torch.float32)
    else:
        model = AutoModelForImageTextToText.from_config(config, attn_implementation=ATTN, dtype=torch.float32)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = None  # never stop early: tests count new tokens
    return model.eval()


def _text(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(TEXT_LOW, TEXT_HIGH, (n,), generator=gen).tolist()


def _finish(ids: list[int], **tensors) -> dict:
    input_ids = torch.tensor([ids], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **tensors}


def _qwen_pixels(model, gen: torch.Generator, grid_thw: tuple[int, int, int]) -> torch.Tensor:
    vc = model.config.vision_config
    t, h, w = grid_thw
    dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    return torch.randn(t * h * w, dim, generator=gen)


def make_inputs(family: str, model, seed: int = 0, prompt_len: int = 12, image_size=None) -> dict:
    """Batch-1 ``generate()`` inputs for ``model`` (random text ids vary with ``seed``).

    The prompt is ``[bos] + text + <visual block> + text`` with about ``prompt_len`` text tokens.
    image_size: llava_next / llava_onevision: the original image's (height, width) (any-res patch count and token
    count follow); qwen2_vl / qwen2_5_vl / qwen3_vl: the (t, h, w) patch grid. Default: (40, 56) / (1, 4, 6).
    """
    gen = torch.Generator().manual_seed(seed)
    n1 = prompt_len // 2
    n2 = prompt_len - n1 - 1
    head, tail = [BOS_ID, *_text(gen, n1)], _text(gen, n2)
    config = model.config
    if family in ("llama", "qwen2"):
        return _finish(head + tail)
    if family == "llava":
        vc = config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        pixel_values = torch.randn(1, 3, vc.image_size, vc.image_size, generator=gen)
        return _finish(head + [IMAGE_ID] * n + tail, pixel_values=pixel_values)
    if family in ("llava_next", "llava_onevision"):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        vc = config.vision_config
        image_sizes = torch.tensor([image_size or (40, 56)])  # (height, width) of the original image
        num_patches = image_size_to_num_patches(
            image_sizes[0].tolist(), config.image_grid_pinpoints, vc.image_size
        )
        pixel_values = torch.randn(1, num_patches, 3, vc.image_size, vc.image_size, generator=gen)
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
        pooled = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        n = sum(int(f.shape[0]) for f in pooled)
        return _finish(head + [IMAGE_ID] * n + tail, pixel_values=pixel_values, image_sizes=image_sizes)
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        grid = tuple(image_size or (1, 4, 6))  # patches; merged 2x2 -> 1 x 2 x 3 = 6 tokens by default
        merge = config.vision_config.spatial_merge_size
        n = grid[0] * grid[1] * grid[2] // merge**2
        ids = head + [BOI_ID] + [IMAGE_ID] * n + [EOI_ID] + tail
        mm = [1 if i == IMAGE_ID else 0 for i in ids]
        return _finish(
            ids,
            pixel_values=_qwen_pixels(model, gen, grid),
            image_grid_thw=torch.tensor([grid]),
            mm_token_type_ids=torch.tensor([mm], dtype=torch.int32),
        )
    if family == "gemma3":
        n = config.mm_tokens_per_image
        vc = config.vision_config
        ids = head + [BOI_ID] + [IMAGE_ID] * n + [EOI_ID] + tail
        tt = torch.tensor([[1 if i == IMAGE_ID else 0 for i in ids]])
        pixel_values = torch.randn(1, 3, vc.image_size, vc.image_size, generator=gen)
        return _finish(ids, pixel_values=pixel_values, token_type_ids=tt)
    if family in ("idefics3", "smolvlm"):
        # two tiles of one image (a 1x1 split + the global image), each wrapped in fake tokens
        vc = config.vision_config
        per_tile = (vc.image_size // vc.patch_size) ** 2 // config.scale_factor**2
        tile = [FAKE_AROUND_ID] + [IMAGE_ID] * per_tile
        ids = head + tile + tile + [FAKE_AROUND_ID] + tail
        pixel_values = torch.randn(1, 2, 3, vc.image_size, vc.image_size, generator=gen)
        return _finish(ids, pixel_values=pixel_values)
    if family == "paligemma":
        vc = config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        ids = [IMAGE_ID] * n + head + tail  # PaliGemma puts the image first
        tt = torch.zeros(
            1, len(ids), dtype=torch.long
        )  # 0 = prefix (bidirectional), as the processor returns
        pixel_values = torch.randn(1, 3, vc.image_size, vc.image_size, generator=gen)
        return _finish(ids, pixel_values=pixel_values, token_type_ids=tt)
    if family == "internvl":
        # two tiles of one image, contiguous <IMG_CONTEXT> ids between <img> and </img>
        vc = config.vision_config
        ids = (
            head
            + [INTERNVL_IMG_START_ID]
            + [IMAGE_ID] * (2 * config.image_seq_length)
            + [INTERNVL_IMG_END_ID]
        )
        pixel_values = torch.randn(2, 3, vc.image_size[0], vc.image_size[1], generator=gen)
        return _finish(ids + tail, pixel_values=pixel_values)
    if family == "mistral3":
        vc = config.vision_config
        height, width = 32, 48
        step = vc.patch_size * config.spatial_merge_size
        rows, cols = height // step, width // step
        block = ([IMAGE_ID] * cols + [MISTRAL3_IMG_BREAK_ID]) * rows
        block[-1] = MISTRAL3_IMG_END_ID
        pixel_values = torch.zeros(1, 3, vc.image_size, vc.image_size)
        pixel_values[:, :, :height, :width] = torch.randn(1, 3, height, width, generator=gen)
        return _finish(
            head + block + tail, pixel_values=pixel_values, image_sizes=torch.tensor([[height, width]])
        )
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def make_video_inputs(family: str, model, seed: int = 0, prompt_len: int = 12) -> dict:
    """Batch-1 ``generate()`` inputs with one short video (qwen2_vl, qwen2_5_vl, llava_onevision)."""
    gen = torch.Generator().manual_seed(seed)
    n1 = prompt_len // 2
    head, tail = [BOS_ID, *_text(gen, n1)], _text(gen, prompt_len - n1 - 1)
    config = model.config
    if family in ("qwen2_vl", "qwen2_5_vl"):
        grid = (2, 4, 4)  # 2 temporal patches (4 frames), merged 2x2 -> 2 x 2 x 2 = 8 tokens
        merge = config.vision_config.spatial_merge_size
        n = grid[0] * grid[1] * grid[2] // merge**2
        ids = head + [BOI_ID] + [VIDEO_ID] * n + [EOI_ID] + tail
        mm = [2 if i == VIDEO_ID else 0 for i in ids]
        return _finish(
            ids,
            pixel_values_videos=_qwen_pixels(model, gen, grid),
            video_grid_thw=torch.tensor([grid]),
            mm_token_type_ids=torch.tensor([mm], dtype=torch.int32),
        )
    if family == "llava_onevision":
        vc = config.vision_config
        frames = 2
        side = math.ceil(vc.image_size // vc.patch_size / 2)  # 2x2 bilinear pooling per frame
        n = frames * side * side + 1  # + one newline feature after the whole video
        pixel_values_videos = torch.randn(1, frames, 3, vc.image_size, vc.image_size, generator=gen)
        return _finish(head + [VIDEO_ID] * n + tail, pixel_values_videos=pixel_values_videos)
    raise ValueError(f"no video inputs for family {family!r}; video families: {VIDEO_FAMILIES}")
