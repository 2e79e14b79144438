//! Where archives come from: a local model-store directory.
//!
//! Two layouts live side by side:
//! - `<root>/<name>.tar.gz` — operator-provided archives, served in single-tenant mode;
//! - `<root>/tenants/<tenant>/<name>/<version>.tar.gz` with the default version named in
//!   `<root>/tenants/<tenant>/<name>/default` — what tenants upload.
//!
//! Uploads arrive in `<root>/.staging/` and are moved into place with one `rename` once they
//! have been validated, so a model directory never holds a half-written archive; anything left
//! in staging by a crash is deleted at start-up. The store only resolves names to files; it
//! never unpacks or loads. Names, versions and URLs are validated here before they touch a
//! path, and a URL must point inside the store.
use crate::names;
use std::path::{Component, Path, PathBuf};

/// Archive suffix in the store.
pub const ARCHIVE_SUFFIX: &str = ".tar.gz";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid model name '{0}': use 1-128 characters from A-Z a-z 0-9 . _ - (not starting with . or -)")]
    BadName(String),
    #[error("no archive '{0}' in the model store")]
    NotFound(String),
    #[error("model url '{0}' is not an archive inside the model store")]
    BadUrl(String),
    #[error("invalid version '{0}': use 1-32 characters from A-Z a-z 0-9 . _ - (not starting with . or -)")]
    BadVersion(String),
    #[error("version '{1}' of model '{0}' already exists; versions are immutable")]
    VersionExists(String, String),
    #[error("model store I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("version '{1}' is the default of '{0}': make another version the default first")]
    IsDefault(String, String),
    /// The store itself cannot be read (its directory gone or unreadable): not the model's
    /// absence, and worth retrying.
    #[error("the model store cannot be read ({0}); retry later")]
    Unavailable(String),
}

/// Checks a model (or tenant) name with the one name rule ([`names::is_plain_name`]).
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    if names::is_plain_name(name, names::MAX_NAME) {
        Ok(())
    } else {
        Err(StoreError::BadName(
            name.chars().take(names::MAX_NAME + 8).collect(),
        ))
    }
}

/// Checks a version label (the same rule, at most 32 characters).
pub fn validate_version(version: &str) -> Result<(), StoreError> {
    if names::is_plain_name(version, names::MAX_VERSION) {
        Ok(())
    } else {
        Err(StoreError::BadVersion(version.chars().take(40).collect()))
    }
}

/// Turns a SageMaker target model (`/sam.tar.gz`, `sam.tar.gz`) or a plain name into a model
/// name.
pub fn name_from_target(target: &str) -> Result<String, StoreError> {
    let t = target.trim().trim_start_matches('/');
    let name = t.strip_suffix(ARCHIVE_SUFFIX).unwrap_or(t);
    validate_name(name)?;
    Ok(name.to_string())
}

/// A directory of archives.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    /// Serialises changes of versions and default pointers (rare), so that a default never
    /// names a version being deleted and two set-defaults never mix.
    changes: std::sync::Arc<std::sync::Mutex<()>>,
}

impl LocalStore {
    pub fn new(root: PathBuf) -> LocalStore {
        LocalStore {
            root,
            changes: Default::default(),
        }
    }

    /// Ok when the store's directory can be listed: a name missing from a readable store is
    /// "not found", from an unreadable one [`StoreError::Unavailable`].
    pub fn check_readable(&self) -> Result<(), StoreError> {
        std::fs::read_dir(&self.root)
            .map(|_| ())
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", self.root.display())))
    }

    /// The archive for model `name`.
    pub fn archive(&self, name: &str) -> Result<PathBuf, StoreError> {
        validate_name(name)?;
        let path = self.root.join(format!("{name}{ARCHIVE_SUFFIX}"));
        if path.is_file() {
            Ok(path)
        } else {
            Err(StoreError::NotFound(format!("{name}{ARCHIVE_SUFFIX}")))
        }
    }

    /// Resolves a `POST /models` url: `file:///abs/path.tar.gz`, an absolute path, or a path
    /// relative to the store; the file must exist inside the store. A folder holding an
    /// unpacked archive (its `model-config.yaml` at the top) resolves to that folder. Whether a url points into
    /// the store is decided from its text first, so the answer for a path outside the store is
    /// the same whether or not that path exists (no probing of the server's files).
    pub fn resolve_url(&self, url: &str) -> Result<PathBuf, StoreError> {
        let raw = url.strip_prefix("file://").unwrap_or(url);
        let bad = || StoreError::BadUrl(url.to_string());
        // Nothing is fetched from elsewhere (a remote url loading code is how TorchServe's
        // "ShellTorch" began).
        if raw.contains("://") {
            return Err(bad());
        }
        let root = std::path::absolute(&self.root)?;
        let real_root = self.root.canonicalize()?;
        let candidate = if Path::new(raw).is_absolute() {
            PathBuf::from(raw)
        } else {
            root.join(raw.trim_start_matches('/'))
        };
        let lexical = normalize(&candidate).ok_or_else(bad)?;
        if !(lexical.starts_with(&root) || lexical.starts_with(&real_root)) {
            return Err(bad());
        }
        // A directory url (SageMaker passes the folder it unpacked a model into) is the model
        // itself when it holds a model-config.yaml, else it must hold exactly one archive.
        let candidate = if lexical.is_dir() && !lexical.join(crate::archive::CONFIG_FILE).is_file()
        {
            single_archive_in(&lexical)?
        } else {
            lexical
        };
        let real = candidate
            .canonicalize()
            .map_err(|_| StoreError::NotFound(url.to_string()))?;
        if !real.starts_with(&real_root) || !(real.is_file() || real.is_dir()) {
            return Err(bad());
        }
        Ok(real)
    }

    fn tenant_dir(&self, tenant: &str) -> PathBuf {
        self.root.join("tenants").join(tenant)
    }

    fn model_dir(&self, tenant: &str, name: &str) -> Result<PathBuf, StoreError> {
        validate_name(tenant)?;
        validate_name(name)?;
        Ok(self.tenant_dir(tenant).join(name))
    }

    /// The uploaded archive of `version`.
    pub fn version_archive(
        &self,
        tenant: &str,
        name: &str,
        version: &str,
    ) -> Result<PathBuf, StoreError> {
        validate_version(version)?;
        let path = self
            .model_dir(tenant, name)?
            .join(format!("{version}{ARCHIVE_SUFFIX}"));
        if path.is_file() {
            Ok(path)
        } else {
            Err(StoreError::NotFound(format!("{name} version {version}")))
        }
    }

    /// The default version of an uploaded model, if it has one.
    pub fn default_version(&self, tenant: &str, name: &str) -> Option<String> {
        let text =
            std::fs::read_to_string(self.model_dir(tenant, name).ok()?.join("default")).ok()?;
        let v = text.trim().to_string();
        validate_version(&v).ok().map(|_| v)
    }

    /// Points the default at `version` (which must exist), atomically.
    pub fn set_default(&self, tenant: &str, name: &str, version: &str) -> Result<(), StoreError> {
        let _one = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        self.version_archive(tenant, name, version)?;
        let dir = self.model_dir(tenant, name)?;
        let tmp = dir.join(".default.tmp");
        std::fs::write(&tmp, version)?;
        std::fs::rename(tmp, dir.join("default"))?;
        Ok(())
    }

    /// Uploaded versions of a model, sorted.
    pub fn versions(&self, tenant: &str, name: &str) -> Vec<String> {
        let Ok(dir) = self.model_dir(tenant, name) else {
            return vec![];
        };
        let mut out: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(ARCHIVE_SUFFIX)
                    .map(str::to_string)
            })
            .filter(|v| validate_version(v).is_ok())
            .collect();
        out.sort();
        out
    }

    /// Names of a tenant's uploaded models, sorted.
    pub fn tenant_models(&self, tenant: &str) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.tenant_dir(tenant))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| validate_name(n).is_ok())
            .collect();
        out.sort();
        out
    }

    /// (models, bytes of archives) a tenant has uploaded.
    pub fn tenant_usage(&self, tenant: &str) -> (usize, u64) {
        let models = self.tenant_models(tenant);
        let mut bytes = 0;
        for m in &models {
            for v in self.versions(tenant, m) {
                if let Ok(p) = self.version_archive(tenant, m, &v) {
                    bytes += std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
                }
            }
        }
        (models.len(), bytes)
    }

    /// Where uploads are written before validation.
    pub fn staging(&self) -> Result<PathBuf, StoreError> {
        let dir = self.root.join(".staging");
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// Deletes whatever a crash left in staging.
    pub fn clean_staging(&self) {
        let dir = self.root.join(".staging");
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                tracing::warn!(file = %e.path().display(), "removing an unfinished upload");
                let p = e.path();
                let _ = if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    }

    /// Moves a validated archive from staging into place as `version` (one rename).
    pub fn install(
        &self,
        staged: &Path,
        tenant: &str,
        name: &str,
        version: &str,
    ) -> Result<PathBuf, StoreError> {
        validate_version(version)?;
        let _one = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let dir = self.model_dir(tenant, name)?;
        std::fs::create_dir_all(&dir)?;
        let dest = dir.join(format!("{version}{ARCHIVE_SUFFIX}"));
        // hard_link fails if dest exists, which makes "create if absent" atomic.
        match std::fs::hard_link(staged, &dest) {
            Ok(()) => {
                let _ = std::fs::remove_file(staged);
                Ok(dest)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(
                StoreError::VersionExists(name.to_string(), version.to_string()),
            ),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes one uploaded version (and the default pointer if it named it).
    pub fn remove_version(
        &self,
        tenant: &str,
        name: &str,
        version: &str,
    ) -> Result<(), StoreError> {
        let _one = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.version_archive(tenant, name, version)?;
        // The default of a model with other versions stays (requests without a version need
        // it); checked under the lock, so no set-default can slip in between.
        if self.default_version(tenant, name).as_deref() == Some(version)
            && self.versions(tenant, name).len() > 1
        {
            return Err(StoreError::IsDefault(name.to_string(), version.to_string()));
        }
        std::fs::remove_file(path)?;
        let dir = self.model_dir(tenant, name)?;
        if self.default_version(tenant, name).as_deref() == Some(version) {
            let _ = std::fs::remove_file(dir.join("default"));
        }
        if self.versions(tenant, name).is_empty() {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(())
    }

    /// Archive names available in the store, sorted.
    pub fn list(&self) -> Result<Vec<String>, StoreError> {
        let mut names = Vec::new();
        if !self.root.is_dir() {
            return Ok(names);
        }
        for e in std::fs::read_dir(&self.root)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_suffix(ARCHIVE_SUFFIX) {
                if validate_name(n).is_ok() {
                    names.push(n.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }
}

/// `path` with `.` and `..` resolved by text alone; `None` if `..` climbs above the root.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() || out.as_os_str().is_empty() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    Some(out)
}

fn single_archive_in(dir: &Path) -> Result<PathBuf, StoreError> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.to_string_lossy().ends_with(ARCHIVE_SUFFIX) {
            found.push(p);
        }
    }
    match found.len() {
        1 => Ok(found.pop().unwrap()),
        _ => Err(StoreError::BadUrl(dir.display().to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("sam_vit-h.2").is_ok());
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "-x",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert_eq!(name_from_target("/sam.tar.gz").unwrap(), "sam");
        assert_eq!(name_from_target("lama").unwrap(), "lama");
        assert!(name_from_target("/../etc.tar.gz").is_err());
    }

    #[test]
    fn urls_stay_inside_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().to_path_buf());
        std::fs::write(dir.path().join("a.tar.gz"), b"x").unwrap();
        assert!(store.resolve_url("a.tar.gz").is_ok());
        assert!(store
            .resolve_url(&format!("file://{}/a.tar.gz", dir.path().display()))
            .is_ok());
        // Outside the store: the same answer whether the path exists or not.
        for outside in [
            "/etc/passwd",
            "/etc/no-such-file",
            "../../etc/passwd",
            "https://example.com/a.tar.gz",
            "s3://bucket/a.tar.gz",
            "../../nope",
            "a.tar.gz/../../x",
        ] {
            assert!(
                matches!(store.resolve_url(outside), Err(StoreError::BadUrl(_))),
                "{outside}"
            );
        }
        assert!(matches!(
            store.resolve_url("missing.tar.gz"),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(store.list().unwrap(), vec!["a".to_string()]);
    }
}
