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

pub use invoke::Timings;
pub use manage::{ModelInfo, ModelList, Resident};
pub use upload::{drain, Installed, UploadError};

use crate::archive::Limits;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::residency::{Loader, LoaderConfig, Residency};
use crate::runtime;
use crate::sandbox::Sandbox;
use crate::store::LocalStore;
use crate::tenancy::Tenants;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Where archives are unpacked; removed at shutdown when the server chose it.
    pub work_dir: PathBuf,
    next_id: AtomicU64,
}

impl Server {
    /// Builds the server from its config: tenants, device and budget, work dir, sandbox,
    /// libtorch settings.
    pub fn new(config: Config) -> anyhow::Result<Arc<Server>> {
        let tenants = Arc::new(match &config.tenants {
            Some(path) => Tenants::from_file(path)?,
            None => Tenants::single(),
        });
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
            },
            sandbox: sandbox.clone(),
        };
        tracing::info!(
            backend = runtime::configure(config.cudnn_benchmark, config.torchscript_executor),
            cuda_alloc_conf = config.cuda_alloc_conf,
            "libtorch"
        );
        tracing::info!(device = runtime::device_name(device), budget_mib = budget >> 20,
            store = %config.model_store.display(), "tessera starting");
        Ok(Arc::new(Server {
            registry: Registry::new(
                LocalStore::new(config.model_store.clone()),
                !tenants.multi_tenant(),
            ),
            residency: Residency::new(budget, tenants.clone(), loader, metrics.clone()),
            tenants,
            sandbox,
            metrics,
            work_dir,
            config,
            next_id: AtomicU64::new(0),
        }))
    }

    /// Removes the unpacked-archive folder if the server picked it (no `--work-dir`).
    pub fn cleanup(&self) {
        if self.config.work_dir.is_none() {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }

    /// Counts a finished request for `tenant`'s model `name` in the request metrics. Only
    /// models the tenant knows get a label, so junk names cannot grow the metric set.
    pub fn record_request(&self, tenant: &str, name: &str, status: u16, elapsed: Duration) {
        if !self.registry.knows(tenant, name) {
            return;
        }
        let label = crate::names::model_label(tenant, name);
        let code = status.to_string();
        self.metrics
            .requests
            .with_label_values(&[label.as_str(), code.as_str()])
            .inc();
        self.metrics
            .request_seconds
            .with_label_values(&[label.as_str()])
            .observe(elapsed.as_secs_f64());
    }

    /// A short unique request id.
    pub fn request_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{:x}-{n}", std::process::id())
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
