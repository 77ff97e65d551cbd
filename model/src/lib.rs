//! The on-disk data model of mergen, shared by the control plane (`mergend`) and the
//! dataplane (`mergen-forwarder`).
//!
//! `meta.json` is the interface between the two daemons, so its shape lives here and
//! nowhere else. Field names follow the original Go project (camelCase); see
//! `shared/spec/compatibility.md`.

#![deny(unsafe_code)]

pub mod alias;
pub mod atomic;
pub mod cidr;
pub mod domain;
pub mod layout;
pub mod meta;
pub mod names;
pub mod vmconfig;

pub use alias::{aliases, ALIAS_KEYS};
pub use cidr::Ipv4Cidr;
pub use layout::Roots;
pub use meta::{
    read_hooks, HookSpec, HookType, Hooks, Meta, Paths, PortBinding, ProcessSpec, Protocol,
    ReadHooks, RouteMeta, HOOK_EVENTS,
};
pub use vmconfig::VmConfig;
