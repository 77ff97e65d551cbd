//! Lexing and parsing of Go's `text/template` syntax: text and `{{actions}}` (with the
//! `{{-`/`-}}` trim markers and `{{/* comments */}}`), pipelines of commands joined by
//! `|`, variables (`$x := ...`), and the `if`/`else if`/`else`, `with` and `range`
//! blocks. `define`, `template` and `block` (named templates) are refused: a hook
//! argument is one template.

use std::fmt;

/// The functions a template may call (Go's builtins that make sense here).
pub const FUNCS: &[&str] = &[
    "and", "or", "not", "len", "index", "print", "printf", "println", "eq", "ne", "lt", "le", "gt",
    "ge", "urlquery",
];

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Text(String),
    /// An action that prints its pipeline (or only declares a variable).
    Action(Pipeline),
    If(Branch),
    With(Branch),
    Range(Branch),
    Break,
    Continue,
}

/// `if`, `with` and `range`: the pipeline, the block, and what `else` holds (an
/// `else if` is an `If` node alone in there).
#[derive(Debug, Clone, PartialEq)]
pub struct Branch {
    pub pipe: Pipeline,
    pub body: Vec<Node>,
    pub otherwise: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    /// The action's text, for error messages.
    pub text: String,
    /// `$x :=` / `$i, $e :=` (declare) or `$x =` (assign).
    pub vars: Vec<String>,
    pub assign: bool,
    pub cmds: Vec<Command>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub args: Vec<Arg>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    /// `.` (empty chain) or `.A.B`.
    Field(Vec<String>),
    /// `$` or `$x`, then `.A.B`.
    Var(String, Vec<String>),
    /// A function name.
    Ident(String),
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Nil,
    /// `( pipeline )`, then `.A.B`.
    Sub(Box<Pipeline>, Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(m: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(m.into()))
}

/// A piece of the template: text, or the inside of an action.
#[derive(Debug)]
enum Piece {
    Text(String),
    Action(String),
}

/// Split into text and action insides, applying trim markers and dropping comments.
fn split(src: &str) -> Result<Vec<Piece>, ParseError> {
    let mut out = Vec::new();
    let mut rest = src;
    let mut trim_next_text = false;
    while let Some(start) = rest.find("{{") {
        let mut text = &rest[..start];
        if trim_next_text {
            text = text.trim_start();
        }
        let after = &rest[start + 2..];
        let trim_left = after.starts_with("- ")
            || after.starts_with("-\t")
            || after.starts_with("-\n")
            || after.starts_with("-\r");
        if trim_left {
            text = text.trim_end();
        }
        if !text.is_empty() {
            out.push(Piece::Text(text.to_string()));
        }
        let inner_start = if trim_left { &after[1..] } else { after };
        let (inner, tail, trim_right) = action_end(inner_start)?;
        let trimmed = inner.trim();
        if let Some(c) = trimmed.strip_prefix("/*") {
            if !c.ends_with("*/") {
                return err("unclosed comment");
            }
        } else {
            out.push(Piece::Action(inner.to_string()));
        }
        trim_next_text = trim_right;
        rest = tail;
    }
    let text = if trim_next_text {
        rest.trim_start()
    } else {
        rest
    };
    if !text.is_empty() {
        out.push(Piece::Text(text.to_string()));
    }
    Ok(out)
}

/// The inside of an action up to its `}}` (not one inside a string), the text after
/// it, and whether it ended with ` -}}`.
fn action_end(s: &str) -> Result<(&str, &str, bool), ParseError> {
    // Scanned as bytes: `i` may be inside a multi-byte character, where `s[i..]` would
    // panic; `s` is cut only at ASCII bytes.
    let b = s.as_bytes();
    let mut i = 0;
    let mut quote: Option<u8> = None;
    while i < b.len() {
        match quote {
            Some(q) => {
                if b[i] == b'\\' && q != b'`' {
                    i += 1;
                } else if b[i] == q {
                    quote = None;
                }
            }
            None => {
                if b[i] == b'"' || b[i] == b'`' || b[i] == b'\'' {
                    quote = Some(b[i]);
                } else if b[i..].starts_with(b"}}") {
                    let trim = i >= 2 && b[i - 1] == b'-' && b[i - 2].is_ascii_whitespace();
                    let inner = if trim { &s[..i - 1] } else { &s[..i] };
                    return Ok((inner, &s[i + 2..], trim));
                } else if b[i..].starts_with(b"/*") && s[..i].trim().is_empty() {
                    // A comment may hold "}}": skip to its end.
                    match s[i + 2..].find("*/") {
                        Some(e) => i += e + 3,
                        None => return err("unclosed comment"),
                    }
                }
            }
        }
        i += 1;
    }
    err("unclosed action")
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Field(Vec<String>),
    Var(String, Vec<String>),
    Ident(String),
    Str(String),
    Int(i64),
    Float(f64),
    Char(i64),
    Pipe,
    Open,
    /// `)` and the fields after it.
    Close(Vec<String>),
    Declare,
    Assign,
    Comma,
}

fn lex(action: &str) -> Result<Vec<Tok>, ParseError> {
    let mut toks = Vec::new();
    let s = action.as_bytes();
    let mut i = 0;
    let fields = |i: &mut usize| -> Result<Vec<String>, ParseError> {
        let mut out = Vec::new();
        while *i < s.len() && s[*i] == b'.' {
            let start = *i + 1;
            let mut j = start;
            while j < s.len() && (s[j].is_ascii_alphanumeric() || s[j] == b'_') {
                j += 1;
            }
            if j == start {
                if out.is_empty() {
                    break;
                }
                return err(format!("bad field in {action:?}"));
            }
            out.push(action[start..j].to_string());
            *i = j;
        }
        Ok(out)
    };
    while i < s.len() {
        let c = s[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'|' => {
                toks.push(Tok::Pipe);
                i += 1;
            }
            b'(' => {
                toks.push(Tok::Open);
                i += 1;
            }
            b')' => {
                i += 1;
                toks.push(Tok::Close(fields(&mut i)?));
            }
            b',' => {
                toks.push(Tok::Comma);
                i += 1;
            }
            b':' if s.get(i + 1) == Some(&b'=') => {
                toks.push(Tok::Declare);
                i += 2;
            }
            b'=' => {
                toks.push(Tok::Assign);
                i += 1;
            }
            b'.' if s.get(i + 1).is_some_and(|d| d.is_ascii_digit()) => {
                let (t, n) = number(&action[i..])?;
                toks.push(t);
                i += n;
            }
            b'.' => {
                let f = fields(&mut i)?;
                if f.is_empty() {
                    i += 1;
                }
                toks.push(Tok::Field(f));
            }
            b'$' => {
                let start = i + 1;
                let mut j = start;
                while j < s.len() && (s[j].is_ascii_alphanumeric() || s[j] == b'_') {
                    j += 1;
                }
                let name = format!("${}", &action[start..j]);
                i = j;
                toks.push(Tok::Var(name, fields(&mut i)?));
            }
            b'"' | b'`' => {
                let (text, n) = string(&action[i..])?;
                toks.push(Tok::Str(text));
                i += n;
            }
            b'\'' => {
                let (text, n) = string(&action[i..])?;
                let mut cs = text.chars();
                match (cs.next(), cs.next()) {
                    (Some(ch), None) => toks.push(Tok::Char(ch as i64)),
                    _ => return err(format!("bad character constant in {action:?}")),
                }
                i += n;
            }
            b'-' | b'+' | b'0'..=b'9' => {
                let (t, n) = number(&action[i..])?;
                toks.push(t);
                i += n;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_') {
                    i += 1;
                }
                toks.push(Tok::Ident(action[start..i].to_string()));
                // `ident.Field` is only valid on a variable or a parenthesised value.
                if s.get(i) == Some(&b'.') {
                    return err(format!("unexpected . after term {:?}", &action[start..i]));
                }
            }
            _ => {
                return err(format!(
                    "unexpected {:?} in {action:?}",
                    action[i..].chars().next().unwrap_or('?')
                ))
            }
        }
    }
    Ok(toks)
}

/// A Go number literal at the start of `s`: decimal, 0x/0o/0b, `_` separators,
/// floats with a point or an exponent.
fn number(s: &str) -> Result<(Tok, usize), ParseError> {
    let b = s.as_bytes();
    let mut n = 0;
    if n < b.len() && (b[n] == b'-' || b[n] == b'+') {
        n += 1;
    }
    while n < b.len() && (b[n].is_ascii_alphanumeric() || b[n] == b'_' || b[n] == b'.') {
        // An exponent sign belongs to the number.
        if (b[n] == b'e' || b[n] == b'E')
            && !s[..n].contains(['x', 'X'])
            && n + 1 < b.len()
            && (b[n + 1] == b'-' || b[n + 1] == b'+')
        {
            n += 2;
            continue;
        }
        n += 1;
    }
    let text: String = s[..n].chars().filter(|c| *c != '_').collect();
    let (neg, body) = match text.strip_prefix('-') {
        Some(b) => (true, b.to_string()),
        None => (false, text.trim_start_matches('+').to_string()),
    };
    let radix = |p: &str, r: u32| i64::from_str_radix(p, r).ok();
    let lower = body.to_ascii_lowercase();
    let int = if let Some(h) = lower.strip_prefix("0x") {
        radix(h, 16)
    } else if let Some(o) = lower.strip_prefix("0o") {
        radix(o, 8)
    } else if let Some(b2) = lower.strip_prefix("0b") {
        radix(b2, 2)
    } else if body.len() > 1 && body.starts_with('0') && body.bytes().all(|d| d.is_ascii_digit()) {
        radix(&body[1..], 8)
    } else if body.bytes().all(|d| d.is_ascii_digit()) {
        body.parse().ok()
    } else {
        None
    };
    if let Some(v) = int {
        return Ok((Tok::Int(if neg { -v } else { v }), n));
    }
    match body.parse::<f64>() {
        Ok(f)
            if !body.is_empty()
                && body
                    .bytes()
                    .all(|d| d.is_ascii_digit() || b".eE+-".contains(&d)) =>
        {
            Ok((Tok::Float(if neg { -f } else { f }), n))
        }
        _ => err(format!("bad number syntax: {:?}", &s[..n])),
    }
}

/// A quoted ("..." with Go escapes, '...' for characters) or raw (`...`) string at
/// the start of `s`: its value and its length.
fn string(s: &str) -> Result<(String, usize), ParseError> {
    let q = s.as_bytes()[0];
    if q == b'`' {
        return match s[1..].find('`') {
            Some(e) => Ok((s[1..1 + e].to_string(), e + 2)),
            None => err("unterminated raw quoted string"),
        };
    }
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            c if c as u32 == q as u32 => return Ok((out, i + 1)),
            '\n' => break,
            '\\' => {
                let Some((_, e)) = chars.next() else { break };
                match e {
                    'n' => out.push('\n'),
                    't' => out.push('\t'),
                    'r' => out.push('\r'),
                    'a' => out.push('\x07'),
                    'b' => out.push('\x08'),
                    'f' => out.push('\x0c'),
                    'v' => out.push('\x0b'),
                    '\\' => out.push('\\'),
                    '"' => out.push('"'),
                    '\'' => out.push('\''),
                    'x' | 'u' | 'U' => {
                        let len = match e {
                            'x' => 2,
                            'u' => 4,
                            _ => 8,
                        };
                        let hex: String = (0..len)
                            .filter_map(|_| chars.next().map(|(_, h)| h))
                            .collect();
                        match u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32) {
                            Some(ch) if hex.len() == len => out.push(ch),
                            _ => return err(format!("bad escape \\{e}{hex}")),
                        }
                    }
                    other => return err(format!("unknown escape \\{other}")),
                }
            }
            c => out.push(c),
        }
    }
    err("unterminated quoted string")
}

/// Parse a whole template.
pub fn parse(src: &str) -> Result<Vec<Node>, ParseError> {
    let pieces = split(src)?;
    let mut p = Parser {
        pieces: pieces.into_iter().peekable(),
    };
    let (nodes, end) = p.list()?;
    match end {
        None => Ok(nodes),
        Some(e) => err(format!("unexpected {{{{{e}}}}}")),
    }
}

struct Parser {
    pieces: std::iter::Peekable<std::vec::IntoIter<Piece>>,
}

/// What ended a list: `end`, `else`, or `else <if ...>` (the action text).
type End = Option<String>;

impl Parser {
    /// Nodes up to an `{{end}}` or `{{else...}}` (returned) or the end of input.
    fn list(&mut self) -> Result<(Vec<Node>, End), ParseError> {
        let mut nodes = Vec::new();
        while let Some(piece) = self.pieces.next() {
            let action = match piece {
                Piece::Text(t) => {
                    nodes.push(Node::Text(t));
                    continue;
                }
                Piece::Action(a) => a,
            };
            let trimmed = action.trim();
            let (word, rest) = match trimmed.split_once(char::is_whitespace) {
                Some((w, r)) => (w, r.trim()),
                None => (trimmed, ""),
            };
            match word {
                "end" | "else" => return Ok((nodes, Some(trimmed.to_string()))),
                "if" | "with" | "range" => nodes.push(self.block(word, rest)?),
                "break" => nodes.push(Node::Break),
                "continue" => nodes.push(Node::Continue),
                "define" | "template" | "block" => {
                    return err(format!(
                        "{{{{{word}}}}} (named templates) is not supported in hooks"
                    ))
                }
                "" => return err("missing value for command"),
                _ => nodes.push(Node::Action(pipeline(trimmed)?)),
            }
        }
        Ok((nodes, None))
    }

    fn block(&mut self, word: &str, rest: &str) -> Result<Node, ParseError> {
        if rest.is_empty() {
            return err(format!("missing value for {word}"));
        }
        let pipe = pipeline(rest)?;
        let (body, end) = self.list()?;
        let end = end.ok_or_else(|| {
            ParseError(format!("unexpected EOF: {{{{{word}}}}} has no {{{{end}}}}"))
        })?;
        let otherwise = if end == "end" {
            Vec::new()
        } else if end == "else" {
            let (nodes, end2) = self.list()?;
            match end2.as_deref() {
                Some("end") => nodes,
                _ => return err(format!("expected {{{{end}}}} after {{{{else}}}} of {word}")),
            }
        } else if let Some(chained) = end.strip_prefix("else ") {
            // `{{else if x}}` / `{{else with x}}`: an inner block sharing our {{end}}.
            let chained = chained.trim();
            let (w, r) = chained
                .split_once(char::is_whitespace)
                .unwrap_or((chained, ""));
            if w != "if" && w != "with" {
                return err(format!("unexpected {{{{{end}}}}}"));
            }
            vec![self.block(w, r.trim())?]
        } else {
            return err(format!("unexpected {{{{{end}}}}}"));
        };
        let b = Branch {
            pipe,
            body,
            otherwise,
        };
        Ok(match word {
            "if" => Node::If(b),
            "with" => Node::With(b),
            _ => Node::Range(b),
        })
    }
}

/// Parse an action's pipeline (`$x := a b | c`).
pub fn pipeline(text: &str) -> Result<Pipeline, ParseError> {
    let toks = lex(text)?;
    let mut pos = 0;
    let p = pipe_at(text, &toks, &mut pos, false)?;
    if pos != toks.len() {
        return err(format!("unexpected {:?} in {text:?}", toks[pos]));
    }
    Ok(p)
}

fn pipe_at(
    text: &str,
    toks: &[Tok],
    pos: &mut usize,
    nested: bool,
) -> Result<Pipeline, ParseError> {
    let mut vars = Vec::new();
    let mut assign = false;
    // Declarations: `$x :=`, `$i, $e :=`, `$x =`.
    let mut look = *pos;
    let mut names = Vec::new();
    while let Some(Tok::Var(name, f)) = toks.get(look) {
        if !f.is_empty() {
            break;
        }
        names.push(name.clone());
        look += 1;
        match toks.get(look) {
            Some(Tok::Comma) if names.len() == 1 => look += 1,
            Some(Tok::Declare) | Some(Tok::Assign) => break,
            _ => {
                names.clear();
                break;
            }
        }
    }
    if !names.is_empty() {
        if let Some(t @ (Tok::Declare | Tok::Assign)) = toks.get(look) {
            assign = *t == Tok::Assign;
            vars = names;
            *pos = look + 1;
        }
    }
    let mut cmds = Vec::new();
    let mut args = Vec::new();
    while let Some(t) = toks.get(*pos) {
        *pos += 1;
        let arg = match t {
            Tok::Pipe => {
                if args.is_empty() {
                    return err(format!("missing command before | in {text:?}"));
                }
                cmds.push(Command {
                    args: std::mem::take(&mut args),
                });
                continue;
            }
            Tok::Close(_) if nested => {
                *pos -= 1;
                break;
            }
            Tok::Close(_) => return err(format!("unexpected ) in {text:?}")),
            Tok::Open => {
                let inner = pipe_at(text, toks, pos, true)?;
                match toks.get(*pos) {
                    Some(Tok::Close(f)) => {
                        *pos += 1;
                        Arg::Sub(Box::new(inner), f.clone())
                    }
                    _ => return err(format!("unclosed left paren in {text:?}")),
                }
            }
            Tok::Field(f) => Arg::Field(f.clone()),
            Tok::Var(n, f) => Arg::Var(n.clone(), f.clone()),
            Tok::Ident(i) => match i.as_str() {
                "true" => Arg::Bool(true),
                "false" => Arg::Bool(false),
                "nil" => Arg::Nil,
                f if FUNCS.contains(&f) => Arg::Ident(i.clone()),
                // As Go's parser: an unknown function fails the parse.
                f => return err(format!("function {f:?} not defined")),
            },
            Tok::Str(s) => Arg::Str(s.clone()),
            Tok::Int(n) | Tok::Char(n) => Arg::Int(*n),
            Tok::Float(f) => Arg::Float(*f),
            Tok::Declare | Tok::Assign | Tok::Comma => {
                return err(format!("unexpected {t:?} in {text:?}"))
            }
        };
        args.push(arg);
    }
    if args.is_empty() {
        return err(format!("missing value for command in {text:?}"));
    }
    cmds.push(Command { args });
    Ok(Pipeline {
        text: text.trim().to_string(),
        vars,
        assign,
        cmds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelines_parse() {
        let p = pipeline(r#"$x := printf "%s-%d" .ID (len .HostPorts) | printf "%q""#).unwrap();
        assert_eq!(p.vars, vec!["$x".to_string()]);
        assert_eq!(p.cmds.len(), 2);
        assert_eq!(p.cmds[0].args[0], Arg::Ident("printf".into()));
        assert_eq!(p.cmds[0].args[2], Arg::Field(vec!["ID".into()]));
        assert!(matches!(p.cmds[0].args[3], Arg::Sub(..)));
        let p = pipeline("index .Metadata \"a b\" | len").unwrap();
        assert_eq!(p.cmds[1].args, vec![Arg::Ident("len".into())]);
        assert_eq!(
            pipeline(".").unwrap().cmds[0].args,
            vec![Arg::Field(vec![])]
        );
        assert_eq!(
            pipeline("$.ID").unwrap().cmds[0].args,
            vec![Arg::Var("$".into(), vec!["ID".into()])]
        );
        assert_eq!(
            pipeline("-1.5e3").unwrap().cmds[0].args,
            vec![Arg::Float(-1500.0)]
        );
        assert_eq!(pipeline("0x1F").unwrap().cmds[0].args, vec![Arg::Int(31)]);
        assert_eq!(pipeline("'a'").unwrap().cmds[0].args, vec![Arg::Int(97)]);
    }

    #[test]
    fn blocks_trim_and_comments() {
        let nodes =
            parse("a {{- if .X }} b {{else if .Y}}c{{else}}d{{end -}} e{{/* note */}}").unwrap();
        assert_eq!(nodes[0], Node::Text("a".into()));
        let Node::If(b) = &nodes[1] else {
            panic!("{nodes:?}")
        };
        assert_eq!(b.body, vec![Node::Text(" b ".into())]);
        assert!(matches!(b.otherwise[0], Node::If(_)));
        assert_eq!(nodes[2], Node::Text("e".into()));
        assert_eq!(nodes.len(), 3);
    }

    #[test]
    fn errors_are_parse_errors() {
        for bad in [
            "{{.ID",
            "{{if .X}}no end",
            "{{end}}",
            "{{.ID | }}",
            "{{ }}",
            "{{\"unterminated}}",
            "{{(.ID}}",
            "{{template \"x\"}}",
            "{{ID}}x{{.}}{{len.X}}",
            "{{1x}}",
            "{{/* open }}",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
