"""Half-precision targets (bfloat16 and float16): speculative greedy output equals plain generate's in the same
dtype, in tree, chain and batch decoding, with fixed and automatic budgets. The verify masks take their masked
value from the dtype's own range (`generation/masks.py`: finfo(dtype).min), never float32's (which is -inf in
float16). Sharp targets (`sharp_models`) keep the greedy choices far from numerical ties."""

from __future__ import annotations

import pytest
import torch

from batched_inputs import generated_rows, make_batch_inputs, pad_id, real_lengths
from forced_draft import make_batched_forced_draft, make_forced_draft, merged_reference
from sharp_models import make_sharp_target
from tiny_models import make_inputs

DTYPES = [torch.bfloat16, torch.float16]
BUDGETS = {"fixed": dict(tree_top_k=3, tree_depth=4, tree_total_tokens=8, num_draft_tokens=4), "auto": {}}


@pytest.fixture(scope="module", params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def target(request):
    return make_sharp_target("llava").to(request.param).eval()


@pytest.mark.parametrize("budget", sorted(BUDGETS))
@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_half_precision_single_sequence_is_lossless(target, mode, budget):
    inputs = make_inputs("llava", target, seed=5)
    inputs = {k: v.to(target.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    reference = target.generate(**inputs, max_new_tokens=16, do_sample=False)
    overrides = {"tree_top_k": None} if budget == "auto" else {}
    draft = make_forced_draft(target, reference[0], {inputs["input_ids"].shape[1] + 5}, **overrides)
    draft.to(target.dtype)
    out = target.generate(
        **inputs,
        max_new_tokens=16,
        do_sample=False,
        assistant_model=draft,
        decoding_mode=mode,
        **BUDGETS[budget],
    )
    assert torch.equal(out, reference)
    if budget == "fixed":
        assert draft.last_generation_stats.mean_accepted_length > 1.5


@pytest.mark.parametrize("budget", sorted(BUDGETS))
def test_half_precision_batch_is_lossless(target, budget):
    batch = make_batch_inputs("llava", target, [1, 2], [6, 34])
    batch = {k: v.to(target.dtype) if v.is_floating_point() else v for k, v in batch.items()}
    reference = target.generate(**batch, max_new_tokens=12, do_sample=False)
    rows = generated_rows(reference, batch["input_ids"].shape[1], pad_id(target))
    overrides = {"tree_top_k": None} if budget == "auto" else {}
    draft = make_batched_forced_draft(target, merged_reference(rows, real_lengths(batch)), (), **overrides)
    draft.to(target.dtype)
    out = target.generate(
        **batch, max_new_tokens=12, do_sample=False, assistant_model=draft, **BUDGETS[budget]
    )
    assert torch.equal(out, reference)
