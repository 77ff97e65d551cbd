//! The worker pool: handlers run here, off the event loop, so a handler that takes
//! seconds (a strict hook, a supervisor call) holds one worker and nothing else.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use mio::Waker;

use crate::request::Request;
use crate::response::Response;
use crate::server::Handler;

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

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

pub(super) struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// Wakes the loop after answers were sent, once per batch: the loop clears `pending`
/// before it drains the channel, so an answer sent meanwhile wakes it again.
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
    pub fn start(
        name: &str,
        workers: usize,
        handler: Arc<Handler>,
        done: Sender<Finished>,
        notify: Notify,
    ) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
        });
        let notify = Arc::new(notify);
        let mut threads = Vec::with_capacity(workers);
        for i in 0..workers.max(1) {
            let shared = Arc::clone(&shared);
            let handler = Arc::clone(&handler);
            let done = done.clone();
            let notify = Arc::clone(&notify);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-w{i}"))
                    .spawn(move || work(&shared, &*handler, &done, &notify))?,
            );
        }
        Ok(Pool { shared, threads })
    }

    pub fn submit(&self, job: Job) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.jobs.push_back(job);
        drop(q);
        self.shared.ready.notify_one();
    }

    /// Let the workers finish what is queued and exit. With `join`, wait for them
    /// (only when nothing can still be running a handler).
    pub fn close(self, join: bool) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closed = true;
        self.shared.ready.notify_all();
        if join {
            for t in self.threads {
                let _ = t.join();
            }
        }
    }
}

fn work(shared: &Shared, handler: &Handler, done: &Sender<Finished>, notify: &Notify) {
    loop {
        let job = {
            let mut q = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.closed {
                    return;
                }
                q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        let head = &job.request.head;
        let (version, head_only, keep_alive) =
            (head.version, head.method == "HEAD", head.keep_alive());
        let response = catch_unwind(AssertUnwindSafe(|| handler(&job.request))).unwrap_or_else(|_| {
            log::error!(method = job.request.head.method, path = job.request.head.path; "request handler panicked");
            Response::error(500, "internal_error", "the request handler panicked")
        });
        let finished = Finished {
            key: job.key,
            serial: job.serial,
            response,
            version,
            head_only,
            keep_alive,
        };
        if done.send(finished).is_err() {
            // The loop is gone (shutdown timed out): nobody to answer.
            return;
        }
        notify.wake();
    }
}
