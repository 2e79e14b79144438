//! Residency: which models are loaded on the device, within a memory budget.
//!
//! Three parts: this module is the mechanism (a moka cache of [`LoadedModel`]s by
//! [`ModelKey`], weighed in bytes, and the one evict-and-retry helper), [`policy`] decides
//! which model to evict (a pure function), and [`loader`] brings a model in. Concurrent first
//! requests for one model share one load (moka's `try_get_with`), and a model is published only
//! once its warm-up has run.
//!
//! Each model is weighed by the bytes it holds on its device (measured after load by the
//! runtime, its cached stage's capacity included) and the sum is kept within the device budget
//! by our own eviction policy, not moka's. Before a load we make room for the archive's size;
//! after it, for what it really holds. A load or forward that still runs out of memory evicts
//! one more victim and retries ([`Residency::retry_out_of_memory`]); when no victim is left the
//! answer is 507. Requests hold an `Arc` to the model, so eviction only drops the cache's
//! reference: a model in use is freed when its last request finishes.
//!
//! Unpacked archives stay on local disk (the disk tier), keyed by the archive's identity, so a
//! reload after eviction skips the unpack and the check.
//!
//! Lock order: the moka cache's internal locks, then (never while awaiting) `quarantined` or
//! `evictions`; the registry is never locked while awaiting a load; the disk tier's pins
//! ([`disk::Pins`]) are locked alone, for file renames and removals at most.
pub mod disk;
pub mod host;
pub mod loader;
mod model;
pub mod policy;

pub use loader::{check_unpacked, CheckError, Loader, LoaderConfig, WorkerOverrides};
pub use model::{InUse, LoadedModel, Source, Tier};

use crate::archive::ArchiveError;
use crate::metrics::Metrics;
use crate::names::ModelKey;
use crate::registry::Registration;
use crate::runtime::{self, RuntimeError};
use crate::sandbox::SandboxError;
use crate::tenancy::{Tenant, Tenants};
use moka::future::Cache;
use moka::notification::RemovalCause;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

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

/// How long an evicted model may still be held by others before it goes to the host tier
/// without them (past it, it is freed when they let go). Holders are a finished request's last
/// steps or a housekeeping scan: on a busy two-core CI machine one outlasted 250 ms twice (the
/// model then reloads from disk instead of coming back from host memory).
const HELD_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// How long after the latest request [`Residency::upkeep`] counts the server as idle.
const QUIET_MS: u64 = 3_000;

/// What [`Residency::upkeep`] remembers between calls.
#[derive(Default)]
pub struct Upkeep {
    /// The latest use of a resident model when the heap was last trimmed once all were idle.
    trimmed_after: Option<u64>,
    /// Calls in a row that found no request in flight.
    idle_calls: u32,
    /// When the disk tier was last collected.
    collected: Option<Instant>,
}

/// Why a model left residency, as metrics and logs name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionCause {
    /// Room for a load within the budget.
    Budget,
    /// A load or forward ran out of device memory.
    OutOfMemory,
    /// Unloaded by a client (`DELETE /models/...`).
    Unload,
}

impl EvictionCause {
    pub const ALL: [EvictionCause; 3] = [
        EvictionCause::Budget,
        EvictionCause::OutOfMemory,
        EvictionCause::Unload,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EvictionCause::Budget => "budget",
            EvictionCause::OutOfMemory => "out-of-memory",
            EvictionCause::Unload => "unload",
        }
    }
}

/// An error that may mean "out of memory" (what [`Residency::retry_out_of_memory`] retries).
pub trait OutOfMemory {
    fn is_out_of_memory(&self) -> bool;
}

impl OutOfMemory for RuntimeError {
    fn is_out_of_memory(&self) -> bool {
        matches!(self, RuntimeError::OutOfMemory { .. })
    }
}

impl OutOfMemory for ResidencyError {
    fn is_out_of_memory(&self) -> bool {
        matches!(self, ResidencyError::Runtime(e) if e.is_out_of_memory())
    }
}

pub struct Residency {
    cache: Cache<ModelKey, Arc<LoadedModel>>,
    /// Models whose forward overran (see [`crate::engine`]): refused until unloaded.
    quarantined: Arc<Mutex<HashSet<ModelKey>>>,
    /// Evictions to make room (not unloads), per (tenant, name), for `GET /models`.
    evictions: Mutex<HashMap<(String, String), u64>>,
    budget: u64,
    tenants: Arc<Tenants>,
    loader: Loader,
    metrics: Arc<Metrics>,
    clock: Instant,
    /// Set when a model leaves residency: its weights went back to the C heap, which
    /// [`Residency::upkeep`] hands back to the system.
    freed: Arc<std::sync::atomic::AtomicBool>,
    /// Bytes of models out of residency but still held by requests (not freed yet), counted
    /// against the budget until they are.
    retired: Arc<std::sync::atomic::AtomicU64>,
    /// Bytes set aside for loads under way ([`Residency::reserve`]), counted against the budget
    /// until their model is resident.
    reserved: Arc<std::sync::atomic::AtomicU64>,
    /// One reservation decided at a time (the check and the set-aside are one step).
    admission: tokio::sync::Mutex<()>,
    /// Models evicted from the device whose weights wait in host memory.
    host: Arc<host::HostTier>,
}

/// Room in the budget set aside for one load (see [`Residency::reserve`]); given back when
/// dropped.
pub struct Reservation {
    reserved: Arc<std::sync::atomic::AtomicU64>,
    bytes: u64,
    /// How long the load waited for the room.
    waited: std::time::Duration,
}

impl Reservation {
    /// How long the load waited for the room (busy models holding the budget).
    pub fn waited(&self) -> std::time::Duration {
        self.waited
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.reserved.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

impl Residency {
    pub fn new(
        budget: u64,
        tenants: Arc<Tenants>,
        loader: Loader,
        metrics: Arc<Metrics>,
    ) -> Residency {
        let m = metrics.clone();
        let freed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let freed_by_eviction = freed.clone();
        let retired = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let retired_by_eviction = retired.clone();
        let cache = Cache::builder()
            .eviction_listener(
                move |key: Arc<ModelKey>, model: Arc<LoadedModel>, cause: RemovalCause| {
                    if cause == RemovalCause::Replaced {
                        return;
                    }
                    freed_by_eviction.store(true, Ordering::Release);
                    // Still held (requests in flight, or a stuck forward): its memory is not
                    // free yet, so the budget goes on counting it until it is.
                    if Arc::strong_count(&model) > 1 {
                        model.retire(&retired_by_eviction);
                    }
                    m.forget_resident(key.labels());
                    m.resident_models.dec();
                    tracing::info!(
                        model = %key,
                        bytes = model.weight(),
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
            loader,
            metrics,
            clock: Instant::now(),
            evictions: Default::default(),
            quarantined: Default::default(),
            freed,
            reserved: Default::default(),
            admission: Default::default(),
            retired,
            host: Arc::new(host::HostTier::new(0, false)),
        }
    }

    /// Evicted models keep their weights in `host` (when its budget is above zero).
    pub fn with_host_tier(mut self, host: host::HostTier) -> Residency {
        self.host = Arc::new(host);
        self
    }

    /// The host-memory tier.
    pub fn host_tier(&self) -> &host::HostTier {
        &self.host
    }

    /// The device budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The server's device (a model may still ask for the CPU).
    pub fn device(&self) -> tch::Device {
        self.loader.config.device
    }

    pub fn clock(&self) -> &Instant {
        &self.clock
    }

    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Bytes currently accounted to models: resident ones, and those out of residency but not
    /// freed yet (still held by requests).
    pub async fn used(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        let models: Vec<Arc<LoadedModel>> = self.cache.iter().map(|(_, m)| m).collect();
        let resident: u64 = weights_counted_once(&models).iter().sum();
        resident + self.retired.load(Ordering::SeqCst)
    }

    /// Bytes of `model`'s shared storages that another resident model uses too.
    pub fn shared_bytes_of(&self, model: &LoadedModel) -> u64 {
        let others: std::collections::HashSet<usize> = self
            .cache
            .iter()
            .filter(|(_, m)| !std::ptr::eq(m.as_ref(), model))
            .flat_map(|(_, m)| {
                m.pipeline
                    .shared_storages()
                    .iter()
                    .map(|(id, _)| *id)
                    .collect::<Vec<_>>()
            })
            .collect();
        model
            .pipeline
            .shared_storages()
            .iter()
            .filter(|(id, _)| others.contains(id))
            .map(|(_, bytes)| bytes)
            .sum()
    }

    /// The resident model under `key`, if loaded.
    pub async fn peek(&self, key: &ModelKey) -> Option<Arc<LoadedModel>> {
        self.cache.get(key).await
    }

    /// At shutdown: closes every resident model's queue (its workers finish what is queued)
    /// and those of models in the host tier, and waits until `deadline` for every forward
    /// thread, unloaded models' included; returns how many still run.
    pub fn shutdown(&self, deadline: std::time::Instant) -> usize {
        for (_, m) in self.cache.iter() {
            m.engine.close();
        }
        for (m, _) in self.host.list() {
            m.engine.close();
        }
        crate::engine::join_all(deadline)
    }

    /// Housekeeping, called every couple of seconds (see `main`): returns the C heap's free
    /// memory to the system (`malloc_trim`) when a model left residency since the last call,
    /// or once a busy spell has ended (two calls in a row with nothing in flight; the weights
    /// of evicted CPU models and the buffers of finished requests otherwise stay in the
    /// process's RSS, which then grows with churn: measured by bench/soak.py), unloads idle
    /// models whose archive is gone, and collects disk-tier folders whose archive was deleted
    /// or replaced ([`disk::collect`]) when asked to and at least every `collect_every`; the
    /// last two not while the store cannot be read (`store_readable` false: every archive
    /// would look deleted).
    pub async fn upkeep(
        &self,
        state: &mut Upkeep,
        collect_every: std::time::Duration,
        store_readable: Arc<dyn Fn() -> bool + Send + Sync>,
    ) {
        let busy = self.cache.iter().any(|(_, m)| m.busy() > 0);
        let latest_use = self.cache.iter().map(|(_, m)| m.last_used()).max();
        // Idle means nothing in flight and nothing started for a while, so light traffic (a
        // request now and then, none in flight at the moment of the call) trims once it ends,
        // not every other call.
        let quiet = latest_use.is_none_or(|t| self.now_ms().saturating_sub(t) >= QUIET_MS);
        state.idle_calls = if busy || !quiet {
            0
        } else {
            state.idle_calls + 1
        };
        let spell_over = state.idle_calls >= 2 && latest_use != state.trimmed_after;
        if self.freed.swap(false, Ordering::AcqRel) || spell_over {
            if !busy {
                state.trimmed_after = latest_use;
            }
            let _ = tokio::task::spawn_blocking(runtime::release_host_memory).await;
        }
        // A model whose archive is gone (a version deleted while its load was still running,
        // an operator's archive removed) answers nothing any more: unloaded once idle, so its
        // memory and its unpacked folder go.
        let readable = store_readable.clone();
        let readable_now = tokio::task::spawn_blocking(move || readable())
            .await
            .unwrap_or(false);
        if readable_now {
            let idle: Vec<std::sync::Weak<LoadedModel>> = self
                .cache
                .iter()
                .filter(|(_, m)| m.busy() == 0)
                .map(|(_, m)| Arc::downgrade(&m))
                .collect();
            let orphans = archives_gone(idle, store_readable.clone()).await;
            for m in orphans {
                // Still that very model, still idle (not a reload of the same key meanwhile).
                let same = self
                    .peek(&m.key)
                    .await
                    .is_some_and(|now| Arc::ptr_eq(&now, &m));
                if same && m.busy() == 0 {
                    tracing::info!(model = %m.key, "its archive is gone from the store: unloaded");
                    self.remove(&m.key).await;
                }
            }
            // So do models waiting in the host tier whose archive is gone.
            let parked: Vec<std::sync::Weak<LoadedModel>> = self
                .host
                .list()
                .into_iter()
                .map(|(m, _)| Arc::downgrade(&m))
                .collect();
            for m in archives_gone(parked, store_readable.clone()).await {
                tracing::info!(model = %m.key, "its archive is gone from the store: dropped from host memory");
                self.drop_from_host(self.host.remove_where(|k| k == &m.key));
            }
        }
        let due = state
            .collected
            .is_none_or(|at| at.elapsed() >= collect_every);
        if readable_now && (self.loader.pins.take_dirty() || due) {
            state.collected = Some(Instant::now());
            let (work_dir, limits, pins) = (
                self.loader.config.work_dir.clone(),
                self.loader.config.limits,
                self.loader.pins.clone(),
            );
            let readable = store_readable.clone();
            let removed = tokio::task::spawn_blocking(move || {
                // Checked again right before (the scan above took a while).
                if readable() {
                    disk::collect(&work_dir, limits, &pins)
                } else {
                    0
                }
            })
            .await
            .unwrap_or(0);
            if removed > 0 {
                tracing::info!(
                    removed,
                    "removed unpacked archives whose archive was deleted or replaced"
                );
            }
        }
    }

    /// An archive was deleted or replaced: its unpacked folder may go at the next upkeep.
    pub fn archives_changed(&self) {
        self.loader.pins.mark_dirty();
    }

    /// Every resident model.
    pub fn resident(&self) -> Vec<Arc<LoadedModel>> {
        self.cache.iter().map(|(_, m)| m).collect()
    }

    /// The resident version of `tenant`'s model `name` a request may use when the store cannot
    /// say which is current: `version` if resident, else (no version named) the one used last.
    pub fn resident_fallback(
        &self,
        tenant: &str,
        name: &str,
        version: Option<&str>,
    ) -> Option<Arc<LoadedModel>> {
        self.resident_versions(tenant, name)
            .into_iter()
            .filter(|m| version.is_none_or(|v| m.key.version == v))
            .filter(|m| !self.is_quarantined(&m.key))
            .max_by_key(|m| m.last_used())
    }

    /// Resident versions of `tenant`'s model `name`.
    pub fn resident_versions(&self, tenant: &str, name: &str) -> Vec<Arc<LoadedModel>> {
        self.cache
            .iter()
            .filter(|(k, _)| k.is_version_of(tenant, name))
            .map(|(_, m)| m)
            .collect()
    }

    /// The model for `reg`, loading it if needed; `warm_up` runs on a fresh load before the
    /// model is published (every concurrent request for it waits for both). Returns whether
    /// this call did the load.
    pub async fn get<W, F>(
        &self,
        reg: &Registration,
        tenant: &Tenant,
        warm_up: W,
    ) -> Result<(Arc<LoadedModel>, bool), Arc<ResidencyError>>
    where
        W: FnOnce(Arc<LoadedModel>) -> F,
        F: Future<Output = ()>,
    {
        let key = &reg.key;
        if self.is_quarantined(key) {
            return Err(Arc::new(ResidencyError::Quarantined(format!(
                "{}@{}",
                key.name, key.version
            ))));
        }
        let loaded_here = AtomicBool::new(false);
        let model = self
            .cache
            .try_get_with(key.clone(), async {
                loaded_here.store(true, Ordering::Relaxed);
                if let Some(model) = self.swap_in(reg, tenant).await? {
                    return Ok(model);
                }
                let model = Arc::new(self.loader.load(self, reg, tenant).await?);
                warm_up(model.clone()).await;
                model.pipeline.wrote_shared_weights(&model.key.to_string());
                Ok::<_, ResidencyError>(model)
            })
            .await?;
        let loaded_here = loaded_here.load(Ordering::Relaxed);
        if loaded_here {
            self.metrics.resident_models.inc();
            if model.came_from() != Tier::Host {
                self.stage_on_host(&model);
            }
        }
        // Resident now: its weight counts, its reservation no longer.
        model.release_reservation(self.now_ms());
        // Now that the real size is known (after the load, or after CUDA graphs captured while it
        // served), bring the total back within the budget.
        if let Some(weight) = model.weight_changed() {
            self.metrics
                .resident_bytes
                .with_label_values(&key.labels())
                .set(weight as i64);
            if !self.make_room(key, 0).await {
                tracing::warn!(model = %key, budget = self.budget,
                    "over the residency budget: every other model is busy or within its tenant's share");
            }
        }
        Ok((model, loaded_here))
    }

    /// Sets `bytes` of the budget aside for loading `key`, evicting idle models (per policy) to
    /// make room. While every model that could go is busy, waits for one to become idle, at
    /// most `wait`; past it the load is refused (507) rather than made over the budget. Loads
    /// under way count with their reservations, so concurrent loads cannot overshoot together.
    pub async fn reserve(
        &self,
        key: &ModelKey,
        bytes: u64,
        wait: std::time::Duration,
    ) -> Result<Reservation, ResidencyError> {
        let started = Instant::now();
        let mut waiting = false;
        loop {
            {
                let _one_at_a_time = self.admission.lock().await;
                if self.make_room(key, bytes).await {
                    self.reserved.fetch_add(bytes, Ordering::SeqCst);
                    if waiting {
                        tracing::info!(model = %key, waited_ms = started.elapsed().as_millis() as u64,
                            "room made for the load after waiting for busy models");
                    }
                    return Ok(Reservation {
                        reserved: self.reserved.clone(),
                        bytes,
                        waited: if waiting {
                            started.elapsed()
                        } else {
                            std::time::Duration::ZERO
                        },
                    });
                }
            }
            if started.elapsed() >= wait {
                return Err(ResidencyError::InsufficientMemory(format!(
                    "no room for model '{}' ({} MiB) within the residency budget of {} MiB: for \
                     {} s the models holding it stayed busy, kept for their tenants' shares, or \
                     loading; retry later",
                    key.name,
                    bytes >> 20,
                    self.budget >> 20,
                    wait.as_secs()
                )));
            }
            if !waiting {
                waiting = true;
                tracing::info!(model = %key, bytes, budget = self.budget,
                    "waiting for room: the models holding the budget are busy");
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Evicts (per policy) until `bytes` more fit in the budget beside what is resident, held
    /// or reserved, or nothing more may go; whether they fit.
    pub async fn make_room(&self, for_key: &ModelKey, bytes: u64) -> bool {
        while self.used().await + self.reserved.load(Ordering::SeqCst) + bytes > self.budget {
            if !self.evict_one(for_key, EvictionCause::Budget).await {
                return false;
            }
        }
        true
    }

    /// Runs `attempt` (a load or a forward for `key`) until it does not run out of memory:
    /// after each out-of-memory failure the C heap is trimmed, one more victim is evicted and
    /// the attempt repeated, at most `max_evictions` times. Returns the last error when no
    /// victim is left or the bound is reached.
    pub async fn retry_out_of_memory<T, E, A, F>(
        &self,
        key: &ModelKey,
        max_evictions: u32,
        mut attempt: A,
    ) -> Result<T, E>
    where
        E: OutOfMemory,
        A: FnMut() -> F,
        F: Future<Output = Result<T, E>>,
    {
        let mut evictions = 0;
        loop {
            match attempt().await {
                Err(e) if e.is_out_of_memory() => {
                    // What the failed attempt allocated went back to the C heap; give it back
                    // to the system, so a model that hits the cap again and again does not
                    // leave the process holding its peak.
                    runtime::release_host_memory();
                    if evictions >= max_evictions
                        || !self.evict_one(key, EvictionCause::OutOfMemory).await
                    {
                        return Err(e);
                    }
                    evictions += 1;
                }
                other => return other,
            }
        }
    }

    /// Whether `key` was quarantined (a forward overran and could not be stopped).
    pub fn is_quarantined(&self, key: &ModelKey) -> bool {
        self.quarantined
            .lock()
            .map(|q| q.contains(key))
            .unwrap_or(false)
    }

    /// What a model's engine calls when its forward overran: quarantine the model.
    fn quarantine_callback(&self, key: &ModelKey) -> Box<dyn Fn() + Send + Sync> {
        let (set, key) = (self.quarantined.clone(), key.clone());
        Box::new(move || {
            if let Ok(mut q) = set.lock() {
                q.insert(key.clone());
            }
        })
    }

    /// Unloads one model version.
    pub async fn remove(&self, key: &ModelKey) {
        if let Ok(mut q) = self.quarantined.lock() {
            q.remove(key);
        }
        self.drop_from_host(self.host.remove_where(|k| k == key));
        if self.cache.contains_key(key) {
            self.count_eviction(key, EvictionCause::Unload);
            self.cache.invalidate(key).await;
            self.cache.run_pending_tasks().await;
        }
    }

    /// Unloads every resident version of `tenant`'s model `name`. Returns how many were resident.
    pub async fn remove_model(&self, tenant: &str, name: &str) -> usize {
        if let Ok(mut q) = self.quarantined.lock() {
            q.retain(|k| !k.is_version_of(tenant, name));
        }
        self.drop_from_host(self.host.remove_where(|k| k.is_version_of(tenant, name)));
        let victims = self.resident_versions(tenant, name);
        for m in &victims {
            self.count_eviction(&m.key, EvictionCause::Unload);
            self.cache.invalidate(&m.key).await;
        }
        self.cache.run_pending_tasks().await;
        victims.len()
    }

    fn count_eviction(&self, key: &ModelKey, cause: EvictionCause) {
        self.metrics
            .evictions
            .with_label_values(&[&key.tenant, &key.name, &key.version, cause.as_str()])
            .inc();
    }

    /// Evicts one idle model chosen by the [`policy`] to make room for `for_key`. False if there
    /// is no eligible victim.
    pub async fn evict_one(&self, for_key: &ModelKey, cause: EvictionCause) -> bool {
        self.cache.run_pending_tasks().await;
        let resident: Vec<Arc<LoadedModel>> = self.cache.iter().map(|(_, m)| m).collect();
        let now = self.now_ms();
        let weights = weights_counted_once(&resident);
        let shared: Vec<_> = resident
            .iter()
            .map(|m| m.pipeline.shared_storages())
            .collect();
        // How many resident models hold each shared storage: one whose storages are (nearly) all
        // held by another too frees little when evicted.
        let mut holders: HashMap<usize, usize> = HashMap::new();
        for (id, _) in shared.iter().flat_map(|s| s.iter()) {
            *holders.entry(*id).or_default() += 1;
        }
        let candidates: Vec<policy::Candidate> = resident
            .iter()
            .zip(&weights)
            .zip(&shared)
            .map(|((m, &weight), shared)| policy::Candidate {
                frees: {
                    let still_held: u64 = shared
                        .iter()
                        .filter(|(id, _)| holders.get(id).copied().unwrap_or(0) > 1)
                        .map(|(_, b)| b)
                        .sum();
                    // A quarter at least: small unshared storages (biases) do not count.
                    m.weight().saturating_sub(still_held) >= m.weight() / 4
                },
                key: &m.key,
                // Shared storages count once (in the first holder's weight): a tenant's usage
                // is what its models hold on the device.
                weight,
                // A model just published counts as in use until its first request begins.
                in_use: m.busy() + m.fresh(now) as usize,
                last_used: m.last_used(),
            })
            .collect();
        let shares = self.tenants.shares();
        let Some(victim) = policy::choose_victim(&candidates, &shares, self.budget, for_key) else {
            return false;
        };
        let victim = victim.clone();
        let victim_model = resident.iter().find(|m| m.key == victim).cloned();
        drop(candidates);
        drop(resident);
        // Marked on its way to the host tier before it leaves the cache: a request for it in
        // between waits for the move instead of loading it from disk.
        let incoming = victim_model
            .as_ref()
            .filter(|_| self.host.enabled() && cause != EvictionCause::Unload)
            .map(|m| self.host.incoming(m, now));
        tracing::info!(
            model = %victim,
            reason = cause.as_str(),
            for_tenant = for_key.tenant,
            "evicting to make room"
        );
        self.count_eviction(&victim, cause);
        *self
            .evictions
            .lock()
            .unwrap()
            .entry((victim.tenant.clone(), victim.name.clone()))
            .or_default() += 1;
        self.cache.invalidate(&victim).await;
        self.cache.run_pending_tasks().await;
        if let (Some(model), Some(incoming)) = (victim_model, incoming) {
            self.park_on_host(model, incoming).await;
        }
        true
    }

    /// [`Residency::park_on_host`] as a task of its own: a caller that goes away (a request
    /// timing out or disconnecting) does not leave a move half-accounted.
    async fn park_on_host(&self, model: Arc<LoadedModel>, incoming: host::Incoming) {
        model.pipeline.wrote_shared_weights(&model.key.to_string());
        let parking = Parking {
            host: self.host.clone(),
            metrics: self.metrics.clone(),
            quarantined: self.is_quarantined(&model.key),
            server_on_cuda: self.device().is_cuda(),
            now_ms: self.now_ms(),
        };
        let _ = tokio::spawn(async move {
            parking.park(model).await;
            drop(incoming);
        })
        .await;
    }

    /// Drops models taken out of the host tier (their forward threads end, memory is freed).
    fn drop_from_host(&self, models: Vec<Arc<LoadedModel>>) {
        drop_from_host(&self.host, &self.metrics, models);
    }

    /// `reg`'s model back from the host tier, if it is there and its archive is unchanged:
    /// room made on the device (waiting like a load), the weights copied back, published
    /// without a warm-up (its executor and handler are as they were). `None` to load it.
    async fn swap_in(
        &self,
        reg: &Registration,
        tenant: &Tenant,
    ) -> Result<Option<Arc<LoadedModel>>, ResidencyError> {
        let Some(model) = self.host.take(&reg.key).await else {
            return Ok(None);
        };
        let (m, archive) = (model.clone(), reg.archive.clone());
        let current = tokio::task::spawn_blocking(move || m.source_at(&archive))
            .await
            .map_or(false, |s| s == Source::Current);
        if !current {
            tracing::info!(model = %reg.key, "its archive changed since it left the device: reloading");
            self.drop_from_host(vec![model]);
            return Ok(None);
        }
        let started = Instant::now();
        if !model.pipeline.on_host() {
            // Its move to the host failed after it was taken: still on the device, counted as
            // retired; the reservation below counts it instead.
            model.unretire();
        }
        let reservation = match self
            .reserve(&reg.key, model.weight(), model.timeout_for(tenant))
            .await
        {
            Ok(r) => r,
            Err(e) => {
                if !self.host.put_back(model.clone(), self.now_ms()) {
                    self.drop_from_host(vec![model]);
                }
                return Err(e);
            }
        };
        let on_host = model.pipeline.on_host();
        let moved = if on_host {
            self.retry_out_of_memory(&reg.key, 2, || {
                let p = model.pipeline.clone();
                async move {
                    tokio::task::spawn_blocking(move || p.to_device())
                        .await
                        .unwrap_or_else(|e| Err(RuntimeError::Forward(e.to_string())))
                }
            })
            .await
        } else {
            // Its move to the host failed after it was taken: still on the device.
            Ok(runtime::tier::Moved {
                bytes: 0,
                pinned: false,
                pin_error: None,
                copied: 0,
                storages: 0,
                ms: 0.0,
            })
        };
        let moved = match moved {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(model = %reg.key, error = %e, "swap-in from host memory failed");
                if !self.host.put_back(model.clone(), self.now_ms()) {
                    self.drop_from_host(vec![model]);
                }
                return Err(ResidencyError::Runtime(e));
            }
        };
        // Its CUDA graphs (dropped with the move to the host) are captured again before the
        // model serves, as at a reload: its first request then runs at full speed.
        let pending = model.pipeline.pending_captures();
        if pending > 0 {
            let capture_started = Instant::now();
            let deadline = capture_started + model.timeout_for(tenant);
            model.engine.nudge();
            while model.pipeline.pending_captures() > 0 && Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            tracing::info!(model = %reg.key, graphs = pending,
                ms = capture_started.elapsed().as_millis() as u64,
                "CUDA graphs captured again after the swap-in");
        }
        // Its host copy stays while the tier has room: the next eviction then copies only
        // what was written since (usually nothing).
        if !self
            .host
            .keep(&model, model.pipeline.host_bytes(), self.now_ms())
        {
            let pipeline = model.pipeline.clone();
            let _ = tokio::task::spawn_blocking(move || pipeline.release_host_copy()).await;
        }
        self.metrics.host_tier_bytes.set(self.host.used() as i64);
        model.rearm(reservation, self.now_ms());
        model.set_came_from(Tier::Host);
        let k = &reg.key;
        self.metrics
            .swaps
            .with_label_values(&[&k.tenant, &k.name, &k.version, "from-host"])
            .inc();
        self.metrics
            .swap_bytes
            .with_label_values(&["from-host"])
            .inc_by(moved.copied);
        // copied: bytes copied back (weights another resident model shares were found there).
        tracing::info!(model = %reg.key, bytes = moved.bytes, copied = moved.copied, pinned = moved.pinned,
            copy_ms = format!("{:.1}", moved.ms), ms = started.elapsed().as_millis() as u64,
            "model swapped in from host memory");
        Ok(Some(model))
    }

    /// In the background, copies a model just loaded to the host tier while it serves (if the
    /// tier has room without freeing anything), so that its first eviction copies only what is
    /// written meanwhile instead of allocating, page-locking and copying it all then.
    fn stage_on_host(&self, model: &Arc<LoadedModel>) {
        if !self.host.enabled() {
            return;
        }
        let (host, metrics, weak, pipeline, key, now) = (
            self.host.clone(),
            self.metrics.clone(),
            Arc::downgrade(model),
            model.pipeline.clone(),
            model.key.clone(),
            self.now_ms(),
        );
        tokio::spawn(async move {
            let p = pipeline.clone();
            let Ok(Ok(bytes)) = tokio::task::spawn_blocking(move || p.host_bytes_needed()).await
            else {
                return;
            };
            let kept = weak.upgrade().is_some_and(|m| host.keep(&m, bytes, now));
            if !kept {
                return;
            }
            metrics.host_tier_bytes.set(host.used() as i64);
            let (p, pin) = (pipeline.clone(), host.pin());
            match tokio::task::spawn_blocking(move || p.stage_host_copy(pin)).await {
                Ok(Ok(moved)) => {
                    // Its kept slot freed meanwhile (room made for another model): so is the copy.
                    if !weak.upgrade().is_some_and(|m| host.keeps(&m)) {
                        let p = pipeline.clone();
                        let _ = tokio::task::spawn_blocking(move || p.release_host_copy()).await;
                        return;
                    }
                    if let Some(why) = &moved.pin_error {
                        tracing::warn!(model = %key, why,
                            "could not page-lock its host memory: kept pageable (slower copies)");
                    }
                    tracing::info!(model = %key, bytes = moved.bytes, pinned = moved.pinned,
                        ms = format!("{:.1}", moved.ms), "host copy of a model just loaded made in the background");
                }
                Ok(Err(e)) => {
                    if let Some(m) = weak.upgrade() {
                        host.forget_kept(&m);
                    }
                    let p = pipeline.clone();
                    let _ = tokio::task::spawn_blocking(move || p.release_host_copy()).await;
                    tracing::info!(model = %key, error = %e, "no host copy made in the background");
                }
                Err(_) => {}
            }
        });
    }

    /// How often `tenant`'s model `name` (any version) was evicted to make room.
    pub fn evictions_of(&self, tenant: &str, name: &str) -> u64 {
        let evictions = self.evictions.lock().unwrap();
        evictions
            .get(&(tenant.to_string(), name.to_string()))
            .copied()
            .unwrap_or(0)
    }
}

/// What moving an evicted model to the host tier needs, owned (it runs as a task of its own).
struct Parking {
    host: Arc<host::HostTier>,
    metrics: Arc<Metrics>,
    quarantined: bool,
    server_on_cuda: bool,
    now_ms: u64,
}

impl Parking {
    /// Moves an evicted model's weights to the host tier, when it has room and nothing else
    /// holds the model (a request that still holds it keeps it on the device, freed when done).
    /// Pushes out of the tier what came in first if needed. Its device memory counts against
    /// the budget until the move has freed it.
    async fn park(self, model: Arc<LoadedModel>) {
        // Never a quarantined model; on a GPU server, never a model that runs on the CPU
        // (its weights already are in host memory).
        if !self.host.enabled()
            || self.quarantined
            || (self.server_on_cuda && !model.pipeline.device().is_cuda())
        {
            return;
        }
        // Others may hold it a moment longer without using it (a request's last steps after its
        // answer, housekeeping scanning the resident models): wait a little for them.
        let held_since = Instant::now();
        while Arc::strong_count(&model) > 1 && held_since.elapsed() < HELD_WAIT {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        if Arc::strong_count(&model) > 1 {
            tracing::info!(model = %model.key, holders = Arc::strong_count(&model) - 1,
                "evicted while still held: not moved to host memory (freed when let go)");
            return;
        }
        let pipeline = model.pipeline.clone();
        let bytes = match tokio::task::spawn_blocking(move || pipeline.host_bytes_needed()).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::warn!(model = %model.key, error = %e, "cannot move to host memory; dropped");
                return;
            }
            Err(_) => return,
        };
        let Some(admitted) = self.host.admit(&model, bytes, self.now_ms) else {
            tracing::info!(model = %model.key, bytes, host_budget = self.host.budget(),
                "no room in the host-memory tier: dropped (its files stay on disk)");
            return;
        };
        drop_from_host(&self.host, &self.metrics, admitted.spilled);
        if !admitted.released.is_empty() {
            let released = admitted.released;
            let _ = tokio::task::spawn_blocking(move || {
                for m in released {
                    let bytes = m.pipeline.release_host_copy();
                    tracing::info!(model = %m.key, bytes, "freed the kept host copy of a resident model");
                }
            })
            .await;
        }
        let (pipeline, pin) = (model.pipeline.clone(), self.host.pin());
        let moved = tokio::task::spawn_blocking(move || pipeline.to_host(pin)).await;
        match moved {
            Ok(Ok(moved)) => {
                model.unretire();
                self.metrics
                    .swaps
                    .with_label_values(&[
                        &model.key.tenant,
                        &model.key.name,
                        &model.key.version,
                        "to-host",
                    ])
                    .inc();
                self.metrics
                    .swap_bytes
                    .with_label_values(&["to-host"])
                    .inc_by(moved.copied);
                self.metrics.host_tier_bytes.set(self.host.used() as i64);
                if let Some(why) = &moved.pin_error {
                    tracing::warn!(model = %model.key, why,
                        "could not page-lock its host memory: kept pageable (slower copies)");
                }
                tracing::info!(model = %model.key, bytes = moved.bytes, pinned = moved.pinned,
                    ms = format!("{:.1}", moved.ms), copied = moved.copied,
                    storages = moved.storages, host_used = self.host.used(),
                    "model moved to host memory");
            }
            Ok(Err(e)) => {
                self.host.abandon(&model);
                tracing::warn!(model = %model.key, error = %e, "moving to host memory failed: dropped");
            }
            Err(_) => self.host.abandon(&model),
        }
        drop(admitted.moving);
    }
}

/// Drops models taken out of the host tier (their forward threads end, memory is freed).
fn drop_from_host(host: &host::HostTier, metrics: &Metrics, models: Vec<Arc<LoadedModel>>) {
    for m in models {
        tracing::info!(model = %m.key, "model dropped from host memory (its files stay on disk)");
        m.engine.close();
    }
    metrics.host_tier_bytes.set(host.used() as i64);
}

/// Those of `models` whose archive is gone from the store: one stat each, off the async threads
/// (the store may be slow). A store that went away meanwhile makes every archive look gone: then
/// the scan says nothing. The scan holds each model only for its own stat (an eviction meanwhile
/// waits for holders before moving a model to the host tier).
async fn archives_gone(
    models: Vec<std::sync::Weak<LoadedModel>>,
    store_readable: Arc<dyn Fn() -> bool + Send + Sync>,
) -> Vec<Arc<LoadedModel>> {
    if models.is_empty() {
        return Vec::new();
    }
    tokio::task::spawn_blocking(move || {
        let gone: Vec<_> = models
            .into_iter()
            .filter_map(|w| w.upgrade().filter(|m| m.archive_gone()))
            .collect();
        if gone.is_empty() || store_readable() {
            gone
        } else {
            Vec::new()
        }
    })
    .await
    .unwrap_or_default()
}

/// The models' weights with each shared storage (see
/// [`crate::runtime::Pipeline::share_weights`]) counted once, in the first model that holds it:
/// their sum is what the models hold on the device.
fn weights_counted_once(models: &[Arc<LoadedModel>]) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    models
        .iter()
        .map(|m| {
            let twice: u64 = m
                .pipeline
                .shared_storages()
                .iter()
                .filter(|(id, _)| !seen.insert(*id))
                .map(|(_, bytes)| bytes)
                .sum();
            m.weight().saturating_sub(twice)
        })
        .collect()
}
