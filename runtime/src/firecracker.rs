//! The Firecracker guest: launching it (through the jailer or directly), replaying
//! vm.json against its API, and stopping it gracefully.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mergen_model::{names, Meta, VmConfig};
use serde_json::json;

use crate::command::which;
use crate::config::RuntimeConfig;
use crate::error::{Error, Result};
use crate::fc_api::FcClient;
use crate::procs;

/// Firecracker's default API socket, as the jailed process sees it (the jailer creates
/// `/run` in the chroot, owned by the jailer's user, for it). The documented path
/// `$MGR_RUN_ROOT/<id>/mergen.socket` is a symlink to it.
pub const JAIL_SOCKET: &str = "/run/firecracker.socket";
/// Where the kernel is linked in the chroot; drives go to `/drive-<drive_id>`.
const JAIL_KERNEL: &str = "/kernel";
/// The vsock device's socket as the jailed process sees it; vm.json's `uds_path` on the
/// host becomes a symlink to it, as the API socket does.
pub const JAIL_VSOCK: &str = "/run/vsock.sock";

/// Read vm.json as mergend wrote it.
pub fn read_vm_config(meta: &Meta) -> Result<VmConfig> {
    let path = &meta.paths.vm_config_path;
    let bytes = std::fs::read(path).map_err(|e| Error::io(format!("reading {path}"), e))?;
    let vm: VmConfig = serde_json::from_slice(&bytes).map_err(|source| Error::Parse {
        path: path.into(),
        what: "vm.json",
        source,
    })?;
    // The ids become API paths and chroot file names: hold them to Firecracker's own rule.
    for id in vm
        .drives
        .iter()
        .map(|d| &d.drive_id)
        .chain(vm.network_interfaces.iter().map(|n| &n.iface_id))
    {
        let ok = !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(Error::Invalid(format!(
                "{path}: id {id:?} must be ASCII letters, digits or underscores (and not empty)"
            )));
        }
    }
    Ok(vm)
}

/// The Firecracker binary as the jailer will see it: an absolute, symlink-free path
/// (the jailer canonicalises `--exec-file` against its own working directory, and names
/// the chroot after the resolved file), found on `PATH` when the configuration gives a
/// bare name. The jailer also refuses a file whose name lacks "firecracker".
pub fn resolve_exec_file(bin: &Path) -> Result<PathBuf> {
    let found = if bin.components().count() > 1 {
        Some(bin.to_path_buf())
    } else {
        which(bin)
    };
    let path = found.ok_or_else(|| {
        Error::Invalid(format!(
            "MGR_FIRECRACKER_BIN {}: not found on PATH",
            bin.display()
        ))
    })?;
    let exec = std::fs::canonicalize(&path)
        .map_err(|e| Error::io(format!("MGR_FIRECRACKER_BIN {}", path.display()), e))?;
    let name = exec
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !exec.is_file() || !name.contains("firecracker") {
        return Err(Error::Invalid(format!(
            "MGR_FIRECRACKER_BIN {} resolves to {}: the jailer wants a file whose name contains \"firecracker\"",
            bin.display(),
            exec.display()
        )));
    }
    Ok(exec)
}

/// `<chroot base>/<firecracker file name>/<id>`: the jailer's directory for the VM; its
/// `root/` is the chroot.
pub fn jail_dir(config: &RuntimeConfig, id: &str) -> Result<PathBuf> {
    let exec = resolve_exec_file(&config.firecracker_bin)?;
    let name = exec.file_name().unwrap_or_default();
    Ok(config.chroot_base.join(name).join(id))
}

/// Remove the VM's jail (its hard links would otherwise keep deleted images' blocks
/// alive). Gone, or no jailer in use, is fine.
pub fn remove_jail(config: &RuntimeConfig, id: &str) -> Result<()> {
    if !config.use_jailer || !names::is_valid_id(id) {
        return Ok(());
    }
    // Without a Firecracker binary there is no jail this host could have made.
    let Ok(dir) = jail_dir(config, id) else {
        return Ok(());
    };
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing the jail {}", dir.display()), e)),
    }
}

/// The command that becomes the guest: the jailer (which execs Firecracker inside the
/// VM's namespace and chroot, as `MGR_JAILER_UID`/`GID`, keeping its pid), or
/// Firecracker itself under `ip netns exec` when `MGR_JAILER=0`. Prepares the chroot and
/// the socket path first.
pub fn launch_command(config: &RuntimeConfig, meta: &Meta) -> Result<Command> {
    let socket = Path::new(&meta.paths.socket_path);
    std::fs::create_dir_all(&meta.paths.run_dir)
        .map_err(|e| Error::io(format!("creating {}", meta.paths.run_dir), e))?;
    remove_if_present(socket)?;
    let vm = read_vm_config(meta)?;
    let netns = names::netns_name(&meta.id);
    if !config.use_jailer {
        // Firecracker binds the vsock socket itself and refuses a path that exists.
        if let Some(v) = &vm.vsock {
            remove_stale_socket(Path::new(&v.uds_path))?;
        }
        let mut cmd = Command::new(which(Path::new("ip")).unwrap_or_else(|| "ip".into()));
        cmd.args(["netns", "exec", &netns])
            .arg(&config.firecracker_bin)
            .arg("--api-sock")
            .arg(socket)
            .args(["--id", &meta.id]);
        return Ok(cmd);
    }
    let exec_file = resolve_exec_file(&config.firecracker_bin)?;
    // A previous run's jail holds device nodes and a pid file the jailer creates with
    // O_EXCL (it would refuse to start), the copied binary and the old links: start
    // from an empty one.
    remove_jail(config, &meta.id)?;
    let root = jail_dir(config, &meta.id)?.join("root");
    std::fs::create_dir_all(&root)
        .map_err(|e| Error::io(format!("creating {}", root.display()), e))?;
    link_into_chroot(
        config,
        &vm.boot_source.kernel_image_path,
        &root,
        JAIL_KERNEL,
    )?;
    for d in &vm.drives {
        link_into_chroot(config, &d.path_on_host, &root, &jail_drive(&d.drive_id))?;
    }
    link_to_jail(socket, &root, JAIL_SOCKET)?;
    if let Some(v) = &vm.vsock {
        let host = Path::new(&v.uds_path);
        remove_stale_socket(host)?;
        if let Some(dir) = host.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        link_to_jail(host, &root, JAIL_VSOCK)?;
    }
    // No --daemonize and no --new-pid-ns: either would fork, and the pid the supervisor
    // (systemd or embedded) watches must become Firecracker. The jailer passes --id
    // itself; what follows `--` goes to Firecracker.
    let jailer = which(&config.jailer_bin).unwrap_or_else(|| config.jailer_bin.clone());
    let mut cmd = Command::new(jailer);
    cmd.args(["--id", &meta.id])
        .arg("--exec-file")
        .arg(&exec_file)
        .args(["--uid", &config.jailer_uid.to_string()])
        .args(["--gid", &config.jailer_gid.to_string()])
        .arg("--chroot-base-dir")
        .arg(&config.chroot_base)
        .arg("--netns")
        .arg(format!("/run/netns/{netns}"))
        .args(["--", "--api-sock", JAIL_SOCKET]);
    Ok(cmd)
}

fn jail_drive(drive_id: &str) -> String {
    format!("/drive-{drive_id}")
}

/// Make `host` a symlink to `in_jail` (an absolute in-chroot path) under the chroot `root`.
fn link_to_jail(host: &Path, root: &Path, in_jail: &str) -> Result<()> {
    let target = root.join(in_jail.trim_start_matches('/'));
    std::os::unix::fs::symlink(&target, host).map_err(|e| {
        Error::io(
            format!("linking {} to {}", host.display(), target.display()),
            e,
        )
    })
}

/// Hard-link a host file into the chroot as `name` (an absolute in-chroot path). The
/// jailed Firecracker opens it as the jailer's user, so a non-root user gets the file:
/// a hard link shares the inode, so this changes the image's owner on the host too.
fn link_into_chroot(config: &RuntimeConfig, src: &str, root: &Path, name: &str) -> Result<()> {
    let dest = root.join(name.trim_start_matches('/'));
    std::fs::hard_link(src, &dest).map_err(|e| {
        Error::io(
            format!(
                "hard-linking {src} into the jailer chroot {} (it must be on the same file system as MGR_JAILER_CHROOT_BASE)",
                root.display()
            ),
            e,
        )
    })?;
    if config.jailer_uid == 0 && config.jailer_gid == 0 {
        return Ok(());
    }
    rustix::fs::chown(
        &dest,
        Some(rustix::fs::Uid::from_raw(config.jailer_uid)),
        Some(rustix::fs::Gid::from_raw(config.jailer_gid)),
    )
    .map_err(|e| {
        Error::io(
            format!("giving {} to the jailer's user", dest.display()),
            e.into(),
        )
    })
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", path.display()), e)),
    }
}

/// Remove a socket or symlink a previous run left at `path`; anything else there is
/// not ours to delete (Firecracker will say the path is taken).
fn remove_stale_socket(path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() || m.file_type().is_symlink() => remove_if_present(path),
        _ => Ok(()),
    }
}

/// Replay vm.json against the API in Firecracker's required order, then boot. With the
/// jailer, host paths become the chroot names `launch_command` linked them under.
pub fn configure_start(api: &FcClient, vm: &VmConfig, in_chroot: bool) -> Result<()> {
    let put =
        |path: &str, body: serde_json::Value| api.put(path, &body).map_err(Error::FirecrackerApi);
    api.wait_ready().map_err(Error::FirecrackerApi)?;
    let kernel = if in_chroot {
        JAIL_KERNEL.to_string()
    } else {
        vm.boot_source.kernel_image_path.clone()
    };
    put(
        "/boot-source",
        json!({"kernel_image_path": kernel, "boot_args": vm.boot_source.boot_args}),
    )?;
    put("/machine-config", to_value(&vm.machine_config)?)?;
    for d in &vm.drives {
        let mut drive = to_value(d)?;
        if in_chroot {
            drive["path_on_host"] = json!(jail_drive(&d.drive_id));
        }
        put(&format!("/drives/{}", d.drive_id), drive)?;
    }
    for n in &vm.network_interfaces {
        put(&format!("/network-interfaces/{}", n.iface_id), to_value(n)?)?;
    }
    if let Some(v) = &vm.vsock {
        let mut vsock = to_value(v)?;
        if in_chroot {
            vsock["uds_path"] = json!(JAIL_VSOCK);
        }
        put("/vsock", vsock)?;
    }
    put("/actions", json!({"action_type": "InstanceStart"}))
}

fn to_value(v: &impl serde::Serialize) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| Error::Invalid(format!("vm.json: {e}")))
}

/// How a graceful stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The guest shut down by itself after Ctrl-Alt-Del.
    ShutDown,
    /// It did not within the timeout (or the API was gone) and was terminated.
    Terminated,
}

/// Ask the guest to shut down (Ctrl-Alt-Del), wait up to `timeout` for Firecracker
/// (`pid`) to exit, then terminate it.
pub fn graceful_stop(api: &FcClient, pid: u32, timeout: Duration) -> Result<StopOutcome> {
    if !procs::alive(pid) {
        return Ok(StopOutcome::ShutDown);
    }
    match api.put("/actions", &json!({"action_type": "SendCtrlAltDel"})) {
        Ok(()) if procs::wait_gone(pid, timeout) => return Ok(StopOutcome::ShutDown),
        Ok(()) => {
            log::warn!("guest pid {pid} still running {timeout:?} after Ctrl-Alt-Del; terminating")
        }
        Err(e) => log::warn!("Ctrl-Alt-Del failed ({e}); terminating pid {pid}"),
    }
    if procs::terminate(pid, Duration::from_secs(2))? {
        Ok(StopOutcome::Terminated)
    } else {
        Err(Error::Unkillable {
            what: "Firecracker",
            pid,
        })
    }
}
