//! The forwarder's ClientHello peek (`mergen_dataplane::sni::peek_client_hello`) on
//! whatever a client may send first.
//!
//! Beyond "no panic", each input checks that:
//! * a decision stands: every prefix answers `NeedMore` or the input's own answer, and
//!   bytes after a decided input change nothing (the engine peeks again after every
//!   read and acts on the first decision). The one exception is by design: a hello
//!   still incomplete after `MAX_CLIENT_HELLO` bytes of records is `TooLarge`, however
//!   it would have ended;
//! * a server name is non-empty printable ASCII, borrowed from the input when the
//!   hello is one record (copied only when it spans records), and its routing label is
//!   what a reference split of the lowercased name gives;
//! * the same handshake message cut into records of any size gives the same answer;
//! * whatever rustls' own `Acceptor` accepts, the peek accepts too, with the same
//!   server name (up to case and a trailing dot): it never refuses a hello the handshake would take,
//!   unless the hello is over its documented size limit.

use std::borrow::Cow;

use mergen_dataplane::resolver::sni_label;
use mergen_dataplane::sni::{peek_client_hello, Peek, MAX_CLIENT_HELLO};

const RECORD_HEADER: usize = 5;
/// A record that follows a decided hello: whatever it is, the answer stays.
const TRAILER: [u8; 7] = [0x15, 3, 3, 0, 2, 2, 40];

pub fn check(data: &[u8]) {
    let answer = peek_client_hello(data);
    for cut in cut_points(data) {
        check_prefix(&data[..cut], data, &answer);
    }
    if decided(data, &answer) {
        let mut longer = data.to_vec();
        longer.extend_from_slice(&TRAILER);
        assert_eq!(
            peek_client_hello(&longer),
            answer,
            "a record after the decided input changed the answer"
        );
    }
    if let Peek::Hello { sni: Some(name) } = &answer {
        check_name(data, name, matches!(name, Cow::Owned(_)));
    }
    if let Some(message) = one_record_message(data) {
        check_refragmented(data, message, &answer);
    }
    if let Some(rustls_name) = accepted_by_rustls(data) {
        match &answer {
            Peek::Hello { sni } => {
                if let Some(want) = rustls_name {
                    let got = sni.as_deref().unwrap_or_else(|| {
                        panic!("rustls read the server name {want:?}, the peek none")
                    });
                    // rustls drops a trailing dot; so does routing (`sni_label`).
                    let bare = |s: &str| s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
                    assert_eq!(
                        bare(got),
                        bare(&want),
                        "rustls read the server name {want:?}, the peek {got:?}"
                    );
                }
            }
            Peek::TooLarge => {}
            other => panic!("rustls accepts a ClientHello the peek answers {other:?}"),
        }
    }
}

/// Whether `answer` is final for any bytes that follow `data`.
fn decided(data: &[u8], answer: &Peek<'_>) -> bool {
    match answer {
        Peek::NeedMore => false,
        // Refused for its length in bytes of records, not for the hello's own length.
        Peek::TooLarge => data.len() < MAX_CLIENT_HELLO,
        _ => true,
    }
}

fn check_prefix(prefix: &[u8], whole: &[u8], answer: &Peek<'_>) {
    let early = peek_client_hello(prefix);
    if decided(prefix, &early) {
        assert_eq!(
            &early,
            answer,
            "the first {} of {} bytes decided otherwise",
            prefix.len(),
            whole.len()
        );
    }
}

/// Where a client's bytes may be split between reads: the first few bytes, around
/// every record header, and a few points in between.
fn cut_points(data: &[u8]) -> Vec<usize> {
    let len = data.len();
    let mut cuts: Vec<usize> = (0..len.min(12)).collect();
    cuts.extend([len / 3, len / 2, len.saturating_sub(1)]);
    let mut pos = 0;
    while pos + RECORD_HEADER <= len && cuts.len() < 96 {
        cuts.extend([pos, pos + 3, pos + 4, pos + 5, pos + 6, pos + 9]);
        pos += RECORD_HEADER + usize::from(u16::from_be_bytes([data[pos + 3], data[pos + 4]]));
    }
    cuts.retain(|&c| c < len);
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

fn check_name(data: &[u8], name: &str, copied: bool) {
    assert!(
        !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()),
        "server name {name:?} is not printable ASCII"
    );
    if copied {
        assert!(
            one_record_message(data).is_none(),
            "a one-record hello's server name was copied"
        );
    } else {
        let within = data.as_ptr_range();
        let bytes = name.as_bytes().as_ptr_range();
        assert!(
            within.start <= bytes.start && bytes.end <= within.end,
            "a borrowed server name lies outside the input"
        );
    }
    // The routing label, against a reference split of the lowercased name.
    let lower = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    for (prefix, suffix) in [("", "localhost"), ("vm", "example.com")] {
        let domain = if prefix.is_empty() {
            format!(".{suffix}")
        } else {
            format!(".{prefix}.{suffix}")
        };
        let want = lower
            .strip_suffix(&domain)
            .filter(|label| !label.is_empty() && !label.contains('.'));
        assert_eq!(
            sni_label(name, prefix, suffix).as_deref(),
            want,
            "label of {name:?} under {domain:?}"
        );
    }
}

/// The handshake message of an input whose first record holds it whole.
fn one_record_message(data: &[u8]) -> Option<&[u8]> {
    if data.len() < RECORD_HEADER + 4 || data[0] != 0x16 || data[1] != 3 {
        return None;
    }
    let record_len = usize::from(u16::from_be_bytes([data[3], data[4]]));
    let body_len = usize::from(data[6]) << 16 | usize::from(data[7]) << 8 | usize::from(data[8]);
    let message_len = 4 + body_len;
    let payload = data.get(RECORD_HEADER..RECORD_HEADER + record_len)?;
    payload.get(..message_len)
}

/// The same message in records of other sizes must read the same.
fn check_refragmented(data: &[u8], message: &[u8], answer: &Peek<'_>) {
    let spread = 1 + data.iter().map(|&b| usize::from(b)).sum::<usize>() % 1021;
    let mut sizes = vec![2, 3, 4, 5, 13, 255, spread];
    if message.len() <= 4096 {
        sizes.push(1);
    }
    for size in sizes {
        let cut = refragment(message, data[2], size);
        assert_eq!(
            &peek_client_hello(&cut),
            answer,
            "the message in records of {size} bytes reads otherwise"
        );
        if size == spread {
            for point in cut_points(&cut) {
                check_prefix(&cut[..point], &cut, answer);
            }
        }
    }
}

fn refragment(message: &[u8], minor: u8, size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + (message.len() / size + 1) * RECORD_HEADER);
    for chunk in message.chunks(size) {
        out.extend_from_slice(&[0x16, 3, minor]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// `Some(server name)` when rustls' `Acceptor` accepts `data` as the start of a
/// handshake; `None` when it refuses it or wants more.
fn accepted_by_rustls(data: &[u8]) -> Option<Option<String>> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = data;
    while !rest.is_empty() {
        acceptor.read_tls(&mut rest).ok()?;
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                return Some(accepted.client_hello().server_name().map(str::to_owned))
            }
            Ok(None) => continue,
            Err(_) => return None,
        }
    }
    None
}
