//! SwiGLU's gating, `silu(gate) * up`, as one op on the `cpu` (flex) backend. Burn's autodiff
//! runs it as a sigmoid, two products and their backward ops, each a separate tensor on one
//! thread; this kernel computes the product and, in its backward pass, both gradients in one
//! pass each, parallel over chunks of elements. Element-wise only: no sum, so the result does
//! not depend on how the work is split.

use burn::tensor::{DType, Tensor};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::{CHUNK, exp, per_strategy, simd, to_flex};

/// `1 / (1 + e^-x)`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

fn forward(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0f32; gate.len()];
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| {
            simd(|| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g * sigmoid(g) * u;
                }
            })
        });
    out
}

/// `(d gate, d up)`: `d up = grad * silu(gate)`, `d gate = grad * up * s * (1 + gate (1 - s))`
/// with `s = sigmoid(gate)`.
fn backward(gate: &[f32], up: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut d_gate = vec![0.0f32; gate.len()];
    let mut d_up = vec![0.0f32; gate.len()];
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .zip(grad.par_chunks(CHUNK))
        .for_each(|(((dg, du), (g, u)), gr)| {
            simd(|| {
                for ((((dg, du), &g), &u), &gr) in dg.iter_mut().zip(du).zip(g).zip(u).zip(gr) {
                    let s = sigmoid(g);
                    *du = gr * (g * s);
                    *dg = gr * u * (s * (1.0 + g * (1.0 - s)));
                }
            })
        });
    (d_gate, d_up)
}

#[derive(Debug)]
struct SwigluBackward;

#[derive(Debug, Clone)]
struct SwigluState {
    gate: FlexTensor,
    up: FlexTensor,
    shape: Vec<usize>,
}

impl Backward<Flex, 2> for SwigluBackward {
    type State = SwigluState;

    fn backward(self, ops: Ops<SwigluState, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let (gate, up) = (ops.state.gate.to_contiguous(), ops.state.up.to_contiguous());
        let shape = ops.state.shape.clone();
        let (d_gate, d_up) = backward(
            gate.as_slice::<f32>().expect("an f32 tensor"),
            up.as_slice::<f32>().expect("an f32 tensor"),
            grad.as_slice::<f32>().expect("an f32 tensor"),
        );
        if let Some(node) = node_gate {
            grads.register::<Flex>(node.id, to_flex(d_gate, shape.clone()));
        }
        if let Some(node) = node_up {
            grads.register::<Flex>(node.id, to_flex(d_up, shape));
        }
    }
}

/// `silu(gate) * up` on flex f32 tensors (plain or autodiff) of the same shape; `None`
/// elsewhere.
pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Option<Tensor<D>> {
    if gate.dtype() != DType::F32 || up.dtype() != DType::F32 || gate.dims() != up.dims() {
        return None;
    }
    let device = gate.device();
    let shape = gate.dims().to_vec();
    if device.is_autodiff() {
        per_strategy!(device, Strategy => {
            type Ad = Autodiff<Flex, Strategy>;
            let g = gate.try_into_primitive::<Ad>().ok()?;
            let u = up.try_into_primitive::<Ad>().ok()?;
            let (gc, uc) = (g.primitive().to_contiguous(), u.primitive().to_contiguous());
            let out = forward(gc.as_slice::<f32>()?, uc.as_slice::<f32>()?);
            let output = to_flex(out, shape.clone());
            let result = match SwigluBackward
                .prepare::<Strategy>([g.node(), u.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let state = SwigluState { gate: gc, up: uc, shape };
                    prep.finish(state, output)
                },
                OpsKind::UnTracked(prep) => prep.finish(output),
            };
            Some(Tensor::from_primitive::<Ad>(result))
        })
    } else {
        let g = gate.try_into_primitive::<Flex>().ok()?.to_contiguous();
        let u = up.try_into_primitive::<Flex>().ok()?.to_contiguous();
        let out = forward(g.as_slice::<f32>()?, u.as_slice::<f32>()?);
        Some(Tensor::from_primitive::<Flex>(to_flex(out, shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_close, random, same_on_1_2_4_threads, to_vec};
    use super::*;
    use burn::tensor::activation::silu;
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::SeedableRng;

    /// Output and the gradients of gate and up under a random projection of the output.
    fn run(fused: bool, shape: [usize; 3], seed: u64) -> Vec<Vec<f32>> {
        let device = crate::test_device().autodiff();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let gate = random(shape, 6.0, &mut rng, &device).require_grad();
        let up = random(shape, 2.0, &mut rng, &device).require_grad();
        let w = random(shape, 1.0, &mut rng, &device);
        let out = if fused {
            swiglu(gate.clone(), up.clone()).expect("flex tensors")
        } else {
            silu(gate.clone()) * up.clone()
        };
        let grads = (out.clone() * w).sum().backward();
        let grad = |t: &Tensor<3>| to_vec(t.grad(&grads).map(Tensor::from_inner).unwrap());
        vec![to_vec(out.clone()), grad(&gate), grad(&up)]
    }

    #[test]
    fn fused_swiglu_matches_the_generic_ops() {
        for (i, shape) in [[1, 1, 1], [2, 7, 13], [3, 5, 704], [1, 3, 20_001]]
            .into_iter()
            .enumerate()
        {
            let (fused, generic) = (run(true, shape, i as u64), run(false, shape, i as u64));
            for (name, (a, b)) in ["output", "d gate", "d up"]
                .iter()
                .zip(fused.iter().zip(&generic))
            {
                assert_close(a, b, (1e-6, 1e-5), &format!("{shape:?} {name}"));
            }
        }
    }

    #[test]
    fn fused_swiglu_on_plain_flex() {
        let device = crate::test_device();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let gate: Tensor<2> = random([4, 9], 5.0, &mut rng, &device);
        let up: Tensor<2> = random([4, 9], 5.0, &mut rng, &device);
        let want = to_vec(silu(gate.clone()) * up.clone());
        let got = to_vec(swiglu(gate, up.clone()).expect("flex tensors"));
        assert_close(&got, &want, (1e-6, 1e-5), "plain flex");
        // Mismatched shapes are left to the generic ops.
        let short: Tensor<2> = random([4, 8], 1.0, &mut rng, &device);
        assert!(swiglu(short, up).is_none());
    }

    #[test]
    fn fused_swiglu_does_not_depend_on_the_thread_count() {
        same_on_1_2_4_threads(|| run(true, [3, 33, 1_000], 4));
    }
}
