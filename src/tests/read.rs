//! Serving files read-only: what a client reads, what it is refused, and
//! that reading never opens the device for writing.

use std::sync::Arc;

use super::*;
use crate::file::Status;
use crate::server::Server;

fn one_file(args: &[&str], len: usize) -> (Arc<MemoryDevice>, Vec<u8>) {
    let data = pattern(len, 3);
    let bytes = image(
        args,
        "8M",
        &[("/disks/disk.img", Content::Bytes(data.clone()))],
    );
    (device_over(&bytes), data)
}

fn reads_whole_file(args: &[&str]) {
    let (device, data) = one_file(args, 1_234_567);
    let server = serve(device.clone(), &[("ext2file", "/disks/disk.img")]);
    let conn = connect(&server, true, "");
    assert_eq!(conn.size().unwrap(), data.len() as u64);
    assert_eq!(read(&conn, 0, data.len()), data);
    // Unaligned pieces across block boundaries.
    for (offset, len) in [(1, 1), (1023, 2), (4095, 4099), (1_000_000, 234_567)] {
        assert_eq!(
            read(&conn, offset, len),
            data[offset as usize..offset as usize + len]
        );
    }
    server.shutdown();
    assert!(
        !device.opened_writable(),
        "reads opened the device writable"
    );
}

#[test]
fn ext4_file_reads_byte_exact() {
    reads_whole_file(&["-t", "ext4"]);
}

#[test]
fn ext4_1k_blocks_file_reads_byte_exact() {
    reads_whole_file(&["-t", "ext4", "-b", "1024"]);
}

#[test]
fn ext3_indirect_file_reads_byte_exact() {
    reads_whole_file(&["-t", "ext3", "-b", "1024"]);
}

#[test]
fn ext2_file_reads_byte_exact() {
    reads_whole_file(&["-t", "ext2"]);
}

#[test]
fn sparse_file_reads_zeroes_and_reports_holes() {
    let data = pattern(8192, 9);
    let bytes = image(
        &["-t", "ext4"],
        "8M",
        &[(
            "/sparse",
            Content::Sparse(1 << 20, vec![(512 << 10, data.clone())]),
        )],
    );
    let server = serve(device_over(&bytes), &[("ext2file", "/sparse")]);
    let conn = connect(&server, true, "");
    let all = read(&conn, 0, 1 << 20);
    assert!(all[..512 << 10].iter().all(|&b| b == 0));
    assert_eq!(all[512 << 10..(512 << 10) + 8192], data[..]);
    assert!(all[(512 << 10) + 8192..].iter().all(|&b| b == 0));
    let status = conn.status(0, 1 << 20).unwrap();
    assert_eq!(
        status,
        vec![
            (512 << 10, Status::Hole),
            (8192, Status::Data),
            ((1 << 20) - (512 << 10) - 8192, Status::Hole)
        ]
    );
}

#[test]
fn symlinks_are_followed() {
    let data = pattern(10_000, 1);
    let bytes = image(
        &["-t", "ext4"],
        "8M",
        &[
            ("/real/file", Content::Bytes(data.clone())),
            ("/link", Content::Symlink("real/file")),
        ],
    );
    let server = serve(device_over(&bytes), &[("ext2file", "/link")]);
    let conn = connect(&server, true, "");
    assert_eq!(read(&conn, 0, data.len()), data);
}

fn start_error(bytes: &Arc<MemDevice>, file: &str) -> String {
    match Server::start(config(&[("ext2file", file)]), device_over(bytes)) {
        Ok(_) => panic!("{file}: the server started"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_missing_file_stops_the_start_with_namei() {
    let bytes = image(&["-t", "ext4"], "4M", &[("/a", Content::Bytes(vec![1]))]);
    let msg = start_error(&bytes, "/nonexistent");
    assert!(msg.contains("/nonexistent: namei"), "{msg}");
}

#[test]
fn a_directory_is_refused() {
    let bytes = image(&["-t", "ext4"], "4M", &[("/dir", Content::Dir)]);
    let msg = start_error(&bytes, "/dir");
    assert!(
        msg.contains("/dir: must be a regular file in the disk image"),
        "{msg}"
    );
}

#[test]
fn no_filesystem_stops_the_start() {
    load_library();
    let bytes = Arc::new(MemDevice::new(vec![0u8; 4 << 20]));
    let msg = start_error(&bytes, "/a");
    assert!(msg.contains("Bad magic number in super-block"), "{msg}");
}

#[test]
fn a_truncated_image_is_refused_at_start() {
    let bytes = image(&["-t", "ext4"], "8M", &[("/a", Content::Bytes(vec![1]))]);
    let mut short = bytes.snapshot();
    short.truncate(4 << 20);
    let msg = start_error(&Arc::new(MemDevice::new(short)), "/a");
    assert!(msg.contains("bad geometry"), "{msg}");
}

#[test]
fn exportname_mode_serves_the_file_each_client_names() {
    let a = pattern(5000, 1);
    let b = pattern(7000, 2);
    let bytes = image(
        &["-t", "ext4"],
        "8M",
        &[
            ("/a.img", Content::Bytes(a.clone())),
            ("/d/b.img", Content::Bytes(b.clone())),
        ],
    );
    let server = serve(device_over(&bytes), &[("ext2file", "exportname")]);
    assert_eq!(read(&connect(&server, true, "a.img"), 0, a.len()), a);
    assert_eq!(read(&connect(&server, true, "/d/b.img"), 0, b.len()), b);
    let mut none = server.connect(true, "").unwrap();
    assert!(none.prepare().is_err(), "export \"\" has no file");
    let listed = server.list_exports().unwrap();
    let names: Vec<(&str, u64)> = listed.iter().map(|f| (f.path.as_str(), f.size)).collect();
    assert_eq!(names, vec![("/a.img", 5000), ("/d/b.img", 7000)]);
}

#[test]
fn the_default_export_serves_its_file() {
    let a = pattern(3000, 4);
    let bytes = image(
        &["-t", "ext4"],
        "4M",
        &[("/a.img", Content::Bytes(a.clone()))],
    );
    let server = serve(
        device_over(&bytes),
        &[("ext2file", "exportname"), ("ext2default", "/a.img")],
    );
    assert_eq!(read(&connect(&server, true, ""), 0, a.len()), a);
}

#[test]
fn connections_to_one_file_share_its_state() {
    let bytes = image(
        &["-t", "ext4"],
        "4M",
        &[("/a", Content::Bytes(vec![7; 100]))],
    );
    let server = serve(device_over(&bytes), &[("ext2file", "exportname")]);
    let one = server.files().open("/a").unwrap();
    let two = server.files().open("//a").unwrap();
    assert!(Arc::ptr_eq(&one, &two));
}

#[test]
fn the_description_names_the_file() {
    let bytes = image(
        &["-t", "ext4"],
        "4M",
        &[("/a", Content::Bytes(vec![7; 100]))],
    );
    let server = serve(device_over(&bytes), &[("ext2file", "/a")]);
    let conn = connect(&server, true, "");
    assert_eq!(
        conn.description().as_deref(),
        Some("embedded '/a' from within ext2 image: memory")
    );
}

#[test]
fn a_failing_device_read_fails_that_request_only() {
    let data = pattern(64 << 10, 5);
    let bytes = image(
        &["-t", "ext4"],
        "8M",
        &[("/a", Content::Bytes(data.clone()))],
    );
    let device = device_over(&bytes);
    let server = serve(device, &[("ext2file", "/a")]);
    let conn = connect(&server, true, "");
    // The data blocks become unreadable: the read fails, the server goes on.
    let first = read(&conn, 0, 1);
    bytes.set_faults(ext2_rs::testing::Faults::failing_reads(0..bytes.size()));
    let mut buf = vec![0u8; 4096];
    assert!(conn.pread(&mut buf, 8192).is_err());
    bytes.set_faults(ext2_rs::testing::Faults::default());
    assert_eq!(read(&conn, 0, 1), first);
    assert_eq!(read(&conn, 0, data.len()), data);
}

#[test]
fn inline_data_files_read_through_the_library() {
    let bytes = image(
        &["-t", "ext4", "-O", "inline_data"],
        "4M",
        &[("/tiny", Content::Bytes(b"hello, inline".to_vec()))],
    );
    let server = serve(device_over(&bytes), &[("ext2file", "/tiny")]);
    let conn = connect(&server, false, "");
    assert_eq!(read(&conn, 0, 13), b"hello, inline");
    assert!(
        !conn.can_write().unwrap(),
        "inline data is served read-only"
    );
}
