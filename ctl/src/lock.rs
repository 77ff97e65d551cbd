//! File locks: the per-VM lifecycle lock (`$MGR_RUN_ROOT/<id>.lock`, non-blocking, a
//! held lock is a 409) and the host-wide allocation lock (blocking).
//!
//! Both are `flock`s on an open file: the kernel drops them when the file is closed,
//! so they are released on every path, including errors, panics and a killed process.

use std::fs::{File, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use mergen_model::atomic::FILE_MODE;

use rustix::fs::{flock, FlockOperation};

/// A held flock; dropping it closes the file and releases the lock.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

pub enum TryLock {
    Acquired(FileLock),
    Held,
}

/// Lock files are the VM's files too: 0640 whatever the umask.
fn open(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(path)?;
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

impl FileLock {
    /// Take the lock without waiting.
    pub fn try_acquire(path: &Path) -> io::Result<TryLock> {
        let file = open(path)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(TryLock::Acquired(FileLock { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(TryLock::Held),
            Err(e) => Err(e.into()),
        }
    }

    /// Wait for the lock. Each call opens its own file description, so threads of one
    /// process exclude each other as well as other processes.
    pub fn acquire(path: &Path) -> io::Result<FileLock> {
        let file = open(path)?;
        loop {
            match flock(&file, FlockOperation::LockExclusive) {
                Ok(()) => return Ok(FileLock { _file: file }),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_drop() {
        let path = std::env::temp_dir().join(format!("mergen-ctl-lock-{}", std::process::id()));
        let first = match FileLock::try_acquire(&path).unwrap() {
            TryLock::Acquired(l) => l,
            TryLock::Held => panic!("fresh lock held"),
        };
        assert!(matches!(
            FileLock::try_acquire(&path).unwrap(),
            TryLock::Held
        ));
        drop(first);
        assert!(matches!(
            FileLock::try_acquire(&path).unwrap(),
            TryLock::Acquired(_)
        ));
        std::fs::remove_file(&path).unwrap();
    }
}
