//! Re-reading a file only when it changed. An atomic replace (temp file, rename) always
//! changes the inode; an in-place write changes the size or the times.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub fn of(md: &fs::Metadata) -> Stamp {
        Stamp {
            dev: md.dev(),
            ino: md.ino(),
            size: md.size(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
        }
    }
}

/// What [`read_changed`] found.
#[derive(Debug)]
pub enum Read {
    /// The file is still the version `known` stamps.
    Unchanged,
    /// The file's bytes, and the stamp of the version read (taken before reading, so a
    /// write during the read shows as a change next time).
    Changed { stamp: Stamp, bytes: Vec<u8> },
    /// No such file (or not a regular file; or a path component is not a directory).
    Missing,
    /// It exists but could not be read.
    Failed(io::Error),
}

/// Read `path` unless `known` stamps its current version. With nothing known the file
/// is opened straight away (one path lookup, the stamp from the open file); with a
/// stamp, an unchanged file costs one `stat`.
pub fn read_changed(path: &Path, known: Option<Stamp>) -> Read {
    if let Some(known) = known {
        match fs::metadata(path) {
            Ok(md) if !md.is_file() => return Read::Missing,
            Ok(md) if Stamp::of(&md) == known => return Read::Unchanged,
            Ok(_) => {}
            Err(e) if is_missing(&e) => return Read::Missing,
            Err(e) => return Read::Failed(e),
        }
    }
    // Non-blocking, so that a FIFO named like the file cannot hang the reader.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path);
    let mut file: File = match file {
        Ok(f) => f,
        Err(e) if is_missing(&e) => return Read::Missing,
        Err(e) => return Read::Failed(e),
    };
    let md = match file.metadata() {
        Ok(md) if md.is_file() => md,
        Ok(_) => return Read::Missing,
        Err(e) => return Read::Failed(e),
    };
    let mut bytes = Vec::with_capacity(md.len() as usize + 1);
    match file.read_to_end(&mut bytes) {
        Ok(_) => Read::Changed {
            stamp: Stamp::of(&md),
            bytes,
        },
        Err(e) => Read::Failed(e),
    }
}

fn is_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

#[cfg(test)]
mod tests {
    use mergen_testkit::TempDir;

    use super::*;

    fn changed(r: Read) -> (Stamp, Vec<u8>) {
        match r {
            Read::Changed { stamp, bytes } => (stamp, bytes),
            other => panic!("want the file's bytes, got {other:?}"),
        }
    }

    #[test]
    fn unchanged_until_replaced_or_rewritten() {
        let dir = TempDir::new("watch-stamp");
        let path = dir.join("meta.json");
        assert!(matches!(read_changed(&path, None), Read::Missing));
        fs::write(&path, b"one").unwrap();
        let (stamp, bytes) = changed(read_changed(&path, None));
        assert_eq!(bytes, b"one");
        assert!(matches!(read_changed(&path, Some(stamp)), Read::Unchanged));
        // Replaced atomically, same size: a new inode.
        let tmp = dir.join(".meta.json.tmp");
        fs::write(&tmp, b"two").unwrap();
        fs::rename(&tmp, &path).unwrap();
        let (stamp, bytes) = changed(read_changed(&path, Some(stamp)));
        assert_eq!(bytes, b"two");
        // Rewritten in place, another size.
        fs::write(&path, b"three").unwrap();
        let (_, bytes) = changed(read_changed(&path, Some(stamp)));
        assert_eq!(bytes, b"three");
        fs::remove_file(&path).unwrap();
        assert!(matches!(read_changed(&path, Some(stamp)), Read::Missing));
    }

    #[test]
    fn directories_fifos_and_files_in_the_way_are_missing() {
        let dir = TempDir::new("watch-stamp-odd");
        fs::create_dir(dir.join("meta.json")).unwrap();
        assert!(matches!(
            read_changed(&dir.join("meta.json"), None),
            Read::Missing
        ));
        fs::write(dir.join("file"), b"x").unwrap();
        assert!(matches!(
            read_changed(&dir.join("file").join("meta.json"), None),
            Read::Missing
        ));
        let fifo = dir.join("fifo");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
        )
        .unwrap();
        assert!(matches!(read_changed(&fifo, None), Read::Missing));
    }
}
