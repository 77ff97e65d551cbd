//! Listeners, one thread per connection under a cap, keep-alive loops and graceful
//! shutdown.

use std::collections::HashMap;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::error::ApiError;
use crate::http::{read_request, Limits, ReadError, Request, Response, Transport};

/// Answers one request. Shared by every connection thread.
pub type Handler = dyn Fn(&Request) -> Response + Send + Sync;

/// Open connections, each with a way to stop its reads, so shutdown can wake them.
struct Conns {
    state: Mutex<ConnsState>,
    changed: Condvar,
    max: usize,
}

struct ConnsState {
    shutting_down: bool,
    next_id: u64,
    open: HashMap<u64, Box<dyn Fn() + Send>>,
}

enum Admit {
    Yes(ConnGuard),
    Full,
    ShuttingDown,
}

struct ConnGuard {
    conns: Arc<Conns>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut st = self.conns.state.lock().unwrap_or_else(|p| p.into_inner());
        st.open.remove(&self.id);
        self.conns.changed.notify_all();
    }
}

impl Conns {
    fn admit(self: &Arc<Self>, stop_reads: Box<dyn Fn() + Send>) -> Admit {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.shutting_down {
            return Admit::ShuttingDown;
        }
        if st.open.len() >= self.max {
            return Admit::Full;
        }
        st.next_id += 1;
        let id = st.next_id;
        st.open.insert(id, stop_reads);
        Admit::Yes(ConnGuard {
            conns: Arc::clone(self),
            id,
        })
    }

    fn shutting_down(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutting_down
    }
}

/// A stream type the server accepts: TCP or unix.
trait Stream: Transport + Sized + 'static {
    fn try_clone_stream(&self) -> std::io::Result<Self>;
    fn shutdown_stream(&self, how: Shutdown);
    fn set_write_timeout_stream(&self, d: Option<Duration>);
}

// The two std stream types have the same inherent methods but no trait for them.
macro_rules! impl_stream {
    ($($t:ty),*) => {$(
        impl Stream for $t {
            fn try_clone_stream(&self) -> std::io::Result<Self> {
                self.try_clone()
            }
            fn shutdown_stream(&self, how: Shutdown) {
                let _ = self.shutdown(how);
            }
            fn set_write_timeout_stream(&self, d: Option<Duration>) {
                let _ = self.set_write_timeout(d);
            }
        }
    )*};
}

impl_stream!(TcpStream, UnixStream);

/// A listener the server accepts on: TCP or unix.
trait Listener: AsFd + Send + Sized + 'static {
    type Conn: Stream + Send;
    fn try_clone_listener(&self) -> std::io::Result<Self>;
    /// The next connection, set up to be served.
    fn accept_conn(&self) -> std::io::Result<Self::Conn>;
}

impl Listener for TcpListener {
    type Conn = TcpStream;
    fn try_clone_listener(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn accept_conn(&self) -> std::io::Result<TcpStream> {
        let (s, _) = self.accept()?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }
}

impl Listener for UnixListener {
    type Conn = UnixStream;
    fn try_clone_listener(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn accept_conn(&self) -> std::io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }
}

pub struct Server {
    conns: Arc<Conns>,
    wakers: Vec<Box<dyn Fn() + Send>>,
    acceptors: Vec<JoinHandle<()>>,
}

pub struct ServerOptions {
    pub limits: Limits,
    pub max_connections: usize,
}

impl Server {
    pub fn new(opts: &ServerOptions) -> Server {
        Server {
            conns: Arc::new(Conns {
                state: Mutex::new(ConnsState {
                    shutting_down: false,
                    next_id: 0,
                    open: HashMap::new(),
                }),
                changed: Condvar::new(),
                max: opts.max_connections,
            }),
            wakers: Vec::new(),
            acceptors: Vec::new(),
        }
    }

    pub fn serve_tcp(&mut self, listener: TcpListener, limits: Limits, handler: Arc<Handler>) {
        self.serve_on(listener, limits, handler);
    }

    pub fn serve_unix(&mut self, listener: UnixListener, limits: Limits, handler: Arc<Handler>) {
        self.serve_on(listener, limits, handler);
    }

    fn serve_on<L: Listener>(&mut self, listener: L, limits: Limits, handler: Arc<Handler>) {
        let waker = listener.try_clone_listener().ok();
        self.wakers.push(Box::new(move || {
            // shutdown(2) on a listening socket makes a blocked accept return on Linux.
            if let Some(l) = &waker {
                let _ = rustix::net::shutdown(l, rustix::net::Shutdown::Read);
            }
        }));
        let conns = Arc::clone(&self.conns);
        self.acceptors.push(thread::spawn(move || loop {
            let stream = listener.accept_conn();
            if conns.shutting_down() {
                break;
            }
            match stream {
                Ok(s) => spawn_conn(&conns, s, limits, &handler),
                Err(e) => log::warn!(error:% = e; "accept failed"),
            }
        }));
    }

    /// Stop accepting, end idle connections, and wait up to `timeout` for in-flight
    /// requests. Returns whether every connection finished in time.
    pub fn shutdown(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        {
            let mut st = self.conns.state.lock().unwrap_or_else(|p| p.into_inner());
            st.shutting_down = true;
            // A read-shutdown ends idle keep-alive waits at once; a request already
            // read still gets its response written.
            for stop in st.open.values() {
                stop();
            }
        }
        for wake in &self.wakers {
            wake();
        }
        for a in self.acceptors {
            let _ = a.join();
        }
        let mut st = self.conns.state.lock().unwrap_or_else(|p| p.into_inner());
        while !st.open.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .conns
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

fn spawn_conn<S: Stream>(conns: &Arc<Conns>, stream: S, limits: Limits, handler: &Arc<Handler>) {
    let stopper = match stream.try_clone_stream() {
        Ok(s) => s,
        Err(e) => {
            log::warn!(error:% = e; "cannot clone connection");
            return;
        }
    };
    stream.set_write_timeout_stream(Some(limits.read_timeout));
    match conns.admit(Box::new(move || stopper.shutdown_stream(Shutdown::Read))) {
        Admit::Yes(guard) => {
            let handler = Arc::clone(handler);
            let conns = Arc::clone(conns);
            thread::spawn(move || {
                let _guard = guard;
                serve(stream, &limits, &*handler, &conns);
            });
        }
        Admit::Full => {
            let e = ApiError::new(503, "too_many_connections", "connection limit reached");
            let mut stream = stream;
            let _ = stream.write_all(&e.into_response().to_bytes(false, false));
        }
        Admit::ShuttingDown => {}
    }
}

fn serve<S: Stream>(mut stream: S, limits: &Limits, handler: &Handler, conns: &Conns) {
    let mut buf = Vec::new();
    loop {
        let req = match read_request(&mut stream, &mut buf, limits) {
            Ok(r) => r,
            Err(ReadError::Closed) => return,
            Err(e) => {
                let err = match e {
                    ReadError::Timeout => {
                        ApiError::new(408, "request_timeout", "request not received in time")
                    }
                    ReadError::HeaderTooLarge => ApiError::new(
                        431,
                        "header_too_large",
                        format!("request head exceeds {} bytes", limits.max_header),
                    ),
                    ReadError::BodyTooLarge => ApiError::new(
                        413,
                        "payload_too_large",
                        format!("request body exceeds {} bytes", limits.max_body),
                    ),
                    ReadError::LengthRequired => ApiError::new(
                        411,
                        "length_required",
                        "request bodies need Content-Length (chunked is not supported)",
                    ),
                    ReadError::Bad(m) => ApiError::bad_request(m),
                    ReadError::Closed => return,
                };
                let _ = stream.write_all(&err.into_response().to_bytes(false, false));
                linger(stream);
                return;
            }
        };
        let head_only = req.head.method == "HEAD";
        let resp = catch_unwind(AssertUnwindSafe(|| handler(&req)))
            .unwrap_or_else(|_| ApiError::internal("the request handler panicked").into_response());
        let keep = req.head.keep_alive() && !conns.shutting_down();
        if resp.write_to(&mut stream, keep, head_only).is_err() || !keep {
            return;
        }
    }
}

/// Close after an error without resetting the connection: a close with unread input
/// makes the kernel send RST, which can destroy the error response in flight.
fn linger<S: Stream>(mut stream: S) {
    stream.shutdown_stream(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut sink = [0u8; 8192];
    let mut left: usize = 1024 * 1024;
    while left > 0 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}
