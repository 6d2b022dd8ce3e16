//! The subset of containerd's filter syntax that `Walk` / `List` need.
//!
//! A list of filters matches if any filter matches; a filter is `selector[,selector...]` and
//! matches if all selectors do. A selector is `fieldpath` (present), `fieldpath==value` or
//! `fieldpath!=value`; fieldpath is `name`, `parent`, `kind` or `labels.<key>`, parts may be
//! double-quoted (`labels."containerd.io/gc.root"`). Regex (`~=`) is refused as unsupported.

use crate::error::Error;
use crate::snapshotter::Info;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Present,
    Eq(String),
    Ne(String),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// Parsed filters.
#[derive(Debug, Clone, Default)]
pub struct Filters(Vec<Vec<Selector>>);

fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c == sep && !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        s[1..s.len() - 1]
            .replace("\\\"", "\"")
            .replace("\\\\", "\\")
    } else {
        s.to_string()
    }
}

fn find_op(s: &str) -> Option<(usize, &'static str)> {
    let mut quoted = false;
    let b = s.as_bytes();
    for i in 0..b.len() {
        match b[i] {
            b'"' => quoted = !quoted,
            b'=' | b'!' | b'~' if !quoted && b.get(i + 1) == Some(&b'=') => {
                return Some((
                    i,
                    match b[i] {
                        b'=' => "==",
                        b'!' => "!=",
                        _ => "~=",
                    },
                ));
            }
            _ => {}
        }
    }
    None
}

impl Filters {
    /// Parses filters; an empty list (or only empty strings) matches everything.
    pub fn parse<S: AsRef<str>>(filters: &[S]) -> Result<Self, Error> {
        let mut all = Vec::new();
        for f in filters {
            let f = f.as_ref().trim();
            if f.is_empty() {
                continue;
            }
            let mut sels = Vec::new();
            for sel in split_outside_quotes(f, ',') {
                let sel = sel.trim();
                if sel.is_empty() {
                    continue;
                }
                let (path, op) = match find_op(sel) {
                    None => (sel, Op::Present),
                    Some((i, "==")) => (&sel[..i], Op::Eq(unquote(&sel[i + 2..]))),
                    Some((i, "!=")) => (&sel[..i], Op::Ne(unquote(&sel[i + 2..]))),
                    Some(_) => {
                        return Err(Error::InvalidArgument(format!(
                            "filter {f:?}: regular expressions (~=) are not supported"
                        )));
                    }
                };
                let path: Vec<String> = split_outside_quotes(path.trim(), '.')
                    .iter()
                    .map(|p| unquote(p))
                    .collect();
                match path.first().map(String::as_str) {
                    Some("name" | "parent" | "kind") if path.len() == 1 => {}
                    Some("labels") if path.len() >= 2 => {}
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "filter {f:?}: unknown field {:?}",
                            path.join(".")
                        )));
                    }
                }
                sels.push(Selector { path, op });
            }
            if !sels.is_empty() {
                all.push(sels);
            }
        }
        Ok(Filters(all))
    }

    /// Whether `info` passes.
    pub fn matches(&self, info: &Info) -> bool {
        self.0.is_empty()
            || self
                .0
                .iter()
                .any(|sels| sels.iter().all(|s| s.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let value: Option<String> = match self.path[0].as_str() {
            "name" => Some(info.name.clone()),
            "parent" => info.parent.clone(),
            "kind" => Some(info.kind.to_string()),
            _ => info.labels.get(&self.path[1..].join(".")).cloned(),
        };
        match (&self.op, value) {
            (Op::Present, v) => v.is_some(),
            (Op::Eq(want), Some(v)) => &v == want,
            (Op::Eq(_), None) => false,
            (Op::Ne(want), Some(v)) => &v != want,
            (Op::Ne(_), None) => true,
        }
    }
}
