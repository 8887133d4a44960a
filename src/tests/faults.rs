//! A device that fails: the request fails, nothing is lost, nothing is
//! left half done, and the server goes on.

use std::sync::Arc;

use super::*;
use crate::device::memory::Faults;

fn sparse_file(size: u64) -> Arc<MemDevice> {
    image(
        &["-t", "ext4", "-b", "4096"],
        "32M",
        &[("/f", Content::Sparse(size, vec![(0, pattern(4096, 1))]))],
    )
}

#[test]
fn a_failed_write_into_a_hole_frees_its_blocks() {
    let bytes = image(
        &["-t", "ext4", "-b", "4096"],
        "16M",
        &[("/f", Content::Sparse(64 << 20, vec![(0, pattern(4096, 1))]))],
    );
    let free = free_blocks(&bytes.snapshot()) * 4096;
    let device = device_over(&bytes);
    let server = serve(device.clone(), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    // Every data write fails: the blocks reserved for the holes, more in
    // all than the filesystem has free, must go back each time.
    device.set_faults(Faults {
        write_ranges: std::iter::once(0..bytes.size()).collect(),
        ..Faults::default()
    });
    let chunk = pattern(1 << 20, 2);
    for i in 1..=20u64 {
        assert!(conn.pwrite(&chunk, i << 20, false).is_err());
    }
    device.set_faults(Faults::default());
    // The failed writes left holes.
    assert!(read(&conn, 1 << 20, 20 << 20).iter().all(|&b| b == 0));
    // And the space they took is free again: the filesystem fills up.
    let mut written = 0u64;
    while conn.pwrite(&chunk, (32 << 20) + written, false).is_ok() {
        written += 1 << 20;
    }
    assert!(
        written + (2 << 20) >= free,
        "only {written} of {free} free bytes could be written: failed writes leaked blocks"
    );
    conn.flush().unwrap();
    drop(conn);
    server.shutdown();
    assert_fsck_clean(&bytes.snapshot());
}

#[test]
fn a_failing_flush_fails_and_the_next_one_succeeds() {
    let size: u64 = 1 << 20;
    let bytes = sparse_file(size);
    let device = device_over(&bytes);
    let server = serve(device.clone(), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    let data = pattern(8192, 3);
    conn.pwrite(&data, 40960, false).unwrap();
    device.set_faults(Faults {
        flush: true,
        ..Faults::default()
    });
    assert!(conn.flush().is_err(), "a failed flush was reported as done");
    device.set_faults(Faults::default());
    conn.flush().unwrap();
    let mut expected = vec![0u8; size as usize];
    expected[..4096].copy_from_slice(&pattern(4096, 1));
    expected[40960..40960 + 8192].copy_from_slice(&data);
    // A crash now keeps the write: replay and compare.
    let recovered = recovered(&bytes.snapshot());
    assert_eq!(dump(&recovered, "/f"), expected);
    drop(conn);
    server.shutdown();
}

#[test]
fn writes_through_a_flaky_device_never_corrupt_the_filesystem() {
    let size: u64 = 4 << 20;
    let bytes = sparse_file(size);
    let device = device_over(&bytes);
    let server = serve(device.clone(), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    device.set_faults(Faults {
        every_nth_write: Some(7),
        ..Faults::default()
    });
    let mut rng = ext2_rs::testing::Rng::new(3);
    let mut failed = 0;
    for i in 0..400u64 {
        let offset = rng.below(size / 4096 - 4) * 4096 + rng.below(4096);
        let len = 1 + rng.below(12_000) as usize;
        let result = match i % 10 {
            0 => conn.trim(offset, len as u64, false),
            1 => conn.zero(offset, len as u64, true, false, false),
            2 => conn.flush(),
            _ => conn.pwrite(&pattern(len, i as u8), offset, false),
        };
        failed += usize::from(result.is_err());
    }
    assert!(failed > 0, "the device never failed");
    device.set_faults(Faults::default());
    // Whatever failed, the server still serves: a write, a read, a flush.
    conn.pwrite(&pattern(4096, 77), 0, false).unwrap();
    assert_eq!(read(&conn, 0, 4096), pattern(4096, 77));
    conn.flush().unwrap();
    let seen = read(&conn, 0, size as usize);
    drop(conn);
    server.shutdown();
    let after = bytes.snapshot();
    assert_fsck_clean(&after);
    assert_eq!(dump(&after, "/f"), seen, "what was served is what was kept");
}

#[test]
fn a_failing_read_at_start_stops_the_start_cleanly() {
    let bytes = sparse_file(1 << 20);
    // The superblock cannot be read.
    bytes.set_faults(ext2_rs::testing::Faults::failing_reads(1024..2048));
    let result = crate::server::Server::start(config(&[("ext2file", "/f")]), device_over(&bytes));
    assert!(result.is_err());
}

#[test]
fn a_failing_read_write_open_fails_the_connection_and_the_next_retries() {
    let bytes = sparse_file(1 << 20);
    let device = device_over(&bytes);
    let server = serve(device.clone(), &[("ext2file", "/f")]);
    device.set_faults(Faults {
        open_writable: Some(ext2_rs::error::Errno::EIO),
        ..Faults::default()
    });
    assert!(server.connect(false, "").is_err());
    // Read-only connections go on meanwhile.
    assert_eq!(read(&connect(&server, true, ""), 0, 4096), pattern(4096, 1));
    device.set_faults(Faults::default());
    let conn = connect(&server, false, "");
    assert!(conn.can_write().unwrap());
    conn.pwrite(&pattern(4096, 5), 8192, false).unwrap();
    drop(conn);
    server.shutdown();
    assert_fsck_clean(&bytes.snapshot());
}
