#!/usr/bin/env bash
# Installs what pagewise's build, tests and demo need on a fresh Debian 12 machine (as root).
# Idempotent: does nothing when everything is present.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
missing=0
for c in qemu-system-x86_64 qemu-nbd busybox cpio ip file ganesha.nfsd rpcbind nbdkit nfs-cp; do
  command -v "$c" >/dev/null || missing=1
done
ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || missing=1
# libnfs-dev: the NFS backend links libnfs; the VFS FSAL: Ganesha exporting a directory.
[ -e /usr/include/nfsc/libnfs.h ] || missing=1
ls /usr/lib/*/ganesha/libfsalvfs.so >/dev/null 2>&1 || missing=1
ls /usr/lib/*/nbdkit/plugins/nbdkit-memory-plugin.so >/dev/null 2>&1 || missing=1
if [ "$missing" = 1 ]; then
  echo "installing prerequisites (qemu-system-x86, qemu-utils, busybox-static, cpio, libclang-dev, iproute2, nfs-ganesha, rpcbind, libnfs, nbdkit)" >&2
  apt-get update -qq
  # qemu-system-x86 (7.2, bookworm) conflicts with a newer backported qemu-utils: pin
  # qemu-utils/qemu-block-extra to the same version so qemu-nbd stays installed.
  v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
  apt-get install -y -qq --allow-downgrades qemu-system-x86 "qemu-utils=$v" "qemu-block-extra=$v" \
    busybox-static cpio libclang-dev iproute2 file \
    nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-dev libnfs-utils nbdkit >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }
for c in qemu-system-x86_64 qemu-nbd busybox cpio ganesha.nfsd rpcbind nbdkit; do
  command -v "$c" >/dev/null || { echo "prerequisite $c still missing after install" >&2; exit 1; }
done
