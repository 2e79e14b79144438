//! One inference request, top to bottom: resolve the name, make the model resident, admit the
//! request (or answer 429), run the handler's preprocess, the forward on the device and the
//! handler's postprocess, each off the async runtime and all within the model's
//! responseTimeout.
use crate::archive::Limits;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryError};
use crate::residency::{blocking, LoadedModel, LoaderConfig, Residency, ResidencyError};
use crate::runtime::{self, PipelineInput, RuntimeError};
use crate::sandbox::{HandlerRequest, HandlerResponse, Sandbox, SandboxError};
use crate::store::LocalStore;
use crate::tenancy::{Tenant, Tenants};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Everything that can go wrong serving a request; the HTTP layer maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Residency(Arc<ResidencyError>),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("model '{0}' is busy: its queue is full, retry later")]
    Overloaded(String),
    #[error("request timed out after {0:?} (model responseTimeout)")]
    Timeout(Duration),
}

impl From<Arc<ResidencyError>> for InferenceError {
    fn from(e: Arc<ResidencyError>) -> Self {
        InferenceError::Residency(e)
    }
}
impl From<ResidencyError> for InferenceError {
    fn from(e: ResidencyError) -> Self {
        InferenceError::Residency(Arc::new(e))
    }
}

/// Timings of one request, returned to the client as headers.
#[derive(Debug, Default, Clone)]
pub struct Timings {
    /// The model version that served the request.
    pub version: String,
    /// For models with a cached stage: whether its outputs came from the cache.
    pub stage_cache: Option<bool>,
    pub load: Option<Duration>,
    pub queue: Duration,
    pub preprocess: Duration,
    pub inference: Duration,
    pub postprocess: Duration,
}

/// The server's shared state.
pub struct Tessera {
    pub config: Config,
    pub tenants: Arc<Tenants>,
    pub registry: Registry,
    pub residency: Residency,
    pub sandbox: Arc<Sandbox>,
    pub metrics: Arc<Metrics>,
    pub device: tch::Device,
    /// Where archives are unpacked; removed at shutdown when the server chose it.
    pub work_dir: std::path::PathBuf,
    next_id: std::sync::atomic::AtomicU64,
}

impl Tessera {
    /// Builds the server state from its config.
    pub fn new(config: Config) -> anyhow::Result<Arc<Tessera>> {
        let tenants = Arc::new(match &config.tenants {
            Some(path) => Tenants::from_file(path)?,
            None => Tenants::single(),
        });
        crate::tenancy::check_bind(config.bind, &tenants).map_err(anyhow::Error::msg)?;
        let device = runtime::parse_device(&config.device).map_err(anyhow::Error::msg)?;
        let device = match device {
            tch::Device::Cuda(_) if !tch::Cuda::is_available() => {
                anyhow::bail!(
                    "device {} requested but CUDA is not available",
                    config.device
                )
            }
            d => d,
        };
        let budget = match config.memory_budget_mib {
            0 => default_budget(device),
            mib => mib << 20,
        };
        let work_dir = config.work_dir.clone().unwrap_or_else(|| {
            remove_dead_work_dirs();
            std::env::temp_dir().join(format!("{WORK_DIR_PREFIX}{}", std::process::id()))
        });
        std::fs::create_dir_all(&work_dir)?;
        crate::archive::remove_partials(&work_dir.join("unpacked"));
        let sandbox = Sandbox::new(config.handler_memory_total_bytes())?;
        if !runtime::cap_cpu_tensor_memory(config.max_cpu_tensor_bytes()) {
            tracing::warn!("could not install the CPU tensor memory cap");
        }
        let metrics = Arc::new(Metrics::new());
        let loader = LoaderConfig {
            work_dir: work_dir.clone(),
            limits: Limits {
                max_archive_bytes: config.max_archive_bytes(),
                max_unpacked_bytes: config.max_unpacked_bytes(),
            },
            device,
            handler_memory_bytes: config.handler_memory_bytes(),
            max_response_bytes: config.max_response_bytes(),
            max_queue: config.max_queue,
            check_seconds: config.model_check_seconds,
            check_memory_mib: config.model_check_memory_mib,
            executor: config.torchscript_executor,
        };
        tracing::info!(
            backend = runtime::configure(config.cudnn_benchmark, config.torchscript_executor),
            "libtorch"
        );
        tracing::info!(device = runtime::device_name(device), budget_mib = budget >> 20,
            store = %config.model_store.display(), "tessera starting");
        Ok(Arc::new(Tessera {
            registry: Registry::new(
                LocalStore::new(config.model_store.clone()),
                !tenants.multi_tenant(),
            ),
            residency: Residency::new(
                budget,
                tenants.clone(),
                sandbox.clone(),
                loader,
                metrics.clone(),
            ),
            tenants,
            sandbox,
            metrics,
            device,
            work_dir,
            config,
            next_id: Default::default(),
        }))
    }

    /// Removes the unpacked-archive folder if the server picked it (no `--work-dir`).
    pub fn cleanup(&self) {
        if self.config.work_dir.is_none() {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }

    /// A short unique request id.
    pub fn request_id(&self) -> String {
        let n = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{:x}-{n}", std::process::id())
    }

    /// Makes `tenant`'s model `name` (at `version`, or its default) resident.
    pub async fn ensure_loaded(
        &self,
        tenant: &Tenant,
        name: &str,
        version: Option<&str>,
    ) -> Result<(Arc<LoadedModel>, bool), InferenceError> {
        let reg = self.registry.resolve(&tenant.name, name, version)?;
        Ok(self.residency.get(&reg, tenant).await?)
    }

    /// Serves one request for `tenant`'s model `name` (at `version`, or its default).
    pub async fn invoke(
        &self,
        tenant: &Tenant,
        name: &str,
        version: Option<&str>,
        request: HandlerRequest,
        request_id: &str,
    ) -> Result<(HandlerResponse, Timings), InferenceError> {
        let mut timings = Timings::default();
        let load_started = Instant::now();
        let (model, loaded_now) = self.ensure_loaded(tenant, name, version).await?;
        if loaded_now {
            timings.load = Some(load_started.elapsed());
        }
        timings.version = model.version.clone();
        let _busy = model.begin(self.residency.clock());
        let seconds = model.unpacked.config.response_timeout;
        let timeout = Duration::from_secs(
            tenant
                .limits
                .handler_timeout_seconds
                .map_or(seconds, |t| t.min(seconds)),
        );
        // Requests wait for the warm-up of a fresh load (all of them: it runs once), which
        // runs under the same time limit as a request of this tenant.
        model
            .warmed
            .get_or_init(|| self.warm_up(&model, timeout))
            .await;
        let deadline = Instant::now() + timeout;
        let _admitted = model.admission.try_acquire().map_err(|_| {
            self.metrics
                .rejected
                .with_label_values(&[model.key.as_str()])
                .inc();
            InferenceError::Overloaded(name.to_string())
        })?;
        // The sandbox enforces `deadline` itself and says which handler call overran; the outer
        // timer (a little later) catches waits and forwards, which cannot be interrupted.
        let outer = timeout + Duration::from_millis(250);
        match tokio::time::timeout(
            outer,
            self.run(&model, request, request_id, deadline, &mut timings),
        )
        .await
        {
            Ok(result) => result.map(|r| (r, timings)),
            Err(_) => Err(InferenceError::Timeout(timeout)),
        }
    }

    /// Replays the archive's warm-up request (`tessera.warmup`) through handler and model. A
    /// failure is logged and serving goes on: warm-up only moves one-time costs off users.
    async fn warm_up(&self, model: &Arc<LoadedModel>, timeout: Duration) {
        let Some(w) = model.unpacked.config.tessera.warmup.clone() else {
            return;
        };
        let path = model
            .unpacked
            .dir
            .join(crate::archive::ASSETS_DIR)
            .join(&w.request);
        // The body is the tenant's: bounded like any request body before it is read.
        let limit = self.config.max_request_bytes() as u64;
        let body = match tokio::fs::metadata(&path).await {
            Ok(m) if !m.is_file() || m.len() > limit => {
                tracing::warn!(model = %model.key, bytes = m.len(), limit,
                    "warm-up request {} is not a file within the request size limit; serving without warm-up", w.request);
                return;
            }
            Ok(_) => tokio::fs::read(&path).await,
            Err(e) => Err(e),
        };
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(model = %model.key, "warm-up request {}: {e}", w.request);
                return;
            }
        };
        for i in 0..w.times {
            let started = Instant::now();
            let request = HandlerRequest {
                body: body.clone(),
                content_type: "application/json".into(),
                headers: Vec::new(),
            };
            let rid = format!("warmup-{}", i + 1);
            let mut timings = Timings::default();
            let result = tokio::time::timeout(
                timeout,
                self.run(model, request, &rid, Instant::now() + timeout, &mut timings),
            )
            .await;
            let ms = started.elapsed().as_millis() as u64;
            match result {
                Ok(Ok(r)) if r.status < 400 => {
                    tracing::info!(model = %model.key, run = i + 1, ms, "warm-up request done")
                }
                Ok(Ok(r)) => {
                    tracing::warn!(model = %model.key, status = r.status, body = %String::from_utf8_lossy(&r.body[..r.body.len().min(300)]), "warm-up request refused by the handler; serving without warm-up");
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(model = %model.key, error = %e, "warm-up request failed; serving without warm-up");
                    return;
                }
                Err(_) => {
                    tracing::warn!(model = %model.key, "warm-up request timed out; serving without warm-up");
                    return;
                }
            }
        }
    }

    async fn run(
        &self,
        model: &Arc<LoadedModel>,
        request: HandlerRequest,
        request_id: &str,
        deadline: Instant,
        timings: &mut Timings,
    ) -> Result<HandlerResponse, InferenceError> {
        let t = Instant::now();
        let pre = {
            let (sandbox, m, rid) = (self.sandbox.clone(), model.clone(), request_id.to_string());
            blocking(move || sandbox.preprocess(&m.handler, request, &rid, deadline)).await??
        };
        timings.preprocess = t.elapsed();

        let t = Instant::now();
        let input = Arc::new(PipelineInput {
            tensors: pre.inputs,
            cache_key: pre.cache_key,
            pinned: pre.pinned,
        });
        let mut queued = Duration::ZERO;
        let mut evictions = 0;
        let outputs = loop {
            let (result, waited) = model.workers.forward(input.clone(), deadline).await?;
            queued += waited;
            match result {
                Ok((o, hit)) => {
                    timings.stage_cache = hit;
                    if let Some(hit) = hit {
                        let result = if hit { "hit" } else { "miss" };
                        self.metrics
                            .stage_cache
                            .with_label_values(&[model.key.as_str(), result])
                            .inc();
                    }
                    break o;
                }
                Err(RuntimeError::OutOfMemory { message, .. }) => {
                    // What the failed forward allocated went back to the C heap; give it back
                    // to the system, so a model that hits the cap again and again does not
                    // leave the process holding its peak.
                    runtime::release_host_memory();
                    evictions += 1;
                    if evictions > MAX_OOM_EVICTIONS
                        || !self
                            .residency
                            .evict_one(&model.tenant, &model.key, "out-of-memory")
                            .await
                    {
                        return Err(ResidencyError::InsufficientMemory(format!(
                            "forward of '{}' ran out of memory, also after evicting what it may evict: {}",
                            model.name,
                            message.lines().next().unwrap_or_default()
                        ))
                        .into());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        timings.queue = queued;
        timings.inference = t.elapsed() - timings.queue;
        self.metrics
            .inference_seconds
            .with_label_values(&[model.key.as_str()])
            .observe(timings.inference.as_secs_f64());

        let t = Instant::now();
        let response = {
            let (sandbox, m, rid) = (self.sandbox.clone(), model.clone(), request_id.to_string());
            blocking(move || sandbox.postprocess(&m.handler, outputs, pre.context, &rid, deadline))
                .await??
        };
        timings.postprocess = t.elapsed();
        Ok(response)
    }
}

/// Idle models one request's forward may evict after running out of memory before it answers
/// 507: enough when the memory is really held by others, bounded when the forward itself is
/// the problem (each retry would otherwise evict another tenant's idle model).
const MAX_OOM_EVICTIONS: u32 = 2;

/// Server-chosen work dirs are `<tmp>/tessera-<pid>`.
const WORK_DIR_PREFIX: &str = "tessera-";

/// Removes server-chosen work dirs of tessera processes that are gone (killed before their
/// shutdown could remove them).
fn remove_dead_work_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(WORK_DIR_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if pid != std::process::id() && comm.trim() != "tessera" && e.path().is_dir() {
            tracing::warn!(dir = %e.path().display(), "removing the work dir of a tessera process that is gone");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn default_budget(device: tch::Device) -> u64 {
    if let tch::Device::Cuda(n) = device {
        if let Some((_, total)) = runtime::cuda_mem_info(n) {
            return total / 10 * 9;
        }
    }
    crate::config::ram_bytes() / 2
}
