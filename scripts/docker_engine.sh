# Sourced by scripts/images.sh (and .ci/run): leaves DOCKER (exported) naming a docker client
# that can build this repository's Dockerfiles, with an engine that answers; else exits with
# what to do.  As root on Debian it installs what is missing (docker.io, debootstrap) and
# starts `dockerd $S2S_DOCKERD_ARGS` (default --iptables=false: no NAT rules needed, since the
# builds and the host-network compose use the host's network) when no engine answers.
#   DOCKER=/path/to/docker   use that client
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }
apt_install() {
  echo "==> installing $* (Debian packages)"
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"; } >/dev/null
}
missing=()
command -v debootstrap >/dev/null || [ -n "${S2S_BASE_IMAGE:-}" ] || missing+=(debootstrap)
engine_up() { command -v "${DOCKER:-docker}" >/dev/null && "${DOCKER:-docker}" info >/dev/null 2>&1; }
engine_up || command -v dockerd >/dev/null || missing+=(docker.io)
if [ ${#missing[@]} -gt 0 ]; then
  can_apt || { echo "missing: ${missing[*]} (install them, e.g. apt-get install ${missing[*]})" >&2; exit 1; }
  apt_install "${missing[@]}"
fi
# BuildKit builds (the per-Dockerfile .dockerignore, --target without building every stage):
# a client >= 23 needs the buildx plugin for them; an older one (Debian 12's docker.io, 20.10)
# has BuildKit built in.
can_build() {
  "$1" buildx version >/dev/null 2>&1 && return 0
  local major
  major=$("$1" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)
  [ -n "$major" ] && [ "$major" -lt 23 ]
}
if [ -z "${DOCKER:-}" ]; then
  for candidate in docker /usr/bin/docker; do
    if command -v "$candidate" >/dev/null && can_build "$(command -v "$candidate")"; then
      DOCKER=$(command -v "$candidate"); break
    fi
  done
  if [ -z "${DOCKER:-}" ] && can_apt && ! dpkg -s docker.io >/dev/null 2>&1; then
    apt_install docker.io && DOCKER=/usr/bin/docker
  fi
fi
if [ -z "${DOCKER:-}" ] || ! can_build "$DOCKER"; then
  echo "no docker client here can build with BuildKit: '$(command -v docker || echo docker)' is" \
       "a client >= 23 without the buildx plugin. Install the plugin (docker-buildx-plugin), or" \
       "Debian's docker.io and DOCKER=/usr/bin/docker" >&2
  exit 1
fi
export DOCKER
if ! "$DOCKER" info >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null; then
    log=/var/tmp/s2s-dockerd.log
    echo "==> no Docker engine answers: starting dockerd ${S2S_DOCKERD_ARGS:---iptables=false} (log: $log)"
    setsid dockerd ${S2S_DOCKERD_ARGS:---iptables=false} >"$log" 2>&1 < /dev/null &
    for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  fi
  "$DOCKER" info >/dev/null 2>&1 || {
    echo "no Docker engine answers (start one: systemctl start docker, or as root" \
         "dockerd --iptables=false &)" >&2; exit 1; }
fi
echo "==> docker: $DOCKER ($("$DOCKER" version --format '{{.Client.Version}}' 2>/dev/null) client," \
     "engine $("$DOCKER" version --format '{{.Server.Version}}' 2>/dev/null))"
