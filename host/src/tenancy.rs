//! Who is calling: tenants, their API tokens and their limits.
//!
//! Tenants come from a YAML file (`--tenants`); tokens are stored as sha256 digests, compared
//! in constant time, and the file is re-read when it changes, so tokens rotate without a
//! restart. With no file the server is single-tenant: every request acts as the `default`
//! tenant and needs no token (allowed only on loopback, see [`check_bind`]).
//!
//! This module never touches models: it only answers "which tenant is this, and what may it use".
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// The tenant of single-tenant mode.
pub const DEFAULT_TENANT: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    #[error("missing credentials: send 'Authorization: Bearer <token>'")]
    MissingToken,
    #[error("invalid token")]
    BadToken,
    #[error("this operation needs an admin token")]
    NotAdmin,
    #[error("tenants file {0}: {1}")]
    Config(PathBuf, String),
}

/// Per-tenant limits; absent fields fall back to the server-wide settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenantLimits {
    /// Most models (names) the tenant may store.
    pub max_models: Option<usize>,
    /// Most bytes of archives the tenant may store, in MiB.
    #[serde(rename = "maxTotalMiB")]
    pub max_total_mib: Option<u64>,
    /// Cap on a handler instance's memory, in MiB.
    #[serde(rename = "handlerMemoryMiB")]
    pub handler_memory_mib: Option<u64>,
    /// Cap on a request's time, in seconds (the model's responseTimeout is lowered to it).
    pub handler_timeout_seconds: Option<u64>,
    /// Guaranteed share of the residency budget, 0..1. Default: an equal split.
    pub residency_share: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TenantEntry {
    name: String,
    /// `sha256:<hex>` digests of the tenant's tokens.
    tokens: Vec<String>,
    #[serde(default)]
    admin: bool,
    #[serde(default)]
    limits: TenantLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    tenants: Vec<TenantEntry>,
}

/// A tenant as requests see it.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    pub admin: bool,
    pub limits: TenantLimits,
    /// Guaranteed fraction of the residency budget.
    pub share: f64,
}

struct TenantSet {
    by_digest: HashMap<[u8; 32], Arc<Tenant>>,
    by_name: HashMap<String, Arc<Tenant>>,
}

/// The tenant registry. Cheap to query; reloads itself when its file changes.
pub struct Tenants {
    file: Option<PathBuf>,
    set: RwLock<Arc<TenantSet>>,
    loaded_mtime: RwLock<Option<SystemTime>>,
}

/// sha256 digest of a token, as written in the tenants file (`sha256:<hex>`).
pub fn token_digest(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

fn parse_digest(s: &str) -> Option<[u8; 32]> {
    let hexpart = s.strip_prefix("sha256:")?;
    let bytes = hex::decode(hexpart).ok()?;
    bytes.try_into().ok()
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 9110 §11.1) and may be followed by any amount of whitespace.
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, rest) = header.trim_start().split_once([' ', '\t'])?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn load(path: &Path) -> Result<TenantSet, TenancyError> {
    let err = |m: String| TenancyError::Config(path.to_path_buf(), m);
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let file: TenantsFile =
        crate::yaml::from_str_bounded(&text, crate::yaml::MAX_NODES * 10).map_err(err)?;
    if file.tenants.is_empty() {
        return Err(err("no tenants listed".into()));
    }
    let explicit: f64 = file
        .tenants
        .iter()
        .filter_map(|t| t.limits.residency_share)
        .sum();
    let implicit = file
        .tenants
        .iter()
        .filter(|t| t.limits.residency_share.is_none())
        .count();
    if explicit > 1.0 + 1e-9 {
        return Err(err(format!(
            "residencyShare values add up to {explicit}, more than 1"
        )));
    }
    let rest = if implicit > 0 {
        (1.0 - explicit) / implicit as f64
    } else {
        0.0
    };
    let mut set = TenantSet {
        by_digest: HashMap::new(),
        by_name: HashMap::new(),
    };
    for t in file.tenants {
        crate::store::validate_name(&t.name).map_err(|e| err(e.to_string()))?;
        if t.tokens.is_empty() {
            return Err(err(format!("tenant '{}' has no tokens", t.name)));
        }
        let share = t.limits.residency_share.unwrap_or(rest);
        if !(0.0..=1.0).contains(&share) {
            return Err(err(format!(
                "tenant '{}': residencyShare must be in [0, 1]",
                t.name
            )));
        }
        let tenant = Arc::new(Tenant {
            name: t.name.clone(),
            admin: t.admin,
            limits: t.limits,
            share,
        });
        if set.by_name.insert(t.name.clone(), tenant.clone()).is_some() {
            return Err(err(format!("tenant '{}' listed twice", t.name)));
        }
        for tok in &t.tokens {
            let digest = parse_digest(tok).ok_or_else(|| {
                err(format!(
                    "tenant '{}': token must be 'sha256:<64 hex digits>'",
                    t.name
                ))
            })?;
            if set.by_digest.insert(digest, tenant.clone()).is_some() {
                return Err(err(format!(
                    "a token digest of tenant '{}' is used twice",
                    t.name
                )));
            }
        }
    }
    Ok(set)
}

impl Tenants {
    /// Single-tenant mode: one `default` tenant, no tokens, the whole budget.
    pub fn single() -> Tenants {
        let t = Arc::new(Tenant {
            name: DEFAULT_TENANT.into(),
            admin: true,
            limits: TenantLimits::default(),
            share: 1.0,
        });
        let set = TenantSet {
            by_digest: HashMap::new(),
            by_name: HashMap::from([(DEFAULT_TENANT.to_string(), t)]),
        };
        Tenants {
            file: None,
            set: RwLock::new(Arc::new(set)),
            loaded_mtime: RwLock::new(None),
        }
    }

    /// Multi-tenant mode from a tenants file.
    pub fn from_file(path: &Path) -> Result<Tenants, TenancyError> {
        let set = load(path)?;
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        Ok(Tenants {
            file: Some(path.to_path_buf()),
            set: RwLock::new(Arc::new(set)),
            loaded_mtime: RwLock::new(mtime),
        })
    }

    pub fn multi_tenant(&self) -> bool {
        self.file.is_some()
    }

    /// The tenant a request acts as, from its `Authorization` header value.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<Tenant>, TenancyError> {
        let set = self.set.read().unwrap().clone();
        if !self.multi_tenant() {
            return Ok(set.by_name[DEFAULT_TENANT].clone());
        }
        let header = authorization.ok_or(TenancyError::MissingToken)?;
        let token = bearer_token(header).ok_or(TenancyError::MissingToken)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare against every digest so the time taken does not depend on which matched.
        let mut found = None;
        for (d, t) in &set.by_digest {
            if constant_time_eq(d, &digest) {
                found = Some(t.clone());
            }
        }
        found.ok_or(TenancyError::BadToken)
    }

    /// All tenants' guaranteed residency shares.
    pub fn shares(&self) -> HashMap<String, f64> {
        self.set
            .read()
            .unwrap()
            .by_name
            .iter()
            .map(|(n, t)| (n.clone(), t.share))
            .collect()
    }

    /// Re-reads the tenants file if it changed; keeps the old set if the new one is invalid.
    pub fn reload_if_changed(&self) {
        let Some(path) = &self.file else { return };
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if mtime == *self.loaded_mtime.read().unwrap() {
            return;
        }
        match load(path) {
            Ok(set) => {
                let n = set.by_name.len();
                *self.set.write().unwrap() = Arc::new(set);
                *self.loaded_mtime.write().unwrap() = mtime;
                tracing::info!(file = %path.display(), tenants = n, "tenants reloaded");
            }
            Err(e) => {
                *self.loaded_mtime.write().unwrap() = mtime;
                tracing::error!(error = %e, "tenants file changed but is invalid; keeping the previous tenants");
            }
        }
    }

    /// Polls the file for changes every `every` (token rotation without restart).
    pub fn watch(self: &Arc<Self>, every: Duration) {
        if self.file.is_none() {
            return;
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match me.upgrade() {
                    Some(t) => t.reload_if_changed(),
                    None => break,
                }
            }
        });
    }
}

/// Refuses to serve a non-loopback address without tenants: an open management API that loads
/// code is remote code execution (the TorchServe "ShellTorch" lesson).
pub fn check_bind(addr: IpAddr, tenants: &Tenants) -> Result<(), String> {
    if !addr.is_loopback() && !tenants.multi_tenant() {
        return Err(format!(
            "refusing to listen on {addr} without authentication: configure tenants and tokens with --tenants, \
             or bind a loopback address"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn tokens_authenticate_their_tenant_only() {
        let f = file(&format!(
            "tenants:\n- name: a\n  tokens: ['{}']\n- name: b\n  tokens: ['{}']\n  limits: {{residencyShare: 0.25}}\n",
            token_digest("tok-a"),
            token_digest("tok-b")
        ));
        let t = Tenants::from_file(f.path()).unwrap();
        assert_eq!(t.authenticate(Some("Bearer tok-a")).unwrap().name, "a");
        assert_eq!(t.authenticate(Some("Bearer tok-b")).unwrap().name, "b");
        assert!(matches!(
            t.authenticate(Some("Bearer nope")),
            Err(TenancyError::BadToken)
        ));
        assert!(matches!(
            t.authenticate(None),
            Err(TenancyError::MissingToken)
        ));
        assert!(matches!(
            t.authenticate(Some("Basic eA==")),
            Err(TenancyError::MissingToken)
        ));
        // The scheme is case-insensitive; extra whitespace is fine.
        for header in ["BEARER tok-a", "bEaReR  tok-a", "bearer\ttok-a "] {
            assert_eq!(t.authenticate(Some(header)).unwrap().name, "a", "{header}");
        }
        assert!(t.authenticate(Some("Bearer")).is_err());
        assert!(t.authenticate(Some("Bearertok-a")).is_err());
        let shares = t.shares();
        assert!((shares["a"] - 0.75).abs() < 1e-9 && (shares["b"] - 0.25).abs() < 1e-9);
    }

    #[test]
    fn bad_files_are_refused() {
        for bad in [
            "tenants: []\n",
            "tenants:\n- name: a\n  tokens: ['plaintext']\n",
            "tenants:\n- name: ../a\n  tokens: ['sha256:00']\n",
            "tenants:\n- name: a\n  tokens: []\n",
        ] {
            assert!(Tenants::from_file(file(bad).path()).is_err(), "{bad}");
        }
    }

    #[test]
    fn open_bind_needs_tenants() {
        assert!(check_bind("0.0.0.0".parse().unwrap(), &Tenants::single()).is_err());
        assert!(check_bind("127.0.0.1".parse().unwrap(), &Tenants::single()).is_ok());
    }
}
