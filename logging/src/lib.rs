//! Logging in the original's three formats, installed behind the `log` facade.
//!
//! - `console`: `[LEVEL] TIMESTAMP MESSAGE key=value...`, the level colored
//!   (INFO blue, WARN yellow, ERROR red, DEBUG cyan);
//! - `json`: one object per line (`level`, `time`, `msg`, then the key-values);
//! - `text`: `time=... level=... msg="..." key=value`, logfmt style.
//!
//! Key-values come from `log`'s structured logging: `log::info!(id = id; "created")`.

#![deny(unsafe_code)]

use std::fmt::Write as _;
use std::io::Write as _;
use std::str::FromStr;

use log::kv::{Key, Value, VisitSource};
use log::{Level, LevelFilter, Log, Metadata, Record};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Console,
    Json,
    Text,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "console" | "" => Ok(Format::Console),
            "json" => Ok(Format::Json),
            "text" => Ok(Format::Text),
            other => Err(format!(
                "unknown log format {other:?} (want console|json|text)"
            )),
        }
    }
}

/// Parse a level as the original did: `debug|info|warn|error`.
pub fn parse_level(s: &str) -> Result<LevelFilter, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "debug" => Ok(LevelFilter::Debug),
        "info" | "" => Ok(LevelFilter::Info),
        "warn" | "warning" => Ok(LevelFilter::Warn),
        "error" => Ok(LevelFilter::Error),
        other => Err(format!(
            "unknown log level {other:?} (want debug|info|warn|error)"
        )),
    }
}

struct Logger {
    format: Format,
    level: LevelFilter,
}

/// Install the global logger from the values of `<PREFIX>_LOG_LEVEL` and
/// `<PREFIX>_LOG_FORMAT`. Errors name the bad value.
pub fn init(level: &str, format: &str) -> Result<(), String> {
    let level = parse_level(level)?;
    let format = format.parse()?;
    log::set_boxed_logger(Box::new(Logger { format, level }))
        .map_err(|e| format!("logger already installed: {e}"))?;
    log::set_max_level(level);
    Ok(())
}

/// Render one record as a line (without the newline). Public for tests.
pub fn render(format: Format, record: &Record, now: OffsetDateTime) -> String {
    let ts = now.format(&Rfc3339).unwrap_or_default();
    let level = level_name(record.level());
    let msg = record.args().to_string();
    let mut kvs = Vec::new();
    let _ = record.key_values().visit(&mut Collect(&mut kvs));
    match format {
        Format::Console => {
            let color = match record.level() {
                Level::Info => "34",
                Level::Warn => "33",
                Level::Error => "31",
                Level::Debug | Level::Trace => "36",
            };
            let mut line = format!("\x1b[{color}m[{level}]\x1b[0m {ts} {msg}");
            for (k, v) in &kvs {
                let _ = write!(line, " {k}={}", logfmt_value(v));
            }
            line
        }
        Format::Text => {
            let mut line = format!("time={ts} level={level} msg={}", logfmt_value(&msg));
            for (k, v) in &kvs {
                let _ = write!(line, " {k}={}", logfmt_value(v));
            }
            line
        }
        Format::Json => {
            let mut obj = serde_json::Map::new();
            obj.insert("level".into(), level.to_ascii_lowercase().into());
            obj.insert("time".into(), ts.into());
            obj.insert("msg".into(), msg.into());
            for (k, v) in kvs {
                obj.insert(k, v.into());
            }
            serde_json::Value::Object(obj).to_string()
        }
    }
}

fn level_name(l: Level) -> &'static str {
    match l {
        Level::Error => "ERROR",
        Level::Warn => "WARN",
        Level::Info => "INFO",
        Level::Debug | Level::Trace => "DEBUG",
    }
}

fn logfmt_value(v: &str) -> String {
    if !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '"' || c == '=') {
        v.to_string()
    } else {
        format!("{v:?}")
    }
}

struct Collect<'a>(&'a mut Vec<(String, String)>);

impl<'kvs> VisitSource<'kvs> for Collect<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        self.0.push((key.to_string(), value.to_string()));
        Ok(())
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = render(self.format, record, OffsetDateTime::now_utc());
        // One write per line so concurrent threads never interleave within a line.
        let mut out = std::io::stderr().lock();
        let _ = writeln!(out, "{line}");
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn line(format: Format, level: Level) -> String {
        let kvs: &[(&str, &str)] = &[("id", "abc"), ("path", "/a b")];
        let record = Record::builder()
            .level(level)
            .args(format_args!("vm created"))
            .key_values(&kvs)
            .build();
        render(format, &record, datetime!(2025-01-02 03:04:05 UTC))
    }

    #[test]
    fn console_is_colored_level_time_message_kv() {
        assert_eq!(
            line(Format::Console, Level::Info),
            "\x1b[34m[INFO]\x1b[0m 2025-01-02T03:04:05Z vm created id=abc path=\"/a b\""
        );
        assert!(line(Format::Console, Level::Warn).starts_with("\x1b[33m[WARN]"));
        assert!(line(Format::Console, Level::Error).starts_with("\x1b[31m[ERROR]"));
        assert!(line(Format::Console, Level::Debug).starts_with("\x1b[36m[DEBUG]"));
    }

    #[test]
    fn json_and_text() {
        let v: serde_json::Value = serde_json::from_str(&line(Format::Json, Level::Warn)).unwrap();
        assert_eq!(v["level"], "warn");
        assert_eq!(v["msg"], "vm created");
        assert_eq!(v["id"], "abc");
        assert_eq!(
            line(Format::Text, Level::Error),
            "time=2025-01-02T03:04:05Z level=ERROR msg=\"vm created\" id=abc path=\"/a b\""
        );
    }

    #[test]
    fn bad_values_are_named() {
        assert!(parse_level("loud").unwrap_err().contains("loud"));
        assert!("xml".parse::<Format>().unwrap_err().contains("xml"));
    }
}
