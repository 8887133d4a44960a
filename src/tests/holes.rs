//! Writes into holes under concurrency: several writers of one file at
//! once, links made in place while others write and read, flushes racing
//! writes.  Each ends judged by e2fsck and the file's bytes.

use std::sync::Arc;
use std::thread;

use super::*;

/// A 4 KiB-block ext4 image with a sparse file `/f` of `size` bytes.
fn sparse(size: u64, args: &[&str]) -> Arc<MemDevice> {
    image(args, "64M", &[("/f", Content::Sparse(size, vec![]))])
}

/// Shuts `server` down and checks the image and `/f` against `expected`.
fn check_after_shutdown(server: Server, bytes: &MemDevice, expected: &[u8]) {
    server.shutdown();
    let after = bytes.snapshot();
    assert_fsck_clean(&after);
    assert_eq!(
        dump(&after, "/f"),
        expected,
        "the file's bytes after shutdown"
    );
}

#[test]
fn writers_into_different_holes_run_at_once() {
    let size: u64 = 8 << 20;
    let bytes = sparse(size, &["-t", "ext4", "-b", "4096"]);
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    let writers = 4;
    thread::scope(|s| {
        for w in 0..writers {
            let conn = connect(&server, false, "");
            s.spawn(move || {
                // Interleaved 4 KiB blocks: every writer's holes border
                // another writer's.
                for i in 0..256u64 {
                    let block = i * writers + w;
                    conn.pwrite(&pattern(4096, block as u8), block * 4096, false)
                        .unwrap();
                }
            });
        }
    });
    let mut expected = vec![0u8; size as usize];
    for block in 0..256 * writers {
        let at = (block * 4096) as usize;
        expected[at..at + 4096].copy_from_slice(&pattern(4096, block as u8));
    }
    let conn = connect(&server, false, "");
    assert_eq!(read(&conn, 0, size as usize), expected);
    drop(conn);
    check_after_shutdown(server, &bytes, &expected);
}

#[test]
fn writers_into_the_same_hole_take_turns() {
    let size: u64 = 1 << 20;
    let bytes = sparse(size, &["-t", "ext4", "-b", "4096"]);
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    thread::scope(|s| {
        for w in 0..4u8 {
            let conn = connect(&server, false, "");
            s.spawn(move || {
                for round in 0..50u64 {
                    // Every writer writes the same 3 blocks, whole.
                    conn.pwrite(&[w; 12288], (round % 5) * 12288, false)
                        .unwrap();
                }
            });
        }
    });
    let conn = connect(&server, false, "");
    let got = read(&conn, 0, size as usize);
    // Each written run holds one writer's bytes whole: no torn block, no
    // block of zeroes where a write landed.
    for run in got[..5 * 12288].chunks(12288) {
        assert!(run.iter().all(|&b| b == run[0]), "a torn write");
        assert!(run[0] < 4);
    }
    assert!(got[5 * 12288..].iter().all(|&b| b == 0));
    drop(conn);
    check_after_shutdown(server, &bytes, &got);
}

#[test]
fn links_in_place_while_others_write_and_read() {
    // More writes into holes than wait before a writer links them
    // (`LINK_AT`), each an extent of its own, with readers going on.
    let blocks: u64 = 2 * ext2_rs::txn::LINK_AT as u64 + 500;
    let size = blocks * 2 * 1024;
    let bytes = sparse(size, &["-t", "ext4", "-b", "1024"]);
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    let writers = 2u64;
    thread::scope(|s| {
        for w in 0..writers {
            let conn = connect(&server, false, "");
            s.spawn(move || {
                // Every other block, so that no two extents merge.
                let mut i = w;
                while i < blocks {
                    conn.pwrite(&pattern(1024, i as u8), i * 2048, false)
                        .unwrap();
                    i += writers;
                }
            });
        }
        let reader = connect(&server, true, "");
        s.spawn(move || {
            for round in 0..200u64 {
                let i = (round * 97) % blocks;
                let got = read(&reader, i * 2048, 2048);
                // A block not written yet reads as zeroes; one written
                // reads whole; the gap after it always as zeroes.
                assert!(got[..1024] == pattern(1024, i as u8)[..] || got[..1024] == [0u8; 1024]);
                assert!(got[1024..].iter().all(|&b| b == 0));
            }
        });
    });
    let mut expected = vec![0u8; size as usize];
    for i in 0..blocks {
        let at = (i * 2048) as usize;
        expected[at..at + 1024].copy_from_slice(&pattern(1024, i as u8));
    }
    let conn = connect(&server, false, "");
    assert_eq!(read(&conn, 0, size as usize), expected);
    drop(conn);
    check_after_shutdown(server, &bytes, &expected);
}

#[test]
fn flushes_racing_writes_leave_every_flushed_write_durable() {
    let size: u64 = 4 << 20;
    let bytes = sparse(size, &["-t", "ext4", "-b", "4096"]);
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    let flusher = connect(&server, false, "");
    let done = std::sync::atomic::AtomicBool::new(false);
    thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                flusher.flush().unwrap();
            }
        });
        for i in 0..300u64 {
            conn.pwrite(&pattern(4096, i as u8), (i * 3 % 1024) * 4096, false)
                .unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    conn.flush().unwrap();
    let mut expected = vec![0u8; size as usize];
    for i in 0..300u64 {
        let at = ((i * 3 % 1024) * 4096) as usize;
        expected[at..at + 4096].copy_from_slice(&pattern(4096, i as u8));
    }
    // After the last flush, a crash keeps everything: replay and compare.
    let crashed = bytes.snapshot();
    let recovered = recovered(&crashed);
    assert_eq!(dump(&recovered, "/f"), expected);
    drop(conn);
    drop(flusher);
    check_after_shutdown(server, &bytes, &expected);
}

#[test]
fn a_hole_larger_than_one_change_is_filled_in_chunks() {
    let size: u64 = 16 << 20;
    let bytes = sparse(size, &["-t", "ext4", "-b", "1024"]);
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    // 3 MiB at once: three thousand 1 KiB blocks, more than one change.
    let data = pattern(3 << 20, 9);
    conn.pwrite(&data, 1 << 20, false).unwrap();
    let mut expected = vec![0u8; size as usize];
    expected[1 << 20..4 << 20].copy_from_slice(&data);
    assert_eq!(read(&conn, 0, size as usize), expected);
    drop(conn);
    check_after_shutdown(server, &bytes, &expected);
}

#[test]
fn a_full_filesystem_fails_writes_with_enospc_and_stays_consistent() {
    let size: u64 = 64 << 20;
    let bytes = image(
        &["-t", "ext4", "-b", "4096"],
        "16M",
        &[("/f", Content::Sparse(size, vec![]))],
    );
    let server = serve(device_over(&bytes), &[("ext2file", "/f")]);
    let conn = connect(&server, false, "");
    let chunk = pattern(1 << 20, 1);
    let mut written = 0u64;
    let err = loop {
        match conn.pwrite(&chunk, written, false) {
            Ok(()) => written += 1 << 20,
            Err(e) => break e,
        }
        assert!(written < size, "a 16 MiB filesystem took 64 MiB");
    };
    assert_eq!(err.errno(), ext2_rs::error::Errno::ENOSPC);
    assert!(written >= 4 << 20, "only {written} bytes fit");
    // What was written reads back.
    for at in (0..written).step_by(1 << 20) {
        assert_eq!(read(&conn, at, 1 << 20), chunk);
    }
    drop(conn);
    server.shutdown();
    assert_fsck_clean(&bytes.snapshot());
}

use crate::server::Server;
