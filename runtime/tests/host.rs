//! Runtime tests on the real host: namespaces, veths, nftables, supervisors, real
//! servers reached with curl. Also the Firecracker API test double and a recording
//! `systemctl` double.
//!
//! This binary has its own harness: the embedded supervisor re-executes "mergend" as
//! `<binary> supervise <id>`, and here the test binary plays mergend (MGR_MERGEND_BIN
//! points at it), dispatching those arguments to `mergen_runtime::cli::main` exactly as
//! mergend does.

mod contain;
mod security;
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Duration;

use contain::{
    a_killed_launcher_takes_the_whole_image_guest_with_it,
    an_image_guest_gets_sigterm_however_early_it_comes,
    an_image_guest_runs_its_command_as_in_a_vm_and_exits_with_its_code,
};
use mergen_model::{atomic, names, Meta, PortBinding, ProcessSpec, Protocol};
use mergen_runtime::embedded::EmbeddedSupervisor;
use mergen_runtime::fc_api::FcClient;
use mergen_runtime::firecracker::{self, StopOutcome};
use mergen_runtime::systemd::SystemdSupervisor;
use mergen_runtime::{
    net, state, steps, RuntimeConfig, RuntimeError, Supervisor, Unavailable, VmState,
};
use mergen_testkit::{
    curl_get, free_port, is_root, next, nginx, poll, require_root, run_out, running, wait_for,
    TempDir,
};
use security::{
    guests_reach_the_world_and_their_own_traffic_but_not_each_other_nor_the_host,
    net_setup_changes_sysctls_per_interface_and_records_ip_forward,
    supervisors_and_guests_get_no_secret_from_mergends_environment,
};
use support::firecracker_double::FirecrackerDouble;

type TestFn = fn();

macro_rules! tests {
    ($($f:ident),* $(,)?) => { &[$((stringify!($f), $f as TestFn)),*] };
}

const TESTS: &[(&str, TestFn)] = tests![
    net_setup_and_cleanup_are_idempotent_and_leave_nothing,
    process_vm_serves_on_its_host_port_and_guest_ip_and_stop_leaves_nothing,
    crashing_guest_is_restarted_with_back_off,
    twenty_vms_start_and_stop_concurrently_without_leftovers,
    a_guest_that_cannot_start_fails_start_with_its_error,
    a_killed_supervisor_is_reported_failed_and_stop_still_cleans_up,
    configure_start_replays_vm_json_in_order,
    configure_start_reports_firecrackers_fault_message,
    configure_start_adds_the_guest_network_to_old_vm_json_and_sends_vsock,
    graceful_stop_sends_ctrl_alt_del_then_terminates,
    systemd_backend_issues_the_expected_systemctl_commands,
    install_script_puts_binaries_and_units_in_place,
    udp_ports_are_published_too,
    jailer_command_links_images_into_the_chroot,
    jailer_launch_refuses_what_the_jailer_or_firecracker_would,
    firecracker_net_setup_gives_the_tap_to_the_jailer_user_and_loosens_rp_filter,
    step_subcommands_reject_bad_input_with_clear_errors,
    guests_reach_the_world_and_their_own_traffic_but_not_each_other_nor_the_host,
    net_setup_changes_sysctls_per_interface_and_records_ip_forward,
    supervisors_and_guests_get_no_secret_from_mergends_environment,
    smoke_test_configures_firecracker_as_a_launch_does_reaches_the_guest_and_cleans_up,
    smoke_test_cleans_up_when_the_guest_never_answers_or_it_is_interrupted,
    an_image_guest_runs_its_command_as_in_a_vm_and_exits_with_its_code,
    an_image_guest_gets_sigterm_however_early_it_comes,
    a_killed_launcher_takes_the_whole_image_guest_with_it,
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("supervise" | "vm") => return mergen_runtime::cli::main(&args),
        Some("udp-echo") => return udp_echo(&args[1]),
        Some("tcp-hello") => return security::tcp_hello(&args[1]),
        // Launched as "firecracker" (a symlink to this binary) by the smoke test.
        Some("--api-sock") => return support::firecracker_double::run_process(&args),
        _ => {}
    }
    // This process plays mergend, and mergend's environment holds secrets: the API
    // token, and whatever else the operator's shell exported. No supervisor or guest
    // started by any test may see them (security::supervisors_and_guests...). Set
    // before any thread exists.
    std::env::set_var("MGR_API_TOKEN", security::TOKEN);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", security::AWS_SECRET);
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in TESTS {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    let chosen: Vec<_> = TESTS
        .iter()
        .filter(|(n, _)| filters.is_empty() || filters.iter().any(|f| n.contains(f.as_str())))
        .collect();
    println!("running {} tests", chosen.len());
    let failed: Vec<&str> = std::thread::scope(|s| {
        let handles: Vec<_> = chosen
            .iter()
            .map(|(name, f)| (name, s.spawn(move || std::panic::catch_unwind(f))))
            .collect();
        handles
            .into_iter()
            .filter_map(|(name, h)| {
                let ok = matches!(h.join(), Ok(Ok(())));
                println!("test {name} ... {}", if ok { "ok" } else { "FAILED" });
                (!ok).then_some(*name)
            })
            .collect()
    });
    println!(
        "test result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        chosen.len() - failed.len(),
        failed.len()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A UDP echo server (a guest for the UDP test): answers `echo:<datagram>`.
fn udp_echo(addr: &str) -> ExitCode {
    let Ok(sock) = std::net::UdpSocket::bind(addr) else {
        eprintln!("udp-echo: cannot bind {addr}");
        return ExitCode::FAILURE;
    };
    let mut buf = [0u8; 2048];
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        let mut answer = b"echo:".to_vec();
        answer.extend_from_slice(&buf[..n]);
        let _ = sock.send_to(&answer, from);
    }
    ExitCode::FAILURE
}

// ---------------------------------------------------------------- fixtures

/// A VM id unique on this host while the test runs: pid and counter in the first
/// eight hex digits (they name the namespace, links and nftables table).
fn unique_id() -> String {
    let n = next();
    let pid = std::process::id();
    format!(
        "{:06x}{:02x}-0000-4000-8000-{:012x}",
        pid & 0xff_ffff,
        n & 0xff,
        n
    )
}

/// A /24 inside 10.0.0.0/8 unique to this process and test.
fn unique_cidr() -> String {
    let pid = std::process::id();
    format!("10.{}.{}.0/24", 100 + pid % 100, 100 + next() % 150)
}

/// Temporary state roots and a configuration pointing at them; removed on drop.
struct Host {
    dir: PathBuf,
    config: RuntimeConfig,
    _tmp: TempDir,
}

impl Host {
    fn new(cidr: &str, extra: &[(&str, &str)]) -> Host {
        let tmp = TempDir::new("rt");
        let dir = tmp.path().to_path_buf();
        let exe = std::env::current_exe().unwrap();
        let mut vars: HashMap<String, String> = [
            (
                "MGR_CONFIG_ROOT",
                dir.join("config").to_string_lossy().into_owned(),
            ),
            (
                "MGR_DATA_ROOT",
                dir.join("data").to_string_lossy().into_owned(),
            ),
            (
                "MGR_RUN_ROOT",
                dir.join("run").to_string_lossy().into_owned(),
            ),
            ("MGR_GUEST_CIDR", cidr.to_string()),
            ("MGR_SUPERVISOR", "embedded".into()),
            ("MGR_RUNTIME", "process".into()),
            ("MGR_STOP_TIMEOUT_SECONDS", "5".into()),
            // The machine is shared and at times very busy: a bound on external
            // commands (nft, ip) that tolerates it; a hang still fails.
            ("MGR_COMMAND_TIMEOUT_SECONDS", "30".into()),
            ("MGR_JAILER", "0".into()),
            ("MGR_MERGEND_BIN", exe.to_string_lossy().into_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        for (k, v) in extra {
            vars.insert(k.to_string(), v.to_string());
        }
        let config = RuntimeConfig::from_lookup(|k| vars.get(k).cloned()).unwrap();
        Host {
            dir,
            config,
            _tmp: tmp,
        }
    }

    /// A guard that stops `meta`'s VM through `sup`.
    fn guard<'a>(&'a self, sup: &'a dyn Supervisor, meta: &Meta) -> VmGuard<'a> {
        VmGuard {
            sup,
            config: &self.config,
            meta: meta.clone(),
        }
    }

    /// Write a VM's meta.json (what mergend does before `start`).
    fn vm(&self, host_no: u32, ports: Vec<PortBinding>, process: Option<ProcessSpec>) -> Meta {
        let id = unique_id();
        let guest_ip = self.config.guest_cidr.host(host_no).unwrap();
        let mut meta = Meta::from_slice(
            format!(r#"{{"id":"{id}","createdAt":"2026-01-01T00:00:00Z","guestIP":"{guest_ip}"}}"#)
                .as_bytes(),
        )
        .unwrap();
        meta.ports = ports;
        meta.process = process;
        meta.netns = names::netns_name(&id);
        meta.tap_name = names::tap_name(&id);
        meta.paths = self.config.roots.paths(&id);
        std::fs::create_dir_all(&meta.paths.config_dir).unwrap();
        atomic::write_json(Path::new(&meta.paths.meta_path), &meta).unwrap();
        meta
    }
}

/// Stops the VM (supervisor, guest, network) even when the test panics.
struct VmGuard<'a> {
    sup: &'a dyn Supervisor,
    config: &'a RuntimeConfig,
    meta: Meta,
}

impl Drop for VmGuard<'_> {
    fn drop(&mut self) {
        let _ = self.sup.stop(&self.meta);
        let _ = steps::net_cleanup(self.config, &self.meta.id);
    }
}

/// Cleans up a VM's network (for tests that set it up without a supervisor).
struct NetCleanup<'a>(&'a RuntimeConfig, String);

impl Drop for NetCleanup<'_> {
    fn drop(&mut self) {
        let _ = steps::net_cleanup(self.0, &self.1);
    }
}

/// A guest command with no environment of its own.
fn process(cmd: &[&str]) -> ProcessSpec {
    ProcessSpec {
        cmd: cmd.iter().map(|a| a.to_string()).collect(),
        env: BTreeMap::new(),
        workdir: None,
        root: None,
    }
}

fn tcp(guest: u16, host: u16) -> PortBinding {
    PortBinding {
        guest,
        host,
        protocol: Protocol::Tcp,
    }
}

/// nginx serving `www` on `ip:port`, its files under `dir`.
fn http_server(ip: &str, port: u16, dir: &Path, www: &Path) -> ProcessSpec {
    ProcessSpec {
        cmd: nginx::guest_argv(dir, &format!("{ip}:{port}"), www),
        env: BTreeMap::new(),
        workdir: Some(dir.to_string_lossy().into_owned()),
        root: None,
    }
}

/// curl `url` (optionally inside a namespace) until it answers 200 or the deadline.
fn curl_until_ok(netns: Option<&str>, url: &str, deadline: Duration) -> String {
    let mut last = String::new();
    poll(deadline, || curl_get(netns, url).map_err(|e| last = e).ok())
        .unwrap_or_else(|| panic!("{url} (netns {netns:?}) never answered: {last}"))
}

/// Nothing of the VM on the host: namespace, host link, table; checked with iproute2
/// and nft themselves, not with the code under test.
fn assert_nothing_left(id: &str) {
    let id8 = names::short_id(id);
    assert!(
        !run_out(&["ip", "netns", "list"]).contains(&format!("mergen-{id8}")),
        "namespace left"
    );
    assert!(
        !run_out(&["ip", "-o", "link"]).contains(&format!("vh-{id8}")),
        "veth left"
    );
    assert!(
        !run_out(&["nft", "list", "tables"]).contains(&format!("mergen-{id8}")),
        "nft table left"
    );
    let shared = run_out(&["nft", "list", "table", "inet", "mergen"]);
    for chain in [format!("in-{id8}"), format!("fwd-{id8}")] {
        assert!(
            !shared.contains(&format!("chain {chain} ")),
            "isolation chain {chain} left"
        );
    }
    assert!(
        !shared.contains(&format!("\"vh-{id8}\"")),
        "isolation map element of vh-{id8} left"
    );
}

// ---------------------------------------------------------------- host tests

fn net_setup_and_cleanup_are_idempotent_and_leave_nothing() {
    require_root!();
    let host = Host::new(&unique_cidr(), &[]);
    let (p1, p2) = (free_port(), free_port());
    let spec = process(&["true"]);
    let ports = vec![
        tcp(80, p1),
        PortBinding {
            guest: 53,
            host: p2,
            protocol: Protocol::Udp,
        },
    ];
    let meta = host.vm(2, ports, Some(spec));
    let id8 = names::short_id(&meta.id).to_string();
    let _clean = NetCleanup(&host.config, meta.id.clone());
    for _ in 0..2 {
        steps::net_setup(&host.config, &meta).unwrap();
    }
    let ns = format!("mergen-{id8}");
    assert!(run_out(&["ip", "netns", "list"]).contains(&ns));
    let addrs = run_out(&["ip", "-n", &ns, "-o", "-4", "addr"]);
    assert_eq!(
        addrs.matches(&format!("{}/32", meta.guest_ip)).count(),
        1,
        "{addrs}"
    );
    let table = run_out(&["nft", "list", "table", "ip", &format!("mergen-{id8}")]);
    let guest = meta.guest_ip;
    assert_eq!(
        table
            .matches(&format!("tcp dport {p1} dnat to {guest}:80"))
            .count(),
        2,
        "{table}"
    );
    assert_eq!(
        table
            .matches(&format!("udp dport {p2} dnat to {guest}:53"))
            .count(),
        2,
        "{table}"
    );
    let routes = run_out(&["ip", "-4", "route", "show", &format!("{guest}")]);
    assert!(routes.contains(&format!("dev vh-{id8}")), "{routes}");
    // The VM's part of the shared isolation table, once however often set up.
    let shared = run_out(&["nft", "list", "table", "inet", "mergen"]);
    assert_eq!(
        shared
            .matches(&format!("\"vh-{id8}\" : jump in-{id8}"))
            .count(),
        1,
        "{shared}"
    );
    assert_eq!(shared.matches(&format!("chain in-{id8} {{")).count(), 1);
    assert_eq!(
        shared.matches("iifname vmap @guest_input").count(),
        1,
        "the shared chains were filled twice: {shared}"
    );
    let left = net::leftovers(&meta.id, Duration::from_secs(10)).unwrap();
    assert!(
        left.iter().any(|l| l.contains(&format!("in-{id8}"))),
        "{left:?}"
    );
    for _ in 0..2 {
        steps::net_cleanup(&host.config, &meta.id).unwrap();
    }
    assert_nothing_left(&meta.id);
    assert!(net::leftovers(&meta.id, Duration::from_secs(10))
        .unwrap()
        .is_empty());
    // The shared table stays for the other VMs (and other mergends) on the host.
    assert!(run_out(&["nft", "list", "tables"]).contains("table inet mergen"));
}

fn process_vm_serves_on_its_host_port_and_guest_ip_and_stop_leaves_nothing() {
    require_root!();
    let host = Host::new(&unique_cidr(), &[]);
    let www = host.dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello from the guest\n").unwrap();
    let hport = free_port();
    let ip = host.config.guest_cidr.host(2).unwrap().to_string();
    let meta = host.vm(
        2,
        vec![tcp(8080, hport)],
        Some(http_server(&ip, 8080, &host.dir.join("nginx"), &www)),
    );
    let sup = EmbeddedSupervisor::new(host.config.clone()).unwrap();
    let guard = host.guard(&sup, &meta);
    sup.start(&meta).unwrap();
    sup.start(&meta).unwrap(); // idempotent
    let st = sup.status(&meta).unwrap();
    assert_eq!(st.state, VmState::Running);
    let sup_pid = st.supervisor.pid.unwrap();
    assert!(!st.systemd.available);
    let body = curl_until_ok(
        None,
        &format!("http://127.0.0.1:{hport}/index.html"),
        Duration::from_secs(20),
    );
    assert_eq!(body, "hello from the guest\n");
    let body = curl_until_ok(
        Some(&meta.netns),
        &format!("http://{ip}:8080/index.html"),
        Duration::from_secs(5),
    );
    assert_eq!(body, "hello from the guest\n");
    let guest_pid = state::read(&meta.paths).unwrap().guest_pid.unwrap();
    // The guest really runs inside the VM's namespace.
    use std::os::unix::fs::MetadataExt;
    let guest_ns = std::fs::read_link(format!("/proc/{guest_pid}/ns/net")).unwrap();
    let vm_ns = std::fs::metadata(format!("/run/netns/{}", meta.netns))
        .unwrap()
        .ino();
    assert_eq!(guest_ns.to_string_lossy(), format!("net:[{vm_ns}]"));
    sup.stop(&meta).unwrap();
    sup.stop(&meta).unwrap(); // idempotent
    assert!(!running(guest_pid), "guest left");
    assert!(!running(sup_pid), "supervisor left");
    assert_nothing_left(&meta.id);
    assert_eq!(sup.status(&meta).unwrap().state, VmState::Stopped);
    drop(guard);
}

fn crashing_guest_is_restarted_with_back_off() {
    require_root!();
    let host = Host::new(&unique_cidr(), &[]);
    let marker = host.dir.join("launches");
    let spec = process(&[
        "sh",
        "-c",
        &format!("date +%s%N >> {}; exit 3", marker.display()),
    ]);
    let meta = host.vm(2, vec![], Some(spec));
    let sup = EmbeddedSupervisor::new(host.config.clone()).unwrap();
    let _guard = host.guard(&sup, &meta);
    sup.start(&meta).unwrap();
    let restarts = wait_for("4 restarts", Duration::from_secs(30), || {
        state::read(&meta.paths)
            .filter(|s| s.restarts >= 4)
            .map(|s| s.restarts)
    });
    assert!(restarts >= 4);
    // Each launch is recorded by the guest itself; the gaps grow (100, 200, 400 ms...).
    let launches: Vec<u128> = std::fs::read_to_string(&marker)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert!(launches.len() >= 4, "{launches:?}");
    let gaps: Vec<u128> = launches
        .windows(2)
        .map(|w| (w[1] - w[0]) / 1_000_000)
        .collect();
    assert!(gaps[0] >= 100, "first restart came after {} ms", gaps[0]);
    assert!(
        gaps[2] >= 400 && gaps[2] > gaps[0],
        "no back-off: gaps {gaps:?} ms"
    );
    let log =
        std::fs::read_to_string(Path::new(&meta.paths.logs_dir).join("supervisor.log")).unwrap();
    assert!(
        log.contains("restart 1 in 100 ms") && log.contains("restart 3 in 400 ms"),
        "{log}"
    );
    assert_ne!(sup.status(&meta).unwrap().state, VmState::Stopped);
    sup.stop(&meta).unwrap();
    assert_nothing_left(&meta.id);
}

fn twenty_vms_start_and_stop_concurrently_without_leftovers() {
    require_root!();
    let host = Host::new(&unique_cidr(), &[]);
    let sup: Arc<dyn Supervisor> = Arc::new(EmbeddedSupervisor::new(host.config.clone()).unwrap());
    let metas: Vec<Meta> = (0..20)
        .map(|i| {
            let spec = process(&["sleep", "600"]);
            host.vm(2 + i, vec![tcp(80, free_port())], Some(spec))
        })
        .collect();
    let _guards: Vec<VmGuard> = metas.iter().map(|m| host.guard(sup.as_ref(), m)).collect();
    std::thread::scope(|s| {
        for m in &metas {
            let sup = sup.clone();
            s.spawn(move || sup.start(m).unwrap());
        }
    });
    let statuses = sup.status_all(&metas.iter().collect::<Vec<_>>()).unwrap();
    assert!(
        statuses.iter().all(|s| s.state == VmState::Running),
        "{statuses:?}"
    );
    let pids: HashSet<u32> = statuses.iter().map(|s| s.supervisor.pid.unwrap()).collect();
    assert_eq!(pids.len(), 20);
    // Each namespace holds exactly its own guest address, and no address twice.
    let mut seen = HashSet::new();
    for m in &metas {
        let addrs = run_out(&[
            "ip",
            "-n",
            &m.netns,
            "-o",
            "-4",
            "addr",
            "show",
            "dev",
            &format!("vg-{}", names::short_id(&m.id)),
        ]);
        let ips: Vec<&str> = addrs
            .split_whitespace()
            .filter(|w| w.contains('/'))
            .collect();
        assert_eq!(ips, vec![format!("{}/32", m.guest_ip)], "{}", m.netns);
        assert!(seen.insert(m.guest_ip), "duplicate {}", m.guest_ip);
    }
    std::thread::scope(|s| {
        for m in &metas {
            let sup = sup.clone();
            s.spawn(move || sup.stop(m).unwrap());
        }
    });
    for m in &metas {
        assert_nothing_left(&m.id);
    }
    assert!(sup
        .status_all(&metas.iter().collect::<Vec<_>>())
        .unwrap()
        .iter()
        .all(|s| s.state == VmState::Stopped));
}

fn a_guest_that_cannot_start_fails_start_with_its_error() {
    require_root!();
    // A guest IP outside MGR_GUEST_CIDR: net-setup refuses, start reports why.
    let host = Host::new(&unique_cidr(), &[]);
    let spec = process(&["sleep", "600"]);
    let mut meta = host.vm(2, vec![], Some(spec));
    meta.guest_ip = "192.0.2.9".parse().unwrap();
    atomic::write_json(Path::new(&meta.paths.meta_path), &meta).unwrap();
    let sup = EmbeddedSupervisor::new(host.config.clone()).unwrap();
    let _guard = host.guard(&sup, &meta);
    let err = sup.start(&meta).unwrap_err().to_string();
    assert!(
        err.contains("192.0.2.9") && err.contains("MGR_GUEST_CIDR"),
        "{err}"
    );
    assert_eq!(sup.status(&meta).unwrap().state, VmState::Failed);
    sup.stop(&meta).unwrap();
    assert_nothing_left(&meta.id);
}

// ---------------------------------------------------------------- Firecracker double

fn firecracker_vm(host: &Host) -> Meta {
    let meta = host.vm(2, vec![], None);
    let vm = serde_json::json!({
        "boot-source": {"kernel_image_path": "/images/vmlinux", "boot_args": "console=ttyS0 ip=10.0.0.2::10.0.0.1:255.255.255.0::eth0:off"},
        "drives": [
            {"drive_id": "rootfs", "path_on_host": "/images/rootfs.ext4", "is_root_device": true, "is_read_only": false},
            {"drive_id": "data", "path_on_host": "/images/data.ext4", "is_root_device": false, "is_read_only": false}
        ],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": meta.tap_name, "guest_mac": names::guest_mac(&meta.id)}]
    });
    atomic::write_json(Path::new(&meta.paths.vm_config_path), &vm).unwrap();
    std::fs::create_dir_all(&meta.paths.run_dir).unwrap();
    meta
}

/// A Firecracker-runtime host (settings `extra`) with one VM whose API socket is
/// answered by the test double.
fn firecracker_host(extra: &[(&str, &str)]) -> (Host, Meta, FirecrackerDouble) {
    let mut vars = vec![("MGR_RUNTIME", "firecracker")];
    vars.extend_from_slice(extra);
    let host = Host::new("10.0.0.0/24", &vars);
    let meta = firecracker_vm(&host);
    let double = FirecrackerDouble::listen(Path::new(&meta.paths.socket_path));
    (host, meta, double)
}

/// What configure-start sends for `firecracker_vm`'s vm.json before its vsock (if
/// any) and InstanceStart, in Firecracker's required order.
const CONFIGURE_CALLS: [&str; 5] = [
    "/boot-source",
    "/machine-config",
    "/drives/rootfs",
    "/drives/data",
    "/network-interfaces/eth0",
];

fn paths_of(calls: &[support::firecracker_double::Call]) -> Vec<&str> {
    calls.iter().map(|c| c.path.as_str()).collect()
}

fn configure_start_replays_vm_json_in_order() {
    let (host, meta, double) = firecracker_host(&[("MGR_COMMAND_TIMEOUT_SECONDS", "5")]);
    steps::configure_start(&host.config, &meta).unwrap();
    let calls = double.calls();
    assert_eq!(
        paths_of(&calls),
        [&CONFIGURE_CALLS[..], &["/actions"]].concat()
    );
    assert!(calls.iter().all(|c| c.method == "PUT"));
    // The readiness check's connection carried all six calls.
    assert_eq!(double.connections(), 1);
    let vm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta.paths.vm_config_path).unwrap()).unwrap();
    assert_eq!(calls[0].body, vm["boot-source"]);
    assert_eq!(calls[1].body, vm["machine-config"]);
    assert_eq!(calls[2].body, vm["drives"][0]);
    assert_eq!(calls[3].body, vm["drives"][1]);
    assert_eq!(calls[4].body, vm["network-interfaces"][0]);
    assert_eq!(
        calls[5].body,
        serde_json::json!({"action_type": "InstanceStart"})
    );

    // Under the jailer, host paths become the names linked into the chroot.
    let api = FcClient::new(Path::new(&meta.paths.socket_path), Duration::from_secs(5));
    let parsed = firecracker::read_vm_config(&meta).unwrap();
    firecracker::configure_start(&api, &parsed, true).unwrap();
    let calls = double.calls();
    assert_eq!(calls[6].body["kernel_image_path"], "/kernel");
    assert_eq!(calls[8].body["path_on_host"], "/drive-rootfs");
}

fn configure_start_adds_the_guest_network_to_old_vm_json_and_sends_vsock() {
    let (host, meta, double) = firecracker_host(&[("MGR_COMMAND_TIMEOUT_SECONDS", "5")]);
    // A vm.json as the original wrote it before the guest network went into the boot
    // args, with the later original's vsock block.
    let mut vm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta.paths.vm_config_path).unwrap()).unwrap();
    vm["boot-source"]["boot_args"] = "console=ttyS0 reboot=k panic=1 pci=off".into();
    let uds = Path::new(&meta.paths.run_dir).join("v.sock");
    vm["vsock"] = serde_json::json!({"vsock_id": "vsock0", "guest_cid": 3, "uds_path": uds});
    atomic::write_json(Path::new(&meta.paths.vm_config_path), &vm).unwrap();
    let on_disk = std::fs::read(&meta.paths.vm_config_path).unwrap();

    steps::configure_start(&host.config, &meta).unwrap();
    let calls = double.calls();
    assert_eq!(
        paths_of(&calls),
        [&CONFIGURE_CALLS[..], &["/vsock", "/actions"]].concat()
    );
    // The guest IP from meta.json, the gateway and mask from MGR_GUEST_CIDR.
    assert_eq!(
        calls[0].body["boot_args"],
        format!(
            "console=ttyS0 reboot=k panic=1 pci=off ip={}::10.0.0.1:255.255.255.0::eth0:off",
            meta.guest_ip
        )
    );
    assert_eq!(calls[5].body, vm["vsock"]);
    // The file itself is left as the user has it.
    assert_eq!(std::fs::read(&meta.paths.vm_config_path).unwrap(), on_disk);

    // A vm.json that has its own ip= keeps it, and gets no second one.
    vm["boot-source"]["boot_args"] = "console=ttyS0 ip=dhcp".into();
    atomic::write_json(Path::new(&meta.paths.vm_config_path), &vm).unwrap();
    steps::configure_start(&host.config, &meta).unwrap();
    assert_eq!(double.calls()[7].body["boot_args"], "console=ttyS0 ip=dhcp");

    // Under the jailer, Firecracker binds the vsock socket inside its chroot.
    let api = FcClient::new(Path::new(&meta.paths.socket_path), Duration::from_secs(5));
    let parsed = firecracker::read_vm_config(&meta).unwrap();
    firecracker::configure_start(&api, &parsed, true).unwrap();
    let vsock = double
        .calls()
        .into_iter()
        .rev()
        .find(|c| c.path == "/vsock")
        .unwrap();
    assert_eq!(
        vsock.body,
        serde_json::json!({"vsock_id": "vsock0", "guest_cid": 3, "uds_path": firecracker::JAIL_VSOCK})
    );

    // Firecracker refuses to bind over an existing path: a socket left by a previous
    // run is removed before the launch (a regular file is not ours to delete).
    drop(std::os::unix::net::UnixListener::bind(&uds).unwrap());
    let mut direct = host.config.clone();
    direct.use_jailer = false;
    firecracker::launch_command(&direct, &meta).unwrap();
    assert!(!uds.exists(), "stale vsock socket left");
    std::fs::write(&uds, "user data").unwrap();
    firecracker::launch_command(&direct, &meta).unwrap();
    assert_eq!(std::fs::read(&uds).unwrap(), b"user data");
}

fn configure_start_reports_firecrackers_fault_message() {
    let (host, meta, double) = firecracker_host(&[("MGR_COMMAND_TIMEOUT_SECONDS", "5")]);
    double.fail("/drives/rootfs", 400, "Invalid block device path");
    let err = steps::configure_start(&host.config, &meta)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("400")
            && err.contains("PUT /drives/rootfs")
            && err.contains("Invalid block device path"),
        "{err}"
    );
    let paths: Vec<String> = double.calls().into_iter().map(|c| c.path).collect();
    assert_eq!(
        paths.last().unwrap(),
        "/drives/rootfs",
        "kept going after an error: {paths:?}"
    );

    // No API socket at all: a clear error once the deadline passes.
    drop(double);
    let api = FcClient::new(
        Path::new(&meta.paths.socket_path),
        Duration::from_millis(300),
    );
    let err = api.wait_ready().unwrap_err();
    assert!(err.contains("not ready"), "{err}");
}

fn graceful_stop_sends_ctrl_alt_del_then_terminates() {
    let (host, meta, double) = firecracker_host(&[("MGR_STOP_TIMEOUT_SECONDS", "1")]);

    // The guest shuts down on Ctrl-Alt-Del.
    let mut guest = Command::new("sleep").arg("60").spawn().unwrap();
    double.exit_on_ctrl_alt_del(Some(guest.id()));
    let outcome = steps::graceful_stop(&host.config, &meta, guest.id()).unwrap();
    guest.wait().unwrap();
    assert_eq!(outcome, StopOutcome::ShutDown);
    let calls = double.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        (calls[0].path.as_str(), &calls[0].body),
        (
            "/actions",
            &serde_json::json!({"action_type": "SendCtrlAltDel"})
        )
    );

    // It ignores Ctrl-Alt-Del: terminated after MGR_STOP_TIMEOUT_SECONDS.
    let mut stubborn = Command::new("sleep").arg("60").spawn().unwrap();
    double.exit_on_ctrl_alt_del(None);
    let outcome = steps::graceful_stop(&host.config, &meta, stubborn.id()).unwrap();
    assert!(!stubborn.wait().unwrap().success());
    assert_eq!(outcome, StopOutcome::Terminated);

    // The API refuses Ctrl-Alt-Del: still terminated, not stuck.
    double.fail("/actions", 400, "not supported on this architecture");
    let mut refused = Command::new("sleep").arg("60").spawn().unwrap();
    let outcome = steps::graceful_stop(&host.config, &meta, refused.id()).unwrap();
    refused.wait().unwrap();
    assert_eq!(outcome, StopOutcome::Terminated);
    assert_eq!(double.calls().len(), 3);
}

// ---------------------------------------------------------------- systemctl double

fn systemd_backend_issues_the_expected_systemctl_commands() {
    let dir = TempDir::new("rt-systemctl");
    let log = dir.join("calls");
    let script = dir.join("systemctl");
    // Records argv; `show` answers one block per unit, as systemd does; a unit whose
    // name contains "broken" makes `start` fail like a missing unit.
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$*\" >> {log}\n\
             case \"$1\" in\n\
             show) shift; shift; first=1; for u in \"$@\"; do\n\
               [ $first = 1 ] || echo; first=0\n\
               case \"$u\" in *aaaa*) printf 'MainPID=77\\nId=%s\\nActiveState=active\\nSubState=running\\n' \"$u\";;\n\
               *) printf 'Id=%s\\nActiveState=inactive\\nSubState=dead\\nMainPID=0\\n' \"$u\";; esac; done;;\n\
             start) case \"$2\" in *broken*) echo \"Failed to start $2: Unit $2 not found.\" >&2; exit 5;; esac;;\n\
             esac\n",
            log = log.display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&script)
        .status()
        .unwrap();
    let host = Host::new(
        "10.0.0.0/24",
        &[
            ("MGR_SYSTEMCTL_PATH", &script.to_string_lossy()),
            ("MGR_UNIT_PREFIX", "mgtest"),
        ],
    );
    let sup = SystemdSupervisor::new(host.config.clone());
    let mk = |id: &str| {
        Meta::from_slice(
            format!(r#"{{"id":"{id}","createdAt":"2026-01-01T00:00:00Z","guestIP":"10.0.0.2"}}"#)
                .as_bytes(),
        )
        .unwrap()
    };
    let a = mk("aaaaaaaa-0000-4000-8000-000000000001");
    let b = mk("bbbbbbbb-0000-4000-8000-000000000002");
    sup.start(&a).unwrap();
    sup.stop(&b).unwrap();
    let all = sup.status_all(&[&a, &b]).unwrap();
    assert_eq!(all[0].state, VmState::Running);
    assert_eq!(all[0].supervisor.pid, Some(77));
    assert_eq!(all[0].systemd.unit, format!("mgtest@{}.service", a.id));
    assert!(all[0].systemd.available && all[0].systemd.active);
    assert_eq!(all[1].state, VmState::Stopped);
    assert!(!all[1].supervisor.active);
    // A unit that does not exist (the template is not installed) is a missing
    // dependency, which the API answers with 503 as the original did.
    let broken = mk("broken00-0000-4000-8000-000000000003");
    let err = sup.start(&broken).unwrap_err();
    assert!(
        matches!(&err, RuntimeError::Unavailable(Unavailable::UnitMissing { unit, .. }) if *unit == format!("mgtest@{}.service", broken.id)),
        "{err:?}"
    );
    assert!(err.is_unavailable());
    assert!(err.to_string().contains("not found"), "{err}");
    let calls = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        calls.lines().collect::<Vec<_>>(),
        [
            format!("start mgtest@{}.service", a.id),
            format!("stop mgtest@{}.service", b.id),
            format!("show --property=Id,ActiveState,SubState,MainPID mgtest@{}.service mgtest@{}.service", a.id, b.id),
            format!("start mgtest@{}.service", broken.id),
        ]
    );
}

// ---------------------------------------------------------------- deploy/

/// Run deploy/install.sh with `env`; (success, stderr).
fn install(env: &[(&str, &Path)]) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/install.sh");
    let mut cmd = Command::new("sh");
    cmd.arg(&script).env_remove("MGR_CONFIG_ROOT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn install_script_puts_binaries_and_units_in_place() {
    let dir = TempDir::new("rt-install");
    let bins = dir.join("bins");
    let root = dir.join("root");
    std::fs::create_dir_all(&bins).unwrap();
    for b in ["mergend", "mergen-forwarder"] {
        std::fs::write(bins.join(b), "#!/bin/sh\n").unwrap();
        Command::new("chmod")
            .arg("+x")
            .arg(bins.join(b))
            .status()
            .unwrap();
    }
    let (ok, err) = install(&[
        ("BIN_DIR", &bins),
        ("PREFIX", Path::new("/opt/mergen")),
        ("DESTDIR", &root),
    ]);
    assert!(ok, "{err}");
    assert!(root.join("opt/mergen/bin/mergend").is_file());
    assert!(root.join("opt/mergen/bin/mergen-forwarder").is_file());
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/mergen@.service")).unwrap();
    for step in [
        "ExecStartPre=/opt/mergen/bin/mergend vm net-setup %i",
        "ExecStart=/opt/mergen/bin/mergend vm run %i",
        "ExecStartPost=/opt/mergen/bin/mergend vm configure-start %i",
        "ExecStop=/opt/mergen/bin/mergend vm graceful-stop %i",
        "ExecStopPost=/opt/mergen/bin/mergend vm net-cleanup %i",
        "Restart=on-failure",
        "KillMode=mixed",
        "EnvironmentFile=/etc/mergen/vm.d/%i/env",
        "UnsetEnvironment=MGR_API_TOKEN",
    ] {
        assert!(
            unit.lines().any(|l| l == step),
            "missing {step:?} in\n{unit}"
        );
    }
    assert!(!unit.contains("/usr/local/bin"));
    let fwd =
        std::fs::read_to_string(root.join("etc/systemd/system/mergen-forwarder.service")).unwrap();
    assert!(fwd.contains("ExecStart=/opt/mergen/bin/mergen-forwarder"));
    assert!(fwd
        .lines()
        .any(|l| l == "EnvironmentFile=-/etc/mergen/forwarder.env"));
    let settings = std::fs::read_to_string(root.join("etc/mergen/mergen.env")).unwrap();
    assert!(
        settings.lines().any(|l| l == "MGR_SUPERVISOR=systemd"),
        "{settings}"
    );
    // The forwarder's settings file, as the original installs it.
    let fwd_env = root.join("etc/mergen/forwarder.env");
    let text = std::fs::read_to_string(&fwd_env).unwrap();
    assert!(text.lines().any(|l| l == "FWD_LOG_LEVEL=info"), "{text}");
    // Secrets live in a file only mergend reads, and only root can.
    use std::os::unix::fs::PermissionsExt;
    let secrets = std::fs::metadata(root.join("etc/mergen/mergend.env")).unwrap();
    assert_eq!(secrets.permissions().mode() & 0o777, 0o600);
    // The control plane: only mergend itself is killed on stop (embedded supervisors
    // share its control group and must outlive it), restarted on failure, and it reads
    // the same settings file as the VM units plus its own secrets.
    let ctl = std::fs::read_to_string(root.join("etc/systemd/system/mergend.service")).unwrap();
    for line in [
        "ExecStart=/opt/mergen/bin/mergend",
        "KillMode=process",
        "Restart=on-failure",
        "EnvironmentFile=-/etc/mergen/mergen.env",
        "EnvironmentFile=-/etc/mergen/mergend.env",
    ] {
        assert!(ctl.lines().any(|l| l == line), "missing {line:?} in\n{ctl}");
    }
    assert!(unit
        .lines()
        .any(|l| l == "EnvironmentFile=-/etc/mergen/mergen.env"));
    assert!(
        !unit.contains("mergend.env"),
        "a VM unit reads mergend's secrets"
    );
    // Every command of every unit is an installed binary (or kill for reload).
    for text in [&unit, &fwd, &ctl] {
        for line in text.lines().filter(|l| l.starts_with("Exec")) {
            let program = line
                .split_once('=')
                .and_then(|(_, cmd)| cmd.split_whitespace().next())
                .unwrap();
            let installed = program
                .strip_prefix("/opt/mergen/bin/")
                .is_some_and(|b| root.join("opt/mergen/bin").join(b).is_file());
            assert!(installed || program == "/bin/kill", "{line}");
        }
    }

    // The operator's files are never overwritten by a second install.
    std::fs::write(&fwd_env, "FWD_LOG_LEVEL=debug\n").unwrap();
    std::fs::write(
        root.join("etc/mergen/mergen.env"),
        "MGR_SUPERVISOR=systemd\nMGR_CONFIG_ROOT='/srv/mergen/vms/'\n",
    )
    .unwrap();
    let (ok, err) = install(&[("BIN_DIR", &bins), ("DESTDIR", &root)]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read_to_string(&fwd_env).unwrap(),
        "FWD_LOG_LEVEL=debug\n"
    );
    // ...and the VM unit follows the MGR_CONFIG_ROOT set there.
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/mergen@.service")).unwrap();
    assert!(
        unit.lines()
            .any(|l| l == "EnvironmentFile=/srv/mergen/vms/%i/env"),
        "{unit}"
    );
    assert!(root.join("srv/mergen/vms").is_dir());

    // MGR_CONFIG_ROOT given to the install wins, and lands in a new mergen.env.
    let fresh = dir.join("fresh");
    let (ok, err) = install(&[
        ("BIN_DIR", &bins),
        ("DESTDIR", &fresh),
        ("MGR_CONFIG_ROOT", Path::new("/data/vm.d")),
    ]);
    assert!(ok, "{err}");
    let unit = std::fs::read_to_string(fresh.join("etc/systemd/system/mergen@.service")).unwrap();
    assert!(
        unit.lines()
            .any(|l| l == "EnvironmentFile=/data/vm.d/%i/env"),
        "{unit}"
    );
    let settings = std::fs::read_to_string(fresh.join("etc/mergen/mergen.env")).unwrap();
    assert!(
        settings.lines().any(|l| l == "MGR_CONFIG_ROOT=/data/vm.d"),
        "{settings}"
    );
    let (ok, err) = install(&[
        ("BIN_DIR", &bins),
        ("DESTDIR", &dir.join("relative")),
        ("MGR_CONFIG_ROOT", Path::new("vm.d")),
    ]);
    assert!(!ok && err.contains("absolute"), "{err}");

    // A missing binary is a clear error, not a half install.
    std::fs::remove_file(bins.join("mergen-forwarder")).unwrap();
    let (ok, err) = install(&[("BIN_DIR", &bins), ("DESTDIR", &dir.join("root2"))]);
    assert!(!ok);
    assert!(err.contains("mergen-forwarder not found"), "{err}");
    assert!(!dir.join("root2").exists());
}

// ---------------------------------------------------------------- more steps

fn udp_ports_are_published_too() {
    require_root!();
    let host = Host::new(&unique_cidr(), &[]);
    let ip = host.config.guest_cidr.host(2).unwrap();
    let hport = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    // The guest is this test binary in its UDP echo mode (see `main`).
    let exe = std::env::current_exe().unwrap();
    let spec = process(&[&exe.to_string_lossy(), "udp-echo", &format!("{ip}:5353")]);
    let udp = PortBinding {
        guest: 5353,
        host: hport,
        protocol: Protocol::Udp,
    };
    let meta = host.vm(2, vec![udp], Some(spec));
    let sup = EmbeddedSupervisor::new(host.config.clone()).unwrap();
    let _guard = host.guard(&sup, &meta);
    sup.start(&meta).unwrap();
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 64];
    let answer = wait_for(
        "a UDP echo through the published port",
        Duration::from_secs(20),
        || {
            client.send_to(b"ping", ("127.0.0.1", hport)).ok()?;
            let (n, _) = client.recv_from(&mut buf).ok()?;
            Some(buf[..n].to_vec())
        },
    );
    assert_eq!(answer, b"echo:ping");
    sup.stop(&meta).unwrap();
    assert_nothing_left(&meta.id);
}

/// A stand-in Firecracker binary for the jailer's argv: a versioned file behind a
/// `firecracker` symlink, as release tarballs install it. Returns (symlink, file).
fn fake_firecracker(dir: &Path, file_name: &str) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let file = bin.join(file_name);
    std::fs::write(&file, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = bin.join("firecracker");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&file, &link).unwrap();
    (link, file.canonicalize().unwrap())
}

fn jailer_command_links_images_into_the_chroot() {
    require_root!();
    // Short: the test double binds the jail's socket by its full path (unix socket
    // paths are limited to 107 bytes; mergend itself connects through the short symlink).
    let chroot = PathBuf::from(format!("/tmp/mj{}-{}", std::process::id(), next()));
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _remove = Remove(chroot.clone());
    let bin_dir = TempDir::new("rt-fcbin");
    let (fc_link, fc_file) = fake_firecracker(bin_dir.path(), "firecracker-v1.7");
    let host = Host::new(
        "10.0.0.0/24",
        &[
            ("MGR_RUNTIME", "firecracker"),
            ("MGR_JAILER", "1"),
            ("MGR_JAILER_BIN", "/opt/fc/jailer"),
            ("MGR_FIRECRACKER_BIN", &fc_link.to_string_lossy()),
            ("MGR_JAILER_UID", "123"),
            ("MGR_JAILER_GID", "456"),
            ("MGR_JAILER_CHROOT_BASE", &chroot.to_string_lossy()),
        ],
    );
    let meta = firecracker_vm(&host);
    // vm.json points at real files next to the chroot base (same file system).
    let images = host.dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut vm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta.paths.vm_config_path).unwrap()).unwrap();
    for (i, name) in ["vmlinux", "rootfs.ext4", "data.ext4"].iter().enumerate() {
        let p = images.join(name);
        std::fs::write(&p, name).unwrap();
        match i {
            0 => vm["boot-source"]["kernel_image_path"] = p.to_string_lossy().into(),
            n => vm["drives"][n - 1]["path_on_host"] = p.to_string_lossy().into(),
        }
    }
    let vsock_host = Path::new(&meta.paths.run_dir).join("vsock/guest.sock");
    vm["vsock"] = serde_json::json!({"guest_cid": 7, "uds_path": vsock_host});
    atomic::write_json(Path::new(&meta.paths.vm_config_path), &vm).unwrap();

    // The jailer names the jail after the resolved binary, not the symlink.
    let jail = chroot.join("firecracker-v1.7").join(&meta.id);
    let root = jail.join("root");
    assert_eq!(firecracker::jail_dir(&host.config, &meta.id).unwrap(), jail);
    // A previous run's jail: the jailer would refuse its device nodes and pid file.
    std::fs::create_dir_all(root.join("dev/net")).unwrap();
    std::fs::write(root.join("dev/net/tun"), "stale").unwrap();
    std::fs::write(root.join("firecracker-v1.7.pid"), "1").unwrap();
    std::fs::write(root.join("kernel"), "stale").unwrap();

    let cmd = firecracker::launch_command(&host.config, &meta).unwrap();
    let argv: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let netns = format!("/run/netns/{}", meta.netns);
    let chroot_s = chroot.to_string_lossy().into_owned();
    let exec_s = fc_file.to_string_lossy().into_owned();
    assert_eq!(
        argv,
        [
            "/opt/fc/jailer",
            "--id",
            &meta.id,
            "--exec-file",
            &exec_s,
            "--uid",
            "123",
            "--gid",
            "456",
            "--chroot-base-dir",
            &chroot_s,
            "--netns",
            &netns,
            "--",
            "--api-sock",
            "/run/firecracker.socket",
        ]
    );
    assert!(!root.join("dev").exists(), "stale device nodes left");
    assert!(!root.join("firecracker-v1.7.pid").exists());
    use std::os::unix::fs::MetadataExt;
    for (name, src) in [
        ("kernel", "vmlinux"),
        ("drive-rootfs", "rootfs.ext4"),
        ("drive-data", "data.ext4"),
    ] {
        let linked = std::fs::metadata(root.join(name)).unwrap();
        assert_eq!(
            linked.ino(),
            std::fs::metadata(images.join(src)).unwrap().ino(),
            "{name} is not a hard link"
        );
        assert_eq!((linked.uid(), linked.gid()), (123, 456));
    }
    // The documented socket path leads to Firecracker's socket inside the chroot, and
    // vm.json's vsock path to the vsock socket there.
    assert_eq!(
        std::fs::read_link(&meta.paths.socket_path).unwrap(),
        root.join("run/firecracker.socket")
    );
    assert_eq!(
        std::fs::read_link(&vsock_host).unwrap(),
        root.join("run/vsock.sock")
    );
    // The API calls name what Firecracker sees from inside the chroot.
    std::fs::create_dir_all(root.join("run")).unwrap();
    let double = FirecrackerDouble::listen(&root.join("run/firecracker.socket"));
    let api = FcClient::new(Path::new(&meta.paths.socket_path), Duration::from_secs(5));
    let parsed = firecracker::read_vm_config(&meta).unwrap();
    firecracker::configure_start(&api, &parsed, true).unwrap();
    let calls = double.calls();
    assert_eq!(calls[0].body["kernel_image_path"], "/kernel");
    assert_eq!(calls[2].body["path_on_host"], "/drive-rootfs");
    assert_eq!(calls[3].body["path_on_host"], "/drive-data");
    for (path, name) in [("/kernel", "kernel"), ("/drive-rootfs", "drive-rootfs")] {
        assert!(
            root.join(&path[1..]).exists(),
            "{path} is not {name} in the jail"
        );
    }
    drop(double);

    // net-cleanup (after every stop) removes the jail; twice is fine.
    for _ in 0..2 {
        steps::net_cleanup(&host.config, &meta.id).unwrap();
    }
    assert!(!jail.exists(), "jail left");
    assert_eq!(std::fs::read(images.join("vmlinux")).unwrap(), b"vmlinux");

    // Without the jailer: Firecracker itself inside the namespace, on the documented socket.
    let mut direct = host.config.clone();
    direct.use_jailer = false;
    let cmd = firecracker::launch_command(&direct, &meta).unwrap();
    let argv: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // iproute2's ip, found on mergend's PATH before the guest's environment replaces it.
    let ip = Path::new(cmd.get_program());
    assert!(ip.is_absolute() && ip.ends_with("ip"), "{}", ip.display());
    let link_s = fc_link.to_string_lossy().into_owned();
    assert_eq!(
        argv,
        [
            "netns",
            "exec",
            &meta.netns,
            &link_s,
            "--api-sock",
            &meta.paths.socket_path,
            "--id",
            &meta.id
        ]
    );
    assert!(
        !Path::new(&meta.paths.socket_path).exists(),
        "a stale socket path was left for Firecracker"
    );
}

fn jailer_launch_refuses_what_the_jailer_or_firecracker_would() {
    let bin_dir = TempDir::new("rt-fcbad");
    let (_, odd) = fake_firecracker(bin_dir.path(), "vmm");
    let chroot = bin_dir.join("jail");
    let host_with = |bin: &str| {
        Host::new(
            "10.0.0.0/24",
            &[
                ("MGR_RUNTIME", "firecracker"),
                ("MGR_JAILER", "1"),
                ("MGR_FIRECRACKER_BIN", bin),
                ("MGR_JAILER_CHROOT_BASE", &chroot.to_string_lossy()),
            ],
        )
    };
    // No such binary.
    let host = host_with("/nonexistent/firecracker");
    let meta = firecracker_vm(&host);
    let err = firecracker::launch_command(&host.config, &meta)
        .unwrap_err()
        .to_string();
    assert!(err.contains("MGR_FIRECRACKER_BIN"), "{err}");
    // A bare name that is not on PATH.
    let host = host_with("firecracker-not-installed-here");
    let meta = firecracker_vm(&host);
    let err = firecracker::launch_command(&host.config, &meta)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not found on PATH"), "{err}");
    // The jailer only execs files whose name contains "firecracker".
    let host = host_with(&odd.to_string_lossy());
    let meta = firecracker_vm(&host);
    let err = firecracker::launch_command(&host.config, &meta)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"firecracker\""), "{err}");
    // Drive ids become chroot file names and API paths: Firecracker's rule applies.
    let (fc, _) = fake_firecracker(bin_dir.path(), "firecracker-v1");
    let host = host_with(&fc.to_string_lossy());
    let meta = firecracker_vm(&host);
    let mut vm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&meta.paths.vm_config_path).unwrap()).unwrap();
    vm["drives"][1]["drive_id"] = "../../etc".into();
    atomic::write_json(Path::new(&meta.paths.vm_config_path), &vm).unwrap();
    let err = firecracker::launch_command(&host.config, &meta)
        .unwrap_err()
        .to_string();
    assert!(err.contains("../../etc"), "{err}");
    let err = steps::configure_start(&host.config, &meta)
        .unwrap_err()
        .to_string();
    assert!(err.contains("letters, digits or underscores"), "{err}");
}

fn firecracker_net_setup_gives_the_tap_to_the_jailer_user_and_loosens_rp_filter() {
    require_root!();
    let host = Host::new(
        &unique_cidr(),
        &[
            ("MGR_RUNTIME", "firecracker"),
            ("MGR_JAILER", "1"),
            ("MGR_JAILER_UID", "4242"),
            ("MGR_JAILER_GID", "4343"),
        ],
    );
    let meta = host.vm(2, vec![], None);
    let _clean = NetCleanup(&host.config, meta.id.clone());
    for _ in 0..2 {
        steps::net_setup(&host.config, &meta).unwrap();
    }
    let sys = |file: &str| {
        run_out(&[
            "ip",
            "netns",
            "exec",
            &meta.netns,
            "cat",
            &format!("/sys/class/net/{}/{file}", meta.tap_name),
        ])
        .trim()
        .to_string()
    };
    assert_eq!((sys("owner"), sys("group")), ("4242".into(), "4343".into()));
    let id8 = names::short_id(&meta.id);
    let rp =
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/vh-{id8}/rp_filter")).unwrap();
    assert_eq!(
        rp.trim(),
        "2",
        "loose reverse-path filtering on the host veth"
    );
    steps::net_cleanup(&host.config, &meta.id).unwrap();
    assert_nothing_left(&meta.id);

    // Without the jailer Firecracker runs as root: no owner on the tap.
    let mut direct = host.config.clone();
    direct.use_jailer = false;
    steps::net_setup(&direct, &meta).unwrap();
    assert_eq!((sys("owner"), sys("group")), ("-1".into(), "-1".into()));
    steps::net_cleanup(&direct, &meta.id).unwrap();
    assert_nothing_left(&meta.id);
}

fn step_subcommands_reject_bad_input_with_clear_errors() {
    let host = Host::new("10.0.0.0/24", &[]);
    let exe = std::env::current_exe().unwrap();
    let run = |args: &[&str]| {
        let mut cmd = Command::new(&exe);
        cmd.args(args);
        for (k, v) in host.config.to_env() {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["vm", "net-setup", "../../etc/passwd"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is not a VM id"), "{err}");
    let (code, err) = run(&["vm", "reboot", "084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unknown step \"reboot\""), "{err}");
    let (code, err) = run(&["vm", "net-setup", "084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("meta.json"), "{err}");
    let (code, err) = run(&["vm", "contain", "084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("meta.json"), "{err}");
    let (code, err) = run(&["vm"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("usage"), "{err}");
    let (code, err) = run(&["supervise", "nope"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is not a VM id"), "{err}");
    // Cleanup of a VM that never existed is fine (idempotent, needs no files).
    if is_root() {
        let (code, err) = run(&["vm", "net-cleanup", &unique_id()]);
        assert_eq!(code, Some(0), "{err}");
    }
}

fn a_killed_supervisor_is_reported_failed_and_stop_still_cleans_up() {
    require_root!();
    let host = Host::new(&unique_cidr(), &[]);
    let spec = process(&["sleep", "600"]);
    let meta = host.vm(2, vec![tcp(80, free_port())], Some(spec));
    let sup = EmbeddedSupervisor::new(host.config.clone()).unwrap();
    let _guard = host.guard(&sup, &meta);
    sup.start(&meta).unwrap();
    let sup_pid = sup.status(&meta).unwrap().supervisor.pid.unwrap();
    let guest_pid = state::read(&meta.paths).unwrap().guest_pid.unwrap();
    Command::new("kill")
        .args(["-KILL", &sup_pid.to_string()])
        .status()
        .unwrap();
    wait_for("the supervisor to die", Duration::from_secs(10), || {
        (sup.status(&meta).unwrap().state == VmState::Failed).then_some(())
    });
    let st = sup.status(&meta).unwrap();
    assert!(
        !st.supervisor.active && st.supervisor.pid.is_none(),
        "{st:?}"
    );
    // The guest outlived its supervisor; stop finds and ends it, then cleans up.
    assert!(mergen_runtime::procs::alive(guest_pid));
    sup.stop(&meta).unwrap();
    assert!(
        !mergen_runtime::procs::alive(guest_pid),
        "orphaned guest left running"
    );
    assert_nothing_left(&meta.id);
    assert_eq!(sup.status(&meta).unwrap().state, VmState::Stopped);
}

// ---------------------------------------------------------------- smoke test

/// A host whose Firecracker is the API double (this binary behind a `firecracker`
/// symlink), with kernel and rootfs files; `kernel` is the kernel file's content
/// (`no-network` makes the double's guest never come up).
struct SmokeHost {
    host: Host,
    kernel: PathBuf,
    rootfs: PathBuf,
    _bin: TempDir,
}

impl SmokeHost {
    fn new(kernel: &str) -> SmokeHost {
        let bin = TempDir::new("rt-smoke-bin");
        let fc = bin.join("firecracker");
        std::os::unix::fs::symlink(std::env::current_exe().unwrap(), &fc).unwrap();
        let host = Host::new(
            &unique_cidr(),
            &[
                ("MGR_RUNTIME", "process"),
                ("MGR_JAILER", "0"),
                ("MGR_FIRECRACKER_BIN", &fc.to_string_lossy()),
                ("MGR_STOP_TIMEOUT_SECONDS", "2"),
            ],
        );
        let kernel_path = host.dir.join("vmlinux");
        let rootfs = host.dir.join("rootfs.ext4");
        std::fs::write(&kernel_path, kernel).unwrap();
        std::fs::write(&rootfs, "rootfs").unwrap();
        SmokeHost {
            host,
            kernel: kernel_path,
            rootfs,
            _bin: bin,
        }
    }

    /// `mergend vm smoke-test --kernel .. --rootfs .. <extra>`, started.
    fn spawn(&self, extra: &[&str]) -> std::process::Child {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["vm", "smoke-test", "--kernel"])
            .arg(&self.kernel)
            .arg("--rootfs")
            .arg(&self.rootfs)
            .args(extra)
            .envs(self.host.config.to_env())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd.spawn().unwrap()
    }
}

/// Wait (bounded) for a smoke test to end: (success, stdout, stderr).
fn finish(child: std::process::Child) -> (bool, String, String) {
    let pid = child.id();
    let out = std::thread::spawn(move || child.wait_with_output().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !out.is_finished() {
        if std::time::Instant::now() > deadline {
            let _ = mergen_runtime::procs::signal(pid, rustix::process::Signal::KILL);
            panic!("the smoke test did not end within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = out.join().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The VM id and run dir the smoke test announced.
fn announced(stdout: &str) -> (String, PathBuf) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("smoke-test: VM "))
        .unwrap_or_else(|| panic!("no VM line in {stdout}"));
    let id = line["smoke-test: VM ".len()..][..36].to_string();
    let dir = line.rsplit("run dir ").next().unwrap().trim().into();
    (id, dir)
}

fn smoke_test_configures_firecracker_as_a_launch_does_reaches_the_guest_and_cleans_up() {
    require_root!();
    let smoke = SmokeHost::new("a kernel");
    // MGR_RUNTIME=process: the smoke test is a Firecracker check whatever runtime the
    // VMs of this host use.
    let (ok, stdout, stderr) = finish(smoke.spawn(&["--keep-run-dir", "--timeout", "20"]));
    assert!(ok, "{stdout}\n{stderr}");
    let (id, dir) = announced(&stdout);
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _remove = Remove(dir.clone());
    let _clean = NetCleanup(&smoke.host.config, id.clone());
    assert!(stdout.contains("its network is up"), "{stdout}");

    // Exactly what configure-start sends for a VM, then the graceful stop.
    let socket = dir.join("mergen.socket");
    let calls: Vec<serde_json::Value> =
        std::fs::read_to_string(format!("{}.calls", socket.display()))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let paths: Vec<&str> = calls.iter().map(|c| c["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "/boot-source",
            "/machine-config",
            "/drives/rootfs",
            "/network-interfaces/eth0",
            "/actions",
            "/actions"
        ],
        "{calls:?}"
    );
    assert!(calls.iter().all(|c| c["method"] == "PUT"));
    let cidr = &smoke.host.config.guest_cidr;
    let guest = cidr.host(254).unwrap(); // the last host of a /24
    let kernel = smoke.kernel.canonicalize().unwrap();
    assert_eq!(
        calls[0]["body"],
        serde_json::json!({
            "kernel_image_path": kernel,
            "boot_args": format!("{} ip={guest}::{}:255.255.255.0::eth0:off",
                mergen_model::vmconfig::DEFAULT_BOOT_ARGS, cidr.gateway().unwrap()),
        })
    );
    assert_eq!(
        calls[1]["body"],
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 512, "smt": false})
    );
    assert_eq!(
        calls[2]["body"],
        serde_json::json!({"drive_id": "rootfs", "path_on_host": smoke.rootfs.canonicalize().unwrap(),
            "is_root_device": true, "is_read_only": false})
    );
    assert_eq!(
        calls[3]["body"],
        serde_json::json!({"iface_id": "eth0", "host_dev_name": names::tap_name(&id),
            "guest_mac": names::guest_mac(&id)})
    );
    assert_eq!(calls[4]["body"]["action_type"], "InstanceStart");
    assert_eq!(calls[5]["body"]["action_type"], "SendCtrlAltDel");
    // Firecracker is gone, and so is everything net-setup made.
    let pid: u32 = std::fs::read_to_string(format!("{}.pid", socket.display()))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        !running(pid),
        "Firecracker (the double, pid {pid}) left running"
    );
    assert_nothing_left(&id);
    assert!(
        dir.join("firecracker.log").is_file(),
        "--keep-run-dir kept no log"
    );

    // Without --keep-run-dir nothing at all is left.
    let (ok, stdout, stderr) = finish(smoke.spawn(&["--timeout", "20"]));
    assert!(ok, "{stdout}\n{stderr}");
    let (id, dir) = announced(&stdout);
    let _clean = NetCleanup(&smoke.host.config, id.clone());
    assert!(!dir.exists(), "run dir {} left", dir.display());
    assert_nothing_left(&id);

    // Bad input: a clear error, usage, nothing made.
    let (ok, _, stderr) = finish(smoke.spawn(&["--port", "none"]));
    assert!(
        !ok && stderr.contains("--port") && stderr.contains("usage"),
        "{stderr}"
    );
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    let out = cmd
        .args([
            "vm",
            "smoke-test",
            "--kernel",
            "/nonexistent/vmlinux",
            "--rootfs",
        ])
        .arg(&smoke.rootfs)
        .envs(smoke.host.config.to_env())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("/nonexistent/vmlinux"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("smoke-test: VM "));
}

fn smoke_test_cleans_up_when_the_guest_never_answers_or_it_is_interrupted() {
    require_root!();
    let smoke = SmokeHost::new("no-network");
    let (ok, stdout, stderr) = finish(smoke.spawn(&["--timeout", "2"]));
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("did not answer within 2s"), "{stderr}");
    let (id, dir) = announced(&stdout);
    let _clean = NetCleanup(&smoke.host.config, id.clone());
    assert_nothing_left(&id);
    assert!(!dir.exists());

    // Ctrl-C (here SIGINT) while it waits for the guest: it still cleans up.
    let mut child = smoke.spawn(&["--timeout", "60"]);
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("smoke-test: VM ") {
                let _ = tx.send(line.clone());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let (id, dir) = announced(&rx.recv_timeout(Duration::from_secs(30)).unwrap());
    let _clean = NetCleanup(&smoke.host.config, id.clone());
    let calls = dir.join("mergen.socket.calls");
    wait_for(
        "InstanceStart to reach Firecracker",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&calls)
                .ok()
                .filter(|c| c.contains("InstanceStart"))
        },
    );
    mergen_runtime::procs::signal(pid, rustix::process::Signal::INT).unwrap();
    let (ok, _, stderr) = finish(child);
    let stdout = reader.join().unwrap();
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert!(stdout.contains("net-cleanup done"), "{stdout}");
    assert_nothing_left(&id);
    assert!(!dir.exists());
}
