//! Large sparse files in small images: a 1 TiB ext4 file (offsets far past 4 GiB and
//! 2^32 bytes), and ext2/ext3 files reaching triple-indirect mapping (past
//! 12 + 256 + 256² blocks with 1 KiB blocks, 12 + 1024 + 1024² with 4 KiB). The size
//! must be exact; reads of data and holes exact; writes (straddling the
//! double→triple-indirect boundary, far into holes, the last byte) must read back
//! through the filter, survive a server restart, sit in the image at the physical block
//! `debugfs bmap` names, and leave `e2fsck -fn` clean.

mod common;

use common::*;

struct Case {
    fs: FsType,
    block_size: u32,
    len: u64,
    pieces: Vec<(u64, Vec<u8>)>,
}

type Writes = [(u64, Vec<u8>)];

/// The expected bytes of `[offset, offset + len)`: zeros, then the pieces, then writes.
fn expected_window(case: &Case, writes: &Writes, offset: u64, len: usize) -> Vec<u8> {
    let mut window = vec![0u8; len];
    let end = offset + len as u64;
    for (start, data) in case.pieces.iter().chain(writes.iter()) {
        let data_end = start + data.len() as u64;
        let from = (*start).max(offset);
        let to = data_end.min(end);
        if from < to {
            window[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
        }
    }
    window
}

/// Windows to check: each piece and each write with 100 bytes around, and a few holes.
fn windows(case: &Case, writes: &Writes) -> Vec<(u64, usize)> {
    let mut windows = Vec::new();
    for (start, data) in case.pieces.iter().chain(writes.iter()) {
        let from = start.saturating_sub(100);
        let to = (start + data.len() as u64 + 100).min(case.len);
        windows.push((from, (to - from) as usize));
    }
    for hole in [case.len / 3, case.len / 2 + 12_345, case.len - 70_000] {
        windows.push((hole, 65_536));
    }
    windows
}

fn check_windows(uri: &str, case: &Case, writes: &Writes, when: &str) {
    let windows = windows(case, writes);
    let got = nbd_pread_many(uri, &windows);
    for ((offset, len), bytes) in windows.iter().zip(got) {
        assert_bytes_eq(
            &bytes,
            &expected_window(case, writes, *offset, *len),
            &format!("{when}: pread {len}@{offset}"),
        );
    }
}

fn check_large_sparse_file(case: Case, name: &str) {
    let dir = TestDir::new(name);
    let sparse = SparseFile {
        len: case.len,
        pieces: case.pieces.clone(),
    };
    let image = ImageBuilder::new(case.fs)
        .block_size(case.block_size)
        .size(32 * MIB)
        .file("/neighbour", &random_bytes(1, 100_000))
        .sparse_file("/large", &sparse)
        .build(&dir, "fs.img");
    let plugin_args = ["file", image.to_str().unwrap(), "ext2file=/large"];

    let mut server = Server::start(&dir, &[], &plugin_args);
    assert_eq!(nbd_size(&server.uri()), case.len);
    check_windows(&server.uri(), &case, &[], "before writes");
    let writes = planned_writes(&case);
    nbd_pwrite_many(&server.uri(), &writes, WriteFlush::Flush);
    check_windows(&server.uri(), &case, &writes, "after writes");
    server.stop();

    let mut server = Server::start(&dir, &[], &plugin_args);
    assert_eq!(nbd_size(&server.uri()), case.len);
    check_windows(&server.uri(), &case, &writes, "after a server restart");
    server.stop();

    // Independent check: each written block is where debugfs says, with the right bytes.
    let image_bytes = read_file(&image);
    let bs = case.block_size as u64;
    for (offset, data) in &writes {
        for logical in [offset / bs, (offset + data.len() as u64 - 1) / bs] {
            let physical = debugfs_bmap(&image, "/large", logical)
                .unwrap_or_else(|| panic!("logical block {logical} is still a hole"));
            let on_disk = &image_bytes[(physical * bs) as usize..((physical + 1) * bs) as usize];
            let file_end = ((logical + 1) * bs).min(case.len);
            let expected = expected_window(
                &case,
                &writes,
                logical * bs,
                (file_end - logical * bs) as usize,
            );
            assert_bytes_eq(
                &on_disk[..expected.len()],
                &expected,
                &format!("image block {physical} (logical {logical})"),
            );
        }
    }
    assert_bytes_eq(
        &debugfs_dump(&image, "/neighbour"),
        &random_bytes(1, 100_000),
        "/neighbour",
    );
    e2fsck_clean(&image);
}

/// The writes of a case, derived from its length and mapping boundaries.
fn planned_writes(case: &Case) -> Vec<(u64, Vec<u8>)> {
    let bs = case.block_size as u64;
    let per_block = bs / 4;
    let tind_start = (12 + per_block + per_block * per_block) * bs;
    let mut writes = vec![
        (case.len / 2 + 3, random_bytes(10, 5000)),
        (case.len - 1, vec![0x99]),
    ];
    if case.fs != FsType::Ext4 {
        writes.push((tind_start - 1, vec![0x12, 0x34]));
        writes.push((tind_start + 70 * bs + 11, random_bytes(11, 3 * bs as usize)));
    } else {
        writes.push(((1 << 32) + 1, random_bytes(12, 5000)));
        writes.push((600 * (1 << 30) + 12_345, random_bytes(13, 70_000)));
        writes.push((case.len - 5000, random_bytes(14, 4000)));
    }
    writes
}

#[test]
fn one_tib_file_ext4() {
    let len = (1u64 << 40) + 5;
    check_large_sparse_file(
        Case {
            fs: FsType::Ext4,
            block_size: 4096,
            len,
            pieces: vec![
                (0, random_bytes(2, 5000)),
                (len - 3005, random_bytes(3, 3000)),
            ],
        },
        "one_tib_file_ext4",
    );
}

#[test]
fn triple_indirect_ext2_1k() {
    check_large_sparse_file(
        Case {
            fs: FsType::Ext2,
            block_size: 1024,
            len: 100 * MIB + 7,
            pieces: vec![
                (0, random_bytes(4, 3000)),
                (80 * MIB, random_bytes(5, 5000)),
            ],
        },
        "triple_indirect_ext2_1k",
    );
}

#[test]
fn triple_indirect_ext3_1k() {
    check_large_sparse_file(
        Case {
            fs: FsType::Ext3,
            block_size: 1024,
            len: 100 * MIB + 7,
            pieces: vec![
                (0, random_bytes(6, 3000)),
                (80 * MIB, random_bytes(7, 5000)),
            ],
        },
        "triple_indirect_ext3_1k",
    );
}

#[test]
fn triple_indirect_ext2_4k() {
    check_large_sparse_file(
        Case {
            fs: FsType::Ext2,
            block_size: 4096,
            len: 5 * 1024 * MIB + 3,
            pieces: vec![
                (0, random_bytes(8, 5000)),
                (4800 * MIB, random_bytes(9, 5000)),
            ],
        },
        "triple_indirect_ext2_4k",
    );
}
