//! The one inotify loop: the forwarder runs its routing table (VM directories) and its
//! certificate store (the certificate's directory, plus SIGHUP) on it.
//!
//! A watcher thread sleeps in `poll(2)` on an inotify instance (and, optionally, a
//! signal pipe), reads whatever arrived, and hands it to its owner's handler as one
//! [`Wake`]. The handler says how long it may sleep next; the thread never sleeps longer
//! than [`LIVENESS_CHECK`], so a handler whose owner is gone (it returns `None`) ends
//! its thread within a second.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use inotify::{EventMask, EventOwned, Inotify, Watches};
use rustix::event::{poll, PollFd, PollFlags, Timespec};

/// The longest a watcher sleeps before asking its handler whether to go on.
pub const LIVENESS_CHECK: Duration = Duration::from_secs(1);

/// Why a handler runs.
#[derive(Debug)]
pub enum Wake {
    /// Files changed. `lost` is set when the kernel's queue overflowed or could not be
    /// read: events are missing, so only a full rescan is right.
    Files { events: Vec<EventOwned>, lost: bool },
    /// The signal pipe was written (SIGHUP).
    Signal,
    /// Nothing happened within the wait the handler asked for (or `LIVENESS_CHECK`).
    Timeout,
}

/// Run `handle` on a thread named `name` until it returns `None`. `handle` gets the
/// instance's watch list (to add and remove watches) and what woke it, and returns how
/// long the thread may wait for the next event.
pub fn spawn(
    name: &str,
    inotify: Inotify,
    signal: Option<UnixStream>,
    mut handle: impl FnMut(&mut Watches, Wake) -> Option<Duration> + Send + 'static,
) -> io::Result<()> {
    if let Some(s) = &signal {
        s.set_nonblocking(true)?;
    }
    let mut watches = inotify.watches();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut inotify = inotify;
            let mut buf = vec![0u8; 64 * 1024];
            let mut wait = LIVENESS_CHECK;
            loop {
                let (files, signalled) = wait_ready(&inotify, signal.as_ref(), wait);
                let mut wakes = Vec::with_capacity(2);
                if signalled {
                    drain_signal(signal.as_ref());
                    wakes.push(Wake::Signal);
                }
                if files {
                    let (events, lost) = drain(&mut inotify, &mut buf);
                    wakes.push(Wake::Files { events, lost });
                }
                if wakes.is_empty() {
                    wakes.push(Wake::Timeout);
                }
                for wake in wakes {
                    match handle(&mut watches, wake) {
                        Some(next) => wait = next.min(LIVENESS_CHECK),
                        None => return,
                    }
                }
            }
        })?;
    Ok(())
}

/// Wait up to `timeout`; returns (inotify readable, signal pipe readable).
fn wait_ready(inotify: &Inotify, signal: Option<&UnixStream>, timeout: Duration) -> (bool, bool) {
    let ts = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    let mut fds = Vec::with_capacity(2);
    fds.push(PollFd::new(inotify, PollFlags::IN));
    if let Some(s) = signal {
        fds.push(PollFd::new(s, PollFlags::IN));
    }
    if !matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0) {
        return (false, false);
    }
    let ready = |i: usize| fds.get(i).is_some_and(|f| !f.revents().is_empty());
    (ready(0), ready(1))
}

/// Every event queued now, and whether some were lost (the kernel's queue overflowed or
/// could not be read). Never blocks: the kernel queues an event before the call that
/// caused it returns, so after a drain every change completed before it has been seen.
pub fn drain(inotify: &mut Inotify, buf: &mut [u8]) -> (Vec<EventOwned>, bool) {
    let mut events = Vec::new();
    let mut lost = false;
    loop {
        match inotify.read_events(buf) {
            Ok(batch) => {
                let before = events.len();
                for ev in batch {
                    lost |= ev.mask.contains(EventMask::Q_OVERFLOW);
                    events.push(ev.to_owned());
                }
                if events.len() == before {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                log::warn!(error = e.to_string(); "inotify read failed, rescanning");
                lost = true;
                break;
            }
        }
    }
    (events, lost)
}

fn drain_signal(signal: Option<&UnixStream>) {
    if let Some(mut s) = signal {
        let mut b = [0u8; 64];
        while matches!(s.read(&mut b), Ok(n) if n > 0) {}
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::mpsc;

    use inotify::WatchMask;
    use mergen_testkit::TempDir;

    use super::*;

    #[test]
    fn files_signals_and_timeouts_reach_the_handler_until_it_stops() {
        let dir = TempDir::new("dp-watch");
        let inotify = Inotify::init().expect("inotify");
        inotify
            .watches()
            .add(dir.path(), WatchMask::CLOSE_WRITE)
            .expect("watch");
        let (rx, mut tx) = UnixStream::pair().expect("pipe");
        let (seen_tx, seen) = mpsc::channel();
        spawn("test-watch", inotify, Some(rx), move |_, wake| {
            let what = match wake {
                Wake::Files { events, .. } => format!("files:{}", events.len()),
                Wake::Signal => "signal".to_string(),
                Wake::Timeout => "timeout".to_string(),
            };
            let stop = what == "signal";
            seen_tx.send(what).ok()?;
            (!stop).then_some(Duration::from_millis(20))
        })
        .expect("spawn");
        let next = || seen.recv_timeout(Duration::from_secs(5)).expect("a wake");
        assert_eq!(next(), "timeout");
        std::fs::write(dir.join("a"), b"x").expect("write");
        while next() != "files:1" {}
        tx.write_all(b"!").expect("signal");
        while next() != "signal" {}
        // The handler returned None: the thread is gone and drops its sender.
        assert!(seen.recv_timeout(Duration::from_secs(5)).is_err());
    }
}
