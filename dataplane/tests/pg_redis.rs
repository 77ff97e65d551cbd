//! TLS-terminated database protocols: psql (SSLRequest, then TLS with SNI) to a real
//! PostgreSQL, and redis-cli over TLS to a real Redis, each in its own namespace.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use rustix::process::Signal;

/// A PostgreSQL server program: on PATH, or in Debian's versioned directory (the
/// `postgresql` package does not put the server programs on PATH).
fn pg_program(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.is_file())
        .collect();
    versioned.sort_by_key(|p| {
        p.components()
            .nth(4)
            .and_then(|c| c.as_os_str().to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    on_path
        .or_else(|| versioned.pop())
        .unwrap_or_else(|| panic!("{name} not found on PATH nor in /usr/lib/postgresql/*/bin"))
}

#[test]
fn psql_sslmode_require_reaches_postgres_in_the_vm() {
    require_root!();
    let ns = Ns::new();
    let dir = TempDir::new("pg");
    let data = dir.path().join("data");
    run_ok(
        Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir.path()),
    );
    let as_postgres = |cmd: &mut Command| {
        cmd.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"]);
    };
    let mut initdb = Command::new("setpriv");
    as_postgres(&mut initdb);
    run_ok(
        initdb
            .arg(pg_program("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data)
            .stdout(Stdio::null()),
    );
    // The forwarder connects from the guest address itself (same namespace).
    let hba = data.join("pg_hba.conf");
    let mut rules = std::fs::read_to_string(&hba).expect("reading pg_hba.conf");
    rules.push_str("host all all 0.0.0.0/0 trust\n");
    std::fs::write(&hba, rules).expect("writing pg_hba.conf");
    let mut server = ns.command("setpriv");
    as_postgres(&mut server);
    let _postgres = ChildGuard::spawn_graceful(
        server
            .arg(pg_program("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", "5432", "-c", &format!("listen_addresses={}", ns.ip)])
            .arg("-k")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        Signal::INT,
    );

    let fwd = Forwarder::start(&[5432], &[]);
    write_app_vm(&fwd.config_root(), &ns, "db1");
    let conninfo = format!(
        "host=db1.localhost hostaddr=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require connect_timeout=5",
        fwd.ports[0]
    );
    let query = |sql: &str| {
        run(Command::new("psql")
            .args(["-X", "-A", "-t", "-d", &conninfo, "-c", sql])
            .stdin(Stdio::null()))
    };
    let out = poll(Duration::from_secs(20), || {
        let out = query("select 'hello-from-' || 'postgres'");
        out.status.success().then_some(out)
    })
    .unwrap_or_else(|| {
        let out = query("select 1");
        panic!(
            "psql through the forwarder failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            fwd.log()
        )
    });
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello-from-postgres"
    );
    // The session really is TLS on the client's side.
    let ssl = query("select 1");
    assert!(ssl.status.success());
    let info = run(Command::new("psql")
        .args(["-X", "-d", &conninfo, "-c", "\\conninfo"])
        .stdin(Stdio::null()));
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("SSL connection"), "{info}");
}

#[test]
fn redis_cli_over_tls_reaches_redis_in_the_vm() {
    require_root!();
    let ns = Ns::new();
    let dir = TempDir::new("redis");
    let _redis = ChildGuard::spawn(
        ns.command("redis-server")
            .args([
                "--bind",
                &ns.ip.to_string(),
                "--port",
                "6379",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let fwd = Forwarder::start(&[6379], &[]);
    write_app_vm(&fwd.config_root(), &ns, "cache1");
    let port = fwd.ports[0].to_string();
    let cli = |args: &[&str]| {
        let out = run(Command::new("redis-cli")
            .args([
                "--tls",
                "--insecure",
                "--sni",
                "cache1.localhost",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
            ])
            .args(args)
            .stdin(Stdio::null()));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let pong = poll(Duration::from_secs(10), || {
        (cli(&["PING"]) == "PONG").then_some(())
    });
    assert!(
        pong.is_some(),
        "redis-cli PING failed: {}\n{}",
        cli(&["PING"]),
        fwd.log()
    );
    assert_eq!(cli(&["SET", "greeting", "hello-from-redis"]), "OK");
    assert_eq!(cli(&["GET", "greeting"]), "hello-from-redis");
}
