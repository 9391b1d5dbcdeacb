"""`DecodePlan` (the CPU backend): the draft's decoding forward with weights resolved once equals the draft's own
methods (the definition) to rounding, runs inside generate, and steps aside wherever the modules must run (hooks,
adapters, overrides, training). The plan uses other kernels (prepacked and stacked products, RMSNorm as one
layer_norm), so the two agree to rounding, not bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from forced_draft import make_forced_draft
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel, backends
from specvlm_hf.backends import DecodePlan, accelerated, active_plan
from specvlm_hf.draft.modeling_specvlm import SpecVLMMLP, SpecVLMRMSNorm
from tiny_models import make_inputs, make_tiny_target


@pytest.fixture(scope="module")
def target():
    return make_tiny_target("llava")


def _draft(target, dtype=torch.float32, **overrides):
    torch.manual_seed(0)
    config = SpecVLMDraftConfig.from_target(target, **overrides)
    draft = SpecVLMDraftModel(config).bind(target).eval()
    with torch.no_grad():
        for p in draft.parameters():  # random, not the near-identity init: every weight matters
            p.add_(0.05 * torch.randn_like(p))
    return draft.to(dtype)


def _tolerance(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)


def _steps(draft, feature_width: int, dtype):
    """Outputs of a prefix step, a masked tree-like step and the logits, all on one cache."""
    torch.manual_seed(1)
    cache = DynamicCache()
    ids = torch.tensor([3, 17, 5, 3, 9])
    feats = torch.randn(5, feature_width).to(dtype)
    first = backends.draft_step(draft, ids, feats, position_ids=torch.arange(5)[None], past_key_values=cache)
    mask = torch.zeros(1, 1, 2, 7, dtype=dtype)
    mask[..., 5] = torch.finfo(dtype).min  # row 1 does not see row 0
    second = backends.draft_step(
        draft,
        torch.tensor([4, 8]),
        first[-2:],
        position_ids=torch.full((1, 2), 5),
        max_position=5,
        attention_mask=mask,
        past_key_values=cache,
    )
    logits, ids_map = backends.draft_logits(draft, second)
    return first, second, logits, ids_map


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"target_layers": [0, 1]},
        {"draft_vocab_size": 16},
        {"num_hidden_layers": 2, "attention_bias": True},
        {"attention_bias": True, "num_key_value_heads": 1},
        {"draft_architecture": "eagle3"},
        {"draft_architecture": "eagle3", "target_layers": [0, 1], "num_hidden_layers": 2},
        {"draft_architecture": "eagle3", "draft_vocab_size": 16},
    ],
    ids=[
        "one-layer",
        "fused-layers",
        "draft-vocab",
        "two-layers-bias",
        "gqa-bias",
        "eagle3",
        "eagle3-fused-2",
        "eagle3-vocab",
    ],
)
def test_plan_equals_module_path(target, dtype, overrides):
    draft = _draft(target, dtype, **overrides)
    width = draft.config.num_fused_layers * draft.config.hidden_size
    with torch.no_grad():
        expected = _steps(draft, width, dtype)
        with accelerated(draft):
            assert active_plan(draft) is not None
            got = _steps(draft, width, dtype)
        assert active_plan(draft) is None  # the block restores the module path
    for g, e in zip(got[:3], expected[:3]):
        torch.testing.assert_close(g, e, **_tolerance(dtype))
    assert (got[3] is None) == (expected[3] is None)


@pytest.mark.parametrize("architecture", ["eagle", "eagle3"])
def test_generate_runs_the_plan_and_stays_lossless(target, monkeypatch, architecture):
    draft = _draft(target, draft_architecture=architecture)
    calls = {"step": 0, "logits": 0}
    step, logits = DecodePlan.step, DecodePlan.draft_logits

    def counted_step(self, *args, **kwargs):
        calls["step"] += 1
        return step(self, *args, **kwargs)

    def counted_logits(self, *args, **kwargs):
        calls["logits"] += 1
        return logits(self, *args, **kwargs)

    monkeypatch.setattr(DecodePlan, "step", counted_step)
    monkeypatch.setattr(DecodePlan, "draft_logits", counted_logits)
    inputs = make_inputs("llava", target, seed=2)
    reference = target.generate(**inputs, max_new_tokens=12, do_sample=False)
    for mode in ("tree", "chain"):
        calls.update(step=0, logits=0)
        out = target.generate(
            **inputs, max_new_tokens=12, do_sample=False, assistant_model=draft, decoding_mode=mode
        )
        assert torch.equal(out, reference), mode
        assert calls["step"] > 0 and calls["logits"] > 0, mode
    assert active_plan(draft) is None


def test_plan_and_modules_agree_when_only_some_projections_have_a_bias(target):
    draft = _draft(target, attention_bias=True)
    draft.layers[0].self_attn.q_proj.bias = None
    width = draft.config.hidden_size
    with torch.no_grad():
        expected = _steps(draft, width, torch.float32)
        with accelerated(draft):
            got = _steps(draft, width, torch.float32)
    for g, e in zip(got[:3], expected[:3]):
        torch.testing.assert_close(g, e, **_tolerance(torch.float32))
    # and the decoding path (stacked q/k/v) computes what the training path (three projections) does
    ids, feats = torch.tensor([3, 17, 5]), torch.randn(3, width)
    with torch.no_grad():
        decoded = backends.draft_step(draft, ids, feats, position_ids=torch.arange(3)[None])
    trained = draft(inputs_embeds=draft.embed_tokens(ids)[None], hidden_states=feats[None]).last_hidden_state[
        0
    ]
    torch.testing.assert_close(decoded, trained.detach(), rtol=1e-5, atol=1e-5)


def test_generate_under_autocast_runs_the_modules(target):
    draft = _draft(target)
    inputs = make_inputs("llava", target, seed=2)
    target.generate(**inputs, max_new_tokens=3, do_sample=False, assistant_model=draft)  # packing checked
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert DecodePlan.build(draft) is None
        for mode in ("tree", "chain"):
            target.generate(
                **inputs, max_new_tokens=6, do_sample=False, assistant_model=draft, decoding_mode=mode
            )
            assert draft.last_generation_stats.new_tokens == 6


def test_no_plan_where_the_modules_must_run(target, monkeypatch):
    with torch.no_grad():
        hooked = _draft(target)
        hooked.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: o)
        assert DecodePlan.build(hooked) is None
        patched = _draft(target)
        patched.layers[0].mlp.forward = lambda x: x
        assert DecodePlan.build(patched) is None
        training = _draft(target).train()
        assert DecodePlan.build(training) is None
        unbound = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(target)).eval()
        assert DecodePlan.build(unbound) is None
        # a subclass overriding the draft's forward or logits decodes through its own methods
        forced = make_forced_draft(target, torch.arange(40), set())
        assert DecodePlan.build(forced) is None
        # methods replaced on the instance, or forwards patched on the class
        for name in ("decode_rows", "draft_logits"):
            replaced = _draft(target)
            setattr(replaced, name, getattr(replaced, name))
            assert DecodePlan.build(replaced) is None, name
        plain = _draft(target)
        assert DecodePlan.build(plain) is not None
        for cls in (SpecVLMMLP, SpecVLMRMSNorm):
            with monkeypatch.context() as patch:
                original = cls.forward
                patch.setattr(cls, "forward", lambda self, *args, _f=original: _f(self, *args))
                assert DecodePlan.build(plain) is None, cls.__name__
        assert DecodePlan.build(plain) is not None


def test_plan_never_bypasses_a_peft_adapter(target):
    peft = pytest.importorskip("peft")
    draft = _draft(target)
    adapted = peft.inject_adapter_in_model(
        peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]), draft
    )
    with torch.no_grad():
        assert DecodePlan.build(adapted) is None


def test_an_active_plan_is_private_to_its_thread_and_block(target):
    import threading

    draft = _draft(target)
    seen = {}
    with torch.no_grad(), accelerated(draft):
        outer = active_plan(draft)
        worker = threading.Thread(target=lambda: seen.update(other_thread=active_plan(draft)))
        worker.start()
        worker.join()
        with accelerated(draft):  # nested: its own plan, the outer one back after
            assert active_plan(draft) is not outer
        assert active_plan(draft) is outer is not None
        with torch.enable_grad():
            assert active_plan(draft) is None  # inference-only
    assert seen == {"other_thread": None}
    assert active_plan(draft) is None
