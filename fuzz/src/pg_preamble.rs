//! What a PostgreSQL client sends first on a `postgres` listener
//! (`mergen_dataplane::sni::postgres_preamble`): SSLRequest, GSSENCRequest, a
//! plaintext StartupMessage or CancelRequest, or a ClientHello (direct TLS).
//!
//! Beyond "no panic", each input checks the answer against a reference written from
//! the protocol's own numbers (an Int32 length of 8, then the request code 80877103
//! or 80877104; a StartupMessage's length up to 10,000, then protocol major 3), that a decision stands as more bytes arrive, that only the first 8
//! bytes matter, that direct TLS is never taken for a request, and that what follows
//! a request reads without panicking as the engine will read it next.

use mergen_dataplane::sni::{peek_client_hello, postgres_preamble, PgPreamble, PG_PREAMBLE_LEN};

const SSL_REQUEST_CODE: u32 = 80_877_103;
const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// The server's bound on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
const MAX_STARTUP_PACKET_LENGTH: u32 = 10_000;

pub fn check(data: &[u8]) {
    let answer = postgres_preamble(data);
    assert_eq!(answer, reference(data), "answer for {:?}", head(data));
    for cut in 0..data.len().min(PG_PREAMBLE_LEN + 2) {
        let early = postgres_preamble(&data[..cut]);
        if early != PgPreamble::NeedMore {
            assert_eq!(early, answer, "the first {cut} bytes decided otherwise");
        }
    }
    if data.len() > PG_PREAMBLE_LEN {
        assert_eq!(
            postgres_preamble(head(data)),
            answer,
            "bytes after 8 mattered"
        );
    }
    if data.first() == Some(&0x16) {
        assert_eq!(answer, PgPreamble::Other, "direct TLS taken for a request");
    }
    if matches!(answer, PgPreamble::SslRequest | PgPreamble::GssEncRequest) {
        // The engine drops the request and reads on: a ClientHello or another request.
        let rest = &data[PG_PREAMBLE_LEN..];
        let _ = postgres_preamble(rest);
        let _ = peek_client_hello(rest);
    }
}

fn head(data: &[u8]) -> &[u8] {
    &data[..data.len().min(8)]
}

fn request(code: u32) -> [u8; 8] {
    let mut out = [0; 8];
    out[..4].copy_from_slice(&8u32.to_be_bytes());
    out[4..].copy_from_slice(&code.to_be_bytes());
    out
}

/// A protocol 3 StartupMessage: an Int32 length the server accepts (the 8 bytes read
/// so far up to its bound), then the version's major number 3, any minor.
fn is_startup(head: &[u8]) -> bool {
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let major = u16::from_be_bytes([head[4], head[5]]);
    (8..=MAX_STARTUP_PACKET_LENGTH).contains(&len) && major == 3
}

fn reference(data: &[u8]) -> PgPreamble {
    let (ssl, gss) = (request(SSL_REQUEST_CODE), request(GSSENC_REQUEST_CODE));
    let head = head(data);
    match head.len() {
        8 if head == ssl => PgPreamble::SslRequest,
        8 if head == gss => PgPreamble::GssEncRequest,
        8 if is_startup(head) => PgPreamble::Startup,
        8 => PgPreamble::Other,
        _ if ssl.starts_with(head) || gss.starts_with(head) => PgPreamble::NeedMore,
        // Any plausible length starts with a zero byte: it may become a StartupMessage.
        _ if head.first() == Some(&0) => PgPreamble::NeedMore,
        _ => PgPreamble::Other,
    }
}
