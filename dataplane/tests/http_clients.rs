//! Load generators as real HTTPS clients of the https listener: `h2load --h1` and
//! `wrk`, bounded in requests and time, against nginx in a VM's namespace. They open
//! several keep-alive connections at once and pipeline requests on each, which a
//! one-request curl never does.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

/// A forwarder's https listener in front of nginx in a VM tagged `app`.
fn web_vm() -> (Ns, Nginx, Forwarder) {
    let ns = Ns::new();
    let web = Nginx::start(&ns, 443, "served-to-load");
    let fwd = Forwarder::start(&[443], &[("FWD_LOG_LEVEL", "warn")]);
    write_app_vm(&fwd.config_root(), &ns, "app");
    let routed = poll(Duration::from_secs(5), || {
        (curl("app.localhost", fwd.ports[0]).0 == "200").then_some(())
    });
    assert!(routed.is_some(), "never routable: {}", fwd.log());
    (ns, web, fwd)
}

fn count(text: &str, after: &str) -> Option<u64> {
    let rest = &text[text.find(after)? + after.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())?
        .parse()
        .ok()
}

#[test]
fn h2load_h1_through_the_https_listener() {
    require_root!();
    let (_ns, _web, fwd) = web_vm();
    let out = run_ok(
        std::process::Command::new("h2load")
            .args(["--h1", "-n", "400", "-c", "4", "-t", "1", "-m", "4"])
            .args(["--connect-to", &format!("127.0.0.1:{}", fwd.ports[0])])
            .arg(format!("https://app.localhost:{}/", fwd.ports[0]))
            .stdin(Stdio::null()),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // "requests: 400 total, 400 started, 400 done, 400 succeeded, 0 failed, 0 errored"
    assert_eq!(count(&text, "done,"), Some(400), "{text}");
    assert_eq!(count(&text, "started,"), Some(400), "{text}");
    assert!(
        text.contains("400 succeeded, 0 failed, 0 errored"),
        "{text}"
    );
    assert!(text.contains("status codes: 400 2xx"), "{text}");
    assert!(text.contains("Application protocol: http/1.1"), "{text}");
}

#[test]
fn wrk_through_the_https_listener() {
    require_root!();
    let (_ns, _web, fwd) = web_vm();
    let hosts = HostsFile::new(&[("app.localhost", "127.0.0.1")]);
    let out = run_ok(
        hosts
            .command("wrk")
            .args(["-t", "1", "-c", "4", "-d", "2s", "--timeout", "5s"])
            .arg(format!("https://app.localhost:{}/", fwd.ports[0]))
            .stdin(Stdio::null()),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // "N requests in 2.00s, ..."; errors would add "Socket errors" and non-2xx lines.
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ")?.0.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(requests > 0, "{text}");
    assert!(!text.contains("Socket errors"), "{text}");
    assert!(!text.contains("Non-2xx"), "{text}");
}
