//! Model names → archives, per tenant. A tenant's model is found, in order: an explicit
//! registration (`POST /models`), the tenant's uploaded versions (the default one unless a
//! version is named), and — single-tenant mode only — an operator archive `<name>.tar.gz` at
//! the store's root. Names are scoped by tenant: another tenant's model simply does not exist
//! here. Whether a model is loaded is the residency layer's business.
use crate::names::ModelKey;
use crate::store::{self, LocalStore, StoreError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::RwLock;

/// One resolved model version.
#[derive(Debug, Clone)]
pub struct Registration {
    pub key: ModelKey,
    pub archive: PathBuf,
    /// What the client gave (`POST /models` url) or the store path.
    pub url: String,
}

/// Version label of archives that are not uploaded versions (store root, `POST /models`).
pub const UNVERSIONED: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("model '{0}' is already registered")]
    Exists(String),
    #[error("model '{0}' not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Registry {
    store: LocalStore,
    single_tenant: bool,
    /// (tenant, name) → explicit registration, or an implicit one remembered from a request.
    models: RwLock<BTreeMap<(String, String), Option<Registration>>>,
}

impl Registry {
    pub fn new(store: LocalStore, single_tenant: bool) -> Registry {
        Registry {
            store,
            single_tenant,
            models: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    /// Resolves `name` (and `version`, or the default) for `tenant`, remembering it.
    pub fn resolve(
        &self,
        tenant: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Registration, RegistryError> {
        store::validate_name(name)?;
        if let Some(v) = version {
            store::validate_version(v)?;
        }
        let id = (tenant.to_string(), name.to_string());
        let entry = self.models.read().unwrap().get(&id).cloned();
        let known = entry.is_some();
        let found = match (entry.flatten(), version) {
            (Some(r), None) => Some(r),
            (Some(r), Some(v)) if v == r.key.version => Some(r),
            _ => self.lookup_store(tenant, name, version),
        };
        let reg = match found {
            Some(r) => r,
            None => {
                // Missing from a store that cannot be read says nothing about the model.
                self.store.check_readable()?;
                return Err(RegistryError::NotFound(name.to_string()));
            }
        };
        if !known {
            self.models.write().unwrap().entry(id).or_insert(None);
        }
        Ok(reg)
    }

    fn lookup_store(
        &self,
        tenant: &str,
        name: &str,
        version: Option<&str>,
    ) -> Option<Registration> {
        let uploaded = version
            .map(str::to_string)
            .or_else(|| self.store.default_version(tenant, name));
        if let Some(v) = uploaded {
            if let Ok(archive) = self.store.version_archive(tenant, name, &v) {
                let url = archive.display().to_string();
                return Some(Registration {
                    key: ModelKey::new(tenant, name, v),
                    archive,
                    url,
                });
            }
        }
        if self.single_tenant && version.is_none_or(|v| v == UNVERSIONED) {
            if let Ok(archive) = self.store.archive(name) {
                let url = archive.display().to_string();
                return Some(Registration {
                    key: ModelKey::new(tenant, name, UNVERSIONED),
                    archive,
                    url,
                });
            }
        }
        None
    }

    /// Registers `name` from a url inside the store (`POST /models`).
    pub fn register(
        &self,
        tenant: &str,
        name: &str,
        url: &str,
    ) -> Result<Registration, RegistryError> {
        store::validate_name(name)?;
        let archive = self.store.resolve_url(url)?;
        let mut models = self.models.write().unwrap();
        let id = (tenant.to_string(), name.to_string());
        if matches!(models.get(&id), Some(Some(_))) || !self.store.versions(tenant, name).is_empty()
        {
            return Err(RegistryError::Exists(name.to_string()));
        }
        let reg = Registration {
            key: ModelKey::new(tenant, name, UNVERSIONED),
            archive,
            url: url.to_string(),
        };
        models.insert(id, Some(reg.clone()));
        Ok(reg)
    }

    /// Whether `tenant` knows a model called `name` (registered, seen or uploaded).
    pub fn knows(&self, tenant: &str, name: &str) -> bool {
        self.models
            .read()
            .unwrap()
            .contains_key(&(tenant.to_string(), name.to_string()))
            || !self.store.versions(tenant, name).is_empty()
    }

    /// Forgets a model's registration (its uploaded versions stay in the store).
    pub fn forget(&self, tenant: &str, name: &str) -> bool {
        self.models
            .write()
            .unwrap()
            .remove(&(tenant.to_string(), name.to_string()))
            .is_some()
    }

    /// Forgets `name`'s registration only if it is still `reg` (a load that failed must not
    /// drop a registration made meanwhile by someone else).
    pub fn forget_if(&self, tenant: &str, name: &str, reg: &Registration) {
        let mut models = self.models.write().unwrap();
        let id = (tenant.to_string(), name.to_string());
        if let Some(Some(current)) = models.get(&id) {
            if current.key == reg.key && current.archive == reg.archive && current.url == reg.url {
                models.remove(&id);
            }
        }
    }

    /// A tenant's models (registered, seen or uploaded) in name order, starting after `after`.
    pub fn page(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<String>, Option<String>) {
        let mut names: Vec<String> = self
            .models
            .read()
            .unwrap()
            .keys()
            .filter(|(t, _)| t == tenant)
            .map(|(_, n)| n.clone())
            .chain(self.store.tenant_models(tenant))
            .filter(|n| after.is_none_or(|a| n.as_str() > a))
            .collect();
        names.sort();
        names.dedup();
        let next = (names.len() > limit).then(|| names[limit - 1].clone());
        names.truncate(limit);
        (names, next)
    }
}
