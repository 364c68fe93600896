//! Datasets: reading JSONL, JSON arrays, Parquet and plain text into rows of named fields,
//! renaming columns to the standard names, and turning rows into the examples each stage kind
//! reads, in the formats users have ([`formats`]), tokenised as TRL 1.16 tokenises them
//! ([`chat`]). Every problem names the file, the row and the field, and is found before any
//! training starts. Rows are numbered from 1: the line number for JSONL and text, the position
//! for JSON arrays and Parquet.
//!
//! # Row formats
//!
//! Each row's format is detected from its fields (after `columns` renames), or named with the
//! dataset's `format = "trl" | "sharegpt" | "alpaca"` when a row could be read two ways (an
//! Alpaca file that also has a `text` column, say). Detection: `conversations` is ShareGPT;
//! `instruction` is Alpaca; `messages` with `from`/`value` messages or beside `chosen`,
//! `rejected`, `label`, `kto_tag`, `system` or `tools` is ShareGPT; anything else is TRL's.
//!
//! | data | TRL (standard: strings; conversational: `role`/`content` lists) | ShareGPT | Alpaca |
//! |---|---|---|---|
//! | SFT | `text`; `messages`; `prompt`+`completion` | `conversations` (+`system`) | `instruction`, `input`, `output` (+`system`, `history`) |
//! | preference | `prompt`+`chosen`+`rejected`; `chosen`+`rejected` (implicit prompt) | `conversations` + `chosen`/`rejected` (one message or a list) | `instruction`, `input`, `chosen`, `rejected` |
//! | unpaired (KTO) | `prompt`+`completion`+`label`; paired data, unpaired | `messages` ending with the labelled answer, `label` or `kto_tag` | `instruction`, `input`, `output`, `kto_tag` |
//! | prompts | `prompt`; `messages` without a final assistant turn | the conversation without a final assistant turn | `instruction`, `input` |
//!
//! - Roles: `user`/`human`, `assistant`/`gpt`/`model`, `system`. Tool roles, `tool_calls`, a
//!   non-empty `tools` column, content given as a list of parts, and image/audio/video columns
//!   are refused (tool calling and multimodal data are not supported).
//! - A conversational prompt ends with a user turn; an answer starts with a non-empty
//!   assistant turn. A prompt and its answers are all strings or all conversations.
//! - Implicit prompts (TRL's `extract_prompt`): the longest common prefix of `chosen` and
//!   `rejected`, in messages for conversations, in characters for strings (a space just before
//!   the first difference goes to the answers). An explicit `prompt` of the other kind than the
//!   answers (a string beside conversations) is ignored, as TRL's `maybe_extract_prompt` does.
//! - Alpaca rows are conversations: `system`, then the `history` pairs as user/assistant turns,
//!   then the user turn `instruction` + "\n" + `input` (LLaMA-Factory's join); the answer is an
//!   assistant turn. They need a model with a chat template.
//!
//! # Tokenisation (TRL 1.16)
//!
//! Conversations are rendered with the model's chat template (tokenizer_config.json's
//! `chat_template` or chat_template.jinja; Jinja as transformers compiles it, `trim_blocks` and
//! `lstrip_blocks`) and the rendering is encoded **without** the tokenizer's special tokens (the
//! template writes its own BOS when it has one, so there is never a second one). A model without
//! a template given conversational data is an error naming its directory.
//!
//! - Prompt: the template over the prompt messages with `add_generation_prompt = true`.
//!   Generation, RL rollouts, `evaluate` and the prompt part of every training row use it.
//! - Prompt + answer (SFT prompt-completion, DPO family, KTO): `P` = tokens of the prompt's
//!   rendering, `F` = tokens of the template over prompt + answer messages (no generation
//!   prompt); the prompt is the longest common token prefix of `P` and `F` (for a pair, the
//!   shorter of the two sides' prefixes), the answer is the rest of `F`. So the scored answer is
//!   exactly the template's rendering after the prompt, end-of-turn text included
//!   (`<|im_end|>\n` for ChatML), and **no EOS is appended** to conversational answers.
//! - Plain strings: the EOS text is appended to each answer that does not end with it, `P` and
//!   `F` are encoded with the tokenizer's special tokens (BOS), then split as above.
//! - Reward models score the whole rendered conversation (prompt + answer, no generation
//!   prompt); plain strings are `[BOS] + BPE(prompt + answer) + [EOS]`.
//! - SFT conversations: the rendering of the whole conversation. With `assistant_only_loss`,
//!   the tokens trained on are those overlapping the template's `{% generation %}` blocks
//!   (transformers' `assistant_masks`, what TRL uses). A template without such blocks (TRL
//!   refuses it unless it knows a training version) trains on each assistant turn's tokens:
//!   from the end of the rendering of the turns before it with the generation prompt to the end
//!   of the rendering through it. The first token is never a target.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

pub mod chat;
pub mod formats;

pub use formats::{Layout, Message, PreferencePair, SftExample, Turns, UnpairedExample};

/// A data error, located.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {file}: {message}")]
    Read { file: PathBuf, message: String },
    #[error("{file}: row {row}: {message}")]
    Row {
        file: PathBuf,
        row: usize,
        message: String,
    },
    #[error("{file}: row {row}: field `{field}`: {message}")]
    Field {
        file: PathBuf,
        row: usize,
        field: String,
        message: String,
    },
    #[error("{file}: {message}")]
    Shape { file: PathBuf, message: String },
}

/// The formats `read_rows` understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Json,
    Parquet,
    Txt,
}

impl Format {
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "jsonl" => Some(Format::Jsonl),
            "json" => Some(Format::Json),
            "parquet" => Some(Format::Parquet),
            "txt" => Some(Format::Txt),
            _ => None,
        }
    }
}

/// One row: its number in the file and its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub number: usize,
    pub fields: Map<String, Value>,
}

/// The rows of one data file.
#[derive(Debug, Clone)]
pub struct Rows {
    pub file: PathBuf,
    pub rows: Vec<Row>,
    /// The row layout the dataset names (`format = "sharegpt"`), else detected per row.
    pub layout: Option<Layout>,
}

impl Rows {
    /// The same rows, read with `layout` rather than detecting it.
    pub fn with_layout(mut self, layout: Option<Layout>) -> Self {
        self.layout = layout;
        self
    }
}

/// Reads a data file; `columns` renames fields (`{ prompt = "question" }` reads the file's
/// `question` as `prompt`). Plain text gives one row per non-empty line, in field `text`.
pub fn read_rows(
    file: &Path,
    format: Format,
    columns: &BTreeMap<String, String>,
) -> Result<Rows, DataError> {
    let read_error = |message: String| DataError::Read {
        file: file.to_path_buf(),
        message,
    };
    let mut rows = match format {
        Format::Jsonl => {
            let text = std::fs::read_to_string(file).map_err(|e| read_error(e.to_string()))?;
            let mut rows = Vec::new();
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let value: Value = serde_json::from_str(line).map_err(|e| DataError::Row {
                    file: file.to_path_buf(),
                    row: i + 1,
                    message: format!("invalid JSON: {e}"),
                })?;
                rows.push(object_row(file, i + 1, value)?);
            }
            rows
        }
        Format::Json => {
            let text = std::fs::read_to_string(file).map_err(|e| read_error(e.to_string()))?;
            let value: Value = serde_json::from_str(&text)
                .map_err(|e| read_error(format!("invalid JSON: {e}")))?;
            let Value::Array(items) = value else {
                return Err(DataError::Shape {
                    file: file.to_path_buf(),
                    message: "a .json dataset must be an array of objects".into(),
                });
            };
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| object_row(file, i + 1, item))
                .collect::<Result<_, _>>()?
        }
        Format::Parquet => read_parquet(file)?,
        Format::Txt => {
            let text = std::fs::read_to_string(file).map_err(|e| read_error(e.to_string()))?;
            text.lines()
                .enumerate()
                .filter(|(_, line)| !line.trim().is_empty())
                .map(|(i, line)| Row {
                    number: i + 1,
                    fields: Map::from_iter([("text".to_owned(), Value::String(line.to_owned()))]),
                })
                .collect()
        }
    };
    if !columns.is_empty() {
        for row in &mut rows {
            for (standard, original) in columns {
                if let Some(value) = row.fields.remove(original) {
                    row.fields.insert(standard.clone(), value);
                }
            }
        }
    }
    if rows.is_empty() {
        return Err(DataError::Shape {
            file: file.to_path_buf(),
            message: "the dataset has no rows".into(),
        });
    }
    Ok(Rows {
        file: file.to_path_buf(),
        rows,
        layout: None,
    })
}

fn object_row(file: &Path, number: usize, value: Value) -> Result<Row, DataError> {
    match value {
        Value::Object(fields) => Ok(Row { number, fields }),
        other => Err(DataError::Row {
            file: file.to_path_buf(),
            row: number,
            message: format!("expected an object, found {}", json_type(&other)),
        }),
    }
}

fn read_parquet(file: &Path) -> Result<Vec<Row>, DataError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let read_error = |message: String| DataError::Read {
        file: file.to_path_buf(),
        message,
    };
    let handle = File::open(file).map_err(|e| read_error(e.to_string()))?;
    let reader = SerializedFileReader::new(handle).map_err(|e| read_error(e.to_string()))?;
    let iter = reader
        .get_row_iter(None)
        .map_err(|e| read_error(e.to_string()))?;
    let mut rows = Vec::new();
    for (i, row) in iter.enumerate() {
        let row = row.map_err(|e| DataError::Row {
            file: file.to_path_buf(),
            row: i + 1,
            message: e.to_string(),
        })?;
        let fields = row
            .get_column_iter()
            .map(|(name, field)| (name.clone(), field.to_json_value()))
            .collect();
        rows.push(Row {
            number: i + 1,
            fields,
        });
    }
    Ok(rows)
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn jsonl_with_column_renames() {
        let (_d, path) = write(
            "d.jsonl",
            "{\"question\": \"q\", \"completion\": \" c\"}\n\n{\"question\": \"r\", \"completion\": \" d\"}\n",
        );
        let columns = BTreeMap::from([("prompt".to_owned(), "question".to_owned())]);
        let rows = read_rows(&path, Format::Jsonl, &columns).unwrap();
        assert_eq!(rows.rows[1].number, 3);
        let examples = rows.sft_examples("text").unwrap();
        assert_eq!(
            examples[0],
            SftExample::PromptCompletion {
                prompt: "q".into(),
                completion: " c".into()
            }
        );
    }

    #[test]
    fn errors_name_file_row_and_field() {
        let (_d, path) = write(
            "d.jsonl",
            "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": 3, \"rejected\": \"c\"}\n",
        );
        let rows = read_rows(&path, Format::Jsonl, &BTreeMap::new()).unwrap();
        let err = rows.preference_pairs().unwrap_err().to_string();
        assert!(
            err.ends_with("d.jsonl: row 2: field `chosen`: expected a string, found a number"),
            "{err}"
        );
        let (_d, path) = write("e.jsonl", "{\"prompt\": \"a\"}\nnot json\n");
        let err = read_rows(&path, Format::Jsonl, &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("e.jsonl: row 2: invalid JSON"), "{err}");
    }

    #[test]
    fn alpaca_sharegpt_and_text() {
        let (_d, path) = write(
            "a.json",
            r#"[{"instruction": "Add", "input": "1 and 2", "output": "3"}, {"instruction": "Say hi", "input": "", "output": "hi"}]"#,
        );
        let rows = read_rows(&path, Format::Json, &BTreeMap::new()).unwrap();
        let examples = rows.sft_examples("text").unwrap();
        let SftExample::Conversation(messages) = &examples[0] else {
            panic!("{:?}", examples[0])
        };
        assert_eq!(messages[0].content, "Add\n1 and 2");
        assert_eq!(messages[1].content, "3");
        let (_d, path) = write(
            "s.jsonl",
            r#"{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}"#,
        );
        let rows = read_rows(&path, Format::Jsonl, &BTreeMap::new()).unwrap();
        let SftExample::Conversation(messages) = &rows.sft_examples("text").unwrap()[0] else {
            panic!()
        };
        assert_eq!(messages[1].role, "assistant");
        let (_d, path) = write("t.txt", "one line\n\nanother\n");
        let rows = read_rows(&path, Format::Txt, &BTreeMap::new()).unwrap();
        assert_eq!(rows.rows.len(), 2);
        assert_eq!(rows.rows[1].number, 3);
        assert_eq!(
            rows.sft_examples("text").unwrap()[1],
            SftExample::Text("another".into())
        );
    }

    #[test]
    fn unpaired_rows_and_unpaired_pairs() {
        let (_d, path) = write(
            "k.jsonl",
            "{\"prompt\": \"p\", \"completion\": \" a\", \"label\": true}\n\
             {\"prompt\": \"q\", \"completion\": \" b\", \"label\": \"yes\"}\n",
        );
        let rows = read_rows(&path, Format::Jsonl, &BTreeMap::new()).unwrap();
        let err = rows.unpaired_examples().unwrap_err().to_string();
        assert!(err.contains("row 2") && err.contains("label"), "{err}");
        let (_d, path) = write(
            "p.jsonl",
            "{\"prompt\": \"p\", \"chosen\": \" good\", \"rejected\": \" bad\"}\n",
        );
        let rows = read_rows(&path, Format::Jsonl, &BTreeMap::new()).unwrap();
        let examples = rows.unpaired_examples().unwrap();
        assert_eq!(examples.len(), 2);
        assert!(examples[0].desirable && examples[0].completion == " good");
        assert!(!examples[1].desirable && examples[1].completion == " bad");
    }

    #[test]
    fn empty_and_malformed_files() {
        let (_d, path) = write("e.jsonl", "\n");
        assert!(
            read_rows(&path, Format::Jsonl, &BTreeMap::new())
                .unwrap_err()
                .to_string()
                .contains("no rows")
        );
        let (_d, path) = write("o.json", "{\"a\": 1}");
        assert!(
            read_rows(&path, Format::Json, &BTreeMap::new())
                .unwrap_err()
                .to_string()
                .contains("array of objects")
        );
        let (_d, path) = write("p.parquet", "not parquet");
        assert!(read_rows(&path, Format::Parquet, &BTreeMap::new()).is_err());
    }
}

#[cfg(test)]
mod parquet_tests {
    use super::*;

    /// A snappy-compressed file written by pyarrow, as Hugging Face datasets ship them.
    #[test]
    fn reads_parquet_written_by_pyarrow() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pairs.parquet");
        let columns = BTreeMap::from([("prompt".to_owned(), "question".to_owned())]);
        let rows = read_rows(&path, Format::Parquet, &columns).unwrap();
        let pairs = rows.preference_pairs().unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[1].prompt, "Name a colour.");
        assert_eq!(pairs[1].rejected, " Seven");
        assert_eq!(pairs[0].margin, Some(1.0));
    }
}
