//! Throughput of the model core: one language-model training step (forward, cross-entropy,
//! backward, AdamW) on the reference 4M-parameter Llama at batch 8 x 256, and greedy generation
//! with and without the KV cache. Compare with the PyTorch numbers in
//! ../shared/fixtures/BASELINE.md (same machine, same thread count). Run on an idle machine:
//!
//!     cargo bench -p rudder-stages --bench train_step [-- --backend cuda]

use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::Device;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rudder_stages::generate::{GenerateOptions, generate_ids};
use rudder_stages::model::{CausalLm, ModelConfig, random_causal_lm};

const BATCH: usize = 8;
const SEQ: usize = 256;
const WARMUP: usize = 3;
const TIMED: usize = 20;

fn config() -> ModelConfig {
    ModelConfig::llama(2048, 256, 704, 4, 8, 4)
}

fn random_ids(rng: &mut ChaCha8Rng, n: usize, vocab: usize) -> Vec<i64> {
    (0..n)
        .map(|_| (rng.next_u32() as usize % vocab) as i64)
        .collect()
}

/// Token-mean next-token cross-entropy.
fn lm_loss(model: &CausalLm, ids: Tensor<2, Int>) -> Tensor<1> {
    let [b, l] = ids.dims();
    let logits = model.forward(ids.clone().slice([0..b, 0..l - 1]), None, None);
    let vocab = logits.dims()[2];
    let logp = log_softmax(logits.reshape([b * (l - 1), vocab]), 1);
    let targets = ids.slice([0..b, 1..l]).reshape([b * (l - 1), 1]);
    logp.gather(1, targets).mean().neg()
}

struct Row {
    name: String,
    mean: f64,
    min: f64,
    max: f64,
    tokens_per_step: usize,
}

fn print(rows: &[Row]) {
    println!(
        "| {:<44} | {:>9} | {:>15} | {:>10} |",
        "benchmark", "mean (s)", "min / max (s)", "tokens/s"
    );
    println!("| {:-<44} | {:->9} | {:->15} | {:->10} |", "", "", "", "");
    for r in rows {
        println!(
            "| {:<44} | {:>9.3} | {:>6.3} / {:>6.3} | {:>10.0} |",
            r.name,
            r.mean,
            r.min,
            r.max,
            r.tokens_per_step as f64 / r.mean
        );
    }
}

fn time_steps(mut step: impl FnMut(), warmup: usize, timed: usize) -> (f64, f64, f64) {
    for _ in 0..warmup {
        step();
    }
    let mut times = Vec::with_capacity(timed);
    for _ in 0..timed {
        let t = Instant::now();
        step();
        times.push(t.elapsed().as_secs_f64());
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let max = times.iter().copied().fold(0.0, f64::max);
    (mean, min, max)
}

fn train_bench(name: &str, device: &Device) -> Row {
    let cfg = config();
    let mut model = random_causal_lm(&cfg, 0, device);
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    // SEQ + 1 tokens per row so that SEQ positions are trained, as in the PyTorch baseline.
    let ids = random_ids(&mut rng, BATCH * (SEQ + 1), cfg.vocab_size);
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [BATCH, SEQ + 1]), device);
    let (mean, min, max) = time_steps(
        || {
            let loss = lm_loss(&model, ids.clone());
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(1e-3, model.clone(), grads);
            // Wait for the step to finish before the clock stops.
            device.sync().expect("the device finishes the step");
        },
        WARMUP,
        TIMED,
    );
    Row {
        name: format!("{name}: LM train step 8 x 256"),
        mean,
        min,
        max,
        tokens_per_step: BATCH * SEQ,
    }
}

fn generate_bench(name: &str, device: &Device) -> Vec<Row> {
    let cfg = config();
    let model = random_causal_lm(&cfg, 0, device);
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let (batch, prompt_len, new_tokens) = (8, 32, 64);
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            random_ids(&mut rng, prompt_len, cfg.vocab_size)
                .into_iter()
                .map(|t| t as u32)
                .collect()
        })
        .collect();
    [true, false]
        .into_iter()
        .map(|use_cache| {
            let opts = GenerateOptions {
                max_new_tokens: new_tokens,
                temperature: 0.0,
                batch_size: batch,
                use_cache,
                ..Default::default()
            };
            // No EOS ids: every row generates exactly `new_tokens`.
            let (mean, min, max) = time_steps(
                || {
                    let out = generate_ids(&model, &prompts, &[], 0, &opts).unwrap();
                    assert!(out.iter().all(|g| g.ids.len() == new_tokens));
                },
                1,
                3,
            );
            Row {
                name: format!(
                    "{name}: generate 8 x (32 + 64), {} cache",
                    if use_cache { "with" } else { "no" }
                ),
                mean,
                min,
                max,
                tokens_per_step: batch * new_tokens,
            }
        })
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let backend = args
        .iter()
        .position(|a| a == "--backend")
        .and_then(|i| args.get(i + 1))
        .map_or("cpu", String::as_str);
    let kind: rudder_schema::Backend = backend.parse().expect("cpu, wgpu or cuda");
    let device = rudder_stages::backend::training_device(kind).expect("the backend is available");
    let mut rows = vec![train_bench(backend, &device)];
    rows.extend(generate_bench(backend, &device.clone().inner()));
    print(&rows);
}
