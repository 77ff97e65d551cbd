//! The raw (2022-style) listener: no TLS, no sniffing; a real ssh client reaches a
//! real sshd in the oldest VM's namespace.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn ssh_through_the_raw_listener() {
    require_root!();
    let ns = Ns::new();
    let other = Ns::new();
    let dir = TempDir::new("sshd");
    let d = dir.path();
    std::fs::create_dir_all("/run/sshd").expect("creating /run/sshd");
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join("host_key")),
    );
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join("client_key")),
    );
    std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).expect("authorized_keys");
    let conf = format!(
        "Port 22\nListenAddress {ip}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
         PermitRootLogin yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         StrictModes no\nUsePAM no\nPidFile {d}/sshd.pid\n",
        ip = ns.ip,
        d = d.display()
    );
    std::fs::write(d.join("sshd_config"), conf).expect("sshd_config");
    let _sshd = ChildGuard::spawn(
        ns.command("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );

    let fwd = Forwarder::start(&[22], &[]);
    // The oldest VM gets raw connections; a younger one must not.
    write_untagged_vm(&fwd.config_root(), &ns, "2025-01-01T00:00:00Z");
    write_untagged_vm(&fwd.config_root(), &other, "2025-06-01T00:00:00Z");
    let port = fwd.ports[0].to_string();
    let ssh = || {
        run(Command::new("ssh")
            .arg("-i")
            .arg(d.join("client_key"))
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "LogLevel=ERROR",
                "-p",
                &port,
                "root@127.0.0.1",
                "echo hello-from-vm",
            ])
            .stdin(Stdio::null()))
    };
    // sshd and the resolver start in the background: retry until the deadline.
    let out = poll(Duration::from_secs(10), || {
        let out = ssh();
        out.status.success().then_some(out)
    });
    let out = out.unwrap_or_else(|| {
        let last = ssh();
        panic!(
            "ssh through the forwarder failed: {}\n{}",
            String::from_utf8_lossy(&last.stderr),
            fwd.log()
        )
    });
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hello-from-vm");
}
