#!/usr/bin/env bash
# The GPU check: on one GPU machine with PyTorch and no internet, in under 8 minutes.
#
#   benchmarks/gpu.sh [--cpu] [--tiny] [--out DIR] [--python PY]
#   benchmarks/gpu.sh --fetch-wheels          # beforehand, where PyPI is reachable
#
# 1. Installs aha and its dependencies (not torch: the machine has it) from the wheels in
#    benchmarks/wheels/ (`--fetch-wheels` fills it: `pip download` for this Python and
#    platform, and aha's own wheel), with no index; skipped when they import already.
#    vLLM's CUDA wheel is too big to carry: the actor figures use the HF engine.
# 2. Runs tests/gpu (vLLM's tests skip without vllm; DeepSpeed with NCCL runs).
# 3. Measures, each figure min/median/max over >= 3 runs (benchmarks/figures.py):
#    - learner_tokens: DeepSpeed bf16 GRPO steps on a Qwen2.5-0.5B-shaped model built from
#      its config (random weights; benchmarks/learner.py), learner_publish (step done to
#      manifest visible) and learner_publish_upload (the store copy after it);
#    - actor_tokens: an HF-engine actor's tokens/s through NATS next to the engine alone
#      (benchmarks/actor.py), and its hot swap;
#    - weight_transfer (GB/s next to a raw copy), weight_publish, fan-out
#      (benchmarks/weights.py).
#    The figures land in DIR (default benchmarks/results/gpu-<date>/), one .jsonl per
#    benchmark, and a summary is printed.
#
# --cpu: no GPU (fp32, the HF engine on CPU); --tiny: the smallest sizes, for the test that
# keeps this script from rotting (tests/integration/test_gpu_script.py).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WHEELS="$ROOT/benchmarks/wheels"
PY="${PYTHON:-python3}"
CPU=0
TINY=0
FETCH=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1 ;;
        --tiny) TINY=1 ;;
        --fetch-wheels) FETCH=1 ;;
        --out) OUT="$2"; shift ;;
        --python) PY="$2"; shift ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
cd "$ROOT"
OUT="${OUT:-$ROOT/benchmarks/results/gpu-$(date +%Y%m%d)}"
START=$(date +%s)
say() { echo "[gpu.sh $(( $(date +%s) - START ))s] $*"; }

if [ "$FETCH" = 1 ]; then
    mkdir -p "$WHEELS"
    "$PY" -m pip wheel --no-deps -w "$WHEELS" "$ROOT"
    "$PY" -m pip download -d "$WHEELS" "$ROOT[train,dev]" setuptools wheel
    rm -f "$WHEELS"/torch-*.whl "$WHEELS"/nvidia_*.whl "$WHEELS"/triton-*.whl
    say "wheels in $WHEELS: $(ls "$WHEELS" | wc -l) files, $(du -sh "$WHEELS" | cut -f1)"
    exit 0
fi

# 1. Install, offline.
if "$PY" -c "import deepspeed, transformers, nats, safetensors, pytest, protocol, learner, actors" 2>/dev/null; then
    say "dependencies import: install skipped"
elif [ -d "$WHEELS" ]; then
    say "installing from $WHEELS (no index)"
    "$PY" -m pip install --no-index --find-links "$WHEELS" "$ROOT[train,dev]"
else
    echo "gpu.sh: error: aha's dependencies do not import and $WHEELS is missing (run --fetch-wheels where PyPI is reachable)" >&2
    exit 2
fi
if [ "$CPU" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: error: torch sees no GPU (use --cpu to run on CPU)" >&2
    exit 2
fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

# 2. The GPU tests.
say "tests/gpu"
"$PY" -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -3

# 3. The figures.
if [ "$TINY" = 1 ]; then
    LEARNER=(--hidden 64 --layers 2 --vocab 512 --n 4 --micro-batch 2 --prompt 16 --completion 16 --steps 3 --shard-mb 1)
    ACTOR=(--model tiny --prompts 2 --group 2 --tokens 8 --concurrency 4 --rounds 3 --swaps 3 --big-hidden 64 --big-layers 2 --big-intermediate 128)
    WEIGHTS=(--gb 0.02 --shard-mb 4 --runs 3 --actors 3)
else
    # Qwen2.5-0.5B's config: 24 layers, width 896, 14 heads (2 KV), MLP 4864, vocab 151936.
    LEARNER=(--hidden 896 --layers 24 --heads 14 --kv-heads 2 --intermediate 4864 --vocab 151936 --n 16 --micro-batch 8 --prompt 256 --completion 768 --steps 5 --shard-mb 512)
    ACTOR=(--model big --big-hidden 896 --big-layers 24 --big-intermediate 4864 --prompts 32 --group 8 --tokens 128 --concurrency 32 --rounds 3 --swaps 3)
    WEIGHTS=(--gb 1.0 --shard-mb 256 --runs 3 --actors 3)
fi
if [ "$CPU" = 1 ]; then
    PRECISION=fp32
    DEVICE=cpu
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
else
    PRECISION=bf16
    DEVICE=cuda
fi
say "learner: DeepSpeed $PRECISION GRPO steps"
"$PY" benchmarks/learner.py "${LEARNER[@]}" --precision "$PRECISION" --out "$OUT/learner.jsonl"
say "actor: the HF engine on $DEVICE, through NATS and alone"
"$PY" benchmarks/actor.py --engine hf --device "$DEVICE" "${ACTOR[@]}" --out "$OUT/actor.jsonl" 2>/dev/null
say "weights: publish, transfer, fan-out"
"$PY" benchmarks/weights.py "${WEIGHTS[@]}" --out "$OUT/weights.jsonl" 2>/dev/null
say "done in $(( $(date +%s) - START ))s; figures in $OUT"
