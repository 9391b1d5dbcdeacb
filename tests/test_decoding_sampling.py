"""Sampling with a draft has exactly the target's distribution; stopping behaves as in plain generate."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TextStreamer

from forced_draft import make_forced_draft
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from tiny_models import make_inputs, make_tiny_target

N_SAMPLES = 400
VOCAB = 12


@pytest.fixture(scope="module")
def peaked_target():
    """A tiny causal LM over 12 tokens whose next-token distributions are peaked but far from one-hot."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=1,
        intermediate_size=64,
        bos_token_id=0,
        eos_token_id=None,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _sample_counts(model, n, accepted: list | None = None, **kwargs) -> list[Counter]:
    """Counts of the first 3 sampled tokens (per position, and the joint of the first two)."""
    prompt = torch.tensor([[1, 5, 7, 3]])
    counts = [Counter(), Counter(), Counter(), Counter()]
    for _ in range(n):
        out = model.generate(input_ids=prompt, max_new_tokens=3, do_sample=True, top_k=0, **kwargs)[
            0, 4:
        ].tolist()
        for i, token in enumerate(out):
            counts[i][token] += 1
        counts[3][tuple(out[:2])] += 1
        if accepted is not None:
            accepted += kwargs["assistant_model"].last_generation_stats.accepted_lengths
    return counts


def _tv(a: Counter, b: Counter, n: int) -> float:
    keys = set(a) | set(b)
    return 0.5 * sum(abs(a[k] - b[k]) for k in keys) / n


@pytest.fixture(scope="module")
def plain_runs(peaked_target):
    """Two independent plain sampling runs at temperature 0.9: the reference and the noise floor."""
    torch.manual_seed(1)
    return _sample_counts(peaked_target, N_SAMPLES, temperature=0.9), _sample_counts(
        peaked_target, N_SAMPLES, temperature=0.9
    )


def _assert_same_law(spec, plain_runs):
    plain_a, plain_b = plain_runs
    for i in range(4):
        floor = _tv(plain_a[i], plain_b[i], N_SAMPLES)
        tv = _tv(spec[i], plain_a[i], N_SAMPLES)
        assert tv <= 1.6 * floor + 0.03, f"position {i}: TV {tv:.3f} vs noise floor {floor:.3f}"


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_sampling_matches_plain_distribution(peaked_target, plain_runs, mode):
    """Total variation between speculative and plain sampling stays within the plain-vs-plain noise floor.

    The noise floor is measured the same way (two independent plain runs of N_SAMPLES each); the tolerance
    is 1.6x that floor plus 0.03. A draft that sampled differently from what it returns, or a biased
    acceptance rule, moves the TV of the first tokens well past it (DESIGN.md: 0.48 vs 0.17 measured).
    """
    model = peaked_target
    # an untrained draft proposes confidently wrong tokens: the hard case for rejection sampling
    draft = SpecVLMDraftModel(
        SpecVLMDraftConfig.from_target(model, tree_top_k=4, tree_depth=3, tree_total_tokens=8)
    )
    draft = draft.bind(model)
    with torch.no_grad():
        draft.fc.weight.mul_(5.0)
    # chain mode at a fixed length: the automatic chain would back off from this draft (and stay backed off across
    # the calls), and this test is about the law of speculative steps
    fixed = {"num_draft_tokens": 3} if mode == "chain" else {}
    spec = _sample_counts(
        model, N_SAMPLES, assistant_model=draft, decoding_mode=mode, temperature=0.9, **fixed
    )
    _assert_same_law(spec, plain_runs)
    # speculation really happened: some steps accepted draft tokens or at least ran verify forwards
    assert draft.last_generation_stats.target_forwards >= 1


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_sampling_with_forced_draft_is_target_distribution(peaked_target, plain_runs, mode):
    """With a draft that proposes the target's greedy path, accepted tokens still follow the target's law."""
    model = peaked_target
    prompt = torch.tensor([[1, 5, 7, 3]])
    reference = model.generate(input_ids=prompt, max_new_tokens=30, do_sample=False)
    draft = make_forced_draft(model, reference[0], (), tree_top_k=2, tree_depth=3, tree_total_tokens=6)
    torch.manual_seed(2)
    accepted: list[int] = []
    fixed = {"num_draft_tokens": 3} if mode == "chain" else {}  # (the automatic chain would back off)
    spec = _sample_counts(
        model, N_SAMPLES, accepted, assistant_model=draft, decoding_mode=mode, temperature=0.9, **fixed
    )
    _assert_same_law(spec, plain_runs)
    # the draft's proposals were accepted often (tokens per verify forward, over all samples)
    assert sum(accepted) / len(accepted) > 1.05  # measured 1.13: only greedy-path prefixes match


def _first_new_token(continuation: list[int], start: int) -> tuple[int, int]:
    """(index, token) of the first token at or after `start` that does not occur earlier in `continuation`."""
    index = next(i for i in range(start, len(continuation)) if continuation[i] not in continuation[:i])
    return index, continuation[index]


@pytest.fixture(scope="module")
def llava():
    model = make_tiny_target("llava")
    return model, make_inputs("llava", model, seed=5)


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_eos_inside_accepted_path(llava, mode):
    model, inputs = llava
    reference = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    # the EOS: a generated token whose first occurrence is mid-way, so stopping happens inside a draft
    index, eos = _first_new_token(reference[0, prompt_len:].tolist(), start=6)
    expected = model.generate(**inputs, max_new_tokens=30, do_sample=False, eos_token_id=eos)
    assert expected.shape[1] == prompt_len + index + 1
    draft = make_forced_draft(model, reference[0], ())
    out = model.generate(
        **inputs,
        max_new_tokens=30,
        do_sample=False,
        eos_token_id=eos,
        assistant_model=draft,
        decoding_mode=mode,
    )
    assert torch.equal(out, expected)
    assert draft.last_generation_stats.mean_accepted_length > 2


@pytest.mark.parametrize("mode", ["tree", "chain"])
@pytest.mark.parametrize("n", [1, 2, 7, 13])
def test_max_new_tokens_mid_tree(llava, mode, n):
    model, inputs = llava
    reference = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    draft = make_forced_draft(model, reference[0], ())
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, assistant_model=draft, decoding_mode=mode
    )
    assert torch.equal(out, reference[:, : inputs["input_ids"].shape[1] + n])
    assert draft.last_generation_stats.new_tokens == n


def _word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A real fast tokenizer whose token i is the word 'w{i}' (words joined by spaces)."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    vocab["abcdef"] = vocab_size  # transformers' stop-string matcher tokenizes this probe word
    backend = Tokenizer(WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")


def test_stop_string_and_streamer(llava, capsys):
    model, inputs = llava
    prompt_len = inputs["input_ids"].shape[1]
    reference = model.generate(**inputs, max_new_tokens=30, do_sample=False)
    tokenizer = _word_tokenizer(model.config.text_config.vocab_size)
    index, token = _first_new_token(reference[0, prompt_len:].tolist(), start=6)
    stop = f"w{token}"
    expected = model.generate(
        **inputs, max_new_tokens=30, do_sample=False, stop_strings=[stop], tokenizer=tokenizer
    )
    assert expected.shape[1] < reference.shape[1]
    for mode in ("tree", "chain"):
        draft = make_forced_draft(model, reference[0], ())
        out = model.generate(
            **inputs,
            max_new_tokens=30,
            do_sample=False,
            stop_strings=[stop],
            tokenizer=tokenizer,
            assistant_model=draft,
            decoding_mode=mode,
        )
        assert torch.equal(out, expected), mode
    # streamer: the streamed text equals the decoded output, also when a stop string cuts a chunk
    for mode in ("tree", "chain"):
        capsys.readouterr()
        draft = make_forced_draft(model, reference[0], ())
        out = model.generate(
            **inputs,
            max_new_tokens=20,
            do_sample=False,
            assistant_model=draft,
            decoding_mode=mode,
            streamer=TextStreamer(tokenizer, skip_prompt=True),
            stop_strings=[stop],
            tokenizer=tokenizer,
        )
        assert torch.equal(out, expected), mode
        printed = capsys.readouterr().out
        assert printed.strip() == tokenizer.decode(out[0, prompt_len:]).strip(), mode


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_logits_processors_apply_as_in_plain_generate(llava, mode):
    """Repetition penalty and a min length depend on each node's own prefix: greedy output must still match."""
    model, inputs = llava
    kwargs = {"max_new_tokens": 24, "do_sample": False, "repetition_penalty": 1.5, "no_repeat_ngram_size": 2}
    expected = model.generate(**inputs, **kwargs)
    plain_greedy = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert not torch.equal(expected, plain_greedy)  # the processors really change this continuation
    draft = make_forced_draft(model, expected[0], ())
    out = model.generate(**inputs, **kwargs, assistant_model=draft, decoding_mode=mode)
    assert torch.equal(out, expected)
    assert draft.last_generation_stats.mean_accepted_length > 2


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_back_off_steps_sample_without_any_processor(peaked_target, monkeypatch, mode):
    """The automatic budget's plain steps (no drafting) sample from the target at temperature 1 with no logits
    processor at all -- the case where a greedy walk reads every choice in one transfer (it once took the argmax
    there while sampling)."""
    from specvlm_hf.generation import budget

    model = peaked_target
    monkeypatch.setattr(budget.BackOff, "take", lambda self: True)  # backed off: every step a plain one
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
    torch.manual_seed(3)
    plain_runs = _sample_counts(model, N_SAMPLES), _sample_counts(model, N_SAMPLES)  # temperature 1, top_k=0
    spec = _sample_counts(model, N_SAMPLES, assistant_model=draft, decoding_mode=mode)
    _assert_same_law(spec, plain_runs)
    assert set(kind for kind, _ in draft.last_generation_stats.budget_steps) == {"plain"}


def test_a_lone_roots_choice_is_sampled_when_sampling():
    """The greedy walk both decoding loops run on a plain step's lone root: argmax when greedy, a draw from the
    target's distribution when sampling, also without any logits processor (the batch loop's plain steps too)."""
    from transformers import LogitsProcessorList

    from specvlm_hf.generation.acceptance import Selector, accept_greedy
    from specvlm_hf.generation.tree_policy import DraftTree

    tree = DraftTree.root_only(torch.tensor([3]))
    logits = torch.zeros(1, 6)
    logits[0, 2] = 0.5  # argmax 2 with probability e^0.5 / (5 + e^0.5) = 0.25
    prefix = torch.tensor([[1, 3]])
    assert accept_greedy(tree, logits, prefix, Selector(LogitsProcessorList(), False)) == ([0], [2])
    torch.manual_seed(0)
    sampled = Selector(LogitsProcessorList(), True)
    picks = Counter(accept_greedy(tree, logits, prefix, sampled)[1][0] for _ in range(600))
    assert set(picks) == set(range(6)) and 100 <= picks[2] <= 200, picks
