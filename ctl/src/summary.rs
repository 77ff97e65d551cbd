//! The VM summary of `GET /v1/vms[/:id]`, in the original's shape. What comes from
//! meta.json is rendered once, when the index reads the file ([`Rendered`]); what the
//! supervisor reports (state, supervisor, systemd) and whether the Firecracker socket
//! exists are written per request around it. Listing 10,000 VMs then copies bytes
//! instead of formatting 10,000 records (dates, escaped paths, maps) on every call.
//!
//! Every byte is still produced by serde: each part is a serialised object whose braces
//! are cut where the parts join, so escaping and key names have one source.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileTypeExt;

use mergen_model::{Meta, Paths, PortBinding};
use mergen_runtime::{SupervisorInfo, SystemdInfo, VmState, VmStatus};
use serde::Serialize;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;

/// A VM's state and supervisor blocks as shown in its summary.
pub struct StatusView {
    pub state: VmState,
    pub supervisor: SupervisorView,
    pub systemd: SystemdInfo,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum SupervisorView {
    Known(SupervisorInfo),
    /// No supervisor could be asked.
    Unavailable {
        kind: &'static str,
        active: bool,
    },
}

impl From<VmStatus> for StatusView {
    fn from(s: VmStatus) -> StatusView {
        StatusView {
            state: s.state,
            supervisor: SupervisorView::Known(s.supervisor),
            systemd: s.systemd,
        }
    }
}

/// The summary's keys in order: `id`, `createdAt` (head); `state`, `supervisor`,
/// `systemd` (live); `firecracker` (socket path, then whether it is present); `network`,
/// `httpPort` (omitted when 0), `paths`, `metadata`, `tags` (tail).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Head<'a> {
    id: &'a str,
    created_at: String,
}

#[derive(Serialize)]
struct Live<'a> {
    state: VmState,
    supervisor: &'a SupervisorView,
    systemd: &'a SystemdInfo,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Socket<'a> {
    socket_path: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Tail<'a> {
    network: Network<'a>,
    /// The later original's per-VM HTTP port; omitted when 0, as in meta.json.
    #[serde(skip_serializing_if = "is_zero")]
    http_port: u16,
    paths: &'a Paths,
    metadata: &'a serde_json::Map<String, Value>,
    tags: &'a BTreeMap<String, String>,
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Network<'a> {
    #[serde(rename = "guestIP")]
    guest_ip: std::net::Ipv4Addr,
    ports: &'a [PortBinding],
    tap_name: &'a str,
    netns: &'a str,
}

/// The serialised members of `value`, an object: its JSON without the outer braces.
fn members(value: &impl Serialize) -> Vec<u8> {
    let mut out = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    debug_assert!(out.first() == Some(&b'{') && out.last() == Some(&b'}'));
    out.pop();
    out.remove(0);
    out
}

/// The parts of a VM's summary that come from its meta.json, serialised.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// `{"id":…,"createdAt":…,`
    head: Box<[u8]>,
    /// `"firecracker":{"socketPath":…,"socketPresent":`
    socket: Box<[u8]>,
    /// `},"network":…,"paths":…,"metadata":…,"tags":…}`
    tail: Box<[u8]>,
    socket_path: Box<str>,
}

impl Rendered {
    pub fn new(meta: &Meta) -> Rendered {
        let mut head = b"{".to_vec();
        head.extend(members(&Head {
            id: &meta.id,
            created_at: meta.created_at.format(&Rfc3339).unwrap_or_default(),
        }));
        head.push(b',');
        let mut socket = br#""firecracker":{"#.to_vec();
        socket.extend(members(&Socket {
            socket_path: &meta.paths.socket_path,
        }));
        socket.extend(br#","socketPresent":"#);
        let mut tail = b"},".to_vec();
        tail.extend(members(&Tail {
            network: Network {
                guest_ip: meta.guest_ip,
                ports: &meta.ports,
                tap_name: &meta.tap_name,
                netns: &meta.netns,
            },
            http_port: meta.http_port,
            paths: &meta.paths,
            metadata: &meta.metadata,
            tags: &meta.tags,
        }));
        tail.push(b'}');
        Rendered {
            head: head.into(),
            socket: socket.into(),
            tail: tail.into(),
            socket_path: meta.paths.socket_path.as_str().into(),
        }
    }

    /// Bytes this summary takes besides its live part (for sizing a buffer).
    fn len(&self) -> usize {
        self.head.len() + self.socket.len() + self.tail.len()
    }

    /// Whether the VM's Firecracker socket exists. Under the jailer the socket path is
    /// a symlink into the chroot: it is followed.
    pub fn socket_present(&self) -> bool {
        fs::metadata(&*self.socket_path).is_ok_and(|m| m.file_type().is_socket())
    }

    /// Append the whole summary with `status` and `socket_present`.
    pub fn write(&self, status: &StatusView, socket_present: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.head);
        out.extend(members(&Live {
            state: status.state,
            supervisor: &status.supervisor,
            systemd: &status.systemd,
        }));
        out.push(b',');
        out.extend_from_slice(&self.socket);
        out.extend_from_slice(if socket_present { b"true" } else { b"false" });
        out.extend_from_slice(&self.tail);
    }
}

/// A response body already serialised as JSON (with the trailing newline every mergen
/// API body has).
pub struct Json(pub Vec<u8>);

/// The body of `GET /v1/vms/:id`.
pub fn one(rendered: &Rendered, status: &StatusView, socket_present: bool) -> Json {
    let mut out = Vec::with_capacity(rendered.len() + 512);
    rendered.write(status, socket_present, &mut out);
    out.push(b'\n');
    Json(out)
}

/// Summaries joined by commas, in the order given: one stretch of a list's items.
pub fn items<'a>(
    items: impl ExactSizeIterator<Item = (&'a Rendered, StatusView, bool)>,
) -> Vec<u8> {
    let count = items.len();
    let mut out = Vec::new();
    for (i, (rendered, status, socket_present)) in items.enumerate() {
        if i == 0 {
            // Sized from the first: summaries differ little, and growing a buffer of
            // megabytes by doubling would copy it over and over.
            out.reserve((rendered.len() + 512) * count);
        } else {
            out.push(b',');
        }
        rendered.write(&status, socket_present, &mut out);
    }
    out
}

/// The body of `GET /v1/vms`: `{"items":[…]}`, the stretches of [`items`] in order.
pub fn list(stretches: Vec<Vec<u8>>) -> Json {
    let len = stretches.iter().map(|s| s.len() + 1).sum::<usize>();
    let mut out = Vec::with_capacity(len + 16);
    out.extend_from_slice(br#"{"items":["#);
    for s in stretches.iter().filter(|s| !s.is_empty()) {
        if out.len() > br#"{"items":["#.len() {
            out.push(b',');
        }
        out.extend_from_slice(s);
    }
    out.extend_from_slice(b"]}\n");
    Json(out)
}

#[cfg(test)]
mod tests {
    use mergen_model::Protocol;
    use mergen_runtime::SupervisorKind;
    use serde_json::json;

    use super::*;

    const ID: &str = "084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6";

    fn meta(http_port: u16) -> Meta {
        Meta {
            ports: vec![PortBinding {
                guest: 80,
                host: 20000,
                protocol: Protocol::Tcp,
            }],
            http_port,
            metadata: serde_json::from_str(r#"{"team":"core \"q\"","n":1}"#).unwrap(),
            tags: [("app".to_string(), "web\n1".to_string())].into(),
            ..crate::sample::meta(ID)
        }
    }

    fn running() -> StatusView {
        StatusView {
            state: VmState::Running,
            supervisor: SupervisorView::Known(SupervisorInfo {
                kind: SupervisorKind::Embedded,
                active: true,
                pid: Some(42),
            }),
            systemd: SystemdInfo {
                available: false,
                unit: format!("mergen@{ID}.service"),
                ..SystemdInfo::default()
            },
        }
    }

    fn unavailable() -> StatusView {
        StatusView {
            state: VmState::Stopped,
            supervisor: SupervisorView::Unavailable {
                kind: "unavailable",
                active: false,
            },
            systemd: SystemdInfo::default(),
        }
    }

    /// The summary, field by field, as the original shows it.
    fn expected(m: &Meta, status: &StatusView, present: bool) -> Value {
        let mut v = json!({
            "id": m.id,
            "createdAt": "2025-01-02T03:04:05.5Z",
            "state": status.state,
            "supervisor": status.supervisor,
            "systemd": status.systemd,
            "firecracker": {"socketPath": m.paths.socket_path, "socketPresent": present},
            "network": {
                "guestIP": "172.30.0.2",
                "ports": [{"guest": 80, "host": 20000, "protocol": "tcp"}],
                "tapName": "tap-084604f6",
                "netns": "mergen-084604f6",
            },
            "paths": m.paths,
            "metadata": m.metadata,
            "tags": m.tags,
        });
        if m.http_port != 0 {
            v["httpPort"] = json!(m.http_port);
        }
        v
    }

    #[test]
    fn parts_join_into_the_originals_summary() {
        for (m, status, present) in [
            (meta(0), running(), true),
            (meta(8080), unavailable(), false),
        ] {
            let rendered = Rendered::new(&m);
            let body = one(&rendered, &status, present).0;
            assert_eq!(body.last(), Some(&b'\n'));
            let text = std::str::from_utf8(&body).unwrap();
            let got: Value = serde_json::from_str(text).unwrap();
            assert_eq!(got, expected(&m, &status, present), "{text}");
            // The original's key order.
            let keys = [
                "\"id\"",
                "\"createdAt\"",
                "\"state\"",
                "\"supervisor\"",
                "\"systemd\"",
                "\"firecracker\"",
                "\"network\"",
                "\"paths\"",
                "\"metadata\"",
                "\"tags\"",
            ];
            let at: Vec<usize> = keys.iter().map(|k| text.find(k).unwrap()).collect();
            assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
        }
    }

    #[test]
    fn a_list_is_its_summaries_in_order() {
        let (a, b) = (meta(0), meta(8080));
        let (ra, rb) = (Rendered::new(&a), Rendered::new(&b));
        let want = json!({"items": [
            expected(&a, &running(), false),
            expected(&b, &unavailable(), true),
            expected(&a, &unavailable(), true),
        ]});
        let all = || {
            vec![
                (&ra, running(), false),
                (&rb, unavailable(), true),
                (&ra, unavailable(), true),
            ]
        };
        // However the items are cut into stretches, empty ones included.
        for cut in 0..=all().len() {
            let mut first = all();
            let second = first.split_off(cut);
            let body = list(vec![
                items(first.into_iter()),
                Vec::new(),
                items(second.into_iter()),
            ])
            .0;
            let got: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(got, want, "cut at {cut}");
        }
        assert_eq!(list(Vec::new()).0, b"{\"items\":[]}\n");
        assert_eq!(list(vec![Vec::new()]).0, b"{\"items\":[]}\n");
    }
}
