//! Named network namespaces (iproute2-compatible), namespace-bound TCP socket pools and
//! netlink link helpers, in safe Rust: no thread of the caller ever changes namespace.
#![forbid(unsafe_code)]

mod error;
mod factory;
pub mod links;
mod netns;
mod rtnl;

pub use error::{Error, Result};
pub use factory::{Family, PoolConfig, SocketPool};
pub use netns::{create, delete, exists, list, open, open_path, Netns};
