//! Listing the regular files of an image, for `ext2file=exportname`.

use std::collections::{HashSet, VecDeque};

use ext2_rs::error::Result;
use ext2_rs::{dir, Filesystem, Ino};

/// A file a client may ask for by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedFile {
    pub path: String,
    pub size: u64,
}

/// Directory entries examined at most, whatever `max` is: listing must not
/// stall the handshake on an image with millions of files.
const MAX_ENTRIES_SCANNED: usize = 200_000;

/// The first `max` regular files, breadth first from the root, names in
/// byte order within each directory.  Directories seen twice (a damaged
/// image) are walked once.  Names that are not UTF-8 are skipped: an NBD
/// export name is a UTF-8 string.
pub fn list_files(fs: &mut Filesystem, max: usize) -> Result<Vec<ListedFile>> {
    let mut out = Vec::new();
    let root: Ino = ext2_rs::sys::EXT2_ROOT_INO;
    let mut queue: VecDeque<(Ino, String)> = VecDeque::from([(root, String::new())]);
    let mut seen: HashSet<Ino> = HashSet::from([root]);
    let mut scanned = 0usize;
    while let Some((dir_ino, dir_path)) = queue.pop_front() {
        if out.len() >= max || scanned >= MAX_ENTRIES_SCANNED {
            break;
        }
        let Ok(mut entries) = dir::read_dir(fs, dir_ino) else {
            continue; // an unreadable directory hides its files, nothing more
        };
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        for entry in entries {
            scanned += 1;
            let Ok(name) = String::from_utf8(entry.name) else {
                continue;
            };
            let path = format!("{dir_path}/{name}");
            let Ok(info) = fs.inode(entry.ino) else {
                continue;
            };
            if info.is_regular() {
                if out.len() < max {
                    out.push(ListedFile {
                        path,
                        size: info.size,
                    });
                }
            } else if info.is_dir() && seen.insert(entry.ino) {
                queue.push_back((entry.ino, path));
            }
        }
    }
    Ok(out)
}
