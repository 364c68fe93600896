//! The numeric precision a stage's models compute in (`precision` of the recipe or the stage).
//!
//! - `fp32`: every tensor in fp32, as always.
//! - `bf16`: mixed precision. The decoder's activations (the residual stream included) and its
//!   matmuls are bf16; each weight is cast to bf16 where it is used, so trained weights, their
//!   gradients and AdamW's moments stay fp32 (the cast's backward returns an fp32 gradient).
//!   RMSNorm normalises in fp32, attention's scores and softmax are fp32 with bf16 inputs and
//!   output (as flash attention computes them), and the head's logits are cast to fp32 before
//!   any log-softmax, loss or sampling. Models that only infer (references, generation, judges)
//!   hold their weights in bf16.
//!
//! The precision is set for the duration of a stage's run ([`scoped`]), like `torch.autocast`:
//! every model built inside the scope computes in it ([`current`]), whichever helper loads it.
//! Outside a scope (unit tests, `rudder bench` without `--precision`) it is `fp32`.

use std::cell::Cell;

use burn::tensor::{DType, Tensor};
use rudder_schema::Precision;

use crate::error::StageError;

thread_local! {
    static CURRENT: Cell<Precision> = const { Cell::new(Precision::Fp32) };
}

/// The precision models built on this thread now compute in.
pub fn current() -> Precision {
    CURRENT.with(Cell::get)
}

/// Runs `f` with models built on this thread computing in `precision`; the previous precision
/// is restored afterwards, also when `f` panics.
pub fn scoped<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CURRENT.with(|c| c.replace(precision)));
    f()
}

/// Whether `device` computes in `precision`: `bf16` needs the backend's bf16 tensors (Burn's
/// `cpu` backend has them; a GPU backend has them where its device does).
pub fn check_supported(
    precision: Precision,
    backend: rudder_schema::Backend,
    device: &burn::tensor::Device,
) -> Result<(), StageError> {
    let dtype = compute_dtype(precision);
    match device.supports_dtype(dtype) {
        true => Ok(()),
        false => Err(StageError::PrecisionUnsupported {
            precision: precision.as_str(),
            backend: backend.as_str(),
            dtype: format!("{dtype:?}"),
        }),
    }
}

/// The dtype of activations and matmuls under `precision`.
pub fn compute_dtype(precision: Precision) -> DType {
    match precision {
        Precision::Fp32 => DType::F32,
        Precision::Bf16 => DType::BF16,
    }
}

/// `linear` applied in the dtype of `x`, its weight and bias cast to it (a frozen weight may be
/// held in another half dtype, a trained one is fp32).
pub fn linear_in<const D: usize>(linear: &burn::nn::Linear, x: Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    let weight = cast(linear.weight.val(), dtype);
    let bias = linear.bias.as_ref().map(|b| cast(b.val(), dtype));
    burn::tensor::module::linear(x, weight, bias)
}

/// `t` in `dtype` (itself when it already is).
pub fn cast<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    match t.dtype() == dtype {
        true => t,
        false => t.cast(dtype),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_sets_and_restores_the_precision() {
        assert_eq!(current(), Precision::Fp32);
        let inner = scoped(Precision::Bf16, || {
            let nested = scoped(Precision::Fp32, current);
            (current(), nested)
        });
        assert_eq!(inner, (Precision::Bf16, Precision::Fp32));
        assert_eq!(current(), Precision::Fp32);
        let caught = std::panic::catch_unwind(|| scoped(Precision::Bf16, || panic!("inside")));
        assert!(caught.is_err());
        assert_eq!(current(), Precision::Fp32);
    }
}
