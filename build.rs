//! Generates our bindings to nbdkit's filter API from the headers installed
//! on the build machine.  (libext2fs has its own bindings, in ext2-rs.)
//!
//! nbdkit refuses a filter whose version string differs from its own, so the
//! version is taken from the installed `nbdkit-version.h`, never written here.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A header we need, and the Debian package that ships it.
struct Requirement {
    header: &'static str,
    package: &'static str,
}

const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        header: "nbdkit-filter.h",
        package: "nbdkit-plugin-dev",
    },
    Requirement {
        header: "nbdkit-version.h",
        package: "nbdkit-plugin-dev",
    },
];

fn main() {
    println!("cargo:rerun-if-changed=include/wrapper.h");
    println!("cargo:rerun-if-changed=build.rs");

    let include_dirs = pkg_config_include_dirs();
    check_headers(&include_dirs);

    // Stay mapped after nbdkit dlcloses us at exit: parking_lot's global
    // table and Rust's thread-local destructors outlive the last callback,
    // and unmapping them would turn them into leaks (valgrind) or calls
    // into unmapped code.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");

    // The nbdkit_* functions are NOT linked: nbdkit provides them when it
    // dlopens us.

    let mut builder = bindgen::Builder::default()
        .header("include/wrapper.h")
        .allowlist_function("nbdkit_.*")
        .allowlist_type("nbdkit_.*")
        .allowlist_var("NBDKIT_.*")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for dir in &include_dirs {
        builder = builder.clang_arg(format!("-I{}", dir.display()));
    }
    let bindings = builder
        .generate()
        .expect("bindgen could not parse include/wrapper.h (is libclang-dev installed?)");

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

/// The directories our headers may live in: pkg-config's and the default.
fn pkg_config_include_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = pkg_config(&["--cflags-only-I", "nbdkit"])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|flag| flag.strip_prefix("-I"))
        .map(PathBuf::from)
        .collect();
    dirs.push(PathBuf::from("/usr/local/include"));
    dirs.push(PathBuf::from("/usr/include"));
    dirs
}

/// Stops the build with the Debian package to install when a header is absent.
fn check_headers(include_dirs: &[PathBuf]) {
    let missing: Vec<&Requirement> = REQUIREMENTS
        .iter()
        .filter(|req| !include_dirs.iter().any(|dir| exists(dir, req.header)))
        .collect();
    if missing.is_empty() {
        return;
    }
    let mut packages: Vec<&str> = missing.iter().map(|req| req.package).collect();
    packages.dedup();
    let headers: Vec<&str> = missing.iter().map(|req| req.header).collect();
    panic!(
        "\n\nmissing header(s): {}\ninstall them with: apt-get install {}\n",
        headers.join(", "),
        packages.join(" ")
    );
}

fn exists(dir: &Path, header: &str) -> bool {
    dir.join(header).is_file()
}
