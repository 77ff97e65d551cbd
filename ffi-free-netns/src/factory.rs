//! Namespace-bound socket factories: one worker thread per namespace sits inside it and
//! keeps a few ready TCP sockets per address family, so a caller gets a socket that lives
//! in that namespace with a queue pop instead of a setns or a thread round trip.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use rustix::net::{ipproto, AddressFamily, SocketFlags, SocketType};

use crate::error::{Error, Result};
use crate::netns::{self, Netns};

/// How often an idle worker checks that its namespace file still names its namespace.
const LIVENESS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    const ALL: [Family; 2] = [Family::V4, Family::V6];

    fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }

    fn address_family(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::INET,
            Family::V6 => AddressFamily::INET6,
        }
    }
}

#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Ready sockets kept per (namespace, family).
    pub depth: usize,
    /// A worker with no takes for this long exits and closes its ready sockets.
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> PoolConfig {
        PoolConfig {
            depth: 8,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Cloneable handle to per-namespace socket workers. Sockets are TCP stream sockets,
/// non-blocking, close-on-exec and not connected.
///
/// If a namespace's file is deleted while its worker lives, the worker notices at its next
/// refill (or within a second when idle), closes its ready sockets and exits; takes then
/// fail with a clear error. Sockets taken before that still belong to the old namespace.
#[derive(Clone)]
pub struct SocketPool {
    shared: Arc<Shared>,
}

struct Shared {
    config: PoolConfig,
    workers: Mutex<HashMap<String, Arc<Worker>>>,
}

struct Worker {
    /// The caller's name or path for the namespace: the key in `Shared::workers`.
    key: String,
    state: Mutex<State>,
    /// The worker thread waits here for demand.
    demand: Condvar,
    /// Takers wait here for sockets.
    supply: Condvar,
}

struct State {
    lanes: [Lane; 2],
    last_take: Instant,
    worker_sleeping: bool,
    joined: bool,
    closed: Option<Closed>,
}

#[derive(Default)]
struct Lane {
    ready: VecDeque<OwnedFd>,
    /// Takers blocked on an empty lane.
    waiting: usize,
    /// Bumped on every failed socket(): waiters compare it to learn their request failed.
    failures: u64,
    last_failure: Option<Error>,
    /// No background refill after a failure until a taker asks again.
    stalled: bool,
}

enum Closed {
    /// Exited for idleness: a taker still holding this worker should get a fresh one.
    Retired,
    /// No more sockets will come, for this reason.
    Failed(Error),
}

impl SocketPool {
    pub fn new(config: PoolConfig) -> SocketPool {
        SocketPool {
            shared: Arc::new(Shared {
                config,
                workers: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Pop a ready socket; if the pool is empty, ask the worker and wait for it.
    /// `netns` is a namespace name (looked up like [`netns::open`]) or an absolute path.
    pub fn take(&self, netns: &str, family: Family) -> Result<OwnedFd> {
        loop {
            let worker = self.worker(netns)?;
            if let Some(result) = worker.take(family, self.shared.config.depth) {
                return result;
            }
        }
    }

    /// Start the worker for `netns` (it fills its pool in the background) and wait until it
    /// has joined the namespace.
    pub fn prewarm(&self, netns: &str) -> Result<()> {
        loop {
            let worker = self.worker(netns)?;
            let mut st = worker.lock();
            loop {
                match &st.closed {
                    Some(Closed::Retired) => break,
                    Some(Closed::Failed(e)) => return Err(e.replicate()),
                    None if st.joined => return Ok(()),
                    None => {
                        st = worker
                            .supply
                            .wait(st)
                            .unwrap_or_else(PoisonError::into_inner)
                    }
                }
            }
        }
    }

    /// Stop the worker for `netns` and close its ready sockets. Takers waiting on it get
    /// an error; later takes start a new worker.
    pub fn forget(&self, netns: &str) {
        let worker = self.shared.lock_workers().remove(netns);
        if let Some(worker) = worker {
            worker.close(Closed::Failed(Error::Pool {
                netns: netns.to_owned(),
                reason: "forgotten by its owner".into(),
            }));
        }
    }

    fn worker(&self, netns: &str) -> Result<Arc<Worker>> {
        if let Some(worker) = self.shared.lock_workers().get(netns) {
            return Ok(Arc::clone(worker));
        }
        // Resolve on the caller's thread, outside the lock: a missing namespace is an
        // immediate error and costs no thread.
        let ns = resolve(netns)?;
        let mut workers = self.shared.lock_workers();
        if let Some(worker) = workers.get(netns) {
            return Ok(Arc::clone(worker));
        }
        let worker = Arc::new(Worker {
            key: netns.to_owned(),
            state: Mutex::new(State {
                lanes: Default::default(),
                last_take: Instant::now(),
                worker_sleeping: false,
                joined: false,
                closed: None,
            }),
            demand: Condvar::new(),
            supply: Condvar::new(),
        });
        let thread_worker = Arc::clone(&worker);
        let shared = Arc::downgrade(&self.shared);
        let config = self.shared.config.clone();
        std::thread::Builder::new()
            .name("netns-pool".into())
            .spawn(move || run_worker(thread_worker, ns, shared, config))
            .map_err(|e| Error::io(format!("spawning the socket worker for {netns}"), e))?;
        workers.insert(netns.to_owned(), Arc::clone(&worker));
        Ok(worker)
    }
}

impl Shared {
    fn lock_workers(&self) -> MutexGuard<'_, HashMap<String, Arc<Worker>>> {
        self.workers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        for (_, worker) in self.lock_workers().drain() {
            worker.close(Closed::Retired);
        }
    }
}

fn resolve(netns: &str) -> Result<Netns> {
    if netns.starts_with('/') {
        netns::open_path(Path::new(netns))
    } else {
        netns::open(netns)
    }
}

impl Worker {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `None` when this worker retired meanwhile and the caller should get a fresh one.
    fn take(&self, family: Family, depth: usize) -> Option<Result<OwnedFd>> {
        let i = family.index();
        let mut st = self.lock();
        st.last_take = Instant::now();
        if let Some(done) = closed_result(&st) {
            return done;
        }
        if let Some(fd) = st.lanes[i].ready.pop_front() {
            // Wake the worker only at the low-water mark, keeping most pops free of syscalls.
            if st.worker_sleeping && st.lanes[i].ready.len() <= depth / 2 {
                self.demand.notify_one();
            }
            return Some(Ok(fd));
        }
        let failures = st.lanes[i].failures;
        st.lanes[i].waiting += 1;
        st.lanes[i].stalled = false;
        if st.worker_sleeping {
            self.demand.notify_one();
        }
        let result = loop {
            st = self.supply.wait(st).unwrap_or_else(PoisonError::into_inner);
            if let Some(done) = closed_result(&st) {
                break done;
            }
            if let Some(fd) = st.lanes[i].ready.pop_front() {
                break Some(Ok(fd));
            }
            let lane = &st.lanes[i];
            if lane.failures != failures {
                break lane.last_failure.as_ref().map(|e| Err(e.replicate()));
            }
        };
        st.lanes[i].waiting -= 1;
        result
    }

    fn close(&self, reason: Closed) {
        let drained: Vec<OwnedFd> = {
            let mut st = self.lock();
            if st.closed.is_none() {
                st.closed = Some(reason);
            }
            st.lanes
                .iter_mut()
                .flat_map(|lane| lane.ready.drain(..))
                .collect()
        };
        drop(drained);
        self.demand.notify_all();
        self.supply.notify_all();
    }
}

fn closed_result(st: &State) -> Option<Option<Result<OwnedFd>>> {
    match &st.closed {
        None => None,
        Some(Closed::Retired) => Some(None),
        Some(Closed::Failed(e)) => Some(Some(Err(e.replicate()))),
    }
}

/// What the worker should do next.
enum Step {
    /// Make this many sockets per lane.
    Fill([usize; 2]),
    Exit,
}

fn run_worker(worker: Arc<Worker>, ns: Netns, shared: Weak<Shared>, config: PoolConfig) {
    let watch = match ns.enter_current_thread().and_then(|()| ns.identity()) {
        Ok(identity) => Watch {
            path: ns.path().to_owned(),
            identity,
        },
        Err(e) => return fail(&worker, &shared, e),
    };
    drop(ns);
    worker.lock().joined = true;
    worker.supply.notify_all();

    loop {
        match next_step(&worker, &shared, &config, &watch) {
            Step::Exit => return,
            Step::Fill(counts) => {
                if let Err(e) = watch.check(&worker.key) {
                    return fail(&worker, &shared, e);
                }
                let made: Vec<(Family, Result<Vec<OwnedFd>>)> = Family::ALL
                    .into_iter()
                    .filter(|f| counts[f.index()] > 0)
                    .map(|f| (f, make_sockets(f, counts[f.index()], &worker.key)))
                    .collect();
                let mut st = worker.lock();
                if st.closed.is_some() {
                    return;
                }
                let mut wake = false;
                for (family, result) in made {
                    let lane = &mut st.lanes[family.index()];
                    wake |= lane.waiting > 0;
                    match result {
                        Ok(fds) => lane.ready.extend(fds),
                        Err(e) => {
                            lane.failures += 1;
                            lane.last_failure = Some(e);
                            lane.stalled = true;
                        }
                    }
                }
                drop(st);
                if wake {
                    worker.supply.notify_all();
                }
            }
        }
    }
}

/// Sleep until there is demand, the worker has been idle too long, or it is told to stop.
fn next_step(worker: &Worker, shared: &Weak<Shared>, config: &PoolConfig, watch: &Watch) -> Step {
    let mut st = worker.lock();
    loop {
        if st.closed.is_some() {
            return Step::Exit;
        }
        let mut counts = [0; 2];
        for (count, lane) in counts.iter_mut().zip(&st.lanes) {
            if !lane.stalled {
                *count = config
                    .depth
                    .max(lane.waiting)
                    .saturating_sub(lane.ready.len());
            }
        }
        if counts.iter().any(|&c| c > 0) {
            return Step::Fill(counts);
        }
        let idle = st.last_take.elapsed();
        if idle >= config.idle_timeout {
            drop(st);
            if retire(worker, shared, config) {
                return Step::Exit;
            }
            st = worker.lock();
            continue;
        }
        st.worker_sleeping = true;
        let nap = (config.idle_timeout - idle).min(LIVENESS_INTERVAL);
        let (guard, timeout) = worker
            .demand
            .wait_timeout(st, nap)
            .unwrap_or_else(PoisonError::into_inner);
        st = guard;
        st.worker_sleeping = false;
        if timeout.timed_out() && st.closed.is_none() {
            drop(st);
            if let Err(e) = watch.check(&worker.key) {
                fail(worker, shared, e);
                return Step::Exit;
            }
            st = worker.lock();
        }
    }
}

/// Leave the map and close, unless a take arrived meanwhile. Lock order: map, then state.
fn retire(worker: &Worker, shared: &Weak<Shared>, config: &PoolConfig) -> bool {
    let Some(shared) = shared.upgrade() else {
        worker.close(Closed::Retired);
        return true;
    };
    let mut workers = shared.lock_workers();
    let st = worker.lock();
    let waiting = st.lanes.iter().any(|lane| lane.waiting > 0);
    if waiting || st.last_take.elapsed() < config.idle_timeout {
        return false;
    }
    drop(st);
    remove_if_same(&mut workers, worker);
    drop(workers);
    worker.close(Closed::Retired);
    true
}

fn fail(worker: &Worker, shared: &Weak<Shared>, error: Error) {
    if let Some(shared) = shared.upgrade() {
        remove_if_same(&mut shared.lock_workers(), worker);
    }
    worker.close(Closed::Failed(error));
}

fn remove_if_same(workers: &mut HashMap<String, Arc<Worker>>, worker: &Worker) {
    if workers
        .get(&worker.key)
        .is_some_and(|w| std::ptr::eq(Arc::as_ptr(w), worker))
    {
        workers.remove(&worker.key);
    }
}

/// The namespace file the worker was started from and the namespace it named then.
struct Watch {
    path: PathBuf,
    identity: (u64, u64),
}

impl Watch {
    fn check(&self, key: &str) -> Result<()> {
        let gone = |what: String| Error::Pool {
            netns: key.to_owned(),
            reason: what,
        };
        match rustix::fs::stat(&self.path) {
            Ok(st) if (st.st_dev, st.st_ino) == self.identity => Ok(()),
            Ok(_) => Err(gone(format!(
                "{} no longer refers to the namespace (deleted or replaced)",
                self.path.display()
            ))),
            Err(e) => Err(gone(format!(
                "{} is gone ({e}); the namespace was deleted",
                self.path.display()
            ))),
        }
    }
}

fn make_sockets(family: Family, count: usize, key: &str) -> Result<Vec<OwnedFd>> {
    (0..count)
        .map(|_| {
            rustix::net::socket_with(
                family.address_family(),
                SocketType::STREAM,
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                Some(ipproto::TCP),
            )
            .map_err(|e| Error::io(format!("creating a {family:?} TCP socket in {key}"), e))
        })
        .collect()
}
