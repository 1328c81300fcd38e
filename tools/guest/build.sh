#!/usr/bin/env bash
# Builds the lab guest into OUTDIR (default: <repo>/lab/guest, git-ignored):
#   OUTDIR/vmlinuz     Debian's current bookworm kernel (linux-image-6.1.0-<n>-amd64, <n>
#                      resolved from linux-image-amd64's Depends at run time)
#   OUTDIR/initrd.gz   busybox-static + the static `memverify` workload + /init
#   OUTDIR/memverify   the static workload binary that went into the initramfs
#   OUTDIR/modules/    virtio, virtio_pci, virtio_balloon .ko of that kernel (for
#                      -device virtio-balloon,free-page-reporting=on; /init loads them)
# The kernel is downloaded once and cached; the initramfs is rebuilt only when memverify, the
# init script or busybox changed. Safe to run concurrently (flock on OUTDIR/.lock).
# Guest parameters go on the kernel command line: memverify.mib=256 memverify.hot_mib=32
# memverify.hot_rate_mibs=4 memverify.verify_secs=10 memverify.duration_secs=60 memverify.seed=1
# (memverify.shell=1 drops to a busybox shell on the console instead of running memverify).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${1:-$repo/lab/guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)
exec 9>"$out/.lock"
flock 9

need() { command -v "$1" >/dev/null || { echo "build.sh: $1 not found: run tools/lab/install-prereqs.sh" >&2; exit 1; }; }
need apt-get; need dpkg-deb; need cpio; need gzip; need cargo
busybox=$(command -v busybox || true)
[ -n "$busybox" ] || { echo "build.sh: busybox not found: run tools/lab/install-prereqs.sh (busybox-static)" >&2; exit 1; }
if ! file -L "$busybox" | grep -q 'statically linked'; then
  echo "build.sh: $busybox is not statically linked: install busybox-static (tools/lab/install-prereqs.sh)" >&2; exit 1
fi

# 1. Kernel (cached).
if [ ! -s "$out/vmlinuz" ]; then
  work=$(mktemp -d)
  chmod 1777 "$work"  # apt-get download drops privileges to _apt when it can
  trap 'rm -rf "$work"' EXIT
  (
    cd "$work"
    apt-get download linux-image-amd64 >/dev/null 2>&1 || { apt-get update -qq && apt-get download linux-image-amd64 >/dev/null; }
    meta=$(ls linux-image-amd64_*.deb)
    pkg=$(dpkg-deb -f "$meta" Depends | tr ',|' '\n\n' | sed 's/(.*//; s/ //g' | grep -E '^linux-image-[0-9].*-amd64$' | head -1)
    [ -n "$pkg" ] || { echo "build.sh: cannot find the kernel package in $meta's Depends: $(dpkg-deb -f "$meta" Depends)" >&2; exit 1; }
    echo "build.sh: kernel package $pkg" >&2
    apt-get download "$pkg" >apt.log 2>&1 || { cat apt.log >&2; exit 1; }
    dpkg-deb -x "$pkg"_*.deb root
    kernel=$(ls root/boot/vmlinuz-* | head -1)
    [ -s "$kernel" ] || { echo "build.sh: $pkg holds no boot/vmlinuz-*" >&2; exit 1; }
    cp "$kernel" "$out/vmlinuz.tmp"
    basename "$kernel" | sed 's/^vmlinuz-//' >"$out/KERNEL_VERSION"
  )
  mv "$out/vmlinuz.tmp" "$out/vmlinuz"
fi

# 1b. virtio-balloon modules (cached). The Debian kernel builds virtio, virtio_pci and
# virtio_balloon as modules (CONFIG_VIRTIO_PCI=m, CONFIG_VIRTIO_BALLOON=m,
# CONFIG_PAGE_REPORTING=y); they come from the same package as the kernel (matching
# KERNEL_VERSION) and are loaded by /init in dependency order (their `depends=` modinfo;
# the package ships no modules.dep, depmod makes it at install time).
balloon_modules="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_balloon"
if [ ! -s "$out/modules/virtio_balloon.ko" ]; then
  modwork=$(mktemp -d)
  chmod 1777 "$modwork"
  trap 'rm -rf "${work:-}" "$modwork" "$out/modules.tmp"' EXIT
  (
    cd "$modwork"
    version=$(cat "$out/KERNEL_VERSION")
    pkg="linux-image-$version"
    apt-get download "$pkg" >apt.log 2>&1 || { apt-get update -qq && apt-get download "$pkg" >apt.log 2>&1; } \
      || { cat apt.log >&2; exit 1; }
    dpkg-deb -x "$pkg"_*.deb root
    mkdir -p "$out/modules.tmp"
    for m in $balloon_modules; do
      ko=$(find "root/lib/modules/$version/kernel/drivers/virtio" -name "$m.ko*" | head -1)
      [ -n "$ko" ] || { echo "build.sh: $pkg holds no drivers/virtio/$m.ko (built in?)" >&2; exit 1; }
      case "$ko" in
        *.xz) xz -dc "$ko" >"$out/modules.tmp/$m.ko" ;;   # busybox insmod cannot read xz
        *.zst) zstd -dcq "$ko" >"$out/modules.tmp/$m.ko" ;;
        *) cp "$ko" "$out/modules.tmp/$m.ko" ;;
      esac
    done
  )
  rm -rf "$out/modules"
  mv "$out/modules.tmp" "$out/modules"
fi

# 2. memverify, static (its own target triple so host builds keep their cache).
target_dir=${CARGO_TARGET_DIR:-$repo/target}
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release -p memverify \
  --target x86_64-unknown-linux-gnu)
bin="$target_dir/x86_64-unknown-linux-gnu/release/memverify"
if ! file -L "$bin" | grep -Eq 'statically linked|static-pie linked'; then
  echo "build.sh: $bin is not static: $(file -L "$bin")" >&2; exit 1
fi

# 3. Initramfs (rebuilt when an input changed).
init_script=$(cat <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo "guest: init up, kernel $(uname -r), $(grep MemTotal /proc/meminfo)"
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_balloon; do
  [ -f /lib/modules/$m.ko ] && { insmod /lib/modules/$m.ko || echo "guest: insmod $m failed"; }
done
[ -d /sys/bus/virtio/drivers/virtio_balloon ] && ls /sys/bus/virtio/drivers/virtio_balloon | grep -q virtio && echo "guest: virtio-balloon bound"
if grep -q 'memverify.shell=1' /proc/cmdline; then
  exec setsid cttyhack sh
fi
/memverify $(cat /proc/cmdline | tr ' ' '\n' | grep -v '^memverify.shell=')
echo "guest: memverify exited with status $?"
poweroff -f
INIT
)
stamp=$( { sha256sum "$bin" "$busybox" "$out"/modules/*.ko; echo "$init_script"; } | sha256sum | cut -d' ' -f1)
if [ ! -s "$out/initrd.gz" ] || [ "$(cat "$out/initrd.stamp" 2>/dev/null)" != "$stamp" ]; then
  root=$(mktemp -d)
  mkdir -p "$root"/{bin,proc,sys,dev,tmp,lib/modules}
  cp "$busybox" "$root/bin/busybox"
  cp "$out"/modules/*.ko "$root/lib/modules/"
  cp "$bin" "$root/memverify"
  printf '%s\n' "$init_script" >"$root/init"
  chmod 755 "$root/init" "$root/memverify" "$root/bin/busybox"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$out/initrd.gz.tmp"
  rm -rf "$root"
  mv "$out/initrd.gz.tmp" "$out/initrd.gz"
  cp "$bin" "$out/memverify"
  echo "$stamp" >"$out/initrd.stamp"
fi
echo "build.sh: guest ready in $out (kernel $(cat "$out/KERNEL_VERSION"))" >&2
