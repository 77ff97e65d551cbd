//! The worker pool: handlers run here, off the event loop, so a handler that takes
//! seconds (a strict hook, a supervisor call) holds one worker and nothing else.
//!
//! Threads follow the requests in progress, not the connections: a few are kept
//! warm, more are started when a request finds none free (up to the maximum; beyond
//! it requests wait their turn), and those above the warm few end after a while
//! without work. Idle connections never start one.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use mio::Waker;

use crate::request::Request;
use crate::response::Response;
use crate::server::Handler;

/// Workers kept even without work.
const WARM: usize = 2;
/// A worker above the warm ones ends after this long without work.
const LINGER: Duration = Duration::from_secs(10);

/// A request for a worker, and who asked: the connection's slab key and serial (the
/// key alone could name a later connection).
pub(super) struct Job {
    pub key: usize,
    pub serial: u64,
    pub request: Request,
}

/// A handler's answer, on its way back to the loop.
pub(super) struct Finished {
    pub key: usize,
    pub serial: u64,
    pub response: Response,
    /// From the request: what the answer must look like.
    pub version: u8,
    pub head_only: bool,
    pub keep_alive: bool,
}

impl Finished {
    pub fn answering(key: usize, serial: u64, request: &Request, response: Response) -> Finished {
        let head = &request.head;
        Finished {
            key,
            serial,
            response,
            version: head.version,
            head_only: head.method == "HEAD",
            keep_alive: head.keep_alive(),
        }
    }
}

/// Run a handler; a panic becomes a 500, logged with the request it failed on.
pub(super) fn run<T>(handler: impl FnOnce() -> T, request: &Request) -> T
where
    T: From<Response>,
{
    catch_unwind(AssertUnwindSafe(handler)).unwrap_or_else(|_| {
        let head = &request.head;
        log::error!(method = head.method, path = head.path; "request handler panicked");
        T::from(Response::error(
            500,
            "internal_error",
            "the request handler panicked",
        ))
    })
}

struct State {
    jobs: VecDeque<Job>,
    closed: bool,
    /// Workers alive, and how many of them wait for a job.
    workers: usize,
    waiting: usize,
}

/// What every worker shares.
struct Shared {
    name: String,
    max: usize,
    state: Mutex<State>,
    ready: Condvar,
    /// Signalled when the last worker ends.
    gone: Condvar,
    handler: Arc<Handler>,
    done: Sender<Finished>,
    notify: Notify,
}

pub(super) struct Pool {
    shared: Arc<Shared>,
}

/// Wakes the loop after an answer was sent, unless it is awake already or a wake is
/// on its way: `pending` is set from the moment the loop returns from epoll until it
/// is about to wait again, when it clears the flag and then drains the channel, so an
/// answer sent after that drain finds the flag clear and wakes it.
pub(super) struct Notify {
    pub waker: Arc<Waker>,
    pub pending: Arc<AtomicBool>,
}

impl Notify {
    fn wake(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                log::error!(error:% = e; "cannot wake the HTTP event loop");
            }
        }
    }
}

impl Pool {
    /// A pool of at most `max` workers; the warm ones start now.
    pub fn start(
        name: &str,
        max: usize,
        handler: Arc<Handler>,
        done: Sender<Finished>,
        notify: Notify,
    ) -> std::io::Result<Pool> {
        let pool = Pool {
            shared: Arc::new(Shared {
                name: name.to_string(),
                max: max.max(1),
                state: Mutex::new(State {
                    jobs: VecDeque::new(),
                    closed: false,
                    workers: 0,
                    waiting: 0,
                }),
                ready: Condvar::new(),
                gone: Condvar::new(),
                handler,
                done,
                notify,
            }),
        };
        for _ in 0..WARM.min(max.max(1)) {
            let mut st = pool.lock();
            pool.spawn(&mut st)?;
        }
        Ok(pool)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn spawn(&self, st: &mut State) -> std::io::Result<()> {
        let shared = Arc::clone(&self.shared);
        std::thread::Builder::new()
            .name(format!("{}-w", self.shared.name))
            .spawn(move || work(&shared))?;
        st.workers += 1;
        Ok(())
    }

    pub fn submit(&self, job: Job) {
        let mut st = self.lock();
        st.jobs.push_back(job);
        let waiting = st.waiting;
        // A waiting worker counts until it runs again, so a burst of jobs can find
        // fewer waiting workers than it seems: a worker starts for each job beyond
        // them.
        if st.jobs.len() > waiting && st.workers < self.shared.max {
            if let Err(e) = self.spawn(&mut st) {
                // The job waits for a running worker.
                log::warn!(server = self.shared.name, error:% = e; "cannot start a worker thread");
            }
        }
        drop(st);
        if waiting > 0 {
            self.shared.ready.notify_one();
        }
    }

    /// Let the workers finish what is queued and end. With `join`, wait for them
    /// (only when nothing can still be running a handler).
    pub fn close(self, join: bool) {
        let mut st = self.lock();
        st.closed = true;
        self.shared.ready.notify_all();
        while join && st.workers > 0 {
            st = self.shared.gone.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn work(shared: &Shared) {
    let done = shared.done.clone();
    while let Some(job) = next_job(shared) {
        let response = run(|| (shared.handler)(&job.request), &job.request);
        let finished = Finished::answering(job.key, job.serial, &job.request, response);
        // Err: the loop is gone (shutdown gave up on us), nobody to answer.
        if done.send(finished).is_ok() {
            shared.notify.wake();
        }
    }
}

/// The next job; `None` when the pool closed, or this worker is not needed any more
/// (it is then no longer counted).
fn next_job(shared: &Shared) -> Option<Job> {
    let mut st = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    let quit = |mut st: MutexGuard<'_, State>| {
        st.workers -= 1;
        if st.workers == 0 {
            shared.gone.notify_all();
        }
        None
    };
    loop {
        if let Some(job) = st.jobs.pop_front() {
            return Some(job);
        }
        if st.closed {
            return quit(st);
        }
        st.waiting += 1;
        let (guard, timeout) = shared
            .ready
            .wait_timeout(st, LINGER)
            .unwrap_or_else(|p| p.into_inner());
        st = guard;
        st.waiting -= 1;
        if timeout.timed_out() && st.jobs.is_empty() && st.workers > WARM {
            return quit(st);
        }
    }
}
