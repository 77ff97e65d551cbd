//! Firecracker's API on its unix socket: JSON bodies over mergen-http's client (one
//! connection kept alive across a VM's calls, as Firecracker's own server allows), and
//! Firecracker's `fault_message` in errors.

use std::path::Path;
use std::time::{Duration, Instant};

use mergen_http::{ClientError, UnixClient};

pub struct FcClient {
    http: UnixClient,
    timeout: Duration,
}

impl FcClient {
    pub fn new(socket: &Path, timeout: Duration) -> FcClient {
        FcClient {
            http: UnixClient::new(socket, timeout),
            timeout,
        }
    }

    /// Wait until the API socket accepts connections (Firecracker creates it shortly
    /// after starting), up to the client's timeout.
    pub fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.http.connect() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "Firecracker API socket {} not ready within {:?}: {e}",
                        self.http.socket().display(),
                        self.timeout
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// PUT `body` to `path`; a non-2xx answer is an error carrying Firecracker's
    /// `fault_message`.
    pub fn put(&self, path: &str, body: &serde_json::Value) -> Result<(), String> {
        let what = format!("PUT {path}");
        let payload = body.to_string();
        let answer = self
            .http
            .request("PUT", path, Some("application/json"), payload.as_bytes())
            .map_err(|e| match e {
                ClientError::Connect(e) => format!(
                    "{what}: connecting to {}: {e}",
                    self.http.socket().display()
                ),
                e => format!("{what}: {e}"),
            })?;
        if (200..300).contains(&answer.status) {
            return Ok(());
        }
        let fault = serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|v| v.get("fault_message")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&answer.body).trim().to_string());
        Err(format!(
            "Firecracker answered {} to {what}: {fault}",
            answer.status
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    /// Serve one connection: read the request head and body, answer with `answer` in
    /// two writes (as a real server may), and hand the request back.
    fn serve_once(
        listener: UnixListener,
        answer: &'static [u8],
    ) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            let mut chunk = [0u8; 1024];
            while !String::from_utf8_lossy(&req).contains("}") {
                let n = s.read(&mut chunk).unwrap();
                assert!(n > 0, "request cut short");
                req.extend_from_slice(&chunk[..n]);
            }
            let (head, body) = answer.split_at(answer.len() / 2);
            s.write_all(head).unwrap();
            s.flush().unwrap();
            std::thread::sleep(Duration::from_millis(20));
            s.write_all(body).unwrap();
            String::from_utf8(req).unwrap()
        })
    }

    fn socket() -> (PathBuf, UnixListener) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("mergen-fcapi-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        (path, listener)
    }

    #[test]
    fn firecrackers_own_answers_are_understood() {
        // micro_http's success: a status line without a reason phrase, no body, and the
        // connection kept open.
        let (path, listener) = socket();
        let server = serve_once(
            listener,
            b"HTTP/1.1 204 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n",
        );
        let api = FcClient::new(&path, Duration::from_secs(5));
        api.put(
            "/actions",
            &serde_json::json!({"action_type": "InstanceStart"}),
        )
        .unwrap();
        let req = server.join().unwrap();
        let _ = std::fs::remove_file(&path);
        let body = r#"{"action_type":"InstanceStart"}"#;
        assert!(req.starts_with("PUT /actions HTTP/1.1\r\n"), "{req}");
        assert!(
            req.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{req}"
        );
        assert!(req.contains("Content-Type: application/json\r\n"), "{req}");
        assert!(req.ends_with(&format!("\r\n\r\n{body}")), "{req}");

        // Its error: a JSON body with fault_message, framed by Content-Length.
        let (path, listener) = socket();
        let server = serve_once(
            listener,
            b"HTTP/1.1 400 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\nContent-Type: application/json\r\nContent-Length: 55\r\n\r\n{\"fault_message\":\"The kernel file cannot be opened.  \"}",
        );
        let api = FcClient::new(&path, Duration::from_secs(5));
        let err = api
            .put(
                "/boot-source",
                &serde_json::json!({"kernel_image_path": "/kernel"}),
            )
            .unwrap_err();
        server.join().unwrap();
        assert_eq!(
            err,
            "Firecracker answered 400 to PUT /boot-source: The kernel file cannot be opened.  "
        );
        let _ = std::fs::remove_file(&path);
    }
}
