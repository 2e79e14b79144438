//! A model made resident: what it is, what it holds, and whether it is serving.
use crate::archive::{ModelConfig, Unpacked};
use crate::engine::Engine;
use crate::names::ModelKey;
use crate::runtime::Pipeline;
use crate::sandbox::Handler;
use crate::tenancy::Tenant;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A model ready to serve: TorchScript on its device, handler compiled, queue and workers
/// running (residency publishes it once its warm-up has run).
pub struct LoadedModel {
    pub key: ModelKey,
    /// Its unpacked archive (config, assets) on local disk.
    pub unpacked: Unpacked,
    /// The TorchScript (entry model, and the cached stage if any) on its device.
    pub pipeline: Arc<Pipeline>,
    /// Its queue and the threads that run its forwards (maxWorkers of them).
    pub engine: Engine,
    pub handler: Handler,
    /// From store to device, warm-up excluded.
    pub load_time: Duration,
    in_use: AtomicUsize,
    /// Milliseconds since residency's clock when it last began serving.
    last_used: AtomicU64,
    /// Size and mtime of the archive file it was loaded from (none for a folder), to notice an
    /// archive replaced or removed while the model is resident.
    source: Option<(u64, std::time::SystemTime)>,
    /// The archive file it was loaded from (none for a folder).
    archive: Option<std::path::PathBuf>,
    /// Its weight when residency last checked the budget for it (it grows with CUDA graphs
    /// captured while it serves).
    charged: AtomicU64,
    /// Keeps its unpacked folder (assets the handler reads) in the disk tier while it lives.
    disk_pin: Option<super::disk::Pin>,
    /// The room set aside for its load, until it is resident (then its weight counts).
    reservation: std::sync::Mutex<Option<super::Reservation>>,
    /// A request has begun on it (until then, a model just published is not evicted: the
    /// requests that waited for its load are on their way).
    begun: std::sync::atomic::AtomicBool,
    /// Once out of residency while still held (see [`LoadedModel::retire`]): the counter its
    /// weight was added to, and that weight, taken off when it is freed.
    retired: std::sync::Mutex<Option<(Arc<AtomicU64>, u64)>>,
    /// Where it came from at its latest load or swap-in (see [`Tier`]).
    came_from: std::sync::atomic::AtomicU8,
    /// How long its latest load or swap-in waited for room in the budget (microseconds).
    room_wait_us: AtomicU64,
    /// Where its load's time went.
    pub phases: super::loader::LoadPhases,
}

/// Where a model was when a request needed it, as the `x-model-tier` header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Resident on its device (`gpu`, or `cpu` for a CPU device).
    Device,
    /// Its weights in host memory, copied back (a swap-in).
    Host,
    /// Unpacked on local disk: loaded from there.
    Disk,
    /// Only in the model store: unpacked, checked and loaded.
    Store,
}

impl Tier {
    pub fn name(self, device: tch::Device) -> &'static str {
        match self {
            Tier::Device if device.is_cuda() => "gpu",
            Tier::Device => "cpu",
            Tier::Host => "host",
            Tier::Disk => "disk",
            Tier::Store => "store",
        }
    }
}

/// How long a model just published is protected from eviction while no request has begun on
/// it yet.
const FRESH_MS: u64 = 1_000;

/// Whether a resident model's archive is still the one it was loaded from.
#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    Current,
    Replaced,
    Gone,
}

/// Size and mtime of an archive file (none for a folder or what cannot be read).
pub fn archive_stamp(path: &std::path::Path) -> Option<(u64, std::time::SystemTime)> {
    let m = std::fs::metadata(path).ok()?;
    if !m.is_file() {
        return None;
    }
    Some((m.len(), m.modified().ok()?))
}

impl LoadedModel {
    pub fn new(
        key: ModelKey,
        unpacked: Unpacked,
        pipeline: Arc<Pipeline>,
        engine: Engine,
        handler: Handler,
        load_time: Duration,
        now_ms: u64,
    ) -> LoadedModel {
        LoadedModel {
            key,
            unpacked,
            pipeline,
            engine,
            handler,
            load_time,
            in_use: AtomicUsize::new(0),
            last_used: AtomicU64::new(now_ms),
            source: None,
            archive: None,
            charged: AtomicU64::new(0),
            disk_pin: None,
            reservation: std::sync::Mutex::new(None),
            begun: std::sync::atomic::AtomicBool::new(false),
            retired: std::sync::Mutex::new(None),
            came_from: std::sync::atomic::AtomicU8::new(Tier::Store as u8),
            room_wait_us: AtomicU64::new(0),
            phases: Default::default(),
        }
    }

    pub fn with_phases(mut self, phases: super::loader::LoadPhases) -> Self {
        self.phases = phases;
        self
    }

    /// How long its latest load or swap-in waited for room in the budget (part of the request's
    /// queue time, not of its load time).
    pub fn room_wait(&self) -> Duration {
        Duration::from_micros(self.room_wait_us.load(Ordering::Relaxed))
    }

    /// Where it came from at its latest load or swap-in.
    pub fn came_from(&self) -> Tier {
        match self.came_from.load(Ordering::Relaxed) {
            x if x == Tier::Host as u8 => Tier::Host,
            x if x == Tier::Disk as u8 => Tier::Disk,
            x if x == Tier::Device as u8 => Tier::Device,
            _ => Tier::Store,
        }
    }

    pub fn set_came_from(&self, tier: Tier) {
        self.came_from.store(tier as u8, Ordering::Relaxed);
    }

    /// Made resident again after a swap-in at `now_ms`: `r` holds its room until it is
    /// published, and it is fresh again (see [`LoadedModel::fresh`]).
    pub fn rearm(&self, r: super::Reservation, now_ms: u64) {
        // Resident again: its weight counts as such, no longer as retired.
        self.unretire();
        self.room_wait_us
            .store(r.waited().as_micros() as u64, Ordering::Relaxed);
        *self.reservation.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.begun.store(false, Ordering::SeqCst);
        self.charged.store(0, Ordering::Relaxed);
        self.last_used.store(now_ms, Ordering::Relaxed);
    }

    /// Its device memory was freed while it is still held (moved to host memory): the budget
    /// stops counting it (undoes [`LoadedModel::retire`]).
    pub fn unretire(&self) {
        let retired = self
            .retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((counter, weight)) = retired {
            counter.fetch_sub(weight, Ordering::SeqCst);
        }
    }

    /// Holds `r` until the model is resident ([`LoadedModel::release_reservation`]).
    pub fn with_reservation(self, r: super::Reservation) -> LoadedModel {
        self.room_wait_us
            .store(r.waited().as_micros() as u64, Ordering::Relaxed);
        *self.reservation.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self
    }

    /// Gives back the room set aside for its load, once it counts as resident (published at
    /// `now_ms`: its protection as a fresh model starts then). Only the first call counts.
    pub fn release_reservation(&self, now_ms: u64) {
        let held = self
            .reservation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if held.is_some() {
            self.last_used.store(now_ms, Ordering::Relaxed);
        }
    }

    /// Just published, and no request has begun on it yet (for at most [`FRESH_MS`]).
    pub fn fresh(&self, now_ms: u64) -> bool {
        !self.begun.load(Ordering::SeqCst) && now_ms.saturating_sub(self.last_used()) < FRESH_MS
    }

    /// It left residency while requests still hold it: its weight is added to `counter`
    /// until it is freed, so that the budget still counts it.
    pub fn retire(&self, counter: &Arc<AtomicU64>) {
        let weight = self.weight();
        counter.fetch_add(weight, Ordering::SeqCst);
        let earlier = self
            .retired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace((counter.clone(), weight));
        // Retired once before and not freed since (back from the host tier): counted once.
        if let Some((counter, weight)) = earlier {
            counter.fetch_sub(weight, Ordering::SeqCst);
        }
    }

    /// Records the archive file it was loaded from (see [`LoadedModel::source_at`]).
    pub fn with_source(
        mut self,
        archive: &std::path::Path,
        stamp: Option<(u64, std::time::SystemTime)>,
    ) -> LoadedModel {
        self.archive = stamp.is_some().then(|| archive.to_path_buf());
        self.source = stamp;
        self
    }

    /// Whether the archive file it was loaded from is gone from the store (false for a folder,
    /// and while the file is there, replaced or not).
    pub fn archive_gone(&self) -> bool {
        self.archive
            .as_deref()
            .is_some_and(|a| self.source_at(a) == Source::Gone)
    }

    /// Holds its unpacked folder in the disk tier for as long as the model lives.
    pub fn with_disk_pin(mut self, pin: super::disk::Pin) -> LoadedModel {
        self.disk_pin = Some(pin);
        self
    }

    /// Whether `archive` is still what this model was loaded from.
    pub fn source_at(&self, archive: &std::path::Path) -> Source {
        let Some(loaded) = self.source else {
            return Source::Current;
        };
        match std::fs::metadata(archive) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Source::Gone,
            // Any other error (a store that cannot be read) says nothing about the archive.
            Err(_) => Source::Current,
            Ok(m) if m.len() == loaded.0 && m.modified().ok() == Some(loaded.1) => Source::Current,
            Ok(_) => Source::Replaced,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.unpacked.config
    }

    /// Bytes it holds on its device, its cached stage's capacity included (the cache weight).
    pub fn weight(&self) -> u64 {
        self.pipeline.held_bytes()
    }

    /// Its weight, if it changed since the last call (the first call always answers).
    pub fn weight_changed(&self) -> Option<u64> {
        let now = self.weight();
        (self.charged.swap(now, Ordering::Relaxed) != now).then_some(now)
    }

    /// How long one of `tenant`'s requests may take: the model's responseTimeout, lowered to
    /// the tenant's limit.
    pub fn timeout_for(&self, tenant: &Tenant) -> Duration {
        tenant_timeout(self.config().response_timeout, tenant)
    }

    /// Marks the model busy for the guard's lifetime (it will not be chosen for eviction).
    pub fn begin(self: &Arc<Self>, clock: &Instant) -> InUse {
        self.in_use.fetch_add(1, Ordering::SeqCst);
        self.begun.store(true, Ordering::SeqCst);
        self.last_used
            .store(clock.elapsed().as_millis() as u64, Ordering::Relaxed);
        InUse(self.clone())
    }

    /// Requests in flight.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::SeqCst)
    }

    /// Requests in flight, or work still running for one (a gone client's forward, say): a
    /// busy model is never evicted or deleted.
    pub fn busy(&self) -> usize {
        self.in_use() + self.engine.admitted()
    }

    pub fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        // Freed now: the budget stops counting it.
        self.unretire();
    }
}

/// Keeps a model marked busy.
pub struct InUse(Arc<LoadedModel>);
impl Drop for InUse {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A model's `responseTimeout` (seconds), lowered to `tenant`'s limit.
pub fn tenant_timeout(response_timeout: u64, tenant: &Tenant) -> Duration {
    Duration::from_secs(
        tenant
            .limits
            .handler_timeout_seconds
            .map_or(response_timeout, |t| t.min(response_timeout)),
    )
}
