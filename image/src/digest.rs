//! sha256 digests (ring, already the workspace's crypto): checking files, and a
//! reader that hashes what passes through it.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use ring::digest::{Context, SHA256};

use crate::error::{Error, IoContext, Result};

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    let mut c = Context::new(&SHA256);
    c.update(bytes);
    format_digest(c)
}

fn format_digest(c: Context) -> String {
    let d = c.finish();
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in d.as_ref() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The hex part of a `sha256:` digest, checked to be 64 lowercase hex digits (it names
/// files, so nothing else may pass).
pub fn hex_of(digest: &str) -> Result<&str> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| {
        Error::Invalid(format!(
            "unsupported digest {digest:?} (only sha256 is read)"
        ))
    })?;
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(Error::Invalid(format!("malformed digest {digest:?}")));
    }
    Ok(hex)
}

/// Passes bytes through while hashing them.
pub struct HashingReader<R> {
    inner: R,
    ctx: Context,
    pub bytes: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            ctx: Context::new(&SHA256),
            bytes: 0,
        }
    }

    /// Reads what is left (a tar stream's padding, say) and returns the digest.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((format_digest(self.ctx), self.bytes))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.ctx.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Checks that the stream `what` hashes to `expected` (and has `size` bytes when given).
pub fn verify(what: &str, r: impl Read, expected: &str, size: Option<u64>) -> Result<()> {
    let (actual, n) = HashingReader::new(r)
        .finish()
        .ctx(|| format!("reading {what}"))?;
    if actual != expected {
        return Err(Error::Digest {
            what: what.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    if let Some(size) = size.filter(|s| *s != n) {
        return Err(Error::Digest {
            what: what.to_string(),
            expected: format!("{expected} ({size} bytes)"),
            actual: format!("{actual} ({n} bytes)"),
        });
    }
    Ok(())
}

pub fn verify_file(path: &Path, expected: &str, size: Option<u64>) -> Result<()> {
    let f = File::open(path).ctx(|| format!("opening {}", path.display()))?;
    verify(&path.display().to_string(), f, expected, size)
}
