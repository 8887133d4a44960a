//! The AFL++ entry point: `fuzz-afl TARGET`, run by `cargo afl fuzz` (see
//! `scripts/fuzz.sh`), in persistent mode; a panic is a crash.

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    if !ext2_fuzz::targets::TARGETS.iter().any(|(n, _)| *n == name) {
        eprintln!("usage: fuzz-afl TARGET (scripts/fuzz.sh lists them)");
        std::process::exit(2);
    }
    ext2_fuzz::targets::setup();
    afl::fuzz!(|data: &[u8]| {
        ext2_fuzz::targets::run(&name, data);
    });
}
