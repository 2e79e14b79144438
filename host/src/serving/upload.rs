//! Taking new models in: a tenant uploads an archive over HTTP as a new version of one of its
//! models.
//!
//! The body is streamed to a file in the store's staging folder (never into memory, never next
//! to served models), bounded by the upload limit. The archive is then checked completely
//! before anything is installed: it unpacks safely within the size limits, its config parses,
//! its handler is a component implementing our WIT world, every TorchScript file loads in a sandboxed child process and uses only tensor operators
//! ([`crate::runtime::verify`]), and
//! the tenant stays within its quotas. Only then is it moved into the tenant's model folder
//! with a single link, and the default pointer updated with a rename. A rejected or
//! interrupted upload leaves nothing behind but a staging file, which is deleted at once or,
//! after a crash, at the next start.
use super::Server;
use crate::archive::{self, ArchiveError, Limits};
use crate::error::Error;
use crate::residency::{check_unpacked, CheckError};
use crate::store::{self, StoreError};
use crate::tenancy::Tenant;
use axum::body::Body;
use http_body_util::BodyExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("upload exceeds the limit of {0} MiB")]
    TooLarge(u64),
    #[error("upload was interrupted: {0}")]
    Interrupted(String),
    #[error("{}", .0.as_rejection())]
    Archive(#[from] ArchiveError),
    #[error("archive rejected: {0}")]
    Check(#[from] CheckError),
    #[error("quota exceeded: {0}")]
    Quota(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// What an accepted upload became.
#[derive(Debug)]
pub struct Installed {
    pub version: String,
    pub is_default: bool,
    pub bytes: u64,
}

/// Removes a staged file or folder unless disarmed.
struct Staged(PathBuf);
impl Drop for Staged {
    fn drop(&mut self) {
        let _ = if self.0.is_dir() {
            std::fs::remove_dir_all(&self.0)
        } else {
            std::fs::remove_file(&self.0)
        };
    }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

impl Server {
    /// Receives, validates and installs `tenant`'s archive (the streamed `body`) as
    /// `name`/`version`, the default if asked or if it is the model's first.
    pub async fn upload(
        &self,
        tenant: &Tenant,
        name: &str,
        version: &str,
        body: Body,
        make_default: bool,
    ) -> Result<Installed, Error> {
        Ok(accept(self, tenant, name, version, body, make_default).await?)
    }
}

async fn accept(
    app: &Server,
    tenant: &Tenant,
    name: &str,
    version: &str,
    body: Body,
    make_default: bool,
) -> Result<Installed, UploadError> {
    let store = app.registry.store();
    let early = store::validate_name(name)
        .and_then(|()| store::validate_version(version))
        .and_then(
            |()| match store.version_archive(&tenant.name, name, version) {
                Ok(_) => Err(StoreError::VersionExists(name.into(), version.into())),
                Err(_) => Ok(()),
            },
        );
    let limit = app.config.max_upload_mib << 20;
    if let Err(e) = early {
        drain(body, limit).await;
        return Err(e.into());
    }
    let staging = store.staging()?;
    let id = format!(
        "{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let file = Staged(staging.join(format!("{id}.tar.gz")));
    let bytes = receive(body, &file.0, app.config.max_upload_mib).await?;

    // Everything below reads the staged file only.
    let (path, dir) = (file.0.clone(), staging.join(format!("{id}.d")));
    let limits = Limits {
        max_archive_bytes: app.config.max_archive_bytes().min(limit),
        max_unpacked_bytes: app.config.max_unpacked_bytes(),
    };
    let sandbox = app.sandbox.clone();
    let config = app.config.clone();
    crate::blocking(move || validate(&path, &dir, limits, &sandbox, &config))
        .await
        .map_err(|e| UploadError::Internal(e.to_string()))??;

    // Quotas and the install touch the store's folders: off the async runtime too.
    let (store, tenant_owned, name_owned, version_owned) = (
        store.clone(),
        tenant.clone(),
        name.to_string(),
        version.to_string(),
    );
    let is_default = crate::blocking(move || {
        install(
            &store,
            &tenant_owned,
            &name_owned,
            &version_owned,
            &file,
            bytes,
            make_default,
        )
    })
    .await
    .map_err(|e| UploadError::Internal(e.to_string()))??;
    tracing::info!(
        tenant = tenant.name,
        model = name,
        version,
        bytes,
        is_default,
        "model uploaded"
    );
    Ok(Installed {
        version: version.to_string(),
        is_default,
        bytes,
    })
}

/// Checks `tenant`'s quotas and moves the validated `file` into place; returns whether it
/// became the default.
fn install(
    store: &store::LocalStore,
    tenant: &Tenant,
    name: &str,
    version: &str,
    file: &Staged,
    bytes: u64,
    make_default: bool,
) -> Result<bool, UploadError> {
    let (models, used) = store.tenant_usage(&tenant.name);
    let new_model = store.versions(&tenant.name, name).is_empty();
    if let Some(max) = tenant.limits.max_models {
        if new_model && models + 1 > max {
            return Err(UploadError::Quota(format!(
                "tenant '{}' may store at most {max} models",
                tenant.name
            )));
        }
    }
    if let Some(max_mib) = tenant.limits.max_total_mib {
        if used + bytes > max_mib << 20 {
            return Err(UploadError::Quota(format!(
                "tenant '{}' may store at most {max_mib} MiB of archives ({} MiB used, this one is {} MiB)",
                tenant.name,
                used >> 20,
                bytes.div_ceil(1 << 20)
            )));
        }
    }
    store.install(&file.0, &tenant.name, name, version)?;
    let is_default =
        make_default || new_model || store.default_version(&tenant.name, name).is_none();
    if is_default {
        store.set_default(&tenant.name, name, version)?;
    }
    Ok(is_default)
}

/// Reads and discards up to `limit` bytes of a body we are refusing, so that a client still
/// sending gets our answer instead of a reset connection.
pub async fn drain(body: Body, limit: u64) {
    let mut body = body;
    let mut total = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            if total > limit {
                break;
            }
        }
    }
}

/// Streams the body into `path` (created new), at most `limit` bytes; synced to disk.
async fn receive(body: Body, path: &Path, limit_mib: u64) -> Result<u64, UploadError> {
    let limit = limit_mib << 20;
    let mut out = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .map_err(StoreError::from)?;
    let mut body = body;
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| UploadError::Interrupted(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            total += data.len() as u64;
            if total > limit {
                // Read (and drop) what the client is still sending, so it gets the 413.
                drain(body, limit).await;
                return Err(UploadError::TooLarge(limit_mib));
            }
            out.write_all(&data).await.map_err(StoreError::from)?;
        }
    }
    // tokio writes in the background: flush surfaces the last write's error before the sync.
    out.flush().await.map_err(StoreError::from)?;
    out.sync_all().await.map_err(StoreError::from)?;
    Ok(total)
}

/// Unpacks into `dir` (removed afterwards) and checks its code as every load does.
fn validate(
    archive_path: &Path,
    dir: &Path,
    limits: Limits,
    sandbox: &crate::sandbox::Sandbox,
    config: &crate::Config,
) -> Result<(), UploadError> {
    let _cleanup = Staged(dir.to_path_buf());
    let unpacked = archive::unpack(archive_path, dir, limits)?;
    let limits = config.check_limits(&unpacked.model_files);
    // Not kept compiled: the archive may still be refused (quota), and uploads must not fill the
    // server's compiled-handler cache.
    Ok(check_unpacked(&unpacked, sandbox, limits, false)?)
}
