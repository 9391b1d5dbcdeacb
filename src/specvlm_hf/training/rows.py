"""Training rows from files, as they are published: LLaVA / ShareGPT conversations, streamed when they are big.

The trainer's collator reads the vision-chat format (`{"images": [PIL.Image], "messages": [{"role": ..., "content":
[{"type": "image"}, {"type": "text", "text": ...}]}]}`). Instruction-tuning sets are published in other shapes;
`to_vision_chat` reads them as they are, one row at a time:

* LLaVA / ShareGPT (LLaVA-Instruct-150K, llava_v1_5_mix665k, ShareGPT4V, LLaVA-OneVision):
  `{"image": "coco/train2017/1.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
  {"from": "gpt", "value": "..."}]}`; `image` may be a list (several `<image>` placeholders) or absent (text only).
* role/content rows with string contents and image paths (LLaMA-Factory's "sharegpt" layout):
  `{"images": ["a.jpg"], "messages": [{"role": "user", "content": "<image>What ...?"}, ...]}`.
* vision-chat rows pass through unchanged.

Image paths are relative to `image_folder` (LLaVA's `--image_folder`); each `<image>` placeholder becomes an image
item at its place in the turn. A row with images and no placeholder gets them at the start of its first user turn
(what LLaVA's own preprocessing does).

`load_training_rows` opens a JSON/JSONL file, a `save_to_disk` folder or a Hub dataset, converts rows lazily (an
image is opened when its row is read, never up front) and, with `streaming=True`, returns a `datasets`
`IterableDataset` that never holds the whole set in memory. Under several processes the Trainer shards a stream
across ranks (`SpecVLMDistillationTrainer` turns off accelerate's rank-0 dispatch for it): a stream of at least N
files gives each rank its own files, else every rank reads the stream and keeps its own 1/N of each global batch;
no row goes to two ranks.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

IMAGE_PLACEHOLDER = "<image>"
_SOURCE_COLUMNS = ("conversations", "image")  # replaced by "images" / "messages"; other columns stay
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
}


def _role(value: str) -> str:
    role = _ROLES.get(str(value).lower())
    if role is None:
        raise ValueError(
            f"unknown conversation role {value!r}; expected one of {sorted(_ROLES)} (LLaVA/ShareGPT 'from' or "
            "'role' values)."
        )
    return role


def _image_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None]
    return [value]


def load_image(image, image_folder: str | os.PathLike | None = None):
    """A PIL RGB image from a path (relative to `image_folder`), `datasets` image dict, or PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict):  # an undecoded `datasets.Image` value
        if image.get("bytes"):
            import io

            return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
        image = image.get("path")
    path = Path(image)
    if image_folder is not None and not path.is_absolute():
        path = Path(image_folder) / path
    if not path.is_file():
        hint = (
            f"under image_folder={str(image_folder)!r}"
            if image_folder is not None
            else "(relative paths need image_folder / --image-folder, the folder LLaVA's image paths start from)"
        )
        raise FileNotFoundError(f"training image {str(image)!r} not found {hint}: looked for {str(path)!r}.")
    with Image.open(path) as img:
        return img.convert("RGB")


def _content(text: str) -> tuple[list[dict], int]:
    """A turn's string -> content items, one image item per `<image>` placeholder; returns (items, images)."""
    items: list[dict] = []
    parts = text.split(IMAGE_PLACEHOLDER)
    for i, part in enumerate(parts):
        if i > 0:
            items.append({"type": "image"})
        part = part.strip()
        if part:
            items.append({"type": "text", "text": part})
    return items, len(parts) - 1


def is_vision_chat(row: dict) -> bool:
    """Rows the collator reads as they are: `messages` with content lists (or no images at all)."""
    messages = row.get("messages")
    if not isinstance(messages, list) or "conversations" in row:
        return False
    images = _image_list(row.get("images"))
    if any(isinstance(m.get("content"), str) and IMAGE_PLACEHOLDER in m["content"] for m in messages):
        return False
    return not any(isinstance(image, (str, dict)) for image in images)


def to_vision_chat(row: dict, image_folder: str | os.PathLike | None = None) -> dict:
    """One LLaVA / ShareGPT (or role/content) row -> `{"images": [PIL.Image], "messages": [...]}`.

    Raises ValueError naming the problem when the placeholders and images disagree or a role is unknown.
    """
    if is_vision_chat(row):
        return row
    if row.get("video") is not None or row.get("videos"):
        raise ValueError(
            "a training row has a video: LLaVA-format video rows are not read yet; convert them to the vision-chat "
            "format with the frames as images, or leave them out."
        )
    if "conversations" in row:
        turns = [
            (turn.get("from", turn.get("role")), turn.get("value", turn.get("content")))
            for turn in row["conversations"]
        ]
        images = _image_list(row.get("image", row.get("images")))
    elif "messages" in row:
        turns = [(m.get("role"), m.get("content")) for m in row["messages"]]
        images = _image_list(row.get("images", row.get("image")))
    else:
        raise ValueError(
            f"a training row has neither 'conversations' (LLaVA/ShareGPT) nor 'messages' (vision-chat); its keys: "
            f"{sorted(row)}."
        )
    messages, placeholders = [], 0
    for role, value in turns:
        if isinstance(value, list):  # already content items
            items = value
            n = sum(1 for item in value if isinstance(item, dict) and item.get("type") == "image")
        else:
            items, n = _content(str(value or ""))
        placeholders += n
        messages.append({"role": _role(role), "content": items})
    if images and placeholders == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError("a training row has images but no user turn to put them in.")
        first_user["content"] = [{"type": "image"} for _ in images] + first_user["content"]
        placeholders = len(images)
    if placeholders != len(images):
        raise ValueError(
            f"a training row has {len(images)} image(s) but {placeholders} {IMAGE_PLACEHOLDER!r} placeholder(s) in "
            f"its turns (row id {row.get('id', '?')!r}); each image needs one placeholder (or none at all: then they "
            "go first in the first user turn)."
        )
    return {"images": [load_image(image, image_folder) for image in images], "messages": messages}


def _batch_to_vision_chat(batch: dict[str, list], image_folder) -> dict[str, list]:
    keys = list(batch)
    n = len(batch[keys[0]]) if keys else 0
    rows = [to_vision_chat({k: batch[k][i] for k in keys}, image_folder) for i in range(n)]
    kept = {k: v for k, v in batch.items() if k not in _SOURCE_COLUMNS}  # ids and the like stay
    return {
        **kept,
        "images": [r.get("images") or [] for r in rows],
        "messages": [r["messages"] for r in rows],
    }


def _needs_conversion(columns) -> bool:
    columns = set(columns or ())
    return "conversations" in columns or (bool(columns & {"image", "images"}) and "messages" in columns)


def load_training_rows(
    source: str | os.PathLike,
    *,
    split: str = "train",
    image_folder: str | os.PathLike | None = None,
    streaming: bool = False,
    num_examples: int | None = None,
    seed: int = 0,
    shuffle_buffer: int = 1000,
):
    """Training rows from a .json/.jsonl file (or several: a glob), a `save_to_disk` folder or a Hub dataset.

    Returns a `datasets.Dataset` (rows converted when read) or, with `streaming=True`, an `IterableDataset`.
    image_folder: where relative image paths start (default: the data file's folder). num_examples: keep that many
    rows (a shuffled subset; streamed: the first ones after a `shuffle_buffer`-row shuffle).
    """
    import datasets

    source = str(source)
    is_json = source.endswith((".json", ".jsonl"))
    folder = Path(source)
    if is_json:
        files = sorted(glob.glob(source)) if any(c in source for c in "*?[") else [source]
        if not files or not all(Path(f).is_file() for f in files):
            raise FileNotFoundError(f"no training data file at {source!r}.")
        if image_folder is None:
            image_folder = Path(files[0]).parent
        ds = datasets.load_dataset("json", data_files=files, split="train", streaming=streaming)
    elif folder.is_dir() and (folder / "dataset_info.json").exists():
        ds = datasets.load_from_disk(source)
        if streaming:
            ds = ds.to_iterable_dataset(num_shards=_disk_shards(ds))
    elif folder.is_dir() and (folder / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(source)[split]
        if streaming:
            ds = ds.to_iterable_dataset(num_shards=_disk_shards(ds))
    else:
        ds = datasets.load_dataset(source, split=split, streaming=streaming)

    if streaming:
        if num_examples is not None:
            ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer).take(num_examples)
        columns = ds.column_names
        if columns is None:  # unknown until read: look at the first row
            columns = list(next(iter(ds)))
        if _needs_conversion(columns):
            ds = ds.map(
                lambda row: to_vision_chat(row, image_folder),
                remove_columns=[c for c in _SOURCE_COLUMNS if c in columns],
            )
        return ds
    if num_examples is not None and len(ds) > num_examples:
        ds = ds.shuffle(seed=seed).select(range(num_examples))
    if _needs_conversion(ds.column_names):
        ds = ds.with_transform(lambda batch: _batch_to_vision_chat(batch, image_folder))
    return ds


def _disk_shards(ds) -> int:
    """Shards for a streamed `save_to_disk` dataset: one per Arrow file, at least one per process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    files = len(getattr(ds, "cache_files", None) or ())
    n = max(files, world, 1)
    return min(n, max(len(ds), 1))


__all__ = [
    "IMAGE_PLACEHOLDER",
    "is_vision_chat",
    "load_image",
    "load_training_rows",
    "to_vision_chat",
]
