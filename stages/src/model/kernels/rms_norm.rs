//! RMSNorm, `x / sqrt(mean(x^2) + eps) * weight` over the last dimension, as one op on the `cpu`
//! (flex) backend, forward and backward (input and weight). Burn's autodiff runs it as a square,
//! a mean, an add, a square root, a division and a product, each a tensor kept for the backward
//! pass and computed on one thread; this kernel does a row in one pass, parallel over rows, and
//! keeps only the input and each row's root mean square.
//!
//! Numerics follow `model/rms_norm.rs` (transformers' `LlamaRMSNorm` in fp32): eps inside the
//! square root, the input divided by the root (not multiplied by a reciprocal), then scaled.
//! The weight's gradient is summed over rows in chunks of [`ROWS`] rows, the chunks' partial
//! sums then added in order: a fixed order that depends on the shape only.

use burn::tensor::{DType, Tensor};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::{dot, per_strategy, simd, to_flex};

/// Rows per parallel task, and per partial sum of the weight's gradient.
const ROWS: usize = 64;

/// Returns the output and each row's root mean square `sqrt(mean(x^2) + eps)`.
fn forward(x: &[f32], weight: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let n = weight.len();
    let rows = x.len() / n;
    let mut out = vec![0.0f32; x.len()];
    let mut rms = vec![0.0f32; rows];
    out.par_chunks_mut(ROWS * n)
        .zip(rms.par_chunks_mut(ROWS))
        .zip(x.par_chunks(ROWS * n))
        .for_each(|((out, rms), x)| {
            simd(|| {
                for ((o, r), x) in out.chunks_mut(n).zip(rms.iter_mut()).zip(x.chunks(n)) {
                    *r = (dot(x, x) / n as f32 + eps).sqrt();
                    for ((o, &x), &w) in o.iter_mut().zip(x).zip(weight) {
                        *o = x / *r * w;
                    }
                }
            })
        });
    (out, rms)
}

/// The gradients of the input (when `want_x`) and of the weight (when `want_w`).
fn backward(
    x: &[f32],
    weight: &[f32],
    rms: &[f32],
    grad: &[f32],
    (want_x, want_w): (bool, bool),
) -> (Vec<f32>, Vec<f32>) {
    let n = weight.len();
    let mut dx = vec![0.0f32; if want_x { x.len() } else { 0 }];
    let chunks = rms.len().div_ceil(ROWS);
    let mut partial = vec![0.0f32; if want_w { chunks * n } else { 0 }];
    // One chunk of rows: its rows' input gradients, and its partial sum of the weight's.
    let task = |(c, (dx, dw)): (usize, (&mut [f32], &mut [f32]))| {
        let rows = c * ROWS..((c + 1) * ROWS).min(rms.len());
        simd(|| {
            let (mut normed, mut d_normed) = (vec![0.0f32; n], vec![0.0f32; n]);
            for (ri, row) in rows.enumerate() {
                let (xr, gr, r) = (&x[row * n..][..n], &grad[row * n..][..n], rms[row]);
                for (o, &x) in normed.iter_mut().zip(xr) {
                    *o = x / r;
                }
                if !dw.is_empty() {
                    for ((a, &g), &y) in dw.iter_mut().zip(gr).zip(&normed) {
                        *a += g * y;
                    }
                }
                if !dx.is_empty() {
                    // dx = (d normed - normed * mean(d normed * normed)) / rms
                    for ((d, &g), &w) in d_normed.iter_mut().zip(gr).zip(weight) {
                        *d = g * w;
                    }
                    let c = dot(&d_normed, &normed) / n as f32;
                    let dxr = &mut dx[ri * n..][..n];
                    for ((d, &dn), &y) in dxr.iter_mut().zip(&d_normed).zip(&normed) {
                        *d = (dn - y * c) / r;
                    }
                }
            }
        })
    };
    // Empty slices stand for the gradients nobody asked for.
    let dx_chunks: Vec<&mut [f32]> = if want_x {
        dx.chunks_mut(ROWS * n).collect()
    } else {
        (0..chunks).map(|_| &mut [][..]).collect()
    };
    let dw_chunks: Vec<&mut [f32]> = if want_w {
        partial.chunks_mut(n).collect()
    } else {
        (0..chunks).map(|_| &mut [][..]).collect()
    };
    dx_chunks
        .into_par_iter()
        .zip(dw_chunks)
        .enumerate()
        .for_each(task);
    let mut dw = vec![0.0f32; if want_w { n } else { 0 }];
    for p in partial.chunks(n) {
        for (a, &b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    (dx, dw)
}

#[derive(Debug)]
struct RmsNormBackward;

#[derive(Debug, Clone)]
struct RmsNormState {
    x: FlexTensor,
    weight: FlexTensor,
    rms: Vec<f32>,
    shape: Vec<usize>,
}

impl Backward<Flex, 2> for RmsNormBackward {
    type State = RmsNormState;

    fn backward(self, ops: Ops<RmsNormState, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let s = ops.state;
        let size = s.weight_len();
        let (dx, dw) = backward(
            s.x.as_slice::<f32>().expect("an f32 tensor"),
            s.weight.as_slice::<f32>().expect("an f32 tensor"),
            &s.rms,
            grad.as_slice::<f32>().expect("an f32 tensor"),
            (node_x.is_some(), node_w.is_some()),
        );
        if let Some(node) = node_x {
            grads.register::<Flex>(node.id, to_flex(dx, s.shape));
        }
        if let Some(node) = node_w {
            grads.register::<Flex>(node.id, to_flex(dw, vec![size]));
        }
    }
}

impl RmsNormState {
    fn weight_len(&self) -> usize {
        *self.shape.last().expect("a rank of at least 1")
    }
}

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dimension, on flex f32 tensors (plain or
/// autodiff); `None` elsewhere.
///
/// # Shapes
/// - x: `[..., size]`; weight: `[size]`
/// - output: same as x
pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Option<Tensor<D>> {
    let shape = x.dims().to_vec();
    let size = *shape.last()?;
    if x.dtype() != DType::F32 || weight.dtype() != DType::F32 || weight.dims() != [size] {
        return None;
    }
    if size == 0 {
        return None;
    }
    let eps = eps as f32;
    let device = x.device();
    if device.is_autodiff() {
        per_strategy!(device, Strategy => {
            type Ad = Autodiff<Flex, Strategy>;
            let xa = x.try_into_primitive::<Ad>().ok()?;
            let wa = weight.try_into_primitive::<Ad>().ok()?;
            let (xc, wc) = (xa.primitive().to_contiguous(), wa.primitive().to_contiguous());
            let (out, rms) = forward(xc.as_slice::<f32>()?, wc.as_slice::<f32>()?, eps);
            let output = to_flex(out, shape.clone());
            let result = match RmsNormBackward
                .prepare::<Strategy>([xa.node(), wa.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let state = RmsNormState { x: xc, weight: wc, rms, shape };
                    prep.finish(state, output)
                }
                OpsKind::UnTracked(prep) => prep.finish(output),
            };
            Some(Tensor::from_primitive::<Ad>(result))
        })
    } else {
        let xc = x.try_into_primitive::<Flex>().ok()?.to_contiguous();
        let wc = weight.try_into_primitive::<Flex>().ok()?.to_contiguous();
        let (out, _) = forward(xc.as_slice::<f32>()?, wc.as_slice::<f32>()?, eps);
        Some(Tensor::from_primitive::<Flex>(to_flex(out, shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_close, random, same_on_1_2_4_threads, to_vec};
    use crate::model::rms_norm::RmsNormConfig;
    use burn::module::{Module, Param};
    use burn::tensor::Tensor;
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::SeedableRng;

    /// Output and the gradients of the input and the weight under a random projection of the
    /// output, through `RmsNorm::forward` (fused) or `RmsNorm::forward_generic`.
    fn run(fused: bool, shape: [usize; 3], eps: f64, seed: u64) -> Vec<Vec<f32>> {
        let device = crate::test_device().autodiff();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let size = shape[2];
        let x = random(shape, 3.0, &mut rng, &device).require_grad();
        let mut norm = RmsNormConfig::new(size).with_eps(eps).init(&device);
        let weight = random([size], 2.0, &mut rng, &device).require_grad();
        norm.weight = Param::from_tensor(weight);
        let w = random(shape, 1.0, &mut rng, &device);
        let out = if fused {
            norm.forward(x.clone())
        } else {
            norm.forward_generic(x.clone())
        };
        let grads = (out.clone() * w).sum().backward();
        let dx = to_vec(x.grad(&grads).map(Tensor::from_inner).unwrap());
        let dw = to_vec(
            norm.weight
                .val()
                .grad(&grads)
                .map(Tensor::from_inner)
                .unwrap(),
        );
        vec![to_vec(out), dx, dw]
    }

    #[test]
    fn fused_rms_norm_matches_the_generic_ops() {
        // Odd widths, a single row, more rows than one chunk of the weight's gradient.
        for (i, (shape, eps)) in [
            ([1, 1, 1], 1e-6),
            ([2, 7, 13], 1e-5),
            ([3, 50, 256], 1e-6),
            ([1, 3, 577], 0.5),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 40 + i as u64;
            let (fused, generic) = (run(true, shape, eps, seed), run(false, shape, eps, seed));
            for (name, (a, b)) in ["output", "dx", "dweight"]
                .iter()
                .zip(fused.iter().zip(&generic))
            {
                assert_close(a, b, (1e-5, 1e-4), &format!("{shape:?} {name}"));
            }
        }
    }

    #[test]
    fn fused_rms_norm_with_a_frozen_weight_and_on_plain_flex() {
        let device = crate::test_device();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let norm = RmsNormConfig::new(24).init(&device);
        let x: Tensor<2> = random([5, 24], 3.0, &mut rng, &device);
        let want = to_vec(norm.forward_generic(x.clone()));
        let fused = super::rms_norm(x.clone(), norm.weight.val(), norm.eps).expect("flex tensors");
        assert_close(&to_vec(fused), &want, (1e-6, 1e-5), "plain flex");
        assert_close(&to_vec(norm.forward(x)), &want, (1e-6, 1e-5), "forward");

        // Only the input records its gradient (the weight is frozen).
        let ad = device.autodiff();
        let norm = RmsNormConfig::new(24).init(&ad);
        let norm = norm.no_grad();
        let x: Tensor<2> = random([5, 24], 3.0, &mut rng, &ad).require_grad();
        let dx = |fused: bool| {
            let y = if fused {
                norm.forward(x.clone())
            } else {
                norm.forward_generic(x.clone())
            };
            let grads = (y.clone() * y).sum().backward();
            assert!(norm.weight.val().grad(&grads).is_none());
            to_vec(x.grad(&grads).map(Tensor::from_inner).unwrap())
        };
        assert_close(&dx(true), &dx(false), (1e-5, 1e-4), "frozen weight");
    }

    #[test]
    fn fused_rms_norm_does_not_depend_on_the_thread_count() {
        same_on_1_2_4_threads(|| run(true, [3, 77, 256], 1e-6, 8));
    }
}
