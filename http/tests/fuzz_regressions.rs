//! The `http_request` fuzz target, replayed on stable: every crash input kept under
//! `fuzz/regressions/http_request/` and every seed under
//! `fuzz/corpus-seeds/http_request/` goes through the check the fuzzer runs
//! (`fuzz/src/http_request.rs`).

#[path = "../../fuzz/src/http_request.rs"]
mod http_request;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn http_request_kept_inputs() {
    replay::replay("http_request", http_request::check);
}
