//! Datasets: reading JSONL, JSON arrays, Parquet and plain text into rows of named fields,
//! renaming columns to the standard names, and turning rows into the examples each stage kind
//! trains on (TRL's dataset formats). Every problem names the file, the row and the field, and
//! is found before any training starts.
//!
//! Rows are numbered from 1: the line number for JSONL and text, the position for JSON arrays
//! and Parquet.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

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

/// A chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// One supervised example, in one of TRL's formats.
#[derive(Debug, Clone, PartialEq)]
pub enum SftExample {
    /// Plain text (language modelling on every token).
    Text(String),
    /// Prompt and completion (Alpaca rows become this: instruction + input, output).
    PromptCompletion { prompt: String, completion: String },
    /// A conversation, rendered with the chat template (`messages`, or ShareGPT
    /// `conversations` with `from`/`value`).
    Conversation(Vec<Message>),
}

/// One preference pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    /// Reward-model margin, when the data has one.
    pub margin: Option<f64>,
}

/// One unpaired (KTO) example.
#[derive(Debug, Clone, PartialEq)]
pub struct UnpairedExample {
    pub prompt: String,
    pub completion: String,
    /// Whether the completion is desirable.
    pub desirable: bool,
}

impl Rows {
    fn field_error(&self, row: &Row, field: &str, message: impl Into<String>) -> DataError {
        DataError::Field {
            file: self.file.clone(),
            row: row.number,
            field: field.to_owned(),
            message: message.into(),
        }
    }

    /// A required string field.
    pub fn string(&self, row: &Row, field: &str) -> Result<String, DataError> {
        match row.fields.get(field) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.field_error(
                row,
                field,
                format!("expected a string, found {}", json_type(other)),
            )),
            None => Err(self.field_error(row, field, "missing")),
        }
    }

    /// Supervised examples; the format is read from the first row's fields and every row must
    /// follow it.
    pub fn sft_examples(&self, text_field: &str) -> Result<Vec<SftExample>, DataError> {
        let first = &self.rows[0].fields;
        let format = if first.contains_key("messages") {
            "messages"
        } else if first.contains_key("conversations") {
            "conversations"
        } else if first.contains_key("instruction") && first.contains_key("output") {
            "alpaca"
        } else if first.contains_key("prompt") && first.contains_key("completion") {
            "prompt_completion"
        } else if first.contains_key(text_field) {
            "text"
        } else {
            return Err(DataError::Row {
                file: self.file.clone(),
                row: self.rows[0].number,
                message: format!(
                    "cannot tell the data format: expected `messages`, `conversations`, `instruction`+`output` (Alpaca), `prompt`+`completion`, or `{text_field}`"
                ),
            });
        };
        self.rows
            .iter()
            .map(|row| match format {
                "messages" => self.messages(row, "messages", "role", "content"),
                "conversations" => self.messages(row, "conversations", "from", "value"),
                "alpaca" => {
                    let instruction = self.string(row, "instruction")?;
                    let input = match row.fields.get("input") {
                        None | Some(Value::Null) => String::new(),
                        Some(_) => self.string(row, "input")?,
                    };
                    let prompt = if input.is_empty() {
                        instruction
                    } else {
                        format!("{instruction}\n\n{input}")
                    };
                    Ok(SftExample::PromptCompletion {
                        prompt,
                        completion: self.string(row, "output")?,
                    })
                }
                "prompt_completion" => Ok(SftExample::PromptCompletion {
                    prompt: self.string(row, "prompt")?,
                    completion: self.string(row, "completion")?,
                }),
                _ => Ok(SftExample::Text(self.string(row, text_field)?)),
            })
            .collect()
    }

    fn messages(
        &self,
        row: &Row,
        field: &str,
        role_key: &str,
        content_key: &str,
    ) -> Result<SftExample, DataError> {
        let Some(Value::Array(items)) = row.fields.get(field) else {
            return Err(self.field_error(row, field, "expected a list of messages"));
        };
        let mut messages = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = format!("{field}[{i}]");
            let role = item.get(role_key).and_then(Value::as_str);
            let content = item.get(content_key).and_then(Value::as_str);
            match (role, content) {
                (Some(role), Some(content)) => messages.push(Message {
                    role: normalise_role(role),
                    content: content.to_owned(),
                }),
                _ => {
                    return Err(self.field_error(
                        row,
                        &at,
                        format!("expected `{role_key}` and `{content_key}` strings"),
                    ));
                }
            }
        }
        if messages.is_empty() {
            return Err(self.field_error(row, field, "no messages"));
        }
        Ok(SftExample::Conversation(messages))
    }

    /// Preference pairs: `prompt`, `chosen`, `rejected`, optional numeric `margin`.
    pub fn preference_pairs(&self) -> Result<Vec<PreferencePair>, DataError> {
        self.rows
            .iter()
            .map(|row| {
                let margin = match row.fields.get("margin") {
                    None | Some(Value::Null) => None,
                    Some(Value::Number(n)) => n.as_f64(),
                    Some(other) => {
                        return Err(self.field_error(
                            row,
                            "margin",
                            format!("expected a number, found {}", json_type(other)),
                        ));
                    }
                };
                Ok(PreferencePair {
                    prompt: self.string(row, "prompt")?,
                    chosen: self.string(row, "chosen")?,
                    rejected: self.string(row, "rejected")?,
                    margin,
                })
            })
            .collect()
    }

    /// KTO's unpaired examples: `prompt`, `completion` and a boolean `label` (desirable or not);
    /// paired data (`prompt`, `chosen`, `rejected`) becomes every chosen completion (desirable)
    /// followed by every rejected one, as TRL unpairs it.
    pub fn unpaired_examples(&self) -> Result<Vec<UnpairedExample>, DataError> {
        if self.rows[0].fields.contains_key("chosen") {
            let pairs = self.preference_pairs()?;
            let side = |desirable: bool| {
                pairs.iter().map(move |p| UnpairedExample {
                    prompt: p.prompt.clone(),
                    completion: if desirable { &p.chosen } else { &p.rejected }.clone(),
                    desirable,
                })
            };
            return Ok(side(true).chain(side(false)).collect());
        }
        self.rows
            .iter()
            .map(|row| {
                let desirable = match row.fields.get("label") {
                    Some(Value::Bool(b)) => *b,
                    Some(other) => {
                        return Err(self.field_error(
                            row,
                            "label",
                            format!("expected true or false, found {}", json_type(other)),
                        ));
                    }
                    None => return Err(self.field_error(row, "label", "missing")),
                };
                Ok(UnpairedExample {
                    prompt: self.string(row, "prompt")?,
                    completion: self.string(row, "completion")?,
                    desirable,
                })
            })
            .collect()
    }

    /// Prompts, for generation.
    pub fn prompts(&self) -> Result<Vec<String>, DataError> {
        self.rows
            .iter()
            .map(|row| self.string(row, "prompt"))
            .collect()
    }
}

/// ShareGPT speaker names to chat-template roles.
fn normalise_role(role: &str) -> String {
    match role {
        "human" | "user" => "user".into(),
        "gpt" | "assistant" | "model" => "assistant".into(),
        "system" => "system".into(),
        other => other.into(),
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
        assert_eq!(
            examples[0],
            SftExample::PromptCompletion {
                prompt: "Add\n\n1 and 2".into(),
                completion: "3".into()
            }
        );
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
