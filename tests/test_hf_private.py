"""The private transformers API specvlm_hf relies on, one test per use (a release that changes one fails here, by
name), the candidate-generator contract of the installed release, and the supported-version refusal at bind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet

from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel, hf_private
from specvlm_hf.generation.budget import AUTO_CHAIN_TOKENS
from specvlm_hf.generation.chain import SpecVLMChainCandidateGenerator
from tiny_models import make_inputs, make_tiny_target

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.mark.parametrize("use", hf_private.PRIVATE_USES, ids=lambda use: use.name)
def test_private_use_still_provided(use):
    assert use.reason
    assert use.check() is None, f"{use.name}: {use.check()}"


def test_chain_generator_provides_what_the_assisted_loop_reads():
    reads = hf_private.assisted_loop_reads()
    # the loop's basic contract, in every release we support (the scan would be empty without shipped source)
    assert {"requires_model_outputs", "get_candidates", "update_candidate_strategy"} <= reads
    lacking = sorted(name for name in reads if not hasattr(SpecVLMChainCandidateGenerator, name))
    assert not lacking, f"transformers {transformers.__version__}'s assisted loop reads {lacking}"


def test_a_generator_missing_a_read_is_refused_at_bind(monkeypatch):
    class Incomplete:  # what the chain generator was before transformers 5.25 read num_drafting_tokens
        requires_model_outputs = True
        model_kwargs_overrides = None

        def get_candidates(self, *args, **kwargs): ...

        def update_candidate_strategy(self, *args, **kwargs): ...

    monkeypatch.setattr(
        hf_private, "assisted_loop_reads", lambda: {"requires_model_outputs", "num_drafting_tokens"}
    )
    with pytest.raises(hf_private.UnsupportedTransformersError, match="num_drafting_tokens"):
        hf_private.check_transformers(Incomplete)


def test_num_drafting_tokens_bounds_every_chain_step():
    """transformers >= 5.25 keeps a hybrid cache's recurrent states for `num_drafting_tokens` steps: no chain step may
    return more candidates than it says."""
    torch.manual_seed(0)
    model = make_tiny_target("llava")
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
    seen = []
    original = SpecVLMChainCandidateGenerator.get_candidates

    def spy(self, input_ids, **kwargs):
        candidates, logits = original(self, input_ids, **kwargs)
        seen.append((candidates.shape[1] - input_ids.shape[1], self.num_drafting_tokens))
        return candidates, logits

    inputs = make_inputs("llava", model, seed=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SpecVLMChainCandidateGenerator, "get_candidates", spy)
        for k in (None, 3):
            model.generate(
                **inputs,
                max_new_tokens=16,
                do_sample=False,
                assistant_model=draft,
                decoding_mode="chain",
                num_draft_tokens=k,
            )
    assert seen and all(n <= bound for n, bound in seen)
    assert {bound for _, bound in seen} == {3, AUTO_CHAIN_TOKENS}


def test_supported_range_equals_pyproject_dependency():
    (spec,) = re.findall(r'^\s*"transformers([^"]*)",', PYPROJECT.read_text(), flags=re.M)
    assert SpecifierSet(spec) == hf_private.SUPPORTED_TRANSFORMERS
    assert transformers.__version__ in hf_private.SUPPORTED_TRANSFORMERS


@pytest.mark.parametrize("installed", ["5.23.0", "5.26.0", "6.0.0"])
def test_unsupported_transformers_is_refused_at_bind(monkeypatch, installed):
    torch.manual_seed(0)
    model = make_tiny_target("llava")
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model))
    monkeypatch.setattr(transformers, "__version__", installed)
    with pytest.raises(hf_private.UnsupportedTransformersError) as error:
        draft.bind(model)
    message = str(error.value)
    assert hf_private.SUPPORTED_RANGE in message and installed in message
    assert not getattr(model, "_specvlm_routing_installed", False)  # refused before any change to the target
