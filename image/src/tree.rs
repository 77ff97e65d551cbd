//! The root filesystem being built: layers are applied to a directory on disk, and a
//! map of every path in it records what the layers said about that path (owner,
//! mode, mtime, xattrs, device numbers). The map is the truth for `rootfs.tar` and
//! for the final metadata pass, so the result does not depend on what this host let
//! us do (a non-root run cannot chown or mknod) or on the order of operations
//! (removing a whited-out file touches its directory's mtime).
//!
//! Safety: every entry path is checked lexically (no absolute paths, no `..`), and its
//! parent directories are resolved component by component *inside* the root: a
//! symlink met on the way is followed with the root as `/`, and one that would climb
//! above the root is refused. The entry's own last component is never followed: what
//! is there is removed first and the new entry created in its place.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{FileType, Mode, Timespec, Timestamps, UTIME_OMIT};

use crate::error::{Error, IoContext, Result};

/// A path relative to the root, as components (`etc/passwd`); the map's sort order
/// (component-wise) puts every directory before what it holds.
pub type RelPath = PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink(PathBuf),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub uid: u64,
    pub gid: u64,
    /// Permission bits with setuid/setgid/sticky (`0o7777`).
    pub mode: u32,
    pub mtime: u64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

pub struct Tree {
    root: PathBuf,
    pub entries: BTreeMap<RelPath, Meta>,
    /// The mtime of what the converter makes itself (implicit parents, injected files).
    pub default_mtime: u64,
    privileged: bool,
    /// Paths this layer created or reused (and their parents), for opaque directories.
    current: BTreeSet<RelPath>,
    /// What this host did not let us reproduce on disk (rootfs.tar still has it).
    pub skipped: Vec<String>,
}

/// A tar entry's path, checked: relative, no `..`; `.` components dropped.
pub fn clean_entry_path(raw: &Path) -> Result<RelPath> {
    let shown = raw.display();
    if raw.is_absolute() {
        return Err(Error::PathEscape(format!("{shown}: absolute path")));
    }
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(Error::PathEscape(format!("{shown}: contains `..`")))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(Error::PathEscape(format!("{shown}: absolute path")))
            }
        }
    }
    Ok(out)
}

impl Tree {
    /// A new, empty root at `root` (created).
    pub fn create(root: &Path, default_mtime: u64) -> Result<Tree> {
        fs::create_dir_all(root).ctx(|| format!("creating {}", root.display()))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o755))
            .ctx(|| format!("chmod {}", root.display()))?;
        Ok(Tree {
            root: root.to_path_buf(),
            entries: BTreeMap::new(),
            default_mtime,
            privileged: rustix::process::geteuid().is_root(),
            current: BTreeSet::new(),
            skipped: Vec::new(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn host(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    /// Starts a new layer (opaque directories hide only what earlier layers made).
    pub fn begin_layer(&mut self) {
        self.current.clear();
    }

    /// Resolves `rel`'s parent inside the root, creating missing directories, and
    /// returns the real relative path of the entry (its parent with symlinks resolved).
    pub fn place(&mut self, rel: &Path) -> Result<RelPath> {
        let name = rel
            .file_name()
            .ok_or_else(|| Error::PathEscape(format!("{}: no file name", rel.display())))?;
        let parent = self.resolve_dir(rel.parent().unwrap_or(Path::new("")), rel, true)?;
        Ok(parent.join(name))
    }

    /// Walks `dir` from the root following symlinks as the guest would see them.
    fn resolve_dir(&mut self, dir: &Path, entry: &Path, create: bool) -> Result<RelPath> {
        let mut todo: Vec<PathBuf> = dir
            .components()
            .rev()
            .map(|c| PathBuf::from(c.as_os_str()))
            .collect();
        let mut at = PathBuf::new();
        let mut hops = 0;
        while let Some(comp) = todo.pop() {
            if comp.as_os_str() == ".." {
                if !at.pop() {
                    return Err(Error::PathEscape(format!(
                        "{}: a symlink on its path leads out of the root",
                        entry.display()
                    )));
                }
                continue;
            }
            if comp.as_os_str() == "." || comp.as_os_str().is_empty() {
                continue;
            }
            let next = at.join(&comp);
            let host = self.host(&next);
            match fs::symlink_metadata(&host) {
                Ok(m) if m.is_dir() => {
                    self.current.insert(next.clone());
                    at = next;
                }
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > 40 {
                        return Err(Error::Invalid(format!(
                            "{}: too many symlinks on its path",
                            entry.display()
                        )));
                    }
                    let target =
                        fs::read_link(&host).ctx(|| format!("reading {}", host.display()))?;
                    if target.is_absolute() {
                        at = PathBuf::new();
                    }
                    for c in target.components().rev() {
                        match c {
                            Component::RootDir | Component::Prefix(_) => {}
                            other => todo.push(PathBuf::from(other.as_os_str())),
                        }
                    }
                }
                Ok(_) => {
                    return Err(Error::Invalid(format!(
                        "{}: {} is not a directory",
                        entry.display(),
                        next.display()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&host).ctx(|| format!("creating {}", host.display()))?;
                    self.entries.insert(next.clone(), self.implicit_dir());
                    self.current.insert(next.clone());
                    at = next;
                }
                Err(e) => return Err(Error::io(format!("looking at {}", host.display()), e)),
            }
        }
        Ok(at)
    }

    fn implicit_dir(&self) -> Meta {
        Meta {
            kind: Kind::Dir,
            uid: 0,
            gid: 0,
            mode: 0o755,
            mtime: self.default_mtime,
            xattrs: Vec::new(),
        }
    }

    /// Removes whatever is at `rel` (not following a symlink), on disk and in the map.
    pub fn remove(&mut self, rel: &Path) -> Result<()> {
        let host = self.host(rel);
        match fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() => {
                fs::remove_dir_all(&host).ctx(|| format!("removing {}", host.display()))?
            }
            Ok(_) => fs::remove_file(&host).ctx(|| format!("removing {}", host.display()))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("looking at {}", host.display()), e)),
        }
        self.forget(rel);
        Ok(())
    }

    /// Drops `rel` and everything under it from the map.
    fn forget(&mut self, rel: &Path) {
        let under: Vec<RelPath> = self
            .entries
            .range(rel.to_path_buf()..)
            .take_while(|(k, _)| k.starts_with(rel))
            .map(|(k, _)| k.clone())
            .collect();
        for k in under {
            self.entries.remove(&k);
        }
    }

    /// `.wh..wh..opq` in `dir`: everything earlier layers put in it goes.
    pub fn make_opaque(&mut self, dir: &Path) -> Result<()> {
        let lower: Vec<RelPath> = self
            .entries
            .range(dir.to_path_buf()..)
            .take_while(|(k, _)| k.starts_with(dir))
            .map(|(k, _)| k.clone())
            .filter(|k| k != dir && !self.current.contains(k))
            .collect();
        for k in lower {
            // Already gone with a removed parent directory.
            if self.entries.contains_key(&k) {
                self.remove(&k)?;
            }
        }
        Ok(())
    }

    /// Clears the way for a new entry at `rel`: an existing directory stays when the
    /// new entry is a directory too (tar semantics: only its metadata changes).
    fn clear_for(&mut self, rel: &Path, new_is_dir: bool) -> Result<()> {
        let host = self.host(rel);
        match fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() && new_is_dir => Ok(()),
            Ok(_) => self.remove(rel),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("looking at {}", host.display()), e)),
        }
    }

    /// Creates the entry `rel` (already placed) with `meta`, reading a regular file's
    /// content from `data`.
    pub fn add(&mut self, rel: &Path, meta: Meta, data: &mut dyn Read) -> Result<()> {
        self.clear_for(rel, meta.kind == Kind::Dir)?;
        let host = self.host(rel);
        let shown = || host.display().to_string();
        match &meta.kind {
            Kind::Dir => match fs::create_dir(&host) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(format!("creating {}", shown()), e)),
            },
            Kind::File => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&host)
                    .ctx(|| format!("creating {}", shown()))?;
                io::copy(data, &mut f).ctx(|| format!("writing {}", shown()))?;
                f.flush().ctx(|| format!("writing {}", shown()))?;
            }
            Kind::Symlink(target) => std::os::unix::fs::symlink(target, &host)
                .ctx(|| format!("creating symlink {}", shown()))?,
            Kind::Char(..) | Kind::Block(..) | Kind::Fifo => {
                let (ft, dev) = match meta.kind {
                    Kind::Char(ma, mi) => (FileType::CharacterDevice, rustix::fs::makedev(ma, mi)),
                    Kind::Block(ma, mi) => (FileType::BlockDevice, rustix::fs::makedev(ma, mi)),
                    _ => (FileType::Fifo, 0),
                };
                if let Err(e) =
                    rustix::fs::mknodat(rustix::fs::CWD, &host, ft, Mode::from_raw_mode(0o600), dev)
                {
                    if e == rustix::io::Errno::PERM && !self.privileged {
                        self.skipped.push(format!("device node /{}", rel.display()));
                        self.entries.insert(rel.to_path_buf(), meta);
                        self.current.insert(rel.to_path_buf());
                        return Ok(());
                    }
                    return Err(Error::io(format!("creating {}", shown()), e.into()));
                }
            }
        }
        self.own_and_label(rel, &meta)?;
        self.entries.insert(rel.to_path_buf(), meta);
        self.current.insert(rel.to_path_buf());
        Ok(())
    }

    /// A hard link at `rel` (placed) to the existing `target` (a cleaned entry path).
    pub fn add_hardlink(&mut self, rel: &Path, target: &Path) -> Result<()> {
        let target_name = target
            .file_name()
            .ok_or_else(|| Error::PathEscape(format!("hard link to {}", target.display())))?;
        let target_dir = self.resolve_dir(target.parent().unwrap_or(Path::new("")), rel, false)?;
        let target_rel = target_dir.join(target_name);
        let meta = self
            .entries
            .get(&target_rel)
            .cloned()
            .filter(|m| m.kind != Kind::Dir)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: hard link to {}, which is not a file of this image",
                    rel.display(),
                    target.display()
                ))
            })?;
        if target_rel == rel {
            return Ok(());
        }
        self.clear_for(rel, false)?;
        let host = self.host(rel);
        fs::hard_link(self.host(&target_rel), &host)
            .ctx(|| format!("linking {} to {}", host.display(), target_rel.display()))?;
        self.entries.insert(rel.to_path_buf(), meta);
        self.current.insert(rel.to_path_buf());
        Ok(())
    }

    fn own_and_label(&mut self, rel: &Path, meta: &Meta) -> Result<()> {
        let host = self.host(rel);
        if self.privileged {
            std::os::unix::fs::lchown(&host, Some(meta.uid as u32), Some(meta.gid as u32))
                .ctx(|| format!("chown {}", host.display()))?;
        }
        for (name, value) in &meta.xattrs {
            let name = OsStr::from_bytes(name);
            if let Err(e) =
                rustix::fs::lsetxattr(&host, name, value, rustix::fs::XattrFlags::empty())
            {
                // Some namespaces need privileges or support this filesystem lacks;
                // rootfs.tar keeps the attribute regardless.
                self.skipped.push(format!(
                    "xattr {} on /{}: {e}",
                    name.to_string_lossy(),
                    rel.display()
                ));
            }
        }
        Ok(())
    }

    /// Adds a file the converter itself provides (init, metadata), owned by root.
    pub fn add_own_file(&mut self, rel: &Path, mode: u32, data: &[u8]) -> Result<RelPath> {
        let placed = self.place(rel)?;
        let meta = Meta {
            kind: Kind::File,
            uid: 0,
            gid: 0,
            mode,
            mtime: self.default_mtime,
            xattrs: Vec::new(),
        };
        self.add(&placed, meta, &mut &data[..])?;
        Ok(placed)
    }

    /// The last pass: every path gets the mode and mtime the map says (after the
    /// layers, so nothing done later can disturb them).
    pub fn finish(&self) -> Result<()> {
        for (rel, meta) in self.entries.iter().rev() {
            let host = self.host(rel);
            let is_link = matches!(meta.kind, Kind::Symlink(_));
            if fs::symlink_metadata(&host).is_err() {
                continue; // a device node this host would not let us make
            }
            if !is_link {
                fs::set_permissions(&host, fs::Permissions::from_mode(meta.mode & 0o7777))
                    .ctx(|| format!("chmod {}", host.display()))?;
            }
            let t = Timespec {
                tv_sec: meta.mtime as i64,
                tv_nsec: 0,
            };
            let times = Timestamps {
                last_access: Timespec {
                    tv_sec: 0,
                    tv_nsec: UTIME_OMIT,
                },
                last_modification: t,
            };
            rustix::fs::utimensat(
                rustix::fs::CWD,
                &host,
                &times,
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| Error::io(format!("setting the mtime of {}", host.display()), e.into()))?;
        }
        let root_time = Timestamps {
            last_access: Timespec {
                tv_sec: 0,
                tv_nsec: UTIME_OMIT,
            },
            last_modification: Timespec {
                tv_sec: self.default_mtime as i64,
                tv_nsec: 0,
            },
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            &self.root,
            &root_time,
            rustix::fs::AtFlags::empty(),
        )
        .map_err(|e| {
            Error::io(
                format!("setting the mtime of {}", self.root.display()),
                e.into(),
            )
        })?;
        Ok(())
    }

    /// Bytes the content takes, for sizing the ext4 image: every file rounded up to
    /// 4 KiB blocks, plus a block per entry for inodes and directories.
    pub fn content_bytes(&self) -> u64 {
        let mut total = 0u64;
        for (rel, meta) in &self.entries {
            total += 4096;
            if meta.kind == Kind::File {
                let len = fs::symlink_metadata(self.host(rel))
                    .map(|m| m.len())
                    .unwrap_or(0);
                total += len.div_ceil(4096) * 4096;
            }
        }
        total
    }

    /// Writes `rootfs.tar`: entries in path order, metadata from the map, hard links by
    /// inode (the first path in order holds the data), fixed header fields only, so the
    /// same image always gives the same bytes.
    pub fn write_tar(&self, out: impl Write) -> Result<()> {
        let mut b = tar::Builder::new(out);
        let mut inodes: BTreeMap<(u64, u64), RelPath> = BTreeMap::new();
        let werr = |e: io::Error| Error::io("writing rootfs.tar", e);
        for (rel, meta) in &self.entries {
            if !meta.xattrs.is_empty() {
                let mut names = Vec::new();
                for (k, v) in &meta.xattrs {
                    let key = format!("SCHILY.xattr.{}", String::from_utf8_lossy(k));
                    names.push((key, v.clone()));
                }
                b.append_pax_extensions(names.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                    .map_err(werr)?;
            }
            let mut h = tar::Header::new_gnu();
            h.set_mode(meta.mode & 0o7777);
            h.set_uid(meta.uid);
            h.set_gid(meta.gid);
            h.set_mtime(meta.mtime);
            h.set_size(0);
            let host = self.host(rel);
            match &meta.kind {
                Kind::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    b.append_data(&mut h, rel, io::empty()).map_err(werr)?;
                }
                Kind::File => {
                    let m = fs::symlink_metadata(&host)
                        .ctx(|| format!("reading {}", host.display()))?;
                    if m.nlink() > 1 {
                        if let Some(first) = inodes.get(&(m.dev(), m.ino())) {
                            h.set_entry_type(tar::EntryType::Link);
                            b.append_link(&mut h, rel, first).map_err(werr)?;
                            continue;
                        }
                        inodes.insert((m.dev(), m.ino()), rel.clone());
                    }
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(m.len());
                    let f = File::open(&host).ctx(|| format!("reading {}", host.display()))?;
                    b.append_data(&mut h, rel, f).map_err(werr)?;
                }
                Kind::Symlink(target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    b.append_link(&mut h, rel, target).map_err(werr)?;
                }
                Kind::Char(ma, mi) | Kind::Block(ma, mi) => {
                    h.set_entry_type(if matches!(meta.kind, Kind::Char(..)) {
                        tar::EntryType::Char
                    } else {
                        tar::EntryType::Block
                    });
                    h.set_device_major(*ma).map_err(werr)?;
                    h.set_device_minor(*mi).map_err(werr)?;
                    b.append_data(&mut h, rel, io::empty()).map_err(werr)?;
                }
                Kind::Fifo => {
                    h.set_entry_type(tar::EntryType::Fifo);
                    b.append_data(&mut h, rel, io::empty()).map_err(werr)?;
                }
            }
        }
        b.into_inner().map_err(werr)?.flush().map_err(werr)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_are_checked_lexically() {
        assert_eq!(
            clean_entry_path(Path::new("./etc/./passwd")).unwrap(),
            PathBuf::from("etc/passwd")
        );
        for bad in ["/etc/passwd", "../x", "a/../../x", "a/.."] {
            assert!(
                matches!(clean_entry_path(Path::new(bad)), Err(Error::PathEscape(_))),
                "{bad}"
            );
        }
    }
}
