//! The one HTTP/1.1 implementation of mergen, on `httparse`.
//!
//! - [`request`]: request heads with bounded size and field count, body framing
//!   (Content-Length, or `Transfer-Encoding: chunked` under the same limit), and a
//!   sans-IO [`RequestReader`] that turns a connection's bytes into requests;
//! - [`response`]: status, headers and a Content-Length body, JSON and text helpers,
//!   the `{"error", "message"}` error shape;
//! - [`server`]: an event loop (mio) that owns every connection, with handlers on a
//!   bounded worker pool, deadlines, per-address and global connection caps, and
//!   graceful shutdown (mergend's API, the forwarder's admin listener);
//! - [`client`]: a blocking client over a unix socket with keep-alive (Firecracker's
//!   API);
//! - [`listen`]: listen addresses, `:PORT` meaning dual-stack.

#![deny(unsafe_code)]

pub mod chunked;
pub mod client;
pub mod listen;
pub mod request;
pub mod response;
pub mod server;

pub use client::{ClientError, ClientResponse, UnixClient};
pub use listen::ListenAddr;
pub use request::{Head, Limits, Progress, Request, RequestError, RequestReader};
pub use response::Response;
pub use server::{
    Cap, Handler, QuickHandler, RefusedRequest, Running, Server, ServerConfig, ServerStats,
    StatsSnapshot,
};
