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

/// The API socket's name inside the jailer's chroot; the documented path
/// `$MGR_RUN_ROOT/<id>/mergen.socket` is a symlink to it.
const CHROOT_SOCKET: &str = "/mergen.socket";

/// Read vm.json as mergend wrote it.
pub fn read_vm_config(meta: &Meta) -> Result<VmConfig, String> {
    let path = &meta.paths.vm_config_path;
    let bytes = std::fs::read(path).map_err(|e| format!("reading {path}: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{path} is not a valid vm.json: {e}"))
}

/// `<chroot base>/<firecracker file name>/<id>/root`, where the jailer confines the VM.
pub fn chroot_root(config: &RuntimeConfig, id: &str) -> PathBuf {
    let exec_name = config
        .firecracker_bin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "firecracker".into());
    config.chroot_base.join(exec_name).join(id).join("root")
}

/// The command that becomes the guest: the jailer (which execs Firecracker inside the
/// VM's namespace and chroot), or Firecracker itself under `ip netns exec` when
/// `MGR_JAILER=0`. Prepares the chroot and the socket path first.
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
    let root = chroot_root(config, &meta.id);
    std::fs::create_dir_all(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    let vm = read_vm_config(meta)?;
    link_into_chroot(config, &vm.boot_source.kernel_image_path, &root, "kernel")?;
    for d in &vm.drives {
        link_into_chroot(
            config,
            &d.path_on_host,
            &root,
            &format!("drive-{}", d.drive_id),
        )?;
    }
    let chroot_socket = root.join(CHROOT_SOCKET.trim_start_matches('/'));
    remove_if_present(&chroot_socket)?;
    std::os::unix::fs::symlink(&chroot_socket, socket).map_err(|e| {
        format!(
            "linking {} to {}: {e}",
            socket.display(),
            chroot_socket.display()
        )
    })?;
    let mut cmd = Command::new(&config.jailer_bin);
    cmd.args(["--id", &meta.id])
        .arg("--exec-file")
        .arg(&config.firecracker_bin)
        .args(["--uid", &config.jailer_uid.to_string()])
        .args(["--gid", &config.jailer_gid.to_string()])
        .arg("--chroot-base-dir")
        .arg(&config.chroot_base)
        .arg("--netns")
        .arg(format!("/var/run/netns/{netns}"))
        .args(["--", "--api-sock", CHROOT_SOCKET]);
    Ok(cmd)
}

/// Hard-link a host file into the chroot under `name`, owned by the jailer's user.
fn link_into_chroot(
    config: &RuntimeConfig,
    src: &str,
    root: &Path,
    name: &str,
) -> Result<(), String> {
    let dest = root.join(name);
    remove_if_present(&dest)?;
    std::fs::hard_link(src, &dest).map_err(|e| {
        format!(
            "hard-linking {src} into the jailer chroot {} (it must be on the same file system as MGR_JAILER_CHROOT_BASE): {e}",
            root.display()
        )
    })?;
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
        "/kernel".to_string()
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
            drive["path_on_host"] = json!(format!("/drive-{}", d.drive_id));
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
