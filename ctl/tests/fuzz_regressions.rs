//! The `ctl_create` fuzz target, replayed on stable: every crash input kept under
//! `fuzz/regressions/ctl_create/` and every seed under `fuzz/corpus-seeds/ctl_create/`
//! goes through the check the fuzzer runs (`fuzz/src/ctl_create.rs`).

#[path = "../../fuzz/src/ctl_create.rs"]
mod ctl_create;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn ctl_create_kept_inputs() {
    replay::replay("ctl_create", ctl_create::check);
}
