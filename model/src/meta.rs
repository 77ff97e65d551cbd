//! `meta.json`: the manager's record of a VM and the forwarder's routing source.
//!
//! Deserialisation is lenient on purpose: unknown fields are ignored and Go's `null`
//! collections read as empty, so meta.json files of the original and of a newer
//! mergend still load. The forwarder reads only [`RouteMeta`] (`id`, `createdAt`,
//! `guestIP`, `netns`, `tags`, `metadata`). Strict validation belongs to the API's
//! create request.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A VM's hooks: event name (`onCreate`, `onDelete`, `onStart`, `onStop`) to hook list.
pub type Hooks = BTreeMap<String, Vec<HookSpec>>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    pub id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(default)]
    pub rootfs: String,
    #[serde(default)]
    pub kernel: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data_disk: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub ports: Vec<PortBinding>,
    #[serde(rename = "guestIP")]
    pub guest_ip: Ipv4Addr,
    #[serde(default)]
    pub tap_name: String,
    #[serde(default)]
    pub netns: String,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "serde_json::Map::is_empty"
    )]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub paths: Paths,
    #[serde(
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub hooks: Hooks,
    /// Set for VMs run by the process runtime instead of Firecracker (new in mergen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessSpec>,
}

impl Meta {
    /// Parse a meta.json document.
    pub fn from_slice(bytes: &[u8]) -> serde_json::Result<Meta> {
        object_from_slice(bytes)
    }
}

/// The part of meta.json the forwarder routes by. Every other field is ignored, so a
/// VM keeps routing whatever else its meta.json holds (hook or process fields of a
/// newer mergend, a port protocol it does not know).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMeta {
    pub id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(rename = "guestIP")]
    pub guest_ip: Ipv4Addr,
    #[serde(default)]
    pub netns: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: BTreeMap<String, String>,
}

impl RouteMeta {
    /// Parse the routing fields of a meta.json document.
    pub fn from_slice(bytes: &[u8]) -> serde_json::Result<RouteMeta> {
        object_from_slice(bytes)
    }
}

/// Whether `bytes` open a JSON object. serde's derived structs also read an array of
/// field values in order, which Go's encoding/json (the original's reader) refuses.
pub fn opens_an_object(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

fn object_from_slice<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    if !opens_an_object(bytes) {
        return Err(serde::de::Error::custom("meta.json is not a JSON object"));
    }
    serde_json::from_slice(bytes)
}

/// Go's encoding/json writes a nil slice or map as `null`: read it as empty.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortBinding {
    pub guest: u16,
    pub host: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Paths {
    pub config_dir: String,
    pub vm_config_path: String,
    pub meta_path: String,
    pub hooks_path: String,
    pub env_path: String,
    pub run_dir: String,
    pub socket_path: String,
    pub lock_path: String,
    pub data_dir: String,
    pub logs_dir: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookType {
    Http,
    Exec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HookSpec {
    #[serde(rename = "type")]
    pub kind: HookType,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub strict: bool,
}

/// The guest of a process-runtime VM: a command run inside the VM's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProcessSpec {
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_meta_with_unknown_fields_parses() {
        let doc = br#"{"id":"084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6","createdAt":"2025-01-02T03:04:05.123456Z",
            "guestIP":"172.30.0.2","netns":"mergen-084604f6","tags":{"app":"app1"},"futureField":1}"#;
        let m = Meta::from_slice(doc).unwrap();
        assert_eq!(m.guest_ip, Ipv4Addr::new(172, 30, 0, 2));
        assert_eq!(m.tags["app"], "app1");
        assert!(m.metadata.is_empty());
    }

    #[test]
    fn round_trip_omits_empty_optionals() {
        let doc = br#"{"id":"a","createdAt":"2025-01-02T03:04:05Z","guestIP":"172.30.0.2"}"#;
        let m = Meta::from_slice(doc).unwrap();
        let v = serde_json::to_value(&m).unwrap();
        for absent in ["dataDisk", "metadata", "tags", "hooks", "process"] {
            assert!(v.get(absent).is_none(), "{absent} should be omitted");
        }
        assert_eq!(v["createdAt"], "2025-01-02T03:04:05Z");
        assert_eq!(
            Meta::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap(),
            m
        );
    }

    fn full_meta() -> Meta {
        let id = "084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6";
        let roots = crate::Roots {
            config: "/etc/mergen/vm.d".into(),
            data: "/var/lib/mergen".into(),
            run: "/run/mergen".into(),
        };
        let hook: HookSpec = serde_json::from_str(
            r#"{"type":"http","url":"http://127.0.0.1:9/h","timeoutMs":500,"headers":{"X-A":"b"},"strict":true}"#,
        )
        .unwrap();
        Meta {
            id: id.into(),
            created_at: time::macros::datetime!(2025-01-02 03:04:05.120 UTC),
            rootfs: "/img/rootfs.ext4".into(),
            kernel: "/img/vmlinux".into(),
            data_disk: "/img/data.ext4".into(),
            ports: vec![PortBinding {
                guest: 80,
                host: 20000,
                protocol: Protocol::Tcp,
            }],
            guest_ip: Ipv4Addr::new(172, 30, 0, 2),
            tap_name: crate::names::tap_name(id),
            netns: crate::names::netns_name(id),
            metadata: serde_json::from_str(r#"{"team":"core","n":1}"#).unwrap(),
            tags: [("app".to_string(), "app1".to_string())].into(),
            paths: roots.paths(id),
            hooks: [("onCreate".to_string(), vec![hook])].into(),
            process: None,
        }
    }

    /// The exact bytes mergend writes: the original's key order, camelCase, `guestIP`,
    /// RFC 3339 UTC with trimmed fractional seconds, two-space indent, trailing newline.
    #[test]
    fn meta_json_is_the_originals_exact_text() {
        let dir = std::env::temp_dir().join(format!("mergen-model-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("meta.json");
        crate::atomic::write_json(&path, &full_meta()).unwrap();
        let got = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let want = r#"{
  "id": "084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6",
  "createdAt": "2025-01-02T03:04:05.12Z",
  "rootfs": "/img/rootfs.ext4",
  "kernel": "/img/vmlinux",
  "dataDisk": "/img/data.ext4",
  "ports": [
    {
      "guest": 80,
      "host": 20000,
      "protocol": "tcp"
    }
  ],
  "guestIP": "172.30.0.2",
  "tapName": "tap-084604f6",
  "netns": "mergen-084604f6",
  "metadata": {
    "n": 1,
    "team": "core"
  },
  "tags": {
    "app": "app1"
  },
  "paths": {
    "configDir": "/etc/mergen/vm.d/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6",
    "vmConfigPath": "/etc/mergen/vm.d/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6/vm.json",
    "metaPath": "/etc/mergen/vm.d/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6/meta.json",
    "hooksPath": "/etc/mergen/vm.d/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6/hooks.json",
    "envPath": "/etc/mergen/vm.d/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6/env",
    "runDir": "/run/mergen/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6",
    "socketPath": "/run/mergen/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6/mergen.socket",
    "lockPath": "/run/mergen/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6.lock",
    "dataDir": "/var/lib/mergen/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6",
    "logsDir": "/var/lib/mergen/084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6/logs"
  },
  "hooks": {
    "onCreate": [
      {
        "type": "http",
        "url": "http://127.0.0.1:9/h",
        "timeoutMs": 500,
        "headers": {
          "X-A": "b"
        },
        "strict": true
      }
    ]
  }
}
"#;
        assert_eq!(got, want);
        assert_eq!(Meta::from_slice(got.as_bytes()).unwrap(), full_meta());
    }

    #[test]
    fn empty_optionals_are_omitted_from_the_text() {
        let mut m = full_meta();
        m.data_disk.clear();
        m.metadata.clear();
        m.tags.clear();
        m.hooks.clear();
        let v = serde_json::to_value(&m).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = vec![
            "id",
            "createdAt",
            "rootfs",
            "kernel",
            "ports",
            "guestIP",
            "tapName",
            "netns",
            "paths",
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
    }

    /// The original (Go) writes nil slices and maps as `null`.
    #[test]
    fn go_nulls_read_as_empty() {
        let doc =
            br#"{"id":"a","createdAt":"2025-01-02T03:04:05.123456789Z","guestIP":"172.30.0.2",
            "ports":null,"metadata":null,"tags":null,"hooks":null}"#;
        let m = Meta::from_slice(doc).unwrap();
        assert!(m.ports.is_empty() && m.metadata.is_empty() && m.tags.is_empty());
        assert!(m.hooks.is_empty());
        let r = RouteMeta::from_slice(doc).unwrap();
        assert!(r.tags.is_empty() && r.metadata.is_empty());
    }

    /// The forwarder's view ignores what it does not route by, even where the full
    /// model is strict.
    #[test]
    fn route_meta_ignores_everything_else() {
        let doc = br#"{"id":"a","createdAt":"2025-01-02T03:04:05Z","guestIP":"172.30.0.9",
            "netns":"mergen-a","tags":{"app":"x"},"metadata":{"n":1},
            "ports":[{"guest":80,"host":1,"protocol":"sctp"}],
            "hooks":{"onCreate":[{"type":"grpc","newField":1}]},"process":{"cmd":["x"],"new":1}}"#;
        assert!(Meta::from_slice(doc).is_err());
        let r = RouteMeta::from_slice(doc).unwrap();
        assert_eq!(r.guest_ip, Ipv4Addr::new(172, 30, 0, 9));
        assert_eq!(
            (r.netns.as_str(), r.tags["app"].as_str()),
            ("mergen-a", "x")
        );
        assert_eq!(r.metadata["n"], 1);
        let no_ip = br#"{"id":"a","createdAt":"2025-01-02T03:04:05Z"}"#;
        assert!(RouteMeta::from_slice(no_ip).is_err());
    }
}
