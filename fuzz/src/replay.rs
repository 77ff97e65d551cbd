//! Replays the inputs kept for a fuzz target through its check, in the normal (stable)
//! test suite: every crash input under `fuzz/regressions/<target>/` and every seed
//! under `fuzz/corpus-seeds/<target>/`. Compiled into each owning crate's tests with
//! `#[path]`, so the test runs exactly the check the fuzzer runs.

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Run `check` on every kept input of `target`; panics naming each input that fails,
/// or when there is nothing to replay (a misspelt target must not pass silently).
pub fn replay(target: &str, check: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut inputs: Vec<PathBuf> = Vec::new();
    for kind in ["regressions", "corpus-seeds"] {
        let dir = fuzz.join(kind).join(target);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("reading a kept-input directory").path();
            if path.is_file() && !is_note(&path) {
                inputs.push(path);
            }
        }
    }
    inputs.sort();
    assert!(
        !inputs.is_empty(),
        "no kept inputs for fuzz target {target}"
    );
    let mut failed = Vec::new();
    for path in &inputs {
        let bytes = fs::read(path).expect("reading a kept input");
        if panic::catch_unwind(AssertUnwindSafe(|| check(&bytes))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} kept inputs of {target} fail its check: {failed:#?}",
        failed.len(),
        inputs.len()
    );
}

/// A README beside the inputs says where they came from; it is not an input.
fn is_note(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "md")
}
