//! What to run: the image metadata the converter wrote (`image-meta.json`) turned
//! into a command line, an environment, a working directory and a user spec.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The fields of `image-meta.json` that init needs (the file has more; they are
/// ignored, so newer converters stay readable).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ImageMeta {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub start_cmd: Option<Vec<String>>,
    pub env: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// The default PATH when the image sets none (Docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartSpec {
    pub argv: Vec<String>,
    /// Ordered by name: the child's environment is the same on every boot.
    pub env: BTreeMap<String, String>,
    pub working_dir: String,
    /// `user`, `uid`, `user:group` or `uid:gid`, as Docker's USER.
    pub user: String,
}

impl StartSpec {
    pub fn from_meta(meta: &ImageMeta) -> StartSpec {
        let nonempty = |v: &Option<Vec<String>>| v.clone().filter(|v| !v.is_empty());
        let argv = nonempty(&meta.start_cmd).unwrap_or_else(|| {
            let mut argv = meta.entrypoint.clone().unwrap_or_default();
            argv.extend(meta.cmd.clone().unwrap_or_default());
            argv
        });
        let argv = if argv.is_empty() {
            vec!["/bin/sh".to_string()]
        } else {
            argv
        };
        let mut env = BTreeMap::new();
        for item in meta.env.iter().flatten() {
            // Docker keeps the last of duplicate names; an entry without `=` is skipped.
            if let Some((k, v)) = item.split_once('=') {
                if !k.is_empty() {
                    env.insert(k.to_string(), v.to_string());
                }
            }
        }
        env.entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.to_string());
        let working_dir = meta
            .working_dir
            .as_deref()
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .unwrap_or("/")
            .to_string();
        let user = meta
            .user
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .unwrap_or("root")
            .to_string();
        StartSpec {
            argv,
            env,
            working_dir,
            user,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(json: &str) -> ImageMeta {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn start_cmd_wins_then_entrypoint_plus_cmd_then_sh() {
        let m = meta(r#"{"entrypoint":["/e"],"cmd":["c"],"startCmd":["/s","x"]}"#);
        assert_eq!(StartSpec::from_meta(&m).argv, ["/s", "x"]);
        let m = meta(r#"{"entrypoint":["/e"],"cmd":["c"],"startCmd":null}"#);
        assert_eq!(StartSpec::from_meta(&m).argv, ["/e", "c"]);
        let m = meta(r#"{"image":"x","exposedPorts":["80/tcp"]}"#);
        assert_eq!(StartSpec::from_meta(&m).argv, ["/bin/sh"]);
    }

    #[test]
    fn env_workdir_user_defaults() {
        let m =
            meta(r#"{"env":["A=1","B=x=y","A=2","junk"],"workingDir":" /app ","user":"nginx"}"#);
        let s = StartSpec::from_meta(&m);
        assert_eq!(s.env["A"], "2");
        assert_eq!(s.env["B"], "x=y");
        assert_eq!(s.env["PATH"], DEFAULT_PATH);
        assert!(!s.env.contains_key("junk"));
        assert_eq!(s.working_dir, "/app");
        assert_eq!(s.user, "nginx");
        let s = StartSpec::from_meta(&meta("{}"));
        assert_eq!((s.working_dir.as_str(), s.user.as_str()), ("/", "root"));
    }
}
