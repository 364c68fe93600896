//! Judges: what scores a prompt's completion for `evaluate` (and, later, the RL and iterative
//! preference kinds). A recipe's [`Judge`] is one of
//! - a reward model (a `reward` stage's artifact or any `LlamaForSequenceClassification`
//!   directory with its tokenizer): each sample is tokenised as the `reward` stage trains on it,
//!   `[BOS] + BPE(prompt + completion) + [EOS]`, and scored by the head at its last token;
//! - a rule: `exact_match` (1 or 0 against a dataset column, optionally after extracting the
//!   answer with a regex), `regex` (1 when the pattern occurs), `length` (`-|chars - target| /
//!   target`, 0 at the target length and decreasing linearly on both sides);
//! - a command, run with `sh -c` in the recipe's directory: JSONL `{"prompt", "completion"}` on
//!   its stdin, one number per line on its stdout.
//!
//! [`Scorer`] is generic over the backend so that a caller that already runs on one (a training
//! loop) keeps the reward model loaded across calls. Which judge a stage names is resolved by
//! `inputs::Inputs::judge`.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use burn::tensor::Device;
use burn::tensor::{Int, Tensor, TensorData};
use regex::Regex;
use rudder_schema::kinds::{CommandJudge, Rule, RuleJudge};
use serde_json::Value;

use crate::data::{Row, Turns};
use crate::model::{RewardModel, load_reward_model};
use crate::tokenizer::Tokenizer;
use crate::train::TrainError;

/// How many lines of a failed judge command's stderr an error shows.
const STDERR_TAIL: usize = 20;

/// One completion to score. `row` is the dataset row the prompt came from: `exact_match` reads
/// the expected answer from it.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    /// The prompt as the model saw it (a conversation's rendering, for rules and commands).
    pub prompt: &'a str,
    pub completion: &'a str,
    pub row: Option<&'a Row>,
    /// The prompt as the data gave it: a reward model scores a conversation's answer as the
    /// template renders prompt + answer, as it was trained.
    pub turns: Option<&'a Turns>,
}

/// A judge ready to score samples.
pub struct Scorer {
    inner: Inner,
}

enum Inner {
    RewardModel(Box<RewardModelScorer>),
    Rule(RuleScorer),
    Command(CommandScorer),
}

impl Scorer {
    /// The reward model in `dir`, with the tokenizer stored beside it.
    pub fn reward_model(
        dir: &Path,
        tokenizer: Tokenizer,
        batch_size: usize,
        device: &Device,
    ) -> Result<Self, TrainError> {
        let eos = tokenizer.eos_id().ok_or_else(|| {
            TrainError::Input(format!(
                "judge {}: the tokenizer has no eos_token, which reward sequences end with",
                dir.display()
            ))
        })?;
        let (_, model) = load_reward_model(dir, device)?;
        Ok(Self {
            inner: Inner::RewardModel(Box::new(RewardModelScorer {
                model,
                pad_id: tokenizer.pad_id().unwrap_or(eos),
                eos,
                tokenizer,
                batch_size: batch_size.max(1),
                device: device.clone(),
            })),
        })
    }

    /// A rule judge; its pattern is compiled here, so a bad one fails before any generation.
    pub fn rule(rule: &RuleJudge) -> Result<Self, TrainError> {
        Ok(Self {
            inner: Inner::Rule(RuleScorer::new(rule)?),
        })
    }

    /// A judge command, run in `dir`.
    pub fn command(judge: &CommandJudge, dir: &Path) -> Self {
        Self {
            inner: Inner::Command(CommandScorer {
                command: judge.command.clone(),
                dir: dir.to_path_buf(),
            }),
        }
    }

    /// What the judge is, for messages.
    pub fn describe(&self) -> String {
        match &self.inner {
            Inner::RewardModel(_) => "reward model".into(),
            Inner::Rule(rule) => format!("rule `{}`", rule.name()),
            Inner::Command(command) => format!("command `{}`", command.command),
        }
    }

    /// One score per sample, in order.
    pub fn score(&self, samples: &[Sample<'_>]) -> Result<Vec<f64>, TrainError> {
        if samples.is_empty() {
            return Ok(Vec::new());
        }
        match &self.inner {
            Inner::RewardModel(rm) => rm.score(samples),
            Inner::Rule(rule) => samples.iter().map(|s| rule.score(s)).collect(),
            Inner::Command(command) => command.score(samples),
        }
    }
}

struct RewardModelScorer {
    model: RewardModel,
    tokenizer: Tokenizer,
    eos: u32,
    pad_id: u32,
    batch_size: usize,
    device: Device,
}

impl RewardModelScorer {
    /// `[BOS] + BPE(prompt + completion) + [EOS]`, or the rendered conversation, as
    /// `reward::tokenize` builds training sequences, so the model scores what it was trained
    /// to score.
    fn sequence(&self, sample: &Sample<'_>) -> Result<Vec<u32>, TrainError> {
        if let Some(prompt @ Turns::Chat(_)) = sample.turns {
            return Ok(self
                .tokenizer
                .whole_ids(prompt, &prompt.answer(sample.completion))?);
        }
        let mut ids = self
            .tokenizer
            .encode(&format!("{}{}", sample.prompt, sample.completion), true)?;
        if ids.last() != Some(&self.eos) {
            ids.push(self.eos);
        }
        Ok(ids)
    }

    fn score(&self, samples: &[Sample<'_>]) -> Result<Vec<f64>, TrainError> {
        let sequences = samples
            .iter()
            .map(|s| self.sequence(s))
            .collect::<Result<Vec<_>, _>>()?;
        let mut scores = Vec::with_capacity(samples.len());
        for chunk in sequences.chunks(self.batch_size) {
            let n = chunk.len();
            let seq = chunk.iter().map(Vec::len).max().unwrap_or(1).max(1);
            let mut ids = Vec::with_capacity(n * seq);
            let mut padding = Vec::with_capacity(n);
            // Right padding: the reward is read at each row's last real token.
            for s in chunk {
                ids.extend(s.iter().map(|&t| i64::from(t)));
                ids.extend(std::iter::repeat_n(i64::from(self.pad_id), seq - s.len()));
                padding.push((0..seq).map(|j| u8::from(j < s.len())).collect::<Vec<u8>>());
            }
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [n, seq]), &self.device);
            let rewards: Vec<f32> = self
                .model
                .forward(ids, Some(&padding))
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .expect("converted to f32");
            scores.extend(rewards.into_iter().map(f64::from));
        }
        Ok(scores)
    }
}

/// A compiled rule.
#[derive(Debug)]
enum RuleScorer {
    ExactMatch {
        column: String,
        extract: Option<Regex>,
    },
    Regex(Regex),
    Length {
        target: f64,
    },
}

fn compile(pattern: &str) -> Result<Regex, TrainError> {
    Regex::new(pattern)
        .map_err(|e| TrainError::Input(format!("judge: invalid regex `{pattern}`: {e}")))
}

impl RuleScorer {
    fn new(rule: &RuleJudge) -> Result<Self, TrainError> {
        let missing = |what: &str| {
            TrainError::Input(format!(
                "judge: rule `{}` needs `{what}`",
                rule_name(rule.rule)
            ))
        };
        Ok(match rule.rule {
            Rule::ExactMatch => RuleScorer::ExactMatch {
                column: rule.column.clone().ok_or_else(|| missing("column"))?,
                extract: rule.pattern.as_deref().map(compile).transpose()?,
            },
            Rule::Regex => RuleScorer::Regex(compile(
                rule.pattern.as_deref().ok_or_else(|| missing("pattern"))?,
            )?),
            Rule::Length => match rule.target {
                Some(target) if target > 0 => RuleScorer::Length {
                    target: f64::from(target),
                },
                Some(_) => {
                    return Err(TrainError::Input(
                        "judge: rule `length` needs a positive `target`".into(),
                    ));
                }
                None => return Err(missing("target")),
            },
        })
    }

    fn name(&self) -> &'static str {
        match self {
            RuleScorer::ExactMatch { .. } => "exact_match",
            RuleScorer::Regex(_) => "regex",
            RuleScorer::Length { .. } => "length",
        }
    }

    fn score(&self, sample: &Sample<'_>) -> Result<f64, TrainError> {
        Ok(match self {
            RuleScorer::ExactMatch { column, extract } => {
                let expected = expected_answer(sample.row, column)?;
                let answer = match extract {
                    // The first capture group, or the whole match when the pattern has none.
                    Some(re) => match re.captures(sample.completion) {
                        Some(caps) => caps
                            .get(1)
                            .or_else(|| caps.get(0))
                            .map_or("", |m| m.as_str()),
                        None => return Ok(0.0),
                    },
                    None => sample.completion,
                };
                f64::from(u8::from(answer.trim() == expected.trim()))
            }
            RuleScorer::Regex(re) => f64::from(u8::from(re.is_match(sample.completion))),
            RuleScorer::Length { target } => {
                let chars = sample.completion.chars().count() as f64;
                -(chars - target).abs() / target
            }
        })
    }
}

fn rule_name(rule: Rule) -> &'static str {
    match rule {
        Rule::ExactMatch => "exact_match",
        Rule::Regex => "regex",
        Rule::Length => "length",
    }
}

/// The expected answer in `column` of the prompt's row: a string as is, a number or boolean in
/// its JSON spelling (`42`, `3.5`, `true`).
fn expected_answer(row: Option<&Row>, column: &str) -> Result<String, TrainError> {
    let row = row.ok_or_else(|| {
        TrainError::Input(format!(
            "judge: rule `exact_match` compares with column `{column}` of the prompt's dataset row, but this sample has no row"
        ))
    })?;
    match row.fields.get(column) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v @ (Value::Number(_) | Value::Bool(_))) => Ok(v.to_string()),
        Some(other) => Err(TrainError::Input(format!(
            "judge: row {}: column `{column}` must be a string or a number, found {other}",
            row.number
        ))),
        None => Err(TrainError::Input(format!(
            "judge: row {}: no column `{column}` (rule `exact_match` reads the expected answer from it)",
            row.number
        ))),
    }
}

struct CommandScorer {
    command: String,
    dir: PathBuf,
}

impl CommandScorer {
    fn error(&self, message: impl std::fmt::Display) -> TrainError {
        TrainError::Input(format!("judge command `{}`: {message}", self.command))
    }

    fn score(&self, samples: &[Sample<'_>]) -> Result<Vec<f64>, TrainError> {
        let mut input = String::new();
        for s in samples {
            let line = serde_json::json!({ "prompt": s.prompt, "completion": s.completion });
            input.push_str(&line.to_string());
            input.push('\n');
        }
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&self.command)
            .current_dir(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.error(format!("cannot start `sh`: {e}")))?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        // Feed stdin and drain both outputs at once: a command that writes before it has read
        // everything would otherwise fill a pipe and block forever.
        let writer = std::thread::spawn(move || {
            // A command that exits without reading its input is judged by its output alone.
            let _ = stdin.write_all(input.as_bytes());
        });
        let tail_reader = std::thread::spawn(move || {
            let mut tail = VecDeque::with_capacity(STDERR_TAIL);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tail.len() == STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            Vec::from(tail)
        });
        let mut output = Vec::new();
        let read = stdout.read_to_end(&mut output);
        let status = child.wait().map_err(|e| self.error(e))?;
        let _ = writer.join();
        let tail = tail_reader.join().unwrap_or_default();
        let with_stderr = |mut message: String| {
            if !tail.is_empty() {
                message.push_str("\n--- last lines of its stderr ---\n");
                message.push_str(&tail.join("\n"));
            }
            self.error(message)
        };
        if !status.success() {
            let code = status
                .code()
                .map_or_else(|| "a signal".to_owned(), |c| format!("exit code {c}"));
            return Err(with_stderr(format!("failed with {code}")));
        }
        read.map_err(|e| self.error(format!("reading its output: {e}")))?;
        let text = String::from_utf8_lossy(&output);
        let lines: Vec<&str> = text.lines().collect();
        if lines.len() != samples.len() {
            return Err(with_stderr(format!(
                "wrote {} line(s) for {} sample(s); it must write one number per input line",
                lines.len(),
                samples.len()
            )));
        }
        lines
            .iter()
            .enumerate()
            .map(|(i, line)| match line.trim().parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(x),
                _ => Err(with_stderr(format!(
                    "output line {} is not a finite number: `{}`",
                    i + 1,
                    truncate(line, 80)
                ))),
            })
            .collect()
    }
}

fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        format!("{}…", text.chars().take(max).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule(
        rule: Rule,
        column: Option<&str>,
        pattern: Option<&str>,
        target: Option<u32>,
    ) -> Scorer {
        Scorer::rule(&RuleJudge {
            rule,
            column: column.map(str::to_owned),
            pattern: pattern.map(str::to_owned),
            target,
        })
        .unwrap()
    }

    fn row(fields: Value) -> Row {
        Row {
            number: 3,
            fields: fields.as_object().unwrap().clone(),
        }
    }

    fn sample<'a>(completion: &'a str, row: Option<&'a Row>) -> Sample<'a> {
        Sample {
            prompt: "Q:",
            completion,
            row,
            turns: None,
        }
    }

    #[test]
    fn exact_match_compares_the_trimmed_completion_with_the_column() {
        let judge = rule(Rule::ExactMatch, Some("answer"), None, None);
        let r = row(json!({"prompt": "Q:", "answer": "Paris"}));
        let scores = judge
            .score(&[sample(" Paris\n", Some(&r)), sample("paris", Some(&r))])
            .unwrap();
        assert_eq!(scores, vec![1.0, 0.0]);
        // Numbers in the data compare in their JSON spelling.
        let n = row(json!({"answer": 42}));
        assert_eq!(judge.score(&[sample("42", Some(&n))]).unwrap(), vec![1.0]);
    }

    #[test]
    fn exact_match_extracts_the_first_capture_group() {
        let judge = rule(
            Rule::ExactMatch,
            Some("answer"),
            Some(r"answer is (\d+)"),
            None,
        );
        let r = row(json!({"answer": "12"}));
        let scores = judge
            .score(&[
                sample("so the answer is 12.", Some(&r)),
                sample("the answer is 13", Some(&r)),
                sample("no idea", Some(&r)),
            ])
            .unwrap();
        assert_eq!(scores, vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn exact_match_errors_name_the_row_and_column() {
        let judge = rule(Rule::ExactMatch, Some("answer"), None, None);
        let r = row(json!({"prompt": "Q:"}));
        let err = judge
            .score(&[sample("x", Some(&r))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 3") && err.contains("`answer`"), "{err}");
        let err = judge.score(&[sample("x", None)]).unwrap_err().to_string();
        assert!(err.contains("no row"), "{err}");
    }

    #[test]
    fn regex_scores_one_when_found() {
        let judge = rule(Rule::Regex, None, Some(r"\bgreat\b"), None);
        assert_eq!(
            judge
                .score(&[sample("a great film", None), sample("greatly", None)])
                .unwrap(),
            vec![1.0, 0.0]
        );
        let bad = Scorer::rule(&RuleJudge {
            rule: Rule::Regex,
            column: None,
            pattern: Some("(ab".into()),
            target: None,
        });
        assert!(bad.err().unwrap().to_string().contains("invalid regex"));
    }

    #[test]
    fn length_is_zero_at_the_target_and_falls_linearly() {
        let judge = rule(Rule::Length, None, None, Some(4));
        let scores = judge
            .score(&[
                sample("abcd", None),
                sample("ab", None),
                sample("abcdéfgh", None),
            ])
            .unwrap();
        assert_eq!(scores, vec![0.0, -0.5, -1.0]);
        let zero = Scorer::rule(&RuleJudge {
            rule: Rule::Length,
            column: None,
            pattern: None,
            target: Some(0),
        });
        assert!(zero.is_err());
    }

    fn command(cmd: &str) -> Scorer {
        Scorer::command(
            &CommandJudge {
                command: cmd.into(),
                deps: Vec::new(),
            },
            &std::env::temp_dir(),
        )
    }

    const COUNT_A: &str = r#"python3 -c '
import json, sys
for line in sys.stdin:
    print(json.loads(line)["completion"].count("a"))
'"#;

    #[test]
    fn command_reads_jsonl_and_writes_one_number_per_line() {
        let samples = [
            sample("banana", None),
            sample("xyz", None),
            sample("a \"quoted\"\nline", None),
        ];
        assert_eq!(
            command(COUNT_A).score(&samples).unwrap(),
            vec![3.0, 0.0, 1.0]
        );
        // No samples: the command is not run.
        assert!(command("exit 1").score(&[]).unwrap().is_empty());
    }

    #[test]
    fn command_failures_name_the_command_and_show_stderr() {
        let err = command("echo something broke >&2; exit 3")
            .score(&[sample("a", None)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("judge command `echo something broke"), "{err}");
        assert!(
            err.contains("exit code 3") && err.contains("something broke"),
            "{err}"
        );
    }

    #[test]
    fn command_output_must_be_one_number_per_sample() {
        let two = [sample("a", None), sample("b", None)];
        let err = command("cat >/dev/null; echo 1")
            .score(&two)
            .unwrap_err()
            .to_string();
        assert!(err.contains("wrote 1 line(s) for 2 sample(s)"), "{err}");
        let err = command("cat >/dev/null; echo 1; echo oops")
            .score(&two)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2") && err.contains("`oops`"), "{err}");
        let err = command("cat >/dev/null; echo 1; echo nan")
            .score(&two)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn a_command_that_ignores_its_input_is_judged_by_its_output() {
        // Enough input to fill a pipe: the command must not deadlock, nor fail on SIGPIPE.
        let long = "x".repeat(200_000);
        let samples = [sample(&long, None), sample(&long, None)];
        assert_eq!(
            command("printf '1\\n2\\n'").score(&samples).unwrap(),
            vec![1.0, 2.0]
        );
    }
}
