"""A small offline VLM world: tokenizer, processor and a trained LLaVA target, built on this CPU.

Nothing is downloaded. ``load_toy_target()`` returns a real ``LlavaForConditionalGeneration`` and a real
``LlavaProcessor``; the first call trains them (about 2 minutes of CPU time) and caches
them with ``save_pretrained`` under ``$SPECVLM_HF_CACHE`` (default ``~/.cache/specvlm_hf``); later calls
load them with ``from_pretrained``. The medium target is rebuilt from the cached tiny one (seconds).

How the tiny target is built (``size="tiny"``), deterministic under ``seed``:

1. Tokenizer: byte-level BPE (at most 1024 tokens; the toy language saturates near 630) trained with ``tokenizers`` on generated questions and
   answers, wrapped as ``PreTrainedTokenizerFast`` with special tokens ``<pad> <s> </s> <unk> <image>``
   and a LLaVA-1.5 style chat template (``USER: <image>\\n{question}\\nASSISTANT: {answer}</s>``).
2. Processor: ``LlavaProcessor`` = ``CLIPImageProcessorPil`` (96x96, no torchvision) + the tokenizer;
   the 3x3 grid image becomes 9 ``<image>`` tokens, one 32x32 patch per grid cell.
3. Vision tower: a 2-layer ``CLIPVisionModel`` (hidden 64) pretrained briefly with a supervised per-cell
   objective (shape, colour, size and cell index of each patch; position embeddings initialised large so
   the cell index is easy to read), then frozen.
4. Projector + Llama language model (3 layers, hidden 128, 4 heads of 32, about 1M parameters) trained
   for 600 steps of 32 rows on response tokens only (AdamW, cosine schedule, length-bucketed batches).

The ``medium`` target (``size="medium"``, about 157M parameters) computes exactly the tiny target's
function in a bigger network, so it gives realistic CPU forward costs with sensible outputs:

* widening hidden 128 -> 1024, heads 4 -> 32 (head_dim stays 32, so RoPE is unchanged), intermediate
  352 -> 2816: every trained weight is copied into the top-left block of the bigger matrix and every new
  entry is zero, so the extra residual dimensions stay exactly 0 (new heads get zero q/k/v, hence zero
  values; new MLP units get zero gate/up, and silu(0) * 0 = 0). RMSNorm averages over the wider
  dimension, which divides the mean square by 8: each norm weight is multiplied by sqrt(128/1024) and
  ``rms_norm_eps`` divided by 8, which gives the same normalised values. The projector, embedding and
  ``lm_head`` are padded the same way (zero rows/columns; gelu(0) = 0).
* depth 3 -> 12: after each trained layer three extra decoder layers are inserted whose ``o_proj`` and
  ``down_proj`` are zero (their norms and q/k/v/gate/up keep the random init, so they cost real compute):
  each is an identity residual block.
* vision tower, tokenizer, processor and generation config are shared unchanged.

Results agree with the tiny target up to float rounding (sums over padded zeros), so greedy outputs match.

``load_toy_assistant()`` trains (once, cached) an independent "small" toy LLaVA (2 layers, hidden 64; other seeds
for weights and data; the same tokenizer and processor): the small draft model for transformers' assisted
generation in ``specvlm bench``.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..generation.saved_costs import cache_root
from .data import (
    CELL,
    COLOUR_NAMES,
    GRID,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    make_stratified_rows,
    make_toy_dataset,
    make_toy_rows,
    random_scene,
    render_scene,
    toy_text_corpus,
)
from .widen import MEDIUM_DIMS, widen_draft, widen_toy_target

__all__ = [
    "load_toy_target",
    "make_toy_dataset",
    "toy_prompts",
    "toy_generate_inputs",
    "build_toy_processor",
    "widen_toy_target",
    "widen_draft",
    "load_toy_assistant",
    "toy_cache_dir",
]

TOY_VERSION = 1
NUM_IMAGE_TOKENS = GRID * GRID
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{{ '\\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SIZES_CONFIG = {
    "tiny": {"hidden": 128, "intermediate": 352, "heads": 4, "layers": 3},
    # the independent assistant for transformers' assisted generation (`load_toy_assistant`)
    "small": {"hidden": 64, "intermediate": 176, "heads": 2, "layers": 2},
    "medium": MEDIUM_DIMS,
}


def toy_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$SPECVLM_HF_CACHE``, else ``~/.cache/specvlm_hf``."""
    return Path(cache_dir) if cache_dir is not None else cache_root()


# ----------------------------------------------------------------------------------------------
# Tokenizer and processor
# ----------------------------------------------------------------------------------------------


def build_toy_tokenizer(seed: int = 0, vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on generated toy text, as ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = toy_text_corpus(400, seed) + ["USER: ", "ASSISTANT: ", "\n"]
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=512,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_toy_processor(seed: int = 0):
    """``LlavaProcessor``: PIL CLIP image processor (96x96) + the toy tokenizer + chat template."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_toy_tokenizer(seed),
        patch_size=CELL,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def _with_image(messages: list[dict], image) -> list[dict]:
    """Copy of ``messages`` whose ``{"type": "image"}`` items carry ``image`` (for apply_chat_template)."""
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [dict(item, image=image) if item["type"] == "image" else item for item in content]
        out.append({"role": message["role"], "content": content})
    return out


def toy_generate_inputs(processor, row: dict) -> dict:
    """Tensors for ``vlm.generate(**inputs)`` from a row: its user turn, the generation prompt, the image."""
    user_turn = [m for m in row["messages"] if m["role"] == "user"][:1]
    return dict(
        processor.apply_chat_template(
            _with_image(user_turn, row["images"][0]),
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
    )


def toy_prompts(n: int, seed: int = 0, stratified: bool = True) -> list[dict]:
    """``n`` evaluation rows (own streams, disjoint from training); the assistant turn is the reference.

    stratified: the tasks follow the toy world's task weights exactly (`toy_data.make_stratified_rows`), so a
    small benchmark has the world's mix of long descriptions and short answers; False: ``n`` independent draws.
    """
    if stratified:
        return make_stratified_rows(n, seed)
    return make_toy_rows(n, seed, split="eval")


# ----------------------------------------------------------------------------------------------
# Model construction
# ----------------------------------------------------------------------------------------------


def _llava_config(tokenizer, size: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    dims = SIZES_CONFIG[size]
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=CELL,
        num_channels=3,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["heads"],
        head_dim=32,
        max_position_embeddings=512,
        rms_norm_eps=1e-5 * 128 / dims["hidden"],
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.name_or_path = f"specvlm-toy-llava-{size}"
    return config


def _set_generation_defaults(model, tokenizer) -> None:
    gc = model.generation_config
    gc.bos_token_id = tokenizer.bos_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id
    gc.do_sample = False
    gc.max_new_tokens = 96


def _pixel_values(processor, images) -> torch.Tensor:
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def _pretrain_vision_tower(vision_tower, processor, seed: int, steps: int, log) -> None:
    """Supervised per-cell objective: each patch token predicts its cell's shape, colour, size and index."""
    hidden = vision_tower.config.hidden_size
    n_classes = (len(SHAPES) + 1, len(COLOUR_NAMES) + 1, len(SIZES) + 1, NUM_IMAGE_TOKENS)
    heads = torch.nn.Linear(hidden, sum(n_classes))
    with torch.no_grad():  # strong position embeddings, so each patch feature also says which cell it is
        vision_tower.embeddings.position_embedding.weight.normal_(std=1.0)
    params = list(vision_tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    rng = random.Random(f"specvlm-toy-vision-{seed}")
    batch_size = 64
    vision_tower.train()
    for step in range(steps):
        scenes = [random_scene(rng) for _ in range(batch_size)]
        pixels = _pixel_values(processor, [render_scene(s) for s in scenes])
        labels = torch.tensor(
            [[(*lab, i) for i, lab in enumerate(s.cell_labels())] for s in scenes]
        )  # (B, 9, 4)
        feats = vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][
            :, 1:
        ]  # (B, 9, H)
        logits = heads(feats).split(n_classes, dim=-1)
        loss = sum(F.cross_entropy(lg.flatten(0, 1), labels[..., k].flatten()) for k, lg in enumerate(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            acc = [
                round((lg.argmax(-1) == labels[..., k]).float().mean().item(), 3)
                for k, lg in enumerate(logits)
            ]
            log(f"vision step {step}: loss {loss.item():.3f}, per-head accuracy {acc}")
    vision_tower.eval()
    for p in vision_tower.parameters():
        p.requires_grad_(False)


def encode_toy_rows(processor, rows: list[dict]) -> list[dict]:
    """Token ids and response-only labels for rows (what ``processor(images, text)`` would produce)."""
    tokenizer = processor.tokenizer
    expanded = processor.image_token * NUM_IMAGE_TOKENS
    encoded = []
    for row in rows:
        prompt = processor.apply_chat_template(
            row["messages"][:1], add_generation_prompt=True, tokenize=False
        )
        full = processor.apply_chat_template(row["messages"], tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("chat template: the prompt is not a prefix of the conversation")
        prompt_ids = tokenizer(
            prompt.replace(processor.image_token, expanded), add_special_tokens=False
        ).input_ids
        full_ids = tokenizer(
            full.replace(processor.image_token, expanded), add_special_tokens=False
        ).input_ids
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError("tokenizer: the prompt tokens are not a prefix of the conversation tokens")
        # Train on the answer and its eos; the trailing newline after eos is not a target.
        n_answer = len(full_ids) - len(prompt_ids)
        labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
        eos_at = len(prompt_ids) + full_ids[len(prompt_ids) :].index(tokenizer.eos_token_id)
        labels = [lab if i <= eos_at else -100 for i, lab in enumerate(labels)]
        assert n_answer > 0
        encoded.append({"input_ids": full_ids, "labels": labels})
    return encoded


def collate_toy_batch(encoded: list[dict], pixel_values: torch.Tensor, pad_id: int) -> dict:
    """Right-padded batch for training / loss evaluation."""
    length = max(len(e["input_ids"]) for e in encoded)
    input_ids = torch.full((len(encoded), length), pad_id)
    labels = torch.full((len(encoded), length), -100)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention_mask[i, :n] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": pixel_values,
        "labels": labels,
    }


def _train_language_model(
    model, processor, seed: int, steps: int, n_images: int, log, batch_size: int = 32
) -> None:
    """Train projector + language model on response tokens; the vision tower stays frozen."""
    rows = make_toy_rows(n_images * 4, seed, questions_per_image=4, split="train")
    encoded = encode_toy_rows(processor, rows)
    images = [rows[i]["images"][0] for i in range(0, len(rows), 4)]
    pixels = torch.cat([_pixel_values(processor, images[i : i + 256]) for i in range(0, len(images), 256)])
    pixels = pixels.repeat_interleave(4, dim=0)  # row i uses image i // 4
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    for n, p in model.named_parameters():
        p.requires_grad_("vision_tower" not in n)
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    gen = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    model.train()
    for step in range(steps):
        if not batches:  # length-bucketed batches: sort 8 random batches' rows by length, then split
            pool = torch.randperm(len(rows), generator=gen)[: 8 * batch_size].tolist()
            pool.sort(key=lambda i: len(encoded[i]["input_ids"]))
            batches = [pool[i : i + batch_size] for i in range(0, len(pool), batch_size)]
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        idx = batches.pop()
        batch = collate_toy_batch([encoded[i] for i in idx], pixels[idx], processor.tokenizer.pad_token_id)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"lm step {step}: loss {loss.item():.3f} (cpu {time.process_time():.0f}s)")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


def train_toy_target(
    seed: int = 0,
    progress: bool = True,
    vision_steps: int = 250,
    lm_steps: int = 600,
    size: str = "tiny",
    processor=None,
):
    """Build and train a toy LLaVA from scratch (no caching); returns ``(model, processor)``.

    size: "tiny" (the target) or "small" (the independent assistant); processor: reuse this processor (and so its
    tokenizer) instead of building one from `seed`."""
    from transformers import LlavaForConditionalGeneration

    def log(msg: str) -> None:
        if progress:
            print(f"[specvlm toy] {msg}", flush=True)

    torch.manual_seed(seed)
    start = time.perf_counter()
    processor = processor if processor is not None else build_toy_processor(seed)
    model = LlavaForConditionalGeneration(_llava_config(processor.tokenizer, size))
    _set_generation_defaults(model, processor.tokenizer)
    # Matrices this small gain nothing from intra-op threads, and on a busy machine the threads' spin
    # waits cost several times the work (measured: 2 min of CPU with one thread, 10+ with two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _pretrain_vision_tower(model.model.vision_tower, processor, seed, vision_steps, log)
        log(f"vision tower pretrained in {time.perf_counter() - start:.1f}s")
        _train_language_model(model, processor, seed, lm_steps, n_images=1500, log=log)
    finally:
        torch.set_num_threads(threads)
    log(f"{size} toy model trained in {time.perf_counter() - start:.1f}s")
    return model, processor


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def load_toy_assistant(cache_dir: str | os.PathLike | None = None, seed: int = 0, progress: bool = True):
    """An independent small draft for transformers' assisted generation with the toy target (cached).

    A "small" toy LLaVA (2 layers, hidden 64) trained on its own -- another seed for its weights and its training
    images -- with the toy target's tokenizer and processor, as a user would pair a small VLM of the same family.
    (The tiny toy target itself is no independent draft for the medium one: that is its exact widening.)
    """
    from transformers import LlavaForConditionalGeneration

    _, processor = load_toy_target("tiny", cache_dir=cache_dir, seed=seed, progress=progress)
    path = toy_cache_dir(cache_dir) / f"toy-llava-small-assistant-v{TOY_VERSION}-seed{seed}"
    if not (path / "config.json").exists():
        model, _ = train_toy_target(seed=seed + 1000, progress=progress, size="small", processor=processor)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp"))
        model.save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    model.requires_grad_(False)
    return model


def load_toy_target(
    size: str = "tiny",
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    arch: str = "llava",
):
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` of the toy world, trained on first use.

    ``size``: "tiny" (trained and cached) or "medium" (built from the tiny one, see the module docstring).
    The cache lives in ``cache_dir`` / ``$SPECVLM_HF_CACHE`` / ``~/.cache/specvlm_hf``.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    if arch != "llava":
        raise ValueError(f"arch={arch!r} is not available; the toy world has arch='llava'")
    if size not in ("tiny", "medium"):
        raise ValueError(f"size={size!r}; choose 'tiny' or 'medium'")
    path = toy_cache_dir(cache_dir) / f"toy-llava-tiny-v{TOY_VERSION}-seed{seed}"
    if not (path / "config.json").exists():
        model, processor = train_toy_target(seed=seed, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp"))
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        try:
            tmp.rename(path)  # atomic: a concurrent process may have finished first
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = LlavaProcessor.from_pretrained(path)
    for p in model.parameters():
        p.requires_grad_(False)
    if size == "tiny":
        return model, processor
    return widen_toy_target(model, size), processor
