#!/usr/bin/env bash
# Builds the Hearth guest image for the qemu provider: a Debian cloud kernel and a busybox
# initramfs whose init service is the Hearth guest agent.
#
#   deploy/images/build.sh            -> prints the image directory (…/<hash>/ with vmlinuz,
#                                        initrd.img, manifest.txt); `current` links to it
#
# Inputs, and nothing else: the Debian packages linux-image-*-cloud-amd64 and busybox-static
# (`apt-get download` + `dpkg-deb -x`, no host install), the statically linked agent built from
# this workspace, and this script with mkcpio.py. The output directory is named after a hash of
# all of them, so a rebuild with the same inputs is a no-op and a changed agent gets a new
# directory. The archive is reproducible (sorted entries, owner root, mtime 0, no gzip name/time).
#
# Environment:
#   HEARTH_IMAGES_DIR   where images and downloaded .debs are cached (default .tools/images)
#   HEARTH_AGENT_BIN    use this agent binary instead of building it
#   HEARTH_IMAGE_REFRESH=1  download the newest Debian packages even if some are cached
#   CARGO_TARGET_DIR    cargo's target directory for the agent build (default target/)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HEARTH_ROOT="$(cd "$HERE/../.." && pwd)"
OUT_BASE="${HEARTH_IMAGES_DIR:-$HEARTH_ROOT/.tools/images}"
DEBS="$OUT_BASE/debs"
KERNEL_META="linux-image-cloud-amd64"
# Loaded by the initramfs, with their dependencies first: the virtio-mmio transport (microvm's
# devices) and virtio-serial (the agent's channel).
WANTED_MODULES="virtio_mmio virtio_console"

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in dpkg-deb apt-get objcopy strip sha256sum python3; do
  command -v "$tool" >/dev/null || die "$tool is required"
done
mkdir -p "$DEBS"

# Newest file matching a glob, or nothing (no match is not an error: the cache may be empty).
newest() { { ls -1 $1 2>/dev/null || true; } | sort -V | tail -n 1; }

# --- 1. Debian packages (downloaded once, then cached) ------------------------------------------
kernel_deb="$(newest "$DEBS/linux-image-*-cloud-amd64_*.deb")"
busybox_deb="$(newest "$DEBS/busybox-static_*.deb")"
if [ -z "$kernel_deb" ] || [ -z "$busybox_deb" ] || [ "${HEARTH_IMAGE_REFRESH:-0}" = 1 ]; then
  kernel_pkg="$(apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')"
  if [ -z "$kernel_pkg" ]; then
    log "apt-get update (package lists missing)"
    apt-get update -qq >/dev/null
    kernel_pkg="$(apt-cache depends "$KERNEL_META" | awk '/Depends: linux-image-/ {print $2; exit}')"
  fi
  [ -n "$kernel_pkg" ] || die "cannot resolve $KERNEL_META to a kernel package"
  log "downloading $kernel_pkg and busybox-static"
  # _apt cannot write here when run as root; the download then runs unsandboxed (harmless).
  (cd "$DEBS" && apt-get download -qq "$kernel_pkg" busybox-static 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
  kernel_deb="$(newest "$DEBS/${kernel_pkg}_*.deb")"
  busybox_deb="$(newest "$DEBS/busybox-static_*.deb")"
fi
[ -f "$kernel_deb" ] || die "kernel package not found in $DEBS"
[ -f "$busybox_deb" ] || die "busybox-static package not found in $DEBS"

# --- 2. The agent, statically linked --------------------------------------------------------------
if [ -n "${HEARTH_AGENT_BIN:-}" ]; then
  agent="$HEARTH_AGENT_BIN"
else
  target_dir="${CARGO_TARGET_DIR:-$HEARTH_ROOT/target}"
  log "building hearth-guest-agent (static)"
  (cd "$HEARTH_ROOT" && RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --quiet --release --target x86_64-unknown-linux-gnu -p hearth-guest-agent)
  agent="$target_dir/x86_64-unknown-linux-gnu/release/hearth-guest-agent"
fi
[ -x "$agent" ] || die "agent binary $agent not found"

work="$(mktemp -d "$OUT_BASE/.build-XXXXXX")"
trap 'rm -rf "$work"' EXIT
strip --strip-all -o "$work/hearth-guest-agent" "$agent"

# --- 3. The content key: every input's hash ------------------------------------------------------
key="$( {
  sha256sum "$kernel_deb" "$busybox_deb" "$work/hearth-guest-agent" "$HERE/build.sh" "$HERE/mkcpio.py" |
    awk '{print $1}'
  echo "$WANTED_MODULES"
} | sha256sum | cut -c1-16)"
out="$OUT_BASE/$key"
if [ -f "$out/initrd.img" ] && [ -f "$out/vmlinuz" ]; then
  ln -sfn "$key" "$OUT_BASE/current.tmp" && mv -T "$OUT_BASE/current.tmp" "$OUT_BASE/current"
  log "up to date: $out"
  echo "$out"
  exit 0
fi
log "assembling image $key"

# --- 4. Kernel and modules -----------------------------------------------------------------------
dpkg-deb -x "$kernel_deb" "$work/kernel"
dpkg-deb -x "$busybox_deb" "$work/busybox"
kver="$(basename "$(ls -d "$work"/kernel/lib/modules/*)")"
moddir="$work/kernel/lib/modules/$kver"

declare -A module_path=()
while IFS= read -r -d '' ko; do
  name="$(basename "$ko" .ko)"
  module_path["${name//-/_}"]="$ko"
done < <(find "$moddir" -name '*.ko' -print0)

module_deps() {
  objcopy -O binary --only-section=.modinfo "${module_path[$1]}" /dev/stdout |
    tr '\0' '\n' | sed -n 's/^depends=//p' | tr ',' ' '
}

# Post-order walk of the dependency graph: dependencies before dependents, each once.
declare -A seen=()
ordered=()
visit() {
  local m="$1" d
  [ -n "${seen[$m]:-}" ] && return
  seen[$m]=1
  [ -n "${module_path[$m]:-}" ] || die "module $m not found in $kver (built in? check boot/config)"
  for d in $(module_deps "$m"); do visit "${d//-/_}"; done
  ordered+=("$m")
}
for m in $WANTED_MODULES; do visit "$m"; done

# --- 5. The root filesystem ----------------------------------------------------------------------
root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/init.d,etc/hearth,lib/modules,dev,proc,sys,tmp,run,root,work}
chmod 1777 "$root/tmp"
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list-full); do
  [ -e "$root/$applet" ] || [ -L "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
ln -sf /bin/busybox "$root/init"
install -m 0755 "$work/hearth-guest-agent" "$root/sbin/hearth-guest-agent"
for m in "${ordered[@]}"; do
  install -m 0644 "${module_path[$m]}" "$root/lib/modules/$m.ko"
done
printf '%s\n' "${ordered[@]}" >"$root/etc/hearth/modules"

cat >"$root/etc/inittab" <<'EOF'
::sysinit:/etc/init.d/rcS
::respawn:/sbin/hearth-guest-agent
::ctrlaltdel:/bin/reboot
::shutdown:/bin/sync
EOF
cat >"$root/etc/init.d/rcS" <<'EOF'
#!/bin/sh
# Hearth guest: mount the kernel filesystems, load the virtio modules, then init starts the agent.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
while read -r m; do
  insmod "/lib/modules/$m.ko" || echo "rcS: cannot load $m" >/dev/console
done </etc/hearth/modules
ip link set lo up 2>/dev/null
hostname -F /etc/hostname
EOF
chmod 0755 "$root/etc/init.d/rcS"
echo hearth >"$root/etc/hostname"
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
: >"$root/etc/machine-id"

mkdir -p "$work/out"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/out/vmlinuz"
python3 "$HERE/mkcpio.py" "$root" "$work/out/initrd.img" \
  --dev dev/console:c:5:1:0600 --dev dev/null:c:1:3:0666
{
  echo "key=$key"
  echo "kernel_package=$(basename "$kernel_deb")"
  echo "kernel_version=$kver"
  echo "busybox_package=$(basename "$busybox_deb")"
  echo "agent_sha256=$(sha256sum "$work/hearth-guest-agent" | cut -d' ' -f1)"
  echo "modules=${ordered[*]}"
  (cd "$work/out" && sha256sum vmlinuz initrd.img)
} >"$work/out/manifest.txt"

# Publish atomically: a half-built image is never visible under its key.
if ! mv -T "$work/out" "$out" 2>/dev/null; then
  [ -f "$out/initrd.img" ] || die "cannot publish $out"
fi
ln -sfn "$key" "$OUT_BASE/current.tmp" && mv -T "$OUT_BASE/current.tmp" "$OUT_BASE/current"
log "built $out ($(du -sh "$out" | cut -f1), modules: ${ordered[*]})"
echo "$out"
