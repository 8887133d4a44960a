#!/usr/bin/env bash
# Tests the Debian package on this machine's (Debian's) nbdkit, as root or
# with sudo: builds it (scripts/package-deb.sh), installs it with apt-get,
# serves a file from an ext4 image with `nbdkit --filter=ext2rs` and compares
# the bytes, checks that `man nbdkit-ext2rs-filter` finds the manual page,
# then purges the package and checks that none of its files is left.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/bin:/usr/sbin:/bin:/sbin:$HOME/.cargo/bin:$PATH"
pkg=nbdkit-ext2rs-filter
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
fail() { echo "test-package: FAILED: $*" >&2; exit 1; }

# man finds manual pages only with man-db (not on minimal images).
if ! dpkg-query -W -f='${Status}' man-db 2>/dev/null | grep -q "install ok installed"; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq man-db >/dev/null
fi

scripts/package-deb.sh
debs=(target/debian/"$pkg"_*.deb)
[ ${#debs[@]} = 1 ] && [ -f "${debs[0]}" ] || fail "expected one package, found: ${debs[*]}"

work="$(mktemp -d)"
cleanup() {
  rm -rf "$work"
  # Never leave the package behind, whatever failed.
  if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q installed; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get purge -y -qq "$pkg" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "./${debs[0]}" >/dev/null
files="$(dpkg-query -L "$pkg")"
filterdir="$(pkg-config --variable=filterdir nbdkit)"
grep -qx "$filterdir/$pkg.so" <<<"$files" || fail "the package has no $filterdir/$pkg.so:
$files"

# Serve a file from an image with the installed filter; compare the bytes.
mkdir -p "$work/root/disks"
head -c 3000001 /dev/urandom > "$work/root/disks/f"
truncate -s 32M "$work/fs.img"
mke2fs -q -F -t ext4 -d "$work/root" "$work/fs.img"
nbdkit -U - --filter=ext2rs file "$work/fs.img" ext2file=/disks/f \
  --run "nbdcopy \"\$uri\" $work/out"
cmp "$work/root/disks/f" "$work/out" || fail "the served bytes differ from the file"

# The manual page.
page="$(man -w "$pkg")" ||
  fail "man finds no $pkg page$(grep -rs 'path-exclude.*/usr/share/man' /etc/dpkg/dpkg.cfg.d/ >/dev/null &&
    echo " (this machine's dpkg excludes /usr/share/man: see /etc/dpkg/dpkg.cfg.d)")"
case "$page" in
  /usr/share/man/man1/"$pkg".1.gz) ;;
  *) fail "man found $page, not the package's page" ;;
esac
man -P cat "$pkg" 2>/dev/null | grep -q "ext2file=" || fail "the manual page does not render"

# Removed: no file of the package is left, nor its doc directory.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get purge -y -qq "$pkg" >/dev/null
if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q installed; then
  fail "$pkg is still installed"
fi
left=()
while IFS= read -r path; do
  [ -e "$path" ] && [ ! -d "$path" ] && left+=("$path")
done <<<"$files"
[ -e "/usr/share/doc/$pkg" ] && left+=("/usr/share/doc/$pkg")
[ ${#left[@]} = 0 ] || fail "left behind after purge: ${left[*]}"
echo "test-package: ${debs[0]} installs, serves, has its manual page and purges cleanly"
