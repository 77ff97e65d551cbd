//! One table of environment variables per daemon.
//!
//! Each daemon declares its variables once, as a `&[Var]` with the default and a line of
//! help. [`Env`] reads values through that table, so the default a daemon applies and the
//! default its `--help` (and the README's tables) show cannot drift apart, and every
//! error names the variable and the value it refused.
//!
//! Rules shared by every daemon, as the original's Go code had them:
//! - unset and empty (or only whitespace) are the same: the default applies;
//! - values are trimmed;
//! - booleans follow Go's `strconv.ParseBool` (plus `yes`/`no`, which earlier
//!   releases of mergen accepted);
//! - durations are whole seconds; `0` is refused unless the variable documents what
//!   zero means (see [`Env::seconds_or_off`]).

#![deny(unsafe_code)]

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// What a variable is when it is not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Default {
    /// This text is parsed exactly as if the variable held it.
    Value(&'static str),
    /// No value: the setting is off or absent. `--help` shows `(unset)`.
    Unset,
    /// Computed at start-up (e.g. "number of CPUs"); the daemon supplies it and
    /// `--help` shows this description in parentheses.
    Computed(&'static str),
}

/// One variable of a daemon's table.
#[derive(Debug, Clone, Copy)]
pub struct Var {
    pub name: &'static str,
    pub default: Default,
    pub help: &'static str,
}

impl Var {
    pub const fn new(name: &'static str, default: &'static str, help: &'static str) -> Var {
        Var {
            name,
            default: Default::Value(default),
            help,
        }
    }

    pub const fn unset(name: &'static str, help: &'static str) -> Var {
        Var {
            name,
            default: Default::Unset,
            help,
        }
    }

    pub const fn computed(name: &'static str, what: &'static str, help: &'static str) -> Var {
        Var {
            name,
            default: Default::Computed(what),
            help,
        }
    }

    /// The default as `--help` and the README show it.
    pub fn shown_default(&self) -> String {
        match self.default {
            Default::Value(v) => v.to_string(),
            Default::Unset => "(unset)".to_string(),
            Default::Computed(what) => format!("({what})"),
        }
    }
}

/// A refused value: names the variable, the value and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub name: String,
    pub value: String,
    pub expected: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}={:?}: expected {}",
            self.name, self.value, self.expected
        )
    }
}

impl std::error::Error for Error {}

/// Go's `strconv.ParseBool`, the rule the original applied to every boolean it read
/// (environment and query strings alike). Anything else is `None`, never a guess.
pub fn go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Where values come from: the process environment, or a map in tests.
type Lookup<'a> = Box<dyn Fn(&str) -> Option<String> + 'a>;

/// Reads variables through a table (or several: mergend's table is its own variables
/// plus the runtime's, which its per-VM step subcommands also read).
pub struct Env<'a> {
    tables: Vec<&'a [Var]>,
    get: Lookup<'a>,
}

impl<'a> Env<'a> {
    /// Read from the process environment.
    pub fn from_process(table: &'a [Var]) -> Env<'a> {
        Env::new(table, |k| std::env::var(k).ok())
    }

    pub fn new(table: &'a [Var], get: impl Fn(&str) -> Option<String> + 'a) -> Env<'a> {
        Env::layered(&[table], get)
    }

    /// Read through several tables, searched in order.
    pub fn layered(tables: &[&'a [Var]], get: impl Fn(&str) -> Option<String> + 'a) -> Env<'a> {
        Env {
            tables: tables.to_vec(),
            get: Box::new(get),
        }
    }

    /// Only names in the table may be read: a variable missing from `--help` is a bug,
    /// caught by the first test that reads it.
    fn entry(&self, name: &str) -> &Var {
        match self
            .tables
            .iter()
            .flat_map(|t| t.iter())
            .find(|v| v.name == name)
        {
            Some(v) => v,
            None => panic!("{name} is read but not declared in the variable table"),
        }
    }

    /// The value as set, trimmed; `None` when unset or blank.
    pub fn set(&self, name: &str) -> Option<String> {
        self.entry(name);
        (self.get)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    /// Whether the variable is present at all, even empty (for the few variables where
    /// an empty value means "off", such as an empty admin address).
    pub fn present(&self, name: &str) -> bool {
        self.entry(name);
        (self.get)(name).is_some()
    }

    /// The value as set, else the table's default text; `None` for an unset variable
    /// whose default is [`Default::Unset`] or [`Default::Computed`].
    pub fn opt(&self, name: &str) -> Option<String> {
        self.set(name).or_else(|| match self.entry(name).default {
            Default::Value(v) if !v.is_empty() => Some(v.to_string()),
            _ => None,
        })
    }

    /// The value as set, else the default text (empty when the default is not a value).
    pub fn string(&self, name: &str) -> String {
        self.opt(name).unwrap_or_default()
    }

    fn error(&self, name: &str, value: &str, expected: impl Into<String>) -> Error {
        Error {
            name: name.to_string(),
            value: value.to_string(),
            expected: expected.into(),
        }
    }

    /// Parse with `FromStr`; `expected` says what a good value looks like.
    pub fn parse<T: FromStr>(&self, name: &str, expected: &str) -> Result<Option<T>, Error> {
        match self.opt(name) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| self.error(name, &v, expected)),
        }
    }

    /// Like [`Env::parse`] for a variable that has a value default.
    pub fn value<T: FromStr>(&self, name: &str, expected: &str) -> Result<T, Error> {
        match self.parse(name, expected)? {
            Some(v) => Ok(v),
            None => Err(self.error(name, "", expected)),
        }
    }

    /// Apply `f` to the value (or default); its error text is what was expected.
    pub fn with<T>(
        &self,
        name: &str,
        f: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, Error> {
        match self.opt(name) {
            None => Ok(None),
            Some(v) => f(&v).map(Some).map_err(|e| self.error(name, &v, e)),
        }
    }

    /// Go's `strconv.ParseBool` (plus yes/no). Unset with no default is `false`.
    pub fn bool(&self, name: &str) -> Result<bool, Error> {
        match self.opt(name) {
            None => Ok(false),
            Some(v) => match go_bool(&v) {
                Some(b) => Ok(b),
                None => match v.as_str() {
                    "yes" => Ok(true),
                    "no" => Ok(false),
                    _ => Err(self.error(name, &v, "a boolean (1, true, 0, false)")),
                },
            },
        }
    }

    /// A whole number above zero.
    pub fn positive(&self, name: &str) -> Result<u64, Error> {
        let n: u64 = self.value(name, "a whole number above 0")?;
        if n == 0 {
            return Err(self.error(name, "0", "a whole number above 0"));
        }
        Ok(n)
    }

    /// A positive whole number of seconds.
    pub fn seconds(&self, name: &str) -> Result<Duration, Error> {
        let expected = "a whole number of seconds above 0";
        let n: u64 = self.value(name, expected)?;
        if n == 0 {
            return Err(self.error(name, "0", expected));
        }
        Ok(Duration::from_secs(n))
    }

    /// Whole seconds where `0` turns the timer off (`None`); the variable's help must
    /// say so.
    pub fn seconds_or_off(&self, name: &str) -> Result<Option<Duration>, Error> {
        let n: u64 = self.value(name, "a whole number of seconds (0 = off)")?;
        Ok((n > 0).then(|| Duration::from_secs(n)))
    }

    /// A TCP/UDP port, 1..=65535.
    pub fn port(&self, name: &str) -> Result<u16, Error> {
        let expected = "a port (1-65535)";
        let n: u16 = self.value(name, expected)?;
        if n == 0 {
            return Err(self.error(name, "0", expected));
        }
        Ok(n)
    }

    /// One of a fixed set of words, compared case-insensitively; returns the lowercase
    /// word.
    pub fn choice(&self, name: &str, words: &[&str]) -> Result<String, Error> {
        let v = self.string(name).to_ascii_lowercase();
        if words.contains(&v.as_str()) {
            Ok(v)
        } else {
            Err(self.error(name, &v, words.join("|")))
        }
    }
}

/// The variables as aligned text for `--help`; pass several tables chained for a daemon
/// that reads more than one.
pub fn help_text<'v>(vars: impl IntoIterator<Item = &'v Var> + Clone) -> String {
    let name_w = vars
        .clone()
        .into_iter()
        .map(|v| v.name.len())
        .max()
        .unwrap_or(0)
        + 2;
    let def_w = vars
        .clone()
        .into_iter()
        .map(|v| v.shown_default().len())
        .max()
        .unwrap_or(0)
        .min(40)
        + 2;
    let mut s = String::new();
    for v in vars {
        // A default wider than the column still gets its two spaces before the help.
        let default = v.shown_default();
        let def_w = def_w.max(default.len() + 2);
        s.push_str(&format!(
            "  {:<name_w$}{default:<def_w$}{}\n",
            v.name, v.help
        ));
    }
    s
}

/// The variables as a Markdown table (`| variable | default | meaning |`), the form the
/// README carries.
pub fn markdown<'v>(vars: impl IntoIterator<Item = &'v Var>) -> String {
    let mut s = String::from("| variable | default | meaning |\n|---|---|---|\n");
    for v in vars {
        s.push_str(&format!(
            "| `{}` | `{}` | {} |\n",
            v.name,
            v.shown_default(),
            v.help.replace('|', "\\|")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const TABLE: &[Var] = &[
        Var::new("T_ADDR", "127.0.0.1:8080", "listen address"),
        Var::unset("T_TOKEN", "bearer token"),
        Var::new("T_FLAG", "0", "a switch"),
        Var::new("T_SECS", "10", "a timeout"),
        Var::new("T_IDLE", "3600", "idle timeout, 0 = off"),
        Var::new("T_PORT", "20000", "first port"),
        Var::new("T_MODE", "auto", "auto|a|b"),
        Var::computed("T_WORKERS", "number of CPUs", "threads"),
    ];

    fn env(pairs: &[(&str, &str)]) -> Env<'static> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env::new(TABLE, move |k| map.get(k).cloned())
    }

    #[test]
    fn defaults_come_from_the_table() {
        let e = env(&[]);
        assert_eq!(e.string("T_ADDR"), "127.0.0.1:8080");
        assert_eq!(e.opt("T_TOKEN"), None);
        assert!(!e.bool("T_FLAG").unwrap());
        assert_eq!(e.seconds("T_SECS").unwrap(), Duration::from_secs(10));
        assert_eq!(e.port("T_PORT").unwrap(), 20000);
        assert_eq!(e.choice("T_MODE", &["auto", "a", "b"]).unwrap(), "auto");
        assert_eq!(e.parse::<usize>("T_WORKERS", "n").unwrap(), None);
    }

    #[test]
    fn blank_is_unset_and_values_are_trimmed() {
        let e = env(&[("T_ADDR", "  "), ("T_SECS", " 7 "), ("T_MODE", " B ")]);
        assert_eq!(e.string("T_ADDR"), "127.0.0.1:8080");
        assert_eq!(e.seconds("T_SECS").unwrap(), Duration::from_secs(7));
        assert_eq!(e.choice("T_MODE", &["auto", "a", "b"]).unwrap(), "b");
        assert!(e.present("T_ADDR"));
        assert!(!e.present("T_TOKEN"));
    }

    #[test]
    fn booleans_follow_go() {
        for t in ["1", "t", "T", "TRUE", "true", "True", "yes"] {
            assert!(env(&[("T_FLAG", t)]).bool("T_FLAG").unwrap(), "{t}");
        }
        for f in ["0", "f", "F", "FALSE", "false", "False", "no"] {
            assert!(!env(&[("T_FLAG", f)]).bool("T_FLAG").unwrap(), "{f}");
        }
        for bad in ["tRUE", "2", "on", "y"] {
            let err = env(&[("T_FLAG", bad)]).bool("T_FLAG").unwrap_err();
            assert_eq!(err.name, "T_FLAG");
            assert_eq!(err.value, bad);
        }
        assert_eq!(go_bool("yes"), None, "query strings get Go's rule exactly");
    }

    #[test]
    fn zero_seconds_only_where_it_means_off() {
        assert!(env(&[("T_SECS", "0")]).seconds("T_SECS").is_err());
        assert_eq!(
            env(&[("T_IDLE", "0")]).seconds_or_off("T_IDLE").unwrap(),
            None
        );
        assert_eq!(
            env(&[]).seconds_or_off("T_IDLE").unwrap(),
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn errors_name_variable_value_and_expectation() {
        let e = env(&[("T_PORT", "70000"), ("T_SECS", "x"), ("T_MODE", "c")]);
        let p = e.port("T_PORT").unwrap_err().to_string();
        assert!(p.starts_with("T_PORT=\"70000\": expected a port"), "{p}");
        assert!(e
            .seconds("T_SECS")
            .unwrap_err()
            .to_string()
            .contains("T_SECS=\"x\""));
        assert!(e
            .choice("T_MODE", &["auto", "a", "b"])
            .unwrap_err()
            .expected
            .contains("auto|a|b"));
        assert!(env(&[("T_PORT", "0")]).port("T_PORT").is_err());
    }

    #[test]
    fn layered_tables_are_searched_in_order() {
        const MORE: &[Var] = &[Var::new("T_EXTRA", "x", "another daemon part")];
        let e = Env::layered(&[TABLE, MORE], |_| None);
        assert_eq!(e.string("T_EXTRA"), "x");
        assert_eq!(e.string("T_ADDR"), "127.0.0.1:8080");
        assert!(help_text(TABLE.iter().chain(MORE)).contains("T_EXTRA"));
    }

    #[test]
    #[should_panic(expected = "not declared")]
    fn undeclared_variables_cannot_be_read() {
        env(&[]).string("T_NOPE");
    }

    #[test]
    fn help_and_markdown_show_every_default() {
        let h = help_text(TABLE);
        let m = markdown(TABLE);
        for v in TABLE {
            assert!(
                h.contains(v.name) && h.contains(&v.shown_default()),
                "{}",
                v.name
            );
            assert!(m.contains(&format!("| `{}` | `{}` |", v.name, v.shown_default())));
        }
        assert!(h.contains("(unset)") && h.contains("(number of CPUs)"));
        let short = [Var::new("T_SHORT", "x", "help")];
        let wide = [Var::new(
            "T_WIDE",
            "a-default-far-wider-than-forty-characters-in-all",
            "its help",
        )];
        assert!(help_text(short.iter().chain(&wide)).contains("in-all  its help"));
    }
}
