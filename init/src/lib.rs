//! mergen-init: the guest's PID 1.
//!
//! Boot order (see `main.rs`): decide what kind of PID 1 this is ([`system::Mode`]),
//! mount the base filesystems, set the hostname and the network from the kernel's
//! `ip=` argument, read `image-meta.json`, start the image's command as the image's
//! user in its own process group, forward signals to it, reap every zombie, and when
//! the command exits stop what is left, sync, and power the VM off.
//!
//! Only a VM's init ever calls reboot(2): PID 1 of the *initial* PID namespace. PID 1
//! of any other PID namespace (a container, a test) exits with the command's code,
//! and a process that is not PID 1 touches nothing outside its own children.

#![deny(unsafe_code)]

pub mod cmdline;
pub mod exec_as;
pub mod spec;
pub mod supervise;
pub mod system;
pub mod users;

/// One line on the console, prefixed so it stands out among the guest's own output.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("mergen-init: {}", format_args!($($arg)*))
    };
}
