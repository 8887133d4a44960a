//! Judging a crash state the way a user's machine would: recover it as
//! boot does (journal replay, or `fsck -p`), check it with `e2fsck -fn`,
//! and compare every file with what its writer may expect.  Optionally the
//! kernel judges too: mount (which replays the journal), read, unmount,
//! `e2fsck -fn`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use super::CrashState;

/// How the filesystem is recovered before it is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The journal's replay alone: `e2fsck -p -E journal_only`.
    JournalReplay,
    /// Boot's check: `e2fsck -p` must repair without asking.
    Preen,
}

/// What a client did to one file, for judging what a crash may leave.
#[derive(Clone, Debug)]
pub struct FileHistory {
    pub path: String,
    pub initial: Vec<u8>,
    /// In the order the client saw them complete.
    pub events: Vec<Event>,
}

#[derive(Clone, Debug)]
pub enum Event {
    /// Bytes written (zeroes for zero or trim); a FUA write is durable once
    /// the device has seen `durable_at` requests.
    Write {
        offset: u64,
        data: Vec<u8>,
        durable_at: Option<usize>,
    },
    /// A flush that completed when the device had seen `requests` requests.
    Flush { requests: usize },
}

impl FileHistory {
    pub fn new(path: &str, initial: Vec<u8>) -> FileHistory {
        FileHistory {
            path: path.to_string(),
            initial,
            events: Vec::new(),
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.events.push(Event::Write {
            offset,
            data: data.to_vec(),
            durable_at: None,
        });
    }

    /// A write with FUA, which completed when the device had seen
    /// `requests` requests.
    pub fn write_durable(&mut self, offset: u64, data: &[u8], requests: usize) {
        self.events.push(Event::Write {
            offset,
            data: data.to_vec(),
            durable_at: Some(requests),
        });
    }

    pub fn flush(&mut self, requests: usize) {
        self.events.push(Event::Flush { requests });
    }

    /// Checks `got` (the file after a crash that kept requests
    /// `0..durable`): every byte written before the last flush that
    /// completed within them, or by a FUA write that completed within them,
    /// is there, and any other byte holds that value or one a later write
    /// gave it.  So nothing acknowledged is lost and no byte comes from
    /// anywhere else (stale blocks, other files).
    pub fn check(&self, got: &[u8], durable: usize) -> Result<(), String> {
        if got.len() != self.initial.len() {
            return Err(format!(
                "{}: {} bytes, expected {}",
                self.path,
                got.len(),
                self.initial.len()
            ));
        }
        let is_durable = |at: &Option<usize>| at.is_some_and(|n| n <= durable);
        // The last flush known complete: everything before it is settled.
        let settled = self
            .events
            .iter()
            .rposition(|e| matches!(e, Event::Flush { requests } if *requests <= durable))
            .map_or(0, |i| i + 1);
        // The bytes each must hold, and from which event on a later write
        // may have replaced them.
        let mut model = self.initial.clone();
        let mut floor = vec![0usize; model.len()];
        for (i, event) in self.events.iter().enumerate() {
            if let Event::Write {
                offset,
                data,
                durable_at,
            } = event
            {
                if i < settled || is_durable(durable_at) {
                    let at = *offset as usize;
                    model[at..at + data.len()].copy_from_slice(data);
                    floor[at..at + data.len()].fill(i + 1);
                }
            }
        }
        for f in &mut floor {
            *f = (*f).max(settled);
        }
        for (i, (&byte, &expected)) in got.iter().zip(&model).enumerate() {
            if byte == expected {
                continue;
            }
            let at = i as u64;
            let explained = self.events.iter().enumerate().skip(floor[i]).any(|(_, e)| {
                matches!(e, Event::Write { offset, data, .. }
                    if at >= *offset
                        && at < offset + data.len() as u64
                        && data[(at - offset) as usize] == byte)
            });
            if !explained {
                return Err(format!(
                    "{}: byte {i} is {byte:#04x}, expected {expected:#04x} (settled after {} of \
                     {} events) or a value written later",
                    self.path,
                    floor[i],
                    self.events.len()
                ));
            }
        }
        Ok(())
    }
}

fn run(program: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs ({e}): install e2fsprogs"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `debugfs dump` of `path` in `image`.
pub fn dump(image: &Path, path: &str, dir: &Path) -> Result<Vec<u8>, String> {
    let out = dir.join("dumped");
    let _ = std::fs::remove_file(&out);
    let request = format!("dump {path} {}", out.display());
    let (_, text) = run("debugfs", &["-R", &request, &image.to_string_lossy()]);
    std::fs::read(&out).map_err(|e| format!("debugfs could not dump {path} ({e}): {text}"))
}

/// Recovers `state` as `recovery` says, checks it with `e2fsck -fn` and
/// checks each file in `files`; `Err` says what is wrong.  Works in `dir`.
pub fn judge(
    state: &CrashState,
    dir: &Path,
    recovery: Recovery,
    files: &[FileHistory],
) -> Result<(), String> {
    let image = dir.join("state.img");
    std::fs::write(&image, &state.image).map_err(|e| e.to_string())?;
    let img = image.to_string_lossy().into_owned();
    let what = state.describe();
    match recovery {
        Recovery::JournalReplay => {
            let (code, text) = run("e2fsck", &["-p", "-E", "journal_only", &img]);
            if code > 1 {
                return Err(format!("{what}: journal replay failed ({code}):\n{text}"));
            }
        }
        Recovery::Preen => {
            let (code, text) = run("e2fsck", &["-p", &img]);
            if code > 1 || text.contains("UNEXPECTED INCONSISTENCY") {
                return Err(format!(
                    "{what}: fsck -p could not repair it alone ({code}):\n{text}"
                ));
            }
        }
    }
    let (code, text) = run("e2fsck", &["-fn", &img]);
    if code != 0 {
        return Err(format!(
            "{what}: e2fsck -fn after recovery ({code}):\n{text}"
        ));
    }
    for file in files {
        let got = dump(&image, &file.path, dir).map_err(|e| format!("{what}: {e}"))?;
        file.check(&got, state.durable)
            .map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(())
}

static NO_MOUNT_SAID: AtomicBool = AtomicBool::new(false);

/// Whether this machine's kernel mounts `image` read-write as it is (the filesystem a
/// workload starts from): `Err` with why not, the kernel's own words when
/// `dmesg` can be read (a kernel built without `CONFIG_QUOTA` refuses every
/// filesystem with the `quota` feature), so that the caller can skip the
/// kernel's half of the check for it, saying so.
pub fn kernel_mounts(image: &[u8], dir: &Path) -> Result<(), String> {
    let path = dir.join("probe.img");
    std::fs::write(&path, image).map_err(|e| e.to_string())?;
    let img = path.to_string_lossy().into_owned();
    let mnt: PathBuf = dir.join("mnt");
    std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
    let (code, text) = run("mount", &["-o", "loop", &img, &mnt.to_string_lossy()]);
    let result = if code == 0 {
        let (code, text) = run("umount", &[&mnt.to_string_lossy()]);
        if code == 0 {
            Ok(())
        } else {
            Err(format!("umount failed: {text}"))
        }
    } else {
        let kernel = Command::new("dmesg")
            .output()
            .ok()
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .rev()
                    .find(|line| line.contains("EXT4-fs"))
                    .map(|line| line.to_string())
            })
            .unwrap_or_default();
        Err(format!("{} {}", text.trim(), kernel.trim()))
    };
    let _ = std::fs::remove_file(&path);
    result
}

/// The kernel as a second judge: loop-mounts `state` (replaying its
/// journal; for an unjournalled filesystem after `e2fsck -p`), reads each
/// file through the mount, unmounts, and runs `e2fsck -fn`.  `Ok(false)`
/// when this machine cannot mount (said once on standard error).
pub fn judge_with_kernel(
    state: &CrashState,
    dir: &Path,
    recovery: Recovery,
    files: &[FileHistory],
) -> Result<bool, String> {
    let image = dir.join("kernel.img");
    std::fs::write(&image, &state.image).map_err(|e| e.to_string())?;
    let img = image.to_string_lossy().into_owned();
    let what = state.describe();
    if recovery == Recovery::Preen {
        let (code, text) = run("e2fsck", &["-p", &img]);
        if code > 1 {
            return Err(format!("{what}: fsck -p ({code}):\n{text}"));
        }
    }
    let mnt: PathBuf = dir.join("mnt");
    std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
    let (code, text) = run("mount", &["-o", "loop", &img, &mnt.to_string_lossy()]);
    if code != 0 {
        if text.contains("permission denied")
            || text.contains("must be superuser")
            || text.contains("only root")
            || text.contains("failed to setup loop device")
            // util-linux 2.42 (sid) spells it "set up".
            || text.contains("failed to set up loop device")
            || text.contains("Operation not permitted")
        {
            if !NO_MOUNT_SAID.swap(true, Ordering::Relaxed) {
                eprintln!(
                    "crash states: this machine cannot loop-mount images ({}): the kernel's half of \
                     the check is skipped",
                    text.trim()
                );
            }
            return Ok(false);
        }
        return Err(format!(
            "{what}: the kernel refuses to mount it ({code}):\n{text}"
        ));
    }
    let mut result = Ok(());
    for file in files {
        let inside = mnt.join(file.path.trim_start_matches('/'));
        match std::fs::read(&inside) {
            Ok(got) => {
                if let Err(e) = file.check(&got, state.durable) {
                    result = Err(format!("{what}: read through the kernel: {e}"));
                    break;
                }
            }
            Err(e) => {
                result = Err(format!("{what}: the kernel cannot read {}: {e}", file.path));
                break;
            }
        }
    }
    // Another process may still be looking at the mount for a moment (a
    // desktop's or udev's probes): try again for a while.
    let mut attempts = 0;
    loop {
        let (code, text) = run("umount", &[&mnt.to_string_lossy()]);
        if code == 0 {
            break;
        }
        attempts += 1;
        if attempts == 100 {
            return Err(format!("{what}: umount failed: {text}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    result?;
    let (code, text) = run("e2fsck", &["-fn", &img]);
    if code != 0 {
        return Err(format!(
            "{what}: e2fsck -fn after the kernel mounted it ({code}):\n{text}"
        ));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_allows_old_or_later_bytes_only() {
        let mut h = FileHistory::new("/f", vec![0; 8]);
        h.write(0, &[1, 1]);
        h.flush(5);
        h.write(1, &[2, 2]);
        // Nothing durable: anything written may or may not be there.
        assert!(h.check(&[0, 2, 0, 0, 0, 0, 0, 0], 0).is_ok());
        assert!(h.check(&[1, 0, 0, 0, 0, 0, 0, 0], 0).is_ok());
        // The flush completed: the first write must be there.
        assert!(h.check(&[0, 1, 0, 0, 0, 0, 0, 0], 5).is_err());
        assert!(h.check(&[1, 2, 2, 0, 0, 0, 0, 0], 5).is_ok());
        assert!(h.check(&[1, 1, 0, 0, 0, 0, 0, 0], 9).is_ok());
        assert!(h.check(&[1, 1, 7, 0, 0, 0, 0, 0], 9).is_err(), "stale byte");
        assert!(h.check(&[1, 1], 9).is_err(), "size");
        // A FUA write is durable on its own, and only later writes may
        // have replaced it.
        let mut h = FileHistory::new("/f", vec![0; 4]);
        h.write(0, &[5, 5]);
        h.write_durable(0, &[6, 6], 3);
        h.write(1, &[7]);
        assert!(h.check(&[0, 0, 0, 0], 2).is_ok());
        assert!(h.check(&[0, 0, 0, 0], 3).is_err(), "the FUA write is lost");
        assert!(
            h.check(&[5, 6, 0, 0], 3).is_err(),
            "older than the FUA write"
        );
        assert!(h.check(&[6, 7, 0, 0], 3).is_ok());
    }
}
