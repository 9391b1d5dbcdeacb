"""Turn vision-chat rows into target inputs plus a response mask, with the target's own processor.

A row is ``{"images": [PIL.Image, ...], "messages": [...]}`` (rows without images are plain text chats). Each
assistant turn's tokens are found by rendering the conversation with the processor's chat template twice: the
messages before the turn with ``add_generation_prompt=True`` (the prompt) and the messages up to and including
the turn (the prompt plus the response); the response tokens are the difference. ``response_mask`` is 1 on
those tokens (up to and including the end-of-sequence token that closes the turn, when present).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

_SEQUENCE_PAD_KEYS = ("input_ids", "attention_mask", "response_mask")


def content_images(message: dict) -> int:
    """How many ``{"type": "image"}`` items a chat message holds."""
    content = message.get("content")
    if isinstance(content, str) or content is None:
        return 0
    return sum(1 for item in content if isinstance(item, dict) and item.get("type") == "image")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class SpecVLMDataCollator:
    """Collate vision-chat rows for [`SpecVLMDistillationTrainer`].

    Args:
        processor: the target's processor (e.g. `LlavaProcessor`), or a tokenizer for text-only targets. Its chat
            template renders the conversation.
        max_length: truncate each sequence to this many tokens (right side). Visual tokens are never cut: a
            sequence whose images reach past `max_length` keeps them all (with a warning).

    Self-distillation data (every assistant turn replaced by the target's own answer) is made once, before
    training, by `specvlm_hf.training.regenerate.regenerate_dataset` / ``specvlm regenerate``; this collator then
    reads its output like any other dataset.

    Returns a dict of tensors: what the processor returns for the batch (``input_ids``, ``attention_mask``,
    ``pixel_values``, ``image_grid_thw``, ...; right-padded) plus ``response_mask`` (B, L) long.
    """

    def __init__(
        self,
        processor,
        max_length: int | None = None,
        regenerate_with_target=None,
    ):
        if regenerate_with_target is not None:
            raise ValueError(
                "SpecVLMDataCollator(regenerate_with_target=...) was removed: it regenerated every row with plain "
                "generate inside every batch of every epoch. Regenerate the dataset once, before training, with "
                "`specvlm regenerate --target ... --dataset ... --output-dir DIR` (or "
                "`specvlm_hf.training.regenerate.regenerate_dataset`) and train on DIR."
            )
        if max_length is not None and max_length < 2:
            raise ValueError(
                f"SpecVLMDataCollator: invalid max_length={max_length!r}; expected None or >= 2."
            )
        self.processor = processor
        self.max_length = max_length
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.is_multimodal = hasattr(processor, "image_processor")
        self._visual_ids = self._visual_token_ids()

    # ------------------------------------------------------------------ helpers
    def _visual_token_ids(self) -> set[int]:
        ids = set()
        for name in ("image_token_id", "video_token_id"):
            value = getattr(self.processor, name, None)
            if isinstance(value, int):
                ids.add(value)
        for name in ("image_token", "video_token"):
            token = getattr(self.processor, name, None)
            if isinstance(token, str):
                value = self.tokenizer.convert_tokens_to_ids(token)
                if isinstance(value, int) and value != self.tokenizer.unk_token_id:
                    ids.add(value)
        return ids

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text[0] if isinstance(text, list) else text

    def _encode(self, texts: list[str], images: list, **kwargs) -> dict:
        # the chat template already wrote the special tokens (bos, ...): do not add them twice
        if self.is_multimodal:
            return self.processor(
                text=texts, images=images or None, add_special_tokens=False, return_tensors="pt", **kwargs
            )
        return self.tokenizer(texts, add_special_tokens=False, return_tensors="pt", **kwargs)

    def _ids(self, text: str, images: list) -> list[int]:
        return self._encode([text], images)["input_ids"][0].tolist()

    def encode_prompts(
        self, conversations: list[tuple[list[dict], list]], padding_side: str = "left"
    ) -> dict:
        """Generation prompts for a batch: each ``(messages, images)`` rendered with the chat template and
        ``add_generation_prompt=True`` (the turn the target is to answer next), encoded with the processor and
        padded on ``padding_side`` (left: as batched `generate` takes them). ``images`` are the conversation's
        images up to there, in order."""
        texts, all_images = [], []
        for messages, images in conversations:
            _check_image_count(messages, images, "prompt")
            texts.append(self._render(messages, add_generation_prompt=True))
            all_images.extend(images)
        return dict(self._encode(texts, all_images, padding=True, padding_side=padding_side))

    # ------------------------------------------------------------------- call
    def _response_spans(
        self, messages: list[dict], images: list, full_ids: list[int]
    ) -> list[tuple[int, int]]:
        """[(start, end)) token ranges of the assistant turns in `full_ids`."""
        eos = self.tokenizer.eos_token_id
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            n_before = sum(content_images(m) for m in messages[:i])
            n_through = n_before + content_images(message)
            prompt_ids = self._ids(self._render(messages[:i], add_generation_prompt=True), images[:n_before])
            turn_ids = self._ids(
                self._render(messages[: i + 1], add_generation_prompt=False), images[:n_through]
            )
            start = _common_prefix(prompt_ids, full_ids)
            end = _common_prefix(turn_ids, full_ids)
            # tokens after the end-of-sequence token that closes the turn (a newline, ...) are template
            # decoration that the target never generates: leave them out
            turn = full_ids[start:end]
            if eos is not None and eos in turn:
                end = start + len(turn) - turn[::-1].index(eos)
            if end > start:
                spans.append((start, end))
        return spans

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        texts, all_images, per_row = [], [], []
        for row in rows:
            images = list(row.get("images") or [])
            messages = row["messages"]
            _check_image_count(messages, images, "row")
            texts.append(self._render(messages, add_generation_prompt=False))
            all_images.extend(images)
            per_row.append((messages, images))
        batch = dict(self._encode(texts, all_images, padding=True, padding_side="right"))
        input_ids = batch["input_ids"]
        attention_mask = batch["attention_mask"]
        response_mask = torch.zeros_like(input_ids)
        for b, (messages, images) in enumerate(per_row):
            n = int(attention_mask[b].sum())
            full_ids = input_ids[b, :n].tolist()
            for start, end in self._response_spans(messages, images, full_ids):
                response_mask[b, start:end] = 1
        batch["response_mask"] = response_mask
        if self.max_length is not None:
            batch = self._truncate(batch)
        return batch

    def _truncate(self, batch: dict[str, Any]) -> dict[str, Any]:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        bsz, seq_len = input_ids.shape
        cuts = []
        for b in range(bsz):
            n = int(attention_mask[b].sum())
            cut = min(n, self.max_length)
            visual = [i for i, t in enumerate(input_ids[b, :n].tolist()) if t in self._visual_ids]
            if visual and visual[-1] >= cut:
                warnings.warn(
                    f"SpecVLMDataCollator: max_length={self.max_length} would cut visual tokens; keeping "
                    f"{visual[-1] + 1} tokens of this sequence.",
                    stacklevel=3,
                )
                cut = visual[-1] + 1
            cuts.append(cut)
        new_len = max(cuts)
        if new_len == seq_len and all(c == int(attention_mask[b].sum()) for b, c in enumerate(cuts)):
            return batch
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        keep = torch.arange(new_len)[None] < torch.tensor(cuts)[:, None]  # (B, new_len)
        for key, value in list(batch.items()):
            if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == (bsz, seq_len):
                value = value[:, :new_len].clone()
                fill = pad_id if key == "input_ids" else 0
                value[~keep] = fill
                batch[key] = value
        return batch


__all__ = ["SpecVLMDataCollator", "content_images"]


def _check_image_count(messages: list[dict], images: list, what: str) -> None:
    """A conversation's images match its `{"type": "image"}` items one for one."""
    n_images = sum(content_images(m) for m in messages)
    if n_images != len(images):
        raise ValueError(
            f"SpecVLMDataCollator: a {what} has {len(images)} images but its messages hold {n_images} "
            '{"type": "image"} items.'
        )
