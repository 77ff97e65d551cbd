//! A root of VM directories followed with inotify: the root, for directories that come
//! and go (created, renamed in or out, removed), and each VM directory, for its
//! `meta.json` being written, replaced or removed. [`VmDirs`] keeps track of which watch
//! is which directory and turns a batch of events into the directories to re-read.
//!
//! Its owner reads the files: the forwarder on its watcher thread, mergend when it
//! drains its instance. Both follow the same order, so nothing falls between a read and
//! a watch: watch the root before listing it, and a directory before reading its file.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};

use inotify::{EventMask, EventOwned, WatchDescriptor, WatchMask, Watches};

/// The file in each VM directory.
pub const META_FILE: &str = "meta.json";

/// Whether an entry of the root can be a VM: dot-names are the temporary files and
/// directories of atomic writes, creates and deletes.
pub fn is_candidate(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.')
}

/// What a batch of events means for a table of the root's `meta.json` files.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Events were lost, or the root itself went away: only a full rescan is right.
    pub rescan: bool,
    /// The directories whose `meta.json` may have appeared, changed or gone; sorted,
    /// each once.
    pub dirs: Vec<String>,
}

/// Which watch is which directory of the root.
#[derive(Debug)]
pub struct VmDirs {
    root: PathBuf,
    root_wd: Option<WatchDescriptor>,
    dirs: HashMap<WatchDescriptor, String>,
    by_name: HashMap<String, WatchDescriptor>,
    /// Directories the kernel's watch limit left unwatched: their owner has to look at
    /// them itself (see [`VmDirs::unwatched`]).
    unwatched: BTreeSet<String>,
    /// The watch limit was hit: said once.
    warned_limit: bool,
}

impl VmDirs {
    pub fn new(root: &Path) -> VmDirs {
        VmDirs {
            root: root.to_path_buf(),
            root_wd: None,
            dirs: HashMap::new(),
            by_name: HashMap::new(),
            unwatched: BTreeSet::new(),
            warned_limit: false,
        }
    }

    fn root_mask() -> WatchMask {
        WatchMask::CREATE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF
            | WatchMask::ONLYDIR
    }

    fn dir_mask() -> WatchMask {
        WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE
            | WatchMask::CREATE
            | WatchMask::ONLYDIR
    }

    /// Watch the root, unless it is watched already; whether it is watched now. A root
    /// that does not exist yet is not an error: a full rescan tries again.
    pub fn watch_root(&mut self, watches: &mut Watches) -> bool {
        if self.root_wd.is_some() {
            return true;
        }
        match watches.add(&self.root, Self::root_mask()) {
            Ok(wd) => {
                self.root_wd = Some(wd);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => {
                log::warn!(root = self.root.display().to_string(), error = e.to_string(); "cannot watch the VM root");
                false
            }
        }
    }

    /// Whether the root is watched: without it, only full rescans see anything.
    pub fn watches_root(&self) -> bool {
        self.root_wd.is_some()
    }

    /// Watch every directory of a full listing of the root that is not watched yet (a
    /// name that is not a directory is skipped by the kernel), and forget unwatched
    /// names that are no longer listed. Call it before reading their files.
    pub fn watch_listing(&mut self, watches: &mut Watches, names: &[String]) {
        let listed: BTreeSet<&str> = names.iter().map(String::as_str).collect();
        self.unwatched.retain(|n| listed.contains(n.as_str()));
        for name in names {
            if !self.by_name.contains_key(name) {
                self.watch_dir(watches, name);
            }
        }
    }

    /// Directories that could not be watched (the kernel's watch limit): changes in
    /// them are seen only by looking.
    pub fn unwatched(&self) -> impl Iterator<Item = &str> {
        self.unwatched.iter().map(String::as_str)
    }

    fn watch_dir(&mut self, watches: &mut Watches, name: &str) {
        match watches.add(self.root.join(name), Self::dir_mask()) {
            Ok(wd) => {
                self.unwatched.remove(name);
                self.dirs.insert(wd.clone(), name.to_string());
                self.by_name.insert(name.to_string(), wd);
            }
            // Not a directory, or gone already: nothing to follow.
            Err(e)
                if e.raw_os_error() == Some(libc::ENOTDIR)
                    || e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                self.unwatched.insert(name.to_string());
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    if !self.warned_limit {
                        self.warned_limit = true;
                        log::warn!(watches = self.dirs.len(); "inotify watch limit reached (fs.inotify.max_user_watches): further VM directories are checked by looking at them");
                    }
                } else {
                    log::warn!(dir = name, error = e.to_string(); "cannot watch VM directory");
                }
            }
        }
    }

    fn unwatch(&mut self, watches: &mut Watches, name: &str) {
        self.unwatched.remove(name);
        if let Some(wd) = self.by_name.remove(name) {
            self.dirs.remove(&wd);
            let _ = watches.remove(wd);
        }
    }

    /// What `events` (with `lost` set when some were dropped) mean; new directories are
    /// watched before this returns, so their files can be read right away.
    pub fn apply(&mut self, watches: &mut Watches, events: Vec<EventOwned>, lost: bool) -> Changes {
        let mut changes = Changes {
            rescan: lost,
            dirs: Vec::new(),
        };
        let mut new_dirs = Vec::new();
        for ev in events {
            if ev.mask.contains(EventMask::Q_OVERFLOW) {
                changes.rescan = true;
                continue;
            }
            let name = ev.name.and_then(|n| n.into_string().ok());
            if Some(&ev.wd) == self.root_wd.as_ref() {
                if ev
                    .mask
                    .intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF)
                {
                    // The root itself went away: start over when it comes back.
                    self.root_wd = None;
                    changes.rescan = true;
                    continue;
                }
                let Some(name) = name.filter(|n| is_candidate(n)) else {
                    continue;
                };
                if ev.mask.contains(EventMask::ISDIR) {
                    if ev.mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
                        new_dirs.push(name.clone());
                    } else if ev
                        .mask
                        .intersects(EventMask::MOVED_FROM | EventMask::DELETE)
                    {
                        // Moved elsewhere, it would still be watched under its old name.
                        self.unwatch(watches, &name);
                    }
                }
                changes.dirs.push(name);
            } else if let Some(dir) = self.dirs.get(&ev.wd) {
                if ev.mask.contains(EventMask::IGNORED) {
                    // The directory is gone (or its watch was removed).
                    let dir = dir.clone();
                    self.dirs.remove(&ev.wd);
                    if self.by_name.get(&dir) == Some(&ev.wd) {
                        self.by_name.remove(&dir);
                    }
                    changes.dirs.push(dir);
                } else if name.as_deref() == Some(META_FILE) {
                    changes.dirs.push(dir.clone());
                }
            }
        }
        for name in new_dirs {
            // Renamed back in under a name still watched: the old watch is stale.
            self.unwatch(watches, &name);
            self.watch_dir(watches, &name);
        }
        changes.dirs.sort();
        changes.dirs.dedup();
        changes
    }
}

#[cfg(test)]
mod tests {
    use inotify::Inotify;
    use mergen_testkit::TempDir;

    use super::*;

    /// Every event queued now, applied.
    fn changes(inotify: &mut Inotify, dirs: &mut VmDirs) -> Changes {
        let mut buf = vec![0u8; 64 * 1024];
        let (events, lost) = crate::drain(inotify, &mut buf);
        dirs.apply(&mut inotify.watches(), events, lost)
    }

    fn names(c: &Changes) -> Vec<&str> {
        c.dirs.iter().map(String::as_str).collect()
    }

    #[test]
    fn directories_and_their_files_are_followed() {
        let root = TempDir::new("watch-vmdirs");
        let outside = TempDir::new("watch-vmdirs-out");
        std::fs::create_dir(root.join("a")).unwrap();
        let mut inotify = Inotify::init().unwrap();
        let mut dirs = VmDirs::new(root.path());
        assert!(dirs.watch_root(&mut inotify.watches()));
        dirs.watch_listing(&mut inotify.watches(), &["a".to_string()]);
        assert_eq!(changes(&mut inotify, &mut dirs), Changes::default());

        // Seen as soon as the call that made it returned: no waiting.
        std::fs::write(root.join("a").join(META_FILE), b"{}").unwrap();
        std::fs::write(root.join("a").join("env"), b"x").unwrap();
        assert_eq!(names(&changes(&mut inotify, &mut dirs)), ["a"]);

        // A directory built aside and renamed in, as mergend commits a create; a
        // temporary dot-name is nobody's business.
        std::fs::create_dir(root.join(".tmp-b")).unwrap();
        std::fs::write(root.join(".tmp-b").join(META_FILE), b"{}").unwrap();
        std::fs::rename(root.join(".tmp-b"), root.join("b")).unwrap();
        assert_eq!(names(&changes(&mut inotify, &mut dirs)), ["b"]);
        // ... and is watched from then on.
        std::fs::write(root.join("b").join(META_FILE), b"{\"x\":1}").unwrap();
        assert_eq!(names(&changes(&mut inotify, &mut dirs)), ["b"]);

        // Moved out, changed outside (unseen), moved back, changed again.
        std::fs::rename(root.join("b"), outside.join("b")).unwrap();
        assert_eq!(names(&changes(&mut inotify, &mut dirs)), ["b"]);
        std::fs::write(outside.join("b").join(META_FILE), b"{}").unwrap();
        assert_eq!(changes(&mut inotify, &mut dirs), Changes::default());
        std::fs::rename(outside.join("b"), root.join("b")).unwrap();
        assert_eq!(names(&changes(&mut inotify, &mut dirs)), ["b"]);
        std::fs::write(root.join("b").join(META_FILE), b"{}").unwrap();
        assert_eq!(names(&changes(&mut inotify, &mut dirs)), ["b"]);

        // Removed, as mergend deletes: renamed away first, then removed.
        std::fs::rename(root.join("a"), root.join(".del-a")).unwrap();
        std::fs::remove_dir_all(root.join(".del-a")).unwrap();
        assert_eq!(names(&changes(&mut inotify, &mut dirs)), ["a"]);
        assert!(dirs.unwatched().next().is_none());

        // The root itself removed: only a rescan is right.
        drop(root);
        let c = changes(&mut inotify, &mut dirs);
        assert!(c.rescan, "{c:?}");
        assert!(!dirs.watches_root());
    }
}
