//! Runs fuzz inputs without AFL: for crashes found, the leak check, and
//! the e2fsck check of the write target.
//!
//!     replay TARGET PATH...          each file, or each file in each directory
//!     replay --e2fsck DIR PATH...    the write target: every input whose image
//!                                    e2fsck -fn passes before must pass after;
//!                                    the images go to DIR
//!     replay --encode IMAGE HEX OUT  an input: IMAGE with parameters HEX
//!                                    (`fuzz/seeds.sh` makes the corpus so)
//!
//! Exits 1 when an e2fsck check fails (a panic aborts with its message).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn inputs(paths: &[String]) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        let path = Path::new(path);
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .expect("a readable directory")
                .map(|e| e.expect("a directory entry").path())
                .filter(|p| p.is_file())
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(path.to_path_buf());
        }
    }
    files
}

fn e2fsck_clean(image: &Path) -> bool {
    Command::new("e2fsck")
        .args(["-fn"])
        .arg(image)
        .output()
        .expect("e2fsck runs (install e2fsprogs)")
        .status
        .success()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    ext2_fuzz::targets::setup();
    if args.first().map(String::as_str) == Some("--encode") && args.len() == 4 {
        let image = std::fs::read(&args[1]).expect("a readable image");
        let hex = args[2].as_bytes();
        let params: Vec<u8> = hex
            .chunks(2)
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 16).expect("hex"))
            .collect();
        std::fs::write(&args[3], ext2_fuzz::targets::encode(&image, &params))
            .expect("writing the input");
        return ExitCode::SUCCESS;
    }
    if args.first().map(String::as_str) == Some("--e2fsck") && args.len() >= 3 {
        let out = Path::new(&args[1]);
        std::fs::create_dir_all(out).expect("the output directory");
        let mut failed = 0;
        let mut checked = 0;
        for input in inputs(&args[2..]) {
            let data = std::fs::read(&input).expect("a readable input");
            let Some((before, after)) = ext2_fuzz::targets::write_images(&data) else {
                continue;
            };
            let name = input
                .file_name()
                .unwrap()
                .to_string_lossy()
                .replace(':', "_");
            let (b, a) = (
                out.join(format!("{name}.before")),
                out.join(format!("{name}.after")),
            );
            std::fs::write(&b, before).expect("writing an image");
            std::fs::write(&a, after).expect("writing an image");
            if !e2fsck_clean(&b) {
                // Damaged before: "no worse" is not decided here.
                let _ = std::fs::remove_file(&b);
                let _ = std::fs::remove_file(&a);
                continue;
            }
            checked += 1;
            if e2fsck_clean(&a) {
                let _ = std::fs::remove_file(&b);
                let _ = std::fs::remove_file(&a);
            } else {
                failed += 1;
                eprintln!(
                    "{}: e2fsck -fn passes before the writes, fails after",
                    input.display()
                );
            }
        }
        eprintln!("{checked} images clean before the writes, {failed} not clean after");
        return if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let Some((target, paths)) = args.split_first().filter(|(_, p)| !p.is_empty()) else {
        eprintln!("usage: replay TARGET PATH... | replay --e2fsck DIR PATH...");
        return ExitCode::from(2);
    };
    for input in inputs(paths) {
        let data = std::fs::read(&input).expect("a readable input");
        if std::env::var_os("EXT2_FUZZ_VERBOSE").is_some() {
            eprintln!("{}", input.display());
        }
        if !ext2_fuzz::targets::run(target, &data) {
            eprintln!("no target {target}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}
