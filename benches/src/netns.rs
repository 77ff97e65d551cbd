//! `mergen-bench netns [--iterations N]`: nanoseconds per socket that lives in another
//! network namespace, three ways, measured in one run:
//! - pool pop: `SocketPool::take` with the socket already queued;
//! - setns+socket+setns: the dialing thread enters the namespace, makes the socket, returns;
//! - thread round trip: ask the namespace's worker thread for one socket and wait for it;
//! - try_take pop: `SocketPool::try_take` (the forwarder's non-blocking take) on a full queue;
//! - cold try_take: `try_take` on a namespace with no worker yet: what the forwarder's
//!   worker thread pays before it parks the dial (resolving the namespace, handing the
//!   new worker to the pool's launcher thread);
//! - cold take: the blocking `take` on a namespace with no worker yet: what a worker
//!   thread would wait for without `try_take`.
//!
//! The methods run in interleaved rounds so drifting load on this shared machine hits all
//! three alike. Every socket is timed on its own: the mean includes the occasional wake-up
//! of a worker thread (and any preemption), the median shows the typical cost. Each
//! sample includes one clock read (~20-30 ns).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ffi_free_netns::{Family, Netns, PoolConfig, SocketPool, Wake};
use rustix::net::{ipproto, AddressFamily, SocketFlags, SocketType};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

const DEFAULT_ITERATIONS: usize = 20_000;
const MAX_ITERATIONS: usize = 1_000_000;
const ROUNDS: usize = 5;
/// Pool pops are timed in batches of this many, each started on a full queue.
const BATCH: usize = 64;
const REFILL_DEADLINE: Duration = Duration::from_secs(10);
/// Cold takes per round: each starts (and later retires) a pool thread.
const COLD_PER_ROUND: usize = 40;

pub fn run(args: &[String]) -> Result<(), String> {
    let iterations = parse_iterations(args)?;
    if !rustix::process::geteuid().is_root() {
        return Err("needs root (it creates a network namespace)".into());
    }
    let name = format!("mb-{}", std::process::id());
    let ns = ffi_free_netns::create(&name).map_err(|e| e.to_string())?;
    let _cleanup = Cleanup(name.clone());

    let pop_pool = SocketPool::new(PoolConfig {
        depth: BATCH,
        idle_timeout: Duration::from_secs(600),
        ..PoolConfig::default()
    });
    // Depth 0: nothing is queued ahead, so every take is a request to the worker.
    let trip_pool = SocketPool::new(PoolConfig {
        depth: 0,
        idle_timeout: Duration::from_secs(600),
        ..PoolConfig::default()
    });
    pop_pool.prewarm(&name).map_err(|e| e.to_string())?;
    trip_pool.prewarm(&name).map_err(|e| e.to_string())?;

    let per_round = (iterations / ROUNDS).max(BATCH);
    let mut pop = Samples::default();
    let mut setns = Samples::default();
    let mut trip = Samples::default();
    let cold_pools = (
        SocketPool::new(PoolConfig::default()),
        SocketPool::new(PoolConfig::default()),
    );
    let mut try_pop = Samples::default();
    let mut cold_try = Samples::default();
    let mut cold_take = Samples::default();
    for _ in 0..ROUNDS {
        pool_pop(&pop_pool, &name, per_round, &mut pop)?;
        setns_dial(&ns, per_round, &mut setns)?;
        round_trip(&trip_pool, &name, per_round, &mut trip)?;
        try_take_pop(&pop_pool, &name, per_round, &mut try_pop)?;
        cold_takes(&cold_pools, &name, &mut cold_try, &mut cold_take)?;
    }

    println!(
        "netns socket acquisition, {ROUNDS} interleaved rounds x {per_round} sockets each \
         ({COLD_PER_ROUND} for the cold rows)"
    );
    println!(
        "{:<20} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "method", "mean ns", "p50 ns", "p99 ns", "mean vs pop", "p50 vs pop"
    );
    let (pop_mean, pop_p50) = (pop.mean(), pop.percentile(50));
    for (label, samples) in [
        ("pool pop", &mut pop),
        ("setns+socket+setns", &mut setns),
        ("thread round trip", &mut trip),
        ("try_take pop", &mut try_pop),
        ("cold try_take", &mut cold_try),
        ("cold take", &mut cold_take),
    ] {
        let (mean, p50, p99) = (
            samples.mean(),
            samples.percentile(50),
            samples.percentile(99),
        );
        println!(
            "{label:<20} {mean:>10.0} {p50:>10} {p99:>10} {:>11.1}x {:>11.1}x",
            mean / pop_mean,
            p50 as f64 / pop_p50 as f64
        );
    }
    Ok(())
}

/// Per-socket durations in nanoseconds.
#[derive(Default)]
struct Samples(Vec<u64>);

impl Samples {
    fn mean(&self) -> f64 {
        self.0.iter().sum::<u64>() as f64 / self.0.len().max(1) as f64
    }

    fn percentile(&mut self, p: usize) -> u64 {
        self.0.sort_unstable();
        let rank = (self.0.len() * p / 100).min(self.0.len().saturating_sub(1));
        self.0.get(rank).copied().unwrap_or(0).max(1)
    }
}

fn parse_iterations(args: &[String]) -> Result<usize, String> {
    match args {
        [] => Ok(DEFAULT_ITERATIONS),
        [flag, value] if flag == "--iterations" => {
            let n: usize = value
                .parse()
                .map_err(|_| format!("--iterations wants a number, got {value:?}"))?;
            if n == 0 || n > MAX_ITERATIONS {
                return Err(format!("--iterations must be 1..={MAX_ITERATIONS}"));
            }
            Ok(n)
        }
        _ => Err("usage: mergen-bench netns [--iterations N]".into()),
    }
}

/// Time `make` per socket, in batches (each after `prepare`); the sockets are held until
/// the batch ends and closed untimed.
fn per_socket(
    count: usize,
    samples: &mut Samples,
    mut prepare: impl FnMut() -> Result<(), String>,
    mut make: impl FnMut() -> Result<OwnedFd, String>,
) -> Result<(), String> {
    let mut held = Vec::with_capacity(BATCH);
    let mut done = 0;
    while done < count {
        prepare()?;
        let batch = BATCH.min(count - done);
        for _ in 0..batch {
            let start = Instant::now();
            let fd = make()?;
            samples.0.push(start.elapsed().as_nanos() as u64);
            held.push(fd);
        }
        held.clear();
        done += batch;
    }
    Ok(())
}

/// Pops from a full queue.
fn pool_pop(pool: &SocketPool, name: &str, count: usize, out: &mut Samples) -> Result<(), String> {
    per_socket(count, out, || wait_full(pool, name), || take(pool, name))
}

/// Requests to a worker that keeps nothing queued, each waited for.
fn round_trip(
    pool: &SocketPool,
    name: &str,
    count: usize,
    out: &mut Samples,
) -> Result<(), String> {
    per_socket(count, out, || Ok(()), || take(pool, name))
}

/// Non-blocking takes from a full queue.
fn try_take_pop(
    pool: &SocketPool,
    name: &str,
    count: usize,
    out: &mut Samples,
) -> Result<(), String> {
    let wake: Wake = Arc::new(|| {});
    per_socket(
        count,
        out,
        || wait_full(pool, name),
        || {
            pool.try_take(name, Family::V4, &wake)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "try_take found a full queue empty".to_string())
        },
    )
}

/// First takes on a namespace whose worker was just stopped (`forget`): a non-blocking
/// one (it returns empty-handed) and a blocking one (it waits for the new thread's socket).
/// The pools live across samples, like the forwarder's, so the non-blocking pool's
/// launcher thread is already running.
fn cold_takes(
    pools: &(SocketPool, SocketPool),
    name: &str,
    try_out: &mut Samples,
    take_out: &mut Samples,
) -> Result<(), String> {
    let wake: Wake = Arc::new(|| {});
    let (try_pool, take_pool) = pools;
    for _ in 0..COLD_PER_ROUND {
        try_pool.forget(name);
        let start = Instant::now();
        let got = try_pool
            .try_take(name, Family::V4, &wake)
            .map_err(|e| e.to_string())?;
        try_out.0.push(start.elapsed().as_nanos() as u64);
        drop(got);

        take_pool.forget(name);
        let start = Instant::now();
        let fd = take(take_pool, name)?;
        take_out.0.push(start.elapsed().as_nanos() as u64);
        drop(fd);
    }
    Ok(())
}

fn take(pool: &SocketPool, name: &str) -> Result<OwnedFd, String> {
    pool.take(name, Family::V4).map_err(|e| e.to_string())
}

fn wait_full(pool: &SocketPool, name: &str) -> Result<(), String> {
    let deadline = Instant::now() + REFILL_DEADLINE;
    while pool.ready(name, Family::V4) < BATCH {
        if Instant::now() > deadline {
            return Err("the pool did not refill in time".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok(())
}

/// Enter the namespace, make the socket, come back, every time. Runs on its own thread so
/// a failure can never leave the caller's thread in the namespace.
fn setns_dial(ns: &Netns, count: usize, out: &mut Samples) -> Result<(), String> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let home = Netns::current_thread().map_err(|e| e.to_string())?;
                per_socket(
                    count,
                    out,
                    || Ok(()),
                    || {
                        enter(ns)?;
                        let made = tcp_socket();
                        enter(&home)?;
                        made
                    },
                )
            })
            .join()
            .map_err(|_| "the setns thread panicked".to_string())?
    })
}

fn enter(ns: &Netns) -> Result<(), String> {
    move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))
        .map_err(|e| format!("setns into {}: {e}", ns.name()))
}

fn tcp_socket() -> Result<OwnedFd, String> {
    rustix::net::socket_with(
        AddressFamily::INET,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        Some(ipproto::TCP),
    )
    .map_err(|e| format!("socket: {e}"))
}

/// Removes the benchmark's namespace however the run ends.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Err(e) = ffi_free_netns::delete(&self.0) {
            eprintln!("mergen-bench netns: removing namespace {}: {e}", self.0);
        }
    }
}
