//! Row formats: which fields of a row hold the prompt, the answers, the label, and whether they
//! are plain strings or conversations. Turns rows into the examples each kind reads
//! ([`SftExample`], [`PreferencePair`], [`UnpairedExample`], prompts as [`Turns`]). The format is
//! detected from each row's fields (see the parent module's table), or named with the dataset's
//! `format = "trl" | "sharegpt" | "alpaca"` ([`Layout`]). Tokenisation is not here: see
//! [`super::chat`].

use serde_json::Value;

use super::{DataError, Row, Rows, json_type};
pub use crate::tokenizer::Message;

/// A prompt or an answer: a plain string (TRL's standard format) or a list of chat messages
/// (TRL's conversational format, rendered with the model's chat template).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum Turns {
    Text(String),
    Chat(Vec<Message>),
}

impl Turns {
    pub fn is_chat(&self) -> bool {
        matches!(self, Turns::Chat(_))
    }

    /// The text of a plain string, or the concatenated contents of the messages (for judges and
    /// messages that need some text).
    pub fn plain(&self) -> String {
        match self {
            Turns::Text(t) => t.clone(),
            Turns::Chat(messages) => messages
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    /// One assistant message holding `text`, or `text` itself: the form of a generated answer
    /// to this prompt.
    pub fn answer(&self, text: &str) -> Turns {
        match self {
            Turns::Text(_) => Turns::Text(text.to_owned()),
            Turns::Chat(_) => Turns::Chat(vec![Message {
                role: "assistant".into(),
                content: text.to_owned(),
            }]),
        }
    }

    /// As a JSON value: a string or a list of `{role, content}`.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("strings and messages serialise")
    }
}

impl From<&str> for Turns {
    fn from(text: &str) -> Self {
        Turns::Text(text.to_owned())
    }
}

impl PartialEq<&str> for Turns {
    fn eq(&self, other: &&str) -> bool {
        matches!(self, Turns::Text(t) if t == other)
    }
}

/// One supervised example, in one of TRL's formats.
#[derive(Debug, Clone, PartialEq)]
pub enum SftExample {
    /// Plain text (language modelling on every token).
    Text(String),
    /// Prompt and completion, both strings or both conversations.
    PromptCompletion { prompt: Turns, completion: Turns },
    /// A whole conversation (TRL's `messages`, ShareGPT, Alpaca rows).
    Conversation(Vec<Message>),
}

/// One preference pair: the prompt and the two answers are all strings or all conversations.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub prompt: Turns,
    pub chosen: Turns,
    pub rejected: Turns,
    /// Reward-model margin, when the data has one.
    pub margin: Option<f64>,
}

/// One unpaired (KTO) example.
#[derive(Debug, Clone, PartialEq)]
pub struct UnpairedExample {
    pub prompt: Turns,
    pub completion: Turns,
    /// Whether the completion is desirable.
    pub desirable: bool,
}

/// The row layouts a dataset's `format` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// TRL's field names: `text`, `messages`, `prompt`, `completion`, `chosen`, `rejected`,
    /// `label`, standard (strings) or conversational (lists of `role`/`content` messages).
    Trl,
    /// ShareGPT (LLaMA-Factory): `conversations` or `messages` with `from`/`value` or
    /// `role`/`content`, optional `system`; `chosen`/`rejected` one message or a list; KTO's
    /// boolean `label` or `kto_tag`.
    ShareGpt,
    /// Alpaca: `instruction`, `input`, `output` (or `chosen`/`rejected`), optional `system` and
    /// `history` (`[[instruction, answer], ...]`).
    Alpaca,
}

impl Layout {
    pub fn from_name(name: &str) -> Option<Layout> {
        match name {
            "trl" => Some(Layout::Trl),
            "sharegpt" => Some(Layout::ShareGpt),
            "alpaca" => Some(Layout::Alpaca),
            _ => None,
        }
    }
}

/// Columns that carry images, audio or video: not supported.
const MULTIMODAL_COLUMNS: [&str; 6] = ["images", "image", "videos", "video", "audios", "audio"];

impl Rows {
    fn field_error(&self, row: &Row, field: &str, message: impl Into<String>) -> DataError {
        DataError::Field {
            file: self.file.clone(),
            row: row.number,
            field: field.to_owned(),
            message: message.into(),
        }
    }

    fn row_error(&self, row: &Row, message: impl Into<String>) -> DataError {
        DataError::Row {
            file: self.file.clone(),
            row: row.number,
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

    fn optional_string(&self, row: &Row, field: &str) -> Result<Option<String>, DataError> {
        match row.fields.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => self.string(row, field).map(Some),
        }
    }

    /// The layout of `row`: the declared one, else detected from its fields.
    fn layout(&self, row: &Row) -> Layout {
        if let Some(layout) = self.layout {
            return layout;
        }
        let f = &row.fields;
        if f.contains_key("conversations") {
            return Layout::ShareGpt;
        }
        if f.contains_key("instruction") {
            return Layout::Alpaca;
        }
        if let Some(Value::Array(messages)) = f.get("messages") {
            let from_value = messages.first().is_some_and(|m| m.get("from").is_some());
            let sharegpt_columns = ["chosen", "rejected", "kto_tag", "label", "system", "tools"]
                .iter()
                .any(|c| f.contains_key(*c));
            if from_value || sharegpt_columns {
                return Layout::ShareGpt;
            }
        }
        Layout::Trl
    }

    /// Tool calling and multimodal rows are refused by name.
    fn refuse_unsupported(&self, row: &Row) -> Result<(), DataError> {
        match row.fields.get("tools") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.trim().is_empty() || s.trim() == "[]" => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => {
                return Err(self.field_error(
                    row,
                    "tools",
                    "tool calling is not supported; remove the `tools` column",
                ));
            }
        }
        for column in MULTIMODAL_COLUMNS {
            match row.fields.get(column) {
                None | Some(Value::Null) => {}
                Some(Value::Array(a)) if a.is_empty() => {}
                Some(_) => {
                    return Err(self.field_error(
                        row,
                        column,
                        "multimodal rows (images, audio, video) are not supported",
                    ));
                }
            }
        }
        Ok(())
    }

    /// One message: `role`/`content` or `from`/`value`.
    fn message(&self, row: &Row, at: &str, value: &Value) -> Result<Message, DataError> {
        let Value::Object(fields) = value else {
            return Err(self.field_error(
                row,
                at,
                format!("expected a message object, found {}", json_type(value)),
            ));
        };
        if fields.get("tool_calls").is_some_and(|v| !v.is_null()) {
            return Err(self.field_error(row, at, "tool calls are not supported"));
        }
        let (role_key, content_key) = if fields.contains_key("from") {
            ("from", "value")
        } else {
            ("role", "content")
        };
        let role = match fields.get(role_key) {
            Some(Value::String(role)) => role,
            Some(other) => {
                return Err(self.field_error(
                    row,
                    at,
                    format!(
                        "`{role_key}`: expected a string, found {}",
                        json_type(other)
                    ),
                ));
            }
            None => return Err(self.field_error(row, at, "missing `role` (or `from`)")),
        };
        let role = match role.as_str() {
            "user" | "human" => "user",
            "assistant" | "gpt" | "model" => "assistant",
            "system" => "system",
            "tool" | "function" | "function_call" | "observation" | "ipython" => {
                return Err(self.field_error(
                    row,
                    at,
                    format!("role `{role}`: tool calling is not supported"),
                ));
            }
            other => {
                return Err(self.field_error(
                    row,
                    at,
                    format!("unknown role `{other}` (expected user, assistant or system; ShareGPT's human, gpt)"),
                ));
            }
        };
        let content = match fields.get(content_key) {
            Some(Value::String(content)) => content.clone(),
            Some(Value::Array(_)) => {
                return Err(self.field_error(
                    row,
                    at,
                    "content as a list of parts (multimodal) is not supported; expected a string",
                ));
            }
            Some(other) => {
                return Err(self.field_error(
                    row,
                    at,
                    format!(
                        "`{content_key}`: expected a string, found {}",
                        json_type(other)
                    ),
                ));
            }
            None => return Err(self.field_error(row, at, format!("missing `{content_key}`"))),
        };
        Ok(Message {
            role: role.to_owned(),
            content,
        })
    }

    /// A list of messages (or, when `one_allowed`, a single message object).
    fn messages(
        &self,
        row: &Row,
        field: &str,
        one_allowed: bool,
    ) -> Result<Vec<Message>, DataError> {
        match row.fields.get(field) {
            Some(Value::Array(items)) => {
                let messages = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.message(row, &format!("{field}[{i}]"), item))
                    .collect::<Result<Vec<_>, _>>()?;
                if messages.is_empty() {
                    return Err(self.field_error(row, field, "no messages"));
                }
                Ok(messages)
            }
            Some(item @ Value::Object(_)) if one_allowed => {
                Ok(vec![self.message(row, field, item)?])
            }
            Some(other) => Err(self.field_error(
                row,
                field,
                format!("expected a list of messages, found {}", json_type(other)),
            )),
            None => Err(self.field_error(row, field, "missing")),
        }
    }

    /// A prompt conversation must end with a user turn (the generation prompt follows it).
    fn check_prompt(&self, row: &Row, field: &str, prompt: &[Message]) -> Result<(), DataError> {
        match prompt.last() {
            Some(last) if last.role == "user" => Ok(()),
            Some(last) => Err(self.field_error(
                row,
                field,
                format!(
                    "the prompt ends with a `{}` turn; it must end with a user turn",
                    last.role
                ),
            )),
            None => Err(self.field_error(row, field, "the prompt has no messages")),
        }
    }

    /// An answer starts with an assistant turn with some content.
    fn check_answer(&self, row: &Row, field: &str, answer: &[Message]) -> Result<(), DataError> {
        match answer.first() {
            Some(first) if first.role != "assistant" => Err(self.field_error(
                row,
                field,
                format!(
                    "the answer starts with a `{}` turn; it must start with an assistant turn",
                    first.role
                ),
            )),
            Some(first) if first.content.trim().is_empty() => {
                Err(self.field_error(row, field, "empty answer"))
            }
            Some(_) => Ok(()),
            None => Err(self.field_error(row, field, "empty answer")),
        }
    }

    /// A string, or a conversation when the field holds a list.
    fn turns(&self, row: &Row, field: &str) -> Result<Turns, DataError> {
        match row.fields.get(field) {
            Some(Value::Array(_)) => Ok(Turns::Chat(self.messages(row, field, false)?)),
            _ => Ok(Turns::Text(self.string(row, field)?)),
        }
    }

    fn is_list(row: &Row, field: &str) -> bool {
        matches!(row.fields.get(field), Some(Value::Array(_)))
    }

    /// The ShareGPT conversation field of `row`: `conversations`, else `messages`.
    fn sharegpt_field(row: &Row) -> &'static str {
        if row.fields.contains_key("conversations") {
            "conversations"
        } else {
            "messages"
        }
    }

    /// A ShareGPT conversation with the `system` column in front.
    fn sharegpt_conversation(&self, row: &Row) -> Result<Vec<Message>, DataError> {
        let field = Self::sharegpt_field(row);
        let mut messages = self.messages(row, field, false)?;
        if let Some(system) = self.optional_string(row, "system")?
            && messages.first().is_none_or(|m| m.role != "system")
        {
            messages.insert(
                0,
                Message {
                    role: "system".into(),
                    content: system,
                },
            );
        }
        Ok(messages)
    }

    /// An Alpaca row's prompt: the system message, the history's turns, then the instruction
    /// with the input below it (LLaMA-Factory joins them with a newline).
    fn alpaca_prompt(&self, row: &Row) -> Result<Vec<Message>, DataError> {
        let mut messages = Vec::new();
        if let Some(system) = self.optional_string(row, "system")?
            && !system.is_empty()
        {
            messages.push(Message {
                role: "system".into(),
                content: system,
            });
        }
        match row.fields.get("history") {
            None | Some(Value::Null) => {}
            Some(Value::Array(turns)) => {
                for (i, turn) in turns.iter().enumerate() {
                    let pair = turn
                        .as_array()
                        .filter(|p| p.len() == 2)
                        .and_then(|p| Some((p[0].as_str()?.to_owned(), p[1].as_str()?.to_owned())));
                    let Some((question, answer)) = pair else {
                        return Err(self.field_error(
                            row,
                            &format!("history[{i}]"),
                            "expected [instruction, answer], two strings",
                        ));
                    };
                    messages.push(Message {
                        role: "user".into(),
                        content: question,
                    });
                    messages.push(Message {
                        role: "assistant".into(),
                        content: answer,
                    });
                }
            }
            Some(other) => {
                return Err(self.field_error(
                    row,
                    "history",
                    format!("expected a list of pairs, found {}", json_type(other)),
                ));
            }
        }
        let instruction = self.string(row, "instruction")?;
        let input = self.optional_string(row, "input")?.unwrap_or_default();
        let content = if input.is_empty() {
            instruction
        } else {
            format!("{instruction}\n{input}")
        };
        messages.push(Message {
            role: "user".into(),
            content,
        });
        Ok(messages)
    }

    fn assistant(&self, row: &Row, field: &str) -> Result<Vec<Message>, DataError> {
        let answer = vec![Message {
            role: "assistant".into(),
            content: self.string(row, field)?,
        }];
        self.check_answer(row, field, &answer)?;
        Ok(answer)
    }

    /// KTO's desirability: a boolean `label` (TRL) or `kto_tag` (LLaMA-Factory).
    fn label(&self, row: &Row) -> Result<bool, DataError> {
        let field = if row.fields.contains_key("label") || !row.fields.contains_key("kto_tag") {
            "label"
        } else {
            "kto_tag"
        };
        match row.fields.get(field) {
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(self.field_error(
                row,
                field,
                format!("expected true or false, found {}", json_type(other)),
            )),
            None => Err(self.field_error(row, field, "missing (or `kto_tag`)")),
        }
    }

    fn no_format(&self, row: &Row, kind: &str, expected: &str) -> DataError {
        let mut found: Vec<&str> = row.fields.keys().map(String::as_str).collect();
        found.truncate(12);
        self.row_error(
            row,
            format!(
                "no {kind} format matches this row (fields: {}); expected {expected}",
                if found.is_empty() {
                    "none".to_owned()
                } else {
                    found.join(", ")
                }
            ),
        )
    }

    /// Supervised examples, one per row.
    pub fn sft_examples(&self, text_field: &str) -> Result<Vec<SftExample>, DataError> {
        self.rows
            .iter()
            .map(|row| {
                self.refuse_unsupported(row)?;
                let conversation = match self.layout(row) {
                    Layout::ShareGpt => self.sharegpt_conversation(row)?,
                    Layout::Alpaca => {
                        let mut messages = self.alpaca_prompt(row)?;
                        messages.extend(self.assistant(row, "output")?);
                        messages
                    }
                    Layout::Trl => {
                        let f = &row.fields;
                        if f.contains_key("messages") {
                            self.messages(row, "messages", false)?
                        } else if f.contains_key("prompt") && f.contains_key("completion") {
                            let prompt = self.turns(row, "prompt")?;
                            let completion = self.turns(row, "completion")?;
                            self.check_pair_kinds(row, &prompt, &[("completion", &completion)])?;
                            return Ok(SftExample::PromptCompletion { prompt, completion });
                        } else if f.contains_key(text_field) {
                            return Ok(SftExample::Text(self.string(row, text_field)?));
                        } else {
                            return Err(self.no_format(
                                row,
                                "supervised",
                                &format!(
                                    "`messages`, `prompt`+`completion`, `{text_field}`, ShareGPT `conversations`, or Alpaca `instruction`+`output`"
                                ),
                            ));
                        }
                    }
                };
                let field = match self.layout(row) {
                    Layout::ShareGpt => Self::sharegpt_field(row),
                    Layout::Alpaca => "output",
                    Layout::Trl => "messages",
                };
                if !conversation.iter().any(|m| m.role == "assistant") {
                    return Err(self.field_error(row, field, "the conversation has no assistant turn"));
                }
                Ok(SftExample::Conversation(conversation))
            })
            .collect()
    }

    /// A prompt and its answers are all strings or all conversations; a conversational prompt
    /// ends with a user turn and each answer starts with an assistant turn.
    fn check_pair_kinds(
        &self,
        row: &Row,
        prompt: &Turns,
        answers: &[(&str, &Turns)],
    ) -> Result<(), DataError> {
        for (field, answer) in answers {
            if answer.is_chat() != prompt.is_chat() {
                return Err(self.field_error(
                    row,
                    field,
                    format!(
                        "is {} but the prompt is {}; both must be strings or both conversations",
                        if answer.is_chat() {
                            "a conversation"
                        } else {
                            "a string"
                        },
                        if prompt.is_chat() {
                            "a conversation"
                        } else {
                            "a string"
                        },
                    ),
                ));
            }
            if let Turns::Chat(messages) = answer {
                self.check_answer(row, field, messages)?;
            }
        }
        if let Turns::Chat(messages) = prompt {
            self.check_prompt(row, "prompt", messages)?;
        }
        Ok(())
    }

    /// Preference pairs, one per row.
    pub fn preference_pairs(&self) -> Result<Vec<PreferencePair>, DataError> {
        self.rows
            .iter()
            .map(|row| {
                self.refuse_unsupported(row)?;
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
                let (prompt, chosen, rejected) = self.pair(row)?;
                Ok(PreferencePair {
                    prompt,
                    chosen,
                    rejected,
                    margin,
                })
            })
            .collect()
    }

    fn pair(&self, row: &Row) -> Result<(Turns, Turns, Turns), DataError> {
        let f = &row.fields;
        if !(f.contains_key("chosen") && f.contains_key("rejected")) {
            return Err(self.no_format(
                row,
                "preference",
                "`chosen` and `rejected` (with `prompt`, or whole conversations), ShareGPT `conversations`+`chosen`+`rejected`, or Alpaca `instruction`+`chosen`+`rejected`",
            ));
        }
        match self.layout(row) {
            Layout::ShareGpt => {
                let field = Self::sharegpt_field(row);
                let prompt = self.sharegpt_conversation(row)?;
                self.check_prompt(row, field, &prompt)?;
                let chosen = self.messages(row, "chosen", true)?;
                let rejected = self.messages(row, "rejected", true)?;
                self.check_answer(row, "chosen", &chosen)?;
                self.check_answer(row, "rejected", &rejected)?;
                Ok((
                    Turns::Chat(prompt),
                    Turns::Chat(chosen),
                    Turns::Chat(rejected),
                ))
            }
            Layout::Alpaca => {
                let prompt = self.alpaca_prompt(row)?;
                Ok((
                    Turns::Chat(prompt),
                    Turns::Chat(self.assistant(row, "chosen")?),
                    Turns::Chat(self.assistant(row, "rejected")?),
                ))
            }
            Layout::Trl => {
                let chosen = self.turns(row, "chosen")?;
                let rejected = self.turns(row, "rejected")?;
                // TRL's `maybe_extract_prompt`: an explicit prompt of the answers' kind is used
                // as is; otherwise (no prompt, or a string prompt beside conversations) the
                // prompt is the answers' longest common prefix.
                let explicit = f.contains_key("prompt")
                    && Self::is_list(row, "prompt") == Self::is_list(row, "chosen");
                if f.contains_key("prompt") && Self::is_list(row, "prompt") && !chosen.is_chat() {
                    return Err(self.field_error(
                        row,
                        "chosen",
                        "is a string but the prompt is a conversation; both must be strings or both conversations",
                    ));
                }
                let prompt = if explicit {
                    self.turns(row, "prompt")?
                } else {
                    let (prompt, c, r) = self.extract_prompt(row, chosen, rejected)?;
                    return self
                        .check_pair_kinds(row, &prompt, &[("chosen", &c), ("rejected", &r)])
                        .map(|()| (prompt, c, r));
                };
                self.check_pair_kinds(
                    row,
                    &prompt,
                    &[("chosen", &chosen), ("rejected", &rejected)],
                )?;
                Ok((prompt, chosen, rejected))
            }
        }
    }

    /// TRL's `extract_prompt`: the longest common prefix of `chosen` and `rejected` (messages of
    /// conversations, characters of strings, where a space just before the divergence goes to
    /// the answers) is the prompt.
    fn extract_prompt(
        &self,
        row: &Row,
        chosen: Turns,
        rejected: Turns,
    ) -> Result<(Turns, Turns, Turns), DataError> {
        /// The index TRL's loop ends on: the first difference (less one when a space precedes
        /// it), else the last index compared.
        fn split<T: PartialEq>(a: &[T], b: &[T], is_space: impl Fn(&T) -> bool) -> Option<usize> {
            let n = a.len().min(b.len());
            if n == 0 {
                return None;
            }
            let mut idx = n - 1;
            for i in 0..n {
                if a[i] != b[i] {
                    idx = if i > 0 && is_space(&a[i - 1]) {
                        i - 1
                    } else {
                        i
                    };
                    break;
                }
            }
            Some(idx)
        }
        match (chosen, rejected) {
            (Turns::Chat(c), Turns::Chat(r)) => {
                let idx = split(&c, &r, |_| false)
                    .ok_or_else(|| self.field_error(row, "chosen", "empty conversation"))?;
                Ok((
                    Turns::Chat(c[..idx].to_vec()),
                    Turns::Chat(c[idx..].to_vec()),
                    Turns::Chat(r[idx..].to_vec()),
                ))
            }
            (Turns::Text(c), Turns::Text(r)) => {
                let cc: Vec<char> = c.chars().collect();
                let rc: Vec<char> = r.chars().collect();
                let idx = split(&cc, &rc, |ch| *ch == ' ')
                    .filter(|&i| i > 0)
                    .ok_or_else(|| {
                        self.no_format(
                            row,
                            "preference",
                            "a `prompt`, or non-empty `chosen` and `rejected` sharing it",
                        )
                    })?;
                let text = |chars: &[char]| chars.iter().collect::<String>();
                Ok((
                    Turns::Text(text(&cc[..idx])),
                    Turns::Text(text(&cc[idx..])),
                    Turns::Text(text(&rc[idx.min(rc.len())..])),
                ))
            }
            _ => Err(self.field_error(
                row,
                "rejected",
                "`chosen` and `rejected` must both be strings or both conversations",
            )),
        }
    }

    /// KTO's unpaired examples; paired rows become every chosen completion (desirable) followed
    /// by every rejected one, as TRL unpairs them.
    pub fn unpaired_examples(&self) -> Result<Vec<UnpairedExample>, DataError> {
        let first = &self.rows[0].fields;
        if first.contains_key("chosen") && first.contains_key("rejected") {
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
                self.refuse_unsupported(row)?;
                let (prompt, completion) = match self.layout(row) {
                    Layout::ShareGpt => {
                        let field = Self::sharegpt_field(row);
                        let mut prompt = self.sharegpt_conversation(row)?;
                        if prompt.last().is_none_or(|m| m.role != "assistant") {
                            return Err(self.field_error(
                                row,
                                field,
                                "an unpaired conversation must end with the assistant turn that is labelled",
                            ));
                        }
                        let answer = prompt.split_off(prompt.len() - 1);
                        self.check_answer(row, field, &answer)?;
                        self.check_prompt(row, field, &prompt)?;
                        (Turns::Chat(prompt), Turns::Chat(answer))
                    }
                    Layout::Alpaca => (
                        Turns::Chat(self.alpaca_prompt(row)?),
                        Turns::Chat(self.assistant(row, "output")?),
                    ),
                    Layout::Trl => {
                        if !(row.fields.contains_key("prompt")
                            && row.fields.contains_key("completion"))
                        {
                            return Err(self.no_format(
                                row,
                                "unpaired preference",
                                "`prompt`+`completion`+`label`, paired `chosen`+`rejected`, ShareGPT `messages`+`label`/`kto_tag`, or Alpaca `instruction`+`output`+`kto_tag`",
                            ));
                        }
                        let prompt = self.turns(row, "prompt")?;
                        let completion = self.turns(row, "completion")?;
                        self.check_pair_kinds(row, &prompt, &[("completion", &completion)])?;
                        (prompt, completion)
                    }
                };
                Ok(UnpairedExample {
                    prompt,
                    completion,
                    desirable: self.label(row)?,
                })
            })
            .collect()
    }

    /// Prompts, for generation: a `prompt` (string or conversation ending with a user turn);
    /// a conversation (TRL `messages`, ShareGPT) without its final assistant turn; an Alpaca
    /// row's instruction.
    pub fn prompts(&self) -> Result<Vec<Turns>, DataError> {
        self.rows
            .iter()
            .map(|row| {
                self.refuse_unsupported(row)?;
                let layout = self.layout(row);
                let (field, mut messages) = match layout {
                    Layout::Alpaca => return Ok(Turns::Chat(self.alpaca_prompt(row)?)),
                    Layout::Trl if row.fields.contains_key("prompt") => {
                        let prompt = self.turns(row, "prompt")?;
                        if let Turns::Chat(messages) = &prompt {
                            self.check_prompt(row, "prompt", messages)?;
                        }
                        return Ok(prompt);
                    }
                    Layout::Trl if row.fields.contains_key("messages") => {
                        ("messages", self.messages(row, "messages", false)?)
                    }
                    Layout::Trl => {
                        return Err(self.no_format(
                            row,
                            "prompt",
                            "`prompt` (a string or a conversation), `messages`, ShareGPT `conversations`, or Alpaca `instruction`",
                        ));
                    }
                    Layout::ShareGpt => {
                        (Self::sharegpt_field(row), self.sharegpt_conversation(row)?)
                    }
                };
                if messages.len() > 1 && messages.last().is_some_and(|m| m.role == "assistant") {
                    messages.pop();
                }
                self.check_prompt(row, field, &messages)?;
                Ok(Turns::Chat(messages))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;
    use crate::data::{Format, read_rows};

    fn rows(jsonl: &str) -> (tempfile::TempDir, Rows) {
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().join("d.jsonl");
        std::fs::write(&path, jsonl).unwrap();
        let rows = read_rows(&path, Format::Jsonl, &BTreeMap::new()).unwrap();
        (dir, rows)
    }

    fn m(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    fn chat(messages: &[(&str, &str)]) -> Turns {
        Turns::Chat(messages.iter().map(|(r, c)| m(r, c)).collect())
    }

    #[test]
    fn trl_conversational_pairs_with_explicit_and_implicit_prompts() {
        let (_d, r) = rows(concat!(
            r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"}], "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "Green."}]}"#,
            "\n",
            r#"{"chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}], "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}]}"#,
            "\n",
            // A string prompt beside conversations is ignored, as TRL's maybe_extract_prompt does.
            r#"{"prompt": "Sky?", "chosen": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}], "rejected": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Green."}]}"#,
            "\n",
        ));
        let pairs = r.preference_pairs().unwrap();
        assert_eq!(
            pairs[0].prompt,
            chat(&[("system", "Be brief."), ("user", "Sky?")])
        );
        assert_eq!(pairs[0].chosen, chat(&[("assistant", "Blue.")]));
        for pair in &pairs[1..] {
            assert_eq!(pair.prompt, chat(&[("user", "Sky?")]));
            assert_eq!(pair.chosen, chat(&[("assistant", "Blue.")]));
            assert_eq!(pair.rejected, chat(&[("assistant", "Green.")]));
        }
    }

    #[test]
    fn implicit_string_prompts_split_before_the_space() {
        let (_d, r) = rows(concat!(
            r#"{"chosen": "The sky is blue.", "rejected": "The sky is green."}"#,
            "\n"
        ));
        let pair = &r.preference_pairs().unwrap()[0];
        assert_eq!(pair.prompt, "The sky is");
        assert_eq!(pair.chosen, " blue.");
        assert_eq!(pair.rejected, " green.");
    }

    #[test]
    fn sharegpt_and_alpaca_preference_layouts() {
        // LLaMA-Factory's dpo_en_demo: from/value, answers as one message, a system column.
        let (_d, r) = rows(concat!(
            r#"{"conversations": [{"from": "human", "value": "Hi?"}], "chosen": {"from": "gpt", "value": "Hello."}, "rejected": {"from": "gpt", "value": "Go away."}, "system": "Be kind."}"#,
            "\n",
            r#"{"messages": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}], "rejected": [{"role": "assistant", "content": "Go away."}]}"#,
            "\n",
            r#"{"instruction": "Greet", "input": "Bob", "chosen": "Hello Bob.", "rejected": "No."}"#,
            "\n",
        ));
        let pairs = r.preference_pairs().unwrap();
        assert_eq!(
            pairs[0].prompt,
            chat(&[("system", "Be kind."), ("user", "Hi?")])
        );
        assert_eq!(pairs[0].chosen, chat(&[("assistant", "Hello.")]));
        assert_eq!(pairs[1].rejected, chat(&[("assistant", "Go away.")]));
        assert_eq!(pairs[2].prompt, chat(&[("user", "Greet\nBob")]));
        assert_eq!(pairs[2].chosen, chat(&[("assistant", "Hello Bob.")]));
    }

    #[test]
    fn kto_layouts_and_labels() {
        let (_d, r) = rows(concat!(
            r#"{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}], "label": true}"#,
            "\n",
            r#"{"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "No."}], "kto_tag": false}"#,
            "\n",
            r#"{"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Hey."}], "label": true}"#,
            "\n",
        ));
        let examples = r.unpaired_examples().unwrap();
        assert_eq!(examples[0].prompt, chat(&[("user", "Hi?")]));
        assert_eq!(examples[0].completion, chat(&[("assistant", "Hello.")]));
        assert!(examples[0].desirable && !examples[1].desirable && examples[2].desirable);
        assert_eq!(examples[1].completion, chat(&[("assistant", "No.")]));
    }

    #[test]
    fn sft_layouts() {
        let (_d, r) = rows(concat!(
            r#"{"instruction": "Add", "input": "1 and 2", "output": "3", "system": "Math.", "history": [["Hi", "Hello"]]}"#,
            "\n",
            r#"{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "system": "S"}"#,
            "\n",
            r#"{"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]}"#,
            "\n",
        ));
        let examples = r.sft_examples("text").unwrap();
        assert_eq!(
            examples[0],
            SftExample::Conversation(vec![
                m("system", "Math."),
                m("user", "Hi"),
                m("assistant", "Hello"),
                m("user", "Add\n1 and 2"),
                m("assistant", "3"),
            ])
        );
        assert_eq!(
            examples[1],
            SftExample::Conversation(vec![
                m("system", "S"),
                m("user", "Hi"),
                m("assistant", "Hello")
            ])
        );
        assert_eq!(
            examples[2],
            SftExample::PromptCompletion {
                prompt: chat(&[("user", "Hi")]),
                completion: chat(&[("assistant", "Hello")]),
            }
        );
    }

    #[test]
    fn a_named_layout_wins_over_detection() {
        let (_d, r) = rows(concat!(
            r#"{"instruction": "Add", "input": "", "output": "3", "text": "Add: 3"}"#,
            "\n"
        ));
        let r = r.with_layout(Some(Layout::Trl));
        assert_eq!(
            r.sft_examples("text").unwrap()[0],
            SftExample::Text("Add: 3".into())
        );
    }

    #[test]
    fn prompts_from_each_layout() {
        let (_d, r) = rows(concat!(
            r#"{"prompt": "Plain"}"#,
            "\n",
            r#"{"prompt": [{"role": "user", "content": "Chat"}]}"#,
            "\n",
            r#"{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}"#,
            "\n",
            r#"{"instruction": "Do", "input": "it"}"#,
            "\n",
        ));
        let prompts = r.prompts().unwrap();
        assert_eq!(prompts[0], "Plain");
        assert_eq!(prompts[1], chat(&[("user", "Chat")]));
        assert_eq!(prompts[2], chat(&[("user", "Q")]));
        assert_eq!(prompts[3], chat(&[("user", "Do\nit")]));
    }

    fn pair_error(line: &str) -> String {
        let (_d, r) = rows(&format!("{line}\n"));
        r.preference_pairs().unwrap_err().to_string()
    }

    #[test]
    fn conversational_errors_are_located() {
        let cases = [
            (
                r#"{"prompt": [{"role": "wizard", "content": "x"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
                "row 1: field `prompt[0]`: unknown role `wizard`",
            ),
            (
                r#"{"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
                "field `prompt[0]`: missing `content`",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": " "}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
                "field `chosen`: empty answer",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
                "field `prompt`: the prompt ends with a `assistant` turn; it must end with a user turn",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": [{"type": "image"}]}], "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
                "multimodal",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "", "tool_calls": [{}]}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
                "field `chosen[0]`: tool calls are not supported",
            ),
            (
                r#"{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}}"#,
                "role `function_call`: tool calling is not supported",
            ),
            (
                r#"{"prompt": "q", "chosen": "a", "rejected": "b", "tools": "[{\"name\": \"f\"}]"}"#,
                "field `tools`: tool calling is not supported",
            ),
            (
                r#"{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}"#,
                "field `chosen`: is a string but the prompt is a conversation",
            ),
            (
                r#"{"question": "q", "answer": "a"}"#,
                "row 1: no preference format matches this row (fields: question, answer); expected `chosen` and `rejected`",
            ),
        ];
        for (line, expected) in cases {
            let err = pair_error(line);
            assert!(err.contains(expected), "{err}\n  expected: {expected}");
            assert!(err.contains("d.jsonl"), "{err}");
        }
    }

    #[test]
    fn no_format_errors_name_the_expected_fields_per_kind() {
        let (_d, r) = rows("{\"question\": \"q\"}\n");
        let sft = r.sft_examples("text").unwrap_err().to_string();
        assert!(
            sft.contains("expected `messages`, `prompt`+`completion`, `text`"),
            "{sft}"
        );
        let kto = r.unpaired_examples().unwrap_err().to_string();
        assert!(kto.contains("`prompt`+`completion`+`label`"), "{kto}");
        let prompts = r.prompts().unwrap_err().to_string();
        assert!(prompts.contains("expected `prompt`"), "{prompts}");
    }
}
