//! Keys: the BLAKE3 of a canonical encoding of everything that determines an artifact.
//!
//! This module is the only place that encodes key material. The encoding is explicit and
//! stable: every value is tagged, strings and sequences are length-prefixed, integers are
//! fixed-width little-endian, floats are encoded by their bits, and maps are encoded in sorted
//! key order (never in hash-map or insertion order).
//!
//! | in a stage's key                                   | never in a key                       |
//! |----------------------------------------------------|--------------------------------------|
//! | kind, and the version of its implementation        | node names (nodes are keyed by role) |
//! | every parameter after defaults are filled in       | descriptions                         |
//! | (null parameters are absent, so new optional ones   | `logging_steps`, `checkpoint_every`, |
//! |  leave old keys unchanged)                         |  `report_to`                         |
//! |                                                    | absolute paths, the store's location |
//! | each input's key, by role (`model`, `data`, ...),  | modification times, file names of    |
//! |  and the output selected (`prep.train`)            |  inputs (only their content)         |
//! | digests of plain files the stage reads (`deps`)    | thread counts, progress settings     |
//! | content of the files in a command's `read_paths`   | a command's `sandbox` and `network`  |
//! |  (by content only: they may be absolute paths)     |  settings (they restrict, add nothing)|
//! | seed, backend, precision                           | where a stage runs: the executor,    |
//! |                                                    |  `jobs`, Slurm `resources`           |
//!
//! Dataset keys cover the file's content, format and column mapping; `hf` model keys cover
//! config.json, the weights and the tokenizer files.

use std::fmt;

use serde_json::Value;

/// Bumped when the encoding below changes, so that every key changes with it.
const ENCODING_VERSION: u32 = 1;

/// A content key: 32 bytes of BLAKE3, shown as 64 hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key([u8; 32]);

impl Key {
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    pub fn from_hex(hex: &str) -> Option<Key> {
        blake3::Hash::from_hex(hex).ok().map(|h| Key(*h.as_bytes()))
    }

    pub fn from_digest(hash: blake3::Hash) -> Key {
        Key(*hash.as_bytes())
    }

    /// The first 12 hex characters, for display.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_owned()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({})", self.short())
    }
}

/// Builds a key from tagged, canonically encoded fields.
pub struct KeyBuilder {
    hasher: blake3::Hasher,
}

impl KeyBuilder {
    /// Starts a key of one domain (`dataset`, `model`, `stage`...): keys of different domains
    /// never collide even when their fields do.
    pub fn new(domain: &str) -> Self {
        let mut builder = Self {
            hasher: blake3::Hasher::new(),
        };
        builder.bytes(b"rudder-key");
        builder.u64(u64::from(ENCODING_VERSION));
        builder.str(domain);
        builder
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.hasher.update(&(bytes.len() as u64).to_le_bytes());
        self.hasher.update(bytes);
    }

    fn tag(&mut self, tag: u8) {
        self.hasher.update(&[tag]);
    }

    pub fn u64(&mut self, value: u64) -> &mut Self {
        self.tag(b'u');
        self.hasher.update(&value.to_le_bytes());
        self
    }

    pub fn str(&mut self, value: &str) -> &mut Self {
        self.tag(b's');
        self.bytes(value.as_bytes());
        self
    }

    /// A named field: the name, then the value.
    pub fn field(&mut self, name: &str, value: &Value) -> &mut Self {
        self.str(name);
        self.value(value);
        self
    }

    pub fn key(&mut self, key: &Key) -> &mut Self {
        self.tag(b'k');
        self.hasher.update(&key.0);
        self
    }

    /// A JSON value, canonically: objects by sorted key, numbers by kind and bits.
    pub fn value(&mut self, value: &Value) -> &mut Self {
        match value {
            Value::Null => self.tag(b'n'),
            Value::Bool(b) => {
                self.tag(b'b');
                self.hasher.update(&[u8::from(*b)]);
            }
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    self.tag(b'i');
                    self.hasher.update(&i.to_le_bytes());
                } else if let Some(u) = n.as_u64() {
                    self.tag(b'u');
                    self.hasher.update(&u.to_le_bytes());
                } else {
                    self.tag(b'f');
                    let f = n.as_f64().expect("a JSON number is an integer or a float");
                    self.hasher.update(&f.to_bits().to_le_bytes());
                }
            }
            Value::String(s) => {
                self.str(s);
            }
            Value::Array(items) => {
                self.tag(b'a');
                self.hasher.update(&(items.len() as u64).to_le_bytes());
                for item in items {
                    self.value(item);
                }
            }
            Value::Object(map) => {
                self.tag(b'o');
                self.hasher.update(&(map.len() as u64).to_le_bytes());
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                for (k, v) in entries {
                    self.str(k);
                    self.value(v);
                }
            }
        }
        self
    }

    pub fn finish(&self) -> Key {
        Key::from_digest(self.hasher.finalize())
    }
}

/// Parameters as they enter keys and lockfiles: nulls removed at every depth, and the named
/// top-level fields (settings that never change an artifact) dropped.
pub fn canonical_params(params: &Value, drop: &[&str]) -> Value {
    fn strip(value: &Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(strip).collect()),
            other => other.clone(),
        }
    }
    let mut stripped = strip(params);
    if let Value::Object(map) = &mut stripped {
        for name in drop {
            map.shift_remove(*name);
        }
    }
    stripped
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key_of(value: Value) -> Key {
        KeyBuilder::new("test").value(&value).finish()
    }

    #[test]
    fn object_order_does_not_matter() {
        assert_eq!(
            key_of(json!({"a": 1, "b": 2})),
            key_of(json!({"b": 2, "a": 1}))
        );
    }

    #[test]
    fn types_are_distinguished() {
        assert_ne!(key_of(json!(1)), key_of(json!(1.0)));
        assert_ne!(key_of(json!("1")), key_of(json!(1)));
        assert_ne!(key_of(json!([])), key_of(json!({})));
        assert_ne!(key_of(json!(null)), key_of(json!(false)));
    }

    #[test]
    fn length_prefixes_prevent_ambiguity() {
        assert_ne!(key_of(json!(["ab", "c"])), key_of(json!(["a", "bc"])));
        assert_ne!(key_of(json!({"a": "bc"})), key_of(json!({"ab": "c"})));
    }

    #[test]
    fn domains_separate_keys() {
        let a = KeyBuilder::new("dataset").value(&json!(1)).finish();
        let b = KeyBuilder::new("model").value(&json!(1)).finish();
        assert_ne!(a, b);
    }

    #[test]
    fn floats_by_bits() {
        assert_ne!(key_of(json!(0.1)), key_of(json!(0.1 + 1e-17 + 1e-16)));
        assert_eq!(key_of(json!(0.1)), key_of(json!(0.1)));
    }

    #[test]
    fn hex_round_trip() {
        let key = key_of(json!("x"));
        assert_eq!(Key::from_hex(&key.to_hex()), Some(key));
        assert_eq!(key.to_hex().len(), 64);
        assert_eq!(Key::from_hex("zz"), None);
    }

    #[test]
    fn canonical_params_drop_nulls_and_settings() {
        let params = json!({"beta": 0.1, "max_steps": null, "logging_steps": 5, "nested": {"x": null, "y": 1}});
        assert_eq!(
            canonical_params(&params, &["logging_steps"]),
            json!({"beta": 0.1, "nested": {"y": 1}})
        );
    }

    /// Pins the encoding: if this changes, every key in every store changes, which must be a
    /// deliberate decision (bump `ENCODING_VERSION`).
    #[test]
    fn encoding_is_stable() {
        let key = KeyBuilder::new("stage")
            .str("dpo")
            .u64(1)
            .field("params", &json!({"beta": 0.1, "loss_type": "sigmoid"}))
            .finish();
        assert_eq!(
            key.to_hex(),
            "e8882efa5cbd80135f9290f51abf6a4d2e119052e1957225cbfa91e22477a9d5"
        );
    }
}
