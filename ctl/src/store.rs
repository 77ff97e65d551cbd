//! The VM store on disk, in the original's layout.
//!
//! A VM exists exactly when `$MGR_CONFIG_ROOT/<id>/` exists. Creation builds the whole
//! config dir under a temporary name (`.tmp-<id>`), fsyncs it, makes the data and run
//! dirs, and renames it into place; deletion renames it away first (`.del-<id>`, or
//! `.del-retain-<id>` when the data is kept: the name carries the intent), then
//! removes the run and data dirs, then the renamed dir. So a crash at any moment
//! leaves either no VM or a whole one, and start-up ([`Store::recover`]) rolls back an
//! unfinished create and finishes an unfinished delete.
//!
//! A data dir kept by `retainData` holds a `.mergen-retained` marker. Any other data
//! dir without a VM (left by an older version, or by hand) is never deleted: start-up
//! moves it under `$MGR_DATA_ROOT/.orphaned/` and says so.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use mergen_model::atomic::{
    create_dir, create_dir_all, create_file, pretty_json, sync_dir, write_file, DIR_MODE, FILE_MODE,
};
use mergen_model::names::is_valid_id;
use mergen_model::{Hooks, Meta, Roots, VmConfig};

use crate::lock::{FileLock, TryLock};

const TMP_PREFIX: &str = ".tmp-";
const DEL_PREFIX: &str = ".del-";
const DEL_RETAIN_PREFIX: &str = ".del-retain-";
/// Marks a data dir kept by `DELETE ?retainData=true`.
pub const RETAINED_MARKER: &str = ".mergen-retained";
/// Where data dirs without a VM are moved, under the data root.
pub const ORPHANED_DIR: &str = ".orphaned";

/// Everything written for a new VM.
pub struct NewVm {
    pub meta: Meta,
    /// Absent for process-runtime VMs without a kernel.
    pub vm_config: Option<VmConfig>,
    /// Written to hooks.json only when the request had hooks.
    pub hooks: Option<Hooks>,
    pub env: String,
}

/// What start-up found and did.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Half-written or half-deleted config dirs that were rolled back or finished.
    pub removed: Vec<PathBuf>,
    /// Lock files and run dirs of VMs that do not exist, removed.
    pub stale: Vec<PathBuf>,
    /// Data dirs without a VM, moved: (from, to).
    pub orphaned: Vec<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone)]
pub struct Store {
    roots: Roots,
}

impl Store {
    pub fn new(roots: Roots) -> Store {
        Store { roots }
    }

    pub fn roots(&self) -> &Roots {
        &self.roots
    }

    pub fn ensure_roots(&self) -> io::Result<()> {
        for d in [&self.roots.config, &self.roots.data, &self.roots.run] {
            create_dir_all(d, DIR_MODE)?;
        }
        Ok(())
    }

    /// The host-wide allocation lock: held around read–allocate–write of a VM dir, and
    /// around start-up recovery so it never sweeps another mergend's create in flight.
    pub fn alloc_lock(&self) -> io::Result<FileLock> {
        FileLock::acquire(&self.roots.config.join(".alloc.lock"))
    }

    /// Roll back or finish what a crash interrupted, then tidy what no VM owns. The
    /// caller holds the allocation lock (creates and deletes take it too, so none is
    /// in flight).
    pub fn recover(&self) -> io::Result<Recovery> {
        let mut rec = Recovery::default();
        let mut live = std::collections::HashSet::new();
        for entry in fs::read_dir(&self.roots.config)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if !entry.file_type()?.is_dir() {
                continue;
            }
            if let Some(id) = name.strip_prefix(TMP_PREFIX) {
                // A create that never committed: its data and run dirs go with it.
                if is_valid_id(id) && !self.roots.config.join(id).exists() {
                    let p = self.roots.paths(id);
                    remove_if_present(&p.data_dir)?;
                    remove_if_present(&p.run_dir)?;
                }
                fs::remove_dir_all(&path)?;
                rec.removed.push(path);
            } else if let Some(rest) = name.strip_prefix(DEL_PREFIX) {
                // A delete that committed: finish it as it was asked.
                let (id, retain) = match rest.strip_prefix("retain-") {
                    Some(id) => (id, true),
                    None => (rest, false),
                };
                if is_valid_id(id) && !self.roots.config.join(id).exists() {
                    self.finish_delete(id, retain)?;
                }
                fs::remove_dir_all(&path)?;
                rec.removed.push(path);
            } else if is_valid_id(&name) {
                // Whole or not (the index reports those it cannot list), its run and
                // data dirs are its own.
                live.insert(name);
            }
        }
        if !rec.removed.is_empty() {
            sync_dir(&self.roots.config)?;
        }
        self.sweep_run_root(&live, &mut rec)?;
        self.sweep_data_root(&live, &mut rec)?;
        Ok(rec)
    }

    /// Lock files and run dirs of VMs that do not exist. A lock someone holds (a
    /// create of another mergend on these roots, before its VM exists) is left.
    fn sweep_run_root(
        &self,
        live: &std::collections::HashSet<String>,
        rec: &mut Recovery,
    ) -> io::Result<()> {
        for entry in fs::read_dir(&self.roots.run)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let (id, is_lock) = match name.strip_suffix(".lock") {
                Some(id) => (id, true),
                None => (name.as_str(), false),
            };
            if !is_valid_id(id) || live.contains(id) {
                continue;
            }
            if is_lock {
                match FileLock::try_acquire(&path)? {
                    TryLock::Acquired(_held) => fs::remove_file(&path)?,
                    TryLock::Held => continue,
                }
            } else if entry.file_type()?.is_dir() {
                fs::remove_dir_all(&path)?;
            } else {
                continue;
            }
            rec.stale.push(path);
        }
        Ok(())
    }

    /// Data dirs without a VM and without the retained marker go under `.orphaned/`.
    fn sweep_data_root(
        &self,
        live: &std::collections::HashSet<String>,
        rec: &mut Recovery,
    ) -> io::Result<()> {
        let orphanage = self.roots.data.join(ORPHANED_DIR);
        for entry in fs::read_dir(&self.roots.data)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_valid_id(&name) || live.contains(&name) || !entry.file_type()?.is_dir() {
                continue;
            }
            let path = entry.path();
            if path.join(RETAINED_MARKER).exists() {
                continue;
            }
            create_dir_all(&orphanage, DIR_MODE)?;
            let mut to = orphanage.join(&name);
            let mut n = 1;
            while to.exists() {
                to = orphanage.join(format!("{name}-{n}"));
                n += 1;
            }
            fs::rename(&path, &to)?;
            rec.orphaned.push((path, to));
        }
        if !rec.orphaned.is_empty() {
            sync_dir(&orphanage)?;
            sync_dir(&self.roots.data)?;
        }
        Ok(())
    }

    /// The names under `$MGR_DATA_ROOT/.orphaned/`, for `/metrics`.
    pub fn orphaned(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.roots.data.join(ORPHANED_DIR))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    fn read_meta(&self, id: &str) -> io::Result<Meta> {
        let bytes = fs::read(self.roots.config.join(id).join("meta.json"))?;
        let meta = Meta::from_slice(&bytes).map_err(io::Error::other)?;
        if meta.id != id {
            return Err(io::Error::other(format!(
                "meta.json of {id} names another id ({})",
                meta.id
            )));
        }
        Ok(meta)
    }

    /// The VM `id`, or None when it does not exist.
    pub fn load(&self, id: &str) -> io::Result<Option<Meta>> {
        match self.read_meta(id) {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Write a new VM so that it appears whole or not at all.
    pub fn create(&self, vm: &NewVm) -> io::Result<()> {
        let id = &vm.meta.id;
        let tmp = self.roots.config.join(format!("{TMP_PREFIX}{id}"));
        let result = self.write_tmp(&tmp, vm).and_then(|()| {
            let p = &vm.meta.paths;
            for d in [&p.logs_dir, &p.run_dir] {
                create_dir_all(Path::new(d), DIR_MODE)?;
            }
            sync_dir(&self.roots.data)?;
            sync_dir(&self.roots.run)?;
            // The commit point.
            fs::rename(&tmp, &p.config_dir)?;
            sync_dir(&self.roots.config)
        });
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
            if !Path::new(&vm.meta.paths.config_dir).exists() {
                let _ = fs::remove_dir_all(&vm.meta.paths.data_dir);
                let _ = fs::remove_dir_all(&vm.meta.paths.run_dir);
            }
        }
        result
    }

    fn write_tmp(&self, tmp: &Path, vm: &NewVm) -> io::Result<()> {
        create_dir(tmp, DIR_MODE)?;
        if let Some(c) = &vm.vm_config {
            write_synced(&tmp.join("vm.json"), &pretty_json(c)?)?;
        }
        if let Some(h) = &vm.hooks {
            write_synced(&tmp.join("hooks.json"), &pretty_json(h)?)?;
        }
        write_synced(&tmp.join("env"), vm.env.as_bytes())?;
        write_synced(&tmp.join("meta.json"), &pretty_json(&vm.meta)?)?;
        sync_dir(tmp)
    }

    /// Remove a VM: it disappears atomically first (the renamed dir says whether its
    /// data is kept), then its run and data dirs go, then the renamed dir. The caller
    /// holds the allocation lock.
    pub fn remove(&self, meta: &Meta, retain_data: bool) -> io::Result<()> {
        let prefix = if retain_data {
            DEL_RETAIN_PREFIX
        } else {
            DEL_PREFIX
        };
        let gone = self.roots.config.join(format!("{prefix}{}", meta.id));
        fs::rename(&meta.paths.config_dir, &gone)?;
        sync_dir(&self.roots.config)?;
        self.finish_delete(&meta.id, retain_data)?;
        fs::remove_dir_all(&gone)?;
        sync_dir(&self.roots.config)
    }

    /// The part of a delete after its commit point; safe to repeat.
    fn finish_delete(&self, id: &str, retain_data: bool) -> io::Result<()> {
        let p = self.roots.paths(id);
        remove_if_present(&p.run_dir)?;
        if retain_data {
            if Path::new(&p.data_dir).is_dir() {
                let marker = serde_json::json!({
                    "id": id,
                    "deletedAt": time::OffsetDateTime::now_utc()
                        .format(&time::format_description::well_known::Rfc3339)
                        .unwrap_or_default(),
                });
                write_file(
                    &Path::new(&p.data_dir).join(RETAINED_MARKER),
                    &pretty_json(&marker)?,
                    FILE_MODE,
                )?;
            }
        } else {
            remove_if_present(&p.data_dir)?;
        }
        Ok(())
    }
}

fn remove_if_present(dir: &str) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A new file of the VM's dir being built (no temp file needed: the dir itself is
/// renamed into place), mode 0640.
fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = create_file(path, FILE_MODE)?;
    f.write_all(bytes)?;
    f.sync_all()
}
