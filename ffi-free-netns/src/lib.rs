//! Named network namespaces in safe Rust (filled in by issue 3).
#![forbid(unsafe_code)]
