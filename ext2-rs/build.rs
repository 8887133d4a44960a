//! Generates ext2-rs's bindings to libext2fs (and com_err, for its messages)
//! from the headers installed on the build machine, and links both.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// A header we need, and the Debian package that ships it.
const REQUIREMENTS: &[(&str, &str)] = &[
    ("ext2fs/ext2fs.h", "libext2fs-dev"),
    ("et/com_err.h", "comerr-dev"),
];

fn main() {
    println!("cargo:rerun-if-changed=include/ext2fs-wrapper.h");
    println!("cargo:rerun-if-changed=build.rs");

    let include_dirs = include_dirs();
    check_headers(&include_dirs);

    for lib in pkg_config(&["--libs-only-l", "ext2fs", "com_err"])
        .unwrap_or_else(|| "-lext2fs -lcom_err".to_string())
        .split_whitespace()
    {
        if let Some(name) = lib.strip_prefix("-l") {
            println!("cargo:rustc-link-lib=dylib={name}");
        }
    }
    for dir in pkg_config(&["--libs-only-L", "ext2fs", "com_err"])
        .unwrap_or_default()
        .split_whitespace()
    {
        if let Some(path) = dir.strip_prefix("-L") {
            println!("cargo:rustc-link-search=native={path}");
        }
    }

    let mut builder = bindgen::Builder::default()
        .header("include/ext2fs-wrapper.h")
        // ext2fs.h defines its inline helpers unless told not to.
        .clang_arg("-DNO_INLINE_FUNCS")
        .allowlist_function("ext2fs_.*")
        .allowlist_function("io_channel_.*")
        .allowlist_function("error_message")
        .allowlist_function("add_error_table")
        .allowlist_function("remove_error_table")
        .allowlist_var("et_ext2_error_table")
        .allowlist_type("struct_io_manager")
        .allowlist_type("struct_io_channel")
        .allowlist_var("EXT2_.*")
        .allowlist_var("EXT3_.*")
        .allowlist_var("EXT4_.*")
        .allowlist_var("BMAP_.*")
        .allowlist_var("BLOCK_.*")
        .allowlist_var("DIRENT_.*")
        .allowlist_var("LINUX_S_.*")
        .allowlist_var("CHANNEL_FLAGS_.*")
        .allowlist_var("EXT2FS_.*")
        .allowlist_var("JBD2_.*")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for dir in &include_dirs {
        builder = builder.clang_arg(format!("-I{}", dir.display()));
    }
    let bindings = builder
        .generate()
        .expect("bindgen could not parse include/ext2fs-wrapper.h (is libclang-dev installed?)");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("could not write the generated bindings");
}

/// Runs pkg-config; `None` if it is missing or fails.
fn pkg_config(args: &[&str]) -> Option<String> {
    let output = Command::new("pkg-config").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8(output.stdout).ok()
}

/// pkg-config's include directories for libext2fs, then the defaults.
fn include_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = pkg_config(&["--cflags-only-I", "ext2fs", "com_err"])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|flag| flag.strip_prefix("-I"))
        .map(PathBuf::from)
        .collect();
    dirs.push(PathBuf::from("/usr/local/include"));
    dirs.push(PathBuf::from("/usr/include"));
    dirs
}

/// Stops the build, naming the Debian packages to install, when a header is absent.
fn check_headers(include_dirs: &[PathBuf]) {
    let missing: Vec<&(&str, &str)> = REQUIREMENTS
        .iter()
        .filter(|(header, _)| !include_dirs.iter().any(|dir| dir.join(header).is_file()))
        .collect();
    if missing.is_empty() {
        return;
    }
    let headers: Vec<&str> = missing.iter().map(|(h, _)| *h).collect();
    let mut packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    packages.dedup();
    panic!(
        "\n\nmissing header(s): {}\ninstall them with: apt-get install {}\n",
        headers.join(", "),
        packages.join(" ")
    );
}
