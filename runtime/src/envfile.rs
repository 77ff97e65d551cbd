//! Reading a VM's env file (`$MGR_CONFIG_ROOT/<id>/env`), which mergend writes as
//! `KEY='value'` lines with `'` escaped as `'\''`. The runtime reads it itself to build
//! the guest's environment, so the guest gets exactly that file (and its `process.env`),
//! never what happened to be in the environment of whoever started it.
//!
//! The syntax accepted is the part of systemd's `EnvironmentFile=` that such files use:
//! blank lines and `#`/`;` comments, `KEY=value` with single-quoted, double-quoted
//! (backslash escapes) and bare (backslash escapes) pieces, concatenated.

use std::collections::BTreeMap;

/// Parse the file's text. A malformed line is an error naming its number.
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut vars = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, raw)) = line.split_once('=') else {
            return Err(format!("line {}: no `=` in {line:?}", n + 1));
        };
        let key = key.trim();
        let valid = key
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(format!("line {}: {key:?} is not a variable name", n + 1));
        }
        let value = unquote(raw.trim()).map_err(|e| format!("line {}: {e}", n + 1))?;
        vars.insert(key.to_string(), value);
    }
    Ok(vars)
}

fn unquote(raw: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next() {
                    Some('\'') => break,
                    Some(c) => out.push(c),
                    None => return Err("unterminated single quote".into()),
                }
            },
            '"' => loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c @ ('"' | '\\' | '$' | '`')) => out.push(c),
                        Some(c) => {
                            out.push('\\');
                            out.push(c);
                        }
                        None => return Err("unterminated double quote".into()),
                    },
                    Some(c) => out.push(c),
                    None => return Err("unterminated double quote".into()),
                }
            },
            '\\' => match chars.next() {
                Some(c) => out.push(c),
                None => return Err("a trailing backslash".into()),
            },
            c => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_mergend_writes() {
        // The exact text of ctl's env file test: sorted keys, single quotes, '\'' escapes.
        let text = "APP_MODE='it'\\''s'\nMGN_GUEST_IP='172.30.0.2'\nMGN_PUBLISH_80='20000/tcp'\nEMPTY=''\n";
        let vars = parse(text).unwrap();
        assert_eq!(vars["APP_MODE"], "it's");
        assert_eq!(vars["MGN_GUEST_IP"], "172.30.0.2");
        assert_eq!(vars["MGN_PUBLISH_80"], "20000/tcp");
        assert_eq!(vars["EMPTY"], "");
        assert_eq!(vars.len(), 4);
    }

    #[test]
    fn other_shapes_an_operator_may_write() {
        let text = "# comment\n\n; also a comment\nexport A=plain\nB=\"x \\\"y\\\" $z\"\nC=a\\ b\nD='multi word' \n";
        let vars = parse(text).unwrap();
        assert_eq!(vars["A"], "plain");
        assert_eq!(vars["B"], "x \"y\" $z");
        assert_eq!(vars["C"], "a b");
        assert_eq!(vars["D"], "multi word");
    }

    #[test]
    fn malformed_lines_are_errors_with_their_number() {
        assert!(parse("A='x\n").unwrap_err().starts_with("line 1:"));
        assert!(parse("OK=1\nno equals\n")
            .unwrap_err()
            .starts_with("line 2:"));
        assert!(parse("1BAD=x\n")
            .unwrap_err()
            .contains("not a variable name"));
        assert!(parse("B=\"open\n").unwrap_err().contains("double quote"));
    }
}
