//! The host-memory tier: models evicted from the device whose weights wait in host memory
//! (page-locked when possible, for copies at the bus's speed), whole: TorchScript module,
//! executor state, compiled handler and forward threads, so that a swap-in is one copy back.
//! Its own budget in bytes (the host blocks' real size). A model swapped back in keeps its host
//! copy while there is room (a *kept* copy, held weakly: the tier never keeps a model alive), so
//! that its next eviction copies only what was written since, usually nothing. Room is made by
//! freeing kept copies first, then pushing out the models that came in first (dropped: their
//! unpacked archives stay in the disk tier).
//!
//! A model is taken out while its move to the host is still under way: [`HostTier::take`] then
//! waits for the move to end.
use super::LoadedModel;
use crate::names::ModelKey;
use std::sync::{Arc, Mutex, Weak};

struct Slot {
    key: ModelKey,
    model: Weak<LoadedModel>,
    /// Evicted, on its way in ([`HostTier::incoming`]): no bytes yet; a request for it waits.
    incoming: bool,
    /// Held while the model waits here (its weights in host memory); `None` for a kept copy
    /// of a model back on its device.
    parked: Option<Arc<LoadedModel>>,
    bytes: u64,
    /// Held while its weights move to the host.
    moving: Arc<tokio::sync::Mutex<()>>,
    /// When it came in (residency's clock, ms).
    since: u64,
}

impl Slot {
    /// Whether it still holds memory (a kept copy goes with its model).
    fn live(&self) -> bool {
        self.parked.is_some() || self.model.strong_count() > 0
    }
}

pub struct HostTier {
    budget: u64,
    /// Page-lock the host copies of GPU models.
    pin: bool,
    slots: Mutex<Vec<Slot>>,
}

/// A model on its way into the tier (see [`HostTier::incoming`]): its mark goes when dropped.
pub struct Incoming {
    host: Arc<HostTier>,
    key: ModelKey,
    _moving: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.host
            .slots()
            .retain(|s| !(s.incoming && s.key == self.key));
    }
}

/// A model admitted to the tier: its weights are to move now, under `moving`. `spilled` were
/// pushed out to make room (to drop); `released` are models back on their device whose kept
/// copies must be freed.
pub struct Admitted {
    pub moving: tokio::sync::OwnedMutexGuard<()>,
    pub spilled: Vec<Arc<LoadedModel>>,
    pub released: Vec<Arc<LoadedModel>>,
}

impl HostTier {
    pub fn new(budget: u64, pin: bool) -> HostTier {
        HostTier {
            budget,
            pin,
            slots: Mutex::new(Vec::new()),
        }
    }

    /// The slots, those of models gone since dropped.
    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(Slot::live);
        slots
    }

    /// Whether evicted models go to host memory at all (a budget above zero).
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn pin(&self) -> bool {
        self.pin
    }

    /// Bytes held in the tier (or being filled), kept copies included.
    pub fn used(&self) -> u64 {
        self.slots().iter().map(|s| s.bytes).sum()
    }

    /// Models waiting in the tier and their bytes, oldest first (kept copies not listed).
    pub fn list(&self) -> Vec<(Arc<LoadedModel>, u64)> {
        self.slots()
            .iter()
            .filter_map(|s| Some((s.parked.clone()?, s.bytes)))
            .collect()
    }

    /// Makes room for `bytes` of `model` and admits it: its own kept copy is reused, other
    /// kept copies are freed first (least recent first), then the models that came in first
    /// are pushed out, never one still moving in. `None` when it cannot fit.
    pub fn admit(&self, model: &Arc<LoadedModel>, bytes: u64, now_ms: u64) -> Option<Admitted> {
        if bytes > self.budget {
            return None;
        }
        let mut slots = self.slots();
        slots.retain(|s| !Weak::ptr_eq(&s.model, &Arc::downgrade(model)));
        let stuck: u64 = slots
            .iter()
            .filter(|s| s.moving.try_lock().is_err())
            .map(|s| s.bytes)
            .sum();
        if stuck + bytes > self.budget {
            return None;
        }
        let (mut spilled, mut released) = (Vec::new(), Vec::new());
        while slots.iter().map(|s| s.bytes).sum::<u64>() + bytes > self.budget {
            let pick = |kept: bool| {
                slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| {
                        !s.incoming && s.parked.is_none() == kept && s.moving.try_lock().is_ok()
                    })
                    .min_by_key(|(_, s)| s.since)
                    .map(|(i, _)| i)
            };
            let Some(i) = pick(true).or_else(|| pick(false)) else {
                break;
            };
            let slot = slots.remove(i);
            match slot.parked {
                Some(m) => spilled.push(m),
                None => released.extend(slot.model.upgrade()),
            }
        }
        let moving = Arc::new(tokio::sync::Mutex::new(()));
        let guard = moving.clone().try_lock_owned().ok()?;
        slots.push(Slot {
            key: model.key.clone(),
            incoming: false,
            model: Arc::downgrade(model),
            parked: Some(model.clone()),
            bytes,
            moving,
            since: now_ms,
        });
        Some(Admitted {
            moving: guard,
            spilled,
            released,
        })
    }

    /// Takes `key`'s model out of the tier, once its move in (if under way, or if it was just
    /// evicted and is on its way: [`HostTier::incoming`]) has ended.
    pub async fn take(&self, key: &ModelKey) -> Option<Arc<LoadedModel>> {
        // An incoming model then moving: two waits at most, a third for good measure.
        for _ in 0..3 {
            let moving = {
                let mut slots = self.slots();
                let i = slots
                    .iter()
                    .position(|s| &s.key == key && (s.parked.is_some() || s.incoming))?;
                if slots[i].parked.is_some() && slots[i].moving.try_lock().is_ok() {
                    return slots.remove(i).parked;
                }
                slots[i].moving.clone()
            };
            drop(moving.lock().await);
        }
        None
    }

    /// Marks `model`, just evicted, as on its way in, until the returned guard is dropped: a
    /// request for it meanwhile waits for the move instead of loading it from disk.
    pub fn incoming(self: &Arc<Self>, model: &Arc<LoadedModel>, now_ms: u64) -> Incoming {
        let moving = Arc::new(tokio::sync::Mutex::new(()));
        let guard = moving
            .clone()
            .try_lock_owned()
            .expect("a new mutex is free");
        self.slots().push(Slot {
            key: model.key.clone(),
            incoming: true,
            model: Arc::downgrade(model),
            parked: None,
            bytes: 0,
            moving,
            since: now_ms,
        });
        Incoming {
            host: self.clone(),
            key: model.key.clone(),
            _moving: guard,
        }
    }

    /// Keeps the host copy of `model`, back on its device, if there is room without freeing
    /// anything; whether it was kept (if not, the caller frees it).
    pub fn keep(&self, model: &Arc<LoadedModel>, bytes: u64, now_ms: u64) -> bool {
        let mut slots = self.slots();
        let used: u64 = slots.iter().map(|s| s.bytes).sum();
        let weak = Arc::downgrade(model);
        if bytes == 0 || used + bytes > self.budget || slots.iter().any(|s| s.model.ptr_eq(&weak)) {
            return false;
        }
        slots.push(Slot {
            key: model.key.clone(),
            incoming: false,
            model: Arc::downgrade(model),
            parked: None,
            bytes,
            moving: Arc::new(tokio::sync::Mutex::new(())),
            since: now_ms,
        });
        true
    }

    /// Puts back a model taken out whose weights are still in host memory (its swap-in failed).
    pub fn put_back(&self, model: Arc<LoadedModel>, now_ms: u64) -> bool {
        if !model.pipeline.on_host() {
            return false;
        }
        let bytes = model.pipeline.host_bytes();
        let mut slots = self.slots();
        let used: u64 = slots.iter().map(|s| s.bytes).sum();
        if used + bytes > self.budget
            || slots
                .iter()
                .any(|s| s.model.ptr_eq(&Arc::downgrade(&model)))
        {
            return false;
        }
        slots.push(Slot {
            key: model.key.clone(),
            incoming: false,
            model: Arc::downgrade(&model),
            parked: Some(model),
            bytes,
            moving: Arc::new(tokio::sync::Mutex::new(())),
            since: now_ms,
        });
        true
    }

    /// Takes `model` out of the tier while it waits there (its move failed).
    pub fn abandon(&self, model: &Arc<LoadedModel>) {
        let weak = Arc::downgrade(model);
        self.slots()
            .retain(|s| s.parked.is_none() || !s.model.ptr_eq(&weak));
    }

    /// Forgets the kept copy of `model` (back on its device), if the tier has one.
    pub fn forget_kept(&self, model: &Arc<LoadedModel>) {
        let weak = Arc::downgrade(model);
        self.slots()
            .retain(|s| s.parked.is_some() || s.incoming || !s.model.ptr_eq(&weak));
    }

    /// Whether the tier counts a kept copy of `model`.
    pub fn keeps(&self, model: &Arc<LoadedModel>) -> bool {
        let weak = Arc::downgrade(model);
        self.slots()
            .iter()
            .any(|s| s.parked.is_none() && !s.incoming && s.model.ptr_eq(&weak))
    }

    /// Takes out every waiting model `pick` chooses (unloaded, deleted, replaced), to be
    /// dropped; their kept copies go with the models themselves.
    pub fn remove_where(&self, pick: impl Fn(&ModelKey) -> bool) -> Vec<Arc<LoadedModel>> {
        let mut slots = self.slots();
        let mut out = Vec::new();
        let mut i = 0;
        while i < slots.len() {
            match &slots[i].parked {
                Some(m) if pick(&m.key) => out.extend(slots.remove(i).parked),
                _ => i += 1,
            }
        }
        out
    }
}
