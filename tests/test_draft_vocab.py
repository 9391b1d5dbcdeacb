"""Reduced draft vocabulary (EAGLE-3 style): lossless decoding, exact sampling, saving, and training."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel

import specvlm_hf  # noqa: F401  (registers the Auto classes)
from forced_draft import ForcedDraft, expected_accepted_lengths
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.sharing.hub import save_for_hub
from specvlm_hf.training.losses import draft_vocab_soft_cross_entropy, top1_agreement
from specvlm_hf.training.trainer import SpecVLMDistillationTrainer, count_response_tokens, select_draft_vocab
from test_decoding_sampling import (  # noqa: F401  (fixtures)
    N_SAMPLES,
    _assert_same_law,
    _sample_counts,
    peaked_target,
    plain_runs,
)
from test_trainer import collate_tensors, family_rows, training_args
from tiny_models import FAMILIES, VOCAB_SIZE, make_inputs, make_tiny_target

DRAFT_VOCAB = 64


def reduced_draft(model, size: int = DRAFT_VOCAB, ids=None, seed: int = 0, **overrides) -> SpecVLMDraftModel:
    torch.manual_seed(seed)
    config = SpecVLMDraftConfig.from_target(model, draft_vocab_size=size, **overrides)
    draft = SpecVLMDraftModel(config).bind(model)
    if ids is None:
        ids = torch.randperm(config.vocab_size)[:size]
    return draft.set_draft_vocab(ids)


# ------------------------------------------------------------------------------------------------ model
def test_draft_logits_and_full_vocab_logits():
    model = make_tiny_target("llama")
    ids = torch.randperm(VOCAB_SIZE)[:DRAFT_VOCAB]
    draft = reduced_draft(model, ids=ids)
    assert draft.has_draft_vocab_map
    hidden = torch.randn(3, model.config.hidden_size)
    logits, got_ids = draft.draft_logits(hidden)
    assert logits.shape == (3, DRAFT_VOCAB) and torch.equal(got_ids, ids)
    full = draft.compute_logits(hidden)
    assert full.shape == (3, VOCAB_SIZE)
    assert torch.equal(full[:, ids], logits)
    outside = torch.ones(VOCAB_SIZE, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(full[:, outside]).all()
    # full-vocabulary drafts: the target's lm_head, no ids
    plain = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
    logits, got_ids = plain.draft_logits(hidden)
    assert got_ids is None and logits.shape == (3, VOCAB_SIZE)
    assert not plain.has_draft_vocab_map and not hasattr(plain, "draft_vocab_ids")
    with pytest.raises(ValueError, match="full target vocabulary"):
        plain.set_draft_vocab(ids)
    with pytest.raises(ValueError, match="distinct"):
        draft.set_draft_vocab(torch.zeros(DRAFT_VOCAB, dtype=torch.long))
    with pytest.raises(ValueError, match="expected draft_vocab_size"):
        draft.set_draft_vocab(ids[:-1])


def test_set_draft_vocab_can_start_from_target_head():
    model = make_tiny_target("llama")
    ids = torch.arange(5, 5 + DRAFT_VOCAB)
    draft = reduced_draft(model, ids=torch.arange(DRAFT_VOCAB)).set_draft_vocab(ids, init_from_target=True)
    hidden = torch.randn(2, model.config.hidden_size)
    torch.testing.assert_close(draft.draft_logits(hidden)[0], model.lm_head(hidden)[:, ids])


# ------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_vocab_greedy_equals_plain(family):
    torch.manual_seed(0)
    model = make_tiny_target(family)
    draft = reduced_draft(model)
    inputs = make_inputs(family, model, seed=1)
    n = 12
    reference = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    allowed = set(draft.draft_vocab_ids.tolist())
    for mode in ("tree", "chain"):
        out = model.generate(
            **inputs, max_new_tokens=n, do_sample=False, assistant_model=draft, decoding_mode=mode
        )
        assert torch.equal(out, reference), f"{family}/{mode}"
        assert draft.last_generation_stats.new_tokens == n
    # tree nodes only ever carry draft-vocabulary tokens
    from specvlm_hf.generation import tree_policy as tree_module

    seen = []
    original = tree_module._select_tree

    def spy(root_token, tokens, *args):
        seen.append(tokens.clone())
        return original(root_token, tokens, *args)

    tree_module._select_tree = spy
    try:
        model.generate(  # a fixed budget: every step builds a tree (an automatic one may back off)
            **inputs,
            max_new_tokens=6,
            do_sample=False,
            assistant_model=draft,
            decoding_mode="tree",
            tree_top_k=4,
        )
    finally:
        tree_module._select_tree = original
    assert seen and all(set(t.tolist()) <= allowed for t in seen)


class ReducedForcedDraft(ForcedDraft):
    """The forced draft of forced_draft.py, seen through a reduced vocabulary: its columns are draft_vocab_ids."""

    def draft_logits(self, hidden):
        full = ForcedDraft.compute_logits(self, hidden)  # (..., V): point mass on the reference token
        return full[..., self.draft_vocab_ids], self.draft_vocab_ids


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_forced_draft_with_reduced_vocab(mode):
    model = make_tiny_target("llava")
    n, lookahead = 24, 4
    inputs = make_inputs("llava", model, seed=3)
    reference = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    continuation = reference[0, prompt_len:].tolist()
    wrong = {prompt_len + 5, prompt_len + 14}
    # one continuation token is left out of the draft vocabulary: wherever it comes, the draft cannot propose it
    excluded = continuation[9]
    missing = {prompt_len + i for i, t in enumerate(continuation) if t == excluded and i > 0}
    vocab = {t for t in continuation if t != excluded} | {
        (reference[0, w].item() + 1) % VOCAB_SIZE for w in wrong
    }
    vocab.discard(excluded)
    vocab = sorted(vocab) + [t for t in range(VOCAB_SIZE) if t not in vocab and t != excluded]
    config = SpecVLMDraftConfig.from_target(model, draft_vocab_size=DRAFT_VOCAB)
    draft = ReducedForcedDraft(config).bind(model).force(reference[0], wrong)
    draft.set_draft_vocab(vocab[:DRAFT_VOCAB])
    settings = dict(tree_depth=lookahead, tree_top_k=3, tree_total_tokens=10, num_draft_tokens=lookahead)
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, assistant_model=draft, decoding_mode=mode, **settings
    )
    assert torch.equal(out, reference)
    expected = expected_accepted_lengths(prompt_len, n, wrong | missing, lookahead)
    assert draft.last_generation_stats.accepted_lengths == expected


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_sampling_with_reduced_vocab_matches_plain(peaked_target, plain_runs, mode):  # noqa: F811
    model = peaked_target
    config = SpecVLMDraftConfig.from_target(
        model, draft_vocab_size=6, tree_top_k=4, tree_depth=3, tree_total_tokens=8
    )
    torch.manual_seed(0)
    draft = SpecVLMDraftModel(config).bind(model).set_draft_vocab([1, 2, 4, 5, 7, 10])
    with torch.no_grad():
        draft.fc.weight.mul_(5.0)
        draft.draft_lm_head.weight.mul_(20.0)  # confident proposals: the hard case for rejection sampling
    torch.manual_seed(3)
    spec = _sample_counts(model, N_SAMPLES, assistant_model=draft, decoding_mode=mode, temperature=0.9)
    _assert_same_law(spec, plain_runs)


# ---------------------------------------------------------------------------------------------- saving
def test_index_map_round_trips(tmp_path):
    model = make_tiny_target("llava")
    ids = torch.randperm(VOCAB_SIZE)[:DRAFT_VOCAB]
    draft = reduced_draft(model, ids=ids)
    draft.save_pretrained(tmp_path / "plain")
    with safe_open(str(tmp_path / "plain" / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("draft_vocab_ids"), ids)
    loaded = SpecVLMDraftModel.from_pretrained(tmp_path / "plain", target=model)
    assert loaded.config.draft_vocab_size == DRAFT_VOCAB
    assert torch.equal(loaded.draft_vocab_ids, ids)
    assert torch.equal(loaded.draft_lm_head.weight, draft.draft_lm_head.weight)
    folder = save_for_hub(draft, tmp_path / "hub")
    assert f"{DRAFT_VOCAB} most frequent target tokens" in (folder / "README.md").read_text()
    auto = AutoModel.from_pretrained(folder)
    assert isinstance(auto, SpecVLMDraftModel)
    assert torch.equal(auto.draft_vocab_ids, ids)
    hidden = torch.randn(2, draft.config.hidden_size)
    auto.bind(model)
    torch.testing.assert_close(auto.compute_logits(hidden), draft.compute_logits(hidden))


# ------------------------------------------------------------------------------------------- training
def test_draft_vocab_soft_cross_entropy_hand_computed():
    # restricted target: logits [ln 2, ln 3] at ids [1, 2] -> p_d = [2/5, 3/5]; draft logits [0, ln 3] -> q = [1/4, 3/4]
    target = torch.tensor([[5.0, math.log(2), math.log(3), -1.0]])
    draft = torch.tensor([[0.0, math.log(3)]], requires_grad=True)
    ce = draft_vocab_soft_cross_entropy(target, draft, torch.tensor([1, 2]))
    expected = -(0.4 * math.log(0.25) + 0.6 * math.log(0.75))  # 0.727127
    assert ce.item() == pytest.approx(expected, abs=1e-6)
    ce.backward()
    assert draft.grad is not None
    # agreement maps the draft column to its target id: column 1 is token 2, the target argmax is token 0
    assert top1_agreement(draft, target, draft_vocab_ids=torch.tensor([1, 2])).item() == 0.0
    assert top1_agreement(draft, target, draft_vocab_ids=torch.tensor([1, 0])).item() == 1.0


def test_select_draft_vocab():
    counts = torch.tensor([0, 5, 1, 5, 0, 9])
    assert select_draft_vocab(counts, 3).tolist() == [1, 3, 5]
    # fewer distinct tokens than the draft vocabulary: padded with the remaining ids, lowest first
    assert select_draft_vocab(counts, 6).tolist() == [0, 1, 2, 3, 4, 5]
    assert select_draft_vocab(torch.tensor([0, 0, 2, 0]), 2).tolist() == [0, 2]


def test_trainer_builds_map_and_trains_head(tmp_path):
    target = make_tiny_target("llava", seed=0)
    rows = family_rows("llava", target) * 20
    torch.manual_seed(0)
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(target, draft_vocab_size=DRAFT_VOCAB))
    assert not draft.has_draft_vocab_map
    trainer = SpecVLMDistillationTrainer(
        draft,
        target,
        training_args(tmp_path, max_steps=24, logging_steps=3),
        data_collator=collate_tensors,
        train_dataset=rows,
    )
    assert draft.has_draft_vocab_map
    counts = count_response_tokens(rows, collate_tensors, VOCAB_SIZE)
    ids = set(draft.draft_vocab_ids.tolist())
    kept = counts[sorted(ids)]
    dropped = counts[[t for t in range(VOCAB_SIZE) if t not in ids]]
    assert int(kept.min()) >= int(dropped.max())  # exactly the most frequent response tokens
    assert set(counts.topk(5).indices.tolist()) <= ids
    head_before = draft.draft_lm_head.weight.detach().clone()
    lm_head_before = target.lm_head.weight.detach().clone()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < 0.9 * logs[0]["loss"], logs
    assert not torch.equal(draft.draft_lm_head.weight, head_before)  # the draft head is trained
    assert torch.equal(target.lm_head.weight, lm_head_before)  # the target's head is not
    assert not target.lm_head.weight.requires_grad
