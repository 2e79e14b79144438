//! A model's weights moved between its device and host memory in place (see `tier_shim.cpp`):
//! the loaded TorchScript module, its graph executors and what they optimised stay as they are,
//! so moving the weights back is a copy, not a load and a warm-up.
use super::{device_name, graphs::take_text, is_oom, module_ptr, RuntimeError};
use std::ffi::{c_char, c_void};
use std::ptr::NonNull;
use tch::{CModule, Device};

mod ffi {
    use std::ffi::{c_char, c_void};
    extern "C" {
        pub fn tessera_tier_collect(
            modules: *mut *mut c_void,
            n: i32,
            device_type: i32,
            index: i32,
            err: *mut *mut c_char,
        ) -> *mut c_void;
        pub fn tessera_tier_bytes(handle: *mut c_void) -> i64;
        pub fn tessera_tier_pinned(handle: *mut c_void) -> i32;
        pub fn tessera_tier_fail_pinning(fail: i32);
        pub fn tessera_tier_to_host(
            handle: *mut c_void,
            pin: i32,
            force: i32,
            pin_error: *mut *mut c_char,
        ) -> *mut c_char;
        pub fn tessera_tier_to_device(handle: *mut c_void) -> *mut c_char;
        pub fn tessera_tier_stage(
            handle: *mut c_void,
            pin: i32,
            force: i32,
            pin_error: *mut *mut c_char,
        ) -> *mut c_char;
        pub fn tessera_tier_release_block(handle: *mut c_void) -> i32;
        pub fn tessera_tier_copied(handle: *mut c_void) -> i64;
        pub fn tessera_tier_storages(handle: *mut c_void) -> i64;
        pub fn tessera_tier_version_sum(handle: *mut c_void) -> i64;
        pub fn tessera_tier_free(handle: *mut c_void);
        pub fn tessera_tier_share(
            handle: *mut c_void,
            scope: *const c_char,
            joined: *mut i64,
            classes: *mut i64,
        ) -> *mut c_char;
        pub fn tessera_tier_keep_classes_only(handle: *mut c_void);
        pub fn tessera_tier_shared(
            handle: *mut c_void,
            ids: *mut i64,
            sizes: *mut i64,
            cap: i64,
        ) -> i64;
        pub fn tessera_load_module(
            path: *const c_char,
            device_type: i32,
            index: i32,
            err: *mut *mut c_char,
        ) -> *mut c_void;
    }
}

/// How a TorchScript file is loaded onto its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPath {
    /// libtorch's own load (one thread reads; each tensor copied to the device on its own,
    /// synchronously, from pageable memory).
    Torch,
    /// Records read on several threads (libtorch's deserialisation and its per-tensor moves
    /// to the device otherwise unchanged).
    Parallel,
}

impl LoadPath {
    /// `Parallel`, or `Torch` where `TESSERA_LOAD_PATH=torch` (benchmarks compare the two).
    pub fn configured() -> LoadPath {
        match std::env::var("TESSERA_LOAD_PATH").as_deref() {
            Ok("torch") => LoadPath::Torch,
            _ => LoadPath::Parallel,
        }
    }
}

/// Loads the TorchScript file at `path` onto `device` the way `how` says. A failure of the
/// parallel reader other than running out of memory is retried with libtorch's own load (and
/// logged), so a file they cannot handle still loads as it always did.
pub fn load_module(
    path: &std::path::Path,
    device: Device,
    how: LoadPath,
) -> Result<CModule, String> {
    if how == LoadPath::Torch {
        return CModule::load_on_device(path, device).map_err(|e| e.to_string());
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} has a NUL byte in its name", path.display()))?;
    let (kind, index) = match device {
        Device::Cuda(i) => (1, i as i32),
        _ => (0, 0),
    };
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: a NUL-terminated path and an out-pointer; the shim catches C++ exceptions and
    // returns either a new module or an error string (freed by take_text).
    let ptr = unsafe { ffi::tessera_load_module(c_path.as_ptr(), kind, index, &mut err) };
    if ptr.is_null() {
        let text = Some(take_text(err))
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "unknown error".into());
        if is_oom(&text) {
            return Err(text);
        }
        tracing::warn!(file = %path.display(), error = %text, path = ?how,
            "the fast TorchScript load failed; loading with libtorch's own");
        return CModule::load_on_device(path, device).map_err(|e| e.to_string());
    }
    const _: () = assert!(std::mem::size_of::<CModule>() == std::mem::size_of::<*mut c_void>());
    // SAFETY: `CModule` is a struct holding exactly one `torch::jit::Module*` (size checked
    // above; see `module_ptr`), and `ptr` is a module the shim allocated with `new`, as tch's
    // own loader does: the CModule owns and frees it.
    let module = unsafe { std::mem::transmute::<*mut c_void, CModule>(ptr) };
    debug_assert_eq!(module_ptr(&module), ptr);
    Ok(module)
}

/// The tensors of a model's modules that live on its device, grouped by storage, and the host
/// block they move to (allocated at the first move, kept until [`HostCopy::release`]).
pub struct HostCopy {
    handle: NonNull<c_void>,
    device: Device,
}

// SAFETY: the handle is only used through `&mut self` or under the owner's lock; libtorch
// tensors may be used from any thread.
unsafe impl Send for HostCopy {}
unsafe impl Sync for HostCopy {}

impl Drop for HostCopy {
    fn drop(&mut self) {
        // SAFETY: our handle, freed once.
        unsafe { ffi::tessera_tier_free(self.handle.as_ptr()) }
    }
}

/// What one move did.
#[derive(Debug, Clone)]
pub struct Moved {
    pub bytes: u64,
    /// The host block is page-locked.
    pub pinned: bool,
    /// Why page-locking failed at this move, if it did (the block is pageable).
    pub pin_error: Option<String>,
    /// Bytes copied at this move: to the host, those of storages written since the host copy
    /// last matched them (all at a first move, none when the kept copy was exact); to the
    /// device, those not found there already (shared weights another model holds).
    pub copied: u64,
    /// Storages the model holds.
    pub storages: u64,
    pub ms: f64,
}

fn error(device: Device, text: String) -> RuntimeError {
    if is_oom(&text) {
        RuntimeError::OutOfMemory {
            device: device_name(device),
            message: text,
        }
    } else {
        RuntimeError::Forward(format!("moving the model's weights: {text}"))
    }
}

impl HostCopy {
    /// Collects the tensors of `modules` on `device`.
    pub fn collect(modules: &[&CModule], device: Device) -> Result<HostCopy, RuntimeError> {
        let mut ptrs: Vec<*mut c_void> = modules.iter().map(|m| module_ptr(m)).collect();
        let (kind, index) = match device {
            Device::Cuda(n) => (1, n as i32),
            _ => (0, 0),
        };
        let mut err: *mut c_char = std::ptr::null_mut();
        // SAFETY: live module pointers; the shim only reads them and catches exceptions.
        let handle = unsafe {
            ffi::tessera_tier_collect(ptrs.as_mut_ptr(), ptrs.len() as i32, kind, index, &mut err)
        };
        match NonNull::new(handle) {
            Some(handle) => Ok(HostCopy { handle, device }),
            None => Err(error(device, take_text(err))),
        }
    }

    /// Bytes of the host block (page-aligned storages).
    pub fn bytes(&self) -> u64 {
        // SAFETY: a live handle.
        unsafe { ffi::tessera_tier_bytes(self.handle.as_ptr()) as u64 }
    }

    /// Storages (each moved once, however many tensors view it).
    pub fn storages(&self) -> u64 {
        // SAFETY: a live handle.
        unsafe { ffi::tessera_tier_storages(self.handle.as_ptr()) as u64 }
    }

    /// The sum of the tensors' version counters (`None` if one has none): it changes when one
    /// is written in place.
    pub fn version_sum(&self) -> Option<i64> {
        // SAFETY: a live handle.
        let sum = unsafe { ffi::tessera_tier_version_sum(self.handle.as_ptr()) };
        (sum >= 0).then_some(sum)
    }

    /// Whether the host block is allocated.
    pub fn allocated(&self) -> bool {
        // SAFETY: a live handle.
        unsafe { ffi::tessera_tier_pinned(self.handle.as_ptr()) >= 0 }
    }

    /// Copies the tensors to the host block (page-locked if `pin` and it can be) and frees
    /// their device memory; on error nothing moved. Storages whose version counters did not
    /// change since the block last matched them are not copied again, unless `force` (the
    /// model may have written them without a version bump: a CUDA-graph replay).
    pub fn to_host(&mut self, pin: bool, force: bool) -> Result<Moved, RuntimeError> {
        let mut moved = self.fill(ffi::tessera_tier_to_host, pin, force)?;
        // SAFETY: a live handle.
        moved.copied = unsafe { ffi::tessera_tier_copied(self.handle.as_ptr()) } as u64;
        Ok(moved)
    }

    /// Fills the host block with the tensors' bytes while they stay on the device (allocating
    /// it, page-locked if `pin` and it can be): the next [`HostCopy::to_host`] then copies only
    /// what is written meanwhile. `force` as for [`HostCopy::to_host`].
    pub fn stage(&mut self, pin: bool, force: bool) -> Result<Moved, RuntimeError> {
        self.fill(ffi::tessera_tier_stage, pin, force)
    }

    /// Calls `shim` (the move to the host, or the stage), which fills the host block.
    fn fill(
        &mut self,
        shim: unsafe extern "C" fn(*mut c_void, i32, i32, *mut *mut c_char) -> *mut c_char,
        pin: bool,
        force: bool,
    ) -> Result<Moved, RuntimeError> {
        let started = std::time::Instant::now();
        let mut pin_error: *mut c_char = std::ptr::null_mut();
        // SAFETY: a live handle, used by one caller at a time (`&mut self`).
        let err = unsafe {
            shim(
                self.handle.as_ptr(),
                pin as i32,
                force as i32,
                &mut pin_error,
            )
        };
        let pin_error = (!pin_error.is_null()).then(|| take_text(pin_error));
        if !err.is_null() {
            return Err(error(self.device, take_text(err)));
        }
        Ok(self.moved(started, pin_error))
    }

    /// Copies the tensors back to the device (fresh allocations); on error (out of memory,
    /// say) nothing moved.
    pub fn to_device(&mut self) -> Result<Moved, RuntimeError> {
        let started = std::time::Instant::now();
        // SAFETY: a live handle, used by one caller at a time (`&mut self`).
        let err = unsafe { ffi::tessera_tier_to_device(self.handle.as_ptr()) };
        if !err.is_null() {
            return Err(error(self.device, take_text(err)));
        }
        let mut moved = self.moved(started, None);
        // SAFETY: a live handle.
        moved.copied = unsafe { ffi::tessera_tier_copied(self.handle.as_ptr()) } as u64;
        Ok(moved)
    }

    /// Shares the model's parameter storages with byte-identical ones already on the device
    /// under `scope` (see [`Shared`]); while the weights are on the device. On error, storages
    /// handled before it stay shared (each is switched whole).
    pub fn share(&mut self, scope: &str) -> Result<Shared, RuntimeError> {
        let scope = std::ffi::CString::new(scope.replace('\0', "")).expect("NULs removed");
        let (mut joined, mut classes) = (0i64, 0i64);
        // SAFETY: a live handle, used by one caller at a time (`&mut self`); out-pointers.
        let err = unsafe {
            ffi::tessera_tier_share(
                self.handle.as_ptr(),
                scope.as_ptr(),
                &mut joined,
                &mut classes,
            )
        };
        if !err.is_null() {
            return Err(error(self.device, take_text(err)));
        }
        Ok(Shared {
            joined: joined as u64,
            storages: classes as u64,
        })
    }

    /// The distinct shared storages the model uses on its device (identity, bytes): none while
    /// its weights are in host memory.
    pub fn shared_storages(&self) -> Vec<(usize, u64)> {
        let mut cap = 0i64;
        loop {
            let mut ids = vec![0i64; cap as usize];
            let mut sizes = vec![0i64; cap as usize];
            // SAFETY: a live handle; buffers of `cap` entries.
            let n = unsafe {
                ffi::tessera_tier_shared(
                    self.handle.as_ptr(),
                    ids.as_mut_ptr(),
                    sizes.as_mut_ptr(),
                    cap,
                )
            };
            if n <= cap {
                return ids
                    .into_iter()
                    .zip(sizes)
                    .take(n as usize)
                    .map(|(id, size)| (id as usize, size as u64))
                    .collect();
            }
            cap = n;
        }
    }

    /// Frees the host block while the tensors are on the device; whether it was freed.
    pub fn release(&mut self) -> bool {
        // SAFETY: a live handle.
        unsafe { ffi::tessera_tier_release_block(self.handle.as_ptr()) == 1 }
    }

    fn moved(&self, started: std::time::Instant, pin_error: Option<String>) -> Moved {
        Moved {
            bytes: self.bytes(),
            // SAFETY: a live handle.
            pinned: unsafe { ffi::tessera_tier_pinned(self.handle.as_ptr()) } == 1,
            pin_error,
            copied: self.bytes(),
            // SAFETY: a live handle.
            storages: unsafe { ffi::tessera_tier_storages(self.handle.as_ptr()) } as u64,
            ms: started.elapsed().as_secs_f64() * 1e3,
        }
    }
}

/// The content classes of a model's shared storages, held while the model lives (see
/// [`HostCopy::into_classes`]): a later handle of the model (the host tier's) finds them.
pub struct Classes(HostCopy);

impl Classes {
    /// The sum of the shared tensors' version counters (see [`HostCopy::version_sum`]).
    pub fn version_sum(&self) -> Option<i64> {
        self.0.version_sum()
    }
}

impl HostCopy {
    /// Lets go of the tensors but the shared ones (so that attributes the model replaces later
    /// are freed), keeping the content classes its shared storages belong to.
    pub fn into_classes(self) -> Classes {
        // SAFETY: our live handle; nothing moves through it afterwards.
        unsafe { ffi::tessera_tier_keep_classes_only(self.handle.as_ptr()) };
        Classes(self)
    }
}

/// What [`HostCopy::share`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shared {
    /// Bytes of the model's storages that were found already on the device (now used there
    /// instead of its own copies, which were freed).
    pub joined: u64,
    /// Parameter storages that took part (found or now offered to the next model).
    pub storages: u64,
}

/// Makes page-locking fail from now on (`true`) or not: for tests of the fallback.
pub fn fail_pinning(fail: bool) {
    // SAFETY: sets an atomic flag.
    unsafe { ffi::tessera_tier_fail_pinning(fail as i32) }
}
