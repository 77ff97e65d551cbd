//! The one place where HTTP status codes and headers are chosen: a domain
//! [`Outcome`] or [`Error`] becomes a response here and nowhere else (as Firecracker's
//! API server maps its typed results in one module).

use serde_json::json;

use crate::alloc::AllocError;
use crate::api::Outcome;
use crate::error::{ApiError, Error};
use mergen_http::Response;

/// The answer to a call that succeeded.
pub fn outcome(o: Outcome) -> Response {
    let done = |status: u16, id: String, word: &str| {
        Response::json(status, &json!({"id": id, "status": word}))
    };
    match o {
        Outcome::Healthy => Response::json(200, &json!({"status": "ok"})),
        // VMs are served and managed with etcd away; the cluster state is information.
        Outcome::HealthyIn(cluster) => {
            Response::json(200, &json!({"status": "ok", "cluster": cluster}))
        }
        Outcome::Created(id) => done(201, id, "created"),
        Outcome::Started(id) => done(200, id, "started"),
        Outcome::Stopped(id) => done(200, id, "stopped"),
        Outcome::Deleted(id) => done(200, id, "deleted"),
        Outcome::Vm(json) | Outcome::List(json) => Response {
            status: 200,
            content_type: "application/json",
            headers: Vec::new(),
            body: json.0,
        },
        Outcome::ClusterList(items) => Response::json(200, &json!({ "items": items })),
        Outcome::Metrics(text) => Response::text(200, "text/plain; version=0.0.4", text),
    }
}

/// Status and code of an error, as the original answered them.
fn status(e: &Error) -> (u16, &'static str) {
    match e {
        Error::BadRequest(_) | Error::InvalidId(_) => (400, "bad_request"),
        // A requested port this host does not publish: the request is wrong here.
        Error::Alloc(AllocError::OutsideRange { .. }) => (400, "bad_request"),
        Error::Unauthorized => (401, "unauthorized"),
        Error::VmNotFound(_) | Error::NoRoute(_) => (404, "not_found"),
        Error::MethodNotAllowed(_) => (405, "method_not_allowed"),
        Error::Busy(_) | Error::Alloc(_) | Error::AliasTaken { .. } => (409, "conflict"),
        // RFC 9110: this server is not the one for the VM; the owner's address is in
        // the message and in the X-Mergen-Host* headers.
        Error::Misdirected { .. } => (421, "misdirected_request"),
        // The hook's endpoint or command is the failing upstream.
        Error::HookFailed(_) => (502, "hook_failed"),
        Error::Runtime(e) if e.is_unavailable() => (503, "dependency_unavailable"),
        Error::Unavailable(_) => (503, "dependency_unavailable"),
        Error::Runtime(_) | Error::Io { .. } | Error::Unreadable(_) | Error::Internal(_) => {
            (500, "internal_error")
        }
        Error::Context { source, .. } => status(source),
    }
}

/// The answer to a call that failed.
pub fn error(e: &Error) -> ApiError {
    let (code, word) = status(e);
    let mut out = ApiError::new(code, word, e.to_string());
    match e {
        Error::MethodNotAllowed(allow) => out.headers.push(("Allow", (*allow).to_string())),
        Error::Unauthorized => out.headers.push(("WWW-Authenticate", "Bearer".into())),
        Error::Misdirected { host, addr, .. } => {
            out.headers.push(("X-Mergen-Host", host.clone()));
            out.headers.push(("X-Mergen-Host-Addr", addr.clone()));
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mergen_model::Protocol;
    use mergen_runtime::{RuntimeError, Unavailable};

    /// Every variant's status and code, as the API contract (and the original) says.
    #[test]
    fn every_error_has_its_status() {
        let io = || std::io::Error::other("disk");
        let cases: Vec<(Error, u16, &str)> = vec![
            (Error::BadRequest("x".into()), 400, "bad_request"),
            (Error::InvalidId("x".into()), 400, "bad_request"),
            (Error::Unauthorized, 401, "unauthorized"),
            (Error::VmNotFound("x".into()), 404, "not_found"),
            (Error::NoRoute("/x".into()), 404, "not_found"),
            (Error::MethodNotAllowed("GET"), 405, "method_not_allowed"),
            (Error::Busy("x".into()), 409, "conflict"),
            (Error::Alloc(AllocError::PortTaken(1)), 409, "conflict"),
            (
                Error::Alloc(AllocError::HostPortInUse {
                    port: 22,
                    protocol: Protocol::Tcp,
                }),
                409,
                "conflict",
            ),
            (
                Error::Alloc(AllocError::OutsideRange {
                    port: 22,
                    start: 1,
                    end: 2,
                }),
                400,
                "bad_request",
            ),
            (Error::HookFailed("x".into()), 502, "hook_failed"),
            (
                Error::AliasTaken {
                    alias: "app1".into(),
                    host: "b".into(),
                },
                409,
                "conflict",
            ),
            (
                Error::Misdirected {
                    id: "x".into(),
                    host: "c".into(),
                    addr: "10.0.0.3".into(),
                },
                421,
                "misdirected_request",
            ),
            (
                Error::Runtime(RuntimeError::Unavailable(Unavailable::NoSetsid)),
                503,
                "dependency_unavailable",
            ),
            (
                // A missing unit, reported from inside a step, is still unavailable.
                Error::Runtime(RuntimeError::Step {
                    step: "start",
                    id: "x".into(),
                    source: Box::new(RuntimeError::Unavailable(Unavailable::UnitMissing {
                        unit: "mergen@x.service".into(),
                        detail: "not found".into(),
                    })),
                }),
                503,
                "dependency_unavailable",
            ),
            (
                Error::Unavailable("no systemd".into()),
                503,
                "dependency_unavailable",
            ),
            (
                Error::Runtime(RuntimeError::Invalid("x".into())),
                500,
                "internal_error",
            ),
            (
                Error::Io {
                    what: "w",
                    source: io(),
                },
                500,
                "internal_error",
            ),
            (Error::Unreadable("x".into()), 500, "internal_error"),
            (Error::Internal("x".into()), 500, "internal_error"),
            (
                Error::Busy("x".into()).context("VM y was created but not started"),
                409,
                "conflict",
            ),
        ];
        for (e, want_status, want_code) in cases {
            let a = error(&e);
            assert_eq!((a.status, a.code), (want_status, want_code), "{e:?}");
            assert_eq!(a.message, e.to_string());
        }
        let ctx = error(&Error::HookFailed("h".into()).context("VM y was created"));
        assert_eq!(ctx.message, "VM y was created: h");
    }

    #[test]
    fn headers_of_405_and_401() {
        assert_eq!(
            error(&Error::MethodNotAllowed("GET, POST")).headers,
            vec![("Allow", "GET, POST".to_string())]
        );
        assert_eq!(
            error(&Error::Unauthorized).headers,
            vec![("WWW-Authenticate", "Bearer".to_string())]
        );
        let misdirected = Error::Misdirected {
            id: "x".into(),
            host: "c".into(),
            addr: "10.0.0.3".into(),
        };
        assert_eq!(
            error(&misdirected).headers,
            vec![
                ("X-Mergen-Host", "c".to_string()),
                ("X-Mergen-Host-Addr", "10.0.0.3".to_string())
            ]
        );
    }
}
