//! mergen-forwarder: the TLS edge that routes connections by SNI into VM namespaces.
//!
//! The control side (settings, ClientHello peeking, routing table, certificates,
//! metrics, admin listener) lives in plain modules; the io_uring data path in
//! [`engine`].

#![deny(unsafe_code)]

pub mod admin;
pub mod backoff;
pub mod cluster_routes;
pub mod config;
pub mod engine;
pub mod limits;
pub mod metrics;
pub mod proxy_protocol;
pub mod resolver;
pub mod sni;
pub mod tls;
/// The watcher loop the routing table and the certificate store run on.
pub use mergen_watch as watch;
