"""Self-distillation data, made once before training: every assistant turn answered by the target itself.

At inference a draft always continues the target's own text, so a draft trained on the target's answers (EAGLE-3,
HASS, Medusa-2) is accepted more often than one trained on a dataset's human answers. `regenerate_dataset` replaces
every assistant turn of a vision-chat dataset by the target's answer to the conversation so far: multi-turn rows
turn by turn, each turn conditioned on the regenerated history. Conversations go to the target in left-padded
batches (`SpecVLMDataCollator.encode_prompts`), through `vlm.generate(**batch, assistant_model=draft)` when a draft
is given: lossless speculative decoding, so greedy answers are plain generate's, token for token, only sooner.

The output folder is a dataset that `specvlm train --dataset DIR` (`load_regenerated_dataset`) reads:

    DIR/data/train-00000.parquet, ...   append-only shards in datasets' parquet format (features kept: images too);
                                        each row: the source row's columns, the new ``messages``, ``source_row``
                                        (its index in the source), ``sample`` (0..k-1), ``generated_tokens``,
                                        ``truncated_turns`` (answers cut by max_new_tokens)
    DIR/regeneration.json               provenance: target, revision, source, settings, counts, runs
    DIR/.partial/                       the shard being written (hidden: datasets never reads it)

Resumable: a shard is written to ``.partial``, flushed to disk (fsync) and renamed into ``data/`` in one step, so
``data/`` only ever holds whole shards; a rerun with the same settings reads which (row, sample) pairs they hold and
regenerates only the rest. Shards end on batch boundaries and every sampled batch is seeded from its first
conversation, so an interrupted run resumed with the same settings writes what an uninterrupted one would.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..targets import families as targets
from ..targets.loading import execution_device
from .collator import SpecVLMDataCollator, content_images
from .eval_acceptance import check_positive_int

FORMAT = "specvlm_hf regenerated dataset"
FORMAT_VERSION = 1
PROVENANCE_FILE = "regeneration.json"
DATA_DIR = "data"
PARTIAL_DIR = ".partial"
SHARD_GLOB = "train-*.parquet"
ADDED_COLUMNS = ("source_row", "sample", "generated_tokens", "truncated_turns")
# settings that change what is written: a resumed run must use the same (the draft may change: greedy output does not
# depend on it, and each run records its own)
_IDENTITY_KEYS = ("target", "target_revision", "source_rows", "source_fingerprint", "max_new_tokens")


@dataclass(frozen=True)
class RegenerationSettings:
    """How the target answers. temperature 0: greedy; > 0: pure temperature sampling (top_k 0, top_p 1), with
    `samples_per_prompt` independent answers per source row."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    samples_per_prompt: int = 1
    batch_size: int = 8
    seed: int = 0

    def validate(self) -> None:
        for name in ("max_new_tokens", "samples_per_prompt", "batch_size"):
            check_positive_int("regenerate", name, getattr(self, name))
        if not self.temperature >= 0:
            raise ValueError(f"regenerate: invalid temperature={self.temperature!r}; expected a number >= 0.")
        if self.samples_per_prompt > 1 and self.temperature == 0:
            raise ValueError(
                f"regenerate: samples_per_prompt={self.samples_per_prompt} with temperature 0 would write "
                f"{self.samples_per_prompt} identical greedy answers per row; give a temperature > 0 (e.g. 1.0) to "
                "sample them, or samples_per_prompt=1."
            )

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": float(self.temperature), "top_k": 0, "top_p": 1.0}


# ------------------------------------------------------------------------------------------------ output folder


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: dict) -> None:
    """Write ``path`` atomically (a killed run leaves the old file or the new one, never half of one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def read_provenance(output_dir: str | os.PathLike) -> dict | None:
    """The folder's ``regeneration.json``, or None where there is none."""
    path = Path(output_dir) / PROVENANCE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _shards(output_dir: Path) -> list[Path]:
    return sorted((output_dir / DATA_DIR).glob(SHARD_GLOB))


def _done_conversations(output_dir: Path) -> set[tuple[int, int]]:
    """(source_row, sample) of every conversation the whole shards in ``data/`` hold."""
    import pyarrow.parquet as pq

    done: set[tuple[int, int]] = set()
    for shard in _shards(output_dir):
        table = pq.read_table(shard, columns=["source_row", "sample"]).to_pydict()
        pairs = list(zip(table["source_row"], table["sample"]))
        if len(set(pairs)) != len(pairs) or done.intersection(pairs):
            raise RuntimeError(
                f"regenerate: {shard} repeats conversations already written; the folder is corrupt."
            )
        done.update(pairs)
    return done


def _write_shard(output_dir: Path, rows: list[dict], features) -> Any:
    """Write ``rows`` as the next shard: into ``.partial``, fsync, then one rename into ``data/``. Returns the
    shard's features (the later shards are written with the same)."""
    import datasets
    from datasets.utils import are_progress_bars_disabled

    index = len(_shards(output_dir))
    name = f"train-{index:05d}.parquet"
    partial = output_dir / PARTIAL_DIR / name
    partial.parent.mkdir(parents=True, exist_ok=True)
    shard = datasets.Dataset.from_list(rows, features=features)
    bars_were_on = not are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one bar per shard would break the run's own progress bar
    try:
        shard.to_parquet(str(partial))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    _fsync(partial)
    os.replace(partial, output_dir / DATA_DIR / name)
    _fsync(output_dir / DATA_DIR)
    return shard.features


def _shard_features(output_dir: Path):
    import datasets
    import pyarrow.parquet as pq

    shards = _shards(output_dir)
    return datasets.Features.from_arrow_schema(pq.read_schema(shards[0])) if shards else None


def summarize(output_dir: str | os.PathLike) -> dict[str, int]:
    """Counts over the whole shards: conversations, source rows, regenerated turns, tokens, truncated turns."""
    import pyarrow.parquet as pq

    counts = {"rows": 0, "source_rows": 0, "turns": 0, "generated_tokens": 0, "truncated_turns": 0}
    sources: set[int] = set()
    for shard in _shards(Path(output_dir)):
        table = pq.read_table(
            shard, columns=["source_row", "generated_tokens", "truncated_turns", "messages"]
        )
        data = table.to_pydict()
        counts["rows"] += table.num_rows
        sources.update(data["source_row"])
        counts["generated_tokens"] += sum(data["generated_tokens"])
        counts["truncated_turns"] += sum(data["truncated_turns"])
        counts["turns"] += sum(m["role"] == "assistant" for messages in data["messages"] for m in messages)
    counts["source_rows"] = len(sources)
    return counts


def load_regenerated_dataset(output_dir: str | os.PathLike, allow_incomplete: bool = False):
    """The ``datasets.Dataset`` a `regenerate_dataset` run wrote (what ``specvlm train --dataset DIR`` reads).

    Raises ValueError for a folder that is no regenerated dataset, or (unless ``allow_incomplete``) one whose run
    did not finish."""
    import datasets

    folder = Path(output_dir)
    record = read_provenance(folder)
    if record is None or record.get("format") != FORMAT:
        raise ValueError(
            f"{folder} is not a regenerated dataset (no {PROVENANCE_FILE} written by `specvlm regenerate`)."
        )
    if record.get("status") != "complete" and not allow_incomplete:
        counts = summarize(folder)
        raise ValueError(
            f"{folder} holds an unfinished regeneration ({counts['rows']} of {record.get('expected_rows', '?')} "
            "rows): rerun the same `specvlm regenerate` command to finish it (it resumes where it stopped)."
        )
    files = [str(p) for p in _shards(folder)]
    if not files:
        raise ValueError(f"{folder} holds no regenerated rows yet.")
    return datasets.load_dataset("parquet", data_files={"train": files}, split="train")


# ------------------------------------------------------------------------------------------------ source rows


def _column_names(dataset) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    first = next(iter(dataset), None)
    return list(first) if first is not None else []


def _head_messages(dataset, n: int) -> list:
    if hasattr(dataset, "select_columns") and hasattr(dataset, "__len__"):
        head = dataset.select_columns(["messages"]).select(range(min(n, len(dataset))))
        return [row["messages"] for row in head]
    return [row["messages"] for row in itertools.islice(iter(dataset), n)]


def source_fingerprint(dataset, n: int = 64) -> str:
    """A short hash of the first ``n`` rows' messages and the row count: a resumed run must read the same source."""
    digest = hashlib.sha256()
    size = len(dataset) if hasattr(dataset, "__len__") else None
    digest.update(json.dumps([size, _head_messages(dataset, n)], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _pending(dataset, samples: int, done: set[tuple[int, int]]) -> Iterator[tuple[int, int, dict]]:
    """(source_row, sample, row) of every conversation not yet written, in source order."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        for i in range(len(dataset)):
            missing = [s for s in range(samples) if (i, s) not in done]
            if missing:
                row = dataset[i]
                for s in missing:
                    yield i, s, row
        return
    for i, row in enumerate(dataset):
        for s in range(samples):
            if (i, s) not in done:
                yield i, s, row


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _batch_seed(seed: int, source_row: int, sample: int, turn: int) -> int:
    """The seed of one sampled batch, from its first conversation: the same batch draws the same answers in an
    interrupted and an uninterrupted run."""
    return random.Random(f"specvlm-regenerate-{seed}-{source_row}-{sample}-{turn}").getrandbits(63)


# ------------------------------------------------------------------------------------------------ generation


@dataclass
class _Conversation:
    source_row: int
    sample: int
    row: dict
    messages: list[dict]
    images: list
    turns: list[int]  # indices of the assistant messages
    generated_tokens: int = 0
    truncated_turns: int = 0

    def output_row(self) -> dict:
        row = dict(self.row)
        row.update(
            messages=self.messages,
            source_row=self.source_row,
            sample=self.sample,
            generated_tokens=self.generated_tokens,
            truncated_turns=self.truncated_turns,
        )
        return row


def _conversation(source_row: int, sample: int, row: dict) -> _Conversation:
    messages = copy.deepcopy(list(row["messages"]))
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns:
        if content_images(messages[i]):
            raise ValueError(
                f"regenerate: source row {source_row} has an image inside an assistant turn; the target's answer "
                "would replace it. Move the image into a user turn."
            )
    return _Conversation(source_row, sample, row, messages, list(row.get("images") or []), turns)


def _eos_ids(target, tokenizer) -> set[int]:
    value = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
    if value is None:
        value = tokenizer.eos_token_id
    ids = value if isinstance(value, (list, tuple)) else [value]
    return {int(i) for i in ids if i is not None}


def _answer(message: dict, text: str) -> dict:
    """``message`` with its content replaced by ``text``, in the same form (a string stays a string)."""
    if isinstance(message.get("content"), str):
        return {**message, "content": text}
    return {**message, "content": [{"type": "text", "text": text}]}


def _regenerate_chunk(target, draft, renderer, eos, chunk: list[_Conversation], settings, device) -> None:
    """Answer every assistant turn of the conversations in ``chunk``, turn by turn, one left-padded batch per
    turn (the conversations that have that turn)."""
    tokenizer = renderer.tokenizer
    kwargs = {"max_new_tokens": settings.max_new_tokens, **settings.generate_kwargs()}
    if draft is not None:
        kwargs["assistant_model"] = draft
    for turn in range(max(len(c.turns) for c in chunk)):
        active = [c for c in chunk if len(c.turns) > turn]
        prompts = []
        for c in active:
            history = c.messages[: c.turns[turn]]
            prompts.append((history, c.images[: sum(content_images(m) for m in history)]))
        inputs = renderer.encode_prompts(prompts, padding_side="left")
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        if settings.temperature > 0:
            torch.manual_seed(_batch_seed(settings.seed, active[0].source_row, active[0].sample, turn))
        with torch.inference_mode():
            out = target.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1] :].tolist()
        for c, ids in zip(active, new):
            end = next((i + 1 for i, t in enumerate(ids) if t in eos), None)
            if end is None:  # cut by max_new_tokens: the answer has no end
                end = len(ids)
                c.truncated_turns += 1
            c.generated_tokens += end
            text = tokenizer.decode(ids[:end], skip_special_tokens=True).strip()
            index = c.turns[turn]
            c.messages[index] = _answer(c.messages[index], text)


def _model_name(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None) or None


def _versions() -> dict[str, str]:
    import transformers

    from .._version import __version__

    return {"specvlm_hf": __version__, "transformers": transformers.__version__, "torch": torch.__version__}


def regenerate_dataset(
    target,
    processor,
    dataset,
    output_dir: str | os.PathLike,
    *,
    draft=None,
    draft_name: str | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    samples_per_prompt: int = 1,
    seed: int = 0,
    shard_size: int = 256,
    target_name: str | None = None,
    target_revision: str | None = None,
    source_name: str | None = None,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> dict:
    """Replace every assistant turn of ``dataset`` by ``target``'s own answer; write the result to ``output_dir``.

    Args:
        target: the VLM (or causal LM) whose answers the draft will learn; ``processor``: its processor (or tokenizer).
        dataset: vision-chat rows (``{"images": [...], "messages": [...]}``): a ``datasets.Dataset``, an
            ``IterableDataset`` or a list of dicts. Other columns are kept.
        draft: a SpecVLM draft of ``target``: speculative decoding (lossless: greedy answers are plain generate's);
            draft_name: what the provenance calls it (default: its ``name_or_path``).
        batch_size: conversations per left-padded batch; max_new_tokens: the longest answer (a longer one is cut and
            counted in ``truncated_turns``).
        temperature: 0 greedy; > 0 samples ``samples_per_prompt`` answers per row (pure temperature sampling).
        seed: seeds every sampled batch (from its first conversation).
        shard_size: conversations per shard (rounded up to whole batches): at most this much work is lost to a kill.
        target_name, target_revision: recorded in the provenance (default: the target's ``name_or_path`` and the
            Hub commit its config was loaded from); source_name: the dataset's name, recorded.
        progress: a progress bar with rows/s (tqdm); on_shard: called with the number of rows written after each shard.

    Returns the provenance (also in ``output_dir/regeneration.json``). Rerun with the same arguments to resume an
    interrupted run; `load_regenerated_dataset(output_dir)` reads the result.
    """
    settings = RegenerationSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        samples_per_prompt=samples_per_prompt,
        batch_size=batch_size,
        seed=seed,
    )
    settings.validate()
    check_positive_int("regenerate", "shard_size", shard_size)
    renderer = SpecVLMDataCollator(processor)
    if renderer.tokenizer.pad_token_id is None:
        raise ValueError(
            "regenerate: the tokenizer has no pad token, which left-padded batches need; set one first "
            "(e.g. `processor.tokenizer.pad_token = processor.tokenizer.eos_token`)."
        )
    columns = _column_names(dataset)
    if "messages" not in columns:
        raise ValueError(
            f"regenerate: the dataset has no 'messages' column (columns: {columns}); rows must be in the "
            'vision-chat format {"images": [...], "messages": [...]}.'
        )
    taken = [c for c in ADDED_COLUMNS if c in columns]
    if taken:
        raise ValueError(
            f"regenerate: the dataset already has column(s) {taken}, which regeneration writes; it looks regenerated "
            "already. Regenerate the source dataset, or remove those columns."
        )
    if draft is not None:
        if not draft.is_bound:
            draft.bind(target)
        elif draft.target is not targets.unwrap_target(target):
            raise ValueError(
                "regenerate: the draft is bound to a different target; rebind it (`draft.bind(target)`)."
            )
        draft.eval()
    target.eval()

    out = Path(output_dir)
    size = len(dataset) if hasattr(dataset, "__len__") else None
    identity = {
        "target": target_name or _model_name(target),
        "target_revision": target_revision or getattr(getattr(target, "config", None), "_commit_hash", None),
        "source_rows": size,
        "source_fingerprint": source_fingerprint(dataset),
        **asdict(settings),
    }
    if settings.temperature == 0:  # greedy answers depend on neither the batching nor the seed
        del identity["batch_size"], identity["seed"]
    record = read_provenance(out)
    if record is not None:
        if record.get("format") != FORMAT:
            raise ValueError(f"regenerate: {out / PROVENANCE_FILE} was not written by `specvlm regenerate`.")
        before = record["identity"]
        differ = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
        if differ:
            detail = ", ".join(f"{k}: {before.get(k)!r} there, {identity.get(k)!r} now" for k in differ)
            raise ValueError(
                f"regenerate: {out} holds a regeneration with other settings ({detail}). Use another --output-dir, "
                "or delete that folder to start over."
            )
    elif out.exists() and any(p.name != PARTIAL_DIR for p in out.iterdir()):
        raise ValueError(
            f"regenerate: {out} exists and is not a regenerated dataset; give an empty or new folder."
        )
    (out / DATA_DIR).mkdir(parents=True, exist_ok=True)

    done = _done_conversations(out)
    expected = size * settings.samples_per_prompt if size is not None else None
    run = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "draft": (draft_name or _model_name(draft)) if draft is not None else None,
        "decoding": "speculative" if draft is not None else "plain",
        "rows_before": len(done),
    }
    if record is None:
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "identity": identity,
            "target": {
                "name": identity["target"],
                "revision": identity["target_revision"],
                "class": type(target).__name__,
                "dtype": str(next(target.parameters()).dtype).removeprefix("torch."),
            },
            "source": {"name": source_name, "rows": size, "fingerprint": identity["source_fingerprint"]},
            "settings": {
                **asdict(settings),
                "generate": settings.generate_kwargs(),
                "shard_size": shard_size,
            },
            "expected_rows": expected,
            "runs": [],
        }
    record.update(status="running", library=_versions(), counts=summarize(out))
    record["runs"].append(run)
    _write_json(out / PROVENANCE_FILE, record)

    from tqdm.auto import tqdm

    # where the target's forward takes its inputs (an offloaded first module's weight is on the meta device)
    device = execution_device(targets.input_embeddings(targets.unwrap_target(target)))
    eos = _eos_ids(target, renderer.tokenizer)
    features = None
    if getattr(dataset, "features", None) is not None:
        import datasets

        features = datasets.Features({**dataset.features})
        features.update(
            source_row=datasets.Value("int64"),
            sample=datasets.Value("int64"),
            generated_tokens=datasets.Value("int64"),
            truncated_turns=datasets.Value("int64"),
        )
    features = _shard_features(out) or features
    per_shard = -(-shard_size // settings.batch_size) * settings.batch_size  # whole batches
    bar = tqdm(total=expected, initial=len(done), unit="row", desc="regenerate", disable=not progress)
    start, written, buffer = time.perf_counter(), 0, []
    sources = {row for row, _ in done}

    def finish_run() -> None:
        seconds = time.perf_counter() - start
        run.update(
            finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            rows=written,
            seconds=round(seconds, 2),
            rows_per_second=round(written / seconds, 3) if seconds > 0 else None,
        )

    def commit(rows: list[dict]) -> None:
        """Write a shard, then bring the provenance up to date (a killed run's record is one shard behind at most)."""
        nonlocal features, written
        features = _write_shard(out, rows, features)
        written += len(rows)
        sources.update(r["source_row"] for r in rows)
        counts = record["counts"]
        counts["rows"] += len(rows)
        counts["source_rows"] = len(sources)
        counts["turns"] += sum(m["role"] == "assistant" for r in rows for m in r["messages"])
        counts["generated_tokens"] += sum(r["generated_tokens"] for r in rows)
        counts["truncated_turns"] += sum(r["truncated_turns"] for r in rows)
        finish_run()
        _write_json(out / PROVENANCE_FILE, record)
        if on_shard is not None:
            on_shard(written)

    try:
        conversations = (
            _conversation(*item) for item in _pending(dataset, settings.samples_per_prompt, done)
        )
        for chunk in _chunks(conversations, settings.batch_size):
            _regenerate_chunk(target, draft, renderer, eos, chunk, settings, device)
            buffer.extend(c.output_row() for c in chunk)
            bar.update(len(chunk))
            if len(buffer) >= per_shard:
                commit(buffer)
                buffer = []
        if buffer:
            commit(buffer)
    finally:
        bar.close()
        finish_run()
        record["counts"] = summarize(out)
        _write_json(out / PROVENANCE_FILE, record)
    record["status"] = "complete"
    if expected is None:
        record["expected_rows"] = record["counts"]["rows"]
    _write_json(out / PROVENANCE_FILE, record)
    return record


__all__ = [
    "RegenerationSettings",
    "load_regenerated_dataset",
    "read_provenance",
    "regenerate_dataset",
    "source_fingerprint",
    "summarize",
]
