//! Constitutional AI (`constitutional`): critique-and-revise data generation after Bai et al. 2022
//! ("Constitutional AI: Harmlessness from AI Feedback").
//!
//! For every prompt the model answers (the `response`), then, for each of `principles_per_prompt`
//! principles drawn for that prompt with the stage's seed (without replacement while the list
//! lasts), it critiques its latest response under the principle and revises it; the revision is
//! the response the next principle works on. Every request is a prompt rendered with a
//! minijinja template (sent as a user turn through the chat template when the prompts are
//! conversations, whose last turn the templates quote as `prompt`) and continued by the model
//! with the stage's sampling settings:
//! - critique (`prompt`, `response`, `principle`), by default [`DEFAULT_CRITIQUE_TEMPLATE`]:
//!   "Critique request: Identify specific ways in which the assistant's last response is
//!   {principle}.";
//! - revision (`prompt`, `response`, `critique`, `principle`), by default
//!   [`DEFAULT_REVISION_TEMPLATE`]: the critique exchange followed by "Revision request: Please
//!   rewrite the assistant response to remove everything that is {principle}.".
//!
//! Principles: a list in the recipe, or (`principles = "FILE"`, or a node's output) a file:
//! `.jsonl` files hold one JSON string or one object with a `principle` field per line; any other
//! file holds one principle per line. Blank lines and lines starting with `#` are skipped.
//! A principle is a phrase naming what to avoid ("negative, dull or unkind"), read into both
//! requests.
//!
//! Outputs:
//! - `revisions.jsonl`: `prompt`, `completion` (the final revision), and for inspection
//!   `original`, `principles`, `critiques`, `revisions`: SFT data;
//! - `pairs.jsonl`: `prompt`, `chosen`, `rejected`: preference data. By default the final
//!   revision is chosen over the original response (rows where they are equal are left out and
//!   counted as `unchanged`). With `ai_feedback = true` (RLAIF), the model answers each prompt
//!   twice and chooses between the two answers under the prompt's first principle: the question
//!   is [`DEFAULT_FEEDBACK_TEMPLATE`] (or `feedback_template`), and the answer is read by
//!   comparing the log-probs of the continuations " (A)" and " (B)". To cancel the position bias
//!   of a small model, the question is asked in both orders and each answer's two log-probs are
//!   summed; the answer with the larger sum is chosen, and exact ties are left out (`ties`). The
//!   first answer is also the one that is critiqued and revised.

use std::collections::BTreeMap;

use burn::tensor::Device;
use minijinja::Environment;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use rudder_engine::runner::StageOutcome;
use rudder_schema::kinds::{ConstitutionalParams, OneOrMany};
use serde_json::{Value, json};

use crate::artifacts::write_jsonl;
use crate::data::{Format, Message, Turns};
use crate::kind::{Stage, StageKind};
use crate::logps::{PromptCompletion, sequence_logps};
use crate::model::CausalLm;
use crate::padding::Pad;
use crate::sampling::{Sampler, generate_options};
use crate::seeds;
use crate::tokenizer::Tokenizer;
use crate::train::TrainError;

/// SFT data: each prompt with its final revision.
pub const REVISIONS_FILE: &str = "revisions.jsonl";
/// Preference data.
pub const PAIRS_FILE: &str = "pairs.jsonl";

/// The critique request (Bai et al. 2022, appendix C's critique requests).
pub const DEFAULT_CRITIQUE_TEMPLATE: &str = "{{ prompt }}{{ response }}\n\n\
Critique request: Identify specific ways in which the assistant's last response is {{ principle }}.\n\n\
Critique:";

/// The revision request, after the critique exchange.
pub const DEFAULT_REVISION_TEMPLATE: &str = "{{ prompt }}{{ response }}\n\n\
Critique request: Identify specific ways in which the assistant's last response is {{ principle }}.\n\n\
Critique:{{ critique }}\n\n\
Revision request: Please rewrite the assistant response to remove everything that is {{ principle }}.\n\n\
Revision:";

/// The multiple-choice question of AI feedback (Bai et al. 2022, section 4.1).
pub const DEFAULT_FEEDBACK_TEMPLATE: &str = "Consider the following conversation:\n\
{{ prompt }}\n\n\
Which of these responses is less {{ principle }}?\n\
Options:\n\
(A){{ response_a }}\n\
(B){{ response_b }}\n\
The answer is:";

/// The continuations whose log-probs are the AI feedback's answer.
const ANSWERS: [&str; 2] = [" (A)", " (B)"];

pub struct Constitutional;

impl StageKind for Constitutional {
    type Params = ConstitutionalParams;
    const VERSION: u32 = 4;

    fn run(
        stage: &Stage<'_, ConstitutionalParams>,
        device: &Device,
    ) -> Result<StageOutcome, TrainError> {
        run_stage(stage, &device.clone().inner())
    }
}

fn run_stage(
    stage: &Stage<'_, ConstitutionalParams>,
    device: &Device,
) -> Result<StageOutcome, TrainError> {
    let params = stage.params;
    let principles = principles(stage)?;
    if principles.is_empty() {
        return Err(TrainError::Input("give at least one principle".into()));
    }
    let templates = Templates::new(params)?;
    let model = stage.inputs.model("model")?;
    let turns = stage.inputs.rows("data")?.prompts()?;
    // The templates quote the question as text: a conversation's last (user) turn.
    let prompts: Vec<String> = turns.iter().map(question_text).collect();
    let chat = turns.first().is_some_and(Turns::is_chat);
    // Requests (critique, revision, feedback) go to the model in the prompts' form.
    let ask = |text: String| {
        if chat {
            Turns::Chat(vec![Message {
                role: "user".into(),
                content: text,
            }])
        } else {
            Turns::Text(text)
        }
    };
    let n = prompts.len();
    let passes = params.principles_per_prompt.max(1) as usize;
    let chosen: Vec<Vec<usize>> = (0..n)
        .map(|row| choose_principles(principles.len(), passes, stage.seed(), row))
        .collect();

    let samples = if params.ai_feedback { 2 } else { 1 };
    stage.progress().set_length((n * (1 + 2 * passes)) as u64);
    let sampler = Sampler::load(&model, device)?;
    let interrupted = || stage.is_interrupted();
    let generate = |inputs: &[Turns], count: usize, phase: u64, done: usize| {
        let opts = generate_options(
            &params.sampling,
            params.batch_size,
            seeds::mix(stage.seed(), phase),
        );
        sampler.samples(
            inputs,
            count,
            &opts,
            stage.progress(),
            &interrupted,
            done as u64,
        )
    };

    stage.progress().set_message("responses".into());
    let first = generate(&turns, samples, 0, 0)?;
    let originals: Vec<String> = first
        .iter()
        .filter(|g| g.sample == 0)
        .map(|g| g.completion.completion.clone())
        .collect();
    let seconds: Vec<String> = first
        .iter()
        .filter(|g| g.sample == 1)
        .map(|g| g.completion.completion.clone())
        .collect();

    let mut current = originals.clone();
    let mut critiques: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut revisions: Vec<Vec<String>> = vec![Vec::new(); n];
    for pass in 0..passes {
        stage
            .progress()
            .set_message(format!("critiques {}/{passes}", pass + 1));
        let requests = (0..n)
            .map(|i| {
                templates
                    .render(
                        "critique",
                        json!({
                            "prompt": prompts[i],
                            "response": current[i],
                            "principle": principles[chosen[i][pass]],
                        }),
                    )
                    .map(ask)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let critique = generate(&requests, 1, 1 + 2 * pass as u64, n * (1 + 2 * pass))?;
        stage
            .progress()
            .set_message(format!("revisions {}/{passes}", pass + 1));
        let requests = (0..n)
            .map(|i| {
                templates
                    .render(
                        "revision",
                        json!({
                            "prompt": prompts[i],
                            "response": current[i],
                            "critique": critique[i].completion.completion,
                            "principle": principles[chosen[i][pass]],
                        }),
                    )
                    .map(ask)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let revision = generate(&requests, 1, 2 + 2 * pass as u64, n * (2 + 2 * pass))?;
        for i in 0..n {
            critiques[i].push(critique[i].completion.completion.clone());
            revisions[i].push(revision[i].completion.completion.clone());
            current[i] = revision[i].completion.completion.clone();
        }
    }

    let revision_lines: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "prompt": turns[i].to_json(),
                "completion": turns[i].answer(&current[i]).to_json(),
                "original": originals[i],
                "principles": chosen[i].iter().map(|&k| &principles[k]).collect::<Vec<_>>(),
                "critiques": critiques[i],
                "revisions": revisions[i],
            })
        })
        .collect();
    write_jsonl(&stage.out_dir().join(REVISIONS_FILE), &revision_lines)?;

    let mut summary = BTreeMap::new();
    summary.insert("prompts".to_string(), n as f64);
    summary.insert("principles".to_string(), principles.len() as f64);
    let pair_lines: Vec<Value> = if params.ai_feedback {
        stage.progress().set_message("AI feedback".into());
        let questions = (0..n)
            .map(|i| {
                let question = |a: &str, b: &str| {
                    templates.render(
                        "feedback",
                        json!({
                            "prompt": prompts[i],
                            "principle": principles[chosen[i][0]],
                            "response_a": a,
                            "response_b": b,
                        }),
                    )
                };
                Ok([
                    ask(question(&originals[i], &seconds[i])?),
                    ask(question(&seconds[i], &originals[i])?),
                ])
            })
            .collect::<Result<Vec<_>, TrainError>>()?;
        let pad = stage.pad(sampler.tokenizer.pad_id().unwrap_or(0));
        let preferences = feedback(
            &sampler.model,
            &sampler.tokenizer,
            &questions,
            params.batch_size.max(1) as usize,
            pad,
        )?;
        let mut lines = Vec::new();
        let mut ties = 0;
        let mut identical = 0;
        for i in 0..n {
            // Two identical answers make no preference, whatever the model says of them.
            if originals[i] == seconds[i] {
                identical += 1;
                continue;
            }
            let (first_wins, margin) = preferences[i];
            let (chosen_text, rejected_text) = match first_wins {
                Some(true) => (&originals[i], &seconds[i]),
                Some(false) => (&seconds[i], &originals[i]),
                None => {
                    ties += 1;
                    continue;
                }
            };
            lines.push(json!({
                "prompt": turns[i].to_json(),
                "chosen": turns[i].answer(chosen_text).to_json(),
                "rejected": turns[i].answer(rejected_text).to_json(),
                "principle": principles[chosen[i][0]],
                "logp_margin": margin,
            }));
        }
        summary.insert("ties".to_string(), ties as f64);
        summary.insert("identical".to_string(), identical as f64);
        lines
    } else {
        let mut unchanged = 0;
        let lines = (0..n)
            .filter(|&i| {
                let same = current[i] == originals[i];
                unchanged += usize::from(same);
                !same
            })
            .map(|i| {
                json!({
                    "prompt": turns[i].to_json(),
                    "chosen": turns[i].answer(&current[i]).to_json(),
                    "rejected": turns[i].answer(&originals[i]).to_json(),
                })
            })
            .collect();
        summary.insert("unchanged".to_string(), unchanged as f64);
        lines
    };
    write_jsonl(&stage.out_dir().join(PAIRS_FILE), &pair_lines)?;
    summary.insert("pairs".to_string(), pair_lines.len() as f64);
    let mean_chars = |texts: &[String]| {
        texts.iter().map(|t| t.chars().count()).sum::<usize>() as f64 / texts.len().max(1) as f64
    };
    summary.insert("original_chars".to_string(), mean_chars(&originals));
    summary.insert("revision_chars".to_string(), mean_chars(&current));
    Ok(StageOutcome { summary })
}

/// The text of a question for the templates: a string, or a conversation's last turn.
fn question_text(prompt: &Turns) -> String {
    match prompt {
        Turns::Text(text) => text.clone(),
        Turns::Chat(messages) => messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default(),
    }
}

/// The model's answer to each question pair (asked in both orders): `Some(true)` when the
/// first response wins, `None` on an exact tie, with the log-prob margin of the first. Batches
/// are padded as `pad` says (the stage's, so GPU backends see a few shapes).
fn feedback(
    model: &CausalLm,
    tokenizer: &Tokenizer,
    questions: &[[Turns; 2]],
    batch_size: usize,
    pad: Pad,
) -> Result<Vec<(Option<bool>, f64)>, TrainError> {
    let answers = ANSWERS
        .iter()
        .map(|a| tokenizer.encode(a, false))
        .collect::<Result<Vec<_>, _>>()?;
    // Per question: [order AB: " (A)", " (B)"; order BA: " (A)", " (B)"].
    let mut rows = Vec::with_capacity(questions.len() * 4);
    for [ab, ba] in questions {
        for question in [ab, ba] {
            let prompt = tokenizer.prompt_ids(question)?;
            for answer in &answers {
                rows.push(PromptCompletion {
                    prompt: prompt.clone(),
                    completion: answer.clone(),
                });
            }
        }
    }
    let refs: Vec<&PromptCompletion> = rows.iter().collect();
    let logps = sequence_logps(model, &refs, pad, batch_size);
    let sum = |v: &Vec<f32>| v.iter().map(|&x| f64::from(x)).sum::<f64>();
    Ok(logps
        .chunks(4)
        .map(|q| {
            // The first response is (A) in the first order and (B) in the second.
            let first = sum(&q[0]) + sum(&q[3]);
            let second = sum(&q[1]) + sum(&q[2]);
            let margin = first - second;
            let verdict = match margin.partial_cmp(&0.0) {
                Some(std::cmp::Ordering::Greater) => Some(true),
                Some(std::cmp::Ordering::Less) => Some(false),
                _ => None,
            };
            (verdict, margin)
        })
        .collect())
}

/// Principles from a file's text: JSON lines (strings, or objects with `principle`) or one per
/// line; blank lines and `#` comments skipped.
pub fn parse_principles(text: &str, json_lines: bool) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !json_lines {
            out.push(line.to_owned());
            continue;
        }
        let value: Value =
            serde_json::from_str(line).map_err(|e| format!("line {}: {e}", i + 1))?;
        match value {
            Value::String(s) => out.push(s),
            Value::Object(map) => match map.get("principle") {
                Some(Value::String(s)) => out.push(s.clone()),
                _ => {
                    return Err(format!(
                        "line {}: expected a `principle` string field",
                        i + 1
                    ));
                }
            },
            _ => {
                return Err(format!(
                    "line {}: expected a string or an object with `principle`",
                    i + 1
                ));
            }
        }
    }
    if out.is_empty() {
        return Err("no principle in the file".into());
    }
    Ok(out)
}

/// The stage's principles: the recipe's list, or a file's.
fn principles(stage: &Stage<'_, ConstitutionalParams>) -> Result<Vec<String>, TrainError> {
    match &stage.params.principles {
        OneOrMany::Many(list) => Ok(list.clone()),
        OneOrMany::One(_) => {
            let (path, format) = stage.inputs.file("principles")?;
            let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
            parse_principles(&text, format == Some(Format::Jsonl))
                .map_err(|e| TrainError::Input(format!("principles {}: {e}", path.display())))
        }
    }
}

/// The indices of the `count` principles (of `n`) used for prompt `row`: a seeded permutation,
/// repeated when `count > n`.
pub fn choose_principles(n: usize, count: usize, seed: u64, row: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seeds::stream(seed, row as u64));
    let mut out = Vec::with_capacity(count);
    while out.len() < count && n > 0 {
        let mut order: Vec<usize> = (0..n).collect();
        seeds::shuffle(&mut order, &mut rng);
        out.extend(order.into_iter().take(count - out.len()));
    }
    out
}

/// The templates, compiled once.
struct Templates {
    env: Environment<'static>,
}

impl Templates {
    fn new(params: &ConstitutionalParams) -> Result<Self, TrainError> {
        let mut env = Environment::new();
        for (name, given, default) in [
            (
                "critique",
                &params.critique_template,
                DEFAULT_CRITIQUE_TEMPLATE,
            ),
            (
                "revision",
                &params.revision_template,
                DEFAULT_REVISION_TEMPLATE,
            ),
            (
                "feedback",
                &params.feedback_template,
                DEFAULT_FEEDBACK_TEMPLATE,
            ),
        ] {
            let source = given.clone().unwrap_or_else(|| default.to_owned());
            env.add_template_owned(name, source)
                .map_err(|e| TrainError::Config(format!("{name}_template: {e}")))?;
        }
        Ok(Self { env })
    }

    fn render(&self, name: &str, vars: Value) -> Result<String, TrainError> {
        self.env
            .get_template(name)
            .and_then(|t| t.render(minijinja::value::Serde(vars)))
            .map_err(|e| TrainError::Config(format!("{name}_template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principles_files_are_lines_or_json_lines() {
        let text = "# what to avoid\nnegative or unkind\n\n dull \n";
        assert_eq!(
            parse_principles(text, false).unwrap(),
            vec!["negative or unkind", "dull"]
        );
        let text = "\"harmful\"\n{\"principle\": \"rude\"}\n";
        assert_eq!(
            parse_principles(text, true).unwrap(),
            vec!["harmful", "rude"]
        );
        assert!(
            parse_principles("[1]\n", true)
                .unwrap_err()
                .contains("line 1")
        );
        assert!(parse_principles("# only a comment\n", false).is_err());
    }

    #[test]
    fn principles_are_drawn_without_repeats_while_the_list_lasts() {
        let picks = choose_principles(3, 3, 7, 0);
        let mut sorted = picks.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2]);
        assert_eq!(choose_principles(3, 3, 7, 0), picks, "seeded");
        assert_eq!(choose_principles(2, 5, 7, 1).len(), 5);
        // Different prompts get different draws (for some row among a few).
        assert!((1..8).any(|row| choose_principles(5, 2, 7, row) != choose_principles(5, 2, 7, 0)));
    }

    #[test]
    fn default_templates_render_the_requests() {
        let templates = Templates::new(&ConstitutionalParams::default()).unwrap();
        let critique = templates
            .render(
                "critique",
                json!({"prompt": "Q:", "response": " A.", "principle": "rude"}),
            )
            .unwrap();
        assert!(critique.starts_with("Q: A.\n\nCritique request: Identify specific ways"));
        assert!(critique.ends_with("response is rude.\n\nCritique:"));
        let revision = templates
            .render(
                "revision",
                json!({"prompt": "Q:", "response": " A.", "critique": " It is.", "principle": "rude"}),
            )
            .unwrap();
        assert!(revision.contains("Critique: It is.\n\nRevision request: Please rewrite"));
        assert!(revision.ends_with("Revision:"));
        let feedback = templates
            .render(
                "feedback",
                json!({"prompt": "Q:", "principle": "rude", "response_a": " x", "response_b": " y"}),
            )
            .unwrap();
        assert!(
            feedback.contains("(A) x\n(B) y\nThe answer is:"),
            "{feedback}"
        );
    }
}
