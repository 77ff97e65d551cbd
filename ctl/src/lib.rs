//! mergend, the control-plane daemon: an HTTP/1.1 API (on mergen-http) over the VM store,
//! race-free allocation, per-VM locks, lifecycle hooks and the runtime's supervisor.

#![deny(unsafe_code)]

pub mod alloc;
pub mod api;
pub mod config;
pub mod error;
pub mod gotmpl;
pub mod hooks;
pub mod hostports;
pub mod index;
pub mod lock;
pub mod metrics;
pub mod request;
pub mod respond;
pub mod router;
#[cfg(test)]
mod sample;
pub mod store;
pub mod summary;
