//! Fuzzing of the files rudder reads from users beyond recipes: data files, model directories,
//! tokenizers and chat templates. The parsers are driven with mutations of a seed corpus
//! (`fuzz/corpus/`) and with generated values, through proptest on the stable toolchain: a
//! fixed seed makes every run the same inputs, and a failure shrinks to the smallest list of
//! mutations that still fails.
//!
//! What is checked, per input: the parser returns (no panic, no abort), allocates a bounded
//! amount of memory (`tests/parsers.rs` counts every allocation), and an error names the file it
//! is about. `RUDDER_FUZZ_CASES=N` runs N cases per target instead of the short CI run, and
//! `RUDDER_FUZZ_SEED=S` another sequence.
//!
//! This crate owns the mutators and the runner; the targets are in `tests/parsers.rs`.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::Value;

/// The repository's seed corpus.
pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

/// Every file of `corpus/SUB/`, sorted, as (name, bytes).
pub fn seeds(sub: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir().join(sub);
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|p| {
            let name = p
                .file_name()
                .expect("a file")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(&p).expect("corpus file"))
        })
        .collect()
}

/// Byte strings that parsers treat specially: delimiters, huge and odd numbers, invalid UTF-8,
/// template syntax.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b",",
    b":",
    b"null",
    b"true",
    b"-1",
    b"0",
    b"1e309",
    b"-9223372036854775809",
    b"18446744073709551616",
    b"4294967296",
    b"NaN",
    b"\"\\u0000\"",
    b"\"\\ud800\"",
    b"\xff\xfe\xc3",
    b"\n",
    b"\r\n",
    b"\0",
    b"{%",
    b"%}",
    b"{{",
    b"}}",
    b"{% for i in range(100000) %}{% for j in range(100000) %}",
    b"{% endfor %}{% endfor %}",
    b"{% macro m(x) %}{{ m(x) }}{% endmacro %}{{ m(1) }}",
    b"{{ 'x' * 99999999 }}",
    b"{{ messages[999] }}",
    b"{{ raise_exception('no') }}",
];

/// One edit of a byte string. Positions are taken modulo the length when applied, so that any
/// value is valid for any input and shrinking moves towards the start.
#[derive(Debug, Clone)]
pub enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        byte: u8,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Token {
        at: usize,
        token: usize,
    },
    Delete {
        at: usize,
        len: usize,
    },
    Truncate {
        at: usize,
    },
    /// A chunk of the input repeated: long lines, long strings, many rows.
    Repeat {
        at: usize,
        len: usize,
        times: usize,
    },
    /// A run of one byte, up to 4 MiB: a huge line or a huge token.
    Run {
        at: usize,
        byte: u8,
        len: usize,
    },
    /// `[` (or `{"a":`) nested `depth` deep.
    Nest {
        at: usize,
        depth: usize,
        object: bool,
    },
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    let at = any::<usize>();
    prop_oneof![
        4 => (at, 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        2 => (at, any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        2 => (at, prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        4 => (at, 0..TOKENS.len()).prop_map(|(at, token)| Mutation::Token { at, token }),
        3 => (at, 1usize..64).prop_map(|(at, len)| Mutation::Delete { at, len }),
        2 => at.prop_map(|at| Mutation::Truncate { at }),
        1 => (at, 1usize..256, 2usize..2000)
            .prop_map(|(at, len, times)| Mutation::Repeat { at, len, times }),
        1 => (at, any::<u8>(), 1usize..(4 << 20))
            .prop_map(|(at, byte, len)| Mutation::Run { at, byte, len }),
        1 => (at, 1usize..100_000, any::<bool>())
            .prop_map(|(at, depth, object)| Mutation::Nest { at, depth, object }),
    ]
}

pub fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..6)
}

/// Applies `edits` to `bytes`; the result stays under 8 MiB.
pub fn mutate(bytes: &[u8], edits: &[Mutation]) -> Vec<u8> {
    const LIMIT: usize = 8 << 20;
    let mut out = bytes.to_vec();
    for edit in edits {
        let pos = |at: usize, len: usize| if len == 0 { 0 } else { at % (len + 1) };
        let len = out.len();
        match edit {
            Mutation::Flip { at, bit } if len > 0 => out[at % len] ^= 1 << bit,
            Mutation::Set { at, byte } if len > 0 => out[at % len] = *byte,
            Mutation::Flip { .. } | Mutation::Set { .. } => {}
            Mutation::Insert { at, bytes } => {
                let p = pos(*at, len);
                out.splice(p..p, bytes.iter().copied());
            }
            Mutation::Token { at, token } => {
                let p = pos(*at, len);
                out.splice(p..p, TOKENS[*token].iter().copied());
            }
            Mutation::Delete { at, len: n } => {
                let p = pos(*at, len);
                let end = (p + n).min(len);
                out.drain(p..end);
            }
            Mutation::Truncate { at } => out.truncate(pos(*at, len)),
            Mutation::Repeat { at, len: n, times } => {
                let p = pos(*at, len);
                let chunk: Vec<u8> = out[p..(p + n).min(len)].to_vec();
                let copies = (*times).min(LIMIT / chunk.len().max(1));
                let repeated: Vec<u8> = chunk.repeat(copies);
                out.splice(p..p, repeated);
            }
            Mutation::Run { at, byte, len: n } => {
                let p = pos(*at, len);
                out.splice(p..p, std::iter::repeat_n(*byte, *n));
            }
            Mutation::Nest { at, depth, object } => {
                let p = pos(*at, len);
                let unit: &[u8] = if *object { b"{\"a\":" } else { b"[" };
                out.splice(p..p, unit.repeat(*depth));
            }
        }
        out.truncate(LIMIT);
    }
    out
}

/// A JSON value that parsers of configuration files find awkward.
pub fn awkward_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(2),
            Just(3),
            Just(1 << 31),
            Just(1 << 32),
            Just(1 << 40),
            Just(1 << 62),
            Just(u64::MAX),
        ]
        .prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("F32"),
            Just("F16"),
            Just("BF16"),
            Just("F64"),
            Just("I64"),
            Just("U8"),
            Just("BOOL"),
            Just("F8_E4M3"),
            Just("llama"),
            Just("LlamaForCausalLM"),
            Just("LlamaForSequenceClassification"),
            Just("Qwen2ForCausalLM"),
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// One edit of a JSON document: the value at one of its paths replaced or removed, or a key
/// added to one of its objects. `pick` selects the path modulo their number.
#[derive(Debug, Clone)]
pub enum JsonEdit {
    Replace {
        pick: usize,
        value: Value,
    },
    Remove {
        pick: usize,
    },
    Add {
        pick: usize,
        key: String,
        value: Value,
    },
}

pub fn json_edits() -> impl Strategy<Value = Vec<JsonEdit>> {
    let edit = prop_oneof![
        4 => (any::<usize>(), awkward_value())
            .prop_map(|(pick, value)| JsonEdit::Replace { pick, value }),
        1 => any::<usize>().prop_map(|pick| JsonEdit::Remove { pick }),
        1 => (any::<usize>(), "[a-z_]{1,12}", awkward_value())
            .prop_map(|(pick, key, value)| JsonEdit::Add { pick, key, value }),
    ];
    prop::collection::vec(edit, 1..5)
}

/// Paths of every value in `value`, depth first, as (object key or array index) steps.
fn paths(value: &Value, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(prefix.clone());
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                prefix.push(Step::Key(k.clone()));
                paths(v, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                prefix.push(Step::Index(i));
                paths(v, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn at_path<'a>(value: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    let mut here = value;
    for step in path {
        here = match step {
            Step::Key(k) => here.get_mut(k.as_str())?,
            Step::Index(i) => here.get_mut(*i)?,
        };
    }
    Some(here)
}

pub fn edit_json(value: &Value, edits: &[JsonEdit]) -> Value {
    let mut value = value.clone();
    for edit in edits {
        let mut all = Vec::new();
        paths(&value, &mut Vec::new(), &mut all);
        let path = |pick: usize| all[pick % all.len()].clone();
        match edit {
            JsonEdit::Replace { pick, value: new } => {
                if let Some(slot) = at_path(&mut value, &path(*pick)) {
                    *slot = new.clone();
                }
            }
            JsonEdit::Remove { pick } => {
                let p = path(*pick);
                if let Some((last, parent)) = p.split_last()
                    && let Some(parent) = at_path(&mut value, parent)
                {
                    match (last, parent) {
                        (Step::Key(k), Value::Object(map)) => {
                            map.shift_remove(k.as_str());
                        }
                        (Step::Index(i), Value::Array(items)) if *i < items.len() => {
                            items.remove(*i);
                        }
                        _ => {}
                    }
                }
            }
            JsonEdit::Add {
                pick,
                key,
                value: new,
            } => {
                if let Some(Value::Object(map)) = at_path(&mut value, &path(*pick)) {
                    map.insert(key.clone(), new.clone());
                }
            }
        }
    }
    value
}

/// A safetensors file split into its header (JSON) and data; mutating the header and writing it
/// back with a correct length reaches the checks behind the length check.
pub fn split_safetensors(bytes: &[u8]) -> Option<(Value, Vec<u8>)> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let end = n.checked_add(8)?;
    let header = serde_json::from_slice(bytes.get(8..end)?).ok()?;
    Some((header, bytes[end..].to_vec()))
}

pub fn join_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let text = serde_json::to_vec(header).expect("a JSON value serialises");
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(data);
    out
}

/// How many cases a target runs: its CI default, or `RUDDER_FUZZ_CASES`.
pub fn cases(default: u32) -> u32 {
    std::env::var("RUDDER_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `check` on `cases` inputs drawn from `strategy`, deterministically; panics with the
/// shrunk failing input if a case fails or panics. Returns the number of cases run.
pub fn run<S: Strategy>(
    target: &str,
    cases: u32,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), String>,
) -> u32
where
    S::Value: std::fmt::Debug,
{
    let seed: u64 = std::env::var("RUDDER_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..8 + target.len().min(24)].copy_from_slice(&target.as_bytes()[..target.len().min(24)]);
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    match runner.run(&strategy, |value| check(value).map_err(TestCaseError::fail)) {
        Ok(()) => cases,
        Err(e) => panic!("fuzz target `{target}` failed: {e}"),
    }
}

/// Writes `files` (name, bytes) into `dir`, emptied first.
pub fn write_case(dir: &Path, files: &[(&str, &[u8])]) {
    if dir.exists() {
        std::fs::remove_dir_all(dir).expect("clearing the case directory");
    }
    std::fs::create_dir_all(dir).expect("creating the case directory");
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).expect("writing a case file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_stay_in_bounds() {
        let out = mutate(
            b"abc",
            &[
                Mutation::Delete { at: 99, len: 5 },
                Mutation::Flip { at: 7, bit: 1 },
                Mutation::Truncate { at: 0 },
                Mutation::Flip { at: 3, bit: 0 },
                Mutation::Token { at: 5, token: 0 },
            ],
        );
        assert_eq!(out, b"{");
        let big = mutate(
            b"x",
            &[Mutation::Repeat {
                at: 0,
                len: 1,
                times: usize::MAX,
            }],
        );
        assert!(big.len() <= 8 << 20);
    }

    #[test]
    fn json_edits_reach_nested_values() {
        let v = serde_json::json!({"a": {"b": [1, 2]}});
        let out = edit_json(
            &v,
            &[JsonEdit::Replace {
                pick: 3,
                value: Value::Null,
            }],
        );
        assert_eq!(out, serde_json::json!({"a": {"b": [null, 2]}}));
    }

    #[test]
    fn safetensors_round_trip() {
        let header =
            serde_json::json!({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}});
        let bytes = join_safetensors(&header, &[0, 0, 128, 63]);
        assert_eq!(
            split_safetensors(&bytes),
            Some((header, vec![0, 0, 128, 63]))
        );
    }
}
