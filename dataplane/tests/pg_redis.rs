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

/// A real PostgreSQL server on the guest address of a fresh namespace, port 5432,
/// trusting everyone; stopped (SIGINT, a fast shutdown) and removed with the value.
struct Postgres {
    ns: Ns,
    _server: ChildGuard,
    _dir: TempDir,
}

impl Postgres {
    fn start() -> Postgres {
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
        let server = ChildGuard::spawn_graceful(
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
        Postgres {
            ns,
            _server: server,
            _dir: dir,
        }
    }
}

/// `psql` connected with `conninfo`, running `sql`.
fn psql(conninfo: &str, sql: &str) -> std::process::Output {
    run(Command::new("psql")
        .args(["-X", "-A", "-t", "-d", conninfo, "-c", sql])
        .stdin(Stdio::null()))
}

fn conninfo(port: u16, sslmode: &str) -> String {
    format!(
        "host=db1.localhost hostaddr=127.0.0.1 port={port} user=postgres dbname=postgres sslmode={sslmode} connect_timeout=5"
    )
}

/// A forwarder with a PostgreSQL listener and a VM `db1` whose server answers.
fn postgres_vm() -> (Postgres, Forwarder) {
    let pg = Postgres::start();
    let fwd = Forwarder::start(&[5432], &[]);
    write_app_vm(&fwd.config_root(), &pg.ns, "db1");
    let info = conninfo(fwd.ports[0], "require");
    let up = poll(Duration::from_secs(20), || {
        psql(&info, "select 1").status.success().then_some(())
    });
    if up.is_none() {
        let out = psql(&info, "select 1");
        panic!(
            "psql through the forwarder failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            fwd.log()
        );
    }
    (pg, fwd)
}

#[test]
fn psql_sslmode_require_reaches_postgres_in_the_vm() {
    require_root!();
    let (_pg, fwd) = postgres_vm();
    let info = conninfo(fwd.ports[0], "require");
    let out = psql(&info, "select 'hello-from-' || 'postgres'");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "hello-from-postgres"
    );
    // The session really is TLS on the client's side.
    let info = run(Command::new("psql")
        .args(["-X", "-d", &info, "-c", "\\conninfo"])
        .stdin(Stdio::null()));
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(info.contains("SSL connection"), "{info}");
}

/// `sslmode=disable`: psql is told, in PostgreSQL's own words, that TLS is required,
/// instead of "server closed the connection unexpectedly"; `sslmode=allow` (plaintext
/// first, TLS when that is refused) then gets through.
#[test]
fn psql_without_tls_is_told_tls_is_required() {
    require_root!();
    let (_pg, fwd) = postgres_vm();
    let out = psql(&conninfo(fwd.ports[0], "disable"), "select 1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a plaintext session was served");
    assert!(stderr.contains("FATAL:  TLS is required"), "{stderr}");
    assert!(
        !stderr.contains("closed the connection unexpectedly"),
        "{stderr}"
    );
    let refused = format!(
        r#"mergen_forwarder_connections_total{{listener="127.0.0.1:{}",outcome="bad_request"}}"#,
        fwd.ports[0]
    );
    let counted = poll(Duration::from_secs(5), || {
        (fwd.metric(&refused) >= 1.0).then_some(())
    });
    assert!(counted.is_some(), "{}", fwd.metrics());

    let out = psql(&conninfo(fwd.ports[0], "allow"), "select 'after-retry'");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "after-retry",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// PostgreSQL 17's direct TLS (`sslnegotiation=direct`: a ClientHello first, ALPN
/// `postgresql`), spoken by `openssl s_client` since Debian's libpq predates it: the
/// forwarder selects `postgresql`, and the real server answers the StartupMessage and
/// a query sent over that session.
#[test]
fn direct_tls_with_alpn_postgresql_reaches_postgres() {
    require_root!();
    let (_pg, fwd) = postgres_vm();
    let mut input = startup_message(&[("user", "postgres"), ("database", "postgres")]);
    input.extend_from_slice(&frontend(b'Q', b"select 'direct-' || 'tls'\0"));
    input.extend_from_slice(&frontend(b'X', b""));
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{}", fwd.ports[0]))
        .args([
            "-servername",
            "db1.localhost",
            "-alpn",
            "postgresql",
            "-ign_eof",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&input).expect("writing to s_client");
    }
    // The server closes after Terminate; s_client then exits.
    let mut guard = ChildGuard::new(child, None);
    let status = poll(Duration::from_secs(20), || {
        guard.0.try_wait().ok().flatten()
    });
    assert!(status.is_some(), "s_client did not finish");
    let mut out = Vec::new();
    {
        use std::io::Read;
        guard
            .0
            .stdout
            .take()
            .expect("stdout")
            .read_to_end(&mut out)
            .expect("reading s_client");
    }
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("ALPN protocol: postgresql"), "{text}");
    // AuthenticationOk ('R', length 8, code 0), then the query's row and ReadyForQuery.
    let auth_ok = [b'R', 0, 0, 0, 8, 0, 0, 0, 0];
    assert!(
        out.windows(9).any(|w| w == auth_ok),
        "no AuthenticationOk: {text}"
    );
    assert!(text.contains("direct-tls"), "{text}");
}

/// A protocol 3.0 StartupMessage with these parameters.
fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = vec![0, 3, 0, 0];
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// A frontend message: type byte, length, body.
fn frontend(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
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
