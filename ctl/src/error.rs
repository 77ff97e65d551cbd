//! API errors: a status code, a stable machine-readable code and a human message,
//! always answered as `{"error": CODE, "message": TEXT}`.

use mergen_runtime::RuntimeError;

use mergen_http::Response;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// Extra headers (`Allow` on 405, `WWW-Authenticate` on 401).
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> ApiError {
        ApiError::new(400, "bad_request", m)
    }
    pub fn not_found(m: impl Into<String>) -> ApiError {
        ApiError::new(404, "not_found", m)
    }
    pub fn conflict(m: impl Into<String>) -> ApiError {
        ApiError::new(409, "conflict", m)
    }
    pub fn internal(m: impl Into<String>) -> ApiError {
        ApiError::new(500, "internal_error", m)
    }
    /// A strict hook failed: the hook's endpoint or command is the failing upstream.
    pub fn hook_failed(m: impl Into<String>) -> ApiError {
        ApiError::new(502, "hook_failed", m)
    }
    pub fn unavailable(m: impl Into<String>) -> ApiError {
        ApiError::new(503, "dependency_unavailable", m)
    }
    pub fn method_not_allowed(allow: &'static str) -> ApiError {
        let mut e = ApiError::new(
            405,
            "method_not_allowed",
            format!("method not allowed; allowed: {allow}"),
        );
        e.headers.push(("Allow", allow.to_string()));
        e
    }

    pub fn into_response(self) -> Response {
        let mut r = Response::error(self.status, self.code, &self.message);
        r.headers = self.headers;
        r
    }
}

impl From<&RuntimeError> for ApiError {
    fn from(e: &RuntimeError) -> ApiError {
        if e.is_unavailable() {
            ApiError::unavailable(e.to_string())
        } else {
            ApiError::internal(e.to_string())
        }
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> ApiError {
        ApiError::from(&e)
    }
}
