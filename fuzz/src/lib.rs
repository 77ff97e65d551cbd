//! The checks mergen's fuzz targets run. Each module has one `check(&[u8])` that
//! panics when a property fails; `fuzz_targets/` calls it under libFuzzer, and the
//! owning crate's stable tests replay every kept input through the same file (see
//! `replay.rs`), so a crash found here stays a test everywhere.

pub mod client_hello;
pub mod ctl_create;
pub mod hook_template;
pub mod http_request;
pub mod meta_json;
pub mod pg_preamble;
