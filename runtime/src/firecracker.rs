//! The Firecracker guest: launching it (through the jailer or directly), replaying
//! vm.json against its API, and stopping it gracefully.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use mergen_model::{names, Meta, VmConfig};
use serde_json::json;

use crate::config::RuntimeConfig;
use crate::fc_api::FcClient;
use crate::procs;

/// Firecracker's default API socket, as the jailed process sees it (the jailer creates
/// `/run` in the chroot, owned by the jailer's user, for it). The documented path
/// `$MGR_RUN_ROOT/<id>/mergen.socket` is a symlink to it.
pub const JAIL_SOCKET: &str = "/run/firecracker.socket";
/// Where the kernel is linked in the chroot; drives go to `/drive-<drive_id>`.
const JAIL_KERNEL: &str = "/kernel";

/// Read vm.json as mergend wrote it.
pub fn read_vm_config(meta: &Meta) -> Result<VmConfig, String> {
    let path = &meta.paths.vm_config_path;
    let bytes = std::fs::read(path).map_err(|e| format!("reading {path}: {e}"))?;
    let vm: VmConfig = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{path} is not a valid vm.json: {e}"))?;
    // The ids become API paths and chroot file names: hold them to Firecracker's own rule.
    for id in vm
        .drives
        .iter()
        .map(|d| &d.drive_id)
        .chain(vm.network_interfaces.iter().map(|n| &n.iface_id))
    {
        let ok = !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(format!(
                "{path}: id {id:?} must be ASCII letters, digits or underscores (and not empty)"
            ));
        }
    }
    Ok(vm)
}

/// The Firecracker binary as the jailer will see it: an absolute, symlink-free path
/// (the jailer canonicalises `--exec-file` against its own working directory, and names
/// the chroot after the resolved file), found on `PATH` when the configuration gives a
/// bare name. The jailer also refuses a file whose name lacks "firecracker".
pub fn resolve_exec_file(bin: &Path) -> Result<PathBuf, String> {
    let found = if bin.components().count() > 1 {
        Some(bin.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|dirs| {
            std::env::split_paths(&dirs)
                .map(|d| d.join(bin))
                .find(|p| p.is_file())
        })
    };
    let path =
        found.ok_or_else(|| format!("MGR_FIRECRACKER_BIN {}: not found on PATH", bin.display()))?;
    let exec = std::fs::canonicalize(&path)
        .map_err(|e| format!("MGR_FIRECRACKER_BIN {}: {e}", path.display()))?;
    let name = exec
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !exec.is_file() || !name.contains("firecracker") {
        return Err(format!(
            "MGR_FIRECRACKER_BIN {} resolves to {}: the jailer wants a file whose name contains \"firecracker\"",
            bin.display(),
            exec.display()
        ));
    }
    Ok(exec)
}

/// `<chroot base>/<firecracker file name>/<id>`: the jailer's directory for the VM; its
/// `root/` is the chroot.
pub fn jail_dir(config: &RuntimeConfig, id: &str) -> Result<PathBuf, String> {
    let exec = resolve_exec_file(&config.firecracker_bin)?;
    let name = exec.file_name().unwrap_or_default();
    Ok(config.chroot_base.join(name).join(id))
}

/// Remove the VM's jail (its hard links would otherwise keep deleted images' blocks
/// alive). Gone, or no jailer in use, is fine.
pub fn remove_jail(config: &RuntimeConfig, id: &str) -> Result<(), String> {
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
        Err(e) => Err(format!("removing the jail {}: {e}", dir.display())),
    }
}

/// The command that becomes the guest: the jailer (which execs Firecracker inside the
/// VM's namespace and chroot, as `MGR_JAILER_UID`/`GID`, keeping its pid), or
/// Firecracker itself under `ip netns exec` when `MGR_JAILER=0`. Prepares the chroot and
/// the socket path first.
pub fn launch_command(config: &RuntimeConfig, meta: &Meta) -> Result<Command, String> {
    let socket = Path::new(&meta.paths.socket_path);
    std::fs::create_dir_all(&meta.paths.run_dir)
        .map_err(|e| format!("creating {}: {e}", meta.paths.run_dir))?;
    remove_if_present(socket)?;
    let netns = names::netns_name(&meta.id);
    if !config.use_jailer {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &netns])
            .arg(&config.firecracker_bin)
            .arg("--api-sock")
            .arg(socket)
            .args(["--id", &meta.id]);
        return Ok(cmd);
    }
    let exec_file = resolve_exec_file(&config.firecracker_bin)?;
    let vm = read_vm_config(meta)?;
    // A previous run's jail holds device nodes and a pid file the jailer creates with
    // O_EXCL (it would refuse to start), the copied binary and the old links: start
    // from an empty one.
    remove_jail(config, &meta.id)?;
    let root = jail_dir(config, &meta.id)?.join("root");
    std::fs::create_dir_all(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    link_into_chroot(
        config,
        &vm.boot_source.kernel_image_path,
        &root,
        JAIL_KERNEL,
    )?;
    for d in &vm.drives {
        link_into_chroot(config, &d.path_on_host, &root, &jail_drive(&d.drive_id))?;
    }
    let jail_socket = root.join(JAIL_SOCKET.trim_start_matches('/'));
    std::os::unix::fs::symlink(&jail_socket, socket).map_err(|e| {
        format!(
            "linking {} to {}: {e}",
            socket.display(),
            jail_socket.display()
        )
    })?;
    // No --daemonize and no --new-pid-ns: either would fork, and the pid the supervisor
    // (systemd or embedded) watches must become Firecracker. The jailer passes --id
    // itself; what follows `--` goes to Firecracker.
    let mut cmd = Command::new(&config.jailer_bin);
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

/// Hard-link a host file into the chroot as `name` (an absolute in-chroot path). The
/// jailed Firecracker opens it as the jailer's user, so a non-root user gets the file:
/// a hard link shares the inode, so this changes the image's owner on the host too.
fn link_into_chroot(
    config: &RuntimeConfig,
    src: &str,
    root: &Path,
    name: &str,
) -> Result<(), String> {
    let dest = root.join(name.trim_start_matches('/'));
    std::fs::hard_link(src, &dest).map_err(|e| {
        format!(
            "hard-linking {src} into the jailer chroot {} (it must be on the same file system as MGR_JAILER_CHROOT_BASE): {e}",
            root.display()
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
    .map_err(|e| format!("giving {} to the jailer's user: {e}", dest.display()))
}

fn remove_if_present(path: &Path) -> Result<(), String> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", path.display())),
    }
}

/// Replay vm.json against the API in Firecracker's required order, then boot. With the
/// jailer, host paths become the chroot names `launch_command` linked them under.
pub fn configure_start(api: &FcClient, vm: &VmConfig, in_chroot: bool) -> Result<(), String> {
    api.wait_ready()?;
    let kernel = if in_chroot {
        JAIL_KERNEL.to_string()
    } else {
        vm.boot_source.kernel_image_path.clone()
    };
    api.put(
        "/boot-source",
        &json!({"kernel_image_path": kernel, "boot_args": vm.boot_source.boot_args}),
    )?;
    api.put(
        "/machine-config",
        &serde_json::to_value(&vm.machine_config).map_err(|e| e.to_string())?,
    )?;
    for d in &vm.drives {
        let mut drive = serde_json::to_value(d).map_err(|e| e.to_string())?;
        if in_chroot {
            drive["path_on_host"] = json!(jail_drive(&d.drive_id));
        }
        api.put(&format!("/drives/{}", d.drive_id), &drive)?;
    }
    for n in &vm.network_interfaces {
        let iface = serde_json::to_value(n).map_err(|e| e.to_string())?;
        api.put(&format!("/network-interfaces/{}", n.iface_id), &iface)?;
    }
    api.put("/actions", &json!({"action_type": "InstanceStart"}))
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
pub fn graceful_stop(api: &FcClient, pid: u32, timeout: Duration) -> Result<StopOutcome, String> {
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
        Err(format!("Firecracker pid {pid} survived SIGKILL"))
    }
}
