#!/usr/bin/env bash
# Export a tiny SpecVLM draft with export_draft(format="speculators") and load it with speculators' own classes,
# each speculators version in its own venv (speculators pins transformers; never install it into the main env).
#
#   bash scripts/validate_speculators_export.sh            # from the repository root; a few minutes the first time
#
# Venvs use --system-site-packages so the main environment's torch (2.13 CPU) satisfies torch==2.13.0; pip puts
# speculators and the transformers it pins inside the venv, which shadows the main environment's transformers.
#   /tmp/spec-venv    speculators==0.9.0 (current; EAGLE-3 only): validates the speculators_config block
#                     (SpeculatorsConfig, proposals, verifier) and the LlamaDecoderLayer weights; reports that
#                     the full config is refused because 0.9.0 no longer registers speculators_model_type "eagle".
#   /tmp/spec03-venv  speculators==0.3.0 (+ transformers<5, which it needs): loads the whole checkpoint with
#                     SpeculatorModelConfig / EagleSpeculator and checks every exported weight arrived unchanged.
# Exit status 0 when every check passes. Set MAIN_PYTHON to the interpreter that has specvlm_hf.
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN_PYTHON=${MAIN_PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/specvlm-speculators-XXXXXX)}

make_venv() {  # make_venv DIR PIP_ARGS...
  local dir=$1; shift
  if [ ! -x "$dir/bin/python" ] || ! "$dir/bin/python" -c "import speculators" 2>/dev/null; then
    python3 -m venv --system-site-packages "$dir"
    "$dir/bin/pip" install -q "$@"
  fi
}
make_venv /tmp/spec-venv torch==2.13.0 speculators==0.9.0
make_venv /tmp/spec03-venv torch==2.13.0 speculators==0.3.0 "transformers>=4.53,<5"

echo "== export a tiny draft with the main python ($MAIN_PYTHON) to $OUT"
PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} "$MAIN_PYTHON" - "$OUT" <<'PY'
import sys
import torch
from specvlm_hf import SpecVLMDraftConfig, SpecVLMDraftModel
from specvlm_hf.export import export_draft

torch.manual_seed(0)
config = SpecVLMDraftConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                            vocab_size=100, target_name_or_path="org/tiny-llava",
                            target_architecture="LlavaForConditionalGeneration", eos_token_id=2, bos_token_id=1)
draft = SpecVLMDraftModel(config)
with torch.no_grad():
    for p in draft.parameters():
        p.add_(0.1 * torch.randn_like(p))  # norms away from 1 so a mixed-up weight shows
export_draft(draft, sys.argv[1])
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

echo "== speculators 0.9.0"
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
