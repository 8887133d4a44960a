//! The fuzz targets (`fuzz/src/targets.rs`, run by AFL through
//! `scripts/fuzz.sh`) replayed without AFL over the committed corpus
//! (`fuzz/corpus/TARGET/`) and the inputs of every crash or hang the
//! fuzzer found (`fuzz/regressions/TARGET/`), so that the normal suite runs
//! them: none may panic.  The write target's images must also stay clean
//! for `e2fsck -fn` when they were clean before.

#[allow(dead_code)]
#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::{Path, PathBuf};

fn inputs(dir: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let corpus = inputs("fuzz/corpus", target);
    assert!(
        !corpus.is_empty(),
        "no corpus for {target} (fuzz/seeds.sh makes it)"
    );
    for input in corpus.iter().chain(&inputs("fuzz/regressions", target)) {
        let data = std::fs::read(input).unwrap();
        eprintln!("{target}: {}", input.display());
        assert!(targets::run(target, &data));
    }
}

#[test]
fn read_corpus() {
    replay("read");
}

#[test]
fn journal_corpus() {
    replay("journal");
}

#[test]
fn quota_corpus() {
    replay("quota");
}

#[test]
fn quota_tree_corpus() {
    replay("quota-tree");
}

#[test]
fn write_corpus() {
    replay("write");
}

/// Whether `e2fsck -fn` finds `image` clean.
fn e2fsck_clean(image: &[u8], name: &str) -> bool {
    let path = std::env::temp_dir().join(format!("fuzz-corpus-{}-{name}", std::process::id()));
    std::fs::write(&path, image).unwrap();
    let out = std::process::Command::new("e2fsck")
        .arg("-fn")
        .arg(&path)
        .output()
        .expect("e2fsck runs (install e2fsprogs)");
    let _ = std::fs::remove_file(&path);
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    }
    out.status.success()
}

#[test]
fn writes_leave_clean_images_clean() {
    let mut written = 0;
    for input in inputs("fuzz/corpus", "write")
        .iter()
        .chain(&inputs("fuzz/regressions", "write"))
    {
        let data = std::fs::read(input).unwrap();
        let Some((before, after)) = targets::write_images(&data) else {
            continue;
        };
        let name = input.file_name().unwrap().to_string_lossy().into_owned();
        if e2fsck_clean(&before, &name) {
            written += 1;
            assert!(
                e2fsck_clean(&after, &name),
                "{}: e2fsck -fn passes before the writes, fails after",
                input.display()
            );
        }
    }
    assert!(written > 0, "no clean image was written");
}

#[test]
fn every_target_is_tested() {
    let names: Vec<&str> = targets::TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["read", "journal", "quota", "quota-tree", "write"]);
}

#[test]
fn inputs_hold_the_images_sectors() {
    let mut image = vec![0u8; targets::MIN_DEVICE];
    image[1024..1030].copy_from_slice(b"ext2fs");
    image[targets::MIN_DEVICE - 1] = 7;
    let data = targets::encode(&image, b"params");
    assert_eq!(data.len(), 4 + 2 + 2 * (2 + targets::SECTOR) + 6);
    let (decoded, params) = targets::decode(&data);
    assert_eq!(decoded, image);
    assert_eq!(params, b"params");
    // Anything decodes: short, empty, absurd sizes.
    for data in [&b""[..], b"\xff\xff\xff\xff\xff\xff", b"\0\0\0\0\x05\0\x01"] {
        let (image, _) = targets::decode(data);
        assert_eq!(image.len(), targets::MIN_DEVICE.max(image.len()));
    }
}
