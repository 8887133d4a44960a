#!/usr/bin/env bash
# Tests ext2filter on another Debian release, in a clean root of it made with
# debootstrap, as root:
#
#   scripts/test-distro.sh SUITE [STEP...]    # SUITE: trixie or sid
#
# (Not bookworm: its rustc 1.63 and librust-bindgen-dev 0.60 are older than
# the source package needs; Debian 12 has the crates.io build, scripts/test.sh.)
#
# STEPs, in this order (default: all three):
#   package      builds the source package (debian/) with the network cut
#                (`dpkg-buildpackage -b -us -uc` under `unshare -n`), runs
#                lintian on the source and the binary package (errors fail),
#                and installs the package;
#   autopkgtest  runs debian/tests against the installed package;
#   suite        runs the project's whole test suite (cargo test --release
#                --workspace) against that release's nbdkit and libext2fs,
#                cargo offline on the crates Debian's librust-*-dev packages
#                ship.  Formatting and clippy are left to scripts/test.sh on
#                the host: they judge the code, not the distribution, and a
#                newer rustc's clippy would judge it by lints of its own.
#
# The root is made once with `debootstrap --variant=minbase` from the Debian
# mirror this machine's apt sources name (or $EXT2FILTER_MIRROR) and kept in
# ${EXT2FILTER_ROOTS:-/var/cache/ext2filter-roots}/SUITE, outside the repo; it
# is made again when missing or broken.  Packages added to it stay, so a second
# run spends its time on building and testing only.  The sources are copied in
# fresh each run (tracked and untracked files, not target/).
#
# Tests that need the kernel to loop-mount an image find no loop device in the
# root (its /dev is debootstrap's few nodes, not the host's), say so and skip.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/sbin:/usr/bin:/sbin:/bin:$PATH"
export LC_ALL=C.UTF-8

die() { echo "test-distro: $*" >&2; exit 1; }
say() { echo "=== test-distro $suite: $* (at $((SECONDS - started)) s)"; }

[ $# -ge 1 ] || die "usage: $0 SUITE [package|autopkgtest|suite]..."
suite="$1"; shift
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(package autopkgtest suite)
for s in "${steps[@]}"; do
  case "$s" in package|autopkgtest|suite) ;; *) die "unknown step $s" ;; esac
done
[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot and mount need it)"
started=$SECONDS

cache="${EXT2FILTER_ROOTS:-/var/cache/ext2filter-roots}"
root="$cache/$suite"
# Written last when a root is made: its absence means a root half made.
stamp="$root/.ext2filter-root"
src=/build/ext2filter        # where the sources go, inside the root
pkg=nbdkit-ext2rs-filter

# The Debian mirror of this machine's apt sources: the first URI (one-line or
# deb822 format) whose path ends in /debian.  Never written into the repo: a
# machine elsewhere has another.
mirror() {
  if [ -n "${EXT2FILTER_MIRROR:-}" ]; then echo "$EXT2FILTER_MIRROR"; return; fi
  local uri
  uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    sed -n -e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\).*/\2/p' \
           -e 's/^URIs:[[:space:]]*//p' |
    tr ' ' '\n' | grep -E '^https?://[^ ]*/debian/?$' | head -1)" || true
  [ -n "$uri" ] || die "no Debian mirror (a URI ending in /debian) in /etc/apt/sources.list*; set EXT2FILTER_MIRROR"
  echo "${uri%/}"
}

# What is mounted at or under the root, deepest first.
mounts_under() {
  awk -v r="$root" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/self/mounts | sort -r
}
unmount_all() {
  local m
  for m in $(mounts_under); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
}

in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
  LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"; }

# A root is usable when its stamp is there, a program runs in it, and dpkg
# has nothing half installed.
root_ok() {
  [ -f "$stamp" ] && in_root /bin/true 2>/dev/null &&
    [ -z "$(in_root dpkg --audit 2>&1)" ]
}

make_root() {
  local m
  m="$(mirror)"
  unmount_all
  rm -rf --one-file-system "$root"
  mkdir -p "$cache"
  say "debootstrap $suite (minbase) from the machine's mirror"
  debootstrap --variant=minbase "$suite" "$root" "$m" > "$cache/$suite.debootstrap.log" 2>&1 ||
    { tail -20 "$cache/$suite.debootstrap.log" >&2; die "debootstrap failed (log: $cache/$suite.debootstrap.log)"; }
  # The mirror may be a dated snapshot whose Release files have expired.
  cat > "$root/etc/apt/apt.conf.d/90ext2filter" <<'APT'
Acquire::Check-Valid-Until "false";
APT::Install-Recommends "false";
APT
  echo "ext2filter test root" > "$root/etc/debian_chroot"
  in_root apt-get update -qq
  touch "$stamp"
}

mount_root() {
  # proc for the build and the tests; a private /dev/shm (tmpfs) where the
  # crash tests keep their states; /dev/pts for anything asking for a pty.
  mount -t proc proc "$root/proc"
  mkdir -p "$root/dev/shm" "$root/dev/pts"
  mount -t tmpfs -o mode=1777 shm "$root/dev/shm"
  mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
}

apt_install() {
  # Installs into the root; on a failure the lists may be stale: refresh, retry.
  in_root apt-get install -y -qq "$@" >/dev/null ||
    { in_root apt-get update -qq && in_root apt-get install -y -qq "$@" >/dev/null; }
}

# --- the root ------------------------------------------------------------------------
command -v debootstrap >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
mkdir -p "$cache"
# One run per root at a time: another would unmount or rebuild under it.
exec 9> "$cache/$suite.lock"
flock -w 3600 9 || die "another test-distro.sh holds $cache/$suite.lock"
unmount_all   # left by a run that was killed
if root_ok; then
  say "reusing the root $root"
else
  make_root
fi
trap unmount_all EXIT
mount_root

# Fresh sources in the root: what git tracks and what it would track (not
# target/, not ignored files), as they are in the work tree.
copy_sources() {
  local dir="$root$1"
  rm -rf "$dir"
  mkdir -p "$dir"
  git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
    tar -c --null -T - | tar -x -C "$dir"
}

step_package() {
  say "build dependencies (apt-get build-dep)"
  copy_sources "$src"
  apt_install dpkg-dev lintian
  in_root apt-get build-dep -y -qq "$src" >/dev/null ||
    { in_root apt-get update -qq && in_root apt-get build-dep -y -qq "$src" >/dev/null; }
  rm -f "$root/build/${pkg}"_* "$root/build/${pkg}-dbgsym"_*

  say "source package (dpkg-source -b)"
  in_root sh -c "cd /build && dpkg-source -b ext2filter" >/dev/null

  say "binary package, network cut (unshare -n; dpkg-buildpackage -b -us -uc)"
  unshare -n chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LC_ALL=C.UTF-8 DEB_BUILD_OPTIONS="parallel=$(nproc)" \
    sh -c "cd $src && dpkg-buildpackage -b -us -uc" > "$root/build/build.log" 2>&1 ||
    { tail -50 "$root/build/build.log" >&2; die "dpkg-buildpackage failed (log: $root/build/build.log)"; }
  local deb
  deb="/build/$(cd "$root/build" && ls "${pkg}"_*.deb)"
  in_root dpkg-deb -f "$deb" Depends Static-Built-Using

  say "lintian (errors fail; warnings shown)"
  # Source and binary, all tags but the pedantic and experimental ones.
  in_root sh -c "cd /build && lintian --fail-on error --display-info --tag-display-limit 0 \
    ${pkg}_*.dsc ${pkg}_*.changes" || die "lintian reports errors"

  say "install the package"
  in_root apt-get install -y -qq --reinstall "$deb" >/dev/null
}

step_autopkgtest() {
  local dir=/build/autopkgtest
  copy_sources "$dir"
  # The tests' Depends less "@" (the package itself, installed above).
  local deps
  deps="$(sed -n 's/^Depends:[[:space:]]*//p' "$root$dir/debian/tests/control" | tr ',' '\n' |
    sed 's/^[[:space:]]*//; s/[[:space:]]*$//' | grep -v '^@$' | tr '\n' ' ')"
  say "autopkgtest: debian/tests (needs $deps)"
  # shellcheck disable=SC2086  # one word a package
  apt_install $deps
  dpkg_status="$(in_root dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
  [ "$dpkg_status" = "install ok installed" ] || die "$pkg is not installed: run the package step first"
  local t
  for t in $(sed -n 's/^Tests:[[:space:]]*//p' "$root$dir/debian/tests/control"); do
    in_root sh -c "cd $dir && tmp=\$(mktemp -d) && AUTOPKGTEST_TMP=\$tmp debian/tests/$t; rc=\$?; rm -rf \$tmp; exit \$rc" ||
      die "autopkgtest $t failed"
  done
}

step_suite() {
  local dir=/build/suite
  say "the suite's tools and Debian's Rust toolchain and crates"
  copy_sources "$dir"
  # What scripts/setup.sh installs on the host, but Debian's cargo and crates
  # instead of rustup's and crates.io's (the build dependencies come from the
  # package step's apt-get build-dep; installed again here for a lone run).
  apt_install nbdkit nbdkit-plugin-dev libext2fs-dev comerr-dev e2fsprogs libclang-dev \
    pkgconf cargo rustc libnbd-bin python3-libnbd qemu-utils nbdkit-plugin-python \
    procps util-linux
  in_root apt-get build-dep -y -qq "$dir" >/dev/null
  # Cargo offline on the crates the librust-*-dev packages put in
  # /usr/share/cargo/registry; Cargo.lock (crates.io's versions) is dropped
  # from the copy so cargo resolves against those.
  mkdir -p "$root/root/.cargo-debian"
  cat > "$root/root/.cargo-debian/config.toml" <<'CARGO'
[source.crates-io]
replace-with = "debian"

[source.debian]
directory = "/usr/share/cargo/registry"

[net]
offline = true
CARGO
  rm -f "$root$dir/Cargo.lock"
  in_root sh -c 'echo "nbdkit $(nbdkit --version | cut -d" " -f2), libext2fs $(dpkg-query -W -f="\${Version}" libext2fs2t64 2>/dev/null || dpkg-query -W -f="\${Version}" libext2fs2), $(rustc --version)"'

  # --no-fail-fast: every test binary runs, so one run shows all a release breaks.
  say "the whole suite (cargo test --release --workspace) in $suite"
  # Lines cut at 2000 characters: a newer rustc's warnings about the
  # generated bindings quote them whole, a line of some 100 kB.
  # The build outside the copied sources: a second run rebuilds only what changed.
  # The integration tests load target/release/libext2filter.so: build it first.
  in_root CARGO_HOME=/root/.cargo-debian CARGO_TARGET_DIR=/build/suite-target \
    sh -c "cd $dir && cargo build --release && cargo test --release --workspace --no-fail-fast" 2>&1 |
    cut -c1-2000 || die "the suite failed in $suite"
}

for s in "${steps[@]}"; do "step_$s"; done
say "done: ${steps[*]}"
# Read no further: an edit to this file while it runs cannot run anything.
exit 0
