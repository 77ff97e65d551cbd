//! Bulk transfer and half-close through the TLS path, against a Rust backend bound
//! inside a namespace.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;

const GIB: u64 = 1 << 30;
const CHUNK: usize = 64 * 1024;

/// Read `stream` to its end, checking it against `Pattern::new(seed)`; returns the count.
fn read_and_check(mut stream: impl Read, seed: u64) -> Result<u64, String> {
    let mut pattern = Pattern::new(seed);
    let mut got = vec![0u8; CHUNK];
    let mut want = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match stream.read(&mut got) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("read failed after {total} bytes: {e}")),
        };
        pattern.fill(&mut want[..n]);
        if got[..n] != want[..n] {
            return Err(format!("corrupt data near byte {total}"));
        }
        total += n as u64;
    }
}

/// Write `len` bytes of `Pattern::new(seed)` in word-aligned chunks.
fn write_pattern(mut stream: impl Write, seed: u64, len: u64) -> std::io::Result<()> {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        pattern.fill(&mut buf[..n]);
        stream.write_all(&buf[..n])?;
        left -= n as u64;
    }
    stream.flush()
}

/// A backend that reads the whole upload (checking it), then answers with `reply_len`
/// bytes and closes. It reports how many upload bytes it verified.
fn backend(
    listener: TcpListener,
    up_seed: u64,
    down_seed: u64,
    reply_len: u64,
) -> JoinHandle<Result<u64, String>> {
    std::thread::spawn(move || {
        let (sock, _) = listener.accept().map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let got = read_and_check(&sock, up_seed)?;
        write_pattern(&sock, down_seed, reply_len).map_err(|e| e.to_string())?;
        sock.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        Ok(got)
    })
}

fn setup(label: &str) -> (Ns, Forwarder, TcpListener) {
    let ns = Ns::new();
    let listener = ns.listen(443);
    // Written before the start, so the first connection cannot race the watcher.
    let fwd = Forwarder::start_with(&[443], &[], |root| write_app_vm(root, &ns, label));
    (ns, fwd, listener)
}

/// An upload of `up` bytes, a close of the write side (`close_notify` first when
/// `notify`), then a download of `down` bytes: both must arrive intact.
fn transfer(label: &str, up: u64, down: u64, notify: bool) {
    let (_ns, fwd, listener) = setup(label);
    let server = backend(listener, 11, 22, down);
    let host = format!("{label}.localhost");
    let mut client = tls_connect(&host, fwd.ports[0]);
    write_pattern(&mut client, 11, up).expect("uploading through the forwarder");
    if notify {
        client.conn.send_close_notify();
        while client.conn.wants_write() {
            client
                .conn
                .write_tls(&mut client.sock)
                .expect("flushing close_notify");
        }
    }
    client.sock.shutdown(Shutdown::Write).expect("half-closing");
    let got = read_and_check(&mut client, 22);
    let uploaded = server.join().expect("backend thread");
    assert_eq!(
        uploaded,
        Ok(up),
        "upload as seen by the backend\n{}",
        fwd.log()
    );
    assert_eq!(
        got,
        Ok(down),
        "download as seen by the client\n{}",
        fwd.log()
    );
}

#[test]
fn one_gib_each_way_arrives_intact() {
    require_root!();
    transfer("bulk", GIB, GIB, true);
}

#[test]
fn half_close_with_close_notify_still_gets_the_whole_response() {
    require_root!();
    transfer("halfclose", 1000, 3 << 20, true);
}

#[test]
fn half_close_with_bare_fin_still_gets_the_whole_response() {
    require_root!();
    transfer("finonly", 4096, 3 << 20, false);
}

#[test]
fn backend_closing_first_keeps_the_client_side_open() {
    require_root!();
    let (_ns, fwd, listener) = setup("srvfirst");
    // The backend speaks first and half-closes, then reads what the client sends.
    let server = std::thread::spawn(move || -> Result<Vec<u8>, String> {
        let (mut sock, _) = listener.accept().map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        sock.write_all(b"banner\n").map_err(|e| e.to_string())?;
        sock.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        sock.read_to_end(&mut got).map_err(|e| e.to_string())?;
        Ok(got)
    });
    let mut client = tls_connect("srvfirst.localhost", fwd.ports[0]);
    let mut banner = Vec::new();
    client
        .read_to_end(&mut banner)
        .expect("reading until the backend's close_notify");
    assert_eq!(banner, b"banner\n");
    client
        .write_all(b"still talking\n")
        .expect("writing after the server closed");
    client.conn.send_close_notify();
    client.flush().expect("flushing");
    while client.conn.wants_write() {
        client
            .conn
            .write_tls(&mut client.sock)
            .expect("flushing close_notify");
    }
    let got = server.join().expect("backend thread");
    assert_eq!(got.as_deref(), Ok(&b"still talking\n"[..]), "{}", fwd.log());
}

/// Write a ClientHello cut into two TLS records, sent a few bytes per TCP segment,
/// then finish the handshake normally: the peek must reassemble it.
#[test]
fn client_hello_split_over_records_and_segments_is_routed() {
    require_root!();
    let (_ns, fwd, listener) = setup("split");
    let server = backend(listener, 5, 6, 1000);
    let mut stream = tls_client_unconnected("split.localhost", fwd.ports[0]);
    let mut hello = Vec::new();
    stream
        .conn
        .write_tls(&mut hello)
        .expect("producing the ClientHello");
    assert_eq!(hello[0], 0x16, "a handshake record");
    let payload = &hello[5..];
    let (a, b) = payload.split_at(payload.len() / 2);
    let mut records = Vec::new();
    for part in [a, b] {
        records.extend_from_slice(&[0x16, hello[1], hello[2]]);
        records.extend_from_slice(&(part.len() as u16).to_be_bytes());
        records.extend_from_slice(part);
    }
    stream.sock.set_nodelay(true).expect("nodelay");
    for piece in records.chunks(7) {
        stream.sock.write_all(piece).expect("sending a piece");
        std::thread::sleep(Duration::from_millis(2));
    }
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .expect("finishing the handshake");
    }
    write_pattern(&mut stream, 5, 4096).expect("upload");
    stream.conn.send_close_notify();
    stream.flush().expect("flush");
    assert_eq!(read_and_check(&mut stream, 6), Ok(1000));
    assert_eq!(server.join().expect("backend"), Ok(4096), "{}", fwd.log());
}

#[test]
fn raw_listener_half_close_and_bulk() {
    require_root!();
    let ns = Ns::new();
    let listener = ns.listen(22);
    // Written before the start, whose first scan is synchronous: the raw listener has no
    // SNI to wait on, and a VM the watcher has not seen yet would refuse the connection.
    let fwd = Forwarder::start_with(&[22], &[], |root| {
        write_untagged_vm(root, &ns, "2025-01-01T00:00:00Z")
    });
    let server = backend(listener, 7, 8, 64 << 20);
    let mut client = poll(Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", fwd.ports[0])).ok()
    })
    .expect("connecting to the raw listener");
    client
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write_pattern(&mut client, 7, 32 << 20).expect("upload");
    client.shutdown(Shutdown::Write).expect("half-close");
    assert_eq!(
        read_and_check(&mut client, 8),
        Ok(64 << 20),
        "{}",
        fwd.log()
    );
    assert_eq!(server.join().expect("backend"), Ok(32 << 20));
}
