#!/usr/bin/env bash
# Sets everything up and serves one file out of an ext2/3/4 image.
#
#   scripts/serve.sh [IMAGE [PATH]]
#
# With no IMAGE, builds a small demo image with `mke2fs -d` holding
# /disks/disk.img (a 16 MiB disk with a greeting at its start) and serves
# that.  The export listens on 127.0.0.1:${PORT:-10809} until Ctrl-C; set
# RUN='nbdinfo $uri' to run one command against it and exit instead.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
export PATH="/usr/bin:$HOME/.cargo/bin:$PATH"

filter="$(pwd)/target/release/libext2filter.so"
image="${1:-}"
path="${2:-/disks/disk.img}"

if [ -z "$image" ]; then
  demo="$(pwd)/target/demo"
  rm -rf "$demo"
  mkdir -p "$demo/root/disks"
  truncate -s 16M "$demo/root/disks/disk.img"
  printf 'Hello from inside an ext4 image, served by ext2filter.\n' |
    dd of="$demo/root/disks/disk.img" conv=notrunc status=none
  echo "This file is /hello.txt in the demo image." > "$demo/root/hello.txt"
  mke2fs -q -F -t ext4 -d "$demo/root" "$demo/fs.img" 32M
  image="$demo/fs.img"
  echo "serve: built the demo image $image holding $path"
fi

if [ -n "${RUN:-}" ]; then
  exec nbdkit -U - --filter="$filter" file "$image" ext2file="$path" --run "$RUN"
fi
port="${PORT:-10809}"
echo "serve: $path from $image on nbd://127.0.0.1:$port (Ctrl-C stops)"
echo "serve: try: nbdinfo nbd://127.0.0.1:$port   or   nbdcopy nbd://127.0.0.1:$port copy.img"
exec nbdkit -f -i 127.0.0.1 -p "$port" --filter="$filter" file "$image" ext2file="$path"
