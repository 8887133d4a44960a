//! The upgrade to read-write: only a connection that may write opens the
//! device for writing, once however many ask at once; what stays
//! read-only says why and writes nothing.

use std::sync::Arc;
use std::thread;

use super::*;
use crate::device::Capabilities;

fn small() -> Arc<MemDevice> {
    image(
        &["-t", "ext4"],
        "8M",
        &[("/f", Content::Bytes(pattern(100_000, 1)))],
    )
}

#[test]
fn read_only_connections_never_open_the_device_for_writing() {
    let bytes = small();
    let original = bytes.snapshot();
    let device = device_over(&bytes);
    let server = serve(device.clone(), &[("ext2file", "/f")]);
    for _ in 0..3 {
        let conn = connect(&server, true, "");
        assert!(!conn.can_write().unwrap());
        assert_eq!(read(&conn, 0, 100_000), pattern(100_000, 1));
    }
    server.shutdown();
    assert!(!device.opened_writable());
    assert!(bytes.snapshot() == original, "a read-only server wrote");
}

#[test]
fn concurrent_writable_connections_open_the_device_once() {
    let bytes = small();
    let device = device_over(&bytes);
    let server = serve(device.clone(), &[("ext2file", "/f")]);
    thread::scope(|s| {
        for i in 0..6u8 {
            let server = &server;
            s.spawn(move || {
                let conn = connect(server, false, "");
                assert!(conn.can_write().unwrap());
                conn.pwrite(&[i; 1000], u64::from(i) * 1000, false).unwrap();
            });
        }
    });
    assert_eq!(device.reopens(), 1);
    let conn = connect(&server, true, "");
    for i in 0..6u8 {
        assert_eq!(read(&conn, u64::from(i) * 1000, 1000), vec![i; 1000]);
    }
    drop(conn);
    server.shutdown();
    assert_fsck_clean(&bytes.snapshot());
}

#[test]
fn a_device_that_cannot_write_serves_read_only() {
    let bytes = small();
    let original = bytes.snapshot();
    let device = Arc::new(MemoryDevice::with_capabilities(
        bytes.clone(),
        Capabilities {
            can_flush: true,
            ..Capabilities::default()
        },
    ));
    let server = serve(device, &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    assert!(!conn.can_write().unwrap());
    assert_eq!(
        conn.pwrite(&[1], 0, false).unwrap_err().errno(),
        ext2_rs::error::Errno::EROFS
    );
    conn.flush().unwrap();
    drop(conn);
    server.shutdown();
    assert!(
        bytes.snapshot() == original,
        "a read-only device was written"
    );
}

/// `dumpe2fs -h`'s "Filesystem state:" of `bytes`.
fn state(bytes: &[u8]) -> String {
    let dir = TempDir::new();
    let img = dir.path().join("s.img");
    std::fs::write(&img, bytes).unwrap();
    let (_, text) = run_on("dumpe2fs", &["-h"], &img);
    text.lines()
        .find_map(|l| l.strip_prefix("Filesystem state:"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn without_a_journal_the_image_is_not_clean_while_metadata_is_in_flight() {
    let bytes = image(
        &["-t", "ext2"],
        "8M",
        &[("/f", Content::Sparse(1 << 20, vec![]))],
    );
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    conn.pwrite(&pattern(5000, 3), 70_000, false).unwrap();
    // As the kernel: boot's fsck checks an image whose metadata a crash
    // may have left half written (the background commit wrote some)...
    std::thread::sleep(crate::volume::committer::INTERVAL * 3);
    assert_eq!(state(&bytes.snapshot()), "not clean");
    // ...and not one a flush left consistent.
    conn.flush().unwrap();
    assert_eq!(state(&bytes.snapshot()), "clean");
    drop(conn);
    server.shutdown();
    let after = bytes.snapshot();
    assert_eq!(state(&after), "clean");
    assert_fsck_clean(&after);
}

/// An image whose journal holds a transaction that writes `data` at
/// `offset` of `/f`: written through the filter, committed to the journal
/// in the background, then the power cut before shutdown.
fn needing_recovery(offset: u64, data: &[u8]) -> Arc<MemDevice> {
    // Unwritten blocks: a write turns them into data in a metadata change
    // at once (writes into holes would wait to be linked).
    let bytes = image_with(
        &["-t", "ext4", "-b", "4096"],
        "16M",
        &[("/f", Content::Bytes(Vec::new()))],
        &["fallocate /f 0 255", "sif /f size 1048576"],
    );
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    conn.pwrite(data, offset, false).unwrap();
    // The background commit journals the change; nothing writes it home.
    std::thread::sleep(crate::volume::committer::INTERVAL * 3);
    let crashed = Arc::new(MemDevice::new(bytes.snapshot()));
    let dir = TempDir::new();
    let img = dir.path().join("r.img");
    std::fs::write(&img, crashed.snapshot()).unwrap();
    let (_, text) = run_on("dumpe2fs", &["-h"], &img);
    assert!(
        text.contains("needs_recovery"),
        "no journal to recover:\n{text}"
    );
    drop(conn);
    server.shutdown();
    crashed
}

#[test]
fn a_journal_needing_recovery_is_replayed_in_memory_and_served_read_only() {
    let data = pattern(12_345, 6);
    let bytes = needing_recovery(300_000, &data);
    let original = bytes.snapshot();
    let device = device_over(&bytes);
    let server = serve(device.clone(), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    assert!(!conn.can_write().unwrap());
    assert_eq!(read(&conn, 300_000, data.len()), data);
    drop(conn);
    server.shutdown();
    assert!(bytes.snapshot() == original, "the memory replay wrote");
}

#[test]
fn ext2journal_replay_writes_the_journal_and_serves_read_write() {
    let data = pattern(12_345, 7);
    let bytes = needing_recovery(300_000, &data);
    let server = serve(
        device_over(&bytes),
        &[("ext2file", "/f"), ("ext2journal", "replay")],
    );
    let conn = connect(&server, false, "");
    assert!(conn.can_write().unwrap());
    assert_eq!(read(&conn, 300_000, data.len()), data);
    conn.pwrite(&pattern(4096, 8), 0, false).unwrap();
    drop(conn);
    server.shutdown();
    let after = bytes.snapshot();
    assert_fsck_clean(&after);
    let got = dump(&after, "/f");
    assert_eq!(got[300_000..300_000 + data.len()], data[..]);
    assert_eq!(got[..4096], pattern(4096, 8)[..]);
}
