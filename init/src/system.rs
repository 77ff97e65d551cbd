//! What kind of PID 1 this is, and the machine-wide steps that depend on it: base
//! mounts, hostname, network, and the final power-off.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::reboot::{reboot, set_cad_enabled, RebootMode};
use nix::unistd::{getpid, sethostname};

use crate::cmdline::{BootArgs, IpConfig};
use crate::say;

/// The inode of the initial PID namespace (`PROC_PID_INIT_INO` in the kernel).
const INITIAL_PID_NS_INO: u64 = 0xEFFF_FFFC;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of the initial PID namespace: the VM's init. The only mode that reads
    /// the kernel command line and the only one that ever calls reboot(2).
    Vm,
    /// PID 1 of a nested PID namespace (a container, a test): mounts in a private mount
    /// namespace, boot arguments only from `MERGEN_INIT_CMDLINE`, exits with the
    /// command's code.
    Namespace,
    /// Not PID 1: no mounts, no hostname, no network; a child subreaper that runs the
    /// command and exits with its code.
    Process,
}

impl Mode {
    pub fn is_pid1(self) -> bool {
        self != Mode::Process
    }
}

/// What [`detect`] found: the mode, and whether this init may mount filesystems.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pid1 {
    pub mode: Mode,
    pub can_mount: bool,
}

/// Decides the mode. As PID 1 it first moves into a private mount namespace (so no
/// mount below can reach another namespace, whatever our parent set up), then mounts
/// /proc there to read which PID namespace it is in. When either step fails the
/// answer is `Namespace`: exiting is always safe, a reboot is not.
pub fn detect() -> Pid1 {
    if getpid().as_raw() != 1 {
        return Pid1 {
            mode: Mode::Process,
            can_mount: false,
        };
    }
    if let Err(e) = private_mounts() {
        say!("cannot make a private mount namespace ({e}); no filesystems will be mounted");
        return Pid1 {
            mode: Mode::Namespace,
            can_mount: false,
        };
    }
    mount_fs("proc", "/proc", "proc", nosuid_nodev_noexec(), None);
    let mode = match fs::metadata("/proc/self/ns/pid") {
        Ok(m) if m.ino() == INITIAL_PID_NS_INO => Mode::Vm,
        _ => Mode::Namespace,
    };
    Pid1 {
        mode,
        can_mount: true,
    }
}

fn private_mounts() -> nix::Result<()> {
    unshare(CloneFlags::CLONE_NEWNS)?;
    // Propagation is copied with the namespace: make everything private, or a mount
    // here could still appear in a peer of the parent's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
}

fn nosuid_nodev_noexec() -> MsFlags {
    MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC
}

/// Mount unless something is mounted there already (EBUSY); failures are logged, not
/// fatal: a guest without /sys can still run its command.
fn mount_fs(source: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    if let Err(e) = fs::create_dir_all(target) {
        say!("cannot create {target}: {e}");
        return;
    }
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) | Err(nix::Error::EBUSY) => {}
        Err(e) => say!("mounting {fstype} on {target}: {e}"),
    }
}

/// /sys, /dev, /dev/pts, /dev/shm, /run and /tmp (/proc is mounted by [`detect`]).
pub fn mount_base(pid1: Pid1) {
    if !pid1.can_mount {
        return;
    }
    mount_fs("sysfs", "/sys", "sysfs", nosuid_nodev_noexec(), None);
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    );
    let pts = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        pts,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    );
    let tmp = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    mount_fs("tmpfs", "/dev/shm", "tmpfs", tmp, Some("mode=1777"));
    mount_fs("tmpfs", "/run", "tmpfs", tmp, Some("mode=0755"));
    mount_fs("tmpfs", "/tmp", "tmpfs", tmp, Some("mode=1777"));
    // A VM's devtmpfs is its own; a nested namespace's is the host's, not ours to add to.
    if pid1.mode == Mode::Vm {
        for (link, target) in [
            ("/dev/fd", "/proc/self/fd"),
            ("/dev/stdin", "/proc/self/fd/0"),
            ("/dev/stdout", "/proc/self/fd/1"),
            ("/dev/stderr", "/proc/self/fd/2"),
            ("/dev/ptmx", "pts/ptmx"),
        ] {
            if fs::symlink_metadata(link).is_err() {
                let _ = std::os::unix::fs::symlink(target, link);
            }
        }
    }
}

/// The boot arguments: the kernel's own in a VM; anywhere else /proc/cmdline is the
/// host's, so only what `MERGEN_INIT_CMDLINE` says.
pub fn boot_args(mode: Mode) -> BootArgs {
    let text = match mode {
        Mode::Vm => fs::read_to_string("/proc/cmdline").unwrap_or_default(),
        Mode::Namespace | Mode::Process => std::env::var("MERGEN_INIT_CMDLINE").unwrap_or_default(),
    };
    BootArgs::parse(&text)
}

pub fn set_hostname(mode: Mode, args: &BootArgs) {
    let Some(name) = args.hostname() else { return };
    if !mode.is_pid1() {
        return;
    }
    // Nested: our own UTS namespace, so a caller that forgot one keeps its hostname.
    if mode == Mode::Namespace {
        if let Err(e) = unshare(CloneFlags::CLONE_NEWUTS) {
            say!("cannot make a private UTS namespace ({e}); hostname left alone");
            return;
        }
    }
    if let Err(e) = sethostname(name) {
        say!("sethostname {name:?}: {e}");
    }
}

/// `lo` up, and the `ip=` address and default route when the kernel has not set them
/// (each step is idempotent: an address or route already there is fine).
pub fn configure_network(mode: Mode, args: &BootArgs) {
    if !mode.is_pid1() {
        return;
    }
    if let Err(e) = ffi_free_netns::links::set_up(None, "lo") {
        say!("bringing up lo: {e}");
    }
    if let Some(ip) = &args.ip {
        if let Err(e) = configure_ip(ip) {
            say!("configuring {}: {e}", ip.device);
        }
    }
}

fn configure_ip(ip: &IpConfig) -> Result<(), ffi_free_netns::Error> {
    use ffi_free_netns::links;
    use std::net::{IpAddr, Ipv4Addr};
    links::add_address(None, &ip.device, IpAddr::V4(ip.address), ip.prefix_len)?;
    links::set_up(None, &ip.device)?;
    if let Some(gw) = ip.gateway {
        links::add_route(
            None,
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            0,
            Some(IpAddr::V4(gw)),
            Some(&ip.device),
        )?;
    }
    if !ip.dns.is_empty() && !Path::new("/etc/resolv.conf").exists() {
        let body: String = ip.dns.iter().map(|d| format!("nameserver {d}\n")).collect();
        if let Err(e) = fs::write("/etc/resolv.conf", body) {
            say!("writing /etc/resolv.conf: {e}");
        }
    }
    Ok(())
}

/// In a VM, Ctrl-Alt-Del (Firecracker's `SendCtrlAltDel`) becomes SIGINT to init
/// instead of an immediate reboot, so the command gets to stop cleanly.
pub fn trap_ctrl_alt_del(mode: Mode) {
    if mode == Mode::Vm {
        if let Err(e) = set_cad_enabled(false) {
            say!("disabling Ctrl-Alt-Del reboot: {e}");
        }
    }
}

/// The end of a VM: sync and restart, which ends a Firecracker VM (`reboot=k`; it has
/// no power-off), or power off when `mergen.exit=poweroff` asks. Any other mode only
/// syncs and returns: the caller exits with the command's code.
pub fn shut_down(mode: Mode, args: &BootArgs, code: i32) {
    nix::unistd::sync();
    if mode != Mode::Vm {
        return;
    }
    let how = if args.power_off {
        RebootMode::RB_POWER_OFF
    } else {
        RebootMode::RB_AUTOBOOT
    };
    say!("main process exited with code {code}; {how:?}");
    let Err(e) = reboot(how);
    say!("reboot(2): {e}");
}
