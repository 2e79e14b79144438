//! Loading: store → unpack (checked once per archive) → TorchScript on the device → handler
//! compiled → queue and workers started. Warm-up, the last step before a model is published,
//! is the caller's (see [`super::Residency::get`]): it runs requests through the serving path.
use super::{disk, LoadedModel, Residency, ResidencyError};
use crate::archive::{self, ArchiveError, Limits, Unpacked};
use crate::engine::Engine;
use crate::registry::Registration;
use crate::runtime::{self, verify, RuntimeError, TorchModel};
use crate::sandbox::{HandlerEnv, Sandbox, SandboxError};
use crate::tenancy::Tenant;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Device;

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
    /// How forward threads keep autograd out.
    pub grad_mode: runtime::GradMode,
    /// Whether models may use CUDA graphs (`--cuda-graphs`).
    pub cuda_graphs: bool,
    /// Whether models' `warm_up` methods run (`--model-warm-ups`).
    pub model_warm_ups: bool,
    /// Whether byte-identical weights of one tenant's models are held once (`--share-weights`).
    pub share_weights: bool,
}

/// A model's intra-op threads: its `tessera.intraOpThreads`, at most the machine's logical CPUs (a
/// tenant cannot make each op wake hundreds of threads), else 1 on a GPU, else the server's
/// default. A GPU model's forward does no CPU work worth sharing out, and any CPU op that did wake
/// an OpenMP team left its workers spinning on the other cores: 100-430 ms of CPU per LaMa
/// request on an H100 host's 16 cores with the default (bench/results/forward_gap_gpu_h100.md).
fn intra_op_threads(config: &archive::ModelConfig, device: Device) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match config.tessera.intra_op_threads {
        Some(n) => (n as usize).min(cores),
        None if device.is_cuda() => 1,
        None => runtime::default_intra_op_threads(),
    }
}

/// Loads models for [`Residency`].
pub struct Loader {
    pub config: LoaderConfig,
    pub sandbox: Arc<Sandbox>,
    /// Forward threads set by the management API (TorchServe's scale-workers) per model
    /// version, used instead of its `maxWorkers` at its next load.
    pub workers: Arc<WorkerOverrides>,
    /// Disk-tier folders in use (see [`disk::Pins`]).
    pub pins: Arc<disk::Pins>,
}

/// Worker counts set at runtime, per model version.
#[derive(Default)]
pub struct WorkerOverrides(
    std::sync::RwLock<std::collections::HashMap<crate::names::ModelKey, u32>>,
);

impl WorkerOverrides {
    pub fn get(&self, key: &crate::names::ModelKey) -> Option<u32> {
        self.0.read().unwrap().get(key).copied()
    }
    pub fn set(&self, key: crate::names::ModelKey, workers: u32) {
        self.0.write().unwrap().insert(key, workers);
    }
    pub fn clear(&self, key: &crate::names::ModelKey) {
        self.0.write().unwrap().remove(key);
    }
    /// Clears every version's count of `tenant`'s model `name`.
    pub fn clear_model(&self, tenant: &str, name: &str) {
        self.0
            .write()
            .unwrap()
            .retain(|k, _| !k.is_version_of(tenant, name));
    }
}

/// Why an archive's contents were refused by [`check_unpacked`].
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Handler(SandboxError),
    #[error(transparent)]
    Model(RuntimeError),
}

/// The one check of an unpacked archive's code, for uploads and loads alike: the handler is a
/// component of our world with allowed imports (kept compiled, by content hash, when
/// `keep_compiled`: a load uses it next), and every TorchScript file passes the sandboxed
/// operator check ([`verify`]).
pub fn check_unpacked(
    unpacked: &Unpacked,
    sandbox: &Sandbox,
    limits: verify::CheckLimits,
    keep_compiled: bool,
) -> Result<(), CheckError> {
    let handler = if keep_compiled {
        sandbox.compile(&unpacked.handler, &unpacked.handler_hash)
    } else {
        std::fs::read(&unpacked.handler)
            .map_err(|e| SandboxError::InvalidComponent(e.to_string()))
            .and_then(|bytes| sandbox.validate(&bytes))
    };
    handler.map_err(CheckError::Handler)?;
    verify::check_files(&unpacked.model_files, limits).map_err(CheckError::Model)
}

impl From<CheckError> for ResidencyError {
    fn from(e: CheckError) -> ResidencyError {
        match e {
            CheckError::Handler(e) => ResidencyError::Handler(e),
            CheckError::Model(e) => ResidencyError::Runtime(e),
        }
    }
}

impl Loader {
    /// Loads `reg` for `tenant`, making room in `residency` as it goes.
    pub async fn load(
        &self,
        residency: &Residency,
        reg: &Registration,
        tenant: &Tenant,
    ) -> Result<LoadedModel, ResidencyError> {
        let result = self.load_inner(residency, reg, tenant).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        let metrics = &residency.metrics;
        let k = &reg.key;
        metrics
            .loads
            .with_label_values(&[&k.tenant, &k.name, &k.version, outcome])
            .inc();
        match &result {
            Ok(m) => {
                metrics
                    .load_seconds
                    .with_label_values(&k.labels())
                    .observe(m.load_time.as_secs_f64());
                tracing::info!(
                    model = %m.key,
                    device = runtime::device_name(m.pipeline.device()),
                    bytes = m.weight(),
                    ms = m.load_time.as_millis() as u64,
                    unpack_ms = m.phases.unpack.map(|d| d.as_millis() as u64),
                    check_ms = m.phases.check.map(|d| d.as_millis() as u64),
                    torch_ms = m.phases.torch.as_millis() as u64,
                    handler_ms = m.phases.handler.as_millis() as u64,
                    cpu_tensor_bytes = runtime::cpu_tensor_bytes(),
                    "model loaded"
                );
            }
            Err(e) => tracing::warn!(model = %reg.key, error = %e, "model load failed"),
        }
        result
    }

    async fn load_inner(
        &self,
        residency: &Residency,
        reg: &Registration,
        tenant: &Tenant,
    ) -> Result<LoadedModel, ResidencyError> {
        let started = Instant::now();
        let key = &reg.key;
        // Stamped before unpacking: a replacement during the load is noticed at the next use.
        let source = super::model::archive_stamp(&reg.archive);
        let mut phases = LoadPhases::default();
        let (unpacked, pin, unpacked_now) = {
            let (archive, config, sandbox, pins) = (
                reg.archive.clone(),
                self.config.clone(),
                self.sandbox.clone(),
                self.pins.clone(),
            );
            let (unpacked, pin, unpacked_now, unpack, check) =
                blocking(move || unpack_cached(&archive, &config, &sandbox, &pins)).await??;
            (phases.unpack, phases.check) = (unpack, check);
            (unpacked, pin, unpacked_now)
        };
        if !unpacked.config.ignored_keys.is_empty() {
            tracing::warn!(model = %key, keys = ?unpacked.config.ignored_keys,
                "model-config.yaml sets TorchServe keys Tessera does not use; they are ignored");
        }
        let device = match (unpacked.config.device_type.as_deref(), self.config.device) {
            (Some("cpu"), _) => Device::Cpu,
            (_, d) => d,
        };
        let budget = residency.budget();
        let too_big = |what: &str, bytes: u64| {
            ResidencyError::InsufficientMemory(format!(
                "model '{}' {what} {} MiB, more than the whole residency budget of {} MiB",
                key.name,
                bytes >> 20,
                budget >> 20
            ))
        };
        if unpacked.model_bytes > budget {
            return Err(too_big("has TorchScript of", unpacked.model_bytes));
        }
        // Room for at least the archive's tensors and its stage cache, set aside before the
        // device is touched: waiting, as long as one of the tenant's requests may, while the
        // models holding the budget are busy.
        let stage_cache = unpacked
            .config
            .tessera
            .cached_stage
            .as_ref()
            .map_or(0, |s| s.cache_mib << 20);
        if unpacked.model_bytes + stage_cache > budget {
            return Err(too_big(
                "needs (with its stage cache)",
                unpacked.model_bytes + stage_cache,
            ));
        }
        let reservation = residency
            .reserve(
                key,
                unpacked.model_bytes + stage_cache,
                super::model::tenant_timeout(unpacked.config.response_timeout, tenant),
            )
            .await?;
        let executor = unpacked
            .config
            .tessera
            .executor
            .unwrap_or(self.config.executor);
        let torch_started = Instant::now();
        let stage = match (&unpacked.stage_file, &unpacked.config.tessera.cached_stage) {
            (Some(file), Some(spec)) => {
                let stage_executor = spec.executor.unwrap_or(executor);
                let model = self.load_torch(residency, file, device, reg, None).await?;
                let model = with_executor(model, stage_executor).await?;
                Some(runtime::Stage {
                    model,
                    inputs: spec.inputs.clone(),
                    cache: Arc::new(runtime::StageCache::new(spec.cache_mib << 20)),
                    executor: stage_executor,
                })
            }
            _ => None,
        };
        let tessera = &unpacked.config.tessera;
        let mut entry = self
            .load_torch(
                residency,
                &unpacked.model_file,
                device,
                reg,
                tessera.optimize,
            )
            .await?;
        if tessera.looped {
            entry = entry.with_loop().map_err(ResidencyError::Runtime)?;
        }
        if tessera.cuda_graphs && self.config.cuda_graphs {
            let max = tessera
                .max_cuda_graphs
                .unwrap_or(archive::DEFAULT_MAX_CUDA_GRAPHS);
            entry = entry.with_cuda_graphs(&key.to_string(), max as usize);
        }
        // After the graph rewrites above: an executor copies its function's graph.
        let entry = with_executor(entry, executor).await?;
        phases.torch = torch_started.elapsed();
        let mut pipeline = runtime::Pipeline::new(stage, entry);
        if !self.config.model_warm_ups {
            pipeline.disable_warm_ups();
        }
        if self.config.share_weights {
            // Before its first call (and CUDA-graph capture): its tensors may be repointed.
            let share_started = Instant::now();
            let scope = key.tenant.clone();
            let (back, shared) = blocking(move || {
                let shared = pipeline.share_weights(&scope);
                (pipeline, shared)
            })
            .await?;
            pipeline = back;
            match shared {
                Ok(s) if s.joined > 0 => tracing::info!(model = %key, shared_bytes = s.joined,
                    storages = s.storages, ms = share_started.elapsed().as_millis() as u64,
                    "weights shared with the tenant's other resident models"),
                Ok(s) => tracing::debug!(model = %key, storages = s.storages,
                    ms = share_started.elapsed().as_millis() as u64,
                    "no weights to share with resident models"),
                Err(e) => tracing::warn!(model = %key, error = %e,
                    "sharing weights failed: the model keeps its own copies"),
            }
        }
        if pipeline.held_bytes() > budget {
            return Err(too_big(
                "holds (with its stage cache)",
                pipeline.held_bytes(),
            ));
        }
        let handler_started = Instant::now();
        let handler = {
            let env = self.handler_env(reg, tenant, &unpacked, &pipeline);
            let (sandbox, path, hash) = (
                self.sandbox.clone(),
                unpacked.handler.clone(),
                unpacked.handler_hash.clone(),
            );
            blocking(move || sandbox.prepare(&path, &hash, env)).await??
        };
        phases.handler = handler_started.elapsed();
        let pipeline = Arc::new(pipeline);
        let workers = self.workers.get(key).unwrap_or(unpacked.config.max_workers) as usize;
        let engine = Engine::spawn(
            pipeline.clone(),
            workers,
            workers + self.config.max_queue,
            &key.name,
            runtime::ThreadMode {
                executor,
                grad: self.config.grad_mode,
                intra_op_threads: intra_op_threads(&unpacked.config, pipeline.device()),
            },
            batching(&key.to_string(), &unpacked.config),
            Duration::from_secs(unpacked.config.response_timeout),
            // Work between requests (graph captures, warm-up steps) is bounded like one of
            // this tenant's requests.
            super::model::tenant_timeout(unpacked.config.response_timeout, tenant),
            residency.quarantine_callback(key),
        )
        .map_err(|e| ResidencyError::Internal(format!("starting forward workers: {e}")))?;
        let model = LoadedModel::new(
            key.clone(),
            unpacked,
            pipeline,
            engine,
            handler,
            started.elapsed(),
            residency.now_ms(),
        )
        .with_source(&reg.archive, source)
        .with_disk_pin(pin)
        .with_reservation(reservation)
        .with_phases(phases);
        model.set_came_from(if unpacked_now {
            super::Tier::Store
        } else {
            super::Tier::Disk
        });
        Ok(model)
    }

    /// What the handler may see and use: assets, parameters, its memory cap (the archive's,
    /// lowered to the tenant's and the server's).
    fn handler_env(
        &self,
        reg: &Registration,
        tenant: &Tenant,
        unpacked: &Unpacked,
        pipeline: &runtime::Pipeline,
    ) -> HandlerEnv {
        let cap = tenant
            .limits
            .handler_memory_mib
            .map(|m| m << 20)
            .unwrap_or(u64::MAX)
            .min(self.config.handler_memory_bytes);
        let config = &unpacked.config;
        HandlerEnv {
            model: reg.key.to_string(),
            assets: unpacked.dir.join(archive::ASSETS_DIR),
            params: config
                .handler
                .keys()
                .filter_map(|k| config.handler_param(k).map(|v| (k.clone(), v)))
                .collect(),
            memory_bytes: config
                .tessera
                .handler_memory_mib
                .map(|m| (m << 20).min(cap))
                .unwrap_or(cap),
            max_response_bytes: self.config.max_response_bytes,
            stage_cache: pipeline.stage.as_ref().map(|s| s.cache.clone()),
        }
    }

    /// Loads one TorchScript file onto `device` (then rewrites it as `optimize` says),
    /// evicting per policy while it runs out of memory.
    async fn load_torch(
        &self,
        residency: &Residency,
        file: &Path,
        device: Device,
        reg: &Registration,
        optimize: Option<runtime::Optimize>,
    ) -> Result<TorchModel, ResidencyError> {
        let result = residency
            .retry_out_of_memory(&reg.key, u32::MAX, || {
                let path = file.to_path_buf();
                async move {
                    blocking(move || match optimize {
                        Some(how) => load_optimized(&path, device, how),
                        None => TorchModel::load(&path, device),
                    })
                    .await?
                    .map_err(ResidencyError::Runtime)
                }
            })
            .await;
        result.map_err(|e| match e {
            ResidencyError::Runtime(RuntimeError::OutOfMemory { message, .. }) => {
                ResidencyError::InsufficientMemory(format!(
                    "model '{}' does not fit on {} with every model it may evict evicted: {}",
                    reg.key.name,
                    runtime::device_name(device),
                    message.lines().next().unwrap_or_default()
                ))
            }
            e => e,
        })
    }
}

/// Where the optimised form of `file` is kept: per optimisation and device kind (a frozen
/// module holds its constants on one device; CPU and CUDA passes differ).
fn optimized_path(file: &Path, how: runtime::Optimize, device: Device) -> Option<PathBuf> {
    let how = match how {
        runtime::Optimize::Freeze => "freeze",
        // optimize_for_inference's graphs do not load back once saved ("required keyword
        // attribute 'value' is undefined", libtorch 2.11): optimised on every load.
        runtime::Optimize::Inference => return None,
    };
    let kind = if device.is_cuda() { "cuda" } else { "cpu" };
    let name = file.file_stem()?.to_string_lossy();
    Some(
        file.parent()?
            .join(archive::OPTIMIZED_DIR)
            .join(format!("{name}.{how}.{kind}.pt")),
    )
}

/// `file` loaded and optimised as `how` says. A frozen module is saved beside the unpacked
/// archive on its first load and loaded from there afterwards (freezing SD2 or LaMa on a GPU
/// takes seconds, every load otherwise); a saved copy that fails to load is frozen and saved
/// again. `inference` is applied on every load (its graphs do not load back). The saved copy is
/// the host's own output from a checked file, in the host's work dir, under a name no archive
/// may bring: it is not checked again.
fn load_optimized(
    file: &Path,
    device: Device,
    how: runtime::Optimize,
) -> Result<TorchModel, RuntimeError> {
    let started = std::time::Instant::now();
    let saved = optimized_path(file, how, device);
    if let Some(saved) = saved.as_ref().filter(|p| p.is_file()) {
        match TorchModel::load(saved, device) {
            Ok(model) => {
                tracing::info!(file = %saved.display(), ms = started.elapsed().as_millis() as u64,
                    "optimised model loaded as saved");
                return Ok(model);
            }
            Err(e @ RuntimeError::OutOfMemory { .. }) => return Err(e),
            Err(e) => {
                tracing::warn!(file = %saved.display(), error = %e,
                    "saved optimised model does not load: optimising again");
                let _ = std::fs::remove_file(saved);
            }
        }
    }
    // Read once to be frozen: the frozen file is the one loaded again, and copied.
    let model = TorchModel::load_as(
        file,
        device,
        runtime::tier::LoadPath::configured().without_copies(),
    )?
    .optimized(how)?;
    let optimised_ms = started.elapsed().as_millis() as u64;
    if let Some(saved) = saved {
        let kept = std::fs::create_dir_all(saved.parent().expect("a file in a folder"))
            .map_err(|e| RuntimeError::Load(e.to_string()))
            .and_then(|()| model.save_atomically(&saved));
        match kept {
            Ok(()) => tracing::info!(file = %saved.display(), ms = optimised_ms,
                "model optimised at load and saved for the next loads"),
            Err(e) => tracing::warn!(file = %file.display(), ms = optimised_ms, error = %e,
                "model optimised at load; not saved, so every load optimises it"),
        }
    }
    Ok(model)
}

/// Runs blocking work off the async runtime.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ResidencyError> {
    crate::blocking(f)
        .await
        .map_err(|e| ResidencyError::Internal(format!("worker thread failed: {e}")))
}

/// The unpacked directory for an archive in the disk tier ([`disk`]), unpacking on first
/// sight, its code checked ([`check_unpacked`]) before anything loads it, pinned for as long as
/// the returned [`disk::Pin`] lives. A replaced archive gets a new folder, unpacked and checked
/// afresh.
///
/// A folder (an archive SageMaker already unpacked) is scanned under the archive rules and
/// copied in.
fn unpack_cached(
    archive: &Path,
    config: &LoaderConfig,
    sandbox: &Sandbox,
    pins: &Arc<disk::Pins>,
) -> Result<UnpackedCached, ResidencyError> {
    let started = Instant::now();
    let (key, listing) = disk::key_of(archive, config.limits)?;
    let pin = pins.pin(&key);
    let root = disk::root(&config.work_dir);
    disk::record_source(&root, &key, archive)?;
    let dest = root.join(&key);
    let checked = disk::checked_file(&root, &key);
    let (unpacked, unpacked_now) = match std::fs::metadata(&dest) {
        Ok(m) if m.is_dir() => match archive::inspect(&dest) {
            Ok(u) => (u, false),
            Err(_) => {
                let _ = std::fs::remove_dir_all(&dest);
                let _ = std::fs::remove_file(&checked);
                (
                    unpack_fresh(archive, listing.as_deref(), &dest, config)?,
                    true,
                )
            }
        },
        _ => (
            unpack_fresh(archive, listing.as_deref(), &dest, config)?,
            true,
        ),
    };
    let unpack = unpacked_now.then(|| started.elapsed());
    let mut check = None;
    if !checked.is_file() {
        let started = Instant::now();
        let limits = verify::CheckLimits::for_files(
            &unpacked.model_files,
            config.check_seconds,
            config.check_memory_mib,
        );
        check_unpacked(&unpacked, sandbox, limits, true)?;
        std::fs::write(&checked, b"").map_err(archive::io_err(&checked))?;
        check = Some(started.elapsed());
    }
    Ok((unpacked, pin, unpacked_now, unpack, check))
}

/// `model`, with its executors made now if `executor` is the legacy one (libtorch picks the
/// kind when it creates each function's executor; see [`runtime::Executor::Legacy`]).
async fn with_executor(
    model: TorchModel,
    executor: runtime::Executor,
) -> Result<TorchModel, ResidencyError> {
    if executor != runtime::Executor::Legacy {
        return Ok(model);
    }
    blocking(move || model.use_legacy_executor().map(|_| model))
        .await?
        .map_err(ResidencyError::Runtime)
}

/// [`unpack_cached`]'s answer: the archive's files, the pin keeping them, whether they were
/// unpacked now, and how long unpacking and the check took (none when not done now).
type UnpackedCached = (
    Unpacked,
    disk::Pin,
    bool,
    Option<Duration>,
    Option<Duration>,
);

/// Where a load's time went, for its log line.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadPhases {
    /// Unpacking the archive into the disk tier (none: it was there).
    pub unpack: Option<Duration>,
    /// The sandboxed TorchScript and handler check (none: passed before).
    pub check: Option<Duration>,
    /// Loading the TorchScript onto the device (cached stage included).
    pub torch: Duration,
    /// Instantiating the handler (compiled once per content hash).
    pub handler: Duration,
}

fn unpack_fresh(
    archive: &Path,
    listing: Option<&[archive::DirEntry]>,
    dest: &Path,
    config: &LoaderConfig,
) -> Result<Unpacked, ArchiveError> {
    let done = match listing {
        Some(entries) => archive::import_dir(archive, entries, dest),
        None => archive::unpack(archive, dest, config.limits),
    };
    match done {
        // Another load of the same archive may have won the rename.
        Err(ArchiveError::Io { .. }) if dest.is_dir() => archive::inspect(dest),
        other => other,
    }
}

/// How `config`'s model batches: `batchSize` requests at most, `maxBatchDelay` ms of waiting,
/// when the model declares `tessera.batchable`.
fn batching(model: &str, config: &crate::archive::ModelConfig) -> crate::engine::Batching {
    if config.batch_size <= 1 {
        return crate::engine::Batching::OFF;
    }
    if !config.tessera.batchable {
        tracing::warn!(model, batch_size = config.batch_size,
            "batchSize > 1 but the model does not declare tessera.batchable (inputs and outputs batched along dimension 0): requests run one by one");
        return crate::engine::Batching::OFF;
    }
    crate::engine::Batching {
        max: config.batch_size as usize,
        delay: Duration::from_millis(config.max_batch_delay),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_models_intra_op_threads_are_capped_at_the_machines_cpus() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let config = |yaml: &str| archive::ModelConfig::parse(yaml).unwrap();
        let cuda = Device::Cuda(0);
        for device in [Device::Cpu, cuda] {
            assert_eq!(
                intra_op_threads(&config("tessera:\n  intraOpThreads: 1\n"), device),
                1
            );
            assert_eq!(
                intra_op_threads(&config("tessera:\n  intraOpThreads: 256\n"), device),
                cpus.min(256)
            );
        }
        assert_eq!(
            intra_op_threads(&config(""), Device::Cpu),
            runtime::default_intra_op_threads()
        );
        // GPU models that name none run their few CPU ops on the forward thread alone.
        assert_eq!(intra_op_threads(&config(""), cuda), 1);
    }
}
