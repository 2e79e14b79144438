//! A model's full forward: an optional cached first stage, then the entry model.
//!
//! The first stage (SAM's image encoder, say) is the expensive part that many requests share.
//! Its outputs stay on the device in a [`StageCache`] keyed by the handler's cache key,
//! bounded in bytes (LRU), so a later request with the same key runs only the entry model.
//! The cache belongs to one loaded model version, so it is scoped to its tenant and model,
//! and its capacity is reserved in the residency budget by the caller.
use super::tier::{Classes, HostCopy, Moved};
use super::{collect_outputs, DType, Executor, HostTensor, RuntimeError, TorchModel, WarmUpState};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tch::{Device, IValue, Tensor};

/// A forward's outputs and, for a model with a cached stage, whether the cache answered.
pub type Forwarded = (Vec<HostTensor>, Option<bool>);

/// A request's stage outputs and whether the cache (or the handler's pin) had them.
type Staged = (Arc<CachedOutputs>, bool);

/// Stage outputs kept on the device.
pub struct CachedOutputs {
    tensors: Vec<Tensor>,
    bytes: u64,
}

// SAFETY: cached tensors are never mutated after insertion; readers only take
// `shallow_clone`s, which bump c10's atomic reference count.
unsafe impl Sync for CachedOutputs {}

impl CachedOutputs {
    fn new(tensors: Vec<Tensor>) -> CachedOutputs {
        let bytes = tensors
            .iter()
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum();
        CachedOutputs { tensors, bytes }
    }
}

/// LRU cache of stage outputs, bounded in bytes.
pub struct StageCache {
    capacity: u64,
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    entries: HashMap<String, (Arc<CachedOutputs>, u64)>,
    bytes: u64,
    tick: u64,
}

impl std::fmt::Debug for StageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.lock().unwrap();
        write!(
            f,
            "StageCache({} entries, {}/{} bytes)",
            inner.entries.len(),
            inner.bytes,
            self.capacity
        )
    }
}

impl StageCache {
    pub fn new(capacity: u64) -> StageCache {
        StageCache {
            capacity,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The outputs under `key`, marked recently used.
    pub fn get(&self, key: &str) -> Option<Arc<CachedOutputs>> {
        let mut inner = self.inner.lock().unwrap();
        inner.tick += 1;
        let tick = inner.tick;
        let entry = inner.entries.get_mut(key)?;
        entry.1 = tick;
        Some(entry.0.clone())
    }

    /// Drops every entry (outputs a request still holds stay alive until it is done).
    pub fn clear(&self) {
        let mut inner = self.inner.lock().unwrap();
        inner.entries.clear();
        inner.bytes = 0;
    }

    /// Keeps `outputs` under `key`, evicting least recently used entries to fit. Outputs
    /// larger than the whole cache are not kept.
    fn insert(&self, key: &str, outputs: Arc<CachedOutputs>) {
        if outputs.bytes > self.capacity {
            return;
        }
        let mut inner = self.inner.lock().unwrap();
        if let Some((old, _)) = inner.entries.remove(key) {
            inner.bytes -= old.bytes;
        }
        while inner.bytes + outputs.bytes > self.capacity {
            let Some(oldest) = inner
                .entries
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            let (gone, _) = inner.entries.remove(&oldest).expect("present");
            inner.bytes -= gone.bytes;
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.bytes += outputs.bytes;
        inner.entries.insert(key.to_string(), (outputs, tick));
    }
}

/// The cached first stage.
pub struct Stage {
    pub model: TorchModel,
    /// Handler tensor names the stage consumes, in order.
    pub inputs: Vec<String>,
    pub cache: Arc<StageCache>,
    /// The stage's TorchScript executor (the model's unless its config names another).
    pub executor: Executor,
}

/// Everything a forward needs from the handler.
pub struct PipelineInput {
    pub tensors: Vec<HostTensor>,
    pub cache_key: Option<String>,
    /// Stage outputs the handler was promised by `is-cached` (held so they cannot vanish).
    pub pinned: Option<Arc<CachedOutputs>>,
    /// A hash of the tensors' [`batch_key`], computed once (the batcher compares it under the
    /// queue's lock); `None`: the request runs alone.
    pub batch_key: Option<u64>,
}

impl PipelineInput {
    /// The batch key covers the tensors the entry model takes from the handler: all but
    /// `stage_inputs` (the cached stage's, which its cached outputs replace); a request that
    /// carries stage inputs has none (it runs alone).
    pub fn new(
        tensors: Vec<HostTensor>,
        cache_key: Option<String>,
        pinned: Option<Arc<CachedOutputs>>,
        stage_inputs: &[String],
    ) -> PipelineInput {
        // A request that brings its stage's inputs (its stage outputs are not cached) runs
        // alone: its stage forward would hold up every request batched with it.
        let brings_stage_inputs = tensors.iter().any(|t| stage_inputs.contains(&t.name));
        let batch_key = if brings_stage_inputs {
            None
        } else {
            batch_key(&tensors).map(|k| {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                k.hash(&mut h);
                h.finish()
            })
        };
        PipelineInput {
            tensors,
            cache_key,
            pinned,
            batch_key,
        }
    }
}

/// A loaded model: optional cached stage + entry model.
pub struct Pipeline {
    /// Where its weights are (declared first: dropped before the models).
    pub tier: Tier,
    pub stage: Option<Stage>,
    pub entry: TorchModel,
}

/// Where a pipeline's weights are: on its device (serving) or in host memory (see
/// [`Pipeline::to_host`]). Calls hold the gate shared; a move holds it alone.
#[derive(Default)]
pub struct Tier {
    gate: std::sync::RwLock<()>,
    copy: Mutex<Option<HostCopy>>,
    on_host: std::sync::atomic::AtomicBool,
    /// A CUDA graph of the model writes its tensors in place: its replays change them without
    /// bumping their version counters, so no host copy is trusted as unchanged.
    graphs_write: std::sync::atomic::AtomicBool,
    /// The shared storages it uses on the device (see [`Pipeline::share_weights`]): identity
    /// and bytes, empty while in host memory.
    shared: Mutex<Arc<Vec<(usize, u64)>>>,
    /// The content classes of its shared storages (see [`Pipeline::share_weights`]) and their
    /// tensors' version sum then.
    classes: Mutex<Option<(Classes, Option<i64>)>>,
    /// A shared tensor was found written (logged once).
    shared_written: std::sync::atomic::AtomicBool,
}

/// How long a move to the host waits for a call of the model to end (a warm-up step or a CUDA
/// graph capture between requests) before it gives up.
const GATE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Held by a call of the model: its weights stay on the device meanwhile.
pub type Serving<'a> = std::sync::RwLockReadGuard<'a, ()>;

impl Pipeline {
    pub fn new(stage: Option<Stage>, entry: TorchModel) -> Pipeline {
        Pipeline {
            tier: Tier::default(),
            stage,
            entry,
        }
    }

    pub fn device(&self) -> Device {
        self.entry.device
    }

    /// Whether its weights are in host memory.
    pub fn on_host(&self) -> bool {
        self.tier.on_host.load(Ordering::SeqCst)
    }

    /// For a call of the model: holds its weights on the device until dropped. An error while
    /// they are in host memory (a model is moved there only once out of residency and unused,
    /// so no request should meet it).
    pub fn serving(&self) -> Result<Serving<'_>, RuntimeError> {
        let guard = self.tier.gate.read().unwrap_or_else(|e| e.into_inner());
        if self.on_host() {
            return Err(RuntimeError::Forward(
                "the model's weights are in host memory (evicted); retry".into(),
            ));
        }
        Ok(guard)
    }

    /// Like [`Pipeline::serving`] for work between requests: `None` at once while the weights
    /// move or are in host memory.
    pub fn try_serving(&self) -> Option<Serving<'_>> {
        let guard = self.tier.gate.try_read().ok()?;
        (!self.on_host()).then_some(guard)
    }

    /// Bytes of its host copy, when one is allocated (in host memory now, or kept from an
    /// earlier move).
    pub fn host_bytes(&self) -> u64 {
        let copy = self.tier.copy.lock().unwrap_or_else(|e| e.into_inner());
        copy.as_ref()
            .filter(|c| c.allocated())
            .map_or(0, |c| c.bytes())
    }

    /// Bytes its host copy would take (collecting what would move, if not done yet).
    pub fn host_bytes_needed(&self) -> Result<u64, RuntimeError> {
        // Not while the weights move.
        let _serving = self.tier.gate.read().unwrap_or_else(|e| e.into_inner());
        let mut copy = self.tier.copy.lock().unwrap_or_else(|e| e.into_inner());
        Ok(self.host_copy(&mut copy)?.bytes())
    }

    fn host_copy<'a>(
        &self,
        copy: &'a mut Option<HostCopy>,
    ) -> Result<&'a mut HostCopy, RuntimeError> {
        if copy.is_none() {
            *copy = Some(HostCopy::collect(&self.modules(), self.device())?);
        }
        Ok(copy.as_mut().expect("set above"))
    }

    fn modules(&self) -> Vec<&tch::CModule> {
        let mut modules = Vec::new();
        if let Some(m) = self.stage.as_ref().and_then(|s| s.model.module()) {
            modules.push(m);
        }
        if let Some(m) = self.entry.module() {
            modules.push(m);
        }
        modules
    }

    /// Moves its weights to host memory (page-locked when `pin` and possible), freeing their
    /// device memory: its CUDA graphs are dropped (their signatures kept, see
    /// [`Pipeline::to_device`]) and its stage cache emptied first. Waits for calls in flight.
    /// On error the weights stay where they were.
    pub fn to_host(&self, pin: bool) -> Result<Moved, RuntimeError> {
        // A call under way (work between requests: a warm-up step, a graph capture) is waited
        // for, up to GATE_WAIT: one that runs longer is stuck or slow, and the model stays.
        let started = std::time::Instant::now();
        let _alone = loop {
            match self.tier.gate.try_write() {
                Ok(guard) => break guard,
                Err(std::sync::TryLockError::Poisoned(e)) => break e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) if started.elapsed() < GATE_WAIT => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    return Err(RuntimeError::Busy(format!(
                        "a call of the model ran on for {} s",
                        GATE_WAIT.as_secs()
                    )))
                }
            }
        };
        if self.on_host() {
            return Err(RuntimeError::Forward("already in host memory".into()));
        }
        let mut copy = self.tier.copy.lock().unwrap_or_else(|e| e.into_inner());
        let copy = self.host_copy(&mut copy)?;
        self.clear_stage_cache();
        if let Some(g) = self.entry.graphs() {
            g.park();
        }
        let moved = copy.to_host(pin, self.tier.graphs_write.load(Ordering::SeqCst));
        if moved.is_err() {
            if let Some(g) = self.entry.graphs() {
                g.unpark();
            }
        } else {
            self.tier.on_host.store(true, Ordering::SeqCst);
            *self.tier.shared.lock().unwrap_or_else(|e| e.into_inner()) = Arc::default();
        }
        moved
    }

    /// Copies its weights to their host copy (allocated now if needed, page-locked when `pin`
    /// and possible) while they stay on the device and serve, so that a later
    /// [`Pipeline::to_host`] copies only what is written meanwhile. An error while the weights
    /// move or are in host memory.
    pub fn stage_host_copy(&self, pin: bool) -> Result<Moved, RuntimeError> {
        let Some(_serving) = self.try_serving() else {
            return Err(RuntimeError::Forward(
                "its weights are moving or in host memory".into(),
            ));
        };
        let mut copy = self.tier.copy.lock().unwrap_or_else(|e| e.into_inner());
        self.host_copy(&mut copy)?
            .stage(pin, self.tier.graphs_write.load(Ordering::SeqCst))
    }

    /// Moves its weights back to the device (their host copy is kept; see
    /// [`Pipeline::release_host_copy`]) and queues its CUDA graphs for capture again; on
    /// error (out of memory, say) they stay in host memory.
    pub fn to_device(&self) -> Result<Moved, RuntimeError> {
        let _alone = self.tier.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut copy = self.tier.copy.lock().unwrap_or_else(|e| e.into_inner());
        let Some(copy) = copy.as_mut().filter(|_| self.on_host()) else {
            return Err(RuntimeError::Forward("not in host memory".into()));
        };
        let moved = copy.to_device()?;
        *self.tier.shared.lock().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(copy.shared_storages());
        self.tier.on_host.store(false, Ordering::SeqCst);
        if let Some(g) = self.entry.graphs() {
            g.unpark();
        }
        Ok(moved)
    }

    /// Shares its parameter storages with byte-identical ones other models of `scope` (a
    /// tenant) hold on the device, before its first call (see [`HostCopy::share`]); its held
    /// bytes drop by what that freed (equal storages within it count once too).
    pub fn share_weights(&mut self, scope: &str) -> Result<super::tier::Shared, RuntimeError> {
        let before = (
            self.entry.tensor_bytes(),
            self.stage.as_ref().and_then(|s| s.model.tensor_bytes()),
        );
        let mut copy = HostCopy::collect(&self.modules(), self.device())?;
        let shared = copy.share(scope);
        // Also after an error: storages handled before it stay shared.
        *self.tier.shared.lock().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(copy.shared_storages());
        let classes = copy.into_classes();
        let versions = classes.version_sum();
        *self.tier.classes.lock().unwrap_or_else(|e| e.into_inner()) = Some((classes, versions));
        // Less by what sharing freed (a model's held bytes may count more than its tensors hold
        // now: see `TorchModel::optimized`).
        let freed = |before: Option<u64>, after: Option<u64>| {
            before.zip(after).map_or(0, |(b, a)| b.saturating_sub(a))
        };
        let freed_entry = freed(before.0, self.entry.tensor_bytes());
        self.entry.held_bytes = self.entry.held_bytes.saturating_sub(freed_entry);
        if let Some(stage) = self.stage.as_mut() {
            let f = freed(before.1, stage.model.tensor_bytes());
            stage.model.held_bytes = stage.model.held_bytes.saturating_sub(f);
        }
        shared
    }

    /// Whether one of its shared parameters was written in place since it was shared (its
    /// version counter moved): the models sharing it then see the change. Logged once.
    pub fn wrote_shared_weights(&self, name: &str) -> bool {
        let classes = self.tier.classes.lock().unwrap_or_else(|e| e.into_inner());
        let Some((classes, Some(then))) = classes.as_ref() else {
            return false;
        };
        let written = classes.version_sum() != Some(*then);
        if written && !self.tier.shared_written.swap(true, Ordering::SeqCst) {
            tracing::error!(
                model = name,
                "the model wrote a parameter it shares with other models: they may answer \
                 differently now; serve models that write their weights with --share-weights off"
            );
        }
        written
    }

    /// The shared storages it uses on the device: (identity, bytes), each once.
    pub fn shared_storages(&self) -> Arc<Vec<(usize, u64)>> {
        self.tier
            .shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Frees its host copy while its weights are on the device; the bytes freed.
    pub fn release_host_copy(&self) -> u64 {
        let mut copy = self.tier.copy.lock().unwrap_or_else(|e| e.into_inner());
        match copy.as_mut() {
            Some(c) if c.allocated() && !self.on_host() => {
                let bytes = c.bytes();
                c.release();
                bytes
            }
            _ => 0,
        }
    }

    /// Empties the stage cache (after a warm-up run, so that the next run goes through the
    /// stage again and no warm-up output stays cached).
    pub fn clear_stage_cache(&self) {
        if let Some(stage) = &self.stage {
            stage.cache.clear();
        }
    }

    /// Bytes held on the device (CUDA graphs included), with the stage cache's full capacity
    /// reserved.
    pub fn held_bytes(&self) -> u64 {
        self.entry.device_bytes()
            + self
                .stage
                .as_ref()
                .map_or(0, |s| s.model.held_bytes + s.cache.capacity())
    }

    /// Captures one call waiting for its CUDA graph; whether there was one (see
    /// [`TorchModel::capture_pending`]).
    pub fn capture_pending(&self) -> bool {
        if self.entry.pending_captures() == 0 {
            return false;
        }
        // A capture runs the method through the dispatcher (and a replay runs the same kernels
        // without it): if the capture wrote the model's tensors, replays will too.
        let versions = || {
            let mut copy = self.tier.copy.lock().unwrap_or_else(|e| e.into_inner());
            self.host_copy(&mut copy).ok().map(|c| c.version_sum())
        };
        let before = versions();
        let captured = self.entry.capture_pending();
        if captured && before != versions() {
            self.tier.graphs_write.store(true, Ordering::SeqCst);
        }
        captured
    }

    /// Calls waiting for their CUDA graph.
    pub fn pending_captures(&self) -> usize {
        self.entry.pending_captures()
    }

    /// CUDA graphs recalled from an earlier load of the model's file, and whether one failed
    /// to capture again (see [`TorchModel::recalled_captures`]).
    pub fn recalled_captures(&self) -> (usize, bool) {
        self.entry.recalled_captures()
    }

    /// One piece of the work a forward thread does while no request waits: a CUDA graph
    /// capture, else a step of a model's warm-up ([`TorchModel::warm_up_step`]); whether one
    /// ran. `name` is for the log.
    pub fn background_step(&self, name: &str) -> bool {
        let Some(_serving) = self.try_serving() else {
            return false;
        };
        self.capture_pending()
            || self
                .stage
                .as_ref()
                .is_some_and(|s| s.model.warm_up_step(name))
            || self.entry.warm_up_step(name)
    }

    /// Where the models' warm-ups stand: running while either model's runs, else ended if
    /// either's ended, `None` when neither has one.
    pub fn warm_up_state(&self) -> Option<WarmUpState> {
        let states = [
            self.stage.as_ref().and_then(|s| s.model.warm_up_state()),
            self.entry.warm_up_state(),
        ];
        [WarmUpState::Running, WarmUpState::Ended, WarmUpState::Done]
            .into_iter()
            .find(|s| states.contains(&Some(*s)))
    }

    /// Drops both models' warm-ups (`--model-warm-ups off`).
    pub fn disable_warm_ups(&mut self) {
        if let Some(stage) = &mut self.stage {
            stage.model.disable_warm_up();
        }
        self.entry.disable_warm_up();
    }

    /// Names of the handler tensors the cached stage consumes (none without a stage).
    pub fn stage_inputs(&self) -> &[String] {
        self.stage.as_ref().map_or(&[], |s| &s.inputs)
    }

    /// One forward over several requests (equal [`batch_key`]s): their inputs concatenated
    /// along dimension 0, the outputs split back per request, in order. With a cached stage,
    /// each request's stage outputs (cached, or computed for it alone) come first, concatenated
    /// too, ahead of its other tensors. A request whose stage fails gets its error alone; if
    /// the batched forward fails, each remaining request's entry forward runs by itself with
    /// the stage outputs it already has, so one request's values (or the batch's size) cannot
    /// fail the others. Returns each request's result and the number of requests in the
    /// forward that served it.
    pub fn forward_batch(
        &self,
        inputs: &[&PipelineInput],
    ) -> Vec<(Result<Forwarded, RuntimeError>, usize)> {
        let _guard = tch::no_grad_guard();
        let staged: Vec<Result<Option<Staged>, RuntimeError>> = inputs
            .iter()
            .map(|input| match &self.stage {
                Some(stage) => self.stage_outputs(stage, input).map(Some),
                None => Ok(None),
            })
            .collect();
        let ready: Vec<usize> = (0..inputs.len()).filter(|&k| staged[k].is_ok()).collect();
        let mut results: Vec<Option<(Result<Forwarded, RuntimeError>, usize)>> =
            inputs.iter().map(|_| None).collect();
        if ready.len() > 1 {
            let batch: Vec<&PipelineInput> = ready.iter().map(|&k| inputs[k]).collect();
            let batch_staged: Vec<Option<&Staged>> = ready
                .iter()
                .map(|&k| staged[k].as_ref().ok().and_then(Option::as_ref))
                .collect();
            match self.entry_batch(&batch, &batch_staged) {
                Ok(outputs) => {
                    for (&k, out) in ready.iter().zip(outputs) {
                        results[k] = Some((Ok(out), ready.len()));
                    }
                }
                Err(e) => tracing::warn!(requests = ready.len(), error = %e,
                    "batched forward failed; running its requests one by one"),
            }
        }
        results
            .into_iter()
            .zip(staged)
            .zip(inputs)
            .map(|((done, staged), input)| {
                done.unwrap_or_else(|| match staged {
                    Ok(staged) => (self.entry_alone(input, staged.as_ref()), 1),
                    Err(e) => (Err(e), 1),
                })
            })
            .collect()
    }

    /// Runs the stage (unless its outputs are cached) and the entry model. Returns the
    /// outputs and, for a model with a stage, whether the cache answered.
    pub fn forward(&self, input: &PipelineInput) -> Result<Forwarded, RuntimeError> {
        let staged = match &self.stage {
            Some(stage) => {
                let _guard = tch::no_grad_guard();
                Some(self.stage_outputs(stage, input)?)
            }
            None => None,
        };
        self.entry_alone(input, staged.as_ref())
    }

    /// The entry model for one request, after its stage outputs (if the model has a stage).
    fn entry_alone(
        &self,
        input: &PipelineInput,
        staged: Option<&Staged>,
    ) -> Result<Forwarded, RuntimeError> {
        let Some((outputs, hit)) = staged else {
            return Ok((self.entry.forward(&input.tensors)?, None));
        };
        let stage_out = outputs.tensors.iter().map(Tensor::shallow_clone).collect();
        let out = self.entry_after_stage(stage_out, entry_tensors(input, self.stage_inputs()))?;
        Ok((out, Some(*hit)))
    }

    /// The entry model on a stage's outputs followed by the handler tensors `rest`.
    fn entry_after_stage<'a>(
        &self,
        stage_out: Vec<Tensor>,
        rest: impl Iterator<Item = &'a HostTensor>,
    ) -> Result<Vec<HostTensor>, RuntimeError> {
        let _guard = tch::no_grad_guard();
        let mut args: Vec<IValue> = stage_out.into_iter().map(IValue::Tensor).collect();
        for t in rest {
            args.push(IValue::Tensor(t.to_tch(self.device())?));
        }
        let mut out = Vec::new();
        collect_outputs(self.entry.forward_values(args)?, None, &mut out)?;
        Ok(out)
    }

    /// The entry model once for `inputs` (all with stage outputs when the model has a stage),
    /// the outputs split back per request. Every request's stage outputs must match the first's
    /// in number and have its rows along dimension 0.
    fn entry_batch(
        &self,
        inputs: &[&PipelineInput],
        staged: &[Option<&Staged>],
    ) -> Result<Vec<Forwarded>, RuntimeError> {
        let skip = self.stage_inputs();
        let rows = batch_rows(inputs, skip)?;
        let Some(Some((first, _))) = staged.first() else {
            let outputs = self.entry.forward(&concat_rows(inputs, skip)?)?;
            return Ok(split_rows(outputs, &rows)?
                .into_iter()
                .map(|o| (o, None))
                .collect());
        };
        let parts: Vec<&CachedOutputs> = staged
            .iter()
            .zip(&rows)
            .map(|(s, &r)| {
                let (outputs, _) = s.ok_or_else(|| RuntimeError::Input("a batched request has no stage outputs".into()))?;
                let fits = outputs.tensors.len() == first.tensors.len()
                    && outputs.tensors.iter().all(|t| t.size().first() == Some(&r));
                fits.then_some(&**outputs).ok_or_else(|| {
                    RuntimeError::Input(format!(
                        "cached stage outputs do not batch: a request of {r} rows has outputs of shapes {:?}",
                        outputs.tensors.iter().map(Tensor::size).collect::<Vec<_>>()
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        let stage_out = (0..first.tensors.len())
            .map(|k| {
                let column: Vec<&Tensor> = parts.iter().map(|p| &p.tensors[k]).collect();
                Tensor::f_cat(&column, 0).map_err(|e| {
                    RuntimeError::Input(format!("cached stage outputs do not batch: {e}"))
                })
            })
            .collect::<Result<_, _>>()?;
        let out = self.entry_after_stage(stage_out, concat_rows(inputs, skip)?.iter())?;
        let hits = staged.iter().map(|s| s.map(|(_, hit)| *hit));
        Ok(split_rows(out, &rows)?.into_iter().zip(hits).collect())
    }

    /// `input`'s stage outputs: pinned by the handler's `is-cached`, cached, or computed now
    /// (and cached under its key). Says whether they were already there.
    fn stage_outputs(&self, stage: &Stage, input: &PipelineInput) -> Result<Staged, RuntimeError> {
        let cached = input
            .pinned
            .clone()
            .or_else(|| input.cache_key.as_deref().and_then(|k| stage.cache.get(k)));
        if let Some(c) = cached {
            return Ok((c, true));
        }
        let args = stage
            .inputs
            .iter()
            .map(|name| {
                input
                    .tensors
                    .iter()
                    .find(|t| &t.name == name)
                    .ok_or_else(|| {
                        RuntimeError::Input(format!(
                            "the cached stage needs input '{name}', which the handler did not send"
                        ))
                    })
                    .and_then(|t| t.to_tch(self.device()).map(IValue::Tensor))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let stage_out = {
            let _executor = ExecutorScope::enter(stage.executor);
            stage.model.forward_values(args)?
        };
        let tensors = match stage_out {
            IValue::Tensor(t) => vec![t],
            IValue::Tuple(items) | IValue::GenericList(items) => items
                .into_iter()
                .map(|v| match v {
                    IValue::Tensor(t) => Ok(t),
                    other => Err(RuntimeError::Output(format!(
                        "cached stage returned {other:?}"
                    ))),
                })
                .collect::<Result<_, _>>()?,
            other => {
                return Err(RuntimeError::Output(format!(
                    "cached stage returned {other:?}"
                )))
            }
        };
        let outputs = Arc::new(CachedOutputs::new(tensors));
        if let Some(key) = &input.cache_key {
            stage.cache.insert(key, outputs.clone());
        }
        Ok((outputs, false))
    }
}

/// What requests must share to be batched together: per input tensor (in order) its name,
/// element type and dimensions after the first. `None` (the request runs alone) when a tensor
/// has no dimensions or the tensors disagree on their first (the request's rows).
pub fn batch_key(tensors: &[HostTensor]) -> Option<Vec<(String, DType, Vec<i64>)>> {
    let rows = rows(tensors.first())?;
    tensors
        .iter()
        .map(|t| {
            (t.shape.first() == Some(&rows))
                .then(|| (t.name.clone(), t.dtype, t.shape[1..].to_vec()))
        })
        .collect()
}

/// A request's rows: the first dimension of its first tensor.
fn rows(first: Option<&HostTensor>) -> Option<i64> {
    first?.shape.first().copied().filter(|r| *r > 0)
}

/// Each request's rows (the first dimension of its tensors but `skip`).
fn batch_rows(inputs: &[&PipelineInput], skip: &[String]) -> Result<Vec<i64>, RuntimeError> {
    inputs
        .iter()
        .map(|i| rows(entry_tensors(i, skip).next()))
        .collect::<Option<Vec<i64>>>()
        .ok_or_else(|| RuntimeError::Input("a batched request has no rows".into()))
}

/// `input`'s tensors but those named in `skip` (a cached stage's), in order.
fn entry_tensors<'a>(
    input: &'a PipelineInput,
    skip: &'a [String],
) -> impl Iterator<Item = &'a HostTensor> {
    input
        .tensors
        .iter()
        .filter(move |t| !skip.contains(&t.name))
}

/// The requests' tensors (but those named in `skip`) concatenated along dimension 0, in
/// request order (their [`batch_key`]s are equal).
fn concat_rows(
    inputs: &[&PipelineInput],
    skip: &[String],
) -> Result<Vec<HostTensor>, RuntimeError> {
    let per: Vec<Vec<&HostTensor>> = inputs
        .iter()
        .map(|i| entry_tensors(i, skip).collect())
        .collect();
    let first = &per[0];
    let mut out = Vec::with_capacity(first.len());
    for (j, t) in first.iter().enumerate() {
        let mut shape = t.shape.clone();
        shape[0] = 0;
        let mut data = Vec::with_capacity(t.data.len() * inputs.len());
        for tensors in &per {
            let part = tensors
                .get(j)
                .filter(|p| {
                    p.name == t.name
                        && p.dtype == t.dtype
                        && !p.shape.is_empty()
                        && p.shape.get(1..) == t.shape.get(1..)
                })
                .ok_or_else(|| {
                    RuntimeError::Input(format!("batched requests disagree on input '{}'", t.name))
                })?;
            shape[0] += part.shape[0];
            data.extend_from_slice(&part.data);
        }
        out.push(HostTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape,
            data,
        });
    }
    Ok(out)
}

/// Splits a batched forward's outputs back into each request's rows (`rows`, in order). Every
/// output must be batched along dimension 0.
fn split_rows(
    outputs: Vec<HostTensor>,
    rows: &[i64],
) -> Result<Vec<Vec<HostTensor>>, RuntimeError> {
    let total: i64 = rows.iter().sum();
    let mut per: Vec<Vec<HostTensor>> = rows
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for o in outputs {
        if o.shape.first() != Some(&total) {
            return Err(RuntimeError::Output(format!(
                "output '{}' of shape {:?} is not batched along dimension 0 ({total} rows in the \
                 batch): a model that declares `tessera.batchable` must return every output so",
                o.name, o.shape
            )));
        }
        let row_bytes = o.data.len() / total as usize;
        let mut at = 0;
        for (r, out) in rows.iter().zip(per.iter_mut()) {
            let bytes = *r as usize * row_bytes;
            let mut shape = o.shape.clone();
            shape[0] = *r;
            out.push(HostTensor {
                name: o.name.clone(),
                dtype: o.dtype,
                shape,
                data: o.data[at..at + bytes].to_vec(),
            });
            at += bytes;
        }
    }
    Ok(per)
}

/// Runs the calling thread's TorchScript calls under another executor until dropped, then
/// goes back to the thread's own (both are thread-local flags: nothing to undo elsewhere).
struct ExecutorScope {
    restore: Option<Executor>,
}

impl ExecutorScope {
    fn enter(executor: Executor) -> ExecutorScope {
        let thread = super::thread_executor();
        // The flag only says whether forwards optimise (the executor's kind is the model's).
        if executor.optimizes() == thread.optimizes() {
            return ExecutorScope { restore: None };
        }
        super::set_thread_executor(executor);
        ExecutorScope {
            restore: Some(thread),
        }
    }
}

impl Drop for ExecutorScope {
    fn drop(&mut self) {
        if let Some(executor) = self.restore {
            super::set_thread_executor(executor);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outputs(n: i64) -> Arc<CachedOutputs> {
        Arc::new(CachedOutputs::new(vec![Tensor::zeros(
            [n],
            (tch::Kind::Uint8, Device::Cpu),
        )]))
    }

    #[test]
    fn a_stage_runs_under_its_own_executor_and_the_thread_gets_its_own_back() {
        std::thread::spawn(|| {
            super::super::set_thread_executor(Executor::Profiling);
            {
                let _scope = ExecutorScope::enter(Executor::Simple);
                assert_eq!(super::super::thread_executor(), Executor::Simple);
            }
            assert_eq!(super::super::thread_executor(), Executor::Profiling);
            let _same = ExecutorScope::enter(Executor::Profiling);
            assert_eq!(super::super::thread_executor(), Executor::Profiling);
        })
        .join()
        .unwrap();
    }

    fn host(name: &str, shape: &[i64], fill: impl Fn(usize) -> u8) -> HostTensor {
        let n = shape.iter().product::<i64>() as usize * 4;
        HostTensor {
            name: name.into(),
            dtype: DType::F32,
            shape: shape.to_vec(),
            data: (0..n).map(fill).collect(),
        }
    }

    #[test]
    fn batch_keys_match_on_everything_but_the_rows() {
        let a = [host("x", &[1, 3, 2], |_| 0), host("m", &[1, 2], |_| 0)];
        let b = [host("x", &[2, 3, 2], |_| 1), host("m", &[2, 2], |_| 1)];
        assert!(batch_key(&a).is_some());
        assert_eq!(batch_key(&a), batch_key(&b));
        // Another size, another name, another type: another batch.
        assert_ne!(
            batch_key(&a),
            batch_key(&[host("x", &[1, 3, 3], |_| 0), host("m", &[1, 2], |_| 0)])
        );
        assert_ne!(
            batch_key(&a),
            batch_key(&[host("y", &[1, 3, 2], |_| 0), host("m", &[1, 2], |_| 0)])
        );
        let mut other = a.clone();
        other[1].dtype = DType::I32;
        assert_ne!(batch_key(&a), batch_key(&other));
        // Tensors disagreeing on rows, a scalar, no tensors: alone.
        assert_eq!(
            batch_key(&[host("x", &[1, 3], |_| 0), host("m", &[2, 3], |_| 0)]),
            None
        );
        assert_eq!(batch_key(&[host("x", &[], |_| 0)]), None);
        assert_eq!(batch_key(&[host("x", &[0, 3], |_| 0)]), None);
        assert_eq!(batch_key(&[]), None);
    }

    #[test]
    fn concatenated_rows_split_back_to_each_request() {
        let reqs: Vec<PipelineInput> = [1i64, 2, 1]
            .iter()
            .enumerate()
            .map(|(k, &r)| {
                PipelineInput::new(
                    vec![host("x", &[r, 2], move |i| (k * 100 + i) as u8)],
                    None,
                    None,
                    &[],
                )
            })
            .collect();
        let refs: Vec<&PipelineInput> = reqs.iter().collect();
        let batch = concat_rows(&refs, &[]).unwrap();
        assert_eq!(batch[0].shape, [4, 2]);
        // An identity model: the outputs are the inputs, split back exactly.
        let split = split_rows(batch, &[1, 2, 1]).unwrap();
        for (req, out) in reqs.iter().zip(&split) {
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].shape, req.tensors[0].shape);
            assert_eq!(out[0].data, req.tensors[0].data);
        }
        // An output not batched along dimension 0 is an error for the whole batch.
        let err = split_rows(vec![host("score", &[3], |_| 0)], &[1, 2, 1]).unwrap_err();
        assert!(
            err.to_string().contains("not batched along dimension 0"),
            "{err}"
        );
    }

    #[test]
    fn stage_cache_is_lru_and_bounded() {
        let cache = StageCache::new(100);
        cache.insert("a", outputs(40));
        cache.insert("b", outputs(40));
        assert!(cache.get("a").is_some()); // a is now the most recent
        cache.insert("c", outputs(40)); // evicts b
        assert!(cache.get("b").is_none());
        assert!(cache.get("a").is_some() && cache.get("c").is_some());
        cache.insert("huge", outputs(101)); // bigger than the cache: not kept
        assert!(cache.get("huge").is_none());
        assert!(cache.get("a").is_some());
        cache.clear();
        assert!(cache.get("a").is_none() && cache.get("c").is_none());
        cache.insert("d", outputs(100)); // the cleared bytes are free again
        assert!(cache.get("d").is_some());
    }
}
