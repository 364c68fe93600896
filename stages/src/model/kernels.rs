//! Fused kernels of the `cpu` (flex) backend, with their own backward pass on the autodiff
//! device. Burn 0.22's autodiff runs attention through its generic fallback: the scores, their
//! scaled, masked and soft-maxed copies are separate `[batch, heads, seq_q, seq_k]` tensors kept
//! for the backward pass, each element-wise op runs on one thread, and grouped-query K/V heads
//! are repeated as copies. The kernel here computes one query head at a time (its scores are the
//! only block held), reads the shared K/V head in place, keeps only the output and the per-row
//! log-sum-exp for the backward pass, and recomputes the probabilities there (flash-attention's
//! scheme, with one head's scores as the block).
//!
//! Reproducibility: work is split over (batch, KV head) groups, each computed by one thread in a
//! fixed order (the query heads of a group one after the other), so no sum depends on how many
//! threads run or which thread ran what. gemm is called single-threaded inside a group.
//!
//! Every entry point returns `None` when its tensors are not flex tensors (another backend, or
//! a dtype other than f32): the caller then runs the generic code.

use burn::tensor::{Bool, GradientCheckpointingStrategy, Tensor, TensorData};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

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

    #[inline]
    fn hidden(&self, b: usize, i: usize, j: usize, seq_q: usize, seq_k: usize) -> bool {
        match self {
            KeyMask::Causal => j > i + (seq_k - seq_q),
            KeyMask::Hidden(m) => m[(b * seq_q + i) * seq_k + j],
        }
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

/// `dst (m x n, row-major) = alpha * dst + beta * lhs * rhs` with explicit strides, one thread.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    beta: f32,
) {
    debug_assert!(dst.len() >= m * n);
    debug_assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    debug_assert!(k == 0 || n == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the slices cover every index the strides reach (checked above in debug builds,
    // guaranteed by the callers' shapes), and dst does not alias lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Scores of one query head against its KV head, scaled and masked (`-inf` where hidden).
fn scores(s: &mut [f32], q: &[f32], k: &[f32], b: usize, d: &Dims, mask: &KeyMask) {
    let (lq, lk, dim) = (d.seq_q, d.seq_k, d.dim);
    matmul(lq, lk, dim, s, false, q, (dim, 1), k, (1, dim), d.scale);
    for i in 0..lq {
        let row = &mut s[i * lk..(i + 1) * lk];
        for (j, x) in row.iter_mut().enumerate() {
            if mask.hidden(b, i, j, lq, lk) {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// Forward: returns the output `[batch, heads, seq_q, dim]` and each row's log-sum-exp
/// `[batch, heads, seq_q]`.
fn forward(q: &[f32], k: &[f32], v: &[f32], d: &Dims, mask: &KeyMask) -> (Vec<f32>, Vec<f32>) {
    let (lq, lk, dim, n_rep) = (d.seq_q, d.seq_k, d.dim, d.n_rep());
    let mut out = vec![0.0f32; d.batch * d.heads * lq * dim];
    let mut lse = vec![0.0f32; d.batch * d.heads * lq];
    out.par_chunks_mut(n_rep * lq * dim)
        .zip(lse.par_chunks_mut(n_rep * lq))
        .enumerate()
        .for_each(|(group, (out, lse))| {
            let b = group / d.kv_heads;
            let kv = &k[group * lk * dim..(group + 1) * lk * dim];
            let vv = &v[group * lk * dim..(group + 1) * lk * dim];
            let mut s = vec![0.0f32; lq * lk];
            for r in 0..n_rep {
                let head = group * n_rep + r;
                let qh = &q[head * lq * dim..(head + 1) * lq * dim];
                scores(&mut s, qh, kv, b, d, mask);
                for i in 0..lq {
                    let row = &mut s[i * lk..(i + 1) * lk];
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    if max == f32::NEG_INFINITY {
                        // Every key hidden (never built by `mask.rs`): a zero row, as a softmax
                        // over nothing contributes nothing.
                        row.fill(0.0);
                        lse[r * lq + i] = f32::INFINITY;
                        continue;
                    }
                    let mut sum = 0.0f32;
                    for x in row.iter_mut() {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    for x in row.iter_mut() {
                        *x *= inv;
                    }
                    lse[r * lq + i] = max + sum.ln();
                }
                let o = &mut out[r * lq * dim..(r + 1) * lq * dim];
                matmul(lq, dim, lk, o, false, &s, (lk, 1), vv, (dim, 1), 1.0);
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
            let mut p = vec![0.0f32; lq * lk];
            let mut dp = vec![0.0f32; lq * lk];
            for r in 0..n_rep {
                let head = group * n_rep + r;
                let span = head * lq * dim..(head + 1) * lq * dim;
                let (qh, oh, gh) = (&q[span.clone()], &out[span.clone()], &grad[span]);
                // P = exp(S - lse), recomputed.
                scores(&mut p, qh, kv, b, d, mask);
                for i in 0..lq {
                    // An infinite lse marks a row with every key hidden: exp(-inf - inf) = 0.
                    let l = lse[head * lq + i];
                    for x in &mut p[i * lk..(i + 1) * lk] {
                        *x = (*x - l).exp();
                    }
                }
                // dV += P^T dO
                matmul(lk, dim, lq, dv, r > 0, &p, (1, lk), gh, (dim, 1), 1.0);
                // dP = dO V^T
                matmul(lq, lk, dim, &mut dp, false, gh, (dim, 1), vv, (1, dim), 1.0);
                // dS = P * (dP - rowsum(dO * O)), in place in dp.
                for i in 0..lq {
                    let g = &gh[i * dim..(i + 1) * dim];
                    let o = &oh[i * dim..(i + 1) * dim];
                    let delta: f32 = g.iter().zip(o).map(|(a, b)| a * b).sum();
                    let prow = &p[i * lk..(i + 1) * lk];
                    for (x, &pj) in dp[i * lk..(i + 1) * lk].iter_mut().zip(prow) {
                        *x = pj * (*x - delta);
                    }
                }
                // dQ = scale * dS K; dK += scale * dS^T Q
                let dqh = &mut dq[r * lq * dim..(r + 1) * lq * dim];
                matmul(lq, dim, lk, dqh, false, &dp, (lk, 1), kv, (dim, 1), d.scale);
                matmul(lk, dim, lq, dk, r > 0, &dp, (1, lk), qh, (dim, 1), d.scale);
            }
        });
    (dq, dk, dv)
}

pub(crate) fn flex_f32(t: &FlexTensor) -> Vec<f32> {
    let t = t.to_contiguous();
    t.as_slice::<f32>().expect("an f32 tensor").to_vec()
}

pub(crate) fn to_flex(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
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
    use burn::tensor::{Device, Tolerance};
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
        let (b, h, kv, lq, lk, d) = shapes;
        let device = crate::test_device().autodiff();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let q = random([b, h, lq, d], &mut rng, &device).require_grad();
        let k = random([b, kv, lk, d], &mut rng, &device).require_grad();
        let v = random([b, kv, lk, d], &mut rng, &device).require_grad();
        let w = random([b, h, lq, d], &mut rng, &device);
        let mask = match padding {
            None => AttentionMask::Causal,
            Some(rows) => {
                let (data, shape) = attention_mask_data(rows, lq, None);
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
    fn fused_attention_does_not_depend_on_the_thread_count() {
        let shapes = (3, 6, 2, 33, 33, 16);
        let padding = vec![
            vec![1; 33],
            [vec![1; 20], vec![0; 13]].concat(),
            vec![1; 33],
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
