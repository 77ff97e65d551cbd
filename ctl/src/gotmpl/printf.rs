//! Go's `fmt.Sprintf` for the verbs templates use: `%v %+v %s %q %d %x %X %o %b %c
//! %f %F %e %E %g %G %t %%`, with flags `-+# 0`, width and precision, and Go's
//! in-band errors (`%!d(string=x)`, `%!s(MISSING)`, `%!(EXTRA int=1)`).

use std::fmt::Write as _;

use super::value::{format_float, go_time_string, write_v, Value};

#[derive(Default, Clone, Copy)]
struct Spec {
    minus: bool,
    plus: bool,
    sharp: bool,
    space: bool,
    zero: bool,
    width: Option<usize>,
    prec: Option<usize>,
}

pub fn sprintf(format: &str, args: &[Value]) -> String {
    let mut out = String::new();
    let mut next = 0;
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = Spec::default();
        while let Some(&f) = chars.peek() {
            match f {
                '-' => spec.minus = true,
                '+' => spec.plus = true,
                '#' => spec.sharp = true,
                ' ' => spec.space = true,
                '0' => spec.zero = true,
                _ => break,
            }
            chars.next();
        }
        let Ok(width) = number(&mut chars) else {
            out.push_str("%!(NOVERB)");
            break;
        };
        spec.width = width;
        if chars.peek() == Some(&'.') {
            chars.next();
            let Ok(prec) = number(&mut chars) else {
                out.push_str("%!(NOVERB)");
                break;
            };
            spec.prec = Some(prec.unwrap_or(0));
        }
        let Some(verb) = chars.next() else {
            out.push_str("%!(NOVERB)");
            break;
        };
        if verb == '%' {
            out.push('%');
            continue;
        }
        match args.get(next) {
            None => {
                let _ = write!(out, "%!{verb}(MISSING)");
            }
            Some(arg) => {
                next += 1;
                let text = one(verb, &spec, arg);
                out.push_str(&pad(&text, &spec, verb));
            }
        }
    }
    if next < args.len() {
        out.push_str("%!(EXTRA ");
        for (i, a) in args[next..].iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{}=", a.type_name());
            write_v(&mut out, a, false);
        }
        out.push(')');
    }
    out
}

/// A width or precision, as Go's `parsenum` reads it: once past 10^6, another digit
/// makes it "crazy long" (`Err`), and Go gives up on the rest of the format with
/// `%!(NOVERB)`, so no padding can take more than about ten million bytes.
fn number(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Result<Option<usize>, ()> {
    let mut n: Option<usize> = None;
    while let Some(d) = chars.peek().and_then(|c| c.to_digit(10)) {
        let so_far = n.unwrap_or(0);
        if so_far > 1_000_000 {
            chars.for_each(drop);
            return Err(());
        }
        n = Some(so_far * 10 + d as usize);
        chars.next();
    }
    Ok(n)
}

/// Width padding: spaces on the left (right with `-`), zeros for numbers with `0`.
fn pad(text: &str, spec: &Spec, verb: char) -> String {
    let Some(w) = spec.width else {
        return text.to_string();
    };
    let len = text.chars().count();
    if len >= w {
        return text.to_string();
    }
    let fill = w - len;
    if spec.minus {
        format!("{text}{}", " ".repeat(fill))
    } else if spec.zero && "dxXobfFeEgG".contains(verb) {
        // Zeros go after the sign.
        let (sign, digits) = match text.strip_prefix(['-', '+', ' ']) {
            Some(rest) => (&text[..1], rest),
            None => ("", text),
        };
        format!("{sign}{}{digits}", "0".repeat(fill))
    } else {
        format!("{}{text}", " ".repeat(fill))
    }
}

fn bad(verb: char, arg: &Value) -> String {
    let mut s = format!("%!{verb}(");
    match arg {
        Value::Missing | Value::Nil => s.push_str("<nil>"),
        _ => {
            let _ = write!(s, "{}=", arg.type_name());
            write_v(&mut s, arg, false);
        }
    }
    s.push(')');
    s
}

fn sign(neg: bool, spec: &Spec) -> &'static str {
    if neg {
        "-"
    } else if spec.plus {
        "+"
    } else if spec.space {
        " "
    } else {
        ""
    }
}

/// One argument under one verb. Collections apply the verb to their elements, as
/// Go's fmt does.
fn one(verb: char, spec: &Spec, arg: &Value) -> String {
    match (verb, arg) {
        ('v', v) => {
            let mut s = String::new();
            match v {
                Value::Float(f) => s.push_str(&float(*f, 'g', spec)),
                Value::Int(n) => s.push_str(&int(*n, 10, false, spec)),
                _ => write_v(&mut s, v, spec.plus),
            }
            s
        }
        (_, Value::List(items)) if verb != 'q' || !items.is_empty() => {
            let parts: Vec<String> = items.iter().map(|i| one(verb, spec, i)).collect();
            format!("[{}]", parts.join(" "))
        }
        (_, Value::Map(m)) => {
            let parts: Vec<String> = m
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}:{}",
                        one(verb, spec, &Value::Str(k.clone())),
                        one(verb, spec, v)
                    )
                })
                .collect();
            format!("map[{}]", parts.join(" "))
        }
        ('s', Value::Str(s)) => match spec.prec {
            Some(p) => s.chars().take(p).collect(),
            None => s.clone(),
        },
        ('s', Value::Time(t)) => go_time_string(*t),
        ('q', Value::Str(s)) => quote(s),
        ('q', Value::Int(n)) => match u32::try_from(*n).ok().and_then(char::from_u32) {
            Some(c) => format!("'{}'", c.escape_default()),
            None => bad(verb, arg),
        },
        ('x' | 'X', Value::Str(s)) => {
            let mut h = String::new();
            for b in s.bytes() {
                if verb == 'x' {
                    let _ = write!(h, "{b:02x}");
                } else {
                    let _ = write!(h, "{b:02X}");
                }
            }
            h
        }
        ('d', Value::Int(n)) => int(*n, 10, false, spec),
        ('x', Value::Int(n)) => int(*n, 16, false, spec),
        ('X', Value::Int(n)) => int(*n, 16, true, spec),
        ('o', Value::Int(n)) => int(*n, 8, false, spec),
        ('b', Value::Int(n)) => int(*n, 2, false, spec),
        ('c', Value::Int(n)) => match u32::try_from(*n).ok().and_then(char::from_u32) {
            Some(c) => c.to_string(),
            None => "\u{fffd}".to_string(),
        },
        ('f' | 'F' | 'e' | 'E' | 'g' | 'G', Value::Float(f)) => float(*f, verb, spec),
        ('t', Value::Bool(b)) => b.to_string(),
        (
            's' | 'd' | 'x' | 'X' | 'o' | 'b' | 'f' | 'F' | 'e' | 'E' | 'g' | 'G' | 't' | 'q',
            Value::Struct(st),
        ) => {
            let parts: Vec<String> = st
                .fields
                .iter()
                .map(|(name, v)| {
                    let item = one(verb, spec, v);
                    if spec.plus {
                        format!("{name}:{item}")
                    } else {
                        item
                    }
                })
                .collect();
            format!("{{{}}}", parts.join(" "))
        }
        _ => bad(verb, arg),
    }
}

fn int(n: i64, radix: u32, upper: bool, spec: &Spec) -> String {
    let mag = n.unsigned_abs();
    let digits = match radix {
        16 if upper => format!("{mag:X}"),
        16 => format!("{mag:x}"),
        8 => format!("{mag:o}"),
        2 => format!("{mag:b}"),
        _ => mag.to_string(),
    };
    let digits = match spec.prec {
        Some(p) if digits.len() < p => format!("{}{digits}", "0".repeat(p - digits.len())),
        _ => digits,
    };
    let prefix = match (spec.sharp, radix) {
        (true, 16) if upper => "0X",
        (true, 16) => "0x",
        (true, 8) => "0",
        (true, 2) => "0b",
        _ => "",
    };
    format!("{}{prefix}{digits}", sign(n < 0, spec))
}

fn float(f: f64, verb: char, spec: &Spec) -> String {
    let prec = match verb {
        'f' | 'F' | 'e' | 'E' => Some(spec.prec.unwrap_or(6)),
        _ => spec.prec,
    };
    let text = format_float(f.abs(), if verb == 'F' { 'f' } else { verb }, prec);
    let neg = f.is_sign_negative() && !f.is_nan();
    format!("{}{text}", sign(neg, spec))
}

/// Go's `strconv.Quote`: double quotes, Go escapes, printable Unicode kept.
pub fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\t' => q.push_str("\\t"),
            '\r' => q.push_str("\\r"),
            '\x07' => q.push_str("\\a"),
            '\x08' => q.push_str("\\b"),
            '\x0c' => q.push_str("\\f"),
            '\x0b' => q.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(q, "\\x{:02x}", c as u32);
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::Str(x.into())
    }

    /// Each expectation is what Go's fmt.Sprintf prints.
    #[test]
    fn verbs_flags_and_errors_like_go() {
        let cases: Vec<(&str, Vec<Value>, &str)> = vec![
            ("%s-%d", vec![s("a"), Value::Int(7)], "a-7"),
            (
                "%05d|%-4d|%+d|%x|%X|%#x|%o|%b",
                vec![
                    Value::Int(42),
                    Value::Int(3),
                    Value::Int(5),
                    Value::Int(255),
                    Value::Int(255),
                    Value::Int(255),
                    Value::Int(8),
                    Value::Int(5),
                ],
                "00042|3   |+5|ff|FF|0xff|10|101",
            ),
            (
                "%v %v",
                vec![Value::Float(8080.0), Value::Float(1.5)],
                "8080 1.5",
            ),
            (
                "%.2f|%f|%e|%g",
                vec![
                    Value::Float(4.56789),
                    Value::Float(2.0),
                    Value::Float(1234.5),
                    Value::Float(1e6),
                ],
                "4.57|2.000000|1.234500e+03|1e+06",
            ),
            ("%q", vec![s("a\"b\n")], "\"a\\\"b\\n\""),
            ("%t", vec![Value::Bool(true)], "true"),
            ("%.2s", vec![s("abcdef")], "ab"),
            ("%6s|%-6s|", vec![s("ab"), s("ab")], "    ab|ab    |"),
            ("%d", vec![s("x")], "%!d(string=x)"),
            ("%s", vec![Value::Float(1.5)], "%!s(float64=1.5)"),
            ("%d %d", vec![Value::Int(1)], "1 %!d(MISSING)"),
            ("%d", vec![Value::Int(1), s("x")], "1%!(EXTRA string=x)"),
            ("100%%", vec![], "100%"),
            ("%s", vec![Value::Missing], "%!s(<nil>)"),
            (
                "%v",
                vec![Value::List(vec![Value::Int(1), Value::Int(2)])],
                "[1 2]",
            ),
            (
                "%d",
                vec![Value::List(vec![Value::Int(1), Value::Int(2)])],
                "[1 2]",
            ),
            ("%x", vec![s("hi")], "6869"),
            // Go's limit on widths and precisions (fuzz/regressions/hook_template).
            (
                "%99999999d|",
                vec![Value::Int(1)],
                "%!(NOVERB)%!(EXTRA int=1)",
            ),
            (
                "%.99999999f|",
                vec![Value::Float(1.0)],
                "%!(NOVERB)%!(EXTRA float64=1)",
            ),
        ];
        for (f, args, want) in cases {
            assert_eq!(sprintf(f, &args), want, "{f}");
        }
    }
}
