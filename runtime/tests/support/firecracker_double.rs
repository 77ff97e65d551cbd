//! Firecracker API test double: an HTTP/1.1 server on a unix socket that records every
//! request (method, path, JSON body) in order and answers 204, or an error with a
//! `fault_message` for a chosen path, keeping connections alive as Firecracker's own
//! server does (each on a thread of its own, which ends when the client closes). It
//! can play the guest shutting down on Ctrl-Alt-Del by killing a given pid.

use std::io::{Read, Write};

use mergen_http::{Limits, Progress, Request, RequestReader};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

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
            for stream in listener.incoming() {
                if d.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    n.fetch_add(1, Ordering::SeqCst);
                    let (c, b) = (c.clone(), b.clone());
                    std::thread::spawn(move || serve(stream, &c, &b));
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
        // Wake the accept loop so it sees `done`.
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Answer requests on `stream` until the client closes it.
fn serve(mut stream: UnixStream, calls: &Mutex<Vec<Call>>, behaviour: &Mutex<Behaviour>) {
    let mut reader = RequestReader::new(Limits::default());
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match reader.advance(&mut buf) {
            Ok(Progress::Done(req)) => answer(&mut stream, req, calls, behaviour),
            Ok(Progress::SendContinue | Progress::NeedMore) => match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            },
            Err(_) => return,
        }
    }
}

fn answer(
    stream: &mut UnixStream,
    req: Request,
    calls: &Mutex<Vec<Call>>,
    behaviour: &Mutex<Behaviour>,
) {
    let (method, path) = (req.head.method, req.head.path);
    let body = serde_json::from_slice(&req.body).unwrap_or(serde_json::Value::Null);
    let b = behaviour.lock().unwrap();
    let answer = match &b.fail {
        Some((p, status, fault)) if *p == path => {
            let body = serde_json::json!({ "fault_message": fault }).to_string();
            format!(
                "HTTP/1.1 {status} Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        }
        _ => "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n".to_string(),
    };
    let ctrl_alt_del = body["action_type"] == "SendCtrlAltDel";
    calls.lock().unwrap().push(Call { method, path, body });
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
