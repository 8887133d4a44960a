//! The filter's parameters, with the C filter's names and messages.

/// What the filter serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `ext2file=/path`: this file, whatever export name the client asks for.
    File(String),
    /// `ext2file=exportname`: the file the client names as its export.
    ExportName,
}

pub use crate::volume::discard::DiscardMode;
pub use crate::volume::JournalMode;

impl DiscardMode {
    /// The parameter's value, or `Err` with nbdkit-style wording.
    pub fn parse(value: &str) -> Result<DiscardMode, String> {
        match value {
            "on" => Ok(DiscardMode::On),
            "off" => Ok(DiscardMode::Off),
            _ => Err(format!(
                "could not parse ext2discard: {value}: expecting 'on' or 'off'"
            )),
        }
    }
}

impl JournalMode {
    /// The parameter's value, or `Err` with nbdkit-style wording.
    pub fn parse(value: &str) -> Result<JournalMode, String> {
        match value {
            "memory" => Ok(JournalMode::Memory),
            "replay" => Ok(JournalMode::Replay),
            _ => Err(format!(
                "could not parse ext2journal: {value}: expecting 'memory' or 'replay'"
            )),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub target: Target,
    /// In exportname mode: how many files `list_exports` may name at most.
    pub max_exports: usize,
    /// In exportname mode: the file served to a client asking for "".
    pub default_export: Option<String>,
    /// What to do with a journal that needs recovery.
    pub journal: JournalMode,
    /// Bytes of memory for served files' map blocks (`ext2mapcache=`).
    pub map_cache: usize,
    /// Whether blocks the filesystem frees are trimmed in the plugin.
    pub discard: DiscardMode,
}

/// The map cache's default size: the map blocks of a file of hundreds of
/// thousands of extents, in a few MiB.
pub const DEFAULT_MAP_CACHE: usize = 16 << 20;

/// A size such as `4096`, `64K`, `16M` or `1G` (binary multiples).
pub fn parse_size(key: &str, value: &str) -> Result<usize, String> {
    let bad = || format!("could not parse {key}: {value}: expecting a size such as 16M");
    let (digits, shift) = match value.char_indices().last() {
        Some((at, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => return Err(bad()),
            };
            (&value[..at], shift)
        }
        _ => (value, 0),
    };
    let n: usize = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1usize << shift).ok_or_else(bad)
}

/// Files listed by default: enough for any real image's disks, few enough
/// that walking a huge tree cannot stall the handshake.
pub const DEFAULT_MAX_EXPORTS: usize = 1000;

pub const HELP: &str = "ext2file=<FILENAME>  (required) Absolute name of file to serve inside the\n                     disk image, or 'exportname' for client choice.\next2exports=<N>      With ext2file=exportname: list at most N files\n                     (default 1000, 0 lists none).\next2default=<FILE>   With ext2file=exportname: the file for export \"\".\next2journal=<MODE>   If the journal needs recovery: 'memory' (default)\n                     replays it in memory and serves read-only; 'replay'\n                     writes it into the image and serves read-write.\next2mapcache=<SIZE>  Memory for files' map blocks (default 16M).\next2discard=on|off   Trim the blocks the filesystem frees in the plugin\n                     once the change is committed (default on if the\n                     plugin can trim).";

/// The parameters that are ours; nbdkit hands every other one to the plugin.
pub const KEYS: &[&str] = &[
    "ext2file",
    "ext2exports",
    "ext2default",
    "ext2journal",
    "ext2mapcache",
    "ext2discard",
];

/// Whether `key` is one of our parameters.
pub fn is_ours(key: &str) -> bool {
    KEYS.contains(&key)
}

/// The message for a parameter of ours whose value is not UTF-8: paths and
/// modes are compared as text, and "repairing" the bytes could name
/// another file.
pub fn not_utf8(key: &str) -> String {
    format!("{key} parameter is not valid UTF-8")
}

/// Collects parameters as nbdkit hands them over.
#[derive(Debug, Default)]
pub struct ConfigBuilder {
    ext2file: Option<String>,
    max_exports: Option<usize>,
    default_export: Option<String>,
    journal: Option<JournalMode>,
    map_cache: Option<usize>,
    discard: Option<DiscardMode>,
}

impl ConfigBuilder {
    /// Takes `key=value` if it is ours: `Ok(true)`; `Ok(false)` passes it on
    /// to the plugin.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let twice = || format!("{key} parameter specified more than once");
        match key {
            "ext2file" => {
                if self.ext2file.replace(value.to_string()).is_some() {
                    return Err(twice());
                }
            }
            "ext2exports" => {
                let n = value.parse::<usize>().map_err(|_| {
                    format!("could not parse ext2exports: {value}: expecting a number of files")
                })?;
                if self.max_exports.replace(n).is_some() {
                    return Err(twice());
                }
            }
            "ext2default" => {
                if !value.starts_with('/') {
                    return Err("ext2default must refer to an absolute path".into());
                }
                if self.default_export.replace(value.to_string()).is_some() {
                    return Err(twice());
                }
            }
            "ext2journal" => {
                if self.journal.replace(JournalMode::parse(value)?).is_some() {
                    return Err(twice());
                }
            }
            "ext2mapcache" => {
                if self.map_cache.replace(parse_size(key, value)?).is_some() {
                    return Err(twice());
                }
            }
            "ext2discard" => {
                if self.discard.replace(DiscardMode::parse(value)?).is_some() {
                    return Err(twice());
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    pub fn finish(self) -> Result<Config, String> {
        let file = self.ext2file.ok_or(
            "you must supply ext2file=<FILE> parameter after the plugin name on the command line",
        )?;
        let target = if file == "exportname" {
            Target::ExportName
        } else if file.starts_with('/') {
            Target::File(file)
        } else {
            return Err("the file parameter must refer to an absolute path".into());
        };
        if target != Target::ExportName
            && (self.max_exports.is_some() || self.default_export.is_some())
        {
            return Err("ext2exports and ext2default need ext2file=exportname".into());
        }
        Ok(Config {
            target,
            max_exports: self.max_exports.unwrap_or(DEFAULT_MAX_EXPORTS),
            default_export: self.default_export,
            journal: self.journal.unwrap_or_default(),
            map_cache: self.map_cache.unwrap_or(DEFAULT_MAP_CACHE),
            discard: self.discard.unwrap_or_default(),
        })
    }
}

/// The path inside the image for a connection: the configured file, or the
/// export name made absolute (`disk.img` and `/disk.img` name one file).
pub fn path_for(target: &Target, export_name: &str) -> String {
    match target {
        Target::File(path) => path.clone(),
        Target::ExportName if export_name.starts_with('/') => export_name.to_string(),
        Target::ExportName => format!("/{export_name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parameter the help text names but `is_ours` does not know would
    /// reach the plugin as "unknown parameter".
    #[test]
    fn every_parameter_in_the_help_is_ours() {
        let named: Vec<&str> = HELP
            .lines()
            .filter_map(|line| line.split_once('=').map(|(key, _)| key))
            .filter(|key| key.starts_with("ext2") && !key.contains(' '))
            .collect();
        assert_eq!(named, KEYS);
    }

    fn build(params: &[(&str, &str)]) -> Result<Config, String> {
        let mut b = ConfigBuilder::default();
        for (k, v) in params {
            b.set(k, v)?;
        }
        b.finish()
    }

    #[test]
    fn absolute_path() {
        assert_eq!(
            build(&[("ext2file", "/disks/disk.img")]).unwrap().target,
            Target::File("/disks/disk.img".into())
        );
    }

    #[test]
    fn exportname_mode() {
        assert_eq!(
            build(&[("ext2file", "exportname")]).unwrap().target,
            Target::ExportName
        );
    }

    #[test]
    fn missing_parameter() {
        assert_eq!(
            build(&[]).unwrap_err(),
            "you must supply ext2file=<FILE> parameter after the plugin name on the command line"
        );
    }

    #[test]
    fn twice() {
        assert_eq!(
            build(&[("ext2file", "/a"), ("ext2file", "/b")]).unwrap_err(),
            "ext2file parameter specified more than once"
        );
    }

    #[test]
    fn relative_path() {
        assert_eq!(
            build(&[("ext2file", "disk.img")]).unwrap_err(),
            "the file parameter must refer to an absolute path"
        );
    }

    #[test]
    fn export_listing_parameters() {
        let c = build(&[
            ("ext2file", "exportname"),
            ("ext2exports", "5"),
            ("ext2default", "/d/a.img"),
        ])
        .unwrap();
        assert_eq!(c.max_exports, 5);
        assert_eq!(c.default_export.as_deref(), Some("/d/a.img"));
        let c = build(&[("ext2file", "exportname")]).unwrap();
        assert_eq!(
            (c.max_exports, c.default_export),
            (DEFAULT_MAX_EXPORTS, None)
        );
    }

    #[test]
    fn export_listing_parameters_are_checked() {
        assert!(
            build(&[("ext2file", "exportname"), ("ext2exports", "many")])
                .unwrap_err()
                .contains("could not parse ext2exports")
        );
        assert_eq!(
            build(&[("ext2file", "exportname"), ("ext2default", "a.img")]).unwrap_err(),
            "ext2default must refer to an absolute path"
        );
        assert_eq!(
            build(&[("ext2file", "/a"), ("ext2exports", "3")]).unwrap_err(),
            "ext2exports and ext2default need ext2file=exportname"
        );
        assert_eq!(
            build(&[
                ("ext2file", "exportname"),
                ("ext2exports", "3"),
                ("ext2exports", "4")
            ])
            .unwrap_err(),
            "ext2exports parameter specified more than once"
        );
    }

    #[test]
    fn journal_mode() {
        assert_eq!(
            build(&[("ext2file", "/a")]).unwrap().journal,
            JournalMode::Memory,
            "memory is the default"
        );
        assert_eq!(
            build(&[("ext2file", "/a"), ("ext2journal", "memory")])
                .unwrap()
                .journal,
            JournalMode::Memory
        );
        assert_eq!(
            build(&[("ext2journal", "replay"), ("ext2file", "exportname")])
                .unwrap()
                .journal,
            JournalMode::Replay
        );
    }

    #[test]
    fn journal_mode_is_checked() {
        for bad in ["", "Replay", "yes", "replay "] {
            assert_eq!(
                build(&[("ext2file", "/a"), ("ext2journal", bad)]).unwrap_err(),
                format!("could not parse ext2journal: {bad}: expecting 'memory' or 'replay'")
            );
        }
        assert_eq!(
            build(&[
                ("ext2file", "/a"),
                ("ext2journal", "replay"),
                ("ext2journal", "memory")
            ])
            .unwrap_err(),
            "ext2journal parameter specified more than once"
        );
    }

    #[test]
    fn discard_mode() {
        assert_eq!(
            build(&[("ext2file", "/a")]).unwrap().discard,
            DiscardMode::Auto,
            "on if the plugin can trim, by default"
        );
        for (value, mode) in [("on", DiscardMode::On), ("off", DiscardMode::Off)] {
            assert_eq!(
                build(&[("ext2file", "/a"), ("ext2discard", value)])
                    .unwrap()
                    .discard,
                mode
            );
        }
        for bad in ["", "yes", "ON", "1"] {
            assert_eq!(
                build(&[("ext2file", "/a"), ("ext2discard", bad)]).unwrap_err(),
                format!("could not parse ext2discard: {bad}: expecting 'on' or 'off'")
            );
        }
        assert_eq!(
            build(&[
                ("ext2file", "/a"),
                ("ext2discard", "on"),
                ("ext2discard", "off")
            ])
            .unwrap_err(),
            "ext2discard parameter specified more than once"
        );
    }

    #[test]
    fn help_names_every_parameter() {
        for key in ["ext2file=", "ext2exports=", "ext2default=", "ext2journal="] {
            assert!(HELP.contains(key), "{key} missing from HELP");
        }
        assert!(HELP.contains("'memory'") && HELP.contains("'replay'"));
    }

    #[test]
    fn other_keys_go_to_the_plugin() {
        let mut b = ConfigBuilder::default();
        assert_eq!(b.set("file", "fs.img"), Ok(false));
        assert!(!is_ours("file"));
    }

    #[test]
    fn every_key_of_ours_is_taken() {
        for key in KEYS {
            assert!(is_ours(key));
            let value = match *key {
                "ext2exports" => "1",
                "ext2journal" => "memory",
                "ext2mapcache" => "1M",
                "ext2discard" => "off",
                _ => "/a",
            };
            assert_eq!(ConfigBuilder::default().set(key, value), Ok(true), "{key}");
        }
    }

    #[test]
    fn export_names_become_absolute() {
        assert_eq!(path_for(&Target::ExportName, "disk.img"), "/disk.img");
        assert_eq!(path_for(&Target::ExportName, "/d/disk.img"), "/d/disk.img");
        assert_eq!(path_for(&Target::File("/x".into()), "ignored"), "/x");
    }
}
