//! Kinds that sample from models: generate, evaluate, constitutional critique-and-revise; and
//! export, which copies a model out of the store.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    Expect, FieldError, InputField, Judge, Kind, OneOrMany, Produces, Sampling, StageSpec,
    check_judge, input, inputs_list, judge_input, model_and_data, stage_common,
};
use crate::source::ValuePath;

/// Sample completions for a dataset of prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct GenerateParams {
    pub model: String,
    /// Prompts.
    pub data: String,
    /// Completions per prompt.
    #[schemars(range(min = 1))]
    pub num_samples: u32,
    #[schemars(range(min = 1))]
    pub batch_size: u32,
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            model: String::new(),
            data: String::new(),
            num_samples: 1,
            batch_size: 16,
            sampling: Sampling::default(),
        }
    }
}

impl Kind for GenerateParams {
    const REQUIRED: &'static [&'static str] = &["model", "data"];
    const NAME: &'static str = "generate";
    const SUMMARY: &'static str = "sample completions for prompts";
}

impl StageSpec for GenerateParams {
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        model_and_data(&self.model, &self.data)
    }
    fn produces(&self) -> Produces {
        Produces::Datasets(vec![("completions".into(), "completions.jsonl".into())])
    }
}

/// Compare models on prompts with a judge: mean score, win rate, KL, length, EOS rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct EvaluateParams {
    /// Models to evaluate.
    pub models: Vec<String>,
    /// Prompts (and answer columns for rule judges).
    pub data: String,
    pub judge: Judge,
    /// Model whose samples the others' win rate is measured against.
    pub baseline: Option<String>,
    /// Model that KL is measured to, on each model's own samples.
    pub reference: Option<String>,
    #[schemars(range(min = 1))]
    pub num_samples: u32,
    #[schemars(range(min = 1))]
    pub batch_size: u32,
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl Default for EvaluateParams {
    fn default() -> Self {
        Self {
            models: Vec::new(),
            data: String::new(),
            judge: Judge::Node(String::new()),
            baseline: None,
            reference: None,
            num_samples: 1,
            batch_size: 16,
            sampling: Sampling {
                temperature: 0.0,
                ..Sampling::default()
            },
        }
    }
}

impl Kind for EvaluateParams {
    const REQUIRED: &'static [&'static str] = &["models", "data", "judge"];
    const NAME: &'static str = "evaluate";
    const SUMMARY: &'static str = "score models with a judge";
}

impl StageSpec for EvaluateParams {
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        let mut inputs = inputs_list("models", &self.models, Expect::Model);
        inputs.push(input("data", &self.data, Expect::Dataset));
        inputs.extend(judge_input(&self.judge));
        if let Some(baseline) = &self.baseline {
            inputs.push(input("baseline", baseline, Expect::Model));
        }
        if let Some(reference) = &self.reference {
            inputs.push(input("reference", reference, Expect::Model));
        }
        inputs
    }
    fn produces(&self) -> Produces {
        Produces::Metrics
    }
    fn deps(&self) -> Vec<(ValuePath, String)> {
        judge_deps(&self.judge)
    }
    fn check(&self) -> Vec<FieldError> {
        let mut errors = check_judge(&self.judge);
        if self.models.is_empty() {
            errors.push(FieldError::new(
                ValuePath::root().key("models"),
                "evaluate needs at least one model",
            ));
        }
        errors
    }
}

/// A command judge's `deps` files, so that the scripts it runs are in the stage's key (the
/// command's text already is, as a parameter).
pub(crate) fn judge_deps(judge: &Judge) -> Vec<(ValuePath, String)> {
    match judge {
        Judge::Command(command) => command
            .deps
            .iter()
            .enumerate()
            .map(|(i, dep)| {
                (
                    ValuePath::root().key("judge").key("deps").index(i),
                    dep.clone(),
                )
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Critique and revise responses against principles; emits SFT and preference data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct ConstitutionalParams {
    pub model: String,
    /// Prompts.
    pub data: String,
    /// The principles: a list, or a file (one per line; in `.jsonl`, strings or objects with
    /// `principle`).
    pub principles: OneOrMany<String>,
    /// Jinja template of the critique request (`prompt`, `response`, `principle`).
    pub critique_template: Option<String>,
    /// Jinja template of the revision request (`prompt`, `response`, `critique`, `principle`).
    pub revision_template: Option<String>,
    /// Jinja template of the AI-feedback question (`prompt`, `principle`, `response_a`,
    /// `response_b`), answered by comparing the log-probs of " (A)" and " (B)".
    pub feedback_template: Option<String>,
    /// Critique-revise passes per prompt, each with a principle sampled with the seed.
    #[schemars(range(min = 1))]
    pub principles_per_prompt: u32,
    /// Pairs from the model's own choice between two samples (RLAIF) instead of revision over
    /// original.
    pub ai_feedback: bool,
    #[schemars(range(min = 1))]
    pub batch_size: u32,
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl Default for ConstitutionalParams {
    fn default() -> Self {
        Self {
            model: String::new(),
            data: String::new(),
            principles: OneOrMany::Many(Vec::new()),
            critique_template: None,
            revision_template: None,
            feedback_template: None,
            principles_per_prompt: 1,
            ai_feedback: false,
            batch_size: 16,
            sampling: Sampling::default(),
        }
    }
}

impl Kind for ConstitutionalParams {
    const REQUIRED: &'static [&'static str] = &["model", "data", "principles"];
    const NAME: &'static str = "constitutional";
    const SUMMARY: &'static str = "critique-and-revise data generation";
}

impl StageSpec for ConstitutionalParams {
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        let mut inputs = vec![
            input("model", &self.model, Expect::Model),
            input("data", &self.data, Expect::Dataset),
        ];
        // A single string is a file of principles; a node's output works too.
        if let OneOrMany::One(path) = &self.principles {
            inputs.push(InputField {
                may_be_path: true,
                ..input("principles", path, Expect::Dataset)
            });
        }
        inputs
    }
    fn produces(&self) -> Produces {
        Produces::Datasets(vec![
            ("revisions".into(), "revisions.jsonl".into()),
            ("pairs".into(), "pairs.jsonl".into()),
        ])
    }
    fn check(&self) -> Vec<FieldError> {
        let mut errors = Vec::new();
        if let OneOrMany::Many(list) = &self.principles
            && list.is_empty()
        {
            errors.push(FieldError::new(
                ValuePath::root().key("principles"),
                "give at least one principle",
            ));
        }
        for (field, template) in [
            ("critique_template", &self.critique_template),
            ("revision_template", &self.revision_template),
            ("feedback_template", &self.feedback_template),
        ] {
            if let Some(template) = template
                && let Err(err) = minijinja::Environment::new().template_from_str(template)
            {
                errors.push(FieldError::new(
                    ValuePath::root().key(field),
                    format!("invalid template: {err}"),
                ));
            }
        }
        errors
    }
}

/// Copy a model out of the store as a Hugging Face directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct ExportParams {
    pub model: String,
    /// Destination directory, relative to the recipe.
    pub out: String,
    /// For a model trained with LoRA: `true` writes the merged model, `false` the PEFT adapter
    /// alone (`adapter_config.json`, `adapter_model.safetensors`, the tokenizer).
    #[serde(skip_serializing_if = "is_true")]
    pub merge: bool,
}

impl Default for ExportParams {
    fn default() -> Self {
        Self {
            model: String::new(),
            out: String::new(),
            merge: true,
        }
    }
}

// `merge = true` is left out of the parameters, so that exports keep the keys they had before
// the field existed.
fn is_true(value: &bool) -> bool {
    *value
}

impl Kind for ExportParams {
    const REQUIRED: &'static [&'static str] = &["model", "out"];
    const NAME: &'static str = "export";
    const SUMMARY: &'static str = "write a model to a Hugging Face directory";
}

impl StageSpec for ExportParams {
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        vec![input("model", &self.model, Expect::Model)]
    }
    fn produces(&self) -> Produces {
        Produces::External
    }
    fn external_outputs(&self) -> Vec<String> {
        vec![self.out.clone()]
    }
    fn check(&self) -> Vec<FieldError> {
        if self.out.is_empty() {
            vec![FieldError::new(
                ValuePath::root().key("out"),
                "`out` must name a directory",
            )]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::CommandJudge;

    #[test]
    fn a_command_judge_declares_its_deps() {
        let params = EvaluateParams {
            judge: Judge::Command(CommandJudge {
                command: "python3 judge.py".into(),
                deps: vec!["judge.py".into(), "lib.py".into()],
            }),
            ..EvaluateParams::default()
        };
        let deps = params.deps();
        assert_eq!(deps.len(), 2);
        assert_eq!(
            deps[1],
            (
                ValuePath::root().key("judge").key("deps").index(1),
                "lib.py".to_owned()
            )
        );
        // The command's text is a parameter, so it is in the key as well.
        assert_eq!(params.key_params()["judge"]["command"], "python3 judge.py");
        assert!(EvaluateParams::default().deps().is_empty());
    }
}
