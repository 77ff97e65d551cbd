//! The `meta_json` fuzz target, replayed on stable: every crash input kept under
//! `fuzz/regressions/meta_json/` and every seed under `fuzz/corpus-seeds/meta_json/`
//! goes through the check the fuzzer runs (`fuzz/src/meta_json.rs`).

#[path = "../../fuzz/src/meta_json.rs"]
mod meta_json;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn meta_json_kept_inputs() {
    replay::replay("meta_json", meta_json::check);
}
