"""Greedy speculative decoding equals plain generate, token for token, across a matrix of cases (issue #15).

Axes: every tiny family x {tree, chain} x {sdpa, eager} x prompt (short / long / video where the family takes
one) x random tree and chain budgets per call, or none (the automatic budget, with its plain back-off steps) x
a stop string (a real tokenizer over the tiny vocabulary) x draft (untrained: few tokens accepted; forced: copies the
target's greedy continuation except at chosen positions, so trees are accepted deep) x ending (max_new_tokens
landing anywhere, an EOS token inside the continuation) x a second turn on the returned cache. Targets are
`sharp_models` ones (positions and masks change their output); every case also checks that shifting the decode
positions by one changes plain generate's output, and the matrix asserts most of its cases could fail that way.
Float32 throughout, exact equality. The full matrix is `slow`; `CI_CASES` is a stratified subset.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from forced_draft import make_forced_draft
from sharp_models import make_sharp_target, shifted_generate
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from tiny_models import FAMILIES, TEXT_HIGH, TEXT_LOW, VIDEO_FAMILIES, make_inputs, make_video_inputs

ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class Case:
    family: str
    mode: str
    attention: str
    prompt: str  # "short" | "long" | "video"
    seed: int
    max_new_tokens: int
    draft: str  # "random" | "forced"
    eos_at: int | None  # index in the continuation whose token becomes eos_token_id
    multi_turn: bool
    top_k: int
    depth: int
    total: int
    chain_k: int
    auto_budget: bool = False  # no budget passed: the automatic one (measured costs, back-off to plain steps)
    stop_at: int | None = None  # index in the continuation whose token's text becomes a stop string

    @property
    def id(self) -> str:
        return (
            f"{self.family}-{self.mode}-{self.attention}-{self.prompt}-s{self.seed}-n{self.max_new_tokens}-"
            f"{self.draft}-eos{self.eos_at}-mt{int(self.multi_turn)}-k{self.top_k}d{self.depth}t{self.total}"
            f"c{self.chain_k}{'-auto' if self.auto_budget else ''}-stop{self.stop_at}"
        )


def _case(rng: random.Random, family: str, mode: str, attention: str, index: int) -> Case:
    prompts = ["short", "long"] + (["video"] if family in VIDEO_FAMILIES else [])
    multi_turn = rng.random() < 0.25
    depth = rng.randint(1, 7)
    return Case(
        family=family,
        mode=mode,
        attention=attention,
        prompt=rng.choice(prompts),
        seed=index,
        max_new_tokens=rng.randint(3, 20),
        draft="random" if multi_turn or rng.random() < 0.4 else "forced",
        eos_at=rng.randint(1, 12) if rng.random() < 0.3 else None,
        multi_turn=multi_turn,
        top_k=rng.randint(1, 6),
        depth=depth,
        total=rng.randint(depth, 40),
        chain_k=rng.randint(1, 8),
        auto_budget=rng.random() < 0.3,
        stop_at=rng.randint(1, 12) if rng.random() < 0.2 else None,
    )


def build_cases(per_cell: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for family in FAMILIES:
        for mode in ("tree", "chain"):
            for attention in ATTENTION:
                cases += [_case(rng, family, mode, attention, len(cases)) for _ in range(per_cell)]
    return cases


SLOW_CASES = build_cases(per_cell=19, seed=15)  # 14 families x 2 modes x 2 attentions x 19 = 1,064
# stratified: every family x mode x attention twice (112 cases), other axes drawn; forced draft and multi-turn covered
CI_CASES = build_cases(per_cell=2, seed=1000)

_TARGETS: dict = {}
_SENSITIVE: list[bool] = []


def _target(family: str, attention: str):
    if family not in _TARGETS:
        _TARGETS[family] = make_sharp_target(family)
    model = _TARGETS[family]
    model.set_attn_implementation(attention)
    return model


def _word_tokenizer(model) -> PreTrainedTokenizerFast:
    """A real fast tokenizer whose token i is the word 'w{i}' (words joined by spaces), for stop strings."""
    size = model.config.get_text_config().vocab_size
    vocab = {f"w{i}": i for i in range(size)}
    vocab["abcdef"] = size  # transformers' stop-string matcher tokenizes this probe word
    backend = Tokenizer(WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")


def _inputs(case: Case, model) -> dict:
    if case.prompt == "video":
        return make_video_inputs(case.family, model, seed=case.seed)
    return make_inputs(case.family, model, seed=case.seed, prompt_len=6 if case.prompt == "short" else 40)


def run_case(case: Case) -> None:
    model = _target(case.family, case.attention)
    inputs = _inputs(case, model)
    prompt_len = inputs["input_ids"].shape[1]
    opts = {"max_new_tokens": case.max_new_tokens, "do_sample": False}
    if case.eos_at is not None:  # a token of the continuation ends generation (possibly inside a tree)
        probe = model.generate(**inputs, **opts)
        opts["eos_token_id"] = int(probe[0, prompt_len + min(case.eos_at, probe.shape[1] - prompt_len - 1)])
    if (
        case.stop_at is not None and case.eos_at is None
    ):  # a stop string (needs the tokenizer), possibly mid-tree
        probe = model.generate(**inputs, **opts)
        token = int(probe[0, prompt_len + min(case.stop_at, probe.shape[1] - prompt_len - 1)])
        opts.update(stop_strings=[f"w{token}"], tokenizer=_word_tokenizer(model))
    budgets = {"decoding_mode": case.mode}
    if not case.auto_budget:
        budgets.update(
            tree_top_k=case.top_k,
            tree_depth=case.depth,
            tree_total_tokens=case.total,
            num_draft_tokens=case.chain_k,
        )
    plain = model.generate(**inputs, **opts, return_dict_in_generate=case.multi_turn)
    reference = plain.sequences if case.multi_turn else plain
    _SENSITIVE.append(not torch.equal(shifted_generate(model, inputs, case.max_new_tokens), reference))
    if case.draft == "forced":
        wrong = {prompt_len + w for w in random.Random(case.seed).sample(range(1, 24), 3)}
        draft = make_forced_draft(model, reference[0], wrong)
    else:
        draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
    spec = model.generate(
        **inputs, **opts, **budgets, assistant_model=draft, return_dict_in_generate=case.multi_turn
    )
    out = spec.sequences if case.multi_turn else spec
    assert torch.equal(out, reference), (
        f"{case.id}: {out[0, prompt_len:].tolist()} vs {reference[0, prompt_len:].tolist()}"
    )
    if not case.multi_turn:
        return
    assert spec.cache.get_seq_length() == plain.cache.get_seq_length() == reference.shape[1] - 1, case.id
    turn = torch.randint(TEXT_LOW, TEXT_HIGH, (1, 4), generator=torch.Generator().manual_seed(case.seed))
    ids = torch.cat([reference, turn], dim=1)
    second = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": 6,
        "do_sample": False,
    }
    if "mm_token_type_ids" in inputs:  # Qwen VL: the processor's token types over the whole conversation
        second["mm_token_type_ids"] = torch.cat(
            [
                inputs["mm_token_type_ids"],
                inputs["mm_token_type_ids"].new_zeros(1, ids.shape[1] - prompt_len),
            ],
            1,
        )
    plain2 = model.generate(**second, cache=plain.cache)
    spec2 = model.generate(**second, **budgets, cache=spec.cache, assistant_model=draft)
    assert torch.equal(spec2, plain2), f"{case.id} (second turn)"


@pytest.mark.parametrize("case", CI_CASES, ids=lambda c: c.id)
def test_lossless_matrix_ci(case):
    run_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: c.id)
def test_lossless_matrix_full(case):
    run_case(case)


def test_matrix_cases_can_fail():
    """Runs after the cases above (same module, file order): most of them change under a one-position shift."""
    if len(_SENSITIVE) < 10:
        pytest.skip("run together with the matrix cases")
    assert sum(_SENSITIVE) >= 0.7 * len(_SENSITIVE), (sum(_SENSITIVE), len(_SENSITIVE))


def test_matrix_sizes():
    assert len(SLOW_CASES) >= 1000
    assert {(c.family, c.mode) for c in CI_CASES} == {(f, m) for f in FAMILIES for m in ("tree", "chain")}
    assert {c.draft for c in CI_CASES} == {"random", "forced"} and any(c.multi_turn for c in CI_CASES)
    assert any(c.auto_budget for c in CI_CASES) and any(
        c.stop_at is not None and c.eos_at is None for c in CI_CASES
    )
