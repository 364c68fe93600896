//! Tokenisation of prompts and answers, strings or conversations, by the rules of the parent
//! module's "Tokenisation (TRL 1.16)" section: the one place where a prompt becomes the tokens a
//! model sees and an answer the tokens that are scored. Kinds call these; none renders a chat
//! template or appends an EOS itself.

use super::formats::{Message, Turns};
use crate::error::StageError;
use crate::tokenizer::Tokenizer;

/// A prompt and its answers split into tokens the way TRL 1.16 splits them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerSplit {
    pub prompt: Vec<u32>,
    /// One per answer, in order.
    pub answers: Vec<Vec<u32>>,
    /// Whether the prompt's own tokens were a prefix of every prompt + answer: when false, the
    /// template rendered the prompt differently alone, or BPE merged across the boundary, and
    /// the prompt is the common prefix (TRL warns and continues).
    pub prefix_matched: bool,
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn joined(prompt: &[Message], answer: &[Message]) -> Vec<Message> {
    prompt.iter().chain(answer).cloned().collect()
}

fn mixed() -> StageError {
    StageError::ChatTemplate(
        "a prompt and its answer must both be strings or both conversations".into(),
    )
}

impl Tokenizer {
    /// The tokens a prompt gives the model: a string with the tokenizer's special tokens, a
    /// conversation rendered with the generation prompt, without them.
    pub fn prompt_ids(&self, prompt: &Turns) -> Result<Vec<u32>, StageError> {
        match prompt {
            Turns::Text(text) => self.encode(text, true),
            Turns::Chat(messages) => self.encode(&self.apply_chat_template(messages, true)?, false),
        }
    }

    /// The text a prompt gives the model (a conversation's rendering with the generation
    /// prompt), for display and for judges that read text.
    pub fn prompt_text(&self, prompt: &Turns) -> Result<String, StageError> {
        match prompt {
            Turns::Text(text) => Ok(text.clone()),
            Turns::Chat(messages) => self.apply_chat_template(messages, true),
        }
    }

    /// Splits a prompt and its answers (a pair's chosen and rejected, or one completion).
    pub fn split_answers(
        &self,
        prompt: &Turns,
        answers: &[&Turns],
    ) -> Result<AnswerSplit, StageError> {
        let (prompt_ids, full) = match prompt {
            Turns::Text(prompt) => {
                let eos = self
                    .eos_token
                    .as_deref()
                    .ok_or_else(|| self.tokenizer_error("no eos_token in tokenizer_config.json"))?;
                let full = answers
                    .iter()
                    .map(|answer| {
                        let Turns::Text(answer) = answer else {
                            return Err(mixed());
                        };
                        let eos = if answer.ends_with(eos) { "" } else { eos };
                        self.encode(&format!("{prompt}{answer}{eos}"), true)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                (self.encode(prompt, true)?, full)
            }
            Turns::Chat(prompt) => {
                let full = answers
                    .iter()
                    .map(|answer| {
                        let Turns::Chat(answer) = answer else {
                            return Err(mixed());
                        };
                        let text = self.apply_chat_template(&joined(prompt, answer), false)?;
                        self.encode(&text, false)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                (
                    self.encode(&self.apply_chat_template(prompt, true)?, false)?,
                    full,
                )
            }
        };
        let prompt_len = full
            .iter()
            .map(|f| common_prefix(&prompt_ids, f))
            .min()
            .unwrap_or(prompt_ids.len());
        Ok(AnswerSplit {
            prefix_matched: prompt_len == prompt_ids.len(),
            prompt: prompt_ids[..prompt_len].to_vec(),
            answers: full.into_iter().map(|f| f[prompt_len..].to_vec()).collect(),
        })
    }

    /// The whole sequence a reward model scores: the rendered conversation, or
    /// `[BOS] + BPE(prompt + answer) + [EOS]` for strings.
    pub fn whole_ids(&self, prompt: &Turns, answer: &Turns) -> Result<Vec<u32>, StageError> {
        match (prompt, answer) {
            (Turns::Text(prompt), Turns::Text(answer)) => {
                let eos = self
                    .eos_id()
                    .ok_or_else(|| self.tokenizer_error("no eos_token in tokenizer_config.json"))?;
                let mut ids = self.encode(&format!("{prompt}{answer}"), true)?;
                if ids.last() != Some(&eos) {
                    ids.push(eos);
                }
                Ok(ids)
            }
            (Turns::Chat(prompt), Turns::Chat(answer)) => {
                let text = self.apply_chat_template(&joined(prompt, answer), false)?;
                self.encode(&text, false)
            }
            _ => Err(mixed()),
        }
    }

    /// A conversation's tokens and which of them are assistant output: the tokens overlapping
    /// the template's `{% generation %}` blocks (transformers' `assistant_masks`), or, for a
    /// template without them, each assistant turn's tokens found by rendering the conversation
    /// up to the turn (with the generation prompt) and through it.
    pub fn conversation_ids(
        &self,
        messages: &[Message],
    ) -> Result<(Vec<u32>, Vec<bool>), StageError> {
        let (text, spans) = self.apply_chat_template_with_spans(messages, false)?;
        if self.has_generation_markers() {
            let (ids, offsets) = self.encode_with_offsets(&text, false)?;
            let mask = offsets
                .iter()
                .map(|&(start, end)| spans.iter().any(|&(s, e)| start < e && end > s))
                .collect();
            return Ok((ids, mask));
        }
        let ids = self.encode(&text, false)?;
        let mut mask = vec![false; ids.len()];
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.apply_chat_template(&messages[..i], true)?;
            let through = self.apply_chat_template(&messages[..=i], false)?;
            let start = self.encode(&before, false)?.len();
            let end = self.encode(&through, false)?.len().min(ids.len());
            for t in mask.iter_mut().take(end).skip(start) {
                *t = true;
            }
        }
        Ok((ids, mask))
    }
}
