//! Kafka through the TLS listener with its real client, `kcat -L`, against a guest that
//! speaks just enough of the Kafka protocol (ApiVersions and Metadata) to answer it: no
//! broker is packaged for Debian, and what the forwarder must get right is the TLS and
//! the SNI librdkafka sends, not Kafka itself.

mod common;

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Stdio;
use std::time::Duration;

use common::*;

const API_METADATA: i16 = 3;
const API_VERSIONS: i16 = 18;
const TOPIC: &str = "mergen-through-the-forwarder";

/// Answer every connection on its own thread until the listener goes with the test.
/// `advertised` is the broker address Metadata names (the forwarder's, so that
/// librdkafka's follow-up connection goes the same way).
fn kafka_responder(listener: TcpListener, advertised: (String, u16)) {
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            let advertised = advertised.clone();
            std::thread::spawn(move || {
                let _ = serve(sock, &advertised);
            });
        }
    });
}

fn serve(mut sock: TcpStream, advertised: &(String, u16)) -> io::Result<()> {
    loop {
        let mut len = [0u8; 4];
        sock.read_exact(&mut len)?;
        let mut req = vec![0u8; i32::from_be_bytes(len).max(0) as usize];
        sock.read_exact(&mut req)?;
        if req.len() < 8 {
            return Ok(());
        }
        let api_key = i16::from_be_bytes([req[0], req[1]]);
        let version = i16::from_be_bytes([req[2], req[3]]);
        let correlation = &req[4..8];
        let body = match api_key {
            API_VERSIONS => api_versions(version),
            API_METADATA => metadata(advertised),
            _ => return Ok(()),
        };
        // Every response header here is v0: the correlation id (ApiVersions' always is).
        let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        out.extend_from_slice(correlation);
        out.extend_from_slice(&body);
        sock.write_all(&out)?;
    }
}

/// ApiVersions: we support ApiVersions 0-3 and Metadata 0.
fn api_versions(version: i16) -> Vec<u8> {
    let apis: [(i16, i16, i16); 2] = [(API_VERSIONS, 0, 3), (API_METADATA, 0, 0)];
    let mut b = 0i16.to_be_bytes().to_vec(); // error_code
    if version >= 3 {
        // Flexible: compact array (length + 1), a tagged-field count after each entry
        // and after the body.
        b.push(apis.len() as u8 + 1);
        for (key, min, max) in apis {
            for v in [key, min, max] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            b.push(0);
        }
        b.extend_from_slice(&0i32.to_be_bytes()); // throttle_time_ms
        b.push(0);
    } else {
        b.extend_from_slice(&(apis.len() as i32).to_be_bytes());
        for (key, min, max) in apis {
            for v in [key, min, max] {
                b.extend_from_slice(&v.to_be_bytes());
            }
        }
        if version >= 1 {
            b.extend_from_slice(&0i32.to_be_bytes()); // throttle_time_ms
        }
    }
    b
}

/// Metadata v0: one broker (node 1, at the forwarder) and one topic with one partition.
fn metadata((host, port): &(String, u16)) -> Vec<u8> {
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as i16).to_be_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    let mut b = Vec::new();
    b.extend_from_slice(&1i32.to_be_bytes()); // brokers
    b.extend_from_slice(&1i32.to_be_bytes()); // node_id
    string(&mut b, host);
    b.extend_from_slice(&i32::from(*port).to_be_bytes());
    b.extend_from_slice(&1i32.to_be_bytes()); // topics
    b.extend_from_slice(&0i16.to_be_bytes()); // error_code
    string(&mut b, TOPIC);
    b.extend_from_slice(&1i32.to_be_bytes()); // partitions
    b.extend_from_slice(&0i16.to_be_bytes()); // error_code
    b.extend_from_slice(&0i32.to_be_bytes()); // partition 0
    b.extend_from_slice(&1i32.to_be_bytes()); // leader: node 1
    for _ in 0..2 {
        // replicas, then isr: [1]
        b.extend_from_slice(&1i32.to_be_bytes());
        b.extend_from_slice(&1i32.to_be_bytes());
    }
    b
}

#[test]
fn kcat_lists_metadata_through_the_tls_listener() {
    require_root!();
    let ns = Ns::new();
    let guest = ns.listen(9092);
    let fwd = Forwarder::start(&[9092], &[]);
    let broker = ("app1.localhost".to_string(), fwd.ports[0]);
    kafka_responder(guest, broker.clone());
    write_app_vm(&fwd.config_root(), &ns, "app1");
    let hosts = HostsFile::new(&[("app1.localhost", "127.0.0.1")]);
    let kcat = || {
        run(hosts
            .command("kcat")
            .args(["-b", &format!("{}:{}", broker.0, broker.1)])
            .args(["-X", "security.protocol=ssl"])
            .args(["-X", "enable.ssl.certificate.verification=false"])
            .args(["-m", "10", "-L"])
            .stdin(Stdio::null()))
    };
    let listed = poll(Duration::from_secs(20), || {
        let out = kcat();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.success() && text.contains(TOPIC)).then_some(text)
    });
    let Some(text) = listed else {
        let out = kcat();
        panic!(
            "kcat -L through the forwarder failed: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            fwd.log()
        );
    };
    assert!(
        text.contains(&format!("broker 1 at app1.localhost:{}", broker.1)),
        "{text}"
    );
    assert!(text.contains("partition 0, leader 1"), "{text}");
    // Routed by the SNI librdkafka sent, over TLS.
    let unknown = format!(
        r#"mergen_forwarder_connections_total{{listener="127.0.0.1:{}",outcome="unknown_sni"}}"#,
        broker.1
    );
    assert_eq!(fwd.metric(&unknown), 0.0, "{}", fwd.metrics());
}
