//! A VM's meta.json as mergend writes it, for the unit tests that vary a field or two
//! (`Meta { ports, ..sample::meta(id) }`).

use mergen_model::names::{netns_name, tap_name};
use mergen_model::{Meta, Roots};

/// VM `id` with the default roots, guest 172.30.0.2, a rootfs and kernel, created
/// 2025-01-02T03:04:05.5Z, and nothing else.
pub(crate) fn meta(id: &str) -> Meta {
    let roots = Roots {
        config: "/etc/mergen/vm.d".into(),
        data: "/var/lib/mergen".into(),
        run: "/run/mergen".into(),
    };
    Meta {
        id: id.into(),
        created_at: time::macros::datetime!(2025-01-02 03:04:05.5 UTC),
        rootfs: "/img/rootfs.ext4".into(),
        kernel: "/img/vmlinux".into(),
        data_disk: String::new(),
        ports: Vec::new(),
        http_port: 0,
        guest_ip: "172.30.0.2".parse().expect("an address"),
        tap_name: tap_name(id),
        netns: netns_name(id),
        metadata: Default::default(),
        tags: Default::default(),
        paths: roots.paths(id),
        hooks: Default::default(),
        process: None,
    }
}
