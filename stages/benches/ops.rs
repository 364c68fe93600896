//! Where a training step's time goes: every op of the 4M-parameter Llama of
//! ../shared/fixtures/BASELINE.md timed on its own, forward and backward, at the shapes of the
//! `stages` benchmark (SFT: 8 x 256; DPO: 16 x 256), then multiplied by how often one step runs
//! it. The sum is compared with a whole step (forward, backward, gradient norm, AdamW) timed the
//! same way, so the table says how much of the step it explains.
//!
//!     RAYON_NUM_THREADS=2 cargo bench -p rudder-stages --bench ops [-- sft|dpo]

use std::time::Instant;

use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::optim::GradientsParams;
use burn::tensor::activation::{log_softmax, silu};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use rudder_stages::model::kernels;
use rudder_stages::model::rms_norm::RmsNormConfig;
use rudder_stages::model::rope::RotaryConfig;
use rudder_stages::model::{ModelConfig, random_causal_lm};
use rudder_stages::padding::Pad;
use rudder_stages::train::{AdamW, AdamWConfig, Batch, SftSequence, token_stats};

const WARMUP: usize = 2;
const TIMED: usize = 5;
const VOCAB: usize = 2048;
const HIDDEN: usize = 256;
const INTER: usize = 704;
const LAYERS: usize = 4;
const HEADS: usize = 8;
const KV_HEADS: usize = 4;
const HEAD_DIM: usize = HIDDEN / HEADS;
const SEQ: usize = 256;

/// Mean seconds of `f` over the timed runs, after warm-up.
fn mean_secs(mut f: impl FnMut()) -> f64 {
    for _ in 0..WARMUP {
        f();
    }
    let t = Instant::now();
    for _ in 0..TIMED {
        f();
    }
    t.elapsed().as_secs_f64() / TIMED as f64
}

/// (forward, backward) seconds of `op` on a fresh input of `shape` that records its gradient.
fn fwd_bwd<const D: usize>(
    shape: [usize; D],
    device: &Device,
    op: impl Fn(Tensor<D>) -> Tensor<D>,
) -> (f64, f64) {
    let mut fwd = 0.0;
    let mut bwd = 0.0;
    let mut runs = 0;
    mean_secs(|| {
        let x = Tensor::<D>::random(shape, Distribution::Normal(0.0, 1.0), device).require_grad();
        let t = Instant::now();
        let y = op(x.clone()).sum();
        let _ = y.clone().into_scalar::<f32>();
        let t1 = Instant::now();
        let grads = y.backward();
        let _ = x.grad(&grads).map(|g| g.sum().into_scalar::<f32>());
        runs += 1;
        if runs > WARMUP {
            fwd += (t1 - t).as_secs_f64();
            bwd += t1.elapsed().as_secs_f64();
        }
    });
    (fwd / TIMED as f64, bwd / TIMED as f64)
}

fn linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(false).init(device)
}

struct Row {
    op: &'static str,
    per_step: usize,
    fwd: f64,
    bwd: f64,
}

fn profile(rows: usize, device: &Device) -> Vec<Row> {
    let tokens = [rows, SEQ];
    let h = [rows, SEQ, HIDDEN];
    let mut out = Vec::new();
    let mut add = |op, per_step, (fwd, bwd): (f64, f64)| {
        out.push(Row {
            op,
            per_step,
            fwd,
            bwd,
        })
    };

    let embed: Embedding = EmbeddingConfig::new(VOCAB, HIDDEN).init(device);
    let ids = Tensor::<2, Int>::from_data(
        TensorData::new(
            (0..rows * SEQ).map(|i| (i * 7 % VOCAB) as i64).collect(),
            tokens,
        ),
        device,
    );
    add(
        "embedding",
        1,
        fwd_bwd(h, device, |x| x * 0.0 + embed.forward(ids.clone())),
    );

    let norm = RmsNormConfig::new(HIDDEN).init(device);
    add(
        "rms_norm, generic ops (for comparison)",
        2 * LAYERS + 1,
        fwd_bwd(h, device, |x| norm.forward_generic(x)),
    );
    add(
        "rms_norm, fused kernel",
        2 * LAYERS + 1,
        fwd_bwd(h, device, |x| norm.forward(x)),
    );

    let q = linear(HIDDEN, HEADS * HEAD_DIM, device);
    let kv = linear(HIDDEN, KV_HEADS * HEAD_DIM, device);
    add("q_proj + o_proj (256 -> 256)", 2 * LAYERS, {
        fwd_bwd(h, device, |x| q.forward(x))
    });
    add("k_proj, v_proj (256 -> 128)", 2 * LAYERS, {
        fwd_bwd(h, device, |x| kv.forward(x))
    });

    let positions = Tensor::<2, Int>::from_data(
        TensorData::new((0..rows * SEQ).map(|i| (i % SEQ) as i64).collect(), tokens),
        device,
    );
    let rope = RotaryConfig::new(HEAD_DIM).at_positions(positions);
    add(
        "rope (q and k)",
        2 * LAYERS,
        fwd_bwd([rows, HEADS, SEQ, HEAD_DIM], device, |x| rope.apply(x)),
    );

    // The attention core: K/V heads repeated to the query heads, then Burn's attention
    // (scores, causal softmax, weighted sum). K and V are slices of the input so that their
    // gradients are computed too.
    let n_rep = HEADS / KV_HEADS;
    add(
        "attention core (repeat_kv + attention)",
        LAYERS,
        fwd_bwd([rows, HEADS, SEQ, HEAD_DIM], device, |x| {
            let kv = x.clone().slice([0..rows, 0..KV_HEADS, 0..SEQ, 0..HEAD_DIM]);
            let rep = |t: Tensor<4>| {
                t.unsqueeze_dim::<5>(2)
                    .expand([rows, KV_HEADS, n_rep, SEQ, HEAD_DIM])
                    .reshape([rows, HEADS, SEQ, HEAD_DIM])
            };
            let options = AttentionModuleOptions {
                scale: Some(1.0 / (HEAD_DIM as f64).sqrt()),
                softcap: None,
                is_causal: true,
            };
            attention(x, rep(kv.clone()), rep(kv * 0.5), None, None, options)
        }),
    );

    add(
        "attention core, fused kernel (K/V read in place)",
        LAYERS,
        fwd_bwd([rows, HEADS, SEQ, HEAD_DIM], device, |x| {
            let kv = x.clone().slice([0..rows, 0..KV_HEADS, 0..SEQ, 0..HEAD_DIM]);
            let scale = 1.0 / (HEAD_DIM as f64).sqrt();
            kernels::attention(x, kv.clone(), kv * 0.5, &kernels::KeyMask::Causal, scale)
                .expect("flex tensors")
        }),
    );

    let gate = linear(HIDDEN, INTER, device);
    let down = linear(INTER, HIDDEN, device);
    add("gate_proj, up_proj (256 -> 704)", 2 * LAYERS, {
        fwd_bwd(h, device, |x| gate.forward(x))
    });
    add("down_proj (704 -> 256)", LAYERS, {
        fwd_bwd([rows, SEQ, INTER], device, |x| down.forward(x))
    });
    add(
        "silu(gate) * up, generic ops (for comparison)",
        LAYERS,
        fwd_bwd([rows, SEQ, INTER], device, |x| silu(x.clone()) * x),
    );
    add(
        "silu(gate) * up, fused kernel",
        LAYERS,
        fwd_bwd([rows, SEQ, INTER], device, |x| {
            kernels::swiglu(x.clone(), x).expect("flex tensors")
        }),
    );
    add(
        "residual adds",
        2 * LAYERS,
        fwd_bwd(h, device, |x| x.clone() + x),
    );

    let head = linear(HIDDEN, VOCAB, device);
    add(
        "lm_head (256 -> 2048)",
        1,
        fwd_bwd(h, device, |x| head.forward(x)),
    );
    add(
        "log_softmax + gather (loss)",
        1,
        fwd_bwd([rows, SEQ, VOCAB], device, |x| {
            let logp = log_softmax(x, 2);
            logp.slice([0..rows, 0..SEQ - 1, 0..VOCAB])
                .gather(2, ids.clone().slice([0..rows, 1..SEQ]).unsqueeze_dim(2))
                .reshape([rows, SEQ - 1])
                .unsqueeze_dim::<3>(2)
        }),
    );
    // The SFT metrics (accuracy, entropy), forward only.
    let examples: Vec<SftSequence> = (0..rows)
        .map(|r| SftSequence {
            input_ids: (0..SEQ)
                .map(|i| ((r * SEQ + i) * 7 % VOCAB) as u32)
                .collect(),
            target: vec![true; SEQ],
            segments: None,
        })
        .collect();
    let refs: Vec<&SftSequence> = examples.iter().collect();
    let batch = Batch::new(&refs, Pad::exact(0), device);
    add(
        "SFT loss + metrics (token_stats)",
        1,
        fwd_bwd([rows, SEQ, VOCAB], device, |x| {
            token_stats(x, &batch).nll_sum.reshape([1, 1, 1])
        }),
    );
    out
}

/// One whole step (forward, backward, gradient norm, AdamW) split in those phases.
fn whole_step(rows: usize, device: &Device) -> [(&'static str, f64); 4] {
    let cfg = ModelConfig::llama(VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS);
    let mut model = random_causal_lm(&cfg, 0, device);
    let examples: Vec<SftSequence> = (0..rows)
        .map(|r| SftSequence {
            input_ids: (0..=SEQ)
                .map(|i| ((r * SEQ + i) * 7 % VOCAB) as u32)
                .collect(),
            target: vec![true; SEQ + 1],
            segments: None,
        })
        .collect();
    let refs: Vec<&SftSequence> = examples.iter().collect();
    let mut optim = AdamW::new(AdamWConfig::default());
    let mut t = [0.0; 4];
    for i in 0..WARMUP + TIMED {
        let t0 = Instant::now();
        let batch = Batch::new(&refs, Pad::exact(0), &model.device());
        let logits = model.forward(batch.ids.clone(), Some(&batch.padding), None);
        let loss = token_stats(logits, &batch).nll_sum;
        let _ = loss.clone().into_scalar::<f32>();
        let t1 = Instant::now();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let t2 = Instant::now();
        let norm = rudder_stages::train::adamw::global_grad_norm(&model, &grads);
        let t3 = Instant::now();
        model = optim.step(model, grads, 1e-4, 1.0);
        let _ = norm;
        let p = model.model.norm.weight.val().sum().into_scalar::<f32>();
        let _ = p;
        let t4 = Instant::now();
        if i >= WARMUP {
            for (acc, d) in t.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3]) {
                *acc += d.as_secs_f64() / TIMED as f64;
            }
        }
    }
    [
        ("forward (with loss + metrics)", t[0]),
        ("backward", t[1]),
        ("global gradient norm", t[2]),
        ("AdamW update", t[3]),
    ]
}

fn main() {
    let which = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let device = rudder_stages::backend::cpu().autodiff();
    for (name, rows) in [("sft", 8), ("dpo", 16)] {
        if which.as_deref().is_some_and(|w| w != name) {
            continue;
        }
        println!("\n{name}: {rows} x {SEQ} tokens, times in ms per step");
        println!("| op | per step | forward | backward | total | share |");
        println!("|---|---|---|---|---|---|");
        let step = whole_step(rows, &device);
        let step_total: f64 = step.iter().map(|p| p.1).sum();
        let ops = profile(rows, &device);
        for r in &ops {
            let n = r.per_step as f64;
            let total = n * (r.fwd + r.bwd);
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {:.0}% |",
                r.op,
                r.per_step,
                1e3 * n * r.fwd,
                1e3 * n * r.bwd,
                1e3 * total,
                100.0 * total / step_total
            );
        }
        for (phase, secs) in step {
            println!(
                "| whole step: {phase} | 1 | | | {:.1} | {:.0}% |",
                1e3 * secs,
                100.0 * secs / step_total
            );
        }
        println!("| whole step | 1 | | | {:.1} | 100% |", 1e3 * step_total);
    }
}
