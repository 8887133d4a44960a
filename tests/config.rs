//! Configuration and open errors: each config error exits nbdkit non-zero with its exact
//! message (a value of ours that is not UTF-8 too); `--help` documents `ext2file=`;
//! `--dump-plugin` works and, on an nbdkit whose filters have `.dump_plugin`, shows our
//! version; a bad image (zeros, a file that is not ext2, a filesystem larger than its
//! image), a missing path and a directory stop nbdkit at start (`.after_fork`) with the
//! C filter's messages, before any client connects; in exportname mode a bad name fails
//! its connection while the server keeps serving.

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

/// nbdkit 1.43.9 gave filters a `.dump_plugin`: there, `--dump-plugin` shows our
/// version and the libext2fs we run with after nbdkit's own lines about the filter
/// (built from what the header declares, so an older nbdkit simply has none).
#[test]
fn dump_plugin_shows_our_version_where_nbdkit_asks_filters() {
    let out = nbdkit_query(&["--dump-plugin"], &["file"]);
    out.assert_success();
    let text = out.stdout_text();
    let ours = format!("ext2_version={}\n", env!("CARGO_PKG_VERSION"));
    if nbdkit_version() < (1, 43, 9) {
        assert!(!text.contains(&ours), "--dump-plugin output:\n{text}");
        return;
    }
    let at_name = text.find("ext2_name=").expect("nbdkit names the filter");
    let at_ours = text.find(&ours).unwrap_or_else(|| {
        panic!("--dump-plugin does not show our version:\n{text}");
    });
    assert!(at_ours > at_name, "our lines come after nbdkit's:\n{text}");
    let libext2fs = text
        .lines()
        .find_map(|l| l.strip_prefix("ext2_libext2fs_version="))
        .unwrap_or_else(|| panic!("no libext2fs version:\n{text}"));
    assert!(
        libext2fs.starts_with("1."),
        "libext2fs version {libext2fs:?}"
    );
    assert!(text.contains("ext2_journal_replay=yes\n"), "{text}");
}

/// A value of ours that is not UTF-8 is refused with a message, never "repaired" into
/// another name (`to_string_lossy` would serve `/\u{fffd}` or fail later with it); the
/// plugin's own parameters pass through as bytes.
#[test]
fn non_utf8_ext2file_is_a_config_error() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dir = TestDir::new("non_utf8_ext2file_is_a_config_error");
    let image = hello_image(&dir);
    // A copy of the image whose host file name is not UTF-8: the file plugin's
    // parameter reaches it unchanged.
    let mut odd_name = dir.path().as_os_str().as_bytes().to_vec();
    odd_name.extend_from_slice(b"/fs-\xff.img");
    let odd_image = std::path::PathBuf::from(OsStr::from_bytes(&odd_name));
    std::fs::copy(&image, &odd_image).unwrap();
    let run_with = |ext2file: &[u8]| {
        let (cmd, _logs) = Nbdkit::run("nbdsh -u \"$uri\" -c 'print(h.pread(12, 0))'")
            .plugin(&[
                OsStr::new("file"),
                odd_image.as_os_str(),
                OsStr::from_bytes(ext2file),
            ])
            .command();
        run_command(cmd, &[])
    };
    let out = run_with(b"ext2file=/hello\xff.txt");
    out.assert_failure();
    assert!(
        out.stderr.contains("ext2file parameter is not valid UTF-8"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stdout_text().contains("hello"),
        "the --run command ran"
    );
    let out = run_with(b"ext2file=/hello.txt");
    out.assert_success();
    assert!(
        out.stdout_text().contains("hello world"),
        "{}",
        out.stdout_text()
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

/// nbdkit stops at start, exit status 1, with the C filter's message; no client ever
/// connected, and the image is unchanged.
#[track_caller]
fn check_stops_at_start(name: &str, image: &std::path::Path, ext2file: &str, message: &str) {
    let dir = TestDir::new(name);
    let before = read_file(image);
    for options in [&[][..], &["-r"][..]] {
        let out = nbdkit_start_failure(
            &dir,
            options,
            &[
                "file",
                image.to_str().unwrap(),
                &format!("ext2file={ext2file}"),
            ],
        );
        assert_stopped_at_start(&out, message);
    }
    assert!(read_file(image) == before, "the image was modified");
}

fn check_not_an_ext2_image(image_bytes: &[u8], name: &str) {
    let dir = TestDir::new(name);
    let image = dir.join("bad.img");
    std::fs::write(&image, image_bytes).unwrap();
    for ext2file in ["/hello.txt", "exportname"] {
        check_stops_at_start(
            name,
            &image,
            ext2file,
            "open: Bad magic number in super-block",
        );
    }
}

#[test]
fn zeroed_image_stops_nbdkit_at_start_with_bad_magic() {
    check_not_an_ext2_image(
        &vec![0u8; 8 * MIB as usize],
        "zeroed_image_stops_nbdkit_at_start_with_bad_magic",
    );
}

#[test]
fn non_ext2_file_stops_nbdkit_at_start_with_bad_magic() {
    let text = "this is a plain text file, not a filesystem\n".repeat(100_000);
    check_not_an_ext2_image(
        text.as_bytes(),
        "non_ext2_file_stops_nbdkit_at_start_with_bad_magic",
    );
}

#[test]
fn nonexistent_path_stops_nbdkit_at_start() {
    let dir = TestDir::new("nonexistent_path_stops_nbdkit_at_start");
    let image = hello_image(&dir);
    check_stops_at_start(
        "nonexistent_path_stops_nbdkit_at_start",
        &image,
        "/nonexistent",
        "/nonexistent: namei: File not found by ext2_lookup",
    );
}

#[test]
fn directory_path_stops_nbdkit_at_start() {
    let dir = TestDir::new("directory_path_stops_nbdkit_at_start");
    let image = hello_image(&dir);
    check_stops_at_start(
        "directory_path_stops_nbdkit_at_start",
        &image,
        "/dir",
        "/dir: must be a regular file in the disk image",
    );
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

/// A filesystem larger than its image (the image file truncated: a file's tail lies
/// beyond its end) is refused at start with the kernel's words, in both modes and with
/// `-r`, before any data is served: nbdkit exits 1 and never crashes. (Serving it would
/// fail reads half way through a file, and on nbdkit 1.32 a client giving up with
/// requests in flight can abort the server.)
#[test]
fn truncated_image_is_refused_at_start() {
    let name = "truncated_image_is_refused_at_start";
    let dir = TestDir::new(name);
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
    for ext2file in ["/big", "exportname"] {
        check_stops_at_start(
            name,
            &image,
            ext2file,
            "bad geometry: block count 8192 exceeds size of device (4096 blocks)",
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
