from __future__ import annotations

import time

import pytest
import torch

from specvlm_hf.toy.data import make_toy_dataset, make_toy_rows
from specvlm_hf.toy.world import (
    NUM_IMAGE_TOKENS,
    build_toy_processor,
    collate_toy_batch,
    encode_toy_rows,
    load_toy_target,
    toy_cache_dir,
    toy_generate_inputs,
    toy_prompts,
    widen_toy_target,
)


@pytest.fixture(scope="session")
def toy_cache():
    """The shared toy cache (`$SPECVLM_HF_CACHE` or ~/.cache/specvlm_hf), where `specvlm demo` keeps the target:
    training it takes ~5 minutes, so the suite trains it at most once per machine, as the demo does (CI runs the
    demo first)."""
    return toy_cache_dir()


@pytest.fixture(scope="session")
def toy_target(toy_cache):
    """The tiny target, loaded from the shared cache (trained there on first use)."""
    return load_toy_target("tiny", cache_dir=toy_cache, seed=0, progress=False)


def _texts(rows):
    return [(r["messages"][0]["content"][1]["text"], r["messages"][1]["content"][0]["text"]) for r in rows]


def test_dataset_is_deterministic_under_seed():
    a, b = make_toy_dataset(24, seed=3), make_toy_dataset(24, seed=3)
    assert a["messages"] == b["messages"]
    assert [r[0].tobytes() for r in a["images"]] == [r[0].tobytes() for r in b["images"]]
    c = make_toy_dataset(24, seed=4)
    assert a["messages"] != c["messages"]
    row = a[0]
    assert row["messages"][0]["content"][0]["type"] == "image"
    assert row["images"][0].size == (96, 96)


def test_dataset_has_varied_questions_and_answers():
    rows = make_toy_rows(400, seed=0)
    pairs = _texts(rows)
    assert len({q for q, _ in pairs}) > 50
    assert len({a for _, a in pairs}) > 250
    tasks = {r["task"] for r in rows}
    assert {"describe", "count_colour", "at_position", "why_compare"} <= tasks
    # Several phrasings of the same kind of answer: descriptions open in at least three ways.
    openings = {" ".join(a.split()[:2]) for (_, a), r in zip(pairs, rows) if r["task"] == "describe"}
    assert len(openings) >= 3
    assert any("because" in a for _, a in pairs)
    # Train and eval streams are independent.
    assert _texts(toy_prompts(20, seed=0)) != _texts(make_toy_rows(20, seed=0))


def test_processor_round_trip(tmp_path):
    from transformers import LlavaProcessor

    processor = build_toy_processor(seed=0)
    tokenizer = processor.tokenizer
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {"<s>", "</s>", "<pad>"}
    text = "How many red shapes are there? There are two red shapes."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text

    row = toy_prompts(1, seed=0)[0]
    inputs = toy_generate_inputs(processor, row)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert (inputs["input_ids"] == image_id).sum().item() == NUM_IMAGE_TOKENS
    assert inputs["pixel_values"].shape == (1, 3, 96, 96)
    assert tokenizer.decode(inputs["input_ids"][0]).endswith("ASSISTANT:")

    prompt = processor.apply_chat_template(row["messages"][:1], add_generation_prompt=True, tokenize=False)
    direct = processor(images=row["images"], text=prompt, return_tensors="pt")
    assert torch.equal(direct["input_ids"], inputs["input_ids"])
    assert torch.equal(direct["pixel_values"], inputs["pixel_values"])

    processor.save_pretrained(tmp_path)
    loaded = LlavaProcessor.from_pretrained(tmp_path)
    again = toy_generate_inputs(loaded, row)
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    assert torch.allclose(again["pixel_values"], inputs["pixel_values"])
    assert loaded.tokenizer.chat_template == tokenizer.chat_template

    # Training labels cover the answer (and its eos) only.
    enc = encode_toy_rows(processor, [row])[0]
    answer_ids = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != -100]
    assert answer_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer_ids[:-1]).strip() == row["messages"][1]["content"][0]["text"]


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECVLM_HF_CACHE", str(tmp_path / "env"))
    assert toy_cache_dir() == tmp_path / "env"
    assert toy_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("SPECVLM_HF_CACHE")
    assert toy_cache_dir().parts[-2:] == (".cache", "specvlm_hf")


def test_tiny_target_is_cached(toy_target, toy_cache):
    model, processor = toy_target
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(processor, LlavaProcessor)
    start = time.perf_counter()
    again, _ = load_toy_target("tiny", cache_dir=toy_cache, seed=0, progress=False)
    assert time.perf_counter() - start < 30  # loaded, not retrained
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name


def _loss(model, processor, rows, shuffle: bool) -> float:
    enc = encode_toy_rows(processor, rows)
    pixels = processor.image_processor(images=[r["images"][0] for r in rows], return_tensors="pt")[
        "pixel_values"
    ]
    if shuffle:
        pixels = pixels.roll(1, dims=0)
    batch = collate_toy_batch(enc, pixels, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        return model(**batch).loss.item()


def test_tiny_target_looks_at_the_image(toy_target):
    model, processor = toy_target
    rows = toy_prompts(64, seed=1)
    right, shuffled = _loss(model, processor, rows, False), _loss(model, processor, rows, True)
    assert shuffled > right + 0.1, (right, shuffled)


def test_tiny_target_generates_answers(toy_target):
    model, processor = toy_target
    eos = processor.tokenizer.eos_token_id
    for row in toy_prompts(4, seed=2):
        inputs = toy_generate_inputs(processor, row)
        out = model.generate(**inputs, max_new_tokens=96, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        assert new[-1].item() == eos
        text = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        assert len(text.split()) >= 1 and text[-1] in ".?!"


def test_widened_target_preserves_tiny_function(toy_target):
    tiny, processor = toy_target
    wide = widen_toy_target(tiny, dims={"hidden": 256, "intermediate": 704, "heads": 8, "layers": 6})
    row = toy_prompts(1, seed=4)[0]
    inputs = toy_generate_inputs(processor, row)
    with torch.no_grad():
        la, lb = tiny(**inputs).logits, wide(**inputs).logits
    assert torch.allclose(la, lb, atol=1e-4), (la - lb).abs().max()
    a = tiny.generate(**inputs, max_new_tokens=32, do_sample=False)
    assert torch.equal(a, wide.generate(**inputs, max_new_tokens=32, do_sample=False))


@pytest.mark.slow
def test_medium_target_preserves_tiny_greedy_output(toy_target):
    tiny, processor = toy_target
    medium = widen_toy_target(tiny, "medium")
    assert sum(p.numel() for p in medium.parameters()) >= 100_000_000
    assert medium.config.text_config.num_hidden_layers == 12
    for row in toy_prompts(3, seed=3):
        inputs = toy_generate_inputs(processor, row)
        a = tiny.generate(**inputs, max_new_tokens=48, do_sample=False)
        b = medium.generate(**inputs, max_new_tokens=48, do_sample=False)
        assert torch.equal(a, b)
    with torch.no_grad():
        inputs = toy_generate_inputs(processor, toy_prompts(1, seed=4)[0])
        la, lb = tiny(**inputs).logits, medium(**inputs).logits
    assert torch.allclose(la, lb, atol=1e-4), (la - lb).abs().max()


def test_stratified_prompts_follow_the_task_weights():
    from specvlm_hf.toy.data import TASKS, task_counts

    for n in (1, 4, 16, 50):
        counts = task_counts(n)
        assert sum(counts.values()) == n
        total = sum(w for _, w in TASKS.values())
        for name, (_, weight) in TASKS.items():
            assert abs(counts[name] - n * weight / total) < 1, (n, name)
    rows = toy_prompts(16, seed=0)
    assert sorted(r["task"] for r in rows) == sorted(t for t, c in task_counts(16).items() for _ in range(c))
    assert _texts(toy_prompts(16, seed=0)) == _texts(rows)  # deterministic
    assert _texts(toy_prompts(16, seed=1)) != _texts(rows)
    assert len(toy_prompts(16, seed=0, stratified=False)) == 16
