//! Link helpers against the real kernel: a veth pair carries TCP between the root
//! namespace and a test namespace; a tap lives where it was created.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::NsGuard;
use ffi_free_netns::{links, Error};
use mergen_testkit::{require_root, unique_name};

/// Deletes a root-namespace link on drop (a veth takes its peer with it).
struct LinkGuard(String);

impl Drop for LinkGuard {
    fn drop(&mut self) {
        if let Err(e) = links::delete_link(None, &self.0) {
            eprintln!("cleanup of link {} failed: {e}", self.0);
        }
    }
}

fn ip_out(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A /30 inside 10/8 that is unique to this process and call: (network, host 1, host 2).
fn unique_subnet() -> (Ipv4Addr, Ipv4Addr, Ipv4Addr) {
    let pid = std::process::id();
    let n = mergen_testkit::next();
    let (x, y, z) = (
        (pid % 250) as u8,
        (pid / 250 % 250) as u8,
        (n % 60 * 4) as u8,
    );
    (
        Ipv4Addr::new(10, x, y, z),
        Ipv4Addr::new(10, x, y, z + 1),
        Ipv4Addr::new(10, x, y, z + 2),
    )
}

#[test]
fn veth_pair_carries_tcp_from_root_into_the_namespace() {
    require_root!();
    let (guard, ns) = NsGuard::create();
    let (host_end, ns_end) = (unique_name("fa"), unique_name("fb"));
    links::create_veth(None, &host_end, &ns_end, Some(&ns)).unwrap();
    let _link = LinkGuard(host_end.clone());
    assert!(links::exists(None, &host_end).unwrap());
    assert!(!links::exists(None, &ns_end).unwrap());
    assert!(links::exists(Some(&ns), &ns_end).unwrap());
    assert!(!links::exists(Some(&ns), &host_end).unwrap());

    let (net, host_ip, ns_ip) = unique_subnet();
    links::add_address(None, &host_end, host_ip.into(), 30).unwrap();
    links::add_address(Some(&ns), &ns_end, ns_ip.into(), 30).unwrap();
    // Idempotent.
    links::add_address(Some(&ns), &ns_end, ns_ip.into(), 30).unwrap();
    links::set_up(None, &host_end).unwrap();
    links::set_up(Some(&ns), &ns_end).unwrap();
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    links::add_route(Some(&ns), any, 0, Some(host_ip.into()), Some(&ns_end)).unwrap();
    links::add_route(Some(&ns), any, 0, Some(host_ip.into()), Some(&ns_end)).unwrap();
    let routes = ip_out(&["-n", &guard.0, "route", "show", "default"]);
    assert!(
        routes.contains(&format!("via {host_ip} dev {ns_end}")),
        "{routes}"
    );
    let addrs = ip_out(&["-n", &guard.0, "-o", "addr", "show", "dev", &ns_end]);
    assert!(addrs.contains(&format!("{ns_ip}/30")), "{addrs}");
    assert!(!ip_out(&["-o", "route", "show", &format!("{net}/30")]).is_empty());

    let listener = ns.run(|| TcpListener::bind((ns_ip, 0))).unwrap().unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().unwrap();
        let mut buf = [0; 5];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(&buf).unwrap();
        peer
    });
    let mut client =
        TcpStream::connect_timeout(&SocketAddr::from((ns_ip, port)), Duration::from_secs(10))
            .expect("connect through the veth pair");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    client.write_all(b"hello").unwrap();
    let mut echo = [0; 5];
    client.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"hello");
    assert_eq!(server.join().unwrap().ip(), IpAddr::V4(host_ip));

    links::set_down(Some(&ns), &ns_end).unwrap();
    let shown = ip_out(&["-n", &guard.0, "-o", "link", "show", &ns_end]);
    assert!(!shown.contains(",UP"), "{shown}");

    links::delete_link(None, &host_end).unwrap();
    assert!(!links::exists(None, &host_end).unwrap());
    assert!(
        !links::exists(Some(&ns), &ns_end).unwrap(),
        "deleting one end removes its peer"
    );
    links::delete_link(None, &host_end).unwrap();
}

#[test]
fn tap_exists_inside_the_namespace_and_not_in_root() {
    require_root!();
    let (guard, ns) = NsGuard::create();
    let tap = unique_name("tp");
    links::create_tap(&ns, &tap).unwrap();
    links::create_tap(&ns, &tap).unwrap();
    assert!(links::exists(Some(&ns), &tap).unwrap());
    assert!(!links::exists(None, &tap).unwrap());
    let details = ip_out(&["-n", &guard.0, "-d", "-o", "link", "show", &tap]);
    assert!(details.contains("tun type tap"), "{details}");
    assert!(details.contains("persist on"), "{details}");
    links::set_up(Some(&ns), &tap).unwrap();
    links::delete_link(Some(&ns), &tap).unwrap();
    assert!(!links::exists(Some(&ns), &tap).unwrap());
}

/// `/sys/class/net/<tap>/<file>` as the namespace sees it (`ip netns exec` mounts the
/// namespace's own sysfs).
fn sys_net(ns: &str, tap: &str, file: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "cat"])
        .arg(format!("/sys/class/net/{tap}/{file}"))
        .output()
        .expect("run ip netns exec cat");
    assert!(
        out.status.success(),
        "reading {file} of {tap}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn tap_owned_by_a_user_and_group_is_created_replaced_and_kept() {
    require_root!();
    let (guard, ns) = NsGuard::create();
    let tap = unique_name("to");
    links::create_tap_owned(&ns, &tap, Some(123), Some(456)).unwrap();
    assert_eq!(sys_net(&guard.0, &tap, "owner"), "123");
    assert_eq!(sys_net(&guard.0, &tap, "group"), "456");
    assert_eq!(links::tap_owner(&ns, &tap).unwrap(), (Some(123), Some(456)));
    let index = sys_net(&guard.0, &tap, "ifindex");

    // Same owner again: the existing tap is kept (same interface index).
    links::create_tap_owned(&ns, &tap, Some(123), Some(456)).unwrap();
    assert_eq!(sys_net(&guard.0, &tap, "ifindex"), index);
    // No owner asked for: whatever is there is fine.
    links::create_tap(&ns, &tap).unwrap();
    assert_eq!(sys_net(&guard.0, &tap, "ifindex"), index);

    // Another owner: replaced by a tap with the new owner.
    links::create_tap_owned(&ns, &tap, Some(789), None).unwrap();
    assert_eq!(sys_net(&guard.0, &tap, "owner"), "789");
    assert_eq!(
        sys_net(&guard.0, &tap, "group"),
        "-1",
        "no group was asked for"
    );
    assert_eq!(links::tap_owner(&ns, &tap).unwrap(), (Some(789), None));
    let details = ip_out(&["-n", &guard.0, "-d", "-o", "link", "show", &tap]);
    assert!(details.contains("persist on"), "{details}");

    // A link that is not a tap has no tap owner.
    let veth = unique_name("tv");
    let peer = unique_name("tw");
    links::create_veth(Some(&ns), &veth, &peer, Some(&ns)).unwrap();
    assert!(matches!(
        links::tap_owner(&ns, &veth),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        links::tap_owner(&ns, "absent0"),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn bad_link_input_is_a_clear_error() {
    require_root!();
    let (_guard, ns) = NsGuard::create();
    for bad in ["", "sixteen-bytes-xx", "a/b", "a b"] {
        assert!(matches!(
            links::set_up(Some(&ns), bad),
            Err(Error::InvalidInput(_))
        ));
        assert!(matches!(
            links::exists(None, bad),
            Err(Error::InvalidInput(_))
        ));
    }
    let missing = unique_name("nx");
    match links::set_up(Some(&ns), &missing) {
        Err(e @ Error::NotFound(_)) => {
            assert!(
                e.to_string().contains(&missing) && e.to_string().contains(ns.name()),
                "{e}"
            )
        }
        other => panic!("set_up of a missing link gave {other:?}"),
    }
    let v4 = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
    assert!(matches!(
        links::add_address(Some(&ns), "lo", v4, 33),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        links::add_route(Some(&ns), v4, 24, None, Some("lo")),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        links::add_route(
            Some(&ns),
            IpAddr::V4(Ipv4Addr::new(10, 1, 2, 0)),
            24,
            None,
            None
        ),
        Err(Error::InvalidInput(_))
    ));
    links::delete_link(Some(&ns), &missing).unwrap();
}

#[test]
fn veth_created_inside_a_namespace_sends_its_peer_where_asked() {
    require_root!();
    let (_guard_a, a) = NsGuard::create();
    let (_guard_b, b) = NsGuard::create();
    let (inner, outer) = (unique_name("fc"), unique_name("fd"));
    // Peer to the caller's namespace.
    links::create_veth(Some(&a), &inner, &outer, None).unwrap();
    let _outer = LinkGuard(outer.clone());
    assert!(links::exists(Some(&a), &inner).unwrap());
    assert!(links::exists(None, &outer).unwrap());
    let again = links::create_veth(Some(&a), &inner, &outer, None).unwrap_err();
    assert!(again.to_string().contains(&inner), "{again}");
    links::delete_link(Some(&a), &inner).unwrap();
    assert!(!links::exists(None, &outer).unwrap());

    // Between two namespaces, never touching the caller's.
    links::create_veth(Some(&a), &inner, &outer, Some(&b)).unwrap();
    assert!(links::exists(Some(&a), &inner).unwrap());
    assert!(links::exists(Some(&b), &outer).unwrap());
    assert!(!links::exists(None, &outer).unwrap());
}
