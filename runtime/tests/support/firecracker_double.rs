//! Firecracker API test double: an HTTP/1.1 server on a unix socket that records every
//! request (method, path, JSON body) in order and answers 204, or an error with a
//! `fault_message` for a chosen path, keeping connections alive as Firecracker's own
//! server does (each on a thread of its own, which ends when the client closes). It
//! can play the guest shutting down on Ctrl-Alt-Del by killing a given pid.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mergen_http::{Limits, Progress, RequestReader};

#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub body: serde_json::Value,
}

#[derive(Default)]
struct Behaviour {
    /// (path, status, fault message) to answer instead of 204.
    fail: Option<(String, u16, String)>,
    /// Pid to SIGKILL when SendCtrlAltDel arrives (the guest "shuts down").
    exit_on_ctrl_alt_del: Option<u32>,
}

pub struct FirecrackerDouble {
    socket: PathBuf,
    calls: Arc<Mutex<Vec<Call>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    done: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl FirecrackerDouble {
    pub fn listen(socket: &Path) -> FirecrackerDouble {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).expect("bind the double's socket");
        // Non-blocking accepts, so the loop sees `done` even when the code under test
        // has removed the socket file (a launch clears stale sockets) and no connection
        // can wake it.
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(Mutex::new(Behaviour::default()));
        let done = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let (c, b, d, n) = (
            calls.clone(),
            behaviour.clone(),
            done.clone(),
            connections.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if stream.set_nonblocking(false).is_ok() {
                            n.fetch_add(1, Ordering::SeqCst);
                            let (c, b) = (c.clone(), b.clone());
                            std::thread::spawn(move || serve(stream, &c, &b));
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        FirecrackerDouble {
            socket: socket.to_path_buf(),
            calls,
            behaviour,
            done,
            connections,
            thread: Some(thread),
        }
    }

    pub fn fail(&self, path: &str, status: u16, fault: &str) {
        self.behaviour.lock().unwrap().fail = Some((path.into(), status, fault.into()));
    }

    /// On SendCtrlAltDel, kill `pid` (the guest shuts down); `None`: ignore it.
    pub fn exit_on_ctrl_alt_del(&self, pid: Option<u32>) {
        self.behaviour.lock().unwrap().exit_on_ctrl_alt_del = pid;
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

impl Drop for FirecrackerDouble {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The requests of one connection, one after the other (mergen-http's reader).
struct Requests {
    reader: RequestReader,
    buf: Vec<u8>,
}

impl Requests {
    fn new() -> Requests {
        Requests {
            reader: RequestReader::new(Limits::default()),
            buf: Vec::new(),
        }
    }

    /// The next request (method, path, JSON body); `None` when the client went away
    /// first, or sent something that is not HTTP.
    fn next(&mut self, stream: &mut UnixStream) -> Option<Call> {
        let mut chunk = [0u8; 4096];
        loop {
            match self.reader.advance(&mut self.buf).ok()? {
                Progress::Done(req) => {
                    return Some(Call {
                        method: req.head.method,
                        path: req.head.path,
                        body: serde_json::from_slice(&req.body).unwrap_or(serde_json::Value::Null),
                    })
                }
                Progress::SendContinue | Progress::NeedMore => match stream.read(&mut chunk) {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                },
            }
        }
    }
}

/// Read one request (method, path, JSON body); `None` when the client went away first.
fn read_request(stream: &mut UnixStream) -> Option<Call> {
    Requests::new().next(stream)
}

/// Answer the requests of one connection until the client closes it.
fn serve(mut stream: UnixStream, calls: &Mutex<Vec<Call>>, behaviour: &Mutex<Behaviour>) {
    let mut requests = Requests::new();
    while let Some(call) = requests.next(&mut stream) {
        answer(&mut stream, call, calls, behaviour);
    }
}

fn answer(
    stream: &mut UnixStream,
    call: Call,
    calls: &Mutex<Vec<Call>>,
    behaviour: &Mutex<Behaviour>,
) {
    let b = behaviour.lock().unwrap();
    let answer = match &b.fail {
        Some((p, status, fault)) if *p == call.path => {
            let body = serde_json::json!({ "fault_message": fault }).to_string();
            format!(
                "HTTP/1.1 {status} Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        }
        _ => NO_CONTENT.to_string(),
    };
    let ctrl_alt_del = call.body["action_type"] == "SendCtrlAltDel";
    calls.lock().unwrap().push(call);
    let _ = stream.write_all(answer.as_bytes());
    if ctrl_alt_del {
        if let Some(pid) = b.exit_on_ctrl_alt_del {
            if pid > 0 {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

const NO_CONTENT: &str = "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n";

/// The double as a process, standing in for the Firecracker binary the runtime launches
/// (`firecracker --api-sock PATH --id ID`, inside the VM's namespace). It records every
/// call as a JSON line in `PATH.calls` (and its pid in `PATH.pid`), and behaves like a
/// booting guest: on InstanceStart it takes the guest address from the `ip=` boot
/// argument it was sent (the guest's network coming up, as seen from the namespace),
/// unless the kernel file it was given holds `no-network`; on SendCtrlAltDel it exits,
/// as a guest powering off does.
pub fn run_process(args: &[String]) -> std::process::ExitCode {
    let Some(socket) = args
        .iter()
        .position(|a| a == "--api-sock")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
    else {
        eprintln!("firecracker double: no --api-sock in {args:?}");
        return std::process::ExitCode::from(2);
    };
    let record = |ext: &str| PathBuf::from(format!("{}.{ext}", socket.display()));
    let _ = std::fs::write(record("pid"), std::process::id().to_string());
    let _ = std::fs::remove_file(&socket);
    let listener = match UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("firecracker double: binding {}: {e}", socket.display());
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut boot = serde_json::Value::Null;
    for mut stream in listener.incoming().flatten() {
        let Some(call) = read_request(&mut stream) else {
            continue;
        };
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(record("calls"))
        {
            let line =
                serde_json::json!({"method": call.method, "path": call.path, "body": call.body});
            let _ = writeln!(f, "{line}");
        }
        let _ = stream.write_all(NO_CONTENT.as_bytes());
        match (call.path.as_str(), call.body["action_type"].as_str()) {
            ("/boot-source", _) => boot = call.body,
            ("/actions", Some("InstanceStart")) => play_booted_guest(&boot),
            ("/actions", Some("SendCtrlAltDel")) => return std::process::ExitCode::SUCCESS,
            _ => {}
        }
    }
    std::process::ExitCode::FAILURE
}

fn play_booted_guest(boot: &serde_json::Value) {
    let kernel = boot["kernel_image_path"].as_str().unwrap_or_default();
    if std::fs::read_to_string(kernel).is_ok_and(|k| k.contains("no-network")) {
        return;
    }
    let guest = boot["boot_args"]
        .as_str()
        .unwrap_or_default()
        .split_whitespace()
        .find_map(|a| a.strip_prefix("ip="))
        .and_then(|ip| ip.split(':').next());
    if let Some(ip) = guest {
        let _ = std::process::Command::new("ip")
            .args(["addr", "add", &format!("{ip}/32"), "dev", "lo"])
            .status();
    }
}
