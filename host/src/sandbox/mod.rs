//! The Wasm sandbox: runs each model owner's handler component around the forward pass.
//!
//! One [`Sandbox`] owns the process-wide `wasmtime::Engine` (component model, epoch
//! interruption) and a cache of pre-linked components keyed by the handler's sha256, so a
//! handler is compiled once however many archives or reloads carry it. Every call gets a fresh
//! `Store` and instance: no state leaks between requests. A store is capped in linear memory,
//! tables and instances, and interrupted at an epoch deadline derived from the request's
//! timeout; a trap, a timeout or an exhausted memory cap becomes a typed error and never takes
//! the server down. Handlers get no preopened directories, no network, no environment or
//! arguments, and deterministic "random" bytes; the host interface lends read-only archive
//! assets, model-config parameters and a rate-limited log.
//!
//! Calls here are synchronous and may run for the whole deadline: callers run them on blocking
//! threads, never on the async runtime.
use crate::runtime::{CachedOutputs, DType, HostTensor, StageCache};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::component::{Component as WasmComponent, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

mod cache;
mod imaging;

use cache::CompileCache;

mod bindings {
    wasmtime::component::bindgen!({
        world: "handler",
        path: "../wit",
        // Imaging calls may trap: over the store's memory limit, as a memory.grow would.
        imports: { "tessera:handler/imaging": trappable },
        with: { "tessera:handler/imaging.image": super::imaging::HostImage },
    });
}

/// The previous contract (0.1.0): its handlers import `host@0.1.0`, which the linker lends
/// too. Its exports and types are the same records as 0.2.0's, so one set of call bindings
/// serves both.
mod bindings_v0_1 {
    wasmtime::component::bindgen!({
        world: "handler",
        path: "../wit/v0.1",
    });
}

use bindings::tessera::handler::types as wit;
use bindings::Handler as HandlerBindings;

/// Handler instances alive at once (each request holds one during preprocess and one during
/// postprocess); the blocking thread pool that runs them is smaller.
const MAX_LIVE_INSTANCES: u32 = 600;
/// Core instances one handler instance may make (a Rust handler makes a few, a Python one ~40).
const CORE_INSTANCES_PER_STORE: usize = 64;
/// Compiled handler components kept for reuse (by content hash).
const MAX_COMPILED: u64 = 256;
/// Bytes of each pooled linear memory kept mapped between instances, at most (see
/// [`keep_resident_bytes`]).
pub const KEEP_RESIDENT_MIB: u64 = 64;
/// Idle pool slots that keep their memory mapped before a fresh slot is used.
const MAX_UNUSED_WARM_SLOTS: u32 = 16;
/// Linear memories in the instance pool.
const POOLED_MEMORIES: u32 = MAX_LIVE_INSTANCES * 2;

/// Bytes of each pooled linear memory kept mapped once its instance is gone: `wanted`, but no
/// more than the server-wide handler memory bound spread over every pooled memory. Pages kept
/// this way stay in the process's RSS outside that bound (a freed slot is not live memory), so
/// without the cap a handler that fills its memory on every call would leave up to
/// `POOLED_MEMORIES` x `wanted` bytes resident (the soak's failing handler at 64 MiB: idle RSS
/// 1003 MiB where 4 MiB kept 607); with it, kept pages add at most the bound again.
pub fn keep_resident_bytes(wanted: usize, total_memory_bytes: u64) -> usize {
    let share = total_memory_bytes / u64::from(POOLED_MEMORIES);
    // Whole pages, as wasmtime keeps them.
    let share = (share & !0xffff) as usize;
    wanted.min(share)
}
/// Epoch tick; deadlines are rounded up to it.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Lines a handler may log per call before the rest are counted and dropped.
const LOG_LINES_PER_CALL: usize = 200;
const LOG_LINE_MAX: usize = 2048;
/// Largest asset a handler may read in one call.
const MAX_ASSET_BYTES: u64 = 256 << 20;
/// Bytes of stdout/stderr kept per call (then forwarded to the log).
const STDIO_CAPTURE: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The handler itself rejected the request or failed in a way it reported.
    #[error("{0}")]
    Handler(HandlerFailure),
    #[error("handler exceeded its time limit of {0:?}")]
    Timeout(Duration),
    #[error("handler exceeded its memory limit of {0} MiB")]
    MemoryLimit(u64),
    /// Every live handler instance together holds the server's handler memory budget.
    #[error(
        "the server's handler memory ({0} MiB for all requests together) is in use; retry shortly"
    )]
    ServerMemoryBusy(u64),
    #[error("handler trapped: {0}")]
    Trap(String),
    #[error("handler response of {0} bytes exceeds the limit of {1} bytes")]
    ResponseTooLarge(usize, usize),
    #[error("handler returned an invalid tensor: {0}")]
    BadTensor(String),
    #[error("handler.wasm is not a valid handler component: {0}")]
    InvalidComponent(String),
}

/// A typed failure reported by the handler (the WIT `handler-error`).
#[derive(Debug, Clone, PartialEq)]
pub enum HandlerFailure {
    BadRequest(String),
    UnsupportedMediaType(String),
    PayloadTooLarge(String),
    Unprocessable(String),
    Internal(String),
}

impl std::fmt::Display for HandlerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (HandlerFailure::BadRequest(m)
        | HandlerFailure::UnsupportedMediaType(m)
        | HandlerFailure::PayloadTooLarge(m)
        | HandlerFailure::Unprocessable(m)
        | HandlerFailure::Internal(m)) = self;
        f.write_str(m)
    }
}

impl From<wit::HandlerError> for HandlerFailure {
    fn from(e: wit::HandlerError) -> Self {
        match e {
            wit::HandlerError::BadRequest(m) => HandlerFailure::BadRequest(m),
            wit::HandlerError::UnsupportedMediaType(m) => HandlerFailure::UnsupportedMediaType(m),
            wit::HandlerError::PayloadTooLarge(m) => HandlerFailure::PayloadTooLarge(m),
            wit::HandlerError::Unprocessable(m) => HandlerFailure::Unprocessable(m),
            wit::HandlerError::Internal(m) => HandlerFailure::Internal(m),
        }
    }
}

/// An HTTP request as the handler sees it.
#[derive(Debug, Clone, Default)]
pub struct HandlerRequest {
    pub body: Vec<u8>,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
}

/// The handler's response.
#[derive(Debug, Clone)]
pub struct HandlerResponse {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// What preprocess produced.
pub struct Preprocessed {
    pub inputs: Vec<HostTensor>,
    pub context: Vec<u8>,
    /// The handler's key for the cached stage's outputs.
    pub cache_key: Option<String>,
    /// Stage outputs promised to the handler by `is-cached` for `cache_key`.
    pub pinned: Option<Arc<CachedOutputs>>,
}

/// Per-model facts a handler instance may see, and its limits.
#[derive(Debug, Clone)]
pub struct HandlerEnv {
    /// Model name, for log lines.
    pub model: String,
    /// The archive's `assets/` folder.
    pub assets: PathBuf,
    /// `handler:` parameters of model-config.yaml, rendered as strings.
    pub params: HashMap<String, String>,
    pub memory_bytes: u64,
    pub max_response_bytes: usize,
    /// The model's stage cache, for `is-cached`.
    pub stage_cache: Option<Arc<StageCache>>,
}

/// A compiled, pre-linked handler ready to instantiate.
#[derive(Clone)]
pub struct Handler {
    pre: bindings::HandlerPre<State>,
    env: Arc<HandlerEnv>,
}

/// The process-wide sandbox: engine, linker and compiled-component cache.
pub struct Sandbox {
    engine: Engine,
    linker: Linker<State>,
    /// Compiled components by sha256, bounded (a handler in use keeps its own reference).
    compiled: moka::sync::Cache<String, bindings::HandlerPre<State>>,
    pool: Arc<MemoryPool>,
    /// Compiled components on disk, if kept.
    disk: Option<CompileCache>,
}

/// Linear memory charged to all live handler instances together, bounded.
struct MemoryPool {
    used: AtomicU64,
    cap: u64,
}

/// Which memory bound a growth hit; the limiter's error, found again by type in the trap.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MemoryExceeded {
    #[error("handler memory limit reached")]
    Instance,
    #[error("server-wide handler memory limit reached")]
    Server,
}

/// One store's limits: its own memory cap, a share of the server's pool (returned when the
/// store is dropped), and caps on instances and tables.
struct Limiter {
    cap: u64,
    pool: Arc<MemoryPool>,
    charged: u64,
}

impl Limiter {
    /// Charges `bytes` (linear memory, or host memory held for the handler) to this store's
    /// cap and to the server's pool.
    fn charge(&mut self, bytes: u64) -> Result<(), MemoryExceeded> {
        if self.charged.saturating_add(bytes) > self.cap {
            return Err(MemoryExceeded::Instance);
        }
        let before = self.pool.used.fetch_add(bytes, Ordering::SeqCst);
        if before.saturating_add(bytes) > self.pool.cap {
            self.pool.used.fetch_sub(bytes, Ordering::SeqCst);
            return Err(MemoryExceeded::Server);
        }
        self.charged += bytes;
        Ok(())
    }

    /// Gives back host memory charged with [`Limiter::charge`].
    fn release(&mut self, bytes: u64) {
        let bytes = bytes.min(self.charged);
        self.charged -= bytes;
        self.pool.used.fetch_sub(bytes, Ordering::SeqCst);
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.charge(desired.saturating_sub(current) as u64)
            .map_err(wasmtime::Error::new)?;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }

    fn instances(&self) -> usize {
        // componentize-py's components are ~40 core instances (CPython, its libraries, and
        // one small module per stubbed WASI interface).
        CORE_INSTANCES_PER_STORE
    }
    fn tables(&self) -> usize {
        16
    }
    fn memories(&self) -> usize {
        4
    }
}

impl Drop for Limiter {
    fn drop(&mut self) {
        self.pool.used.fetch_sub(self.charged, Ordering::SeqCst);
    }
}

struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: Limiter,
    env: Arc<HandlerEnv>,
    request_id: String,
    logged: usize,
    dropped: usize,
    /// Stage outputs `is-cached` answered true for, held until the forward.
    pinned: Option<(String, Arc<CachedOutputs>)>,
    /// Model inputs the handler staged with the imaging interface's `as-input`.
    staged: Vec<imaging::Staged>,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wit::Host for State {}

impl bindings_v0_1::tessera::handler::types::Host for State {}

/// 0.1.0's host interface is 0.2.0's.
impl bindings_v0_1::tessera::handler::host::Host for State {
    fn read_asset(&mut self, path: String) -> Result<Vec<u8>, String> {
        bindings::tessera::handler::host::Host::read_asset(self, path)
    }

    fn is_cached(&mut self, key: String) -> bool {
        bindings::tessera::handler::host::Host::is_cached(self, key)
    }

    fn config_param(&mut self, key: String) -> Option<String> {
        bindings::tessera::handler::host::Host::config_param(self, key)
    }

    fn log(&mut self, level: bindings_v0_1::tessera::handler::types::LogLevel, message: String) {
        use bindings_v0_1::tessera::handler::types::LogLevel as V0;
        let level = match level {
            V0::Debug => wit::LogLevel::Debug,
            V0::Info => wit::LogLevel::Info,
            V0::Warn => wit::LogLevel::Warn,
            V0::Error => wit::LogLevel::Error,
        };
        bindings::tessera::handler::host::Host::log(self, level, message)
    }
}

impl bindings::tessera::handler::host::Host for State {
    fn read_asset(&mut self, path: String) -> Result<Vec<u8>, String> {
        let Ok(Some(rel)) = crate::names::relative_inside(&path) else {
            return Err(format!(
                "asset path '{path}' must be relative and stay inside assets/"
            ));
        };
        let full = self.env.assets.join(rel);
        // Assets are unpacked by us and contain no links; still, refuse anything that is not
        // a regular file inside the assets folder.
        let meta =
            std::fs::symlink_metadata(&full).map_err(|_| format!("no asset named '{path}'"))?;
        if !meta.is_file() {
            return Err(format!("asset '{path}' is not a regular file"));
        }
        if meta.len() > MAX_ASSET_BYTES {
            return Err(format!(
                "asset '{path}' is {} bytes, over the {MAX_ASSET_BYTES} limit",
                meta.len()
            ));
        }
        std::fs::read(&full).map_err(|e| format!("reading asset '{path}': {e}"))
    }

    fn is_cached(&mut self, key: String) -> bool {
        let Some(cache) = &self.env.stage_cache else {
            return false;
        };
        match cache.get(&key) {
            Some(outputs) => {
                self.pinned = Some((key, outputs));
                true
            }
            None => false,
        }
    }

    fn config_param(&mut self, key: String) -> Option<String> {
        self.env.params.get(&key).cloned()
    }

    fn log(&mut self, level: wit::LogLevel, message: String) {
        if self.logged >= LOG_LINES_PER_CALL {
            self.dropped += 1;
            return;
        }
        self.logged += 1;
        let mut msg = message;
        if msg.len() > LOG_LINE_MAX {
            let mut cut = LOG_LINE_MAX;
            while !msg.is_char_boundary(cut) {
                cut -= 1;
            }
            msg.truncate(cut);
            msg.push('…');
        }
        let (model, rid) = (&self.env.model, &self.request_id);
        match level {
            wit::LogLevel::Debug => {
                tracing::debug!(target: "handler", model, request_id = rid, "{msg}")
            }
            wit::LogLevel::Info => {
                tracing::info!(target: "handler", model, request_id = rid, "{msg}")
            }
            wit::LogLevel::Warn => {
                tracing::warn!(target: "handler", model, request_id = rid, "{msg}")
            }
            wit::LogLevel::Error => {
                tracing::error!(target: "handler", model, request_id = rid, "{msg}")
            }
        }
    }
}

/// How the sandbox's engine is set up (`tessera serve` takes these from [`crate::Config`]).
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Bound on the linear memory of all live instances together.
    pub total_memory_bytes: u64,
    /// Bytes of each pooled linear memory kept mapped between instances.
    pub keep_resident_bytes: usize,
    /// Instances from a pool of pre-reserved slots (false: allocated on demand, for comparisons).
    pub pooling: bool,
    /// Name handler functions for `perf` (`/tmp/perf-<pid>.map`); for profiling only.
    pub perfmap: bool,
    /// Folder keeping compiled components between runs (None: compile at every start).
    pub compile_cache: Option<PathBuf>,
}

impl SandboxConfig {
    /// The defaults, with `total_memory_bytes` for all live instances together.
    pub fn with_total_memory(total_memory_bytes: u64) -> SandboxConfig {
        SandboxConfig {
            total_memory_bytes,
            keep_resident_bytes: (KEEP_RESIDENT_MIB << 20) as usize,
            pooling: true,
            perfmap: false,
            compile_cache: None,
        }
    }
}

impl Sandbox {
    /// A sandbox with default settings whose live instances together hold at most
    /// `total_memory_bytes` of linear memory.
    pub fn new(total_memory_bytes: u64) -> anyhow::Result<Arc<Sandbox>> {
        Sandbox::with_config(&SandboxConfig::with_total_memory(total_memory_bytes))
    }

    /// Builds the engine and starts the epoch ticker thread.
    pub fn with_config(settings: &SandboxConfig) -> anyhow::Result<Arc<Sandbox>> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.max_wasm_stack(1 << 20);
        // Instances come from a pool of pre-reserved slots; a freed slot's first
        // keep_resident bytes are zeroed with memset and stay mapped, so the next request's
        // handler does not page-fault its way through fresh memory (costly on VMs).
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_component_instances(MAX_LIVE_INSTANCES)
            .total_core_instances(MAX_LIVE_INSTANCES * 16)
            .total_memories(POOLED_MEMORIES)
            .total_tables(MAX_LIVE_INSTANCES * 4)
            .max_memories_per_module(2)
            .max_memory_size(4 << 30)
            .linear_memory_keep_resident(keep_resident_bytes(
                settings.keep_resident_bytes,
                settings.total_memory_bytes,
            ))
            .table_keep_resident(64 << 10)
            // A fresh slot is taken only while few used ones sit idle; past that an idle used
            // slot is reused. Every used slot keeps its first pages mapped (above), so the
            // slots ever used, and with them idle RSS, stop growing once the busiest moment
            // has been seen (wasmtime's default, 100, let them grow for long after it).
            .max_unused_warm_slots(MAX_UNUSED_WARM_SLOTS)
            // Where the kernel has PAGEMAP_SCAN (Linux 6.7+), a freed slot's reset zeroes only
            // the pages its instance wrote instead of all its kept-resident bytes.
            .pagemap_scan(wasmtime::Enabled::Auto);
        if settings.pooling {
            config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        }
        if settings.perfmap {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config)?;
        let mut linker = Linker::<State>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        HandlerBindings::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)?;
        bindings_v0_1::Handler::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)?;
        let disk = settings
            .compile_cache
            .as_ref()
            .and_then(|dir| CompileCache::open(dir, &engine));
        let sandbox = Arc::new(Sandbox {
            engine,
            linker,
            compiled: moka::sync::Cache::new(MAX_COMPILED),
            disk,
            pool: Arc::new(MemoryPool {
                used: AtomicU64::new(0),
                cap: settings.total_memory_bytes,
            }),
        });
        let weak = Arc::downgrade(&sandbox);
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while let Some(s) = weak.upgrade() {
                    s.engine.increment_epoch();
                    drop(s);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        Ok(sandbox)
    }

    /// Compiles (or finds in the cache) the component at `path`, whose sha256 is `hash`, and
    /// checks that it implements the handler world. Slow on first sight of a hash: call it from
    /// a blocking thread.
    pub fn compile(&self, path: &Path, hash: &str) -> Result<(), SandboxError> {
        self.compiled(path, hash).map(|_| ())
    }

    /// A handler for `env`, from the component at `path` (compiled once per `hash`).
    pub fn prepare(
        &self,
        path: &Path,
        hash: &str,
        env: HandlerEnv,
    ) -> Result<Handler, SandboxError> {
        Ok(Handler {
            pre: self.compiled(path, hash)?,
            env: Arc::new(env),
        })
    }

    fn compiled(
        &self,
        path: &Path,
        hash: &str,
    ) -> Result<bindings::HandlerPre<State>, SandboxError> {
        // Concurrent misses for one hash share one compile.
        self.compiled
            .try_get_with(hash.to_string(), || {
                let bytes = std::fs::read(path)
                    .map_err(|e| SandboxError::InvalidComponent(e.to_string()))?;
                let pre = self.link(&bytes, Some(hash), true)?;
                tracing::info!(
                    handler = &hash[..hash.len().min(12)],
                    "compiled handler component"
                );
                Ok(pre)
            })
            .map_err(|e: Arc<SandboxError>| match &*e {
                SandboxError::InvalidComponent(m) => SandboxError::InvalidComponent(m.clone()),
                other => SandboxError::InvalidComponent(other.to_string()),
            })
    }

    /// Validates handler bytes without caching (used by `tessera pack`).
    pub fn validate(&self, bytes: &[u8]) -> Result<(), SandboxError> {
        use sha2::{Digest, Sha256};
        let hash = hex::encode(Sha256::digest(bytes));
        // The same bytes compiled and linked before (the handler of a loaded model, of an
        // earlier version): valid, no second compile. Nothing is added to either cache here.
        if self.compiled.contains_key(&hash) {
            return Ok(());
        }
        self.link(bytes, Some(&hash), false).map(|_| ())
    }

    /// Compiles (or loads from the disk cache, for a known `hash`) and links a component; a
    /// fresh compile is written to the disk cache if `keep`.
    fn link(
        &self,
        bytes: &[u8],
        hash: Option<&str>,
        keep: bool,
    ) -> Result<bindings::HandlerPre<State>, SandboxError> {
        if wasmparser_is_core_module(bytes) {
            return Err(SandboxError::InvalidComponent(
                "it is a core wasm module, not a component (build for wasm32-wasip2)".into(),
            ));
        }
        let component = match (&self.disk, hash) {
            (Some(disk), Some(hash)) if keep => disk.component(&self.engine, hash, bytes),
            (Some(disk), Some(hash)) => disk
                .cached(&self.engine, hash)
                .map_or_else(|| WasmComponent::from_binary(&self.engine, bytes), Ok),
            _ => WasmComponent::from_binary(&self.engine, bytes),
        }
        .map_err(|e| SandboxError::InvalidComponent(format!("{e:#}")))?;
        let refused: Vec<String> = component
            .component_type()
            .imports(&self.engine)
            .map(|(name, _)| name.to_string())
            .filter(|name| !import_allowed(name))
            .collect();
        if !refused.is_empty() {
            return Err(SandboxError::InvalidComponent(format!(
                "imports interfaces a handler may not use: {}",
                refused.join(", ")
            )));
        }
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            SandboxError::InvalidComponent(format!(
                "imports outside the tessera:handler world: {e:#}"
            ))
        })?;
        bindings::HandlerPre::new(pre).map_err(|e| {
            SandboxError::InvalidComponent(format!(
                "does not export the tessera:handler world: {e:#}"
            ))
        })
    }

    fn store(
        &self,
        handler: &Handler,
        request_id: &str,
        deadline: Instant,
    ) -> (Store<State>, MemoryOutputPipe) {
        let stdout = MemoryOutputPipe::new(STDIO_CAPTURE);
        let mut wasi = WasiCtx::builder();
        // Deterministic bytes for both random interfaces: handlers get no entropy source.
        let pattern: Vec<u8> = (0u8..=255)
            .map(|i| i.wrapping_mul(167).wrapping_add(13))
            .collect();
        wasi.secure_random(wasmtime_wasi::random::Deterministic::new(pattern.clone()))
            .insecure_random(wasmtime_wasi::random::Deterministic::new(pattern))
            .insecure_random_seed(0)
            .stdout(stdout.clone())
            .stderr(stdout.clone());
        let limits = Limiter {
            cap: handler.env.memory_bytes,
            pool: self.pool.clone(),
            charged: 0,
        };
        let state = State {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits,
            env: handler.env.clone(),
            request_id: request_id.to_string(),
            logged: 0,
            dropped: 0,
            pinned: None,
            staged: Vec::new(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        let left = deadline.saturating_duration_since(Instant::now());
        store.set_epoch_deadline((left.as_millis() / EPOCH_TICK.as_millis()) as u64 + 1);
        store.epoch_deadline_trap();
        (store, stdout)
    }

    /// Runs `preprocess` in a fresh instance.
    pub fn preprocess(
        &self,
        handler: &Handler,
        request: HandlerRequest,
        request_id: &str,
        deadline: Instant,
    ) -> Result<Preprocessed, SandboxError> {
        let started = Instant::now();
        let (mut store, stdout) = self.store(handler, request_id, deadline);
        let req = wit::Request {
            body: request.body,
            content_type: request.content_type,
            headers: request.headers,
        };
        let result = handler
            .pre
            .instantiate(&mut store)
            .and_then(|h| h.call_preprocess(&mut store, &req));
        finish_call(&store, &stdout, "preprocess");
        let out = self.classify(
            result,
            &handler.env,
            deadline.saturating_duration_since(started),
        )?;
        let state = store.data_mut();
        let inputs = out
            .inputs
            .into_iter()
            .map(|t| match state.take_staged(&t.name) {
                Some(staged) if t.data.is_empty() => filled_in(t, staged),
                _ => to_host(t),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pinned = match (store.data_mut().pinned.take(), &out.cache_key) {
            (Some((key, outputs)), Some(wanted)) if &key == wanted => Some(outputs),
            _ => None,
        };
        Ok(Preprocessed {
            inputs,
            context: out.context,
            cache_key: out.cache_key,
            pinned,
        })
    }

    /// Runs `postprocess` in a fresh instance.
    pub fn postprocess(
        &self,
        handler: &Handler,
        outputs: Vec<HostTensor>,
        context: Vec<u8>,
        request_id: &str,
        deadline: Instant,
    ) -> Result<HandlerResponse, SandboxError> {
        let started = Instant::now();
        let (mut store, stdout) = self.store(handler, request_id, deadline);
        let outputs: Vec<wit::Tensor> = outputs.into_iter().map(from_host).collect();
        let result = handler
            .pre
            .instantiate(&mut store)
            .and_then(|h| h.call_postprocess(&mut store, &outputs, &context));
        finish_call(&store, &stdout, "postprocess");
        let resp = self.classify(
            result,
            &handler.env,
            deadline.saturating_duration_since(started),
        )?;
        if resp.body.len() > handler.env.max_response_bytes {
            return Err(SandboxError::ResponseTooLarge(
                resp.body.len(),
                handler.env.max_response_bytes,
            ));
        }
        if !(100..=599).contains(&resp.status) {
            return Err(SandboxError::Handler(HandlerFailure::Internal(format!(
                "handler returned invalid HTTP status {}",
                resp.status
            ))));
        }
        Ok(HandlerResponse {
            status: resp.status,
            content_type: resp.content_type,
            body: resp.body,
        })
    }

    fn classify<T>(
        &self,
        result: wasmtime::Result<Result<T, wit::HandlerError>>,
        env: &HandlerEnv,
        budget: Duration,
    ) -> Result<T, SandboxError> {
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(SandboxError::Handler(e.into())),
            Err(err) => {
                let memory = err.chain().find_map(|e| e.downcast_ref::<MemoryExceeded>());
                match (memory, err.downcast_ref::<Trap>()) {
                    (Some(MemoryExceeded::Instance), _) => {
                        Err(SandboxError::MemoryLimit(env.memory_bytes >> 20))
                    }
                    (Some(MemoryExceeded::Server), _) => {
                        Err(SandboxError::ServerMemoryBusy(self.pool.cap >> 20))
                    }
                    (_, Some(Trap::Interrupt)) => Err(SandboxError::Timeout(budget)),
                    (_, Some(Trap::StackOverflow)) => {
                        Err(SandboxError::Trap("call stack exhausted".into()))
                    }
                    _ => Err(SandboxError::Trap(format!("{err:#}"))),
                }
            }
        }
    }
}

fn finish_call(store: &Store<State>, stdout: &MemoryOutputPipe, phase: &str) {
    let state = store.data();
    if state.dropped > 0 {
        tracing::warn!(target: "handler", model = state.env.model, request_id = state.request_id,
            "{phase}: dropped {} log lines over the limit of {LOG_LINES_PER_CALL}", state.dropped);
    }
    let captured = stdout.contents();
    if !captured.is_empty() {
        let text = String::from_utf8_lossy(&captured);
        for line in text.lines().take(LOG_LINES_PER_CALL) {
            tracing::info!(target: "handler", model = state.env.model, request_id = state.request_id,
                stream = "stdio", "{}", line.chars().take(LOG_LINE_MAX).collect::<String>());
        }
    }
}

/// Interfaces a handler component may import: our world's, and the WASI interfaces a language
/// runtime links by default. Filesystem interfaces are linked but inert (no preopened
/// directory exists, so no path resolves); sockets, HTTP and anything else are refused.
const ALLOWED_IMPORTS: &[&str] = &[
    "tessera:handler/",
    "wasi:cli/",
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:filesystem/",
];

fn import_allowed(name: &str) -> bool {
    ALLOWED_IMPORTS
        .iter()
        .any(|prefix| name.starts_with(prefix))
}

/// Core modules start with `\0asm` version 1; components use a different layer/version.
fn wasmparser_is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && &bytes[0..4] == b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}

fn dtype_from_wit(d: wit::Dtype) -> DType {
    match d {
        wit::Dtype::F32 => DType::F32,
        wit::Dtype::F64 => DType::F64,
        wit::Dtype::F16 => DType::F16,
        wit::Dtype::Bf16 => DType::BF16,
        wit::Dtype::I64 => DType::I64,
        wit::Dtype::I32 => DType::I32,
        wit::Dtype::I16 => DType::I16,
        wit::Dtype::I8 => DType::I8,
        wit::Dtype::U8 => DType::U8,
        wit::Dtype::Boolean => DType::Bool,
    }
}

fn dtype_to_wit(d: DType) -> wit::Dtype {
    match d {
        DType::F32 => wit::Dtype::F32,
        DType::F64 => wit::Dtype::F64,
        DType::F16 => wit::Dtype::F16,
        DType::BF16 => wit::Dtype::Bf16,
        DType::I64 => wit::Dtype::I64,
        DType::I32 => wit::Dtype::I32,
        DType::I16 => wit::Dtype::I16,
        DType::I8 => wit::Dtype::I8,
        DType::U8 => wit::Dtype::U8,
        DType::Bool => wit::Dtype::Boolean,
    }
}

fn to_host(t: wit::Tensor) -> Result<HostTensor, SandboxError> {
    let dtype = dtype_from_wit(t.dtype);
    HostTensor::new(t.name, dtype, t.shape, t.data).map_err(SandboxError::BadTensor)
}

/// An input the handler returned without data in place of what it staged under that name
/// (`as-input`): the same dtype and number of elements, in the staged shape or another (a batch
/// dimension of 1 in front, say; the pixels are contiguous, so they read the same in order).
fn filled_in(t: wit::Tensor, staged: HostTensor) -> Result<HostTensor, SandboxError> {
    let dtype = dtype_from_wit(t.dtype);
    let described = format!(
        "input '{}' is {:?} {:?} but the image staged under that name is {:?} {:?}",
        t.name, t.dtype, t.shape, staged.dtype, staged.shape
    );
    if dtype != staged.dtype {
        return Err(SandboxError::BadTensor(described));
    }
    // Checks the shape against the staged bytes (as for any tensor a handler returns).
    HostTensor::new(t.name, dtype, t.shape, staged.data)
        .map_err(|e| SandboxError::BadTensor(format!("{described}: {e}")))
}

fn from_host(t: HostTensor) -> wit::Tensor {
    wit::Tensor {
        name: t.name,
        dtype: dtype_to_wit(t.dtype),
        shape: t.shape.iter().map(|&d| d as u64).collect(),
        data: t.data,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_kept_resident_stays_within_the_handler_memory_bound() {
        use super::{keep_resident_bytes, POOLED_MEMORIES};
        const MIB: usize = 1 << 20;
        // A large bound: what was asked for.
        assert_eq!(keep_resident_bytes(64 * MIB, 1 << 40), 64 * MIB);
        // A 6 GiB bound (a 24 GiB machine's default): its share of each pooled memory, in whole
        // 64 KiB pages.
        let kept = keep_resident_bytes(64 * MIB, 6 << 30);
        assert_eq!(kept % (64 << 10), 0);
        assert!(kept > 4 * MIB && kept <= 6 * MIB, "{kept}");
        assert!(kept as u64 * u64::from(POOLED_MEMORIES) <= 6 << 30);
        // Never more than asked.
        assert_eq!(keep_resident_bytes(MIB, 6 << 30), MIB);
    }
    use super::*;

    /// A staged input comes back in its shape or another of as many elements, with its bytes.
    #[test]
    fn staged_inputs_may_be_reshaped_but_not_resized() {
        let staged = || {
            HostTensor::new("image".into(), DType::U8, vec![2, 2, 3], (0..12).collect()).unwrap()
        };
        let returned = |dtype, shape: &[u64]| wit::Tensor {
            name: "image".into(),
            dtype,
            shape: shape.to_vec(),
            data: Vec::new(),
        };
        let t = filled_in(returned(wit::Dtype::U8, &[1, 2, 2, 3]), staged()).unwrap();
        assert_eq!(
            (t.shape, t.data),
            (vec![1, 2, 2, 3], (0..12).collect::<Vec<u8>>())
        );
        assert!(filled_in(returned(wit::Dtype::U8, &[2, 2, 3]), staged()).is_ok());
        for (dtype, shape) in [
            (wit::Dtype::U8, &[2, 2, 2][..]),
            (wit::Dtype::U8, &[u64::MAX, 2, 0]),
            (wit::Dtype::I8, &[2, 2, 3]),
        ] {
            let err = filled_in(returned(dtype, shape), staged())
                .unwrap_err()
                .to_string();
            assert!(err.contains("staged under that name"), "{err}");
        }
    }

    #[test]
    fn components_importing_outside_the_allowlist_are_refused() {
        let sandbox = Sandbox::new(1 << 30).unwrap();
        for import in [
            "wasi:sockets/tcp@0.2.0",
            "wasi:http/outgoing-handler@0.2.0",
            "evil:thing/x",
        ] {
            let text = format!(r#"(component (import "{import}" (instance)))"#);
            let bytes = wat::parse_str(&text).unwrap();
            let err = sandbox.validate(&bytes).unwrap_err().to_string();
            assert!(
                err.contains("may not use") && err.contains(import),
                "{import}: {err}"
            );
        }
        // Allowed imports pass this check (and fail later, for not exporting the world).
        let bytes =
            wat::parse_str(r#"(component (import "wasi:filesystem/preopens@0.2.0" (instance)))"#)
                .unwrap();
        let err = sandbox.validate(&bytes).unwrap_err().to_string();
        assert!(!err.contains("may not use"), "{err}");
    }

    #[test]
    fn imports_are_matched_by_interface_prefix() {
        assert!(import_allowed("wasi:cli/stdout@0.2.3"));
        assert!(import_allowed("tessera:handler/host@0.1.0"));
        assert!(!import_allowed("wasi:sockets/udp@0.2.3"));
        assert!(!import_allowed("wasi:clis/x"));
    }
}
