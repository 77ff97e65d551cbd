//! `mergend vm smoke-test --rootfs F --kernel F [--keep-run-dir]`: the original's
//! standalone Firecracker check, done with the runtime's own host steps. It boots the
//! images as a throwaway VM that mergend never lists (no files under
//! `MGR_CONFIG_ROOT`): net-setup (namespace, veth, tap, nftables, isolation), the
//! Firecracker launch (under the jailer when `MGR_JAILER=1`, as VMs are), configure-start
//! through the API, then it waits for the guest to answer on its IP from inside the
//! namespace, as the forwarder would dial it. Whatever happens, including Ctrl-C, it
//! stops Firecracker (Ctrl-Alt-Del, then terminate), runs net-cleanup and removes its
//! run dir unless `--keep-run-dir` asks to keep the logs.
//!
//! "Answers" means a TCP connection to `--port` (22) is accepted or refused: a refusal
//! is the guest's kernel sending a reset, which proves its network is up even when
//! nothing listens there.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mergen_model::vmconfig::{with_ip_arg, MachineConfig, DEFAULT_BOOT_ARGS};
use mergen_model::{atomic, names, Meta, Paths, VmConfig};

use crate::config::RuntimeConfig;
use crate::error::{Error, Result};
use crate::fc_api::FcClient;
use crate::guest::{self, GuestKind};
use crate::{firecracker, steps};

pub const USAGE: &str = "usage: mergend vm smoke-test --rootfs FILE --kernel FILE [--keep-run-dir]\n\
\x20      [--guest-ip IP] [--port N] [--timeout SECONDS] [--vcpu N] [--mem-mib N] [--boot-args ARGS]";

/// The smoke test's settings, from its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub rootfs: PathBuf,
    pub kernel: PathBuf,
    pub keep_run_dir: bool,
    /// The guest's address; default: the last host address of `MGR_GUEST_CIDR`.
    pub guest_ip: Option<Ipv4Addr>,
    /// The guest port tried (a reset counts as an answer).
    pub port: u16,
    /// How long the guest has to answer after InstanceStart.
    pub timeout: Duration,
    pub vcpu: u32,
    pub mem_mib: u32,
    /// Kernel arguments; the guest network's `ip=` is added unless they set one.
    pub boot_args: String,
}

impl Options {
    pub fn parse(args: &[&str]) -> std::result::Result<Options, String> {
        let mut o = Options {
            rootfs: PathBuf::new(),
            kernel: PathBuf::new(),
            keep_run_dir: false,
            guest_ip: None,
            port: 22,
            timeout: Duration::from_secs(60),
            vcpu: 1,
            mem_mib: 512,
            boot_args: DEFAULT_BOOT_ARGS.to_string(),
        };
        let mut it = args.iter();
        while let Some(&flag) = it.next() {
            if flag == "--keep-run-dir" {
                o.keep_run_dir = true;
                continue;
            }
            let value = it
                .next()
                .copied()
                .ok_or_else(|| format!("{flag} needs a value"))?;
            let number = |what: &str| -> std::result::Result<u64, String> {
                value
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{flag} {value:?}: want {what}"))
            };
            match flag {
                "--rootfs" => o.rootfs = value.into(),
                "--kernel" => o.kernel = value.into(),
                "--guest-ip" => {
                    o.guest_ip = Some(
                        value
                            .parse()
                            .map_err(|_| format!("--guest-ip {value:?}: want an IPv4 address"))?,
                    )
                }
                "--port" => {
                    o.port = u16::try_from(number("a port (1-65535)")?)
                        .map_err(|_| format!("--port {value:?}: want a port (1-65535)"))?
                }
                "--timeout" => o.timeout = Duration::from_secs(number("whole seconds above 0")?),
                "--vcpu" => o.vcpu = number("a vCPU count above 0")? as u32,
                "--mem-mib" => o.mem_mib = number("MiB of memory")? as u32,
                "--boot-args" => o.boot_args = value.to_string(),
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        for (flag, path) in [("--rootfs", &o.rootfs), ("--kernel", &o.kernel)] {
            if path.as_os_str().is_empty() {
                return Err(format!("{flag} is required"));
            }
        }
        Ok(o)
    }
}

/// Run the smoke test; progress goes to stdout, one line per step.
pub fn run(config: &RuntimeConfig, o: &Options) -> Result<()> {
    for (what, path) in [("rootfs", &o.rootfs), ("kernel", &o.kernel)] {
        if !path.is_file() {
            return Err(Error::Invalid(format!(
                "--{what} {}: not a file",
                path.display()
            )));
        }
    }
    let guest_ip = match o.guest_ip {
        Some(ip) => ip,
        None => last_host(config)?,
    };
    if !config.guest_cidr.contains(guest_ip) || Some(guest_ip) == config.guest_cidr.gateway() {
        return Err(Error::Invalid(format!(
            "guest IP {guest_ip} is not a guest address of MGR_GUEST_CIDR {}",
            config.guest_cidr
        )));
    }
    if route_exists(config, guest_ip)? {
        return Err(Error::Invalid(format!(
            "guest IP {guest_ip} is in use on this host (a VM has a route to it); pick another with --guest-ip"
        )));
    }
    let id = random_id()?;
    let meta = smoke_meta(&id, guest_ip)?;
    let vm = VmConfig::new(
        &id,
        &absolute(&o.kernel)?,
        with_ip_arg(&o.boot_args, guest_ip, &config.guest_cidr),
        &absolute(&o.rootfs)?,
        None,
        MachineConfig {
            vcpu_count: o.vcpu,
            mem_size_mib: o.mem_mib,
            smt: false,
        },
    );
    let dir = PathBuf::from(&meta.paths.run_dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    atomic::write_json(Path::new(&meta.paths.vm_config_path), &vm)
        .map_err(|e| Error::io(format!("writing {}", meta.paths.vm_config_path), e))?;
    say(&format!(
        "VM {id}: namespace {}, tap {}, guest {guest_ip}, run dir {}",
        meta.netns,
        meta.tap_name,
        dir.display()
    ));

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| Error::io("installing signal handlers", e))?;
    }
    let mut run = Run {
        config,
        meta: &meta,
        guest: None,
    };
    let result = run.boot_and_reach(o, &stop);
    // A check that leaves things behind has not passed.
    let mut cleaned = run.clean_up();
    if o.keep_run_dir {
        say(&format!("run dir kept: {}", dir.display()));
    } else if let Err(e) = std::fs::remove_dir_all(&dir) {
        cleaned = cleaned.and(Err(Error::io(format!("removing {}", dir.display()), e)));
    }
    result.and(cleaned)
}

struct Run<'a> {
    config: &'a RuntimeConfig,
    meta: &'a Meta,
    guest: Option<Child>,
}

impl Run<'_> {
    fn boot_and_reach(&mut self, o: &Options, stop: &AtomicBool) -> Result<()> {
        steps::net_setup_for(self.config, self.meta, GuestKind::Firecracker)?;
        say("net-setup done");
        let log_path = Path::new(&self.meta.paths.logs_dir).join("firecracker.log");
        let log = std::fs::File::create(&log_path)
            .map_err(|e| Error::io(format!("creating {}", log_path.display()), e))?;
        let err = log
            .try_clone()
            .map_err(|e| Error::io(format!("opening {}", log_path.display()), e))?;
        let mut cmd = guest::command(GuestKind::Firecracker, self.config, self.meta)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| Error::io(format!("starting {cmd:?}"), e))?;
        say(&format!("Firecracker started (pid {})", child.id()));
        self.guest = Some(child);
        steps::configure_firecracker(self.config, self.meta)?;
        say("configured through the API; InstanceStart sent");
        self.reach(o, stop, &log_path)
    }

    /// Dial the guest from inside its namespace until it answers, the time is up, a
    /// signal asks to stop, or Firecracker exits.
    fn reach(&mut self, o: &Options, stop: &AtomicBool, log: &Path) -> Result<()> {
        let ns = ffi_free_netns::open(&self.meta.netns)?;
        let addr = SocketAddr::from((self.meta.guest_ip, o.port));
        let deadline = Instant::now() + o.timeout;
        loop {
            let answer =
                ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(500)))?;
            match answer {
                Ok(_) => {
                    say(&format!("guest {addr} accepted a connection: it is up"));
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    say(&format!(
                        "guest {} answered (port {} refused): its network is up",
                        self.meta.guest_ip, o.port
                    ));
                    return Ok(());
                }
                Err(_) => {}
            }
            if let Some(status) = self
                .guest
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(Error::Invalid(format!(
                    "Firecracker exited ({status}) before the guest answered; see {}",
                    log.display()
                )));
            }
            if stop.load(Ordering::SeqCst) {
                return Err(Error::Invalid("interrupted".into()));
            }
            if Instant::now() >= deadline {
                return Err(Error::Invalid(format!(
                    "guest {addr} did not answer within {:?}; see {}",
                    o.timeout,
                    log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stop Firecracker as graceful-stop does, then net-cleanup. The cleanup goes on to
    /// the end whatever fails; the first failure is returned.
    fn clean_up(&mut self) -> Result<()> {
        let mut stopped = Ok(());
        if let Some(mut child) = self.guest.take() {
            let api = FcClient::new(
                Path::new(&self.meta.paths.socket_path),
                self.config.command_timeout,
            );
            let grace = self.config.stop_timeout.min(Duration::from_secs(5));
            stopped = firecracker::graceful_stop(&api, child.id(), grace).map(|outcome| {
                say(&format!("Firecracker stopped ({outcome:?})"));
            });
            let _ = child.wait();
        }
        let cleaned = steps::net_cleanup(self.config, &self.meta.id).map(|()| {
            say("net-cleanup done");
        });
        stopped.and(cleaned)
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "smoke-test: {line}");
    let _ = out.flush();
}

/// A VM's metadata for the smoke test: every file in its own run dir, under the
/// system's temporary directory, so nothing lands where mergend or the forwarder look.
fn smoke_meta(id: &str, guest_ip: Ipv4Addr) -> Result<Meta> {
    let mut meta = Meta::from_slice(
        format!(r#"{{"id":"{id}","createdAt":"1970-01-01T00:00:00Z","guestIP":"{guest_ip}"}}"#)
            .as_bytes(),
    )
    .map_err(|e| Error::Invalid(format!("smoke-test metadata: {e}")))?;
    let dir = std::env::temp_dir().join(format!("mergen-smoke-{}", names::short_id(id)));
    let p = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let d = dir.to_string_lossy().into_owned();
    meta.netns = names::netns_name(id);
    meta.tap_name = names::tap_name(id);
    meta.paths = Paths {
        config_dir: d.clone(),
        vm_config_path: p("vm.json"),
        meta_path: p("meta.json"),
        hooks_path: p("hooks.json"),
        env_path: p("env"),
        run_dir: d.clone(),
        socket_path: p("mergen.socket"),
        lock_path: p("lock"),
        data_dir: d.clone(),
        logs_dir: d,
    };
    Ok(meta)
}

/// The last host address of `MGR_GUEST_CIDR`: allocation hands addresses out from the
/// bottom, so this one is the least likely to be a VM's.
fn last_host(config: &RuntimeConfig) -> Result<Ipv4Addr> {
    let cidr = &config.guest_cidr;
    let hosts = (1u64 << (32 - u32::from(cidr.prefix_len()))).saturating_sub(2);
    u32::try_from(hosts)
        .ok()
        .filter(|n| *n >= 2)
        .and_then(|n| cidr.host(n))
        .ok_or_else(|| Error::Invalid(format!("MGR_GUEST_CIDR {cidr} has no room for a guest")))
}

/// Whether the root namespace already routes `ip` somewhere specific (a VM's /32).
fn route_exists(config: &RuntimeConfig, ip: Ipv4Addr) -> Result<bool> {
    let mut cmd = Command::new("ip");
    cmd.args(["-4", "route", "show", "exact", &format!("{ip}/32")]);
    let out = crate::command::run(cmd, None, config.command_timeout)?;
    Ok(out.success && !out.stdout.trim().is_empty())
}

fn absolute(path: &Path) -> Result<String> {
    std::fs::canonicalize(path)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|e| Error::io(format!("resolving {}", path.display()), e))
}

/// A fresh lowercase UUIDv4, the only id form the runtime's names accept.
fn random_id() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Error::io("reading /dev/urandom", e))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_with_defaults_and_refuse_nonsense() {
        let o = Options::parse(&["--rootfs", "/r", "--kernel", "/k"]).unwrap();
        assert_eq!(
            (o.rootfs.to_str(), o.kernel.to_str()),
            (Some("/r"), Some("/k"))
        );
        assert!(!o.keep_run_dir);
        assert_eq!(
            (o.port, o.timeout, o.vcpu, o.mem_mib),
            (22, Duration::from_secs(60), 1, 512)
        );
        assert_eq!(o.boot_args, DEFAULT_BOOT_ARGS);
        let o = Options::parse(&[
            "--kernel",
            "/k",
            "--keep-run-dir",
            "--rootfs",
            "/r",
            "--guest-ip",
            "172.30.0.9",
            "--port",
            "80",
            "--timeout",
            "5",
            "--vcpu",
            "2",
            "--mem-mib",
            "256",
            "--boot-args",
            "console=ttyS0",
        ])
        .unwrap();
        assert!(o.keep_run_dir);
        assert_eq!(o.guest_ip, Some(Ipv4Addr::new(172, 30, 0, 9)));
        assert_eq!(
            (o.port, o.timeout.as_secs(), o.vcpu, o.mem_mib),
            (80, 5, 2, 256)
        );
        for bad in [
            &["--kernel", "/k"][..],
            &["--rootfs", "/r"],
            &["--rootfs", "/r", "--kernel"],
            &["--rootfs", "/r", "--kernel", "/k", "--port", "0"],
            &["--rootfs", "/r", "--kernel", "/k", "--port", "70000"],
            &["--rootfs", "/r", "--kernel", "/k", "--guest-ip", "x"],
            &["--rootfs", "/r", "--kernel", "/k", "--shell"],
        ] {
            assert!(Options::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ids_are_lowercase_v4_uuids() {
        let a = random_id().unwrap();
        assert!(names::is_valid_id(&a), "{a}");
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, random_id().unwrap());
    }
}
