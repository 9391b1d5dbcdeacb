"""Training rows as published: LLaVA / ShareGPT conversations with an image folder, streamed (training/rows.py)."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from PIL import Image

from specvlm_hf.toy.data import make_toy_rows, write_llava_json
from specvlm_hf.training.collator import SpecVLMDataCollator
from specvlm_hf.training.rows import load_training_rows, to_vision_chat


@pytest.fixture(scope="module")
def toy_processor():
    from specvlm_hf.toy.world import build_toy_processor

    return build_toy_processor(seed=0)


@pytest.fixture(scope="module")
def llava_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava")
    return folder, write_llava_json(folder, 8, seed=0, files=2)


def _pixels(image: Image.Image) -> bytes:
    return image.tobytes()


@pytest.mark.parametrize("streaming", [False, True])
def test_llava_rows_collate_like_the_vision_chat_rows_they_came_from(llava_files, toy_processor, streaming):
    folder, files = llava_files
    ds = load_training_rows(str(folder / "llava_toy-*.jsonl"), streaming=streaming)
    assert isinstance(ds, datasets.IterableDataset if streaming else datasets.Dataset)
    rows = list(ds)
    assert len(rows) == 8
    # file 0 holds rows 0, 2, 4, 6 and file 1 rows 1, 3, 5, 7 (`write_llava_json` deals them out)
    by_id = {row["id"]: row for row in rows}
    original = make_toy_rows(8, seed=0)
    collator = SpecVLMDataCollator(toy_processor)
    ours = collator([by_id["toy-000001"], by_id["toy-000004"]])
    reference = collator([{k: original[i][k] for k in ("images", "messages")} for i in (1, 4)])
    for key in ("input_ids", "attention_mask", "response_mask", "pixel_values"):
        assert torch.equal(ours[key], reference[key]), key
    assert by_id["toy-000004"]["messages"] == original[4]["messages"]
    assert _pixels(by_id["toy-000004"]["images"][0]) == _pixels(original[4]["images"][0])


def _image(folder, name, colour=(200, 10, 10)):
    Image.new("RGB", (8, 8), colour).save(folder / name)
    return name


def test_placeholders_become_image_items_in_place(tmp_path):
    a, b = _image(tmp_path, "a.png"), _image(tmp_path, "b.png", (0, 0, 200))
    row = {
        "image": [a, b],
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Compare <image> with\n<image>\nplease."},
            {"from": "gpt", "value": "The first is red."},
        ],
    }
    out = to_vision_chat(row, tmp_path)
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant"]
    assert out["messages"][1]["content"] == [
        {"type": "text", "text": "Compare"},
        {"type": "image"},
        {"type": "text", "text": "with"},
        {"type": "image"},
        {"type": "text", "text": "please."},
    ]
    assert [img.getpixel((0, 0)) for img in out["images"]] == [(200, 10, 10), (0, 0, 200)]


def test_images_without_placeholder_go_first_and_text_rows_have_none(tmp_path):
    row = {"image": _image(tmp_path, "a.png"), "conversations": [{"from": "human", "value": "What?"}]}
    out = to_vision_chat(row, tmp_path)
    assert out["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "What?"}]
    text = to_vision_chat(
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}
    )
    assert text["images"] == [] and text["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "Yo"}],
    }


def test_role_content_rows_with_image_paths(tmp_path):
    """LLaMA-Factory's sharegpt layout: string contents, `images` as paths."""
    row = {
        "images": [_image(tmp_path, "a.png")],
        "messages": [
            {"role": "user", "content": "<image>Name it."},
            {"role": "assistant", "content": "A dot."},
        ],
    }
    out = to_vision_chat(row, tmp_path)
    assert out["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "Name it."}]
    assert len(out["images"]) == 1


def test_bad_rows_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jpg.*image_folder"):
        to_vision_chat({"image": "missing.jpg", "conversations": [{"from": "human", "value": "<image>x"}]})
    a = _image(tmp_path, "a.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) but 2 '<image>' placeholder"):
        to_vision_chat(
            {"image": a, "conversations": [{"from": "human", "value": "<image><image>"}]}, tmp_path
        )
    with pytest.raises(ValueError, match="unknown conversation role 'narrator'"):
        to_vision_chat({"conversations": [{"from": "narrator", "value": "x"}]})
    with pytest.raises(ValueError, match="video"):
        to_vision_chat({"video": "a.mp4", "conversations": [{"from": "human", "value": "<video>"}]})


def test_a_json_array_file_and_a_row_cap(tmp_path):
    """LLaVA ships one JSON array (llava_v1_5_mix665k.json); `num_examples` keeps a seeded subset."""
    a = _image(tmp_path, "a.png")
    rows = [
        {
            "id": str(i),
            "image": a,
            "conversations": [{"from": "human", "value": f"<image>\nQ{i}"}, {"from": "gpt", "value": "A"}],
        }
        for i in range(6)
    ]
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(rows))
    ds = load_training_rows(path, num_examples=4)
    assert len(ds) == 4 and len({row["id"] for row in ds}) == 4
    assert ds[0]["messages"][0]["content"][0] == {"type": "image"}
    streamed = list(load_training_rows(path, streaming=True, num_examples=4))
    assert len(streamed) == 4 and len({row["id"] for row in streamed}) == 4
