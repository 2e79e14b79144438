//! CUDA-graph replay of a model's static-shape calls (`tessera.cudaGraphs`).
//!
//! A graph is captured per method and input signature (names of the method, then every input's
//! dtype and shape), off the request path: a call whose signature has no graph runs as usual and
//! leaves the signature (with copies of its inputs) to be captured by the model's forward thread
//! once its queue is empty ([`Graphs::capture_pending`]). Later calls with that signature copy
//! their inputs into the graph's static buffers and replay it: one launch for the whole call,
//! no TorchScript interpreter and no per-op dispatch. A signature that cannot be captured (an op
//! that synchronises with the host, say) is logged once and always runs uncaptured. A graph's
//! memory (private pool and static inputs) counts in the model's residency weight and is freed
//! with the model.
//!
//! What was captured is remembered per model file (signatures only: method, call form, input
//! dtypes and shapes; no values), so that a reload of the same file in this process (a
//! swap-in) captures those signatures again right after loading, on zero-filled inputs,
//! instead of waiting for requests to bring them ([`Graphs::recalled`]).
use super::{device_name, module_ptr, FileKey, RuntimeError};
use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use tch::{CModule, Device, Kind, Tensor};

mod ffi {
    use std::ffi::{c_char, c_void};
    extern "C" {
        pub fn tessera_graph_capture(
            module: *mut c_void,
            method: *const c_char,
            inputs: *mut *mut c_void,
            n_inputs: i32,
            list_from: i32,
            warmup: i32,
            bytes: *mut i64,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn tessera_graph_set_input(g: *mut c_void, k: i32, src: *mut c_void) -> i32;
        pub fn tessera_graph_replay(g: *mut c_void) -> i32;
        pub fn tessera_graph_outputs_to_inputs(g: *mut c_void, offset: i32) -> i32;
        pub fn tessera_graph_check_feedback(
            g: *mut c_void,
            offset: i32,
            err: *mut *mut c_char,
        ) -> i32;
        pub fn tessera_graph_tensor(g: *mut c_void, j: i32, input: i32) -> *mut c_void;
        pub fn tessera_graph_counts(g: *mut c_void, inputs: *mut i32, outputs: *mut i32) -> i32;
        pub fn tessera_graph_output_names(g: *mut c_void) -> *mut c_char;
        pub fn tessera_graph_free(g: *mut c_void);
        pub fn tessera_module_has_method(module: *mut c_void, name: *const c_char) -> i32;
        pub fn tessera_module_shape_constants_to_host(module: *mut c_void) -> i64;
        pub fn tessera_free(p: *mut c_char);
    }
}

/// Uncaptured calls run before a capture: lazy initialisation (cuBLAS workspaces, cuDNN plans)
/// and, under the profiling executor, its profiling runs and optimisation.
const CAPTURE_WARMUP: i32 = 3;

/// Takes a malloc'd C string from the shim.
pub(super) fn take_text(p: *mut c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the shim returns NUL-terminated strings from malloc; freed once, here.
    unsafe {
        let s = CStr::from_ptr(p).to_string_lossy().into_owned();
        ffi::tessera_free(p);
        s
    }
}

/// What a failed capture said: its first line and those naming the error (a CUDA error sits in
/// the middle of TorchScript's traceback, ahead of generic advice).
fn error_lines(text: &str) -> String {
    let mut lines: Vec<&str> = text.lines().take(1).collect();
    for line in text.lines().skip(1) {
        if line.to_ascii_lowercase().contains("error") && !lines.contains(&line) && lines.len() < 6
        {
            lines.push(line.trim());
        }
    }
    lines.join(" | ")
}

/// Moves the 0-dim constants of `module`'s shape arithmetic back to the CPU (loading onto a GPU
/// moved them there, and reading a size back from the GPU synchronises with the host, which a
/// CUDA graph cannot capture). Before the module's first run; returns how many moved.
pub fn shape_constants_to_host(module: &CModule) -> Option<u64> {
    // SAFETY: a live module pointer; the shim catches C++ exceptions.
    let n = unsafe { ffi::tessera_module_shape_constants_to_host(module_ptr(module)) };
    (n >= 0).then_some(n as u64)
}

/// Whether `module` has a method called `name`.
pub fn has_method(module: &CModule, name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: a live module pointer and a NUL-terminated name; the shim catches exceptions.
    unsafe { ffi::tessera_module_has_method(module_ptr(module), c.as_ptr()) == 1 }
}

/// How a method takes its tensors: all positional, or the first `n` positional and the rest as
/// one `List[Tensor]` (a loop's state, which the method returns updated: its graph feeds its
/// outputs back into those inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallForm {
    Positional,
    ListFrom(usize),
}

/// One captured call: static inputs and outputs on the device, replayed in place.
pub struct CudaGraph {
    ptr: NonNull<c_void>,
    inputs: usize,
    outputs: Vec<String>,
    bytes: u64,
}

// SAFETY: the graph is only used under its `Mutex`; libtorch's CUDAGraph may be replayed from
// any thread.
unsafe impl Send for CudaGraph {}

impl CudaGraph {
    /// Captures `method` on copies of `inputs` (CUDA tensors of one device); a loop step's graph
    /// only if its outputs can be fed back ([`Self::check_feedback`]). One capture at a time:
    /// callers hold [`CAPTURING`] (the memory measured for one must not include another's).
    fn capture(
        module: &CModule,
        method: &str,
        inputs: &[Tensor],
        form: CallForm,
    ) -> Result<CudaGraph, String> {
        let name = CString::new(method).map_err(|e| e.to_string())?;
        let mut ptrs: Vec<*mut c_void> = inputs.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let list_from = match form {
            CallForm::Positional => -1,
            CallForm::ListFrom(n) => n as i32,
        };
        let (mut bytes, mut err) = (0i64, std::ptr::null_mut());
        // SAFETY: the module and tensor pointers are live for the call (the shim copies the
        // tensors); the error string is taken below.
        let raw = unsafe {
            ffi::tessera_graph_capture(
                module_ptr(module),
                name.as_ptr(),
                ptrs.as_mut_ptr(),
                ptrs.len() as i32,
                list_from,
                CAPTURE_WARMUP,
                &mut bytes,
                &mut err,
            )
        };
        let Some(ptr) = NonNull::new(raw) else {
            return Err(error_lines(&take_text(err)));
        };
        let (mut n_in, mut n_out) = (0i32, 0i32);
        // SAFETY: a graph the shim just returned.
        let names = unsafe {
            ffi::tessera_graph_counts(ptr.as_ptr(), &mut n_in, &mut n_out);
            take_text(ffi::tessera_graph_output_names(ptr.as_ptr()))
        };
        let graph = CudaGraph {
            ptr,
            inputs: n_in.max(0) as usize,
            outputs: names.lines().map(str::to_string).collect(),
            bytes: bytes.max(0) as u64,
        };
        if let CallForm::ListFrom(offset) = form {
            graph.check_feedback(offset)?;
        }
        Ok(graph)
    }

    /// Copies `t` into static input `k` (shape and dtype must match).
    pub fn set_input(&mut self, k: usize, t: &Tensor) -> Result<(), String> {
        // SAFETY: a live graph and tensor; the shim checks the index, shape and dtype.
        match unsafe {
            ffi::tessera_graph_set_input(self.ptr.as_ptr(), k as i32, t.as_ptr() as *mut c_void)
        } {
            0 => Ok(()),
            -2 => Err(format!("graph input {k} does not match the captured shape")),
            _ => Err(format!("copying graph input {k} failed")),
        }
    }

    pub fn replay(&mut self) -> Result<(), String> {
        // SAFETY: a live graph.
        match unsafe { ffi::tessera_graph_replay(self.ptr.as_ptr()) } {
            0 => Ok(()),
            _ => Err("graph replay failed".into()),
        }
    }

    /// Copies each output `j` into input `j + offset` (a loop step feeding the next).
    pub fn outputs_to_inputs(&mut self, offset: usize) -> Result<(), String> {
        // SAFETY: a live graph; the shim checks counts, shapes and dtypes.
        match unsafe { ffi::tessera_graph_outputs_to_inputs(self.ptr.as_ptr(), offset as i32) } {
            0 => Ok(()),
            _ => Err("a loop step's outputs do not match its inputs".into()),
        }
    }

    /// Whether outputs can be copied back into inputs `offset..` (see [`Self::outputs_to_inputs`]):
    /// one per input, each of its shape and dtype, none sharing memory with another input.
    fn check_feedback(&self, offset: usize) -> Result<(), String> {
        let mut err = std::ptr::null_mut();
        // SAFETY: a live graph; the error string is taken below.
        match unsafe {
            ffi::tessera_graph_check_feedback(self.ptr.as_ptr(), offset as i32, &mut err)
        } {
            0 => Ok(()),
            _ => Err(take_text(err)),
        }
    }

    /// A reference to static output `j` (valid until the next replay overwrites it).
    pub fn output(&self, j: usize) -> Result<Tensor, String> {
        self.tensor(j, false)
    }

    /// A reference to static input `j`.
    pub fn input(&self, j: usize) -> Result<Tensor, String> {
        self.tensor(j, true)
    }

    fn tensor(&self, j: usize, input: bool) -> Result<Tensor, String> {
        // SAFETY: a live graph; the shim returns a new at::Tensor handle (tch's C_tensor),
        // which the returned Tensor owns, or null when `j` is out of range.
        let p = unsafe { ffi::tessera_graph_tensor(self.ptr.as_ptr(), j as i32, input as i32) };
        if p.is_null() {
            return Err(format!("graph has no tensor {j}"));
        }
        // SAFETY: see above.
        Ok(unsafe { Tensor::from_ptr(p as *mut torch_sys::C_tensor) })
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: frees the graph once; no references to its tensors remain outside the model.
        unsafe { ffi::tessera_graph_free(self.ptr.as_ptr()) }
    }
}

/// The signature a graph is captured for.
fn signature(method: &str, inputs: &[Tensor]) -> String {
    let mut s = method.to_string();
    for t in inputs {
        let dims: Vec<String> = t.size().iter().map(i64::to_string).collect();
        s.push_str(&format!("|{:?}[{}]", t.kind(), dims.join("x")));
    }
    s
}

/// A signature waiting for its capture, with inputs to capture it on.
struct Pending {
    signature: String,
    method: String,
    inputs: Vec<Tensor>,
    form: CallForm,
    /// Recalled from an earlier load of the file (its inputs are zeros).
    recalled: bool,
}

/// A captured call as remembered for later loads of its file: no values, only what the
/// capture's inputs must look like.
#[derive(Clone, Debug, PartialEq)]
struct Remembered {
    signature: String,
    method: String,
    inputs: Vec<(Kind, Vec<i64>)>,
    form: CallForm,
}

impl Remembered {
    fn of(p: &Pending) -> Remembered {
        Remembered {
            signature: p.signature.clone(),
            method: p.method.clone(),
            inputs: p.inputs.iter().map(|t| (t.kind(), t.size())).collect(),
            form: p.form,
        }
    }

    /// Zero-filled inputs to capture it on.
    fn pending(&self, device: Device) -> Result<Pending, tch::TchError> {
        let inputs = self
            .inputs
            .iter()
            .map(|(kind, dims)| Tensor::f_zeros(dims.as_slice(), (*kind, device)))
            .collect::<Result<_, _>>()?;
        Ok(Pending {
            signature: self.signature.clone(),
            method: self.method.clone(),
            inputs,
            form: self.form,
            recalled: true,
        })
    }
}

/// Most model files whose captures the process remembers (a few hundred bytes each); a new
/// file past it pushes out an older one.
const MAX_REMEMBERED_FILES: usize = 1024;

/// Captured signatures per model file, in capture order; `None` for a file none of whose
/// captures is recalled any more (one recalled failed to capture again).
fn remembered() -> MutexGuard<'static, HashMap<FileKey, Option<Vec<Remembered>>>> {
    static REMEMBERED: OnceLock<Mutex<HashMap<FileKey, Option<Vec<Remembered>>>>> = OnceLock::new();
    REMEMBERED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// What to capture again at a reload of `file`.
fn recall(file: &FileKey) -> Vec<Remembered> {
    remembered()
        .get(file)
        .cloned()
        .flatten()
        .unwrap_or_default()
}

/// Notes that `r` was captured for `file` (at most `max` signatures per file).
fn remember(file: &FileKey, r: Remembered, max: usize) {
    let mut all = remembered();
    if !all.contains_key(file) && all.len() >= MAX_REMEMBERED_FILES {
        let older = all.keys().next().cloned();
        if let Some(older) = older {
            all.remove(&older);
        }
    }
    if let Some(list) = all.entry(file.clone()).or_insert_with(|| Some(Vec::new())) {
        if list.len() < max && !list.iter().any(|k| k.signature == r.signature) {
            list.push(r);
        }
    }
}

/// Stops recalling `file`'s captures in this process: one of them failed to capture again
/// (out of memory at a swap-in, say). Its later loads capture what requests bring, as a first
/// load does.
fn forget(file: &FileKey) {
    remembered().insert(file.clone(), None);
}

#[derive(Default)]
struct Inner {
    ready: HashMap<String, Arc<Mutex<CudaGraph>>>,
    pending: Vec<Pending>,
    /// Being captured now (taken off `pending`).
    capturing: Option<String>,
    failed: HashSet<String>,
    full_logged: bool,
    /// A recalled signature failed to capture.
    recall_failed: bool,
    /// What each ready graph was captured for (to capture it again after [`Graphs::park`]).
    memos: Vec<Remembered>,
    /// Signatures of the graphs dropped while the model's weights are in host memory.
    parked: Vec<Remembered>,
}

impl Inner {
    /// Signatures that count toward the model's most graphs: captured, waiting, being captured,
    /// and failed (so that new shapes cannot bring failing captures without end).
    fn counted(&self) -> usize {
        self.ready.len()
            + self.pending.len()
            + self.capturing.is_some() as usize
            + self.failed.len()
    }

    fn known(&self, sig: &str) -> bool {
        self.failed.contains(sig)
            || self.capturing.as_deref() == Some(sig)
            || self.pending.iter().any(|p| p.signature == sig)
    }
}

/// One capture at a time in the process: a model whose forward thread finds another capture
/// under way leaves its own for later instead of waiting (and blocking its queue).
static CAPTURING: Mutex<()> = Mutex::new(());

/// A model's graphs, at most `max` of them.
pub struct Graphs {
    model: String,
    device: Device,
    max: usize,
    bytes: AtomicU64,
    inner: Mutex<Inner>,
    /// The model's file, whose captures are remembered for its reloads.
    file: Option<FileKey>,
    /// Signatures recalled from an earlier load at this one.
    recalled: usize,
}

// SAFETY: pending inputs are device tensors only read (copied) by the capture, under the lock.
unsafe impl Send for Graphs {}
unsafe impl Sync for Graphs {}

impl Graphs {
    /// The graphs of a model loaded from `file`: the signatures captured at its earlier loads
    /// in this process start pending (zero-filled inputs).
    pub fn new(model: &str, device: Device, max: usize, file: Option<FileKey>) -> Graphs {
        let max = max.max(1);
        let mut inner = Inner::default();
        let earlier = file.as_ref().map(recall).unwrap_or_default();
        for r in earlier.iter().take(max) {
            match r.pending(device) {
                Ok(p) => inner.pending.push(p),
                Err(e) => {
                    tracing::warn!(model, signature = %r.signature, error = %e,
                        "could not recall a CUDA graph of an earlier load; it waits for a request")
                }
            }
        }
        let recalled = inner.pending.len();
        if recalled > 0 {
            tracing::info!(
                model,
                recalled,
                "CUDA graphs of an earlier load of this file to capture again"
            );
        }
        Graphs {
            model: model.to_string(),
            device,
            max,
            bytes: AtomicU64::new(0),
            inner: Mutex::new(inner),
            file,
            recalled,
        }
    }

    /// Signatures recalled from an earlier load of the file (captured again before any request
    /// brings them), and whether one of them failed to capture.
    pub fn recalled(&self) -> (usize, bool) {
        let failed = self.inner.lock().map_or(true, |i| i.recall_failed);
        (self.recalled, failed)
    }

    /// Bytes the captured graphs hold on the device.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The graph for `method` on `inputs`, if captured; otherwise notes the signature for a
    /// capture (unless it failed before or the model has its most graphs).
    pub fn lookup(
        &self,
        method: &str,
        inputs: &[Tensor],
        form: CallForm,
    ) -> Option<Arc<Mutex<CudaGraph>>> {
        let sig = signature(method, inputs);
        let mut inner = self.inner.lock().ok()?;
        if let Some(g) = inner.ready.get(&sig) {
            return Some(g.clone());
        }
        if inner.known(&sig) {
            return None;
        }
        if inner.counted() >= self.max {
            if !inner.full_logged {
                inner.full_logged = true;
                tracing::info!(model = %self.model, max = self.max,
                    "model has its most CUDA graphs; new input shapes run uncaptured");
            }
            return None;
        }
        inner.pending.push(Pending {
            signature: sig,
            method: method.to_string(),
            inputs: inputs.iter().map(|t| t.copy()).collect(),
            form,
            recalled: false,
        });
        None
    }

    /// Signatures waiting for a capture or being captured.
    pub fn pending(&self) -> usize {
        self.inner
            .lock()
            .map_or(0, |i| i.pending.len() + i.capturing.is_some() as usize)
    }

    /// Captures one pending signature (on a forward thread, between requests); whether one was.
    /// While another model's capture is under way, none is: the caller tries again later (see
    /// [`Graphs::pending`]).
    pub fn capture_pending(&self, module: &CModule) -> bool {
        let Ok(_one_at_a_time) = CAPTURING.try_lock() else {
            return false;
        };
        let next = match self.inner.lock() {
            Ok(mut inner) if !inner.pending.is_empty() => {
                let next = inner.pending.remove(0);
                inner.capturing = Some(next.signature.clone());
                next
            }
            _ => return false,
        };
        let started = std::time::Instant::now();
        let result = CudaGraph::capture(module, &next.method, &next.inputs, next.form);
        let memo = Remembered::of(&next);
        drop(next.inputs);
        let Ok(mut inner) = self.inner.lock() else {
            return true;
        };
        inner.capturing = None;
        match result {
            Ok(graph) => {
                self.bytes.fetch_add(graph.bytes, Ordering::Relaxed);
                tracing::info!(model = %self.model, device = device_name(self.device),
                    signature = %next.signature, bytes = graph.bytes, recalled = next.recalled,
                    ms = started.elapsed().as_millis() as u64, "captured a CUDA graph");
                if let Some(file) = &self.file {
                    remember(file, memo.clone(), self.max);
                }
                inner.memos.push(memo);
                inner
                    .ready
                    .insert(next.signature, Arc::new(Mutex::new(graph)));
            }
            Err(e) => {
                tracing::warn!(model = %self.model, signature = %next.signature, error = %e,
                    recalled = next.recalled,
                    "this call cannot be captured as a CUDA graph; it runs uncaptured");
                if next.recalled {
                    // Not marked failed: a request bringing the signature queues it again,
                    // with its own values.
                    inner.recall_failed = true;
                    if let Some(file) = &self.file {
                        forget(file);
                    }
                } else {
                    inner.failed.insert(next.signature);
                }
            }
        }
        true
    }
}

impl Graphs {
    /// Drops every captured graph and pending capture (their static buffers and memory pools
    /// point at the model's device memory, which is about to move), remembering their
    /// signatures for [`Graphs::unpark`]. Called with no call of the model running.
    pub fn park(&self) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let mut parked = std::mem::take(&mut inner.memos);
        parked.extend(inner.pending.drain(..).map(|p| Remembered::of(&p)));
        inner.ready.clear();
        inner.parked = parked;
        self.bytes.store(0, Ordering::Relaxed);
    }

    /// Queues the graphs dropped by [`Graphs::park`] for capture again (zero-filled inputs),
    /// once the weights are back on the device; how many.
    pub fn unpark(&self) -> usize {
        let Ok(mut inner) = self.inner.lock() else {
            return 0;
        };
        for r in std::mem::take(&mut inner.parked) {
            match r.pending(self.device) {
                Ok(p) => inner.pending.push(p),
                Err(e) => tracing::warn!(model = %self.model, signature = %r.signature, error = %e,
                    "could not queue a CUDA graph to capture again after a swap-in; it waits for a request"),
            }
        }
        inner.pending.len()
    }
}

/// The graph, for one replay at a time (its static buffers are shared).
pub fn lock(
    graph: &Mutex<CudaGraph>,
) -> Result<std::sync::MutexGuard<'_, CudaGraph>, RuntimeError> {
    graph
        .lock()
        .map_err(|_| replay_error("lock poisoned".into()))
}

/// A replay failure: the graph's inputs were checked at capture, so this is a CUDA fault.
pub fn replay_error(e: String) -> RuntimeError {
    RuntimeError::Forward(format!("CUDA graph: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> FileKey {
        (
            name.into(),
            1,
            std::time::SystemTime::UNIX_EPOCH,
            "cuda:0".into(),
        )
    }

    fn memo(sig: &str) -> Remembered {
        Remembered {
            signature: sig.into(),
            method: "forward".into(),
            inputs: vec![(Kind::Float, vec![2, 3]), (Kind::Int64, vec![])],
            form: CallForm::Positional,
        }
    }

    /// Remembered signatures: once each, at most the model's most graphs, forgotten whole and
    /// for good, and a recalled one has zero-filled inputs of its dtypes and shapes.
    #[test]
    fn captures_are_remembered_per_file_within_bounds() {
        let (a, b) = (key("/remembered/a.pt"), key("/remembered/b.pt"));
        for sig in ["s1", "s1", "s2", "s3"] {
            remember(&a, memo(sig), 2);
        }
        remember(&b, memo("s9"), 2);
        let sigs = |k: &FileKey| -> Vec<String> {
            recall(k).iter().map(|r| r.signature.clone()).collect()
        };
        assert_eq!(sigs(&a), ["s1", "s2"]);
        assert_eq!(sigs(&b), ["s9"]);
        // Once forgotten, a file's later captures are not remembered either.
        forget(&a);
        remember(&a, memo("s4"), 2);
        assert!(sigs(&a).is_empty());
        assert_eq!(sigs(&b), ["s9"]);
        let p = memo("s1").pending(Device::Cpu).unwrap();
        assert!(p.recalled);
        assert_eq!(p.inputs[0].size(), [2, 3]);
        assert_eq!(p.inputs[1].kind(), Kind::Int64);
        assert_eq!(p.inputs[0].abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(Remembered::of(&p), memo("s1"));
    }
}
