//! Namespace-bound socket factories: one worker thread per namespace sits inside it and
//! keeps a few ready TCP sockets per configured address family, so a caller gets a socket
//! that lives in that namespace with a queue pop instead of a setns or a thread round trip.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{
    mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    Weak,
};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
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
    /// Families kept `depth` deep in the background. A take of another family still
    /// works: the worker makes that socket on demand, as for a cold pool.
    pub families: Vec<Family>,
}

impl PoolConfig {
    /// How many ready sockets the worker keeps for `family` without being asked.
    fn depth_for(&self, family: Family) -> usize {
        if self.families.contains(&family) {
            self.depth
        } else {
            0
        }
    }
}

impl Default for PoolConfig {
    fn default() -> PoolConfig {
        PoolConfig {
            depth: 8,
            idle_timeout: Duration::from_secs(60),
            families: Family::ALL.to_vec(),
        }
    }
}

/// Called by the pool once after a [`SocketPool::try_take`] came back empty: a socket is
/// ready for that (namespace, family), or the worker stopped. Either way the caller should
/// try again. It runs on the pool's worker thread, so it must be quick (e.g. write to an
/// eventfd the caller's event loop watches).
pub type Wake = Arc<dyn Fn() + Send + Sync>;

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
    /// Read-locked by takers; written only when a worker starts or goes.
    workers: RwLock<HashMap<String, Arc<Worker>>>,
    /// Started by the first `try_take` that needs a worker; it exits when the pool goes.
    launcher: Mutex<Option<mpsc::Sender<Launch>>>,
}

/// Who starts a new worker's thread.
#[derive(Clone, Copy)]
enum Start {
    /// The caller, which is about to wait for the worker anyway.
    Inline,
    /// The launcher thread, so a non-blocking taker does not pay for a thread spawn.
    Launcher,
}

/// A worker whose thread is yet to be started.
struct Launch {
    worker: Arc<Worker>,
    ns: Netns,
    shared: Weak<Shared>,
    config: PoolConfig,
}

impl Launch {
    fn spawn(self) -> std::io::Result<()> {
        let Launch {
            worker,
            ns,
            shared,
            config,
        } = self;
        std::thread::Builder::new()
            .name("netns-pool".into())
            .spawn(move || run_worker(worker, ns, shared, config))
            .map(drop)
    }
}

fn run_launcher(launches: mpsc::Receiver<Launch>) {
    for launch in launches {
        let (worker, shared) = (Arc::clone(&launch.worker), launch.shared.clone());
        if let Err(e) = launch.spawn() {
            let key = worker.key.clone();
            fail(
                &worker,
                &shared,
                Error::io(format!("spawning the socket worker for {key}"), e),
            );
        }
    }
}

/// The hot path (a pop from a non-empty queue) touches only the lock-free queues and
/// atomics, so a taker never waits for the worker thread to be scheduled. Everything
/// else goes through `state`.
struct Worker {
    /// The caller's name or path for the namespace: the key in `Shared::workers`.
    key: String,
    /// Ready sockets per family.
    ready: [ArrayQueue<OwnedFd>; 2],
    /// Set once `state.closed` is set: sends takers to the slow path.
    closed: AtomicBool,
    /// Set while the worker sleeps on `demand`, so takers wake it only when needed.
    sleeping: AtomicBool,
    /// Takers blocked in `take_slow` (all families), so the worker wakes them per socket.
    waiters: AtomicUsize,
    /// Per family: some `Lane::wakers` are registered, so the worker calls them per socket.
    wake_pending: [AtomicBool; 2],
    /// Nanoseconds since `epoch` of the latest take.
    last_take: AtomicU64,
    epoch: Instant,
    state: Mutex<State>,
    /// The worker thread waits here for demand.
    demand: Condvar,
    /// Takers wait here for sockets.
    supply: Condvar,
}

struct State {
    lanes: [Lane; 2],
    joined: bool,
    closed: Option<Closed>,
}

#[derive(Default)]
struct Lane {
    /// Takers blocked on an empty queue.
    waiting: usize,
    /// Bumped on every failed socket(): waiters compare it to learn their request failed.
    failures: u64,
    last_failure: Option<Error>,
    /// No background refill after a failure until a taker asks again.
    stalled: bool,
    /// Non-blocking takers to call back when a socket is ready or the worker stops.
    wakers: Vec<Wake>,
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
                workers: RwLock::new(HashMap::new()),
                launcher: Mutex::new(None),
            }),
        }
    }

    /// Pop a ready socket; if the pool is empty, ask the worker and wait for it.
    /// `netns` is a namespace name (looked up like [`netns::open`]) or an absolute path.
    pub fn take(&self, netns: &str, family: Family) -> Result<OwnedFd> {
        loop {
            let worker = self.worker(netns, Start::Inline)?;
            if let Some(result) = worker.take(family, self.shared.config.depth_for(family)) {
                return result;
            }
        }
    }

    /// Pop a ready socket without ever waiting. When none is queued, ask the worker for
    /// more (starting it if needed), register `wake` and return `Ok(None)`: `wake` is then
    /// called once, when a socket for `family` is queued or the worker stops, and the
    /// caller should try again. Errors are immediate: a namespace that cannot be opened,
    /// a stopped worker, or a refill that failed since the last try.
    pub fn try_take(&self, netns: &str, family: Family, wake: &Wake) -> Result<Option<OwnedFd>> {
        loop {
            let worker = self.worker(netns, Start::Launcher)?;
            let depth = self.shared.config.depth_for(family);
            if let Some(result) = worker.try_take(family, depth, wake) {
                return result;
            }
        }
    }

    /// Start the worker for `netns` (it fills its pool in the background) and wait until it
    /// has joined the namespace.
    pub fn prewarm(&self, netns: &str) -> Result<()> {
        loop {
            let worker = self.worker(netns, Start::Inline)?;
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
        let worker = self.shared.write_workers().remove(netns);
        if let Some(worker) = worker {
            worker.close(Closed::Failed(Error::Pool {
                netns: netns.to_owned(),
                reason: "forgotten by its owner".into(),
            }));
        }
    }

    /// Ready sockets queued for `netns` and `family` right now (0 when no worker runs).
    pub fn ready(&self, netns: &str, family: Family) -> usize {
        match self.shared.read_workers().get(netns) {
            Some(worker) => worker.ready[family.index()].len(),
            None => 0,
        }
    }

    fn worker(&self, netns: &str, start: Start) -> Result<Arc<Worker>> {
        if let Some(worker) = self.shared.read_workers().get(netns) {
            return Ok(Arc::clone(worker));
        }
        // Resolve on the caller's thread, outside the lock: a missing namespace is an
        // immediate error and costs no thread.
        let ns = resolve(netns)?;
        let mut workers = self.shared.write_workers();
        if let Some(worker) = workers.get(netns) {
            return Ok(Arc::clone(worker));
        }
        // A zero depth still needs room to hand a socket to a waiting taker.
        let capacity = self.shared.config.depth.max(1);
        let worker = Arc::new(Worker {
            key: netns.to_owned(),
            ready: [ArrayQueue::new(capacity), ArrayQueue::new(capacity)],
            closed: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
            wake_pending: [AtomicBool::new(false), AtomicBool::new(false)],
            last_take: AtomicU64::new(0),
            epoch: Instant::now(),
            state: Mutex::new(State {
                lanes: Default::default(),
                joined: false,
                closed: None,
            }),
            demand: Condvar::new(),
            supply: Condvar::new(),
        });
        let launch = Launch {
            worker: Arc::clone(&worker),
            ns,
            shared: Arc::downgrade(&self.shared),
            config: self.shared.config.clone(),
        };
        let spawned = match start {
            Start::Inline => launch.spawn(),
            Start::Launcher => self.launch(launch),
        };
        spawned.map_err(|e| Error::io(format!("spawning the socket worker for {netns}"), e))?;
        workers.insert(netns.to_owned(), Arc::clone(&worker));
        Ok(worker)
    }

    /// Hand `launch` to the launcher thread, starting that on first use.
    fn launch(&self, launch: Launch) -> std::io::Result<()> {
        let mut launcher = self
            .shared
            .launcher
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let tx = match launcher.take() {
            Some(tx) => tx,
            None => {
                let (tx, rx) = mpsc::channel();
                std::thread::Builder::new()
                    .name("netns-pool-start".into())
                    .spawn(move || run_launcher(rx))?;
                tx
            }
        };
        match tx.send(launch) {
            Ok(()) => {
                *launcher = Some(tx);
                Ok(())
            }
            // The launcher is gone (it never exits while the pool lives): start it here;
            // the next launch starts a new launcher.
            Err(mpsc::SendError(launch)) => launch.spawn(),
        }
    }
}

type WorkerMap = HashMap<String, Arc<Worker>>;

impl Shared {
    fn read_workers(&self) -> RwLockReadGuard<'_, WorkerMap> {
        self.workers.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_workers(&self) -> RwLockWriteGuard<'_, WorkerMap> {
        self.workers.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        for (_, worker) in self.write_workers().drain() {
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
        match self.pop(i, depth) {
            Some(fd) => Some(Ok(fd)),
            None => self.take_slow(i),
        }
    }

    /// The lock-free hot path: a pop from a live worker's queue.
    fn pop(&self, i: usize, depth: usize) -> Option<OwnedFd> {
        self.last_take
            .store(self.epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let fd = self.ready[i].pop()?;
        // Pairs with the fence in `next_step`: either the worker sees this pop, or we see
        // it asleep and wake it. Waking only at the low-water mark keeps most pops free
        // of system calls; a lane not kept ready (depth 0) has nothing to refill.
        fence(Ordering::SeqCst);
        if depth > 0 && self.ready[i].len() <= depth / 2 && self.sleeping.load(Ordering::Relaxed) {
            let _st = self.lock();
            self.demand.notify_one();
        }
        Some(fd)
    }

    /// Like `take`, but registers `wake` instead of waiting when the queue is empty.
    fn try_take(
        &self,
        family: Family,
        depth: usize,
        wake: &Wake,
    ) -> Option<Result<Option<OwnedFd>>> {
        let i = family.index();
        if let Some(fd) = self.pop(i, depth) {
            return Some(Ok(Some(fd)));
        }
        let mut st = self.lock();
        if let Some(done) = closed_result(&st) {
            return done.map(|r| r.map(Some));
        }
        let lane = &mut st.lanes[i];
        if lane.stalled {
            // Report the failed refill once; the next try asks the worker again.
            lane.stalled = false;
            if let Some(e) = &lane.last_failure {
                return Some(Err(e.replicate()));
            }
        }
        if !lane.wakers.iter().any(|w| Arc::ptr_eq(w, wake)) {
            lane.wakers.push(Arc::clone(wake));
        }
        self.wake_pending[i].store(true, Ordering::Relaxed);
        // Pairs with the fence in `fill`: either the worker sees the flag after its push,
        // or this pop finds the socket it pushed.
        fence(Ordering::SeqCst);
        self.demand.notify_one();
        Some(Ok(self.ready[i].pop()))
    }

    /// Call (outside the lock) the wakers of lane `i`.
    fn wake(&self, i: usize) {
        let wakers = {
            let mut st = self.lock();
            self.wake_pending[i].store(false, Ordering::Relaxed);
            std::mem::take(&mut st.lanes[i].wakers)
        };
        for wake in wakers {
            wake();
        }
    }

    /// Wait for the worker: the queue is empty or the worker is closed.
    fn take_slow(&self, i: usize) -> Option<Result<OwnedFd>> {
        let mut st = self.lock();
        if let Some(done) = closed_result(&st) {
            return done;
        }
        let failures = st.lanes[i].failures;
        st.lanes[i].waiting += 1;
        st.lanes[i].stalled = false;
        self.waiters.fetch_add(1, Ordering::Relaxed);
        // Pairs with the fence in `fill`.
        fence(Ordering::SeqCst);
        self.demand.notify_one();
        let result = loop {
            if let Some(done) = closed_result(&st) {
                break done;
            }
            // The worker takes the lock before notifying, so a push after this pop attempt
            // is followed by a notification this wait receives.
            if let Some(fd) = self.ready[i].pop() {
                break Some(Ok(fd));
            }
            let lane = &st.lanes[i];
            if lane.failures != failures {
                break lane.last_failure.as_ref().map(|e| Err(e.replicate()));
            }
            st = self.supply.wait(st).unwrap_or_else(PoisonError::into_inner);
        };
        st.lanes[i].waiting -= 1;
        self.waiters.fetch_sub(1, Ordering::Relaxed);
        result
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_nanos(self.last_take.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    fn close(&self, reason: Closed) {
        {
            let mut st = self.lock();
            if st.closed.is_none() {
                st.closed = Some(reason);
            }
            self.closed.store(true, Ordering::Release);
        }
        for queue in &self.ready {
            while queue.pop().is_some() {}
        }
        self.demand.notify_all();
        self.supply.notify_all();
        for i in 0..self.ready.len() {
            self.wake(i);
        }
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
    log::debug!("socket worker for {} joined its namespace", worker.key);

    loop {
        match next_step(&worker, &shared, &config, &watch) {
            Step::Exit => return,
            Step::Fill(counts) => {
                if let Err(e) = watch.check(&worker.key) {
                    return fail(&worker, &shared, e);
                }
                let failed = fill(&worker, counts);
                let mut st = worker.lock();
                if st.closed.is_some() {
                    drop(st);
                    worker.close(Closed::Retired);
                    return;
                }
                let mut wake = Vec::new();
                for (family, e) in failed {
                    let lane = &mut st.lanes[family.index()];
                    lane.failures += 1;
                    lane.last_failure = Some(e);
                    lane.stalled = true;
                    wake.push(family.index());
                }
                if st.lanes.iter().any(|lane| lane.waiting > 0) {
                    worker.supply.notify_all();
                }
                drop(st);
                // Non-blocking takers learn of the failure from their next try.
                for i in wake {
                    worker.wake(i);
                }
            }
        }
    }
}

/// Make and queue `counts` sockets per family; returns the families whose socket() failed.
fn fill(worker: &Worker, counts: [usize; 2]) -> Vec<(Family, Error)> {
    let mut failed = Vec::new();
    let mut yielded = false;
    for family in Family::ALL {
        let queue = &worker.ready[family.index()];
        for _ in 0..counts[family.index()] {
            match make_socket(family, &worker.key) {
                // Counts never exceed the free room, and only this thread pushes.
                Ok(fd) => drop(queue.push(fd)),
                Err(e) => {
                    failed.push((family, e));
                    break;
                }
            }
            // Pairs with the fences in `Worker::take_slow` and `Worker::try_take`: a
            // taker either finds this socket or is counted (or registered) here.
            fence(Ordering::SeqCst);
            let waking = worker.wake_pending[family.index()].load(Ordering::Relaxed);
            if waking {
                worker.wake(family.index());
            }
            if worker.waiters.load(Ordering::Relaxed) > 0 {
                let _st = worker.lock();
                worker.supply.notify_all();
            } else if !waking && !yielded {
                // Background refill: give the CPU back once, so a taker that woke this
                // thread (and was preempted by it) runs now, not after the whole refill.
                // Yielding after every socket would instead leave the queue short for
                // longer whenever the CPU is contended.
                yielded = true;
                std::thread::yield_now();
            }
        }
    }
    failed
}

/// Sleep until there is demand, the worker has been idle too long, or it is told to stop.
fn next_step(worker: &Worker, shared: &Weak<Shared>, config: &PoolConfig, watch: &Watch) -> Step {
    let mut st = worker.lock();
    loop {
        if st.closed.is_some() {
            return Step::Exit;
        }
        worker.sleeping.store(true, Ordering::Relaxed);
        // Pairs with the fence in `Worker::take`.
        fence(Ordering::SeqCst);
        let mut counts = [0; 2];
        for ((count, lane), family) in counts.iter_mut().zip(&st.lanes).zip(Family::ALL) {
            if !lane.stalled {
                let queue = &worker.ready[family.index()];
                // A registered waker stands for at least one socket wanted now.
                let wanted = lane.waiting.max(usize::from(!lane.wakers.is_empty()));
                let want = config.depth_for(family).max(wanted).min(queue.capacity());
                *count = want.saturating_sub(queue.len());
            }
        }
        if counts.iter().any(|&c| c > 0) {
            worker.sleeping.store(false, Ordering::Relaxed);
            return Step::Fill(counts);
        }
        let idle = worker.idle_for();
        if idle >= config.idle_timeout {
            worker.sleeping.store(false, Ordering::Relaxed);
            drop(st);
            if retire(worker, shared, config) {
                return Step::Exit;
            }
            st = worker.lock();
            continue;
        }
        let nap = (config.idle_timeout - idle).min(LIVENESS_INTERVAL);
        let (guard, timeout) = worker
            .demand
            .wait_timeout(st, nap)
            .unwrap_or_else(PoisonError::into_inner);
        st = guard;
        worker.sleeping.store(false, Ordering::Relaxed);
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
    let mut workers = shared.write_workers();
    let st = worker.lock();
    let waiting = st
        .lanes
        .iter()
        .any(|lane| lane.waiting > 0 || !lane.wakers.is_empty());
    if waiting || worker.idle_for() < config.idle_timeout {
        return false;
    }
    drop(st);
    remove_if_same(&mut workers, worker);
    drop(workers);
    worker.close(Closed::Retired);
    log::debug!("socket worker for {} retired after being idle", worker.key);
    true
}

fn fail(worker: &Worker, shared: &Weak<Shared>, error: Error) {
    log::warn!("socket worker for {} stopped: {error}", worker.key);
    if let Some(shared) = shared.upgrade() {
        remove_if_same(&mut shared.write_workers(), worker);
    }
    worker.close(Closed::Failed(error));
}

fn remove_if_same(workers: &mut WorkerMap, worker: &Worker) {
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

fn make_socket(family: Family, key: &str) -> Result<OwnedFd> {
    rustix::net::socket_with(
        family.address_family(),
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        Some(ipproto::TCP),
    )
    .map_err(|e| Error::io(format!("creating a {family:?} TCP socket in {key}"), e))
}
