//! The fused language-model head of the `cpu` (flex) backend, with its own backward pass on the
//! autodiff device: per-token `log_softmax(scale * h W^T)[target]` for the positions that need a
//! prediction, without ever holding the `[tokens, vocab]` logits, their log-softmax or their
//! gradient (three tensors of 192 MiB each for a vocabulary of 49,152 at 4 x 256 tokens).
//!
//! The forward pass takes [`ROW_BLOCK`] positions at a time: their logits (one gemm), then in one
//! pass over each row the maximum and argmax, the log-sum-exp, the predictive entropy and
//! `log sum p^2` (WPO's weight). When the hidden states record gradients it also forms the row's
//! `d logp / d logits = scale * (onehot - softmax)` in place and multiplies it by `W` at once, so
//! the backward pass gets the hidden states' gradient as `g * M` without a second look at the
//! vocabulary. The weight's gradient `sum_t g_t (onehot_t - p_t)^T h_t` depends on the upstream
//! gradients across tokens, so the backward pass recomputes the logits, [`VOCAB_BLOCK`] vocabulary
//! entries at a time for every position, from the saved hidden states and row log-sum-exps.
//!
//! Reproducibility: blocks are fixed by the shapes (never by the thread count), each block is
//! computed by one thread with single-threaded gemm, and a weight-gradient block sums the
//! positions in a fixed order; rayon only decides which thread runs which block.
//!
//! [`log_probs`] returns `None` when its tensors are not f32 flex tensors; the caller then runs
//! the generic code.

use std::sync::Arc;

use burn::tensor::{DType, GradientCheckpointingStrategy, Tensor};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::{exp, flex_f32, matmul, simd, to_flex};

/// Positions whose logits are held at once in the forward pass: `ROW_BLOCK x vocab` floats per
/// thread (6 MiB at a vocabulary of 49,152).
const ROW_BLOCK: usize = 32;
/// Vocabulary entries per block of the weight's gradient.
const VOCAB_BLOCK: usize = 512;
/// Positions per step inside a weight-gradient block: its logits tile is
/// `POSITION_BLOCK x VOCAB_BLOCK` floats.
const POSITION_BLOCK: usize = 1024;

/// How the head weight is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[vocab, d_model]`: the embedding table of a tied head.
    VocabMajor,
    /// `[d_model, vocab]`: Burn's `Linear` weight.
    ModelMajor,
}

/// One position to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// Its row of the hidden states.
    pub row: usize,
    /// The token whose log-prob is taken.
    pub target: usize,
    /// Its index in the output vector.
    pub slot: usize,
}

/// What the forward pass reads off each pick's distribution, without a gradient.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PickValues {
    /// The argmax (first of ties) is the target.
    pub hit: Vec<bool>,
    /// `-sum p log p`.
    pub entropy: Vec<f32>,
    /// `log sum p^2`.
    pub log_sum_p2: Vec<f32>,
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    positions: usize,
    d_model: usize,
    vocab: usize,
    layout: WeightLayout,
    scale: f32,
}

impl Dims {
    /// Strides of `W^T` as the `[d_model, vocab]` right-hand side of `logits = h W^T`.
    fn transposed_strides(&self) -> (usize, usize) {
        match self.layout {
            WeightLayout::VocabMajor => (1, self.d_model),
            WeightLayout::ModelMajor => (self.vocab, 1),
        }
    }

    /// Strides of `W` as a `[vocab, d_model]` right-hand side.
    fn strides(&self) -> (usize, usize) {
        match self.layout {
            WeightLayout::VocabMajor => (self.d_model, 1),
            WeightLayout::ModelMajor => (1, self.vocab),
        }
    }

    /// `W` from vocabulary entry `v` on, for the strides above.
    fn weight_at_entry<'a>(&self, w: &'a [f32], v: usize) -> &'a [f32] {
        match self.layout {
            WeightLayout::VocabMajor => &w[v * self.d_model..],
            WeightLayout::ModelMajor => &w[v..],
        }
    }
}

/// The picks' hidden rows, packed `[picks, d_model]`.
fn gather(h: &[f32], picks: &[Pick], dm: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; picks.len() * dm];
    for (dst, p) in out.chunks_exact_mut(dm).zip(picks) {
        dst.copy_from_slice(&h[p.row * dm..(p.row + 1) * dm]);
    }
    out
}

/// One row block's results.
struct Block {
    logp: Vec<f32>,
    lse: Vec<f32>,
    values: PickValues,
    /// `[rows, d_model]`: `scale * (onehot - p) W`, when asked for.
    m: Vec<f32>,
}

fn forward_block(h: &[f32], w: &[f32], picks: &[Pick], d: &Dims, with_m: bool) -> Block {
    let (rows, dm, vocab) = (picks.len(), d.d_model, d.vocab);
    let hb = gather(h, picks, dm);
    let mut x = vec![0.0f32; rows * vocab];
    matmul(
        rows,
        vocab,
        dm,
        &mut x,
        false,
        &hb,
        (dm, 1),
        w,
        d.transposed_strides(),
        d.scale,
    );
    let mut out = Block {
        logp: Vec::with_capacity(rows),
        lse: Vec::with_capacity(rows),
        values: PickValues::default(),
        m: Vec::new(),
    };
    for (row, p) in x.chunks_exact_mut(vocab).zip(picks) {
        let (mut max, mut argmax) = (f32::NEG_INFINITY, 0);
        for (v, &z) in row.iter().enumerate() {
            if z > max {
                max = z;
                argmax = v;
            }
        }
        let target_logit = row[p.target];
        // The exponentials in a loop of their own, which vectorises; then the sums, in f64 over
        // the vocabulary so that their rounding does not grow with its size.
        let exps = simd(|| row.iter().map(|&z| exp(z - max)).collect::<Vec<f32>>());
        let (mut s, mut sz, mut s2) = (0.0f64, 0.0f64, 0.0f64);
        for (z, &e) in row.iter_mut().zip(&exps) {
            s += f64::from(e);
            sz += f64::from(e * (*z - max));
            s2 += f64::from(e * e);
            *z = e;
        }
        let log_s = s.ln();
        let lse = f64::from(max) + log_s;
        out.lse.push(lse as f32);
        out.logp.push((f64::from(target_logit) - lse) as f32);
        out.values.hit.push(argmax == p.target);
        out.values.entropy.push((log_s - sz / s) as f32);
        out.values.log_sum_p2.push((s2.ln() - 2.0 * log_s) as f32);
        if with_m {
            // d logp / d logits = scale * (onehot - softmax), in place of the exponentials.
            let k = -d.scale * (1.0 / s) as f32;
            for z in row.iter_mut() {
                *z *= k;
            }
            row[p.target] += d.scale;
        }
    }
    if with_m {
        out.m = vec![0.0f32; rows * dm];
        matmul(
            rows,
            dm,
            vocab,
            &mut out.m,
            false,
            &x,
            (vocab, 1),
            w,
            d.strides(),
            1.0,
        );
    }
    out
}

/// The forward pass over every pick.
struct Forward {
    logp: Vec<f32>,
    lse: Vec<f32>,
    values: PickValues,
    /// `[picks, d_model]`, empty unless asked for.
    m: Vec<f32>,
}

fn forward(h: &[f32], w: &[f32], picks: &[Pick], d: &Dims, with_m: bool) -> Forward {
    let blocks: Vec<Block> = picks
        .par_chunks(ROW_BLOCK)
        .map(|block| forward_block(h, w, block, d, with_m))
        .collect();
    let mut out = Forward {
        logp: Vec::with_capacity(picks.len()),
        lse: Vec::with_capacity(picks.len()),
        values: PickValues::default(),
        m: Vec::with_capacity(if with_m { picks.len() * d.d_model } else { 0 }),
    };
    for b in blocks {
        out.logp.extend(b.logp);
        out.lse.extend(b.lse);
        out.values.hit.extend(b.values.hit);
        out.values.entropy.extend(b.values.entropy);
        out.values.log_sum_p2.extend(b.values.log_sum_p2);
        out.m.extend(b.m);
    }
    out
}

/// `[positions, d_model]`: row `pick.row` gets `g[pick.slot] * M[pick]`.
fn hidden_grad(m: &[f32], picks: &[Pick], grad: &[f32], d: &Dims) -> Vec<f32> {
    let dm = d.d_model;
    let mut out = vec![0.0f32; d.positions * dm];
    for (mi, p) in m.chunks_exact(dm).zip(picks) {
        let g = grad[p.slot];
        for (o, &v) in out[p.row * dm..(p.row + 1) * dm].iter_mut().zip(mi) {
            *o += g * v;
        }
    }
    out
}

/// `[vocab, d_model]`: `sum_t g_t scale (onehot_t - p_t)^T h_t`, with `p_t` recomputed.
fn weight_grad(
    h: &[f32],
    w: &[f32],
    picks: &[Pick],
    lse: &[f32],
    grad: &[f32],
    d: &Dims,
) -> Vec<f32> {
    let (dm, vocab) = (d.d_model, d.vocab);
    let hp = gather(h, picks, dm);
    let g: Vec<f32> = picks.iter().map(|p| grad[p.slot] * d.scale).collect();
    let mut out = vec![0.0f32; vocab * dm];
    out.par_chunks_mut(VOCAB_BLOCK * dm)
        .enumerate()
        .for_each(|(block, out)| {
            let v0 = block * VOCAB_BLOCK;
            let vc = out.len() / dm;
            let mut tile = vec![0.0f32; POSITION_BLOCK.min(picks.len()) * vc];
            for (step, start) in (0..picks.len()).step_by(POSITION_BLOCK).enumerate() {
                let rows = POSITION_BLOCK.min(picks.len() - start);
                let tile = &mut tile[..rows * vc];
                let hs = &hp[start * dm..(start + rows) * dm];
                matmul(
                    rows,
                    vc,
                    dm,
                    tile,
                    false,
                    hs,
                    (dm, 1),
                    d.weight_at_entry(w, v0),
                    d.transposed_strides(),
                    d.scale,
                );
                for (i, row) in tile.chunks_exact_mut(vc).enumerate() {
                    let t = start + i;
                    let (l, gt) = (lse[t], g[t]);
                    simd(|| {
                        for z in row.iter_mut() {
                            *z = -gt * exp(*z - l);
                        }
                    });
                    let target = picks[t].target;
                    if (v0..v0 + vc).contains(&target) {
                        row[target - v0] += gt;
                    }
                }
                // out (vc x dm) += tile^T hs
                matmul(vc, dm, rows, out, step > 0, tile, (1, vc), hs, (dm, 1), 1.0);
            }
        });
    out
}

#[derive(Debug)]
struct HeadBackward;

/// What the backward pass keeps: the inputs (shared, not copied), the picks, the row
/// log-sum-exps and the hidden states' gradient factor.
#[derive(Debug, Clone)]
struct HeadState {
    hidden: FlexTensor,
    weight: FlexTensor,
    picks: Arc<Vec<Pick>>,
    lse: Vec<f32>,
    m: Vec<f32>,
    dims: Dims,
}

fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

impl Backward<Flex, 2> for HeadBackward {
    type State = HeadState;

    fn backward(self, ops: Ops<HeadState, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_h, node_w] = ops.parents;
        let grad = flex_f32(&grads.consume::<Flex>(&ops.node));
        let s = ops.state;
        let d = s.dims;
        if let Some(node) = node_h {
            let gh = hidden_grad(&s.m, &s.picks, &grad, &d);
            grads.register::<Flex>(node.id, to_flex(gh, vec![d.positions, d.d_model]));
        }
        if let Some(node) = node_w {
            let gw = weight_grad(
                slice(&s.hidden),
                slice(&s.weight),
                &s.picks,
                &s.lse,
                &grad,
                &d,
            );
            let gw = to_flex(gw, vec![d.vocab, d.d_model]);
            let gw = match d.layout {
                WeightLayout::VocabMajor => gw,
                WeightLayout::ModelMajor => gw.transpose(0, 1).to_contiguous(),
            };
            grads.register::<Flex>(node.id, gw);
        }
    }
}

/// The output vector: each pick's log-prob in its slot, zero elsewhere.
fn scatter(logp: &[f32], picks: &[Pick], slots: usize) -> FlexTensor {
    let mut out = vec![0.0f32; slots];
    for (&v, p) in logp.iter().zip(picks) {
        out[p.slot] = v;
    }
    to_flex(out, vec![slots])
}

/// The autodiff form of [`log_probs`] on `Autodiff<Flex, $strategy>`, one expansion per
/// checkpointing strategy (as `kernels::attention`).
macro_rules! tracked_log_probs {
    ($strategy:ty, $hidden:ident, $weight:ident, $picks:ident, $slots:ident, $d:ident) => {{
        type Ad = Autodiff<Flex, $strategy>;
        let h = $hidden.try_into_primitive::<Ad>().ok()?;
        let w = $weight.try_into_primitive::<Ad>().ok()?;
        let (hp, wp) = (h.primitive().to_contiguous(), w.primitive().to_contiguous());
        // The factor of the hidden states' gradient costs a second pass over the vocabulary:
        // only when that gradient is wanted.
        let f = forward(slice(&hp), slice(&wp), $picks, &$d, h.is_tracked());
        let output = scatter(&f.logp, $picks, $slots);
        let result = match HeadBackward
            .prepare::<$strategy>([h.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                HeadState {
                    hidden: hp,
                    weight: wp,
                    picks: Arc::new($picks.to_vec()),
                    lse: f.lse,
                    m: f.m,
                    dims: $d,
                },
                output,
            ),
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        Some((Tensor::from_primitive::<Ad>(result), f.values))
    }};
}

/// `log_softmax(scale * hidden W^T)[pick.target]` at each pick's row, placed in its slot of a
/// `[slots]` vector (zero in the others), differentiable with respect to `hidden` and `weight`,
/// with each pick's [`PickValues`]; on f32 flex tensors (plain or autodiff), `None` elsewhere.
/// Every pick's row, target and slot must be in range.
///
/// # Shapes
/// - hidden: `[positions, d_model]`
/// - weight: `[vocab, d_model]` or `[d_model, vocab]`, as `layout` says
/// - output: `[slots]`
pub fn log_probs(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    layout: WeightLayout,
    picks: &[Pick],
    slots: usize,
    scale: f64,
) -> Option<(Tensor<1>, PickValues)> {
    if hidden.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        return None;
    }
    let [positions, d_model] = hidden.dims();
    let (vocab, wd) = match (layout, weight.dims()) {
        (WeightLayout::VocabMajor, [v, dm]) | (WeightLayout::ModelMajor, [dm, v]) => (v, dm),
    };
    let in_range = picks
        .iter()
        .all(|p| p.row < positions && p.target < vocab && p.slot < slots);
    if wd != d_model || vocab == 0 || !in_range {
        return None;
    }
    let d = Dims {
        positions,
        d_model,
        vocab,
        layout,
        scale: scale as f32,
    };
    if hidden.device().is_autodiff() {
        match hidden.device().gradient_checkpointing_strategy() {
            Some(GradientCheckpointingStrategy::Balanced) => {
                tracked_log_probs!(BalancedCheckpointing, hidden, weight, picks, slots, d)
            }
            _ => tracked_log_probs!(NoCheckpointing, hidden, weight, picks, slots, d),
        }
    } else {
        let h = hidden.try_into_primitive::<Flex>().ok()?;
        let w = weight.try_into_primitive::<Flex>().ok()?;
        let (hp, wp) = (h.to_contiguous(), w.to_contiguous());
        let f = forward(slice(&hp), slice(&wp), picks, &d, false);
        let output = scatter(&f.logp, picks, slots);
        Some((Tensor::from_primitive::<Flex>(output), f.values))
    }
}

/// Vocabulary entries per task of [`logits`]: `LOGITS_BLOCK x rows` outputs per gemm call.
const LOGITS_BLOCK: usize = 2048;

/// The logits `hidden W^T` of a few rows (generation's last positions), without a gradient, on
/// plain f32 flex tensors: parallel over fixed blocks of the vocabulary, reading the weight in
/// place in either layout. The generic matmul copies the transpose of a tied embedding table on
/// every call (28M floats at a vocabulary of 49,152), which dominated a decoding step. `None` on
/// other backends, dtypes and autodiff devices.
///
/// # Shapes
/// - hidden: `[rows, d_model]`
/// - weight: `[vocab, d_model]` or `[d_model, vocab]`, as `layout` says
/// - output: `[rows, vocab]`
pub fn logits(hidden: Tensor<2>, weight: Tensor<2>, layout: WeightLayout) -> Option<Tensor<2>> {
    if hidden.dtype() != DType::F32 || weight.dtype() != DType::F32 || hidden.device().is_autodiff()
    {
        return None;
    }
    let [rows, d_model] = hidden.dims();
    let (vocab, wd) = match (layout, weight.dims()) {
        (WeightLayout::VocabMajor, [v, dm]) | (WeightLayout::ModelMajor, [dm, v]) => (v, dm),
    };
    if wd != d_model || rows == 0 || d_model == 0 || vocab == 0 {
        return None;
    }
    let h = hidden.try_into_primitive::<Flex>().ok()?.to_contiguous();
    let w = weight.try_into_primitive::<Flex>().ok()?;
    let h = slice(&h);
    // W as `[vocab, d_model]`, read in place (an untied head is often a transposed view).
    let (w, (w_rows, w_columns)) = super::strided_2d(&w)?;
    let entry_strides = match layout {
        WeightLayout::VocabMajor => (w_rows, w_columns),
        WeightLayout::ModelMajor => (w_columns, w_rows),
    };
    // `logits^T = W h^T`, one block of vocabulary entries (contiguous rows of the output) per
    // task; each entry's dot product is one gemm call's, whatever the thread count.
    let mut transposed = vec![0.0f32; vocab * rows];
    transposed
        .par_chunks_mut(LOGITS_BLOCK * rows)
        .enumerate()
        .for_each(|(block, dst)| {
            let v0 = block * LOGITS_BLOCK;
            let entries = dst.len() / rows;
            matmul(
                entries,
                rows,
                d_model,
                dst,
                false,
                &w[v0 * entry_strides.0..],
                entry_strides,
                h,
                (1, d_model),
                1.0,
            );
        });
    let mut out = vec![0.0f32; rows * vocab];
    for (v, entry) in transposed.chunks_exact(rows).enumerate() {
        for (r, &x) in entry.iter().enumerate() {
            out[r * vocab + v] = x;
        }
    }
    Some(Tensor::from_primitive::<Flex>(to_flex(
        out,
        vec![rows, vocab],
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Device, Int, TensorData, Tolerance};
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    /// Host-seeded values in `[-amp, amp)` (the device RNG is shared by tests running at once).
    fn random(n: usize, amp: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.next_u32() as f64 / u32::MAX as f64 * 2.0 - 1.0) * amp) as f32)
            .collect()
    }

    #[derive(Debug, Clone, Copy)]
    struct Case {
        positions: usize,
        d_model: usize,
        vocab: usize,
        layout: WeightLayout,
        /// The hidden states include rows of the weight (an embedding lookup, as a tied head).
        tied: bool,
        scale: f64,
        seed: u64,
    }

    /// Everything compared between the two paths.
    #[derive(Debug, Clone, PartialEq)]
    struct Run {
        out: Vec<f32>,
        values: PickValues,
        grad_hidden: Vec<f32>,
        grad_weight: Vec<f32>,
    }

    fn vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    /// The output, its values, and the gradients of the hidden states and the weight under a
    /// random projection of the output; every third position is not picked.
    fn run(fused: bool, c: Case) -> Run {
        let device = crate::test_device().autodiff();
        let mut rng = ChaCha8Rng::seed_from_u64(c.seed);
        let (p, dm, v) = (c.positions, c.d_model, c.vocab);
        let w_shape = match c.layout {
            WeightLayout::VocabMajor => [v, dm],
            WeightLayout::ModelMajor => [dm, v],
        };
        let tensor = |values: Vec<f32>, shape: [usize; 2], device: &Device| {
            Tensor::<2>::from_data(TensorData::new(values, shape), device)
        };
        let weight = tensor(random(v * dm, 1.0, &mut rng), w_shape, &device).require_grad();
        let h0 = tensor(random(p * dm, 1.0, &mut rng), [p, dm], &device).require_grad();
        let hidden = if c.tied {
            let ids: Vec<i64> = (0..p).map(|i| (i * 7 % v) as i64).collect();
            let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [p]), &device);
            h0.clone() + weight.clone().select(0, ids)
        } else {
            h0.clone()
        };
        let picks: Vec<Pick> = (0..p)
            .filter(|i| i % 3 != 1)
            .map(|i| Pick {
                row: i,
                target: rng.next_u32() as usize % v,
                slot: i,
            })
            .collect();
        let projection =
            Tensor::<1>::from_data(TensorData::new(random(p, 1.0, &mut rng), [p]), &device);
        let (out, values) = if fused {
            log_probs(hidden, weight.clone(), c.layout, &picks, p, c.scale).expect("flex tensors")
        } else {
            let wt = match c.layout {
                WeightLayout::VocabMajor => weight.clone().transpose(),
                WeightLayout::ModelMajor => weight.clone(),
            };
            let logits = hidden.matmul(wt).mul_scalar(c.scale);
            let mut targets = vec![0i64; p];
            let mut mask = vec![0.0f32; p];
            for pick in &picks {
                targets[pick.row] = pick.target as i64;
                mask[pick.row] = 1.0;
            }
            let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [p, 1]), &device);
            let mask = Tensor::<1>::from_data(TensorData::new(mask, [p]), &device);
            let out = log_softmax(logits.clone(), 1)
                .gather(1, targets)
                .reshape([p])
                * mask;
            (out, reference_values(&vec(logits), v, &picks))
        };
        let grads = (out.clone() * projection).sum().backward();
        Run {
            out: vec(out),
            values,
            grad_hidden: vec(h0.grad(&grads).map(Tensor::from_inner).unwrap()),
            grad_weight: vec(weight.grad(&grads).map(Tensor::from_inner).unwrap()),
        }
    }

    /// Argmax hits, entropy and `log sum p^2` in f64 from the logits.
    fn reference_values(logits: &[f32], vocab: usize, picks: &[Pick]) -> PickValues {
        let mut out = PickValues::default();
        for pick in picks {
            let z: Vec<f64> = logits[pick.row * vocab..(pick.row + 1) * vocab]
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let argmax = z.iter().position(|&x| x == max).unwrap();
            let lse = max + z.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            let logp: Vec<f64> = z.iter().map(|x| x - lse).collect();
            out.hit.push(argmax == pick.target);
            out.entropy
                .push(-logp.iter().map(|l| l.exp() * l).sum::<f64>() as f32);
            out.log_sum_p2
                .push(logp.iter().map(|l| (2.0 * l).exp()).sum::<f64>().ln() as f32);
        }
        out
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        let (x, y) = (
            TensorData::new(a.to_vec(), [a.len()]),
            TensorData::new(b.to_vec(), [b.len()]),
        );
        x.assert_approx_eq::<f32>(&y, Tolerance::absolute(2e-5).set_relative(1e-4));
    }

    fn assert_matches(c: Case) {
        let (fused, generic) = (run(true, c), run(false, c));
        let what = format!("{c:?}");
        close(&fused.out, &generic.out, &what);
        assert_eq!(fused.values.hit, generic.values.hit, "{what}");
        close(&fused.values.entropy, &generic.values.entropy, &what);
        close(&fused.values.log_sum_p2, &generic.values.log_sum_p2, &what);
        close(&fused.grad_hidden, &generic.grad_hidden, &what);
        close(&fused.grad_weight, &generic.grad_weight, &what);
    }

    fn case(positions: usize, d_model: usize, vocab: usize, layout: WeightLayout) -> Case {
        Case {
            positions,
            d_model,
            vocab,
            layout,
            tied: false,
            scale: 1.0,
            seed: (positions * 31 + vocab) as u64,
        }
    }

    #[test]
    fn fused_head_matches_the_generic_path_untied() {
        // Odd position counts (one row block and a partial second), vocabularies not a multiple
        // of the vocabulary block, one position.
        for (p, dm, v) in [(37, 16, 1000), (5, 8, 513), (1, 4, 7), (64, 24, 1536)] {
            assert_matches(case(p, dm, v, WeightLayout::ModelMajor));
            assert_matches(case(p, dm, v, WeightLayout::VocabMajor));
        }
    }

    #[test]
    fn fused_head_matches_the_generic_path_tied_and_tempered() {
        for (p, dm, v) in [(33, 16, 700), (3, 8, 50)] {
            let tied = Case {
                tied: true,
                ..case(p, dm, v, WeightLayout::VocabMajor)
            };
            assert_matches(tied);
            // PPO's temperature: logits / 0.7.
            assert_matches(Case {
                scale: 1.0 / 0.7,
                ..tied
            });
        }
    }

    #[test]
    fn fused_head_matches_the_generic_path_over_many_positions() {
        // More picks than one step of a weight-gradient block.
        assert_matches(case(1600, 8, 600, WeightLayout::ModelMajor));
    }

    #[test]
    fn fused_head_without_autodiff_matches_its_tracked_forward() {
        let c = case(37, 16, 1000, WeightLayout::ModelMajor);
        let tracked = run(true, c);
        let device = crate::test_device();
        let mut rng = ChaCha8Rng::seed_from_u64(c.seed);
        let weight = Tensor::<2>::from_data(
            TensorData::new(random(1000 * 16, 1.0, &mut rng), [16, 1000]),
            &device,
        );
        let hidden = Tensor::<2>::from_data(
            TensorData::new(random(37 * 16, 1.0, &mut rng), [37, 16]),
            &device,
        );
        let picks: Vec<Pick> = (0..37)
            .filter(|i| i % 3 != 1)
            .map(|i| Pick {
                row: i,
                target: rng.next_u32() as usize % 1000,
                slot: i,
            })
            .collect();
        let (out, values) =
            log_probs(hidden, weight, WeightLayout::ModelMajor, &picks, 37, 1.0).unwrap();
        assert_eq!(vec(out), tracked.out);
        assert_eq!(values, tracked.values);
    }

    #[test]
    fn fused_head_does_not_depend_on_the_thread_count() {
        let cases = [
            case(101, 16, 1100, WeightLayout::ModelMajor),
            Case {
                tied: true,
                ..case(70, 8, 900, WeightLayout::VocabMajor)
            },
        ];
        let in_pool = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| cases.map(|c| run(true, c)))
        };
        let (one, two, four) = (in_pool(1), in_pool(2), in_pool(4));
        assert_eq!(one, two);
        assert_eq!(one, four);
    }

    /// `logits` against `hidden W^T` by Burn's matmul, in both layouts, at vocabularies that are
    /// and are not multiples of the block, and on 1, 2 and 4 threads.
    #[test]
    fn logits_match_the_generic_matmul() {
        let device = crate::test_device();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (rows, dm, vocab) in [(1, 16, 100), (4, 24, 2 * LOGITS_BLOCK + 37), (3, 8, 2048)] {
            let tensor = |values: Vec<f32>, shape: [usize; 2]| {
                Tensor::<2>::from_data(TensorData::new(values, shape), &device)
            };
            let hidden = tensor(random(rows * dm, 1.0, &mut rng), [rows, dm]);
            let vocab_major = tensor(random(vocab * dm, 1.0, &mut rng), [vocab, dm]);
            let want = vec(hidden.clone().matmul(vocab_major.clone().transpose()));
            for (weight, layout) in [
                (vocab_major.clone(), WeightLayout::VocabMajor),
                (vocab_major.clone().transpose(), WeightLayout::ModelMajor),
            ] {
                let got = || vec(logits(hidden.clone(), weight.clone(), layout).unwrap());
                let fused = got();
                assert_eq!(fused.len(), want.len());
                for (i, (a, b)) in fused.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "{layout:?}[{i}]: {a} vs {b}"
                    );
                }
                crate::model::kernels::testing::same_on_1_2_4_threads(got);
            }
        }
        let tracked = crate::test_device().autodiff();
        let h = Tensor::<2>::zeros([2, 4], &tracked);
        let w = Tensor::<2>::zeros([9, 4], &tracked);
        assert!(
            logits(h, w, WeightLayout::VocabMajor).is_none(),
            "autodiff is left to Burn"
        );
    }
}
