//! Online RL kinds: PPO with a critic, and the critic-free RLOO and GRPO. Defaults follow
//! "The N+ Implementation Details of RLHF with PPO" and TRL.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    Expect, FieldError, InputField, Judge, Kind, Produces, StageSpec, TrainArgs, check_judge,
    input, judge_input, stage_common,
};
use crate::source::ValuePath;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    K1,
    K3,
}

/// Adaptive KL controller (Ziegler et al. 2019).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveKl {
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub target: f64,
    #[schemars(range(min = 1))]
    pub horizon: u64,
}

/// Settings every online-RL kind shares: the rollout and its reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct RolloutArgs {
    /// Tokens generated per response.
    #[schemars(range(min = 1))]
    pub response_length: u32,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub temperature: f64,
    /// Subtracted from the score of responses that do not end in EOS.
    pub missing_eos_penalty: Option<f64>,
    /// Policy updates (one rollout batch each).
    #[schemars(range(min = 1))]
    pub num_iterations: u64,
    /// Prompts per rollout batch.
    #[schemars(range(min = 1))]
    pub rollout_batch_size: u32,
    #[schemars(range(min = 1))]
    pub num_mini_batches: u32,
    /// Write each iteration's prompts, responses, scores and KL to the artifact.
    pub save_rollouts: bool,
}

impl Default for RolloutArgs {
    fn default() -> Self {
        Self {
            response_length: 53,
            temperature: 0.7,
            missing_eos_penalty: None,
            num_iterations: 100,
            rollout_batch_size: 16,
            num_mini_batches: 1,
            save_rollouts: false,
        }
    }
}

/// The policy, its reference, its reward and its prompts: what every online-RL kind names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct PolicyArgs {
    /// The policy's starting model.
    pub model: String,
    /// Frozen reference for the KL term; defaults to `model`.
    pub reference: Option<String>,
    /// A reward-model node, or a rule or command judge.
    pub reward: Judge,
    /// Prompts.
    pub data: String,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub learning_rate: f64,
}

impl PolicyArgs {
    fn with_learning_rate(learning_rate: f64) -> Self {
        Self {
            model: String::new(),
            reference: None,
            reward: Judge::Node(String::new()),
            data: String::new(),
            learning_rate,
        }
    }

    /// The model, reference, reward-model and prompt references.
    fn inputs(&self) -> Vec<InputField> {
        let mut inputs = vec![input("model", &self.model, Expect::Model)];
        if let Some(reference) = &self.reference {
            inputs.push(input("reference", reference, Expect::Model));
        }
        if let Some(mut judge) = judge_input(&self.reward) {
            judge.role = "reward".into();
            judge.path = ValuePath::root().key("reward");
            inputs.push(judge);
        }
        inputs.push(input("data", &self.data, Expect::Dataset));
        inputs
    }
}

impl Default for PolicyArgs {
    fn default() -> Self {
        Self::with_learning_rate(3e-6)
    }
}

/// Checks what the online-RL kinds share, so that no setting is silently ignored: the reward
/// judge's fields, and that every minibatch gets the same share of a rollout's rows (as TRL
/// requires). `generations` is the number of samples per prompt (1 for PPO).
fn check_online(
    policy: &PolicyArgs,
    rollout: &RolloutArgs,
    train: &TrainArgs,
    generations: u32,
) -> Vec<FieldError> {
    let mut errors: Vec<FieldError> = check_judge(&policy.reward)
        .into_iter()
        .map(|mut e| {
            let mut segs = e.path.0;
            segs[0] = crate::source::Seg::Key("reward".into());
            e.path = ValuePath(segs);
            e
        })
        .collect();
    errors.extend(train.check_lora(Produces::Model));
    let rows = rollout.rollout_batch_size * generations;
    if !rows.is_multiple_of(rollout.num_mini_batches) {
        errors.push(FieldError::new(
            ValuePath::root().key("num_mini_batches"),
            format!(
                "num_mini_batches ({}) must divide the rows of a rollout ({rows} = \
                 rollout_batch_size {} x {generations} samples per prompt)",
                rollout.num_mini_batches, rollout.rollout_batch_size
            ),
        ));
    }
    if train.max_steps.is_some() {
        errors.push(FieldError::new(
            ValuePath::root().key("max_steps"),
            "max_steps does not apply to RL stages; set num_iterations (rollout batches)",
        ));
    }
    if train.gradient_accumulation_steps != 1 {
        errors.push(FieldError::new(
            ValuePath::root().key("gradient_accumulation_steps"),
            "gradient_accumulation_steps does not apply to RL stages: each of the \
             num_mini_batches minibatches is one optimiser step, run in micro-batches of \
             batch_size",
        ));
    }
    errors
}

/// PPO with a value model, a frozen reference and a per-token KL penalty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct PpoParams {
    #[serde(flatten)]
    pub policy: PolicyArgs,
    /// Initial value model; defaults to the reward model when it is a node, else the policy.
    pub value_model: Option<String>,
    #[schemars(range(min = 0.0))]
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub adaptive_kl: Option<AdaptiveKl>,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub cliprange: f64,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub cliprange_value: f64,
    #[schemars(range(min = 0.0))]
    pub vf_coef: f64,
    #[schemars(range(min = 0.0, max = 1.0))]
    pub gamma: f64,
    #[schemars(range(min = 0.0, max = 1.0))]
    pub lam: f64,
    pub whiten_rewards: bool,
    #[schemars(range(min = 1))]
    pub ppo_epochs: u32,
    #[serde(flatten)]
    pub rollout: RolloutArgs,
    #[serde(flatten)]
    pub train: TrainArgs,
}

impl Default for PpoParams {
    fn default() -> Self {
        Self {
            policy: PolicyArgs::default(),
            value_model: None,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            adaptive_kl: None,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            gamma: 1.0,
            lam: 0.95,
            whiten_rewards: false,
            ppo_epochs: 4,
            rollout: RolloutArgs::default(),
            train: TrainArgs::default(),
        }
    }
}

impl Kind for PpoParams {
    const REQUIRED: &'static [&'static str] = &["model", "reward", "data"];
    const NAME: &'static str = "ppo";
    const SUMMARY: &'static str = "PPO with a critic against a reward model or judge";
}

impl StageSpec for PpoParams {
    fn train_args(&self) -> Option<&TrainArgs> {
        Some(&self.train)
    }
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        let mut inputs = self.policy.inputs();
        if let Some(value_model) = &self.value_model {
            inputs.push(input("value_model", value_model, Expect::Model));
        }
        inputs
    }
    fn produces(&self) -> Produces {
        Produces::Model
    }
    fn check(&self) -> Vec<FieldError> {
        check_online(&self.policy, &self.rollout, &self.train, 1)
    }
}

/// REINFORCE leave-one-out: several samples per prompt, each baselined by the others' mean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct RlooParams {
    #[serde(flatten)]
    pub policy: PolicyArgs,
    /// Samples per prompt.
    #[schemars(range(min = 2))]
    pub num_generations: u32,
    /// Coefficient of the KL term.
    #[schemars(range(min = 0.0))]
    pub beta: f64,
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub cliprange: f64,
    #[schemars(range(min = 1))]
    pub ppo_epochs: u32,
    #[serde(flatten)]
    pub rollout: RolloutArgs,
    #[serde(flatten)]
    pub train: TrainArgs,
}

impl Default for RlooParams {
    fn default() -> Self {
        Self {
            policy: PolicyArgs::default(),
            num_generations: 4,
            beta: 0.05,
            cliprange: 0.2,
            ppo_epochs: 1,
            rollout: RolloutArgs::default(),
            train: TrainArgs::default(),
        }
    }
}

impl Kind for RlooParams {
    const REQUIRED: &'static [&'static str] = &["model", "reward", "data"];
    const NAME: &'static str = "rloo";
    const SUMMARY: &'static str = "REINFORCE leave-one-out";
}

impl StageSpec for RlooParams {
    fn train_args(&self) -> Option<&TrainArgs> {
        Some(&self.train)
    }
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        self.policy.inputs()
    }
    fn produces(&self) -> Produces {
        Produces::Model
    }
    fn check(&self) -> Vec<FieldError> {
        check_online(
            &self.policy,
            &self.rollout,
            &self.train,
            self.num_generations,
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLossType {
    Grpo,
    Bnpo,
    DrGrpo,
    Dapo,
}

/// Group relative policy optimisation: advantages normalised within each prompt's group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default)]
pub struct GrpoParams {
    #[serde(flatten)]
    pub policy: PolicyArgs,
    #[schemars(range(min = 2))]
    pub num_generations: u32,
    /// Coefficient of the k3 KL term; 0 drops the reference model.
    #[schemars(range(min = 0.0))]
    pub beta: f64,
    /// Clipping range of the probability ratio.
    #[schemars(extend("exclusiveMinimum" = 0.0))]
    pub epsilon: f64,
    pub loss_type: GrpoLossType,
    /// Divide advantages by the group's reward standard deviation.
    pub scale_rewards: bool,
    #[schemars(range(min = 1))]
    pub ppo_epochs: u32,
    #[serde(flatten)]
    pub rollout: RolloutArgs,
    #[serde(flatten)]
    pub train: TrainArgs,
}

impl Default for GrpoParams {
    fn default() -> Self {
        Self {
            policy: PolicyArgs::with_learning_rate(1e-6),
            num_generations: 8,
            beta: 0.0,
            epsilon: 0.2,
            loss_type: GrpoLossType::Dapo,
            scale_rewards: true,
            ppo_epochs: 1,
            rollout: RolloutArgs::default(),
            train: TrainArgs::default(),
        }
    }
}

impl Kind for GrpoParams {
    const REQUIRED: &'static [&'static str] = &["model", "reward", "data"];
    const NAME: &'static str = "grpo";
    const SUMMARY: &'static str = "group relative policy optimisation";
}

impl StageSpec for GrpoParams {
    fn train_args(&self) -> Option<&TrainArgs> {
        Some(&self.train)
    }
    stage_common!();
    fn inputs(&self) -> Vec<InputField> {
        self.policy.inputs()
    }
    fn produces(&self) -> Produces {
        Produces::Model
    }
    fn check(&self) -> Vec<FieldError> {
        check_online(
            &self.policy,
            &self.rollout,
            &self.train,
            self.num_generations,
        )
    }
}
