//! Firecracker API test double: an HTTP/1.1 server on a unix socket that records every
//! request (method, path, JSON body) in order and answers 204, or an error with a
//! `fault_message` for a chosen path. It can play the guest shutting down on
//! Ctrl-Alt-Del by killing a given pid.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

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
        let (c, b, d) = (calls.clone(), behaviour.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            while !d.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if stream.set_nonblocking(false).is_ok() {
                            serve(stream, &c, &b);
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

fn serve(mut stream: UnixStream, calls: &Mutex<Vec<Call>>, behaviour: &Mutex<Behaviour>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (method, path, body) = loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = req.parse(&buf) {
            let len: usize = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                .unwrap_or(0);
            if buf.len() >= head + len {
                break (
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                    serde_json::from_slice(&buf[head..head + len])
                        .unwrap_or(serde_json::Value::Null),
                );
            }
        }
    };
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
