//! Lifecycle hooks: `http` (POST the JSON context, want a 2xx) and `exec` (argv, no
//! shell), their URL and argv items Go templates over the VM. Global hook files run
//! before the VM's own hooks.
//!
//! Timeouts as the original: a hook's `timeoutMs` when set, otherwise none of its own,
//! and all the hooks of one event share a 20 s budget. Strict hooks (mergen's
//! addition) run before the response, in order, and their failure fails the call.
//! The others of one VM and event run in the background as one batch, in order, on a
//! small fixed pool of workers behind a bounded queue (batches of different VMs run in
//! parallel; a full queue drops the batch with a warning).

mod exec;
pub mod http;

use std::fs;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mergen_model::{HookSpec, HookType, Hooks, Meta, Paths};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::gotmpl::{Struct, Template, Value};
use crate::metrics::Metrics;
use http::HttpClient;

/// All the hooks of one event, as the original bounded them.
pub const EVENT_BUDGET: Duration = Duration::from_secs(20);
const QUEUE: usize = 1024;

/// What a hook is told about the VM: the JSON body of http hooks and the data of the
/// templates.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HookContext {
    pub id: String,
    pub host_ports: Vec<u16>,
    pub guest_ports: Vec<u16>,
    #[serde(rename = "guestIP")]
    pub guest_ip: String,
    pub created_at: String,
    pub paths: Paths,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Not in the original's body; added after its keys so one receiver can serve
    /// several events.
    pub event: String,
    #[serde(skip)]
    pub created: OffsetDateTime,
}

impl HookContext {
    pub fn new(event: &str, meta: &Meta) -> HookContext {
        HookContext {
            id: meta.id.clone(),
            host_ports: meta.ports.iter().map(|p| p.host).collect(),
            guest_ports: meta.ports.iter().map(|p| p.guest).collect(),
            guest_ip: meta.guest_ip.to_string(),
            created_at: meta.created_at.format(&Rfc3339).unwrap_or_default(),
            paths: meta.paths.clone(),
            metadata: meta.metadata.clone(),
            event: event.to_string(),
            created: meta.created_at,
        }
    }

    /// The data of the templates, shaped like the original's Go struct: `ID`,
    /// `HostPorts`, `GuestPorts`, `GuestIP`, `CreatedAt` (a time.Time), `Paths`,
    /// `Metadata` (a map[string]any), and mergen's `Event`.
    pub fn template_data(&self) -> Value {
        let p = &self.paths;
        let s = |v: &str| Value::Str(v.to_string());
        let ports = |l: &[u16]| Value::List(l.iter().map(|p| Value::Int(i64::from(*p))).collect());
        Value::Struct(Struct {
            type_name: "hooks.Context",
            fields: vec![
                ("ID", s(&self.id)),
                ("HostPorts", ports(&self.host_ports)),
                ("GuestPorts", ports(&self.guest_ports)),
                ("GuestIP", s(&self.guest_ip)),
                ("CreatedAt", Value::Time(self.created)),
                (
                    "Paths",
                    Value::Struct(Struct {
                        type_name: "store.Paths",
                        fields: vec![
                            ("ConfigDir", s(&p.config_dir)),
                            ("VMConfigPath", s(&p.vm_config_path)),
                            ("MetaPath", s(&p.meta_path)),
                            ("HooksPath", s(&p.hooks_path)),
                            ("EnvPath", s(&p.env_path)),
                            ("RunDir", s(&p.run_dir)),
                            ("SocketPath", s(&p.socket_path)),
                            ("LockPath", s(&p.lock_path)),
                            ("DataDir", s(&p.data_dir)),
                            ("LogsDir", s(&p.logs_dir)),
                        ],
                    }),
                ),
                (
                    "Metadata",
                    Value::from_json(&serde_json::Value::Object(self.metadata.clone())),
                ),
                ("Event", s(&self.event)),
            ],
        })
    }

    /// A context with every field empty: the shape templates are checked against.
    pub fn shape() -> Value {
        let meta = Meta::from_slice(
            br#"{"id":"","createdAt":"1970-01-01T00:00:00Z","guestIP":"0.0.0.0"}"#,
        )
        .expect("a minimal meta.json");
        HookContext::new("", &meta).template_data()
    }
}

/// One event's non-strict hooks of one VM, run in order by one worker.
struct Batch {
    hooks: Vec<HookSpec>,
    ctx: Arc<HookContext>,
}

pub struct HookRunner {
    global_dir: PathBuf,
    queue: SyncSender<Batch>,
    metrics: Arc<Metrics>,
    client: Arc<HttpClient>,
}

impl HookRunner {
    pub fn new(global_dir: PathBuf, workers: usize, metrics: Arc<Metrics>) -> HookRunner {
        let (tx, rx) = mpsc::sync_channel::<Batch>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let client = Arc::new(HttpClient::from_env());
        for _ in 0..workers {
            let rx: Arc<Mutex<Receiver<Batch>>> = Arc::clone(&rx);
            let metrics = Arc::clone(&metrics);
            let client = Arc::clone(&client);
            thread::spawn(move || loop {
                let batch = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                    Ok(b) => b,
                    Err(_) => return,
                };
                let deadline = Instant::now() + EVENT_BUDGET;
                for hook in &batch.hooks {
                    if let Err(e) = run_counted(&client, &metrics, hook, &batch.ctx, deadline) {
                        log::warn!(id = batch.ctx.id, event = batch.ctx.event, error = e; "hook failed");
                    }
                }
            });
        }
        HookRunner {
            global_dir,
            queue: tx,
            metrics,
            client,
        }
    }

    /// The hooks of `event`: every global file (by name), then the VM's own.
    pub fn collect(&self, event: &str, vm_hooks: Option<&Hooks>) -> Vec<HookSpec> {
        let mut out = Vec::new();
        let mut files: Vec<PathBuf> = match fs::read_dir(&self.global_dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect(),
            Err(_) => Vec::new(),
        };
        files.sort();
        for f in files {
            match read_hook_file(&f) {
                Ok(Some(mut h)) => out.extend(h.remove(event).unwrap_or_default()),
                Ok(None) => {}
                Err(e) => {
                    log::warn!(file:? = f, error = e; "skipping unreadable global hook file")
                }
            }
        }
        if let Some(list) = vm_hooks.and_then(|h| h.get(event)) {
            out.extend(list.iter().cloned());
        }
        out
    }

    /// Run the hooks of `event` for `meta`: strict ones now, in order, within the
    /// event's budget (the first failure is returned and the rest are not run), then
    /// the others in the background, in order.
    pub fn run(&self, event: &str, meta: &Meta, vm_hooks: Option<&Hooks>) -> Result<(), String> {
        let hooks = self.collect(event, vm_hooks);
        if hooks.is_empty() {
            return Ok(());
        }
        let ctx = Arc::new(HookContext::new(event, meta));
        let (strict, background): (Vec<HookSpec>, Vec<HookSpec>) =
            hooks.into_iter().partition(|h| h.strict);
        let deadline = Instant::now() + EVENT_BUDGET;
        for h in &strict {
            run_counted(&self.client, &self.metrics, h, &ctx, deadline)
                .map_err(|e| format!("strict {event} hook: {e}"))?;
        }
        if !background.is_empty() {
            let n = background.len();
            let batch = Batch {
                hooks: background,
                ctx: Arc::clone(&ctx),
            };
            if self.queue.try_send(batch).is_err() {
                for _ in 0..n {
                    self.metrics.hook_result(event, "dropped", false);
                }
                log::warn!(id = meta.id, event = event, hooks = n; "hook queue full, hooks dropped");
            }
        }
        Ok(())
    }
}

/// A hook file (global, or a VM's hooks.json) read as the original read it: unknown
/// events and keys, and hooks that cannot be read, are ignored with a warning naming
/// the file. `None` when the file does not exist; an error when it is not JSON.
pub fn read_hook_file(path: &std::path::Path) -> Result<Option<Hooks>, String> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let read = mergen_model::read_hooks(v);
    for w in &read.warnings {
        log::warn!(file:? = path, warning = w; "hook file: ignored");
    }
    Ok(Some(read.hooks))
}

/// The rules one hook entry must meet, checked at create (a 400) and again before a
/// global hook runs: an http hook needs an http(s) URL, an exec hook a command, and
/// every template must parse and name only fields the context has.
pub fn check_hook(h: &HookSpec) -> Result<(), String> {
    let shape = HookContext::shape();
    let check = |what: &str, text: &str| -> Result<Template, String> {
        let t = Template::parse(text).map_err(|e| format!("{what} {text:?}: template: {e}"))?;
        t.check_fields(&shape)
            .map_err(|e| format!("{what} {text:?}: template: {e}"))?;
        Ok(t)
    };
    match h.kind {
        HookType::Http => {
            let t = check("url", &h.url)?;
            // A URL built wholly by a template is checked when it runs.
            if t.is_plain() || !h.url.trim_start().starts_with("{{") {
                let lower = h.url.trim_start().to_ascii_lowercase();
                if !(lower.starts_with("http://") || lower.starts_with("https://")) {
                    return Err(format!(
                        "url {:?} must start with http:// or https://",
                        h.url
                    ));
                }
            }
            for (k, v) in &h.headers {
                if k.is_empty() || k.contains([':', '\r', '\n', ' ']) || v.contains(['\r', '\n']) {
                    return Err(format!("invalid header {k:?}"));
                }
            }
            Ok(())
        }
        HookType::Exec => {
            if h.cmd.first().is_none_or(|c| c.is_empty()) {
                return Err("exec hooks need a non-empty cmd".into());
            }
            for (i, a) in h.cmd.iter().enumerate() {
                check(&format!("cmd[{i}]"), a)?;
            }
            Ok(())
        }
    }
}

fn run_counted(
    client: &HttpClient,
    metrics: &Metrics,
    hook: &HookSpec,
    ctx: &HookContext,
    event_deadline: Instant,
) -> Result<(), String> {
    let kind = hook.kind.as_str();
    let started = Instant::now();
    let r = run_one(client, hook, ctx, event_deadline);
    metrics.hook_result(&ctx.event, kind, r.is_ok());
    let ms = started.elapsed().as_secs_f64() * 1e3;
    match &r {
        Ok(()) => log::debug!(id = ctx.id, event = ctx.event, kind = kind, ms = ms; "hook ran"),
        Err(e) => {
            log::debug!(id = ctx.id, event = ctx.event, kind = kind, ms = ms, error = e; "hook failed")
        }
    }
    r
}

/// Render a template argument over the context.
fn render(text: &str, data: &Value) -> Result<String, String> {
    let t = Template::parse(text).map_err(|e| format!("template {text:?}: {e}"))?;
    t.execute(data)
        .map_err(|e| format!("template {text:?}: {e}"))
}

fn run_one(
    client: &HttpClient,
    hook: &HookSpec,
    ctx: &HookContext,
    event_deadline: Instant,
) -> Result<(), String> {
    check_hook(hook)?;
    let now = Instant::now();
    if now >= event_deadline {
        return Err(format!(
            "not run: the event's {} s budget is spent",
            EVENT_BUDGET.as_secs()
        ));
    }
    let deadline = match hook.timeout_ms {
        Some(ms) if ms > 0 => event_deadline.min(now + Duration::from_millis(ms)),
        _ => event_deadline,
    };
    let data = ctx.template_data();
    match hook.kind {
        HookType::Http => {
            let url = render(&hook.url, &data)?;
            let body = serde_json::to_vec(ctx).map_err(|e| e.to_string())?;
            client.post(&url, &hook.headers, &body, Some(deadline))
        }
        HookType::Exec => {
            let argv = hook
                .cmd
                .iter()
                .map(|a| render(a, &data))
                .collect::<Result<Vec<_>, _>>()?;
            let done = exec::run(&argv, Some(deadline));
            if !done.output.is_empty() {
                log::info!(
                    id = ctx.id,
                    event = ctx.event,
                    cmd = argv[0],
                    output = done.output.trim_end();
                    "exec hook output"
                );
            }
            done.ok
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The body of an http hook: the original's keys in its order, then `event`.
    #[test]
    fn http_context_body_is_the_originals() {
        let roots = mergen_model::Roots {
            config: "/c".into(),
            data: "/d".into(),
            run: "/r".into(),
        };
        let id = "084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6";
        let meta = Meta {
            id: id.into(),
            created_at: time::macros::datetime!(2025-01-02 03:04:05 UTC),
            rootfs: String::new(),
            kernel: String::new(),
            data_disk: String::new(),
            ports: vec![
                mergen_model::PortBinding {
                    guest: 80,
                    host: 20000,
                    protocol: mergen_model::Protocol::Tcp,
                },
                mergen_model::PortBinding {
                    guest: 53,
                    host: 20001,
                    protocol: mergen_model::Protocol::Udp,
                },
            ],
            http_port: 0,
            guest_ip: "172.30.0.2".parse().unwrap(),
            tap_name: String::new(),
            netns: String::new(),
            metadata: serde_json::from_str(r#"{"team":"core"}"#).unwrap(),
            tags: BTreeMap::new(),
            paths: roots.paths(id),
            hooks: Hooks::new(),
            process: None,
        };
        let body = serde_json::to_string(&HookContext::new("onStart", &meta)).unwrap();
        let d = format!("/c/{id}");
        let want = format!(
            r#"{{"id":"{id}","hostPorts":[20000,20001],"guestPorts":[80,53],"guestIP":"172.30.0.2","createdAt":"2025-01-02T03:04:05Z","paths":{{"configDir":"{d}","vmConfigPath":"{d}/vm.json","metaPath":"{d}/meta.json","hooksPath":"{d}/hooks.json","envPath":"{d}/env","runDir":"/r/{id}","socketPath":"/r/{id}/mergen.socket","lockPath":"/r/{id}.lock","dataDir":"/d/{id}","logsDir":"/d/{id}/logs"}},"metadata":{{"team":"core"}},"event":"onStart"}}"#
        );
        assert_eq!(body, want);
    }
}
