//! The fuzz targets (`fuzz/src/targets.rs`, run by AFL through
//! `scripts/fuzz.sh`) replayed without AFL over the committed corpus
//! (`fuzz/corpus/TARGET/`) and the inputs of every crash or hang the
//! fuzzer found (`fuzz/regressions/TARGET/`), so that the normal suite runs
//! them: none may panic.

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
fn write_corpus() {
    replay("write");
}

#[test]
fn every_target_is_tested() {
    let names: Vec<&str> = targets::TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["read", "journal", "quota", "write"]);
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
