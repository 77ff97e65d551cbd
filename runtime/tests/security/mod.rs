//! What a hostile guest can reach, what net-setup changes on the host, and what of
//! mergend's environment reaches supervisors and guests. Real namespaces, veths,
//! nftables and process VMs; the "internet" is a namespace of the test's own.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ffi_free_netns::Netns;
use mergen_model::{names, Meta, ProcessSpec};
use mergen_runtime::embedded::EmbeddedSupervisor;
use mergen_runtime::{state, steps, Supervisor};
use mergen_testkit::{free_port, next, require_root, run_out, wait_for, ChildGuard};

use crate::{assert_nothing_left, tcp, unique_cidr, Host, NetCleanup};

/// Secrets in the test process's environment (set in `main`), i.e. in mergend's.
pub const TOKEN: &str = "mergen-test-token-must-not-leak";
pub const AWS_SECRET: &str = "aws-secret-must-not-leak";

/// Guest mode of the test binary: accept on `addr` and greet every connection with the
/// address it was reached on.
pub fn tcp_hello(addr: &str) -> ExitCode {
    let Ok(listener) = TcpListener::bind(addr) else {
        eprintln!("tcp-hello: cannot bind {addr}");
        return ExitCode::FAILURE;
    };
    for mut conn in listener.incoming().flatten() {
        let _ = writeln!(conn, "hello from {addr}");
    }
    ExitCode::FAILURE
}

// ---------------------------------------------------------------- isolation

/// A TCP listener whose thread tells every client `<label> <client address>`; stopped
/// and joined on drop (its socket may hold a namespace alive).
struct Greeter {
    addr: SocketAddr,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Greeter {
    fn start(listener: TcpListener, label: &'static str) -> Greeter {
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        let _ = writeln!(conn, "{label} {}", peer.ip().to_canonical());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Greeter {
            addr,
            done,
            thread: Some(thread),
        }
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A listener on every address of the host (`[::]`, dual-stack).
fn host_listener() -> Greeter {
    Greeter::start(
        TcpListener::bind("[::]:0").expect("bind [::]:0"),
        "host saw",
    )
}

/// A namespace standing in for the internet: linked to the host by a veth pair
/// (`100.64.x.1` on the host, `100.64.x.2` inside), with a listener inside that
/// reports the address each client came from. Removed (with its link) on drop.
struct Internet {
    ns: Netns,
    host_addr: Ipv4Addr,
    server: Option<Greeter>,
}

impl Internet {
    fn new() -> Internet {
        let name = mergen_testkit::unique_name("mgi");
        let ns = ffi_free_netns::create(&name).expect("create the internet namespace");
        let n = next();
        let (a, b) = (64 + (std::process::id() % 60) as u8, (n % 60 * 4) as u8);
        let host_addr = Ipv4Addr::new(100, a, b, 1);
        let inside = Ipv4Addr::new(100, a, b, 2);
        let link = format!("xi{}", &name[3..]);
        ffi_free_netns::links::create_veth(None, &link, "eth0", Some(&ns)).unwrap();
        ffi_free_netns::links::add_address(None, &link, IpAddr::V4(host_addr), 30).unwrap();
        ffi_free_netns::links::set_up(None, &link).unwrap();
        ffi_free_netns::links::add_address(Some(&ns), "eth0", IpAddr::V4(inside), 30).unwrap();
        ffi_free_netns::links::set_up(Some(&ns), "eth0").unwrap();
        let listener = ns
            .run(|| TcpListener::bind((inside, 0)))
            .unwrap()
            .expect("bind in the internet namespace");
        Internet {
            ns,
            host_addr,
            server: Some(Greeter::start(listener, "internet saw")),
        }
    }

    fn server(&self) -> SocketAddr {
        self.server.as_ref().unwrap().addr
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        // The listener's socket holds the namespace alive: close it first. Then the
        // namespace, once its file and this handle are gone, takes its end of the veth,
        // and so the host's end, with it.
        self.server.take();
        let _ = ffi_free_netns::delete(self.ns.name());
    }
}

/// Connect from inside `ns` (as the guest there would) and read the greeting.
fn dial_from(ns: &Netns, addr: SocketAddr) -> Result<String, String> {
    ns.run(|| dial(addr)).map_err(|e| e.to_string())?
}

/// Connect from this thread's namespace and read the greeting.
fn dial(addr: SocketAddr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("{addr}: {e}"))?;
    Ok(text)
}

/// The host's own addresses (root namespace), IPv4 and global IPv6, skipping the
/// transit address every VM veth carries (it is tried on its own).
fn host_addresses() -> Vec<IpAddr> {
    addresses_in(&run_out(&["ip", "-o", "addr", "show"]))
}

/// The addresses in `ip -o addr` output, without loopback, link-local and transit ones.
fn addresses_in(out: &str) -> Vec<IpAddr> {
    let mut found = Vec::new();
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = words.iter().position(|w| *w == "inet" || *w == "inet6") else {
            continue;
        };
        let Some(ip) = words
            .get(i + 1)
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse::<IpAddr>().ok())
        else {
            continue;
        };
        let link_local = matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
        if link_local || ip.is_loopback() || ip == IpAddr::V4(Ipv4Addr::new(169, 254, 100, 1)) {
            continue;
        }
        if !found.contains(&ip) {
            found.push(ip);
        }
    }
    found
}

/// The link-local address of `link` in the namespace `netns` (root when `None`), once
/// duplicate address detection is done with it.
fn link_local(netns: Option<&str>, link: &str) -> Ipv6Addr {
    let argv = ip_argv(
        netns,
        &["-o", "-6", "addr", "show", "dev", link, "scope", "link"],
    );
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    wait_for(
        &format!("a usable link-local address on {link}"),
        Duration::from_secs(20),
        || {
            let out = run_out(&argv);
            let line = out.lines().find(|l| !l.contains("tentative"))?;
            let words: Vec<&str> = line.split_whitespace().collect();
            let i = words.iter().position(|w| *w == "inet6")?;
            words[i + 1].split('/').next()?.parse::<Ipv6Addr>().ok()
        },
    )
}

/// The interface index of `link` in `netns`.
fn link_index(netns: Option<&str>, link: &str) -> u32 {
    let argv = ip_argv(netns, &["-o", "link", "show", link]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    run_out(&argv)
        .split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no index for {link}"))
}

fn ip_argv(netns: Option<&str>, args: &[&str]) -> Vec<String> {
    let mut argv = vec!["ip".to_string()];
    if let Some(ns) = netns {
        argv.extend(["-n".to_string(), ns.to_string()]);
    }
    argv.extend(args.iter().map(|a| a.to_string()));
    argv
}

/// The addresses of the host's uplink (the link of its default route): stable for the
/// whole test, unlike the links other tests come and go with.
fn uplink_addresses() -> Vec<IpAddr> {
    let route = run_out(&["ip", "-4", "route", "show", "default"]);
    let Some(dev) = route.split_whitespace().skip_while(|w| *w != "dev").nth(1) else {
        return Vec::new();
    };
    let out = run_out(&["ip", "-o", "addr", "show", "dev", dev, "scope", "global"]);
    addresses_in(&out)
}

/// Do inside the guest's namespace what a hostile root guest can: send packets for
/// the host's 127.0.0.1 out through its veth (the host accepts them there, since
/// `route_localnet` is on for that veth), and route the host's global IPv6 addresses
/// through the host's link-local address.
fn route_like_a_hostile_guest(meta: &Meta, host_ll: Ipv6Addr, v6_targets: &[Ipv6Addr]) {
    let ns = meta.netns.as_str();
    let veth = format!("vg-{}", names::short_id(&meta.id));
    let sh = |argv: &[&str]| {
        let out = Command::new(argv[0]).args(&argv[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        &format!("net.ipv4.conf.{veth}.route_localnet=1"),
    ]);
    sh(&[
        "ip", "-n", ns, "rule", "add", "pref", "100", "lookup", "local",
    ]);
    sh(&[
        "ip", "-n", ns, "rule", "del", "pref", "0", "lookup", "local",
    ]);
    sh(&[
        "ip",
        "-n",
        ns,
        "route",
        "add",
        "127.0.0.1/32",
        "via",
        "169.254.100.1",
        "dev",
        &veth,
        "table",
        "100",
    ]);
    sh(&[
        "ip",
        "-n",
        ns,
        "rule",
        "add",
        "pref",
        "10",
        "to",
        "127.0.0.1/32",
        "lookup",
        "100",
    ]);
    let via = host_ll.to_string();
    for t in v6_targets {
        sh(&[
            "ip",
            "-n",
            ns,
            "-6",
            "route",
            "add",
            &format!("{t}/128"),
            "via",
            &via,
            "dev",
            &veth,
        ]);
    }
}

/// Every way VM `meta`'s guest could try to reach the host listener on `port`: the
/// gateway (the host's end of its veth), the host's loopback, the veth's IPv6
/// link-local address, and `others` (the host's other addresses).
fn host_targets(meta: &Meta, port: u16, others: Vec<IpAddr>) -> Vec<SocketAddr> {
    let id8 = names::short_id(&meta.id);
    let ll = link_local(None, &format!("vh-{id8}"));
    let guest_veth = format!("vg-{id8}");
    link_local(Some(&meta.netns), &guest_veth);
    let ns_index = link_index(Some(&meta.netns), &guest_veth);
    let mut targets: Vec<SocketAddr> = vec![
        (Ipv4Addr::new(169, 254, 100, 1), port).into(),
        (Ipv4Addr::LOCALHOST, port).into(),
        SocketAddr::V6(SocketAddrV6::new(ll, port, 0, ns_index)),
    ];
    targets.extend(others.into_iter().map(|ip| SocketAddr::new(ip, port)));
    targets
}

fn tcp_hello_guest(ip: Ipv4Addr, port: u16) -> ProcessSpec {
    let exe = std::env::current_exe().unwrap();
    ProcessSpec {
        cmd: vec![
            exe.to_string_lossy().into_owned(),
            "tcp-hello".into(),
            format!("{ip}:{port}"),
        ],
        env: BTreeMap::new(),
        workdir: None,
        root: None,
    }
}

/// Two process VMs started by the embedded supervisor under `host`'s settings, each
/// greeting on guest port 8080, the first also published on a host port.
struct TwoVms<'a> {
    a: Meta,
    b: Meta,
    published: u16,
    sup: &'a EmbeddedSupervisor,
}

impl<'a> TwoVms<'a> {
    fn start(host: &'a Host, sup: &'a EmbeddedSupervisor) -> (TwoVms<'a>, [crate::VmGuard<'a>; 2]) {
        let published = free_port();
        let ip = |n| host.config.guest_cidr.host(n).unwrap();
        let a = host.vm(
            2,
            vec![tcp(8080, published)],
            Some(tcp_hello_guest(ip(2), 8080)),
        );
        let b = host.vm(3, vec![], Some(tcp_hello_guest(ip(3), 8080)));
        let guards = [host.guard(sup, &a), host.guard(sup, &b)];
        sup.start(&a).unwrap();
        sup.start(&b).unwrap();
        let vms = TwoVms {
            a,
            b,
            published,
            sup,
        };
        // Both guests answer inside their own namespaces, as the forwarder dials them.
        for m in [&vms.a, &vms.b] {
            let ns = ffi_free_netns::open(&m.netns).unwrap();
            let addr: SocketAddr = (m.guest_ip, 8080).into();
            let hello = wait_for("the guest to listen", Duration::from_secs(20), || {
                dial_from(&ns, addr).ok()
            });
            assert_eq!(hello, format!("hello from {addr}\n"));
        }
        (vms, guards)
    }

    fn stop(&self) {
        for m in [&self.a, &self.b] {
            self.sup.stop(m).unwrap();
            assert_nothing_left(&m.id);
        }
    }
}

pub fn guests_reach_the_world_and_their_own_traffic_but_not_each_other_nor_the_host() {
    require_root!();
    let refused = host_listener();
    let allowed = host_listener();
    let internet = Internet::new();

    // ---- isolation on (the default), one host port allowed
    let host = Host::new(
        &unique_cidr(),
        &[(
            "MGR_GUEST_ALLOW_HOST_PORTS",
            &format!("udp/53,tcp/{}", allowed.addr.port()),
        )],
    );
    let sup = EmbeddedSupervisor::new(host.config.clone()).unwrap();
    let (vms, _guards) = TwoVms::start(&host, &sup);
    let a_ns = ffi_free_netns::open(&vms.a.netns).unwrap();
    let id8 = names::short_id(&vms.a.id);
    let host_ll = link_local(None, &format!("vh-{id8}"));
    let v6: Vec<Ipv6Addr> = uplink_addresses()
        .into_iter()
        .filter_map(|ip| match ip {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        })
        .collect();
    route_like_a_hostile_guest(&vms.a, host_ll, &v6);

    // Another guest: refused, directly and through the host's published port... of
    // its own kind (B publishes nothing, so try its guest IP).
    let b_addr: SocketAddr = (vms.b.guest_ip, 8080).into();
    let e = dial_from(&a_ns, b_addr).unwrap_err();
    assert!(!e.is_empty(), "guest A reached guest B");
    // The host: every address, loopback included, over IPv4 and IPv6.
    let targets = host_targets(&vms.a, refused.addr.port(), host_addresses());
    assert!(targets.len() >= 4, "{targets:?}");
    for addr in &targets {
        let got = dial_from(&a_ns, *addr);
        assert!(got.is_err(), "guest A reached the host at {addr}: {got:?}");
    }
    // ...except the allowed port, on the gateway and on the host's other addresses.
    let gateway: SocketAddr = (Ipv4Addr::new(169, 254, 100, 1), allowed.addr.port()).into();
    let answer = dial_from(&a_ns, gateway).unwrap();
    assert_eq!(answer, format!("host saw {}\n", vms.a.guest_ip));
    for ip in uplink_addresses().into_iter().filter(IpAddr::is_ipv4) {
        dial_from(&a_ns, SocketAddr::new(ip, allowed.addr.port()))
            .unwrap_or_else(|e| panic!("allowed port on {ip}: {e}"));
    }
    // The outside world: reached, masqueraded behind the host's address.
    let answer = dial_from(&a_ns, internet.server()).unwrap();
    assert_eq!(answer, format!("internet saw {}\n", internet.host_addr));
    // Its own traffic: published port from the host (loopback and the link address),
    // and from the outside world through the host.
    let hello = format!("hello from {}:8080\n", vms.a.guest_ip);
    assert_eq!(dial(([127, 0, 0, 1], vms.published).into()).unwrap(), hello);
    let from_outside = dial_from(&internet.ns, (internet.host_addr, vms.published).into()).unwrap();
    assert_eq!(from_outside, hello);
    // B cannot reach A's published port through the host either.
    let b_ns = ffi_free_netns::open(&vms.b.netns).unwrap();
    assert!(dial_from(&b_ns, (internet.host_addr, vms.published).into()).is_err());
    vms.stop();

    // ---- isolation off: the same attempts get through (so the refusals above were
    // the policy's, not a broken network's).
    let open = Host::new(&unique_cidr(), &[("MGR_GUEST_ISOLATION", "0")]);
    let open_sup = EmbeddedSupervisor::new(open.config.clone()).unwrap();
    let (vms, _open_guards) = TwoVms::start(&open, &open_sup);
    let a_ns = ffi_free_netns::open(&vms.a.netns).unwrap();
    let id8 = names::short_id(&vms.a.id);
    let host_ll = link_local(None, &format!("vh-{id8}"));
    route_like_a_hostile_guest(&vms.a, host_ll, &v6);
    let b_addr: SocketAddr = (vms.b.guest_ip, 8080).into();
    assert_eq!(
        dial_from(&a_ns, b_addr).unwrap(),
        format!("hello from {b_addr}\n")
    );
    for addr in host_targets(&vms.a, refused.addr.port(), uplink_addresses()) {
        dial_from(&a_ns, addr)
            .unwrap_or_else(|e| panic!("without isolation, {addr} should answer: {e}"));
    }
    let shared = run_out(&["nft", "list", "table", "inet", "mergen"]);
    assert!(!shared.contains(&format!("in-{id8}")), "{shared}");
    vms.stop();
}

// ---------------------------------------------------------------- sysctls

/// Every readable value under /proc/sys/net/ipv4 of the calling thread's namespace
/// (per-interface values of links other than all, default and lo left out).
fn ipv4_sysctls() -> HashMap<String, String> {
    let mut values = HashMap::new();
    let root = Path::new("/proc/sys/net/ipv4");
    let mut dirs = vec![root.to_path_buf()];
    for conf in ["all", "default", "lo"] {
        dirs.push(root.join("conf").join(conf));
    }
    for dir in dirs {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_file() {
                if let Ok(v) = std::fs::read_to_string(&path) {
                    values.insert(path.display().to_string(), v.trim().to_string());
                }
            }
        }
    }
    values
}

pub fn net_setup_changes_sysctls_per_interface_and_records_ip_forward() {
    require_root!();
    // A scratch namespace plays the host, so that ip_forward can start at 0 without
    // touching the machine the other tests (and developers) run on.
    let scratch_name = mergen_testkit::unique_name("mgh");
    let scratch = ffi_free_netns::create(&scratch_name).unwrap();
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = ffi_free_netns::delete(&self.0);
        }
    }
    let _remove = Remove(scratch_name);
    let host = Host::new(
        &unique_cidr(),
        &[("MGR_RUNTIME", "firecracker"), ("MGR_JAILER", "0")],
    );
    let meta = host.vm(2, vec![tcp(80, free_port())], None);
    let _clean = NetCleanup(&host.config, meta.id.clone());
    let veth = format!("vh-{}", names::short_id(&meta.id));
    let record = steps::host_changes_file(&host.config);
    scratch
        .run(|| {
            // New namespaces copy the host's ip_forward (devconf_inherit_init_net=0):
            // start from a host that does not forward.
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "0").unwrap();
            let before = ipv4_sysctls();
            assert_eq!(before["/proc/sys/net/ipv4/ip_forward"], "0");
            for _ in 0..2 {
                steps::net_setup(&host.config, &meta).unwrap();
            }
            let after = ipv4_sysctls();
            let changed: Vec<&String> = before
                .keys()
                .filter(|k| before.get(*k) != after.get(*k))
                .collect();
            // ip_forward (which the kernel mirrors into every `forwarding`, turning
            // conf/all/accept_redirects off with it), nothing else host-wide:
            // route_localnet and rp_filter only on the VM's veth.
            for k in &changed {
                assert!(
                    k.ends_with("/ip_forward")
                        || k.ends_with("/forwarding")
                        || k.ends_with("/conf/all/accept_redirects"),
                    "net-setup changed {k} host-wide"
                );
            }
            assert_eq!(after["/proc/sys/net/ipv4/ip_forward"], "1");
            let conf = |key: &str| {
                std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{veth}/{key}"))
                    .map(|v| v.trim().to_string())
            };
            assert_eq!(conf("route_localnet").unwrap(), "1");
            assert_eq!(conf("rp_filter").unwrap(), "2");
            // Recorded once, with the value it had.
            let text = std::fs::read_to_string(&record).unwrap();
            assert_eq!(text.lines().count(), 1, "{text}");
            assert!(
                text.contains("net.ipv4.ip_forward=1 (was 0)") && text.contains(&meta.id),
                "{text}"
            );
            steps::net_cleanup(&host.config, &meta.id).unwrap();
            // The per-interface settings went with the link.
            assert!(conf("route_localnet").is_err(), "{veth} still there");
            let table = Command::new("nft")
                .args(["list", "table", "inet", "mergen"])
                .output()
                .unwrap();
            let table = String::from_utf8_lossy(&table.stdout);
            assert!(table.contains("chain input"), "{table}");
            assert!(!table.contains(&veth), "{table}");
        })
        .unwrap();
    assert!(!Path::new(&format!("/run/netns/{}", meta.netns)).exists());
}

// ---------------------------------------------------------------- secrets

fn environ(pid: u32) -> BTreeMap<String, String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn assert_no_secret(what: &str, env: &BTreeMap<String, String>) {
    for (k, v) in env {
        assert!(
            v != TOKEN && v != AWS_SECRET,
            "{what} got a secret in {k}: {env:?}"
        );
    }
    assert!(!env.contains_key("MGR_API_TOKEN"), "{what}: {env:?}");
    assert!(
        !env.contains_key("AWS_SECRET_ACCESS_KEY"),
        "{what}: {env:?}"
    );
}

pub fn supervisors_and_guests_get_no_secret_from_mergends_environment() {
    require_root!();
    // `main` put both secrets into this process's (mergend's) environment.
    assert_eq!(std::env::var("MGR_API_TOKEN").unwrap(), TOKEN);
    assert_eq!(std::env::var("AWS_SECRET_ACCESS_KEY").unwrap(), AWS_SECRET);
    let host = Host::new(&unique_cidr(), &[]);
    let mut spec = crate::process(&["sleep", "600"]);
    spec.env
        .insert("APP_MODE".into(), "from process.env".into());
    let meta = host.vm(2, vec![], Some(spec));
    // The VM's env file, as mergend writes it; process.env wins over it.
    std::fs::write(
        &meta.paths.env_path,
        format!(
            "APP_MODE='from the env file'\nEXTRA='it'\\''s'\nMGN_VM_ID='{}'\n",
            meta.id
        ),
    )
    .unwrap();
    let sup = EmbeddedSupervisor::new(host.config.clone()).unwrap();
    let _guard = host.guard(&sup, &meta);
    sup.start(&meta).unwrap();
    let sup_pid = sup.status(&meta).unwrap().supervisor.pid.unwrap();
    let guest_pid = state::read(&meta.paths).unwrap().guest_pid.unwrap();

    let sup_env = environ(sup_pid);
    assert_no_secret("the supervisor", &sup_env);
    let table: Vec<&str> = mergen_runtime::config::VARIABLES
        .iter()
        .map(|v| v.name)
        .collect();
    for k in sup_env.keys() {
        assert!(
            table.contains(&k.as_str()) || k == "PATH",
            "the supervisor got {k}, which is not in the runtime's table"
        );
    }
    assert_eq!(
        sup_env["MGR_CONFIG_ROOT"],
        host.config.roots.config.display().to_string()
    );

    let guest_env = wait_for("the guest to exec", Duration::from_secs(10), || {
        let env = environ(guest_pid);
        env.contains_key("MGN_VM_ID").then_some(env)
    });
    assert_no_secret("the guest", &guest_env);
    let expected: BTreeMap<String, String> = [
        ("APP_MODE", "from process.env"),
        ("EXTRA", "it's"),
        ("MGN_VM_ID", meta.id.as_str()),
        ("PATH", mergen_runtime::guest::GUEST_PATH),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(guest_env, expected, "the guest's whole environment");
    sup.stop(&meta).unwrap();

    // Under systemd the unit runs `mergend vm run <id>`, whose environment holds what
    // the unit's files hold (the token, if the operator put it in mergen.env): the
    // guest it execs still gets only its own.
    steps::net_setup(&host.config, &meta).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(&exe);
    cmd.args(["vm", "run", &meta.id])
        .envs(host.config.to_env())
        .env("MGR_API_TOKEN", TOKEN)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = ChildGuard::spawn(&mut cmd);
    let pid = child.pid() as u32;
    let guest_env = wait_for("vm run to exec the guest", Duration::from_secs(10), || {
        let argv = mergen_runtime::procs::cmdline(pid)?;
        (argv == ["sleep", "600"]).then(|| environ(pid))
    });
    assert_eq!(guest_env, expected, "the guest's environment under vm run");
    drop(child);
    steps::net_cleanup(&host.config, &meta.id).unwrap();
    assert_nothing_left(&meta.id);
}
