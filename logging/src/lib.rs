//! Logging in the original's three formats (Go's `log/slog`), written to stdout as the
//! original wrote it, behind the `log` facade:
//!
//! - `json`: one object per line, keys in slog's order: `time` (local time, RFC 3339
//!   with nanoseconds, trailing zeros trimmed), `level` (`DEBUG`, `INFO`, `WARN`,
//!   `ERROR`), `msg`, `component`, then the record's attributes; numbers and booleans
//!   stay JSON numbers and booleans;
//! - `text`: slog's TextHandler, `time=... level=INFO msg="..." component=... k=v`,
//!   the time with milliseconds, values quoted only when they must be;
//! - `console`: `[LEVEL] TIMESTAMP MESSAGE key=value...`, the level colored (INFO
//!   blue, WARN yellow, ERROR red, DEBUG cyan), `component` the first key.
//!
//! Key-values come from `log`'s structured logging: `log::info!(id = id; "created")`.
//! Local time comes from chrono, which reads TZ and /etc/localtime itself (safe with
//! threads, and it follows daylight saving changes).

#![deny(unsafe_code)]

use std::fmt::Write as _;
use std::io::Write as _;
use std::str::FromStr;

use chrono::{DateTime, FixedOffset, Local, Timelike};
use log::kv::{Key, Value, VisitSource};
use log::{Level, LevelFilter, Log, Metadata, Record};

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
    component: &'static str,
}

/// Install the global logger for the daemon `component` (`mergend`,
/// `mergen-forwarder`) from the values of `<PREFIX>_LOG_LEVEL` and
/// `<PREFIX>_LOG_FORMAT`. Errors name the bad value.
pub fn init(component: &'static str, level: &str, format: &str) -> Result<(), String> {
    let level = parse_level(level)?;
    let format = format.parse()?;
    log::set_boxed_logger(Box::new(Logger {
        format,
        level,
        component,
    }))
    .map_err(|e| format!("logger already installed: {e}"))?;
    log::set_max_level(level);
    Ok(())
}

/// An attribute's value, typed as slog would write it.
#[derive(Debug, Clone, PartialEq)]
enum Attr {
    Str(String),
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
}

impl Attr {
    fn of(v: &Value<'_>) -> Attr {
        if let Some(b) = v.to_bool() {
            Attr::Bool(b)
        } else if let Some(n) = v.to_i64() {
            Attr::I64(n)
        } else if let Some(n) = v.to_u64() {
            Attr::U64(n)
        } else if let Some(f) = v.to_f64() {
            Attr::F64(f)
        } else {
            Attr::Str(v.to_string())
        }
    }

    fn text(&self) -> String {
        match self {
            Attr::Str(s) => s.clone(),
            Attr::I64(n) => n.to_string(),
            Attr::U64(n) => n.to_string(),
            Attr::F64(f) => f.to_string(),
            Attr::Bool(b) => b.to_string(),
        }
    }

    fn json(&self) -> String {
        match self {
            Attr::Str(s) => json_string(s),
            Attr::F64(f) if !f.is_finite() => json_string(&f.to_string()),
            other => other.text(),
        }
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// RFC 3339 as Go's `time.RFC3339Nano` writes it: nanoseconds without trailing zeros,
/// `Z` for UTC.
fn rfc3339_nano(t: &DateTime<FixedOffset>) -> String {
    let mut s = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = t.nanosecond() % 1_000_000_000;
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    push_offset(&mut s, t);
    s
}

/// RFC 3339 with milliseconds, as slog's TextHandler writes it.
fn rfc3339_millis(t: &DateTime<FixedOffset>) -> String {
    let mut s = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let _ = write!(s, ".{:03}", (t.nanosecond() % 1_000_000_000) / 1_000_000);
    push_offset(&mut s, t);
    s
}

fn push_offset(s: &mut String, t: &DateTime<FixedOffset>) {
    let secs = t.offset().local_minus_utc();
    if secs == 0 {
        s.push('Z');
    } else {
        let sign = if secs < 0 { '-' } else { '+' };
        let m = secs.unsigned_abs() / 60;
        let _ = write!(s, "{sign}{:02}:{:02}", m / 60, m % 60);
    }
}

/// Render one record as a line (without the newline). Public for tests.
pub fn render(
    format: Format,
    component: &str,
    record: &Record,
    now: DateTime<FixedOffset>,
) -> String {
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
            let mut line = format!(
                "\x1b[{color}m[{level}]\x1b[0m {} {msg} component={}",
                rfc3339_millis(&now),
                logfmt_value(component)
            );
            for (k, v) in &kvs {
                let _ = write!(line, " {k}={}", logfmt_value(&v.text()));
            }
            line
        }
        Format::Text => {
            let mut line = format!(
                "time={} level={level} msg={} component={}",
                rfc3339_millis(&now),
                logfmt_value(&msg),
                logfmt_value(component)
            );
            for (k, v) in &kvs {
                let _ = write!(line, " {k}={}", logfmt_value(&v.text()));
            }
            line
        }
        Format::Json => {
            let mut line = format!(
                "{{\"time\":{},\"level\":\"{level}\",\"msg\":{},\"component\":{}",
                json_string(&rfc3339_nano(&now)),
                json_string(&msg),
                json_string(component)
            );
            for (k, v) in &kvs {
                let _ = write!(line, ",{}:{}", json_string(k), v.json());
            }
            line.push('}');
            line
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

/// slog's TextHandler: a value is quoted (Go's strconv.Quote) when it is empty or holds
/// a space, `=`, `"` or a character that is not printable.
fn logfmt_value(v: &str) -> String {
    let plain = !v.is_empty()
        && !v
            .chars()
            .any(|c| c.is_whitespace() || c == '"' || c == '=' || c.is_control());
    if plain {
        v.to_string()
    } else {
        format!("{v:?}")
    }
}

struct Collect<'a>(&'a mut Vec<(String, Attr)>);

impl<'kvs> VisitSource<'kvs> for Collect<'_> {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        self.0.push((key.to_string(), Attr::of(&value)));
        Ok(())
    }
}

/// The netlink parser crates warn about every attribute whose size differs from the one
/// they were written against (`IFLA_INET6_CONF ... expecting 236, got 240` on newer
/// kernels), several times per link operation: noise for an operator, so only their
/// errors are shown.
fn quiet_dependency(target: &str) -> bool {
    target.starts_with("netlink_packet")
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        let level = if quiet_dependency(metadata.target()) {
            self.level.min(LevelFilter::Error)
        } else {
            self.level
        };
        metadata.level() <= level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let now = Local::now().fixed_offset();
        let mut line = render(self.format, self.component, record, now);
        line.push('\n');
        // One write per line so concurrent threads never interleave within a line.
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(line.as_bytes());
        let _ = out.flush();
    }

    fn flush(&self) {
        let _ = std::io::stdout().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn netlink_parser_warnings_are_hidden_but_not_its_errors() {
        let logger = Logger {
            level: LevelFilter::Debug,
            format: Format::Json,
            component: "test",
        };
        let meta = |target, level| Metadata::builder().target(target).level(level).build();
        assert!(!logger.enabled(&meta("netlink_packet_route::link", Level::Warn)));
        assert!(logger.enabled(&meta("netlink_packet_route::link", Level::Error)));
        assert!(logger.enabled(&meta("ffi_free_netns::links", Level::Debug)));
    }

    fn at(offset_secs: i32) -> DateTime<FixedOffset> {
        FixedOffset::east_opt(offset_secs)
            .unwrap()
            .with_ymd_and_hms(2025, 1, 2, 3, 4, 5)
            .unwrap()
            .with_nanosecond(120_000_000)
            .unwrap()
    }

    fn line(format: Format, level: Level, now: DateTime<FixedOffset>) -> String {
        let kvs: &[(&str, &dyn log::kv::ToValue)] = &[
            ("id", &"abc"),
            ("path", &"/a b"),
            ("status", &201u16),
            ("ms", &1.5f64),
            ("strict", &true),
        ];
        let record = Record::builder()
            .level(level)
            .args(format_args!("vm created"))
            .key_values(&kvs)
            .build();
        render(format, "mergend", &record, now)
    }

    /// slog's JSONHandler: key order, upper-case level, local time with its offset,
    /// typed attributes.
    #[test]
    fn json_has_the_originals_shape() {
        let l = line(Format::Json, Level::Warn, at(3600));
        assert_eq!(
            l,
            r#"{"time":"2025-01-02T03:04:05.12+01:00","level":"WARN","msg":"vm created","component":"mergend","id":"abc","path":"/a b","status":201,"ms":1.5,"strict":true}"#
        );
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["status"], 201);
        let utc = line(Format::Json, Level::Info, at(0));
        assert!(
            utc.starts_with(r#"{"time":"2025-01-02T03:04:05.12Z","level":"INFO""#),
            "{utc}"
        );
        let west = line(Format::Json, Level::Error, at(-(5 * 3600 + 30 * 60)));
        assert!(west.contains("05.12-05:30"), "{west}");
    }

    #[test]
    fn text_is_slogs_text_handler() {
        assert_eq!(
            line(Format::Text, Level::Error, at(0)),
            "time=2025-01-02T03:04:05.120Z level=ERROR msg=\"vm created\" component=mergend id=abc path=\"/a b\" status=201 ms=1.5 strict=true"
        );
    }

    #[test]
    fn console_is_colored_level_time_message_kv() {
        assert_eq!(
            line(Format::Console, Level::Info, at(0)),
            "\x1b[34m[INFO]\x1b[0m 2025-01-02T03:04:05.120Z vm created component=mergend id=abc path=\"/a b\" status=201 ms=1.5 strict=true"
        );
        assert!(line(Format::Console, Level::Warn, at(0)).starts_with("\x1b[33m[WARN]"));
        assert!(line(Format::Console, Level::Error, at(0)).starts_with("\x1b[31m[ERROR]"));
        assert!(line(Format::Console, Level::Debug, at(0)).starts_with("\x1b[36m[DEBUG]"));
    }

    #[test]
    fn bad_values_are_named() {
        assert!(parse_level("loud").unwrap_err().contains("loud"));
        assert!("xml".parse::<Format>().unwrap_err().contains("xml"));
    }
}
