//! The management verbs: load by url, unload, describe, list, set the default version, delete a
//! version. Each answers for one authenticated tenant and sees only its models: another
//! tenant's model is indistinguishable from a missing one.
use super::Server;
use crate::error::{Error, ErrorKind};
use crate::names::ModelKey;
use crate::registry::RegistryError;
use crate::residency::LoadedModel;
use crate::store::{self, StoreError};
use crate::tenancy::Tenant;
use serde::Serialize;
use std::sync::Arc;

/// One model as `GET /models` shows it: the default version's state, plus every version
/// stored and resident.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelInfo {
    pub model_name: String,
    pub model_url: Option<String>,
    pub default_version: Option<String>,
    pub versions: Vec<String>,
    pub resident_versions: Vec<String>,
    /// `Loaded` when the default version is resident, else `Unloaded`.
    pub state: &'static str,
    /// How often a version was evicted to make room.
    pub evictions: u64,
    /// Versions whose weights wait in the host-memory tier.
    pub host_versions: Vec<String>,
    /// Where the default version's weights are: `gpu` (or `cpu`) when resident, `host` in the
    /// host-memory tier; absent when neither (on local disk or only in the store).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<&'static str>,
    /// Bytes the default version holds in the host-memory tier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_bytes: Option<u64>,
    #[serde(flatten)]
    pub resident: Option<Resident>,
}

/// The resident default version.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resident {
    pub device: String,
    /// Bytes it holds on its device, shared ones included.
    pub resident_bytes: u64,
    /// Of those, bytes of weights another resident model uses too (held once).
    pub shared_bytes: u64,
    pub load_time_ms: u64,
    pub in_flight: usize,
    pub max_workers: u32,
    pub batch_size: u32,
    pub response_timeout: u64,
    /// `running`, `done` or `ended` (stopped without finishing: see the log) for a model that
    /// exports a warm-up method ([`crate::runtime::WARM_UP_METHOD`]); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warm_up: Option<&'static str>,
}

/// A page of a tenant's models.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelList {
    pub models: Vec<ModelInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// One model version as TorchServe's describe shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    pub model_name: String,
    pub model_version: String,
    pub model_url: String,
    pub runtime: &'static str,
    pub is_default: bool,
    pub loaded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_workers: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_delay: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_timeout: Option<u64>,
    /// One per forward thread of a resident version (none when not loaded).
    pub workers: Vec<WorkerInfo>,
}

/// A forward thread, as TorchServe lists its workers.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerInfo {
    pub id: String,
    pub status: &'static str,
    pub gpu: bool,
    pub memory_usage: u64,
}

/// Which versions a TorchServe describe asks for.
pub enum Versions<'a> {
    Default,
    All,
    One(&'a str),
}

impl Server {
    /// `tenant`'s model `name` (at `version`, or its default) resident and warm (`--preload`).
    pub async fn ensure_loaded(
        self: &Arc<Self>,
        tenant: &Tenant,
        name: &str,
        version: Option<&str>,
    ) -> Result<Arc<LoadedModel>, Error> {
        let reg = self.registry.resolve(&tenant.name, name, version)?;
        Ok(self.resident(&reg, tenant).await?.0)
    }

    /// SageMaker LoadModel: registers `name` from a url inside the store and loads it now
    /// (answering once it is warm). Single-tenant servers only: tenants bring models by upload.
    pub async fn load_from_url(
        self: &Arc<Self>,
        tenant: &Tenant,
        name: &str,
        url: &str,
    ) -> Result<(), Error> {
        self.register_url(tenant, name, url, true).await
    }

    /// Registers `name` from a url inside the store; loads it now (answering once it is warm)
    /// when `load`, else at its first request (TorchServe's `initial_workers=0`).
    pub async fn register_url(
        self: &Arc<Self>,
        tenant: &Tenant,
        name: &str,
        url: &str,
        load: bool,
    ) -> Result<(), Error> {
        if self.tenants.multi_tenant() {
            return Err(Error::new(
                ErrorKind::Forbidden,
                "loading by url is for single-tenant servers; upload the archive to /models/{name}/versions/{version}",
            ));
        }
        let reg = self.registry.register(&tenant.name, name, url)?;
        if !load {
            return Ok(());
        }
        if let Err(e) = self.resident(&reg, tenant).await {
            self.registry.forget_if(&tenant.name, name, &reg);
            self.workers.clear(&reg.key);
            return Err(e);
        }
        Ok(())
    }

    /// 404 unless `tenant` knows a model `name`.
    fn known(&self, tenant: &Tenant, name: &str) -> Result<(), Error> {
        store::validate_name(name)?;
        if self.registry.knows(&tenant.name, name) {
            Ok(())
        } else {
            Err(RegistryError::NotFound(name.to_string()).into())
        }
    }

    /// SageMaker UnloadModel: forgets the registration and unloads every resident version
    /// (uploaded versions stay stored; a later request loads the default again). Returns how
    /// many versions were resident.
    pub async fn unload(&self, tenant: &Tenant, name: &str) -> Result<usize, Error> {
        self.known(tenant, name)?;
        let mut versions: Vec<String> = self
            .residency
            .resident_versions(&tenant.name, name)
            .iter()
            .map(|m| m.key.version.clone())
            .collect();
        self.registry.forget(&tenant.name, name);
        self.workers.clear_model(&tenant.name, name);
        let unloaded = self.residency.remove_model(&tenant.name, name).await;
        // Its metric series go with it (a version served again starts them afresh).
        versions.extend(self.registry.store().versions(&tenant.name, name));
        versions.extend([crate::registry::UNVERSIONED.to_string(), String::new()]);
        for v in versions {
            self.metrics.forget_model([&tenant.name, name, &v]);
        }
        Ok(unloaded)
    }

    /// SageMaker DescribeModel.
    pub fn describe(&self, tenant: &Tenant, name: &str) -> Result<ModelInfo, Error> {
        self.known(tenant, name)?;
        Ok(self.info(&tenant.name, name))
    }

    /// SageMaker ListModels: `tenant`'s models in name order after `after`, `limit` per page.
    pub fn list(&self, tenant: &Tenant, after: Option<&str>, limit: usize) -> ModelList {
        let (page, next) = self.registry.page(&tenant.name, after, limit);
        ModelList {
            models: page.iter().map(|n| self.info(&tenant.name, n)).collect(),
            next_page_token: next,
        }
    }

    fn info(&self, tenant: &str, name: &str) -> ModelInfo {
        let default = self.registry.resolve(tenant, name, None).ok();
        let resident = self.residency.resident_versions(tenant, name);
        let default_resident = default
            .as_ref()
            .and_then(|d| resident.iter().find(|m| m.key == d.key));
        let on_host: Vec<(Arc<crate::residency::LoadedModel>, u64)> = self
            .residency
            .host_tier()
            .list()
            .into_iter()
            .filter(|(m, _)| m.key.is_version_of(tenant, name))
            .collect();
        let default_on_host = default
            .as_ref()
            .and_then(|d| on_host.iter().find(|(m, _)| m.key == d.key));
        let tier = match (default_resident, default_on_host) {
            (Some(m), _) => Some(crate::residency::Tier::Device.name(m.pipeline.device())),
            (None, Some(_)) => Some("host"),
            _ => None,
        };
        ModelInfo {
            host_versions: on_host.iter().map(|(m, _)| m.key.version.clone()).collect(),
            tier,
            host_bytes: default_on_host.map(|(_, b)| *b),
            model_name: name.to_string(),
            model_url: default.as_ref().map(|d| d.url.clone()),
            default_version: default.as_ref().map(|d| d.key.version.clone()),
            versions: self.registry.store().versions(tenant, name),
            resident_versions: resident.iter().map(|m| m.key.version.clone()).collect(),
            state: if default_resident.is_some() {
                "Loaded"
            } else {
                "Unloaded"
            },
            evictions: self.residency.evictions_of(tenant, name),
            resident: default_resident.map(|m| {
                let c = m.config();
                Resident {
                    device: crate::runtime::device_name(m.pipeline.device()),
                    resident_bytes: m.weight(),
                    shared_bytes: self.residency.shared_bytes_of(m),
                    load_time_ms: m.load_time.as_millis() as u64,
                    in_flight: m.in_use(),
                    max_workers: m.engine.workers() as u32,
                    batch_size: c.batch_size,
                    response_timeout: c.response_timeout,
                    warm_up: m.pipeline.warm_up_state().map(|s| match s {
                        crate::runtime::WarmUpState::Running => "running",
                        crate::runtime::WarmUpState::Done => "done",
                        crate::runtime::WarmUpState::Ended => "ended",
                    }),
                }
            }),
        }
    }

    /// TorchServe's set-default: `version` (which must exist) becomes the default.
    pub fn set_default(&self, tenant: &Tenant, name: &str, version: &str) -> Result<(), Error> {
        store::validate_name(name)?;
        self.registry
            .store()
            .set_default(&tenant.name, name, version)
            .map_err(|e| match e {
                StoreError::NotFound(_) => {
                    RegistryError::NotFound(format!("{name} version {version}")).into()
                }
                other => Error::from(other),
            })
    }

    /// Deletes one uploaded version, unloading it first; 409 while it serves requests.
    pub async fn delete_version(
        &self,
        tenant: &Tenant,
        name: &str,
        version: &str,
    ) -> Result<(), Error> {
        store::validate_name(name)?;
        let store = self.registry.store();
        store
            .version_archive(&tenant.name, name, version)
            .map_err(|_| RegistryError::NotFound(name.to_string()))?;
        // Asked first so that the default is not unloaded for nothing; the store checks again
        // under its lock when it removes the file.
        if store.default_version(&tenant.name, name).as_deref() == Some(version)
            && store.versions(&tenant.name, name).len() > 1
        {
            return Err(StoreError::IsDefault(name.to_string(), version.to_string()).into());
        }
        let key = ModelKey::new(&tenant.name, name, version);
        if let Some(m) = self.residency.peek(&key).await {
            if m.busy() > 0 {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("version '{version}' of '{name}' is serving requests"),
                ));
            }
        }
        self.residency.remove(&key).await;
        store.remove_version(&tenant.name, name, version)?;
        self.residency.archives_changed();
        self.workers.clear(&key);
        self.metrics.forget_model(key.labels());
        Ok(())
    }
}

impl Server {
    /// TorchServe's describe: `which` versions of `tenant`'s model `name`.
    pub async fn describe_versions(
        &self,
        tenant: &Tenant,
        name: &str,
        which: Versions<'_>,
    ) -> Result<Vec<VersionInfo>, Error> {
        self.known(tenant, name)?;
        let default = self.registry.resolve(&tenant.name, name, None).ok();
        let mut regs = Vec::new();
        match which {
            Versions::Default => regs.extend(default.clone()),
            Versions::One(v) => regs.push(self.registry.resolve(&tenant.name, name, Some(v))?),
            Versions::All => {
                let stored = self.registry.store().versions(&tenant.name, name);
                if stored.is_empty() {
                    regs.extend(default.clone());
                }
                for v in stored {
                    regs.extend(self.registry.resolve(&tenant.name, name, Some(&v)).ok());
                }
            }
        }
        if regs.is_empty() {
            return Err(RegistryError::NotFound(name.to_string()).into());
        }
        let mut out = Vec::new();
        for reg in regs {
            let resident = self.residency.peek(&reg.key).await;
            let c = resident.as_ref().map(|m| m.config().clone());
            let workers = resident.as_ref().map_or(0, |m| m.engine.workers());
            let gpu = resident
                .as_ref()
                .is_some_and(|m| m.pipeline.device().is_cuda());
            out.push(VersionInfo {
                model_name: name.to_string(),
                model_version: reg.key.version.clone(),
                model_url: reg.url.clone(),
                runtime: "torchscript",
                is_default: default.as_ref().is_some_and(|d| d.key == reg.key),
                loaded: resident.is_some(),
                min_workers: c.as_ref().map(|c| c.min_workers.min(workers as u32)),
                max_workers: resident.as_ref().map(|_| workers as u32),
                batch_size: c.as_ref().map(|c| c.batch_size),
                max_batch_delay: c.as_ref().map(|c| c.max_batch_delay),
                response_timeout: c.as_ref().map(|c| c.response_timeout),
                workers: (0..workers)
                    .map(|i| WorkerInfo {
                        id: format!("{}-{}", reg.key, i + 1),
                        status: "READY",
                        gpu,
                        memory_usage: 0,
                    })
                    .collect(),
            });
        }
        Ok(out)
    }

    /// TorchServe's scale-workers: `workers` forward threads for `tenant`'s model `name` (its
    /// `version`, or the default); 0 unloads it. A resident version is reloaded with the new
    /// count when idle (409 while it serves); one not resident is loaded with it. Returns
    /// whether a load happened. (A scale racing a load of the same version may leave the
    /// load's count: scale again.)
    pub async fn scale_workers(
        self: &Arc<Self>,
        tenant: &Tenant,
        name: &str,
        version: Option<&str>,
        workers: u32,
    ) -> Result<bool, Error> {
        const MAX_WORKERS: u32 = 64;
        if workers > MAX_WORKERS {
            return Err(Error::new(
                ErrorKind::BadRequest,
                format!("at most {MAX_WORKERS} workers per model"),
            ));
        }
        self.known(tenant, name)?;
        let reg = self.registry.resolve(&tenant.name, name, version)?;
        let resident = self.residency.peek(&reg.key).await;
        if let Some(m) = &resident {
            if m.busy() > 0 {
                return Err(Error::new(
                    ErrorKind::Conflict,
                    format!("'{name}' is serving requests: scale it when idle"),
                ));
            }
        }
        if workers == 0 {
            self.workers.clear(&reg.key);
            self.residency.remove(&reg.key).await;
            return Ok(false);
        }
        self.workers.set(reg.key.clone(), workers);
        match resident {
            Some(m) if m.engine.workers() == workers as usize => Ok(false),
            Some(_) => {
                self.residency.remove(&reg.key).await;
                self.resident(&reg, tenant).await?;
                Ok(true)
            }
            // Not resident: loaded now with that many workers (TorchServe starts them).
            None => {
                self.resident(&reg, tenant).await?;
                Ok(true)
            }
        }
    }

    /// TorchServe's unregister of one version: an uploaded version is deleted (see
    /// [`Server::delete_version`]); the version of a model registered by url is unregistered.
    pub async fn unregister_version(
        &self,
        tenant: &Tenant,
        name: &str,
        version: &str,
    ) -> Result<(), Error> {
        self.known(tenant, name)?;
        let stored = self.registry.store().versions(&tenant.name, name);
        if stored.iter().any(|v| v == version) {
            return self.delete_version(tenant, name, version).await;
        }
        let reg = self.registry.resolve(&tenant.name, name, Some(version))?;
        self.workers.clear(&reg.key);
        self.unload(tenant, name).await.map(|_| ())
    }
}
