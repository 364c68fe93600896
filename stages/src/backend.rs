//! Compute backends: which of Burn's backends a stage runs on, chosen at run time from the
//! recipe's [`Backend`] (`cpu`, `wgpu`, `cuda`) among those compiled in as cargo features. Code
//! is written once, generic over Burn's backend trait; this module turns the recipe's choice
//! into a call of that generic code on a concrete backend, and a missing feature or a missing
//! GPU driver into an error instead of a panic.

use burn::tensor::backend::{AutodiffBackend, Backend as BurnBackend};
use rudder_schema::Backend;

use crate::error::StageError;

/// The CPU backend of this build: Burn's flex backend. ndarray trains at about the same speed on
/// the reference machine (see `benches/train_step.rs`), but with its SIMD feature the reciprocal
/// that Burn's autodiff uses in the gradient of every division is approximate (~1e-4 relative),
/// so its gradients drift from PyTorch's. ndarray is used when only it is compiled in.
#[cfg(feature = "flex")]
pub type CpuBackend = burn::backend::Flex;
#[cfg(all(feature = "ndarray", not(feature = "flex")))]
pub type CpuBackend = burn::backend::NdArray;

/// Whether this binary was built with the backend's cargo feature.
pub fn is_compiled(backend: Backend) -> bool {
    match backend {
        Backend::Cpu => cfg!(any(feature = "flex", feature = "ndarray")),
        Backend::Wgpu => cfg!(feature = "wgpu"),
        Backend::Cuda => cfg!(feature = "cuda"),
    }
}

/// Every backend compiled into this binary.
pub fn compiled() -> Vec<Backend> {
    [Backend::Cpu, Backend::Wgpu, Backend::Cuda]
        .into_iter()
        .filter(|&b| is_compiled(b))
        .collect()
}

fn not_compiled(backend: Backend) -> StageError {
    StageError::BackendNotCompiled {
        backend: backend.as_str(),
        feature: backend.as_str(),
    }
}

/// Work that runs on any inference backend.
pub trait BackendTask {
    type Output;
    fn run<B: BurnBackend>(self, device: B::Device) -> Self::Output;
}

/// Work that needs gradients (training).
pub trait AutodiffTask {
    type Output;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output;
}

/// Runs `task` on the backend `kind`, or says why it cannot.
pub fn dispatch<T: BackendTask>(backend: Backend, task: T) -> Result<T::Output, StageError> {
    match backend {
        Backend::Cpu => {
            #[cfg(any(feature = "flex", feature = "ndarray"))]
            return Ok(task.run::<CpuBackend>(Default::default()));
        }
        Backend::Wgpu => {
            #[cfg(feature = "wgpu")]
            return Ok(task.run::<burn::backend::Wgpu>(Default::default()));
        }
        Backend::Cuda => {
            #[cfg(feature = "cuda")]
            {
                check_cuda()?;
                return Ok(task.run::<burn::backend::Cuda>(Default::default()));
            }
        }
    }
    #[allow(unreachable_code)]
    Err(not_compiled(backend))
}

/// Runs a training `task` on the autodiff version of backend `kind`, or says why it cannot.
pub fn dispatch_autodiff<T: AutodiffTask>(
    backend: Backend,
    task: T,
) -> Result<T::Output, StageError> {
    use burn::backend::Autodiff;
    match backend {
        Backend::Cpu => {
            #[cfg(any(feature = "flex", feature = "ndarray"))]
            return Ok(task.run::<Autodiff<CpuBackend>>(Default::default()));
        }
        Backend::Wgpu => {
            #[cfg(feature = "wgpu")]
            return Ok(task.run::<Autodiff<burn::backend::Wgpu>>(Default::default()));
        }
        Backend::Cuda => {
            #[cfg(feature = "cuda")]
            {
                check_cuda()?;
                return Ok(task.run::<Autodiff<burn::backend::Cuda>>(Default::default()));
            }
        }
    }
    #[allow(unreachable_code)]
    Err(not_compiled(backend))
}

/// Checks that the NVIDIA driver library loads and sees a GPU. Burn's CUDA backend would panic
/// on a worker thread otherwise.
#[cfg(feature = "cuda")]
pub fn check_cuda() -> Result<(), StageError> {
    let unavailable = |message: String| StageError::BackendUnavailable {
        backend: "cuda",
        message,
    };
    // SAFETY: loading the driver library runs its initialisers, which is what cudarc would do.
    let lib = ["libcuda.so.1", "libcuda.so"]
        .iter()
        .find_map(|name| unsafe { libloading::Library::new(*name) }.ok())
        .ok_or_else(|| {
            unavailable(
                "cannot load libcuda.so.1; is the NVIDIA driver installed (add its folder to LD_LIBRARY_PATH)?"
                    .into(),
            )
        })?;
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut i32) -> i32;
    // SAFETY: the signatures are those of the CUDA driver API (CUresult is a C int).
    unsafe {
        let init: libloading::Symbol<CuInit> = lib
            .get(b"cuInit\0")
            .map_err(|e| unavailable(format!("libcuda has no cuInit: {e}")))?;
        let code = init(0);
        if code != 0 {
            return Err(unavailable(format!(
                "cuInit failed with CUDA error {code} (no usable GPU or driver mismatch)"
            )));
        }
        let count: libloading::Symbol<CuDeviceGetCount> = lib
            .get(b"cuDeviceGetCount\0")
            .map_err(|e| unavailable(format!("libcuda has no cuDeviceGetCount: {e}")))?;
        let mut n = 0i32;
        let code = count(&mut n);
        if code != 0 || n == 0 {
            return Err(unavailable(format!(
                "no CUDA device found (cuDeviceGetCount returned {code}, {n} devices)"
            )));
        }
    }
    // Keep the library loaded: unloading the driver under cudarc's feet helps nobody.
    std::mem::forget(lib);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sum;
    impl BackendTask for Sum {
        type Output = f32;
        fn run<B: BurnBackend>(self, device: B::Device) -> f32 {
            burn::tensor::Tensor::<B, 1>::from_floats([1.0, 2.0], &device)
                .sum()
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("f32 data")[0]
        }
    }

    #[test]
    fn cpu_dispatch_runs() {
        assert_eq!(dispatch(Backend::Cpu, Sum).unwrap(), 3.0);
    }

    #[test]
    fn missing_backend_names_the_feature() {
        for backend in [Backend::Wgpu, Backend::Cuda] {
            if !is_compiled(backend) {
                let err = dispatch(backend, Sum).unwrap_err().to_string();
                assert!(
                    err.contains(&format!("--features {}", backend.as_str())),
                    "{err}"
                );
            }
        }
    }
}
