//! Ctrl-C, SIGTERM and SIGHUP end a benchmark cleanly: the first one sets a flag that
//! every load loop checks, so the run unwinds and its guards stop the servers and
//! delete the namespaces it made; a second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

pub fn install() -> Result<(), String> {
    let flag = FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        // Registered first, so it sees the flag as it was before this signal set it.
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(flag))
            .and_then(|_| signal_hook::flag::register(sig, Arc::clone(flag)))
            .map_err(|e| format!("installing the handler of signal {sig}: {e}"))?;
    }
    Ok(())
}

pub fn interrupted() -> bool {
    FLAG.get().is_some_and(|f| f.load(Ordering::Relaxed))
}

/// An error when the run was interrupted, for `?` in loops.
pub fn check() -> Result<(), String> {
    if interrupted() {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}
