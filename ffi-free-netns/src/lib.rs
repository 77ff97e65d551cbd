//! Named network namespaces (iproute2-compatible), namespace-bound TCP socket pools and
//! netlink link helpers, in safe Rust: no thread of the caller ever changes namespace.
//!
//! ```no_run
//! use std::net::{IpAddr, Ipv4Addr};
//! use ffi_free_netns::{links, Family, PoolConfig, SocketPool};
//!
//! # fn main() -> ffi_free_netns::Result<()> {
//! let ns = ffi_free_netns::create("mergen-0123abcd")?; // like `ip netns add`, lo is up
//! links::create_veth(None, "veth-host", "veth-vm", Some(&ns))?;
//! links::add_address(Some(&ns), "veth-vm", IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 30)?;
//! links::set_up(Some(&ns), "veth-vm")?;
//! links::create_tap(&ns, "tap-0123abcd")?;
//!
//! // A non-blocking TCP socket living in the namespace, popped from a ready queue.
//! let pool = SocketPool::new(PoolConfig::default());
//! let socket = pool.take("mergen-0123abcd", Family::V4)?;
//! # drop(socket);
//! let port = ns.run(|| std::net::TcpListener::bind("127.0.0.1:0"))?;
//! # drop(port);
//! pool.forget("mergen-0123abcd");
//! ffi_free_netns::delete("mergen-0123abcd")?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

mod error;
mod factory;
pub mod links;
mod netns;
pub mod ports;
mod rtnl;

pub use error::{Error, Result};
pub use factory::{Family, PoolConfig, SocketPool, Wake};
pub use netns::{create, delete, exists, list, open, open_path, Netns};
