//! Residency: which models are loaded on the device, within a memory budget.
//!
//! A moka cache maps model name → [`LoadedModel`], weighed by the bytes each model holds on its
//! device (measured after load by the runtime), bounded by the device budget, evicting least
//! recently used first. Concurrent first requests for one model share one load (moka's
//! `try_get_with`). Requests hold an `Arc` to the model, so eviction only drops the cache's
//! reference: a model in use is freed when its last request finishes, never under it.
//! Before a load we make room for the archive's size by evicting idle models, oldest first; a
//! load or forward that still runs out of memory evicts one more idle model and retries, and
//! when nothing idle is left the answer is 507.
//!
//! Unpacked archives stay on local disk (the disk tier), keyed by the archive's identity, so a
//! reload after eviction skips the unpack.
//!
//! Lock order: the moka cache's internal locks only; the registry is never locked while
//! awaiting a load.
use crate::archive::{self, ArchiveError, Limits, Unpacked};
use crate::metrics::Metrics;
use crate::registry::Registration;
use crate::runtime::{self, ForwardWorkers, RuntimeError, TorchModel};
use crate::sandbox::{Handler, HandlerEnv, Sandbox, SandboxError};
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tch::Device;
use tokio::sync::Semaphore;

const KIB: u64 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ResidencyError {
    #[error("model archive rejected: {0}")]
    Archive(#[from] ArchiveError),
    #[error("model could not be loaded: {0}")]
    Runtime(RuntimeError),
    #[error("{0}")]
    Handler(#[from] SandboxError),
    #[error("insufficient memory: {0}")]
    InsufficientMemory(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A model ready to serve: TorchScript on its device, handler compiled, limits in place.
pub struct LoadedModel {
    pub name: String,
    pub url: String,
    pub unpacked: Unpacked,
    pub torch: Arc<TorchModel>,
    /// The threads that run this model's forwards (maxWorkers of them).
    pub workers: ForwardWorkers,
    pub handler: Handler,
    /// Bytes held on the device (the cache weight).
    pub weight: u64,
    pub loaded_at: SystemTime,
    pub load_time: Duration,
    /// Permits for requests admitted at all (maxWorkers + queue); none left means 429.
    pub admission: Semaphore,
    in_use: AtomicUsize,
    last_used: AtomicU64,
}

impl LoadedModel {
    /// Marks the model busy for the guard's lifetime (it will not be chosen for eviction).
    pub fn begin(self: &Arc<Self>, clock: &Instant) -> InUse {
        self.in_use.fetch_add(1, Ordering::SeqCst);
        self.last_used
            .store(clock.elapsed().as_millis() as u64, Ordering::Relaxed);
        InUse(self.clone())
    }
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::SeqCst)
    }
}

/// Keeps a model marked busy.
pub struct InUse(pub Arc<LoadedModel>);
impl Drop for InUse {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Settings for loading.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub work_dir: PathBuf,
    pub limits: Limits,
    pub device: Device,
    pub handler_memory_bytes: u64,
    pub max_response_bytes: usize,
    pub max_queue: usize,
}

pub struct Residency {
    cache: Cache<String, Arc<LoadedModel>>,
    budget: u64,
    sandbox: Arc<Sandbox>,
    config: LoaderConfig,
    metrics: Arc<Metrics>,
    clock: Instant,
}

impl Residency {
    pub fn new(
        budget: u64,
        sandbox: Arc<Sandbox>,
        config: LoaderConfig,
        metrics: Arc<Metrics>,
    ) -> Residency {
        let m = metrics.clone();
        let cache = Cache::builder()
            .max_capacity(budget / KIB)
            .weigher(|_k: &String, v: &Arc<LoadedModel>| {
                (v.weight / KIB).clamp(1, u32::MAX as u64) as u32
            })
            .eviction_policy(EvictionPolicy::lru())
            .eviction_listener(
                move |name: Arc<String>, model: Arc<LoadedModel>, cause: RemovalCause| {
                    let cause = match cause {
                        RemovalCause::Size => "size",
                        RemovalCause::Explicit => "explicit",
                        RemovalCause::Replaced => return,
                        RemovalCause::Expired => "expired",
                    };
                    m.evictions.with_label_values(&[name.as_str(), cause]).inc();
                    m.resident_bytes.with_label_values(&[name.as_str()]).set(0);
                    m.resident_models.dec();
                    tracing::info!(
                        model = name.as_str(),
                        cause,
                        bytes = model.weight,
                        in_use = model.in_use(),
                        "model evicted{}",
                        if model.in_use() > 0 {
                            " (freed when its requests finish)"
                        } else {
                            ""
                        }
                    );
                },
            )
            .build();
        Residency {
            cache,
            budget,
            sandbox,
            config,
            metrics,
            clock: Instant::now(),
        }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn clock(&self) -> &Instant {
        &self.clock
    }

    /// Bytes currently accounted to resident models.
    pub async fn used(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.iter().map(|(_, m)| m.weight).sum()
    }

    /// The resident model, if loaded.
    pub async fn peek(&self, name: &str) -> Option<Arc<LoadedModel>> {
        self.cache.get(name).await
    }

    /// The model for `reg`, loading it if needed. Returns whether this call did the load.
    pub async fn get(
        &self,
        reg: &Registration,
    ) -> Result<(Arc<LoadedModel>, bool), Arc<ResidencyError>> {
        let loaded_here = std::sync::atomic::AtomicBool::new(false);
        let model = self
            .cache
            .try_get_with(reg.name.clone(), async {
                loaded_here.store(true, Ordering::Relaxed);
                self.load(reg).await.map(Arc::new)
            })
            .await?;
        if loaded_here.load(Ordering::Relaxed) {
            self.metrics.resident_models.inc();
            self.metrics
                .resident_bytes
                .with_label_values(&[reg.name.as_str()])
                .set(model.weight as i64);
            // Apply the size bound now rather than lazily, so the budget holds after each load.
            self.cache.run_pending_tasks().await;
        }
        Ok((model, loaded_here.load(Ordering::Relaxed)))
    }

    /// Drops `name` from residency (unload). Returns whether it was resident.
    pub async fn remove(&self, name: &str) -> bool {
        let was = self.cache.remove(name).await.is_some();
        self.cache.run_pending_tasks().await;
        was
    }

    /// Evicts the least recently used idle model other than `except`; false if there is none.
    pub async fn evict_one_idle(&self, except: &str, cause: &str) -> bool {
        let victim = self
            .cache
            .iter()
            .filter(|(k, m)| k.as_str() != except && m.in_use() == 0)
            .min_by_key(|(_, m)| m.last_used.load(Ordering::Relaxed))
            .map(|(k, _)| k.as_str().to_string());
        match victim {
            Some(name) => {
                tracing::info!(model = name, reason = cause, "evicting to make room");
                self.cache.invalidate(&name).await;
                self.cache.run_pending_tasks().await;
                true
            }
            None => false,
        }
    }

    async fn load(&self, reg: &Registration) -> Result<LoadedModel, ResidencyError> {
        let started = Instant::now();
        let result = self.load_inner(reg).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .loads
            .with_label_values(&[reg.name.as_str(), outcome])
            .inc();
        match &result {
            Ok(m) => {
                self.metrics
                    .load_seconds
                    .observe(started.elapsed().as_secs_f64());
                tracing::info!(
                    model = reg.name,
                    device = runtime::device_name(m.torch.device),
                    bytes = m.weight,
                    ms = started.elapsed().as_millis() as u64,
                    "model loaded"
                );
            }
            Err(e) => tracing::warn!(model = reg.name, error = %e, "model load failed"),
        }
        result
    }

    async fn load_inner(&self, reg: &Registration) -> Result<LoadedModel, ResidencyError> {
        let started = Instant::now();
        let unpacked = {
            let (archive, config) = (reg.archive.clone(), self.config.clone());
            blocking(move || unpack_cached(&archive, &config)).await??
        };
        let device = match (unpacked.config.device_type.as_deref(), self.config.device) {
            (Some("cpu"), _) => Device::Cpu,
            (_, d) => d,
        };
        if unpacked.model_bytes > self.budget {
            return Err(ResidencyError::InsufficientMemory(format!(
                "model '{}' has {} MiB of TorchScript, more than the whole residency budget of {} MiB",
                reg.name,
                unpacked.model_bytes >> 20,
                self.budget >> 20
            )));
        }
        // Make room for at least the archive's tensors before touching the device.
        while self.used().await + unpacked.model_bytes > self.budget {
            if !self.evict_one_idle(&reg.name, "budget before load").await {
                break;
            }
        }
        let torch = loop {
            let path = unpacked.model_file.clone();
            match blocking(move || TorchModel::load(&path, device)).await? {
                Ok(t) => break t,
                Err(RuntimeError::OutOfMemory { message, .. }) => {
                    if !self
                        .evict_one_idle(&reg.name, "out of memory at load")
                        .await
                    {
                        return Err(ResidencyError::InsufficientMemory(format!(
                            "model '{}' does not fit on {} even with every idle model evicted: {}",
                            reg.name,
                            runtime::device_name(device),
                            message.lines().next().unwrap_or_default()
                        )));
                    }
                }
                Err(e) => return Err(ResidencyError::Runtime(e)),
            }
        };
        if torch.held_bytes > self.budget {
            return Err(ResidencyError::InsufficientMemory(format!(
                "model '{}' holds {} MiB, more than the whole residency budget of {} MiB",
                reg.name,
                torch.held_bytes >> 20,
                self.budget >> 20
            )));
        }
        let env = HandlerEnv {
            model: reg.name.clone(),
            assets: unpacked.dir.join(archive::ASSETS_DIR),
            params: unpacked
                .config
                .handler
                .keys()
                .filter_map(|k| unpacked.config.handler_param(k).map(|v| (k.clone(), v)))
                .collect(),
            memory_bytes: unpacked
                .config
                .tessera
                .handler_memory_mib
                .map(|m| (m << 20).min(self.config.handler_memory_bytes))
                .unwrap_or(self.config.handler_memory_bytes),
            max_response_bytes: self.config.max_response_bytes,
        };
        let handler = {
            let (sandbox, path, hash) = (
                self.sandbox.clone(),
                unpacked.handler.clone(),
                unpacked.handler_hash.clone(),
            );
            blocking(move || sandbox.prepare(&path, &hash, env)).await??
        };
        let workers = unpacked.config.max_workers as usize;
        let torch = Arc::new(torch);
        let forward = ForwardWorkers::spawn(torch.clone(), workers, &reg.name)
            .map_err(|e| ResidencyError::Internal(format!("starting forward workers: {e}")))?;
        if unpacked.config.batch_size > 1 {
            tracing::warn!(model = reg.name, batch_size = unpacked.config.batch_size,
                "batchSize > 1: cross-request batching is not implemented yet; requests run one by one");
        }
        Ok(LoadedModel {
            name: reg.name.clone(),
            url: reg.url.clone(),
            weight: torch.held_bytes,
            torch,
            handler,
            loaded_at: SystemTime::now(),
            load_time: started.elapsed(),
            workers: forward,
            admission: Semaphore::new(workers + self.config.max_queue),
            in_use: AtomicUsize::new(0),
            last_used: AtomicU64::new(self.clock.elapsed().as_millis() as u64),
            unpacked,
        })
    }
}

/// Runs blocking work off the async runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ResidencyError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ResidencyError::Internal(format!("worker thread failed: {e}")))
}

/// The unpacked directory for an archive, unpacking on first sight. Keyed by path, size and
/// mtime, so a replaced archive is unpacked afresh.
fn unpack_cached(
    archive: &std::path::Path,
    config: &LoaderConfig,
) -> Result<Unpacked, ArchiveError> {
    let meta = std::fs::metadata(archive).map_err(|source| ArchiveError::Io {
        path: archive.into(),
        source,
    })?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .unwrap_or_default();
    let mut h = Sha256::new();
    h.update(archive.to_string_lossy().as_bytes());
    h.update(meta.len().to_le_bytes());
    h.update(mtime.as_nanos().to_le_bytes());
    let key = hex::encode(&h.finalize()[..12]);
    let dest = config.work_dir.join("unpacked").join(key);
    if dest.is_dir() {
        if let Ok(u) = archive::inspect(&dest) {
            return Ok(u);
        }
        let _ = std::fs::remove_dir_all(&dest);
    }
    match archive::unpack(archive, &dest, config.limits) {
        // Another load of the same archive may have won the rename.
        Err(ArchiveError::Io { .. }) if dest.is_dir() => archive::inspect(&dest),
        other => other,
    }
}
