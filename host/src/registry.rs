//! Model names → archives. A model is registered explicitly (`POST /models`) or implicitly the
//! first time a request names an archive present in the store. Registration says where a
//! model comes from; whether it is loaded is the residency layer's business.
use crate::store::{self, LocalStore, StoreError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::RwLock;

#[derive(Debug, Clone)]
pub struct Registration {
    pub name: String,
    pub archive: PathBuf,
    /// What the client gave (`POST /models` url) or the store path.
    pub url: String,
}

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
    models: RwLock<BTreeMap<String, Registration>>,
}

impl Registry {
    pub fn new(store: LocalStore) -> Registry {
        Registry {
            store,
            models: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn store(&self) -> &LocalStore {
        &self.store
    }

    /// The registration for `name`, registering it from the store on first use.
    pub fn resolve(&self, name: &str) -> Result<Registration, RegistryError> {
        store::validate_name(name)?;
        if let Some(r) = self.models.read().unwrap().get(name) {
            return Ok(r.clone());
        }
        let archive = self.store.archive(name).map_err(|e| match e {
            StoreError::NotFound(_) => RegistryError::NotFound(name.to_string()),
            other => other.into(),
        })?;
        let reg = Registration {
            name: name.to_string(),
            url: archive.display().to_string(),
            archive,
        };
        let mut models = self.models.write().unwrap();
        Ok(models.entry(name.to_string()).or_insert(reg).clone())
    }

    /// Registers `name` from a url (`POST /models`).
    pub fn register(&self, name: &str, url: &str) -> Result<Registration, RegistryError> {
        store::validate_name(name)?;
        let archive = self.store.resolve_url(url)?;
        let mut models = self.models.write().unwrap();
        if models.contains_key(name) {
            return Err(RegistryError::Exists(name.to_string()));
        }
        let reg = Registration {
            name: name.to_string(),
            archive,
            url: url.to_string(),
        };
        models.insert(name.to_string(), reg.clone());
        Ok(reg)
    }

    pub fn get(&self, name: &str) -> Option<Registration> {
        self.models.read().unwrap().get(name).cloned()
    }

    pub fn remove(&self, name: &str) -> Option<Registration> {
        self.models.write().unwrap().remove(name)
    }

    /// Registered models in name order, starting after `after`.
    pub fn page(&self, after: Option<&str>, limit: usize) -> (Vec<Registration>, Option<String>) {
        let models = self.models.read().unwrap();
        let mut iter: Box<dyn Iterator<Item = &Registration>> = match after {
            Some(a) => Box::new(
                models
                    .range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                    .map(|(_, r)| r),
            ),
            None => Box::new(models.values()),
        };
        let page: Vec<Registration> = iter.by_ref().take(limit).cloned().collect();
        let next = if iter.next().is_some() {
            page.last().map(|r| r.name.clone())
        } else {
            None
        };
        (page, next)
    }
}
