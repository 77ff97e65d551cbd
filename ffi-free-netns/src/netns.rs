//! Named network namespaces laid out as iproute2 lays them out, so `ip netns list` and
//! `ip netns exec` see ours and we see theirs.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::mount::{MountPropagationFlags, UnmountFlags};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

use crate::error::{Error, Result};
use crate::rtnl::Rtnl;

/// Where `create` puts namespace files: the directory `ip netns add` uses.
const RUN_DIR: &str = "/run/netns";
const VAR_RUN_DIR: &str = "/var/run/netns";
/// Extra directory searched first by `open` (compatibility contract of the forwarder).
const ROOT_ENV: &str = "FWD_NETNS_ROOT";
/// The calling thread's own namespace. `/proc/self/ns/net` would be the main thread's.
const THREAD_SELF_NET: &str = "/proc/thread-self/ns/net";
/// `statfs` magic of nsfs, the file system behind namespace files and their bind mounts.
const NSFS_MAGIC: u64 = 0x6e73_6673;

/// Serialises the shared-mount preparation of [`RUN_DIR`] within this process, so two
/// concurrent creators do not both bind-mount the directory onto itself.
static RUN_DIR_SETUP: Mutex<()> = Mutex::new(());

/// An opened network namespace. Holding it keeps the namespace alive even if its file is
/// removed.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
    fd: OwnedFd,
}

impl Netns {
    /// The name it was opened or created with (for [`open_path`], the path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The calling thread's current network namespace.
    pub fn current_thread() -> Result<Netns> {
        open_path(Path::new(THREAD_SELF_NET))
    }

    /// Run `f` on a fresh thread that has joined this namespace; the caller's namespace
    /// never changes. A panic in `f` is resumed on the caller's thread.
    pub fn run<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name("netns-run".into())
                .spawn_scoped(scope, || {
                    self.enter_current_thread()?;
                    Ok(f())
                })
                .map_err(|e| {
                    Error::io(
                        format!("spawning a thread for network namespace {}", self.name),
                        e,
                    )
                })?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Move the calling thread into this namespace. Only for threads this crate owns.
    pub(crate) fn enter_current_thread(&self) -> Result<()> {
        move_into_link_name_space(self.fd.as_fd(), Some(LinkNameSpaceType::Network))
            .map_err(|e| Error::io(format!("entering network namespace {}", self.name), e))
    }

    /// Device and inode of the namespace itself, for telling whether a path still names it.
    pub(crate) fn identity(&self) -> Result<(u64, u64)> {
        let st = rustix::fs::fstat(&self.fd)
            .map_err(|e| Error::io(format!("inspecting network namespace {}", self.name), e))?;
        Ok((st.st_dev, st.st_ino))
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Create a named namespace like `ip netns add NAME`, with its loopback up.
pub fn create(name: &str) -> Result<Netns> {
    validate_name(name)?;
    let dir = Path::new(RUN_DIR);
    prepare_run_dir(dir)?;
    let path = dir.join(name);
    rustix::fs::open(
        &path,
        OFlags::RDONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        Errno::EXIST => Error::io(format!("network namespace {name} already exists"), e),
        _ => Error::io(format!("creating {}", path.display()), e),
    })?;
    match bind_new_namespace(name, &path) {
        Ok(()) => open_named(name, &path),
        Err(e) => {
            remove_file(&path);
            Err(e)
        }
    }
}

/// Remove a namespace created by [`create`] (or `ip netns add`); a missing one is fine.
pub fn delete(name: &str) -> Result<()> {
    validate_name(name)?;
    let path = Path::new(RUN_DIR).join(name);
    match rustix::mount::unmount(&path, UnmountFlags::DETACH) {
        // EINVAL: not a mount point (a creation that failed half way).
        Ok(()) | Err(Errno::NOENT) | Err(Errno::INVAL) => {}
        Err(e) => return Err(Error::io(format!("unmounting network namespace {name}"), e)),
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}

/// Names of the namespaces found in the lookup directories, sorted, without duplicates.
pub fn list() -> Result<Vec<String>> {
    let mut names = Vec::new();
    for dir in lookup_dirs() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// Whether `open(name)` would succeed.
pub fn exists(name: &str) -> bool {
    open(name).is_ok()
}

/// Open a namespace by name, searching `$FWD_NETNS_ROOT`, `/run/netns`, `/var/run/netns`.
pub fn open(name: &str) -> Result<Netns> {
    validate_name(name)?;
    let dirs = lookup_dirs();
    for dir in &dirs {
        match open_named(name, &dir.join(name)) {
            Err(Error::NotFound(_)) => continue,
            other => return other,
        }
    }
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(Error::NotFound(format!(
        "network namespace {name} not found in {}",
        searched.join(", ")
    )))
}

/// Open a namespace file by path (e.g. `/proc/PID/ns/net` or a bind mount of one).
pub fn open_path(path: &Path) -> Result<Netns> {
    open_named(&path.display().to_string(), path)
}

fn open_named(name: &str, path: &Path) -> Result<Netns> {
    let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).map_err(
        |e| match e {
            Errno::NOENT => Error::NotFound(format!(
                "network namespace {name} not found ({} does not exist)",
                path.display()
            )),
            _ => Error::io(
                format!("opening network namespace {name} at {}", path.display()),
                e,
            ),
        },
    )?;
    let fs = rustix::fs::fstatfs(&fd)
        .map_err(|e| Error::io(format!("inspecting {}", path.display()), e))?;
    // An unmounted placeholder (mid-create or mid-delete) is a plain file, not a namespace.
    if fs.f_type as u64 != NSFS_MAGIC {
        return Err(Error::InvalidInput(format!(
            "{} is not a namespace file (network namespace {name})",
            path.display()
        )));
    }
    Ok(Netns {
        name: name.to_owned(),
        path: path.to_owned(),
        fd,
    })
}

fn lookup_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::with_capacity(3);
    if let Some(root) = std::env::var_os(ROOT_ENV).filter(|r| !r.is_empty()) {
        dirs.push(PathBuf::from(root));
    }
    dirs.push(PathBuf::from(RUN_DIR));
    dirs.push(PathBuf::from(VAR_RUN_DIR));
    dirs
}

fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name == "." || name == ".." || name.len() > 255 {
        return Err(Error::InvalidInput(format!(
            "network namespace name {name:?} must be 1 to 255 bytes and not . or .."
        )));
    }
    if name.contains(['/', '\0']) {
        return Err(Error::InvalidInput(format!(
            "network namespace name {name:?} must not contain / or NUL"
        )));
    }
    Ok(())
}

/// Make `dir` a shared mount point, as iproute2 does, so namespace bind mounts made
/// later propagate into mount namespaces created by `ip netns exec` and the like.
fn prepare_run_dir(dir: &Path) -> Result<()> {
    let _guard = RUN_DIR_SETUP.lock().unwrap_or_else(|p| p.into_inner());
    rustix::fs::mkdir(dir, Mode::from_raw_mode(0o755))
        .or_else(|e| if e == Errno::EXIST { Ok(()) } else { Err(e) })
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let shared = MountPropagationFlags::SHARED | MountPropagationFlags::REC;
    match rustix::mount::mount_change(dir, shared) {
        Ok(()) => return Ok(()),
        // EINVAL: not a mount point yet; make it one by binding it onto itself.
        Err(Errno::INVAL) => {}
        Err(e) => {
            return Err(Error::io(
                format!("making {} a shared mount", dir.display()),
                e,
            ))
        }
    }
    rustix::mount::mount_bind_recursive(dir, dir)
        .map_err(|e| Error::io(format!("bind-mounting {} onto itself", dir.display()), e))?;
    rustix::mount::mount_change(dir, shared)
        .map_err(|e| Error::io(format!("making {} a shared mount", dir.display()), e))
}

/// On a throwaway thread: leave for a new namespace, pin it by bind-mounting the thread's
/// namespace file onto `path`, and bring its loopback up.
fn bind_new_namespace(name: &str, path: &Path) -> Result<()> {
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("netns-create".into())
            .spawn_scoped(scope, || -> Result<()> {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    Error::io(format!("unsharing a network namespace for {name}"), e)
                })?;
                rustix::mount::mount_bind(THREAD_SELF_NET, path)
                    .map_err(|e| Error::io(format!("bind-mounting network namespace {name}"), e))?;
                Rtnl::open()
                    .and_then(|mut rtnl| rtnl.set_link_up("lo", true))
                    .map_err(|e| {
                        Error::io(format!("bringing lo up in network namespace {name}"), e)
                    })
            })
            .map_err(|e| Error::io(format!("spawning a thread to create {name}"), e))?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Best-effort cleanup of a half-created namespace file.
fn remove_file(path: &Path) {
    // Errors here would hide the original failure, which the caller reports.
    let _ = rustix::mount::unmount(path, UnmountFlags::DETACH);
    let _ = std::fs::remove_file(path);
}
