//! mergen-http's request reader (`mergen_http::RequestReader`): every byte a client of
//! mergend's API or of the forwarder's admin listener sends goes through it.
//!
//! Beyond "no panic", each input checks, under the default limits and under tiny ones,
//! that:
//! * how the bytes are cut into reads changes nothing: fed whole, in pieces of varying
//!   size, or (short inputs) byte by byte, they give the same requests and the same
//!   error;
//! * what the reader keeps buffered while it waits is bounded by the limits, not by the
//!   input;
//! * `100 Continue` is asked for at most once per request, and only for a request that
//!   sent `Expect: 100-continue`;
//! * a request read is within the limits and, written out again with a Content-Length
//!   body, reads back the same;
//! * a refusal is one of the answers the server gives, with its own status.

use mergen_http::{Limits, Progress, Request, RequestError, RequestReader};
use mergen_testkit::XorShift;

const LIMITS: [Limits; 2] = [
    Limits {
        max_head: 16 * 1024,
        max_body: 1024 * 1024,
    },
    Limits {
        max_head: 96,
        max_body: 32,
    },
];
/// The longest chunk-size line the chunked decoder waits for.
const MAX_SIZE_LINE: usize = 4096;

pub fn check(data: &[u8]) {
    for limits in LIMITS {
        let whole = read(data, limits, &mut std::iter::repeat(data.len()));
        // Piece sizes from the input itself, so that a kept input replays exactly.
        let seed = data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = XorShift(seed | 1);
        let mut pieces = std::iter::from_fn(|| Some(1 + rng.below(97)));
        assert_eq!(read(data, limits, &mut pieces), whole, "fed in pieces");
        if data.len() <= 512 {
            assert_eq!(
                read(data, limits, &mut std::iter::repeat(1)),
                whole,
                "fed byte by byte"
            );
        }
        for request in &whole.requests {
            check_request(request, limits);
        }
        if let Err(e) = &whole.end {
            let want = match e {
                RequestError::HeadTooLarge { .. } => 431,
                RequestError::BodyTooLarge { .. } => 413,
                RequestError::UnsupportedCoding(_) => 501,
                RequestError::Malformed(_) => 400,
                RequestError::Timeout => panic!("a timeout from bytes alone"),
            };
            assert_eq!(e.status(), want, "{e}");
            assert_eq!(e.clone().into_response().status, want);
        }
    }
}

/// What a connection's bytes gave: the requests read, then how reading ended (`Ok`:
/// waiting for more).
#[derive(Debug, PartialEq)]
struct Read {
    requests: Vec<Request>,
    end: Result<(), RequestError>,
}

fn read(data: &[u8], limits: Limits, pieces: &mut dyn Iterator<Item = usize>) -> Read {
    let bound = limits.max_head.max(MAX_SIZE_LINE);
    let mut reader = RequestReader::new(limits);
    let mut buf = Vec::new();
    let mut requests = Vec::new();
    let mut continued = false;
    let mut fed = 0;
    while fed < data.len() {
        let n = pieces.next().unwrap_or(1).clamp(1, data.len() - fed);
        buf.extend_from_slice(&data[fed..fed + n]);
        fed += n;
        loop {
            match reader.advance(&mut buf) {
                Ok(Progress::Done(request)) => {
                    if continued {
                        assert!(
                            request.head.has_token("expect", "100-continue"),
                            "100 Continue asked for a request without Expect"
                        );
                    }
                    continued = false;
                    requests.push(request);
                }
                Ok(Progress::SendContinue) => {
                    assert!(!continued, "100 Continue asked for twice");
                    assert!(reader.head_read(), "100 Continue before the head");
                    continued = true;
                }
                Ok(Progress::NeedMore) => {
                    assert!(
                        buf.len() <= bound,
                        "{} bytes kept while waiting (limit {bound})",
                        buf.len()
                    );
                    break;
                }
                Err(e) => {
                    return Read {
                        requests,
                        end: Err(e),
                    }
                }
            }
        }
    }
    Read {
        requests,
        end: Ok(()),
    }
}

fn is_framing(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("transfer-encoding")
}

fn check_request(request: &Request, limits: Limits) {
    let head = &request.head;
    assert!(request.body.len() <= limits.max_body, "body over the limit");
    assert!(!head.method.is_empty(), "a request without a method");
    assert!(head.version <= 1, "HTTP/1.{}", head.version);

    // Written out again with a Content-Length body, it reads back the same.
    let mut out = format!("{} {}", head.method, head.path);
    // An empty path came from a target that starts with `?`.
    if !head.query.is_empty() || head.path.is_empty() {
        out.push('?');
        out.push_str(&head.query);
    }
    out.push_str(&format!(" HTTP/1.{}\r\n", head.version));
    for (name, value) in head.headers.iter().filter(|(n, _)| !is_framing(n)) {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    let framed = head.headers.iter().any(|(n, _)| is_framing(n));
    if framed {
        out.push_str(&format!("Content-Length: {}\r\n", request.body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&request.body);
    let roomy = Limits {
        max_head: usize::MAX / 2,
        max_body: limits.max_body,
    };
    let again = read(&bytes, roomy, &mut std::iter::repeat(bytes.len()));
    assert_eq!(
        again.end,
        Ok(()),
        "written out again: {:?}",
        String::from_utf8_lossy(&bytes)
    );
    let [back] = &again.requests[..] else {
        panic!(
            "written out again, it reads as {} requests",
            again.requests.len()
        );
    };
    let unframed = |r: &Request| {
        let h = &r.head;
        let fields: Vec<_> = h
            .headers
            .iter()
            .filter(|(n, _)| !is_framing(n))
            .cloned()
            .collect();
        (
            h.method.clone(),
            h.path.clone(),
            h.query.clone(),
            h.version,
            fields,
            r.body.clone(),
        )
    };
    assert_eq!(
        unframed(back),
        unframed(request),
        "changed when written out again"
    );
}
