//! Routing, authentication and request metrics in front of the API.

use crate::api::{App, Outcome};
use crate::error::Error;
use crate::respond;
use mergen_http::{Request, Response};

/// Answer one request and count it under its route.
pub fn handle(app: &App, req: &Request) -> Response {
    let started = std::time::Instant::now();
    let (route, result) = dispatch(app, req);
    let resp = match result {
        Ok(o) => respond::outcome(o),
        Err(e) => {
            let answer = respond::error(&e);
            if answer.status >= 500 {
                log::warn!(route = route, status = answer.status, error:% = e; "request failed");
            }
            answer.into_response()
        }
    };
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

/// The requests answered on the server's event-loop thread, skipping the hop to a
/// worker: the health check, which touches nothing but a counter (load balancers
/// and supervisors poll it often, and it must answer even when every worker is busy).
pub fn is_quick(req: &Request) -> bool {
    matches!(req.head.method.as_str(), "GET" | "HEAD")
        && matches!(req.head.path.as_str(), "/healthz" | "/healthz/")
}

/// Constant-time comparison, so the token cannot be guessed byte by byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorize(app: &App, req: &Request) -> Result<(), Error> {
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
    Err(Error::Unauthorized)
}

/// `?retainData=` as the original read it: the first value, percent-decoded, parsed
/// with Go's `strconv.ParseBool`; absent or empty is false. Anything else is refused
/// before anything is deleted, so a typo never costs the data.
fn retain_data(query: &str) -> Result<bool, Error> {
    let value = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "retainData")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    if value.is_empty() {
        return Ok(false);
    }
    mergen_envtable::go_bool(&value).ok_or_else(|| {
        Error::BadRequest(format!(
            "retainData={value:?}: want a boolean (1, t, T, TRUE, true, True, 0, f, F, FALSE, false, False)"
        ))
    })
}

/// Which VMs `GET /v1/vms` lists.
enum Scope {
    Host,
    Cluster,
}

/// `?scope=`: `host` (the default) or `cluster`.
fn scope(query: &str) -> Result<Scope, Error> {
    let value = form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "scope")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    match value.as_str() {
        "" | "host" => Ok(Scope::Host),
        "cluster" => Ok(Scope::Cluster),
        other => Err(Error::BadRequest(format!(
            "scope={other:?}: want host or cluster"
        ))),
    }
}

fn dispatch(app: &App, req: &Request) -> (&'static str, Result<Outcome, Error>) {
    let method = req.head.method.as_str();
    let path = req.head.path.as_str();
    // One trailing slash names the same resource, as in the original's router
    // (`POST /v1/vms/` creates).
    let trimmed = match path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => path,
    };
    let segs: Vec<&str> = trimmed.trim_start_matches('/').split('/').collect();
    let route: &'static str = match segs.as_slice() {
        ["healthz"] => "/healthz",
        ["metrics"] => "/metrics",
        ["v1", "vms"] => "/v1/vms",
        ["v1", "vms", _] => "/v1/vms/:id",
        ["v1", "vms", _, "start"] => "/v1/vms/:id/start",
        ["v1", "vms", _, "stop"] => "/v1/vms/:id/stop",
        _ => "other",
    };
    let guarded =
        segs.first() == Some(&"v1") || (route == "/metrics" && app.config.metrics_require_token);
    if guarded {
        if let Err(e) = authorize(app, req) {
            return (route, Err(e));
        }
    }
    let result = match (route, method) {
        ("/healthz", "GET") => Ok(match app.cluster_health() {
            None => Outcome::Healthy,
            Some(state) => Outcome::HealthyIn(state),
        }),
        ("/metrics", "GET") => app.metrics_text(),
        ("/healthz" | "/metrics", _) => Err(Error::MethodNotAllowed("GET")),
        ("/v1/vms", "GET") => match scope(&req.head.query) {
            Ok(Scope::Host) => app.list(),
            Ok(Scope::Cluster) => app.list_cluster(),
            Err(e) => Err(e),
        },
        ("/v1/vms", "POST") => app.create(&req.body),
        ("/v1/vms", _) => Err(Error::MethodNotAllowed("GET, POST")),
        ("/v1/vms/:id", "GET") => app.get(segs[2]),
        ("/v1/vms/:id", "DELETE") => {
            retain_data(&req.head.query).and_then(|retain| app.delete(segs[2], retain))
        }
        ("/v1/vms/:id", _) => Err(Error::MethodNotAllowed("GET, DELETE")),
        ("/v1/vms/:id/start", "POST") => app.start(segs[2]),
        ("/v1/vms/:id/stop", "POST") => app.stop(segs[2]),
        ("/v1/vms/:id/start" | "/v1/vms/:id/stop", _) => Err(Error::MethodNotAllowed("POST")),
        _ => Err(Error::NoRoute(path.to_string())),
    };
    (route, result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retain_data_is_gos_parse_bool() {
        for q in [
            "retainData=1",
            "retainData=t",
            "retainData=T",
            "retainData=TRUE",
            "retainData=true",
            "retainData=True",
            "retainData=%54rue",
            "x=1&retainData=true&retainData=false",
        ] {
            assert!(retain_data(q).unwrap(), "{q}");
        }
        for q in ["", "retainData=", "retainData=0", "retainData=False", "x=1"] {
            assert!(!retain_data(q).unwrap(), "{q}");
        }
        for q in [
            "retainData=yes",
            "retainData=ture",
            "retainData=tRUE",
            "retainData=2",
        ] {
            let e = retain_data(q).unwrap_err();
            assert!(matches!(e, Error::BadRequest(_)), "{q}");
            assert!(e.to_string().contains("retainData"), "{q}");
        }
    }
}
