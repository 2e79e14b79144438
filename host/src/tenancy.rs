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

/// Who may call what (`--auth-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// `tokens` with a tenants file, else `loopback`.
    Auto,
    /// Single tenant, no tokens, loopback addresses only.
    Loopback,
    /// Every route but health needs a tenant's token (a tenants file).
    Tokens,
    /// Single tenant; inference needs no token, management and metrics an admin token.
    OpenInference,
    /// Single tenant, no tokens, any address: behind a trusted network only.
    Open,
}

/// What a route does, for the auth mode to decide whether it needs a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Running models and reading their metadata.
    Inference,
    /// Loading, uploading, unloading, listing models; metrics.
    Management,
}

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
    mode: AuthMode,
    /// `open-inference`: the admin token digests file, and its digests.
    admin_file: Option<PathBuf>,
    admin_digests: RwLock<Vec<[u8; 32]>>,
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

/// The sha256 digest of the bearer token in an `Authorization` header value.
fn digest_of(authorization: Option<&str>) -> Result<[u8; 32], TenancyError> {
    let header = authorization.ok_or(TenancyError::MissingToken)?;
    let token = bearer_token(header).ok_or(TenancyError::MissingToken)?;
    Ok(Sha256::digest(token.as_bytes()).into())
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

/// Reads an admin tokens file: one `sha256:<hex>` per line, blank lines and `#` comments.
fn load_admin_digests(path: &Path) -> Result<Vec<[u8; 32]>, TenancyError> {
    let err = |m: String| TenancyError::Config(path.to_path_buf(), m);
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.len() > 1 << 20 {
        return Err(err("over 1 MiB".into()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let digests = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            parse_digest(l).ok_or_else(|| err("each line must be 'sha256:<64 hex digits>'".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if digests.is_empty() {
        return Err(err("no admin token digests".into()));
    }
    Ok(digests)
}

impl Tenants {
    /// The tenants of `mode` (resolved: not `Auto`), from `--tenants` and `--admin-tokens`.
    pub fn for_mode(
        mode: AuthMode,
        tenants: Option<&Path>,
        admin_tokens: Option<&Path>,
    ) -> Result<Tenants, String> {
        let mode = match mode {
            AuthMode::Auto if tenants.is_some() => AuthMode::Tokens,
            AuthMode::Auto => AuthMode::Loopback,
            m => m,
        };
        match (mode, tenants, admin_tokens) {
            (AuthMode::Tokens, Some(path), None) => {
                Tenants::from_file(path).map_err(|e| e.to_string())
            }
            (AuthMode::Tokens, None, _) => Err("--auth-mode tokens needs --tenants".into()),
            (AuthMode::OpenInference, None, Some(path)) => {
                let digests = load_admin_digests(path).map_err(|e| e.to_string())?;
                let mut t = Tenants::single();
                t.mode = mode;
                t.admin_file = Some(path.to_path_buf());
                t.admin_digests = RwLock::new(digests);
                *t.loaded_mtime.write().unwrap() =
                    std::fs::metadata(path).and_then(|m| m.modified()).ok();
                Ok(t)
            }
            (AuthMode::OpenInference, None, None) => {
                Err("--auth-mode open-inference needs --admin-tokens (token digests for management)".into())
            }
            (AuthMode::Loopback | AuthMode::Open | AuthMode::Auto, None, None) => {
                let mut t = Tenants::single();
                t.mode = mode;
                Ok(t)
            }
            (_, Some(_), _) => Err(format!(
                "--tenants gives every tenant its own models and tokens: use it with --auth-mode tokens (or auto), not {mode:?}"
            )),
            (_, None, Some(_)) => {
                Err("--admin-tokens is for --auth-mode open-inference".into())
            }
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// One line for the start-up log: who may call what.
    pub fn describe(&self) -> &'static str {
        match self.mode {
            AuthMode::Tokens => "tokens: every route but health needs a tenant's token",
            AuthMode::OpenInference => "open-inference: inference needs no token; management and metrics need an admin token",
            AuthMode::Open => "open: no tokens at all; anyone who reaches this port can load and run models (trusted networks only)",
            AuthMode::Loopback | AuthMode::Auto => "loopback: single tenant, no tokens, loopback addresses only",
        }
    }

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
            mode: AuthMode::Loopback,
            admin_file: None,
            admin_digests: RwLock::new(Vec::new()),
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
            mode: AuthMode::Tokens,
            admin_file: None,
            admin_digests: RwLock::new(Vec::new()),
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
        self.authenticate_for(authorization, Scope::Management)
    }

    /// The tenant a request for `scope` acts as, from its `Authorization` header value.
    pub fn authenticate_for(
        &self,
        authorization: Option<&str>,
        scope: Scope,
    ) -> Result<Arc<Tenant>, TenancyError> {
        let set = self.set.read().unwrap().clone();
        if !self.multi_tenant() {
            let single = set.by_name[DEFAULT_TENANT].clone();
            if self.mode != AuthMode::OpenInference || scope == Scope::Inference {
                return Ok(single);
            }
            let digest = digest_of(authorization)?;
            let admins = self.admin_digests.read().unwrap();
            let mut ok = false;
            for d in admins.iter() {
                ok |= constant_time_eq(d, &digest);
            }
            return if ok {
                Ok(single)
            } else {
                Err(TenancyError::BadToken)
            };
        }
        let digest = digest_of(authorization)?;
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

    /// Re-reads the tenants file (or the admin tokens file) if it changed; keeps the old
    /// tokens if the new file is invalid.
    pub fn reload_if_changed(&self) {
        if let Some(path) = &self.admin_file {
            let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if mtime == *self.loaded_mtime.read().unwrap() {
                return;
            }
            *self.loaded_mtime.write().unwrap() = mtime;
            match load_admin_digests(path) {
                Ok(d) => {
                    tracing::info!(file = %path.display(), tokens = d.len(), "admin tokens reloaded");
                    *self.admin_digests.write().unwrap() = d;
                }
                // Failing closed: emptying or removing the file revokes every admin token.
                Err(e) => {
                    tracing::error!(error = %e, "admin tokens file changed and holds no valid tokens: management is closed until it does");
                    self.admin_digests.write().unwrap().clear();
                }
            }
            return;
        }
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
        if self.file.is_none() && self.admin_file.is_none() {
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

/// Refuses to serve a non-loopback address without tokens unless the operator chose an open
/// mode: an open management API that loads code is remote code execution (the TorchServe
/// "ShellTorch" lesson).
pub fn check_bind(addr: IpAddr, tenants: &Tenants) -> Result<(), String> {
    if !addr.is_loopback() && tenants.mode() == AuthMode::Loopback {
        return Err(format!(
            "refusing to listen on {addr} without authentication: configure tenants and tokens with --tenants, \
             bind a loopback address, or choose --auth-mode open-inference (admin tokens for management) \
             or open (trusted networks only)"
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
        let open = Tenants::for_mode(AuthMode::Open, None, None).unwrap();
        assert!(check_bind("0.0.0.0".parse().unwrap(), &open).is_ok());
    }

    #[test]
    fn auth_modes_split_inference_from_management() {
        let admins = file(&format!("# ops\n{}\n", token_digest("root")));
        let t = Tenants::for_mode(AuthMode::OpenInference, None, Some(admins.path())).unwrap();
        assert!(check_bind("0.0.0.0".parse().unwrap(), &t).is_ok());
        // Inference: no token needed (and a wrong one does not matter).
        for header in [None, Some("Bearer nope")] {
            let who = t.authenticate_for(header, Scope::Inference).unwrap();
            assert_eq!(who.name, DEFAULT_TENANT);
        }
        // Management: the admin token only.
        assert!(matches!(
            t.authenticate_for(None, Scope::Management),
            Err(TenancyError::MissingToken)
        ));
        assert!(matches!(
            t.authenticate_for(Some("Bearer nope"), Scope::Management),
            Err(TenancyError::BadToken)
        ));
        assert!(
            t.authenticate_for(Some("Bearer root"), Scope::Management)
                .unwrap()
                .admin
        );
        // Open: nothing needs a token.
        let open = Tenants::for_mode(AuthMode::Open, None, None).unwrap();
        assert!(open.authenticate_for(None, Scope::Management).is_ok());
        // Combinations that make no sense are refused with a reason.
        let tenants = file(&format!(
            "tenants:\n- name: a\n  tokens: ['{}']\n",
            token_digest("x")
        ));
        assert!(Tenants::for_mode(AuthMode::OpenInference, None, None).is_err());
        assert!(Tenants::for_mode(AuthMode::Tokens, None, None).is_err());
        assert!(Tenants::for_mode(AuthMode::Open, Some(tenants.path()), None).is_err());
        assert!(Tenants::for_mode(AuthMode::Open, None, Some(admins.path())).is_err());
        assert_eq!(
            Tenants::for_mode(AuthMode::Auto, Some(tenants.path()), None)
                .unwrap()
                .mode(),
            AuthMode::Tokens
        );
        assert!(
            Tenants::for_mode(AuthMode::OpenInference, None, Some(file("# none\n").path()))
                .is_err()
        );
        // Emptying the file revokes every admin token.
        std::fs::write(admins.path(), "").unwrap();
        let later = std::time::SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(admins.path())
            .unwrap()
            .set_modified(later)
            .unwrap();
        t.reload_if_changed();
        assert!(t
            .authenticate_for(Some("Bearer root"), Scope::Management)
            .is_err());
    }
}
