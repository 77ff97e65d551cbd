//! Three hosts of a cluster on one machine, each a network namespace of its own on a
//! LAN the test makes (testkit's `Lan`: a bridge in a hub namespace, a veth to each
//! host), with its own mergend, forwarder and process-runtime VMs (nginx), and a
//! three-member etcd in the hub namespace. Nothing runs in the root namespace but the
//! test itself; clients (curl, openssl s_client) run inside a host's namespace.
//!
//! One test, in steps that build on each other (the setup is the expensive part):
//! curl through host A's forwarder reaches VMs on hosts B and C (whose guest networks
//! are the same addresses, each in its own namespace); an alias raced by the three
//! hosts has exactly one winner; the etcd leader down, new routes still come in; host
//! C's mergend SIGKILLed, its routes leave after the lease TTL and host A answers an
//! unknown-SNI alert, while C goes on serving its own clients; C's mergend back, so are
//! its routes; etcd down altogether, the last known routes keep serving; etcd back, the
//! forwarders' watches pick up new changes. At the end every VM namespace is gone.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::forwarder::{forwarder_in, through_in};
use common::vms::{process_env, VmsGuard};
use common::{try_curl_in, Mergend, Roots};
use mergen_testkit::etcd::EtcdCluster;
use mergen_testkit::TempDir;
use mergen_testkit::{eventually, in_netns, nginx, require_root, wait_for, ChildGuard, Lan};

const LONG: Duration = Duration::from_secs(20);
/// Every host's HTTPS listener, on its LAN address: a forwarder passes a connection
/// through to the owner's address on the port it arrived on.
const PORT: u16 = 443;
/// The forwarder's admin listener, on 127.0.0.1 inside the host's namespace.
const ADMIN: &str = "127.0.0.1:9900";
/// The same guest network on every host: each host's guests live in its own namespace.
const GUEST_CIDR: &str = "10.201.0.0/24";

/// One host: its namespace, mergend, forwarder and VMs. Fields drop in order: mergend
/// and forwarder first, then the VMs (stopped through the runtime), then the roots.
struct Host {
    name: &'static str,
    mergend: Option<Mergend>,
    _forwarder: ChildGuard,
    vms: VmsGuard,
    roots: Roots,
    fwd_dir: TempDir,
    ns: String,
    addr: String,
    env: Vec<(String, String)>,
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

impl Host {
    fn start(lan: &Lan, i: usize, name: &'static str, etcd: &str) -> Host {
        let (ns, addr) = (lan.hosts[i].clone(), lan.ips[i].clone());
        let roots = Roots::new(&format!("h3-{name}"));
        let mut env: Vec<(String, String)> = [
            ("MGR_ETCD_ENDPOINTS", etcd),
            ("MGR_ETCD_LEASE_TTL_SECONDS", "2"),
            ("MGR_ETCD_TIMEOUT_SECONDS", "2"),
            ("MGR_HOST_NAME", name),
            ("MGR_HOST_ADDR", &addr),
        ]
        .into_iter()
        .chain(process_env(GUEST_CIDR))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        // Its API where only the host's own namespace reaches it.
        env.push(("MGR_HTTP_ADDR".into(), "127.0.0.1:0".into()));
        let mut vms = VmsGuard::new(&roots, &as_refs(&env));
        vms.netns = Some(ns.clone());
        let mergend = Mergend::start_in(&ns, &roots, &as_refs(&env));
        let fwd_dir = TempDir::new(&format!("h3-fwd-{name}"));
        let listen: SocketAddr = (addr.parse::<std::net::Ipv4Addr>().unwrap(), PORT).into();
        let forwarder = forwarder_in(
            Some(&ns),
            &roots.config(),
            fwd_dir.path(),
            &[(listen, 8080)],
            &[
                ("FWD_ETCD_ENDPOINTS", etcd),
                ("FWD_ETCD_TIMEOUT_SECONDS", "1"),
                ("FWD_HOST_NAME", name),
                ("FWD_ADMIN_ADDR", ADMIN),
            ],
        );
        Host {
            name,
            mergend: Some(mergend),
            _forwarder: forwarder,
            vms,
            roots,
            fwd_dir,
            ns,
            addr,
            env,
        }
    }

    fn mergend(&self) -> &Mergend {
        self.mergend.as_ref().expect("host's mergend running")
    }

    /// Create and start a VM answering to `app`: nginx on guest port 8080 serving `page`.
    /// Returns its id and guest address.
    fn run_page(&mut self, app: &str, page: &str) -> (String, String) {
        let www = self.roots.dir.join(format!("www-{app}"));
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("index.html"), page).unwrap();
        let argv = nginx::guest_argv(&self.roots.dir.join(format!("nginx-{app}")), "8080", &www);
        let body = serde_json::json!({"process": {"cmd": argv}, "tags": {"app": app}});
        let (code, v) = self.mergend().create(&body.to_string());
        assert_eq!(code, 201, "{}: {v}", self.name);
        let id = v["id"].as_str().unwrap().to_string();
        self.vms.ids.push(id.clone());
        let (code, out) = self
            .mergend()
            .curl("POST", &format!("/v1/vms/{id}/start"), &[]);
        assert_eq!(code, 200, "{out}\n{}", self.mergend().log_text());
        let (_, v) = self.mergend().get_json(&format!("/v1/vms/{id}"));
        let ip = v["network"]["guestIP"].as_str();
        let ip = ip
            .unwrap_or_else(|| panic!("no guest address: {v}"))
            .to_string();
        (id, ip)
    }

    /// Create (not start) a VM answering to `app`: the status code.
    fn create_app(&self, app: &str) -> (u16, Option<String>) {
        let body = serde_json::json!({"process": {"cmd": ["/bin/true"]}, "tags": {"app": app}});
        let (code, v) = self.mergend().create(&body.to_string());
        (code, v["id"].as_str().map(str::to_string))
    }

    /// curl from inside this host's namespace through its own forwarder.
    fn get(&self, name: &str) -> Option<String> {
        through_in(Some(&self.ns), name, &self.addr, PORT, "/")
    }

    /// The forwarder's `/healthz` `cluster.watch` ("up" or "down").
    fn watch(&self) -> String {
        let url = format!("http://{ADMIN}/healthz");
        let Ok((_, body)) = try_curl_in(Some(&self.ns), &[&url]) else {
            return String::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["cluster"]["watch"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The forwarder's connections passed between hosts (`to_peer` or `from_peer`).
    fn peer_connections(&self, direction: &str) -> u64 {
        let url = format!("http://{ADMIN}/metrics");
        let (_, text) = try_curl_in(Some(&self.ns), &[&url]).expect("the forwarder's metrics");
        let label = format!("direction=\"{direction}\"}}");
        text.lines()
            .filter(|l| l.starts_with("mergen_forwarder_cluster_connections_total{"))
            .filter(|l| l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    fn log(&self) -> String {
        let fwd =
            std::fs::read_to_string(self.fwd_dir.path().join("forwarder.log")).unwrap_or_default();
        let tail: Vec<&str> = fwd.lines().rev().take(30).collect();
        format!(
            "--- forwarder {}:\n{}",
            self.name,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}

/// The standard output of `argv` run in the namespace `ns` when given.
fn run_in(ns: Option<&str>, argv: &[&str]) -> String {
    let out = in_netns(ns, argv[0]).args(&argv[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What `openssl s_client` from host `from`'s namespace to its forwarder says for SNI
/// `name` (standard output and error).
fn s_client(from: &Host, name: &str) -> String {
    let out = in_netns(Some(&from.ns), "timeout")
        .args(["10", "openssl", "s_client", "-connect"])
        .arg(format!("{}:{PORT}", from.addr))
        .args(["-servername", name])
        .stdin(Stdio::null())
        .output()
        .expect("running openssl");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn three_hosts_in_their_own_namespaces_share_routes_through_etcd() {
    require_root!();
    let lan = Lan::new(3);
    let mut etcd = EtcdCluster::start(3, Some(&lan.hub), &lan.hub_ip);
    let ep = etcd.endpoints();
    let mut hosts: Vec<Host> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, name)| Host::start(&lan, i, name, &ep))
        .collect();
    let logs = |hosts: &[Host]| hosts.iter().map(Host::log).collect::<Vec<_>>().join("\n");

    // A VM on host C and one on host B: the first address of the same guest network,
    // each in its own host's namespace.
    let far_page = Some("far, on host c\n".to_string());
    let near_page = Some("near, on host b\n".to_string());
    let (far, far_ip) = hosts[2].run_page("far", far_page.as_deref().unwrap());
    let (near, near_ip) = hosts[1].run_page("near", near_page.as_deref().unwrap());
    assert_eq!(far_ip, near_ip, "each host's guest pool is its own");
    // A VM's rules are in its host's namespace only.
    let table = format!("table ip mergen-{}", &near[..8]);
    let tables = |ns: Option<&str>| run_in(ns, &["nft", "list", "tables"]);
    assert!(tables(Some(&hosts[1].ns)).contains(&table));
    for ns in [None, Some(hosts[0].ns.as_str()), Some(hosts[2].ns.as_str())] {
        assert!(!tables(ns).contains(&table), "{table} in {ns:?}");
    }

    // Through host A (by alias and by short id), and from C to B.
    let (a, b, c) = (&hosts[0], &hosts[1], &hosts[2]);
    for (via, name, page) in [
        (a, "far.localhost".to_string(), &far_page),
        (a, format!("{}.localhost", &far[..8]), &far_page),
        (a, "near.localhost".to_string(), &near_page),
        (c, "near.localhost".to_string(), &near_page),
        (b, "far.localhost".to_string(), &far_page),
    ] {
        let ok = eventually(LONG, || via.get(&name) == *page);
        assert!(
            ok,
            "{name} via {}: {:?}\n{}",
            via.name,
            via.get(&name),
            logs(&hosts)
        );
    }

    // Passed through at L4 by the asking host, terminated by the owner.
    assert!(hosts[0].peer_connections("to_peer") >= 3);
    assert_eq!(hosts[0].peer_connections("from_peer"), 0);
    assert!(hosts[2].peer_connections("from_peer") >= 2);

    // An alias raced by the three hosts: exactly one winner, every round.
    for round in 0..3 {
        let app = format!("race{round}");
        let results: Vec<(u16, Option<String>)> = std::thread::scope(|s| {
            let threads: Vec<_> = hosts
                .iter()
                .map(|h| s.spawn(|| h.create_app(&app)))
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let mut codes: Vec<u16> = results.iter().map(|r| r.0).collect();
        codes.sort();
        assert_eq!(codes, [201, 409, 409], "round {round}: {results:?}");
        for (h, (_, id)) in hosts.iter_mut().zip(results) {
            h.vms.ids.extend(id);
        }
    }

    // One etcd member down, the leader: routing goes on, new routes come in.
    let leader = wait_for("an etcd leader", LONG, || etcd.leader());
    etcd.stop_member(leader);
    let (late_id, _) = hosts[1].run_page("late", "late, on host b\n");
    let late = Some("late, on host b\n".to_string());
    let ok = eventually(LONG, || hosts[0].get("late.localhost") == late);
    assert!(ok, "a route made with a member down\n{}", logs(&hosts));
    assert_eq!(hosts[0].get("far.localhost"), far_page);
    etcd.start_member(leader);
    etcd.wait_healthy(&[0, 1, 2]);

    // Host C's mergend killed: its VM goes on serving on C, host A lets go of it once
    // the lease has lapsed, and says so with an unrecognized_name alert.
    let mut killed = hosts[2].mergend.take().unwrap();
    killed.signal(rustix::process::Signal::KILL);
    assert!(killed.wait_exit(Duration::from_secs(10)).is_some());
    drop(killed);
    let gone = eventually(LONG, || hosts[0].get("far.localhost").is_none());
    assert!(gone, "host A still routes to C's VM\n{}", logs(&hosts));
    let said = s_client(&hosts[0], "far.localhost");
    assert!(said.contains("unrecognized name"), "{said}");
    assert_eq!(hosts[2].get("far.localhost"), far_page, "C serves its own");
    assert_eq!(hosts[0].get("near.localhost"), near_page, "B's routes stay");
    // Back: re-published, and host A routes to it again.
    let c = &mut hosts[2];
    c.mergend = Some(Mergend::start_in(&c.ns, &c.roots, &as_refs(&c.env)));
    let back = eventually(LONG, || hosts[0].get("far.localhost") == far_page);
    assert!(back, "C's routes did not come back\n{}", logs(&hosts));
    // C's start-up (its crash recovery) left the other hosts' VMs alone.
    assert_eq!(hosts[0].get("near.localhost"), near_page);
    assert!(tables(Some(&hosts[1].ns)).contains(&table));

    // etcd down altogether: the last known routes keep serving.
    etcd.stop_all();
    wait_for("host A's watch down", LONG, || {
        (hosts[0].watch() == "down").then_some(())
    });
    assert_eq!(hosts[0].get("far.localhost"), far_page);
    assert_eq!(hosts[0].get("late.localhost"), late);
    assert_eq!(hosts[2].get("near.localhost"), near_page);

    // etcd back: the watches resume and see what changes after.
    etcd.start_all();
    etcd.wait_healthy(&[0, 1, 2]);
    wait_for("the watches up", LONG, || {
        hosts.iter().all(|h| h.watch() == "up").then_some(())
    });
    wait_for("C's mergend connected", LONG, || {
        (hosts[2].mergend().get_json("/healthz").1["cluster"] == "connected").then_some(())
    });
    let after = Some("after, on host c\n".to_string());
    hosts[2].run_page("after", after.as_deref().unwrap());
    let (code, out) = hosts[1]
        .mergend()
        .curl("DELETE", &format!("/v1/vms/{late_id}"), &[]);
    assert_eq!(code, 200, "{out}");
    for h in &hosts[..2] {
        let ok = eventually(LONG, || h.get("after.localhost") == after);
        assert!(
            ok,
            "{}: a route made after etcd's return\n{}",
            h.name,
            logs(&hosts)
        );
    }
    let ok = eventually(LONG, || hosts[0].get("late.localhost").is_none());
    assert!(ok, "a route deleted after etcd's return\n{}", logs(&hosts));
    assert_eq!(hosts[0].get("far.localhost"), far_page);

    // Everything the hosts made goes with them.
    let vm_netns: Vec<String> = hosts
        .iter()
        .flat_map(|h| h.vms.ids.iter())
        .map(|id| mergen_model::names::netns_name(id))
        .collect();
    drop(hosts);
    let listed = run_in(None, &["ip", "netns", "list"]);
    for ns in &vm_netns {
        assert!(!listed.contains(ns.as_str()), "{ns} left behind:\n{listed}");
    }
}
