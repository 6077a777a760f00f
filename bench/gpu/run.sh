#!/usr/bin/env bash
# Runs THERE, on the GPU machine the device tool lends, from the repo root, after
# bench/gpu/prepare.sh filled .whl/ here:
#
#   device tool `run`, carry [".whl"], timeout_s 600, command:
#       bash bench/gpu/run.sh
#
# Installs .whl/wheels with --no-index into /tmp/site (the image has torch, transformers,
# onnxruntime and numpy; no network), checks the GPU (nvidia-smi, torch.cuda), then runs
# python -m s2s.bench.gpu_bench --device cuda: each step time-boxed, all of it inside
# 9 minutes.  Results: $OUT/gpu_results.md (one table), $OUT/gpu_results.json,
# $OUT/gpu_steps.log and this script's own log, $OUT/run_log.txt.
set -uo pipefail
T0=$(date +%s)
LIMIT_S=${S2S_GPU_LIMIT_S:-540}          # the whole script; the tool kills at 600
OUT=${OUT:-/tmp/s2s-gpu-out}
PY=${PY:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run_log.txt") 2>&1
left() { echo $(( LIMIT_S - ($(date +%s) - T0) )); }

[ -d .whl/wheels ] || { echo "run.sh: no .whl/: run bench/gpu/prepare.sh first and carry .whl"; exit 2; }
cat .whl/MANIFEST.md
uname -a; "$PY" --version

# the tree as it travelled (always current); the wheel prepare.sh built is the fallback
SITE=${S2S_GPU_SITE:-/tmp/site}
timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" $(ls .whl/wheels/*.whl | grep -v '/s2s-') || { echo "run.sh: install failed"; exit 3; }
timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --no-cache-dir --upgrade --target "$SITE" . \
  || timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade \
    --target "$SITE" .whl/wheels/s2s-*.whl || { echo "run.sh: installing s2s failed"; exit 3; }
# PYTHONSAFEPATH: `-m s2s…` must import the installed package, not ./s2s of the tree
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONSAFEPATH=1 HF_HUB_OFFLINE=1 \
       PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
chmod +x .whl/bin/* 2>/dev/null

timeout 30 nvidia-smi || echo "run.sh: nvidia-smi failed or is missing"
timeout 120 "$PY" -c "
import torch
assert torch.cuda.is_available(), 'torch sees no CUDA device'
print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))
" || { echo "run.sh: no usable GPU: nothing measured"; exit 4; }

BUDGET=$(( $(left) - 25 ))
echo "run.sh: $(left) s left; gpu_bench gets $BUDGET s"
timeout $(( BUDGET + 20 )) "$PY" -m s2s.bench.gpu_bench --device cuda --out "$OUT" \
    --budget "$BUDGET" --data "$PWD/tests/data" --llm-config "$PWD/.whl/models/smollm2-135m" \
    --redis-server "$PWD/.whl/bin/valkey-server" --work /tmp/s2s-gpu-bench
rc=$?
echo "run.sh: gpu_bench exit $rc after $(( $(date +%s) - T0 )) s in all"
exit $rc
