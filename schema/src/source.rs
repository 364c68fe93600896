//! Source text and locations: the recipe file and each `--set` override are sources, and every
//! value read from them remembers where it came from, so that any later error can point at it.
//!
//! TOML is parsed with `toml_edit`, which keeps byte spans, then lowered into a plain
//! `serde_json::Value` tree (what validation and typed deserialisation work on) plus a
//! [`SpanMap`] from value paths to locations.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use serde_json::{Map, Value};
use toml_edit::{Item, TableLike};

/// A byte range in one of the recipe's sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loc {
    pub source: usize,
    pub span: Range<usize>,
}

impl Loc {
    pub fn new(source: usize, span: Range<usize>) -> Self {
        Self { source, span }
    }
}

/// A TOML syntax error: the parser's message and where it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TomlError {
    /// `invalid TOML: ...`, one line.
    pub message: String,
    pub loc: Loc,
}

/// One piece of recipe text: the recipe file, or one `--set` argument.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Shown in diagnostics: the recipe path as the user gave it, or `--set`.
    pub name: String,
    pub text: Arc<str>,
}

/// Every source a recipe was assembled from; [`Loc::source`] indexes into it.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub files: Vec<SourceFile>,
}

impl Sources {
    pub fn add(&mut self, name: impl Into<String>, text: impl Into<Arc<str>>) -> usize {
        self.files.push(SourceFile {
            name: name.into(),
            text: text.into(),
        });
        self.files.len() - 1
    }

    pub fn get(&self, id: usize) -> &SourceFile {
        &self.files[id]
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, loc: &Loc) -> (usize, usize) {
        let text = &self.files[loc.source].text;
        let offset = loc.span.start.min(text.len());
        let before = &text[..floor_char_boundary(text, offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while offset > 0 && !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// One step of a path into the value tree.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A path into the recipe's value tree, e.g. `stages.dpo.beta` or `stages.prep.inputs[0]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValuePath(pub Vec<Seg>);

impl ValuePath {
    pub fn root() -> Self {
        Self(Vec::new())
    }

    pub fn key(&self, key: &str) -> Self {
        let mut segs = self.0.clone();
        segs.push(Seg::Key(key.to_owned()));
        Self(segs)
    }

    pub fn index(&self, index: usize) -> Self {
        let mut segs = self.0.clone();
        segs.push(Seg::Index(index));
        Self(segs)
    }

    pub fn parent(&self) -> Option<Self> {
        let (_, rest) = self.0.split_last()?;
        Some(Self(rest.to_vec()))
    }

    pub fn last_key(&self) -> Option<&str> {
        match self.0.last() {
            Some(Seg::Key(k)) => Some(k),
            _ => None,
        }
    }
}

impl fmt::Display for ValuePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Where a value and (for table entries) its key were written.
#[derive(Debug, Clone)]
pub struct Spans {
    pub key: Option<Loc>,
    pub value: Loc,
}

/// Locations of every value in the tree, by path.
#[derive(Debug, Clone, Default)]
pub struct SpanMap {
    entries: HashMap<ValuePath, Spans>,
}

impl SpanMap {
    pub fn insert(&mut self, path: ValuePath, spans: Spans) {
        self.entries.insert(path, spans);
    }

    /// The spans of exactly this path, if it was written.
    pub fn get(&self, path: &ValuePath) -> Option<&Spans> {
        self.entries.get(path)
    }

    /// The value's location, or the closest enclosing value's when the path itself was never
    /// written (a missing field points at its table).
    pub fn value(&self, path: &ValuePath) -> Option<Loc> {
        let mut path = path.clone();
        loop {
            if let Some(spans) = self.entries.get(&path) {
                return Some(spans.value.clone());
            }
            path = path.parent()?;
        }
    }

    /// The key's location where there is one (unknown-key errors point there), else the value's.
    pub fn key_or_value(&self, path: &ValuePath) -> Option<Loc> {
        match self.entries.get(path) {
            Some(Spans { key: Some(key), .. }) => Some(key.clone()),
            _ => self.value(path),
        }
    }
}

/// Parse TOML text into a value tree, recording spans under `prefix` in `spans`.
pub fn parse_toml(
    text: &str,
    source: usize,
    prefix: &ValuePath,
    spans: &mut SpanMap,
) -> Result<Value, TomlError> {
    let doc = toml_edit::Document::parse(text.to_owned()).map_err(|err| TomlError {
        message: format!("invalid TOML: {}", first_line(err.message())),
        loc: Loc::new(source, err.span().unwrap_or(0..0)),
    })?;
    let mut lower = Lower { source, spans };
    Ok(lower.table(doc.as_table(), prefix))
}

fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or(message).trim()
}

struct Lower<'a> {
    source: usize,
    spans: &'a mut SpanMap,
}

impl Lower<'_> {
    fn loc(&self, span: Option<Range<usize>>) -> Option<Loc> {
        span.map(|s| Loc::new(self.source, s))
    }

    fn table(&mut self, table: &dyn TableLike, path: &ValuePath) -> Value {
        let mut map = Map::new();
        for (key, item) in table.iter() {
            let child = path.key(key);
            let key_loc = table.key(key).and_then(|k| self.loc(k.span()));
            let value = self.item(item, &child, key_loc.clone());
            map.insert(key.to_owned(), value);
        }
        Value::Object(map)
    }

    fn item(&mut self, item: &Item, path: &ValuePath, key: Option<Loc>) -> Value {
        let value_loc = self.loc(item.span()).or_else(|| key.clone());
        if let Some(value) = value_loc {
            self.spans.insert(path.clone(), Spans { key, value });
        }
        match item {
            Item::None => Value::Null,
            Item::Value(v) => self.value(v, path),
            Item::Table(t) => self.table(t, path),
            Item::ArrayOfTables(tables) => Value::Array(
                tables
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let child = path.index(i);
                        if let Some(value) = self.loc(t.span()) {
                            self.spans.insert(child.clone(), Spans { key: None, value });
                        }
                        self.table(t, &child)
                    })
                    .collect(),
            ),
        }
    }

    fn value(&mut self, value: &toml_edit::Value, path: &ValuePath) -> Value {
        use toml_edit::Value as V;
        match value {
            V::String(s) => Value::String(s.value().clone()),
            V::Integer(i) => Value::from(*i.value()),
            // Non-finite floats have no JSON form; keep them as strings so that validation
            // reports a type error instead of silently losing the value.
            V::Float(f) => serde_json::Number::from_f64(*f.value())
                .map_or_else(|| Value::String(f.value().to_string()), Value::Number),
            V::Boolean(b) => Value::Bool(*b.value()),
            V::Datetime(d) => Value::String(d.value().to_string()),
            V::Array(array) => Value::Array(
                array
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let child = path.index(i);
                        if let Some(value) = self.loc(v.span()) {
                            self.spans.insert(child.clone(), Spans { key: None, value });
                        }
                        self.value(v, &child)
                    })
                    .collect(),
            ),
            V::InlineTable(t) => self.table(t, path),
        }
    }
}

/// Parse the value of one `--set KEY=VALUE` as TOML; a bare word that is not TOML is a string,
/// so that `--set stages.gen.prompt=hello` works without shell-quoted TOML quotes.
pub fn parse_override_value(raw: &str) -> Value {
    let doc = format!("v = {raw}");
    let mut scratch = SpanMap::default();
    match parse_toml(&doc, 0, &ValuePath::root(), &mut scratch) {
        Ok(Value::Object(mut map)) => map.remove("v").unwrap_or(Value::Null),
        _ => Value::String(raw.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_point_at_keys_and_values() {
        let text = "[stages.dpo]\nkind = \"dpo\"\nbeta = 0.1\nlist = [1, 2]\n";
        let mut spans = SpanMap::default();
        let value = parse_toml(text, 0, &ValuePath::root(), &mut spans).unwrap();
        assert_eq!(value["stages"]["dpo"]["beta"], 0.1);
        let beta = ValuePath::root().key("stages").key("dpo").key("beta");
        let key = spans.key_or_value(&beta).unwrap();
        assert_eq!(&text[key.span.clone()], "beta");
        let value_loc = spans.value(&beta).unwrap();
        assert_eq!(&text[value_loc.span], "0.1");
        let second = ValuePath::root()
            .key("stages")
            .key("dpo")
            .key("list")
            .index(1);
        assert_eq!(&text[spans.value(&second).unwrap().span], "2");
    }

    #[test]
    fn line_and_column_are_one_based() {
        let mut sources = Sources::default();
        let id = sources.add("r.toml", "a = 1\nbé = 2\n");
        assert_eq!(sources.line_col(&Loc::new(id, 0..1)), (1, 1));
        // `=` on line 2 comes after a two-byte character: column counts characters.
        assert_eq!(sources.line_col(&Loc::new(id, 10..11)), (2, 4));
    }

    #[test]
    fn override_values_are_typed_as_toml() {
        assert_eq!(parse_override_value("0.2"), Value::from(0.2));
        assert_eq!(parse_override_value("3"), Value::from(3));
        assert_eq!(parse_override_value("\"x\""), Value::from("x"));
        assert_eq!(
            parse_override_value("[\"a\", \"b\"]"),
            serde_json::json!(["a", "b"])
        );
        assert_eq!(parse_override_value("hello"), Value::from("hello"));
    }

    #[test]
    fn syntax_errors_carry_a_location() {
        let mut spans = SpanMap::default();
        let err = parse_toml("a = [1,\n", 0, &ValuePath::root(), &mut spans).unwrap_err();
        assert!(err.message.starts_with("invalid TOML"), "{}", err.message);
        assert_eq!(err.loc.source, 0);
    }
}
