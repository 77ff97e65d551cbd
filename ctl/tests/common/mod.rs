//! Test harness: a real `mergend` child process with temp roots on a free port, and
//! curl against it.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use mergen_testkit::{in_netns, poll, TempDir};

pub mod forwarder;
pub mod hookserver;
pub mod vms;

pub const BIN: &str = env!("CARGO_BIN_EXE_mergend");

/// The fields of a VM summary that the original's API has (mergen adds `tags`).
pub const ORIGINAL_SUMMARY_FIELDS: &[&str] = &[
    "id",
    "createdAt",
    "systemd",
    "firecracker",
    "network",
    "paths",
    "metadata",
    "state",
    "supervisor",
];

/// A temp dir holding the three state roots, an image root with a kernel and a rootfs,
/// and a global hooks dir. Removed on drop.
pub struct Roots {
    pub dir: PathBuf,
    _tmp: TempDir,
}

impl Roots {
    pub fn new(name: &str) -> Roots {
        let tmp = TempDir::new(&format!("ctl-{name}"));
        let dir = tmp.path().to_path_buf();
        for d in ["config", "data", "run", "img", "hooks.d"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("img/vmlinux"), b"kernel").unwrap();
        std::fs::write(dir.join("img/rootfs.ext4"), b"rootfs").unwrap();
        Roots { dir, _tmp: tmp }
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join("config")
    }
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn run(&self) -> PathBuf {
        self.dir.join("run")
    }
    pub fn img(&self) -> PathBuf {
        self.dir.join("img")
    }
    pub fn hooks(&self) -> PathBuf {
        self.dir.join("hooks.d")
    }
    /// A minimal valid create body.
    pub fn body(&self) -> String {
        format!(
            r#"{{"rootfs":"{}","kernel":"{}"}}"#,
            self.img().join("rootfs.ext4").display(),
            self.img().join("vmlinux").display()
        )
    }
    /// A create body with extra top-level fields (`extra` starts with a comma).
    pub fn body_with(&self, extra: &str) -> String {
        let b = self.body();
        format!("{}{extra}}}", &b[..b.len() - 1])
    }
    /// The VM dirs in the config root (uuid names only).
    pub fn vm_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.config())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        v
    }
}

pub struct Mergend {
    child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
    /// The network namespace it runs in (and its API is reached from), when not this one.
    pub netns: Option<String>,
}

/// Base environment for a mergend on `roots`.
pub fn env_for(roots: &Roots) -> Vec<(String, String)> {
    [
        ("MGR_HTTP_ADDR", "127.0.0.1:0".to_string()),
        ("MGR_CONFIG_ROOT", roots.config().display().to_string()),
        ("MGR_DATA_ROOT", roots.data().display().to_string()),
        ("MGR_RUN_ROOT", roots.run().display().to_string()),
        ("MGR_IMAGE_ROOTS", roots.img().display().to_string()),
        ("MGR_GLOBAL_HOOKS_DIR", roots.hooks().display().to_string()),
        ("MGR_LOG_FORMAT", "json".to_string()),
        ("MGR_LOG_LEVEL", "debug".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// [`env_for`] with the `extra` settings added or replacing its own.
fn env_with(roots: &Roots, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = env_for(roots);
    for (k, v) in extra {
        env.retain(|(ek, _)| ek != k);
        env.push((k.to_string(), v.to_string()));
    }
    env
}

impl Mergend {
    pub fn start(roots: &Roots, extra: &[(&str, &str)]) -> Mergend {
        let env = env_with(roots, extra);
        Self::start_env(&env)
    }

    pub fn start_env(env: &[(String, String)]) -> Mergend {
        Self::spawn(Command::new(BIN), env, None)
    }

    /// Started inside the network namespace `netns` (only that: the mount namespace is
    /// this one, so the VM namespaces it makes are seen by everyone). Its API listens
    /// there, so [`Mergend::curl`] runs curl there too.
    pub fn start_in(netns: &str, roots: &Roots, extra: &[(&str, &str)]) -> Mergend {
        let env = env_with(roots, extra);
        Self::spawn(in_netns(Some(netns), BIN), &env, Some(netns))
    }

    /// Started in a mount namespace of its own, as `ip netns exec` would.
    pub fn start_private_mounts(roots: &Roots, extra: &[(&str, &str)]) -> Mergend {
        let env = env_with(roots, extra);
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "slave", BIN]);
        Self::spawn(cmd, &env, None)
    }

    /// Started under `umask` (an octal text such as "077") through `sh`.
    pub fn start_umask(roots: &Roots, extra: &[(&str, &str)], umask: &str) -> Mergend {
        let env = env_with(roots, extra);
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &format!("umask {umask} && exec \"$0\""), BIN]);
        Self::spawn(cmd, &env, None)
    }

    fn spawn(mut cmd: Command, env: &[(String, String)], netns: Option<&str>) -> Mergend {
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn mergend");
        // The log goes to stdout, as the original's; stderr holds only a fatal
        // error. Both are kept, in the order each stream gives them.
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        if v["msg"] == "mergend listening" {
                            let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_string());
                        }
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(line);
                }
            });
        }
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a.parse().expect("listening address"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mergend did not start: {:?}", log.lock().unwrap());
            }
        };
        let m = Mergend {
            child,
            addr,
            log,
            netns: netns.map(str::to_string),
        };
        m.wait_healthy();
        m
    }

    fn wait_healthy(&self) {
        let healthy = poll(Duration::from_secs(20), || {
            matches!(
                try_curl_in(self.netns.as_deref(), &[&self.url("/healthz")]),
                Ok((200, _))
            )
            .then_some(())
        });
        assert!(healthy.is_some(), "mergend never became healthy");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `curl -X method url [args]` -> (status, body).
    pub fn curl(&self, method: &str, path: &str, args: &[&str]) -> (u16, String) {
        let url = self.url(path);
        let mut all = vec!["-X", method, url.as_str()];
        all.extend_from_slice(args);
        try_curl_in(self.netns.as_deref(), &all).expect("curl ran")
    }

    pub fn create(&self, body: &str) -> (u16, serde_json::Value) {
        // A large body goes through a file: the argument list has a limit.
        let file = (body.len() > 64 * 1024).then(|| {
            let f = TempDir::new("body");
            std::fs::write(f.join("body.json"), body).unwrap();
            f
        });
        let arg = match &file {
            Some(f) => format!("@{}", f.join("body.json").display()),
            None => body.to_string(),
        };
        let (code, out) = self.curl(
            "POST",
            "/v1/vms",
            &[
                "-H",
                "content-type: application/json",
                "--data-binary",
                &arg,
            ],
        );
        (
            code,
            serde_json::from_str(&out).unwrap_or(serde_json::Value::Null),
        )
    }

    pub fn get_json(&self, path: &str) -> (u16, serde_json::Value) {
        let (code, out) = self.curl("GET", path, &[]);
        (
            code,
            serde_json::from_str(&out).unwrap_or(serde_json::Value::Null),
        )
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// Wait for the process to exit, within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        poll(limit, || self.child.try_wait().unwrap())
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Mergend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run curl with `-s`, the body and the status code on a last line.
pub fn try_curl(args: &[&str]) -> Result<(u16, String), String> {
    try_curl_in(None, args)
}

/// [`try_curl`] inside the network namespace `netns` when given.
pub fn try_curl_in(netns: Option<&str>, args: &[&str]) -> Result<(u16, String), String> {
    let out = in_netns(netns, "curl")
        .args(["-s", "-S", "--max-time", "30", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code: u16 = code
        .trim()
        .parse()
        .map_err(|_| format!("no status: {text:?}"))?;
    if code == 0 {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok((code, body.to_string()))
}
