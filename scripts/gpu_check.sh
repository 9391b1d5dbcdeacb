#!/usr/bin/env bash
# SpecVLM on one NVIDIA GPU, from a bare machine, in at most 8 minutes:
#   1. installs what it needs (wheels in .whl/ when the machine is offline, else pip), puts src/ on PYTHONPATH;
#   2. runs the CUDA-relevant tests on the GPU (lossless matrix CI subset, batches, sampling laws, host syncs);
#   3. benchmarks in bfloat16: the medium toy target, and the toy target widened exactly to LLaVA-1.5-7B's decoder
#      shape (32 layers, hidden 4096, MLP 11008, 32 heads: acceptance stays the toy pair's, every forward costs a
#      7B's): plain vs our automatic tree and chain mode vs the equal-budget assisted peer, each method's first
#      call against plain's, the bound, and the verify costs c(n) the automatic budget learned;
#   4. writes docs/results/gpu/ (results.json, results.md per target, summary.txt) and prints one summary line.
#
# Usage: bash scripts/gpu_check.sh [--device cuda|cpu] [--quick] [--output-dir DIR] [--cache-dir DIR]
#   --device cpu --quick runs the same steps here in minutes (tests/test_gpu_check.py, a slow test), so the
#   script cannot rot: one test file, 2 prompts of 16 tokens, drafts trained 300 steps, no peer, no 7B shape.
#
# The trained toy target, drafts and peer come from the toy cache (--cache-dir, else $SPECVLM_HF_CACHE, else
# ./.toy-cache when present, else ~/.cache/specvlm_hf). A GPU machine starts bare, so carry the cache along:
#   echo /.toy-cache/ >> .git/info/exclude; cp -r ~/.cache/specvlm_hf .toy-cache
# and name .toy-cache in the device tool's carry (it is a few MB: tiny target, its drafts and the peer). Without a
# cache the script trains them first (minutes).
set -euo pipefail

DEVICE=cuda
QUICK=0
OUT=""
CACHE=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --output-dir) OUT="$2"; shift 2 ;;
    --cache-dir) CACHE="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [[ "$DEVICE" != cuda && "$DEVICE" != cpu ]]; then
  echo "gpu_check.sh: --device must be cuda or cpu, got '$DEVICE'" >&2
  exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
START=$SECONDS
if [[ -z "$OUT" ]]; then
  if [[ "$DEVICE" == cuda ]]; then OUT="$ROOT/docs/results/gpu"; else OUT="$(mktemp -d)/gpu_check"; fi
fi
mkdir -p "$OUT"
if [[ -z "$CACHE" ]]; then
  if [[ -n "${SPECVLM_HF_CACHE:-}" ]]; then CACHE="$SPECVLM_HF_CACHE"
  elif [[ -d "$ROOT/.toy-cache" ]]; then CACHE="$ROOT/.toy-cache"
  else CACHE="$HOME/.cache/specvlm_hf"; fi
fi

# ---- 1. install
if [[ -d "$ROOT/.whl" ]] && ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/specvlm-site \
    "$ROOT"/.whl/*.whl
  export PYTHONPATH="/tmp/specvlm-site:${PYTHONPATH:-}"
fi
if ! "$PY" -c "import torch, transformers, accelerate, datasets, safetensors, PIL, pytest" 2>/dev/null; then
  "$PY" -m pip install -q -e "$ROOT[dev]"
fi
export PYTHONPATH="$ROOT/src:$ROOT/tests:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
"$PY" - "$DEVICE" <<'PYEOF'
import sys, torch, transformers
device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check.sh: --device cuda but torch sees no GPU (a CPU-only torch build, or no driver)")
name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
print(f"gpu_check: torch {torch.__version__}, transformers {transformers.__version__}, device {name}")
PYEOF

# ---- 2. tests on the device
TESTS=(tests/test_lossless_matrix.py tests/test_batched.py tests/test_decoding_sampling.py tests/test_host_syncs.py)
if [[ "$QUICK" == 1 ]]; then TESTS=(tests/test_host_syncs.py); fi
SPECVLM_TEST_DEVICE="$DEVICE" timeout 240 "$PY" -m pytest -q -x -p no:cacheprovider -m "not slow" "${TESTS[@]}" \
  2>&1 | tee "$OUT/tests.log" | tail -3
TESTS_RC=${PIPESTATUS[0]}

# ---- 3. benchmarks
PROMPTS=8; TOKENS=64
DTYPE=bfloat16
METHODS=plain,specvlm_tree,specvlm_chain,assisted_peer
TRAIN=()  # the bench's default training budget: what a carried cache holds
if [[ "$QUICK" == 1 ]]; then
  PROMPTS=2; TOKENS=16; METHODS=plain,specvlm_tree,specvlm_chain; TRAIN=(--train-steps 300)
fi
SIZES=(medium)
if [[ "$DEVICE" == cuda ]]; then SIZES=(medium llava7b); fi
BENCH_RC=0
for size in "${SIZES[@]}"; do
  timeout 200 "$PY" -m specvlm_hf.cli bench --device "$DEVICE" --toy-size "$size" --dtype "$DTYPE" \
    --prompts "$PROMPTS" --max-new-tokens "$TOKENS" --temperatures 0 --methods "$METHODS" \
    --first-call-prompts 2 --cache-dir "$CACHE" --output-dir "$OUT/$size" ${TRAIN[@]+"${TRAIN[@]}"} 2>&1 | tee "$OUT/bench-$size.log" | tail -12
  rc=${PIPESTATUS[0]}
  [[ "$rc" == 0 ]] || BENCH_RC=1
done

# ---- 4. one summary line
"$PY" - "$OUT" "$DEVICE" "$TESTS_RC" "$BENCH_RC" "$((SECONDS - START))" "${SIZES[@]}" <<'PYEOF'
import json, sys
from pathlib import Path
out, device, tests_rc, bench_rc, seconds, sizes = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
parts = []
for size in sizes:
    path = out / size / "results.json"
    if not path.exists():
        parts.append(f"{size}: no results")
        continue
    data = json.loads(path.read_text())
    records = data if isinstance(data, list) else data.get("records", [])
    cells = []
    for r in records:
        if r.get("kind") == "plain" or r.get("speedup") is None:
            continue
        first = r.get("first_call_vs_plain")
        cells.append(f"{r['method']} {r['speedup']:.2f}x" + (f" (1st {first:.2f}x)" if first else ""))
    parts.append(f"{size}: " + ", ".join(cells))
line = (f"gpu_check {device}: tests {'ok' if tests_rc == '0' else 'FAILED'}, bench {'ok' if bench_rc == '0' else 'FAILED'}, "
        f"{seconds} s; " + "; ".join(parts))
(out / "summary.txt").write_text(line + "\n")
print(line)
sys.exit(0 if tests_rc == "0" and bench_rc == "0" else 1)
PYEOF
