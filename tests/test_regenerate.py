"""`regenerate_dataset` / `specvlm regenerate`: the target's own answers, batched, resumable, with provenance."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sharp_models import sharpen
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.training.collator import SpecVLMDataCollator
from specvlm_hf.training.regenerate import (
    PARTIAL_DIR,
    PROVENANCE_FILE,
    load_regenerated_dataset,
    read_provenance,
    regenerate_dataset,
)
from test_trainer import toy_processor, toy_vocab_llava  # noqa: F401  (module fixtures, reused)

MAX_NEW = 6


@pytest.fixture(scope="module")
def sharp_llava(toy_vocab_llava):  # noqa: F811
    """The toy-vocabulary LLaVA with sharp weights: its answers depend on the image and on every history token."""
    return sharpen(copy.deepcopy(toy_vocab_llava)).eval()


@pytest.fixture(scope="module")
def rows():
    from specvlm_hf.toy.data import make_toy_rows

    return make_toy_rows(7, seed=3)


def _multi_turn_rows(rows: list[dict]) -> list[dict]:
    """Two-turn conversations (the second turn text-only) and a one-turn row, mixed in one batch."""
    out = []
    for i, row in enumerate(rows[:3]):
        messages = copy.deepcopy(row["messages"])
        if i != 1:
            messages += [
                {"role": "user", "content": [{"type": "text", "text": "Are you sure?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
            ]
        out.append({"images": row["images"], "messages": messages})
    return out


def _greedy_answer(target, processor, messages, images) -> str:
    """The target's plain greedy answer to `messages` (batch 1), decoded as regeneration decodes it."""
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images or None, add_special_tokens=False, return_tensors="pt")
    out = target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = processor.tokenizer.eos_token_id
    if eos in new:
        new = new[: new.index(eos) + 1]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def _answers(dataset) -> dict[tuple[int, int], list[str]]:
    return {
        (r["source_row"], r["sample"]): [
            m["content"][0]["text"] for m in r["messages"] if m["role"] == "assistant"
        ]
        for r in dataset
    }


def test_multi_turn_rows_are_answered_turn_by_turn(sharp_llava, toy_processor, rows, tmp_path):  # noqa: F811
    """Each assistant turn is the target's greedy answer to the regenerated history (not the dataset's)."""
    source = _multi_turn_rows(rows)
    regenerate_dataset(
        sharp_llava,
        toy_processor,
        source,
        tmp_path / "out",
        batch_size=3,
        max_new_tokens=MAX_NEW,
        progress=False,
    )
    got = _answers(load_regenerated_dataset(tmp_path / "out"))
    assert sorted(got) == [(0, 0), (1, 0), (2, 0)]
    conditioned_on_original = 0
    for i, row in enumerate(source):
        messages, images = row["messages"], row["images"]
        first = _greedy_answer(sharp_llava, toy_processor, messages[:1], images)
        assert got[(i, 0)][0] == first != messages[1]["content"][0]["text"]
        if len(messages) == 4:
            history = messages[:1] + [{"role": "assistant", "content": [{"type": "text", "text": first}]}]
            second = _greedy_answer(sharp_llava, toy_processor, history + messages[2:3], images)
            assert got[(i, 0)][1] == second
            on_original = _greedy_answer(sharp_llava, toy_processor, messages[:3], images)
            conditioned_on_original += on_original != second
        else:
            assert len(got[(i, 0)]) == 1
    # the check can fail: the second answer depends on which first answer it follows
    assert conditioned_on_original >= 1


def test_greedy_with_draft_equals_plain(sharp_llava, toy_processor, rows, tmp_path):  # noqa: F811
    """With a draft (batched speculative decoding) the greedy answers are plain generate's, row for row."""
    torch.manual_seed(0)
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(sharp_llava)).bind(sharp_llava)
    kwargs = dict(batch_size=4, max_new_tokens=MAX_NEW, progress=False)
    regenerate_dataset(sharp_llava, toy_processor, rows, tmp_path / "plain", **kwargs)
    draft.last_generation_stats = None
    regenerate_dataset(
        sharp_llava, toy_processor, rows, tmp_path / "spec", draft=draft, draft_name="d", **kwargs
    )
    assert draft.last_generation_stats is not None  # the draft decoded
    plain, spec = (_answers(load_regenerated_dataset(tmp_path / name)) for name in ("plain", "spec"))
    assert len(plain) == len(rows) and spec == plain
    record = read_provenance(tmp_path / "spec")
    assert record["runs"][-1]["draft"] == "d" and record["runs"][-1]["decoding"] == "speculative"


class _Stop(Exception):
    pass


@pytest.mark.parametrize("temperature,samples", [(0.0, 1), (1.0, 2)])
def test_interrupted_run_resumes_without_duplicates(
    sharp_llava,
    toy_processor,  # noqa: F811
    rows,
    tmp_path,
    temperature,
    samples,
):
    """Killed after a shard (and in the middle of the next one), a rerun writes only the rest: no duplicates, and
    the same rows as an uninterrupted run (sampled answers too: every batch is seeded from its first row)."""
    kwargs = dict(
        batch_size=2,
        shard_size=2,
        max_new_tokens=MAX_NEW,
        temperature=temperature,
        samples_per_prompt=samples,
        seed=5,
        progress=False,
    )
    regenerate_dataset(sharp_llava, toy_processor, rows, tmp_path / "whole", **kwargs)
    whole = _answers(load_regenerated_dataset(tmp_path / "whole"))
    assert len(whole) == len(rows) * samples

    out = tmp_path / "cut"

    def stop(written: int) -> None:
        # the provenance on disk is current after every shard (what a SIGKILL would leave)
        assert read_provenance(out)["counts"]["rows"] == written
        if written >= 4:
            # a kill while the next shard was being written leaves a partial file behind
            (out / PARTIAL_DIR / "train-00002.parquet").write_bytes(b"PAR1 half a shard")
            raise _Stop

    with pytest.raises(_Stop):
        regenerate_dataset(sharp_llava, toy_processor, rows, out, on_shard=stop, **kwargs)
    record = read_provenance(out)
    assert record["status"] == "running" and record["counts"]["rows"] == 4
    with pytest.raises(ValueError, match="unfinished regeneration"):
        load_regenerated_dataset(out)

    record = regenerate_dataset(sharp_llava, toy_processor, rows, out, **kwargs)
    assert record["status"] == "complete"
    assert record["runs"][-1]["rows_before"] == 4 and record["runs"][-1]["rows"] == len(whole) - 4
    data = load_regenerated_dataset(out)
    pairs = list(zip(data["source_row"], data["sample"]))
    assert len(pairs) == len(set(pairs)) == len(whole)
    assert _answers(data) == whole
    if samples > 1:  # the samples of one row differ (the check above can fail)
        assert any(whole[(i, 0)] != whole[(i, 1)] for i in range(len(rows)))


def test_provenance_and_refusals(sharp_llava, toy_processor, rows, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    record = regenerate_dataset(
        sharp_llava,
        toy_processor,
        rows[:4],
        out,
        batch_size=3,
        max_new_tokens=MAX_NEW,
        target_name="org/toy",
        target_revision="abc123",
        source_name="toy-rows",
        progress=False,
    )
    on_disk = json.loads((out / PROVENANCE_FILE).read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert record["status"] == "complete" and record["expected_rows"] == 4
    assert record["target"]["name"] == "org/toy" and record["target"]["revision"] == "abc123"
    assert record["target"]["class"] == "LlavaForConditionalGeneration"
    assert record["source"]["name"] == "toy-rows" and record["source"]["rows"] == 4
    assert record["settings"]["max_new_tokens"] == MAX_NEW and record["settings"]["generate"] == {
        "do_sample": False
    }
    counts = record["counts"]
    assert counts["rows"] == counts["source_rows"] == counts["turns"] == 4
    data = load_regenerated_dataset(out)
    assert counts["generated_tokens"] == sum(data["generated_tokens"]) > 0
    assert counts["truncated_turns"] == sum(data["truncated_turns"])
    assert set(record["library"]) == {"specvlm_hf", "transformers", "torch"}
    assert record["runs"][0]["rows"] == 4 and record["runs"][0]["rows_per_second"] > 0

    # a rerun with other settings is refused before any work, naming what differs
    with pytest.raises(ValueError, match="max_new_tokens: 6 there, 7 now"):
        regenerate_dataset(sharp_llava, toy_processor, rows[:4], out, max_new_tokens=7, target_name="org/toy",
                           target_revision="abc123", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="source_fingerprint"):
        regenerate_dataset(sharp_llava, toy_processor, rows[1:5], out, max_new_tokens=MAX_NEW, target_name="org/toy",
                           target_revision="abc123", progress=False)  # fmt: skip
    # a complete run rerun does nothing
    again = regenerate_dataset(sharp_llava, toy_processor, rows[:4], out, batch_size=3, max_new_tokens=MAX_NEW,
                               target_name="org/toy", target_revision="abc123", progress=False)  # fmt: skip
    assert again["runs"][-1]["rows"] == 0 and again["counts"] == counts

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a regenerated dataset"):
        regenerate_dataset(sharp_llava, toy_processor, rows[:2], foreign, progress=False)


def test_bad_arguments_fail_before_work(sharp_llava, toy_processor, rows, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="identical greedy answers"):
        regenerate_dataset(sharp_llava, toy_processor, rows, tmp_path / "a", samples_per_prompt=2)
    with pytest.raises(ValueError, match="no 'messages' column"):
        regenerate_dataset(sharp_llava, toy_processor, [{"text": "hi"}], tmp_path / "b")
    with pytest.raises(ValueError, match="batch_size"):
        regenerate_dataset(sharp_llava, toy_processor, rows, tmp_path / "c", batch_size=0)
    done = [dict(r, source_row=0) for r in rows]
    with pytest.raises(ValueError, match="regenerated"):
        regenerate_dataset(sharp_llava, toy_processor, done, tmp_path / "d")
    assert not any((tmp_path / name).exists() for name in "abcd")
    with pytest.raises(ValueError, match="specvlm regenerate"):
        SpecVLMDataCollator(toy_processor, regenerate_with_target=sharp_llava)


def test_output_trains_as_a_dataset(sharp_llava, toy_processor, rows, tmp_path):  # noqa: F811
    """The folder is what `specvlm train --dataset DIR` reads (`toy.demo.load_rows`), and the collator's response
    tokens are the regenerated answers."""
    from specvlm_hf.toy.demo import load_rows

    out = tmp_path / "out"
    regenerate_dataset(sharp_llava, toy_processor, rows[:3], out, max_new_tokens=MAX_NEW, progress=False)
    data = load_rows(str(out), 100)
    assert len(data) == 3 and {"images", "messages", "task", "source_row"} <= set(data.column_names)
    batch = SpecVLMDataCollator(toy_processor)([data[i] for i in range(3)])
    tok = toy_processor.tokenizer
    for b in range(3):
        response = tok.decode(
            batch["input_ids"][b][batch["response_mask"][b].bool()], skip_special_tokens=True
        )
        assert response.strip() == data[b]["messages"][1]["content"][0]["text"]
