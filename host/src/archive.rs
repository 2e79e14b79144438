//! Model archives: `model-config.yaml`, TorchScript files, `handler.wasm` and `assets/`, in a
//! `.tar.gz`. This module reads the config, packs archives (`tessera pack`) and unpacks them
//! defensively. It never trusts an archive: unpacking refuses absolute paths, `..`, links,
//! devices, unexpected entry kinds and anything over the size limits, and writes only below a
//! fresh directory that is renamed into place once complete.
use crate::names;
use flate2::read::GzDecoder;

mod stored;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Name of the config file inside an archive.
pub const CONFIG_FILE: &str = "model-config.yaml";
/// Name of the handler component inside an archive.
pub const HANDLER_FILE: &str = "handler.wasm";
/// Folder of read-only files the handler may read.
pub const ASSETS_DIR: &str = "assets";
/// Folder of an unpacked archive where the server keeps its models as `tessera.optimize` made
/// them (loaded without a second check): no archive may bring an entry there.
pub const OPTIMIZED_DIR: &str = ".optimized";

/// Refuses an entry under [`OPTIMIZED_DIR`].
fn check_not_reserved(rel: &Path, shown: &str) -> Result<(), ArchiveError> {
    match rel.components().next() {
        Some(std::path::Component::Normal(first)) if first == OPTIMIZED_DIR => Err(
            ArchiveError::UnsafeEntry(shown.to_string(), "'.optimized' is reserved for the server"),
        ),
        _ => Ok(()),
    }
}
const MAX_ENTRIES: usize = 10_000;
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest `tessera.intraOpThreads` accepted (the loader also caps it at the machine's logical CPUs).
const MAX_INTRA_OP_THREADS: u32 = 256;

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("archive is not a valid gzip-compressed tar: {0}")]
    Corrupt(String),
    #[error("archive entry '{0}' is unsafe: {1}")]
    UnsafeEntry(String, &'static str),
    #[error("archive is too large: {0}")]
    TooLarge(String),
    #[error("archive is missing {0}")]
    Missing(&'static str),
    #[error("invalid model-config.yaml: {0}")]
    BadConfig(String),
    #[error("{0}")]
    Invalid(String),
    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// The server's disk is full (ENOSPC/EDQUOT): not the archive's fault, worth retrying.
    #[error("the server ran out of disk space writing {path}; retry later ({source})")]
    NoSpace { path: PathBuf, source: io::Error },
}

impl ArchiveError {
    /// The error as a client reads it: the archive's faults as a rejection, the server's own
    /// I/O trouble (a full disk, say) as what it is.
    pub fn as_rejection(&self) -> String {
        match self {
            ArchiveError::Io { .. } | ArchiveError::NoSpace { .. } => self.to_string(),
            _ => format!("archive rejected: {self}"),
        }
    }
}

/// ENOSPC or EDQUOT (also as a bare error kind: tokio's background writes keep only that).
pub fn is_out_of_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        )
}

/// The error for an I/O failure on `path`: [`ArchiveError::NoSpace`] when the disk is full.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ArchiveError + '_ {
    move |source| {
        let path = path.to_path_buf();
        if is_out_of_space(&source) {
            ArchiveError::NoSpace { path, source }
        } else {
            ArchiveError::Io { path, source }
        }
    }
}

/// `model-config.yaml`: TorchServe's keys where they mean the same, Tessera's own under
/// `tessera:`, and the handler's free-form parameters under `handler:`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelConfig {
    /// Accepted for TorchServe compatibility; Tessera keeps no idle workers.
    #[serde(default = "one")]
    pub min_workers: u32,
    /// Concurrent forwards of this model.
    #[serde(default = "one")]
    pub max_workers: u32,
    /// Largest batch of requests run as one forward (with `tessera.batchable`).
    #[serde(default = "one")]
    pub batch_size: u32,
    /// Milliseconds to wait to fill a batch.
    #[serde(default = "default_batch_delay")]
    pub max_batch_delay: u64,
    /// Seconds one request may take end to end, handler and forward included.
    #[serde(default = "default_timeout")]
    pub response_timeout: u64,
    /// `gpu` or `cpu`; absent means the server's device.
    #[serde(default)]
    pub device_type: Option<String>,
    #[serde(default)]
    pub tessera: TesseraConfig,
    /// Free-form parameters the handler reads with `config-param`.
    #[serde(default)]
    pub handler: BTreeMap<String, serde_norway::Value>,
    /// TorchServe keys present that Tessera has no use for: accepted so that a TorchServe
    /// model-config.yaml works as it is, named in a warning at load.
    #[serde(skip)]
    pub ignored_keys: Vec<String>,
}

/// TorchServe's model-config keys that mean nothing here (its worker start-up, parallelism,
/// sequence-batching and job-queue settings).
const TORCHSERVE_ONLY_KEYS: [&str; 17] = [
    "startupTimeout",
    "deviceIds",
    "parallelType",
    "parallelLevel",
    "torchrun",
    "pippy",
    "deepspeed",
    "jobQueueSize",
    "maxRetryTimeoutInSec",
    "clientTimeoutInMills",
    "useJobTicket",
    "continuousBatching",
    "sequenceMaxIdleMSec",
    "maxSequenceJobQueueSize",
    "maxNumSequence",
    "sequenceTimeoutMSec",
    "asyncCommunication",
];

/// Tessera's own keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TesseraConfig {
    /// The TorchScript file whose `forward` is run; may be omitted when there is exactly one.
    #[serde(default)]
    pub model: Option<String>,
    /// Cap on the handler's linear memory, in MiB (at most the server's cap).
    #[serde(default, rename = "handlerMemoryMiB")]
    pub handler_memory_mib: Option<u64>,
    /// An expensive first stage (an image encoder, say) whose outputs are kept per handler
    /// cache key, so later requests with the same key run only `model`.
    #[serde(default)]
    pub cached_stage: Option<CachedStage>,
    /// Sample requests replayed right after a load, before any request is served: TorchScript's
    /// profiling executor optimises (and compiles fused kernels) on a model's second call, which
    /// otherwise lands on a user (seconds for a diffusion loop).
    #[serde(default)]
    pub warmup: Option<Warmup>,
    /// TorchScript executor for this model's forwards (`profiling` or `simple`); absent means
    /// the server's `--torchscript-executor`.
    #[serde(default)]
    pub executor: Option<crate::runtime::Executor>,
    /// The model takes every input batched along dimension 0 and returns every output so:
    /// with `batchSize` > 1, the requests whose inputs match in everything but that dimension
    /// are run as one forward (up to `batchSize`, waiting up to `maxBatchDelay` ms). With a
    /// cached stage this is the entry model: the stage's outputs (each request's, cached or
    /// computed for it alone) are batched with the other handler tensors.
    #[serde(default)]
    pub batchable: bool,
    /// OpenMP threads each of the model's ops may use (on CPU); absent means the server's
    /// `--intra-op-threads`. 1 suits small models served to many clients at once: no thread
    /// team to wake per op, and no worker spinning on a core the handlers need. (Triton's
    /// PyTorch backend has the same knob, `INTRA_OP_THREAD_COUNT`.)
    #[serde(default)]
    pub intra_op_threads: Option<u32>,
    /// The model's tensors for Open Inference Protocol v2 (`/v2/models/{name}/infer`): inputs in
    /// its `forward`'s order, outputs in the order it returns them. A model without it is
    /// served through its handler only; with it, OIP requests go straight to the model.
    #[serde(default)]
    pub oip: Option<OipSpec>,
    /// The forward is a loop the server drives: the TorchScript file's `prepare`, then `step`
    /// as many times as `prepare` says, then `finish` (see `runtime::LOOP_METHODS`). Each step
    /// can then be one CUDA-graph replay (`cudaGraphs`).
    #[serde(default, rename = "loop")]
    pub looped: bool,
    /// On a GPU, calls are replayed as CUDA graphs, captured per input shape off the request
    /// path (a loop's `step`; otherwise `forward`). For models whose calls make no
    /// host synchronisation; one that does is logged and runs uncaptured.
    #[serde(default)]
    pub cuda_graphs: bool,
    /// Most graphs (input shapes) kept per model, 1..=64 (default 8); each holds its own memory.
    #[serde(default)]
    pub max_cuda_graphs: Option<u32>,
    /// `freeze` or `inference`: the host freezes `model` after loading it (and, for
    /// `inference`, runs `torch.jit.optimize_for_inference`), before its warm-up and first
    /// request; the file itself is not changed. Absent: run as exported.
    #[serde(default)]
    pub optimize: Option<crate::runtime::Optimize>,
}

/// Graphs kept per model when `maxCudaGraphs` is not set.
pub const DEFAULT_MAX_CUDA_GRAPHS: u32 = 8;

/// `tessera.oip`: what a model takes and returns, as OIP metadata shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OipSpec {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// One tensor of an [`OipSpec`]: `shape` dimensions of -1 take any size.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    /// An OIP datatype (`FP32`, `UINT8`, `INT64`, ...).
    pub datatype: String,
    pub shape: Vec<i64>,
}

impl TensorSpec {
    /// The element type (checked by [`ModelConfig::parse`]).
    pub fn dtype(&self) -> crate::runtime::DType {
        crate::oip::parse_datatype(&self.datatype).unwrap_or(crate::runtime::DType::F32)
    }

    /// Whether `shape` fits this spec (-1 matches any size).
    pub fn accepts(&self, shape: &[i64]) -> bool {
        shape.len() == self.shape.len()
            && self
                .shape
                .iter()
                .zip(shape)
                .all(|(&want, &got)| want == -1 || want == got)
    }
}

/// `tessera.warmup`: request bodies under `assets/`, each sent through handler and model `times`
/// times (default 2) after each load, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Warmup {
    /// Path under `assets/` of the body (JSON, as a client would POST it), or a list of them
    /// (requests of different shapes: each CUDA-graph signature they bring is captured before
    /// the model is published).
    pub request: WarmupRequests,
    #[serde(default = "two")]
    pub times: u32,
}

/// One warm-up request path, or several.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WarmupRequests {
    One(String),
    Many(Vec<String>),
}

/// Most warm-up requests an archive may list.
pub const MAX_WARMUP_REQUESTS: usize = 4;

impl Warmup {
    /// The request paths, in order.
    pub fn requests(&self) -> Vec<&str> {
        match &self.request {
            WarmupRequests::One(r) => vec![r.as_str()],
            WarmupRequests::Many(rs) => rs.iter().map(String::as_str).collect(),
        }
    }
}

fn two() -> u32 {
    2
}

/// The first stage of a two-stage model. Its `inputs` (handler tensors, by name) are consumed
/// by it; its outputs come first in the arguments of `model`, followed by the handler's other
/// tensors in their order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CachedStage {
    /// The stage's TorchScript file.
    pub model: String,
    /// Names of the handler tensors the stage takes, in its `forward`'s order.
    pub inputs: Vec<String>,
    /// Bytes of stage outputs kept, in MiB (reserved in the residency budget).
    #[serde(default = "default_stage_cache_mib", rename = "cacheMiB")]
    pub cache_mib: u64,
    /// TorchScript executor for the stage's forwards; absent means the model's. (SAM's
    /// encoder always sees one input shape, so the profiling executor's fusions pay off once,
    /// while its decoder's output size follows each photo and runs best as exported.)
    #[serde(default)]
    pub executor: Option<crate::runtime::Executor>,
}

fn default_stage_cache_mib() -> u64 {
    256
}

fn one() -> u32 {
    1
}
fn default_batch_delay() -> u64 {
    100
}
fn default_timeout() -> u64 {
    120
}

impl ModelConfig {
    /// Parses and validates a config.
    pub fn parse(text: &str) -> Result<ModelConfig, ArchiveError> {
        let mut value: serde_norway::Value =
            crate::yaml::from_str_bounded(text, crate::yaml::MAX_NODES)
                .map_err(ArchiveError::BadConfig)?;
        let mut ignored = Vec::new();
        if let serde_norway::Value::Mapping(m) = &mut value {
            for key in TORCHSERVE_ONLY_KEYS {
                if m.remove(key).is_some() {
                    ignored.push(key.to_string());
                }
            }
        }
        let mut config: ModelConfig = match value {
            // An empty file is an empty config.
            serde_norway::Value::Null => serde_norway::from_str("{}"),
            v => serde_norway::from_value(v),
        }
        .map_err(|e| ArchiveError::BadConfig(e.to_string()))?;
        config.ignored_keys = ignored;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ArchiveError> {
        let bad = |m: String| Err(ArchiveError::BadConfig(m));
        if self.max_workers == 0 || self.max_workers > 64 {
            return bad(format!(
                "maxWorkers must be 1..=64, got {}",
                self.max_workers
            ));
        }
        if self.min_workers > self.max_workers {
            return bad("minWorkers exceeds maxWorkers".into());
        }
        if self.batch_size == 0 || self.batch_size > 1024 {
            return bad(format!(
                "batchSize must be 1..=1024, got {}",
                self.batch_size
            ));
        }
        if self.max_batch_delay > 60_000 {
            return bad(format!(
                "maxBatchDelay must be at most 60000 ms, got {}",
                self.max_batch_delay
            ));
        }
        if let Some(n) = self.tessera.intra_op_threads {
            if !(1..=MAX_INTRA_OP_THREADS).contains(&n) {
                return bad(format!(
                    "tessera.intraOpThreads must be 1..={MAX_INTRA_OP_THREADS}, got {n}"
                ));
            }
        }
        if self.response_timeout == 0 || self.response_timeout > 3600 {
            return bad(format!(
                "responseTimeout must be 1..=3600 seconds, got {}",
                self.response_timeout
            ));
        }
        match self.device_type.as_deref() {
            None | Some("gpu") | Some("cpu") => {}
            Some(other) => return bad(format!("deviceType must be gpu or cpu, got '{other}'")),
        }
        if let Some(m) = &self.tessera.model {
            check_model_file_name(m)?;
        }
        if let Some(stage) = &self.tessera.cached_stage {
            check_model_file_name(&stage.model)?;
            if self.tessera.model.is_none() || self.tessera.model.as_ref() == Some(&stage.model) {
                return bad("a cachedStage needs tessera.model to name a different file".into());
            }
            if stage.inputs.is_empty() || stage.cache_mib > 1 << 20 {
                return bad("cachedStage needs inputs and a cacheMiB under 1 TiB".into());
            }
        }
        if let Some(spec) = &self.tessera.oip {
            for (what, list) in [("inputs", &spec.inputs), ("outputs", &spec.outputs)] {
                if list.is_empty() || list.len() > crate::oip::MAX_TENSORS {
                    return bad(format!(
                        "tessera.oip.{what} must list 1..={} tensors",
                        crate::oip::MAX_TENSORS
                    ));
                }
                let mut seen = std::collections::HashSet::new();
                for t in list {
                    if !names::is_plain_name(&t.name, names::MAX_NAME) || !seen.insert(&t.name) {
                        return bad(format!(
                            "tessera.oip.{what}: '{}' must be a plain name, listed once",
                            t.name
                        ));
                    }
                    if crate::oip::parse_datatype(&t.datatype).is_none() {
                        return bad(format!(
                            "tessera.oip.{what}: datatype '{}' of '{}' is not supported",
                            t.datatype, t.name
                        ));
                    }
                    if t.shape.len() > crate::oip::MAX_DIMS || t.shape.iter().any(|&d| d < -1) {
                        return bad(format!(
                            "tessera.oip.{what}: shape of '{}' must have at most {} dimensions, each -1 or a size",
                            t.name,
                            crate::oip::MAX_DIMS
                        ));
                    }
                }
            }
            if self.tessera.cached_stage.is_some() {
                return bad("tessera.oip cannot be combined with a cachedStage".into());
            }
        }
        if self.tessera.looped && (self.tessera.cached_stage.is_some() || self.tessera.batchable) {
            return bad("tessera.loop cannot be combined with a cachedStage or batchable".into());
        }
        if let Some(n) = self.tessera.max_cuda_graphs {
            if !self.tessera.cuda_graphs || !(1..=64).contains(&n) {
                return bad(format!(
                    "maxCudaGraphs must be 1..=64 and needs cudaGraphs: true, got {n}"
                ));
            }
        }
        if let Some(w) = &self.tessera.warmup {
            let requests = w.requests();
            if requests.is_empty() || requests.len() > MAX_WARMUP_REQUESTS {
                return bad(format!(
                    "warmup.request must name 1..={MAX_WARMUP_REQUESTS} requests, got {}",
                    requests.len()
                ));
            }
            if let Some(r) = requests
                .iter()
                .find(|r| !matches!(names::relative_inside(r), Ok(Some(_))))
            {
                return bad(format!(
                    "warmup.request '{r}' must be a relative path under assets/"
                ));
            }
            if w.times == 0 || w.times > 10 {
                return bad(format!("warmup.times must be 1..=10, got {}", w.times));
            }
        }
        Ok(())
    }

    /// A handler parameter rendered as the string the handler receives.
    pub fn handler_param(&self, key: &str) -> Option<String> {
        match self.handler.get(key)? {
            serde_norway::Value::String(s) => Some(s.clone()),
            serde_norway::Value::Null => None,
            other => serde_norway::to_string(other)
                .ok()
                .map(|s| s.trim_end().to_string()),
        }
    }
}

fn check_model_file_name(name: &str) -> Result<(), ArchiveError> {
    let ok = names::is_plain_name(name, names::MAX_NAME)
        && [".pt", ".pt2", ".ts"].iter().any(|ext| name.ends_with(ext));
    if ok {
        Ok(())
    } else {
        Err(ArchiveError::BadConfig(format!(
            "model file '{name}' must be a plain file name ending in .pt/.pt2/.ts"
        )))
    }
}

/// Limits applied while unpacking.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_archive_bytes: u64,
    pub max_unpacked_bytes: u64,
}

/// An archive unpacked on local disk and checked for the pieces a model needs.
#[derive(Debug, Clone)]
pub struct Unpacked {
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// The TorchScript file to run.
    pub model_file: PathBuf,
    /// The cached first stage's TorchScript file, if the config declares one.
    pub stage_file: Option<PathBuf>,
    /// All TorchScript files at the top level.
    pub model_files: Vec<PathBuf>,
    pub handler: PathBuf,
    /// sha256 of the handler bytes (the compiled-component cache key).
    pub handler_hash: String,
    /// Sum of the TorchScript files' sizes.
    pub model_bytes: u64,
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, ArchiveError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(io_err(path))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Prefix of the temporary directories [`unpack`] renames into place.
const PARTIAL_PREFIX: &str = ".partial-";
/// Makes each temporary directory's name unique within the process.
static PARTIAL_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Removes what unpacks interrupted by a crash left in `dir` (call before any unpack runs).
pub fn remove_partials(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(PARTIAL_PREFIX) {
            tracing::warn!(dir = %e.path().display(), "removing an interrupted unpack");
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// A fresh, empty sibling of `dest` to fill and rename into place (removed at start if a crash
/// leaves it: [`remove_partials`]).
fn partial_dir(dest: &Path) -> Result<PathBuf, ArchiveError> {
    let parent = dest
        .parent()
        .ok_or_else(|| ArchiveError::Invalid("bad destination".into()))?;
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let tmp = parent.join(format!(
        "{PARTIAL_PREFIX}{}-{}-{}",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("x"),
        std::process::id(),
        PARTIAL_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    Ok(tmp)
}

/// Unpacks `archive` into `dest` (which must not exist), validating every entry. The work is
/// done in a sibling temporary directory renamed into place at the end, so `dest` either holds a
/// complete archive or does not exist.
pub fn unpack(archive: &Path, dest: &Path, limits: Limits) -> Result<Unpacked, ArchiveError> {
    let size = fs::metadata(archive).map_err(io_err(archive))?.len();
    if size > limits.max_archive_bytes {
        return Err(ArchiveError::TooLarge(format!(
            "{size} bytes, over the limit of {}",
            limits.max_archive_bytes
        )));
    }
    let tmp = partial_dir(dest)?;
    let result = extract(archive, &tmp, limits).and_then(|()| inspect(&tmp));
    match result {
        Ok(_) => {
            fs::rename(&tmp, dest).map_err(io_err(dest))?;
            inspect(dest)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// One regular file of an unpacked directory, as [`scan_dir`] found it.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub rel: PathBuf,
    pub len: u64,
    pub mtime_ns: u128,
}

/// Lists an unpacked model directory (SageMaker's `/opt/ml/models/<name>/model`) under the same
/// rules as an archive: relative names that pass [`safe_relative`], regular files and folders
/// only (links, devices and fifos refused, never followed), at most `MAX_ENTRIES`, at most
/// `limits.max_unpacked_bytes` in all.
pub fn scan_dir(src: &Path, limits: Limits) -> Result<Vec<DirEntry>, ArchiveError> {
    let mut out = Vec::new();
    let mut total: u64 = 0;
    let mut seen = 0usize;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel_dir) = stack.pop() {
        let dir = src.join(&rel_dir);
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let e = e.map_err(io_err(&dir))?;
            seen += 1;
            if seen > MAX_ENTRIES {
                return Err(ArchiveError::TooLarge(format!(
                    "more than {MAX_ENTRIES} entries"
                )));
            }
            let rel = rel_dir.join(e.file_name());
            let shown = rel.to_string_lossy().into_owned();
            let name = rel
                .to_str()
                .ok_or_else(|| ArchiveError::UnsafeEntry(shown.clone(), "name is not UTF-8"))?;
            let rel = safe_relative(name)?
                .ok_or_else(|| ArchiveError::UnsafeEntry(shown.clone(), "empty path"))?;
            check_not_reserved(&rel, &shown)?;
            // symlink_metadata: a link is seen as a link, never followed.
            let meta = fs::symlink_metadata(e.path()).map_err(io_err(&e.path()))?;
            let kind = meta.file_type();
            if kind.is_dir() {
                stack.push(rel);
            } else if kind.is_symlink() {
                return Err(ArchiveError::UnsafeEntry(shown, "links are not allowed"));
            } else if !kind.is_file() {
                return Err(ArchiveError::UnsafeEntry(
                    shown,
                    "device, fifo and socket entries are not allowed",
                ));
            } else {
                total = total.saturating_add(meta.len());
                if total > limits.max_unpacked_bytes {
                    return Err(ArchiveError::TooLarge(format!(
                        "unpacked size exceeds the limit of {} bytes",
                        limits.max_unpacked_bytes
                    )));
                }
                let mtime_ns = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                out.push(DirEntry {
                    rel,
                    len: meta.len(),
                    mtime_ns,
                });
            }
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// Copies the files `entries` (from [`scan_dir`] of `src`) into `dest` (which must not
/// exist), then reads it back as an archive ([`inspect`]). Like [`unpack`], the copy is made in
/// a sibling folder renamed into place. A file that changed size since the scan, or became a
/// link, is refused.
pub fn import_dir(src: &Path, entries: &[DirEntry], dest: &Path) -> Result<Unpacked, ArchiveError> {
    let real_src = src.canonicalize().map_err(io_err(src))?;
    let tmp = partial_dir(dest)?;
    let copy = || -> Result<(), ArchiveError> {
        let mut buf = vec![0u8; 1 << 20];
        for e in entries {
            let from = src.join(&e.rel);
            let to = tmp.join(&e.rel);
            if let Some(p) = to.parent() {
                fs::create_dir_all(p).map_err(io_err(p))?;
            }
            // Never a link at the end, never blocking (a file swapped for a fifo), and the file
            // opened must really lie inside `src` (a folder on the way swapped for a link
            // would lead elsewhere): the kernel's name for the open file says where it is.
            let mut input = {
                use std::os::unix::fs::OpenOptionsExt;
                fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&from)
                    .map_err(io_err(&from))?
            };
            let opened = {
                use std::os::fd::AsRawFd;
                fs::read_link(format!("/proc/self/fd/{}", input.as_raw_fd()))
                    .map_err(io_err(&from))?
            };
            if !opened.starts_with(&real_src) {
                return Err(ArchiveError::UnsafeEntry(
                    e.rel.display().to_string(),
                    "it leads outside the model folder",
                ));
            }
            let meta = input.metadata().map_err(io_err(&from))?;
            if !meta.is_file() || meta.len() != e.len {
                return Err(ArchiveError::Invalid(format!(
                    "{} changed while it was being read",
                    e.rel.display()
                )));
            }
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&to)
                .map_err(io_err(&to))?;
            let name = e.rel.to_string_lossy();
            copy_entry(&mut input, &mut out, e.len, &mut buf, &name, &to)?;
        }
        inspect(&tmp).map(|_| ())
    };
    match copy() {
        Ok(()) => {
            fs::rename(&tmp, dest).map_err(io_err(dest))?;
            inspect(dest)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn extract(archive: &Path, dest: &Path, limits: Limits) -> Result<(), ArchiveError> {
    let file = File::open(archive).map_err(io_err(archive))?;
    // Stored blocks only (`tessera pack`'s default): copied out, not inflated.
    let stored = stored::all_stored(&file);
    // Large reads: an archive of gigabytes through an 8 KiB buffer is a third of a million
    // read calls.
    let input = io::BufReader::with_capacity(1 << 20, file);
    if stored {
        let reader =
            stored::StoredGzReader::new(input).map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
        extract_from(tar::Archive::new(reader), dest, limits)
    } else {
        extract_from(tar::Archive::new(GzDecoder::new(input)), dest, limits)
    }
}

fn extract_from<R: Read>(
    mut tar: tar::Archive<R>,
    dest: &Path,
    limits: Limits,
) -> Result<(), ArchiveError> {
    // Raw entries: the tar crate would read GNU long-name and PAX records whole into memory
    // before we saw their size; here they are read by us, bounded, and counted.
    let entries = tar
        .entries()
        .map_err(|e| ArchiveError::Corrupt(e.to_string()))?
        .raw(true);
    let mut total: u64 = 0;
    let mut long_name: Option<Vec<u8>> = None;
    let mut buf = vec![0u8; 1 << 20];
    for (count, entry) in entries.enumerate() {
        if count >= MAX_ENTRIES {
            return Err(ArchiveError::TooLarge(format!(
                "more than {MAX_ENTRIES} entries"
            )));
        }
        let mut entry = entry.map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
        let kind = entry.header().entry_type();
        let declared = entry
            .header()
            .entry_size()
            .map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
        // Every entry's bytes count, metadata records included.
        total = total.saturating_add(declared);
        if total > limits.max_unpacked_bytes {
            return Err(ArchiveError::TooLarge(format!(
                "unpacked size exceeds the limit of {} bytes",
                limits.max_unpacked_bytes
            )));
        }
        if kind.is_gnu_longname()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions()
        {
            let header_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let record = read_record(&mut entry, declared, &header_name)?;
            if kind.is_pax_global_extensions() {
                continue; // archive-wide defaults (mtime, charset): nothing we use
            }
            if long_name.is_some() {
                return Err(ArchiveError::Corrupt(format!(
                    "{header_name}: two long-name records for one entry"
                )));
            }
            long_name = Some(if kind.is_gnu_longname() {
                let end = record.iter().position(|&b| b == 0).unwrap_or(record.len());
                record[..end].to_vec()
            } else {
                match pax_path(&record, &header_name)? {
                    Some(path) => path,
                    None => continue,
                }
            });
            continue;
        }
        let raw = long_name
            .take()
            .unwrap_or_else(|| entry.path_bytes().into_owned());
        let name = String::from_utf8_lossy(&raw).into_owned();
        let rel = safe_relative(&name)?;
        if let Some(rel) = &rel {
            check_not_reserved(rel, &name)?;
        }
        if kind.is_dir() {
            if let Some(rel) = rel {
                let d = dest.join(rel);
                fs::create_dir_all(&d).map_err(io_err(&d))?;
            }
            continue;
        }
        if kind.is_symlink() || kind.is_hard_link() || kind.is_gnu_longlink() {
            return Err(ArchiveError::UnsafeEntry(name, "links are not allowed"));
        }
        if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            return Err(ArchiveError::UnsafeEntry(
                name,
                "device and fifo entries are not allowed",
            ));
        }
        if !kind.is_file() && kind != tar::EntryType::Continuous {
            return Err(ArchiveError::UnsafeEntry(name, "unsupported entry type"));
        }
        let Some(rel) = rel else {
            return Err(ArchiveError::UnsafeEntry(name, "empty path"));
        };
        let out_path = dest.join(&rel);
        if out_path.exists() {
            return Err(ArchiveError::UnsafeEntry(name, "duplicate entry"));
        }
        if let Some(p) = out_path.parent() {
            fs::create_dir_all(p).map_err(io_err(p))?;
        }
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&out_path)
            .map_err(io_err(&out_path))?;
        copy_entry(&mut entry, &mut out, declared, &mut buf, &name, &out_path)?;
    }
    if long_name.is_some() {
        return Err(ArchiveError::Corrupt(
            "a long-name record describes no entry".into(),
        ));
    }
    // The rest of the stream (the tar's end blocks and padding, then the gzip trailer) is read
    // to its end, so that gzip's CRC-32 and length are checked: a flipped byte in a stored
    // archive fails here. Bounded: tar pads to 10 KiB records; past 1 MiB after the tar's end
    // the rest is left unread.
    io::copy(&mut tar.into_inner().take(1 << 20), &mut io::sink())
        .map_err(|e| ArchiveError::Corrupt(e.to_string()))?;
    Ok(())
}

/// Largest GNU long-name or PAX record accepted (paths are at most a few hundred bytes).
const MAX_RECORD_BYTES: u64 = 64 << 10;

fn read_record(entry: &mut impl Read, declared: u64, name: &str) -> Result<Vec<u8>, ArchiveError> {
    if declared > MAX_RECORD_BYTES {
        return Err(ArchiveError::TooLarge(format!(
            "metadata record '{name}' is {declared} bytes (limit {MAX_RECORD_BYTES})"
        )));
    }
    let mut record = Vec::with_capacity(declared as usize);
    entry
        .take(declared)
        .read_to_end(&mut record)
        .map_err(|e| ArchiveError::Corrupt(format!("{name}: {e}")))?;
    if record.len() as u64 != declared {
        return Err(ArchiveError::Corrupt(format!("{name}: truncated record")));
    }
    Ok(record)
}

/// The `path` of a PAX record. Keys that would change how the stream is read (`size`) or
/// make a link are refused rather than half-honoured.
fn pax_path(record: &[u8], name: &str) -> Result<Option<Vec<u8>>, ArchiveError> {
    let mut path = None;
    for ext in tar::PaxExtensions::new(record) {
        let ext = ext.map_err(|e| ArchiveError::Corrupt(format!("{name}: bad PAX record: {e}")))?;
        match ext.key_bytes() {
            b"path" => path = Some(ext.value_bytes().to_vec()),
            b"size" | b"linkpath" => {
                return Err(ArchiveError::UnsafeEntry(
                    name.into(),
                    "PAX size and linkpath records are not supported",
                ))
            }
            key if key.starts_with(b"GNU.sparse") => {
                return Err(ArchiveError::UnsafeEntry(
                    name.into(),
                    "sparse files are not supported",
                ))
            }
            _ => {}
        }
    }
    Ok(path)
}

/// Copies exactly `declared` bytes of an entry. Reading errors mean a corrupt archive; writing
/// errors are ours (a full disk, say) and keep their I/O error.
fn copy_entry(
    entry: &mut impl Read,
    out: &mut File,
    declared: u64,
    buf: &mut [u8],
    name: &str,
    out_path: &Path,
) -> Result<(), ArchiveError> {
    let mut left = declared;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = entry
            .read(&mut buf[..want])
            .map_err(|e| ArchiveError::Corrupt(format!("{name}: {e}")))?;
        if n == 0 {
            return Err(ArchiveError::Corrupt(format!(
                "{name}: size does not match its header"
            )));
        }
        out.write_all(&buf[..n]).map_err(io_err(out_path))?;
        left -= n as u64;
    }
    Ok(())
}

/// The entry name as a relative path below the archive root, or an error if it could escape.
/// `None` for the root itself (`./`).
fn safe_relative(name: &str) -> Result<Option<PathBuf>, ArchiveError> {
    names::relative_inside(name).map_err(|why| ArchiveError::UnsafeEntry(name.into(), why.reason()))
}

/// Reads an unpacked directory back: config, handler, model files.
pub fn inspect(dir: &Path) -> Result<Unpacked, ArchiveError> {
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(ArchiveError::Missing(CONFIG_FILE));
    }
    let config_len = fs::metadata(&config_path)
        .map_err(io_err(&config_path))?
        .len();
    if config_len > MAX_CONFIG_BYTES {
        return Err(ArchiveError::TooLarge(format!(
            "{CONFIG_FILE} is {config_len} bytes"
        )));
    }
    let text = fs::read_to_string(&config_path).map_err(io_err(&config_path))?;
    let config = ModelConfig::parse(&text)?;
    let handler = dir.join(HANDLER_FILE);
    if !handler.is_file() {
        return Err(ArchiveError::Missing(HANDLER_FILE));
    }
    let mut model_files = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.path().is_file() && check_model_file_name(&name).is_ok() {
            model_files.push(e.path());
        }
    }
    model_files.sort();
    let model_file = match &config.tessera.model {
        Some(m) => {
            let p = dir.join(m);
            if !p.is_file() {
                return Err(ArchiveError::Invalid(format!(
                    "tessera.model names '{m}', which is not in the archive"
                )));
            }
            p
        }
        None => match model_files.as_slice() {
            [one] => one.clone(),
            [] => return Err(ArchiveError::Missing("a TorchScript file (*.pt)")),
            _ => {
                return Err(ArchiveError::Invalid(
                    "several TorchScript files: name the one to run in tessera.model".into(),
                ))
            }
        },
    };
    let stage_file = match &config.tessera.cached_stage {
        Some(stage) => {
            let p = dir.join(&stage.model);
            if !p.is_file() {
                return Err(ArchiveError::Invalid(format!(
                    "cachedStage.model names '{}', which is not in the archive",
                    stage.model
                )));
            }
            Some(p)
        }
        None => None,
    };
    let mut model_bytes = 0;
    for f in &model_files {
        model_bytes += fs::metadata(f).map_err(io_err(f))?.len();
    }
    let handler_hash = sha256_file(&handler)?;
    Ok(Unpacked {
        dir: dir.to_path_buf(),
        config,
        model_file,
        stage_file,
        model_files,
        handler,
        handler_hash,
        model_bytes,
    })
}

/// What goes into an archive.
#[derive(Debug, Clone)]
pub struct PackSpec {
    pub config: PathBuf,
    pub models: Vec<PathBuf>,
    pub handler: PathBuf,
    /// Files or directories copied under `assets/` (directories keep their inner layout).
    pub assets: Vec<PathBuf>,
    pub compression: PackCompression,
}

/// How `tessera pack` compresses an archive. Every choice is a standard `.tar.gz`; they differ
/// in what a model's first load pays to unpack it. Weights barely compress (a few percent for
/// fp32, less for fp16), and inflating compressed blocks runs on one thread at a few hundred
/// MB/s, where stored blocks unpack at copy speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PackCompression {
    /// Stored deflate blocks: no compression, the fastest first load (the default).
    #[default]
    None,
    /// gzip level 1.
    Fast,
    /// gzip level 9: the smallest archive, the slowest to pack and unpack.
    Best,
}

impl PackCompression {
    fn level(self) -> flate2::Compression {
        match self {
            PackCompression::None => flate2::Compression::none(),
            PackCompression::Fast => flate2::Compression::fast(),
            PackCompression::Best => flate2::Compression::best(),
        }
    }
}

/// Writes a `.tar.gz` archive at `output` from `spec` (compressed as it says); validates the
/// config and file names.
/// Checking that the handler is a component of our world and that TorchScript loads is the
/// caller's job (it needs the sandbox and runtime).
pub fn pack(spec: &PackSpec, output: &Path) -> Result<(), ArchiveError> {
    let text = fs::read_to_string(&spec.config).map_err(io_err(&spec.config))?;
    let config = ModelConfig::parse(&text)?;
    if spec.models.is_empty() {
        return Err(ArchiveError::Missing("a TorchScript file (--model)"));
    }
    let mut names = Vec::new();
    for m in &spec.models {
        let name = m
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        check_model_file_name(&name)?;
        if names.contains(&name) {
            return Err(ArchiveError::Invalid(format!(
                "two model files named '{name}'"
            )));
        }
        names.push(name);
    }
    match &config.tessera.model {
        Some(m) if !names.contains(m) => {
            return Err(ArchiveError::Invalid(format!(
                "tessera.model names '{m}', which is not being packed"
            )))
        }
        None if names.len() > 1 => {
            return Err(ArchiveError::Invalid(
                "several model files: name the one to run in tessera.model".into(),
            ))
        }
        _ => {}
    }
    // Assets as (source, name under assets/).
    let mut assets = Vec::new();
    for asset in &spec.assets {
        let base = asset
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if asset.is_dir() {
            for (path, rel) in walk(asset)? {
                assets.push((path, format!("{base}/{rel}")));
            }
        } else {
            assets.push((asset.clone(), base));
        }
    }
    if let Some(w) = &config.tessera.warmup {
        if let Some(r) = w
            .requests()
            .into_iter()
            .find(|r| !assets.iter().any(|(_, name)| name == r))
        {
            return Err(ArchiveError::Invalid(format!(
                "tessera.warmup.request '{r}' is not among the packed assets (--asset)"
            )));
        }
    }
    let tmp = output.with_extension("partial");
    let file = File::create(&tmp).map_err(io_err(&tmp))?;
    let out = io::BufWriter::with_capacity(1 << 20, file);
    let written = match spec.compression {
        PackCompression::None => {
            let mut tar = tar::Builder::new(stored::StoredGzWriter::new(out));
            append_files(&mut tar, spec, &names, &assets)
                .and_then(|()| tar.into_inner().map_err(io_err(output)))
                .and_then(|gz| gz.finish().map_err(io_err(output)))
        }
        level => {
            let mut tar = tar::Builder::new(GzEncoder::new(out, level.level()));
            append_files(&mut tar, spec, &names, &assets)
                .and_then(|()| tar.into_inner().map_err(io_err(output)))
                .and_then(|gz| gz.finish().map_err(io_err(output)))
        }
    };
    let result = written.and_then(|mut w| w.flush().map_err(io_err(output)));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, output).map_err(io_err(output))?;
    Ok(())
}

/// The archive's files, in the order the server reads them back.
fn append_files<W: Write>(
    tar: &mut tar::Builder<W>,
    spec: &PackSpec,
    names: &[String],
    assets: &[(PathBuf, String)],
) -> Result<(), ArchiveError> {
    tar.follow_symlinks(true);
    let mut add = |src: &Path, name: &str| -> Result<(), ArchiveError> {
        tar.append_path_with_name(src, name).map_err(io_err(src))
    };
    add(&spec.config, CONFIG_FILE)?;
    for (m, name) in spec.models.iter().zip(names) {
        add(m, name)?;
    }
    add(&spec.handler, HANDLER_FILE)?;
    for (path, name) in assets {
        add(path, &format!("{ASSETS_DIR}/{name}"))?;
    }
    Ok(())
}

fn walk(root: &Path) -> Result<Vec<(PathBuf, String)>, ArchiveError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let p = e.map_err(io_err(&dir))?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p
                    .strip_prefix(root)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .replace('\\', "/");
                out.push((p, rel));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each compression writes a standard `.tar.gz` that unpacks to the same bytes; `none`
    /// stores them (the archive is at least as large as its files), `best` compresses.
    #[test]
    fn every_pack_compression_unpacks_to_the_same_files() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("model-config.yaml");
        fs::write(&config, "maxWorkers: 1\n").unwrap();
        // Compressible "weights": a repeating pattern, 3 MiB.
        let weights: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        let model = dir.path().join("model.pt");
        fs::write(&model, &weights).unwrap();
        let handler = dir.path().join("h.wasm");
        fs::write(&handler, b"\0asm-not-checked-here").unwrap();
        let limits = Limits {
            max_archive_bytes: 64 << 20,
            max_unpacked_bytes: 64 << 20,
        };
        let mut sizes = Vec::new();
        for (i, compression) in [
            PackCompression::None,
            PackCompression::Fast,
            PackCompression::Best,
        ]
        .into_iter()
        .enumerate()
        {
            let spec = PackSpec {
                config: config.clone(),
                models: vec![model.clone()],
                handler: handler.clone(),
                assets: vec![],
                compression,
            };
            let out = dir.path().join(format!("m{i}.tar.gz"));
            pack(&spec, &out).unwrap();
            let bytes = fs::read(&out).unwrap();
            assert_eq!(&bytes[..2], &[0x1f, 0x8b], "{compression:?}: a gzip stream");
            sizes.push(bytes.len());
            let unpacked = unpack(&out, &dir.path().join(format!("u{i}")), limits).unwrap();
            assert_eq!(
                fs::read(&unpacked.model_file).unwrap(),
                weights,
                "{compression:?}"
            );
            // One byte of the weights flipped: refused (the CRC), nothing left unpacked.
            let mut bad = bytes.clone();
            let at = bad.len() / 2;
            bad[at] ^= 0x10;
            let bad_path = dir.path().join(format!("bad{i}.tar.gz"));
            fs::write(&bad_path, &bad).unwrap();
            let dest = dir.path().join(format!("b{i}"));
            assert!(
                matches!(
                    unpack(&bad_path, &dest, limits),
                    Err(ArchiveError::Corrupt(_))
                ),
                "{compression:?}"
            );
            assert!(!dest.exists());
        }
        assert!(sizes[0] > weights.len(), "stored: {sizes:?}");
        assert!(sizes[2] * 20 < weights.len(), "compressed: {sizes:?}");
    }

    /// What the server writes under `.optimized` it loads unchecked: no folder brings it.
    #[test]
    fn folders_may_not_bring_the_servers_reserved_entries() {
        let limits = Limits {
            max_archive_bytes: 1 << 20,
            max_unpacked_bytes: 1 << 20,
        };
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("model.pt"), b"x").unwrap();
        assert!(scan_dir(dir.path(), limits).is_ok());
        fs::create_dir(dir.path().join(OPTIMIZED_DIR)).unwrap();
        fs::write(
            dir.path().join(OPTIMIZED_DIR).join("model.freeze.cpu.pt"),
            b"x",
        )
        .unwrap();
        let err = scan_dir(dir.path(), limits).unwrap_err().to_string();
        assert!(err.contains("reserved"), "{err}");
        // Elsewhere the name is ordinary.
        assert!(check_not_reserved(Path::new("assets/.optimized/x"), "x").is_ok());
    }

    #[test]
    fn torchserve_keys_are_accepted_and_named() {
        let c = ModelConfig::parse(
            "minWorkers: 1\nmaxWorkers: 2\nstartupTimeout: 120\nparallelType: pp\ndeviceIds: [0, 1]\n",
        )
        .unwrap();
        assert_eq!(c.max_workers, 2);
        assert_eq!(
            c.ignored_keys,
            ["startupTimeout", "deviceIds", "parallelType"]
        );
        assert!(ModelConfig::parse("startupTimeout: 1\nbogusKey: 1\n").is_err());
    }

    #[test]
    fn oip_specs_are_checked() {
        let ok = "tessera:\n  oip:\n    inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]\n    outputs: [{name: y, datatype: INT64, shape: [-1]}]\n";
        let c = ModelConfig::parse(ok).unwrap();
        let spec = c.tessera.oip.unwrap();
        assert!(spec.inputs[0].accepts(&[3, 4]) && !spec.inputs[0].accepts(&[3, 5]));
        assert!(!spec.inputs[0].accepts(&[4]));
        assert_eq!(spec.outputs[0].dtype(), crate::runtime::DType::I64);
        for bad in [
            ok.replace("FP32", "BYTES"),
            ok.replace("[-1, 4]", "[-2, 4]"),
            ok.replace("name: y", "name: ../y"),
            ok.replace(
                "inputs: [{name: x, datatype: FP32, shape: [-1, 4]}]",
                "inputs: [{name: x, datatype: FP32, shape: [1]}, {name: x, datatype: FP32, shape: [1]}]",
            ),
            "tessera:\n  oip:\n    inputs: []\n    outputs: [{name: y, datatype: FP32, shape: []}]\n".into(),
        ] {
            assert!(ModelConfig::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_defaults_and_validation() {
        let c = ModelConfig::parse("maxWorkers: 2\nhandler:\n  max_pixels: 100\n").unwrap();
        assert_eq!(
            (c.max_workers, c.batch_size, c.response_timeout),
            (2, 1, 120)
        );
        assert_eq!(c.handler_param("max_pixels").as_deref(), Some("100"));
        assert!(ModelConfig::parse("maxWorkers: 0\n").is_err());
        assert!(ModelConfig::parse("deviceType: tpu\n").is_err());
        assert!(ModelConfig::parse("bogusKey: 1\n").is_err());
        assert!(ModelConfig::parse("tessera:\n  model: ../x.pt\n").is_err());
        let c = ModelConfig::parse("batchSize: 8\nmaxBatchDelay: 5\ntessera:\n  batchable: true\n")
            .unwrap();
        assert!(c.tessera.batchable && c.batch_size == 8 && c.max_batch_delay == 5);
        assert!(
            !ModelConfig::parse("batchSize: 8\n")
                .unwrap()
                .tessera
                .batchable
        );
        assert!(ModelConfig::parse("maxBatchDelay: 60001\n").is_err());
        // A cached stage's model batches its entry model (the stage's outputs join the batch).
        let c = ModelConfig::parse(
            "tessera:\n  model: b.pt\n  batchable: true\n  cachedStage:\n    model: a.pt\n    inputs: [x]\n",
        )
        .unwrap();
        assert!(c.tessera.batchable && c.tessera.cached_stage.is_some());
        let c = ModelConfig::parse("tessera:\n  intraOpThreads: 1\n").unwrap();
        assert_eq!(c.tessera.intra_op_threads, Some(1));
        assert_eq!(
            ModelConfig::parse("").unwrap().tessera.intra_op_threads,
            None
        );
        for bad in ["0", "257", "-1", "two"] {
            let err = ModelConfig::parse(&format!("tessera:\n  intraOpThreads: {bad}\n"));
            assert!(err.is_err(), "intraOpThreads {bad} accepted");
        }
        let c = ModelConfig::parse("tessera:\n  executor: simple\n").unwrap();
        assert_eq!(c.tessera.executor, Some(crate::runtime::Executor::Simple));
        let c = ModelConfig::parse("tessera:\n  executor: legacy\n").unwrap();
        assert_eq!(c.tessera.executor, Some(crate::runtime::Executor::Legacy));
        let c = ModelConfig::parse(
            "tessera:\n  model: b.pt\n  executor: simple\n  cachedStage:\n    model: a.pt\n    inputs: [x]\n    executor: profiling\n",
        )
        .unwrap();
        let stage = c.tessera.cached_stage.unwrap();
        assert_eq!(stage.executor, Some(crate::runtime::Executor::Profiling));
        assert!(ModelConfig::parse(
            "tessera:\n  model: b.pt\n  cachedStage:\n    model: a.pt\n    inputs: [x]\n    executor: fast\n"
        )
        .is_err());
        assert!(ModelConfig::parse("tessera:\n  executor: turbo\n").is_err());
        for (yaml, want) in [
            ("", None),
            (
                "tessera:\n  optimize: freeze\n",
                Some(crate::runtime::Optimize::Freeze),
            ),
            (
                "tessera:\n  optimize: inference\n",
                Some(crate::runtime::Optimize::Inference),
            ),
        ] {
            assert_eq!(
                ModelConfig::parse(yaml).unwrap().tessera.optimize,
                want,
                "{yaml}"
            );
        }
        let err = ModelConfig::parse("tessera:\n  optimize: fast\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("freeze") && err.contains("inference"), "{err}");
        let c =
            ModelConfig::parse("tessera:\n  warmup:\n    request: [a.json, b/c.json]\n").unwrap();
        assert_eq!(c.tessera.warmup.unwrap().requests(), ["a.json", "b/c.json"]);
        let c = ModelConfig::parse("tessera:\n  warmup:\n    request: a.json\n").unwrap();
        assert_eq!(c.tessera.warmup.unwrap().requests(), ["a.json"]);
        for bad in ["[]", "[a, b, c, d, e]", "[a.json, ../x.json]", "{x: 1}"] {
            let yaml = format!("tessera:\n  warmup:\n    request: {bad}\n");
            assert!(ModelConfig::parse(&yaml).is_err(), "{bad}");
        }
        let c =
            ModelConfig::parse("tessera:\n  loop: true\n  cudaGraphs: true\n  maxCudaGraphs: 2\n")
                .unwrap();
        assert!(c.tessera.looped && c.tessera.cuda_graphs);
        assert_eq!(c.tessera.max_cuda_graphs, Some(2));
        for bad in [
            "tessera:\n  maxCudaGraphs: 2\n",
            "tessera:\n  cudaGraphs: true\n  maxCudaGraphs: 0\n",
            "tessera:\n  cudaGraphs: true\n  maxCudaGraphs: 65\n",
            "tessera:\n  loop: true\n  batchable: true\n",
            "tessera:\n  model: b.pt\n  loop: true\n  cachedStage:\n    model: a.pt\n    inputs: [x]\n",
        ] {
            assert!(ModelConfig::parse(bad).is_err(), "{bad}");
        }
    }
}
