//! Tokenizers as rudder uses them: a `tokenizer.json` (the `tokenizers` crate) plus
//! `tokenizer_config.json` (special tokens and the Jinja chat template). Owns the encoding
//! conventions shared by every stage (DESIGN section 7): a prompt is encoded with the tokenizer's
//! special tokens (BOS through the post-processor), a completion without them and then EOS, and
//! the TRL split of `prompt + completion` into prompt and completion tokens.

use std::path::{Path, PathBuf};

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde::Serialize;
use serde_json::Value;

use crate::error::StageError;

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// A tokenizer with its special tokens and chat template.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub chat_template: Option<String>,
    /// tokenizer_config.json as read, written back unchanged by [`Tokenizer::save`].
    config: Option<Value>,
}

/// A prompt/completion pair split into tokens the way TRL splits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSplit {
    pub prompt_ids: Vec<u32>,
    pub completion_ids: Vec<u32>,
    /// Whether the prompt's tokens were a prefix of the whole text's tokens. When false, BPE
    /// merged across the boundary and the split is TRL's approximation (it warns and continues).
    pub prefix_matched: bool,
}

/// A character range `[start, end)` of a text.
pub type Span = (usize, usize);

/// One chat message for the chat template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Reads a tokenizer.json. The `tokenizers` crate panics on some malformed files (its decoder
/// deserializer unwraps syntax errors), so the JSON is checked here first, and a panic that
/// still escapes is turned into an error naming the file.
fn parse_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer, StageError> {
    let fail = |message: String| StageError::Tokenizer {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| StageError::io(path, e))?;
    serde_json::from_str::<serde::de::IgnoredAny>(&text)
        .map_err(|e| fail(format!("invalid JSON: {e}")))?;
    let tokenizer = match std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>()) {
        Ok(Ok(tokenizer)) => tokenizer,
        Ok(Err(e)) => return Err(fail(e.to_string())),
        Err(_) => return Err(fail("the tokenizers library could not read it".into())),
    };
    // Its tables are not checked against each other when read; encoding once finds a
    // tokenizer that would fail on every example, before any stage starts.
    let probe = std::panic::AssertUnwindSafe(&tokenizer);
    match std::panic::catch_unwind(|| probe.encode("a b", true)) {
        Ok(_) => Ok(tokenizer),
        Err(_) => Err(fail(INCONSISTENT.into())),
    }
}

const INCONSISTENT: &str = "the tokenizers library failed on it: its parts do not agree (a post-processor naming a special token the file does not define?)";

/// A special token in tokenizer_config.json is either a string or an AddedToken object.
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `DIR/tokenizer.json` and, if present, `DIR/tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, StageError> {
        let config = dir.join(TOKENIZER_CONFIG_FILE);
        Self::from_files(
            &dir.join(TOKENIZER_FILE),
            config.is_file().then_some(config.as_path()),
        )
    }

    /// Loads a tokenizer.json and an optional tokenizer_config.json.
    pub fn from_files(tokenizer_json: &Path, config: Option<&Path>) -> Result<Self, StageError> {
        if !tokenizer_json.is_file() {
            return Err(StageError::Tokenizer {
                path: tokenizer_json.to_path_buf(),
                message: "file not found".into(),
            });
        }
        let inner = parse_tokenizer_json(tokenizer_json)?;
        let mut tok = Self {
            inner,
            path: tokenizer_json.to_path_buf(),
            bos_token: None,
            eos_token: None,
            pad_token: None,
            chat_template: None,
            config: None,
        };
        if let Some(path) = config {
            let text = std::fs::read_to_string(path).map_err(|e| StageError::io(path, e))?;
            let value: Value = serde_json::from_str(&text).map_err(|source| StageError::Json {
                path: path.to_path_buf(),
                source,
            })?;
            tok.bos_token = special_token(&value, "bos_token");
            tok.eos_token = special_token(&value, "eos_token");
            tok.pad_token = special_token(&value, "pad_token");
            tok.chat_template = match value.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: use the default one.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            };
            for (name, token) in [
                ("bos_token", &tok.bos_token),
                ("eos_token", &tok.eos_token),
                ("pad_token", &tok.pad_token),
            ] {
                if let Some(t) = token
                    && tok.inner.token_to_id(t).is_none()
                {
                    return Err(StageError::Tokenizer {
                        path: path.to_path_buf(),
                        message: format!("{name} `{t}` is not in the vocabulary"),
                    });
                }
            }
            tok.config = Some(value);
        }
        // transformers 5 also reads the chat template from a separate file.
        if tok.chat_template.is_none()
            && let Some(dir) = tokenizer_json.parent()
        {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                tok.chat_template =
                    Some(std::fs::read_to_string(&jinja).map_err(|e| StageError::io(&jinja, e))?);
            }
        }
        Ok(tok)
    }

    /// An error about this tokenizer, naming its file.
    pub(crate) fn tokenizer_error(&self, message: impl ToString) -> StageError {
        self.err(message)
    }

    fn err(&self, message: impl ToString) -> StageError {
        StageError::Tokenizer {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    /// Id of a token string.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    /// The pad id; falls back to EOS, as TRL does when a tokenizer has no pad token.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_token
            .as_deref()
            .and_then(|t| self.token_id(t))
            .or_else(|| self.eos_id())
    }

    /// Number of ids, including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text, optionally with the post-processor's special tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, StageError> {
        // The tokenizers crate indexes its own tables without checking them (a post-processor
        // template naming a special token it does not define panics): see `parse_tokenizer_json`.
        std::panic::catch_unwind(|| self.inner.encode(text, add_special_tokens))
            .map_err(|_| self.err(INCONSISTENT))?
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| self.err(e))
    }

    /// Encodes text and returns each token's character span in it, as the Python tokenizers
    /// report `offsets`.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<Span>), StageError> {
        std::panic::catch_unwind(|| self.inner.encode_char_offsets(text, add_special_tokens))
            .map_err(|_| self.err(INCONSISTENT))?
            .map(|e| (e.get_ids().to_vec(), e.get_offsets().to_vec()))
            .map_err(|e| self.err(e))
    }

    /// A prompt: encoded with special tokens (BOS for Llama-style tokenizers).
    pub fn encode_prompt(&self, prompt: &str) -> Result<Vec<u32>, StageError> {
        self.encode(prompt, true)
    }

    /// A completion: encoded without special tokens, then EOS.
    pub fn encode_completion(&self, completion: &str) -> Result<Vec<u32>, StageError> {
        let eos = self
            .eos_id()
            .ok_or_else(|| self.err("no eos_token in tokenizer_config.json"))?;
        let mut ids = self.encode(completion, false)?;
        ids.push(eos);
        Ok(ids)
    }

    /// Splits `prompt + completion` as TRL's DPO trainer does: append the EOS text to the
    /// completion, encode the prompt and the whole text with special tokens, and take the
    /// completion as the whole text's tokens after the prompt's length.
    pub fn split_prompt_completion(
        &self,
        prompt: &str,
        completion: &str,
    ) -> Result<TokenSplit, StageError> {
        let eos = self
            .eos_token
            .as_deref()
            .ok_or_else(|| self.err("no eos_token in tokenizer_config.json"))?;
        let prompt_ids = self.encode(prompt, true)?;
        let full = self.encode(&format!("{prompt}{completion}{eos}"), true)?;
        let prefix_matched = full.starts_with(&prompt_ids);
        let completion_ids = full.get(prompt_ids.len()..).unwrap_or_default().to_vec();
        Ok(TokenSplit {
            prompt_ids,
            completion_ids,
            prefix_matched,
        })
    }

    /// Writes tokenizer.json and tokenizer_config.json into `dir` (a model directory).
    pub fn save(&self, dir: &Path) -> Result<(), StageError> {
        std::fs::create_dir_all(dir).map_err(|e| StageError::io(dir, e))?;
        let path = dir.join(TOKENIZER_FILE);
        self.inner
            .save(&path, false)
            .map_err(|e| StageError::Tokenizer {
                path: path.clone(),
                message: e.to_string(),
            })?;
        let config = match &self.config {
            Some(c) => c.clone(),
            None => {
                let mut obj = serde_json::Map::new();
                for (key, token) in [
                    ("bos_token", &self.bos_token),
                    ("eos_token", &self.eos_token),
                    ("pad_token", &self.pad_token),
                ] {
                    if let Some(t) = token {
                        obj.insert(key.into(), Value::String(t.clone()));
                    }
                }
                if let Some(t) = &self.chat_template {
                    obj.insert("chat_template".into(), Value::String(t.clone()));
                }
                Value::Object(obj)
            }
        };
        let path = dir.join(TOKENIZER_CONFIG_FILE);
        let text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
        std::fs::write(&path, text + "\n").map_err(|e| StageError::io(&path, e))
    }

    /// Decodes ids to text.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, StageError> {
        std::panic::catch_unwind(|| self.inner.decode(ids, skip_special_tokens))
            .map_err(|_| self.err(INCONSISTENT))?
            .map_err(|e| self.err(e))
    }

    /// Renders `messages` with the tokenizer's chat template, as transformers'
    /// `apply_chat_template(..., tokenize=False)` does.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, StageError> {
        let (text, _) = self.apply_chat_template_with_spans(messages, add_generation_prompt)?;
        Ok(text)
    }

    /// The error for conversational data given to a model without a chat template.
    pub fn require_chat_template(&self) -> Result<&str, StageError> {
        self.chat_template.as_deref().ok_or_else(|| {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            StageError::ChatTemplate(format!(
                "the data is conversational but the model in {} has no chat template (no `chat_template` in tokenizer_config.json, no chat_template.jinja)",
                dir.display()
            ))
        })
    }

    /// Whether the chat template marks assistant output with `{% generation %}` blocks.
    pub fn has_generation_markers(&self) -> bool {
        self.chat_template
            .as_deref()
            .is_some_and(|t| GENERATION_TAG.is_match(t))
    }

    /// Renders `messages` like [`Tokenizer::apply_chat_template`] and returns, with the text,
    /// the character spans `{% generation %}` blocks rendered (transformers'
    /// `generation_indices`); empty when the template has none.
    pub fn apply_chat_template_with_spans(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<Span>), StageError> {
        let template = self.require_chat_template()?;
        render_chat_template_with_spans(
            template,
            messages,
            add_generation_prompt,
            self.bos_token.as_deref().unwrap_or(""),
            self.eos_token.as_deref().unwrap_or(""),
        )
        .map_err(|e| match e {
            // Say whose template failed: the tokenizer's directory holds it.
            StageError::ChatTemplate(message) => StageError::ChatTemplate(format!(
                "the chat template of {}: {message}",
                self.path.display()
            )),
            other => other,
        })
    }
}

/// The instructions a chat template may run for one conversation (minijinja fuel, which also
/// charges about 64 bytes per unit of memory the template allocates): far above what real
/// templates use on long conversations, far below a template that never ends.
const CHAT_TEMPLATE_FUEL: u64 = 2_000_000;

/// How deep macros and recursive loops may nest in a chat template.
const CHAT_TEMPLATE_RECURSION: usize = 100;

/// The largest chat template accepted. Real ones are a few kilobytes (tool-calling templates
/// reach tens); the limit keeps the depth of an expression bounded, see [`RENDER_STACK`].
const CHAT_TEMPLATE_MAX_BYTES: usize = 128 << 10;

/// minijinja parses and evaluates chains of operators (`not not ... x`, `a + b + ...`) by
/// recursion that its recursion limit does not count, about 450 bytes of stack per level: a
/// template of the largest size needs about 60 MiB, so templates render on a thread of their
/// own with this much stack (reserved, not used, for ordinary templates).
const RENDER_STACK: usize = 256 << 20;

/// A `{% generation %}` or `{% endgeneration %}` tag, with its whitespace-control dashes.
static GENERATION_TAG: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
    regex::Regex::new(r"\{%(-?)\s*(end)?generation\s*(-?)%\}").expect("a valid pattern")
});

/// Characters marking the start and end of a generation block in the rendered text (private
/// use code points, which no message may contain).
const GENERATION_START: char = '\u{F8F0}';
const GENERATION_END: char = '\u{F8F1}';

/// Replaces transformers' `{% generation %}` extension (which minijinja lacks) by marker
/// characters. Each tag becomes an empty `if` block on either side of the marker, so that the
/// tag's dashes and `trim_blocks`/`lstrip_blocks` trim exactly what they trim around the tag.
fn mark_generation_blocks(template: &str) -> String {
    GENERATION_TAG
        .replace_all(template, |c: &regex::Captures<'_>| {
            let marker = if c.get(2).is_some() {
                GENERATION_END
            } else {
                GENERATION_START
            };
            format!(
                "{{%{} if true %}}{{% endif %}}{{{{ '{marker}' }}}}{{% if true %}}{{% endif {}%}}",
                &c[1], &c[3]
            )
        })
        .into_owned()
}

/// Renders a Hugging Face chat template with the variables transformers provides. A template
/// that is too large, runs too long, allocates too much or recurses too deep is an error.
pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, StageError> {
    render_chat_template_with_spans(
        template,
        messages,
        add_generation_prompt,
        bos_token,
        eos_token,
    )
    .map(|(text, _)| text)
}

/// [`render_chat_template`], also returning the character spans of the `{% generation %}`
/// blocks.
pub fn render_chat_template_with_spans(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<(String, Vec<Span>), StageError> {
    if !GENERATION_TAG.is_match(template) {
        return render_raw(
            template,
            messages,
            add_generation_prompt,
            bos_token,
            eos_token,
        )
        .map(|text| (text, Vec::new()));
    }
    if messages
        .iter()
        .any(|m| m.content.contains([GENERATION_START, GENERATION_END]))
    {
        return Err(StageError::ChatTemplate(
            "a message contains the private-use characters U+F8F0/U+F8F1".into(),
        ));
    }
    let marked = mark_generation_blocks(template);
    let rendered = render_raw(
        &marked,
        messages,
        add_generation_prompt,
        bos_token,
        eos_token,
    )?;
    let mut text = String::with_capacity(rendered.len());
    let mut spans = Vec::new();
    let (mut chars, mut start) = (0usize, None);
    for c in rendered.chars() {
        match c {
            GENERATION_START => start = Some(chars),
            GENERATION_END => {
                if let Some(s) = start.take() {
                    spans.push((s, chars));
                }
            }
            c => {
                text.push(c);
                chars += 1;
            }
        }
    }
    Ok((text, spans))
}

fn render_raw(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, StageError> {
    if template.len() > CHAT_TEMPLATE_MAX_BYTES {
        return Err(StageError::ChatTemplate(format!(
            "the template is {} bytes; at most {CHAT_TEMPLATE_MAX_BYTES} are supported",
            template.len()
        )));
    }
    std::thread::scope(|scope| {
        let rendering = std::thread::Builder::new()
            .name("chat-template".into())
            .stack_size(RENDER_STACK)
            .spawn_scoped(scope, || {
                render_with_limits(
                    template,
                    messages,
                    add_generation_prompt,
                    bos_token,
                    eos_token,
                )
            })
            .map_err(|e| {
                StageError::ChatTemplate(format!("cannot start the template renderer: {e}"))
            })?;
        // minijinja's lexer counts columns in 16 bits and overflows (a panic in debug builds) on
        // a line of more than 65,535 characters: a panic in there is this template's error.
        rendering.join().unwrap_or_else(|_| {
            Err(StageError::ChatTemplate(
                "the template engine failed on this template (is a line longer than 65,535 characters?)"
                    .into(),
            ))
        })
    })
}

fn render_with_limits(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, StageError> {
    let mut env = Environment::new();
    env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
    env.set_recursion_limit(CHAT_TEMPLATE_RECURSION);
    // transformers compiles templates with trim_blocks and lstrip_blocks.
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("the default delimiters are valid"),
    );
    // Templates call Python string methods (`.strip()`, `.startswith()`...).
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, message))
        },
    );
    let render_err = |e: JinjaError| {
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        StageError::ChatTemplate(message)
    };
    env.add_template("chat", template).map_err(render_err)?;
    let tmpl = env.get_template("chat").map_err(render_err)?;
    tmpl.render(context! {
        messages => minijinja::Value::from(minijinja::value::Serde(messages)),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(render_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'].strip() + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    #[test]
    fn chatml_with_python_methods() {
        let out = render_chat_template(CHATML, &[msg("user", " hi ")], true, "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_is_an_error() {
        let t = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok";
        let err = render_chat_template(t, &[msg("assistant", "x")], false, "", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("first must be user"), "{err}");
        assert_eq!(
            render_chat_template(t, &[msg("user", "x")], false, "", "").unwrap(),
            "ok"
        );
    }

    #[test]
    fn runaway_templates_are_errors() {
        for t in [
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "{% macro m(d) %}{{ m(d + 1) }}{% endmacro %}{{ m(0) }}",
            "{% set s = 'x' * 99999999 %}{% for i in range(1000) %}{{ s }}{% endfor %}",
            &format!("{{{{ {}x }}}}", "-".repeat(CHAT_TEMPLATE_MAX_BYTES + 1)),
        ] {
            assert!(render_chat_template(t, &[msg("user", "x")], false, "", "").is_err());
        }
    }

    /// Chains of operators as long as the largest template allows parse without exhausting
    /// the renderer's stack.
    #[test]
    fn the_deepest_expressions_a_template_can_hold_render() {
        let n = CHAT_TEMPLATE_MAX_BYTES - 16;
        for t in [
            format!("{{{{ {}1 }}}}", "-".repeat(n)),
            format!("{{{{ {}1 }}}}", "not ".repeat(n / 4)),
            format!("{{{{ 1{} }}}}", " + 1".repeat(n / 4)),
        ] {
            let _ = render_chat_template(&t, &[msg("user", "x")], false, "", "");
        }
    }

    #[test]
    fn block_whitespace_is_trimmed_and_tokens_are_passed() {
        let t = "{{ bos_token }}\n{% for m in messages %}\n{{ m.content }}{{ eos_token }}\n{% endfor %}";
        let out = render_chat_template(
            t,
            &[msg("user", "a"), msg("assistant", "b")],
            false,
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(out, "<s>\na</s>\nb</s>\n");
    }
}
