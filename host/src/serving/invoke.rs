//! One inference request, top to bottom: resolve the name, make the model resident (loaded and
//! warm), admit the request at the model's queue (or answer 429), run the handler's preprocess,
//! the forward on the device and the handler's postprocess, each off the async runtime and all
//! within the model's responseTimeout.
use super::Server;
use crate::engine::{queue::NotRun, Slot};
use crate::error::{Error, ErrorKind};
use crate::registry::{Registration, RegistryError};
use crate::residency::{LoadedModel, OutOfMemory, ResidencyError, Source};
use crate::runtime::{HostTensor, PipelineInput, RuntimeError};
use crate::sandbox::{Handler, HandlerRequest, HandlerResponse, Sandbox};
use crate::store::StoreError;
use crate::tenancy::Tenant;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Timings of one request, returned to the client as headers.
#[derive(Debug, Default, Clone)]
pub struct Timings {
    /// The model version that served the request.
    pub version: String,
    /// For models with a cached stage: whether its outputs came from the cache.
    pub stage_cache: Option<bool>,
    /// Load and warm-up (or swap-in), when this request triggered them.
    pub load: Option<Duration>,
    /// Where the model was when the request came (`x-model-tier`: gpu or cpu when resident,
    /// host, disk, store).
    pub tier: Option<&'static str>,
    /// How long the load this request did waited for room in the budget: counted in the queue
    /// time (header and metric), not the load time.
    pub room_wait: Duration,
    pub queue: Duration,
    pub preprocess: Duration,
    pub inference: Duration,
    pub postprocess: Duration,
    /// Requests in the forward that served this one (1 unbatched; 0 when none ran).
    pub batch: usize,
}

/// Idle models one request's forward may evict after running out of memory before it answers
/// 507: enough when the memory is really held by others, bounded when the forward itself is
/// the problem (each retry would otherwise evict another tenant's idle model).
const MAX_OOM_EVICTIONS: u32 = 2;

/// A forward that failed: the error for the client, and the runtime's own when it was one.
struct Failed {
    error: Error,
    runtime: Option<RuntimeError>,
}

impl From<Error> for Failed {
    fn from(error: Error) -> Failed {
        Failed {
            error,
            runtime: None,
        }
    }
}

/// Why a forward produced no outputs.
enum ForwardError {
    Runtime(RuntimeError),
    NotRun(NotRun),
}

impl OutOfMemory for ForwardError {
    fn is_out_of_memory(&self) -> bool {
        matches!(self, ForwardError::Runtime(e) if e.is_out_of_memory())
    }
}

fn timed_out(timeout: Duration) -> Error {
    Error::new(
        ErrorKind::Timeout,
        format!("request timed out after {timeout:?} (model responseTimeout)"),
    )
}

impl Server {
    /// Serves one request for `tenant`'s model `name` (at `version`, or its default).
    pub async fn invoke(
        self: &Arc<Self>,
        tenant: &Tenant,
        name: &str,
        version: Option<&str>,
        request: HandlerRequest,
        request_id: &str,
    ) -> Result<(HandlerResponse, Timings), Error> {
        let (model, mut timings) = self.model_for(tenant, name, version).await?;
        let _busy = model.begin(self.residency.clock());
        let timeout = model.timeout_for(tenant);
        let slot = self.admit(&model, name)?;
        // The sandbox enforces the deadline itself and says which handler call overran; the
        // outer timer (a little later) catches waits and forwards, which cannot be interrupted.
        let outer = timeout + Duration::from_millis(250);
        match tokio::time::timeout(
            outer,
            self.run(&model, &slot, request, request_id, timeout, &mut timings),
        )
        .await
        {
            Ok(result) => result.map(|r| (r, timings)),
            Err(_) => Err(timed_out(timeout)),
        }
    }

    /// The resident model for a request, and its timings so far (the load, if this request
    /// did it; the version).
    async fn model_for(
        self: &Arc<Self>,
        tenant: &Tenant,
        name: &str,
        version: Option<&str>,
    ) -> Result<(Arc<LoadedModel>, Timings), Error> {
        let mut timings = Timings::default();
        let load_started = Instant::now();
        let (model, loaded_now) = self.resolve_resident(tenant, name, version).await?;
        let device = model.pipeline.device();
        timings.tier = Some(if loaded_now {
            timings.room_wait = model.room_wait();
            timings.load = Some(load_started.elapsed().saturating_sub(timings.room_wait));
            model.came_from().name(device)
        } else {
            crate::residency::Tier::Device.name(device)
        });
        timings.version = model.key.version.clone();
        Ok((model, timings))
    }

    /// `tenant`'s model `name` (at `version`, or its default) resident: resolved against the
    /// store, then [`Server::resident`]. When the store cannot be read, a resident version keeps
    /// serving (the one named, or the one used last); with none, 503.
    pub async fn resolve_resident(
        self: &Arc<Self>,
        tenant: &Tenant,
        name: &str,
        version: Option<&str>,
    ) -> Result<(Arc<LoadedModel>, bool), Error> {
        match self.registry.resolve(&tenant.name, name, version) {
            Ok(reg) => self.resident(&reg, tenant).await,
            Err(RegistryError::Store(StoreError::Unavailable(why))) => {
                match self
                    .residency
                    .resident_fallback(&tenant.name, name, version)
                {
                    Some(model) => {
                        // Once a minute at most: every request of the outage passes here.
                        static WARNED: AtomicU64 = AtomicU64::new(0);
                        let now = self.residency.clock().elapsed().as_secs() + 60;
                        let last = WARNED.load(Ordering::Relaxed);
                        if now >= last + 60
                            && WARNED
                                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                                .is_ok()
                        {
                            tracing::warn!(model = %model.key, why, "model store unreadable: serving resident versions");
                        }
                        Ok((model, false))
                    }
                    None => Err(RegistryError::Store(StoreError::Unavailable(why)).into()),
                }
            }
            // Nothing in a readable store answers to the name any more (its archive was
            // removed): resident versions of it are orphans, unloaded now.
            Err(RegistryError::NotFound(n)) if version.is_none() => {
                if !self
                    .residency
                    .resident_versions(&tenant.name, name)
                    .is_empty()
                    && self.residency.remove_model(&tenant.name, name).await > 0
                {
                    tracing::info!(
                        model = name,
                        tenant = tenant.name,
                        "its archive was removed from the store: unloaded"
                    );
                }
                Err(RegistryError::NotFound(n).into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `reg` resident for `tenant`: loaded if needed and, after a load, warmed up before anyone
    /// is served. Returns whether this call did the load. The load runs as a task of its own, so
    /// a requester that goes away (a client disconnecting) does not abandon a load that others
    /// wait for.
    pub async fn resident(
        self: &Arc<Self>,
        reg: &Registration,
        tenant: &Tenant,
    ) -> Result<(Arc<LoadedModel>, bool), Error> {
        if !self.residency.is_quarantined(&reg.key) {
            if let Some(model) = self.residency.peek(&reg.key).await {
                match model.source_at(&reg.archive) {
                    Source::Current => return Ok((model, false)),
                    // An unreadable store says nothing about the archive: keep serving.
                    Source::Gone if self.registry.store().check_readable().is_err() => {
                        return Ok((model, false))
                    }
                    Source::Gone => {
                        tracing::info!(model = %reg.key, "its archive was removed from the store: unloaded");
                        self.residency.remove(&reg.key).await;
                        return Err(Error::new(
                            ErrorKind::NotFound,
                            format!("model '{}' was removed from the model store", reg.key.name),
                        ));
                    }
                    Source::Replaced => {
                        tracing::info!(model = %reg.key, "its archive was replaced in the store: reloading");
                        self.residency.remove(&reg.key).await;
                    }
                }
            }
        }
        if self.is_draining() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "the server is shutting down: no model is loaded any more; retry on another instance",
            ));
        }
        let (server, reg, tenant) = (self.clone(), reg.clone(), tenant.clone());
        let load = tokio::spawn(async move {
            server
                .residency
                .get(&reg, &tenant, |model| server.warm_up(model, &tenant))
                .await
        });
        match load.await {
            Ok(result) => Ok(result?),
            Err(e) => Err(Error::new(
                ErrorKind::Internal,
                format!("internal error: the load task failed: {e}"),
            )),
        }
    }

    /// At a reload, first captures again the CUDA graphs an earlier load of the file captured;
    /// then replays the archive's warm-up requests (`tessera.warmup`) through handler and model,
    /// under the time limit of a request of `tenant`. A failure is logged and serving goes on:
    /// warm-up only moves one-time costs off users.
    async fn warm_up(&self, model: Arc<LoadedModel>, tenant: &Tenant) {
        let timeout = model.timeout_for(tenant);
        recapture(&model, timeout).await;
        let Some(w) = model.config().tessera.warmup.clone() else {
            return;
        };
        let mut run = 0;
        for name in w.requests() {
            let Some(body) = self.warm_up_body(&model, name).await else {
                return;
            };
            for _ in 0..w.times {
                run += 1;
                if !self.warm_up_once(&model, &body, run, timeout).await {
                    return;
                }
            }
        }
        // The CUDA graphs for the warm-up's shapes are captured by the model's forward thread
        // once it is idle: wait for them, so that they too are ready before users arrive.
        wait_for_captures(&model, timeout).await;
    }

    /// A warm-up request's body, read from the archive's assets (bounded like any request body:
    /// it is the tenant's); `None` (logged) when it cannot be.
    async fn warm_up_body(&self, model: &LoadedModel, name: &str) -> Option<Vec<u8>> {
        let path = model
            .unpacked
            .dir
            .join(crate::archive::ASSETS_DIR)
            .join(name);
        let limit = self.config.max_request_bytes() as u64;
        let body = match tokio::fs::metadata(&path).await {
            Ok(m) if !m.is_file() || m.len() > limit => {
                tracing::warn!(model = %model.key, bytes = m.len(), limit,
                    "warm-up request {name} is not a file within the request size limit; serving without warm-up");
                return None;
            }
            Ok(_) => tokio::fs::read(&path).await,
            Err(e) => Err(e),
        };
        body.map_err(|e| tracing::warn!(model = %model.key, "warm-up request {name}: {e}"))
            .ok()
    }

    /// Runs one warm-up request; whether warm-up may go on.
    async fn warm_up_once(
        &self,
        model: &Arc<LoadedModel>,
        body: &[u8],
        run: u32,
        timeout: Duration,
    ) -> bool {
        let started = Instant::now();
        let request = HandlerRequest {
            body: body.to_vec(),
            content_type: "application/json".into(),
            headers: Vec::new(),
        };
        let Ok(slot) = model.engine.admit() else {
            tracing::warn!(model = %model.key, "warm-up found the queue full; serving without warm-up");
            return false;
        };
        let rid = format!("warmup-{run}");
        let mut timings = Timings::default();
        let result = tokio::time::timeout(
            timeout,
            self.run(model, &slot, request, &rid, timeout, &mut timings),
        )
        .await;
        let ms = started.elapsed().as_millis() as u64;
        // Every run goes through the whole pipeline (a cached stage's outputs would otherwise
        // answer the second), and no warm-up output stays cached.
        model.pipeline.clear_stage_cache();
        match result {
            Ok(Ok(r)) if r.status < 400 => {
                tracing::info!(model = %model.key, run, ms, "warm-up request done");
                true
            }
            Ok(Ok(r)) => {
                tracing::warn!(model = %model.key, status = r.status, body = %String::from_utf8_lossy(&r.body[..r.body.len().min(300)]), "warm-up request refused by the handler; serving without warm-up");
                false
            }
            Ok(Err(e)) => {
                tracing::warn!(model = %model.key, error = %e, "warm-up request failed; serving without warm-up");
                false
            }
            Err(_) => {
                tracing::warn!(model = %model.key, "warm-up request timed out; serving without warm-up");
                false
            }
        }
    }

    /// Preprocess → forward → postprocess under `slot`, within `timeout` from now. Every
    /// blocking step holds a clone of the slot, so work a gone client left running still
    /// counts against the model's queue bound until it stops.
    async fn run(
        &self,
        model: &Arc<LoadedModel>,
        slot: &Slot,
        request: HandlerRequest,
        request_id: &str,
        timeout: Duration,
        timings: &mut Timings,
    ) -> Result<HandlerResponse, Error> {
        let deadline = Instant::now() + timeout;
        let t = Instant::now();
        let rid = request_id.to_string();
        let pre = self
            .handler_call(model, slot, move |sandbox, handler| {
                sandbox.preprocess(handler, request, &rid, deadline)
            })
            .await??;
        timings.preprocess = t.elapsed();

        let input = PipelineInput::new(
            pre.inputs,
            pre.cache_key,
            pre.pinned,
            model.pipeline.stage_inputs(),
        );
        let outputs = self
            .forward(model, slot, input, deadline, timeout, timings)
            .await
            .map_err(|e| e.error)?;

        let t = Instant::now();
        let rid = request_id.to_string();
        let response = self
            .handler_call(model, slot, move |sandbox, handler| {
                sandbox.postprocess(handler, outputs, pre.context, &rid, deadline)
            })
            .await??;
        timings.postprocess = t.elapsed();
        Ok(response)
    }

    /// Serves one Open Inference Protocol request: `tensors` go straight to `tenant`'s model
    /// `name` (its handler is not called), checked against the model's `tessera.oip` spec and
    /// put in its order; returns the outputs, named by the spec, and the model's spec.
    pub async fn infer_tensors(
        self: &Arc<Self>,
        tenant: &Tenant,
        name: &str,
        version: Option<&str>,
        tensors: Vec<HostTensor>,
    ) -> Result<(Vec<HostTensor>, Timings), Error> {
        let (model, mut timings) = self.model_for(tenant, name, version).await?;
        let spec = oip_spec(&model)?;
        let inputs = order_inputs(&spec, tensors)?;
        let _busy = model.begin(self.residency.clock());
        let timeout = model.timeout_for(tenant);
        let slot = self.admit(&model, name)?;
        let deadline = Instant::now() + timeout;
        let input = PipelineInput::new(inputs, None, None, &[]);
        let outer = timeout + Duration::from_millis(250);
        let outputs = tokio::time::timeout(
            outer,
            self.forward(&model, &slot, input, deadline, timeout, &mut timings),
        )
        .await
        .map_err(|_| timed_out(timeout))?
        .map_err(|e| match e.runtime {
            // The client chose these tensors (within the spec's -1 dimensions): a model that
            // cannot run them is told so as a refusal of the input, not as our failure.
            Some(RuntimeError::Forward(m) | RuntimeError::Input(m)) => Error::new(
                ErrorKind::Unprocessable,
                format!("the model could not run these inputs: {m}"),
            ),
            _ => e.error,
        })?;
        if outputs.len() != spec.outputs.len() {
            return Err(RuntimeError::Output(format!(
                "the model returned {} outputs, its tessera.oip lists {}",
                outputs.len(),
                spec.outputs.len()
            ))
            .into());
        }
        let named = outputs
            .into_iter()
            .zip(&spec.outputs)
            .map(|(mut t, s)| {
                t.name = s.name.clone();
                t
            })
            .collect();
        Ok((named, timings))
    }

    /// A slot in `model`'s queue, or 429.
    fn admit(&self, model: &LoadedModel, name: &str) -> Result<Slot, Error> {
        model.engine.admit().map_err(|_| {
            self.metrics
                .rejected
                .with_label_values(&model.key.labels())
                .inc();
            Error::new(
                ErrorKind::Overloaded,
                format!("model '{name}' is busy: its queue is full, retry later"),
            )
        })
    }

    /// The forward of `input` under `slot` (queued, batched, retried after evicting on out of
    /// memory), with its timings and metrics.
    async fn forward(
        &self,
        model: &Arc<LoadedModel>,
        slot: &Slot,
        input: PipelineInput,
        deadline: Instant,
        timeout: Duration,
        timings: &mut Timings,
    ) -> Result<Vec<HostTensor>, Failed> {
        let labels = model.key.labels();
        let t = Instant::now();
        let input = Arc::new(input);
        // Queue waits of every attempt (a forward that ran out of memory is tried again).
        let queued_ns = AtomicU64::new(0);
        let batch = AtomicUsize::new(0);
        let forward = self
            .residency
            .retry_out_of_memory(&model.key, MAX_OOM_EVICTIONS, || {
                let (input, queued_ns, batch) = (input.clone(), &queued_ns, &batch);
                async move {
                    let reply = model
                        .engine
                        .forward(slot, input, deadline)
                        .await
                        .map_err(ForwardError::NotRun)?;
                    let (result, waited) = (reply.result, reply.queued);
                    queued_ns.fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
                    batch.store(reply.batch, Ordering::Relaxed);
                    result.map_err(ForwardError::Runtime)
                }
            })
            .await;
        let queued = Duration::from_nanos(queued_ns.load(Ordering::Relaxed));
        let (outputs, hit): (Vec<HostTensor>, Option<bool>) = match forward {
            Ok(done) => done,
            Err(ForwardError::Runtime(RuntimeError::OutOfMemory { message, .. })) => {
                return Err(Error::from(ResidencyError::InsufficientMemory(format!(
                    "forward of '{}' ran out of memory, also after evicting what it may evict: {}",
                    model.key.name,
                    message.lines().next().unwrap_or_default()
                )))
                .into())
            }
            Err(ForwardError::Runtime(e)) => {
                return Err(Failed {
                    error: e.clone().into(),
                    runtime: Some(e),
                })
            }
            Err(ForwardError::NotRun(NotRun::Expired)) => return Err(timed_out(timeout).into()),
            Err(ForwardError::NotRun(NotRun::Closed)) => {
                return Err(Error::from(RuntimeError::Forward(
                    "the model's workers have stopped".into(),
                ))
                .into())
            }
        };
        timings.stage_cache = hit;
        timings.batch = batch.load(Ordering::Relaxed);
        self.metrics
            .batch_size
            .with_label_values(&labels)
            .observe(timings.batch as f64);
        if let Some(hit) = hit {
            let result = if hit { "hit" } else { "miss" };
            self.metrics
                .stage_cache
                .with_label_values(&[labels[0], labels[1], labels[2], result])
                .inc();
        }
        timings.queue = queued + timings.room_wait;
        self.metrics
            .queue_seconds
            .with_label_values(&labels)
            .observe(timings.queue.as_secs_f64());
        timings.inference = t.elapsed().saturating_sub(queued);
        self.metrics
            .inference_seconds
            .with_label_values(&labels)
            .observe(timings.inference.as_secs_f64());
        Ok(outputs)
    }

    /// Runs `call` with the sandbox and `model`'s handler on a blocking thread, holding a clone
    /// of `slot` until it returns (so abandoned handler work still counts in the queue bound).
    async fn handler_call<T: Send + 'static>(
        &self,
        model: &Arc<LoadedModel>,
        slot: &Slot,
        call: impl FnOnce(&Sandbox, &Handler) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let (sandbox, model, slot) = (self.sandbox.clone(), model.clone(), slot.clone());
        Ok(crate::residency::loader::blocking(move || {
            let _slot = slot;
            call(&sandbox, &model.handler)
        })
        .await?)
    }
}

/// The model's `tessera.oip`, or 400 for a model served through its handler only.
pub fn oip_spec(model: &LoadedModel) -> Result<crate::archive::OipSpec, Error> {
    model.config().tessera.oip.clone().ok_or_else(|| {
        Error::new(
            ErrorKind::BadRequest,
            format!(
                "model '{}' does not take Open Inference Protocol requests (its model-config.yaml has no tessera.oip): call it through its handler at /predictions/{}",
                model.key.name, model.key.name
            ),
        )
    })
}

/// `tensors` in the spec's order, each checked against its entry: every input given once,
/// nothing else, datatypes and shapes as declared.
fn order_inputs(
    spec: &crate::archive::OipSpec,
    tensors: Vec<HostTensor>,
) -> Result<Vec<HostTensor>, Error> {
    let bad = |m: String| Error::new(ErrorKind::BadRequest, m);
    let mut by_name: std::collections::HashMap<String, HostTensor> =
        std::collections::HashMap::new();
    for t in tensors {
        if !spec.inputs.iter().any(|s| s.name == t.name) {
            let known: Vec<&str> = spec.inputs.iter().map(|s| s.name.as_str()).collect();
            return Err(bad(format!(
                "unexpected input '{}': the model takes {known:?}",
                t.name
            )));
        }
        let name = t.name.clone();
        if by_name.insert(name.clone(), t).is_some() {
            return Err(bad(format!("input '{name}' given twice")));
        }
    }
    spec.inputs
        .iter()
        .map(|s| {
            let t = by_name
                .remove(&s.name)
                .ok_or_else(|| bad(format!("input '{}' is missing", s.name)))?;
            if t.dtype != s.dtype() {
                return Err(bad(format!(
                    "input '{}' must be {}, got {}",
                    s.name,
                    s.datatype,
                    crate::oip::datatype_name(t.dtype)
                )));
            }
            if !s.accepts(&t.shape) {
                return Err(bad(format!(
                    "input '{}' must have shape {:?} (-1: any size), got {:?}",
                    s.name, s.shape, t.shape
                )));
            }
            Ok(t)
        })
        .collect()
}

/// At a reload, waits (at most `timeout`) for the model's forward thread to capture again the
/// CUDA graphs an earlier load of its file captured (it starts at once, on zero-filled inputs),
/// so that the warm-up requests that follow replay them instead of running uncaptured: what is
/// left of them warms what no graph holds (a loop's `prepare` and `finish`, a cached stage, the
/// handler).
async fn recapture(model: &LoadedModel, timeout: Duration) {
    let (recalled, _) = model.pipeline.recalled_captures();
    if recalled == 0 {
        return;
    }
    let started = Instant::now();
    wait_for_captures(model, timeout).await;
    let ms = started.elapsed().as_millis() as u64;
    match model.pipeline.recalled_captures() {
        (_, false) => tracing::info!(model = %model.key, graphs = recalled, ms,
            "CUDA graphs of an earlier load captured again before the warm-up requests"),
        (_, true) => tracing::warn!(model = %model.key, graphs = recalled, ms,
            "not every CUDA graph of an earlier load could be captured again; requests will bring them"),
    }
}

/// Waits (at most `timeout`) for the model's forward thread to capture the CUDA graphs it has
/// pending.
async fn wait_for_captures(model: &LoadedModel, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while model.pipeline.pending_captures() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
