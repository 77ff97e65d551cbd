//! Test plumbing shared by the workspace's tests (a dev-dependency; the benchmarks use
//! its TLS client too).
//!
//! Everything here is safe to use from tests that run in parallel threads of one binary
//! and from binaries of different crates running at once: names carry the pid and a
//! per-process counter, ports come from the kernel, and whatever is created on the
//! host is removed by a Drop guard, even when the test panics.

#![deny(unsafe_code)]

mod child;
mod cmd;
pub mod etcd;
mod guest_init;
mod lan;
mod metrics;
mod names;
mod net;
pub mod nginx;
#[cfg(feature = "oci")]
pub mod oci;
#[cfg(feature = "pki")]
pub mod pki;
mod process;
mod rng;
mod root;
mod tempdir;
#[cfg(feature = "tls")]
pub mod tls;
mod wait;

pub use child::ChildGuard;
pub use cmd::{curl_get, in_netns, run_out};
pub use guest_init::{busybox_rootfs, have_busybox, init_in_namespaces, static_init};
pub use lan::Lan;
pub use metrics::metric_value;
pub use names::{next, unique_name};
pub use net::{connect_from, free_port};
pub use process::{first_child, mounts_naming, running};
pub use rng::XorShift;
pub use root::{is_root, skip_unless_root};
pub use tempdir::TempDir;
pub use wait::{eventually, poll, wait_for};
