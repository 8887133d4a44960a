//! Writing served files: bytes as written, the filesystem as e2fsck wants
//! it after shutdown and after a flush, blocks freed by trim and zero.

use std::sync::Arc;

use super::*;
use crate::file::Status;
use ext2_rs::error::Errno;

/// Writes `writes` through a connection to `/f` (made by `files`), shuts
/// down, and checks the image and the file's bytes against `expected`.
fn write_then_check(args: &[&str], initial: Content, size: usize, writes: &[(u64, Vec<u8>)]) {
    let mut expected = match &initial {
        Content::Bytes(b) => b.clone(),
        Content::Sparse(len, parts) => {
            let mut v = vec![0u8; *len as usize];
            for (o, b) in parts {
                v[*o as usize..*o as usize + b.len()].copy_from_slice(b);
            }
            v
        }
        _ => unreachable!(),
    };
    assert_eq!(expected.len(), size);
    let bytes = image(args, "16M", &[("/f", initial)]);
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    assert!(conn.can_write().unwrap());
    for (offset, data) in writes {
        conn.pwrite(data, *offset, false).unwrap();
        expected[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    assert_eq!(read(&conn, 0, size), expected);
    drop(conn);
    server.shutdown();
    let after = bytes.snapshot();
    assert_fsck_clean(&after);
    assert_eq!(dump(&after, "/f"), expected);
}

fn scattered_writes(size: usize) -> Vec<(u64, Vec<u8>)> {
    let mut rng = ext2_rs::testing::Rng::new(7);
    (0..40)
        .map(|i| {
            let len = 1 + rng.below(20_000) as usize;
            let offset = rng.below((size - len) as u64);
            (offset, pattern(len, i))
        })
        .collect()
}

#[test]
fn writes_into_allocated_blocks_ext4() {
    let size = 2 << 20;
    write_then_check(
        &["-t", "ext4"],
        Content::Bytes(pattern(size, 1)),
        size,
        &scattered_writes(size),
    );
}

#[test]
fn writes_into_holes_ext4() {
    let size = 4 << 20;
    write_then_check(
        &["-t", "ext4"],
        Content::Sparse(size as u64, vec![(1 << 20, pattern(4096, 2))]),
        size,
        &scattered_writes(size),
    );
}

#[test]
fn writes_into_holes_ext4_1k_blocks() {
    let size = 3 << 20;
    write_then_check(
        &["-t", "ext4", "-b", "1024"],
        Content::Sparse(size as u64, vec![]),
        size,
        &scattered_writes(size),
    );
}

#[test]
fn writes_into_holes_ext3_indirect() {
    let size = 2 << 20;
    write_then_check(
        &["-t", "ext3", "-b", "1024"],
        Content::Sparse(size as u64, vec![(5000, pattern(3000, 1))]),
        size,
        &scattered_writes(size),
    );
}

#[test]
fn writes_into_holes_ext2_no_journal() {
    let size = 2 << 20;
    write_then_check(
        &["-t", "ext2"],
        Content::Sparse(size as u64, vec![]),
        size,
        &scattered_writes(size),
    );
}

#[test]
fn writes_into_holes_bigalloc() {
    let size = 2 << 20;
    write_then_check(
        &["-t", "ext4", "-O", "bigalloc", "-C", "16384"],
        Content::Sparse(size as u64, vec![]),
        size,
        &scattered_writes(size),
    );
}

#[test]
fn writes_into_unwritten_extents() {
    let size: usize = 1 << 20;
    let bytes = image_with(
        &["-t", "ext4", "-b", "4096"],
        "8M",
        &[("/u", Content::Bytes(Vec::new()))],
        &["fallocate /u 0 255", "sif /u size 1048576"],
    );
    let server = serve(device_over(&bytes), &[("ext2file", "/u")]);
    let conn = connect(&server, false, "");
    assert_eq!(
        conn.status(0, size as u64).unwrap(),
        vec![(size as u64, Status::Zero)]
    );
    let data = pattern(10_000, 3);
    conn.pwrite(&data, 100_000, false).unwrap();
    let mut expected = vec![0u8; size];
    expected[100_000..110_000].copy_from_slice(&data);
    assert_eq!(read(&conn, 0, size), expected);
    drop(conn);
    server.shutdown();
    let after = bytes.snapshot();
    assert_fsck_clean(&after);
    assert_eq!(dump(&after, "/u"), expected);
}

#[test]
fn flushed_writes_into_holes_survive_a_crash() {
    let size: u64 = 2 << 20;
    let bytes = image(
        &["-t", "ext4"],
        "16M",
        &[("/f", Content::Sparse(size, vec![]))],
    );
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    let data = pattern(300_000, 8);
    conn.pwrite(&data, 123_456, false).unwrap();
    conn.flush().unwrap();
    // The power goes: no shutdown.  The journal replay recovers it.
    let crashed = bytes.snapshot();
    let dir = TempDir::new();
    let state = crash_judge::CrashState {
        durable: 0,
        kept: 0,
        pieces: 0,
        image: crashed,
    };
    let mut history = crash_judge::judge::FileHistory::new("/f", vec![0u8; size as usize]);
    history.write(123_456, &data);
    history.flush(0);
    crash_judge::judge::judge(
        &state,
        dir.path(),
        crash_judge::judge::Recovery::JournalReplay,
        &[history],
    )
    .unwrap();
    drop(conn);
    server.shutdown();
}

#[test]
fn a_fua_write_into_a_hole_is_durable_without_a_flush() {
    let size: u64 = 1 << 20;
    let bytes = image(
        &["-t", "ext4"],
        "16M",
        &[("/f", Content::Sparse(size, vec![]))],
    );
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    let data = pattern(8192, 4);
    conn.pwrite(&data, 65536, true).unwrap();
    let crashed = bytes.snapshot();
    let recovered = recovered(&crashed);
    assert_eq!(dump(&recovered, "/f")[65536..65536 + 8192], data[..]);
    drop(conn);
    server.shutdown();
}

#[test]
fn trim_frees_whole_blocks_and_reads_zeroes() {
    let size = 4 << 20;
    let bytes = image(
        &["-t", "ext4", "-b", "4096"],
        "16M",
        &[("/f", Content::Bytes(pattern(size, 5)))],
    );
    let before = free_blocks(&bytes.snapshot());
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    assert!(conn.can_trim().unwrap());
    conn.trim(1 << 20, 2 << 20, false).unwrap();
    assert!(read(&conn, 1 << 20, 2 << 20).iter().all(|&b| b == 0));
    assert_eq!(
        conn.status(1 << 20, 2 << 20).unwrap(),
        vec![(2 << 20, Status::Hole)]
    );
    drop(conn);
    server.shutdown();
    let after = bytes.snapshot();
    assert_fsck_clean(&after);
    assert_eq!(free_blocks(&after), before + 512);
    let mut expected = pattern(size, 5);
    expected[1 << 20..3 << 20].fill(0);
    assert_eq!(dump(&after, "/f"), expected);
}

#[test]
fn zero_with_may_trim_frees_and_without_writes_zeroes() {
    let size = 1 << 20;
    let bytes = image(
        &["-t", "ext4", "-b", "4096"],
        "16M",
        &[("/f", Content::Bytes(pattern(size, 6)))],
    );
    let before = free_blocks(&bytes.snapshot());
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    // Unaligned: the partial blocks at the edges are zeroed in place.
    conn.zero(1000, 100_000, true, false, false).unwrap();
    conn.zero(500_000, 8192, false, false, false).unwrap();
    let mut expected = pattern(size, 6);
    expected[1000..101_000].fill(0);
    expected[500_000..508_192].fill(0);
    assert_eq!(read(&conn, 0, size), expected);
    drop(conn);
    server.shutdown();
    let after = bytes.snapshot();
    assert_fsck_clean(&after);
    // Blocks 1..24 were whole inside the first range.
    assert_eq!(free_blocks(&after), before + 23);
    assert_eq!(dump(&after, "/f"), expected);
}

#[test]
fn fast_zero_over_data_fails_before_changing_anything_without_device_support() {
    let size = 1 << 20;
    let bytes = image(
        &["-t", "ext4"],
        "16M",
        &[("/f", Content::Bytes(pattern(size, 7)))],
    );
    let device = Arc::new(MemoryDevice::with_capabilities(
        bytes.clone(),
        crate::device::Capabilities {
            can_write: true,
            can_flush: true,
            native_fua: false,
            can_fast_zero: false,
            can_trim: false,
        },
    ));
    let server = serve(device, &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    let err = conn.zero(100, 5000, false, true, false).unwrap_err();
    assert_eq!(err.errno(), Errno::ENOTSUP);
    assert_eq!(read(&conn, 0, size), pattern(size, 7));
}

#[test]
fn the_size_stays_the_inode_size() {
    let bytes = image(
        &["-t", "ext4"],
        "8M",
        &[("/f", Content::Bytes(pattern(10_000, 1)))],
    );
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    conn.pwrite(&[0xAA; 100], 9_900, false).unwrap();
    assert_eq!(conn.size().unwrap(), 10_000);
    drop(conn);
    server.shutdown();
    let after = bytes.snapshot();
    assert_fsck_clean(&after);
    let got = dump(&after, "/f");
    assert_eq!(got.len(), 10_000);
    assert!(got[9_900..].iter().all(|&b| b == 0xAA));
}

#[test]
fn an_immutable_file_is_served_read_only() {
    let bytes = image_with(
        &["-t", "ext4"],
        "8M",
        &[("/f", Content::Bytes(pattern(5000, 1)))],
        &["set_inode_field /f flags 0x80010"],
    );
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    assert!(!conn.can_write().unwrap());
    let err = conn.pwrite(&[1, 2, 3], 0, false).unwrap_err();
    assert_eq!(err.errno(), Errno::EROFS);
    assert_eq!(read(&conn, 0, 5000), pattern(5000, 1));
}

#[test]
fn an_encrypted_file_is_refused() {
    let bytes = image_with(
        &["-t", "ext4"],
        "8M",
        &[("/f", Content::Bytes(pattern(5000, 1)))],
        &["set_inode_field /f flags 0x80800"],
    );
    let result = Server::start(config(&[("ext2file", "/f")]), device_over(&bytes));
    let msg = result.err().expect("refused").to_string();
    assert!(msg.contains("/f"), "{msg}");
}

#[test]
fn a_read_only_feature_serves_read_only() {
    let bytes = image_with(
        &["-t", "ext4"],
        "8M",
        &[("/f", Content::Bytes(pattern(5000, 1)))],
        &["feature shared_blocks"],
    );
    let device = device_over(&bytes);
    let server = serve(device.clone(), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    assert!(!conn.can_write().unwrap());
    assert!(
        !device.opened_writable(),
        "a read-only filesystem opened the plugin writable"
    );
    assert_eq!(read(&conn, 0, 5000), pattern(5000, 1));
}

#[test]
fn requests_after_shutdown_fail_with_eshutdown() {
    let bytes = image(
        &["-t", "ext4"],
        "8M",
        &[("/f", Content::Bytes(pattern(5000, 1)))],
    );
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    server.shutdown();
    let mut buf = [0u8; 10];
    assert_eq!(
        conn.pread(&mut buf, 0).unwrap_err().errno(),
        Errno::ESHUTDOWN
    );
    assert!(conn.pwrite(&[1], 4999, false).is_err());
    assert!(conn.flush().is_err());
}

use crate::server::Server;
