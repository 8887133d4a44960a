//! Configuration and open errors: each config error exits nbdkit non-zero with its exact
//! message; `--help` documents `ext2file=`; `--dump-plugin` works; a bad image (zeros, or
//! a file that is not ext2), a missing path and a directory fail the connection with the
//! C filter's messages while the server keeps serving; a truncated image fails reads
//! instead of crashing the server.

mod common;

use common::*;
use std::path::PathBuf;

fn hello_image(dir: &TestDir) -> PathBuf {
    ImageBuilder::new(FsType::Ext2)
        .size(8 * MIB)
        .file("/hello.txt", b"hello world\n")
        .dir("/dir")
        .build(dir, "fs.img")
}

#[track_caller]
fn assert_config_error(plugin_args: &[&str], message: &str) {
    let out = nbdkit_run(&[], plugin_args, "echo client-ran");
    out.assert_failure();
    assert!(
        !out.stdout_text().contains("client-ran"),
        "the --run command ran despite a config error"
    );
    assert!(
        out.stderr.contains(message),
        "expected {message:?} in nbdkit's stderr:\n{}",
        out.stderr
    );
}

#[test]
fn missing_ext2file_is_a_config_error() {
    let dir = TestDir::new("missing_ext2file_is_a_config_error");
    let image = hello_image(&dir);
    assert_config_error(
        &["file", image.to_str().unwrap()],
        "you must supply ext2file=<FILE> parameter after the plugin name on the command line",
    );
}

#[test]
fn ext2file_twice_is_a_config_error() {
    let dir = TestDir::new("ext2file_twice_is_a_config_error");
    let image = hello_image(&dir);
    assert_config_error(
        &[
            "file",
            image.to_str().unwrap(),
            "ext2file=/hello.txt",
            "ext2file=/hello.txt",
        ],
        "ext2file parameter specified more than once",
    );
}

#[test]
fn relative_ext2file_is_a_config_error() {
    let dir = TestDir::new("relative_ext2file_is_a_config_error");
    let image = hello_image(&dir);
    assert_config_error(
        &["file", image.to_str().unwrap(), "ext2file=hello.txt"],
        "the file parameter must refer to an absolute path",
    );
}

#[test]
fn help_documents_ext2file() {
    let out = nbdkit_query(&["--help"], &["file"]);
    out.assert_success();
    let text = out.stdout_text();
    assert!(text.contains("ext2file="), "--help output:\n{text}");
}

#[test]
fn dump_plugin_loads_the_filter() {
    let out = nbdkit_query(&["--dump-plugin"], &["file"]);
    out.assert_success();
    let text = out.stdout_text();
    assert!(text.contains("name=file"), "--dump-plugin output:\n{text}");
    assert!(
        text.contains("thread_model="),
        "--dump-plugin output:\n{text}"
    );
}

/// Connects (nbdsh), expecting the connection to fail.
#[track_caller]
fn assert_connection_fails(uri: &str) {
    nbdsh(uri, "print(h.pread(1, 0))", &[]).assert_failure();
}

#[track_caller]
fn assert_log_contains(server: &Server, message: &str) {
    let log = server.log();
    assert!(
        log.contains(message),
        "expected {message:?} in nbdkit's stderr:\n{log}"
    );
    assert!(
        !log.contains("(null)"),
        "nbdkit's stderr mentions (null):\n{log}"
    );
}

fn check_not_an_ext2_image(image_bytes: &[u8], name: &str) {
    let dir = TestDir::new(name);
    let image = dir.join("bad.img");
    std::fs::write(&image, image_bytes).unwrap();
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/hello.txt"],
    );
    assert_connection_fails(&server.uri());
    assert_connection_fails(&server.uri());
    assert!(
        server.is_running(),
        "a bad image must not kill the server:\n{}",
        server.log()
    );
    assert_log_contains(&server, "Bad magic number in super-block");
    assert_eq!(read_file(&image), image_bytes, "the bad image was modified");
}

#[test]
fn zeroed_image_fails_connection_with_bad_magic() {
    check_not_an_ext2_image(
        &vec![0u8; 8 * MIB as usize],
        "zeroed_image_fails_connection_with_bad_magic",
    );
}

#[test]
fn non_ext2_file_fails_connection_with_bad_magic() {
    let text = "this is a plain text file, not a filesystem\n".repeat(100_000);
    check_not_an_ext2_image(
        text.as_bytes(),
        "non_ext2_file_fails_connection_with_bad_magic",
    );
}

#[test]
fn nonexistent_path_fails_connection() {
    let dir = TestDir::new("nonexistent_path_fails_connection");
    let image = hello_image(&dir);
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/nonexistent"],
    );
    assert_connection_fails(&server.uri());
    assert!(server.is_running());
    assert_log_contains(
        &server,
        "/nonexistent: namei: File not found by ext2_lookup",
    );
}

#[test]
fn directory_path_fails_connection() {
    let dir = TestDir::new("directory_path_fails_connection");
    let image = hello_image(&dir);
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/dir"],
    );
    assert_connection_fails(&server.uri());
    assert!(server.is_running());
    assert_log_contains(&server, "/dir: must be a regular file in the disk image");
}

/// In exportname mode, failed opens (missing file, directory) name the export in the
/// message, and the server keeps serving good names afterwards.
#[test]
fn bad_export_names_then_good_one() {
    let dir = TestDir::new("bad_export_names_then_good_one");
    let image = hello_image(&dir);
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=exportname"],
    );
    assert_connection_fails(&server.export_uri("/nonexistent"));
    assert_connection_fails(&server.export_uri("/dir"));
    assert!(server.is_running());
    assert_log_contains(
        &server,
        "/nonexistent: namei: File not found by ext2_lookup",
    );
    assert_log_contains(&server, "/dir: must be a regular file in the disk image");
    assert_eq!(
        nbd_pread(&server.export_uri("/hello.txt"), 0, 12),
        b"hello world\n"
    );
}

/// A truncated image (the file's tail lies beyond the end of the image file) must give
/// read errors (or a failed connection), never crash the server or return made-up data.
#[test]
fn truncated_image_fails_reads_without_crashing() {
    let dir = TestDir::new("truncated_image_fails_reads_without_crashing");
    let content = random_bytes(61, 20 * MIB as usize);
    let image = ImageBuilder::new(FsType::Ext4)
        .size(32 * MIB)
        .file("/big", &content)
        .build(&dir, "fs.img");
    let blocks = debugfs_blocks(&image, "/big");
    let last_block = *blocks.iter().max().unwrap();
    let truncated_size = 16 * MIB;
    assert!(
        last_block * 4096 > truncated_size,
        "test premise: /big must extend past 16 MiB"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(truncated_size)
        .unwrap();
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=/big"],
    );
    for _attempt in 0..2 {
        let out = nbdsh(
            &server.uri(),
            "import sys\n\
             size = h.get_size()\n\
             try:\n\
             \x20   h.pread(1 << 20, size - (1 << 20))\n\
             \x20   print('tail-read-succeeded')\n\
             except nbd.Error as e:\n\
             \x20   print('tail-read-failed', e.errnum)\n",
            &[],
        );
        assert!(
            !out.stdout_text().contains("tail-read-succeeded"),
            "reading past the end of the truncated image returned data"
        );
        assert!(
            server.is_running(),
            "the server died on a truncated image:\n{}",
            server.log()
        );
    }
}

/// Special files and broken symlinks fail the connection without killing the server;
/// a symlink loop must not hang it.
#[test]
fn special_files_and_broken_symlinks_fail_connection() {
    let dir = TestDir::new("special_files_and_broken_symlinks_fail_connection");
    let image = ImageBuilder::new(FsType::Ext4)
        .size(8 * MIB)
        .file("/hello.txt", b"hello world\n")
        .fifo("/fifo")
        .symlink("/dangling", "/does/not/exist")
        .symlink("/loop1", "loop2")
        .symlink("/loop2", "loop1")
        .build(&dir, "fs.img");
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=exportname"],
    );
    for name in ["/fifo", "/dangling", "/loop1"] {
        assert_connection_fails(&server.export_uri(name));
        assert!(
            server.is_running(),
            "connecting to {name} killed the server"
        );
    }
    assert_log_contains(&server, "/fifo: must be a regular file in the disk image");
    assert_eq!(
        nbd_pread(&server.export_uri("/hello.txt"), 0, 12),
        b"hello world\n"
    );
}

/// A file whose extent points past the end of the filesystem (a damaged image) fails
/// its connection or its reads with an error, never crashes the server or returns
/// made-up bytes; the image's other files are still served.
#[test]
fn damaged_extent_fails_cleanly() {
    let dir = TestDir::new("damaged_extent_fails_cleanly");
    let good = random_bytes(62, 50_000);
    let image = ImageBuilder::new(FsType::Ext4)
        .size(16 * MIB)
        .file("/bad", &random_bytes(63, 100_000))
        .file("/good", &good)
        .build(&dir, "fs.img");
    // i_block words 0-2 are the extent header; word 5 is the first extent's start_lo.
    debugfs_write(&image, &["sif /bad block[5] 0x7ffff0".to_string()]);
    let mut server = Server::start(
        &dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=exportname"],
    );
    for _attempt in 0..2 {
        let out = nbdsh(
            &server.export_uri("/bad"),
            "try:\n\
             \x20   h.pread(4096, 0)\n\
             \x20   print('read-succeeded')\n\
             except nbd.Error as e:\n\
             \x20   print('read-failed')\n",
            &[],
        );
        assert!(
            !out.stdout_text().contains("read-succeeded"),
            "reading a block past the end of the filesystem returned data"
        );
        assert!(server.is_running(), "the server died:\n{}", server.log());
    }
    assert_bytes_eq(
        &nbd_pread(&server.export_uri("/good"), 0, good.len()),
        &good,
        "/good beside a damaged file",
    );
}
