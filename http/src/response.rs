//! Responses: status, a content type, extra headers and a body, framed by
//! Content-Length (we never stream an answer of unknown length).

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    /// Headers besides Content-Type, Content-Length and Connection (e.g. `Allow`).
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// `value` as JSON, with a trailing newline (as Go's `json.Encoder` wrote it).
    pub fn json<T: serde::Serialize + ?Sized>(status: u16, value: &T) -> Response {
        let mut body = Vec::with_capacity(256);
        if serde_json::to_writer(&mut body, value).is_err() {
            body.clear();
        }
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into_bytes(),
        }
    }

    /// The error shape of every mergen API: `{"error": CODE, "message": TEXT}`.
    pub fn error(status: u16, code: &str, message: &str) -> Response {
        Response::json(
            status,
            &serde_json::json!({"error": code, "message": message}),
        )
    }

    /// The status line and headers. `version` is the request's minor version: an
    /// HTTP/1.0 client is told explicitly when the connection stays open.
    pub fn head_bytes(&self, version: u8, keep_alive: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        match (keep_alive, version) {
            (false, _) => out.push_str("Connection: close\r\n"),
            (true, 0) => out.push_str("Connection: keep-alive\r\n"),
            (true, _) => {}
        }
        for (k, v) in &self.headers {
            out.push_str(k);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    /// The whole response; `head_only` (a HEAD request) leaves the body out.
    pub fn to_bytes(&self, version: u8, keep_alive: bool, head_only: bool) -> Vec<u8> {
        let mut bytes = self.head_bytes(version, keep_alive);
        if !head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_on_the_wire() {
        let mut r = Response::error(405, "method_not_allowed", "no");
        r.headers.push(("Allow", "GET".into()));
        let body = "{\"error\":\"method_not_allowed\",\"message\":\"no\"}\n";
        assert_eq!(
            String::from_utf8(r.to_bytes(1, true, false)).unwrap(),
            format!(
                "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nAllow: GET\r\n\r\n{body}",
                body.len()
            )
        );
        // HEAD: the length of the body that was not sent; close and 1.0 keep-alive.
        let r = Response::text(200, "text/plain", "hello".into());
        assert_eq!(
            r.to_bytes(1, false, true),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(
            r.to_bytes(0, true, false),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello"
        );
    }
}
