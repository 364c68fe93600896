//! The rotary embedding's rotation, `x * cos + rotate_half(x) * sin`, as one op on the `cpu`
//! (flex) backend. Burn's autodiff runs it as two slices, a negation, a concatenation, two
//! products and a sum, each a tensor on one thread; this kernel rotates a row in one pass,
//! parallel over (batch, head) slabs, and its backward pass is the inverse rotation. The
//! tables hold no gradient (they come from integer positions). Element-wise only: no sum, so
//! the result does not depend on how the work is split.

use burn::tensor::{DType, Tensor};
use burn_autodiff::Autodiff;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::{per_strategy, simd, to_flex};

/// `[batch, heads, seq, dim]` with tables of `[batch, 1, seq, dim]`.
#[derive(Debug, Clone, Copy)]
struct Dims {
    heads: usize,
    seq: usize,
    dim: usize,
}

/// Rotates every row of `x` by its position's table row; `inverse` undoes the rotation (the
/// backward pass: the rotation's transpose is its inverse).
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], d: Dims, inverse: bool) -> Vec<f32> {
    let (l, dim, half) = (d.seq, d.dim, d.dim / 2);
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(l * dim)
        .zip(x.par_chunks(l * dim))
        .enumerate()
        .for_each(|(slab, (out, x))| {
            let b = slab / d.heads;
            let (cos, sin) = (
                &cos[b * l * dim..][..l * dim],
                &sin[b * l * dim..][..l * dim],
            );
            simd(|| {
                for (((o, x), c), s) in out
                    .chunks_exact_mut(dim)
                    .zip(x.chunks_exact(dim))
                    .zip(cos.chunks_exact(dim))
                    .zip(sin.chunks_exact(dim))
                {
                    let (o1, o2) = o.split_at_mut(half);
                    let (x1, x2) = x.split_at(half);
                    let (c1, c2) = c.split_at(half);
                    let (s1, s2) = s.split_at(half);
                    if inverse {
                        // dx1 = g1 c1 + g2 s2; dx2 = g2 c2 - g1 s1
                        for j in 0..half {
                            o1[j] = x1[j] * c1[j] + x2[j] * s2[j];
                            o2[j] = x2[j] * c2[j] - x1[j] * s1[j];
                        }
                    } else {
                        // y1 = x1 c1 - x2 s1; y2 = x2 c2 + x1 s2
                        for j in 0..half {
                            o1[j] = x1[j] * c1[j] - x2[j] * s1[j];
                            o2[j] = x2[j] * c2[j] + x1[j] * s2[j];
                        }
                    }
                }
            })
        });
    out
}

#[derive(Debug)]
struct RopeBackward;

#[derive(Debug, Clone)]
struct RopeState {
    cos: FlexTensor,
    sin: FlexTensor,
    dims: Dims,
    shape: Vec<usize>,
}

impl Backward<Flex, 1> for RopeBackward {
    type State = RopeState;

    fn backward(self, ops: Ops<RopeState, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<Flex>(&ops.node).to_contiguous();
        let s = ops.state;
        if let Some(node) = node_x {
            let dx = rotate(
                grad.as_slice::<f32>().expect("an f32 tensor"),
                s.cos.as_slice::<f32>().expect("an f32 tensor"),
                s.sin.as_slice::<f32>().expect("an f32 tensor"),
                s.dims,
                true,
            );
            grads.register::<Flex>(node.id, to_flex(dx, s.shape));
        }
    }
}

/// `x * cos + rotate_half(x) * sin` on flex f32 tensors (plain or autodiff); `None` elsewhere.
///
/// # Shapes
/// - x: `[batch, heads, seq, head_dim]` (even head_dim)
/// - cos, sin: `[batch, 1, seq, head_dim]`, no gradient
/// - output: same as x
pub fn rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Option<Tensor<4>> {
    let [batch, heads, seq, dim] = x.dims();
    let table = [batch, 1, seq, dim];
    let f32s = [&x, cos, sin].iter().all(|t| t.dtype() == DType::F32);
    if !f32s || cos.dims() != table || sin.dims() != table || dim % 2 != 0 {
        return None;
    }
    let d = Dims { heads, seq, dim };
    let shape = x.dims().to_vec();
    let device = x.device();
    if device.is_autodiff() {
        per_strategy!(device, Strategy => {
            type Ad = Autodiff<Flex, Strategy>;
            let xa = x.try_into_primitive::<Ad>().ok()?;
            let cos = cos.clone().try_into_primitive::<Ad>().ok()?.primitive().to_contiguous();
            let sin = sin.clone().try_into_primitive::<Ad>().ok()?.primitive().to_contiguous();
            let xc = xa.primitive().to_contiguous();
            let (xs, cs, ss) = (xc.as_slice::<f32>()?, cos.as_slice::<f32>()?, sin.as_slice::<f32>()?);
            let output = to_flex(rotate(xs, cs, ss, d, false), shape.clone());
            let result = match RopeBackward
                .prepare::<Strategy>([xa.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    prep.finish(RopeState { cos, sin, dims: d, shape }, output)
                }
                OpsKind::UnTracked(prep) => prep.finish(output),
            };
            Some(Tensor::from_primitive::<Ad>(result))
        })
    } else {
        let xc = x.try_into_primitive::<Flex>().ok()?.to_contiguous();
        let cos = cos
            .clone()
            .try_into_primitive::<Flex>()
            .ok()?
            .to_contiguous();
        let sin = sin
            .clone()
            .try_into_primitive::<Flex>()
            .ok()?
            .to_contiguous();
        let (xs, cs, ss) = (
            xc.as_slice::<f32>()?,
            cos.as_slice::<f32>()?,
            sin.as_slice::<f32>()?,
        );
        Some(Tensor::from_primitive::<Flex>(to_flex(
            rotate(xs, cs, ss, d, false),
            shape,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{random, same_on_1_2_4_threads, to_vec};
    use crate::model::rope::RotaryConfig;
    use burn::tensor::{Int, Tensor, TensorData};
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::SeedableRng;

    /// Output and the input's gradient under a random projection, through `Rotary::apply`
    /// (fused) or `Rotary::apply_generic`, at left-padded-like positions.
    fn run(fused: bool, shape: [usize; 4], seed: u64) -> Vec<Vec<f32>> {
        let device = crate::test_device().autodiff();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let [b, _, l, d] = shape;
        let positions: Vec<i64> = (0..b * l)
            .map(|e| ((e % l) as i64 - 2 * (e / l) as i64).max(0))
            .collect();
        let positions = Tensor::<2, Int>::from_data(TensorData::new(positions, [b, l]), &device);
        let rope = RotaryConfig::new(d).at_positions(positions);
        let x = random(shape, 2.0, &mut rng, &device).require_grad();
        let w = random(shape, 1.0, &mut rng, &device);
        let out = if fused {
            rope.apply(x.clone())
        } else {
            rope.apply_generic(x.clone())
        };
        let grads = (out.clone() * w).sum().backward();
        vec![
            to_vec(out),
            to_vec(x.grad(&grads).map(Tensor::from_inner).unwrap()),
        ]
    }

    #[test]
    fn fused_rope_gives_the_generic_ops_bits() {
        for (i, shape) in [[1, 1, 1, 2], [2, 3, 7, 8], [2, 4, 33, 64]]
            .into_iter()
            .enumerate()
        {
            assert_eq!(
                run(true, shape, i as u64),
                run(false, shape, i as u64),
                "{shape:?}"
            );
        }
    }

    #[test]
    fn fused_rope_does_not_depend_on_the_thread_count() {
        same_on_1_2_4_threads(|| run(true, [3, 4, 35, 32], 7));
    }
}
