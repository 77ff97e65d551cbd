//! Crash-safe file writes: temp file in the same directory, fsync, rename, fsync the
//! directory. After a power cut a reader sees either the old file or the new one.
//!
//! Modes are exact, whatever the process umask: the original wrote every file 0640
//! and every directory 0750 (hook headers may hold tokens, env files secrets), and a
//! umask of 000 must not make them world-readable.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The mode of every file mergen writes for a VM (as the original).
pub const FILE_MODE: u32 = 0o640;
/// The mode of every directory mergen makes for a VM (as the original).
pub const DIR_MODE: u32 = 0o750;

/// Create (exclusively) and open `path` for writing with exactly `mode`.
pub fn create_file(path: &Path, mode: u32) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    // The umask may have taken bits away (or the caller's mode is wider than it): set
    // the mode itself.
    f.set_permissions(Permissions::from_mode(mode))?;
    Ok(f)
}

/// Make the directory `path` with exactly `mode` (its parent must exist).
pub fn create_dir(path: &Path, mode: u32) -> io::Result<()> {
    DirBuilder::new().mode(mode).create(path)?;
    fs::set_permissions(path, Permissions::from_mode(mode))
}

/// Make `path` and any missing parents, each new one with exactly `mode`; existing
/// directories are left as they are.
pub fn create_dir_all(path: &Path, mode: u32) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all(parent, mode)?;
    }
    match create_dir(path, mode) {
        // Made meanwhile by someone else: fine, as for fs::create_dir_all.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        r => r,
    }
}

/// Write `bytes` to `path` atomically and durably, with exactly `mode`.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent"))?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    // Unique per process and call, so two writers of one file never share a temp file.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = create_file(&tmp, mode)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `value` as pretty JSON: two-space indent and a trailing newline, as the original
/// wrote it.
pub fn pretty_json<T: serde::Serialize>(value: &T) -> io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Write `value` as [`pretty_json`] atomically, mode [`FILE_MODE`].
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> io::Result<()> {
    write_file(path, &pretty_json(value)?, FILE_MODE)
}

/// fsync a directory so that a rename or a new entry inside it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pretty_json_with_trailing_newline_and_no_temp_left() {
        let dir = std::env::temp_dir().join(format!("mergen-model-atomic-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.json");
        write_json(&path, &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "{\n  \"a\": 1\n}\n");
        let entries: Vec<_> = fs::read_dir(&dir).unwrap().collect();
        assert_eq!(entries.len(), 1, "temp file left behind");
        fs::remove_dir_all(&dir).unwrap();
    }

    /// Exact modes even when the requested mode has bits the umask would clear or
    /// when the umask is wider than the mode (the process umask is not changed here:
    /// other tests run in parallel; the daemon test runs under umask 000 and 077).
    #[test]
    fn modes_are_exact() {
        let dir = std::env::temp_dir().join(format!("mergen-model-modes-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        create_dir_all(&dir.join("a/b"), DIR_MODE).unwrap();
        for d in [dir.clone(), dir.join("a"), dir.join("a/b")] {
            assert_eq!(
                fs::metadata(&d).unwrap().permissions().mode() & 0o7777,
                DIR_MODE
            );
        }
        write_json(&dir.join("a/x.json"), &1).unwrap();
        let m = fs::metadata(dir.join("a/x.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o7777, FILE_MODE);
        write_file(&dir.join("a/y"), b"y", 0o666).unwrap();
        let m = fs::metadata(dir.join("a/y")).unwrap().permissions().mode();
        assert_eq!(m & 0o7777, 0o666, "wider than the usual umask allows");
        fs::remove_dir_all(&dir).unwrap();
    }
}
