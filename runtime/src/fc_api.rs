//! A minimal HTTP/1.1 client for Firecracker's API socket: one request per connection,
//! JSON bodies, responses framed by Content-Length.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct FcClient {
    socket: PathBuf,
    timeout: Duration,
}

impl FcClient {
    pub fn new(socket: &Path, timeout: Duration) -> FcClient {
        FcClient {
            socket: socket.to_path_buf(),
            timeout,
        }
    }

    /// Wait until the API socket accepts connections (Firecracker creates it shortly
    /// after starting), up to the client's timeout.
    pub fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout;
        loop {
            match UnixStream::connect(&self.socket) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "Firecracker API socket {} not ready within {:?}: {e}",
                        self.socket.display(),
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
        let request = format!(
            "PUT {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
            payload.len()
        );
        let mut stream = UnixStream::connect(&self.socket)
            .map_err(|e| format!("{what}: connecting to {}: {e}", self.socket.display()))?;
        stream
            .set_read_timeout(Some(self.timeout))
            .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
            .and_then(|()| stream.write_all(request.as_bytes()))
            .map_err(|e| format!("{what}: sending: {e}"))?;
        let (status, body) = read_response(&mut stream).map_err(|e| format!("{what}: {e}"))?;
        if (200..300).contains(&status) {
            return Ok(());
        }
        let fault = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("fault_message")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
        Err(format!("Firecracker answered {status} to {what}: {fault}"))
    }
}

fn read_response(stream: &mut UnixStream) -> Result<(u16, Vec<u8>), String> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let status = response.code.unwrap_or(0);
                let length = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                    .unwrap_or(0usize);
                while buf.len() < head_len + length {
                    read_more(stream, &mut buf, "the answer's body was cut short")?;
                }
                return Ok((status, buf[head_len..head_len + length].to_vec()));
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(format!("malformed HTTP answer: {e}")),
        }
        read_more(
            stream,
            &mut buf,
            "connection closed before a complete answer",
        )?;
    }
}

/// Append what the next read brings to `buf`; `closed` is the error if the peer closed.
fn read_more(stream: &mut UnixStream, buf: &mut Vec<u8>, closed: &str) -> Result<(), String> {
    let mut chunk = [0u8; 4096];
    let n = stream
        .read(&mut chunk)
        .map_err(|e| format!("reading the answer: {e}"))?;
    if n == 0 {
        return Err(closed.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

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
