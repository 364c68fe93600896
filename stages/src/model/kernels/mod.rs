//! Fused kernels of the `cpu` (flex) backend, with their own backward pass on the autodiff
//! device: attention (`attention.rs`), SwiGLU's `silu(gate) * up` (`swiglu.rs`), RMSNorm
//! (`rms_norm.rs`) and the rotary embedding's rotation (`rope.rs`). Flex runs element-wise ops on one thread and Burn's autodiff keeps every
//! intermediate of a composite op for the backward pass; each kernel here is one op on the graph,
//! parallel over rows (or (batch, KV head) groups), keeping only what its backward needs.
//!
//! This module holds what the kernels share: host copies of flex tensors, a single-threaded gemm
//! call with explicit strides, and the vectorised row arithmetic (max, `exp`, sums).
//!
//! Reproducibility: every sum has a fixed order that depends on the shapes only (lanes of
//! [`LANES`] combined in a fixed order, rows in fixed-size chunks), never on how many threads run
//! or which thread ran what, so CPU reruns are bit-identical under any `RAYON_NUM_THREADS`. The
//! SIMD paths are plain Rust loops, compiled for AVX2 as well and chosen at run time; no fused
//! multiply-add is introduced, so every instruction set gives the same bits.
//!
//! Every entry point returns `None` when its tensors are not flex f32 tensors (another backend,
//! or another dtype): the caller then runs the generic code.

pub mod attention;
pub mod head;
pub mod linear;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;

pub use attention::{KeyMask, attention};
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use swiglu::swiglu;

use burn::tensor::TensorData;
use burn_flex::FlexTensor;

/// Expands `$body` once per gradient-checkpointing strategy an autodiff flex device can have,
/// with `$strategy` naming the strategy's type inside it (Burn's conversion trait for the
/// strategy is not public, so the body cannot be generic over it).
macro_rules! per_strategy {
    ($device:expr, $strategy:ident => $body:expr) => {
        match $device.gradient_checkpointing_strategy() {
            Some(burn::tensor::GradientCheckpointingStrategy::Balanced) => {
                type $strategy = burn_autodiff::checkpoint::strategy::BalancedCheckpointing;
                $body
            }
            _ => {
                type $strategy = burn_autodiff::checkpoint::strategy::NoCheckpointing;
                $body
            }
        }
    };
}
pub(crate) use per_strategy;

/// Elements per parallel task of the element-wise kernels: enough to amortise a task, few
/// enough to split a layer's activations over the cores.
pub(crate) const CHUNK: usize = 1 << 14;

/// Width of the accumulators of the row reductions: 8 f32 lanes fill an AVX2 register (two SSE
/// ones), and the lanes are combined in a fixed order.
pub(crate) const LANES: usize = 8;

/// Runs `f` compiled for AVX2 when the CPU has it (the helpers `f` calls are
/// `#[inline(always)]`, so their loops are vectorised with 8-lane registers there; elsewhere
/// with the baseline's). Only the instruction set changes, never the arithmetic: no fused
/// multiply-add is enabled, so both give the same bits.
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU was just checked to have AVX2.
        return unsafe { avx2(f) };
    }
    f()
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

/// A 2-D f32 flex tensor read in place: its storage from its first element on, and its (row,
/// column) strides. Spares the copy `to_contiguous` makes of a transposed view, which is how
/// Burn holds a checkpoint's `[out, in]` weights as `[in, out]`. `None` for another dtype or a
/// negative stride.
pub(crate) fn strided_2d(t: &FlexTensor) -> Option<(&[f32], (usize, usize))> {
    if t.dtype() != burn::tensor::DType::F32 {
        return None;
    }
    let (_, _, rows, columns) = t.layout().as_2d_strides()?;
    let strides = (usize::try_from(rows).ok()?, usize::try_from(columns).ok()?);
    Some((
        t.storage::<f32>().get(t.layout().start_offset()..)?,
        strides,
    ))
}

pub(crate) fn flex_f32(t: &FlexTensor) -> Vec<f32> {
    let t = t.to_contiguous();
    t.as_slice::<f32>().expect("an f32 tensor").to_vec()
}

pub(crate) fn to_flex(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// `e^x` to within 2 ulp (Cephes' `expf`: range reduction by ln 2 in two parts, a degree-6
/// polynomial), branch-free so that a loop of it vectorises. 0 below -87.3 (where `expf` is
/// subnormal), `+inf` above 88.3, NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 * 2^23: adding it rounds to an integer, kept in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.3;
    let c = if x < LO { LO } else { x };
    let c = if c > HI { HI } else { c };
    let t = c * LOG2E + ROUND;
    let n = t - ROUND;
    let bits = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = c - n * LN2_HI - n * LN2_LO;
    let z = r * r;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * z + r + 1.0;
    // 2^n for n in -126..=127, built in the exponent bits.
    let scale = f32::from_bits(((bits + 127) << 23) as u32);
    let e = y * scale;
    let e = if x < LO { 0.0 } else { e };
    let e = if x > HI { f32::INFINITY } else { e };
    if x.is_nan() { x } else { e }
}

/// The largest element (`-inf` for an empty row).
#[inline(always)]
pub(crate) fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    for (a, &v) in acc.iter_mut().zip(tail) {
        *a = if v > *a { v } else { *a };
    }
    acc.iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// The lanes' sum, in a fixed order.
#[inline(always)]
fn lanes_sum(acc: [f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `x = e^(x - shift)` in place; returns the sum of the results.
#[inline(always)]
pub(crate) fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = exp(*v - shift);
            *a += *v;
        }
    }
    for (a, v) in acc.iter_mut().zip(chunks.into_remainder()) {
        *v = exp(*v - shift);
        *a += *v;
    }
    lanes_sum(acc)
}

/// `x = e^(x - shift)` in place.
#[inline(always)]
pub(crate) fn exp_shifted(x: &mut [f32], shift: f32) {
    for v in x.iter_mut() {
        *v = exp(*v - shift);
    }
}

/// `sum(a * b)`, in a fixed order.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, &p), &q) in acc.iter_mut().zip(x).zip(y) {
            *s += p * q;
        }
    }
    for ((s, &p), &q) in acc.iter_mut().zip(ta).zip(tb) {
        *s += p * q;
    }
    lanes_sum(acc)
}

/// What the kernels' tests share: host-seeded inputs, thread pools of a given size.
#[cfg(test)]
pub(crate) mod testing {
    use burn::tensor::{Device, Tensor, TensorData};
    use rand_chacha::ChaCha8Rng;
    use rand_chacha::rand_core::RngCore;

    /// Uniform values in [-scale, scale), seeded on the host (the device RNG is shared by tests
    /// running at the same time).
    pub fn random<const D: usize>(
        shape: [usize; D],
        scale: f64,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Tensor<D> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| ((rng.next_u32() as f64 / u32::MAX as f64 * 2.0 - 1.0) * scale) as f32)
            .collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    pub fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// `f`'s result on pools of 1, 2 and 4 threads, which must all be equal.
    pub fn same_on_1_2_4_threads<R: PartialEq + std::fmt::Debug + Send>(f: impl Fn() -> R + Sync) {
        let in_pool = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(&f)
        };
        let one = in_pool(1);
        assert_eq!(one, in_pool(2));
        assert_eq!(one, in_pool(4));
    }

    /// Element-wise closeness with a message naming what differs.
    pub fn assert_close(a: &[f32], b: &[f32], (abs, rel): (f32, f32), what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let tol = abs + rel * y.abs();
            assert!((x - y).abs() <= tol, "{what}[{i}]: {x} vs {y}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_standard_library() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(a.to_bits().abs_diff(b.to_bits()));
            x += 0.001_3;
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn reductions_match_a_plain_loop() {
        for n in [0, 1, 7, 8, 9, 33] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(row_max(&x), max);
            let d: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
            assert!((f64::from(dot(&x, &x)) - d).abs() < 1e-4);
            let mut e = x.clone();
            let s = exp_shifted_sum(&mut e, 1.0);
            let want: f64 = x.iter().map(|&v| f64::from(v - 1.0).exp()).sum();
            assert!((f64::from(s) - want).abs() < 1e-4 * want.max(1.0));
        }
    }
}
