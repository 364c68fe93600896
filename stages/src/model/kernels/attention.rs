//! Grouped-query attention on the `cpu` (flex) backend, forward and backward on the autodiff
//! graph. Burn 0.22's autodiff runs attention through its generic fallback: the scores, their
//! scaled, masked and soft-maxed copies are separate `[batch, heads, seq_q, seq_k]` tensors kept
//! for the backward pass, each element-wise op runs on one thread, and grouped-query K/V heads
//! are repeated as copies. The kernel here walks one query head at a time in blocks of
//! [`BLOCK_Q`] rows, reads the shared K/V head in place, keeps only the output and the per-row
//! log-sum-exp for the backward pass, and recomputes the probabilities there (flash-attention's
//! scheme). A block computes scores only against the keys its rows can see (the union of their
//! spans: up to the diagonal under a causal mask, from the first real key under left padding,
//! from the segment's start in a packed row), so hidden keys cost nothing rather than being
//! computed and then masked; the row's max, `exp` and sum are vectorised.
//!
//! Reproducibility: work is split over (batch, KV head) groups, each computed by one thread in a
//! fixed order (the query heads of a group one after the other, their blocks in order), so no
//! sum depends on how many threads run or which thread ran what. gemm is called
//! single-threaded inside a group.
//!
//! Every entry point returns `None` when its tensors are not flex tensors (another backend, or
//! a dtype other than f32): the caller then runs the generic code.

use burn::tensor::{Bool, GradientCheckpointingStrategy, Tensor};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::{dot, exp_shifted, exp_shifted_sum, flex_f32, matmul, row_max, simd, to_flex};

/// Which keys each query may see.
#[derive(Debug, Clone)]
pub enum KeyMask {
    /// Query `i` sees keys `0..=i + (seq_k - seq_q)`.
    Causal,
    /// `[batch, seq_q, seq_k]`, row-major, `true` where a key is hidden.
    Hidden(std::sync::Arc<Vec<bool>>),
}

impl KeyMask {
    /// The host copy of a `[batch, 1, seq_q, seq_k]` mask tensor.
    pub fn from_tensor(mask: &Tensor<4, Bool>) -> Self {
        let data: Vec<bool> = mask
            .clone()
            .into_data()
            .convert::<bool>()
            .try_into_vec::<bool>()
            .expect("a bool mask");
        KeyMask::Hidden(std::sync::Arc::new(data))
    }
}

/// The shapes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq_q: usize,
    seq_k: usize,
    dim: usize,
    scale: f32,
}

impl Dims {
    fn n_rep(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// Query rows per block: a block's scores span the keys its rows see, so under a causal mask
/// a block of 32 rows of a 256-token sequence skips about 44% of the score work (a whole head
/// at once would skip none).
const BLOCK_Q: usize = 32;

/// The keys one query row sees: `lo..hi`, and whether every key in that span is visible (a
/// causal, padded, packed or cached mask from `mask.rs` always gives a contiguous span; another
/// explicit mask may hide keys inside it).
#[derive(Debug, Clone, Copy)]
struct Span {
    lo: usize,
    hi: usize,
    contiguous: bool,
}

/// Every query row's [`Span`], `[batch, seq_q]` row-major.
fn spans(d: &Dims, mask: &KeyMask) -> Vec<Span> {
    let (lq, lk) = (d.seq_q, d.seq_k);
    match mask {
        KeyMask::Causal => (0..d.batch)
            .flat_map(|_| {
                (0..lq).map(move |i| Span {
                    lo: 0,
                    hi: i + (lk - lq) + 1,
                    contiguous: true,
                })
            })
            .collect(),
        KeyMask::Hidden(m) => m
            .chunks(lk)
            .map(|row| {
                let lo = row.iter().position(|&h| !h).unwrap_or(0);
                let hi = row.iter().rposition(|&h| !h).map_or(lo, |j| j + 1);
                let contiguous = row[lo..hi].iter().all(|&h| !h);
                Span { lo, hi, contiguous }
            })
            .collect(),
    }
}

/// The keys a block of query rows needs: the union of their spans (empty when none sees any).
fn block_keys(spans: &[Span]) -> (usize, usize) {
    let seen = spans.iter().filter(|s| s.hi > s.lo);
    let lo = seen.clone().map(|s| s.lo).min().unwrap_or(0);
    let hi = seen.map(|s| s.hi).max().unwrap_or(lo);
    (lo, hi)
}

/// Scores of a block of query rows against keys `k0..k0 + w`, scaled; row `i` of `s` (width
/// `w`) is meaningful on its span only, and keys hidden inside a non-contiguous span are `-inf`.
#[allow(clippy::too_many_arguments)]
fn block_scores(
    s: &mut [f32],
    q: &[f32],
    k: &[f32],
    (k0, w): (usize, usize),
    rows: (usize, &[Span]),
    b: usize,
    d: &Dims,
    mask: &KeyMask,
) {
    let (i0, spans) = rows;
    let (lq, lk, dim) = (d.seq_q, d.seq_k, d.dim);
    let n = spans.len();
    matmul(
        n,
        w,
        dim,
        s,
        false,
        q,
        (dim, 1),
        &k[k0 * dim..],
        (1, dim),
        d.scale,
    );
    if let KeyMask::Hidden(m) = mask {
        for (r, span) in spans.iter().enumerate().filter(|(_, s)| !s.contiguous) {
            let hidden = &m[(b * lq + i0 + r) * lk + span.lo..][..span.hi - span.lo];
            let row = &mut s[r * w + span.lo - k0..][..span.hi - span.lo];
            for (x, _) in row.iter_mut().zip(hidden).filter(|(_, h)| **h) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// Forward: returns the output `[batch, heads, seq_q, dim]` and each row's log-sum-exp
/// `[batch, heads, seq_q]`.
fn forward(q: &[f32], k: &[f32], v: &[f32], d: &Dims, mask: &KeyMask) -> (Vec<f32>, Vec<f32>) {
    let (lq, lk, dim, n_rep) = (d.seq_q, d.seq_k, d.dim, d.n_rep());
    let spans = spans(d, mask);
    let mut out = vec![0.0f32; d.batch * d.heads * lq * dim];
    let mut lse = vec![0.0f32; d.batch * d.heads * lq];
    out.par_chunks_mut(n_rep * lq * dim)
        .zip(lse.par_chunks_mut(n_rep * lq))
        .enumerate()
        .for_each(|(group, (out, lse))| {
            let b = group / d.kv_heads;
            let kv = &k[group * lk * dim..(group + 1) * lk * dim];
            let vv = &v[group * lk * dim..(group + 1) * lk * dim];
            let mut s = vec![0.0f32; BLOCK_Q.min(lq) * lk];
            for r in 0..n_rep {
                let head = group * n_rep + r;
                let qh = &q[head * lq * dim..(head + 1) * lq * dim];
                for i0 in (0..lq).step_by(BLOCK_Q) {
                    let rows = &spans[b * lq + i0..b * lq + (i0 + BLOCK_Q).min(lq)];
                    let n = rows.len();
                    let (k0, k1) = block_keys(rows);
                    let w = k1 - k0;
                    let o = &mut out[(r * lq + i0) * dim..(r * lq + i0 + n) * dim];
                    if w == 0 {
                        // No row of the block sees a key (never built by `mask.rs`): zero rows,
                        // as a softmax over nothing contributes nothing.
                        lse[r * lq + i0..r * lq + i0 + n].fill(f32::INFINITY);
                        continue;
                    }
                    let s = &mut s[..n * w];
                    let qb = &qh[i0 * dim..(i0 + n) * dim];
                    block_scores(s, qb, kv, (k0, w), (i0, rows), b, d, mask);
                    simd(|| {
                        for (ri, span) in rows.iter().enumerate() {
                            let row = &mut s[ri * w..(ri + 1) * w];
                            let (lo, hi) = (span.lo.max(k0) - k0, span.hi.max(k0) - k0);
                            let max = row_max(&row[lo..hi]);
                            if max == f32::NEG_INFINITY {
                                row.fill(0.0);
                                lse[r * lq + i0 + ri] = f32::INFINITY;
                                continue;
                            }
                            let sum = exp_shifted_sum(&mut row[lo..hi], max);
                            let inv = 1.0 / sum;
                            row[..lo].fill(0.0);
                            row[hi..].fill(0.0);
                            for x in &mut row[lo..hi] {
                                *x *= inv;
                            }
                            lse[r * lq + i0 + ri] = max + sum.ln();
                        }
                    });
                    let vb = &vv[k0 * dim..k1 * dim];
                    matmul(n, dim, w, o, false, s, (w, 1), vb, (dim, 1), 1.0);
                }
            }
        });
    (out, lse)
}

/// Backward: the gradients of q, k and v from the output's gradient.
#[allow(clippy::too_many_arguments)]
fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    grad: &[f32],
    d: &Dims,
    mask: &KeyMask,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (lq, lk, dim, n_rep) = (d.seq_q, d.seq_k, d.dim, d.n_rep());
    let spans = spans(d, mask);
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    dq.par_chunks_mut(n_rep * lq * dim)
        .zip(dk.par_chunks_mut(lk * dim))
        .zip(dv.par_chunks_mut(lk * dim))
        .enumerate()
        .for_each(|(group, ((dq, dk), dv))| {
            let b = group / d.kv_heads;
            let kv = &k[group * lk * dim..(group + 1) * lk * dim];
            let vv = &v[group * lk * dim..(group + 1) * lk * dim];
            let mut p = vec![0.0f32; BLOCK_Q.min(lq) * lk];
            let mut dp = vec![0.0f32; BLOCK_Q.min(lq) * lk];
            for r in 0..n_rep {
                let head = group * n_rep + r;
                let span = head * lq * dim..(head + 1) * lq * dim;
                let (qh, oh, gh) = (&q[span.clone()], &out[span.clone()], &grad[span]);
                for i0 in (0..lq).step_by(BLOCK_Q) {
                    let rows = &spans[b * lq + i0..b * lq + (i0 + BLOCK_Q).min(lq)];
                    let n = rows.len();
                    let (k0, k1) = block_keys(rows);
                    let w = k1 - k0;
                    if w == 0 {
                        continue;
                    }
                    let (p, dp) = (&mut p[..n * w], &mut dp[..n * w]);
                    let block = i0 * dim..(i0 + n) * dim;
                    let (qb, ob, gb) = (&qh[block.clone()], &oh[block.clone()], &gh[block]);
                    // P = exp(S - lse), recomputed; zero outside each row's span.
                    block_scores(p, qb, kv, (k0, w), (i0, rows), b, d, mask);
                    simd(|| {
                        for (ri, span) in rows.iter().enumerate() {
                            let row = &mut p[ri * w..(ri + 1) * w];
                            let (lo, hi) = (span.lo.max(k0) - k0, span.hi.max(k0) - k0);
                            // An infinite lse marks a row with every key hidden: exp(-inf) = 0.
                            exp_shifted(&mut row[lo..hi], lse[head * lq + i0 + ri]);
                            row[..lo].fill(0.0);
                            row[hi..].fill(0.0);
                        }
                    });
                    let (kb, vb) = (&kv[k0 * dim..k1 * dim], &vv[k0 * dim..k1 * dim]);
                    // dV += P^T dO
                    let dvb = &mut dv[k0 * dim..k1 * dim];
                    matmul(w, dim, n, dvb, true, p, (1, w), gb, (dim, 1), 1.0);
                    // dP = dO V^T
                    matmul(n, w, dim, dp, false, gb, (dim, 1), vb, (1, dim), 1.0);
                    // dS = P * (dP - rowsum(dO * O)), in place in dp.
                    simd(|| {
                        for ri in 0..n {
                            let g = &gb[ri * dim..(ri + 1) * dim];
                            let o = &ob[ri * dim..(ri + 1) * dim];
                            let delta = dot(g, o);
                            let prow = &p[ri * w..(ri + 1) * w];
                            for (x, &pj) in dp[ri * w..(ri + 1) * w].iter_mut().zip(prow) {
                                *x = pj * (*x - delta);
                            }
                        }
                    });
                    // dQ = scale * dS K; dK += scale * dS^T Q
                    let dqb = &mut dq[(r * lq + i0) * dim..(r * lq + i0 + n) * dim];
                    matmul(n, dim, w, dqb, false, dp, (w, 1), kb, (dim, 1), d.scale);
                    let dkb = &mut dk[k0 * dim..k1 * dim];
                    matmul(w, dim, n, dkb, true, dp, (1, w), qb, (dim, 1), d.scale);
                }
            }
        });
    (dq, dk, dv)
}

#[derive(Debug)]
struct AttentionBackward;

/// What the backward pass keeps: the inputs, the output, the row log-sum-exps.
#[derive(Debug, Clone)]
struct AttentionState {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    out: FlexTensor,
    lse: Vec<f32>,
    dims: Dims,
    mask: KeyMask,
}

impl Backward<Flex, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<AttentionState, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad = flex_f32(&grads.consume::<Flex>(&ops.node));
        let s = ops.state;
        let (q, k, v, out) = (
            flex_f32(&s.q),
            flex_f32(&s.k),
            flex_f32(&s.v),
            flex_f32(&s.out),
        );
        let (dq, dk, dv) = backward(&q, &k, &v, &out, &s.lse, &grad, &s.dims, &s.mask);
        let d = s.dims;
        let kv_shape = vec![d.batch, d.kv_heads, d.seq_k, d.dim];
        if let Some(node) = node_q {
            let shape = vec![d.batch, d.heads, d.seq_q, d.dim];
            grads.register::<Flex>(node.id, to_flex(dq, shape));
        }
        if let Some(node) = node_k {
            grads.register::<Flex>(node.id, to_flex(dk, kv_shape.clone()));
        }
        if let Some(node) = node_v {
            grads.register::<Flex>(node.id, to_flex(dv, kv_shape));
        }
    }
}

fn dims(q: &[usize], k: &[usize], scale: f64) -> Option<Dims> {
    let (&[batch, heads, seq_q, dim], &[kb, kv_heads, seq_k, kd]) = (q, k) else {
        return None;
    };
    (kb == batch && kd == dim && kv_heads > 0 && heads % kv_heads == 0 && seq_k >= seq_q).then_some(
        Dims {
            batch,
            heads,
            kv_heads,
            seq_q,
            seq_k,
            dim,
            scale: scale as f32,
        },
    )
}

/// The autodiff form of [`attention`] on `Autodiff<Flex, $strategy>`: one expansion per
/// checkpointing strategy a device can have (Burn's conversion trait for the strategy is not
/// public, so the body cannot be generic over it).
macro_rules! tracked_attention {
    ($strategy:ty, $q:ident, $k:ident, $v:ident, $d:ident, $mask:ident, $out_shape:ident) => {{
        type Ad = Autodiff<Flex, $strategy>;
        let (q, k, v, d, mask, out_shape) = ($q, $k, $v, $d, $mask, $out_shape);
        let (q, k, v) = (
            q.try_into_primitive::<Ad>().ok()?,
            k.try_into_primitive::<Ad>().ok()?,
            v.try_into_primitive::<Ad>().ok()?,
        );
        let (qh, kh, vh) = (
            flex_f32(q.primitive()),
            flex_f32(k.primitive()),
            flex_f32(v.primitive()),
        );
        let (out, lse) = forward(&qh, &kh, &vh, &d, mask);
        let output = to_flex(out, out_shape);
        let result = match AttentionBackward
            .prepare::<$strategy>([q.node(), k.node(), v.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                AttentionState {
                    q: q.primitive().clone(),
                    k: k.primitive().clone(),
                    v: v.primitive().clone(),
                    out: output.clone(),
                    lse,
                    dims: d,
                    mask: mask.clone(),
                },
                output,
            ),
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        Some(Tensor::from_primitive::<Ad>(result))
    }};
}

/// Grouped-query attention, `softmax(scale * q k^T + mask) v`, query head `h` reading KV head
/// `h / (heads / kv_heads)`, on flex tensors (plain or autodiff); `None` elsewhere.
///
/// # Shapes
/// - q: `[batch, heads, seq_q, dim]`; k, v: `[batch, kv_heads, seq_k, dim]`
/// - output: `[batch, heads, seq_q, dim]`
pub fn attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: &KeyMask,
    scale: f64,
) -> Option<Tensor<4>> {
    let f32_only = [&q, &k, &v]
        .iter()
        .all(|t| t.dtype() == burn::tensor::DType::F32);
    if !f32_only {
        return None;
    }
    let d = dims(&q.dims(), &k.dims(), scale)?;
    if v.dims() != k.dims() {
        return None;
    }
    let out_shape = vec![d.batch, d.heads, d.seq_q, d.dim];
    if q.device().is_autodiff() {
        // Gradient checkpointing changes the autodiff backend's type, not only its behaviour;
        // the kernel keeps what its backward needs, so it is the same op under either strategy.
        match q.device().gradient_checkpointing_strategy() {
            Some(GradientCheckpointingStrategy::Balanced) => {
                tracked_attention!(BalancedCheckpointing, q, k, v, d, mask, out_shape)
            }
            _ => tracked_attention!(NoCheckpointing, q, k, v, d, mask, out_shape),
        }
    } else {
        let (q, k, v) = (
            q.try_into_primitive::<Flex>().ok()?,
            k.try_into_primitive::<Flex>().ok()?,
            v.try_into_primitive::<Flex>().ok()?,
        );
        let (out, _) = forward(&flex_f32(&q), &flex_f32(&k), &flex_f32(&v), &d, mask);
        Some(Tensor::from_primitive::<Flex>(to_flex(out, out_shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::mask::{AttentionMask, attention_mask_data};
    use burn::tensor::module::attention as burn_attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Device, TensorData, Tolerance};
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    fn repeat(t: Tensor<4>, n_rep: usize) -> Tensor<4> {
        let [b, kv, l, d] = t.dims();
        t.unsqueeze_dim::<5>(2)
            .expand([b, kv, n_rep, l, d])
            .reshape([b, kv * n_rep, l, d])
    }

    /// Host-seeded values (the device RNG is shared by tests running at the same time).
    fn random(shape: [usize; 4], rng: &mut ChaCha8Rng, device: &Device) -> Tensor<4> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| (rng.next_u32() as f64 / u32::MAX as f64 * 4.0 - 2.0) as f32)
            .collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    /// Values and gradients of q, k, v under a random projection of the output.
    fn run(
        fused: bool,
        shapes: (usize, usize, usize, usize, usize, usize),
        padding: Option<&[Vec<u8>]>,
        seed: u64,
    ) -> Vec<Vec<f32>> {
        let lq = shapes.3;
        let mask = padding.map(|rows| attention_mask_data(rows, lq, None));
        run_with(fused, shapes, mask, seed)
    }

    /// [`run`] with an explicit `[batch, 1, seq_q, seq_k]` mask (`None`: causal).
    fn run_with(
        fused: bool,
        shapes: (usize, usize, usize, usize, usize, usize),
        mask: Option<(Vec<bool>, [usize; 4])>,
        seed: u64,
    ) -> Vec<Vec<f32>> {
        let (b, h, kv, lq, lk, d) = shapes;
        let device = crate::test_device().autodiff();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let q = random([b, h, lq, d], &mut rng, &device).require_grad();
        let k = random([b, kv, lk, d], &mut rng, &device).require_grad();
        let v = random([b, kv, lk, d], &mut rng, &device).require_grad();
        let w = random([b, h, lq, d], &mut rng, &device);
        let mask = match mask {
            None => AttentionMask::Causal,
            Some((data, shape)) => {
                AttentionMask::Explicit(Tensor::from_data(TensorData::new(data, shape), &device))
            }
        };
        let scale = 1.0 / (d as f64).sqrt();
        let out = if fused {
            let key_mask = match &mask {
                AttentionMask::Causal => KeyMask::Causal,
                AttentionMask::Explicit(m) => KeyMask::from_tensor(m),
            };
            attention(q.clone(), k.clone(), v.clone(), &key_mask, scale).expect("flex tensors")
        } else {
            let (m, is_causal) = match &mask {
                AttentionMask::Causal => (None, true),
                AttentionMask::Explicit(m) => (Some(m.clone().expand([b, h, lq, lk])), false),
            };
            let options = AttentionModuleOptions {
                scale: Some(scale),
                softcap: None,
                is_causal,
            };
            burn_attention(
                q.clone(),
                repeat(k.clone(), h / kv),
                repeat(v.clone(), h / kv),
                m,
                None,
                options,
            )
        };
        let grads = (out.clone() * w).sum().backward();
        let vec = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
        vec![
            vec(out),
            vec(q.grad(&grads).map(Tensor::from_inner).unwrap()),
            vec(k.grad(&grads).map(Tensor::from_inner).unwrap()),
            vec(v.grad(&grads).map(Tensor::from_inner).unwrap()),
        ]
    }

    fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>], what: &str) {
        for (name, (x, y)) in ["output", "dq", "dk", "dv"].iter().zip(a.iter().zip(b)) {
            let dx = TensorData::new(x.clone(), [x.len()]);
            let dy = TensorData::new(y.clone(), [y.len()]);
            let _ = what;
            dx.assert_approx_eq::<f32>(&dy, Tolerance::absolute(2e-5).set_relative(1e-4));
            assert_eq!(x.len(), y.len(), "{what}: {name}");
        }
    }

    #[test]
    fn fused_attention_matches_the_generic_path_causal() {
        // (batch, heads, kv_heads, seq_q, seq_k, head_dim): GQA ratios 1, 2 and 3, odd lengths.
        for (i, shapes) in [
            (2, 4, 4, 7, 7, 8),
            (1, 4, 2, 13, 13, 16),
            (2, 6, 2, 5, 5, 4),
            (1, 3, 1, 1, 1, 8),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 10 + i as u64;
            let what = format!("{shapes:?}");
            assert_close(
                &run(true, shapes, None, seed),
                &run(false, shapes, None, seed),
                &what,
            );
        }
    }

    #[test]
    fn fused_attention_matches_the_generic_path_with_masks() {
        // Right padding (training), left padding (generation), packed segments.
        let right = vec![vec![1, 1, 1, 1, 1, 0, 0], vec![1, 1, 1, 1, 1, 1, 1]];
        let left = vec![vec![0, 0, 1, 1, 1, 1, 1], vec![1, 1, 1, 1, 1, 1, 1]];
        let packed = vec![vec![1, 1, 1, 2, 2, 3, 0], vec![1, 1, 2, 2, 2, 2, 2]];
        for (i, rows) in [right, left, packed].iter().enumerate() {
            for ratio in [1, 2, 3] {
                let shapes = (2, 3 * ratio, 3, 7, 7, 8);
                let seed = 20 + i as u64;
                let what = format!("{rows:?} {shapes:?}");
                assert_close(
                    &run(true, shapes, Some(rows), seed),
                    &run(false, shapes, Some(rows), seed),
                    &what,
                );
            }
        }
        // Cached keys: 3 new queries over 9 keys, the first left-padded.
        let cached = vec![vec![0, 0, 1, 1, 1, 1, 1, 1, 1], vec![1; 9]];
        let shapes = (2, 4, 2, 3, 9, 8);
        assert_close(
            &run(true, shapes, Some(&cached), 30),
            &run(false, shapes, Some(&cached), 30),
            "cached",
        );
    }

    #[test]
    fn fused_attention_matches_the_generic_path_over_several_query_blocks() {
        // Longer than one block of query rows, so that blocks see different key spans.
        let n = 2 * BLOCK_Q + 7;
        let shapes = (2, 6, 2, n, n, 8);
        assert_close(
            &run(true, shapes, None, 50),
            &run(false, shapes, None, 50),
            "causal",
        );
        let left = vec![[vec![0; 40], vec![1; n - 40]].concat(), vec![1; n]];
        let packed = vec![
            [vec![1; 30], vec![2; 25], vec![0; n - 55]].concat(),
            [vec![1; 3], vec![2; n - 3]].concat(),
        ];
        for (i, rows) in [left, packed].iter().enumerate() {
            let seed = 51 + i as u64;
            let what = format!("rows {i}");
            assert_close(
                &run(true, shapes, Some(rows), seed),
                &run(false, shapes, Some(rows), seed),
                &what,
            );
        }
        // Cached keys: BLOCK_Q + 5 new queries over 80 keys, the first row left-padded.
        let lq = BLOCK_Q + 5;
        let cached = vec![[vec![0; 9], vec![1; 71]].concat(), vec![1; 80]];
        let shapes = (2, 3, 1, lq, 80, 8);
        assert_close(
            &run(true, shapes, Some(&cached), 53),
            &run(false, shapes, Some(&cached), 53),
            "cached",
        );
    }

    #[test]
    fn fused_attention_matches_the_generic_path_with_holes_in_a_row() {
        // An explicit mask hiding keys inside a row's span (not one `mask.rs` builds, but a
        // `KeyMask` may hold it): every third key before the diagonal hidden, the diagonal seen.
        let (b, lq, lk) = (2, 11, 11);
        let data: Vec<bool> = (0..b * lq * lk)
            .map(|e| {
                let (i, j) = ((e / lk) % lq, e % lk);
                j > i || (j < i && (i + j + e / (lq * lk)) % 3 == 0)
            })
            .collect();
        let shapes = (b, 4, 2, lq, lk, 8);
        let mask = || Some((data.clone(), [b, 1, lq, lk]));
        assert_close(
            &run_with(true, shapes, mask(), 60),
            &run_with(false, shapes, mask(), 60),
            "holes",
        );
    }

    #[test]
    fn fused_attention_does_not_depend_on_the_thread_count() {
        let shapes = (3, 6, 2, 71, 71, 16);
        let padding = vec![
            vec![1; 71],
            [vec![1; 50], vec![0; 21]].concat(),
            [vec![0; 40], vec![1; 31]].concat(),
        ];
        let in_pool = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| {
                    (
                        run(true, shapes, None, 5),
                        run(true, shapes, Some(&padding), 6),
                    )
                })
        };
        let (one, two, four) = (in_pool(1), in_pool(2), in_pool(4));
        assert_eq!(one, two);
        assert_eq!(one, four);
    }
}
