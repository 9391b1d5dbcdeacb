"""SpecVLMDraftModel on every target family: from_target, bind, forward on real target features, save/load;
clear errors for wrong targets, wrong generate calls, and a PEFT-wrapped target."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

import specvlm_hf  # noqa: F401  (registers "specvlm_draft" with AutoModel)
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.targets.features import capture_decoder_inputs, select_features
from tiny_models import FAMILIES, HIDDEN, IMAGE_ID, VIDEO_ID, VOCAB_SIZE, make_inputs, make_tiny_target

TEXT_FAMILIES = {"llama", "qwen2"}
VIDEO_FAMILIES_WITH_ID = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"}
TARGET_KEY_MARKERS = ("lm_head", "embed_tokens", "vision", "language_model")


def _draft_forward_on_real_features(family, model, draft):
    inputs = make_inputs(family, model)
    config = draft.config
    with torch.no_grad(), capture_decoder_inputs(model) as captured:
        out = model(**inputs, output_hidden_states=True)
    assert len(captured) == 1
    input_ids = inputs["input_ids"]
    seq_len = input_ids.shape[1]
    features = select_features(out.hidden_states, config.target_layers)
    assert features.shape == (1, seq_len, config.num_fused_layers * HIDDEN)
    with torch.no_grad():
        ctx = draft.prepare_context(input_ids, captured[0], features)
        assert ctx.fused.shape == (
            1,
            seq_len - 1,
            config.fused_size,
        )  # no next token: the last row is dropped
        assert ctx.position_ids.shape == (1, seq_len - 1)
        assert torch.equal(ctx.position_ids[0], torch.arange(seq_len - 1))
        hidden = draft(fused_inputs=ctx.fused, position_ids=ctx.position_ids).last_hidden_state
        logits = draft.compute_logits(hidden)
    assert hidden.shape == (1, seq_len - 1, HIDDEN)
    assert torch.isfinite(hidden).all()
    assert logits.shape == (1, seq_len - 1, VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    # the fused path and the (embeds, features) path agree
    with torch.no_grad():
        direct = draft(
            inputs_embeds=captured[0][:, 1:], hidden_states=features[:, :-1], position_ids=ctx.position_ids
        ).last_hidden_state
    torch.testing.assert_close(direct, hidden)


def _check_save_load(model, draft, directory):
    draft.save_pretrained(directory)
    files = sorted(p.name for p in directory.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    saved = load_file(directory / "model.safetensors")
    assert set(saved) == set(draft.state_dict())
    assert not [k for k in saved if any(marker in k for marker in TARGET_KEY_MARKERS)]
    for name, tensor in draft.state_dict().items():
        assert torch.equal(saved[name], tensor), name

    loaded = SpecVLMDraftModel.from_pretrained(directory)
    assert type(loaded) is SpecVLMDraftModel and not loaded.is_bound
    assert loaded.config.to_dict()["target_family"] == draft.config.target_family
    for name, tensor in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    auto = AutoModel.from_pretrained(directory)
    assert isinstance(auto, SpecVLMDraftModel)
    assert auto.bind(model) is auto and auto.is_bound

    bound = SpecVLMDraftModel.from_pretrained(directory, target=model)
    assert isinstance(bound, SpecVLMDraftModel)
    assert bound.is_bound and bound.target is model
    for name, tensor in draft.state_dict().items():
        assert torch.equal(bound.state_dict()[name], tensor), name
    # ... and computes the same function: non-persistent buffers (RoPE frequencies) are rebuilt on load
    assert torch.equal(bound.rotary_emb.inv_freq, draft.rotary_emb.inv_freq)
    e = torch.randn(1, 5, HIDDEN)
    f = torch.randn(1, 5, draft.config.num_fused_layers * HIDDEN)
    with torch.no_grad():
        expected = draft.eval()(inputs_embeds=e, hidden_states=f).last_hidden_state
        assert torch.equal(bound.eval()(inputs_embeds=e, hidden_states=f).last_hidden_state, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_from_target_bind_forward_save_load(family, targets_cache, tmp_path):
    model = targets_cache(family)
    config = SpecVLMDraftConfig.from_target(model)
    assert config.hidden_size == HIDDEN
    assert config.vocab_size == VOCAB_SIZE
    assert config.target_architecture == type(model).__name__
    assert config.target_model_type == model.config.model_type
    assert config.target_family == ("causal_lm" if family in TEXT_FAMILIES else family)
    if family in TEXT_FAMILIES:
        assert config.image_token_ids == []
    else:
        assert config.image_token_ids[0] == IMAGE_ID
        expected = [IMAGE_ID, VIDEO_ID] if family in VIDEO_FAMILIES_WITH_ID else [IMAGE_ID]
        assert config.image_token_ids == expected

    draft = SpecVLMDraftModel(config)
    assert not draft.is_bound
    assert draft.bind(model) is draft
    assert draft.is_bound and draft.target is model
    # the target's embedding and lm_head are shared by reference, never registered as draft submodules
    assert draft.embed_tokens(torch.tensor([[5]])).data_ptr() != 0
    assert not any(p is model.get_output_embeddings().weight for p in draft.parameters())
    assert not any(p is model.get_input_embeddings().weight for p in draft.parameters())

    _draft_forward_on_real_features(family, model, draft)
    _check_save_load(model, draft, tmp_path / "draft")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_eagle3_bind_forward_save_load(family, targets_cache, tmp_path):
    model = targets_cache(family)
    config = SpecVLMDraftConfig.from_target(model, draft_architecture="eagle3", target_layers=[0, 1, -1])
    draft = SpecVLMDraftModel(config).bind(model)
    assert draft.fc.weight.shape == (HIDDEN, 3 * HIDDEN)  # [f_0 ; f_1 ; f_-1] -> g
    assert draft.layers[0].self_attn.q_proj.weight.shape[1] == 2 * HIDDEN  # [norm(embed) ; norm(g)]
    _draft_forward_on_real_features(family, model, draft)
    _check_save_load(model, draft, tmp_path / "draft")
    assert SpecVLMDraftModel.from_pretrained(tmp_path / "draft").config.draft_architecture == "eagle3"


@pytest.mark.parametrize("family,compressor_mode", [("llava", None), ("qwen2_vl", "select")])
def test_multi_layer_fusion(family, compressor_mode, targets_cache, tmp_path):
    model = targets_cache(family)
    config = SpecVLMDraftConfig.from_target(model, target_layers=[1, -1], compressor_mode=compressor_mode)
    assert config.num_fused_layers == 2
    draft = SpecVLMDraftModel(config).bind(model)
    assert draft.feature_proj.weight.shape == (HIDDEN, 2 * HIDDEN)  # [f_1 ; f_-1] -> one feature
    assert draft.fc.weight.shape == (HIDDEN, 2 * HIDDEN)  # [embed ; feature]
    _draft_forward_on_real_features(family, model, draft)
    _check_save_load(model, draft, tmp_path / "draft")
    loaded = SpecVLMDraftModel.from_pretrained(tmp_path / "draft")
    assert loaded.config.target_layers == [1, -1]
    assert loaded.config.compressor_mode == compressor_mode


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_multi_layer_fusion_generate(mode, targets_cache):
    model = targets_cache("llava")
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model, target_layers=[1, -1])).bind(model)
    inputs = make_inputs("llava", model, seed=1)
    reference = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    out = model.generate(
        **inputs, max_new_tokens=6, do_sample=False, assistant_model=draft, decoding_mode=mode
    )
    assert torch.equal(out, reference)


def test_unbound_draft_explains_how_to_bind(targets_cache):
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(targets_cache("llama")))
    with pytest.raises(RuntimeError, match=r"draft\.bind\(vlm\)"):
        draft.compute_logits(torch.zeros(1, HIDDEN))
    with pytest.raises(RuntimeError, match=r"draft\.bind\(vlm\)"):
        draft.embed_tokens(torch.tensor([[3]]))
    with pytest.raises(RuntimeError, match=r"assistant_model=draft"):
        draft.generate(torch.tensor([[3]]))


# ------------------------------------------------------------------------------------ binding errors
def _llama(**overrides):
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def test_bind_to_target_with_other_hidden_size(targets_cache):
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(targets_cache("llama")))
    with pytest.raises(ValueError, match=r"hidden size 64 != draft's 32"):
        draft.bind(_llama(hidden_size=64))
    assert not draft.is_bound


def test_bind_to_target_with_other_vocab(targets_cache):
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(targets_cache("llama")))
    with pytest.raises(ValueError, match=r"vocabulary size 400 != draft's 320"):
        draft.bind(_llama(vocab_size=400))


def test_bind_to_target_of_other_family(targets_cache):
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(targets_cache("llava")))
    with pytest.raises(ValueError, match=r"family 'causal_lm' != draft's 'llava'") as info:
        draft.bind(targets_cache("llama"))
    assert "LlavaForConditionalGeneration" in str(info.value)  # says what the draft was made for
    assert "LlamaForCausalLM" in str(info.value)


def test_bind_with_target_layers_out_of_range(targets_cache):
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(targets_cache("llama"), target_layers=[7, -1]))
    with pytest.raises(ValueError, match=r"target_layers \[7\] out of range for a 2-layer target"):
        draft.bind(targets_cache("llama"))


def test_bind_to_unsupported_model_lists_supported_families(targets_cache):
    from transformers import GPT2Config, GPT2LMHeadModel

    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(targets_cache("llama")))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB_SIZE, n_embd=HIDDEN, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*not a supported target.*Supported families"):
        draft.bind(gpt2)


# ------------------------------------------------------------------------------------ generate errors
def test_invalid_per_call_overrides_raise_the_config_error(targets_cache):
    model = targets_cache("llava")
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
    inputs = make_inputs("llava", model)
    cases = [
        (dict(tree_top_k=0), "invalid tree_top_k=0"),
        (dict(decoding_mode="beam"), "invalid decoding_mode='beam'"),
        (dict(tree_depth=8, tree_total_tokens=5), "invalid tree_total_tokens=5"),
        (dict(draft_confidence_threshold=1.5), "invalid draft_confidence_threshold=1.5"),
        (dict(num_draft_tokens=0, decoding_mode="chain"), "invalid num_draft_tokens=0"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            model.generate(**inputs, assistant_model=draft, max_new_tokens=3, **overrides)
    assert draft.config.tree_top_k is None  # a per-call value never changes the config


def test_unbound_draft_to_never_bound_model_says_bind():
    model = make_tiny_target("llava")  # fresh: no SpecVLM routing installed
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model))
    inputs = make_inputs("llava", model)
    with pytest.raises((ValueError, RuntimeError, AttributeError), match=r"bind"):
        model.generate(**inputs, assistant_model=draft, max_new_tokens=3)


def test_unbound_draft_to_a_routed_model_says_bind(targets_cache):
    model = targets_cache("llava")
    SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)  # installs the routing
    unbound = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model))
    with pytest.raises(ValueError, match=r"draft\.bind\(vlm\)"):
        model.generate(**make_inputs("llava", model), assistant_model=unbound, max_new_tokens=3)


def test_unbound_draft_error_says_not_bound(targets_cache):
    model = targets_cache("llava")
    SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
    unbound = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model))
    with pytest.raises(ValueError, match=r"not bound"):
        model.generate(**make_inputs("llava", model), assistant_model=unbound, max_new_tokens=3)


def test_draft_bound_to_another_model(targets_cache):
    model_a = targets_cache("llava")
    model_b = make_tiny_target("llava", seed=1)
    config = SpecVLMDraftConfig.from_target(model_a)
    draft_a = SpecVLMDraftModel(config).bind(model_a)
    SpecVLMDraftModel(config).bind(model_b)
    for mode in ("tree", "chain"):
        with pytest.raises(ValueError, match=r"bound to a different model"):
            model_b.generate(
                **make_inputs("llava", model_b), assistant_model=draft_a, max_new_tokens=3, decoding_mode=mode
            )


@pytest.mark.parametrize("mode", ["tree", "chain"])
def test_batch_of_two_runs_and_what_it_cannot_take_is_refused(mode, targets_cache):
    model = targets_cache("llama")
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
    input_ids = make_inputs("llama", model)["input_ids"].repeat(2, 1)
    plain = model.generate(input_ids, max_new_tokens=3, do_sample=False)
    spec = model.generate(
        input_ids, assistant_model=draft, max_new_tokens=3, decoding_mode=mode, do_sample=False
    )
    assert torch.equal(spec, plain)  # positional input_ids too
    assert len(draft.last_generation_stats.rows) == 2
    first = model.generate(input_ids, max_new_tokens=2, return_dict_in_generate=True)
    with pytest.raises(ValueError, match=r"batch \(2 prompts\) cannot continue from a filled cache"):
        model.generate(
            first.sequences, cache=first.cache, assistant_model=draft, max_new_tokens=3, decoding_mode=mode
        )
    right_padded = torch.ones_like(input_ids)
    right_padded[0, -2:] = 0
    with pytest.raises(ValueError, match=r"needs left padding"):
        model.generate(
            input_ids=input_ids, attention_mask=right_padded, assistant_model=draft, decoding_mode=mode
        )
    embeds = model.get_input_embeddings()(input_ids)
    with pytest.raises(ValueError, match=r"needs input_ids and no inputs_embeds"):
        model.generate(
            input_ids=input_ids,
            inputs_embeds=embeds,
            assistant_model=draft,
            max_new_tokens=3,
            decoding_mode=mode,
        )


def test_bind_leaves_target_save_pretrained_unchanged(tmp_path):
    model = make_tiny_target("llava")
    model.save_pretrained(tmp_path / "before")
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(model)).bind(model)
    assert draft.is_bound
    model.save_pretrained(tmp_path / "after")
    before, after = tmp_path / "before", tmp_path / "after"
    assert sorted(p.name for p in before.iterdir()) == sorted(p.name for p in after.iterdir())
    for path in before.iterdir():
        if path.suffix == ".json":
            assert json.loads(path.read_text()) == json.loads((after / path.name).read_text()), path.name
    tensors_before = load_file(before / "model.safetensors")
    tensors_after = load_file(after / "model.safetensors")
    assert set(tensors_before) == set(tensors_after)
    for name, tensor in tensors_before.items():
        assert torch.equal(tensor, tensors_after[name]), name
    assert not any("specvlm" in k or k.startswith(("fc.", "layers.")) for k in tensors_after)


# ------------------------------------------------------------------------------------ PEFT
def test_peft_wrapped_target():
    peft = pytest.importorskip("peft")
    model = make_tiny_target("llama")
    peft_model = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    # make the adapter matter: LoRA B starts at zero, so give it weights
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    peft_model.eval()
    input_ids = make_inputs("llama", model)["input_ids"]
    reference = peft_model.generate(input_ids=input_ids, max_new_tokens=10, do_sample=False)
    with peft_model.disable_adapter():
        without_adapter = peft_model.generate(input_ids=input_ids, max_new_tokens=10, do_sample=False)
    assert not torch.equal(reference, without_adapter)  # the adapter changes the output

    config = SpecVLMDraftConfig.from_target(peft_model)
    assert config.target_architecture == "LlamaForCausalLM"
    assert config.target_family == "causal_lm"
    draft = SpecVLMDraftModel(config).bind(peft_model)
    assert draft.target is model
    for mode in ("tree", "chain"):
        draft.last_generation_stats = None
        out = peft_model.generate(
            input_ids=input_ids, assistant_model=draft, max_new_tokens=10, do_sample=False, decoding_mode=mode
        )
        assert torch.equal(out, reference), mode
        stats = draft.last_generation_stats
        assert stats is not None and stats.decoding_mode == mode  # routed through SpecVLM decoding
        assert stats.new_tokens == 10


def test_draft_layer_matches_a_llama_layer_in_training_and_decoding_paths():
    """Our decoder layer is a Llama layer: same weights, same outputs as transformers' LlamaDecoderLayer, both on
    the autograd path (separate q/k/v) and the decoding path (stacked q/k/v, packed linears, joint RoPE)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from specvlm_hf import SpecVLMDraftConfig
    from specvlm_hf.draft.modeling_specvlm import SpecVLMDecoderLayer, SpecVLMRotaryEmbedding

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rms_norm_eps=1e-6, rope_theta=10000.0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    ref = LlamaDecoderLayer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    draft_cfg = SpecVLMDraftConfig(
        hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=32,
    )  # fmt: skip
    ours = SpecVLMDecoderLayer(draft_cfg, layer_idx=0)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 7, 64)
    pos = torch.arange(3, 10)[None]
    causal = torch.full((7, 7), float("-inf")).triu(1)[None, None]
    ref_pos = LlamaRotaryEmbedding(cfg)(x, pos)
    expect = ref(x, attention_mask=causal, position_embeddings=ref_pos, position_ids=pos)
    expect = expect[0] if isinstance(expect, tuple) else expect
    cos, sin = SpecVLMRotaryEmbedding(16, 10000.0)(pos, x.dtype)
    got_train = ours(x, cos, sin, causal, None)  # autograd on: the training path
    with torch.no_grad():
        got_decode = ours(x, cos, sin, causal, None)
    torch.testing.assert_close(got_train, expect, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_decode, expect, rtol=1e-4, atol=1e-4)


def test_a_deep_copy_of_a_bound_target_routes_its_own_generate():
    """`copy.deepcopy(vlm)` after `draft.bind(vlm)`: the copy's generate runs the copy (it used to run the
    original through the routing closure), and refuses the draft bound to the original with a clear error."""
    import copy

    target = make_tiny_target("llava")
    draft = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(target)).bind(target)
    twin = copy.deepcopy(target)
    with torch.no_grad():
        twin.lm_head.weight.mul_(-1.0)  # the twin now answers differently
    inputs = make_inputs("llava", target)
    assert not torch.equal(
        twin.generate(**inputs, max_new_tokens=4, do_sample=False),
        target.generate(**inputs, max_new_tokens=4, do_sample=False),
    )
    with pytest.raises(ValueError, match="bound to a different model"):
        twin.generate(**inputs, max_new_tokens=4, assistant_model=draft)
