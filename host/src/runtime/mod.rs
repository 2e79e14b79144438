//! The TorchScript runtime (tch / libtorch): loads a model onto its device, measures what it
//! holds there, and runs `forward` on named tensors.
//!
//! Everything here blocks (libtorch calls can take seconds): callers run it on blocking
//! threads. This layer knows nothing of HTTP, handlers or caching.
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use tch::{CModule, Device, IValue, Kind, Tensor};

pub mod graphs;
mod pipeline;
pub mod tier;
pub mod verify;
pub use pipeline::{
    batch_key, CachedOutputs, Forwarded, Pipeline, PipelineInput, Stage, StageCache,
};

mod cuda {
    extern "C" {
        pub fn tessera_cuda_allocated_bytes(device: i32) -> i64;
        pub fn tessera_cuda_reserved_bytes(device: i32) -> i64;
        pub fn tessera_cuda_empty_cache() -> i32;
        pub fn tessera_cuda_mem_info(device: i32, free: *mut u64, total: *mut u64) -> i32;
        pub fn tessera_math_flags() -> i32;
        pub fn tessera_torchscript_ops(
            path: *const std::ffi::c_char,
            ok: *mut i32,
        ) -> *mut std::ffi::c_char;
        pub fn tessera_free(p: *mut std::ffi::c_char);
        pub fn tessera_module_tensor_bytes(module: *mut std::ffi::c_void) -> i64;
        pub fn tessera_module_optimize(
            module: *mut std::ffi::c_void,
            mode: i32,
        ) -> *mut std::ffi::c_char;
        pub fn tessera_cap_cpu_memory(bytes: i64) -> i32;
        pub fn tessera_cpu_tensor_bytes() -> i64;
        pub fn tessera_jit_set_thread_optimize(optimize: i32) -> i32;
        pub fn tessera_jit_get_thread_optimize() -> i32;
        pub fn tessera_enter_inference_mode() -> i32;
        pub fn tessera_set_thread_intra_op_threads(threads: i32) -> i32;
        pub fn tessera_get_thread_intra_op_threads() -> i32;
        pub fn tessera_module_use_legacy_executor(
            module: *mut std::ffi::c_void,
            err: *mut *mut std::ffi::c_char,
        ) -> i64;
        #[cfg(test)]
        pub fn tessera_module_legacy_executors(module: *mut std::ffi::c_void) -> i64;
        #[cfg(test)]
        pub fn tessera_jit_executor_mode() -> i32;
    }
}

/// Loads a TorchScript file on the CPU and lists every operator its functions and methods use
/// (`ns::name` or `ns::name.overload`). Runs the file's `__setstate__`: only for the sandboxed
/// check process ([`verify`]).
pub fn torchscript_ops(path: &Path) -> Result<Vec<String>, String> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    let mut ok = 0i32;
    // SAFETY: a NUL-terminated path and an out-pointer; the shim catches every C++ exception
    // and returns a malloc'd string we free with tessera_free.
    let text = unsafe {
        let p = cuda::tessera_torchscript_ops(c_path.as_ptr(), &mut ok);
        if p.is_null() {
            return Err("out of memory listing operators".into());
        }
        let text = std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
        cuda::tessera_free(p);
        text
    };
    if ok == 1 {
        Ok(text.lines().map(str::to_string).collect())
    } else {
        Err(text)
    }
}

/// Caps the bytes of CPU tensor memory live at once in this process: an allocation past it
/// fails with libtorch's out-of-memory error instead of driving the machine out of memory.
pub fn cap_cpu_tensor_memory(bytes: u64) -> bool {
    // SAFETY: installs a wrapper allocator in c10's registry; no pointers cross.
    unsafe { cuda::tessera_cap_cpu_memory(bytes.min(i64::MAX as u64) as i64) == 0 }
}

/// Returns free C-heap memory to the system (after a forward failed for lack of memory: glibc
/// keeps freed blocks in its arenas otherwise, and the process's footprint stays at the peak).
pub fn release_host_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes of CPU tensor memory live under the cap, if one is installed.
pub fn cpu_tensor_bytes() -> Option<u64> {
    // SAFETY: reads an atomic counter.
    let n = unsafe { cuda::tessera_cpu_tensor_bytes() };
    (n >= 0).then_some(n as u64)
}

/// The `torch::jit::Module*` inside a tch `CModule`, which keeps it in its only field.
fn module_ptr(m: &CModule) -> *mut std::ffi::c_void {
    const _: () =
        assert!(std::mem::size_of::<CModule>() == std::mem::size_of::<*mut std::ffi::c_void>());
    // SAFETY: `CModule` is a struct holding exactly one raw pointer (checked above), so its
    // bytes are that pointer.
    unsafe { *(m as *const CModule as *const *mut std::ffi::c_void) }
}

/// (free, total) bytes of GPU memory as the driver sees them.
pub fn cuda_mem_info(device: usize) -> Option<(u64, u64)> {
    if !tch::Cuda::is_available() {
        return None;
    }
    let (mut free, mut total) = (0u64, 0u64);
    // SAFETY: plain out-pointers to locals; the shim returns -1 if the runtime is not loaded.
    let rc = unsafe { cuda::tessera_cuda_mem_info(device as i32, &mut free, &mut total) };
    (rc == 0).then_some((free, total))
}

/// Bytes the CUDA caching allocator has handed out / reserved on `device`, if CUDA is usable.
pub fn cuda_memory(device: usize) -> Option<(u64, u64)> {
    if !tch::Cuda::is_available() {
        return None;
    }
    // SAFETY: the shim catches every C++ exception and answers -1 when CUDA is not initialised.
    let (a, r) = unsafe {
        (
            cuda::tessera_cuda_allocated_bytes(device as i32),
            cuda::tessera_cuda_reserved_bytes(device as i32),
        )
    };
    (a >= 0 && r >= 0).then_some((a as u64, r as u64))
}

/// Returns cached, unused CUDA blocks to the driver so freed models show up as free memory.
pub fn cuda_empty_cache() {
    if tch::Cuda::is_available() {
        // SAFETY: see `cuda_memory`.
        unsafe { cuda::tessera_cuda_empty_cache() };
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("out of memory on {device}: {message}")]
    OutOfMemory { device: String, message: String },
    #[error("model file could not be loaded as TorchScript: {0}")]
    Load(String),
    #[error("model forward failed: {0}")]
    Forward(String),
    #[error("model returned an unsupported output: {0}")]
    Output(String),
    #[error("invalid input tensor: {0}")]
    Input(String),
    #[error("TorchScript refused: {0}")]
    Refused(String),
    /// The check could not run now (every slot busy): nothing is wrong with the file.
    #[error("the server is busy: {0}")]
    Busy(String),
}

/// A failed load's error: out of memory (so residency can evict and retry) or the message's
/// first line.
fn load_error(device: Device, message: String) -> RuntimeError {
    if is_oom(&message) {
        RuntimeError::OutOfMemory {
            device: device_name(device),
            message,
        }
    } else {
        RuntimeError::Load(first_line(&message))
    }
}

fn is_oom(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("out of memory")
        || m.contains("cuda_error_out_of_memory")
        || m.contains("can't allocate memory")
}

/// Element types that cross the handler boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }
    fn kind(self) -> Kind {
        match self {
            DType::F32 => Kind::Float,
            DType::F64 => Kind::Double,
            DType::F16 => Kind::Half,
            DType::BF16 => Kind::BFloat16,
            DType::I64 => Kind::Int64,
            DType::I32 => Kind::Int,
            DType::I16 => Kind::Int16,
            DType::I8 => Kind::Int8,
            DType::U8 => Kind::Uint8,
            DType::Bool => Kind::Bool,
        }
    }
    fn from_kind(kind: Kind) -> Option<DType> {
        Some(match kind {
            Kind::Float => DType::F32,
            Kind::Double => DType::F64,
            Kind::Half => DType::F16,
            Kind::BFloat16 => DType::BF16,
            Kind::Int64 => DType::I64,
            Kind::Int => DType::I32,
            Kind::Int16 => DType::I16,
            Kind::Int8 => DType::I8,
            Kind::Uint8 => DType::U8,
            Kind::Bool => DType::Bool,
            _ => return None,
        })
    }
}

/// A dense little-endian tensor in host memory, as exchanged with handlers.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<i64>,
    pub data: Vec<u8>,
}

/// Most dimensions a tensor may have.
const MAX_DIMS: usize = 8;

/// Bytes of a tensor of `dims` (`None`: not a size) and `dtype`, if every partial product of
/// the element count stays within i64, as libtorch multiplies sizes out (a zero-sized tensor
/// whose other dimensions overflow is refused too: found by the guest_tensors fuzz target).
fn byte_len(mut dims: impl Iterator<Item = Option<u64>>, dtype: DType) -> Option<u64> {
    let numel = dims.try_fold(1u64, |acc, d| {
        acc.checked_mul(d?).filter(|&n| n <= i64::MAX as u64)
    });
    numel.and_then(|n| n.checked_mul(dtype.size() as u64))
}

impl HostTensor {
    /// Checks that `data` matches `shape` and `dtype`.
    pub fn new(
        name: String,
        dtype: DType,
        shape: Vec<u64>,
        data: Vec<u8>,
    ) -> Result<HostTensor, String> {
        if shape.len() > MAX_DIMS {
            return Err(format!(
                "tensor '{name}' has {} dimensions (max {MAX_DIMS})",
                shape.len()
            ));
        }
        let want = byte_len(shape.iter().map(|&d| Some(d)), dtype);
        if want != Some(data.len() as u64) {
            return Err(format!(
                "tensor '{name}': shape {shape:?} of {dtype:?} needs {want:?} bytes, got {}",
                data.len()
            ));
        }
        let shape = shape
            .into_iter()
            .map(|d| i64::try_from(d).map_err(|_| format!("tensor '{name}': dimension too large")))
            .collect::<Result<_, _>>()?;
        Ok(HostTensor {
            name,
            dtype,
            shape,
            data,
        })
    }

    /// The tensor on `device`. Its bytes go straight to a GPU through a view over `data`
    /// (`from_data_size` would first zero-fill a CPU tensor — a parallel fill that wakes the
    /// thread's OpenMP team — and copy into it); on the CPU the tensor owns a copy.
    fn to_tch(&self, device: Device) -> Result<Tensor, RuntimeError> {
        let kind = self.dtype.kind();
        // `new` checks this; the fields are public, and both paths below read `data` by shape.
        let dims = self.shape.iter().map(|&d| u64::try_from(d).ok());
        if byte_len(dims, self.dtype) != Some(self.data.len() as u64) {
            return Err(RuntimeError::Input(format!(
                "tensor '{}': shape {:?} of {:?} does not match its {} bytes",
                self.name,
                self.shape,
                self.dtype,
                self.data.len()
            )));
        }
        let err = |e: tch::TchError| match load_error(device, e.to_string()) {
            RuntimeError::Load(m) => RuntimeError::Forward(m),
            oom => oom,
        };
        if self.data.is_empty() {
            return Tensor::f_zeros(&self.shape, (kind, device)).map_err(err);
        }
        if !device.is_cuda() {
            return Tensor::f_from_data_size(&self.data, &self.shape, kind).map_err(err);
        }
        // No overflow: the element count (their product) fits in i64 and none is 0.
        let mut strides = vec![1i64; self.shape.len()];
        for i in (0..self.shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * self.shape[i + 1];
        }
        // SAFETY: `data` holds exactly the shape's elements of `dtype` (checked above), row
        // major, and outlives the view, which is dropped right after the copy: `f_to_device`
        // copies with `non_blocking = false`, so the copy is done when it returns.
        let view = unsafe {
            Tensor::f_from_blob(self.data.as_ptr(), &self.shape, &strides, kind, Device::Cpu)
        }
        .map_err(err)?;
        view.f_to_device_(device, kind, false, false).map_err(err)
    }

    fn from_tch(name: String, t: &Tensor) -> Result<HostTensor, RuntimeError> {
        let dtype = DType::from_kind(t.kind()).ok_or_else(|| {
            RuntimeError::Output(format!(
                "output '{name}' has unsupported dtype {:?}",
                t.kind()
            ))
        })?;
        let t = t.to_device(Device::Cpu).contiguous();
        let numel = t.numel();
        let mut data = vec![0u8; numel * dtype.size()];
        t.f_copy_data_u8(&mut data, numel)
            .map_err(|e| RuntimeError::Output(e.to_string()))?;
        Ok(HostTensor {
            name,
            dtype,
            shape: t.size(),
            data,
        })
    }
}

/// How TorchScript's graph executor runs a model's forwards (set per forward thread).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Executor {
    /// libtorch's default: the profiling executor records shapes on the first calls, then
    /// specialises and fuses (compiling kernels) per shape signature it meets.
    Profiling,
    /// The graph as exported, without profiling, specialisation or fusion: no per-shape
    /// compilation on a request, at the cost of the fusions.
    Simple,
    /// libtorch's legacy executor: optimises (and fuses) at a signature's first call, with no
    /// profiled runs before. Made per model at load (see [`TorchModel::use_legacy_executor`]).
    /// SAM vit_h's encoder on an H100: 0.8-1.4 s of first calls at a reload against 2.5-3.1 s,
    /// 183-197 ms a photo against 176-193, and embeddings within 1e-5 of eager PyTorch's where
    /// the profiling executor's were 0.13 off (`bench/results/sam_warm_up_probe_gpu_h100.md`).
    /// Not every model runs under it (SD2's UNet fails: "mat1 and mat2 must have the same
    /// dtype").
    Legacy,
}

impl Executor {
    /// Whether forwards run the executor's optimisations (the thread-local flag).
    fn optimizes(self) -> bool {
        self != Executor::Simple
    }
}

/// What the host does to a model's TorchScript once loaded, before its first call
/// (`tessera.optimize`); absent: nothing, the graphs run as exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimize {
    /// `torch.jit.freeze`: parameters and attributes become constants and the frozen-graph
    /// passes fold what they can (batch norms into convolutions, for one).
    Freeze,
    /// Freeze, then `torch.jit.optimize_for_inference` (on the CPU, oneDNN weight layouts for
    /// convolutions and linear layers). resnet18 at batch 8 on a 2-core Xeon: 12.0 ms per
    /// image against 15.4 as traced; a model of a few small ops can get slower (measure).
    Inference,
}

/// Process-wide libtorch settings, applied once at start-up, and a line describing the backend
/// for the log (CUDA, cuDNN and TorchScript fuser state: a slow forward usually shows here).
pub fn configure(cudnn_benchmark: bool, executor: Executor) -> String {
    if tch::Cuda::is_available() {
        tch::Cuda::cudnn_set_benchmark(cudnn_benchmark);
    }
    // SAFETY: the shim only reads process-wide settings and catches C++ exceptions.
    let flags = unsafe { cuda::tessera_math_flags() };
    format!(
        "cuda={} devices={} cudnn={} cudnn_benchmark={} default_executor={executor:?} jit_profiling={} texpr_fuser={} threads={} \
         math_flags={flags:#x} (1 tf32 cudnn, 2 benchmark, 4 deterministic, 8 cudnn on, 16 tf32 cublas)",
        tch::Cuda::is_available(),
        tch::Cuda::device_count(),
        tch::Cuda::cudnn_is_available(),
        cudnn_benchmark,
        tch::jit::get_profiling_mode(),
        tch::jit::get_tensor_expr_fuser_enabled(),
        tch::get_num_threads(),
    )
}

/// Makes this thread's TorchScript calls run under `executor`.
fn set_thread_executor(executor: Executor) {
    let optimize = executor.optimizes() as i32;
    // SAFETY: sets a thread-local flag; the shim catches C++ exceptions.
    if unsafe { cuda::tessera_jit_set_thread_optimize(optimize) } != 0 {
        tracing::warn!("could not set the TorchScript executor for this thread");
    }
}

/// The executor this thread's TorchScript calls run under.
pub fn thread_executor() -> Executor {
    // SAFETY: reads a thread-local flag.
    match unsafe { cuda::tessera_jit_get_thread_optimize() } {
        0 => Executor::Simple,
        _ => Executor::Profiling,
    }
}

/// How a forward thread keeps autograd out of its forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GradMode {
    /// Inference mode for the thread's whole life (`torch.inference_mode()`): no autograd
    /// dispatch and no version counters on any op.
    Inference,
    /// Only a no-grad guard around each forward (autograd's dispatch still runs; for
    /// comparisons).
    NoGrad,
}

/// How a forward thread runs TorchScript.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadMode {
    pub executor: Executor,
    pub grad: GradMode,
    /// OpenMP threads each of this thread's ops may use.
    pub intra_op_threads: usize,
}

/// Sets up the calling thread to run forwards in `mode` (forward workers call it when they
/// start; libtorch keeps these settings per thread).
pub fn prepare_forward_thread(mode: ThreadMode) {
    set_thread_executor(mode.executor);
    set_thread_grad_mode(mode.grad);
    set_thread_intra_op_threads(mode.intra_op_threads);
}

static DEFAULT_INTRA_OP_THREADS: OnceLock<usize> = OnceLock::new();

/// Intra-op threads of the forwards of models that name none: `--intra-op-threads`, else
/// libtorch's default (the machine's physical cores). The server fixes it at start-up, before
/// any forward thread exists; otherwise the first call reads libtorch's default.
pub fn default_intra_op_threads() -> usize {
    // SAFETY: reads the calling thread's thread count; the shim catches C++ exceptions.
    *DEFAULT_INTRA_OP_THREADS
        .get_or_init(|| unsafe { cuda::tessera_get_thread_intra_op_threads() }.max(1) as usize)
}

/// Fixes [`default_intra_op_threads`] (`None`: libtorch's default) and makes it libtorch's
/// process-wide count too (threads that set none, such as loaders, are seeded from it). Call it
/// once, at start-up, before any thread runs torch ops; a later call changes nothing.
pub fn init_default_intra_op_threads(threads: Option<usize>) -> usize {
    if let Some(n) = threads {
        let n = n.max(1);
        if DEFAULT_INTRA_OP_THREADS.set(n).is_ok() {
            tch::set_num_threads(n.min(i32::MAX as usize) as i32);
        }
    }
    default_intra_op_threads()
}

/// Makes the calling thread's ops use `threads` OpenMP threads (each thread keeps its own
/// count; see the shim).
pub fn set_thread_intra_op_threads(threads: usize) {
    let n = threads.clamp(1, i32::MAX as usize) as i32;
    // SAFETY: sets the calling thread's thread count; the shim catches C++ exceptions.
    if unsafe { cuda::tessera_set_thread_intra_op_threads(n) } != 0 {
        tracing::warn!(
            threads,
            "could not set this forward thread's intra-op threads"
        );
    }
}

/// The calling thread's intra-op thread count.
pub fn thread_intra_op_threads() -> usize {
    // SAFETY: reads the calling thread's thread count; the shim catches C++ exceptions.
    unsafe { cuda::tessera_get_thread_intra_op_threads() }.max(1) as usize
}

fn set_thread_grad_mode(mode: GradMode) {
    // SAFETY: sets thread-local autograd state; the shim catches C++ exceptions.
    if mode == GradMode::Inference && unsafe { cuda::tessera_enter_inference_mode() } != 0 {
        tracing::warn!("could not enter inference mode on this forward thread");
    }
}

/// Parses `auto`, `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device, String> {
    match spec {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => Ok(Device::Cuda(0)),
        s => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => Ok(Device::Cuda(n)),
            None => Err(format!(
                "unknown device '{s}': use auto, cpu, cuda or cuda:N"
            )),
        },
    }
}

pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A TorchScript module resident on a device.
pub struct TorchModel {
    /// Always `Some` until drop, which frees it before emptying the CUDA cache.
    module: Option<CModule>,
    pub device: Device,
    /// Bytes this model holds on its device, measured after load (its graphs' not included).
    pub held_bytes: u64,
    /// The forward is a loop the host drives ([`TorchModel::forward`]).
    looped: bool,
    /// CUDA graphs of its calls, when the model opts in and runs on a GPU. Dropped before the
    /// module.
    graphs: Option<graphs::Graphs>,
    /// Progress of the model's [`WARM_UP_METHOD`], when it has one.
    warm_up: Option<Mutex<WarmUp>>,
    /// The file it was loaded from, on its device (none if it could not be read).
    file: Option<FileKey>,
}

/// A method a model may export, `warm_up(step: int) -> int`, that the host calls step by step
/// on the model's forward thread while no request waits, starting at 0 and then with each
/// step's answer until one answers -1 (a request that arrives meanwhile waits for the step in
/// progress only). It is for work a model's first calls would otherwise do for a user, such as
/// having the driver compile the kernels of every FFT length the model can meet (cuFFT compiles
/// many at first use: 40-300 ms each on an H100, kept in the driver's cache on disk afterwards).
/// A step that runs longer than the model's response timeout (lowered to its tenant's)
/// quarantines the model, as a forward would; a step must answer a larger step or -1, within
/// [`MAX_WARM_UP_STEPS`] steps and [`MAX_WARM_UP_TIME`]: anything else ends the warm-up (logged
/// once). Once done (-1), it is done for the file on its device in this process: a reload of
/// the same file (a swap-in) starts with it done. `--model-warm-ups off` runs none.
pub const WARM_UP_METHOD: &str = "warm_up";

/// Most steps a model's warm-up may take.
pub const MAX_WARM_UP_STEPS: u64 = 4096;

/// Most time a model's warm-up may take over all its steps, per load (LaMa's: about a minute
/// on a machine whose driver has compiled none of its kernels).
pub const MAX_WARM_UP_TIME: std::time::Duration = std::time::Duration::from_secs(600);

/// Where a model's warm-up stands.
#[derive(Debug, Default)]
struct WarmUp {
    /// The next step to run; `None` once done (or ended).
    next: Option<i64>,
    steps: u64,
    spent: std::time::Duration,
    /// The file's identity on its device, remembered once the warm-up is done.
    key: Option<FileKey>,
    /// It ended without being done.
    ended: bool,
}

/// A TorchScript file (path, length, modification time) on a device: what a reload of the same
/// file (a swap-in) shares with its earlier loads in this process.
pub type FileKey = (std::path::PathBuf, u64, std::time::SystemTime, String);

/// Files whose warm-up was done (answered -1) in this process: what it left (kernels loaded,
/// plans cached) stays with the process, so a reload of the same file (a swap-in) starts with
/// its warm-up done. One that ended otherwise runs again at the next load.
fn warmed_up() -> std::sync::MutexGuard<'static, std::collections::HashSet<FileKey>> {
    static WARMED: OnceLock<Mutex<std::collections::HashSet<FileKey>>> = OnceLock::new();
    WARMED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Writes `path` through `write` (given a temporary name beside it), flushed to disk and then
/// renamed into place: readers see the whole file or none. Temporary files of this name left by
/// a process that no longer runs (one killed mid-write) are removed first.
pub(crate) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<(), String> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().ok_or("a file in no folder")?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let prefix = format!(".{name}.tmp-");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let other = e.file_name().to_string_lossy().into_owned();
            let pid = other
                .strip_prefix(&prefix)
                .and_then(|r| r.split('-').next());
            if pid.is_some_and(|p| !Path::new("/proc").join(p).exists()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!("{prefix}{}-{n}", std::process::id()));
    let result = write(&tmp)
        .and_then(|()| {
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("flushing {}: {e}", tmp.display()))
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn file_key(path: &Path, device: Device) -> Option<FileKey> {
    let meta = std::fs::metadata(path).ok()?;
    Some((
        path.to_path_buf(),
        meta.len(),
        meta.modified().ok()?,
        device_name(device),
    ))
}

/// What [`TorchModel::warm_up_state`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmUpState {
    Running,
    Done,
    /// Ended without its -1: a step failed, answered out of order, or the limits were reached.
    Ended,
}

/// Methods of a model whose forward is a loop (`tessera.loop`): `prepare(*inputs) ->
/// Tuple[int, List[Tensor]]` gives the number of steps and the loop's state (device tensors);
/// `step(i, state) -> state` (`i`: an int64 0-dim tensor on the device, the step's index; the
/// returned state has the same shapes) runs that many times; `finish(state)` gives the outputs.
pub const LOOP_METHODS: [&str; 3] = ["prepare", "step", "finish"];

// SAFETY: a TorchScript module's `forward` in inference mode may be called from several threads
// at once (libtorch's documented serving pattern, used by TorchServe's C++ backend); we never
// mutate the module after load. `CModule` is only missing the marker.
unsafe impl Sync for TorchModel {}

impl TorchModel {
    /// Loads `path` onto `device` and measures what it holds there: the bytes of the distinct
    /// tensor storages of its parameters, buffers, attributes and graph constants. Loads run in
    /// parallel (no lock): each weighs only its own module. Only files that passed
    /// [`verify::check_files`] may be loaded: loading runs the file's `__setstate__`.
    pub fn load(path: &Path, device: Device) -> Result<TorchModel, RuntimeError> {
        TorchModel::load_as(path, device, tier::LoadPath::configured())
    }

    /// [`TorchModel::load`] the way `how` says.
    pub fn load_as(
        path: &Path,
        device: Device,
        how: tier::LoadPath,
    ) -> Result<TorchModel, RuntimeError> {
        let mut module = tier::load_module(path, device, how).map_err(|e| load_error(device, e))?;
        module.set_eval();
        // SAFETY: a live module pointer; the shim only reads it and catches C++ exceptions.
        let held = unsafe { cuda::tessera_module_tensor_bytes(module_ptr(&module)) };
        let held_bytes = if held >= 0 {
            held as u64
        } else {
            std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
        };
        let file = file_key(path, device);
        let warm_up = graphs::has_method(&module, WARM_UP_METHOD).then(|| {
            let done = file.as_ref().is_some_and(|k| warmed_up().contains(k));
            Mutex::new(WarmUp {
                next: (!done).then_some(0),
                key: file.clone(),
                ..WarmUp::default()
            })
        });
        Ok(TorchModel {
            module: Some(module),
            device,
            held_bytes,
            looped: false,
            graphs: None,
            warm_up,
            file,
        })
    }

    /// The bytes of the distinct storages its tensors use now (`None` if they cannot be
    /// measured).
    pub fn tensor_bytes(&self) -> Option<u64> {
        let module = self.module.as_ref()?;
        // SAFETY: as in `load`.
        let held = unsafe { cuda::tessera_module_tensor_bytes(module_ptr(module)) };
        (held >= 0).then_some(held as u64)
    }

    /// Runs the next step of the model's [`WARM_UP_METHOD`], if one is left and no other thread
    /// is running one; whether a step ran. `name` is for the log.
    pub fn warm_up_step(&self, name: &str) -> bool {
        let Some(lock) = &self.warm_up else {
            return false;
        };
        // Busy on another worker, or poisoned by a step that panicked: nothing to do here.
        let Ok(mut w) = lock.try_lock() else {
            return false;
        };
        let Some(step) = w.next else {
            return false;
        };
        let _guard = tch::no_grad_guard();
        let started = std::time::Instant::now();
        let answer = self.call(WARM_UP_METHOD, &[IValue::Int(step)]);
        w.spent += started.elapsed();
        w.steps += 1;
        let spent_ms = w.spent.as_millis() as u64;
        let next = match answer {
            Ok(IValue::Int(-1)) => {
                tracing::info!(
                    model = name,
                    steps = w.steps,
                    ms = spent_ms,
                    "model warm-up done"
                );
                None
            }
            Ok(IValue::Int(next))
                if next > step && w.steps < MAX_WARM_UP_STEPS && w.spent < MAX_WARM_UP_TIME =>
            {
                Some(next)
            }
            Ok(other) => {
                tracing::warn!(
                    model = name,
                    step,
                    steps = w.steps,
                    ms = spent_ms,
                    "{WARM_UP_METHOD} answered {} after step {step}: it must answer a larger step or -1, within {MAX_WARM_UP_STEPS} steps and {} s; warm-up ended",
                    match other {
                        IValue::Int(n) => n.to_string(),
                        v => ivalue_kind(&v).to_string(),
                    },
                    MAX_WARM_UP_TIME.as_secs()
                );
                w.ended = true;
                None
            }
            Err(e) => {
                tracing::warn!(model = name, step, error = %e, "model warm-up failed; ended");
                w.ended = true;
                None
            }
        };
        w.next = next;
        if next.is_none() && !w.ended {
            if let Some(key) = w.key.take() {
                warmed_up().insert(key);
            }
        }
        true
    }

    /// Where the model's warm-up stands; `None` without a [`WARM_UP_METHOD`].
    pub fn warm_up_state(&self) -> Option<WarmUpState> {
        Some(match self.warm_up.as_ref()?.try_lock() {
            Ok(w) if w.next.is_some() => WarmUpState::Running,
            Ok(w) if w.ended => WarmUpState::Ended,
            Ok(_) => WarmUpState::Done,
            // A step in progress holds the lock.
            Err(std::sync::TryLockError::WouldBlock) => WarmUpState::Running,
            // A step panicked.
            Err(std::sync::TryLockError::Poisoned(_)) => WarmUpState::Ended,
        })
    }

    /// Drops the model's warm-up (`--model-warm-ups off`).
    pub fn disable_warm_up(&mut self) {
        self.warm_up = None;
    }

    /// Rewrites the module as `how` says (every method besides `forward` is kept) and weighs
    /// it again. What it holds is counted as the larger of the two weights: freezing releases
    /// the parameters it folded only once nothing else holds them.
    pub fn optimized(mut self, how: Optimize) -> Result<TorchModel, RuntimeError> {
        let module = self.module.as_ref().expect("module present until drop");
        let mode = match how {
            Optimize::Freeze => 1,
            Optimize::Inference => 2,
        };
        // SAFETY: a live module pointer no other thread uses yet (not published); the shim
        // replaces the module object in place only on success and catches C++ exceptions.
        let err = unsafe { cuda::tessera_module_optimize(module_ptr(module), mode) };
        if !err.is_null() {
            let message = graphs::take_text(err);
            return Err(load_error(
                self.device,
                format!("tessera.optimize: {how:?} failed: {message}"),
            ));
        }
        // SAFETY: as in `load`.
        let held = unsafe { cuda::tessera_module_tensor_bytes(module_ptr(module)) };
        if held >= 0 {
            self.held_bytes = self.held_bytes.max(held as u64);
        }
        Ok(self)
    }

    /// Writes the module (as it is now: optimised, say) to `path` as TorchScript, through a
    /// temporary file beside it renamed into place, so that `path` is whole or absent.
    pub fn save_atomically(&self, path: &Path) -> Result<(), RuntimeError> {
        let module = self.module.as_ref().expect("module present until drop");
        write_atomically(path, |tmp| {
            module
                .save(tmp)
                .map_err(|e| first_line(&e.to_string()).to_string())
        })
        .map_err(|e| RuntimeError::Load(format!("saving {}: {e}", path.display())))
    }

    /// Makes the forward the host-driven loop of [`LOOP_METHODS`] (each must exist).
    pub fn with_loop(mut self) -> Result<TorchModel, RuntimeError> {
        let module = self.module.as_ref().expect("module present until drop");
        if let Some(m) = LOOP_METHODS.iter().find(|m| !graphs::has_method(module, m)) {
            return Err(RuntimeError::Load(format!(
                "tessera.loop needs methods {}; the TorchScript file has no '{m}'",
                LOOP_METHODS.join(", ")
            )));
        }
        self.looped = true;
        Ok(self)
    }

    /// Gives every function of the model a legacy executor, now (libtorch picks the kind from
    /// a process-wide flag when it creates a function's executor; see [`Executor::Legacy`]).
    /// Returns how many functions it covered.
    pub fn use_legacy_executor(&self) -> Result<usize, RuntimeError> {
        let module = self.module.as_ref().expect("module present until drop");
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: a live module; the shim catches C++ exceptions and returns a count or an
        // error string (freed by take_text).
        let n = unsafe { cuda::tessera_module_use_legacy_executor(module_ptr(module), &mut err) };
        if n < 0 {
            return Err(RuntimeError::Load(format!(
                "creating the legacy executor: {}",
                graphs::take_text(err)
            )));
        }
        Ok(n as usize)
    }

    /// Replays the model's calls as CUDA graphs (at most `max` signatures); on a CPU device
    /// this changes nothing (said in the log).
    pub fn with_cuda_graphs(mut self, name: &str, max: usize) -> TorchModel {
        if self.device.is_cuda() {
            // Before the first run: executors copy the graphs then.
            let module = self.module.as_ref().expect("module present until drop");
            match graphs::shape_constants_to_host(module) {
                Some(0) => {}
                Some(n) => {
                    tracing::info!(model = name, uses = n,
                    "shape arithmetic's constants copied back to the CPU (no host sync per call)")
                }
                None => tracing::warn!(model = name, "could not copy shape constants to the CPU"),
            }
            self.graphs = Some(graphs::Graphs::new(
                name,
                self.device,
                max,
                self.file.clone(),
            ));
        } else {
            tracing::info!(
                model = name,
                "tessera.cudaGraphs ignored: the model runs on the CPU"
            );
        }
        self
    }

    /// Bytes on the device: the module's and its graphs'.
    /// The loaded module.
    pub(crate) fn module(&self) -> Option<&CModule> {
        self.module.as_ref()
    }

    /// Its CUDA graphs, if it has them.
    pub(crate) fn graphs(&self) -> Option<&graphs::Graphs> {
        self.graphs.as_ref()
    }

    pub fn device_bytes(&self) -> u64 {
        self.held_bytes + self.graphs.as_ref().map_or(0, |g| g.bytes())
    }

    /// Captures one call waiting for its CUDA graph (forward threads call this between
    /// requests); whether there was one.
    pub fn capture_pending(&self) -> bool {
        let _guard = tch::no_grad_guard();
        match (&self.graphs, &self.module) {
            (Some(g), Some(m)) => g.capture_pending(m),
            _ => false,
        }
    }

    /// Calls waiting for their CUDA graph.
    pub fn pending_captures(&self) -> usize {
        self.graphs.as_ref().map_or(0, |g| g.pending())
    }

    /// CUDA-graph signatures recalled from an earlier load of the same file, and whether one
    /// failed to capture again ([`graphs::Graphs::recalled`]).
    pub fn recalled_captures(&self) -> (usize, bool) {
        self.graphs.as_ref().map_or((0, false), |g| g.recalled())
    }

    /// Runs `forward` with the inputs as positional arguments and returns the outputs as
    /// named tensors: a tensor output is `output0`; a tuple or list gives `output0..N`; a
    /// `Dict[str, Tensor]` keeps its keys.
    pub fn forward(&self, inputs: &[HostTensor]) -> Result<Vec<HostTensor>, RuntimeError> {
        let _guard = tch::no_grad_guard();
        let t0 = std::time::Instant::now();
        let tensors = inputs
            .iter()
            .map(|t| t.to_tch(self.device))
            .collect::<Result<Vec<Tensor>, _>>()?;
        if self.looped {
            return self.forward_loop(tensors);
        }
        if let Some(graph) = self.graph("forward", &tensors, graphs::CallForm::Positional) {
            return replay_call(&graph, &tensors);
        }
        let args = tensors.into_iter().map(IValue::Tensor).collect();
        let t1 = std::time::Instant::now();
        let values = self.forward_values(args)?;
        let t2 = std::time::Instant::now();
        let mut outputs = Vec::new();
        collect_outputs(values, None, &mut outputs)?;
        // The forward call returns once its kernels are queued; the copy back waits for them.
        tracing::trace!(
            inputs_ms = (t1 - t0).as_secs_f64() * 1e3,
            launch_ms = (t2 - t1).as_secs_f64() * 1e3,
            outputs_ms = t2.elapsed().as_secs_f64() * 1e3,
            "forward phases"
        );
        Ok(outputs)
    }

    /// The captured graph for this call, if there is one (CUDA tensors only).
    fn graph(
        &self,
        method: &str,
        inputs: &[Tensor],
        form: graphs::CallForm,
    ) -> Option<Arc<Mutex<graphs::CudaGraph>>> {
        self.graphs.as_ref()?.lookup(method, inputs, form)
    }

    /// The loop of [`LOOP_METHODS`] on `inputs`. Each step is one graph replay when its
    /// state's signature has been captured (`prepare` and `finish` run once, uncaptured): the
    /// step index is filled into a device tensor (a kernel, no host synchronisation), each
    /// step's outputs are copied into the next step's inputs. The loop stops between steps once
    /// the request's time is up ([`set_thread_deadline`]).
    fn forward_loop(&self, inputs: Vec<Tensor>) -> Result<Vec<HostTensor>, RuntimeError> {
        let args: Vec<IValue> = inputs.into_iter().map(IValue::Tensor).collect();
        let (count, state) = match self.call("prepare", &args)? {
            IValue::Tuple(mut parts) if parts.len() == 2 => {
                let state = tensor_list(parts.pop().expect("two parts"), "prepare's state")?;
                match parts.pop() {
                    Some(IValue::Int(n)) if (0..=MAX_LOOP_STEPS).contains(&n) => (n, state),
                    other => {
                        return Err(RuntimeError::Output(format!(
                            "prepare must return (int steps, List[Tensor] state) with 0..={MAX_LOOP_STEPS} steps, got {other:?} steps"
                        )))
                    }
                }
            }
            other => {
                return Err(RuntimeError::Output(format!(
                    "prepare must return (int steps, List[Tensor] state), got {}",
                    ivalue_kind(&other)
                )))
            }
        };
        let err = |e: tch::TchError| self.runtime_error(e.to_string());
        let mut step_inputs = Vec::with_capacity(state.len() + 1);
        step_inputs.push(Tensor::f_zeros([], (Kind::Int64, self.device)).map_err(err)?);
        step_inputs.extend(state);
        let form = graphs::CallForm::ListFrom(1);
        let state: Vec<Tensor> = match self.graph("step", &step_inputs, form) {
            Some(graph) => {
                let mut g = graphs::lock(&graph)?;
                for (k, t) in step_inputs.iter().enumerate().skip(1) {
                    g.set_input(k, t).map_err(graphs::replay_error)?;
                }
                let mut index = g.input(0).map_err(graphs::replay_error)?;
                for i in 0..count {
                    check_thread_deadline(i, count)?;
                    let _ = index.f_fill_(i).map_err(err)?;
                    g.replay().map_err(graphs::replay_error)?;
                    g.outputs_to_inputs(1).map_err(graphs::replay_error)?;
                }
                // The state leaves the graph's buffers before its lock is released.
                (1..g.inputs())
                    .map(|k| g.input(k).map(|t| t.copy()).map_err(graphs::replay_error))
                    .collect::<Result<_, _>>()?
            }
            None => {
                let mut index = step_inputs[0].shallow_clone();
                let mut state: Vec<Tensor> = step_inputs.split_off(1);
                for i in 0..count {
                    check_thread_deadline(i, count)?;
                    let _ = index.f_fill_(i).map_err(err)?;
                    let args = [
                        IValue::Tensor(index.shallow_clone()),
                        IValue::TensorList(state),
                    ];
                    state = tensor_list(self.call("step", &args)?, "step's state")?;
                }
                state
            }
        };
        // `finish` runs once per request, uncaptured: SD2's VAE decode is a few large kernels,
        // and a graph would keep its 620 MiB of activations reserved for good.
        let mut outputs = Vec::new();
        collect_outputs(
            self.call("finish", &[IValue::TensorList(state)])?,
            None,
            &mut outputs,
        )?;
        Ok(outputs)
    }

    /// Calls method `name`; the caller holds a no-grad guard.
    fn call(&self, name: &str, args: &[IValue]) -> Result<IValue, RuntimeError> {
        let module = self.module.as_ref().expect("module present until drop");
        module
            .method_is(name, args)
            .map_err(|e| self.runtime_error(e.to_string()))
    }

    fn runtime_error(&self, m: String) -> RuntimeError {
        if is_oom(&m) {
            RuntimeError::OutOfMemory {
                device: device_name(self.device),
                message: m,
            }
        } else {
            RuntimeError::Forward(first_line(&m))
        }
    }

    /// `forward` on values already on the device; the caller holds a no-grad guard.
    fn forward_values(&self, args: Vec<IValue>) -> Result<IValue, RuntimeError> {
        let module = self.module.as_ref().expect("module present until drop");
        module
            .forward_is(&args)
            .map_err(|e| self.runtime_error(e.to_string()))
    }
}

/// Most steps a loop model's `prepare` may ask for.
pub const MAX_LOOP_STEPS: i64 = 10_000;

thread_local! {
    /// When the request the calling forward thread serves must be answered by.
    static DEADLINE: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// Tells this thread's loop forwards when their request's time is up (engines set it per
/// forward): a loop stops between steps past it instead of running on for nobody.
pub fn set_thread_deadline(deadline: Option<std::time::Instant>) {
    DEADLINE.with(|d| d.set(deadline));
}

fn check_thread_deadline(step: i64, count: i64) -> Result<(), RuntimeError> {
    match DEADLINE.with(|d| d.get()) {
        Some(deadline) if std::time::Instant::now() >= deadline => Err(RuntimeError::Forward(
            format!("the request's time ran out after {step} of {count} steps"),
        )),
        _ => Ok(()),
    }
}

/// One call replayed from `graph`: `inputs` copied into its static inputs, the outputs copied
/// to the host before the graph is released.
fn replay_call(
    graph: &Mutex<graphs::CudaGraph>,
    inputs: &[Tensor],
) -> Result<Vec<HostTensor>, RuntimeError> {
    let mut g = graphs::lock(graph)?;
    for (k, t) in inputs.iter().enumerate() {
        g.set_input(k, t).map_err(graphs::replay_error)?;
    }
    g.replay().map_err(graphs::replay_error)?;
    g.output_names()
        .iter()
        .enumerate()
        .map(|(j, name)| {
            let t = g.output(j).map_err(graphs::replay_error)?;
            HostTensor::from_tch(name.clone(), &t)
        })
        .collect()
}

/// The tensors of a `List[Tensor]` result.
fn tensor_list(value: IValue, what: &str) -> Result<Vec<Tensor>, RuntimeError> {
    match value {
        IValue::TensorList(ts) => Ok(ts),
        IValue::GenericList(items) | IValue::Tuple(items) => items
            .into_iter()
            .map(|v| match v {
                IValue::Tensor(t) => Ok(t),
                other => Err(RuntimeError::Output(format!(
                    "{what} must hold tensors only, got {}",
                    ivalue_kind(&other)
                ))),
            })
            .collect(),
        other => Err(RuntimeError::Output(format!(
            "{what} must be a List[Tensor], got {}",
            ivalue_kind(&other)
        ))),
    }
}

/// A value's kind, for errors (not its contents, which may be large).
fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::Tensor(_) => "a tensor",
        IValue::Tuple(_) => "a tuple",
        IValue::GenericList(_) | IValue::TensorList(_) => "a list",
        IValue::GenericDict(_) => "a dict",
        IValue::Int(_) | IValue::IntList(_) => "an int",
        IValue::Double(_) | IValue::DoubleList(_) => "a float",
        IValue::Bool(_) | IValue::BoolList(_) => "a bool",
        IValue::String(_) | IValue::StringList(_) => "a string",
        IValue::None => "None",
        _ => "an object",
    }
}

impl Drop for TorchModel {
    fn drop(&mut self) {
        drop(self.graphs.take());
        drop(self.module.take());
        if self.device.is_cuda() {
            // The caching allocator keeps freed blocks; hand them back so the memory is free
            // for the driver and visible as such (nvidia-smi).
            cuda_empty_cache();
            tracing::debug!(
                device = device_name(self.device),
                bytes = self.held_bytes,
                "freed model"
            );
        }
    }
}

fn first_line(m: &str) -> String {
    // libtorch errors carry a long C++/TorchScript traceback: the first lines say where it
    // failed, the last one what went wrong.
    let lines: Vec<&str> = m.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() <= 7 {
        return lines.join("\n");
    }
    let mut out = lines[..5].join("\n");
    out.push_str("\n...\n");
    out.push_str(lines[lines.len() - 1]);
    out
}

fn collect_outputs(
    value: IValue,
    name: Option<String>,
    out: &mut Vec<HostTensor>,
) -> Result<(), RuntimeError> {
    let next_name = |out: &Vec<HostTensor>| format!("output{}", out.len());
    match value {
        IValue::Tensor(t) => {
            let n = name.unwrap_or_else(|| next_name(out));
            out.push(HostTensor::from_tch(n, &t)?);
        }
        IValue::Tuple(items) | IValue::GenericList(items) => {
            for v in items {
                collect_outputs(v, None, out)?;
            }
        }
        IValue::TensorList(ts) => {
            for t in ts {
                let n = next_name(out);
                out.push(HostTensor::from_tch(n, &t)?);
            }
        }
        IValue::GenericDict(pairs) => {
            for (k, v) in pairs {
                let key = match k {
                    IValue::String(s) => s,
                    other => {
                        return Err(RuntimeError::Output(format!(
                            "dict key {other:?} is not a string"
                        )))
                    }
                };
                collect_outputs(v, Some(key), out)?;
            }
        }
        IValue::Double(x) => {
            let n = name.unwrap_or_else(|| next_name(out));
            out.push(HostTensor {
                name: n,
                dtype: DType::F64,
                shape: vec![],
                data: x.to_le_bytes().to_vec(),
            });
        }
        IValue::Int(x) => {
            let n = name.unwrap_or_else(|| next_name(out));
            out.push(HostTensor {
                name: n,
                dtype: DType::I64,
                shape: vec![],
                data: x.to_le_bytes().to_vec(),
            });
        }
        IValue::Bool(x) => {
            let n = name.unwrap_or_else(|| next_name(out));
            out.push(HostTensor {
                name: n,
                dtype: DType::Bool,
                shape: vec![],
                data: vec![x as u8],
            });
        }
        other => return Err(RuntimeError::Output(format!("{other:?}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_keeps_its_own_intra_op_threads() {
        // Thread one sets 1 but runs its first op only after thread two has set 2 (which also
        // overwrites libtorch's process-wide number, from which a thread's count is seeded at
        // its first parallel op): one must still run with 1.
        let op = || {
            let _ = Tensor::ones([1 << 17], (Kind::Float, Device::Cpu)) * 2.0;
            thread_intra_op_threads()
        };
        let (one_set, one_go) = std::sync::mpsc::channel();
        let (two_set, two_go) = std::sync::mpsc::channel::<()>();
        let one = std::thread::spawn(move || {
            set_thread_intra_op_threads(1);
            one_set.send(()).unwrap();
            two_go.recv().unwrap();
            op()
        });
        one_go.recv().unwrap();
        let two = std::thread::spawn(move || {
            set_thread_intra_op_threads(2);
            let n = op();
            two_set.send(()).unwrap();
            n
        });
        assert_eq!(two.join().unwrap(), 2);
        assert_eq!(one.join().unwrap(), 1);
    }

    #[test]
    fn host_tensor_checks_sizes() {
        assert!(HostTensor::new("x".into(), DType::F32, vec![2, 3], vec![0; 24]).is_ok());
        assert!(HostTensor::new("x".into(), DType::F32, vec![2, 3], vec![0; 23]).is_err());
        assert!(HostTensor::new("x".into(), DType::U8, vec![u64::MAX, 2], vec![]).is_err());
        // No elements, but dimensions whose running product leaves i64.
        assert!(HostTensor::new("x".into(), DType::U8, vec![1 << 62, 2, 0], vec![]).is_err());
        assert!(HostTensor::new("x".into(), DType::U8, vec![1 << 62, 1, 0], vec![]).is_ok());
    }

    #[test]
    fn round_trip_through_tch() {
        let t = HostTensor::new(
            "x".into(),
            DType::F32,
            vec![2],
            [1.5f32, -2.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        )
        .unwrap();
        let back = HostTensor::from_tch("x".into(), &t.to_tch(Device::Cpu).unwrap()).unwrap();
        assert_eq!(back, t);
        // On a GPU the bytes go through a view (no CPU copy): the same values come back.
        if tch::Cuda::is_available() {
            let t =
                HostTensor::new("x".into(), DType::U8, vec![3, 5, 7], (0..105).collect()).unwrap();
            let gpu = t.to_tch(Device::Cuda(0)).unwrap();
            assert_eq!(gpu.device(), Device::Cuda(0));
            assert_eq!(HostTensor::from_tch("x".into(), &gpu).unwrap(), t);
        }
        // No elements, dimensions whose product of the non-zero ones is huge: an empty tensor.
        let empty = HostTensor::new("x".into(), DType::U8, vec![1 << 62, 1, 0], vec![]).unwrap();
        assert_eq!(empty.to_tch(Device::Cpu).unwrap().numel(), 0);
        // Bytes that do not match the shape (the fields are public): an error, nothing read.
        let short = HostTensor {
            data: vec![0; 7],
            ..t.clone()
        };
        assert!(matches!(
            short.to_tch(Device::Cpu),
            Err(RuntimeError::Input(_))
        ));
    }

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device("cuda:1").unwrap(), Device::Cuda(1));
        assert!(parse_device("tpu").is_err());
    }

    /// A traced module on `path`: `f` applied to one [rows, 1024] input.
    fn traced(path: &Path, f: impl Fn(&Tensor) -> Tensor) {
        let module = tch::CModule::create_by_tracing(
            "M",
            "forward",
            &[Tensor::zeros([2, 1024], (Kind::Float, Device::Cpu))],
            &mut |xs| vec![f(&xs[0])],
        )
        .unwrap();
        module.save(path).unwrap();
    }

    fn input(rows: u64, seed: u8) -> HostTensor {
        let data: Vec<u8> = (0..rows * 1024)
            .flat_map(|i| (((i as u8).wrapping_mul(seed)) as f32 / 7.0).to_le_bytes())
            .collect();
        HostTensor::new("x".into(), DType::F32, vec![rows, 1024], data).unwrap()
    }

    /// A GPU test's turn, `None` (the test skips) without a CUDA device. GPU tests measure the
    /// device's memory and share the process's capture slot: one at a time.
    fn gpu_test() -> Option<std::sync::MutexGuard<'static, ()>> {
        if !tch::Cuda::is_available() {
            eprintln!("skipped: no CUDA device");
            return None;
        }
        static GPU: Mutex<()> = Mutex::new(());
        Some(GPU.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Captures every pending call of `m` (another test's capture may hold the process's one
    /// capture slot for a moment: `capture_pending` then does nothing).
    fn capture_all(m: &TorchModel) {
        while m.pending_captures() > 0 {
            if !m.capture_pending() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// CUDA graphs (GPU machine only): the first call of a shape runs uncaptured and leaves it
    /// pending; after the capture the same call is a replay with the same result, for new
    /// values too; the graph's memory counts in the model's bytes and goes with the model.
    #[test]
    fn cuda_graph_replays_what_the_forward_computes() {
        let Some(_gpu) = gpu_test() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        traced(&path, |x| {
            (x * 2.0 + 1.0)
                .relu()
                .sum_dim_intlist(1, false, Kind::Float)
        });
        let before = cuda_memory(0).map(|m| m.1).unwrap_or(0);
        let model = TorchModel::load(&path, Device::Cuda(0))
            .unwrap()
            .with_cuda_graphs("m", 2);
        let uncaptured = model.forward(&[input(2, 3)]).unwrap();
        assert_eq!(model.pending_captures(), 1);
        capture_all(&model);
        assert_eq!(model.pending_captures(), 0);
        assert!(model.device_bytes() > model.held_bytes);
        assert_eq!(model.forward(&[input(2, 3)]).unwrap(), uncaptured);
        // A replay computes on the values it is given, not the capture's.
        let other = model.forward(&[input(2, 5)]).unwrap();
        assert_ne!(other, uncaptured);
        // Another shape is another graph; past the most graphs, shapes run uncaptured.
        for rows in [3, 4] {
            model.forward(&[input(rows, 3)]).unwrap();
            capture_all(&model);
        }
        assert_eq!(model.forward(&[input(4, 3)]).unwrap()[0].shape, vec![4]);
        assert_eq!(model.pending_captures(), 0);
        drop(model);
        let after = cuda_memory(0).map(|m| m.1).unwrap_or(u64::MAX);
        assert!(
            after <= before + (2 << 20),
            "reserved {before} -> {after} after drop"
        );
    }

    /// CUDA graphs (GPU machine only): a reload of the same file captures what the earlier load
    /// captured before any call brings it (zero-filled inputs: a replay then computes on the
    /// call's values), and a changed file recalls nothing.
    #[test]
    fn a_reload_captures_again_what_the_earlier_load_captured() {
        let Some(_gpu) = gpu_test() else {
            return;
        };
        // As SD2 runs: the graph as exported (the profiling executor's fused kernels, which a
        // capture would record, round differently from its first, unfused calls).
        set_thread_executor(Executor::Simple);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        traced(&path, |x| (x * 3.0 - 1.0).relu());
        let load = || {
            TorchModel::load(&path, Device::Cuda(0))
                .unwrap()
                .with_cuda_graphs("m", 4)
        };
        let first = load();
        assert_eq!(first.recalled_captures(), (0, false));
        let want: Vec<_> = [2, 3]
            .iter()
            .map(|&rows| first.forward(&[input(rows, 3)]).unwrap())
            .collect();
        capture_all(&first);
        drop(first);
        let again = load();
        assert_eq!(again.recalled_captures(), (2, false));
        assert_eq!(
            again.pending_captures(),
            2,
            "both signatures wait before any call"
        );
        capture_all(&again);
        assert_eq!(again.recalled_captures(), (2, false));
        assert!(again.device_bytes() > again.held_bytes);
        for (rows, want) in [2, 3].iter().zip(&want) {
            assert_eq!(&again.forward(&[input(*rows, 3)]).unwrap(), want);
        }
        assert_eq!(again.pending_captures(), 0, "the calls were replays");
        drop(again);
        // Another file at the same path (another length) is another model: nothing recalled.
        traced(&path, |x| (x * 3.0 - 1.0).relu() + x.sin());
        assert_eq!(load().recalled_captures(), (0, false));
    }

    /// A call that cannot be captured (it copies to the host mid-forward) is tried once and
    /// then always runs uncaptured, with correct results.
    #[test]
    fn cuda_graph_capture_failure_runs_uncaptured() {
        let Some(_gpu) = gpu_test() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        traced(&path, |x| (x * 2.0).to_device(Device::Cpu).sum(Kind::Float));
        let model = TorchModel::load(&path, Device::Cuda(0))
            .unwrap()
            .with_cuda_graphs("m", 2);
        let first = model.forward(&[input(2, 3)]).unwrap();
        capture_all(&model);
        assert_eq!(model.device_bytes(), model.held_bytes);
        assert_eq!(model.forward(&[input(2, 3)]).unwrap(), first);
        assert_eq!(
            model.pending_captures(),
            0,
            "a failed signature is not tried again"
        );
        // The allocator is left as it was: it frees cached memory, and another capture works.
        // SAFETY: see `cuda_empty_cache`.
        assert_eq!(unsafe { cuda::tessera_cuda_empty_cache() }, 0);
        let good = dir.path().join("good.pt");
        traced(&good, |x| x * 3.0);
        let other = TorchModel::load(&good, Device::Cuda(0))
            .unwrap()
            .with_cuda_graphs("good", 2);
        let want = other.forward(&[input(2, 3)]).unwrap();
        capture_all(&other);
        assert!(
            other.device_bytes() > other.held_bytes,
            "the second capture failed"
        );
        assert_eq!(other.forward(&[input(2, 3)]).unwrap(), want);
    }

    #[test]
    fn a_loop_stops_once_its_request_is_out_of_time() {
        set_thread_deadline(Some(
            std::time::Instant::now() + std::time::Duration::from_secs(60),
        ));
        assert!(check_thread_deadline(0, 5).is_ok());
        set_thread_deadline(Some(std::time::Instant::now()));
        assert!(matches!(
            check_thread_deadline(3, 5),
            Err(RuntimeError::Forward(m)) if m.contains("after 3 of 5 steps")
        ));
        set_thread_deadline(None);
        assert!(check_thread_deadline(3, 5).is_ok());
    }

    /// A scripted model with a batch norm to fold and a loop's methods beside `forward`.
    const OPTIMIZE_FIXTURE: &str = r#"
import sys
from typing import List, Tuple
import torch

class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))

    @torch.jit.export
    def prepare(self, x: torch.Tensor) -> Tuple[int, List[torch.Tensor]]:
        return 3, [x]

    @torch.jit.export
    def step(self, i: torch.Tensor, state: List[torch.Tensor]) -> List[torch.Tensor]:
        y = self.bn(self.conv(state[0]))[:, :3]
        return [state[0] + 0.1 * torch.tanh(y) + 0.01 * i.to(torch.float32)]

    @torch.jit.export
    def finish(self, state: List[torch.Tensor]) -> List[torch.Tensor]:
        return [self.forward(state[0])]

torch.manual_seed(0)
m = M()
with torch.no_grad():
    m.bn.running_mean.uniform_(-1, 1)
    m.bn.running_var.uniform_(0.5, 2)
    m.bn.weight.uniform_(0.5, 1.5)
    m.bn.bias.uniform_(-0.5, 0.5)
torch.jit.script(m.eval()).save(sys.argv[1])
"#;

    fn optimize_fixture(path: &Path) {
        python_fixture(OPTIMIZE_FIXTURE, path)
    }

    /// Runs `source` with `path` as its argument (it writes a TorchScript file there).
    fn python_fixture(source: &str, path: &Path) {
        let python = std::env::var_os("TESSERA_PYTHON")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
        // torch.jit.script reads the class's source: a file, not `-c`.
        let script = path.with_extension("py");
        std::fs::write(&script, source).unwrap();
        let status = std::process::Command::new(&python)
            .arg(&script)
            .arg(path)
            .status()
            .unwrap_or_else(|e| panic!("{}: {e} (run under scripts/env.sh)", python.display()));
        assert!(status.success());
    }

    /// Three files of one two-layer model: `.0` and `.1` identical, `.2` with the second
    /// layer's weight changed (its other parameters equal).
    const SHARING_FIXTURE: &str = r#"
import sys
import torch

torch.manual_seed(0)
class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(1024, 1024)
        self.b = torch.nn.Linear(1024, 1024)

    def forward(self, x):
        return self.b(self.a(x).relu())

m = Two().eval()
torch.jit.script(m).save(sys.argv[1] + ".0")
torch.jit.script(m).save(sys.argv[1] + ".1")
with torch.no_grad():
    m.b.weight.mul_(-1.0)
torch.jit.script(m).save(sys.argv[1] + ".2")
"#;

    fn ids(p: &Pipeline) -> std::collections::HashSet<usize> {
        p.shared_storages().iter().map(|(id, _)| *id).collect()
    }

    /// Byte-identical parameters of models in one scope are held once (a model's own copies
    /// freed, its bytes measured again), found only when the bytes are equal, never across
    /// scopes; answers are unchanged, and a model keeps working when the other is dropped or
    /// moved to host memory. Back on the device, a shared storage still held there is used as
    /// it is, the others copied.
    #[test]
    fn identical_weights_are_held_once_per_scope() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("two.pt");
        python_fixture(SHARING_FIXTURE, &base);
        let load = |k: u32| {
            Pipeline::new(
                None,
                TorchModel::load(&base.with_extension(format!("pt.{k}")), Device::Cpu).unwrap(),
            )
        };
        let (mut p0, mut p1, mut p2, mut other) = (load(0), load(1), load(2), load(0));
        let x = input(2, 3);
        let want = p0.entry.forward(&[x.clone()]).unwrap();
        let want2 = p2.entry.forward(&[x.clone()]).unwrap();
        assert_ne!(want, want2);
        let full = p0.entry.held_bytes;
        let (weight, bias) = (1024 * 1024 * 4u64, 1024 * 4u64);
        assert_eq!(full, 2 * (weight + bias));

        assert_eq!(
            p0.share_weights("t").unwrap().joined,
            0,
            "nothing to share with yet"
        );
        // The weights (4 MiB) are shared; the biases (4 KiB) are too small to be worth it.
        let s1 = p1.share_weights("t").unwrap();
        assert_eq!(s1.joined, 2 * weight, "{s1:?}");
        assert_eq!(ids(&p0), ids(&p1));
        let s2 = p2.share_weights("t").unwrap();
        assert_eq!(s2.joined, weight, "b's weight differs: {s2:?}");
        assert_eq!(ids(&p2).intersection(&ids(&p0)).count(), 1);
        assert_eq!(other.share_weights("u").unwrap().joined, 0, "another scope");
        assert!(ids(&other).is_disjoint(&ids(&p0)));
        assert_eq!(
            p2.entry.held_bytes, full,
            "a model still weighs what it uses"
        );

        assert_eq!(p0.entry.forward(&[x.clone()]).unwrap(), want);
        assert_eq!(p1.entry.forward(&[x.clone()]).unwrap(), want);
        assert_eq!(p2.entry.forward(&[x.clone()]).unwrap(), want2);
        assert_eq!(other.entry.forward(&[x.clone()]).unwrap(), want);

        // The first holder goes: the others keep the storages.
        drop(p0);
        assert_eq!(p1.entry.forward(&[x.clone()]).unwrap(), want);
        // p1 to host memory and back: a's weight is still on the device (p2 holds it) and is
        // used as it is; b's weight (p1's alone now) and the biases are copied.
        p1.to_host(false).unwrap();
        assert!(p1.shared_storages().is_empty());
        assert_eq!(p2.entry.forward(&[x.clone()]).unwrap(), want2);
        let back = p1.to_device().unwrap();
        assert_eq!(back.copied, weight + 2 * bias, "{back:?}");
        assert_eq!(ids(&p1).intersection(&ids(&p2)).count(), 1);
        assert_eq!(p1.entry.forward(&[x.clone()]).unwrap(), want);
        // A write in place to a shared parameter is noticed (here one that keeps its values).
        assert!(!p1.wrote_shared_weights("p1"));
        let (_, a) = p1
            .entry
            .module()
            .unwrap()
            .named_parameters()
            .unwrap()
            .into_iter()
            .find(|(name, _)| name == "a.weight")
            .unwrap();
        tch::no_grad(|| {
            let mut a = a;
            let _ = a.f_mul_scalar_(1.0).unwrap();
        });
        assert!(p1.wrote_shared_weights("p1"));
        assert!(
            !p2.wrote_shared_weights("p2"),
            "p2's own tensors were not written"
        );
        drop(p2);
        assert_eq!(p1.entry.forward(&[x]).unwrap(), want);
    }

    /// Models with a warm-up (each step adds one to a buffer `forward` returns): three steps
    /// then -1, one that answers its own step again, one that fails at step 1, one that never
    /// ends.
    const WARM_UP_FIXTURE: &str = r#"
import sys
import torch

class Counting(torch.nn.Module):
    def __init__(self, mode: int):
        super().__init__()
        self.mode = mode
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x):
        return self.calls + 0 * x.sum()

    @torch.jit.export
    def warm_up(self, step: int) -> int:
        self.calls.add_(1)
        if self.mode == 1:
            return step
        if self.mode == 2 and step == 1:
            raise RuntimeError("no kernels today")
        if self.mode == 3:
            return step + 1
        return step + 1 if step < 2 else -1

for mode in range(4):
    torch.jit.script(Counting(mode)).save(sys.argv[1] + f".{mode}")
"#;

    #[test]
    fn a_models_warm_up_runs_step_by_step_and_ends() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("w.pt");
        python_fixture(WARM_UP_FIXTURE, &base);
        let calls = |m: &TorchModel| {
            let x = HostTensor::new("x".into(), DType::F32, vec![1], vec![0; 4]).unwrap();
            f32s(&m.forward(&[x]).unwrap()[0])[0]
        };
        let run = |m: &TorchModel| (0..10).take_while(|_| m.warm_up_step("w")).count();
        // Counting: steps 0, 1, 2 (the last answers -1), then nothing more.
        let m = TorchModel::load(&base.with_extension("pt.0"), Device::Cpu).unwrap();
        assert_eq!(m.warm_up_state(), Some(WarmUpState::Running));
        assert_eq!(run(&m), 3);
        assert_eq!(calls(&m), 3.0);
        assert_eq!(m.warm_up_state(), Some(WarmUpState::Done));
        assert!(!m.warm_up_step("w"));
        // Loaded again in this process (a swap-in), the same file starts with it done.
        let again = TorchModel::load(&base.with_extension("pt.0"), Device::Cpu).unwrap();
        assert_eq!(again.warm_up_state(), Some(WarmUpState::Done));
        assert!(!again.warm_up_step("w"));
        assert_eq!(calls(&again), 0.0);
        // A step that answers itself again ends the warm-up after that one step; a reload
        // tries again (only a finished warm-up is remembered).
        for _ in 0..2 {
            let m = TorchModel::load(&base.with_extension("pt.1"), Device::Cpu).unwrap();
            assert_eq!(run(&m), 1);
            assert_eq!(calls(&m), 1.0);
            assert_eq!(m.warm_up_state(), Some(WarmUpState::Ended));
        }
        // A failing step ends it too; the model still serves.
        let m = TorchModel::load(&base.with_extension("pt.2"), Device::Cpu).unwrap();
        assert_eq!(run(&m), 2);
        assert_eq!(calls(&m), 2.0);
        assert_eq!(m.warm_up_state(), Some(WarmUpState::Ended));
        // One that never answers -1 stops after MAX_WARM_UP_STEPS.
        let m = TorchModel::load(&base.with_extension("pt.3"), Device::Cpu).unwrap();
        let steps = (0..2 * MAX_WARM_UP_STEPS)
            .take_while(|_| m.warm_up_step("w"))
            .count() as u64;
        assert_eq!(steps, MAX_WARM_UP_STEPS);
        assert_eq!(calls(&m), MAX_WARM_UP_STEPS as f32);
        assert_eq!(m.warm_up_state(), Some(WarmUpState::Ended));
        // Switched off (`--model-warm-ups off`), nothing runs.
        let mut m = TorchModel::load(&base.with_extension("pt.3"), Device::Cpu).unwrap();
        m.disable_warm_up();
        assert_eq!(m.warm_up_state(), None);
        assert!(!m.warm_up_step("w"));
        assert_eq!(calls(&m), 0.0);
        // A model without the method has no warm-up.
        let path = dir.path().join("m.pt");
        optimize_fixture(&path);
        let m = TorchModel::load(&path, Device::Cpu).unwrap();
        assert_eq!(m.warm_up_state(), None);
        assert!(!m.warm_up_step("m"));
    }

    fn f32s(t: &HostTensor) -> Vec<f32> {
        t.data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    /// `tessera.optimize` (freeze; freeze + optimize_for_inference) keeps what the model
    /// computes, within float rounding of the folded batch norm, and keeps its other methods:
    /// the loop still runs.
    #[test]
    fn optimized_models_compute_what_they_did() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        optimize_fixture(&path);
        let data: Vec<u8> = (0..2 * 3 * 16 * 16)
            .flat_map(|i| ((i % 29) as f32 / 9.0 - 1.5).to_le_bytes())
            .collect();
        let x = HostTensor::new("x".into(), DType::F32, vec![2, 3, 16, 16], data).unwrap();
        let out = |m: &TorchModel| f32s(&m.forward(std::slice::from_ref(&x)).unwrap()[0]);
        let want = out(&TorchModel::load(&path, Device::Cpu).unwrap());
        let want_loop = out(&TorchModel::load(&path, Device::Cpu)
            .unwrap()
            .with_loop()
            .unwrap());
        assert_eq!(want.len(), 8);
        let close = |got: &[f32], want: &[f32], what: &str| {
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{what}: {got:?} vs {want:?}"
                );
            }
        };
        for how in [Optimize::Freeze, Optimize::Inference] {
            let model = TorchModel::load(&path, Device::Cpu).unwrap();
            let before = model.held_bytes;
            let params =
                |m: &TorchModel| m.module.as_ref().unwrap().named_parameters().unwrap().len();
            assert!(params(&model) > 0);
            let model = model.optimized(how).unwrap();
            assert!(model.held_bytes >= before && before > 0);
            assert_eq!(
                params(&model),
                0,
                "{how:?}: parameters are constants once frozen"
            );
            for _ in 0..3 {
                // The profiling executor's first calls and its optimised one.
                close(&out(&model), &want, "forward");
            }
            let looped = TorchModel::load(&path, Device::Cpu)
                .unwrap()
                .optimized(how)
                .unwrap()
                .with_loop()
                .unwrap();
            close(&out(&looped), &want_loop, "loop");
            // Saved and loaded again (what later loads of the archive do), a frozen module
            // computes the same and keeps its methods.
            if how == Optimize::Freeze {
                let saved = dir.path().join("frozen.pt");
                model.save_atomically(&saved).unwrap();
                let names: Vec<_> = std::fs::read_dir(dir.path())
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .collect();
                assert!(
                    !names.iter().any(|n| n.to_string_lossy().contains(".tmp-")),
                    "{names:?}"
                );
                let again = TorchModel::load(&saved, Device::Cpu).unwrap();
                assert_eq!(params(&again), 0);
                close(&out(&again), &want, "saved");
                let looped = TorchModel::load(&saved, Device::Cpu)
                    .unwrap()
                    .with_loop()
                    .unwrap();
                close(&out(&looped), &want_loop, "saved loop");
            }
        }
    }

    /// On the CPU, `cudaGraphs` changes nothing.
    #[test]
    fn cuda_graphs_are_ignored_on_the_cpu() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.pt");
        traced(&path, |x| x * 2.0);
        let model = TorchModel::load(&path, Device::Cpu)
            .unwrap()
            .with_cuda_graphs("m", 2);
        let out = model.forward(&[input(2, 3)]).unwrap();
        assert_eq!(out[0].shape, vec![2, 1024]);
        assert_eq!(model.pending_captures(), 0);
        assert!(!model.capture_pending());
        assert!(matches!(
            TorchModel::load(&path, Device::Cpu).unwrap().with_loop(),
            Err(RuntimeError::Load(m)) if m.contains("no 'prepare'")
        ));
    }

    /// Runs only where CUDA is present (the GPU machine); elsewhere it says so and passes.
    #[test]
    fn cuda_load_is_measured_and_freed() {
        let Some(_gpu) = gpu_test() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lin.pt");
        // A traced module holding 4 MiB of weights (a graph constant).
        let w = Tensor::ones([1024, 1024], (Kind::Float, Device::Cpu));
        traced(&path, |x| x.matmul(&w));
        // cuBLAS's workspace (allocated at the process's first matmul and kept) is not the model's.
        let one = Tensor::ones([8, 8], (Kind::Float, Device::Cuda(0)));
        let _ = one.matmul(&one).sum(Kind::Float).double_value(&[]);
        let before = cuda_memory(0).map(|m| m.0).unwrap_or(0);
        let model = TorchModel::load(&path, Device::Cuda(0)).unwrap();
        assert!(model.held_bytes >= 4 << 20, "held {}", model.held_bytes);
        let x = HostTensor::new("x".into(), DType::F32, vec![1, 1024], vec![0; 4096]).unwrap();
        assert_eq!(model.forward(&[x]).unwrap()[0].shape, vec![1, 1024]);
        drop(model);
        let after = cuda_memory(0).map(|m| m.0).unwrap_or(u64::MAX);
        assert!(
            after <= before + (1 << 20),
            "allocated {before} -> {after} after drop"
        );
    }

    /// A traced model holding weights (graph constants, two of them views of one storage):
    /// `relu(x @ w + b)` summed per row, plus the first half of `w`'s rows summed.
    fn weighted(path: &Path) {
        let w = Tensor::randn([1024, 1024], (Kind::Float, Device::Cpu)) / 32.0;
        let half = w.narrow(0, 0, 512);
        let b = Tensor::randn([1024], (Kind::Float, Device::Cpu));
        let module = tch::CModule::create_by_tracing(
            "W",
            "forward",
            &[Tensor::zeros([2, 1024], (Kind::Float, Device::Cpu))],
            &mut |xs| {
                let y = (xs[0].matmul(&w) + &b).relu();
                vec![y.sum_dim_intlist(1, false, Kind::Float) + half.sum(Kind::Float)]
            },
        )
        .unwrap();
        module.save(path).unwrap();
    }

    /// Page-locking is process-wide to fail or not: tests that set it take turns.
    static PINNING: Mutex<()> = Mutex::new(());

    /// The host tier's move, on the CPU (CI): the weights go to a host block and come back with
    /// the same answers; calls are refused meanwhile; views of one storage share one copy; a
    /// page-locking failure (injected) leaves the block pageable and the move goes on.
    #[test]
    fn weights_move_to_host_memory_and_back_in_place() {
        let _turn = PINNING.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.pt");
        weighted(&path);
        let pipeline = Pipeline::new(None, TorchModel::load(&path, Device::Cpu).unwrap());
        let want = pipeline.entry.forward(&[input(2, 3)]).unwrap();
        // w (4 MiB, its half a view of it) and b, each storage once, page-aligned.
        let needed = pipeline.host_bytes_needed().unwrap();
        assert!(
            (4 << 20) + 4096 <= needed && needed <= (4 << 20) + 3 * 4096,
            "{needed}"
        );
        assert_eq!(pipeline.host_bytes(), 0, "nothing allocated before a move");
        tier::fail_pinning(true);
        let moved = pipeline.to_host(true);
        tier::fail_pinning(false);
        let moved = moved.unwrap();
        assert!(!moved.pinned);
        assert!(
            moved.pin_error.as_deref().unwrap().contains("injected"),
            "{moved:?}"
        );
        assert!(pipeline.on_host());
        assert_eq!(pipeline.host_bytes(), needed);
        assert!(pipeline.serving().is_err());
        assert!(pipeline.try_serving().is_none());
        assert!(pipeline.to_host(false).is_err(), "already there");
        pipeline.to_device().unwrap();
        assert!(!pipeline.on_host());
        assert!(pipeline.serving().is_ok());
        assert_eq!(pipeline.entry.forward(&[input(2, 3)]).unwrap(), want);
        // The host copy is kept for the next move (nothing written since: nothing copied),
        // and freed on request.
        assert_eq!(pipeline.host_bytes(), needed);
        assert_eq!(pipeline.to_host(false).unwrap().copied, 0);
        pipeline.to_device().unwrap();
        assert_eq!(pipeline.entry.forward(&[input(2, 3)]).unwrap(), want);
        assert_eq!(pipeline.release_host_copy(), needed);
        assert_eq!(pipeline.host_bytes(), 0);
    }

    /// The host tier's move on a GPU (GPU machine only): the device memory of the weights and
    /// of the CUDA graphs is freed, the host block page-locked; back on the device the answers
    /// are the same and the graphs are captured again before any call brings them.
    #[test]
    fn gpu_weights_move_to_page_locked_memory_and_back() {
        let Some(_gpu) = gpu_test() else {
            return;
        };
        let _turn = PINNING.lock().unwrap_or_else(|e| e.into_inner());
        set_thread_executor(Executor::Simple);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.pt");
        weighted(&path);
        let pipeline = Pipeline::new(
            None,
            TorchModel::load(&path, Device::Cuda(0))
                .unwrap()
                .with_cuda_graphs("w", 2),
        );
        let want = pipeline.entry.forward(&[input(2, 3)]).unwrap();
        capture_all(&pipeline.entry);
        assert!(pipeline.entry.device_bytes() > pipeline.entry.held_bytes);
        assert_eq!(pipeline.entry.forward(&[input(2, 3)]).unwrap(), want);
        let before = cuda_memory(0).unwrap().0;
        let moved = pipeline.to_host(true).unwrap();
        assert!(moved.pinned, "{moved:?}");
        assert!(moved.pin_error.is_none());
        let after = cuda_memory(0).unwrap().0;
        assert!(
            before >= after + (4 << 20),
            "allocated {before} -> {after}: the weights stayed on the device"
        );
        assert_eq!(pipeline.entry.device_bytes(), pipeline.entry.held_bytes);
        assert_eq!(pipeline.entry.pending_captures(), 0);
        pipeline.to_device().unwrap();
        assert_eq!(
            pipeline.entry.pending_captures(),
            1,
            "its graph waits again"
        );
        capture_all(&pipeline.entry);
        assert_eq!(pipeline.entry.forward(&[input(2, 3)]).unwrap(), want);
        assert_eq!(pipeline.entry.pending_captures(), 0, "a replay");
        // Injected: page-locking fails, the block stays pageable, the move still works.
        pipeline.release_host_copy();
        tier::fail_pinning(true);
        let moved = pipeline.to_host(true);
        tier::fail_pinning(false);
        let moved = moved.unwrap();
        assert!(!moved.pinned && moved.pin_error.is_some(), "{moved:?}");
        pipeline.to_device().unwrap();
        capture_all(&pipeline.entry);
        assert_eq!(pipeline.entry.forward(&[input(2, 3)]).unwrap(), want);
    }

    /// Legacy executors are made at load for the model that asks (every function of it), the
    /// process-wide flag is put back (a model loaded next gets libtorch's default, the
    /// profiling executor), and the answers are the same.
    #[test]
    fn the_legacy_executor_is_made_at_load_for_its_model_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.pt");
        weighted(&path);
        let legacy_count = |m: &TorchModel| {
            // SAFETY: a live module; the shim catches C++ exceptions.
            unsafe { cuda::tessera_module_legacy_executors(module_ptr(m.module().unwrap())) }
        };
        let legacy = TorchModel::load(&path, Device::Cpu).unwrap();
        let made = legacy.use_legacy_executor().unwrap();
        assert!(made >= 1, "{made}");
        // SAFETY: reads an atomic flag.
        assert_eq!(
            unsafe { cuda::tessera_jit_executor_mode() },
            1,
            "the flag is put back"
        );
        let profiling = TorchModel::load(&path, Device::Cpu).unwrap();
        set_thread_executor(Executor::Legacy);
        for _ in 0..3 {
            assert_eq!(
                legacy.forward(&[input(2, 3)]).unwrap(),
                profiling.forward(&[input(2, 3)]).unwrap()
            );
        }
        set_thread_executor(Executor::Profiling);
        assert_eq!(legacy_count(&legacy), made as i64);
        assert_eq!(legacy_count(&profiling), 0);
    }

    /// A scripted model holding two records larger than the fast loader's read and staging
    /// pieces, a view of another buffer (one storage), tensors in a list attribute and in a
    /// scripted class's instance, and a small Linear: `forward` uses them all, and operators
    /// whose meaning depends on the file's format version.
    const LOAD_FIXTURE: &str = r#"
import sys
from typing import List
import torch


@torch.jit.script
class Holder:
    def __init__(self, t: torch.Tensor):
        self.t = t


class Loaded(torch.nn.Module):
    holder: Holder
    items: List[torch.Tensor]

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.big1 = torch.nn.Parameter(torch.randn(3000, 2100, generator=g))
        self.register_buffer("big2", torch.randn(2500, 2600, generator=g))
        self.register_buffer("whole", torch.randn(1000, generator=g))
        self.part = self.whole[:500]
        self.items = [torch.randn(7, generator=g), torch.arange(5)]
        self.holder = Holder(torch.randn(3, generator=g))
        self.small = torch.nn.Linear(4, 4)

    def forward(self, x):
        return (x * self.big1[-1, :4].sum() + self.big2[-1].mean() + self.part.sum() + self.items[0].sum()
                + self.items[1].sum() + self.holder.t.sum() + self.small(x)
                + torch.tensor([1.0, 2.0, 3.0, 4.0], device=x.device)
                # Operators whose meaning changed across file format versions: a copy read as
                # an old file would divide integers flooring and refuse gelu's `approximate`.
                + torch.arange(4, device=x.device) / 4 + torch.full([4], 1, device=x.device)
                + torch.nn.functional.gelu(x, approximate="tanh"))


torch.jit.script(Loaded()).save(sys.argv[1])
"#;

    /// `path` loaded onto `device` each way (the unified path twice: the first load writes the
    /// copy, the second reads it): the answers to one input, and the storages its tensors hold
    /// on the device and on the CPU.
    fn load_each_way(path: &Path, device: Device) -> Vec<(String, Tensor, u64, u64)> {
        let x = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25, 1.0, 3.0, -2.0, 0.0])
            .reshape([2, 4])
            .to_device(device);
        let copy = tier::unified_copy_path(path).unwrap();
        let _ = std::fs::remove_file(&copy);
        let ways: [(&str, Box<dyn Fn() -> CModule>); 4] = [
            (
                "torch",
                Box::new(|| tier::load_module(path, device, tier::LoadPath::Torch).unwrap()),
            ),
            (
                "parallel",
                Box::new(|| tier::load_module(path, device, tier::LoadPath::Parallel).unwrap()),
            ),
            (
                "unified, copy written",
                Box::new(|| {
                    let (m, used) =
                        tier::load_via_unified_copy(path, device, 0, tier::WriteCopy::Now).unwrap();
                    assert!(!used && copy.is_file());
                    m
                }),
            ),
            (
                "unified, from the copy",
                Box::new(|| {
                    let (m, used) =
                        tier::load_via_unified_copy(path, device, 0, tier::WriteCopy::Now).unwrap();
                    assert!(used);
                    m
                }),
            ),
        ];
        ways.into_iter()
            .map(|(how, load)| {
                let module = load();
                let y = tch::no_grad(|| module.forward_ts(&[&x]))
                    .unwrap()
                    .to_device(Device::Cpu);
                let on = |d| tier::HostCopy::collect(&[&module], d).unwrap().storages();
                let (here, cpu) = (
                    on(device),
                    if device == Device::Cpu {
                        0
                    } else {
                        on(Device::Cpu)
                    },
                );
                (how.to_string(), y, here, cpu)
            })
            .collect()
    }

    /// The parallel reader and the unified copy give the model libtorch's own load gives: the
    /// same answers, the same storages (a view still shares its buffer's).
    #[test]
    fn the_fast_loader_loads_what_libtorch_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.pt");
        python_fixture(LOAD_FIXTURE, &path);
        let loads = load_each_way(&path, Device::Cpu);
        let (_, want, storages, _) = &loads[0];
        // big1, big2, whole (part shares it), two list items, the holder's, Linear's two.
        assert_eq!(*storages, 8);
        for (how, y, n, _) in &loads[1..] {
            assert!(y.equal(want), "{how:?}: {y} != {want}");
            assert_eq!(n, storages, "{how:?}");
        }
        // A file that is not TorchScript fails each way with libtorch's error.
        std::fs::write(&path, b"not a zip").unwrap();
        assert!(tier::load_module(&path, Device::Cpu, tier::LoadPath::Parallel).is_err());
    }

    /// A unified copy is used only for the version of the file it was made from (a stale one is
    /// written again and used by the next load), and one that does not load is not trusted: the
    /// file itself is loaded, and no copy is made again for that version of the file.
    #[test]
    fn a_stale_or_broken_unified_copy_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.pt");
        python_fixture(LOAD_FIXTURE, &path);
        let copy = tier::unified_copy_path(&path).unwrap();
        assert_eq!(
            copy,
            dir.path()
                .join(crate::archive::OPTIMIZED_DIR)
                .join("l.pt.unified")
        );
        let load = || {
            tier::load_via_unified_copy(&path, Device::Cpu, 0, tier::WriteCopy::Now)
                .unwrap()
                .1
        };
        let x = Tensor::ones([2, 4], (tch::Kind::Float, Device::Cpu));
        let answer = || {
            let (m, _) =
                tier::load_via_unified_copy(&path, Device::Cpu, 0, tier::WriteCopy::Now).unwrap();
            tch::no_grad(|| m.forward_ts(&[&x])).unwrap()
        };
        assert!(!load(), "no copy yet");
        assert!(load(), "the copy written by the first load");
        let want = answer();
        // The source replaced (same bytes, a new file): the copy is stale.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        assert!(!load(), "a stale copy is not used");
        assert!(load(), "and is written again");
        // A damaged copy (truncated): loaded from the file, and no copy made again for this
        // version of the file (a copy that failed once would fail again); a new version gets one.
        let len = std::fs::metadata(&copy).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&copy)
            .unwrap()
            .set_len(len / 2)
            .unwrap();
        assert!(!load(), "a broken copy is not used");
        assert!(
            !load() && !copy.exists(),
            "nor written again for this version"
        );
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        assert!(!load());
        assert!(load());
        assert!(answer().equal(&want));
        // Below the size floor nothing is written.
        std::fs::remove_file(&copy).unwrap();
        let (_, used) =
            tier::load_via_unified_copy(&path, Device::Cpu, u64::MAX, tier::WriteCopy::Now)
                .unwrap();
        assert!(!used && !copy.exists());
        // Only the server's own folder is written: no temporary file is left beside the copy.
        let left: Vec<_> = std::fs::read_dir(copy.parent().unwrap()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A server's load does not wait for the copy: the background writer makes it from its own
    /// load of the file, and the next load uses it.
    #[test]
    fn a_missing_unified_copy_is_written_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.pt");
        python_fixture(LOAD_FIXTURE, &path);
        let copy = tier::unified_copy_path(&path).unwrap();
        let (_, used) =
            tier::load_via_unified_copy(&path, Device::Cpu, 0, tier::WriteCopy::Later).unwrap();
        assert!(!used);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        while !copy.is_file() {
            assert!(std::time::Instant::now() < deadline, "no copy written");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let (_, used) =
            tier::load_via_unified_copy(&path, Device::Cpu, 0, tier::WriteCopy::Later).unwrap();
        assert!(used);
    }

    /// On a GPU (GPU machine only): the parallel reader's and the unified copy's loads leave no
    /// tensor on the CPU, keep shared storages shared, and answer as libtorch's own load does.
    #[test]
    fn gpu_the_parallel_reader_loads_every_tensor_onto_the_device() {
        let Some(_gpu) = gpu_test() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.pt");
        python_fixture(LOAD_FIXTURE, &path);
        let loads = load_each_way(&path, Device::Cuda(0));
        let (_, want, storages, cpu) = &loads[0];
        assert_eq!((*storages, *cpu), (8, 0));
        for (how, y, n, cpu) in &loads[1..] {
            assert!(y.equal(want), "{how:?}: {y} != {want}");
            assert_eq!((n, cpu), (storages, &0), "{how:?}");
        }
    }

    /// A model that writes its own buffer in place (counting its calls) beside a weight.
    const COUNTING_FIXTURE: &str = r#"
import sys
import torch

class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(256, 1024))
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x):
        self.calls.add_(1)
        return (x[:, :256] * self.w[0, :256]).sum(1) * 0 + self.calls

torch.jit.script(Counting().eval()).save(sys.argv[1])
"#;

    /// A kept or staged host copy is only trusted for what was not written since: a buffer the
    /// forward writes in place (in inference mode, as forward threads run) is copied again at
    /// the next move, the untouched weight is not, and the count carries across moves.
    #[test]
    fn a_move_copies_again_only_what_the_model_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.pt");
        python_fixture(COUNTING_FIXTURE, &path);
        let pipeline = Arc::new(Pipeline::new(
            None,
            TorchModel::load(&path, Device::Cpu).unwrap(),
        ));
        let call = |p: &Arc<Pipeline>| {
            let p = p.clone();
            std::thread::spawn(move || {
                // SAFETY: puts this new thread in inference mode for its life.
                assert_eq!(unsafe { cuda::tessera_enter_inference_mode() }, 0);
                f32s(&p.entry.forward(&[input(1, 3)]).unwrap()[0])[0]
            })
            .join()
            .unwrap()
        };
        assert_eq!(call(&pipeline), 1.0);
        // A host copy made while the model serves (as after a load)...
        pipeline.stage_host_copy(false).unwrap();
        assert_eq!(pipeline.host_bytes(), (1 << 20) + 4096);
        assert_eq!(call(&pipeline), 2.0);
        // ...leaves the move only what was written since: the counter.
        let first = pipeline.to_host(false).unwrap();
        assert_eq!(first.copied, 4, "the counter only");
        assert!(
            pipeline.stage_host_copy(false).is_err(),
            "not while in host memory"
        );
        pipeline.to_device().unwrap();
        assert_eq!(
            call(&pipeline),
            3.0,
            "the count came back from the host copy"
        );
        assert_eq!(pipeline.to_host(false).unwrap().copied, 4);
        pipeline.to_device().unwrap();
        // No call in between: nothing written, nothing copied.
        assert_eq!(pipeline.to_host(false).unwrap().copied, 0);
        pipeline.to_device().unwrap();
        assert_eq!(call(&pipeline), 4.0);
    }

    /// A model whose CUDA graph writes its own buffer (GPU machine only): replays change it
    /// without a version bump, so once such a graph is captured every move copies everything
    /// (no host copy is trusted as unchanged), and the count still carries across moves.
    #[test]
    fn gpu_a_graph_that_writes_the_model_makes_every_move_copy_all() {
        let Some(_gpu) = gpu_test() else {
            return;
        };
        set_thread_executor(Executor::Simple);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.pt");
        python_fixture(COUNTING_FIXTURE, &path);
        let pipeline = Pipeline::new(
            None,
            TorchModel::load(&path, Device::Cuda(0))
                .unwrap()
                .with_cuda_graphs("c", 2),
        );
        let call = || f32s(&pipeline.entry.forward(&[input(1, 3)]).unwrap()[0])[0];
        assert_eq!(call(), 1.0);
        while pipeline.pending_captures() > 0 {
            if !pipeline.capture_pending() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let all = (1 << 20) + 4;
        pipeline.stage_host_copy(false).unwrap();
        let before = call();
        assert_eq!(call(), before + 1.0, "a replay counts");
        assert_eq!(pipeline.to_host(false).unwrap().copied, all);
        pipeline.to_device().unwrap();
        while pipeline.pending_captures() > 0 {
            if !pipeline.capture_pending() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let now = call();
        assert!(now > before + 1.0, "the count came back: {now}");
        assert_eq!(pipeline.to_host(false).unwrap().copied, all);
    }
}
