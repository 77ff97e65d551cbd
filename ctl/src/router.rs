//! Routing, authentication and request metrics in front of the API.

use crate::api::App;
use crate::error::ApiError;
use mergen_http::{Request, Response};

/// Answer one request and count it under its route.
pub fn handle(app: &App, req: &Request) -> Response {
    let started = std::time::Instant::now();
    let (route, result) = dispatch(app, req);
    let resp = result.unwrap_or_else(|e| {
        if e.status >= 500 {
            log::warn!(route = route, status = e.status, error = e.message; "request failed");
        }
        e.into_response()
    });
    app.metrics.request(route, resp.status);
    log::debug!(
        method = req.head.method,
        path = req.head.path,
        status = resp.status,
        ms = started.elapsed().as_secs_f64() * 1e3;
        "request"
    );
    resp
}

/// Constant-time comparison, so the token cannot be guessed byte by byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(app: &App, req: &Request) -> Result<(), ApiError> {
    let Some(token) = &app.config.api_token else {
        return Ok(());
    };
    let given = req
        .head
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
        return Ok(());
    }
    let mut e = ApiError::new(401, "unauthorized", "missing or wrong bearer token");
    e.headers.push(("WWW-Authenticate", "Bearer".into()));
    Err(e)
}

fn retain_data(query: &str) -> bool {
    query
        .split('&')
        .any(|kv| matches!(kv.split_once('='), Some(("retainData", "true" | "1"))))
}

fn dispatch(app: &App, req: &Request) -> (&'static str, Result<Response, ApiError>) {
    let method = req.head.method.as_str();
    let path = req.head.path.as_str();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let route: &'static str = match segs.as_slice() {
        ["healthz"] => "/healthz",
        ["metrics"] => "/metrics",
        ["v1", "vms"] => "/v1/vms",
        ["v1", "vms", _] => "/v1/vms/:id",
        ["v1", "vms", _, "start"] => "/v1/vms/:id/start",
        ["v1", "vms", _, "stop"] => "/v1/vms/:id/stop",
        _ => "other",
    };
    if segs.first() == Some(&"v1") {
        if let Err(e) = authorize(app, req) {
            return (route, Err(e));
        }
    }
    let result = match (route, method) {
        ("/healthz", "GET") => Ok(Response::json(200, &serde_json::json!({"status": "ok"}))),
        ("/metrics", "GET") => app.metrics_text(),
        ("/healthz" | "/metrics", _) => Err(ApiError::method_not_allowed("GET")),
        ("/v1/vms", "GET") => app.list(),
        ("/v1/vms", "POST") => app.create(&req.body),
        ("/v1/vms", _) => Err(ApiError::method_not_allowed("GET, POST")),
        ("/v1/vms/:id", "GET") => app.get(segs[2]),
        ("/v1/vms/:id", "DELETE") => app.delete(segs[2], retain_data(&req.head.query)),
        ("/v1/vms/:id", _) => Err(ApiError::method_not_allowed("GET, DELETE")),
        ("/v1/vms/:id/start", "POST") => app.start(segs[2]),
        ("/v1/vms/:id/stop", "POST") => app.stop(segs[2]),
        ("/v1/vms/:id/start" | "/v1/vms/:id/stop", _) => Err(ApiError::method_not_allowed("POST")),
        _ => Err(ApiError::not_found(format!("no such path {path}"))),
    };
    (route, result)
}
