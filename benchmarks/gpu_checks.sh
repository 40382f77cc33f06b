#!/usr/bin/env bash
# The checks that need a GPU, as one call of a lent GPU machine (which has torch but no network and none of our other
# dependencies). Two steps:
#
#   bash benchmarks/gpu_checks.sh wheels   # here, with network: the wheels the GPU image lacks -> .whl/ (git-ignored)
#   bash benchmarks/gpu_checks.sh run      # there, with .whl carried: results -> $OUT (at most 8 files come back)
#
# `run` does (an estimate from the committed H100 step times: about 7 minutes; not yet run on a GPU):
#   1. tests/test_cuda.py (graph replays against eager steps, learning/save/load with graphs, the capture error);
#   2. the CUDA-graph learning check: CartPole, 2 seeds, 20k steps, `cuda_graph=True` (tag `cudagraph`), which must
#      reach the CPU entry's evaluations (475 within 20k on 2 of 3 seeds) before graphs can become the default;
#   3. throughput with graphs, fp32 (`benchmarks.throughput --devices cuda --cuda-graph`).
# Unpack the results here with `tar -C benchmarks/results/learning -xzf learning.tgz` (and copy the throughput files to
# benchmarks/results/throughput/). A dry run of the plumbing on a CPU: DEVICE=cpu BUDGET=300 QUICK=1 OUT=/tmp/g bash
# benchmarks/gpu_checks.sh run (with the project's environment active instead of .whl).
set -uo pipefail
cd "$(dirname "$0")/.."

# Pinned to the versions the project is tested with (pyproject.toml resolves the same ones here), for Python 3.12.
WHEELS=(stable_baselines3==2.9.2 rl_zoo3==2.9.2 sb3_contrib==2.9.2 gymnasium==1.4.0 farama-notifications==0.0.6
        ale-py==0.12.1 minatar==1.0.15 optuna==5.0.0 alembic==1.20.1 sqlalchemy==2.1.9 colorlog mako greenlet
        sb3-team-hf-integration==3.2 wasabi shimmy pytablewriter==1.2.1 dataproperty mbstrdecoder pathvalidate
        tabledata tcolorpy typepy chardet)

case "${1:-}" in
  wheels)
    mkdir -p .whl
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "${WHEELS[@]}"
    exclude=$(git rev-parse --git-path info/exclude)  # keep the wheels out of commits, but in the device's copy via carry
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
    du -sh .whl
    ;;
  run)
    OUT=${OUT:?set OUT to the folder whose files come back}
    DEVICE=${DEVICE:-cuda}
    BUDGET=${BUDGET:-20000}
    mkdir -p "$OUT"
    if [ -d .whl ]; then
      python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site:$PWD
    fi
    export MPLBACKEND=Agg
    PY=${PYTHON:-python3}
    {
      date -u
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
      $PY -c "import torch, stable_baselines3 as sb3; print(torch.__version__, torch.cuda.is_available(), sb3.__version__)"
      echo "=== 1. tests/test_cuda.py"
      $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -40
      echo "=== 2. CartPole with cuda_graph=True, seeds 0 1, $BUDGET steps, $(date -u +%T)"
      extra=()
      [ "$BUDGET" -lt 5000 ] && extra=(--eval-freq "$((BUDGET / 2))" --eval-episodes 2 --algo-params dreamerv2 learning_starts:100)
      $PY -m benchmarks.learning --suite cartpole --algos dreamerv2 --seeds 0 1 --budget "$BUDGET" --parallel 2 \
        --threads 2 --device "$DEVICE" --tag cudagraph --results-dir "$OUT/learning" --checkpoint-freq 0 \
        --algo-params dreamerv2 cuda_graph:True "${extra[@]}" 2>&1 | tail -20
      $PY -m benchmarks.report --results-dir "$OUT/learning" --out "$OUT/REPORT.md" --plots-dir "$OUT/plots" 2>&1 | tail -3
      tar -C "$OUT/learning" --exclude='*.zip' -czf "$OUT/learning.tgz" .
      echo "=== 3. throughput, CUDA graphs, $(date -u +%T)"
      if [ -n "${QUICK:-}" ]; then
        $PY -m benchmarks.throughput --quick --devices "$DEVICE" --out-dir "$OUT/tp" 2>&1 | tail -5
      else
        $PY -m benchmarks.throughput --presets small minatar atari --devices "$DEVICE" --cuda-graph --threads 2 \
          --repeats 20 --warmup 5 --out-dir "$OUT/tp" 2>&1 | tail -5
      fi
      cp "$OUT"/tp/*.json "$OUT"/tp/*.md "$OUT"/ 2>/dev/null
      date -u
    } > "$OUT/log.txt" 2>&1
    rm -rf "$OUT/learning" "$OUT/plots" "$OUT/tp"
    tail -60 "$OUT/log.txt"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_checks.sh wheels|run" >&2
    exit 2
    ;;
esac
