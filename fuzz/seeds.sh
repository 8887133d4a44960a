#!/bin/bash
# Makes the seed corpus of the fuzz targets (fuzz/corpus/TARGET/) from
# small images built with mke2fs -d and debugfs (e2fsprogs), covering what
# the filter reads: indirect and extent maps (a tree of depth 1), symlinks
# (fast, slow, chained, looping), inline data, bigalloc, meta_bg, mmp, quotas,
# 1 KiB and 4 KiB blocks, and journals needing recovery with each checksum
# flavour (none, v1 crc32, v2, v3) and an escaped block.
#
#     fuzz/seeds.sh            # rewrites fuzz/corpus/
#
# Inputs hold only an image's non-zero sectors (see fuzz/src/targets.rs),
# so a 2 MiB image with a journal is a few tens of KiB.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --quiet --bin replay
replay="$CARGO_TARGET_DIR/release/replay"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rm -rf corpus
mkdir -p corpus/read corpus/journal corpus/quota corpus/quota-tree corpus/write

# The tree every image holds.
src="$work/src"
mkdir -p "$src/dir/sub"
printf 'hello, world\n' >"$src/hello.txt"
head -c 3000 /dev/urandom >"$src/dir/small"
# Sparse: a block past the 12 direct pointers and one past 256 + 12 KiB
# (single and double indirect with 1 KiB blocks).
truncate -s 400K "$src/dir/sparse"
printf 'A' | dd of="$src/dir/sparse" bs=1 seek=$((20 << 10)) conv=notrunc status=none
printf 'B' | dd of="$src/dir/sparse" bs=1 seek=$((300 << 10)) conv=notrunc status=none
# Fragmented: 1 KiB of data every 2 KiB, more extents than the inode holds.
for i in $(seq 0 9); do
    printf 'fragment %d' "$i" | dd of="$src/dir/frag" bs=1 seek=$((i * 2048)) conv=notrunc status=none
done
ln -s hello.txt "$src/link"
ln -s /dir/sub/../small "$src/dir/abs"
ln -s "$(printf 'x%.0s' $(seq 1 80))/../../hello.txt" "$src/dir/slow"
ln -s link "$src/chain"
ln -s loop2 "$src/loop1"
ln -s loop1 "$src/loop2"
ln "$src/hello.txt" "$src/dir/sub/hard"

# mkimg NAME SIZE MKE2FS-OPTIONS...
mkimg() {
    local name=$1 size=$2
    shift 2
    mke2fs -q -F "$@" -d "$src" "$work/$name.img" "$size" >/dev/null
}

# Parameters, hex: read: map cache size, then paths (length, bytes).
path_hex() {
    local out="" p
    for p in "$@"; do
        out+=$(printf '%02x' "${#p}")$(printf '%s' "$p" | od -An -tx1 | tr -d ' \n')
    done
    printf '%s' "$out"
}
read_params="03$(path_hex chain dir/abs dir/slow loop1 dir/sub/hard link/x)"
# write: file choice (0: the largest), then requests (op, u16 block, u8
# count - 1; see write() in fuzz/src/targets.rs): writes into holes and
# data, aligned and not, a long hole filled, trim, zero, commit, flush.
op() { printf '%02x%02x%02x%02x' "$1" $(($2 & 255)) $(($2 >> 8)) $(($3 - 1)); }
write_params="00$(op 0 0 4)$(op 1 30 2)$(op 2 290 20)$(op 8 0 1)$(op 4 0 2)$(op 7 25 10)"
write_params+="$(op 9 0 1)$(op 0 100 200)$(op 3 1 1)$(op 5 120 30)$(op 8 0 1)"
# quota: owners (uid, gid, project as u16) and signed KiB.
quota_params="000000000000080000000000000010e803e8030000f0"

encode() { # IMAGE TARGET NAME PARAMS
    "$replay" --encode "$1" "$4" "corpus/$2/$3"
}

# Journals with transactions to recover, written by debugfs's journal
# commands: copies of real metadata blocks (the root directory, the first
# inode table block), a block starting with the JBD2 magic (escaped in the
# log), a revoke record.
# debugfs's v1 (crc32) commit checksum leaves out revoke blocks, which
# recovery (e2fsck's, ours) counts: with REVOKE=revoke a v1 journal's
# second transaction is corrupt, a seed for that path too.
journalled() { # NAME JO-OPTIONS REVOKE MKE2FS-OPTIONS...
    local name=$1 jo=$2 revoke=$3
    shift 3
    mkimg "$name" 2M -b 1024 "$@"
    local img="$work/$name.img"
    local root itable
    root=$(debugfs -R 'blocks /' "$img" 2>/dev/null | awk '{print $1}')
    itable=$(dumpe2fs "$img" 2>/dev/null | awk '/Inode table at/ {split($4, a, "-"); print a[1]; exit}')
    dd if="$img" of="$work/root.blk" bs=1024 skip="$root" count=1 status=none
    dd if="$img" of="$work/itable.blk" bs=1024 skip="$itable" count=1 status=none
    { printf '\xc0\x3b\x39\x98'; head -c 1020 /dev/zero | tr '\0' 'm'; } >"$work/magic.blk"
    local revoke_cmd=""
    [ "$revoke" = revoke ] && revoke_cmd="jw -r 1501"
    printf 'jo %s\njw -b %s %s\njw -b %s %s\njc\njo\njw -b 1500 %s\n%s\njc\n' \
        "$jo" "$root" "$work/root.blk" "$itable" "$work/itable.blk" "$work/magic.blk" \
        "$revoke_cmd" |
        debugfs -w -f - "$img" >/dev/null 2>&1
    dumpe2fs -h "$img" 2>/dev/null | grep -q needs_recovery || {
        echo "seeds.sh: $name: debugfs left no transaction to recover" >&2
        exit 1
    }
}

mkimg ext2-1k 512K -t ext2 -b 1024
mkimg ext3-1k 2M -t ext3 -b 1024
mkimg ext4-4k 1M -t ext4 -b 4096 -O ^has_journal
mkimg ext4-1k-csum 1M -t ext4 -b 1024 -O ^has_journal,metadata_csum
mkimg inline 512K -t ext4 -b 1024 -I 256 -O ^has_journal,inline_data
mkimg bigalloc 2M -t ext4 -b 1024 -C 4096 -O ^has_journal,bigalloc,^resize_inode
mkimg meta_bg 1M -t ext4 -b 1024 -O ^has_journal,meta_bg,^resize_inode
mkimg mmp 1M -t ext4 -b 1024 -O ^has_journal,mmp
mkimg quota 1M -t ext4 -b 1024 -O ^has_journal,quota,project -E quotatype=usrquota:grpquota:prjquota
# mke2fs -d leaves the quota files short of what -d added (1.47.0).
e2fsck -fy "$work/quota.img" >/dev/null 2>&1 || true
mkimg quota-bigalloc 2M -t ext4 -b 1024 -C 4096 -O ^has_journal,bigalloc,^resize_inode,quota
e2fsck -fy "$work/quota-bigalloc.img" >/dev/null 2>&1 || true
journalled jnl-none "" revoke -t ext4 -O ^metadata_csum
journalled jnl-v1 "-c" none -t ext4 -O ^metadata_csum
journalled jnl-v1-revoke "-c" revoke -t ext4 -O ^metadata_csum
journalled jnl-v2 "-c -v 2" revoke -t ext4
journalled jnl-v3 "-c -v 3" revoke -t ext4
journalled jnl-ext3 "" revoke -t ext3

for img in "$work"/*.img; do
    e2fsck -fn "$img" >/dev/null 2>&1 || case "$img" in
        *jnl-*) ;; # e2fsck -n does not replay
        *) echo "seeds.sh: $(basename "$img") does not pass e2fsck -fn" >&2; exit 1 ;;
    esac
done

for name in ext2-1k ext3-1k ext4-4k ext4-1k-csum inline bigalloc meta_bg mmp quota jnl-v3; do
    encode "$work/$name.img" read "$name" "$read_params"
done
for name in jnl-none jnl-v1 jnl-v1-revoke jnl-v2 jnl-v3 jnl-ext3 ext3-1k; do
    encode "$work/$name.img" journal "$name" "$read_params"
done
for name in quota quota-bigalloc; do
    encode "$work/$name.img" quota "$name" "$quota_params"
done
for name in ext2-1k ext3-1k ext4-4k ext4-1k-csum bigalloc meta_bg quota quota-bigalloc; do
    encode "$work/$name.img" write "$name" "$write_params"
done
# quota-tree: each quota file of the quota image alone, with requests
# (kind, count, then op and u32 id each): find, charge (insert) new and
# known ids, add space, list.
tree_requests="08$(printf '%s' 0000000000 0100000000 01e8030000 0110270000 02e8030000 0100000100 0342000000 0010270000)"
for kind in user group project; do
    case $kind in
        user) k=00 ;;
        group) k=01 ;;
        project) k=02 ;;
    esac
    ino=$(dumpe2fs -h "$work/quota.img" 2>/dev/null | awk -v k="$kind" 'tolower($0) ~ "^" k " quota inode:" {print $NF}')
    debugfs -R "dump <$ino> $work/$kind.quota" "$work/quota.img" >/dev/null 2>&1
    { printf '%s' "$k$tree_requests" | xxd -r -p; cat "$work/$kind.quota"; } >"corpus/quota-tree/$kind"
done
du -sh corpus
