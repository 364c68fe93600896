//! Throughput and peak memory of the training stages' steps, through the real objectives and the
//! real training loop (the code a recipe runs), on the reference 4M-parameter Llama of
//! ../shared/fixtures/BASELINE.md:
//!
//! - SFT: 8 sequences of 256 tokens, every token after the first trained;
//! - reward model: 8 pairs (16 x 256), Bradley-Terry;
//! - DPO as the PyTorch baseline does it: 8 pairs (16 x 256, prompt 128 + completion 128), the
//!   frozen reference run on every step;
//! - DPO as a `dpo` stage runs it: the reference's log-probs read from the cache.
//!
//! Each benchmark runs in a child process so that its peak resident memory (VmHWM) is its own.
//! Compare with `bench_torch.py` on the same machine, idle, with the same thread count:
//!
//!     cargo bench -p rudder-stages --bench stages [-- --backend cuda]

use std::cell::RefCell;

use burn::tensor::Device;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rudder_stages::bench::step_durations;
use rudder_stages::kinds::reward::{RewardObjective, RewardPair};
use rudder_stages::logps::{PromptCompletion, sequence_logps};
use rudder_stages::losses::DpoLossConfig;
use rudder_stages::model::{ModelConfig, random_causal_lm, random_reward_model};
use rudder_stages::padding::Pad;
use rudder_stages::preference::{DpoExample, DpoObjective, SyncedReferenceDpo, TokenizedPair};
use rudder_stages::train::Objective;
use rudder_stages::train::{SftObjective, SftSequence};

/// The allocator of the `rudder` binary, so that a step costs here what it costs in a stage.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PAIRS: usize = 8;
const SEQ: usize = 256;
const WARMUP: usize = 3;
const TIMED: usize = 20;
const BENCHMARKS: [&str; 4] = [
    "sft",
    "reward",
    "dpo-reference-each-step",
    "dpo-cached-reference",
];

fn config() -> ModelConfig {
    ModelConfig::llama(2048, 256, 704, 4, 8, 4)
}

fn random_ids(rng: &mut ChaCha8Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| rng.next_u32() % 2048).collect()
}

/// Trains `examples` (one batch, the same every step) and returns the timed steps' durations.
fn run<O: Objective>(
    objective: &O,
    model: O::Model,
    examples: &[O::Example],
    device: &Device,
) -> Vec<f64> {
    step_durations(objective, model, examples, 1e-4, (WARMUP, TIMED), device).unwrap()
}

/// 8 pairs sharing 128-token prompts with 128-token completions, as in the PyTorch baseline.
fn pairs(rng: &mut ChaCha8Rng) -> Vec<TokenizedPair> {
    (0..PAIRS)
        .map(|row| {
            let prompt = random_ids(rng, SEQ / 2);
            let side = |rng: &mut ChaCha8Rng| PromptCompletion {
                prompt: prompt.clone(),
                completion: random_ids(rng, SEQ / 2),
            };
            TokenizedPair {
                row,
                chosen: side(rng),
                rejected: side(rng),
            }
        })
        .collect()
}

/// Runs one benchmark on a training (autodiff) device; returns (step times, tokens per step).
fn bench(name: &str, device: &Device) -> (Vec<f64>, usize) {
    let device = device.clone();
    let inference = device.clone().inner();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let cfg = config();
    let dpo = DpoObjective {
        pad: Pad::exact(0),
        loss: DpoLossConfig::single(rudder_schema::kinds::DpoLossType::Sigmoid, 0.1),
        ld_alpha: None,
        use_weighting: false,
    };
    match name {
        "sft" => {
            let examples: Vec<SftSequence> = (0..PAIRS)
                .map(|_| SftSequence {
                    input_ids: random_ids(&mut rng, SEQ + 1),
                    target: vec![true; SEQ + 1],
                    segments: None,
                })
                .collect();
            let model = random_causal_lm(&cfg, 0, &device);
            (
                run(
                    &SftObjective { pad: Pad::exact(0) },
                    model,
                    &examples,
                    &device,
                ),
                PAIRS * SEQ,
            )
        }
        "reward" => {
            let examples: Vec<RewardPair> = (0..PAIRS)
                .map(|_| RewardPair {
                    chosen: random_ids(&mut rng, SEQ),
                    rejected: random_ids(&mut rng, SEQ),
                    margin: 0.0,
                })
                .collect();
            let model = random_reward_model(&cfg, 0, &device);
            let objective = RewardObjective {
                pad: Pad::exact(0),
                center_rewards_coefficient: None,
            };
            (run(&objective, model, &examples, &device), 2 * PAIRS * SEQ)
        }
        "dpo-reference-each-step" => {
            let pairs = pairs(&mut rng);
            let objective = SyncedReferenceDpo {
                base: dpo,
                reference: RefCell::new(random_causal_lm(&cfg, 1, &inference)),
                mixup_alpha: 0.0,
                sync_steps: u64::MAX,
            };
            let model = random_causal_lm(&cfg, 0, &device);
            (run(&objective, model, &pairs, &device), 2 * PAIRS * SEQ)
        }
        "dpo-cached-reference" => {
            let pairs = pairs(&mut rng);
            let reference = random_causal_lm(&cfg, 1, &inference);
            let rows: Vec<&PromptCompletion> = pairs
                .iter()
                .map(|p| &p.chosen)
                .chain(pairs.iter().map(|p| &p.rejected))
                .collect();
            let mut chosen = sequence_logps(&reference, &rows, Pad::exact(0), rows.len());
            let rejected = chosen.split_off(PAIRS);
            drop(reference);
            let examples: Vec<DpoExample> = pairs
                .into_iter()
                .zip(chosen.into_iter().zip(rejected))
                .map(|(pair, (c, r))| DpoExample {
                    pair,
                    reference_chosen: c,
                    reference_rejected: r,
                })
                .collect();
            let model = random_causal_lm(&cfg, 0, &device);
            (run(&dpo, model, &examples, &device), 2 * PAIRS * SEQ)
        }
        other => panic!("no benchmark {other}"),
    }
}

/// This process's peak resident memory in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let backend = args
        .iter()
        .position(|a| a == "--backend")
        .and_then(|i| args.get(i + 1))
        .map_or("cpu", String::as_str);
    let kind: rudder_schema::Backend = backend.parse().expect("cpu, wgpu or cuda");
    if let Some(i) = args.iter().position(|a| a == "--one") {
        let name = &args[i + 1];
        let device =
            rudder_stages::backend::training_device(kind).expect("the backend is available");
        let (times, tokens) = bench(name, &device);
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        let max = times.iter().copied().fold(0.0, f64::max);
        println!(
            "| {name:<26} | {mean:>8.3} | {min:>6.3} / {max:>6.3} | {:>8.0} | {:>9.0} |",
            tokens as f64 / mean,
            peak_rss_mib()
        );
        return;
    }
    println!(
        "| {:<26} | {:>8} | {:>15} | {:>8} | {:>9} |",
        format!("benchmark ({backend}, 8 pairs)"),
        "mean (s)",
        "min / max (s)",
        "tokens/s",
        "peak MiB"
    );
    println!(
        "| {:-<26} | {:->8} | {:->15} | {:->8} | {:->9} |",
        "", "", "", "", ""
    );
    let exe = std::env::current_exe().expect("the benchmark binary");
    for name in BENCHMARKS {
        let mut command = std::process::Command::new(&exe);
        // Freed memory kept for reuse, as the `rudder` binary keeps it (src/main.rs).
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            command.env("MIMALLOC_PURGE_DELAY", "-1");
        }
        let out = command
            .args(["--one", name, "--backend", backend])
            .output()
            .expect("the benchmark runs");
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprintln!("{name} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}
