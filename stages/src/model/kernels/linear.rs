//! Linear layers of a few rows without a gradient: decoding's one new token per sequence. Flex
//! runs a matmul below about 7M multiply-adds on one thread, which is every projection of a
//! decoding step (`[4, 576] x [576, 1536]` is 3.5M), so a step used one core. Here the output
//! columns are split into fixed blocks computed in parallel, each by one single-threaded gemm
//! call reading the weight in place; each output's sum does not depend on the thread count.
//!
//! [`linear`] returns `None` for autodiff devices, other dtypes and more than [`MAX_ROWS`]
//! rows (training shapes, where flex's own parallel gemm is the better split).

use burn::tensor::{DType, Tensor};
use burn_flex::Flex;
use rayon::prelude::*;

use super::{matmul, strided_2d, to_flex};

/// Rows up to which the layer is split over its output columns.
pub const MAX_ROWS: usize = 64;
/// Output columns per parallel task.
const COLUMN_BLOCK: usize = 128;

/// `x W + b` for Burn's `[in, out]` weight layout, on plain f32 flex tensors of at most
/// [`MAX_ROWS`] rows.
///
/// # Shapes
/// - x: `[..., in]`; weight `[in, out]`; bias `[out]`; output `[..., out]`
pub fn linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Option<Tensor<D>> {
    if x.device().is_autodiff() || x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        return None;
    }
    let dims = x.dims();
    let [d_in, d_out] = weight.dims();
    let rows: usize = dims[..D - 1].iter().product();
    if dims[D - 1] != d_in || rows == 0 || rows > MAX_ROWS || d_in == 0 || d_out == 0 {
        return None;
    }
    if bias
        .as_ref()
        .is_some_and(|b| b.dtype() != DType::F32 || b.dims() != [d_out])
    {
        return None;
    }
    let x = x.try_into_primitive::<Flex>().ok()?.to_contiguous();
    let w = weight.try_into_primitive::<Flex>().ok()?;
    let x = x.as_slice::<f32>()?;
    let (w, w_strides) = strided_2d(&w)?;
    // One `[rows, COLUMN_BLOCK]` block of the output per task, `x` times a block of W's columns
    // read in place (as flex's own call orients it: rows as gemm's m).
    let blocks: Vec<Vec<f32>> = (0..d_out.div_ceil(COLUMN_BLOCK))
        .into_par_iter()
        .map(|block| {
            let j0 = block * COLUMN_BLOCK;
            let columns = COLUMN_BLOCK.min(d_out - j0);
            let mut dst = vec![0.0f32; rows * columns];
            matmul(
                rows,
                columns,
                d_in,
                &mut dst,
                false,
                x,
                (d_in, 1),
                &w[j0 * w_strides.1..],
                w_strides,
                1.0,
            );
            dst
        })
        .collect();
    let mut out = vec![0.0f32; rows * d_out];
    for (block, dst) in blocks.iter().enumerate() {
        let (j0, columns) = (block * COLUMN_BLOCK, dst.len() / rows);
        for (r, row) in dst.chunks_exact(columns).enumerate() {
            out[r * d_out + j0..r * d_out + j0 + columns].copy_from_slice(row);
        }
    }
    if let Some(bias) = bias {
        let b = bias.try_into_primitive::<Flex>().ok()?.to_contiguous();
        let b = b.as_slice::<f32>()?;
        for row in out.chunks_exact_mut(d_out) {
            for (o, &bj) in row.iter_mut().zip(b) {
                *o += bj;
            }
        }
    }
    let mut shape = dims.to_vec();
    shape[D - 1] = d_out;
    Some(Tensor::from_primitive::<Flex>(to_flex(out, shape)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::testing::{random, same_on_1_2_4_threads, to_vec};
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::SeedableRng;

    /// Against Burn's linear, with and without a bias, at column counts that are and are not
    /// multiples of the block, on 1, 2 and 4 threads; training-sized inputs are left to Burn.
    #[test]
    fn linear_matches_burns_linear() {
        let device = crate::test_device();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for (batch, seq, d_in, d_out) in [(4, 1, 24, 300), (1, 1, 16, 128), (3, 2, 40, 7)] {
            let x = random([batch, seq, d_in], 1.0, &mut rng, &device);
            let w = random([d_in, d_out], 1.0, &mut rng, &device);
            let b = random([d_out], 1.0, &mut rng, &device);
            for bias in [None, Some(b.clone())] {
                let want = to_vec(burn::tensor::module::linear(
                    x.clone(),
                    w.clone(),
                    bias.clone(),
                ));
                let got = || to_vec(linear(x.clone(), w.clone(), bias.clone()).unwrap());
                let fused = got();
                assert_eq!(fused.len(), want.len());
                for (i, (a, b)) in fused.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "[{i}]: {a} vs {b}");
                }
                same_on_1_2_4_threads(got);
            }
        }
        let many = random([MAX_ROWS + 1, 8], 1.0, &mut rng, &device);
        let w = random([8, 8], 1.0, &mut rng, &device);
        assert!(linear(many, w.clone(), None).is_none());
        let tracked_device = device.clone().autodiff();
        let tracked = Tensor::<2>::zeros([2, 8], &tracked_device);
        assert!(linear(tracked, w.to_device(&tracked_device), None).is_none());
    }
}
