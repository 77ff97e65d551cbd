//! The socket pool against real namespaces: sockets land in the right namespace, refill
//! under concurrent takers, and a deleted namespace gives a clear error.

mod common;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddrV4, SocketAddrV6, TcpListener};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use common::NsGuard;
use ffi_free_netns::{Error, Family, PoolConfig, SocketPool};
use mergen_testkit::{eventually, require_root};
use rustix::io::Errno;
use rustix::net::{AddressFamily, SocketType};

/// A port on 127.0.0.1 that is bound (so nothing else takes it) but not listening in the
/// root namespace: connects to it there are refused.
fn reserve_refused_port() -> (OwnedFd, u16) {
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    rustix::net::bind(&fd, &SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = match rustix::net::getsockname(&fd).unwrap().try_into() {
        Ok(std::net::SocketAddr::V4(addr)) => addr.port(),
        other => panic!("unexpected local address {other:?}"),
    };
    (fd, port)
}

fn listener_in(ns: &ffi_free_netns::Netns, port: u16) -> TcpListener {
    ns.run(|| TcpListener::bind((Ipv4Addr::LOCALHOST, port)))
        .unwrap()
        .unwrap()
}

fn connect_blocking(fd: &OwnedFd, port: u16) -> Result<(), Errno> {
    rustix::io::ioctl_fionbio(fd, false)?;
    rustix::net::connect(fd, &SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

fn assert_pool_socket_shape(fd: &OwnedFd, domain: AddressFamily) {
    use rustix::net::sockopt;
    assert_eq!(sockopt::socket_domain(fd).unwrap(), domain);
    assert_eq!(sockopt::socket_type(fd).unwrap(), SocketType::STREAM);
    let fl = rustix::fs::fcntl_getfl(fd).unwrap();
    assert!(fl.contains(rustix::fs::OFlags::NONBLOCK));
    let fdfl = rustix::io::fcntl_getfd(fd).unwrap();
    assert!(fdfl.contains(rustix::io::FdFlags::CLOEXEC));
    assert!(
        rustix::net::getpeername(fd).is_err(),
        "pool sockets are not connected"
    );
}

#[test]
fn pool_socket_connects_inside_its_namespace_only() {
    require_root!();
    let (guard, ns) = NsGuard::create();
    let (_reserved, port) = reserve_refused_port();
    let listener = listener_in(&ns, port);

    let pool = SocketPool::new(PoolConfig::default());
    assert_eq!(pool.ready(&guard.0, Family::V4), 0);
    pool.prewarm(&guard.0).unwrap();
    let depth = PoolConfig::default().depth;
    let filled = eventually(Duration::from_secs(10), || {
        [Family::V4, Family::V6]
            .iter()
            .all(|&f| pool.ready(&guard.0, f) == depth)
    });
    assert!(filled, "prewarm did not fill both families to {depth}");
    let fd = pool.take(&guard.0, Family::V4).unwrap();
    assert_pool_socket_shape(&fd, AddressFamily::INET);
    connect_blocking(&fd, port).expect("pool socket reaches the listener inside the namespace");
    let (_conn, peer) = listener.accept().unwrap();
    assert!(peer.ip().is_loopback());

    // The same connect from the root namespace is refused.
    let root_fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    assert_eq!(connect_blocking(&root_fd, port), Err(Errno::CONNREFUSED));

    // By absolute path too.
    let by_path = pool
        .take(&ns.path().display().to_string(), Family::V4)
        .unwrap();
    connect_blocking(&by_path, port).unwrap();
    listener.accept().unwrap();

    let v6 = pool.take(&guard.0, Family::V6).unwrap();
    assert_pool_socket_shape(&v6, AddressFamily::INET6);
    pool.forget(&guard.0);
}

#[test]
fn families_not_kept_ready_are_made_on_demand() {
    require_root!();
    let (guard, ns) = NsGuard::create();
    let depth = 8;
    let pool = SocketPool::new(PoolConfig {
        depth,
        families: vec![Family::V4],
        ..PoolConfig::default()
    });
    pool.prewarm(&guard.0).unwrap();
    let v4_full = || pool.ready(&guard.0, Family::V4) == depth;
    assert!(
        eventually(Duration::from_secs(10), v4_full),
        "prewarm did not fill IPv4 to {depth}"
    );
    // One refill pass makes both lanes' sockets, IPv4 first: with IPv4 full, a kept IPv6
    // lane would be filling or full by now.
    assert_eq!(pool.ready(&guard.0, Family::V6), 0);

    let listener = ns
        .run(|| TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0)))
        .unwrap()
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let v6 = pool.take(&guard.0, Family::V6).unwrap();
    assert_pool_socket_shape(&v6, AddressFamily::INET6);
    rustix::io::ioctl_fionbio(&v6, false).unwrap();
    rustix::net::connect(
        &v6,
        &SocketAddrV6::new(std::net::Ipv6Addr::LOCALHOST, port, 0, 0),
    )
    .expect("the on-demand IPv6 socket reaches the listener inside the namespace");
    listener.accept().unwrap();

    // Draining IPv4 to its low-water mark starts a refill pass, which begins after the
    // IPv6 take was served: once IPv4 is full again, that pass would have refilled a
    // kept IPv6 lane before it.
    let taken: Vec<OwnedFd> = (0..depth / 2)
        .map(|_| pool.take(&guard.0, Family::V4).unwrap())
        .collect();
    assert!(
        eventually(Duration::from_secs(10), v4_full),
        "IPv4 was not refilled to {depth}"
    );
    assert_eq!(pool.ready(&guard.0, Family::V6), 0);
    drop(taken);
    pool.forget(&guard.0);
}

#[test]
fn pool_refills_under_concurrent_takers() {
    require_root!();
    const THREADS: usize = 16;
    const TAKES: usize = 200;
    let (guard, ns) = NsGuard::create();
    // An address that exists only inside this namespace: binding to it proves where a
    // socket lives without sending a packet (v6 sockets bind to its v4-mapped form).
    let n = mergen_testkit::next();
    let only_here = Ipv4Addr::new(
        10,
        213,
        (std::process::id() % 250) as u8,
        (n % 250) as u8 + 1,
    );
    ffi_free_netns::links::add_address(Some(&ns), "lo", only_here.into(), 32).unwrap();
    let root_fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    assert_eq!(
        rustix::net::bind(&root_fd, &SocketAddrV4::new(only_here, 0)),
        Err(Errno::ADDRNOTAVAIL),
        "{only_here} must not exist in the root namespace"
    );
    let pool = SocketPool::new(PoolConfig {
        depth: 8,
        idle_timeout: Duration::from_secs(30),
        ..PoolConfig::default()
    });
    let name = Arc::new(guard.0.clone());
    let takers: Vec<_> = (0..THREADS)
        .map(|t| {
            let pool = pool.clone();
            let name = Arc::clone(&name);
            std::thread::spawn(move || {
                let family = if t % 4 == 0 { Family::V6 } else { Family::V4 };
                let mut inodes = Vec::with_capacity(TAKES);
                for _ in 0..TAKES {
                    let fd = pool.take(&name, family).unwrap();
                    inodes.push(rustix::fs::fstat(&fd).unwrap().st_ino);
                    let bound = match family {
                        Family::V4 => rustix::net::bind(&fd, &SocketAddrV4::new(only_here, 0)),
                        Family::V6 => rustix::net::bind(
                            &fd,
                            &SocketAddrV6::new(only_here.to_ipv6_mapped(), 0, 0, 0),
                        ),
                    };
                    bound.expect("pool socket lives in the namespace");
                }
                inodes
            })
        })
        .collect();
    let mut all = HashSet::new();
    for taker in takers {
        all.extend(taker.join().unwrap());
    }
    assert_eq!(
        all.len(),
        THREADS * TAKES,
        "every take gave a distinct socket"
    );
    pool.forget(&name);
}

#[test]
fn deleted_namespace_gives_a_clear_error() {
    require_root!();
    let (guard, ns) = NsGuard::create();
    let pool = SocketPool::new(PoolConfig::default());
    pool.take(&guard.0, Family::V4).unwrap();
    drop(ns);
    ffi_free_netns::delete(&guard.0).unwrap();

    // Sockets already in the queue may still be handed out until the worker notices.
    let mut last = None;
    let noticed = eventually(Duration::from_secs(10), || {
        match pool.take(&guard.0, Family::V4) {
            Ok(_) => false,
            Err(e) => {
                last = Some(e);
                true
            }
        }
    });
    assert!(
        noticed,
        "takes kept succeeding after the namespace was deleted"
    );
    let err = last.unwrap();
    assert!(
        err.to_string().contains(&guard.0),
        "error does not name the namespace: {err}"
    );
    // Once the worker is gone, takes resolve the name afresh and find nothing.
    let again = pool.take(&guard.0, Family::V4).unwrap_err();
    assert!(matches!(again, Error::NotFound(_)), "{again:?}");
}

#[test]
fn missing_namespace_and_bad_names_are_errors() {
    let pool = SocketPool::new(PoolConfig::default());
    let missing = common::unique_name();
    let err = pool.take(&missing, Family::V4).unwrap_err();
    assert!(err.to_string().contains(&missing), "{err}");
    assert!(pool.prewarm(&missing).is_err());
    assert!(pool.take("a/b", Family::V4).is_err());
    assert!(pool.take("/proc/self/status", Family::V4).is_err());
    pool.forget(&missing);
}

#[test]
fn handles_and_errors_cross_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<SocketPool>();
    send_sync::<ffi_free_netns::Netns>();
    send_sync::<Error>();
    let boxed: Box<dyn std::error::Error + Send + Sync> =
        Box::new(Error::NotFound("network namespace x not found".into()));
    assert_eq!(boxed.to_string(), "network namespace x not found");
}

/// A waker that counts its calls and lets a test wait for the next one.
fn counting_wake() -> (ffi_free_netns::Wake, std::sync::mpsc::Receiver<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let wake: ffi_free_netns::Wake = Arc::new(move || {
        let _ = tx.lock().unwrap().send(());
    });
    (wake, rx)
}

#[test]
fn try_take_on_a_cold_pool_returns_none_then_wakes() {
    require_root!();
    let (guard, ns) = NsGuard::create();
    let (_reserved, port) = reserve_refused_port();
    let listener = listener_in(&ns, port);
    // Depth 0: the worker makes a socket only when asked, so the first try is
    // deterministically empty.
    let pool = SocketPool::new(PoolConfig {
        depth: 0,
        idle_timeout: Duration::from_secs(60),
        ..PoolConfig::default()
    });
    let (wake, woken) = counting_wake();
    let first = pool.try_take(&guard.0, Family::V4, &wake).unwrap();
    assert!(first.is_none(), "a cold pool has nothing queued");

    let mut fd = None;
    for _ in 0..10 {
        woken
            .recv_timeout(Duration::from_secs(10))
            .expect("the pool never signalled the waiting taker");
        if let Some(got) = pool.try_take(&guard.0, Family::V4, &wake).unwrap() {
            fd = Some(got);
            break;
        }
    }
    let fd = fd.expect("no socket after the pool's signals");
    assert_pool_socket_shape(&fd, AddressFamily::INET);
    connect_blocking(&fd, port).expect("the socket lives in the namespace");
    listener.accept().unwrap();

    // A warm queue answers without registering the waker.
    let warm = SocketPool::new(PoolConfig::default());
    warm.prewarm(&guard.0).unwrap();
    let depth = PoolConfig::default().depth;
    assert!(eventually(Duration::from_secs(10), || warm
        .ready(&guard.0, Family::V6)
        == depth));
    let (quiet, never) = counting_wake();
    let v6 = warm.try_take(&guard.0, Family::V6, &quiet).unwrap();
    assert_pool_socket_shape(&v6.expect("a queued socket"), AddressFamily::INET6);
    warm.forget(&guard.0);
    pool.forget(&guard.0);
    // Forgetting calls only registered wakers: this one never was.
    assert!(never.try_recv().is_err());
}

#[test]
fn many_parked_try_takers_are_all_served() {
    require_root!();
    let (guard, _ns) = NsGuard::create();
    let pool = SocketPool::new(PoolConfig {
        depth: 2,
        idle_timeout: Duration::from_secs(60),
        ..PoolConfig::default()
    });
    const TAKERS: usize = 50;
    // One event loop: one waker shared by all its parked takers.
    let (wake, woken) = counting_wake();
    let mut got: Vec<OwnedFd> = Vec::new();
    let mut parked = TAKERS;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while parked > 0 {
        let mut still = 0;
        for _ in 0..parked {
            match pool.try_take(&guard.0, Family::V4, &wake).unwrap() {
                Some(fd) => got.push(fd),
                None => still += 1,
            }
        }
        parked = still;
        if parked > 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            woken
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("{parked} takers never woken"));
        }
    }
    let distinct: HashSet<_> = got.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    assert_eq!(distinct.len(), TAKERS);
    pool.forget(&guard.0);
}

#[test]
fn try_take_reports_a_vanished_namespace() {
    require_root!();
    let (guard, ns) = NsGuard::create();
    let pool = SocketPool::new(PoolConfig {
        depth: 0,
        idle_timeout: Duration::from_secs(60),
        ..PoolConfig::default()
    });
    let (wake, woken) = counting_wake();
    assert!(pool
        .try_take(&guard.0, Family::V4, &wake)
        .unwrap()
        .is_none());
    woken.recv_timeout(Duration::from_secs(10)).expect("woken");
    drop(ns);
    ffi_free_netns::delete(&guard.0).unwrap();

    // The worker may still hand out what it makes until its next check; then the
    // parked taker is woken and its retry fails with an error naming the namespace.
    let mut outcome = None;
    for _ in 0..100 {
        match pool.try_take(&guard.0, Family::V4, &wake) {
            Ok(Some(_)) => continue,
            Ok(None) => {
                woken
                    .recv_timeout(Duration::from_secs(10))
                    .expect("a parked taker is woken when its namespace goes");
            }
            Err(e) => {
                outcome = Some(e);
                break;
            }
        }
    }
    let err = outcome.expect("try_take never reported the deleted namespace");
    assert!(err.to_string().contains(&guard.0), "{err}");
    let missing = pool.try_take(&common::unique_name(), Family::V4, &wake);
    assert!(matches!(missing, Err(Error::NotFound(_))), "{missing:?}");
}
