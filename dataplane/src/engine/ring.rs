//! The only module of the forwarder with `unsafe`: a safe face on one io_uring.
//!
//! The kernel reads and writes our memory after `submit` returns, so every pointer
//! handed to it must stay valid until the matching completion is reaped. This module
//! enforces that by owning all such memory itself:
//!
//! * I/O buffers live here (`Buf`, boxed so they never move). A buffer with an
//!   operation in flight is marked busy: it cannot be borrowed, and releasing it only
//!   schedules the free, which happens when the completion is reaped here.
//! * Connect arguments (the socket address and the link timeout) live in a boxed slot
//!   that is freed only after both of their completions (connect and link timeout).
//!
//! File descriptors are not memory: the kernel takes its own reference to the file
//! at submission, so an early close is harmless to memory safety; the engine still
//! keeps each fd open until its operations are reaped so a number is never reused
//! under a queued entry.

use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// What a completion means to the engine: the engine's own token plus the outcome.
pub struct Completion {
    pub token: u32,
    /// The kernel's result: bytes moved, 0, or a negative errno.
    pub result: i32,
    /// For multishot accepts: more completions will follow for this entry.
    pub more: bool,
    /// For accepts: the new connection, owned from here on.
    pub accepted: Option<OwnedFd>,
}

/// Index of a buffer owned by the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufId(u32);

/// A fixed-size byte buffer holding the window `start..end` of pending data.
struct Buf {
    mem: Box<[u8]>,
    start: usize,
    end: usize,
    busy: bool,
    release_when_idle: bool,
}

struct ConnectArgs {
    addr: libc::sockaddr_in,
    timeout: types::Timespec,
    /// Completions still to come: the connect and its link timeout.
    pending: u8,
}

// user_data layout: token in the low 32 bits, kind in bits 32..40, the index of the
// buffer or connect slot (plus one, zero meaning none) in bits 40..64.
const KIND_PLAIN: u64 = 0;
const KIND_RECV: u64 = 1;
const KIND_SEND: u64 = 2;
const KIND_ACCEPT: u64 = 3;
const KIND_CONNECT: u64 = 4;
const KIND_LINK_TIMEOUT: u64 = 5;

fn user_data(token: u32, kind: u64, slot: Option<u32>) -> u64 {
    let slot = slot.map_or(0, |s| u64::from(s) + 1);
    u64::from(token) | (kind << 32) | (slot << 40)
}

fn decode(ud: u64) -> (u32, u64, Option<u32>) {
    let slot = ud >> 40;
    (
        ud as u32,
        (ud >> 32) & 0xff,
        slot.checked_sub(1).map(|s| s as u32),
    )
}

pub struct Ring {
    ring: IoUring,
    bufs: Vec<Option<Buf>>,
    free_bufs: Vec<u32>,
    /// Released buffers kept for reuse, by size (the engine uses few sizes).
    spare: Vec<Box<[u8]>>,
    connects: Vec<Option<Box<ConnectArgs>>>,
    free_connects: Vec<u32>,
}

impl Ring {
    pub fn new(entries: u32) -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(entries)?;
        Ok(Ring {
            ring,
            bufs: Vec::new(),
            free_bufs: Vec::new(),
            spare: Vec::new(),
            connects: Vec::new(),
            free_connects: Vec::new(),
        })
    }

    // ---- buffers -------------------------------------------------------------------

    pub fn alloc_buf(&mut self, len: usize) -> BufId {
        let mem = match self.spare.iter().position(|m| m.len() == len) {
            Some(i) => self.spare.swap_remove(i),
            None => vec![0u8; len].into_boxed_slice(),
        };
        let buf = Buf {
            mem,
            start: 0,
            end: 0,
            busy: false,
            release_when_idle: false,
        };
        match self.free_bufs.pop() {
            Some(i) => {
                self.bufs[i as usize] = Some(buf);
                BufId(i)
            }
            None => {
                self.bufs.push(Some(buf));
                BufId((self.bufs.len() - 1) as u32)
            }
        }
    }

    /// Give a buffer back; if an operation still uses it, the free waits for its completion.
    pub fn release_buf(&mut self, id: BufId) {
        let Some(buf) = self.bufs.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return;
        };
        if buf.busy {
            buf.release_when_idle = true;
        } else {
            self.drop_buf(id.0);
        }
    }

    fn drop_buf(&mut self, i: u32) {
        if let Some(buf) = self.bufs[i as usize].take() {
            // Keep a bounded number of buffers around for the next connections.
            if self.spare.len() < 256 {
                self.spare.push(buf.mem);
            }
            self.free_bufs.push(i);
        }
    }

    fn idle_buf(&self, id: BufId) -> Option<&Buf> {
        self.bufs
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .filter(|b| !b.busy)
    }

    fn idle_buf_mut(&mut self, id: BufId) -> Option<&mut Buf> {
        self.bufs
            .get_mut(id.0 as usize)
            .and_then(Option::as_mut)
            .filter(|b| !b.busy)
    }

    /// The pending bytes of an idle buffer (empty while the kernel uses it).
    pub fn data(&self, id: BufId) -> &[u8] {
        self.idle_buf(id).map_or(&[], |b| &b.mem[b.start..b.end])
    }

    pub fn is_empty(&self, id: BufId) -> bool {
        self.bufs
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .is_none_or(|b| b.start == b.end)
    }

    pub fn is_full(&self, id: BufId) -> bool {
        self.bufs
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .is_none_or(|b| b.end == b.mem.len())
    }

    /// Mark `n` pending bytes as used up.
    pub fn consume(&mut self, id: BufId, n: usize) {
        if let Some(b) = self.idle_buf_mut(id) {
            b.start = (b.start + n).min(b.end);
            if b.start == b.end {
                b.start = 0;
                b.end = 0;
            }
        }
    }

    /// Let `fill` write into the free tail of an idle buffer; it returns how many bytes it wrote.
    pub fn fill<E>(
        &mut self,
        id: BufId,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        let Some(b) = self.idle_buf_mut(id) else {
            return Ok(0);
        };
        let n = fill(&mut b.mem[b.end..])?;
        b.end = (b.end + n).min(b.mem.len());
        Ok(n)
    }

    /// Let `drain` read the pending bytes of an idle buffer; it returns how many it used.
    pub fn drain<E>(
        &mut self,
        id: BufId,
        drain: impl FnOnce(&[u8]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        let Some(b) = self.idle_buf(id) else {
            return Ok(0);
        };
        let n = drain(&b.mem[b.start..b.end])?;
        self.consume(id, n);
        Ok(n)
    }

    // ---- operations ----------------------------------------------------------------

    fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: every caller builds `entry` only from memory owned by this ring
            // (a busy `Buf` or a live `ConnectArgs` box) or from plain values, and that
            // memory is kept until the completion of the entry is reaped in `complete`.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return;
            }
            // The queue is full: hand what is queued to the kernel and retry.
            if let Err(e) = self.ring.submit() {
                log::warn!("io_uring submit failed: {e}");
            }
        }
    }

    /// Multishot accept on a listening socket.
    pub fn accept_multi(&mut self, listener: BorrowedFd<'_>, token: u32) {
        let entry = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(token, KIND_ACCEPT, None));
        self.push(&entry);
    }

    /// Receive into the free tail of an idle buffer. Returns false if the buffer is busy or full.
    pub fn recv(&mut self, fd: BorrowedFd<'_>, id: BufId, token: u32) -> bool {
        let Some(b) = self.idle_buf_mut(id) else {
            return false;
        };
        if b.end == b.mem.len() {
            return false;
        }
        b.busy = true;
        let tail = &mut b.mem[b.end..];
        let entry = opcode::Recv::new(
            types::Fd(fd.as_raw_fd()),
            tail.as_mut_ptr(),
            tail.len() as u32,
        )
        .build()
        .user_data(user_data(token, KIND_RECV, Some(id.0)));
        self.push(&entry);
        true
    }

    /// Send the pending bytes of an idle buffer. Returns false if it is busy or empty.
    pub fn send(&mut self, fd: BorrowedFd<'_>, id: BufId, token: u32) -> bool {
        let Some(b) = self.idle_buf_mut(id) else {
            return false;
        };
        if b.start == b.end {
            return false;
        }
        b.busy = true;
        let pending = &b.mem[b.start..b.end];
        let entry = opcode::Send::new(
            types::Fd(fd.as_raw_fd()),
            pending.as_ptr(),
            pending.len() as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(user_data(token, KIND_SEND, Some(id.0)));
        self.push(&entry);
        true
    }

    /// Connect `fd` to `addr`; the kernel cancels the connect after `timeout`
    /// (its completion then carries `-ECANCELED`).
    pub fn connect(
        &mut self,
        fd: BorrowedFd<'_>,
        addr: SocketAddrV4,
        timeout: Duration,
        token: u32,
    ) {
        let args = Box::new(ConnectArgs {
            addr: libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: addr.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(addr.ip().octets()),
                },
                sin_zero: [0; 8],
            },
            timeout: types::Timespec::from(timeout),
            pending: 2,
        });
        let slot = match self.free_connects.pop() {
            Some(i) => {
                self.connects[i as usize] = Some(args);
                i
            }
            None => {
                self.connects.push(Some(args));
                (self.connects.len() - 1) as u32
            }
        };
        let Some(args) = self.connects[slot as usize].as_deref() else {
            return;
        };
        let connect = opcode::Connect::new(
            types::Fd(fd.as_raw_fd()),
            std::ptr::from_ref(&args.addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
        .build()
        .flags(squeue::Flags::IO_LINK)
        .user_data(user_data(token, KIND_CONNECT, Some(slot)));
        let timeout = opcode::LinkTimeout::new(&args.timeout)
            .build()
            .user_data(user_data(token, KIND_LINK_TIMEOUT, Some(slot)));
        self.push(&connect);
        self.push(&timeout);
    }

    /// `shutdown(2)` through the ring.
    pub fn shutdown(&mut self, fd: BorrowedFd<'_>, how: i32, token: u32) {
        let entry = opcode::Shutdown::new(types::Fd(fd.as_raw_fd()), how)
            .build()
            .user_data(user_data(token, KIND_PLAIN, None));
        self.push(&entry);
    }

    /// Cancel every operation in flight on `fd`; its completions still arrive (with `-ECANCELED`).
    pub fn cancel_fd(&mut self, fd: RawFd, token: u32) {
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(user_data(token, KIND_PLAIN, None));
        self.push(&entry);
    }

    /// Submit queued entries, wait for at least one completion or `timeout`, and append
    /// every reaped completion to `out`.
    pub fn run_once(&mut self, timeout: Duration, out: &mut Vec<Completion>) {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => log::warn!("io_uring wait failed: {e}"),
        }
        let mut reaped: Vec<cqueue::Entry> = Vec::new();
        loop {
            reaped.clear();
            reaped.extend(self.ring.completion());
            if reaped.is_empty() {
                return;
            }
            for cqe in &reaped {
                out.extend(self.complete(cqe));
            }
        }
    }

    /// Account for one completion: free what the kernel no longer uses.
    fn complete(&mut self, cqe: &cqueue::Entry) -> Option<Completion> {
        let (token, kind, slot) = decode(cqe.user_data());
        let result = cqe.result();
        let mut accepted = None;
        match (kind, slot) {
            (KIND_RECV | KIND_SEND, Some(i)) => {
                let buf = self.bufs.get_mut(i as usize).and_then(Option::as_mut)?;
                buf.busy = false;
                if result > 0 {
                    let n = result as usize;
                    if kind == KIND_RECV {
                        buf.end = (buf.end + n).min(buf.mem.len());
                    } else {
                        buf.start = (buf.start + n).min(buf.end);
                        if buf.start == buf.end {
                            buf.start = 0;
                            buf.end = 0;
                        }
                    }
                }
                if buf.release_when_idle {
                    self.drop_buf(i);
                }
            }
            (KIND_CONNECT | KIND_LINK_TIMEOUT, Some(i)) => {
                let done = match self.connects.get_mut(i as usize).and_then(Option::as_mut) {
                    Some(args) => {
                        args.pending -= 1;
                        args.pending == 0
                    }
                    None => false,
                };
                if done {
                    self.connects[i as usize] = None;
                    self.free_connects.push(i);
                }
                if kind == KIND_LINK_TIMEOUT {
                    return None;
                }
            }
            (KIND_ACCEPT, _) if result >= 0 => {
                // SAFETY: a successful accept completion carries a new descriptor that
                // the kernel just installed for us and that nothing else owns.
                accepted = Some(unsafe { OwnedFd::from_raw_fd(result) });
            }
            _ => {}
        }
        Some(Completion {
            token,
            result,
            more: cqueue::more(cqe.flags()),
            accepted,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn wait(ring: &mut Ring) -> Vec<Completion> {
        let mut out = Vec::new();
        for _ in 0..50 {
            ring.run_once(Duration::from_millis(100), &mut out);
            if !out.is_empty() {
                break;
            }
        }
        out
    }

    #[test]
    fn send_and_recv_move_the_buffer_window() {
        let mut ring = Ring::new(8).expect("io_uring");
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        let buf = ring.alloc_buf(16);
        ring.fill(buf, |tail| {
            tail[..5].copy_from_slice(b"hello");
            Ok::<_, ()>(5)
        })
        .expect("fill");
        assert!(ring.send(a.as_fd(), buf, 7));
        assert!(
            ring.data(buf).is_empty(),
            "a busy buffer must not be readable"
        );
        let done = wait(&mut ring);
        assert_eq!((done[0].token, done[0].result), (7, 5));
        assert!(ring.is_empty(buf));
        let mut got = [0u8; 5];
        b.read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hello");

        b.write_all(b"world!").expect("write");
        assert!(ring.recv(a.as_fd(), buf, 8));
        let done = wait(&mut ring);
        assert_eq!((done[0].token, done[0].result), (8, 6));
        assert_eq!(ring.data(buf), b"world!");
        ring.consume(buf, 5);
        assert_eq!(ring.data(buf), b"!");
    }

    #[test]
    fn a_buffer_released_in_flight_is_freed_only_after_its_completion() {
        let mut ring = Ring::new(8).expect("io_uring");
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        let busy = ring.alloc_buf(16);
        assert!(ring.recv(a.as_fd(), busy, 1));
        ring.release_buf(busy);
        let other = ring.alloc_buf(16);
        assert_ne!(other, busy, "the kernel still owns the released buffer");
        b.write_all(b"late").expect("write");
        let done = wait(&mut ring);
        assert_eq!((done[0].token, done[0].result), (1, 4));
        assert_eq!(ring.alloc_buf(16), busy, "reusable once reaped");
    }

    #[test]
    fn connect_completes_and_its_timeout_is_swallowed() {
        let mut ring = Ring::new(8).expect("io_uring");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = match listener.local_addr().expect("addr") {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => unreachable!("bound to an IPv4 address"),
        };
        let fd = rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::STREAM,
            None,
        )
        .expect("socket");
        ring.connect(fd.as_fd(), addr, Duration::from_secs(5), 3);
        let done = wait(&mut ring);
        assert_eq!(done.len(), 1, "only the connect reports");
        assert_eq!((done[0].token, done[0].result), (3, 0));
    }

    #[test]
    fn multishot_accept_hands_over_owned_sockets() {
        let mut ring = Ring::new(8).expect("io_uring");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        ring.accept_multi(listener.as_fd(), 9);
        let _c1 =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let _c2 =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let mut got = wait(&mut ring);
        if got.len() < 2 {
            got.extend(wait(&mut ring));
        }
        assert_eq!(got.len(), 2);
        assert!(got
            .iter()
            .all(|c| c.token == 9 && c.more && c.accepted.is_some()));
    }
}
