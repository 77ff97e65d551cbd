//! Executing a parsed template over a [`Value`], with Go's rules: a missing map key is
//! `<no value>`, an unknown struct field is an error, a pipeline passes each result as
//! the last argument of the next command, `and`/`or` stop early, comparisons of
//! different kinds are errors.

use super::parse::{Arg, Branch, Command, Node, Pipeline};
use super::printf::sprintf;
use super::value::{print, write_v, Value};

/// Loops and recursion are bounded: a template is a hook argument, not a program.
const MAX_RANGE_STEPS: usize = 100_000;
const MAX_OUTPUT: usize = 1 << 20;

pub struct Exec<'a> {
    root: &'a Value,
    vars: Vec<(String, Value)>,
    out: String,
    steps: usize,
}

enum Flow {
    Normal,
    Break,
    Continue,
}

type Res<T> = Result<T, String>;

impl<'a> Exec<'a> {
    pub fn new(root: &'a Value) -> Exec<'a> {
        Exec {
            root,
            vars: vec![("$".to_string(), root.clone())],
            out: String::new(),
            steps: 0,
        }
    }

    pub fn run(mut self, nodes: &[Node]) -> Res<String> {
        let dot = self.root.clone();
        self.walk(nodes, &dot)?;
        Ok(self.out)
    }

    fn walk(&mut self, nodes: &[Node], dot: &Value) -> Res<Flow> {
        for n in nodes {
            match n {
                Node::Text(t) => self.out.push_str(t),
                Node::Action(p) => {
                    let v = self.pipeline(p, dot)?;
                    if p.vars.is_empty() {
                        self.out.push_str(&print(&v));
                    }
                }
                Node::If(b) => {
                    let depth = self.vars.len();
                    let v = self.pipeline(&b.pipe, dot)?;
                    let flow = if v.truth() {
                        self.walk(&b.body, dot)?
                    } else {
                        self.walk(&b.otherwise, dot)?
                    };
                    self.vars.truncate(depth);
                    if !matches!(flow, Flow::Normal) {
                        return Ok(flow);
                    }
                }
                Node::With(b) => {
                    let depth = self.vars.len();
                    let v = self.pipeline(&b.pipe, dot)?;
                    let flow = if v.truth() {
                        self.walk(&b.body, &v)?
                    } else {
                        self.walk(&b.otherwise, dot)?
                    };
                    self.vars.truncate(depth);
                    if !matches!(flow, Flow::Normal) {
                        return Ok(flow);
                    }
                }
                Node::Range(b) => self.range(b, dot)?,
                Node::Break => return Ok(Flow::Break),
                Node::Continue => return Ok(Flow::Continue),
            }
            if self.out.len() > MAX_OUTPUT {
                return Err("output larger than 1 MiB".into());
            }
        }
        Ok(Flow::Normal)
    }

    fn range(&mut self, b: &Branch, dot: &Value) -> Res<()> {
        let depth = self.vars.len();
        // The pipeline is evaluated without its declarations: they name each element.
        let mut pipe = b.pipe.clone();
        let names = std::mem::take(&mut pipe.vars);
        let v = self.pipeline(&pipe, dot)?;
        let items: Vec<(Value, Value)> = match v {
            Value::List(l) => l
                .into_iter()
                .enumerate()
                .map(|(i, e)| (Value::Int(i as i64), e))
                .collect(),
            Value::Map(m) => m.into_iter().map(|(k, e)| (Value::Str(k), e)).collect(),
            Value::Int(n) => (0..n.max(0))
                .map(|i| (Value::Int(i), Value::Int(i)))
                .collect(),
            Value::Missing | Value::Nil => Vec::new(),
            other => return Err(format!("range can't iterate over {}", print(&other))),
        };
        if items.is_empty() {
            self.walk(&b.otherwise, dot)?;
            self.vars.truncate(depth);
            return Ok(());
        }
        for (key, elem) in items {
            self.steps += 1;
            if self.steps > MAX_RANGE_STEPS {
                return Err("range: too many iterations".into());
            }
            let elem = unwrap_nil(elem);
            match names.as_slice() {
                [] => {}
                [v] => self.vars.push((v.clone(), elem.clone())),
                [k, v, ..] => {
                    self.vars.push((k.clone(), key));
                    self.vars.push((v.clone(), elem.clone()));
                }
            }
            let flow = self.walk(&b.body, &elem)?;
            self.vars.truncate(depth);
            if matches!(flow, Flow::Break) {
                break;
            }
        }
        Ok(())
    }

    fn pipeline(&mut self, p: &Pipeline, dot: &Value) -> Res<Value> {
        let mut last: Option<Value> = None;
        for cmd in &p.cmds {
            let v = self
                .command(cmd, dot, last.take())
                .map_err(|e| format!("executing {{{{{}}}}}: {e}", p.text))?;
            // Go unwraps an interface holding nil into "no value" after each command.
            last = Some(unwrap_nil(v));
        }
        let v = last.unwrap_or(Value::Missing);
        if p.assign {
            for name in &p.vars {
                match self.vars.iter_mut().rev().find(|(n, _)| n == name) {
                    Some(slot) => slot.1 = v.clone(),
                    None => return Err(format!("undefined variable: {name}")),
                }
            }
        } else {
            for name in &p.vars {
                self.vars.push((name.clone(), v.clone()));
            }
        }
        Ok(v)
    }

    fn command(&mut self, cmd: &Command, dot: &Value, piped: Option<Value>) -> Res<Value> {
        let first = &cmd.args[0];
        if let Arg::Ident(name) = first {
            return self.call(name, &cmd.args[1..], dot, piped);
        }
        if cmd.args.len() > 1 || piped.is_some() {
            return Err(format!(
                "can't give argument to non-function {}",
                describe(first)
            ));
        }
        self.arg(first, dot)
    }

    fn arg(&mut self, a: &Arg, dot: &Value) -> Res<Value> {
        match a {
            Arg::Field(chain) => fields(dot.clone(), chain),
            Arg::Var(name, chain) => {
                let v = self
                    .vars
                    .iter()
                    .rev()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| format!("undefined variable: {name}"))?;
                fields(v, chain)
            }
            Arg::Ident(name) => self.call(name, &[], dot, None),
            Arg::Str(s) => Ok(Value::Str(s.clone())),
            Arg::Int(n) => Ok(Value::Int(*n)),
            Arg::Float(f) => Ok(Value::Float(*f)),
            Arg::Bool(b) => Ok(Value::Bool(*b)),
            Arg::Nil => Err("nil is not a command".into()),
            Arg::Sub(p, chain) => {
                let v = self.pipeline(p, dot)?;
                fields(v, chain)
            }
        }
    }

    fn call(&mut self, name: &str, args: &[Arg], dot: &Value, piped: Option<Value>) -> Res<Value> {
        // `and` and `or` evaluate their arguments only as far as needed.
        if name == "and" || name == "or" {
            let total = args.len() + usize::from(piped.is_some());
            if total == 0 {
                return Err(format!(
                    "wrong number of args for {name}: want at least 1 got 0"
                ));
            }
            let mut last = Value::Missing;
            for a in args {
                last = unwrap_nil(self.arg(a, dot)?);
                if last.truth() != (name == "and") {
                    return Ok(last);
                }
            }
            return Ok(piped.unwrap_or(last));
        }
        let mut vals = Vec::with_capacity(args.len() + 1);
        for a in args {
            if matches!(a, Arg::Nil) {
                vals.push(Value::Nil);
            } else {
                vals.push(self.arg(a, dot)?);
            }
        }
        vals.extend(piped);
        builtin(name, vals)
    }
}

fn describe(a: &Arg) -> String {
    match a {
        Arg::Field(c) if c.is_empty() => ".".into(),
        Arg::Field(c) => format!(".{}", c.join(".")),
        Arg::Var(n, c) if c.is_empty() => n.clone(),
        Arg::Var(n, c) => format!("{n}.{}", c.join(".")),
        Arg::Str(s) => format!("{s:?}"),
        Arg::Int(n) => n.to_string(),
        Arg::Float(f) => f.to_string(),
        Arg::Bool(b) => b.to_string(),
        Arg::Nil => "nil".into(),
        Arg::Ident(i) => i.clone(),
        Arg::Sub(..) => "(...)".into(),
    }
}

fn unwrap_nil(v: Value) -> Value {
    match v {
        Value::Nil => Value::Missing,
        v => v,
    }
}

/// `.A.B...` on `v`: struct fields must exist; a missing map key is no value.
fn fields(mut v: Value, chain: &[String]) -> Res<Value> {
    for name in chain {
        v = match v {
            Value::Struct(s) => match s.fields.into_iter().find(|(n, _)| n == name) {
                Some((_, f)) => f,
                None => {
                    return Err(format!(
                        "can't evaluate field {name} in type {}",
                        s.type_name
                    ))
                }
            },
            Value::Map(mut m) => unwrap_nil(m.remove(name).unwrap_or(Value::Missing)),
            Value::Missing | Value::Nil => Value::Missing,
            other => {
                return Err(format!(
                    "can't evaluate field {name} in type {}",
                    other.type_name()
                ))
            }
        };
    }
    Ok(v)
}

fn want_args(name: &str, vals: &[Value], n: usize) -> Res<()> {
    if vals.len() == n {
        Ok(())
    } else {
        Err(format!(
            "wrong number of args for {name}: want {n} got {}",
            vals.len()
        ))
    }
}

#[derive(PartialEq, Clone, Copy)]
enum Kind {
    Bool,
    Int,
    Float,
    Str,
    Other,
    Invalid,
}

fn kind(v: &Value) -> Kind {
    match v {
        Value::Bool(_) => Kind::Bool,
        Value::Int(_) => Kind::Int,
        Value::Float(_) => Kind::Float,
        Value::Str(_) => Kind::Str,
        Value::Missing | Value::Nil => Kind::Invalid,
        _ => Kind::Other,
    }
}

/// Go's `eq arg1 arg2...`: true when arg1 equals any of the others.
fn eq(vals: &[Value]) -> Res<bool> {
    let (a, rest) = vals
        .split_first()
        .ok_or("missing argument for comparison")?;
    if rest.is_empty() {
        return Err("missing argument for comparison".into());
    }
    for b in rest {
        let (ka, kb) = (kind(a), kind(b));
        let truth = if ka != kb {
            if ka != Kind::Invalid && kb != Kind::Invalid {
                return Err("incompatible types for comparison".into());
            }
            false
        } else {
            match (a, b) {
                (Value::Bool(x), Value::Bool(y)) => x == y,
                (Value::Int(x), Value::Int(y)) => x == y,
                (Value::Float(x), Value::Float(y)) => x == y,
                (Value::Str(x), Value::Str(y)) => x == y,
                (Value::Missing | Value::Nil, Value::Missing | Value::Nil) => true,
                (Value::Time(x), Value::Time(y)) => x == y,
                _ => return Err(format!("non-comparable type {}", a.type_name())),
            }
        };
        if truth {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Go's `lt a b`.
fn lt(a: &Value, b: &Value) -> Res<bool> {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => Ok(x < y),
        (Value::Float(x), Value::Float(y)) => Ok(x < y),
        (Value::Str(x), Value::Str(y)) => Ok(x < y),
        _ if kind(a) == kind(b) || matches!(kind(a), Kind::Bool | Kind::Other | Kind::Invalid) => {
            Err("invalid type for comparison".into())
        }
        _ => Err("incompatible types for comparison".into()),
    }
}

fn builtin(name: &str, vals: Vec<Value>) -> Res<Value> {
    match name {
        "not" => {
            want_args(name, &vals, 1)?;
            Ok(Value::Bool(!vals[0].truth()))
        }
        "len" => {
            want_args(name, &vals, 1)?;
            match &vals[0] {
                Value::Str(s) => Ok(Value::Int(s.len() as i64)),
                Value::List(l) => Ok(Value::Int(l.len() as i64)),
                Value::Map(m) => Ok(Value::Int(m.len() as i64)),
                Value::Missing | Value::Nil => Err("len of nil pointer".into()),
                other => Err(format!("len of type {}", other.type_name())),
            }
        }
        "index" => {
            let (item, keys) = vals
                .split_first()
                .ok_or("wrong number of args for index: want at least 1 got 0")?;
            let mut v = item.clone();
            for k in keys {
                v = match (v, k) {
                    (Value::Map(mut m), Value::Str(key)) => m.remove(key).unwrap_or(Value::Nil),
                    (Value::Map(_), other) => {
                        return Err(format!(
                            "value has type {}; should be string",
                            other.type_name()
                        ))
                    }
                    (Value::List(l), Value::Int(i)) => {
                        let len = l.len();
                        usize::try_from(*i)
                            .ok()
                            .and_then(|i| l.into_iter().nth(i))
                            .ok_or_else(|| {
                                format!("error calling index: index out of range: {i} (len {len})")
                            })?
                    }
                    (Value::Str(s), Value::Int(i)) => usize::try_from(*i)
                        .ok()
                        .and_then(|i| s.as_bytes().get(i).copied())
                        .map(|b| Value::Int(i64::from(b)))
                        .ok_or_else(|| format!("error calling index: index out of range: {i}"))?,
                    (Value::List(_) | Value::Str(_), other) => {
                        return Err(format!(
                            "cannot index slice/array with type {}",
                            other.type_name()
                        ))
                    }
                    (Value::Missing | Value::Nil, _) => {
                        return Err("error calling index: index of untyped nil".into())
                    }
                    (other, _) => {
                        return Err(format!("can't index item of type {}", other.type_name()))
                    }
                };
            }
            Ok(v)
        }
        "print" => Ok(Value::Str(sprint(&vals, false))),
        "println" => Ok(Value::Str(sprint(&vals, true))),
        "printf" => {
            let (f, rest) = vals
                .split_first()
                .ok_or("wrong number of args for printf: want at least 1 got 0")?;
            match f {
                Value::Str(f) => Ok(Value::Str(sprintf(f, rest))),
                other => Err(format!(
                    "wrong type for value; expected string; got {}",
                    other.type_name()
                )),
            }
        }
        "urlquery" => {
            let text = sprint(&vals, false);
            Ok(Value::Str(
                form_urlencoded::byte_serialize(text.as_bytes()).collect(),
            ))
        }
        "eq" => Ok(Value::Bool(eq(&vals)?)),
        "ne" => {
            want_args(name, &vals, 2)?;
            Ok(Value::Bool(!eq(&vals)?))
        }
        "lt" | "le" | "gt" | "ge" => {
            want_args(name, &vals, 2)?;
            let (a, b) = (&vals[0], &vals[1]);
            let r = match name {
                "lt" => lt(a, b)?,
                "le" => lt(a, b)? || eq(&vals)?,
                "gt" => !(lt(a, b)? || eq(&vals)?),
                _ => !lt(a, b)?,
            };
            Ok(Value::Bool(r))
        }
        other => Err(format!("function {other:?} not defined")),
    }
}

/// Go's `fmt.Sprint` (spaces between operands when neither is a string) and
/// `fmt.Sprintln` (always spaces, then a newline).
fn sprint(vals: &[Value], ln: bool) -> String {
    let mut s = String::new();
    for (i, v) in vals.iter().enumerate() {
        if i > 0 {
            let either_string = matches!(v, Value::Str(_)) || matches!(vals[i - 1], Value::Str(_));
            if ln || !either_string {
                s.push(' ');
            }
        }
        write_v(&mut s, v, false);
    }
    if ln {
        s.push('\n');
    }
    s
}
