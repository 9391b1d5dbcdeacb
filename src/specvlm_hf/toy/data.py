"""Procedural images and question/answer tasks for the toy VLM world.

An image is a 3x3 grid of 32x32-pixel cells (96x96 pixels). Each cell is empty or holds one shape
(circle, square, triangle) in one of six colours and one of two sizes, drawn with a little jitter.
Tasks ask for a detailed description, counts, the colour or shape at a position, existence, and
comparisons with an explanation ("why"). Every answer depends on the image, and questions and answers
come in several phrasings and orders, so the text has real entropy (a draft cannot memorise it).

Rows use the common vision-chat format::

    {"images": [PIL.Image], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}

Everything is deterministic under a seed (``random.Random(seed)``, no global state).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

GRID = 3
CELL = 32
IMAGE_SIZE = GRID * CELL

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
POSITIONS = (
    ("top left", "upper left", "top-left corner"),
    ("top middle", "top center", "top edge"),
    ("top right", "upper right", "top-right corner"),
    ("middle left", "left edge", "center left"),
    ("center", "middle", "very center"),
    ("middle right", "right edge", "center right"),
    ("bottom left", "lower left", "bottom-left corner"),
    ("bottom middle", "bottom center", "bottom edge"),
    ("bottom right", "lower right", "bottom-right corner"),
)
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class ToyObject:
    cell: int  # 0..8, row-major from the top left
    shape: str
    colour: str
    size: str

    def phrase(self, with_size: bool = True) -> str:
        size = f"{self.size} " if with_size else ""
        return f"{size}{self.colour} {self.shape}"


@dataclass(frozen=True)
class ToyScene:
    objects: tuple[ToyObject, ...]
    jitter: tuple[tuple[int, int], ...]  # per cell pixel offset of the shape centre

    def at(self, cell: int) -> ToyObject | None:
        for obj in self.objects:
            if obj.cell == cell:
                return obj
        return None

    def cell_labels(self) -> list[tuple[int, int, int]]:
        """Per cell (shape index, colour index, size index), 0 meaning empty."""
        labels = []
        for cell in range(GRID * GRID):
            obj = self.at(cell)
            if obj is None:
                labels.append((0, 0, 0))
            else:
                labels.append(
                    (
                        SHAPES.index(obj.shape) + 1,
                        COLOUR_NAMES.index(obj.colour) + 1,
                        SIZES.index(obj.size) + 1,
                    )
                )
        return labels


def random_scene(rng: random.Random) -> ToyScene:
    n_objects = rng.randint(1, 7)
    cells = sorted(rng.sample(range(GRID * GRID), n_objects))
    objects = tuple(
        ToyObject(cell, rng.choice(SHAPES), rng.choice(COLOUR_NAMES), rng.choice(SIZES)) for cell in cells
    )
    jitter = tuple((rng.randint(-3, 3), rng.randint(-3, 3)) for _ in range(GRID * GRID))
    return ToyScene(objects, jitter)


def render_scene(scene: ToyScene) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    for i in range(1, GRID):  # faint grid lines
        draw.line([(i * CELL, 0), (i * CELL, IMAGE_SIZE)], fill=(215, 215, 215))
        draw.line([(0, i * CELL), (IMAGE_SIZE, i * CELL)], fill=(215, 215, 215))
    for obj in scene.objects:
        row, col = divmod(obj.cell, GRID)
        dx, dy = scene.jitter[obj.cell]
        cx, cy = col * CELL + CELL // 2 + dx, row * CELL + CELL // 2 + dy
        r = 11 if obj.size == "large" else 6
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


# ----------------------------------------------------------------------------------------------
# Tasks: each returns (question, answer) for a scene, drawing phrasing choices from rng.
# ----------------------------------------------------------------------------------------------


def _pos(cell: int, rng: random.Random) -> str:
    return rng.choice(POSITIONS[cell])


def _num(n: int, rng: random.Random) -> str:
    return str(n) if rng.random() < 0.5 else NUMBER_WORDS[n]


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def _describe(scene: ToyScene, rng: random.Random) -> tuple[str, str]:
    question = rng.choice(
        (
            "Describe the image in detail.",
            "What do you see in this picture?",
            "Give a detailed description of the image.",
            "Describe every shape in the grid.",
            "Can you describe this image?",
        )
    )
    objs = list(scene.objects)
    n = len(objs)
    style = rng.randrange(3)
    if rng.random() < 0.3:  # grouped by colour instead of reading order
        objs.sort(key=lambda o: (COLOUR_NAMES.index(o.colour), o.cell))
    if style == 0:
        parts = [f"The image shows a three by three grid with {_num(n, rng)} {_plural('shape', n)}."]
        for obj in objs:
            parts.append(f"In the {_pos(obj.cell, rng)} cell there is a {obj.phrase()}.")
        empty = GRID * GRID - n
        parts.append(f"The other {_num(empty, rng)} {_plural('cell', empty)} are empty." if empty else "")
        answer = " ".join(p for p in parts if p)
    elif style == 1:
        items = [f"a {obj.phrase()} at the {_pos(obj.cell, rng)}" for obj in objs]
        listed = items[0] if n == 1 else ", ".join(items[:-1]) + " and " + items[-1]
        answer = (
            f"There {'is' if n == 1 else 'are'} {_num(n, rng)} {_plural('shape', n)} on the grid: {listed}."
        )
    else:
        sentences = []
        for i, obj in enumerate(objs):
            lead = "First" if i == 0 else rng.choice(("Next", "Then", "Also"))
            sentences.append(f"{lead}, the {_pos(obj.cell, rng)} holds a {obj.phrase()}.")
        answer = f"This picture contains {_num(n, rng)} coloured {_plural('shape', n)}. " + " ".join(
            sentences
        )
    return question, answer


def _count_colour(scene: ToyScene, rng: random.Random) -> tuple[str, str]:
    colour = rng.choice(COLOUR_NAMES)
    n = sum(o.colour == colour for o in scene.objects)
    question = rng.choice(
        (
            f"How many {colour} shapes are there?",
            f"Count the {colour} shapes.",
            f"How many shapes are {colour}?",
        )
    )
    style = rng.randrange(3)
    if style == 0:
        answer = f"There {'is' if n == 1 else 'are'} {_num(n, rng)} {colour} {_plural('shape', n)}."
    elif style == 1:
        answer = f"{_num(n, rng).capitalize()}."
    else:
        answer = f"I count {_num(n, rng)} {colour} {_plural('shape', n)} in the image."
    return question, answer


def _count_shape(scene: ToyScene, rng: random.Random) -> tuple[str, str]:
    shape = rng.choice(SHAPES)
    n = sum(o.shape == shape for o in scene.objects)
    question = rng.choice(
        (
            f"How many {shape}s are in the image?",
            f"Count the {shape}s.",
            f"How many {shape}s can you see?",
        )
    )
    if rng.random() < 0.5:
        answer = f"There {'is' if n == 1 else 'are'} {_num(n, rng)} {_plural(shape, n)}."
    else:
        answer = f"I can see {_num(n, rng)} {_plural(shape, n)}."
    return question, answer


def _count_total(scene: ToyScene, rng: random.Random) -> tuple[str, str]:
    n = len(scene.objects)
    question = rng.choice(
        ("How many shapes are there in total?", "How many objects are in the grid?", "Count all the shapes.")
    )
    answer = rng.choice(
        (
            f"There are {_num(n, rng)} {_plural('shape', n)} in total.",
            f"{_num(n, rng).capitalize()} {_plural('shape', n)}, and {_num(9 - n, rng)} empty cells.",
        )
    )
    return question, answer


def _at_position(scene: ToyScene, rng: random.Random) -> tuple[str, str]:
    # Ask mostly about occupied cells so the answers are informative.
    if scene.objects and rng.random() < 0.8:
        cell = rng.choice(scene.objects).cell
    else:
        cell = rng.randrange(GRID * GRID)
    obj = scene.at(cell)
    where = _pos(cell, rng)
    kind = rng.randrange(3)
    if kind == 0:
        question = rng.choice(
            (f"What colour is the shape at the {where}?", f"Which colour does the {where} shape have?")
        )
    elif kind == 1:
        question = rng.choice((f"What shape is at the {where}?", f"Which shape is in the {where} cell?"))
    else:
        question = rng.choice((f"What is in the {where} cell?", f"What is at the {where}?"))
    if obj is None:
        answer = rng.choice((f"The {where} cell is empty.", f"There is no shape at the {where}."))
    elif kind == 0:
        answer = rng.choice(
            (f"It is {obj.colour}.", f"The shape at the {where} is {obj.colour}; it is a {obj.phrase()}.")
        )
    elif kind == 1:
        answer = rng.choice((f"It is a {obj.shape}.", f"A {obj.phrase()} sits at the {where}."))
    else:
        answer = rng.choice((f"A {obj.phrase()}.", f"The {where} cell holds a {obj.phrase()}."))
    return question, answer


def _exists(scene: ToyScene, rng: random.Random) -> tuple[str, str]:
    if scene.objects and rng.random() < 0.5:
        target = rng.choice(scene.objects)
        colour, shape = target.colour, target.shape
    else:
        colour, shape = rng.choice(COLOUR_NAMES), rng.choice(SHAPES)
    matches = [o for o in scene.objects if o.colour == colour and o.shape == shape]
    question = rng.choice((f"Is there a {colour} {shape}?", f"Does the image contain a {colour} {shape}?"))
    if matches:
        where = " and ".join(f"the {_pos(o.cell, rng)}" for o in matches)
        answer = rng.choice(
            (
                f"Yes, there is a {colour} {shape} at {where}.",
                f"Yes. You can find it at {where}.",
            )
        )
    else:
        answer = rng.choice(
            (f"No, there is no {colour} {shape} in the image.", f"No. The grid has no {colour} {shape}.")
        )
    return question, answer


def _why_compare(scene: ToyScene, rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(SHAPES, 2)
    na = sum(o.shape == a for o in scene.objects)
    nb = sum(o.shape == b for o in scene.objects)
    question = rng.choice(
        (
            f"Are there more {a}s than {b}s? Explain why.",
            f"Why would you say there are more {a}s than {b}s, or not?",
        )
    )
    counts = f"there {'is' if na == 1 else 'are'} {_num(na, rng)} {_plural(a, na)} and {_num(nb, rng)} {_plural(b, nb)}"
    if na > nb:
        verdict = "Yes"
        reason = f"{a}s outnumber {b}s"
    elif na < nb:
        verdict = "No"
        reason = f"the {b}s are more numerous"
    else:
        verdict = "No"
        reason = "the two counts are equal"
    answer = rng.choice(
        (
            f"{verdict}, because {counts}, so {reason}.",
            f"{verdict}. Counting the grid, {counts}; therefore {reason}.",
        )
    )
    return question, answer


def _why_colour(scene: ToyScene, rng: random.Random) -> tuple[str, str]:
    counts = {c: sum(o.colour == c for o in scene.objects) for c in COLOUR_NAMES}
    best = max(counts.values())
    winners = [c for c in COLOUR_NAMES if counts[c] == best]
    question = rng.choice(
        (
            "Which colour appears most often? Explain why.",
            "What is the most common colour, and why?",
        )
    )
    if len(winners) == 1:
        c = winners[0]
        answer = rng.choice(
            (
                f"{c.capitalize()} appears most often, because there {'is' if best == 1 else 'are'} "
                f"{_num(best, rng)} {c} {_plural('shape', best)} and every other colour appears less.",
                f"The most common colour is {c}: it is used by {_num(best, rng)} {_plural('shape', best)}, "
                "more than any other colour.",
            )
        )
    else:
        listed = ", ".join(winners[:-1]) + " and " + winners[-1]
        answer = (
            f"No single colour wins, because {listed} each appear {_num(best, rng)} "
            f"{'time' if best == 1 else 'times'}."
        )
    return question, answer


TASKS = {
    "describe": (_describe, 0.3),
    "count_colour": (_count_colour, 0.1),
    "count_shape": (_count_shape, 0.08),
    "count_total": (_count_total, 0.07),
    "at_position": (_at_position, 0.2),
    "exists": (_exists, 0.1),
    "why_compare": (_why_compare, 0.08),
    "why_colour": (_why_colour, 0.07),
}


def make_row(scene: ToyScene, image: Image.Image, rng: random.Random, task: str | None = None) -> dict:
    """One vision-chat row for ``scene``; ``task`` picks a task by name, else a weighted random one."""
    if task is None:
        names = list(TASKS)
        task = rng.choices(names, weights=[TASKS[n][1] for n in names])[0]
    question, answer = TASKS[task][0](scene, rng)
    return {
        "images": [image],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "task": task,
    }


def make_toy_rows(n: int, seed: int = 0, questions_per_image: int = 1, split: str = "train") -> list[dict]:
    """``n`` rows, ``questions_per_image`` consecutive rows sharing one image.

    Deterministic in ``(seed, split)``; different splits draw from independent streams.
    """
    rng = random.Random(f"specvlm-toy-rows-{split}-{seed}")
    rows: list[dict] = []
    while len(rows) < n:
        scene = random_scene(rng)
        image = render_scene(scene)
        for _ in range(min(questions_per_image, n - len(rows))):
            rows.append(make_row(scene, image, rng))
    return rows


def task_counts(n: int) -> dict[str, int]:
    """How many of ``n`` rows each task gets in proportion to its weight (largest remainder; sums to ``n``)."""
    total = sum(weight for _, weight in TASKS.values())
    exact = {name: n * weight / total for name, (_, weight) in TASKS.items()}
    counts = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(TASKS, key=lambda name: (counts[name] - exact[name], list(TASKS).index(name)))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts


def make_stratified_rows(n: int, seed: int = 0, split: str = "eval") -> list[dict]:
    """``n`` rows whose tasks follow the task weights exactly (`task_counts`), in a seeded random order, one image
    each. An evaluation set drawn this way has the toy world's task mix at any size; a small random draw does not
    (16 draws from seed 0 hold 2 descriptions where the weights say 4.8)."""
    rng = random.Random(f"specvlm-toy-stratified-{split}-{seed}")
    tasks = [name for name, count in task_counts(n).items() for _ in range(count)]
    rng.shuffle(tasks)
    rows = []
    for task in tasks:
        scene = random_scene(rng)
        rows.append(make_row(scene, render_scene(scene), rng, task=task))
    return rows


def make_toy_dataset(n: int, seed: int = 0, split: str = "train"):
    """A ``datasets.Dataset`` of ``n`` vision-chat rows (columns ``images``, ``messages``, ``task``)."""
    import datasets

    rows = make_toy_rows(n, seed, split=split)
    return datasets.Dataset.from_list(rows)


def write_llava_json(
    folder, n: int, seed: int = 0, split: str = "train", files: int = 1, name: str = "llava_toy"
) -> list:
    """Write ``n`` toy rows as a LLaVA-format dataset: PNG images under ``folder/images`` and ``files`` JSONL files
    ``folder/{name}-{i}.jsonl`` of ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", "value": ...}]}`` rows (image paths relative to ``folder``). Returns the file paths."""
    import json
    from pathlib import Path

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}-{i}.jsonl" for i in range(files)]
    handles = [p.open("w", encoding="utf-8") for p in paths]
    try:
        for i, row in enumerate(make_toy_rows(n, seed, split=split)):
            image = f"images/{split}-{seed}-{i:06d}.png"
            row["images"][0].save(folder / image)
            question = row["messages"][0]["content"][1]["text"]
            answer = row["messages"][1]["content"][0]["text"]
            record = {
                "id": f"toy-{i:06d}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
            }
            handles[i % files].write(json.dumps(record) + "\n")
    finally:
        for handle in handles:
            handle.close()
    return paths


def toy_text_corpus(n: int, seed: int = 0) -> list[str]:
    """Questions and answers of ``n`` rows (for training the toy tokenizer)."""
    rng = random.Random(f"specvlm-toy-corpus-{seed}")
    texts = []
    for _ in range(n):
        scene = random_scene(rng)
        for task in TASKS:
            question, answer = TASKS[task][0](scene, rng)
            texts.append(question)
            texts.append(answer)
    return texts
