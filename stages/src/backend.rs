//! Compute backends: the Burn device a stage runs on, chosen at run time from the recipe's
//! [`Backend`] (`cpu`, `wgpu`, `cuda`) among those compiled in as cargo features. Code is written
//! once against Burn's device-agnostic tensors; this module turns the recipe's choice into a
//! device, and a missing feature or a missing GPU driver into an error instead of a panic.
//! Training runs on the device's autodiff form ([`training_device`]); inference on the device
//! itself.

use burn::tensor::Device;
use rudder_schema::Backend;

use crate::error::StageError;

/// Whether this binary was built with the backend's cargo feature.
pub fn is_compiled(backend: Backend) -> bool {
    match backend {
        Backend::Cpu => cfg!(feature = "flex"),
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

/// The device of `backend` (its first device, for GPUs), or why there is none.
pub fn device(backend: Backend) -> Result<Device, StageError> {
    match backend {
        Backend::Cpu => {
            #[cfg(feature = "flex")]
            return Ok(Device::flex());
        }
        Backend::Wgpu => {
            #[cfg(feature = "wgpu")]
            return Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice));
        }
        Backend::Cuda => {
            #[cfg(feature = "cuda")]
            {
                check_cuda()?;
                return Ok(Device::cuda(0));
            }
        }
    }
    #[allow(unreachable_code)]
    Err(not_compiled(backend))
}

/// Whether `device` (or the device under its autodiff form) is the `cpu` backend's.
pub fn is_cpu(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    {
        device.clone().inner() == Device::flex()
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        false
    }
}

/// The multiple that shapes chosen at run time (generation's prompt batch, the KV cache's
/// capacity) are rounded up to on `device`: its backend's [`Backend::default_pad_multiple`], 1 on
/// `cpu` (exact shapes, today's results bit for bit) and 64 on the GPU backends, which compile
/// and tune kernels for every new shape.
pub fn shape_bucket(device: &Device) -> usize {
    match is_cpu(device) {
        true => Backend::Cpu.default_pad_multiple(),
        false => Backend::Cuda.default_pad_multiple(),
    }
}

/// The autodiff form of `backend`'s device: tensors created on it record their operations for
/// the backward pass.
pub fn training_device(backend: Backend) -> Result<Device, StageError> {
    Ok(device(backend)?.autodiff())
}

/// `inner` moved to the autodiff side with the gradient-checkpointing strategy `like` carries
/// (`like` being a tensor of the computation it joins): Burn refuses an operation whose tensors
/// carry different strategies, and `Tensor::from_inner` alone gives the default one.
pub fn lift<const D: usize, const E: usize, K: burn::tensor::kind::Autodiff>(
    inner: burn::tensor::Tensor<D, K>,
    like: &burn::tensor::Tensor<E>,
) -> burn::tensor::Tensor<D, K> {
    let tensor = burn::tensor::Tensor::from_inner(inner);
    match like.gradient_checkpointing_strategy() {
        Some(strategy) if like.is_autodiff() => {
            tensor.with_gradient_checkpointing_strategy(strategy)
        }
        _ => tensor,
    }
}

/// Points CubeCL's environment (its compiled kernels and autotune results) at `dir`, so that a
/// second run on a GPU backend compiles and tunes nothing again; the store passes
/// `.rudder/cache/cubecl/`. CubeCL reads its configuration once per process: this must come
/// before the first GPU device is used, and a `cubecl.toml` that names its own directory wins.
/// Returns whether the location was set. Without a GPU backend compiled in, it does nothing.
pub fn use_kernel_cache(dir: &std::path::Path) -> bool {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        use cubecl_runtime::config::cache::CacheConfig;
        use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if matches!(config.environment.path, CacheConfig::Directory(_)) {
            return false;
        }
        config.environment.path = CacheConfig::Directory(dir.to_path_buf());
        CubeClRuntimeConfig::try_set(config)
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = dir;
        false
    }
}

/// The CPU device the unit and integration tests run on.
#[cfg(feature = "flex")]
pub fn cpu() -> Device {
    Device::flex()
}

/// Checks that the NVIDIA driver library loads and sees a GPU. Burn's CUDA backend would panic
/// on a worker thread otherwise.
#[cfg(feature = "cuda")]
pub fn check_cuda() -> Result<(), StageError> {
    let unavailable = |message: String| StageError::BackendUnavailable {
        backend: "cuda",
        message,
    };
    let lib = cuda_driver().map_err(unavailable)?;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut i32) -> i32;
    // SAFETY: the signature is the CUDA driver API's (CUresult is a C int).
    unsafe {
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
    Ok(())
}

/// The CUDA driver library, loaded and initialised (`cuInit`) once per process, or why not. It
/// stays loaded: unloading the driver under cudarc's feet helps nobody.
#[cfg(feature = "cuda")]
fn cuda_driver() -> Result<&'static libloading::Library, String> {
    static DRIVER: std::sync::OnceLock<Result<libloading::Library, String>> =
        std::sync::OnceLock::new();
    DRIVER
        .get_or_init(load_cuda_driver)
        .as_ref()
        .map_err(Clone::clone)
}

#[cfg(feature = "cuda")]
fn load_cuda_driver() -> Result<libloading::Library, String> {
    // SAFETY: loading the driver library runs its initialisers, which is what cudarc would do.
    let lib = ["libcuda.so.1", "libcuda.so"]
        .iter()
        .find_map(|name| unsafe { libloading::Library::new(*name) }.ok())
        .ok_or_else(|| {
            "cannot load libcuda.so.1; is the NVIDIA driver installed (add its folder to LD_LIBRARY_PATH)?"
                .to_owned()
        })?;
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    // SAFETY: the signature is the CUDA driver API's (CUresult is a C int).
    unsafe {
        let init: libloading::Symbol<CuInit> = lib
            .get(b"cuInit\0")
            .map_err(|e| format!("libcuda has no cuInit: {e}"))?;
        let code = init(0);
        if code != 0 {
            return Err(format!(
                "cuInit failed with CUDA error {code} (no usable GPU or driver mismatch)"
            ));
        }
    }
    Ok(lib)
}

/// The memory of the device a stage on `backend` runs on, where it can be read without
/// starting Burn: the first CUDA device's (`cuDeviceTotalMem`), when the driver is there; `None`
/// for `cpu` (the machine's memory is the caller's business), for `wgpu`, and without a driver.
pub fn device_memory(backend: Backend) -> Option<u64> {
    match backend {
        #[cfg(feature = "cuda")]
        Backend::Cuda => cuda_memory(),
        _ => None,
    }
}

#[cfg(feature = "cuda")]
fn cuda_memory() -> Option<u64> {
    let lib = cuda_driver().ok()?;
    type CuDeviceGet = unsafe extern "C" fn(*mut i32, i32) -> i32;
    type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, i32) -> i32;
    // SAFETY: the driver API's signatures (CUresult and CUdevice are C ints, the size a size_t).
    unsafe {
        let get: libloading::Symbol<CuDeviceGet> = lib.get(b"cuDeviceGet\0").ok()?;
        let total: libloading::Symbol<CuDeviceTotalMem> = lib.get(b"cuDeviceTotalMem_v2\0").ok()?;
        let (mut device, mut bytes) = (0i32, 0usize);
        (get(&mut device, 0) == 0 && total(&mut bytes, device) == 0).then_some(bytes as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_device_runs() {
        let device = device(Backend::Cpu).unwrap();
        let sum: f32 = burn::tensor::Tensor::<1>::from_floats([1.0, 2.0], &device)
            .sum()
            .into_scalar();
        assert_eq!(sum, 3.0);
        assert!(training_device(Backend::Cpu).unwrap().is_autodiff());
    }

    #[test]
    fn missing_backend_names_the_feature() {
        for backend in [Backend::Wgpu, Backend::Cuda] {
            if !is_compiled(backend) {
                let err = device(backend).unwrap_err().to_string();
                assert!(
                    err.contains(&format!("--features {}", backend.as_str())),
                    "{err}"
                );
            }
        }
    }
}
