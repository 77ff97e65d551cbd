//! The forwarder's fuzz targets, replayed on stable: every crash input kept under
//! `fuzz/regressions/<target>/` and every seed under `fuzz/corpus-seeds/<target>/`
//! goes through the same check the fuzzer runs (`fuzz/src/<target>.rs`).
//!
//! The seeds are real first flights, regenerated with
//! `cargo test -p mergen-dataplane --test fuzz_regressions -- --ignored write_seeds`.

#[path = "../../fuzz/src/client_hello.rs"]
mod client_hello;
#[path = "../../fuzz/src/pg_preamble.rs"]
mod pg_preamble;
#[path = "../../fuzz/src/proxy_header.rs"]
mod proxy_header;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mergen_dataplane::sni::{peek_client_hello, Peek, PG_PREAMBLE_LEN};
use mergen_testkit::tls::{client_hello, refragment};
use mergen_testkit::ChildGuard;

#[test]
fn client_hello_kept_inputs() {
    replay::replay("client_hello", client_hello::check);
}

#[test]
fn pg_preamble_kept_inputs() {
    replay::replay("pg_preamble", pg_preamble::check);
}

#[test]
fn proxy_header_kept_inputs() {
    replay::replay("proxy_header", proxy_header::check);
}

/// Regenerates the seeds from real clients: rustls, `openssl s_client` (TLS 1.3 and
/// 1.2, with and without ALPN, PostgreSQL's STARTTLS), and hellos re-cut into many
/// records. Not a test: run it by hand when the clients change.
#[test]
#[ignore]
fn write_seeds() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus-seeds");
    let hellos = seeds.join("client_hello");
    let pg = seeds.join("pg_preamble");
    for dir in [&hellos, &pg] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let rustls13 = client_hello("app1.localhost", &[b"h2", b"http/1.1"], false);
    write(&hellos, "rustls-tls13-alpn", &rustls13);
    write(
        &hellos,
        "rustls-tls12",
        &client_hello("Legacy.Localhost", &[], true),
    );
    write(
        &hellos,
        "rustls-ip-no-sni",
        &client_hello("127.0.0.1", &[], false),
    );
    write(&hellos, "rustls-3-byte-records", &refragment(&rustls13, 3));
    write(
        &hellos,
        "rustls-100-byte-records",
        &refragment(&rustls13, 100),
    );
    let s_client = |args: &[&str]| openssl_first_flight(args, false);
    write(
        &hellos,
        "openssl-tls13-alpn",
        &s_client(&["-servername", "db.localhost", "-alpn", "postgresql"]),
    );
    write(
        &hellos,
        "openssl-tls12",
        &s_client(&["-servername", "app2.vm.example.com", "-tls1_2"]),
    );
    write(&hellos, "openssl-no-sni", &s_client(&["-noservername"]));

    let starttls = openssl_first_flight(
        &["-starttls", "postgres", "-servername", "db.localhost"],
        true,
    );
    write(&pg, "openssl-starttls-postgres", &starttls);
    let libpq = psql_first_flight("require");
    write(&pg, "psql-sslmode-require", &libpq);
    write(&hellos, "psql-sslmode-require", &libpq[PG_PREAMBLE_LEN..]);
    let mut gss_then_ssl = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
    gss_then_ssl.extend_from_slice(&libpq);
    write(&pg, "gssencrequest-then-psql", &gss_then_ssl);
    write(&pg, "psql-sslmode-disable", &psql_first_flight("disable"));
    write(
        &pg,
        "direct-tls",
        &client_hello("db.localhost", &[b"postgresql"], false),
    );
    // CancelRequest: length 16, code 80877102, process id, secret key.
    let cancel = [
        0, 0, 0, 16, 4, 0xd2, 0x16, 0x2e, 0, 0, 0x30, 0x39, 1, 2, 3, 4,
    ];
    write(&pg, "cancel-request", &cancel);
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// What `openssl s_client` sends first, up to its whole ClientHello. With
/// `postgres` it is asked for STARTTLS: its SSLRequest is answered `S` and kept too.
fn openssl_first_flight(args: &[&str], postgres: bool) -> Vec<u8> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let _client = ChildGuard::spawn(
        Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    if postgres {
        got.resize(PG_PREAMBLE_LEN, 0);
        conn.read_exact(&mut got).unwrap();
        conn.write_all(b"S").unwrap();
    }
    let start = got.len();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 4096];
    loop {
        match peek_client_hello(&got[start..]) {
            Peek::NeedMore => {}
            Peek::Hello { .. } => return got,
            other => panic!("openssl {args:?} sent {other:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "openssl {args:?} sent no whole hello"
        );
        let n = conn.read(&mut chunk).unwrap();
        assert!(n > 0, "openssl {args:?} closed before its hello was whole");
        got.extend_from_slice(&chunk[..n]);
    }
}

/// What psql (libpq) sends first with this `sslmode`: a StartupMessage (`disable`), or
/// an SSLRequest, answered `S`, then its ClientHello (`require`).
fn psql_first_flight(sslmode: &str) -> Vec<u8> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let conninfo = format!(
        "host=127.0.0.1 port={port} user=app dbname=app sslmode={sslmode} gssencmode=disable connect_timeout=10"
    );
    let _client = ChildGuard::spawn(
        Command::new("psql")
            .args([conninfo.as_str(), "-c", "select 1"])
            .env("PGPASSWORD", "x")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).unwrap();
    let mut got = len.to_vec();
    got.resize(u32::from_be_bytes(len) as usize, 0);
    conn.read_exact(&mut got[4..]).unwrap();
    if sslmode == "disable" {
        return got;
    }
    assert_eq!(got.len(), PG_PREAMBLE_LEN, "psql sent no SSLRequest");
    conn.write_all(b"S").unwrap();
    let mut chunk = [0u8; 4096];
    loop {
        match peek_client_hello(&got[PG_PREAMBLE_LEN..]) {
            Peek::NeedMore => {}
            Peek::Hello { .. } => return got,
            other => panic!("psql sent {other:?}"),
        }
        let n = conn.read(&mut chunk).unwrap();
        assert!(n > 0, "psql closed before its hello was whole");
        got.extend_from_slice(&chunk[..n]);
    }
}
