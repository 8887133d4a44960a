#!/usr/bin/env bash
# Builds a Debian package of the filter for the nbdkit that pkg-config names,
# which must be a Debian nbdkit (nbdkit-plugin-dev), with the crates.io build
# (Cargo.lock; any Rust toolchain >= 1.77).  This is the way on Debian 12,
# whose Rust crates and rustc are too old for debian/; on Debian 13 and sid
# build that source package instead (dpkg-buildpackage -b -us -uc): the same
# package from Debian's crates (scripts/test-distro.sh):
#
#   scripts/package-deb.sh     # -> target/debian/nbdkit-ext2rs-filter_VERSION_ARCH.deb
#
# The package holds the filter as $(pkg-config --variable=filterdir nbdkit)/
# nbdkit-ext2rs-filter.so (`nbdkit --filter=ext2rs`; Debian's own ext2 filter
# is left alone), the manual page nbdkit-ext2rs-filter(1), and the copyright
# and changelog in /usr/share/doc/nbdkit-ext2rs-filter.  It depends on exactly
# the nbdkit it was built against (nbdkit refuses a filter built for any other
# version) and on the shared libraries the filter links (dpkg-shlibdeps).
# lintian must report no error.  Installs dpkg-dev and lintian if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/bin:/usr/sbin:/bin:/sbin:$HOME/.cargo/bin:$PATH"
umask 022

pkg=nbdkit-ext2rs-filter
maintainer="${DEBFULLNAME:-ext2filter maintainers} <${DEBEMAIL:-ext2filter@example.org}>"

die() { echo "package-deb: $*" >&2; exit 1; }

need=()
for p in dpkg-dev lintian; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The version: Cargo's, which the changelog's latest entry must carry.
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
changelog_version="$(dpkg-parsechangelog -l debian/changelog -S Version)"
[ "$version" = "$changelog_version" ] ||
  die "Cargo.toml says $version but debian/changelog's latest entry is $changelog_version"

# The nbdkit built against: pkg-config's, from a Debian package.
includedir="$(pkg-config --variable=includedir nbdkit)" ||
  die "pkg-config knows no nbdkit (apt-get install nbdkit-plugin-dev)"
header="$includedir/nbdkit-version.h"
owner="$(dpkg-query -S "$header" 2>/dev/null | head -1 | cut -d: -f1)" ||
  die "$header belongs to no Debian package: PKG_CONFIG_PATH names another nbdkit"
nbdkit_version="$(dpkg-query -W -f='${Version}' "$owner")"
header_version="$(sed -n 's/^#define NBDKIT_VERSION_STRING "\(.*\)"/\1/p' "$header")"
case "$nbdkit_version" in
  "$header_version"-*|"$header_version") ;;
  *) die "$owner $nbdkit_version does not match its header's version $header_version" ;;
esac
# nbdkit loads only a filter stamped with its own upstream version: pin that
# version, but not the Debian revision, so a stable update of the same
# release (1.32.5-1+deb12u1) keeps the package installable.
nbdkit_depends="nbdkit (>= $header_version), nbdkit (<< $header_version.~)"
filterdir="$(pkg-config --variable=filterdir nbdkit)"
arch="$(dpkg --print-architecture)"

cargo build --release
so=target/release/libext2filter.so

out=target/debian
# Staged as debhelper would, so dpkg-shlibdeps finds the package it is for.
build="$out/build"
stage="$build/debian/$pkg"
rm -rf "$build" "$out/${pkg}"_*.deb
mkdir -p "$stage/DEBIAN"

install -D -m 0644 "$so" "$stage$filterdir/$pkg.so"
# As dh_strip does: the symbols nbdkit looks up (filter_init, the debug
# flags) are dynamic and stay.
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$stage$filterdir/$pkg.so"

man="$stage/usr/share/man/man1/$pkg.1.gz"
mkdir -p "$(dirname "$man")"
pod2man --section=1 --center="nbdkit" --release="ext2filter $version" \
  --name=NBDKIT-EXT2RS-FILTER doc/nbdkit-ext2rs-filter.pod | gzip -9n > "$man"
chmod 0644 "$man"

doc="$stage/usr/share/doc/$pkg"
install -D -m 0644 debian/copyright "$doc/copyright"
# A native package's changelog is changelog.gz (Debian policy 12.7).
gzip -9n < debian/changelog > "$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"

# The shared libraries the filter links.  nbdkit_* are left undefined on
# purpose (the nbdkit executable provides them), hence the quieter warnings.
printf 'Source: %s\n\nPackage: %s\nArchitecture: any\n' "$pkg" "$pkg" > "$build/debian/control"
shlibs="$(cd "$build" && dpkg-shlibdeps --warnings=6 -O "-edebian/$pkg$filterdir/$pkg.so" |
  sed -n 's/^shlibs:Depends=//p')"
[ -n "$shlibs" ] || die "dpkg-shlibdeps found no shared library dependencies"

installed_size="$(du -k -s --exclude=DEBIAN "$stage" | cut -f1)"
# Section, Priority and Description: debian/control's, the source package's.
field() { sed -n "s/^$1: //p" debian/control | head -1; }
description="$(sed -n "/^Package: $pkg\$/,/^\$/{/^Description:/,/^\$/p}" debian/control | sed '/^$/d')"
[ -n "$description" ] || die "debian/control has no Description for $pkg"
cat > "$stage/DEBIAN/control" <<CONTROL
Package: $pkg
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $nbdkit_depends, $shlibs
Section: $(field Section)
Priority: $(field Priority)
$description
CONTROL
(cd "$stage" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) \
  > "$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/control" "$stage/DEBIAN/md5sums"

deb="$out/${pkg}_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null

# Errors fail the build; warnings and notes are shown.
lintian_rc=0
lintian_out="$(lintian --fail-on error --tag-display-limit 0 "$deb" 2>&1)" || lintian_rc=$?
grep -v '^running with root privileges' <<<"$lintian_out" || true
[ "$lintian_rc" = 0 ] || die "lintian reports errors in $deb"
echo "package-deb: $deb (Depends: $nbdkit_depends, $shlibs)"
