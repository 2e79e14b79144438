//! Server configuration: one typed struct, from flags or environment, every field defaulted so
//! `tessera serve` runs with no configuration at all.
use clap::Args;
use std::net::IpAddr;
use std::path::PathBuf;

/// Everything `tessera serve` can be told. Sizes are bytes unless the name says otherwise.
#[derive(Args, Debug, Clone)]
pub struct Config {
    /// Address to bind. Loopback by default: the management API loads code.
    #[arg(long, env = "TESSERA_BIND", default_value = "127.0.0.1")]
    pub bind: IpAddr,

    /// Port for the inference, management and metrics API (0 picks a free port).
    #[arg(long, env = "TESSERA_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Directory holding model archives (`<name>.tar.gz`).
    #[arg(long, env = "TESSERA_MODEL_STORE", default_value = "model-store")]
    pub model_store: PathBuf,

    /// Directory where archives are unpacked (the local-disk tier). Defaults to a folder under
    /// the system temp dir, unique to this process.
    #[arg(long, env = "TESSERA_WORK_DIR")]
    pub work_dir: Option<PathBuf>,

    /// Device to run models on: `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "TESSERA_DEVICE", default_value = "auto")]
    pub device: String,

    /// Tenants and their API tokens (YAML; see SECURITY.md). Without it the server is
    /// single-tenant and refuses to bind a non-loopback address.
    #[arg(long, env = "TESSERA_TENANTS")]
    pub tenants: Option<PathBuf>,

    /// Who may call what (SECURITY.md): `auto` (`tokens` with --tenants, else `loopback`),
    /// `loopback` (single tenant, no tokens, loopback addresses only), `tokens` (every route
    /// but health needs a tenant's token), `open-inference` (single tenant: inference open to
    /// anyone who can reach the port, management and metrics need an --admin-tokens token:
    /// TorchServe's split), `open` (no tokens at all: only behind a trusted network, as
    /// SageMaker's network isolation provides).
    #[arg(long, env = "TESSERA_AUTH_MODE", value_enum, default_value = "auto")]
    pub auth_mode: crate::tenancy::AuthMode,

    /// For `--auth-mode open-inference`: a file of admin token digests (`sha256:<hex>`, one
    /// per line, `#` comments), re-read when it changes.
    #[arg(long, env = "TESSERA_ADMIN_TOKENS")]
    pub admin_tokens: Option<PathBuf>,

    /// Also serve TorchServe's management API on this address (TorchServe's is
    /// `127.0.0.1:8081`): register with query parameters, describe, scale workers, ...
    #[arg(long, env = "TESSERA_MANAGEMENT_ADDRESS")]
    pub management_address: Option<std::net::SocketAddr>,

    /// Also serve `GET /metrics` without a token on this address (e.g. `0.0.0.0:9090` for a
    /// Prometheus scraper); the main port keeps its own rules.
    #[arg(long, env = "TESSERA_METRICS_ADDRESS")]
    pub metrics_address: Option<std::net::SocketAddr>,

    /// SageMaker multi-model container mode (also on when SageMaker's environment says
    /// `SAGEMAKER_MULTI_MODEL=true`): binds 0.0.0.0 on `SAGEMAKER_BIND_TO_PORT` (8080), auth
    /// mode `open`, and LoadModel takes the directory SageMaker unpacked a model into
    /// (`/opt/ml/models/<name>/model`; the model store defaults to `/opt/ml/models`).
    #[arg(long, env = "TESSERA_SAGEMAKER", default_value_t = false)]
    pub sagemaker: bool,

    /// Log lines as `text` or `json` (one object per line, for log shippers).
    #[arg(long, env = "TESSERA_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Largest model archive a tenant may upload, in MiB.
    #[arg(long, env = "TESSERA_MAX_UPLOAD_MIB", default_value_t = 4096)]
    pub max_upload_mib: u64,

    /// Let cuDNN benchmark convolution algorithms per input shape (faster steady state for
    /// fixed shapes; results may differ in the last bits from the default algorithms).
    #[arg(long, env = "TESSERA_CUDNN_BENCHMARK", default_value_t = false)]
    pub cudnn_benchmark: bool,

    /// libtorch's CUDA caching-allocator settings, applied before CUDA starts (libtorch's own
    /// `PYTORCH_CUDA_ALLOC_CONF`; empty: libtorch's defaults). The default, expandable segments,
    /// lets the tensors of a photo size not seen before reuse memory already mapped instead of
    /// new cudaMalloc blocks: on an H100, LaMa's forward at first-seen sizes 40-56 ms with it
    /// against 99-222 ms without (seen sizes 17-35 ms either way;
    /// bench/results/new_size_probe_gpu_h100.md).
    #[arg(
        long,
        env = "PYTORCH_CUDA_ALLOC_CONF",
        default_value = "expandable_segments:True"
    )]
    pub cuda_alloc_conf: String,

    /// TorchScript executor of models whose config names none (`tessera.executor`): `profiling`
    /// (libtorch's default: specialises and fuses per input shape, which costs hundreds of ms
    /// to seconds on the first calls at every new shape) or `simple` (graphs run as exported:
    /// nothing is profiled or compiled on a request, whatever the input size). On an H100, LaMa
    /// at photo sizes not seen before: 51-90 ms forward with `simple`, 168-1716 ms with
    /// `profiling` (bench/results/sweep_gpu_h100.md). `simple` runs a graph exactly as traced,
    /// so a model must be exported device-clean for it (SAM's encoder, traced on CUDA, still
    /// mixes devices without the optimiser's passes): models opt in, per model and per cached
    /// stage; LaMa's archive and SAM's decoder do.
    #[arg(
        long,
        env = "TESSERA_TORCHSCRIPT_EXECUTOR",
        value_enum,
        default_value = "profiling"
    )]
    pub torchscript_executor: crate::runtime::Executor,

    /// `off` runs every model's calls uncaptured, even those whose archive asks for CUDA graphs
    /// (`tessera.cudaGraphs`): a switch for operators (and comparisons).
    #[arg(long, env = "TESSERA_CUDA_GRAPHS", default_value = "on", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub cuda_graphs: bool,

    /// `off` never runs a model's `warm_up` method (README: "A model's own warm-up"): a switch
    /// for operators who would rather not lend idle GPU time to tenants' warm-ups.
    #[arg(long, env = "TESSERA_MODEL_WARM_UPS", default_value = "on", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub model_warm_ups: bool,

    /// `off` keeps every model's weights to itself. On (the default), parameter storages that
    /// are byte-identical between models of one tenant (fine-tunes sharing a text encoder and
    /// VAE, versions of one model) are held once on the device and weighed once: found by a
    /// fingerprint at load and confirmed byte by byte, never taken from the archive's word.
    #[arg(long, env = "TESSERA_SHARE_WEIGHTS", default_value = "on", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub share_weights: bool,

    /// OpenMP threads each CPU op of a forward may use, for CPU models whose config names none
    /// (`tessera.intraOpThreads`; GPU models that name none use 1). Default: libtorch's (the
    /// machine's physical cores).
    #[arg(long, env = "TESSERA_INTRA_OP_THREADS", value_parser = clap::value_parser!(u32).range(1..=256))]
    pub intra_op_threads: Option<u32>,

    /// For comparisons: `inference` (default) runs every forward thread in libtorch's inference
    /// mode (no autograd dispatch or version counters); `no-grad` only disables gradients.
    #[arg(
        long,
        env = "TESSERA_FORWARD_GRAD_MODE",
        value_enum,
        default_value = "inference",
        hide = true
    )]
    pub forward_grad_mode: crate::runtime::GradMode,

    /// Residency budget on the device, in MiB: the sum of what loaded models hold.
    /// 0 means 90% of the GPU's memory on CUDA, half the machine's RAM on CPU.
    #[arg(long, env = "TESSERA_MEMORY_BUDGET_MIB", default_value_t = 0)]
    pub memory_budget_mib: u64,

    /// Host-memory tier, in MiB: models evicted from the GPU keep their weights in (page-locked)
    /// host memory up to this many bytes, and come back with one copy instead of a load.
    /// Default: a third of the machine's RAM with a CUDA device; 0 (off) on the CPU, where the
    /// device budget already is host memory.
    #[arg(long, env = "TESSERA_HOST_MEMORY_BUDGET_MIB")]
    pub host_memory_budget_mib: Option<u64>,

    /// Largest accepted request body, in MiB.
    #[arg(long, env = "TESSERA_MAX_REQUEST_MIB", default_value_t = 64)]
    pub max_request_mib: u64,

    /// Largest response a handler may produce, in MiB.
    #[arg(long, env = "TESSERA_MAX_RESPONSE_MIB", default_value_t = 64)]
    pub max_response_mib: u64,

    /// Largest archive accepted from the store, in MiB.
    #[arg(long, env = "TESSERA_MAX_ARCHIVE_MIB", default_value_t = 8192)]
    pub max_archive_mib: u64,

    /// Largest total unpacked size of one archive, in MiB (gzip-bomb guard).
    #[arg(long, env = "TESSERA_MAX_UNPACKED_MIB", default_value_t = 16384)]
    pub max_unpacked_mib: u64,

    /// Default cap on a handler instance's linear memory, in MiB (model-config may lower it).
    #[arg(long, env = "TESSERA_HANDLER_MEMORY_MIB", default_value_t = 512)]
    pub handler_memory_mib: u64,

    /// Cap on the linear memory of all live handler instances together, in MiB: past it, a
    /// handler's growth fails and its request answers 503 (retry later). 0 means a quarter of
    /// the machine's RAM, at least 2 GiB.
    #[arg(long, env = "TESSERA_HANDLER_MEMORY_TOTAL_MIB", default_value_t = 0)]
    pub handler_memory_total_mib: u64,

    /// Cap on CPU tensor memory live at once in the server (model weights on the CPU and every
    /// forward's CPU tensors), in MiB: an allocation past it fails that forward with 507 instead
    /// of exhausting the machine. 0 means 80% of the machine's RAM.
    #[arg(long, env = "TESSERA_MAX_CPU_TENSOR_MIB", default_value_t = 0)]
    pub max_cpu_tensor_mib: u64,

    /// Seconds the sandboxed check of an archive's TorchScript may take (plus one per 50 MB of
    /// model files); past it the archive is refused as one that never finishes loading.
    #[arg(
        long,
        env = "TESSERA_MODEL_CHECK_SECONDS",
        default_value_t = crate::runtime::verify::DEFAULT_CHECK_SECONDS
    )]
    pub model_check_seconds: u64,

    /// Data memory of the sandboxed TorchScript check process, in MiB. 0 means twice the
    /// model files' size plus 2 GiB.
    #[arg(long, env = "TESSERA_MODEL_CHECK_MEMORY_MIB", default_value_t = 0)]
    pub model_check_memory_mib: u64,

    /// Profiling knob: MiB of each pooled handler memory kept mapped between requests.
    #[arg(
        long,
        env = "TESSERA_WASM_KEEP_RESIDENT_MIB",
        default_value_t = crate::sandbox::KEEP_RESIDENT_MIB,
        hide = true
    )]
    pub wasm_keep_resident_mib: u64,

    /// Where compiled handler components are kept between runs (machine code for this build
    /// of the server, by the component's sha256), so a restart does not compile them again:
    /// a Python or JavaScript handler takes seconds to compile. `off` keeps none. Default:
    /// `$XDG_CACHE_HOME/tessera/components`, else `~/.cache/tessera/components`. The folder
    /// holds code the server runs: it must be writable by the server's user alone.
    #[arg(long, env = "TESSERA_COMPONENT_CACHE")]
    pub component_cache: Option<String>,

    /// Profiling knob: allocate handler instances on demand instead of from the pool.
    #[arg(long, env = "TESSERA_WASM_ON_DEMAND", hide = true,
          action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub wasm_on_demand: bool,

    /// Profiling knob: name handler functions for `perf` (`/tmp/perf-<pid>.map`).
    #[arg(long, env = "TESSERA_WASM_PERFMAP", hide = true,
          action = clap::ArgAction::SetTrue, value_parser = clap::builder::BoolishValueParser::new())]
    pub wasm_perfmap: bool,

    /// Requests a model admits at once (maxWorkers running plus this many waiting, each from
    /// preprocess to postprocess) before the server answers 429.
    #[arg(long, env = "TESSERA_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,

    /// On SIGTERM or Ctrl-C: seconds for requests in flight to finish (no new connections are
    /// taken meanwhile) and then for queued forwards to finish and the forward threads to
    /// exit, before the process exits 0.
    #[arg(long, env = "TESSERA_DRAIN_SECONDS", default_value_t = 30)]
    pub drain_seconds: u64,

    /// On SIGTERM: seconds to go on taking connections while readiness already answers 503, so
    /// that a load balancer (a Kubernetes Service) stops routing here before connections are
    /// refused. Then the drain above starts.
    #[arg(long, env = "TESSERA_DRAIN_DELAY_SECONDS", default_value_t = 0)]
    pub drain_delay_seconds: u64,

    /// Seconds a client has to send a request's headers; also how long a kept-alive connection
    /// may wait for its next request. Slow-header and idle sockets are closed past it.
    #[arg(long, env = "TESSERA_HEADER_TIMEOUT_SECONDS", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout_seconds: u64,

    /// Seconds a request body may go without sending anything before the request fails (a
    /// stalled upload releases its staging file).
    #[arg(long, env = "TESSERA_BODY_STALL_SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_stall_seconds: u64,

    /// Connections held at once per listener; at the cap the oldest one without a request in
    /// progress is closed for the newcomer. 0: the open-files limit (raised to its hard limit
    /// at start) less 256, at most 10 000.
    #[arg(long, env = "TESSERA_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Models listed per page by `GET /models`.
    #[arg(long, env = "TESSERA_PAGE_SIZE", default_value_t = 100)]
    pub page_size: usize,

    /// Models to load at start-up (archive names in the store), comma-separated.
    #[arg(long, env = "TESSERA_PRELOAD", value_delimiter = ',')]
    pub preload: Vec<String>,
}

const MIB: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where SageMaker unpacks the models it asks a multi-model container to load.
pub const SAGEMAKER_MODEL_ROOT: &str = "/opt/ml/models";

impl Config {
    /// Defaults, as `tessera serve` with no flags would use them (for tests and embedding).
    pub fn default_for(model_store: PathBuf) -> Config {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            config: Config,
        }
        let mut config = Wrapper::parse_from(["tessera"]).config;
        config.model_store = model_store;
        config
    }

    /// Applies SageMaker's container contract when `--sagemaker` is given or SageMaker's
    /// environment is detected: every address (SageMaker reaches the container from outside),
    /// its port, no tokens (the platform isolates the container's network), its model root.
    /// `explicit` tells which settings the operator gave, which stay as given.
    pub fn apply_sagemaker(
        &mut self,
        explicit: impl Fn(&str) -> bool,
        env: impl Fn(&str) -> Option<String>,
    ) {
        if !self.sagemaker
            && env("SAGEMAKER_MULTI_MODEL").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            self.sagemaker = true;
        }
        if !self.sagemaker {
            return;
        }
        if !explicit("bind") {
            self.bind = std::net::Ipv4Addr::UNSPECIFIED.into();
        }
        if !explicit("port") {
            self.port = env("SAGEMAKER_BIND_TO_PORT")
                .and_then(|p| p.parse().ok())
                .unwrap_or(8080);
        }
        // Open, as the platform isolates the container's network, unless the operator set up
        // tokens.
        if !explicit("auth_mode") && self.tenants.is_none() && self.admin_tokens.is_none() {
            self.auth_mode = crate::tenancy::AuthMode::Open;
        }
        if !explicit("model_store") {
            self.model_store = PathBuf::from(SAGEMAKER_MODEL_ROOT);
        }
    }

    pub fn max_request_bytes(&self) -> usize {
        (self.max_request_mib * MIB) as usize
    }
    pub fn max_response_bytes(&self) -> usize {
        (self.max_response_mib * MIB) as usize
    }
    pub fn max_archive_bytes(&self) -> u64 {
        self.max_archive_mib * MIB
    }
    pub fn max_unpacked_bytes(&self) -> u64 {
        self.max_unpacked_mib * MIB
    }
    pub fn handler_memory_bytes(&self) -> u64 {
        self.handler_memory_mib * MIB
    }
    pub fn handler_memory_total_bytes(&self) -> u64 {
        match self.handler_memory_total_mib {
            0 => (ram_bytes() / 4).max(2 << 30),
            mib => mib * MIB,
        }
    }
    /// Limits of the sandboxed TorchScript check for `files`.
    pub fn check_limits(&self, files: &[PathBuf]) -> crate::runtime::verify::CheckLimits {
        crate::runtime::verify::CheckLimits::for_files(
            files,
            self.model_check_seconds,
            self.model_check_memory_mib,
        )
    }
    /// How the Wasm sandbox is set up.
    pub fn sandbox(&self) -> crate::sandbox::SandboxConfig {
        crate::sandbox::SandboxConfig {
            total_memory_bytes: self.handler_memory_total_bytes(),
            keep_resident_bytes: (self.wasm_keep_resident_mib * MIB) as usize,
            pooling: !self.wasm_on_demand,
            perfmap: self.wasm_perfmap,
            compile_cache: self.component_cache_dir(),
        }
    }
    /// The folder for compiled handler components, if any (see `--component-cache`).
    pub fn component_cache_dir(&self) -> Option<PathBuf> {
        match self.component_cache.as_deref() {
            Some("off") => None,
            Some(dir) => Some(PathBuf::from(dir)),
            None => std::env::var_os("XDG_CACHE_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map(|base| base.join("tessera/components")),
        }
    }
    pub fn max_cpu_tensor_bytes(&self) -> u64 {
        match self.max_cpu_tensor_mib {
            0 => ram_bytes() / 10 * 8,
            mib => mib * MIB,
        }
    }
}

/// The machine's RAM as /proc/meminfo says (8 GiB when unknown).
pub fn ram_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenancy::AuthMode;

    #[test]
    fn sagemakers_environment_sets_its_contract_and_keeps_explicit_settings() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let mut c = Config::default_for("store".into());
        c.apply_sagemaker(|_| false, env(&[]));
        assert!(!c.sagemaker && c.bind.is_loopback() && c.auth_mode == AuthMode::Auto);

        let mut c = Config::default_for("store".into());
        c.apply_sagemaker(
            |_| false,
            env(&[
                ("SAGEMAKER_MULTI_MODEL", "true"),
                ("SAGEMAKER_BIND_TO_PORT", "9000"),
            ]),
        );
        assert!(c.sagemaker && c.bind.is_unspecified() && c.port == 9000);
        assert_eq!(c.auth_mode, AuthMode::Open);
        assert_eq!(c.model_store, PathBuf::from(SAGEMAKER_MODEL_ROOT));

        let mut c = Config::default_for("mine".into());
        c.sagemaker = true;
        c.apply_sagemaker(|id| id == "bind" || id == "model_store", env(&[]));
        assert!(c.bind.is_loopback() && c.port == 8080);
        assert_eq!(c.model_store, PathBuf::from("mine"));
    }
}
