//! Residency: which models are loaded on the device, within a memory budget.
//!
//! A moka cache maps `tenant/name@version` → [`LoadedModel`]; concurrent first requests for
//! one model share one load (moka's `try_get_with`). Each model is weighed by the bytes it
//! holds on its device (measured after load by the runtime) and the sum is kept within the
//! device budget by our own eviction policy, not moka's:
//!
//! - a victim is always idle (no request in flight) and never the model being loaded;
//! - fair share: every tenant is guaranteed a share of the budget (tenancy config). Victims
//!   are taken first from tenants holding more than their share, least recently used first,
//!   and otherwise only from the loading tenant's own models — so one tenant's churn can never
//!   evict another tenant that stays within its share. With one tenant this is plain LRU.
//!
//! Before a load we make room for the archive's size; after it, for what it really holds. A
//! load or forward that still runs out of memory evicts one more victim and retries; when no
//! victim is left the answer is 507. Requests hold an `Arc` to the model, so eviction only
//! drops the cache's reference: a model in use is freed when its last request finishes.
//!
//! Unpacked archives stay on local disk (the disk tier), keyed by the archive's identity, so a
//! reload after eviction skips the unpack.
//!
//! Lock order: the moka cache's internal locks only; the registry is never locked while
//! awaiting a load.
use crate::archive::{self, ArchiveError, Limits, Unpacked};
use crate::metrics::Metrics;
use crate::registry::Registration;
use crate::runtime::{self, verify, ForwardWorkers, RuntimeError, TorchModel};
use crate::sandbox::{Handler, HandlerEnv, Sandbox, SandboxError};
use crate::tenancy::{Tenant, Tenants};
use moka::future::Cache;
use moka::notification::RemovalCause;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tch::Device;
use tokio::sync::Semaphore;

#[derive(Debug, thiserror::Error)]
pub enum ResidencyError {
    #[error("{}", .0.as_rejection())]
    Archive(#[from] ArchiveError),
    #[error("model could not be loaded: {0}")]
    Runtime(RuntimeError),
    #[error("{0}")]
    Handler(#[from] SandboxError),
    #[error("insufficient memory: {0}")]
    InsufficientMemory(String),
    #[error("model '{0}' is quarantined: one of its forwards ran past its deadline by more than its responseTimeout and could not be stopped; unload it (DELETE /models/{{name}}) or upload a fixed version")]
    Quarantined(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// A model ready to serve: TorchScript on its device, handler compiled, limits in place.
pub struct LoadedModel {
    /// `tenant/name@version`.
    pub key: String,
    pub tenant: String,
    pub name: String,
    pub version: String,
    pub url: String,
    pub unpacked: Unpacked,
    /// The TorchScript (entry model, and the cached stage if any) on its device.
    pub pipeline: Arc<runtime::Pipeline>,
    /// The threads that run this model's forwards (maxWorkers of them).
    pub workers: ForwardWorkers,
    pub handler: Handler,
    /// Bytes held on the device (the cache weight).
    pub weight: u64,
    pub load_time: Duration,
    /// Permits for requests admitted at all (maxWorkers + queue); none left means 429.
    pub admission: Semaphore,
    /// Set once the archive's warm-up requests (if any) have run after this load.
    pub warmed: tokio::sync::OnceCell<()>,
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
    /// Base deadline and memory of the sandboxed TorchScript check.
    pub check_seconds: u64,
    pub check_memory_mib: u64,
    /// TorchScript executor of models that do not name one.
    pub executor: runtime::Executor,
}

pub struct Residency {
    cache: Cache<String, Arc<LoadedModel>>,
    /// Keys whose forward overran (see `runtime::ForwardWorkers`): refused until unloaded.
    quarantined: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Evictions to make room (not unloads), per `tenant/name`, for `GET /models`.
    evictions: std::sync::Mutex<HashMap<String, u64>>,
    budget: u64,
    tenants: Arc<Tenants>,
    sandbox: Arc<Sandbox>,
    config: LoaderConfig,
    metrics: Arc<Metrics>,
    clock: Instant,
}

impl Residency {
    pub fn new(
        budget: u64,
        tenants: Arc<Tenants>,
        sandbox: Arc<Sandbox>,
        config: LoaderConfig,
        metrics: Arc<Metrics>,
    ) -> Residency {
        let m = metrics.clone();
        let cache = Cache::builder()
            .eviction_listener(
                move |key: Arc<String>, model: Arc<LoadedModel>, cause: RemovalCause| {
                    if cause == RemovalCause::Replaced {
                        return;
                    }
                    m.resident_bytes.with_label_values(&[key.as_str()]).set(0);
                    m.resident_models.dec();
                    tracing::info!(
                        model = key.as_str(),
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
            tenants,
            sandbox,
            config,
            metrics,
            clock: Instant::now(),
            evictions: Default::default(),
            quarantined: Default::default(),
        }
    }

    /// The device budget in bytes.
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

    /// The resident model under `key`, if loaded.
    pub async fn peek(&self, key: &str) -> Option<Arc<LoadedModel>> {
        self.cache.get(key).await
    }

    /// Resident models whose key starts with `prefix`.
    pub fn resident_with_prefix(&self, prefix: &str) -> Vec<Arc<LoadedModel>> {
        self.cache
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, m)| m)
            .collect()
    }

    /// The model for `reg`, loading it if needed. Returns whether this call did the load.
    pub async fn get(
        &self,
        reg: &Registration,
        tenant: &Tenant,
    ) -> Result<(Arc<LoadedModel>, bool), Arc<ResidencyError>> {
        let key = reg.key();
        if self.is_quarantined(&key) {
            return Err(Arc::new(ResidencyError::Quarantined(format!(
                "{}@{}",
                reg.name, reg.version
            ))));
        }
        let loaded_here = std::sync::atomic::AtomicBool::new(false);
        let model = self
            .cache
            .try_get_with(key.clone(), async {
                loaded_here.store(true, Ordering::Relaxed);
                self.load(reg, tenant).await.map(Arc::new)
            })
            .await?;
        let loaded_here = loaded_here.load(Ordering::Relaxed);
        if loaded_here {
            self.metrics.resident_models.inc();
            self.metrics
                .resident_bytes
                .with_label_values(&[key.as_str()])
                .set(model.weight as i64);
            // Now that the real size is known, bring the total back within the budget.
            while self.used().await > self.budget {
                if !self.evict_one(&reg.tenant, &key, "budget").await {
                    tracing::warn!(model = key, budget = self.budget,
                        "over the residency budget: every other model is busy or within its tenant's share");
                    break;
                }
            }
        }
        Ok((model, loaded_here))
    }

    /// Whether `key` was quarantined (a forward overran and could not be stopped).
    pub fn is_quarantined(&self, key: &str) -> bool {
        self.quarantined
            .lock()
            .map(|q| q.contains(key))
            .unwrap_or(false)
    }

    fn clear_quarantine(&self, prefix: &str) {
        if let Ok(mut q) = self.quarantined.lock() {
            q.retain(|k| !k.starts_with(prefix));
        }
    }

    /// Unloads one model version.
    pub async fn remove_key(&self, key: &str) {
        self.clear_quarantine(key);
        if self.cache.contains_key(key) {
            self.metrics
                .evictions
                .with_label_values(&[key, "unload"])
                .inc();
            self.cache.invalidate(key).await;
            self.cache.run_pending_tasks().await;
        }
    }

    /// Drops every resident version of `tenant/name` (unload). Returns how many were resident.
    pub async fn remove_model(&self, tenant: &str, name: &str) -> usize {
        self.clear_quarantine(&format!("{tenant}/{name}@"));
        let victims = self.resident_with_prefix(&format!("{tenant}/{name}@"));
        for m in &victims {
            self.metrics
                .evictions
                .with_label_values(&[m.key.as_str(), "unload"])
                .inc();
            self.cache.invalidate(&m.key).await;
        }
        self.cache.run_pending_tasks().await;
        victims.len()
    }

    /// Evicts one idle model chosen by the fair-share policy (see the module docs) on behalf of
    /// `tenant`, never `except`. False if there is no eligible victim.
    pub async fn evict_one(&self, tenant: &str, except: &str, reason: &str) -> bool {
        self.cache.run_pending_tasks().await;
        let resident: Vec<(String, Arc<LoadedModel>)> = self
            .cache
            .iter()
            .map(|(k, m)| (k.as_str().to_string(), m))
            .collect();
        let mut usage: HashMap<&str, u64> = HashMap::new();
        for (_, m) in &resident {
            *usage.entry(m.tenant.as_str()).or_default() += m.weight;
        }
        let shares = self.tenants.shares();
        let over_share = |t: &str| {
            let share = shares.get(t).copied().unwrap_or(0.0);
            usage.get(t).copied().unwrap_or(0) as f64 > share * self.budget as f64
        };
        let least_recent = |pick: &dyn Fn(&LoadedModel) -> bool| {
            resident
                .iter()
                .filter(|(k, m)| k != except && m.in_use() == 0 && pick(m))
                .min_by_key(|(_, m)| m.last_used.load(Ordering::Relaxed))
                .map(|(k, _)| k.clone())
        };
        let victim = least_recent(&|m| over_share(&m.tenant))
            .or_else(|| least_recent(&|m| m.tenant == tenant));
        let Some(key) = victim else { return false };
        tracing::info!(
            model = key,
            reason,
            for_tenant = tenant,
            "evicting to make room"
        );
        self.metrics
            .evictions
            .with_label_values(&[key.as_str(), reason])
            .inc();
        let model = key
            .split_once('@')
            .map_or(key.as_str(), |(m, _)| m)
            .to_string();
        *self.evictions.lock().unwrap().entry(model).or_default() += 1;
        self.cache.invalidate(&key).await;
        self.cache.run_pending_tasks().await;
        true
    }

    /// How often `tenant`'s model `name` (any version) was evicted to make room.
    pub fn evictions_of(&self, tenant: &str, name: &str) -> u64 {
        let evictions = self.evictions.lock().unwrap();
        evictions
            .get(&format!("{tenant}/{name}"))
            .copied()
            .unwrap_or(0)
    }

    /// Loads one TorchScript file onto `device`; on out-of-memory evicts per policy and retries.
    async fn load_torch(
        &self,
        file: &std::path::Path,
        device: Device,
        reg: &Registration,
    ) -> Result<TorchModel, ResidencyError> {
        loop {
            let path = file.to_path_buf();
            match blocking(move || TorchModel::load(&path, device)).await? {
                Ok(t) => return Ok(t),
                Err(RuntimeError::OutOfMemory { message, .. }) => {
                    if !self
                        .evict_one(&reg.tenant, &reg.key(), "out-of-memory")
                        .await
                    {
                        return Err(ResidencyError::InsufficientMemory(format!(
                            "model '{}' does not fit on {} with every model it may evict evicted: {}",
                            reg.name,
                            runtime::device_name(device),
                            message.lines().next().unwrap_or_default()
                        )));
                    }
                }
                Err(e) => return Err(ResidencyError::Runtime(e)),
            }
        }
    }

    async fn load(
        &self,
        reg: &Registration,
        tenant: &Tenant,
    ) -> Result<LoadedModel, ResidencyError> {
        let started = Instant::now();
        let result = self.load_inner(reg, tenant).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .loads
            .with_label_values(&[reg.key().as_str(), outcome])
            .inc();
        match &result {
            Ok(m) => {
                self.metrics
                    .load_seconds
                    .observe(started.elapsed().as_secs_f64());
                tracing::info!(
                    model = m.key,
                    device = runtime::device_name(m.pipeline.device()),
                    bytes = m.weight,
                    ms = started.elapsed().as_millis() as u64,
                    cpu_tensor_bytes = runtime::cpu_tensor_bytes(),
                    "model loaded"
                );
            }
            Err(e) => tracing::warn!(model = reg.key(), error = %e, "model load failed"),
        }
        result
    }

    async fn load_inner(
        &self,
        reg: &Registration,
        tenant: &Tenant,
    ) -> Result<LoadedModel, ResidencyError> {
        let started = Instant::now();
        let key = reg.key();
        let unpacked = {
            let (archive, config) = (reg.archive.clone(), self.config.clone());
            blocking(move || unpack_cached(&archive, &config)).await??
        };
        let device = match (unpacked.config.device_type.as_deref(), self.config.device) {
            (Some("cpu"), _) => Device::Cpu,
            (_, d) => d,
        };
        let too_big = |what: &str, bytes: u64| {
            ResidencyError::InsufficientMemory(format!(
                "model '{}' {what} {} MiB, more than the whole residency budget of {} MiB",
                reg.name,
                bytes >> 20,
                self.budget >> 20
            ))
        };
        if unpacked.model_bytes > self.budget {
            return Err(too_big("has TorchScript of", unpacked.model_bytes));
        }
        // Make room for at least the archive's tensors before touching the device.
        while self.used().await + unpacked.model_bytes > self.budget {
            if !self.evict_one(&reg.tenant, &key, "budget").await {
                break;
            }
        }
        let stage = match (&unpacked.stage_file, &unpacked.config.tessera.cached_stage) {
            (Some(file), Some(spec)) => Some(runtime::Stage {
                model: self.load_torch(file, device, reg).await?,
                inputs: spec.inputs.clone(),
                cache: Arc::new(runtime::StageCache::new(spec.cache_mib << 20)),
            }),
            _ => None,
        };
        let entry = self.load_torch(&unpacked.model_file, device, reg).await?;
        let pipeline = runtime::Pipeline { stage, entry };
        if pipeline.held_bytes() > self.budget {
            return Err(too_big(
                "holds (with its stage cache)",
                pipeline.held_bytes(),
            ));
        }
        let cap = tenant
            .limits
            .handler_memory_mib
            .map(|m| m << 20)
            .unwrap_or(u64::MAX)
            .min(self.config.handler_memory_bytes);
        let env = HandlerEnv {
            model: key.clone(),
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
                .map(|m| (m << 20).min(cap))
                .unwrap_or(cap),
            max_response_bytes: self.config.max_response_bytes,
            stage_cache: pipeline.stage.as_ref().map(|s| s.cache.clone()),
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
        let pipeline = Arc::new(pipeline);
        let quarantine = {
            let (set, key) = (self.quarantined.clone(), key.clone());
            Box::new(move || {
                if let Ok(mut q) = set.lock() {
                    q.insert(key.clone());
                }
            })
        };
        let grace = Duration::from_secs(unpacked.config.response_timeout);
        let executor = unpacked
            .config
            .tessera
            .executor
            .unwrap_or(self.config.executor);
        let forward = ForwardWorkers::spawn(
            pipeline.clone(),
            workers,
            &reg.name,
            executor,
            grace,
            quarantine,
        )
        .map_err(|e| ResidencyError::Internal(format!("starting forward workers: {e}")))?;
        if unpacked.config.batch_size > 1 {
            tracing::warn!(model = key, batch_size = unpacked.config.batch_size,
                "batchSize > 1: cross-request batching is not implemented yet; requests run one by one");
        }
        Ok(LoadedModel {
            key,
            tenant: reg.tenant.clone(),
            name: reg.name.clone(),
            version: reg.version.clone(),
            url: reg.url.clone(),
            weight: pipeline.held_bytes(),
            pipeline,
            workers: forward,
            handler,
            load_time: started.elapsed(),
            admission: Semaphore::new(workers + self.config.max_queue),
            warmed: tokio::sync::OnceCell::new(),
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

/// The unpacked directory for an archive, unpacking on first sight, its TorchScript checked
/// ([`verify`]) before anything loads it. Keyed by path, size and mtime, so a replaced archive
/// is unpacked and checked afresh.
fn unpack_cached(
    archive: &std::path::Path,
    config: &LoaderConfig,
) -> Result<Unpacked, ResidencyError> {
    let meta = std::fs::metadata(archive).map_err(archive::io_err(archive))?;
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
    let dest = config.work_dir.join("unpacked").join(&key);
    // Written once the unpacked TorchScript passed the sandboxed check; never inside `dest`,
    // which holds the archive's own files.
    let checked = config
        .work_dir
        .join("unpacked")
        .join(format!("{key}.checked"));
    let unpacked = match std::fs::metadata(&dest) {
        Ok(m) if m.is_dir() => match archive::inspect(&dest) {
            Ok(u) => u,
            Err(_) => {
                let _ = std::fs::remove_dir_all(&dest);
                let _ = std::fs::remove_file(&checked);
                unpack_fresh(archive, &dest, config)?
            }
        },
        _ => unpack_fresh(archive, &dest, config)?,
    };
    if !checked.is_file() {
        let limits = verify::CheckLimits::for_files(
            &unpacked.model_files,
            config.check_seconds,
            config.check_memory_mib,
        );
        verify::check_files(&unpacked.model_files, limits).map_err(ResidencyError::Runtime)?;
        std::fs::write(&checked, b"").map_err(archive::io_err(&checked))?;
    }
    Ok(unpacked)
}

fn unpack_fresh(
    archive: &std::path::Path,
    dest: &std::path::Path,
    config: &LoaderConfig,
) -> Result<Unpacked, ArchiveError> {
    match archive::unpack(archive, dest, config.limits) {
        // Another load of the same archive may have won the rename.
        Err(ArchiveError::Io { .. }) if dest.is_dir() => archive::inspect(dest),
        other => other,
    }
}
