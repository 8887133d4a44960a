#!/usr/bin/env bash
# Runs the tests again on upstream nbdkit 1.45.2 (what Fedora and newer
# distributions ship; its filter API differs from Debian 12's 1.32.5):
#
#   scripts/test-upstream-nbdkit.sh
#
# 1. builds and installs nbdkit from its source with BUILD.SH PREFIX, where
#    BUILD.SH is $EXT2FILTER_NBDKIT_SOURCE/build.sh, else ../shared/nbdkit/
#    build.sh next to this repository, and PREFIX is $EXT2FILTER_NBDKIT_PREFIX,
#    else target/opt/nbdkit-1.45.2 (nothing to do when it is already there);
# 2. builds the filter against it (PKG_CONFIG_PATH=PREFIX/lib/pkgconfig) in
#    its own target directory, target/nbdkit-1.45.2, with clippy and the unit
#    tests of that build;
# 3. runs the integration tests with EXT2FILTER_NBDKIT=PREFIX/sbin/nbdkit and
#    EXT2FILTER_SO set to that build (so `--filter=ext2` in the comparisons is
#    upstream's own C filter of that version).
#
# Without the nbdkit source it says loudly that it skipped, and why, and
# exits 0: a machine without the source is no failure of the filter.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
export PATH="/usr/bin:/usr/sbin:/bin:/sbin:$HOME/.cargo/bin:$PATH"
version=1.45.2

source_dir="${EXT2FILTER_NBDKIT_SOURCE:-$root/../shared/nbdkit}"
builder="$source_dir/build.sh"
if [ ! -f "$builder" ]; then
  {
    echo "########################################################################"
    echo "SKIPPED: the tests against upstream nbdkit $version, because"
    echo "  $builder does not exist."
    echo "  Set EXT2FILTER_NBDKIT_SOURCE to the directory holding build.sh and"
    echo "  nbdkit-$version.tar.xz to run them."
    echo "########################################################################"
  } >&2
  exit 0
fi

prefix="${EXT2FILTER_NBDKIT_PREFIX:-target/opt/nbdkit-$version}"
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"
echo "test-upstream-nbdkit: building nbdkit $version into $prefix"
bash "$builder" "$prefix"
nbdkit="$prefix/sbin/nbdkit"
[ "$("$nbdkit" --version)" = "nbdkit $version" ] || {
  echo "test-upstream-nbdkit: $nbdkit is not nbdkit $version" >&2
  exit 1
}

target_dir="$root/target/nbdkit-$version"
(
  export PKG_CONFIG_PATH="$prefix/lib/pkgconfig" CARGO_TARGET_DIR="$target_dir"
  [ "$(pkg-config --modversion nbdkit)" = "$version" ]
  cargo clippy --release -p ext2filter --lib -- -D warnings
  cargo build --release -p ext2filter
  cargo test --release -p ext2filter --lib
)
so="$target_dir/release/libext2filter.so"

# The integration tests do not depend on nbdkit's headers: the binaries
# built for Debian's nbdkit run here too, told which server and filter to use.
EXT2FILTER_NBDKIT="$nbdkit" EXT2FILTER_SO="$so" \
  cargo test --release -p ext2filter --test '*'
echo "test-upstream-nbdkit: the suite passed on nbdkit $version"
