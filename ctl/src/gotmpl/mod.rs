//! Go's `text/template`, for what the original's users wrote in hook commands and URLs:
//! field paths (`{{.Paths.ConfigDir}}`, `{{.Metadata.team}}`), variables, pipelines,
//! `if`/`with`/`range`, and the builtins `index`, `printf`, `print`, `println`, `len`,
//! `eq`, `ne`, `lt`, `le`, `gt`, `ge`, `and`, `or`, `not`, `urlquery`. Values print as
//! Go's `fmt` prints them (`map[k:v]` with sorted keys, `[a b]`, `time.Time`'s
//! `String()`, float64 as `%v`).
//!
//! The `gtmpl` crate implements the same language, but prints lists and maps in Rust's
//! `Debug` form rather than Go's and is no longer maintained, so this small engine is
//! ours. Execution is bounded (range steps, output size).

mod exec;
mod parse;
mod printf;
mod value;

pub use parse::ParseError;
pub use printf::sprintf;
pub use value::{go_time_string, Struct, Value};

use parse::{Arg, Node, Pipeline};

/// A parsed template.
#[derive(Debug, Clone)]
pub struct Template {
    nodes: Vec<Node>,
}

impl Template {
    pub fn parse(src: &str) -> Result<Template, ParseError> {
        Ok(Template {
            nodes: parse::parse(src)?,
        })
    }

    /// Whether the text holds any action (a plain string needs no execution).
    pub fn is_plain(&self) -> bool {
        self.nodes.iter().all(|n| matches!(n, Node::Text(_)))
    }

    pub fn execute(&self, data: &Value) -> Result<String, String> {
        exec::Exec::new(data).run(&self.nodes)
    }

    /// Check the field paths taken from the data itself (`.X` where dot is still the
    /// data, and `$.X` anywhere) against its shape: a struct field that does not exist
    /// is an error before anything runs, as a typo must never run a hook with a
    /// `<no value>`. Paths into maps are not checked (any key may come).
    pub fn check_fields(&self, shape: &Value) -> Result<(), String> {
        let mut chains = Vec::new();
        collect(&self.nodes, true, &mut chains);
        for chain in chains {
            let mut v = shape;
            for name in &chain {
                match v {
                    Value::Struct(s) => match s.fields.iter().find(|(n, _)| n == name) {
                        Some((_, f)) => v = f,
                        None => {
                            return Err(format!(
                                "{{{{.{}}}}}: can't evaluate field {name} in type {}",
                                chain.join("."),
                                s.type_name
                            ))
                        }
                    },
                    _ => break,
                }
            }
        }
        Ok(())
    }
}

/// Field chains read from the root data; `root` says whether dot is still the data.
fn collect(nodes: &[Node], root: bool, out: &mut Vec<Vec<String>>) {
    for n in nodes {
        match n {
            Node::Text(_) | Node::Break | Node::Continue => {}
            Node::Action(p) => pipe_chains(p, root, out),
            Node::If(b) => {
                pipe_chains(&b.pipe, root, out);
                collect(&b.body, root, out);
                collect(&b.otherwise, root, out);
            }
            Node::With(b) | Node::Range(b) => {
                pipe_chains(&b.pipe, root, out);
                collect(&b.body, false, out);
                collect(&b.otherwise, root, out);
            }
        }
    }
}

fn pipe_chains(p: &Pipeline, root: bool, out: &mut Vec<Vec<String>>) {
    for cmd in &p.cmds {
        for a in &cmd.args {
            match a {
                Arg::Field(chain) if root && !chain.is_empty() => out.push(chain.clone()),
                Arg::Var(name, chain) if name == "$" && !chain.is_empty() => {
                    out.push(chain.clone())
                }
                Arg::Sub(inner, _) => pipe_chains(inner, root, out),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    /// A stand-in for the hooks' data, shaped like the original's Go struct.
    fn data() -> Value {
        let metadata = serde_json::json!({
            "team": "core", "replicas": 3, "env": "prod", "big": 1000000,
            "zones": ["a", "b"], "owner": {"name": "x"}, "none": null,
        });
        Value::Struct(Struct {
            type_name: "hooks.Context",
            fields: vec![
                (
                    "ID",
                    Value::Str("084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6".into()),
                ),
                (
                    "HostPorts",
                    Value::List(vec![Value::Int(20000), Value::Int(20001)]),
                ),
                (
                    "GuestPorts",
                    Value::List(vec![Value::Int(80), Value::Int(443)]),
                ),
                ("GuestIP", Value::Str("172.30.0.2".into())),
                (
                    "CreatedAt",
                    Value::Time(datetime!(2025-01-02 03:04:05.123456789 UTC)),
                ),
                (
                    "Paths",
                    Value::Struct(Struct {
                        type_name: "model.Paths",
                        fields: vec![("ConfigDir", Value::Str("/c/x".into()))],
                    }),
                ),
                ("Metadata", Value::from_json(&metadata)),
            ],
        })
    }

    fn run(src: &str) -> Result<String, String> {
        Template::parse(src)
            .map_err(|e| e.to_string())?
            .execute(&data())
    }

    /// Each expectation is what Go's text/template prints for the same data.
    #[test]
    fn renders_like_go() {
        for (src, want) in [
            ("{{.ID}}@{{ .GuestIP }} {{.HostPorts}} {{.GuestPorts}}", "084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6@172.30.0.2 [20000 20001] [80 443]"),
            ("{{.CreatedAt}}", "2025-01-02 03:04:05.123456789 +0000 UTC"),
            ("{{.Metadata}}", "map[big:1e+06 env:prod none:<nil> owner:map[name:x] replicas:3 team:core zones:[a b]]"),
            ("{{.Metadata.team}} {{.Metadata.missing}} {{.Metadata.none}}", "core <no value> <no value>"),
            ("{{.Metadata.owner.name}} {{.Metadata.missing.deeper}}", "x <no value>"),
            ("{{.Paths.ConfigDir}}/x", "/c/x/x"),
            ("{{index .Metadata \"team\"}} {{index .HostPorts 1}} {{index .Metadata.zones 0}}", "core 20001 a"),
            ("{{printf \"%s:%d\" .GuestIP (index .HostPorts 0)}}", "172.30.0.2:20000"),
            ("{{printf \"%v-%v\" .Metadata.replicas .Metadata.big}}", "3-1e+06"),
            ("{{len .HostPorts}} {{len .Metadata}} {{len .ID}}", "2 7 36"),
            ("{{if eq .Metadata.env \"prod\"}}P{{else}}D{{end}}", "P"),
            ("{{if eq .Metadata.env \"dev\" \"prod\"}}yes{{end}}", "yes"),
            ("{{if ne .Metadata.env \"prod\"}}x{{else if .Metadata.team}}t{{end}}", "t"),
            ("{{.ID | printf \"%.8s\"}}", "084604f6"),
            ("{{.GuestIP | printf \"%s/%s\" \"ip\"}}", "ip/172.30.0.2"),
            ("{{range $i, $p := .HostPorts}}{{if $i}},{{end}}{{$p}}{{end}}", "20000,20001"),
            ("{{range $k, $v := .Metadata.owner}}{{$k}}={{$v}}{{end}}", "name=x"),
            ("{{range .Metadata.missing}}x{{else}}empty{{end}}", "empty"),
            ("{{with .Metadata.owner}}{{.name}} of {{$.ID | len}}{{end}}", "x of 36"),
            ("{{$x := .GuestIP}}{{$x}}", "172.30.0.2"),
            ("{{and .ID .Metadata.missing}}|{{or .Metadata.missing \"dflt\"}}|{{not .ID}}", "<no value>|dflt|false"),
            ("{{print 1 2 \"a\" \"b\" 3}}", "1 2ab3"),
            ("{{lt (index .HostPorts 0) (index .HostPorts 1)}} {{gt .Metadata.replicas 2.5}}", "true true"),
            ("a {{- \" b \" -}} c", "a b c"),
            ("{{/* a comment */}}x", "x"),
            ("{{urlquery \"a b&c\"}}", "a+b%26c"),
            ("{{.}}", "{084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6 [20000 20001] [80 443] 172.30.0.2 2025-01-02 03:04:05.123456789 +0000 UTC {/c/x} map[big:1e+06 env:prod none:<nil> owner:map[name:x] replicas:3 team:core zones:[a b]]}"),
        ] {
            assert_eq!(run(src).as_deref(), Ok(want), "{src}");
        }
    }

    #[test]
    fn errors_like_go() {
        for (src, needle) in [
            (
                "{{.Nope}}",
                "can't evaluate field Nope in type hooks.Context",
            ),
            ("{{.ID.x}}", "can't evaluate field x in type string"),
            ("{{index .HostPorts 5}}", "index out of range"),
            (
                "{{eq .Metadata.replicas 3}}",
                "incompatible types for comparison",
            ),
            ("{{len 3}}", "len of type int"),
            ("{{.ID 1}}", "can't give argument to non-function"),
            ("{{$nope}}", "undefined variable"),
        ] {
            let e = run(src).unwrap_err();
            assert!(e.contains(needle), "{src}: {e}");
        }
        assert!(run("{{.Nope}}").unwrap_err().contains("{{.Nope}}"));
        assert!(Template::parse("{{nope .ID}}")
            .unwrap_err()
            .to_string()
            .contains("\"nope\" not defined"));
    }

    #[test]
    fn fields_are_checked_against_the_shape_before_running() {
        let shape = data();
        let ok = |s: &str| Template::parse(s).unwrap().check_fields(&shape);
        assert!(ok("{{.ID}} {{.Paths.ConfigDir}} {{.Metadata.anything.deep}}").is_ok());
        assert!(ok("{{with .Metadata}}{{.whatever}}{{end}}").is_ok());
        assert!(ok("{{range .HostPorts}}{{.}}{{end}}").is_ok());
        let e = ok("{{if .Nope}}x{{end}}").unwrap_err();
        assert!(e.contains("{{.Nope}}"), "{e}");
        assert!(ok("{{.Paths.Nope}}").is_err());
        assert!(ok("{{with .Metadata}}{{$.Nope}}{{end}}").is_err());
        assert!(ok("{{printf \"%s\" (.Nope)}}").is_err());
    }
}
