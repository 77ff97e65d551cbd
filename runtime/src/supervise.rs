//! `mergend supervise <id>`: the embedded supervisor of one VM, a process of its own that
//! outlives mergend. It does what systemd does with `mergen@.service`: net-setup, the
//! guest (then configure-start), restart on failure with back-off, and on SIGTERM
//! graceful-stop then net-cleanup.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mergen_model::{atomic, Meta};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::config::RuntimeConfig;
use crate::error::{Error, Result};
use crate::guest::{self, GuestKind};
use crate::state::{self, SupervisorState};
use crate::status::VmState;
use crate::steps;

/// First restart delay; it doubles per consecutive failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A guest that ran this long before failing starts the back-off afresh.
const STABLE_RUN: Duration = Duration::from_secs(10);

enum Event {
    Stop,
    Exited(ExitStatus),
}

/// Run the supervisor until the VM stops; the error is also left in state.json.
pub fn run(config: &RuntimeConfig, id: &str) -> Result<()> {
    let meta = steps::load_meta(config, id)?;
    let paths = &meta.paths;
    for dir in [&paths.run_dir, &paths.logs_dir] {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {dir}"), e))?;
    }
    let me = std::process::id();
    atomic::write_file(&state::pid_file(paths), format!("{me}\n").as_bytes(), 0o644)
        .map_err(|e| Error::io("writing the pid file", e))?;
    let mut sup = Sup {
        config,
        meta: &meta,
        record: SupervisorState {
            state: VmState::Starting,
            message: String::new(),
            supervisor_pid: me,
            guest_pid: None,
            restarts: 0,
        },
    };
    let result = sup.supervise();
    // The pid file goes first: once the final state is visible, nobody reads this
    // (exiting) process as the VM's live supervisor.
    state::remove(&state::pid_file(paths));
    match &result {
        Err(e) => {
            log::error!("VM {id} failed: {e}");
            sup.set(VmState::Failed, e.to_string(), None);
        }
        Ok(()) => sup.set(VmState::Stopped, sup.record.message.clone(), None),
    }
    result
}

struct Sup<'a> {
    config: &'a RuntimeConfig,
    meta: &'a Meta,
    record: SupervisorState,
}

impl Sup<'_> {
    fn supervise(&mut self) -> Result<()> {
        let id = self.meta.id.clone();
        let (tx, rx) = mpsc::channel();
        let mut signals =
            Signals::new([SIGTERM, SIGINT]).map_err(|e| Error::io("signal handlers", e))?;
        let stop_tx = tx.clone();
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                let _ = stop_tx.send(Event::Stop);
            }
        });
        self.set(VmState::Starting, "net-setup".into(), None);
        if let Err(e) = steps::net_setup(self.config, self.meta) {
            self.cleanup();
            return Err(e);
        }
        let kind = GuestKind::of(self.meta, self.config)?;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = Instant::now();
            let pid = match self.launch(kind, &tx) {
                Ok(pid) => pid,
                // The first launch decides whether the VM starts at all; later ones
                // are retried like any other failure.
                Err(e) if self.record.restarts == 0 => {
                    self.cleanup();
                    return Err(e);
                }
                Err(e) => {
                    log(&format!("VM {id}: launching the guest failed: {e}"));
                    match self.back_off(&rx, &mut backoff, started, &e.to_string()) {
                        true => continue,
                        false => return self.finish(None, &rx),
                    }
                }
            };
            self.set(VmState::Running, String::new(), Some(pid));
            match rx.recv() {
                Ok(Event::Exited(status)) if status.success() => {
                    log(&format!("VM {id}: guest exited cleanly; not restarting"));
                    self.cleanup();
                    self.record.message = format!("guest exited: {status}");
                    return Ok(());
                }
                Ok(Event::Exited(status)) => {
                    let why = format!("guest exited: {status}");
                    log(&format!("VM {id}: {why}"));
                    if !self.back_off(&rx, &mut backoff, started, &why) {
                        return self.finish(None, &rx);
                    }
                }
                Ok(Event::Stop) | Err(_) => return self.finish(Some(pid), &rx),
            }
        }
    }

    /// Start the guest; a thread reports its exit on `tx`. For Firecracker, the API is
    /// configured before the guest counts as running.
    fn launch(&mut self, kind: GuestKind, tx: &mpsc::Sender<Event>) -> Result<u32> {
        let mut cmd = guest::command(kind, self.config, self.meta)?;
        let log_path = Path::new(&self.meta.paths.logs_dir).join("guest.log");
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io(format!("opening {}", log_path.display()), e))?;
        let err_file = log_file
            .try_clone()
            .map_err(|e| Error::io(format!("opening {}", log_path.display()), e))?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(err_file)
            .spawn()
            .map_err(|e| Error::io(format!("starting the guest {cmd:?}"), e))?;
        let pid = child.id();
        let exit_tx = tx.clone();
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = exit_tx.send(Event::Exited(status));
            }
        });
        if kind == GuestKind::Firecracker {
            if let Err(e) = steps::configure_start(self.config, self.meta) {
                let _ = crate::procs::terminate(pid, Duration::from_secs(2));
                return Err(e);
            }
        }
        Ok(pid)
    }

    /// Wait out the restart delay (`Restart=on-failure`); false when a stop came first.
    fn back_off(
        &mut self,
        rx: &mpsc::Receiver<Event>,
        backoff: &mut Duration,
        started: Instant,
        why: &str,
    ) -> bool {
        if started.elapsed() >= STABLE_RUN {
            *backoff = FIRST_BACKOFF;
        }
        self.record.restarts += 1;
        let msg = format!(
            "{why}; restart {} in {} ms",
            self.record.restarts,
            backoff.as_millis()
        );
        log(&format!("VM {}: {msg}", self.meta.id));
        self.set(VmState::Starting, msg, None);
        let deadline = Instant::now() + *backoff;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Err(mpsc::RecvTimeoutError::Timeout) => return true,
                Ok(Event::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return false,
                // A late exit report of an earlier guest: nothing to do.
                Ok(Event::Exited(_)) => {}
            }
        }
    }

    /// Stop requested: graceful-stop of the running guest, then net-cleanup.
    fn finish(&mut self, guest: Option<u32>, rx: &mpsc::Receiver<Event>) -> Result<()> {
        log(&format!("VM {}: stopping", self.meta.id));
        let mut result = Ok(());
        if let Some(pid) = guest {
            result = steps::graceful_stop(self.config, self.meta, pid).map(drop);
            // Let the waiter thread reap it, so no zombie outlives the stop.
            let _ = rx.recv_timeout(Duration::from_secs(5));
        }
        self.cleanup();
        self.record.message.clear();
        result
    }

    fn cleanup(&self) {
        if let Err(e) = steps::net_cleanup(self.config, &self.meta.id) {
            log(&e.to_string());
        }
    }

    fn set(&mut self, state: VmState, message: String, guest_pid: Option<u32>) {
        self.record.state = state;
        self.record.message = message;
        self.record.guest_pid = guest_pid;
        if let Err(e) = state::write(&self.meta.paths, &self.record) {
            log(&e.to_string());
        }
    }
}

/// The supervisor's stderr is the VM's supervisor.log.
fn log(line: &str) {
    log::info!("{line}");
}
