#!/usr/bin/env bash
# Installs what building and testing ext2filter needs on Debian 12, then
# builds the filter.  Safe to run again: apt-get skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  nbdkit nbdkit-plugin-dev          # the server, and the filter headers
  libext2fs-dev comerr-dev e2fsprogs # libext2fs, its error tables, mke2fs/e2fsck/debugfs
  libclang-dev clang pkg-config     # bindgen's parser
  libnbd-bin python3-libnbd qemu-utils # clients: nbdsh, nbdcopy, nbdinfo, qemu-img
  nbdkit-plugin-python              # the crash tests' recording plugin
  fio                               # the benchmark's random-write client
)

need_install=0
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_install=1
done
if [ "$need_install" = 1 ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y "${PACKAGES[@]}"
fi

if ! command -v cargo >/dev/null; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null; then
  echo "setup: no cargo found: install a Rust toolchain >= 1.77 (https://rustup.rs)" >&2
  exit 1
fi

cargo build --release
echo "setup: built $(pwd)/target/release/libext2filter.so"
