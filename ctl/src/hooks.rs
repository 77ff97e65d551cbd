//! Lifecycle hooks: `http` (POST the JSON context, want a 2xx) and `exec` (argv, no
//! shell). Global hook files run before the VM's own hooks.
//!
//! Strict hooks run before the response and their failure fails the call; the others
//! are handed to a small fixed pool of workers with a bounded queue, so they can never
//! block or fail a request (a full queue drops the hook with a warning).

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mergen_model::{HookSpec, HookType, Hooks, Meta, Paths};
use serde::Serialize;
use time::format_description::well_known::Rfc3339;

use crate::metrics::Metrics;
use crate::request::check_hook;
use crate::template::render;

const DEFAULT_TIMEOUT: Duration = Duration::from_millis(5000);
const QUEUE: usize = 1024;
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// What a hook is told about the VM: the JSON body of http hooks and the fields of
/// the exec placeholders.
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
        }
    }
}

struct Job {
    hook: HookSpec,
    ctx: Arc<HookContext>,
}

pub struct HookRunner {
    global_dir: PathBuf,
    queue: SyncSender<Job>,
    metrics: Arc<Metrics>,
}

impl HookRunner {
    pub fn new(global_dir: PathBuf, workers: usize, metrics: Arc<Metrics>) -> HookRunner {
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers {
            let rx: Arc<Mutex<Receiver<Job>>> = Arc::clone(&rx);
            let metrics = Arc::clone(&metrics);
            thread::spawn(move || loop {
                let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
                    Ok(j) => j,
                    Err(_) => return,
                };
                if let Err(e) = run_counted(&metrics, &job.hook, &job.ctx) {
                    log::warn!(id = job.ctx.id, event = job.ctx.event, error = e; "hook failed");
                }
            });
        }
        HookRunner {
            global_dir,
            queue: tx,
            metrics,
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

    /// Run the hooks of `event` for `meta`: strict ones now, in order (the first
    /// failure is returned and the rest are not run), then the others in the background.
    pub fn run(&self, event: &str, meta: &Meta, vm_hooks: Option<&Hooks>) -> Result<(), String> {
        let hooks = self.collect(event, vm_hooks);
        if hooks.is_empty() {
            return Ok(());
        }
        let ctx = Arc::new(HookContext::new(event, meta));
        for h in hooks.iter().filter(|h| h.strict) {
            run_counted(&self.metrics, h, &ctx).map_err(|e| format!("strict {event} hook: {e}"))?;
        }
        for hook in hooks.into_iter().filter(|h| !h.strict) {
            let job = Job {
                hook,
                ctx: Arc::clone(&ctx),
            };
            if self.queue.try_send(job).is_err() {
                self.metrics.hook_result(event, "dropped", false);
                log::warn!(id = meta.id, event = event; "hook queue full, hook dropped");
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

fn run_counted(metrics: &Metrics, hook: &HookSpec, ctx: &HookContext) -> Result<(), String> {
    let kind = match hook.kind {
        HookType::Http => "http",
        HookType::Exec => "exec",
    };
    let r = run_one(hook, ctx);
    metrics.hook_result(&ctx.event, kind, r.is_ok());
    match &r {
        Ok(()) => log::debug!(id = ctx.id, event = ctx.event, kind = kind; "hook ran"),
        Err(e) => {
            log::debug!(id = ctx.id, event = ctx.event, kind = kind, error = e; "hook failed")
        }
    }
    r
}

fn run_one(hook: &HookSpec, ctx: &HookContext) -> Result<(), String> {
    check_hook(hook)?;
    let timeout = match hook.timeout_ms {
        Some(ms) if ms > 0 => Duration::from_millis(ms),
        _ => DEFAULT_TIMEOUT,
    };
    match hook.kind {
        HookType::Http => {
            let url = render(&hook.url, ctx)?;
            let body = serde_json::to_vec(ctx).map_err(|e| e.to_string())?;
            http_post(&url, &hook.headers, &body, timeout)
        }
        HookType::Exec => {
            let argv = hook
                .cmd
                .iter()
                .map(|a| render(a, ctx))
                .collect::<Result<Vec<_>, _>>()?;
            exec(&argv, timeout)
        }
    }
}

/// POST `body` to an `http://` URL and want a 2xx, all within `timeout`.
fn http_post(
    url: &str,
    headers: &BTreeMap<String, String>,
    body: &[u8],
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("url {url:?} is not http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("url {url:?} has no usable host"));
    }
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("{url}: cannot resolve {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: {authority} has no address"))?;
    let left = |what: &str| -> Result<Duration, String> {
        let l = deadline.saturating_duration_since(Instant::now());
        if l.is_zero() {
            Err(format!("{url}: timed out {what}"))
        } else {
            Ok(l)
        }
    };
    let mut s = TcpStream::connect_timeout(&addr, left("connecting")?)
        .map_err(|e| format!("{url}: connect: {e}"))?;
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: mergend\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        if k.is_empty() || k.contains([':', '\r', '\n']) || v.contains(['\r', '\n']) {
            return Err(format!("invalid header {k:?}"));
        }
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.set_write_timeout(Some(left("sending")?))
        .map_err(|e| e.to_string())?;
    s.write_all(&bytes)
        .map_err(|e| format!("{url}: send: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut hs);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let code = resp.code.unwrap_or(0);
                return if (200..300).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("{url}: answered HTTP {code}"))
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_RESPONSE_HEAD => {}
            Ok(httparse::Status::Partial) => return Err(format!("{url}: response head too large")),
            Err(e) => return Err(format!("{url}: bad response: {e}")),
        }
        s.set_read_timeout(Some(left("waiting for the response")?))
            .map_err(|e| e.to_string())?;
        match s.read(&mut chunk) {
            Ok(0) => return Err(format!("{url}: connection closed before a response")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("{url}: timed out waiting for the response"))
            }
            Err(e) => return Err(format!("{url}: read: {e}")),
        }
    }
}

/// Run argv (no shell) in its own process group and want exit status 0 within
/// `timeout`; on timeout the whole group is killed.
fn exec(argv: &[String], timeout: Duration) -> Result<(), String> {
    let (prog, args) = argv.split_first().ok_or("empty cmd")?;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("{prog}: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("{prog}: {status}")),
        Ok(Err(e)) => Err(format!("{prog}: {e}")),
        Err(_) => {
            if let Some(pgid) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
            }
            Err(format!(
                "{prog}: timed out after {} ms",
                timeout.as_millis()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
