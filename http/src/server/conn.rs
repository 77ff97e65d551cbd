//! One connection as the event loop sees it: its socket, the bytes read but not yet
//! parsed, the bytes queued for writing, and where it is in its life.
//!
//! LIFECYCLE: accepted → `Reading` (idle until a first byte arrives) → a whole request
//! → `Handling` (a worker has it; the loop reads nothing more) → `Writing` the answer →
//! back to `Reading` (keep-alive, idle again) or → `Lingering` (write side shut,
//! input discarded until the peer closes, bounded in bytes and time) → closed.
//! A protocol error or a timeout in `Reading` goes straight to `Writing` with close.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr};
use std::time::Instant;

use mio::event::Source;
use mio::{Interest, Registry, Token};

use crate::request::RequestReader;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Waiting for, or reading, a request.
    Reading,
    /// The request is with a worker.
    Handling,
    /// Writing an answer; then the next request, or linger and close.
    Writing { keep_alive: bool },
    /// Write side shut after the last answer; discarding input until the peer closes.
    Lingering { drained: usize },
}

pub(super) enum Stream {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
}

impl Stream {
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    pub fn shutdown_write(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let interest = Interest::READABLE | Interest::WRITABLE;
        match self {
            Stream::Tcp(s) => s.register(registry, token, interest),
            Stream::Unix(s) => s.register(registry, token, interest),
        }
    }

    pub fn deregister(&mut self, registry: &Registry) {
        let _ = match self {
            Stream::Tcp(s) => s.deregister(registry),
            Stream::Unix(s) => s.deregister(registry),
        };
    }
}

/// Bytes waiting to be written, as a few buffers (an answer's head and its body) so a
/// large body is never copied to be framed.
#[derive(Default)]
pub(super) struct Outgoing {
    parts: VecDeque<Vec<u8>>,
    /// How much of the first part is written.
    pos: usize,
}

impl Outgoing {
    pub fn push(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.parts.push_back(bytes);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Write until done (`Ok(true)`) or the socket is full (`Ok(false)`).
    pub fn flush(&mut self, stream: &mut Stream) -> io::Result<bool> {
        while let Some(first) = self.parts.front() {
            let mut slices = [IoSlice::new(&[]); 4];
            slices[0] = IoSlice::new(&first[self.pos..]);
            let mut n_slices = 1;
            for (slot, part) in slices[1..].iter_mut().zip(self.parts.iter().skip(1)) {
                *slot = IoSlice::new(part);
                n_slices += 1;
            }
            match stream.write_vectored(&slices[..n_slices]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(first) = self.parts.front() else {
                return;
            };
            let left = first.len() - self.pos;
            if n < left {
                self.pos += n;
                return;
            }
            n -= left;
            self.pos = 0;
            self.parts.pop_front();
        }
    }
}

/// What the per-address cap counts: an IPv4 address, or an IPv6 /64 (one host usually
/// holds a whole /64, so counting single IPv6 addresses would cap nothing).
pub(super) fn address_key(peer: SocketAddr) -> IpAddr {
    match peer.ip() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

pub(super) struct Conn {
    /// Unique for the life of the server; a slab key is reused.
    pub serial: u64,
    pub stream: Stream,
    /// The per-address cap's key; `None` for unix-socket clients, which the socket's
    /// file permissions already vouch for.
    pub address: Option<IpAddr>,
    pub phase: Phase,
    pub inbuf: Vec<u8>,
    pub reader: RequestReader,
    pub out: Outgoing,
    /// When the current wait began: the accept, the end of the last answer (idle), or
    /// the first byte of a request that followed one.
    pub since: Instant,
    /// Whether the socket may hold unread bytes: false from a read that came back
    /// empty until the next readable event (epoll is edge-triggered, so an event
    /// follows any byte that arrives later), which saves a read per request.
    pub readable: bool,
    /// Answers written in full.
    pub served: u64,
    /// The entry of this connection in the loop's timer set.
    pub deadline: Option<Instant>,
    /// The entry of this connection in the loop's idle set: some while it holds no
    /// byte of a request, so it may be closed to make room.
    pub idle: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_keys() {
        let key = |s: &str| address_key(s.parse().unwrap()).to_string();
        assert_eq!(key("127.0.0.2:9"), "127.0.0.2");
        assert_eq!(key("[::ffff:10.1.2.3]:9"), "10.1.2.3");
        assert_eq!(key("[2001:db8:1:2:3:4:5:6]:9"), "2001:db8:1:2::");
        assert_eq!(key("[2001:db8:1:2:ffff::1]:9"), "2001:db8:1:2::");
    }
}
