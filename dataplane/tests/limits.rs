//! The forwarder's limits under hostile load: a low open-files limit, the total and
//! per-address connection caps, and accepting while out of descriptors. Figures are
//! measured and printed (run with `--nocapture`); the bounds asserted are resource
//! bounds (CPU seconds per second, log lines), never wall time.

mod common;

use std::io::Read;
use std::net::{Ipv4Addr, TcpStream};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use common::*;

/// These tests measure the forwarder's CPU: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn closed_as(fwd: &Forwarder, outcome: &str) -> f64 {
    let port = fwd.ports[0];
    fwd.metric_answered(&format!(
        r#"mergen_forwarder_connections_total{{listener="127.0.0.1:{port}",outcome="{outcome}"}}"#
    ))
}

fn open_now(fwd: &Forwarder) -> f64 {
    let port = fwd.ports[0];
    fwd.metric_answered(&format!(
        r#"mergen_forwarder_connections_open{{listener="127.0.0.1:{port}"}}"#
    ))
}

/// A TLS round trip to the echo VM from `from`.
fn served(fwd: &Forwarder, from: Ipv4Addr) -> bool {
    tls_connect_from(from, "echo.localhost", fwd.ports[0])
        .and_then(|mut s| round_trip(&mut s, b"still served"))
        .is_ok_and(|got| got == b"still served")
}

/// `n` connections to the forwarder from `from`, saying nothing.
fn silent_clients(fwd: &Forwarder, from: Ipv4Addr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| connect_from(from, fwd.ports[0]).expect("TCP connect"))
        .collect()
}

/// The forwarder's CPU use, in CPU seconds per second, over `window` from now.
fn cpu_over(pid: i32, window: Duration) -> f64 {
    let (cpu, start) = (cpu_seconds(pid), Instant::now());
    // A measurement over a span of time, not a wait for a condition.
    std::thread::sleep(window);
    (cpu_seconds(pid) - cpu) / start.elapsed().as_secs_f64()
}

/// `ulimit -n 1024` (soft and hard) and the default 65,536 connections: the forwarder
/// lowers its cap to what 1,024 descriptors carry and says so; a flood of 1,500 silent
/// connections is held up to the caps and the rest refused at once, with no warning
/// per connection and no CPU spent while saturated; health checks answer during it and
/// clients are served again once it ends.
#[test]
fn a_1024_open_files_limit_caps_connections_and_keeps_serving() {
    require_root!();
    let _serial = serial();
    allow_open_files(8192);
    let ns = Ns::new();
    echo_server(ns.listen(443));
    let env = [("FWD_HANDSHAKE_TIMEOUT_SECONDS", "60")];
    let mut fwd = Forwarder::start_limited(&[443], &env, 1024);
    write_app_vm(&fwd.config_root(), &ns, "echo");
    let routable = poll(Duration::from_secs(5), || {
        served(&fwd, Ipv4Addr::LOCALHOST).then_some(())
    });
    assert!(routable.is_some(), "{}", fwd.log());
    assert!(
        fwd.log()
            .contains("FWD_MAX_CONNECTIONS=65536 lowered to 448"),
        "{}",
        fwd.log()
    );
    assert_eq!(
        fwd.metric_answered(r#"mergen_forwarder_connection_limit{scope="total"}"#),
        448.0
    );
    assert_eq!(
        fwd.metric_answered(r#"mergen_forwarder_connection_limit{scope="per_ip"}"#),
        112.0
    );
    let settled = poll(Duration::from_secs(5), || {
        (open_now(&fwd) == 0.0).then_some(())
    });
    assert!(settled.is_some());

    let pid = fwd.child.pid();
    let lines_before = fwd.log().lines().count();
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    // One address first, up to its cap and far past it; then four more, past the
    // total cap.
    let mut flood = silent_clients(&fwd, Ipv4Addr::new(127, 0, 0, 10), 600);
    for i in 0..900 {
        let from = Ipv4Addr::new(127, 0, 0, 11 + (i % 4) as u8);
        flood.push(connect_from(from, fwd.ports[0]).expect("TCP connect"));
    }
    let counted = poll(Duration::from_secs(20), || {
        let refused = closed_as(&fwd, "refused") + closed_as(&fwd, "refused_per_ip");
        (refused >= 1500.0 - 448.0 && open_now(&fwd) == 448.0).then_some(refused)
    });
    let flood_cpu = cpu_seconds(pid) - cpu_before;
    assert!(counted.is_some(), "{}", fwd.metrics());
    assert_eq!(closed_as(&fwd, "refused_per_ip"), 600.0 - 112.0);
    assert_eq!(closed_as(&fwd, "refused"), 900.0 - (448.0 - 112.0));
    // Refused connections were closed, not left hanging.
    let mut first_refused = flood.swap_remove(599);
    first_refused
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert_eq!(first_refused.read(&mut [0u8; 16]).unwrap_or(0), 0);

    // Saturated: nothing to do but wait.
    let saturated = cpu_over(pid, Duration::from_secs(2));
    let health = http_get(fwd.admin, "/healthz").expect("/healthz during the flood");
    assert_eq!(health.0, 200);
    let warnings = fwd.log().lines().count() - lines_before;
    eprintln!(
        "1,500 connections with 1,024 descriptors: accepted or refused in {:?} using {flood_cpu:.3} CPU s; \
         saturated: {saturated:.4} CPU s/s; {warnings} log lines",
        started.elapsed()
    );
    assert!(saturated < 0.2, "{saturated} CPU s/s while saturated");
    assert!(warnings <= 10, "{warnings} log lines:\n{}", fwd.log());

    drop(flood);
    let back = poll(Duration::from_secs(10), || {
        served(&fwd, Ipv4Addr::LOCALHOST).then_some(())
    });
    assert!(back.is_some(), "not served after the flood: {}", fwd.log());
    assert!(fwd.child.0.try_wait().expect("try_wait").is_none());
}

/// One address at its cap is refused at once (`refused_per_ip`) while another is
/// served; once its connections close, it is served again.
#[test]
fn one_address_at_its_cap_leaves_room_for_others() {
    require_root!();
    let (_ns, fwd) = echo_vm(&[
        ("FWD_MAX_CONNECTIONS_PER_IP", "20"),
        ("FWD_HANDSHAKE_TIMEOUT_SECONDS", "60"),
    ]);
    let settled = poll(Duration::from_secs(5), || {
        (open_now(&fwd) == 0.0).then_some(())
    });
    assert!(settled.is_some());
    let held = silent_clients(&fwd, Ipv4Addr::LOCALHOST, 20);
    let all_in = poll(Duration::from_secs(5), || {
        (open_now(&fwd) == 20.0).then_some(())
    });
    assert!(all_in.is_some(), "{}", fwd.metrics());

    let mut over = connect_from(Ipv4Addr::LOCALHOST, fwd.ports[0]).expect("TCP connect");
    over.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert_eq!(over.read(&mut [0u8; 16]).unwrap_or(0), 0, "not closed");
    assert!(!served(&fwd, Ipv4Addr::LOCALHOST));
    assert_eq!(closed_as(&fwd, "refused_per_ip"), 2.0);

    assert!(served(&fwd, Ipv4Addr::new(127, 0, 0, 2)), "{}", fwd.log());
    assert_eq!(closed_as(&fwd, "refused"), 0.0);

    drop(held);
    let back = poll(Duration::from_secs(5), || {
        served(&fwd, Ipv4Addr::LOCALHOST).then_some(())
    });
    assert!(back.is_some(), "{}", fwd.metrics());
}

/// Out of descriptors, although under the cap: the namespace socket pools of many VMs
/// with traffic (32 ready sockets each) took the reserve of a 512-descriptor limit.
/// Accepting pauses and backs off instead of failing in a tight loop, one warning line
/// per interval says so, and once connections close every queued one is accepted and
/// clients are served again.
#[test]
fn out_of_descriptors_accepting_pauses_instead_of_spinning() {
    require_root!();
    let _serial = serial();
    const VMS: usize = 12;
    let env = [
        ("FWD_HANDSHAKE_TIMEOUT_SECONDS", "60"),
        ("FWD_MAX_CONNECTIONS_PER_IP", "0"),
    ];
    let fwd = Forwarder::start_limited(&[443], &env, 512);
    let pid = fwd.child.pid();
    let echo = Ns::new();
    echo_server(echo.listen(443));
    write_app_vm(&fwd.config_root(), &echo, "echo");
    // VMs with nothing listening: one connection each starts its namespace's pool.
    let namespaces: Vec<Ns> = (0..VMS).map(|_| Ns::new()).collect();
    for (i, ns) in namespaces.iter().enumerate() {
        write_app_vm(&fwd.config_root(), ns, &format!("idle{i}"));
    }
    let routable = poll(Duration::from_secs(5), || {
        served(&fwd, Ipv4Addr::LOCALHOST).then_some(())
    });
    assert!(routable.is_some(), "{}", fwd.log());
    for i in 0..VMS {
        let (code, _) = curl(&format!("idle{i}.localhost"), fwd.ports[0]);
        assert_eq!(code, "502", "{}", fwd.log());
    }
    let pools_full = poll(Duration::from_secs(10), || {
        (open_fds(pid) >= VMS * 32).then_some(())
    });
    assert!(pools_full.is_some(), "{} descriptors open", open_fds(pid));
    let settled = poll(Duration::from_secs(5), || {
        (open_now(&fwd) == 0.0).then_some(())
    });
    assert!(settled.is_some());
    eprintln!("{} of 512 descriptors open before the flood", open_fds(pid));

    const FLOOD: usize = 300;
    let flood = silent_clients(&fwd, Ipv4Addr::LOCALHOST, FLOOD);
    let paused = poll(Duration::from_secs(10), || {
        (log_lines(&fwd, "accepting paused") > 0).then_some(())
    });
    assert!(paused.is_some(), "never paused: {}", fwd.log());
    // The admin listener cannot accept either now: /proc tells.
    let fds = open_fds(pid);
    let spinning = cpu_over(pid, Duration::from_secs(3));
    let warnings = log_lines(&fwd, "accept on");
    eprintln!(
        "out of descriptors ({fds} of 512 open), the rest of {FLOOD} connections queued: \
         {spinning:.4} CPU s/s, {warnings} warning line(s)"
    );
    assert!(fds >= 500, "never ran out of descriptors: {fds} open");
    assert!(
        spinning < 0.2,
        "{spinning} CPU s/s while out of descriptors"
    );
    // One line per worker per 10 s, give or take the interval's edge.
    assert!(warnings <= 4, "{}", fwd.log());

    drop(flood);
    let accepted = poll(Duration::from_secs(20), || {
        let opened = fwd.metric_answered(&format!(
            r#"mergen_forwarder_connections_total{{listener="127.0.0.1:{}",outcome="handshake_failed"}}"#,
            fwd.ports[0]
        ));
        (opened >= FLOOD as f64).then_some(())
    });
    assert!(accepted.is_some(), "{}\n{}", fwd.metrics(), fwd.log());
    assert!(fwd.metric_answered("mergen_forwarder_accept_pauses_total") >= 1.0);
    let back = poll(Duration::from_secs(10), || {
        served(&fwd, Ipv4Addr::LOCALHOST).then_some(())
    });
    assert!(back.is_some(), "{}", fwd.log());
}
