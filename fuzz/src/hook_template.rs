//! The Go `text/template` engine of hook commands and URLs (`mergen_ctl::gotmpl`): any
//! API client can send a template in a create request, and mergend runs it on the VM's
//! context whenever the hook fires.
//!
//! Beyond "no panic" (a stack overflow or runaway allocation is a crash too), each
//! input checks that text without `{{` is plain and prints as itself, that whatever
//! parses can be checked against the context's shape and run on a context whose
//! metadata holds every kind of JSON value, and that a run's output stays within the
//! engine's bound whatever the template asks for.

use mergen_ctl::gotmpl::Template;
use mergen_ctl::hooks::HookContext;
use mergen_model::Meta;

/// The engine's output bound (`gotmpl::exec::MAX_OUTPUT`), plus one write past it.
const MAX_OUTPUT: usize = (1 << 20) + (1 << 16);

pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let template = match Template::parse(text) {
        Ok(t) => t,
        Err(e) => {
            assert!(text.contains("{{"), "plain text refused: {e}");
            return;
        }
    };
    let _ = template.check_fields(&HookContext::shape());
    let out = template.execute(&context());
    if !text.contains("{{") {
        assert!(template.is_plain(), "text without actions is not plain");
        assert_eq!(out.as_deref(), Ok(text), "plain text printed otherwise");
    }
    if let Ok(out) = out {
        assert!(out.len() <= MAX_OUTPUT, "{} bytes of output", out.len());
    }
}

fn context() -> mergen_ctl::gotmpl::Value {
    let meta = Meta::from_slice(
        br#"{"id":"084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6","createdAt":"2025-01-02T03:04:05.12Z",
        "guestIP":"172.30.0.2","ports":[{"guest":80,"host":20000,"protocol":"tcp"}],
        "metadata":{"team":"core","n":1,"f":-0.5,"big":1e300,"yes":true,"none":null,
        "list":[1,"a",[2],{"k":"v"}],"map":{"a":{"b":[null,false]}},"empty":{},"s":"%d{{"}}"#,
    )
    .expect("the fuzz context's meta.json");
    HookContext::new("onStart", &meta).template_data()
}
