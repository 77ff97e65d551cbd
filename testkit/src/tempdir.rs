use std::path::{Path, PathBuf};

/// A fresh directory `mergen-<tag>-<pid>-<n>` (by default under the system temp dir), removed with
/// everything in it on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        TempDir::new_in(&std::env::temp_dir(), tag)
    }

    /// Like `new`, under `base` instead of the system temp dir.
    pub fn new_in(base: &Path, tag: &str) -> TempDir {
        let dir = base.join(format!(
            "mergen-{tag}-{}-{}",
            std::process::id(),
            crate::next()
        ));
        // A leftover of an earlier process with the same pid is not ours to keep.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
