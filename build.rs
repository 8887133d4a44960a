//! Generates our bindings to nbdkit's filter API from the headers of the
//! nbdkit that `pkg-config` names (`PKG_CONFIG_PATH=/opt/nbdkit/lib/pkgconfig
//! cargo build --release` builds for that one).  libext2fs has its own
//! bindings, in ext2-rs.
//!
//! nbdkit refuses a filter whose version string differs from its own, so the
//! version is taken from that nbdkit's `nbdkit-version.h`, never written here.
//! Where the filter API differs between nbdkit releases, what the header
//! declares decides, read from the generated bindings, never a table of
//! version numbers: the next release builds too.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The headers we read; all of them come with nbdkit's development files.
const HEADERS: &[&str] = &["nbdkit-filter.h", "nbdkit-common.h", "nbdkit-version.h"];

/// The Debian package with the headers and `nbdkit.pc`.
const DEV_PACKAGE: &str = "nbdkit-plugin-dev";

/// The `--cfg` names this script may set, one per difference in the filter API.
mod api {
    /// `.thread_model` receives the next layer's thread model (nbdkit 1.43.9 on).
    pub const THREAD_MODEL_TAKES_NEXT: &str = "nbdkit_thread_model_takes_next";
    /// Filters have a `.dump_plugin` callback (nbdkit 1.43.9 on).
    pub const FILTER_DUMP_PLUGIN: &str = "nbdkit_filter_dump_plugin";
}

fn main() {
    println!("cargo:rerun-if-changed=include/wrapper.h");
    println!("cargo:rerun-if-changed=build.rs");
    for var in [
        "PKG_CONFIG_PATH",
        "PKG_CONFIG_LIBDIR",
        "PKG_CONFIG_SYSROOT_DIR",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!(
        "cargo::rustc-check-cfg=cfg({})",
        api::THREAD_MODEL_TAKES_NEXT
    );
    println!("cargo::rustc-check-cfg=cfg({})", api::FILTER_DUMP_PLUGIN);

    let include_dirs = nbdkit_include_dirs();
    let header_dir = check_headers(&include_dirs);
    for header in HEADERS {
        println!(
            "cargo:rerun-if-changed={}",
            header_dir.join(header).display()
        );
    }

    // Stay mapped after nbdkit dlcloses us at exit: parking_lot's global
    // table and Rust's thread-local destructors outlive the last callback,
    // and unmapping them would turn them into leaks (valgrind) or calls
    // into unmapped code.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");

    // The nbdkit_* functions are NOT linked: nbdkit provides them when it
    // dlopens us.

    // -I directories come before the compiler's own (/usr/include), so
    // these headers win over any other nbdkit's installed there.
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
        .expect("bindgen could not parse include/wrapper.h (is libclang-dev installed?)")
        .to_string();

    check_version(&bindings, &header_dir);
    let filter = struct_fields(&bindings, "nbdkit_filter")
        .expect("the bindings have no struct nbdkit_filter");
    let thread_model = field(&filter, "thread_model")
        .expect("struct nbdkit_filter has no .thread_model in this nbdkit's header");
    if !thread_model.contains("fn()") {
        // `fn(next_thread_model: c_int)`
        println!("cargo:rustc-cfg={}", api::THREAD_MODEL_TAKES_NEXT);
    }
    if field(&filter, "dump_plugin").is_some() {
        println!("cargo:rustc-cfg={}", api::FILTER_DUMP_PLUGIN);
    }

    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
    fs::write(out.join("bindings.rs"), bindings).expect("could not write the generated bindings");
}

/// Runs pkg-config; `None` if it is missing or fails.
fn pkg_config(args: &[&str]) -> Option<String> {
    let output = Command::new("pkg-config").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8(output.stdout)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Where pkg-config's nbdkit keeps its headers: its `includedir` variable
/// (upstream's `nbdkit.pc` has an empty `Cflags:`), then any `-I` flags.
fn nbdkit_include_dirs() -> Vec<PathBuf> {
    let Some(includedir) = pkg_config(&["--variable=includedir", "nbdkit"]) else {
        panic!(
            "\n\npkg-config knows no nbdkit: install its development files \
             (apt-get install {DEV_PACKAGE} pkg-config), or point PKG_CONFIG_PATH at \
             the lib/pkgconfig directory of the nbdkit to build for\n"
        );
    };
    let mut dirs = vec![PathBuf::from(includedir)];
    dirs.extend(
        pkg_config(&["--cflags-only-I", "nbdkit"])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|flag| flag.strip_prefix("-I"))
            .map(PathBuf::from),
    );
    dirs
}

/// The directory holding our headers (the first with `nbdkit-filter.h`);
/// stops the build with what to install when one is absent.
fn check_headers(include_dirs: &[PathBuf]) -> PathBuf {
    let missing: Vec<&str> = HEADERS
        .iter()
        .copied()
        .filter(|header| !include_dirs.iter().any(|dir| dir.join(header).is_file()))
        .collect();
    if !missing.is_empty() {
        panic!(
            "\n\nmissing header(s) {} in {:?} (pkg-config's nbdkit)\ninstall them with: apt-get install {DEV_PACKAGE}\n",
            missing.join(", "),
            include_dirs
        );
    }
    include_dirs
        .iter()
        .find(|dir| dir.join("nbdkit-filter.h").is_file())
        .cloned()
        .expect("checked above")
}

/// Makes sure the version string in the bindings is the one in pkg-config's
/// `nbdkit-version.h`: a build that read another nbdkit's headers would be
/// refused by the nbdkit it is meant for.
fn check_version(bindings: &str, header_dir: &Path) {
    let header = header_dir.join("nbdkit-version.h");
    let text = fs::read_to_string(&header).expect("nbdkit-version.h is readable");
    let declared = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("#define NBDKIT_VERSION_STRING"))
        .find_map(|rest| rest.trim().strip_prefix('"')?.split('"').next())
        .unwrap_or_else(|| panic!("{} defines no NBDKIT_VERSION_STRING", header.display()));
    let bound = format!("b\"{declared}\\0\"");
    assert!(
        bindings
            .lines()
            .any(|line| line.contains("NBDKIT_VERSION_STRING") && line.contains(&bound)),
        "the bindings were generated from another nbdkit's headers than {} (version {declared})",
        header.display()
    );
}

/// The fields of `pub struct NAME { ... }` in the bindings, as
/// `(name, type)` with all whitespace removed (the bindings may or may not
/// have been through rustfmt).
fn struct_fields(bindings: &str, name: &str) -> Option<Vec<(String, String)>> {
    let compact: String = bindings.chars().filter(|c| !c.is_whitespace()).collect();
    let start = compact.find(&format!("pubstruct{name}{{"))?;
    let body_start = start + compact[start..].find('{')? + 1;
    let mut depth = 1;
    let body_len = compact[body_start..].find(|c| {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        depth == 0
    })?;
    Some(
        split_top_level(&compact[body_start..body_start + body_len])
            .into_iter()
            .filter_map(|item| {
                let item = item.strip_prefix("pub")?;
                let (field, ty) = item.split_once(':')?;
                Some((field.to_string(), ty.to_string()))
            })
            .collect(),
    )
}

/// Splits at commas outside `<>`, `()` and `[]` (an arrow's `>` is no bracket).
fn split_top_level(body: &str) -> Vec<String> {
    let text = body.replace("->", "→");
    let mut depth = 0i32;
    let mut items = vec![String::new()];
    for c in text.chars() {
        match c {
            '<' | '(' | '[' => depth += 1,
            '>' | ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                items.push(String::new());
                continue;
            }
            _ => {}
        }
        items.last_mut().expect("never empty").push(c);
    }
    items
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(field, _)| field == name)
        .map(|(_, ty)| ty.as_str())
}
