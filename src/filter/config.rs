//! The filter's parameters, with the C filter's names and messages.

/// What the filter serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `ext2file=/path`: this file, whatever export name the client asks for.
    File(String),
    /// `ext2file=exportname`: the file the client names as its export.
    ExportName,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub target: Target,
}

pub const HELP: &str = "ext2file=<FILENAME>  (required) Absolute name of file to serve inside the\n                     disk image, or 'exportname' for client choice.";

/// Collects parameters as nbdkit hands them over.
#[derive(Debug, Default)]
pub struct ConfigBuilder {
    ext2file: Option<String>,
}

impl ConfigBuilder {
    /// Takes `key=value` if it is ours: `Ok(true)`; `Ok(false)` passes it on
    /// to the plugin.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        if key != "ext2file" {
            return Ok(false);
        }
        if self.ext2file.is_some() {
            return Err("ext2file parameter specified more than once".into());
        }
        self.ext2file = Some(value.to_string());
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
        Ok(Config { target })
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
    fn other_keys_go_to_the_plugin() {
        let mut b = ConfigBuilder::default();
        assert_eq!(b.set("file", "fs.img"), Ok(false));
    }

    #[test]
    fn export_names_become_absolute() {
        assert_eq!(path_for(&Target::ExportName, "disk.img"), "/disk.img");
        assert_eq!(path_for(&Target::ExportName, "/d/disk.img"), "/d/disk.img");
        assert_eq!(path_for(&Target::File("/x".into()), "ignored"), "/x");
    }
}
