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
        pub fn tessera_save_unified(
            module: *mut c_void,
            path: *const c_char,
            source: *const c_char,
        ) -> *mut c_char;
        pub fn tessera_load_unified(
            path: *const c_char,
            device_type: i32,
            index: i32,
            source: *const c_char,
            stale: *mut i32,
            note: *mut *mut c_char,
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
    /// From the file's unified copy when it has one (see [`load_unified`]); otherwise as
    /// `Parallel`, and a copy is written in the background for the next loads when the file is
    /// large.
    Unified,
}

impl LoadPath {
    /// `Unified`, or what `TESSERA_LOAD_PATH` names (`torch`, `parallel`: benchmarks compare).
    pub fn configured() -> LoadPath {
        match std::env::var("TESSERA_LOAD_PATH").as_deref() {
            Ok("torch") => LoadPath::Torch,
            Ok("parallel") => LoadPath::Parallel,
            _ => LoadPath::Unified,
        }
    }

    /// The same, but writing no unified copy (a file read once to be rewritten, as one to be
    /// frozen is: the frozen file gets the copy).
    pub fn without_copies(self) -> LoadPath {
        match self {
            LoadPath::Unified => LoadPath::Parallel,
            other => other,
        }
    }
}

/// Files smaller than this get no unified copy (a few milliseconds of load to gain):
/// `TESSERA_UNIFIED_COPY_MIN_BYTES` overrides it (tests copy tiny models).
pub const UNIFIED_COPY_MIN_BYTES: u64 = 64 << 20;

fn unified_copy_min_bytes() -> u64 {
    std::env::var("TESSERA_UNIFIED_COPY_MIN_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(UNIFIED_COPY_MIN_BYTES)
}

/// Where the unified copy of `file` is kept: the server's own folder beside it (the one no
/// archive may bring), or beside it when `file` is already in that folder.
pub fn unified_copy_path(file: &std::path::Path) -> Option<std::path::PathBuf> {
    let dir = file.parent()?;
    let name = file.file_name()?.to_string_lossy();
    let own = dir
        .file_name()
        .is_some_and(|d| d == crate::archive::OPTIMIZED_DIR);
    let dir = if own {
        dir.to_path_buf()
    } else {
        dir.join(crate::archive::OPTIMIZED_DIR)
    };
    Some(dir.join(format!("{name}.unified")))
}

/// What a unified copy says it was made from: the copy's format and the source file's length,
/// modification and change times, device and inode (a rewritten source makes its copy stale);
/// and the file's length.
fn source_tag(file: &std::path::Path) -> Option<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(file).ok()?;
    let tag = format!(
        "unified-2:{}:{}.{}:{}.{}:{}:{}",
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
        m.dev(),
        m.ino()
    );
    Some((tag, m.len()))
}

fn c_path(path: &std::path::Path) -> Result<std::ffi::CString, String> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} has a NUL byte in its name", path.display()))
}

/// (type, index) of a device as the shims take it: 0 CPU, 1 CUDA.
fn device_code(device: Device) -> (i32, i32) {
    match device {
        Device::Cuda(i) => (1, i as i32),
        _ => (0, 0),
    }
}

/// Writes `module` to `copy` in the unified layout with `tag` (the [`source_tag`] of the file
/// it was loaded from, taken before that load), atomically.
pub fn save_unified(module: &CModule, tag: &str, copy: &std::path::Path) -> Result<(), String> {
    let dir = copy.parent().ok_or("a copy in no folder")?;
    // Only the server's own folder is made: a model folder removed meanwhile stays removed.
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(format!("cannot create {}: {e}", dir.display()))
        }
        _ => {}
    }
    let c_tag = std::ffi::CString::new(tag).map_err(|e| e.to_string())?;
    super::write_atomically(copy, |tmp| {
        let c_tmp = c_path(tmp)?;
        // SAFETY: a live module pointer and NUL-terminated strings; the shim catches C++
        // exceptions and returns null or an error string (freed by take_text).
        let err = unsafe {
            ffi::tessera_save_unified(module_ptr(module), c_tmp.as_ptr(), c_tag.as_ptr())
        };
        if err.is_null() {
            Ok(())
        } else {
            Err(take_text(err))
        }
    })
}

/// Loads the unified copy `copy` onto `device`: `Ok(None)` if it was not made from the source
/// version `tag` names (see [`source_tag`]). The copy's storages are read by the server and handed to
/// libtorch, which reads only the pickles and the code: for CUDA, the file is mapped and
/// page-locked in place and each storage copied from there (see `tier_shim.cpp`).
pub fn load_unified(
    copy: &std::path::Path,
    tag: &str,
    device: Device,
) -> Result<Option<CModule>, String> {
    let c_copy = c_path(copy)?;
    let c_tag = std::ffi::CString::new(tag).map_err(|e| e.to_string())?;
    let (kind, index) = device_code(device);
    let mut stale = 0i32;
    let mut note: *mut c_char = std::ptr::null_mut();
    let mut err: *mut c_char = std::ptr::null_mut();
    // SAFETY: NUL-terminated strings and out-pointers; the shim catches C++ exceptions and
    // returns a new module, or null with the reason (strings freed by take_text).
    let ptr = unsafe {
        ffi::tessera_load_unified(
            c_copy.as_ptr(),
            kind,
            index,
            c_tag.as_ptr(),
            &mut stale,
            &mut note,
            &mut err,
        )
    };
    let note = take_text(note);
    if !note.is_empty() {
        tracing::warn!(file = %copy.display(), reason = %note,
            "unified copy not page-locked: its weights are copied from pageable memory");
    }
    if ptr.is_null() {
        if stale != 0 {
            return Ok(None);
        }
        let text = take_text(err);
        return Err(if text.is_empty() {
            "unknown error".into()
        } else {
            text
        });
    }
    // SAFETY: as in `load_module`.
    Ok(Some(unsafe {
        std::mem::transmute::<*mut c_void, CModule>(ptr)
    }))
}

/// When a unified copy missing for a file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteCopy {
    /// Now, from the module just loaded (tests).
    Now,
    /// By the background writer, from a load of the file onto the CPU: the load that found the
    /// copy missing does not wait (writing SD2's takes ~3 s, most of it CRC-32 in libtorch's
    /// zip writer).
    Later,
}

/// Source versions (their [`source_tag`]) whose copy failed to be written or to load: not tried
/// again in this process (each try costs a load and seconds of writing).
fn failed_copies() -> std::sync::MutexGuard<'static, std::collections::HashSet<String>> {
    static FAILED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    FAILED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// `path` from its unified copy, else loaded as [`LoadPath::Parallel`] and, when at least
/// `min_bytes` long, copied for the next loads as `write` says. A copy that is stale is removed
/// and written again; one that does not load is removed and not written again for that version
/// of the file; running out of memory is returned as it is. Whether the copy was used.
pub fn load_via_unified_copy(
    path: &std::path::Path,
    device: Device,
    min_bytes: u64,
    write: WriteCopy,
) -> Result<(CModule, bool), String> {
    let copy = unified_copy_path(path);
    let source = source_tag(path);
    let tag = source.as_ref().map(|(t, _)| t.clone());
    if let (Some(copy), Some(tag)) = (copy.as_ref().filter(|c| c.is_file()), tag.as_deref()) {
        let started = std::time::Instant::now();
        match load_unified(copy, tag, device) {
            Ok(Some(module)) => {
                let bytes = std::fs::metadata(copy).map(|m| m.len()).unwrap_or(0);
                let s = started.elapsed().as_secs_f64();
                tracing::info!(file = %path.display(), ms = (s * 1e3) as u64,
                    gb_per_s = format!("{:.2}", bytes as f64 / s.max(1e-9) / 1e9),
                    "TorchScript loaded from its unified copy");
                return Ok((module, true));
            }
            Ok(None) => {
                tracing::info!(file = %copy.display(), "unified copy is stale: writing it again")
            }
            Err(e) if is_oom(&e) => return Err(e),
            Err(e) => {
                tracing::warn!(file = %copy.display(), error = %e,
                    "unified copy does not load: loading the file itself (no copy again for this version)");
                failed_copies().insert(tag.to_string());
            }
        }
        let _ = std::fs::remove_file(copy);
    }
    let module = load_module(path, device, LoadPath::Parallel)?;
    let wanted = source
        .filter(|(t, len)| *len >= min_bytes && !failed_copies().contains(t))
        .map(|(t, _)| t);
    if let (Some(copy), Some(tag)) = (copy, wanted) {
        match write {
            WriteCopy::Now => write_copy(&module, path, &tag, &copy),
            WriteCopy::Later => write_copy_later(path, copy),
        }
    }
    Ok((module, false))
}

/// Writes the copy of `path` from `module`, loaded from the version of `path` that `tag` names;
/// a copy whose source changed meanwhile is removed, a failure remembered.
fn write_copy(module: &CModule, path: &std::path::Path, tag: &str, copy: &std::path::Path) {
    let started = std::time::Instant::now();
    match save_unified(module, tag, copy) {
        Ok(()) if source_tag(path).map(|(t, _)| t).as_deref() != Some(tag) => {
            let _ = std::fs::remove_file(copy);
            tracing::info!(file = %path.display(), "file changed while its unified copy was written: copy removed");
        }
        Ok(()) => tracing::info!(file = %path.display(), ms = started.elapsed().as_millis() as u64,
            "unified copy written for the next loads"),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e,
                "unified copy not written: later loads read the file itself");
            failed_copies().insert(tag.to_string());
        }
    }
}

/// Bytes of memory the kernel says are available (`MemAvailable`), if it says.
fn memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = text
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?;
    kib.parse::<u64>().ok().map(|k| k << 10)
}

/// Bytes free for this process on the file system of `dir`, if known.
fn disk_available(dir: &std::path::Path) -> Option<u64> {
    let c = c_path(dir).ok()?;
    // SAFETY: a NUL-terminated path and a zeroed out-struct statvfs fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0)
        .then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

/// Why the background writer should not copy a file of `len` bytes into `dir` now, if it
/// should not: its load onto the CPU needs the file's size in memory (twice, to leave room for
/// the rest of the server), the copy its size on disk (and a tenth more).
fn copy_room(len: u64, dir: &std::path::Path) -> Option<String> {
    let memory = memory_available().unwrap_or(u64::MAX);
    if memory < len.saturating_mul(2) {
        return Some(format!(
            "{memory} bytes of memory available, {} wanted",
            len * 2
        ));
    }
    let disk = disk_available(dir).unwrap_or(u64::MAX);
    (disk < len + len / 10).then(|| format!("{disk} bytes free on disk, {} wanted", len + len / 10))
}

/// Queues `path`'s copy for the background writer (one thread, one file at a time, each file
/// once while queued): it loads the file onto the CPU (checked files only reach here), writes
/// the copy and frees the module. A file it cannot load onto the CPU is not tried again.
fn write_copy_later(path: &std::path::Path, copy: std::path::PathBuf) {
    use std::sync::mpsc::{channel, Sender};
    use std::sync::{Mutex, OnceLock};
    type Job = (std::path::PathBuf, std::path::PathBuf);
    static QUEUED: OnceLock<Mutex<std::collections::HashSet<std::path::PathBuf>>> = OnceLock::new();
    static WRITER: OnceLock<Mutex<Option<Sender<Job>>>> = OnceLock::new();
    let queued = QUEUED.get_or_init(Default::default);
    if !queued
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(copy.clone())
    {
        return;
    }
    let writer = WRITER.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        let started = std::thread::Builder::new()
            .name("unified-copies".into())
            .spawn(move || {
                for (path, copy) in rx {
                    write_queued(&path, &copy);
                    QUEUED
                        .get()
                        .expect("set before the writer starts")
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&copy);
                }
            });
        Mutex::new(started.ok().map(|_| tx))
    });
    let sent = writer
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .is_some_and(|tx| tx.send((path.to_path_buf(), copy.clone())).is_ok());
    if !sent {
        tracing::warn!(file = %path.display(), "unified copy not written: no writer thread");
        queued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&copy);
    }
}

/// One job of the background writer.
fn write_queued(path: &std::path::Path, copy: &std::path::Path) {
    let Some((tag, len)) = source_tag(path) else {
        return; // gone meanwhile
    };
    if copy.is_file() || failed_copies().contains(&tag) {
        return;
    }
    if let Some(why) = copy_room(len, path.parent().unwrap_or(path)) {
        tracing::info!(file = %path.display(), reason = %why, "unified copy not written for now");
        return;
    }
    match load_module(path, Device::Cpu, LoadPath::Parallel) {
        Ok(module) => write_copy(&module, path, &tag, copy),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e,
                "unified copy not written: the file does not load onto the CPU");
            failed_copies().insert(tag);
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
    match how {
        LoadPath::Torch => return CModule::load_on_device(path, device).map_err(|e| e.to_string()),
        LoadPath::Unified => {
            return load_via_unified_copy(path, device, unified_copy_min_bytes(), WriteCopy::Later)
                .map(|(m, _)| m)
        }
        LoadPath::Parallel => {}
    }
    let c_path = c_path(path)?;
    let (kind, index) = device_code(device);
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
