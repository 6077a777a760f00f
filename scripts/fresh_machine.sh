#!/usr/bin/env bash
# The README's two commands on a machine nobody prepared: a clean Debian root file system
# (debootstrap minbase + python3, make and git, nothing else), a clone of this repository's
# HEAD in it, then in a chroot
#   1. `make up`: waits for its `ready: URL` line, then `s2s talk` with that URL asks a
#      spoken question (tests/data/jfk.wav) and prints the transcript and the reply;
#   2. `make test` (skip with --up-only): the whole suite, as CI runs it.
# Wall times of each step at the end.  Needs root and debootstrap (installed when missing).
#   scripts/fresh_machine.sh [--up-only] [--keep]
# What the chroot gets from this machine is only how it reaches the package registries:
# /etc/resolv.conf, apt's sources, pip's configuration, CA certificates and PIP_* variables
# (PIP_FIND_LINKS folders are bind-mounted read-only).  Whatever s2s needs beyond that, its
# own files must install.  No Docker engine runs inside a chroot: tests/fresh_rootfs_skips.txt
# names the few tests allowed to skip there (CI on the host runs them).
set -euo pipefail
cd "$(dirname "$0")/.."
UP_ONLY=0; KEEP=0
for arg in "$@"; do
  case "$arg" in
    --up-only) UP_ONLY=1 ;;
    --keep) KEEP=1 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "usage: scripts/fresh_machine.sh [--up-only] [--keep]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot, mounts)" >&2; exit 1; }
if ! command -v debootstrap >/dev/null; then
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
fi
. /etc/os-release
SUITE=${S2S_BASE_SUITE:-$VERSION_CODENAME}
MIRROR=${S2S_BASE_MIRROR:-http://deb.debian.org/debian}
ROOT=$(mktemp -d /var/tmp/s2s-fresh.XXXXXX)
TARBALL=/var/tmp/s2s-fresh-$SUITE-base.tgz   # the debootstrap download, kept across runs
LOG=$ROOT.log
T0=$(date +%s); TIMES=()
stamp() { TIMES+=("$1: $(( $(date +%s) - ${2:-$T0} )) s"); }
mounts=()
cleanup() {
  set +e
  [ -n "${UP_PID:-}" ] && kill "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null
  # every process still running inside the root (found by its root directory: a pattern
  # would also match this machine's own s2s processes)
  for proc in /proc/[0-9]*; do
    [ "$(readlink "$proc/root" 2>/dev/null)" = "$ROOT" ] && kill -9 "${proc#/proc/}" 2>/dev/null
  done
  # what tests mounted inside (ip netns) first, deepest first, then ours
  grep -o " $ROOT/[^ ]*" /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
  for ((i=${#mounts[@]}-1; i>=0; i--)); do umount -l "${mounts[$i]}" 2>/dev/null; done
  [ "$KEEP" = 1 ] && echo "kept $ROOT" || rm -rf --one-file-system "$ROOT"
}
trap cleanup EXIT
bind() { mkdir -p "$ROOT$2"; mount --bind "$1" "$ROOT$2"; mounts+=("$ROOT$2"); [ "${3:-}" = ro ] && mount -o remount,bind,ro "$ROOT$2"; return 0; }

echo "==> clean root file system in $ROOT (debootstrap $SUITE minbase + python3 make git)"
[ -s "$TARBALL" ] || debootstrap --variant=minbase --include=python3,make,git \
  --make-tarball="$TARBALL" "$SUITE" "$ROOT.tarball-work" "$MIRROR" >/dev/null 2>&1 || true
rm -rf "$ROOT.tarball-work"
if [ -s "$TARBALL" ]; then
  debootstrap --variant=minbase --include=python3,make,git --unpack-tarball="$TARBALL" \
    "$SUITE" "$ROOT" "$MIRROR" >"$LOG" 2>&1
else
  debootstrap --variant=minbase --include=python3,make,git "$SUITE" "$ROOT" "$MIRROR" >"$LOG" 2>&1
fi
stamp "debootstrap"
# the root a mount point of its own (before any mount inside it): `ip netns exec`, in the
# multi-host test, remounts / as a slave
mount --bind "$ROOT" "$ROOT"; mounts+=("$ROOT")

# how this machine reaches the registries, nothing more
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
rm -f "$ROOT/etc/apt/sources.list"
[ -d /etc/apt/sources.list.d ] && cp -r /etc/apt/sources.list.d/. "$ROOT/etc/apt/sources.list.d/"
find "$ROOT/etc/apt/sources.list.d" -name '*disabled*' -delete
[ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$ROOT/etc/apt/sources.list"
# local CAs (a proxy's), kept by update-ca-certificates when a package reinstalls the bundle
if [ -d /usr/local/share/ca-certificates ]; then
  mkdir -p "$ROOT/usr/local/share/ca-certificates"
  cp -r /usr/local/share/ca-certificates/. "$ROOT/usr/local/share/ca-certificates/"
fi
for f in /etc/pip.conf /etc/xdg/pip; do [ -e "$f" ] && mkdir -p "$ROOT$(dirname $f)" && cp -r "$f" "$ROOT$(dirname $f)/"; done
mkdir -p "$ROOT/etc/ssl/certs"; cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/"
PIPENV=()
while IFS='=' read -r name value; do
  PIPENV+=("$name=$value")
  if [ "$name" = PIP_FIND_LINKS ]; then
    for dir in $value; do [ -d "$dir" ] && bind "$dir" "$dir" ro; done
  fi
done < <(env | grep -E '^PIP_')
for links in $(grep -hs 'find-links' /etc/pip.conf /etc/xdg/pip/pip.conf | sed 's/.*=//'); do
  [ -d "$links" ] && [ ! -d "$ROOT$links" ] && bind "$links" "$links" ro
done
for extra in $(grep -hs 'extra-index-url' /etc/pip.conf /etc/xdg/pip/pip.conf | sed 's/.*=//'); do
  dir=${extra#file://}; dir=${dir%/simple}; [ "$dir" != "$extra" ] && [ -d "$dir" ] && bind "$dir" "$dir" ro
done
mount -t proc proc "$ROOT/proc"; mounts+=("$ROOT/proc")
bind /sys /sys; bind /dev /dev; bind /dev/pts /dev/pts
mount -t tmpfs tmpfs "$ROOT/dev/shm"; mounts+=("$ROOT/dev/shm")

echo "==> cloning $(git rev-parse --short HEAD) into /root/s2s"
git clone -q --no-local "$PWD" "$ROOT/root/s2s"
IN=(chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    LANG=C.UTF-8 "${PIPENV[@]}")
echo "==> chroot: python3 $("${IN[@]}" python3 -c 'import sys; print(sys.version.split()[0])'),"\
     "packages: $("${IN[@]}" dpkg-query -W -f='${binary:Package}\n' | wc -l)," \
     "redis-server: $("${IN[@]}" sh -c 'command -v redis-server || echo none')"

echo "==> [1/2] make up (log: $ROOT/root/up.log)"
T1=$(date +%s)
"${IN[@]}" /bin/sh -c 'cd /root/s2s && exec make up' >"$ROOT/root/up.log" 2>&1 &
UP_PID=$!
URL=""
for _ in $(seq 1800); do
  URL=$(grep -m1 -o '^ready: http[^ ]*' "$ROOT/root/up.log" | cut -d' ' -f2 || true)
  [ -n "$URL" ] && break
  kill -0 "$UP_PID" 2>/dev/null || break
  sleep 1
done
if [ -z "$URL" ]; then
  echo "make up never got ready; its log ends:" >&2; tail -40 "$ROOT/root/up.log" >&2; exit 1
fi
stamp "make up: install and ready" "$T1"
grep -E '^\[s2s\]|^==>' "$ROOT/root/up.log" | sed "s/#key=[^ ']*/#key=<redacted>/g" | tail -12
T2=$(date +%s)
"${IN[@]}" /bin/sh -c "cd /root/s2s && .venv/bin/s2s talk tests/data/jfk.wav --url '$URL' --json --timeout 120" \
  > "$ROOT/root/talk.json"
stamp "one spoken question through the printed URL" "$T2"
"${IN[@]}" /root/s2s/.venv/bin/python -c '
import json, sys
r = json.loads(open("/root/talk.json").read().strip().splitlines()[-1])
print("   heard: " + r["transcript"]); print("   reply: " + r["reply"])
print("   voice-to-voice: %s ms (from the end of the file; jfk.wav pauses mid-thought)"
      % r.get("voice_to_voice_ms"))
assert "country" in r["transcript"].lower() and r["reply"].strip(), r'
kill "$UP_PID"; wait "$UP_PID" 2>/dev/null || true; UP_PID=""

if [ "$UP_ONLY" = 0 ]; then
  echo "==> [2/2] make test (log: $ROOT/root/test.log)"
  T3=$(date +%s)
  set +e
  "${IN[@]}" S2S_ALLOWED_SKIPS_EXTRA=/root/s2s/tests/fresh_rootfs_skips.txt /bin/sh -c \
    'cd /root/s2s && exec make test' >"$ROOT/root/test.log" 2>&1
  rc=$?
  set -e
  stamp "make test (install --test and the suite)" "$T3"
  grep -E '^(==>|[0-9]+ (passed|failed)|FAILED|ERROR)|passed|skipped without' "$ROOT/root/test.log" | tail -25
  [ "$rc" = 0 ] || { echo "make test failed ($rc); log: $ROOT/root/test.log" >&2; KEEP=1; exit "$rc"; }
fi
stamp "total"
echo "==> fresh machine: OK"
printf '   %s\n' "${TIMES[@]}"
