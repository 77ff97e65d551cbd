//! mergend's fuzz targets, replayed on stable: every crash input kept under
//! `fuzz/regressions/<target>/` and every seed under `fuzz/corpus-seeds/<target>/`
//! goes through the check the fuzzer runs (`fuzz/src/<target>.rs`).

#[path = "../../fuzz/src/ctl_create.rs"]
mod ctl_create;
#[path = "../../fuzz/src/hook_template.rs"]
mod hook_template;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn ctl_create_kept_inputs() {
    replay::replay("ctl_create", ctl_create::check);
}

#[test]
fn hook_template_kept_inputs() {
    replay::replay("hook_template", hook_template::check);
}
