//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "rudder",
    version,
    about = "Run LLM alignment pipelines declared in TOML recipes"
)]
pub struct Cli {
    /// Print only errors and machine-readable output.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a recipe and report every error.
    Validate(RecipeArgs),
    /// Say, for every node, whether it is cached or will run, and why.
    Plan(PlanArgs),
    /// Run the stages that are not cached.
    Run(RunArgs),
    /// Build one stage's artifact by its key (what each Slurm job runs); refuses when the
    /// recipe's plan gives the node another key.
    Exec(ExecArgs),
    /// Print the pipeline graph.
    Dag {
        #[command(flatten)]
        recipe: RecipeArgs,
        #[arg(long, default_value = "text", value_parser = ["text", "dot", "mermaid"])]
        format: String,
    },
    /// Show a node: key, state, parameters, inputs, artifact and metrics.
    Show {
        #[command(flatten)]
        recipe: RecipeArgs,
        node: String,
        #[command(flatten)]
        store: StoreArgs,
        /// Print only the artifact's directory (exit 1 if it is not in the store).
        #[arg(long)]
        path: bool,
    },
    /// Summary metrics of every stage in the store.
    Metrics {
        #[command(flatten)]
        recipe: RecipeArgs,
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        json: bool,
    },
    /// What a run of the recipe is doing now (from another process), or what the last one did.
    Status {
        #[command(flatten)]
        recipe: RecipeArgs,
        #[command(flatten)]
        store: StoreArgs,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Write an HTML report of the recipe's runs: DAG, parameters, curves, evaluations.
    Report(ReportArgs),
    /// Generate completions with a model node or a model artifact.
    Generate(GenerateArgs),
    /// Time a kind's training step on a model and this machine: tokens/s, step time, peak memory.
    Bench(BenchArgs),
    /// Copy a stage's model to a directory.
    Export {
        #[command(flatten)]
        recipe: RecipeArgs,
        stage: String,
        dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Upload the artifacts the recipe's lockfile names (all, or NODEs and what they need)
    /// that the remote lacks.
    Push(TransferArgs),
    /// Fetch the artifacts the recipe's lockfile names (all, or NODEs and what they need)
    /// from the remote, verified, into the store.
    Pull(TransferArgs),
    /// Remove artifacts that no given lockfile references (in the store, or on a remote).
    Gc(GcArgs),
    /// Check artifacts against their manifests (every file hashed); exit 1 if any is corrupted.
    Verify {
        /// Check the artifacts this recipe uses (default: every artifact in the store).
        recipe: Option<PathBuf>,
        /// Check every artifact in the store, even with a recipe.
        #[arg(long)]
        all: bool,
        /// Override a value of the recipe: `--set stages.dpo.beta=0.2`.
        #[arg(long = "set", value_name = "KEY=VALUE", requires = "recipe")]
        set: Vec<String>,
        /// The artifact store (default: `.rudder/` beside the recipe, or `.rudder`).
        #[arg(long, env = "RUDDER_STORE")]
        store: Option<PathBuf>,
    },
    /// Print the JSON Schema of the recipe format.
    Schema,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    #[command(flatten)]
    pub selection: SelectionArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Compute keys as if running on this backend.
    #[arg(long)]
    pub backend: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub verify: VerifyArgs,
    /// Say which missing (or corrupted) artifacts this remote has (`remote`); default: the
    /// recipe's default remote when `remote_cache` is set.
    #[arg(long, env = "RUDDER_REMOTE", value_name = "NAME_OR_URL")]
    pub remote: Option<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    #[command(flatten)]
    pub selection: SelectionArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Run every stage on this backend (cpu, wgpu, cuda).
    #[arg(long)]
    pub backend: Option<String>,
    /// Show the plan and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Stages to run at once on this machine (default: `jobs` in [recipe], else one per four
    /// cores; GPU stages one at a time).
    #[arg(short = 'j', long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: Option<u32>,
    /// After a failure, go on with the stages that do not depend on it.
    #[arg(long)]
    pub keep_going: bool,
    /// Where stages run (default: the recipe's [executor], else local).
    #[arg(long, value_parser = ["local", "slurm"])]
    pub executor: Option<String>,
    #[command(flatten)]
    pub verify: VerifyArgs,
    /// Fetch what the store lacks from this remote instead of building it, and push what is
    /// built (a declared name, a URL or a path).
    #[arg(long, env = "RUDDER_REMOTE", value_name = "NAME_OR_URL")]
    pub remote: Option<String>,
    /// How the run uses the remote (default: `remote_cache` in [recipe]; `read-write` with
    /// --remote).
    #[arg(long, value_name = "MODE", value_parser = ["off", "read", "read-write"])]
    pub remote_cache: Option<String>,
}

#[derive(Debug, Args)]
pub struct TransferArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Only these nodes and the nodes they depend on (default: every artifact of the lockfile).
    pub nodes: Vec<String>,
    /// The remote: a declared name, a URL (s3://, gs://, az://, file://) or a path (default:
    /// the `default = true` one).
    #[arg(long, env = "RUDDER_REMOTE", value_name = "NAME_OR_URL")]
    pub remote: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Lockfiles whose artifacts to keep; default (in the store only): every lockfile that
    /// used this store.
    pub lockfiles: Vec<PathBuf>,
    #[arg(long, env = "RUDDER_STORE", default_value = ".rudder")]
    pub store: PathBuf,
    /// Say what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    /// Collect garbage on this remote instead of in the store (a name declared beside the
    /// lockfiles or in the configuration file, a URL or a path).
    #[arg(long, value_name = "NAME_OR_URL")]
    pub remote: Option<String>,
    /// With --remote: remove, rather than say what would be removed.
    #[arg(long)]
    pub yes: bool,
    /// With --remote: keep everything younger than this, since a push running now may need
    /// it.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub grace: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// The stage (or part, `dpo/ref_logps`) to build.
    pub node: String,
    /// The key the node must have in the recipe's plan.
    #[arg(long)]
    pub key: String,
    #[command(flatten)]
    pub store: StoreArgs,
    /// As `rudder run --backend`.
    #[arg(long)]
    pub backend: Option<String>,
    /// Build it even if it is in the store.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub verify: VerifyArgs,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// How artifacts are checked before use: `cheap` compares sizes and file stats with the
    /// manifest and hashes only what changed; `full` hashes every file.
    #[arg(long, value_enum, default_value = "cheap")]
    pub verify: VerifyLevel,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum VerifyLevel {
    Cheap,
    Full,
}

impl From<VerifyLevel> for rudder_engine::VerifyMode {
    fn from(level: VerifyLevel) -> Self {
        match level {
            VerifyLevel::Cheap => rudder_engine::VerifyMode::Cheap,
            VerifyLevel::Full => rudder_engine::VerifyMode::Full,
        }
    }
}

#[derive(Debug, Args)]
pub struct RecipeArgs {
    /// The recipe file.
    pub recipe: PathBuf,
    /// Override a value: `--set stages.dpo.beta=0.2` (typed as TOML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Run every stage in this precision (fp32, bf16), whatever the recipe says.
    #[arg(long, value_name = "PRECISION")]
    pub precision: Option<String>,
}

#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The artifact store (default: `.rudder/` beside the recipe).
    #[arg(long, env = "RUDDER_STORE")]
    pub store: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SelectionArgs {
    /// Only this node (repeatable); its inputs must be in the store.
    #[arg(long, value_name = "NODE")]
    pub only: Vec<String>,
    /// This node and everything it depends on.
    #[arg(long, value_name = "NODE")]
    pub until: Option<String>,
    /// Re-run this node even if cached (repeatable).
    #[arg(long, value_name = "NODE")]
    pub force: Vec<String>,
    /// Re-run every stage.
    #[arg(long)]
    pub force_all: bool,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Where to write the report (default: `NAME.report.html` beside the recipe).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Compare with another run: a lockfile (`OTHER.lock`) or a recipe (`OTHER.toml`).
    #[arg(long, value_name = "LOCK_OR_RECIPE")]
    pub compare: Option<PathBuf>,
    /// `html` writes the report; `text` prints its summary (and the comparison) instead.
    #[arg(long, default_value = "html", value_parser = ["html", "text"])]
    pub format: String,
    /// Open the written report in the default browser.
    #[arg(long)]
    pub open: bool,
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What is timed: the step of sft, reward, dpo, kto, orpo or simpo; ppo-rollout or
    /// ppo-update; or generate (greedy, with the KV cache).
    pub kind: String,
    /// A Hugging Face model directory, or `fresh:bench4m` / `fresh:smollm2-135m` (random weights).
    #[arg(long)]
    pub model: String,
    /// Sequences (sft, kto, ppo-*, generate) or pairs (reward, dpo, orpo, simpo) per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Tokens per sequence (half prompt, half completion for the preference and PPO kinds);
    /// prompt tokens for generate.
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// Tokens generate adds to each prompt.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Timed steps, after two warm-up steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// cpu, wgpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// fp32 or bf16.
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// A model node (`models.X`) or a stage that produces a model.
    pub node: String,
    #[arg(long, conflicts_with = "data", required_unless_present = "data")]
    pub prompt: Vec<String>,
    /// Send each `--prompt` as a user message through the model's chat template.
    #[arg(long, conflicts_with = "data")]
    pub chat: bool,
    /// A system message before the user message (with `--chat`).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// A data file of prompts (.jsonl .json .parquet): a `prompt` string or conversation per
    /// row, or any format the stages read prompts from; conversations use the chat template.
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub backend: Option<String>,
    #[command(flatten)]
    pub store: StoreArgs,
    #[arg(long)]
    pub json: bool,
}
