"""The trainer logs the draft's measured acceptance (chain of k, automatic tree) at every evaluation."""

from __future__ import annotations

import json

import datasets
import pytest

from forced_draft import expected_accepted_lengths, make_forced_draft
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.training.collator import SpecVLMDataCollator
from specvlm_hf.training.eval_acceptance import EvalAcceptance
from specvlm_hf.training.trainer import SpecVLMDistillationTrainer
from test_trainer import toy_processor, toy_vocab_llava, training_args  # noqa: F401  (module fixtures, reused)

MAX_NEW = 12


@pytest.fixture(scope="module")
def eval_rows():
    from specvlm_hf.toy.data import make_toy_rows

    return datasets.Dataset.from_list(make_toy_rows(3, seed=11, split="eval"))


def _mean(values: list[int]) -> float:
    return sum(values) / len(values)


def test_logged_acceptance_is_what_decoding_accepts(toy_vocab_llava, toy_processor, eval_rows, tmp_path):  # noqa: F811
    """A draft that proposes the target's own continuation except at one position: the logged accepted lengths
    are exactly the ones chain-of-k and tree decoding get on that prompt."""
    collator = SpecVLMDataCollator(toy_processor)
    row = eval_rows[0]
    inputs = collator.encode_prompts([(row["messages"][:1], row["images"])])
    reference = toy_vocab_llava.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)[0]
    prompt_len = inputs["input_ids"].shape[1]
    n_new = reference.shape[0] - prompt_len
    wrong = {prompt_len + 5}
    draft = make_forced_draft(toy_vocab_llava, reference, wrong, tree_depth=7, tree_total_tokens=60)
    trainer = SpecVLMDistillationTrainer(
        model=draft,
        target_model=toy_vocab_llava,
        args=training_args(tmp_path, per_device_eval_batch_size=1),
        data_collator=collator,
        eval_dataset=eval_rows.select([0]),
        eval_acceptance=EvalAcceptance(num_prompts=1, chain_tokens=4, max_new_tokens=MAX_NEW),
    )
    metrics = trainer.evaluate()
    chain = expected_accepted_lengths(prompt_len, n_new, wrong, lookahead=4)
    tree = expected_accepted_lengths(prompt_len, n_new, wrong, lookahead=7)
    assert metrics["eval_accepted_length_chain4"] == pytest.approx(_mean(chain), abs=1e-6)
    assert metrics["eval_accepted_length_tree"] == pytest.approx(_mean(tree), abs=1e-6)
    assert _mean(chain) != _mean(tree)  # the two settings are told apart
    assert draft.training is False  # evaluate leaves the draft as it found it (eval mode here)


def test_acceptance_in_training_logs_and_trainer_state(toy_vocab_llava, toy_processor, eval_rows, tmp_path):  # noqa: F811
    from specvlm_hf.toy.data import make_toy_rows

    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(toy_vocab_llava))
    args = training_args(
        tmp_path,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        per_device_eval_batch_size=2,
    )
    trainer = SpecVLMDistillationTrainer(
        model=draft,
        target_model=toy_vocab_llava,
        args=args,
        train_dataset=datasets.Dataset.from_list(make_toy_rows(4, seed=1)),
        eval_dataset=eval_rows,
        data_collator=SpecVLMDataCollator(toy_processor),
        eval_acceptance=EvalAcceptance(num_prompts=2, chain_tokens=3, max_new_tokens=8),
    )
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [e["step"] for e in evals] == [1, 2]
    for entry in evals:
        assert 1.0 <= entry["eval_accepted_length_chain3"] <= 4.0
        assert entry["eval_accepted_length_tree"] >= 1.0
        assert "eval_top1_agreement" in entry  # next to the proxy
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert [e["eval_accepted_length_chain3"] for e in saved["log_history"] if "eval_loss" in e] == [
        e["eval_accepted_length_chain3"] for e in evals
    ]


def test_no_acceptance_without_chat_rows_or_when_off(toy_vocab_llava, toy_processor, eval_rows, tmp_path):  # noqa: F811
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(toy_vocab_llava))
    trainer = SpecVLMDistillationTrainer(
        model=draft,
        target_model=toy_vocab_llava,
        args=training_args(tmp_path, per_device_eval_batch_size=3),
        data_collator=SpecVLMDataCollator(toy_processor),
        eval_dataset=eval_rows,
        eval_acceptance=None,
    )
    metrics = trainer.evaluate()
    assert "eval_top1_agreement" in metrics
    assert not any(
        key.startswith(("eval_accepted_length_chain", "eval_accepted_length_tree")) for key in metrics
    )
    assert EvalAcceptance().prompts([{"input_ids": [1, 2]}], trainer.data_collator) == []
    # measuring puts a training draft in eval mode and back
    settings = EvalAcceptance(num_prompts=1, chain_tokens=2, max_new_tokens=3, tree=False)
    draft.train()
    measured = settings.measure(draft, settings.prompts(eval_rows, trainer.data_collator))
    assert list(measured) == ["accepted_length_chain2"] and draft.training
    with pytest.raises(ValueError, match="chain_tokens"):
        EvalAcceptance(chain_tokens=0)
