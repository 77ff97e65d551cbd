//! Go-template-style placeholders (`{{.ID}}`, `{{.Paths.ConfigDir}}`, ...) in hook
//! argv items and URLs. Only field references are supported; anything else, or an
//! unknown field, is an error so a typo never runs a hook with a literal `{{...}}`.

use crate::hooks::HookContext;

pub fn render(text: &str, ctx: &HookContext) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("unclosed placeholder in {text:?}"))?;
        let name = after[..end].trim();
        out.push_str(
            &lookup(name, ctx).ok_or_else(|| format!("unknown placeholder {{{{{name}}}}}"))?,
        );
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Go prints a slice of ints as `[a b c]`.
fn go_list(ports: &[u16]) -> String {
    let items: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!("[{}]", items.join(" "))
}

fn lookup(name: &str, ctx: &HookContext) -> Option<String> {
    let p = &ctx.paths;
    Some(match name {
        ".ID" => ctx.id.clone(),
        ".Event" => ctx.event.clone(),
        ".GuestIP" => ctx.guest_ip.clone(),
        ".HostPorts" => go_list(&ctx.host_ports),
        ".GuestPorts" => go_list(&ctx.guest_ports),
        ".CreatedAt" => ctx.created_at.clone(),
        ".Metadata" => serde_json::Value::Object(ctx.metadata.clone()).to_string(),
        ".Paths.ConfigDir" => p.config_dir.clone(),
        ".Paths.VMConfigPath" => p.vm_config_path.clone(),
        ".Paths.MetaPath" => p.meta_path.clone(),
        ".Paths.HooksPath" => p.hooks_path.clone(),
        ".Paths.EnvPath" => p.env_path.clone(),
        ".Paths.RunDir" => p.run_dir.clone(),
        ".Paths.SocketPath" => p.socket_path.clone(),
        ".Paths.LockPath" => p.lock_path.clone(),
        ".Paths.DataDir" => p.data_dir.clone(),
        ".Paths.LogsDir" => p.logs_dir.clone(),
        other => {
            let key = other.strip_prefix(".Metadata.")?;
            match ctx.metadata.get(key)? {
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mergen_model::Paths;

    fn ctx() -> HookContext {
        let mut metadata = serde_json::Map::new();
        metadata.insert("team".into(), "core".into());
        HookContext {
            event: "onCreate".into(),
            id: "084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6".into(),
            guest_ip: "172.30.0.2".into(),
            host_ports: vec![20000, 20001],
            guest_ports: vec![80, 443],
            created_at: "2025-01-02T03:04:05Z".into(),
            paths: Paths {
                config_dir: "/c/x".into(),
                ..Paths::default()
            },
            metadata,
        }
    }

    #[test]
    fn fields_render_like_go() {
        let c = ctx();
        assert_eq!(
            render("{{.ID}}@{{ .GuestIP }} {{.HostPorts}} {{.GuestPorts}}", &c).unwrap(),
            "084604f6-1b2c-4d5e-8f90-a1b2c3d4e5f6@172.30.0.2 [20000 20001] [80 443]"
        );
        assert_eq!(render("{{.Paths.ConfigDir}}/x", &c).unwrap(), "/c/x/x");
        assert_eq!(render("{{.Metadata.team}}", &c).unwrap(), "core");
        assert_eq!(render("{{.Metadata}}", &c).unwrap(), r#"{"team":"core"}"#);
        assert_eq!(render("plain", &c).unwrap(), "plain");
    }

    #[test]
    fn unknown_or_broken_placeholders_fail() {
        let c = ctx();
        assert!(render("{{.Nope}}", &c).unwrap_err().contains("{{.Nope}}"));
        assert!(render("{{.Metadata.missing}}", &c).is_err());
        assert!(render("{{.ID", &c).unwrap_err().contains("unclosed"));
        assert!(render("{{ID}}", &c).is_err());
    }
}
