//! `Transfer-Encoding: chunked` decoding as a small sans-IO state machine: bytes in,
//! body bytes out, usable by the server (request bodies) and the client (answers).
//!
//! Strict where leniency lets two parsers disagree about where a message ends (request
//! smuggling): lines end in CRLF, a chunk size is hex digits only and a chunk's data is
//! followed by CRLF. Chunk extensions are skipped; trailer fields are parsed (so a
//! malformed one is an error) and dropped, as no user of ours reads them.

use crate::request::RequestError;

/// Longest chunk-size line (size and extensions) we accept.
const MAX_SIZE_LINE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Reading a chunk-size line.
    Size,
    /// Reading this many more bytes of chunk data.
    Data(usize),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last (zero) chunk: trailer fields up to an empty line.
    Trailers,
    Done,
}

/// Decodes one chunked body. Feed it with [`ChunkedDecoder::decode`] until it says done.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// The most body bytes it will produce.
    max_body: usize,
    /// The most bytes the trailer section may take.
    max_trailers: usize,
    produced: usize,
}

impl ChunkedDecoder {
    pub fn new(max_body: usize, max_trailers: usize) -> ChunkedDecoder {
        ChunkedDecoder {
            state: State::Size,
            max_body,
            max_trailers,
            produced: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decode what `input` holds, appending body bytes to `out`. Returns how many input
    /// bytes were consumed; whatever is left is an incomplete line (feed it again with
    /// more bytes after it) or, once done, bytes that follow the body.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, RequestError> {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self.state {
                State::Done => return Ok(pos),
                State::Size => {
                    let Some(line) = line(rest, MAX_SIZE_LINE)? else {
                        return Ok(pos);
                    };
                    let size = chunk_size(&rest[..line - 2])?;
                    if size > self.max_body - self.produced {
                        return Err(RequestError::BodyTooLarge {
                            limit: self.max_body,
                        });
                    }
                    pos += line;
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::Data(size)
                    };
                }
                State::Data(left) => {
                    if rest.is_empty() {
                        return Ok(pos);
                    }
                    let n = left.min(rest.len());
                    out.extend_from_slice(&rest[..n]);
                    self.produced += n;
                    pos += n;
                    self.state = if n == left {
                        State::DataEnd
                    } else {
                        State::Data(left - n)
                    };
                }
                State::DataEnd => match rest {
                    [] | [b'\r'] => return Ok(pos),
                    [b'\r', b'\n', ..] => {
                        pos += 2;
                        self.state = State::Size;
                    }
                    _ => return Err(malformed("chunk data not followed by CRLF")),
                },
                State::Trailers => {
                    let mut fields = [httparse::EMPTY_HEADER; 32];
                    // As for a head: nothing past the limit is looked at, so the answer
                    // does not depend on how the bytes arrived.
                    let rest = &rest[..rest.len().min(self.max_trailers.saturating_add(1))];
                    match httparse::parse_headers(rest, &mut fields) {
                        Ok(httparse::Status::Complete((n, _))) if n > self.max_trailers => {
                            return Err(RequestError::HeadTooLarge {
                                limit: self.max_trailers,
                            })
                        }
                        Ok(httparse::Status::Complete((n, _))) => {
                            pos += n;
                            self.state = State::Done;
                        }
                        Ok(httparse::Status::Partial) if rest.len() > self.max_trailers => {
                            return Err(RequestError::HeadTooLarge {
                                limit: self.max_trailers,
                            })
                        }
                        Ok(httparse::Status::Partial) => return Ok(pos),
                        Err(httparse::Error::TooManyHeaders) => {
                            return Err(RequestError::HeadTooLarge {
                                limit: self.max_trailers,
                            })
                        }
                        Err(e) => return Err(malformed(&format!("bad chunked trailer: {e}"))),
                    }
                }
            }
        }
    }
}

fn malformed(what: &str) -> RequestError {
    RequestError::Malformed(what.to_string())
}

/// The length of the CRLF-terminated line at the start of `buf`, CRLF included;
/// `None` if it has not all arrived.
fn line(buf: &[u8], max: usize) -> Result<Option<usize>, RequestError> {
    // A line ended past `max` is too long however it arrived, in one read or in many.
    let buf = &buf[..buf.len().min(max.saturating_add(1))];
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && buf[i - 1] == b'\r' => Ok(Some(i + 1)),
        Some(_) => Err(malformed("chunk-size line not ended by CRLF")),
        None if buf.len() > max => Err(malformed("chunk-size line too long")),
        None => Ok(None),
    }
}

/// `1*HEXDIG [ BWS ";" ext ]`; a size too large for usize saturates (and is then over
/// any body limit).
fn chunk_size(line: &[u8]) -> Result<usize, RequestError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(malformed("chunk size is not hexadecimal"));
    }
    let ext = &line[digits..];
    let ext_start = ext.iter().position(|&b| b != b' ' && b != b'\t');
    if let Some(i) = ext_start {
        if ext[i] != b';' {
            return Err(malformed("chunk size is not hexadecimal"));
        }
        if ext[i..].iter().any(|&b| b.is_ascii_control() && b != b'\t') {
            return Err(malformed("control character in a chunk extension"));
        }
    }
    let mut size: usize = 0;
    for &b in &line[..digits] {
        let d = (b as char).to_digit(16).unwrap_or(0) as usize;
        size = size.saturating_mul(16).saturating_add(d);
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode `input` fed in pieces of `step` bytes, as a socket might deliver it.
    fn decode_in_steps(
        input: &[u8],
        step: usize,
        max: usize,
    ) -> Result<(Vec<u8>, usize), RequestError> {
        let mut d = ChunkedDecoder::new(max, 1024);
        let mut out = Vec::new();
        let mut pending = Vec::new();
        let mut fed = 0;
        let mut consumed_total = 0;
        while !d.is_done() {
            if fed == input.len() {
                return Err(malformed("ran out of input"));
            }
            let n = step.min(input.len() - fed);
            pending.extend_from_slice(&input[fed..fed + n]);
            fed += n;
            let used = d.decode(&pending, &mut out)?;
            pending.drain(..used);
            consumed_total += used;
        }
        Ok((out, consumed_total))
    }

    #[test]
    fn valid_bodies_in_any_split() {
        let input = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, input.len()] {
            let (body, used) = decode_in_steps(input, step, 100).unwrap();
            assert_eq!(body, b"hello 0123456789", "step {step}");
            assert_eq!(&input[used..], b"NEXT", "step {step}");
        }
        // Upper-case hex, whitespace before an extension, an empty body.
        assert_eq!(
            decode_in_steps(
                b"1a \t;x\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n",
                4,
                100
            )
            .unwrap()
            .0,
            b"abcdefghijklmnopqrstuvwxyz"
        );
        assert_eq!(decode_in_steps(b"0\r\n\r\n", 1, 0).unwrap().0, b"");
    }

    #[test]
    fn trailers_are_parsed_and_dropped() {
        let input = b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nY: z\r\n\r\nrest";
        let (body, used) = decode_in_steps(input, 5, 100).unwrap();
        assert_eq!(body, b"abc");
        assert_eq!(&input[used..], b"rest");
        let bad = decode_in_steps(b"0\r\nno colon here\r\n\r\n", 3, 100);
        assert!(matches!(bad, Err(RequestError::Malformed(_))), "{bad:?}");
        let mut big = b"0\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 2000));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            decode_in_steps(&big, 100, 100),
            Err(RequestError::HeadTooLarge { limit: 1024 })
        );
    }

    #[test]
    fn malformed_framing_is_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"-1\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5 5\r\nhello\r\n0\r\n\r\n",
            b"5;a\x00b\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
        ] {
            let got = decode_in_steps(bad, 1, 100);
            assert!(
                matches!(got, Err(RequestError::Malformed(_))),
                "{bad:?}: {got:?}"
            );
        }
        let long: Vec<u8> = std::iter::repeat_n(b'0', MAX_SIZE_LINE + 1).collect();
        assert!(matches!(
            decode_in_steps(&long, 512, 100),
            Err(RequestError::Malformed(_))
        ));
    }

    #[test]
    fn oversize_is_refused_before_the_data_arrives() {
        // The limit is checked on the size line, and across chunks.
        let mut d = ChunkedDecoder::new(10, 1024);
        assert_eq!(
            d.decode(b"b\r\n", &mut Vec::new()),
            Err(RequestError::BodyTooLarge { limit: 10 })
        );
        assert_eq!(
            decode_in_steps(b"6\r\nabcdef\r\n5\r\nabcde\r\n0\r\n\r\n", 3, 10),
            Err(RequestError::BodyTooLarge { limit: 10 })
        );
        assert_eq!(
            decode_in_steps(b"ffffffffffffffffffffffffffff\r\n", 3, 10),
            Err(RequestError::BodyTooLarge { limit: 10 })
        );
        assert!(decode_in_steps(b"6\r\nabcdef\r\n4\r\nabcd\r\n0\r\n\r\n", 3, 10).is_ok());
    }
}
