#!/usr/bin/env bash
# A base image for deploy/Dockerfile made only from Debian packages, for machines that can
# reach a Debian mirror but no container registry (nothing is pulled: debootstrap builds the
# root file system, `docker import` turns it into an image).
#   scripts/docker-base.sh [TAG]        default TAG: s2s-base:<debian codename>
# Then:  docker build --build-arg BASE_IMAGE=<TAG> -f deploy/Dockerfile --target gateway .
# (`make images` does both.) Runs as root; needs debootstrap (apt-get install debootstrap).
# The release is this machine's own (/etc/os-release), so the image's Python is the one the
# host's wheels were chosen for.
set -euo pipefail
. /etc/os-release
SUITE=${S2S_BASE_SUITE:-${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}}
MIRROR=${S2S_BASE_MIRROR:-http://deb.debian.org/debian}
TAG=${1:-s2s-base:$SUITE}
DOCKER=${DOCKER:-docker}
if "$DOCKER" image inspect "$TAG" >/dev/null 2>&1 && [ "${S2S_BASE_REBUILD:-0}" != "1" ]; then
  echo "==> $TAG exists (S2S_BASE_REBUILD=1 to make it again)"; exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install debootstrap" >&2; exit 1; }
ROOTFS=$(mktemp -d /var/tmp/s2s-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT
# minbase: apt and dpkg only. python3-venv: the Dockerfile installs into /opt/venv (Debian's
# python refuses system-wide pip installs, PEP 668). libgomp1: OpenMP runtime of onnxruntime
# and CTranslate2. tini: PID 1 that forwards SIGTERM (workers drain on it) and reaps children.
echo "==> debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,libgomp1,tini,ca-certificates \
  "$SUITE" "$ROOTFS" "$MIRROR" >/dev/null
# What a container never needs: package caches and lists, docs, man pages, locales but C.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
  "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
find "$ROOTFS"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'C*' -exec rm -rf {} +
echo "==> docker import -> $TAG"
tar -C "$ROOTFS" --numeric-owner -c . | "$DOCKER" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
"$DOCKER" image ls "$TAG"
