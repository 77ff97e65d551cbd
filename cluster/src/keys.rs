//! The key layout under the configured prefix (default `/mergen`):
//!
//! ```text
//! <prefix>/v1/hosts/<host>      HostRecord (JSON)   bound to the host's lease
//! <prefix>/v1/vms/<id>          VmRecord (JSON)     bound to the owning host's lease
//! <prefix>/v1/aliases/<alias>   <host> (plain)      bound to the owning host's lease
//! ```
//!
//! An alias key is the cluster-wide claim on a name: its value is the host whose VMs
//! answer to it. Several VMs of one host may share an alias (the oldest answers, as on
//! one host); VMs of two hosts may not. Everything a host wrote is bound to its lease,
//! so a host that stops renewing it loses its routes and its claims at once.

/// The keys of one cluster, under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// Keys under `prefix` (`/mergen` by default); a trailing `/` is ignored.
    pub fn new(prefix: &str) -> Keys {
        Keys {
            root: format!("{}/v1/", prefix.trim_end_matches('/')),
        }
    }

    /// Everything of the cluster: what a forwarder watches.
    pub fn all(&self) -> &str {
        &self.root
    }

    pub fn hosts(&self) -> String {
        format!("{}hosts/", self.root)
    }

    pub fn vms(&self) -> String {
        format!("{}vms/", self.root)
    }

    pub fn aliases(&self) -> String {
        format!("{}aliases/", self.root)
    }

    pub fn host(&self, name: &str) -> String {
        format!("{}hosts/{name}", self.root)
    }

    pub fn vm(&self, id: &str) -> String {
        format!("{}vms/{id}", self.root)
    }

    pub fn alias(&self, alias: &str) -> String {
        format!("{}aliases/{alias}", self.root)
    }

    /// What a key under [`Keys::all`] names.
    pub fn parse<'k>(&self, key: &'k str) -> Option<Key<'k>> {
        let rest = key.strip_prefix(self.root.as_str())?;
        let (kind, name) = rest.split_once('/')?;
        if name.is_empty() {
            return None;
        }
        match kind {
            "hosts" => Some(Key::Host(name)),
            "vms" => Some(Key::Vm(name)),
            "aliases" => Some(Key::Alias(name)),
            _ => None,
        }
    }
}

/// A key of the layout, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key<'k> {
    Host(&'k str),
    Vm(&'k str),
    Alias(&'k str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_parse() {
        let k = Keys::new("/mergen/");
        assert_eq!(k.all(), "/mergen/v1/");
        assert_eq!(k.host("a"), "/mergen/v1/hosts/a");
        assert_eq!(k.vm("x"), "/mergen/v1/vms/x");
        assert_eq!(k.alias("app1"), "/mergen/v1/aliases/app1");
        assert_eq!(k.parse("/mergen/v1/hosts/a"), Some(Key::Host("a")));
        assert_eq!(k.parse("/mergen/v1/vms/x"), Some(Key::Vm("x")));
        assert_eq!(k.parse("/mergen/v1/aliases/a/b"), Some(Key::Alias("a/b")));
        assert_eq!(k.parse("/mergen/v1/vms/"), None);
        assert_eq!(k.parse("/mergen/v1/other/x"), None);
        assert_eq!(k.parse("/other/v1/vms/x"), None);
        assert_eq!(Keys::new("/t/1").vm("x"), "/t/1/v1/vms/x");
    }
}
