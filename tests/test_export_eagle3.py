"""export_draft(format="speculators") for an "eagle3" draft: the speculators 0.9.0 EAGLE-3 fields and weight names.

The slow test in test_hub.py loads these exports with speculators itself; here a reference built from transformers'
own Llama modules reads the exported tensors by their speculators names and must reproduce the draft.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.draft.configuration_specvlm import DEFAULT_CHAIN_TOKENS
from specvlm_hf.sharing.export import (
    aux_layer_ids,
    export_draft,
    servable_target_layers,
    speculators_weight_name,
)
from tiny_models import HIDDEN, VOCAB_SIZE, make_tiny_target

DRAFT_VOCAB = 64


@pytest.fixture(scope="module")
def target():
    return make_tiny_target("llava")  # 2 decoder layers


def make_draft(target, **overrides) -> SpecVLMDraftModel:
    torch.manual_seed(0)
    config = SpecVLMDraftConfig.from_target(target, draft_architecture="eagle3", **overrides)
    draft = SpecVLMDraftModel(config).bind(target).eval()
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms away from 1 so a mixed-up weight shows
    if config.draft_vocab_size is not None:
        draft.set_draft_vocab(torch.randperm(config.vocab_size)[: config.draft_vocab_size])
    return draft


@pytest.fixture(scope="module")
def multi(target, tmp_path_factory):
    """Three target layers, two decoder layers, GQA, a shuffled reduced vocabulary, a compressor."""
    draft = make_draft(
        target,
        target_layers=[0, 1, -1],
        num_hidden_layers=2,
        num_key_value_heads=2,
        draft_vocab_size=DRAFT_VOCAB,
        compressor_mode="pool",
    )
    # -1 (after the target's final norm) has no vLLM equivalent: written as layer 2 only when asked for
    return draft, export_draft(draft, tmp_path_factory.mktemp("multi"), allow_inexact=True)


@pytest.fixture(scope="module")
def single(target, tmp_path_factory):
    """One target layer (no fc), full vocabulary."""
    draft = make_draft(target, target_layers=[1])
    return draft, export_draft(draft, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def unsorted(target, tmp_path_factory):
    """Two target layers named out of layer order: vLLM concatenates them in layer order."""
    draft = make_draft(target, target_layers=[1, 0])
    return draft, export_draft(draft, tmp_path_factory.mktemp("unsorted"))


def test_config_fields(multi, target):
    draft, out = multi
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3"
    assert config["architectures"] == ["Eagle3DraftModel"]
    assert config["speculators_version"] == "0.9.0"
    layer = config["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["num_hidden_layers"] == 2
    assert (layer["hidden_size"], layer["vocab_size"], layer["head_dim"]) == (HIDDEN, VOCAB_SIZE, 8)
    assert (layer["num_attention_heads"], layer["num_key_value_heads"]) == (4, 2)
    assert layer["rope_parameters"] == {"rope_type": "default", "rope_theta": draft.config.rope_theta}
    assert config["draft_vocab_size"] == DRAFT_VOCAB
    assert config["eagle_aux_hidden_state_layer_ids"] == [
        0,
        1,
        2,
    ]  # -1 -> the layer count of the 2-layer target
    for flag in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output", "embed_requires_grad"):
        assert config[flag] is False, flag
    spec = config["speculators_config"]
    assert spec["algorithm"] == "eagle3"
    assert spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0]["proposal_type"] == "greedy"
    assert spec["proposal_methods"][0]["speculative_tokens"] == (
        draft.config.num_draft_tokens or DEFAULT_CHAIN_TOKENS
    )
    assert spec["verifier"] == {
        "name_or_path": draft.config.target_name_or_path,
        "architectures": ["LlavaForConditionalGeneration"],
    }
    ours = config["specvlm"]
    assert ours["draft_architecture"] == "eagle3" and ours["target_layers"] == [0, 1, -1]
    assert ours["compressor_dropped"] is True and ours["fc_identity"] is False
    assert ours["tree"] == {"top_k": 10, "depth": 7, "total_tokens": 60}


def test_weight_names_and_vocab_maps(multi, target):
    draft, out = multi
    weights = load_file(out / "model.safetensors")
    per_layer = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
        *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    ]
    expected = {"embed_tokens.weight", "fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"}
    expected |= {"layers.0.hidden_norm.weight"} | {f"layers.{i}.{n}" for i in (0, 1) for n in per_layer}
    assert set(weights) == expected
    assert weights["fc.weight"].shape == (HIDDEN, 3 * HIDDEN)
    assert weights["layers.0.self_attn.q_proj.weight"].shape == (HIDDEN, 2 * HIDDEN)
    assert weights["layers.0.self_attn.k_proj.weight"].shape == (16, 2 * HIDDEN)
    assert weights["layers.1.self_attn.q_proj.weight"].shape == (HIDDEN, HIDDEN)
    state = draft.state_dict()
    for name in weights:
        if name in state:
            assert torch.equal(weights[name], state[name]), name
    assert torch.equal(weights["embed_tokens.weight"], target.get_input_embeddings().weight)
    # reduced vocabulary: rows in increasing target-id order, d2t offsets, t2d mask
    ids = draft.draft_vocab_ids
    sorted_ids, order = ids.sort()
    d2t, t2d = weights["d2t"], weights["t2d"]
    assert d2t.dtype == torch.long and t2d.dtype == torch.bool and t2d.shape == (VOCAB_SIZE,)
    assert torch.equal(torch.arange(DRAFT_VOCAB) + d2t, sorted_ids)
    assert torch.equal(t2d.nonzero().flatten(), sorted_ids)
    assert torch.equal(weights["lm_head.weight"], draft.draft_lm_head.weight[order])


def test_single_layer_full_vocab(single, target):
    draft, out = single
    weights = load_file(out / "model.safetensors")
    assert torch.equal(weights["fc.weight"], torch.eye(HIDDEN))  # g = f
    assert torch.equal(weights["lm_head.weight"], target.lm_head.weight)
    assert "d2t" not in weights and "t2d" not in weights
    config = json.loads((out / "config.json").read_text())
    assert config["draft_vocab_size"] == VOCAB_SIZE and config["eagle_aux_hidden_state_layer_ids"] == [1]
    assert config["specvlm"]["fc_identity"] is True
    # vLLM sizes fc from num_aux_hidden_states (default 3: the [h, h] identity was refused)
    assert config["transformer_layer_config"]["num_aux_hidden_states"] == 1


def test_unsorted_layers_are_written_in_layer_order(unsorted):
    draft, out = unsorted
    config = json.loads((out / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [0, 1]
    assert config["specvlm"]["target_layers"] == [1, 0]
    assert config["transformer_layer_config"]["num_aux_hidden_states"] == 2
    fc = load_file(out / "model.safetensors")["fc.weight"]
    assert torch.equal(fc, torch.cat([draft.fc.weight[:, HIDDEN:], draft.fc.weight[:, :HIDDEN]], dim=1))


def test_servable_target_layers():
    assert [servable_target_layers(n) for n in (1, 2, 3, 4, 5)] == [
        [0],
        [0, 1],
        [0, 1, 2],
        [0, 2, 3],
        [0, 2, 4],
    ]
    assert servable_target_layers(32) == [2, 16, 29] and servable_target_layers(7) == [2, 3, 4]
    with pytest.raises(ValueError):
        servable_target_layers(0)


@pytest.mark.parametrize("layers", [[-1], [0, -1], [2]])
def test_last_hidden_state_is_refused(target, layers, tmp_path):
    """transformers' last hidden state is after the final norm; vLLM's layer L is before it."""
    draft = make_draft(target, target_layers=layers)
    with pytest.raises(ValueError, match=r"before that norm.*target_layers=\[0, 1\].*--servable"):
        export_draft(draft, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    config = json.loads(
        (export_draft(draft, tmp_path / "ok", allow_inexact=True) / "config.json").read_text()
    )
    assert config["eagle_aux_hidden_state_layer_ids"][-1] == 2


def test_readme_states_what_carries_over(multi, single):
    text = (multi[1] / "README.md").read_text()
    assert "eagle3" in text and "What carries over" in text and "What does not carry over" in text
    assert "compressor (`pool`)" in text and "**dropped**" in text
    assert "d2t" in text and "`fc.weight` is the identity" not in text
    assert "`fc.weight` is the identity" in (single[1] / "README.md").read_text()


def _reference_forward(weights, config, e, f, pos):
    """EAGLE-3 from transformers' Llama modules, loaded by the exported (speculators) names."""
    h = config.hidden_size
    llama = LlamaConfig(
        hidden_size=h,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        vocab_size=config.vocab_size,
    )
    llama._attn_implementation = "eager"
    layers = []
    for i in range(config.num_hidden_layers):
        layer = LlamaDecoderLayer(llama, layer_idx=i)
        prefix = f"layers.{i}."
        sub = {
            k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix) and "hidden_norm" not in k
        }
        if i == 0:  # q/k/v read [norm(e) ; norm(g)]
            for p in "qkv":
                getattr(layer.self_attn, f"{p}_proj").weight = torch.nn.Parameter(
                    sub[f"self_attn.{p}_proj.weight"]
                )
        layer.load_state_dict(sub, strict=True)
        layers.append(layer)
    hidden_norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
    hidden_norm.weight.data.copy_(weights["layers.0.hidden_norm.weight"])
    norm = LlamaRMSNorm(h, eps=config.rms_norm_eps)
    norm.weight.data.copy_(weights["norm.weight"])
    cos, sin = LlamaRotaryEmbedding(llama)(e, pos)
    n = e.shape[1]
    mask = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]
    g = f @ weights["fc.weight"].T
    first = layers[0]
    attn_in = torch.cat([first.input_layernorm(e), hidden_norm(g)], dim=-1)
    a, _ = first.self_attn(attn_in, position_embeddings=(cos, sin), attention_mask=mask)
    x = g + a
    x = x + first.mlp(first.post_attention_layernorm(x))
    for layer in layers[1:]:
        x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))
        x = x[0] if isinstance(x, tuple) else x
    return x, norm(x) @ weights["lm_head.weight"].T


@pytest.mark.parametrize("case", ["multi", "single", "unsorted"])
def test_exported_weights_reproduce_the_draft(case, request):
    draft, out = request.getfixturevalue(case)
    config = draft.config
    weights = load_file(out / "model.safetensors")
    ids = torch.randint(10, VOCAB_SIZE - 20, (1, 7), generator=torch.Generator().manual_seed(1))
    e = torch.nn.functional.embedding(ids, weights["embed_tokens.weight"])
    f = torch.randn(1, 7, config.num_fused_layers * HIDDEN, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(7)[None]
    # the consumer concatenates the layers in increasing layer order
    blocks = f.split(HIDDEN, dim=-1)
    layer_ids = aux_layer_ids(draft)  # -1 resolved to the layer count
    f_consumer = torch.cat([blocks[j] for j in sorted(range(len(blocks)), key=layer_ids.__getitem__)], -1)
    with torch.no_grad():
        hidden_ref, logits_ref = _reference_forward(weights, config, e, f_consumer, pos)
        hidden = draft(
            inputs_embeds=draft.embed_tokens(ids), hidden_states=f, position_ids=pos
        ).last_hidden_state
        logits, vocab_ids = draft.draft_logits(hidden)
    if vocab_ids is not None:
        logits = logits[..., vocab_ids.argsort()]  # into speculators' column order
    assert (hidden - hidden_ref).abs().max() < 1e-5
    assert (logits - logits_ref).abs().max() < 1e-5


def test_weight_name_map_and_errors(target):
    assert speculators_weight_name("compressor.conv.bias", "eagle3") is None
    assert speculators_weight_name("draft_vocab_ids", "eagle3") is None
    assert speculators_weight_name("draft_lm_head.weight", "eagle3") == "lm_head.weight"
    assert speculators_weight_name("layers.0.hidden_norm.weight", "eagle3") == "layers.0.hidden_norm.weight"
    with pytest.raises(ValueError, match="no speculators EAGLE-3 name"):
        speculators_weight_name("input_norm.weight", "eagle3")
    unbound = SpecVLMDraftModel(SpecVLMDraftConfig.from_target(target, draft_architecture="eagle3"))
    with pytest.raises(ValueError, match=r"bound to its target"):
        export_draft(unbound, "/nonexistent")
    twice = make_draft(target, target_layers=[2, -1])  # both name the last hidden state of the 2-layer target
    with pytest.raises(ValueError, match="same target layer twice"):
        export_draft(twice, "/nonexistent")


def test_attention_bias_writes_zero_o_proj_bias(target, tmp_path):
    draft = make_draft(target, attention_bias=True, target_layers=[1])
    weights = load_file(export_draft(draft, tmp_path) / "model.safetensors")
    assert torch.equal(weights["layers.0.self_attn.o_proj.bias"], torch.zeros(HIDDEN))
    assert torch.equal(weights["layers.0.self_attn.q_proj.bias"], draft.layers[0].self_attn.q_proj.bias)


def test_specvlm_train_servable_makes_an_exportable_draft(target, tmp_path):
    from specvlm_hf.cli import build_parser
    from specvlm_hf.toy.drafts import new_draft

    assert build_parser().parse_args(["train", "--output-dir", "out", "--servable"]).servable is True
    assert build_parser().parse_args(["train", "--output-dir", "out"]).servable is False
    draft = new_draft(target, servable=True)
    assert draft.config.draft_architecture == "eagle3" and draft.config.target_layers == [0, 1]
    config = json.loads((export_draft(draft, tmp_path) / "config.json").read_text())
    assert config["eagle_aux_hidden_state_layer_ids"] == [0, 1]
    with pytest.raises(ValueError, match="draft_architecture='eagle3'"):
        export_draft(new_draft(target), tmp_path / "eagle")  # the default "eagle" draft


@pytest.mark.parametrize(
    "flags,unroll",
    [(["--servable"], 3), ([], 1), (["--servable", "--unroll-steps", "1"], 1), (["--unroll-steps", "2"], 2)],
)
def test_specvlm_train_unrolls_servable_drafts(target, tmp_path, monkeypatch, flags, unroll):
    """`specvlm train --servable` trains with the training-time test (3 steps) unless --unroll-steps says otherwise;
    the default draft keeps teacher forcing."""
    from specvlm_hf.cli import build_parser
    from specvlm_hf.toy import train_command

    seen = {}

    def fake_distill(draft, *args, **kwargs):
        seen.update(kwargs, architecture=draft.config.draft_architecture)
        return {}

    monkeypatch.setattr(train_command, "load_target", lambda *a, **k: (target, None, "tiny"))
    monkeypatch.setattr(train_command, "load_rows", lambda *a, **k: [])
    monkeypatch.setattr(train_command, "distill_draft", fake_distill)
    args = build_parser().parse_args(["train", "--output-dir", str(tmp_path), *flags])
    assert train_command.run_train(args) == 0
    assert seen["unroll_steps"] == unroll
    assert seen["architecture"] == ("eagle3" if "--servable" in flags else "eagle")
    assert json.loads((tmp_path / "training_metrics.json").read_text())["unroll_steps"] == unroll
