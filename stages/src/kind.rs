//! The typed kind interface: how a stage kind of this crate is written and how it plugs into
//! the engine. A kind is one type that names itself once, through its schema parameters
//! ([`rudder_schema::kinds::Kind::NAME`]), and says what version of its implementation it is:
//!
//! ```text
//!   impl StageKind for Sft {            schema: SftParams::NAME = "sft"
//!       type Params = SftParams;        engine: runner of kind "sft", version 2
//!       const VERSION: u32 = 2;
//!       fn run(stage, device) { ... }
//!   }
//! ```
//!
//! A part of a kind (`dpo/ref_logps`) is a kind whose `PART` names it; it is given its stage's
//! parameters. [`runner`] and [`host_runner`] wrap a kind into the engine's `Runner`; the one
//! list of them is `kinds::register`. Owns the adapters and [`Stage`], the typed view of the
//! engine's `StageContext`; what a kind does is its module's.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::Device;
use rudder_engine::runner::{Progress, Runner, StageContext, StageOutcome, StageResult};
use rudder_schema::StageSpec;
use rudder_schema::kinds::{Kind as Schema, PartSpec, part_kind};

use rudder_schema::kinds::{ADAPTER_BASE_ROLE, PREVIOUS_ROUND_ROLE, TrainArgs, continues_adapters};

use crate::artifacts::{ADAPTER_DIR, METRICS_FILE};
use crate::backend::training_device;
use crate::inputs::Inputs;
use crate::model::lora::{self, Adaptable};
use crate::model::{CausalLm, ModelConfig, load_causal_lm};
use crate::padding::Pad;
use crate::train::{
    MetricsWriter, Objective, StageHooks, TrainConfig, TrainError, TrainReport, train,
};

/// A stage kind (or a part of one) whose work runs on a compute backend. `device` is the
/// autodiff form of the recipe's device: training runs on it, inference on `device.inner()`.
pub trait StageKind: 'static {
    /// The recipe parameters of the kind (for a part: of the stage it belongs to).
    type Params: Schema;
    /// `Some(name)` for a part of `Params`' kind (`ref_logps`), `None` for the stage itself.
    const PART: Option<&'static str> = None;
    /// Bumped whenever the implementation changes what it produces, including through the
    /// backend's kernels (a new Burn): part of every key.
    const VERSION: u32;
    /// Whether the kind reads the weights of an adapter it continues merged into its base,
    /// besides training that adapter (PPO may start its value model from the policy, an
    /// `iterative_dpo` round samples from its starting model): then a model node's adapter is
    /// merged into a scratch copy of the base, as for a stage that does not continue it.
    /// Otherwise the stage loads the base once and attaches the adapter.
    const READS_CONTINUED_MERGED: bool = false;
    fn run(stage: &Stage<'_, Self::Params>, device: &Device) -> Result<StageOutcome, TrainError>;
}

/// A stage kind whose work needs no compute backend (tokenizer training, export).
pub trait HostKind: 'static {
    type Params: Schema;
    const VERSION: u32;
    fn run(stage: &Stage<'_, Self::Params>) -> Result<StageOutcome, TrainError>;
}

/// The stage being run, typed: its parameters, its inputs, and where it writes.
pub struct Stage<'a, P> {
    pub params: &'a P,
    pub inputs: Inputs,
    /// The incoming adapter a `lora` stage trains further, when it continues one.
    continued: Option<Continued>,
    ctx: &'a StageContext<'a>,
}

/// An incoming LoRA adapter that a stage continues: the adapter directory and the base model
/// it was trained on (the engine binds the base as [`ADAPTER_BASE_ROLE`]).
#[derive(Debug, Clone)]
pub struct Continued {
    pub base: PathBuf,
    pub adapter: PathBuf,
}

impl<'a, P: Schema> Stage<'a, P> {
    /// The typed view of `ctx`; its parameters must be `P`'s. `reads_merged`: see
    /// [`StageKind::READS_CONTINUED_MERGED`].
    pub fn new(ctx: &'a StageContext<'a>, reads_merged: bool) -> Result<Self, TrainError> {
        let params = ctx.params().ok_or_else(|| {
            TrainError::Input(format!(
                "the parameters of `{}` are not those of kind `{}`",
                ctx.name,
                P::NAME
            ))
        })?;
        let mut inputs = Inputs::resolve(&ctx.inputs);
        // The engine binds the adapter's base only to the vertices that train it (the stage,
        // an `iterative_dpo` round); parts such as reference log-probs read the incoming
        // policy, base + adapter merged, as any model. A round after the first continues the
        // previous round's adapter.
        let role = match inputs.has(PREVIOUS_ROUND_ROLE) {
            true => PREVIOUS_ROUND_ROLE,
            false => "model",
        };
        let adapter = match inputs.has(ADAPTER_BASE_ROLE) {
            true => Some(inputs.incoming_adapter(role)?),
            false => None,
        };
        if adapter.is_some() && !reads_merged {
            // Only the base's configuration and tokenizer are read from this model; its
            // weights come from the base and the adapter.
            inputs.unmerged_base(role);
        }
        inputs.merge_adapters(ctx.work_dir, ctx.backend)?;
        let continued = match adapter {
            Some(adapter) => Some(Continued {
                base: inputs.model_dir(ADAPTER_BASE_ROLE)?,
                adapter,
            }),
            None => None,
        };
        Ok(Self {
            params,
            inputs,
            continued,
            ctx,
        })
    }
}

impl<P: StageSpec> Stage<'_, P> {
    /// How this stage pads its batches: with `pad_id`, to a multiple of its training options'
    /// `pad_to_multiple_of`, or (unset, or a kind without training options) of the backend's
    /// default: exact lengths on `cpu`. The backend is part of the key, so the multiple is too.
    pub fn pad(&self, pad_id: u32) -> Pad {
        let multiple = match self.params.train_args() {
            Some(train) => train.pad_multiple(self.ctx.backend),
            None => self.ctx.backend.default_pad_multiple(),
        };
        Pad::new(pad_id, multiple)
    }
}

impl<P> Stage<'_, P> {
    /// The vertex name: `stage` or `stage/part`.
    pub fn name(&self) -> &str {
        self.ctx.name
    }

    /// The part being run, when this is a part's vertex.
    pub fn part(&self) -> Option<&PartSpec> {
        self.ctx.part
    }

    pub fn seed(&self) -> u64 {
        self.ctx.seed
    }

    /// Where the artifact's files go.
    pub fn out_dir(&self) -> &Path {
        self.ctx.out_dir
    }

    /// Persistent across attempts: checkpoints to resume from.
    pub fn work_dir(&self) -> &Path {
        self.ctx.work_dir
    }

    /// Relative paths of the recipe (judge commands) start here.
    pub fn recipe_dir(&self) -> &Path {
        self.ctx.recipe_dir
    }

    pub fn progress(&self) -> &dyn Progress {
        self.ctx.progress
    }

    /// Set on Ctrl-C: checkpoint and return.
    pub fn is_interrupted(&self) -> bool {
        self.ctx.is_interrupted()
    }

    /// The training loop's settings for this stage, checkpointing into its work directory.
    pub fn train_config(&self, learning_rate: f64, args: &TrainArgs) -> TrainConfig {
        TrainConfig::new(learning_rate, args, self.seed(), Some(self.work_dir()))
    }

    /// The model to train under `args`: with a `lora` table, `model` frozen with fresh adapters
    /// (drawn from the stage's seed) on its targeted layers; otherwise `model` itself.
    pub fn adapt<M: Adaptable>(&self, model: M, args: &TrainArgs) -> Result<M, TrainError> {
        match &args.lora {
            Some(lora) => Ok(lora::attach(model, lora, self.seed())?),
            None => Ok(model),
        }
    }

    /// The incoming adapter this stage continues, if it continues one.
    pub fn continued(&self) -> Option<&Continued> {
        self.continued.as_ref()
    }

    /// The language model a training stage starts from, ready to train under `args`: when the
    /// stage continues an incoming adapter, its base with that adapter attached (the adapter's
    /// settings must be the stage's `lora`); otherwise the model in `dir` through
    /// [`Stage::adapt`].
    pub fn trainable_lm(
        &self,
        dir: &Path,
        args: &TrainArgs,
        device: &Device,
    ) -> Result<(ModelConfig, CausalLm), TrainError> {
        match (&args.lora, &self.continued) {
            (Some(wanted), Some(continued)) => {
                let (config, base) = load_causal_lm(&continued.base, device)?;
                let (model, incoming) = lora::load_adapter(base, &continued.adapter)?;
                if let Some((setting, ours, theirs)) = wanted.differs_from(&incoming) {
                    return Err(TrainError::Input(format!(
                        "the stage continues the LoRA adapter in {}, whose `{setting}` is {theirs}, but its `lora` has {ours}; make them agree, or set `merge_adapter = true` to train a fresh adapter on the merged model",
                        continued.adapter.display()
                    )));
                }
                Ok((config, lora::with_dropout(model, wanted.dropout)))
            }
            _ => {
                let (config, model) = load_causal_lm(dir, device)?;
                Ok((config, self.adapt(model, args)?))
            }
        }
    }

    /// The reference of an RL stage whose reference is its own policy, trained with `lora`: the
    /// policy with its adapters disabled, as TRL does with PEFT, or, when the stage continues
    /// an incoming adapter, the policy as it starts (base + that adapter, frozen). Either way
    /// it shares the frozen base's tensors instead of loading a second copy.
    pub fn lora_reference(&self, policy: &CausalLm) -> CausalLm {
        match self.continued {
            Some(_) => policy.valid(),
            None => lora::without_adapters(policy).valid(),
        }
    }

    /// Trains `model` on `examples` for this stage: progress and Ctrl-C through the engine,
    /// `metrics.jsonl` into the artifact, checkpoints as `cfg` says.
    pub fn fit<O: Objective>(
        &self,
        objective: &O,
        model: O::Model,
        examples: &[O::Example],
        cfg: &TrainConfig,
        device: &Device,
    ) -> Result<(O::Model, TrainReport), TrainError> {
        let mut writer =
            MetricsWriter::create(&self.out_dir().join(METRICS_FILE), cfg.logging_steps)?
                .report_to(&cfg.report_to)?;
        let interrupted = || self.is_interrupted();
        let compile_time = crate::train::hooks::CompileTime::on(device);
        let mut hooks = StageHooks::new(self.progress(), &interrupted, compile_time);
        train(
            objective,
            model,
            examples,
            cfg,
            device,
            Some(&mut writer),
            &mut hooks,
        )
    }
}

/// The engine's runner of a [`StageKind`].
pub fn runner<K: StageKind>() -> impl Runner {
    DeviceRunner::<K> {
        kind: kind_name::<K::Params>(K::PART),
        kind_type: PhantomData,
    }
}

/// The engine's runner of a [`HostKind`].
pub fn host_runner<K: HostKind>() -> impl Runner {
    HostRunner::<K> {
        kind_type: PhantomData,
    }
}

fn kind_name<P: Schema>(part: Option<&str>) -> String {
    match part {
        Some(part) => part_kind(P::NAME, part),
        None => P::NAME.to_owned(),
    }
}

struct DeviceRunner<K> {
    kind: String,
    kind_type: PhantomData<fn() -> K>,
}

impl<K: StageKind> Runner for DeviceRunner<K> {
    fn kind(&self) -> &str {
        &self.kind
    }

    fn version(&self) -> u32 {
        K::VERSION
    }

    fn run(&self, ctx: &StageContext<'_>) -> StageResult {
        let stage = Stage::<K::Params>::new(ctx, K::READS_CONTINUED_MERGED)?;
        let train = stage.params.train_args();
        let mut device = training_device(ctx.backend)?;
        if train.is_some_and(|t| t.gradient_checkpointing) {
            device = device.gradient_checkpointing();
        }
        crate::precision::check_supported(ctx.precision, ctx.backend, &device)?;
        // The stage's share of the cores: the CPU backend's parallel kernels run on this pool.
        // No kernel's result depends on the pool's size (tests/threads.rs checks it).
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(ctx.threads.max(1))
            .thread_name(|i| format!("rudder-stage-{i}"))
            .build()
            .map_err(|e| TrainError::Input(format!("cannot start the stage's threads: {e}")))?;
        // Every model the stage builds computes in its precision (`crate::precision`).
        let outcome =
            pool.install(|| crate::precision::scoped(ctx.precision, || K::run(&stage, &device)))?;
        // Every vertex that trains an adapter (the stage, an `iterative_dpo` round) names its
        // base; the others write no adapter.
        let adapter_dir = ctx.out_dir.join(ADAPTER_DIR);
        if train.is_some_and(|t| t.lora.is_some())
            && continues_adapters(K::Params::NAME)
            && adapter_dir.join(lora::ADAPTER_CONFIG_FILE).is_file()
        {
            let base = match stage.continued {
                Some(_) => stage.inputs.key(ADAPTER_BASE_ROLE)?,
                None => stage.inputs.key("model")?,
            };
            name_adapter_base(&adapter_dir, &base.to_string())?;
        }
        Ok(outcome)
    }
}

/// Names the base an adapter was trained on in its `adapter_config.json`
/// (`base_model_name_or_path`): the base's key in the store (a model node's key covers its
/// files, and its adapter's when it has one), so that two adapters continued from the same
/// start say so whatever stage wrote them. PEFT cannot resolve a key: load the adapter with
/// an explicit base (`PeftModel.from_pretrained(base, dir)`).
fn name_adapter_base(adapter_dir: &Path, base_key: &str) -> Result<(), TrainError> {
    let path = adapter_dir.join(lora::ADAPTER_CONFIG_FILE);
    if !path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let mut config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TrainError::Input(format!("{}: {e}", path.display())))?;
    config["base_model_name_or_path"] = serde_json::Value::String(base_key.to_owned());
    let text = serde_json::to_string_pretty(&config).expect("JSON values serialise");
    std::fs::write(&path, text + "\n").map_err(|e| TrainError::io(&path, e))
}

struct HostRunner<K> {
    kind_type: PhantomData<fn() -> K>,
}

impl<K: HostKind> Runner for HostRunner<K> {
    fn kind(&self) -> &str {
        K::Params::NAME
    }

    fn version(&self) -> u32 {
        K::VERSION
    }

    fn run(&self, ctx: &StageContext<'_>) -> StageResult {
        let stage = Stage::<K::Params>::new(ctx, false)?;
        Ok(K::run(&stage)?)
    }
}
