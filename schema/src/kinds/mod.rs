//! Stage kinds: one typed parameter struct per kind, with its defaults and valid ranges, and
//! what the engine needs to know about it without running it: which fields reference other
//! nodes, what it produces, and which internal parts it expands into.
//!
//! Adding a kind means adding its module here with its struct and one line in [`KINDS`] (and
//! its runner in `stages`); the engine never changes. A kind names itself once, in
//! [`Kind::NAME`]; its internal parts' kinds are `NAME/PART` ([`part_kind`]). The JSON Schema of every kind is derived from these structs, and validation runs
//! against that same schema, so documentation, editor completion and checks never disagree.

mod command;
pub mod common;
mod dpo;
mod generation;
mod iterative_dpo;
mod kto;
mod preference;
mod reference_free;
mod rl;
mod training;

use std::any::Any;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use command::{CommandParams, SandboxMode, SandboxSetting};
pub use common::*;
pub use dpo::{DpoLossArgs, DpoLossType, DpoParams, FDivergenceType};
pub use generation::{ConstitutionalParams, EvaluateParams, ExportParams, GenerateParams};
pub use iterative_dpo::{
    IterativeDpoParams, Pairing, ROUND_PART, RoundOverrides, RoundReference, RoundSettings,
};
pub use kto::{KtoLossType, KtoParams};
pub use preference::{PreferenceTokens, REF_LOGPS_PART};
pub use reference_free::{CpoLossType, OrpoParams, SimpoParams};
pub use rl::{
    AdaptiveKl, GrpoLossType, GrpoParams, KlEstimator, PolicyArgs, PpoParams, RlooParams,
    RolloutArgs,
};
pub use training::{PretrainParams, RewardParams, SftParams, TokenizerParams};

use crate::source::ValuePath;

/// What a referenced node must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Model,
    Dataset,
    Tokenizer,
    /// A model that can score (a reward model), as a judge.
    Judge,
    /// Anything: command inputs and ordering edges.
    Any,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expect::Model => "a model",
            Expect::Dataset => "a dataset",
            Expect::Tokenizer => "a tokenizer",
            Expect::Judge => "a reward model",
            Expect::Any => "a node",
        })
    }
}

/// A parameter that names another node.
#[derive(Debug, Clone, PartialEq)]
pub struct InputField {
    /// Role in the key: the field's path, e.g. `model` or `models[1]`. Never the node's name.
    pub role: String,
    /// Path of the field inside the stage table (for error locations).
    pub path: ValuePath,
    /// The written reference: `node` or `node.output`.
    pub target: String,
    pub expect: Expect,
    /// The string may also be a file path relative to the recipe when it names no node.
    pub may_be_path: bool,
}

/// What a stage's artifact is.
#[derive(Debug, Clone, PartialEq)]
pub enum Produces {
    /// A Hugging Face model directory.
    Model,
    /// A model with a scalar head (reward or value model).
    RewardModel,
    /// A directory with `tokenizer.json`.
    Tokenizer,
    /// Named data files; a reference without `.output` means the first.
    Datasets(Vec<(String, String)>),
    /// Evaluation results (`eval.json`, `samples.jsonl`).
    Metrics,
    /// Files declared by a command stage: `(output name, relative path)`.
    Files(Vec<(String, String)>),
    /// A copy written outside the store (export).
    External,
}

impl Produces {
    /// Whether a reference to this node (through `output`, if given) satisfies `expect`.
    pub fn satisfies(&self, expect: Expect) -> bool {
        match (self, expect) {
            (_, Expect::Any) => true,
            (Produces::Model | Produces::RewardModel, Expect::Model) => true,
            (Produces::RewardModel, Expect::Judge) => true,
            // A model directory from disk may hold a sequence-classification head; the judge
            // checks the architecture when it loads it.
            (Produces::Model, Expect::Judge) => true,
            (Produces::Tokenizer, Expect::Tokenizer) => true,
            (Produces::Datasets(_), Expect::Dataset) => true,
            // A command's outputs are whatever its script wrote: trust the recipe.
            (Produces::Files(_), _) => true,
            _ => false,
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Produces::Model => "a model",
            Produces::RewardModel => "a reward model",
            Produces::Tokenizer => "a tokenizer",
            Produces::Datasets(_) => "datasets",
            Produces::Metrics => "metrics",
            Produces::Files(_) => "files",
            Produces::External => "an export",
        }
    }

    /// The named outputs a reference may select with `node.output`.
    pub fn outputs(&self) -> &[(String, String)] {
        match self {
            Produces::Datasets(outputs) | Produces::Files(outputs) => outputs,
            _ => &[],
        }
    }
}

/// An internal node a stage expands into, with a key of its own (DPO's reference log-probs,
/// one round of iterative DPO). It is shown as `stage/name`.
#[derive(Debug, Clone, PartialEq)]
pub struct PartSpec {
    pub name: String,
    /// Its runner's kind, e.g. `dpo/ref_logps`.
    pub kind: String,
    /// Everything besides its inputs that determines its output.
    pub params: Value,
    /// `(role, source)` pairs.
    pub inputs: Vec<(String, PartInput)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PartInput {
    /// The node bound to one of the stage's own input roles.
    Role(String),
    /// An earlier part of the same stage.
    Part(String),
}

/// A stage's internal parts, and which of them the stage itself reads (by role).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expansion {
    pub parts: Vec<PartSpec>,
    pub stage_inputs: Vec<(String, String)>,
}

/// A semantic error in one field, found after the schema accepted its type and range.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub path: ValuePath,
    pub message: String,
}

impl FieldError {
    pub fn new(path: ValuePath, message: impl Into<String>) -> Self {
        Self {
            path,
            message: message.into(),
        }
    }
}

/// A parsed stage's parameters, seen through what the engine needs.
pub trait StageSpec: fmt::Debug + Send + Sync + Any {
    fn kind(&self) -> &'static str;
    fn inputs(&self) -> Vec<InputField>;
    fn produces(&self) -> Produces;
    fn expand(&self) -> Expansion {
        Expansion::default()
    }
    /// Paths outside the store that the stage writes, relative to the recipe. A stage whose
    /// artifact is in the store runs again when one of them is missing.
    fn external_outputs(&self) -> Vec<String> {
        Vec::new()
    }
    /// Plain files the stage reads besides its inputs, relative to the recipe: their content
    /// is part of the stage's key. `(field path, file path)` pairs.
    fn deps(&self) -> Vec<(ValuePath, String)> {
        Vec::new()
    }
    /// Paths a sandboxed stage may read besides its inputs and `deps`, relative to the recipe
    /// or absolute: files among them are part of the key by content, directories are not.
    fn read_paths(&self) -> Vec<(ValuePath, String)> {
        Vec::new()
    }
    /// Checks across fields that a schema cannot express.
    fn check(&self) -> Vec<FieldError> {
        Vec::new()
    }
    /// Every parameter, defaults filled in: what the lockfile records and `plan` compares.
    fn params(&self) -> Value;
    /// The parameters that determine the stage's own artifact (before [`NOT_IN_KEY`] fields are
    /// dropped). Usually all of them; a stage that is the last of its rounds keys only that round.
    fn key_params(&self) -> Value {
        without_references(self.params(), &self.inputs())
    }
    /// The kind whose implementation builds the stage's own artifact (and whose version is in
    /// its key): the stage's kind, or the kind of the part it shares its key scheme with.
    fn key_kind(&self) -> String {
        self.kind().to_owned()
    }
    /// The training loop's arguments of a training kind (`None` for every other kind), so
    /// that the engine and the runners read `lora`, `gradient_checkpointing` and the batch
    /// settings by type.
    fn train_args(&self) -> Option<&TrainArgs> {
        None
    }
    fn as_any(&self) -> &dyn Any;
}

/// Implemented by each kind's parameter struct.
pub trait Kind: StageSpec + Serialize + DeserializeOwned + JsonSchema + Sized + 'static {
    const NAME: &'static str;
    const SUMMARY: &'static str;
    /// Fields without a default. (The structs default every field so that serde fills in
    /// defaults; this list is what the schema marks `required`.)
    const REQUIRED: &'static [&'static str];
    /// The kinds of internal part this kind may expand into, by part name: `dpo` has
    /// `ref_logps`, whose vertices have kind `dpo/ref_logps`.
    const PARTS: &'static [&'static str] = &[];
}

/// The kind of a stage kind's part: `dpo` and `ref_logps` give `dpo/ref_logps`.
pub fn part_kind(kind: &str, part: &str) -> String {
    format!("{kind}/{part}")
}

/// Everything known about one stage kind.
pub struct KindInfo {
    pub name: &'static str,
    pub summary: &'static str,
    pub required: &'static [&'static str],
    /// Part names ([`Kind::PARTS`]).
    pub parts: &'static [&'static str],
    pub schema: fn(&mut SchemaGenerator) -> Schema,
    pub parse: fn(Value) -> Result<Box<dyn StageSpec>, serde_json::Error>,
}

const fn info<K: Kind>() -> KindInfo {
    KindInfo {
        name: K::NAME,
        summary: K::SUMMARY,
        required: K::REQUIRED,
        parts: K::PARTS,
        schema: |generator| generator.subschema_for::<K>(),
        parse: |value| Ok(Box::new(serde_json::from_value::<K>(value)?)),
    }
}

/// Every stage kind, in the order the documentation lists them.
pub static KINDS: &[KindInfo] = &[
    info::<TokenizerParams>(),
    info::<PretrainParams>(),
    info::<SftParams>(),
    info::<RewardParams>(),
    info::<DpoParams>(),
    info::<KtoParams>(),
    info::<OrpoParams>(),
    info::<SimpoParams>(),
    info::<PpoParams>(),
    info::<RlooParams>(),
    info::<GrpoParams>(),
    info::<IterativeDpoParams>(),
    info::<ConstitutionalParams>(),
    info::<GenerateParams>(),
    info::<EvaluateParams>(),
    info::<CommandParams>(),
    info::<ExportParams>(),
];

pub fn kind_info(name: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| k.name == name)
}

/// Serialise parameters for keys and lockfiles.
pub(crate) fn to_params<T: Serialize>(params: &T) -> Value {
    serde_json::to_value(params).expect("parameter structs serialise to JSON")
}

/// A required reference field.
pub(crate) fn input(role: &str, target: &str, expect: Expect) -> InputField {
    InputField {
        role: role.to_owned(),
        path: ValuePath::root().key(role),
        target: target.to_owned(),
        expect,
        may_be_path: false,
    }
}

/// Parameters with every reference field emptied: a reference enters a key as its target's
/// key (by role), never as the target's name, so renaming a node changes no key.
pub fn without_references(mut params: Value, inputs: &[InputField]) -> Value {
    for input in inputs {
        let mut slot = Some(&mut params);
        for seg in &input.path.0 {
            slot = match (slot, seg) {
                (Some(Value::Object(map)), crate::source::Seg::Key(k)) => map.get_mut(k),
                (Some(Value::Array(items)), crate::source::Seg::Index(i)) => items.get_mut(*i),
                _ => None,
            };
        }
        if let Some(value) = slot {
            *value = Value::Null;
        }
    }
    params
}

/// The `model` and `data` references most kinds have.
pub(crate) fn model_and_data(model: &str, data: &str) -> Vec<InputField> {
    vec![
        input("model", model, Expect::Model),
        input("data", data, Expect::Dataset),
    ]
}

/// A list of references, roles `field[i]`.
pub(crate) fn inputs_list(field: &str, targets: &[String], expect: Expect) -> Vec<InputField> {
    targets
        .iter()
        .enumerate()
        .map(|(i, target)| InputField {
            role: format!("{field}[{i}]"),
            path: ValuePath::root().key(field).index(i),
            target: target.clone(),
            expect,
            may_be_path: false,
        })
        .collect()
}

/// The judge's reference, when the judge is a node.
pub(crate) fn judge_input(judge: &Judge) -> Option<InputField> {
    match judge {
        Judge::Node(name) => Some(input("judge", name, Expect::Judge)),
        _ => None,
    }
}

/// Checks a rule judge's fields fit its rule.
pub(crate) fn check_judge(judge: &Judge) -> Vec<FieldError> {
    let at = |field: &str| ValuePath::root().key("judge").key(field);
    match judge {
        Judge::Rule(rule) => match rule.rule {
            Rule::ExactMatch if rule.column.is_none() => vec![FieldError::new(
                at("rule"),
                "rule `exact_match` needs `column`, the dataset column holding the answer",
            )],
            Rule::Regex if rule.pattern.is_none() => {
                vec![FieldError::new(at("rule"), "rule `regex` needs `pattern`")]
            }
            Rule::Length if rule.target.is_none() => vec![FieldError::new(
                at("rule"),
                "rule `length` needs `target`, the best length in characters",
            )],
            _ => rule
                .pattern
                .as_deref()
                .and_then(|p| regex_syntax_error(p).map(|e| FieldError::new(at("pattern"), e)))
                .into_iter()
                .collect(),
        },
        _ => Vec::new(),
    }
}

fn regex_syntax_error(pattern: &str) -> Option<String> {
    regex_syntax::Parser::new().parse(pattern).err().map(|e| {
        format!(
            "invalid regex: {}",
            e.to_string().lines().last().unwrap_or("")
        )
    })
}

/// `impl StageSpec` boilerplate shared by every kind: kind name, params, `as_any`.
macro_rules! stage_common {
    () => {
        fn kind(&self) -> &'static str {
            <Self as $crate::kinds::Kind>::NAME
        }
        fn params(&self) -> serde_json::Value {
            $crate::kinds::to_params(self)
        }
        fn as_any(&self) -> &dyn std::any::Any {
            self
        }
    };
}
pub(crate) use stage_common;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_unique() {
        let mut names: Vec<_> = KINDS.iter().map(|k| k.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }

    #[test]
    fn judge_rules_need_their_fields() {
        let judge = Judge::Rule(RuleJudge {
            rule: Rule::ExactMatch,
            column: None,
            pattern: None,
            target: None,
        });
        let errors = check_judge(&judge);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.contains("needs `column`"));
        let bad_regex = Judge::Rule(RuleJudge {
            rule: Rule::Regex,
            column: None,
            pattern: Some("(ab".into()),
            target: None,
        });
        assert!(
            check_judge(&bad_regex)[0]
                .message
                .starts_with("invalid regex")
        );
    }
}
