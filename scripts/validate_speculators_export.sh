#!/usr/bin/env bash
# Export tiny SpecVLM drafts with export_draft(format="speculators") and load them with speculators' own classes,
# each speculators version in its own venv (speculators pins transformers; never install it into the main env).
#
#   bash scripts/validate_speculators_export.sh            # from the repository root; a few minutes the first time
#
# Venvs use --system-site-packages so the main environment's torch (2.13 CPU) satisfies torch==2.13.0; pip puts
# speculators and the transformers it pins inside the venv, which shadows the main environment's transformers.
#   /tmp/spec-venv    speculators==0.9.0 (current; EAGLE-3): two `draft_architecture="eagle3"` exports (three fused
#                     target layers + two decoder layers + a shuffled reduced vocabulary + a dropped compressor,
#                     exported with allow_inexact=True for its -1 layer; one target layer + full vocabulary) load with SpeculatorModelConfig / SpeculatorModel
#                     (-> Eagle3SpeculatorConfig / Eagle3DraftModel), every tensor arrives unchanged, speculators'
#                     own save_pretrained writes the same tensor names and values, and its forward (3 training-time-
#                     test steps, teacher forcing, eager attention) matches the SpecVLM draft's forward on the same
#                     inputs: pre-norm hidden states and logits within 1e-4 (float32), same draft tokens. Also checks
#                     the default "eagle" export's speculators_config block and LlamaDecoderLayer weights, and
#                     reports that 0.9.0 refuses that config (it no longer registers speculators_model_type "eagle").
#                     pip pulls the PyPI torchvision/torchaudio builds, which do not load with the CPU torch
#                     ("operator torchvision::nms does not exist", and then transformers cannot import
#                     PreTrainedModel); speculators does not need them here, so they are uninstalled from the venv.
#   /tmp/spec03-venv  speculators==0.3.0 (+ transformers<5, which it needs): loads the whole "eagle" checkpoint with
#                     SpeculatorModelConfig / EagleSpeculator and checks every exported weight arrived unchanged.
# Exit status 0 when every check passes. Set MAIN_PYTHON to the interpreter that has specvlm_hf.
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN_PYTHON=${MAIN_PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/specvlm-speculators-XXXXXX)}

make_venv() {  # make_venv DIR PIP_ARGS...
  local dir=$1; shift
  if [ ! -x "$dir/bin/python" ] || ! "$dir/bin/python" -c "import speculators" 2>/dev/null; then
    [ -x "$dir/bin/python" ] || python3 -m venv --system-site-packages "$dir"
    "$dir/bin/pip" install -q "$@"
    if ! "$dir/bin/python" -c "import speculators" 2>/dev/null; then
      "$dir/bin/pip" uninstall -q -y torchvision torchaudio  # CUDA builds that break imports with the CPU torch
    fi
    "$dir/bin/python" -c "import speculators"
  fi
}
make_venv /tmp/spec-venv torch==2.13.0 speculators==0.9.0
make_venv /tmp/spec03-venv torch==2.13.0 speculators==0.3.0 "transformers>=4.53,<5"

echo "== export a tiny eagle draft with the main python ($MAIN_PYTHON) to $OUT"
PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} "$MAIN_PYTHON" - "$OUT" <<'PY'
import sys
import torch
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf import export_draft

torch.manual_seed(0)
config = SpecVLMDraftConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                            vocab_size=100, target_name_or_path="org/tiny-llava",
                            target_architecture="LlavaForConditionalGeneration", eos_token_id=2, bos_token_id=1)
draft = SpecVLMDraftModel(config)
with torch.no_grad():
    for p in draft.parameters():
        p.add_(0.1 * torch.randn_like(p))  # norms away from 1 so a mixed-up weight shows
export_draft(draft, sys.argv[1], allow_inexact=True)  # "eagle" drops the fusion norm: refused by default
# Reference output of the draft's decoder layer, to compare with speculators' LlamaDecoderLayer.
x = torch.randn(1, 5, 32)
pos = torch.arange(5)[None]
cos, sin = draft.rotary_emb(pos, x.dtype)
mask = torch.full((5, 5), torch.finfo(x.dtype).min).triu(1)[None, None]  # additive causal mask
with torch.no_grad():
    y = draft.layers[0](x, cos, sin, mask, None)
torch.save({"x": x, "y": y, "mask": mask}, f"{sys.argv[1]}/reference_layer.pt")
print("exported", sys.argv[1])
PY


echo "== export two eagle3 drafts (and the tiny target they read, as the verifier) to $OUT"
PYTHONPATH=src:tests${PYTHONPATH:+:$PYTHONPATH} "$MAIN_PYTHON" - "$OUT" <<'PY'
import json
import sys

import torch
from transformers import DynamicCache

from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf import export_draft
from tiny_models import TEXT_HIGH, TEXT_LOW, make_tiny_target

out = sys.argv[1]
target = make_tiny_target("llava")  # 2 layers, hidden 32, vocabulary 320
target.save_pretrained(f"{out}/verifier")  # speculators reads the verifier's config and heads from here
CASES = {
    # three target layers (fc 3h -> h), two decoder layers, GQA, a reduced vocabulary in shuffled order, a compressor
    "eagle3_multi": dict(target_layers=[0, 1, -1], num_hidden_layers=2, num_key_value_heads=2,
                         draft_vocab_size=64, compressor_mode="pool"),
    # one target layer (no fc: exported as the identity), full vocabulary (lm_head: the target's)
    "eagle3_single": dict(target_layers=[1]),
}
T, STEPS = 9, 3  # rows, EAGLE-3 training-time-test steps compared
for name, overrides in CASES.items():
    torch.manual_seed(0)
    config = SpecVLMDraftConfig.from_target(target, draft_architecture="eagle3", **overrides)
    config.target_name_or_path = f"{out}/verifier"
    draft = SpecVLMDraftModel(config).bind(target).eval()
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms away from 1 so a mixed-up weight shows
    if config.draft_vocab_size:
        draft.set_draft_vocab(torch.randperm(config.vocab_size)[: config.draft_vocab_size])
    # -1 (after the final norm) is not what vLLM reads as layer L: written only when asked for
    export_draft(draft, f"{out}/{name}", allow_inexact=-1 in config.target_layers)
    # What speculators' forward computes with ttt_steps=STEPS (teacher forcing), through the draft's public
    # forward: step j reads the ids shifted by j, the previous step's output in the feature slot, positions + j,
    # and the cache of the earlier steps under a causal block (step 0) and one diagonal block per later step.
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(TEXT_LOW, TEXT_HIGH, (1, T), generator=g)
    feats = torch.randn(1, T, config.num_fused_layers * config.hidden_size, generator=g)
    pos = torch.arange(1, T + 1)[None]
    ref = {"input_ids": ids, "hidden_states": feats, "position_ids": pos}
    cache, hidden = DynamicCache(), feats
    causal, diag = torch.ones(T, T, dtype=torch.bool).tril(), torch.eye(T, dtype=torch.bool)
    with torch.no_grad():
        for j in range(STEPS):
            step_ids = torch.cat([ids[:, j:], ids.new_zeros(1, j)], dim=1)
            allowed = torch.cat([causal] + [diag] * j, dim=1)
            mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
            hidden = draft(inputs_embeds=draft.embed_tokens(step_ids), hidden_states=hidden, position_ids=pos + j,
                           attention_mask=mask, past_key_values=cache).last_hidden_state
            logits, vocab_ids = draft.draft_logits(hidden)  # (1, T, Vd), the draft's own vocabulary
            tokens = logits.argmax(-1) if vocab_ids is None else vocab_ids[logits.argmax(-1)]  # target ids
            if vocab_ids is not None:
                logits = logits[..., torch.argsort(vocab_ids)]  # speculators' column order: increasing target id
            ref[f"hidden_{j}"], ref[f"logits_{j}"], ref[f"tokens_{j}"] = hidden, logits, tokens
    torch.save(ref, f"{out}/{name}/reference.pt")
    layers = json.load(open(f"{out}/{name}/config.json"))["eagle_aux_hidden_state_layer_ids"]
    print(f"exported {name}: target_layers {config.target_layers} -> eagle_aux_hidden_state_layer_ids {layers}")
PY

echo "== speculators 0.9.0: eagle export (config block and decoder layer)"
/tmp/spec-venv/bin/python - "$OUT" <<'PY'
import json, sys
import torch
from safetensors.torch import load_file
from importlib.metadata import version
from speculators import SpeculatorModelConfig, SpeculatorsConfig
spec_version = version("speculators")
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

out = sys.argv[1]
cfg = json.load(open(f"{out}/config.json"))
sc = SpeculatorsConfig.model_validate(cfg["speculators_config"])
assert sc.algorithm == "eagle" and sc.default_proposal_method == "greedy", sc
assert sc.verifier.name_or_path == "org/tiny-llava", sc.verifier
print(f"speculators {spec_version}: SpeculatorsConfig OK:", sc.algorithm, [p.proposal_type for p in sc.proposal_methods], sc.verifier)
tl = LlamaConfig(**cfg["transformer_layer_config"])
tl._attn_implementation = "eager"
layer = LlamaDecoderLayer(tl, layer_idx=0)
weights = load_file(f"{out}/model.safetensors")
prefix = "transformer."
layer.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
ref = torch.load(f"{out}/reference_layer.pt")
pos = torch.arange(ref["x"].shape[1])[None]
cos, sin = LlamaRotaryEmbedding(tl)(ref["x"], pos)
with torch.no_grad():
    y = layer(ref["x"], attention_mask=ref["mask"], position_ids=pos, position_embeddings=(cos, sin))
    y = y[0] if isinstance(y, tuple) else y
err = (y - ref["y"]).abs().max().item()
assert err < 1e-5, err
print(f"LlamaDecoderLayer (transformer.*) strict load OK; causal forward max |diff| vs SpecVLM layer = {err:.2e}")
try:
    SpeculatorModelConfig.from_pretrained(out)
    print("full SpeculatorModelConfig loaded")
except Exception as e:  # expected: 0.9.0 registers EAGLE-3 and others, not "eagle"
    print("full SpeculatorModelConfig refused (expected with 0.9.0):", str(e).splitlines()[1].strip()[:160])
PY


echo "== speculators 0.9.0: eagle3 exports"
/tmp/spec-venv/bin/python - "$OUT" <<'PY'
import sys
import tempfile
from importlib.metadata import version

import torch
from loguru import logger
from safetensors.torch import load_file
from speculators import SpeculatorModel, SpeculatorModelConfig
from speculators.models.eagle3 import Eagle3SpeculatorConfig
from speculators.models.eagle3.core import Eagle3DraftModel
from transformers.utils import logging as hf_logging

logger.remove()  # speculators' per-file loading messages
hf_logging.disable_progress_bar()
out, STEPS, worst = sys.argv[1], 3, 0.0
for name in ("eagle3_multi", "eagle3_single"):
    path = f"{out}/{name}"
    config = SpeculatorModelConfig.from_pretrained(path)  # resolved by speculators_model_type
    assert isinstance(config, Eagle3SpeculatorConfig), type(config)
    assert config.speculators_config.algorithm == "eagle3", config.speculators_config
    config.transformer_layer_config._attn_implementation = "eager"  # default flex attention wants a GPU compile
    model = SpeculatorModel.from_pretrained(path, config=config).eval()  # + the verifier's norm / heads
    assert type(model) is Eagle3DraftModel, type(model)
    weights, state = load_file(f"{path}/model.safetensors"), model.state_dict()
    assert not set(weights) - set(state), set(weights) - set(state)
    for k, v in weights.items():
        assert torch.equal(state[k], v), k
    print(f"speculators {version('speculators')}: {name}: {type(config).__name__} -> {type(model).__name__}; "
          f"{len(weights)}/{len(weights)} tensors loaded unchanged; not in the checkpoint (verifier-only, for "
          f"training): {sorted(set(state) - set(weights))}; draft vocab {model.draft_vocab_size} of "
          f"{model.verifier_vocab_size}, aux layers {model.target_layer_ids}")
    with tempfile.TemporaryDirectory() as tmp:  # speculators' own writer: same names, same values
        model.save_pretrained(tmp)
        resaved = load_file(f"{tmp}/model.safetensors")
    assert set(resaved) == set(weights), set(resaved) ^ set(weights)
    assert all(torch.equal(resaved[k], weights[k]) for k in weights)
    print("  speculators save_pretrained writes the same tensor names and values")
    ref = torch.load(f"{path}/reference.pt")
    captured = {"hidden": [], "logits": []}
    hooks = [model.norm.register_forward_hook(lambda m, i, o: captured["hidden"].append(i[0])),
             model.lm_head.register_forward_hook(lambda m, i, o: captured["logits"].append(o))]
    with torch.no_grad():
        tokens = model(hidden_states=ref["hidden_states"], input_ids=ref["input_ids"],
                       document_ids=torch.zeros_like(ref["input_ids"]), position_ids=ref["position_ids"],
                       ttt_steps=STEPS)
    for hook in hooks:
        hook.remove()
    for j in range(STEPS):
        dh = (captured["hidden"][j] - ref[f"hidden_{j}"]).abs().max().item()
        dl = (captured["logits"][j] - ref[f"logits_{j}"]).abs().max().item()
        ids = tokens[j] if model.d2t is None else tokens[j] + model.d2t[tokens[j]]  # draft column -> target id
        same = torch.equal(ids, ref[f"tokens_{j}"])
        print(f"  ttt step {j}: max |diff| vs SpecVLM draft: pre-norm hidden {dh:.2e}, logits {dl:.2e}; "
              f"same draft tokens: {same}")
        worst = max(worst, dh, dl)
        assert dh < 1e-4 and dl < 1e-4 and same, (name, j, dh, dl, same)
print(f"EAGLE-3 forward of speculators vs the SpecVLM eagle3 draft: max |diff| {worst:.2e} (float32, < 1e-4)")
PY

echo "== speculators 0.3.0"
/tmp/spec03-venv/bin/python - "$OUT" <<'PY'
import sys
import torch
from safetensors.torch import load_file
from importlib.metadata import version
from speculators import SpeculatorModelConfig
spec_version = version("speculators")
from speculators.models import EagleSpeculator, EagleSpeculatorConfig

out = sys.argv[1]
config = SpeculatorModelConfig.from_pretrained(out)
assert isinstance(config, EagleSpeculatorConfig), type(config)
print(f"speculators {spec_version}: config ->", type(config).__name__, "layernorms", config.layernorms,
      "verifier", config.speculators_config.verifier.name_or_path)
model, info = EagleSpeculator.from_pretrained(
    out, verifier=None, verifier_attachment_mode="detached", output_loading_info=True
)
print("EagleSpeculator loaded; missing:", info["missing_keys"], "unexpected:", info["unexpected_keys"])
state = model.state_dict()
weights = load_file(f"{out}/model.safetensors")
loaded = [k for k in weights if k in state]
for k in loaded:
    assert torch.equal(state[k], weights[k]), k
print(f"{len(loaded)}/{len(weights)} exported tensors loaded unchanged; not used by EagleSpeculator:",
      sorted(set(weights) - set(state)))
assert set(weights) - set(state) == {"fusion_layernorm.weight"}, set(weights) - set(state)
PY
echo "OK: speculators export validated ($OUT)"
