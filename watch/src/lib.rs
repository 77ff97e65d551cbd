//! Following the VM store's files, for both of its readers: the forwarder's routing
//! table and mergend's index of the VMs.
//!
//! - [`spawn`]: the one inotify watcher loop (a thread asleep in `poll(2)` until files
//!   change, a signal arrives or its handler's timeout passes). mergend runs no loop:
//!   it [`drain`]s its instance when it needs to be current.
//! - [`VmDirs`]: which watch is which directory of a root of VM directories, and what a
//!   batch of events means for a table of their `meta.json` files.
//! - [`Stamp`] and [`read_changed`]: re-read a file only when it changed.
//! - [`map_parallel`], [`map_slices`]: a cold load of thousands of VM directories, or a
//!   list of thousands of VMs, spread over the cores.

#![deny(unsafe_code)]

mod bulk;
mod stamp;
mod thread;
mod vmdirs;

pub use bulk::{map_parallel, map_slices};
pub use stamp::{read_changed, Read, Stamp};
pub use thread::{drain, spawn, Wake, LIVENESS_CHECK};
pub use vmdirs::{is_candidate, Changes, VmDirs, META_FILE};
