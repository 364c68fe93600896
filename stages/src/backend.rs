//! Compute backends: which of Burn's backends a stage runs on, chosen at run time from the
//! recipe (`cpu`, `wgpu`, `cuda`) among those compiled in as cargo features. Code is written
//! once, generic over `B: Backend`; this module turns a [`BackendKind`] into a call of that
//! generic code on a concrete backend, and turns a missing feature or a missing GPU driver into
//! an error instead of a panic.

use std::fmt;
use std::str::FromStr;

use burn::tensor::backend::{AutodiffBackend, Backend};

use crate::error::StageError;

/// The CPU backend of this build: Burn's flex backend. ndarray trains at about the same speed on
/// the reference machine (see `benches/train_step.rs`), but with its SIMD feature the reciprocal
/// that Burn's autodiff uses in the gradient of every division is approximate (~1e-4 relative),
/// so its gradients drift from PyTorch's. ndarray is used when only it is compiled in.
#[cfg(feature = "flex")]
pub type CpuBackend = burn::backend::Flex;
#[cfg(all(feature = "ndarray", not(feature = "flex")))]
pub type CpuBackend = burn::backend::NdArray;

/// A backend named in a recipe or on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    Cpu,
    Wgpu,
    Cuda,
}

impl BackendKind {
    /// The name used in recipes and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        }
    }

    /// Whether this binary was built with the backend's cargo feature.
    pub fn is_compiled(self) -> bool {
        match self {
            Self::Cpu => cfg!(any(feature = "flex", feature = "ndarray")),
            Self::Wgpu => cfg!(feature = "wgpu"),
            Self::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// Every backend compiled into this binary.
    pub fn compiled() -> Vec<BackendKind> {
        [Self::Cpu, Self::Wgpu, Self::Cuda]
            .into_iter()
            .filter(|b| b.is_compiled())
            .collect()
    }

    fn not_compiled(self) -> StageError {
        StageError::BackendNotCompiled {
            backend: self.name(),
            feature: self.name(),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = StageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "wgpu" => Ok(Self::Wgpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(StageError::UnknownBackend(other.to_string())),
        }
    }
}

/// Work that runs on any inference backend.
pub trait BackendTask {
    type Output;
    fn run<B: Backend>(self, device: B::Device) -> Self::Output;
}

/// Work that needs gradients (training).
pub trait AutodiffTask {
    type Output;
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Self::Output;
}

/// Runs `task` on the backend `kind`, or says why it cannot.
pub fn dispatch<T: BackendTask>(kind: BackendKind, task: T) -> Result<T::Output, StageError> {
    match kind {
        BackendKind::Cpu => {
            #[cfg(any(feature = "flex", feature = "ndarray"))]
            return Ok(task.run::<CpuBackend>(Default::default()));
        }
        BackendKind::Wgpu => {
            #[cfg(feature = "wgpu")]
            return Ok(task.run::<burn::backend::Wgpu>(Default::default()));
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                check_cuda()?;
                return Ok(task.run::<burn::backend::Cuda>(Default::default()));
            }
        }
    }
    #[allow(unreachable_code)]
    Err(kind.not_compiled())
}

/// Runs a training `task` on the autodiff version of backend `kind`, or says why it cannot.
pub fn dispatch_autodiff<T: AutodiffTask>(
    kind: BackendKind,
    task: T,
) -> Result<T::Output, StageError> {
    use burn::backend::Autodiff;
    match kind {
        BackendKind::Cpu => {
            #[cfg(any(feature = "flex", feature = "ndarray"))]
            return Ok(task.run::<Autodiff<CpuBackend>>(Default::default()));
        }
        BackendKind::Wgpu => {
            #[cfg(feature = "wgpu")]
            return Ok(task.run::<Autodiff<burn::backend::Wgpu>>(Default::default()));
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                check_cuda()?;
                return Ok(task.run::<Autodiff<burn::backend::Cuda>>(Default::default()));
            }
        }
    }
    #[allow(unreachable_code)]
    Err(kind.not_compiled())
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

    #[test]
    fn parses_names() {
        assert_eq!("cpu".parse::<BackendKind>().unwrap(), BackendKind::Cpu);
        assert_eq!("cuda".parse::<BackendKind>().unwrap(), BackendKind::Cuda);
        let err = "tpu".parse::<BackendKind>().unwrap_err().to_string();
        assert!(err.contains("tpu"), "{err}");
    }

    struct Sum;
    impl BackendTask for Sum {
        type Output = f32;
        fn run<B: Backend>(self, device: B::Device) -> f32 {
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
        assert_eq!(dispatch(BackendKind::Cpu, Sum).unwrap(), 3.0);
    }

    #[test]
    fn missing_backend_names_the_feature() {
        for kind in [BackendKind::Wgpu, BackendKind::Cuda] {
            if !kind.is_compiled() {
                let err = dispatch(kind, Sum).unwrap_err().to_string();
                assert!(
                    err.contains(&format!("--features {}", kind.name())),
                    "{err}"
                );
            }
        }
    }
}
