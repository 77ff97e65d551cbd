//! The values a template sees, and how Go's `fmt` prints them with `%v`: the data of the
//! original's hooks was a Go struct whose `Metadata` was a `map[string]any` decoded
//! from JSON (numbers are `float64`), so that is what `{{.Metadata}}` must look like.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use time::OffsetDateTime;

/// A value during execution.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// No value at all (a missing map key, a JSON `null` taken out of a map): Go's
    /// invalid `reflect.Value`, printed `<no value>`.
    Missing,
    /// A nil inside a collection, printed `<nil>`.
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    /// `map[string]any`: printed with sorted keys, as Go does.
    Map(BTreeMap<String, Value>),
    Struct(Struct),
    /// `time.Time`, printed by its `String()` method.
    Time(OffsetDateTime),
}

/// A Go struct: its type name (for errors) and its fields in declaration order.
#[derive(Debug, Clone, PartialEq)]
pub struct Struct {
    pub type_name: &'static str,
    pub fields: Vec<(&'static str, Value)>,
}

impl Value {
    /// A JSON value as Go's `encoding/json` decodes it into `any`.
    pub fn from_json(v: &serde_json::Value) -> Value {
        match v {
            serde_json::Value::Null => Value::Nil,
            serde_json::Value::Bool(b) => Value::Bool(*b),
            serde_json::Value::Number(n) => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
            serde_json::Value::String(s) => Value::Str(s.clone()),
            serde_json::Value::Array(a) => Value::List(a.iter().map(Value::from_json).collect()),
            serde_json::Value::Object(o) => Value::Map(
                o.iter()
                    .map(|(k, v)| (k.clone(), Value::from_json(v)))
                    .collect(),
            ),
        }
    }

    /// Go's type name, for `%!d(string=x)` and errors.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Missing | Value::Nil => "<nil>",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float64",
            Value::Str(_) => "string",
            Value::List(_) => "[]interface {}",
            Value::Map(_) => "map[string]interface {}",
            Value::Struct(s) => s.type_name,
            Value::Time(_) => "time.Time",
        }
    }

    /// Go's truth: false, 0, nil, and empty strings and collections are false.
    pub fn truth(&self) -> bool {
        match self {
            Value::Missing | Value::Nil => false,
            Value::Bool(b) => *b,
            Value::Int(n) => *n != 0,
            Value::Float(f) => *f != 0.0,
            Value::Str(s) => !s.is_empty(),
            Value::List(l) => !l.is_empty(),
            Value::Map(m) => !m.is_empty(),
            Value::Struct(_) | Value::Time(_) => true,
        }
    }
}

/// `%v` of a value at the top of an action: what `{{.X}}` prints.
pub fn print(v: &Value) -> String {
    match v {
        Value::Missing => "<no value>".to_string(),
        other => {
            let mut s = String::new();
            write_v(&mut s, other, false);
            s
        }
    }
}

/// `%v` (`%+v` with `plus`: struct fields are named) of a value inside `fmt`.
pub fn write_v(out: &mut String, v: &Value, plus: bool) {
    match v {
        Value::Missing | Value::Nil => out.push_str("<nil>"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Float(f) => out.push_str(&format_float(*f, 'g', None)),
        Value::Str(s) => out.push_str(s),
        Value::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                write_v(out, item, plus);
            }
            out.push(']');
        }
        Value::Map(m) => {
            out.push_str("map[");
            for (i, (k, item)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                out.push_str(k);
                out.push(':');
                write_v(out, item, plus);
            }
            out.push(']');
        }
        Value::Struct(s) => {
            out.push('{');
            for (i, (name, item)) in s.fields.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                if plus {
                    out.push_str(name);
                    out.push(':');
                }
                write_v(out, item, plus);
            }
            out.push('}');
        }
        Value::Time(t) => out.push_str(&go_time_string(*t)),
    }
}

/// `time.Time.String()`: `2006-01-02 15:04:05.999999999 -0700 MST`, the fraction
/// without trailing zeros (and without its dot when zero). mergen's times are UTC,
/// whose zone Go names `UTC`; another offset has no name here, so Go's numeric
/// fallback (`+0100`) is used for it.
pub fn go_time_string(t: OffsetDateTime) -> String {
    let off = t.offset();
    let mut s = format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let nanos = t.nanosecond();
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    let (h, m, _) = off.as_hms();
    let sign = if off.is_negative() { '-' } else { '+' };
    let _ = write!(s, " {sign}{:02}{:02}", h.unsigned_abs(), m.unsigned_abs());
    if off.is_utc() {
        s.push_str(" UTC");
    } else {
        let _ = write!(s, " {sign}{:02}{:02}", h.unsigned_abs(), m.unsigned_abs());
    }
    s
}

/// Go's `strconv.FormatFloat(f, fmt, prec, 64)` for `fmt` in `e E f g G` (`prec` None
/// = the shortest representation that reads back the same), which is also what `%v`
/// prints for a float64.
pub fn format_float(f: f64, fmt: char, prec: Option<usize>) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    let neg = f.is_sign_negative();
    let a = f.abs();
    let body = match fmt {
        'f' | 'F' => match prec {
            Some(p) => format!("{a:.p$}"),
            None => shortest_fixed(a),
        },
        'e' | 'E' => {
            let (digits, exp) = decimal(a, prec.map(|p| p + 1));
            let d = match prec {
                Some(p) => pad_digits(&digits, p + 1),
                None => digits,
            };
            exp_form(&d, exp, fmt)
        }
        _ => {
            // %g: exponent form when the exponent is < -4 or >= the precision (the
            // shortest form counts as precision 6 here, hence 1e+06 for a million).
            let (digits, exp) = decimal(a, prec.map(|p| p.max(1)));
            // Go's decimal keeps no trailing zeros.
            let digits = match digits.trim_end_matches('0') {
                "" => "0".to_string(),
                d => d.to_string(),
            };
            let nd = digits.len() as i32;
            let eprec = match prec {
                None => 6,
                Some(p) => {
                    let p = p.max(1) as i32;
                    if p > nd && nd > exp {
                        nd
                    } else {
                        p
                    }
                }
            };
            if exp < -4 || exp >= eprec {
                let e = if fmt == 'G' { 'E' } else { 'e' };
                exp_form(&digits, exp, e)
            } else {
                fixed_form(&digits, exp)
            }
        }
    };
    if neg {
        format!("-{body}")
    } else {
        body
    }
}

/// The significant digits of `a` (no leading/trailing zeros, "0" for zero) and the
/// decimal exponent of the first one; `sig` digits when given, else the shortest
/// that reads back the same.
fn decimal(a: f64, sig: Option<usize>) -> (String, i32) {
    let text = match sig {
        Some(n) => format!("{:.*e}", n.saturating_sub(1), a),
        None => format!("{a:e}"),
    };
    let (mant, exp) = text.split_once('e').unwrap_or((&text, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mant.chars().filter(char::is_ascii_digit).collect();
    let trimmed = digits.trim_end_matches('0');
    if trimmed.is_empty() {
        ("0".into(), 0)
    } else if sig.is_some() {
        (digits, exp)
    } else {
        (trimmed.to_string(), exp)
    }
}

fn pad_digits(d: &str, n: usize) -> String {
    let mut s = d.to_string();
    while s.len() < n {
        s.push('0');
    }
    s
}

fn exp_form(digits: &str, exp: i32, e: char) -> String {
    let mut s = String::new();
    s.push_str(&digits[..1]);
    if digits.len() > 1 {
        s.push('.');
        s.push_str(&digits[1..]);
    }
    let e = if e == 'E' { 'E' } else { 'e' };
    let sign = if exp < 0 { '-' } else { '+' };
    let _ = write!(s, "{e}{sign}{:02}", exp.unsigned_abs());
    s
}

fn fixed_form(digits: &str, exp: i32) -> String {
    if exp < 0 {
        let zeros = "0".repeat((-exp - 1) as usize);
        format!("0.{zeros}{digits}")
    } else {
        let point = exp as usize + 1;
        if digits.len() <= point {
            format!("{digits}{}", "0".repeat(point - digits.len()))
        } else {
            format!("{}.{}", &digits[..point], &digits[point..])
        }
    }
}

fn shortest_fixed(a: f64) -> String {
    let (digits, exp) = decimal(a, None);
    if digits == "0" {
        return "0".into();
    }
    fixed_form(&digits, exp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    /// What Go's fmt.Sprint prints for these float64 values.
    #[test]
    fn floats_print_like_go() {
        for (f, want) in [
            (1.0, "1"),
            (8080.0, "8080"),
            (1.5, "1.5"),
            (123456.0, "123456"),
            (1e6, "1e+06"),
            (1234567.0, "1.234567e+06"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-2.5, "-2.5"),
            (0.0, "0"),
            (1e21, "1e+21"),
            (0.1 + 0.2, "0.30000000000000004"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "+Inf"),
        ] {
            assert_eq!(format_float(f, 'g', None), want, "{f}");
        }
        assert_eq!(format_float(4.56789, 'f', Some(2)), "4.57");
        assert_eq!(format_float(1e6, 'f', None), "1000000");
        assert_eq!(format_float(1234.5678, 'e', Some(3)), "1.235e+03");
        assert_eq!(format_float(1234.5678, 'g', Some(3)), "1.23e+03");
        assert_eq!(format_float(100.0, 'g', Some(3)), "100");
        assert_eq!(format_float(1.0, 'e', None), "1e+00");
    }

    #[test]
    fn collections_and_times_print_like_go() {
        let meta = serde_json::json!({"team": "core", "n": 3, "tags": ["a", 1.5], "x": null, "in": {"b": true}});
        assert_eq!(
            print(&Value::from_json(&meta)),
            "map[in:map[b:true] n:3 tags:[a 1.5] team:core x:<nil>]"
        );
        assert_eq!(print(&Value::Missing), "<no value>");
        assert_eq!(
            print(&Value::List(vec![Value::Int(20000), Value::Int(20001)])),
            "[20000 20001]"
        );
        assert_eq!(
            print(&Value::Time(datetime!(2025-01-02 03:04:05.120 UTC))),
            "2025-01-02 03:04:05.12 +0000 UTC"
        );
        assert_eq!(
            print(&Value::Time(datetime!(2025-01-02 03:04:05 UTC))),
            "2025-01-02 03:04:05 +0000 UTC"
        );
        assert_eq!(
            print(&Value::Time(datetime!(2025-01-02 03:04:05.000000001 UTC))),
            "2025-01-02 03:04:05.000000001 +0000 UTC"
        );
        let s = Value::Struct(Struct {
            type_name: "T",
            fields: vec![("A", Value::Str("x".into())), ("B", Value::Int(1))],
        });
        assert_eq!(print(&s), "{x 1}");
        let mut plus = String::new();
        write_v(&mut plus, &s, true);
        assert_eq!(plus, "{A:x B:1}");
    }
}
