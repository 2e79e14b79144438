//! Serving: the verbs the HTTP layer calls, and the request path below them.
//!
//! [`Server`] holds the server's parts (tenants, registry, residency, sandbox, metrics) and
//! offers one method per verb: [`invoke`](Server::invoke) (resolve → resident and warm → admit
//! at the model's queue → preprocess → forward → postprocess, in `invoke.rs`), the management
//! verbs (load, unload, describe, list, set-default, delete-version, in `manage.rs`) and
//! [`upload`](Server::upload) (`upload.rs`). Every verb returns the flat [`crate::Error`] and
//! knows no routes or status codes (an upload takes the request body as a byte stream).
mod invoke;
mod manage;
mod upload;

pub use invoke::{oip_spec, Timings};
pub use manage::{ModelInfo, ModelList, Resident, VersionInfo, Versions, WorkerInfo};
pub use upload::{drain, Installed, UploadError};

use crate::archive::Limits;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::residency::{Loader, LoaderConfig, Residency, WorkerOverrides};
use crate::runtime;
use crate::sandbox::Sandbox;
use crate::store::LocalStore;
use crate::tenancy::Tenants;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The server's parts, shared by every request.
pub struct Server {
    pub config: Config,
    pub tenants: Arc<Tenants>,
    pub registry: Registry,
    pub residency: Residency,
    pub sandbox: Arc<Sandbox>,
    pub metrics: Arc<Metrics>,
    /// Worker counts set by the management API, applied at a model's next load.
    pub workers: Arc<WorkerOverrides>,
    /// Where archives are unpacked; removed at shutdown when the server chose it.
    pub work_dir: PathBuf,
    next_id: AtomicU64,
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Server {
    /// Builds the server from its config: tenants, device and budget, work dir, sandbox,
    /// libtorch settings.
    pub fn new(config: Config) -> anyhow::Result<Arc<Server>> {
        let tenants = Arc::new(
            Tenants::for_mode(
                config.auth_mode,
                config.tenants.as_deref(),
                config.admin_tokens.as_deref(),
            )
            .map_err(anyhow::Error::msg)?,
        );
        crate::tenancy::check_bind(config.bind, &tenants).map_err(anyhow::Error::msg)?;
        let device = runtime::parse_device(&config.device).map_err(anyhow::Error::msg)?;
        if device.is_cuda() && !tch::Cuda::is_available() {
            anyhow::bail!(
                "device {} requested but CUDA is not available",
                config.device
            );
        }
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
        let sandbox = Sandbox::with_config(&config.sandbox())?;
        if !runtime::cap_cpu_tensor_memory(config.max_cpu_tensor_bytes()) {
            tracing::warn!("could not install the CPU tensor memory cap");
        }
        let metrics = Arc::new(Metrics::new());
        let workers = Arc::new(WorkerOverrides::default());
        let loader = Loader {
            config: LoaderConfig {
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
                grad_mode: config.forward_grad_mode,
                cuda_graphs: config.cuda_graphs,
                model_warm_ups: config.model_warm_ups,
                share_weights: config.share_weights,
            },
            sandbox: sandbox.clone(),
            workers: workers.clone(),
            pins: Default::default(),
        };
        tracing::info!(
            backend = runtime::configure(config.cudnn_benchmark, config.torchscript_executor),
            cuda_alloc_conf = config.cuda_alloc_conf,
            "libtorch"
        );
        let host_budget = match config.host_memory_budget_mib {
            Some(mib) => mib << 20,
            None if device.is_cuda() => crate::config::ram_bytes() / 3,
            None => 0,
        };
        let host_tier = crate::residency::host::HostTier::new(host_budget, device.is_cuda());
        tracing::info!(device = runtime::device_name(device), budget_mib = budget >> 20,
            host_tier_mib = host_budget >> 20, store = %config.model_store.display(), "tessera starting");
        Ok(Arc::new(Server {
            registry: Registry::new(
                LocalStore::new(config.model_store.clone()),
                !tenants.multi_tenant(),
            ),
            residency: Residency::new(budget, tenants.clone(), loader, metrics.clone())
                .with_host_tier(host_tier),
            tenants,
            sandbox,
            metrics,
            workers,
            work_dir,
            config,
            next_id: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }))
    }

    /// Removes the unpacked-archive folder if the server picked it (no `--work-dir`).
    pub fn cleanup(&self) {
        if self.config.work_dir.is_none() {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }

    /// Counts a finished request for `tenant`'s model `name` (`version`: the one that served
    /// it, empty when none was resolved) in the request metrics. Only models the tenant knows
    /// get a label, so junk names cannot grow the metric set.
    pub fn record_request(
        &self,
        tenant: &str,
        name: &str,
        version: &str,
        status: u16,
        elapsed: Duration,
    ) {
        if !self.registry.knows(tenant, name) {
            return;
        }
        let code = crate::metrics::code_label(status);
        self.metrics
            .requests
            .with_label_values(&[tenant, name, version, code])
            .inc();
        self.metrics
            .request_seconds
            .with_label_values(&[tenant, name, version])
            .observe(elapsed.as_secs_f64());
    }

    /// A short unique request id.
    pub fn request_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n}", std::process::id())
    }

    /// Prometheus text: counters as they stand, state (queues, memory, process) read now.
    pub async fn render_metrics(&self) -> String {
        let models = self
            .residency
            .resident()
            .iter()
            .map(|m| crate::metrics::ModelState {
                labels: m.key.labels().map(str::to_string),
                queue_depth: m.engine.queue_depth(),
                in_flight: m.engine.admitted(),
            })
            .collect();
        let gpus = match self.residency.device() {
            tch::Device::Cuda(n) => runtime::cuda_mem_info(n)
                .map(|(free, total)| {
                    let reserved = runtime::cuda_memory(n).map_or(0, |(_, r)| r);
                    vec![(format!("cuda:{n}"), total - free, total, reserved)]
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let snapshot = crate::metrics::Snapshot {
            models,
            budget_bytes: self.residency.budget(),
            used_bytes: self.residency.used().await,
            gpus,
        };
        self.metrics.render(&snapshot)
    }

    /// Ready to serve: started, `--preload` models warm, not draining.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }

    /// Called once the `--preload` models are warm (or failed, logged).
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Whether SIGTERM started the drain.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Called on SIGTERM: readiness answers 503 from now on.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

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

/// 90% of the GPU's memory on CUDA, half the machine's RAM on the CPU.
fn default_budget(device: tch::Device) -> u64 {
    if let tch::Device::Cuda(n) = device {
        if let Some((_, total)) = runtime::cuda_mem_info(n) {
            return total / 10 * 9;
        }
    }
    crate::config::ram_bytes() / 2
}
