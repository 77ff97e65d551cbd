//! `meta.json`: the manager's record of a VM and the forwarder's routing source.
//!
//! Deserialisation is lenient on purpose: unknown fields are ignored, Go's `null`
//! collections read as empty, hook types and port protocols are trimmed and compared
//! case-insensitively, and a hook that cannot be read is dropped rather than hiding
//! the whole VM, so meta.json files of the original and of a newer mergend still load.
//! What mergend writes is normalised (lowercase words, no unknown keys). The forwarder
//! reads only [`RouteMeta`]. Strict validation belongs to the API's create request.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// A VM's hooks: event name (`onCreate`, `onDelete`, `onStart`, `onStop`) to hook list.
pub type Hooks = BTreeMap<String, Vec<HookSpec>>;

/// The hook events, as the original named them.
pub const HOOK_EVENTS: [&str; 4] = ["onCreate", "onDelete", "onStart", "onStop"];

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
    /// The guest port the forwarder's HTTPS listener dials (the original's later
    /// version); 0 = none, omitted.
    #[serde(
        default,
        rename = "httpPort",
        deserialize_with = "lenient_port",
        skip_serializing_if = "is_zero"
    )]
    pub http_port: u16,
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
        deserialize_with = "lenient_hooks",
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
    /// The guest port HTTPS is forwarded to; 0 = not set (the listener's own port).
    #[serde(default, rename = "httpPort", deserialize_with = "lenient_port")]
    pub http_port: u16,
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

/// A VM's record of its hooks never hides the VM: whatever cannot be read is dropped
/// (hooks.json, which is what runs, is read with warnings by mergend).
fn lenient_hooks<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Hooks, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(read_hooks(v).hooks)
}

/// Hooks read leniently from a file, with what was ignored.
#[derive(Debug, Default)]
pub struct ReadHooks {
    pub hooks: Hooks,
    /// One line per ignored event, key or hook, naming it.
    pub warnings: Vec<String>,
}

/// Read a hooks document (`{"onCreate": [...], ...}`) as the original read its hook
/// files: unknown events and unknown keys are ignored, hook types are trimmed and
/// case-insensitive; a hook that still cannot be read is ignored. Each of those is a
/// warning. Not for the create request, which is strict.
pub fn read_hooks(v: serde_json::Value) -> ReadHooks {
    let mut out = ReadHooks::default();
    let map = match v {
        serde_json::Value::Null => return out,
        serde_json::Value::Object(m) => m,
        other => {
            out.warnings.push(format!(
                "want an object of events, got {}",
                json_kind(&other)
            ));
            return out;
        }
    };
    for (event, list) in map {
        if !HOOK_EVENTS.contains(&event.as_str()) {
            out.warnings.push(format!(
                "unknown event {event:?} ignored (events: {})",
                HOOK_EVENTS.join(", ")
            ));
            continue;
        }
        let items = match list {
            serde_json::Value::Null => Vec::new(),
            serde_json::Value::Array(a) => a,
            other => {
                out.warnings.push(format!(
                    "{event}: want a list of hooks, got {}; ignored",
                    json_kind(&other)
                ));
                continue;
            }
        };
        let mut hooks = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let mut unknown = Vec::new();
            let parsed: Result<HookSpec, _> =
                serde_ignored::deserialize(item, |path| unknown.push(path.to_string()));
            for key in unknown {
                out.warnings
                    .push(format!("{event}[{i}]: unknown key {key:?} ignored"));
            }
            match parsed {
                Ok(h) => hooks.push(h),
                Err(e) => out
                    .warnings
                    .push(format!("{event}[{i}]: {e}; hook ignored")),
            }
        }
        out.hooks.insert(event, hooks);
    }
    out
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A port number as written by any version: anything that is not 0..=65535 (or
/// `null`) reads as 0, "not set", rather than hiding the VM.
fn lenient_port<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(v.as_u64().and_then(|n| u16::try_from(n).ok()).unwrap_or(0))
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

/// Go's encoding/json writes a nil slice or map as `null`: read it as empty.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Option::unwrap_or_default)
}

/// A published port's protocol. Read trimmed and case-insensitively (`"TCP"` works,
/// empty is the default tcp); written lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
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

    /// `tcp` or `udp` in any case, surrounding space ignored; empty is tcp.
    pub fn parse(s: &str) -> Option<Protocol> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("tcp") {
            Some(Protocol::Tcp)
        } else if s.eq_ignore_ascii_case("udp") {
            Some(Protocol::Udp)
        } else {
            None
        }
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        let s = String::deserialize(d)?;
        Protocol::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("protocol {s:?}: want tcp or udp")))
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

/// A hook's `type`. Read trimmed and case-insensitively (the original compared it
/// that way); written lowercase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HookType {
    Http,
    Exec,
}

impl HookType {
    pub fn as_str(self) -> &'static str {
        match self {
            HookType::Http => "http",
            HookType::Exec => "exec",
        }
    }
}

impl<'de> Deserialize<'de> for HookType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HookType, D::Error> {
        let s = String::deserialize(d)?;
        let t = s.trim();
        if t.eq_ignore_ascii_case("http") {
            Ok(HookType::Http)
        } else if t.eq_ignore_ascii_case("exec") {
            Ok(HookType::Exec)
        } else {
            Err(serde::de::Error::custom(format!(
                "hook type {s:?}: want http or exec"
            )))
        }
    }
}

/// One hook. Unknown keys are ignored when read (files of another version); the
/// create request refuses them itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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

/// The guest of a process-runtime VM: a command run inside the VM's namespace, or,
/// with `root`, an image converted by `mergen-image` booted as a VM boots it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessSpec {
    /// The command (without `root`). Omitted when empty, so files written before
    /// `root` existed (which always have one) read and write back the same bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The `rootfs/` directory of a `mergen-image` output: its own `/sbin/init`
    /// (mergen-init) runs chrooted there as PID 1 of new PID, mount and UTS namespaces,
    /// and starts the image's command as it would in a Firecracker VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
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
        for absent in [
            "dataDisk", "metadata", "tags", "hooks", "process", "httpPort",
        ] {
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
            http_port: 8080,
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
  "httpPort": 8080,
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
        m.http_port = 0;
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
        // A protocol mergen cannot publish fails the full model (mergend still
        // reserves the ports of such a file); the forwarder does not care.
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

    /// The Go version wrote hook types as the user gave them and may carry keys this
    /// version does not know: the VM stays visible, and what is written back is
    /// normalised.
    #[test]
    fn go_hook_case_and_extra_keys_read_and_normalise() {
        let doc = br#"{"id":"a","createdAt":"2025-01-02T03:04:05Z","guestIP":"172.30.0.2",
            "ports":[{"guest":80,"host":20000,"protocol":" TCP "},{"guest":53,"host":20001,"protocol":"Udp"}],
            "hooks":{"onCreate":[{"type":" HTTP ","url":"http://h/","retries":3},
                                 {"type":"Exec","cmd":["true"]},
                                 {"type":"grpc","url":"x"}],
                     "onReboot":[{"type":"exec","cmd":["true"]}]},
            "process":{"cmd":["x"],"user":"nobody"}}"#;
        let m = Meta::from_slice(doc).unwrap();
        assert_eq!(m.ports[0].protocol, Protocol::Tcp);
        assert_eq!(m.ports[1].protocol, Protocol::Udp);
        let hooks = &m.hooks["onCreate"];
        assert_eq!(hooks.len(), 2, "the unreadable grpc hook is dropped");
        assert_eq!(hooks[0].kind, HookType::Http);
        assert_eq!(hooks[1].kind, HookType::Exec);
        assert!(!m.hooks.contains_key("onReboot"));
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(
            v["hooks"]["onCreate"][0],
            serde_json::json!({"type": "http", "url": "http://h/"})
        );
        assert_eq!(v["ports"][0]["protocol"], "tcp");
        assert!(v["process"].get("user").is_none());
    }

    #[test]
    fn read_hooks_warns_about_what_it_ignores() {
        let r = read_hooks(serde_json::json!({
            "onStart": [{"type": "EXEC", "cmd": ["true"], "retries": 2}, {"type": "smtp"}],
            "onBoot": [],
            "onStop": "nope",
            "onDelete": null,
        }));
        assert_eq!(r.hooks["onStart"].len(), 1);
        assert_eq!(r.hooks["onStart"][0].kind, HookType::Exec);
        assert!(r.hooks["onDelete"].is_empty());
        let w = r.warnings.join("\n");
        for needle in ["\"retries\"", "smtp", "\"onBoot\"", "onStop: want a list"] {
            assert!(w.contains(needle), "{needle} in {w}");
        }
        assert_eq!(read_hooks(serde_json::json!([1])).warnings.len(), 1);
    }

    /// `process` as mergend wrote it before `root` existed reads and writes back byte
    /// for byte; a `root` guest has no `cmd` in the file.
    #[test]
    fn process_spec_round_trips_with_and_without_root() {
        let old = r#"{"cmd":["sleep","1"],"env":{"A":"b"},"workdir":"/srv"}"#;
        let spec: ProcessSpec = serde_json::from_str(old).unwrap();
        assert_eq!(spec.root, None);
        assert_eq!(serde_json::to_string(&spec).unwrap(), old);
        let image = ProcessSpec {
            root: Some("/var/lib/mergen/images/nginx/rootfs".into()),
            ..ProcessSpec::default()
        };
        let text = serde_json::to_string(&image).unwrap();
        assert_eq!(text, r#"{"root":"/var/lib/mergen/images/nginx/rootfs"}"#);
        assert_eq!(serde_json::from_str::<ProcessSpec>(&text).unwrap(), image);
    }

    /// The later original's `httpPort`: read by both views, and a value no port can
    /// have reads as "not set" instead of hiding the VM.
    #[test]
    fn http_port_is_read_leniently() {
        let doc = |p: &str| {
            format!(
                r#"{{"id":"a","createdAt":"2025-01-02T03:04:05Z","guestIP":"172.30.0.2","httpPort":{p}}}"#
            )
        };
        assert_eq!(
            Meta::from_slice(doc("8080").as_bytes()).unwrap().http_port,
            8080
        );
        assert_eq!(
            RouteMeta::from_slice(doc("8080").as_bytes())
                .unwrap()
                .http_port,
            8080
        );
        for bad in ["70000", "-1", "null", "\"80\""] {
            assert_eq!(
                RouteMeta::from_slice(doc(bad).as_bytes())
                    .unwrap()
                    .http_port,
                0,
                "{bad}"
            );
            assert_eq!(
                Meta::from_slice(doc(bad).as_bytes()).unwrap().http_port,
                0,
                "{bad}"
            );
        }
    }
}
