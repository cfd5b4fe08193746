#!/usr/bin/env bash
# Prepares real microVMs for the qemu provider and its tests: QEMU from Debian (qemu-system-x86)
# and the Hearth guest image (deploy/images/build.sh: Debian cloud kernel + busybox initramfs + the
# static guest agent), cached under .tools/images by content hash. Sourced by scripts/test unless
# HEARTH_QEMU=0; exports HEARTH_QEMU_IMAGE. Returns non-zero (and the qemu tests skip, saying why)
# when either cannot be had. Quick when everything is already there.
set -euo pipefail

HEARTH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

qlog() { printf '[setup-qemu] %s\n' "$*" >&2; }

if ! command -v qemu-system-x86_64 >/dev/null; then
  qlog "installing qemu-system-x86 (Debian)"
  as_root_q() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
  }
  as_root_q apt-get update -qq >/dev/null 2>&1 || true
  if ! as_root_q env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    qemu-system-x86 >/dev/null 2>&1; then
    qlog "cannot install qemu-system-x86: qemu tests will be skipped"
    return 1 2>/dev/null || exit 1
  fi
fi

if ! image="$("$HEARTH_ROOT/deploy/images/build.sh")"; then
  qlog "cannot build the guest image: qemu tests will be skipped"
  return 1 2>/dev/null || exit 1
fi
export HEARTH_QEMU_IMAGE="$image"
qlog "guest image $HEARTH_QEMU_IMAGE"
