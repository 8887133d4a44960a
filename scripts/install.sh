#!/usr/bin/env bash
# Installs the built filter and its man page where nbdkit looks for them.
#
#   scripts/install.sh            # into the system (as root)
#   DESTDIR=/tmp/pkg scripts/install.sh   # staged, for packaging
#
# The filter goes to $(pkg-config --variable=filterdir nbdkit) as
# nbdkit-ext2rs-filter.so (used as `nbdkit --filter=ext2rs`), so Debian's
# own nbdkit-ext2-filter.so is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
DESTDIR="${DESTDIR:-}"
MANDIR="${MANDIR:-/usr/share/man}"

so=target/release/libext2filter.so
[ -f "$so" ] || cargo build --release
filterdir="$(pkg-config --variable=filterdir nbdkit)"
[ -n "$filterdir" ] || { echo "install: pkg-config knows no nbdkit filterdir (install nbdkit-plugin-dev)" >&2; exit 1; }

install -D -m 0755 "$so" "$DESTDIR$filterdir/nbdkit-ext2rs-filter.so"
mkdir -p target/man
pod2man --section=1 --center="nbdkit" --release="ext2filter $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)" \
  --name=NBDKIT-EXT2RS-FILTER doc/nbdkit-ext2rs-filter.pod > target/man/nbdkit-ext2rs-filter.1
gzip -9nf target/man/nbdkit-ext2rs-filter.1
install -D -m 0644 target/man/nbdkit-ext2rs-filter.1.gz "$DESTDIR$MANDIR/man1/nbdkit-ext2rs-filter.1.gz"
echo "install: $DESTDIR$filterdir/nbdkit-ext2rs-filter.so"
echo "install: $DESTDIR$MANDIR/man1/nbdkit-ext2rs-filter.1.gz"
