//! The only module of the forwarder with `unsafe`: a safe face on one io_uring.
//!
//! The kernel reads and writes our memory after `submit` returns, so every pointer
//! handed to it must stay valid until the matching completion is reaped. This module
//! enforces that by owning all such memory itself:
//!
//! * I/O buffers live here (`Buf`), as boxed memory that never moves or as a slot of the
//!   provided-buffer pool. A buffer with an operation in flight is marked busy: it
//!   cannot be borrowed, and releasing it only schedules the free, which happens when
//!   the completion is reaped here.
//! * The provided-buffer pool (a registered buffer ring) hands the kernel buffers to
//!   receive into only when data arrives, so an idle connection holds no receive
//!   buffer. A pool slot is either in the ring (the kernel may write it, we never touch
//!   it) or held by exactly one `Buf` (the kernel never sees it); it goes back to the
//!   ring only when that `Buf` is released.
//! * Connect arguments (the socket address and the link timeout) live in a boxed slot
//!   that is freed only after both of their completions (connect and link timeout).
//!
//! * Every entry pushed is counted until its last completion is reaped (`in_flight`).
//!   Dropping the ring (at the end of a worker, or while a panic unwinds it) first
//!   cancels everything still in flight and reaps until that count is zero; only then
//!   is the pool unregistered and its memory freed. If the kernel does not give every
//!   operation back in time, the memory is leaked rather than freed under it.
//!
//! File descriptors are not memory: the kernel takes its own reference to the file
//! at submission, so an early close is harmless to memory safety; the engine still
//! keeps each fd open until its operations are reaped so a number is never reused
//! under a queued entry.

use std::alloc::Layout;
use std::io;
use std::mem::ManuallyDrop;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::types::BufRingEntry;

use super::buffers::{BufId, Buffers, Window};
use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// What a completion means to the engine: the engine's own token plus the outcome.
pub struct Completion {
    pub token: u32,
    /// The kernel's result: bytes moved, 0, or a negative errno (`-ENOBUFS` when a
    /// pooled receive found the pool empty).
    pub result: i32,
    /// For multishot accepts: more completions will follow for this entry.
    pub more: bool,
    /// For accepts: the new connection, owned from here on.
    pub accepted: Option<OwnedFd>,
    /// For pooled receives: the buffer holding the received bytes, now the caller's.
    pub received: Option<BufId>,
}

enum Mem {
    Owned(Box<[u8]>),
    /// A slot of the provided-buffer pool, held by us (not in the kernel's ring).
    Pooled(u16),
}

/// A fixed-size byte buffer and the window of pending data in it.
struct Buf {
    mem: Mem,
    window: Window,
    busy: bool,
    release_when_idle: bool,
}

/// The provided-buffer pool: `count` buffers of `size` bytes and the ring of entries
/// through which the kernel takes them.
struct Pool {
    entries: NonNull<BufRingEntry>,
    entries_layout: Layout,
    base: NonNull<u8>,
    base_layout: Layout,
    count: u16,
    size: usize,
    tail: u16,
}

/// Buffer group id of the pool (one pool per ring).
const POOL_GROUP: u16 = 0;

impl Pool {
    fn new(count: u16, size: usize) -> io::Result<Pool> {
        if !count.is_power_of_two() || size == 0 || u32::try_from(size).is_err() {
            return Err(io::Error::other(
                "the buffer pool needs a power-of-two count and a non-zero u32 buffer size",
            ));
        }
        // The SAFETY arguments below rely on `count * size` (the pool's extent) and the
        // entries' extent being representable: checked here, once.
        let total = usize::from(count)
            .checked_mul(size)
            .ok_or_else(|| io::Error::other("the buffer pool does not fit in memory"))?;
        let entries_layout = Layout::from_size_align(
            usize::from(count) * std::mem::size_of::<BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // A small alignment lets the allocator take zeroed pages straight from the
        // kernel, so pool memory costs nothing until a receive first lands in it.
        let base_layout = Layout::from_size_align(total, 16).map_err(io::Error::other)?;
        // SAFETY: both layouts have a non-zero size (count and size are non-zero).
        let (entries, base) = unsafe {
            (
                std::alloc::alloc_zeroed(entries_layout).cast::<BufRingEntry>(),
                std::alloc::alloc_zeroed(base_layout),
            )
        };
        let (Some(entries), Some(base)) = (NonNull::new(entries), NonNull::new(base)) else {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        };
        let mut pool = Pool {
            entries,
            entries_layout,
            base,
            base_layout,
            count,
            size,
            tail: 0,
        };
        for bid in 0..count {
            pool.give_back(bid);
        }
        Ok(pool)
    }

    /// Byte offset of slot `bid` in the pool. Panics on a slot that does not exist:
    /// handing the kernel an address past the pool would let it write anywhere.
    fn offset(&self, bid: u16) -> usize {
        assert!(
            bid < self.count,
            "buffer id {bid} outside a pool of {}",
            self.count
        );
        // `bid < count`, and `count * size` was checked in `new`, so this cannot overflow.
        usize::from(bid) * self.size
    }

    /// Put slot `bid` back in the ring for the kernel to fill.
    fn give_back(&mut self, bid: u16) {
        let offset = self.offset(bid);
        // `count` is a power of two (checked in `new`), so the mask keeps `index < count`.
        let index = usize::from(self.tail & (self.count - 1));
        // SAFETY: `index < count`, so the entry lies inside the allocation; the kernel
        // only reads entries before the published tail, and this one is at the tail.
        let entry = unsafe { &mut *self.entries.as_ptr().add(index) };
        // `offset + size <= count * size`: the address and length stay inside the pool.
        entry.set_addr(self.base.as_ptr() as u64 + offset as u64);
        entry.set_len(self.size as u32); // fits: checked in `new`
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail is the u16 `resv` field of the first entry, inside the
        // allocation and aligned; the kernel reads it concurrently, so it is published
        // with an atomic release store after the entry is written.
        unsafe {
            let tail = BufRingEntry::tail(self.entries.as_ptr()).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    fn slice(&self, bid: u16) -> &[u8] {
        let offset = self.offset(bid);
        // SAFETY: `offset` asserted `bid < count`, so `offset + size <= count * size`
        // and the range lies inside the allocation; the slot is held by one `Buf` and
        // not in the kernel's ring, so nothing writes it.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(offset), self.size) }
    }

    fn slice_mut(&mut self, bid: u16) -> &mut [u8] {
        let offset = self.offset(bid);
        // SAFETY: as in `slice`, and `&mut self` plus the single holder make it unique.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(offset), self.size) }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: allocated in `Pool::new` with these layouts. A pool is dropped either
        // before it was registered (a failed `Ring::new`) or by `Ring::drop`'s field
        // drops, after it reaped every operation and unregistered the ring; when it
        // could not, it leaked the pool instead (`ManuallyDrop`).
        unsafe {
            std::alloc::dealloc(self.entries.as_ptr().cast(), self.entries_layout);
            std::alloc::dealloc(self.base.as_ptr(), self.base_layout);
        }
    }
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
const KIND_RECV_POOLED: u64 = 6;
/// The cancel-everything entry of `Ring::drop`.
const KIND_CANCEL_ALL: u64 = 7;

/// Released buffers of our own kept for reuse, in bytes: what a few dozen connections
/// in bulk hold at once, reused rather than allocated and zeroed again.
const SPARE_BYTES: usize = 4 << 20;
/// Attempts to queue one entry before it is failed instead (see `Ring::push`).
const PUSH_ATTEMPTS: usize = 64;
/// How long `Ring::drop` waits for cancelled operations to come back before it gives up
/// and leaks the memory they may still write.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// A buffer the kernel is not using, for writing; a free function so that callers can
/// borrow the pool at the same time.
fn idle_mut(bufs: &mut [Option<Buf>], id: BufId) -> Option<&mut Buf> {
    bufs.get_mut(id.0 as usize)
        .and_then(Option::as_mut)
        .filter(|b| !b.busy)
}

/// A receive that does not wait fails with `EAGAIN` at once (io_uring does not arm a
/// poll for it) when the socket has nothing to read.
fn recv_flags(wait: bool) -> i32 {
    match wait {
        true => 0,
        false => libc::MSG_DONTWAIT,
    }
}

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
    /// `ManuallyDrop` so that `Drop` can leak it when the kernel might still use it.
    pool: ManuallyDrop<Pool>,
    bufs: ManuallyDrop<Vec<Option<Buf>>>,
    free_bufs: Vec<u32>,
    /// Released buffers kept for reuse, by size (the engine uses few sizes).
    spare: Vec<Box<[u8]>>,
    /// Their total size, at most `SPARE_BYTES`.
    spare_bytes: usize,
    connects: ManuallyDrop<Vec<Option<Box<ConnectArgs>>>>,
    free_connects: Vec<u32>,
    reaped: Vec<cqueue::Entry>,
    /// Entries queued or submitted whose last completion is not reaped yet.
    in_flight: usize,
    /// Completions reaped outside `run_once` (to make room in a full queue, or for an
    /// entry that could not be queued): handed out by the next `run_once`.
    backlog: Vec<Completion>,
}

impl Drop for Ring {
    fn drop(&mut self) {
        let drained = self.cancel_and_drain();
        if drained {
            // The pool's memory must not be registered once it is freed.
            let _ = self.ring.submitter().unregister_buf_ring(POOL_GROUP);
            // SAFETY: nothing is in flight any more, so the kernel holds no pointer into
            // these; each is dropped once, here, and never touched again.
            unsafe {
                ManuallyDrop::drop(&mut self.pool);
                ManuallyDrop::drop(&mut self.bufs);
                ManuallyDrop::drop(&mut self.connects);
            }
        } else {
            log::error!(
                "io_uring: {} operation(s) still in flight after cancelling them for {DRAIN_LIMIT:?}; leaking their buffers instead of freeing them under the kernel",
                self.in_flight
            );
        }
    }
}

impl Ring {
    /// Cancel everything in flight and reap until nothing is; false if that did not
    /// happen within `DRAIN_LIMIT`.
    fn cancel_and_drain(&mut self) -> bool {
        if self.in_flight == 0 {
            return true;
        }
        let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
            .build()
            .user_data(user_data(0, KIND_CANCEL_ALL, None));
        self.push(&cancel);
        let deadline = std::time::Instant::now() + DRAIN_LIMIT;
        while self.in_flight > 0 {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            if self
                .submit_and_wait((deadline - now).min(Duration::from_millis(100)))
                .is_err()
            {
                return false;
            }
            // What they report no longer matters: accepted sockets close, buffers free.
            self.reap_to_backlog();
            self.backlog.clear();
        }
        true
    }
}

impl Ring {
    /// A ring with room for `entries` queued operations and a pool of `pool_count`
    /// receive buffers of `pool_size` bytes (`pool_count` a power of two).
    pub fn new(entries: u32, pool_count: u16, pool_size: usize) -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(entries)?;
        let pool = Pool::new(pool_count, pool_size)?;
        // SAFETY: the entries stay allocated until `Ring::drop` has reaped every
        // operation and unregistered them (or forever, if it could not).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                pool.entries.as_ptr() as u64,
                pool.count,
                POOL_GROUP,
                0,
            )?;
        }
        Ok(Ring {
            ring,
            pool: ManuallyDrop::new(pool),
            bufs: ManuallyDrop::new(Vec::new()),
            free_bufs: Vec::new(),
            spare: Vec::new(),
            spare_bytes: 0,
            connects: ManuallyDrop::new(Vec::new()),
            free_connects: Vec::new(),
            reaped: Vec::new(),
            in_flight: 0,
            backlog: Vec::new(),
        })
    }

    // ---- buffers -------------------------------------------------------------------

    fn insert(&mut self, mem: Mem, len: usize, end: usize) -> BufId {
        let buf = Buf {
            mem,
            window: Window::new(len, end),
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

    fn drop_buf(&mut self, i: u32) {
        if let Some(buf) = self.bufs[i as usize].take() {
            match buf.mem {
                // Keep a bounded amount of memory around for the next buffers.
                Mem::Owned(mem) if self.spare_bytes + mem.len() <= SPARE_BYTES => {
                    self.spare_bytes += mem.len();
                    self.spare.push(mem);
                }
                Mem::Owned(_) => {}
                Mem::Pooled(bid) => self.pool.give_back(bid),
            }
            self.free_bufs.push(i);
        }
    }

    fn bytes<'a>(pool: &'a Pool, buf: &'a Buf) -> &'a [u8] {
        match &buf.mem {
            Mem::Owned(m) => m,
            Mem::Pooled(bid) => pool.slice(*bid),
        }
    }

    fn bytes_mut<'a>(pool: &'a mut Pool, mem: &'a mut Mem) -> &'a mut [u8] {
        match mem {
            Mem::Owned(m) => m,
            Mem::Pooled(bid) => pool.slice_mut(*bid),
        }
    }

    fn buf(&self, id: BufId) -> Option<&Buf> {
        self.bufs.get(id.0 as usize).and_then(Option::as_ref)
    }

    // ---- operations ----------------------------------------------------------------

    /// Queue `entry`. When the submission queue is full, hand it to the kernel; when
    /// the kernel refuses because the completion queue is full (EBUSY), reap
    /// completions into the backlog to make room, then retry. Never loops unbounded:
    /// an entry that still cannot be queued fails with a completion of its own (its
    /// owner sees `-EAGAIN`), so its memory is accounted for like any other.
    fn push(&mut self, entry: &squeue::Entry) {
        self.push_linked(std::slice::from_ref(entry));
    }

    /// Queue `entries` together, all or none: a linked entry must never end up linked
    /// to whatever is queued after it because its partner did not fit.
    fn push_linked(&mut self, entries: &[squeue::Entry]) {
        for _ in 0..PUSH_ATTEMPTS {
            // SAFETY: every caller builds its entries only from memory owned by this
            // ring (a busy `Buf`, the pool, or a live `ConnectArgs` box) or from plain
            // values, and that memory is kept until the entry's completion is reaped
            // in `complete` (`Drop` reaps everything before freeing it).
            if unsafe { self.ring.submission().push_multiple(entries) }.is_ok() {
                self.in_flight += entries.len();
                return;
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.reap_to_backlog(),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    log::warn!("io_uring submit failed: {e}");
                    self.reap_to_backlog();
                }
            }
        }
        log::warn!("io_uring submission queue stayed full: failing an operation");
        // Account for them as if the kernel had failed them at once.
        self.in_flight += entries.len();
        for entry in entries {
            if let Some(c) = self.complete(entry.get_user_data(), -libc::EAGAIN, 0) {
                self.backlog.push(c);
            }
        }
    }

    /// Reap every completion queued now, doing the ring's own accounting, and keep the
    /// results for the next `run_once`.
    fn reap_to_backlog(&mut self) {
        let mut reaped = std::mem::take(&mut self.reaped);
        loop {
            reaped.clear();
            reaped.extend(self.ring.completion());
            if reaped.is_empty() {
                break;
            }
            for cqe in &reaped {
                if let Some(c) = self.complete(cqe.user_data(), cqe.result(), cqe.flags()) {
                    self.backlog.push(c);
                }
            }
        }
        self.reaped = reaped;
    }

    /// Entries whose last completion has not been reaped.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Multishot accept on a listening socket.
    pub fn accept_multi(&mut self, listener: BorrowedFd<'_>, token: u32) {
        let entry = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(token, KIND_ACCEPT, None));
        self.push(&entry);
    }

    /// Multishot poll for `fd` becoming readable: one completion (with `more`) each
    /// time it does, until the kernel ends it (a completion without `more`).
    pub fn poll_readable_multi(&mut self, fd: BorrowedFd<'_>, token: u32) {
        let entry = opcode::PollAdd::new(types::Fd(fd.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(user_data(token, KIND_PLAIN, None));
        self.push(&entry);
    }

    /// Receive at most `max` bytes into the free tail of an idle buffer; without
    /// `wait`, a socket with nothing to read answers `-EAGAIN` at once. Returns false
    /// if the buffer is busy or full.
    pub fn recv(
        &mut self,
        fd: BorrowedFd<'_>,
        id: BufId,
        max: usize,
        wait: bool,
        token: u32,
    ) -> bool {
        let Some(b) = idle_mut(&mut self.bufs, id) else {
            return false;
        };
        let free = b.window.free();
        if free.is_empty() || max == 0 {
            return false;
        }
        b.busy = true;
        let tail = &mut Ring::bytes_mut(&mut self.pool, &mut b.mem)[free];
        let entry = opcode::Recv::new(
            types::Fd(fd.as_raw_fd()),
            tail.as_mut_ptr(),
            // A shorter length than the slice is always safe to hand over.
            u32::try_from(tail.len().min(max)).unwrap_or(u32::MAX),
        )
        .flags(recv_flags(wait))
        .build()
        .user_data(user_data(token, KIND_RECV, Some(id.0)));
        self.push(&entry);
        true
    }

    /// Receive at most `max` bytes into a buffer the kernel takes from the pool when
    /// data arrives; the completion carries it in `received`. Without `wait`, as
    /// `recv`.
    pub fn recv_pooled(&mut self, fd: BorrowedFd<'_>, max: usize, wait: bool, token: u32) {
        // The kernel reads at most this many bytes into the pool buffer it picks, so
        // a `max` below the pool's buffer size leaves the rest of that buffer unused.
        let len = self.pool.size.min(max.max(1)) as u32; // fits: checked in `Pool::new`
        let entry = opcode::Recv::new(types::Fd(fd.as_raw_fd()), std::ptr::null_mut(), len)
            .buf_group(POOL_GROUP)
            .flags(recv_flags(wait))
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(user_data(token, KIND_RECV_POOLED, None));
        self.push(&entry);
    }

    /// Send the pending bytes of an idle buffer; with `more`, the kernel may hold them
    /// until more follows (`MSG_MORE`: a FIN, which then rides in the same segment).
    /// Returns false if it is busy or empty.
    pub fn send(&mut self, fd: BorrowedFd<'_>, id: BufId, more: bool, token: u32) -> bool {
        let Some(b) = idle_mut(&mut self.bufs, id) else {
            return false;
        };
        if b.window.is_empty() {
            return false;
        }
        b.busy = true;
        let pending = &Ring::bytes(&self.pool, b)[b.window.pending()];
        let entry = opcode::Send::new(
            types::Fd(fd.as_raw_fd()),
            pending.as_ptr(),
            u32::try_from(pending.len()).unwrap_or(u32::MAX),
        )
        .flags(libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 })
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
        self.push_linked(&[connect, timeout]);
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
        if !self.backlog.is_empty() {
            // Completions are already waiting: submit, but do not sleep.
            out.append(&mut self.backlog);
            if let Err(e) = self.ring.submit() {
                if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) {
                    log::warn!("io_uring submit failed: {e}");
                }
            }
        } else if let Err(e) = self.submit_and_wait(timeout) {
            log::warn!("io_uring wait failed: {e}");
        }
        self.reap_to_backlog();
        out.append(&mut self.backlog);
    }

    /// Submit what is queued and wait up to `timeout` for a completion. A wait that
    /// ends by the clock, a signal, or a full completion queue is not an error.
    fn submit_and_wait(&mut self, timeout: Duration) -> io::Result<()> {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Err(e)
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) =>
            {
                Err(e)
            }
            _ => Ok(()),
        }
    }

    /// Account for one completion: free what the kernel no longer uses.
    fn complete(&mut self, user_data: u64, result: i32, flags: u32) -> Option<Completion> {
        let (token, kind, slot) = decode(user_data);
        let more = cqueue::more(flags);
        if !more {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        let mut accepted = None;
        let mut received = None;
        match (kind, slot) {
            (KIND_RECV | KIND_SEND, Some(i)) => {
                let buf = self.bufs.get_mut(i as usize).and_then(Option::as_mut)?;
                buf.busy = false;
                if result > 0 {
                    let n = result as usize;
                    if kind == KIND_RECV {
                        buf.window.extend(n);
                    } else {
                        buf.window.consume(n);
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
            (KIND_RECV_POOLED, _) => {
                if let Some(bid) = cqueue::buffer_select(flags).filter(|&b| b < self.pool.count) {
                    if result > 0 {
                        let n = (result as usize).min(self.pool.size);
                        received = Some(self.insert(Mem::Pooled(bid), self.pool.size, n));
                    } else {
                        self.pool.give_back(bid);
                    }
                }
            }
            (KIND_ACCEPT, _) if result >= 0 => {
                // SAFETY: a successful accept completion carries a new descriptor that
                // the kernel just installed for us and that nothing else owns.
                accepted = Some(unsafe { OwnedFd::from_raw_fd(result) });
            }
            (KIND_CANCEL_ALL, _) => return None,
            _ => {}
        }
        Some(Completion {
            token,
            result,
            more,
            accepted,
            received,
        })
    }
}

impl Buffers for Ring {
    fn alloc(&mut self, len: usize) -> BufId {
        let mem = match self.spare.iter().position(|m| m.len() == len) {
            Some(i) => {
                let mem = self.spare.swap_remove(i);
                self.spare_bytes -= mem.len();
                mem
            }
            None => vec![0u8; len].into_boxed_slice(),
        };
        self.insert(Mem::Owned(mem), len, 0)
    }

    fn release(&mut self, id: BufId) {
        let Some(buf) = self.bufs.get_mut(id.0 as usize).and_then(Option::as_mut) else {
            return;
        };
        if buf.busy {
            buf.release_when_idle = true;
        } else {
            self.drop_buf(id.0);
        }
    }

    fn idle(&self, id: BufId) -> Option<(&[u8], &Window)> {
        let b = self.buf(id).filter(|b| !b.busy)?;
        Some((Ring::bytes(&self.pool, b), &b.window))
    }

    fn idle_mut(&mut self, id: BufId) -> Option<(&mut [u8], &mut Window)> {
        let b = idle_mut(&mut self.bufs, id)?;
        Some((Ring::bytes_mut(&mut self.pool, &mut b.mem), &mut b.window))
    }

    fn is_empty(&self, id: BufId) -> bool {
        self.buf(id).is_none_or(|b| b.window.is_empty())
    }

    fn capacity(&self, id: BufId) -> usize {
        self.buf(id).map_or(0, |b| b.window.capacity())
    }
}

/// What this kernel's io_uring lacks of what the engine uses.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot create an io_uring ({0}): the kernel is older than 5.11, or io_uring is turned off (sysctl kernel.io_uring_disabled) or filtered (seccomp, container runtime)")]
    Unavailable(#[source] io::Error),
    #[error("the io_uring of this kernel ({kernel}) lacks {}; mergen-forwarder needs Linux 6.0 or later", .missing.join(", "))]
    Missing {
        kernel: String,
        missing: Vec<&'static str>,
    },
}

/// Check once, at start-up, that the kernel has every io_uring feature the engine
/// uses, so that an old kernel is a clear refusal to start and not a worker failing
/// on its first connection.
pub fn probe() -> Result<(), ProbeError> {
    let mut missing = Vec::new();
    let plain = IoUring::new(8).map_err(ProbeError::Unavailable)?;
    if !plain.params().is_feature_ext_arg() {
        missing.push("waits with a timeout (IORING_FEAT_EXT_ARG, 5.11)");
    }
    if !plain.params().is_feature_nodrop() {
        missing.push("no dropped completions (IORING_FEAT_NODROP, 5.5)");
    }
    let mut ops = io_uring::Probe::new();
    if plain.submitter().register_probe(&mut ops).is_err() {
        missing.push("opcode probing (5.6)");
    } else {
        let used = [
            (opcode::Accept::CODE, "accept"),
            (opcode::PollAdd::CODE, "poll"),
            (opcode::Recv::CODE, "recv"),
            (opcode::Send::CODE, "send"),
            (opcode::Connect::CODE, "connect"),
            (opcode::LinkTimeout::CODE, "linked timeouts"),
            (opcode::AsyncCancel::CODE, "async cancel"),
        ];
        for (code, name) in used {
            if !ops.is_supported(code) {
                missing.push(name);
            }
        }
    }
    if IoUring::<squeue::Entry>::builder()
        .setup_coop_taskrun()
        .build(8)
        .is_err()
    {
        missing.push("cooperative task running (IORING_SETUP_COOP_TASKRUN, 5.19)");
    }
    if IoUring::<squeue::Entry>::builder()
        .setup_single_issuer()
        .build(8)
        .is_err()
    {
        missing.push("single-issuer rings (IORING_SETUP_SINGLE_ISSUER, 6.0)");
    }
    if missing.is_empty() {
        missing.extend(probe_functions());
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(ProbeError::Missing {
        kernel: rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned(),
        missing,
    })
}

/// What only trying tells: buffer rings, multishot accept and poll, cancel by fd.
fn probe_functions() -> Vec<&'static str> {
    let mut ring = match Ring::new(8, 1, 64) {
        Ok(ring) => ring,
        Err(_) => return vec!["provided-buffer rings (5.19)"],
    };
    let Ok(listener) = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)) else {
        return Vec::new(); // no loopback to try on: the first accept will tell
    };
    let Ok((readable, _writer)) = std::os::unix::net::UnixStream::pair() else {
        return Vec::new();
    };
    use std::os::fd::AsFd;
    ring.accept_multi(listener.as_fd(), 1);
    ring.poll_readable_multi(readable.as_fd(), 2);
    ring.cancel_fd(listener.as_raw_fd(), 3);
    ring.cancel_fd(readable.as_raw_fd(), 4);
    let mut finals = std::collections::HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut out = Vec::new();
    while finals.len() < 4 && std::time::Instant::now() < deadline {
        ring.run_once(Duration::from_millis(100), &mut out);
        for c in out.drain(..).filter(|c| !c.more) {
            finals.insert(c.token, c.result);
        }
    }
    let einval = |token| finals.get(&token) == Some(&-libc::EINVAL);
    let mut missing = Vec::new();
    if einval(1) {
        missing.push("multishot accept (5.19)");
    }
    if einval(2) {
        missing.push("multishot poll (5.13)");
    }
    if einval(3) || einval(4) {
        missing.push("cancel by file descriptor (5.19)");
    }
    missing
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
        let mut ring = Ring::new(8, 4, 64).expect("io_uring");
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        let buf = ring.alloc(16);
        Buffers::fill(&mut ring, buf, |tail| {
            tail[..5].copy_from_slice(b"hello");
            Ok::<_, ()>(5)
        })
        .expect("fill");
        assert!(ring.send(a.as_fd(), buf, false, 7));
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
        assert!(ring.recv(a.as_fd(), buf, usize::MAX, true, 8));
        let done = wait(&mut ring);
        assert_eq!((done[0].token, done[0].result), (8, 6));
        assert_eq!(ring.data(buf), b"world!");
        ring.consume(buf, 5);
        assert_eq!(ring.data(buf), b"!");
    }

    #[test]
    fn a_buffer_released_in_flight_is_freed_only_after_its_completion() {
        let mut ring = Ring::new(8, 4, 64).expect("io_uring");
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        let busy = ring.alloc(16);
        assert!(ring.recv(a.as_fd(), busy, usize::MAX, true, 1));
        ring.release(busy);
        let other = ring.alloc(16);
        assert_ne!(other, busy, "the kernel still owns the released buffer");
        b.write_all(b"late").expect("write");
        let done = wait(&mut ring);
        assert_eq!((done[0].token, done[0].result), (1, 4));
        assert_eq!(ring.alloc(16), busy, "reusable once reaped");
    }

    #[test]
    fn connect_completes_and_its_timeout_is_swallowed() {
        let mut ring = Ring::new(8, 4, 64).expect("io_uring");
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
    fn multishot_poll_reports_each_time_the_fd_turns_readable() {
        let mut ring = Ring::new(8, 4, 64).expect("io_uring");
        let (a, mut b) = UnixStream::pair().expect("socketpair");
        ring.poll_readable_multi(a.as_fd(), 5);
        for _ in 0..2 {
            b.write_all(b"x").expect("write");
            let done = wait(&mut ring);
            assert_eq!(done.len(), 1);
            assert!(done[0].token == 5 && done[0].result > 0 && done[0].more);
            let mut byte = [0u8; 1];
            (&a).read_exact(&mut byte).expect("drain");
        }
    }

    #[test]
    fn multishot_accept_hands_over_owned_sockets() {
        let mut ring = Ring::new(8, 4, 64).expect("io_uring");
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

    #[test]
    fn pooled_receives_take_buffers_only_when_data_arrives() {
        let mut ring = Ring::new(8, 2, 64).expect("io_uring");
        let pairs: Vec<_> = (0..3)
            .map(|_| UnixStream::pair().expect("socketpair"))
            .collect();
        let mut held = Vec::new();
        for (i, (a, b)) in pairs.iter().take(2).enumerate() {
            let mut writer = b;
            writer.write_all(b"data").expect("write");
            ring.recv_pooled(a.as_fd(), usize::MAX, true, i as u32);
            let done = wait(&mut ring);
            assert_eq!(done[0].result, 4);
            let buf = done[0].received.expect("a pool buffer");
            assert_eq!(ring.data(buf), b"data");
            held.push(buf);
        }
        // Both pool buffers are held: the next receive finds the pool empty.
        (&pairs[2].1).write_all(b"more").expect("write");
        ring.recv_pooled(pairs[2].0.as_fd(), usize::MAX, true, 7);
        let done = wait(&mut ring);
        assert_eq!(
            (done[0].result, done[0].received.is_none()),
            (-libc::ENOBUFS, true)
        );
        // Giving one back makes it available again.
        ring.release(held.pop().expect("held"));
        ring.recv_pooled(pairs[2].0.as_fd(), usize::MAX, true, 8);
        let done = wait(&mut ring);
        let buf = done[0].received.expect("a recycled pool buffer");
        assert_eq!(ring.data(buf), b"more");
    }

    #[test]
    fn a_receive_that_does_not_wait_answers_eagain_on_an_empty_socket() {
        let mut ring = Ring::new(8, 2, 64).expect("io_uring");
        let (a, b) = UnixStream::pair().expect("socketpair");
        ring.recv_pooled(a.as_fd(), usize::MAX, false, 1);
        let own = ring.alloc(64);
        assert!(ring.recv(a.as_fd(), own, usize::MAX, false, 2));
        let mut done = wait(&mut ring);
        if done.len() < 2 {
            done.extend(wait(&mut ring));
        }
        let mut results: Vec<_> = done.iter().map(|c| (c.token, c.result)).collect();
        results.sort();
        assert_eq!(results, [(1, -libc::EAGAIN), (2, -libc::EAGAIN)]);
        assert!(done.iter().all(|c| c.received.is_none()));
        // With bytes there, it reads them like any receive.
        (&b).write_all(b"late").expect("write");
        ring.recv_pooled(a.as_fd(), usize::MAX, false, 3);
        let done = wait(&mut ring);
        let buf = done[0].received.expect("a pool buffer");
        assert_eq!(ring.data(buf), b"late");
    }

    #[test]
    fn receives_take_at_most_what_they_ask_for() {
        let mut ring = Ring::new(8, 2, 64).expect("io_uring");
        let (a, b) = UnixStream::pair().expect("socketpair");
        (&b).write_all(&[5u8; 40]).expect("write");
        ring.recv_pooled(a.as_fd(), 16, true, 1);
        let done = wait(&mut ring);
        assert_eq!(done[0].result, 16);
        let pooled = done[0].received.expect("a pool buffer");
        assert_eq!(ring.data(pooled), &[5u8; 16]);
        let own = ring.alloc(64);
        assert!(ring.recv(a.as_fd(), own, 10, true, 2));
        let done = wait(&mut ring);
        assert_eq!(done[0].result, 10);
        assert_eq!(ring.data(own), &[5u8; 10]);
    }

    #[test]
    fn this_kernel_has_everything_the_engine_uses() {
        probe().expect("the io_uring probe");
        let e = ProbeError::Missing {
            kernel: "5.15.0".into(),
            missing: vec!["multishot accept (5.19)", "provided-buffer rings (5.19)"],
        };
        assert_eq!(
            e.to_string(),
            "the io_uring of this kernel (5.15.0) lacks multishot accept (5.19), provided-buffer rings (5.19); mergen-forwarder needs Linux 6.0 or later"
        );
    }

    /// What `Drop` does before it frees anything: every armed operation (a receive
    /// into an owned buffer, pooled receives, a multishot accept and poll) is
    /// cancelled and reaped, so nothing the kernel holds points into our memory.
    #[test]
    fn cancel_and_drain_leaves_nothing_in_flight() {
        let mut ring = Ring::new(8, 4, 64).expect("io_uring");
        let pairs: Vec<_> = (0..3)
            .map(|_| UnixStream::pair().expect("socketpair"))
            .collect();
        let owned = ring.alloc(16);
        assert!(ring.recv(pairs[0].0.as_fd(), owned, usize::MAX, true, 1));
        ring.recv_pooled(pairs[1].0.as_fd(), usize::MAX, true, 2);
        ring.poll_readable_multi(pairs[2].0.as_fd(), 3);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        ring.accept_multi(listener.as_fd(), 4);
        let mut out = Vec::new();
        ring.run_once(Duration::from_millis(10), &mut out);
        let seen: Vec<_> = out.iter().map(|c| (c.token, c.result, c.more)).collect();
        assert_eq!(ring.in_flight(), 4, "{seen:?}");
        assert!(ring.cancel_and_drain());
        assert_eq!(ring.in_flight(), 0);
        // The peers write now: nothing lands in our memory any more.
        for (_, b) in &pairs {
            (&*b).write_all(b"late").expect("write");
        }
        assert!(ring.data(owned).is_empty() && ring.is_empty(owned));
        ring.run_once(Duration::from_millis(50), &mut out);
        assert!(out.is_empty(), "a cancelled operation reported again");
    }

    /// A worker thread that panics drops its ring while receives are armed; the drop
    /// drains them, and the process goes on unharmed.
    #[test]
    fn a_panicking_owner_drops_its_ring_safely() {
        let pairs: Vec<_> = (0..4)
            .map(|_| UnixStream::pair().expect("socketpair"))
            .collect();
        let fds: Vec<_> = pairs
            .iter()
            .map(|(a, _)| a.try_clone().expect("clone"))
            .collect();
        let died = std::thread::spawn(move || {
            let mut ring = Ring::new(8, 4, 64).expect("io_uring");
            for (i, fd) in fds.iter().enumerate() {
                ring.recv_pooled(fd.as_fd(), usize::MAX, true, i as u32);
            }
            let mut out = Vec::new();
            ring.run_once(Duration::from_millis(10), &mut out);
            panic!("worker bug");
        })
        .join();
        assert!(died.is_err());
        for (_, b) in &pairs {
            (&*b).write_all(&[7u8; 64]).expect("write");
        }
        // Fresh allocations are not scribbled on by a stale receive.
        let probe = vec![0u8; 4096];
        std::thread::sleep(Duration::from_millis(20));
        assert!(probe.iter().all(|&b| b == 0));
    }

    /// More completions than the completion queue holds, from more entries than the
    /// submission queue holds: `push` makes room by reaping instead of spinning, and
    /// every completion is still delivered once.
    #[test]
    fn full_queues_are_reaped_not_spun_on() {
        const N: usize = 64;
        let mut ring = Ring::new(2, 128, 64).expect("io_uring");
        let pairs: Vec<_> = (0..N)
            .map(|_| UnixStream::pair().expect("socketpair"))
            .collect();
        for (i, (a, b)) in pairs.iter().enumerate() {
            (&*b).write_all(&[i as u8; 3]).expect("write");
            ring.recv_pooled(a.as_fd(), usize::MAX, true, i as u32);
        }
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while got.len() < N && std::time::Instant::now() < deadline {
            ring.run_once(Duration::from_millis(50), &mut got);
        }
        assert_eq!(got.len(), N);
        let mut tokens: Vec<u32> = got.iter().map(|c| c.token).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, (0..N as u32).collect::<Vec<_>>());
        for c in &got {
            let buf = c.received.expect("a pool buffer");
            assert_eq!(ring.data(buf), &[c.token as u8; 3]);
        }
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    #[should_panic(expected = "outside a pool")]
    fn a_buffer_id_outside_the_pool_is_refused() {
        let mut pool = Pool::new(4, 64).expect("pool");
        pool.give_back(4);
    }

    #[test]
    fn pool_sizes_are_checked() {
        assert!(Pool::new(3, 64).is_err());
        assert!(Pool::new(4, 0).is_err());
        assert!(Pool::new(4, usize::MAX / 2).is_err());
    }
}
