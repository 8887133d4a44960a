//! `ext2file=exportname`: the client picks the file by export name. Each name serves its
//! own bytes and size, with or without a leading `/`; the default export "" is refused
//! unless `ext2default=` names a file; a missing name fails with a message naming it;
//! the export list names the image's regular files with their sizes (`ext2exports=N`
//! limits it, 0 disables it); the description names the chosen file; writes through one
//! spelling of a name are seen through the other.

mod common;

use common::*;
use std::path::PathBuf;

struct Files {
    image: PathBuf,
    files: Vec<(&'static str, Vec<u8>)>,
}

fn several_files(dir: &TestDir, seed: u64) -> Files {
    let files = vec![
        ("/a.bin", random_bytes(seed, 123_457)),
        ("/b.bin", random_bytes(seed ^ 1, 2 * MIB as usize + 1)),
        ("/sub/dir/c.bin", random_bytes(seed ^ 2, 4096)),
        ("/hello.txt", b"hello world\n".to_vec()),
        ("/with space/and%percent é.bin", random_bytes(seed ^ 3, 999)),
    ];
    let mut builder = ImageBuilder::new(FsType::Ext4)
        .size(16 * MIB)
        .dir("/emptydir");
    for (path, content) in &files {
        builder = builder.file(path, content);
    }
    Files {
        image: builder.build(dir, "fs.img"),
        files,
    }
}

fn exportname_server(dir: &TestDir, image: &std::path::Path) -> Server {
    Server::start(
        dir,
        &[],
        &["file", image.to_str().unwrap(), "ext2file=exportname"],
    )
}

#[test]
fn each_export_name_serves_its_own_file() {
    let dir = TestDir::new("each_export_name_serves_its_own_file");
    let files = several_files(&dir, 71);
    let server = exportname_server(&dir, &files.image);
    for (path, content) in &files.files {
        let uri = server.export_uri(path);
        assert_eq!(
            nbd_size(&uri),
            content.len() as u64,
            "size of export {path}"
        );
        assert_bytes_eq(
            &nbdcopy_read(&uri, &dir, &[]),
            content,
            &format!("nbdcopy of export {path}"),
        );
    }
}

#[test]
fn names_without_leading_slash_work() {
    let dir = TestDir::new("names_without_leading_slash_work");
    let files = several_files(&dir, 72);
    let server = exportname_server(&dir, &files.image);
    for (path, content) in &files.files {
        let uri = server.export_uri(path.trim_start_matches('/'));
        assert_bytes_eq(
            &nbd_pread(&uri, 0, content.len()),
            content,
            &format!("export {path} without '/'"),
        );
    }
}

/// A write through "a.bin" is read back through "/a.bin" (same file, same image).
#[test]
fn both_spellings_name_the_same_file() {
    let dir = TestDir::new("both_spellings_name_the_same_file");
    let files = several_files(&dir, 73);
    let mut server = exportname_server(&dir, &files.image);
    let patch = random_bytes(74, 5000);
    nbd_pwrite(&server.export_uri("a.bin"), 1001, &patch);
    let mut expected = files.files[0].1.clone();
    expected[1001..6001].copy_from_slice(&patch);
    assert_bytes_eq(
        &nbd_pread(&server.export_uri("/a.bin"), 0, expected.len()),
        &expected,
        "/a.bin",
    );
    server.stop();
    assert_bytes_eq(
        &debugfs_dump(&files.image, "/a.bin"),
        &expected,
        "debugfs dump of /a.bin",
    );
    assert_bytes_eq(
        &debugfs_dump(&files.image, "/b.bin"),
        &files.files[1].1,
        "/b.bin untouched",
    );
    e2fsck_clean(&files.image);
}

#[test]
fn default_export_is_refused() {
    let dir = TestDir::new("default_export_is_refused");
    let files = several_files(&dir, 75);
    let mut server = exportname_server(&dir, &files.image);
    nbdsh(&server.uri(), "print(h.get_size())", &[]).assert_failure();
    assert!(server.is_running());
    // The server still serves named exports afterwards.
    assert_eq!(
        nbd_pread(&server.export_uri("/hello.txt"), 0, 12),
        b"hello world\n"
    );
}

#[test]
fn missing_export_name_fails_naming_it() {
    let dir = TestDir::new("missing_export_name_fails_naming_it");
    let files = several_files(&dir, 76);
    let mut server = exportname_server(&dir, &files.image);
    nbdsh(
        &server.export_uri("/no-such-file.bin"),
        "print(h.get_size())",
        &[],
    )
    .assert_failure();
    nbdsh(
        &server.export_uri("sub/missing-too"),
        "print(h.get_size())",
        &[],
    )
    .assert_failure();
    nbdsh(&server.export_uri("/emptydir"), "print(h.get_size())", &[]).assert_failure();
    assert!(server.is_running());
    let log = server.log();
    assert!(
        log.contains("no-such-file.bin"),
        "the missing name is not in the log:\n{log}"
    );
    assert!(
        log.contains("sub/missing-too"),
        "the missing name is not in the log:\n{log}"
    );
    assert!(
        log.contains("emptydir: must be a regular file in the disk image"),
        "log:\n{log}"
    );
    assert!(!log.contains("(null)"), "log mentions (null):\n{log}");
}

/// (name without leading '/', size) of each export `nbdinfo --list --json` reports.
fn listed_exports(uri: &str) -> Vec<(String, u64)> {
    let out = run("nbdinfo", &["--list", "--json", uri]);
    out.assert_success();
    let text = out.stdout_text();
    let mut names = Vec::new();
    let mut sizes = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("\"export-name\": \"") {
            let name = rest.trim_end_matches(',').trim_end_matches('"');
            names.push(name.trim_start_matches('/').to_string());
        } else if let Some(rest) = line.strip_prefix("\"export-size\": ") {
            sizes.push(rest.trim_end_matches(',').parse().expect("export-size"));
        }
    }
    assert_eq!(names.len(), sizes.len(), "nbdinfo --list --json:\n{text}");
    let mut exports: Vec<(String, u64)> = names.into_iter().zip(sizes).collect();
    exports.sort();
    exports
}

/// By default the export list names every regular file of the image (not directories,
/// not lost+found) with its size, and every listed name can be connected to.
#[test]
fn export_list_names_every_regular_file() {
    let dir = TestDir::new("export_list_names_every_regular_file");
    let files = several_files(&dir, 77);
    let server = exportname_server(&dir, &files.image);
    let mut expected: Vec<(String, u64)> = files
        .files
        .iter()
        .map(|(path, content)| (path[1..].to_string(), content.len() as u64))
        .collect();
    expected.sort();
    let listed = listed_exports(&server.uri());
    assert_eq!(listed, expected);
    for (name, size) in &listed {
        assert_eq!(nbd_size(&server.export_uri(name)), *size, "export {name}");
    }
}

/// `ext2exports=0` lists nothing; `ext2exports=2` lists two of the files.
#[test]
fn export_list_can_be_limited_or_disabled() {
    let dir = TestDir::new("export_list_can_be_limited_or_disabled");
    let files = several_files(&dir, 78);
    let image = files.image.to_str().unwrap();
    let server = Server::start(
        &dir,
        &[],
        &["file", image, "ext2file=exportname", "ext2exports=0"],
    );
    assert_eq!(listed_exports(&server.uri()), Vec::new());
    drop(server);
    let server = Server::start(
        &dir,
        &[],
        &["file", image, "ext2file=exportname", "ext2exports=2"],
    );
    let listed = listed_exports(&server.uri());
    assert_eq!(listed.len(), 2, "{listed:?}");
    for (name, size) in &listed {
        let file = files
            .files
            .iter()
            .find(|(path, _)| &path[1..] == name)
            .unwrap_or_else(|| panic!("listed {name} is not a file of the image"));
        assert_eq!(*size, file.1.len() as u64);
    }
}

/// `ext2default=/PATH` serves that file to clients asking for the default export "".
#[test]
fn ext2default_serves_the_default_export() {
    let dir = TestDir::new("ext2default_serves_the_default_export");
    let files = several_files(&dir, 79);
    let server = Server::start(
        &dir,
        &[],
        &[
            "file",
            files.image.to_str().unwrap(),
            "ext2file=exportname",
            "ext2default=/sub/dir/c.bin",
        ],
    );
    assert_bytes_eq(
        &nbdcopy_read(&server.uri(), &dir, &[]),
        &files.files[2].1,
        "default export",
    );
    assert_bytes_eq(
        &nbd_pread(&server.export_uri("a.bin"), 0, files.files[0].1.len()),
        &files.files[0].1,
        "named export beside the default",
    );
}

#[test]
fn description_names_the_chosen_file() {
    let dir = TestDir::new("description_names_the_chosen_file");
    let files = several_files(&dir, 78);
    let server = Server::start(
        &dir,
        &[],
        &[
            "--filter=exportname",
            "file",
            files.image.to_str().unwrap(),
            "ext2file=exportname",
            "exportdesc=fixed:DESC",
        ],
    );
    for name in ["sub/dir/c.bin", "/sub/dir/c.bin"] {
        let out = run("nbdinfo", &["--json", &server.export_uri(name)]);
        out.assert_success();
        let text = out.stdout_text();
        assert!(
            text.contains(
                "\"description\": \"embedded '/sub/dir/c.bin' from within ext2 image: DESC\""
            ),
            "nbdinfo --json for export {name}:\n{text}"
        );
    }
}
