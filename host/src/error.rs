//! The one error the serving verbs return: a flat [`ErrorKind`] (what the client should make of
//! it) and a message. Each layer keeps its own typed error for its own decisions; this file is
//! the one place that says which kind each of them is, and `http` the one place that turns a
//! kind into a status code and a JSON body.
use crate::archive::{self, ArchiveError};
use crate::registry::RegistryError;
use crate::residency::{CheckError, ResidencyError};
use crate::runtime::RuntimeError;
use crate::sandbox::{HandlerFailure, SandboxError};
use crate::serving::UploadError;
use crate::store::StoreError;
use crate::tenancy::TenancyError;

/// What went wrong, as a client should read it (one HTTP status each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or names something invalid (400).
    BadRequest,
    /// No or a wrong token (401).
    Unauthorized,
    /// Authenticated, but not allowed (403): admin-only, quotas, url loading with tenants.
    Forbidden,
    /// No such model, version or route for this tenant (404).
    NotFound,
    /// The target exists, or is busy serving (409).
    Conflict,
    /// A body over its limit (413).
    PayloadTooLarge,
    /// The handler does not take this content type (415).
    UnsupportedMediaType,
    /// Well-formed but unusable: a rejected archive, a model that does not load (422).
    Unprocessable,
    /// The model's queue is full (429).
    Overloaded,
    /// Not enough device memory or disk for this (507).
    InsufficientStorage,
    /// Temporarily refused: a quarantined model, handler memory in use (503).
    Unavailable,
    /// Past the request's deadline (504).
    Timeout,
    /// Our bug or our I/O failure (500).
    Internal,
}

/// A failed verb: its kind and the message the client reads.
#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Every layer error becomes an [`Error`] with its [`kind`](ArchiveError::kind) and its own
/// message.
macro_rules! classified {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::new(e.kind(), e.to_string())
            }
        }
    )*};
}
classified!(
    ArchiveError,
    StoreError,
    RegistryError,
    TenancyError,
    SandboxError,
    RuntimeError,
    ResidencyError,
    std::sync::Arc<ResidencyError>,
    UploadError
);

impl ArchiveError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ArchiveError::NoSpace { .. } => ErrorKind::InsufficientStorage,
            ArchiveError::Io { .. } => ErrorKind::Internal,
            _ => ErrorKind::Unprocessable,
        }
    }
}

impl StoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::BadName(_) | StoreError::BadUrl(_) | StoreError::BadVersion(_) => {
                ErrorKind::BadRequest
            }
            StoreError::NotFound(_) => ErrorKind::NotFound,
            StoreError::VersionExists(..) | StoreError::IsDefault(..) => ErrorKind::Conflict,
            StoreError::Io(e) if archive::is_out_of_space(e) => ErrorKind::InsufficientStorage,
            // The store's trouble (a lost mount, permissions), not the request's: retryable.
            StoreError::Io(_) | StoreError::Unavailable(_) => ErrorKind::Unavailable,
        }
    }
}

impl RegistryError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RegistryError::NotFound(_) => ErrorKind::NotFound,
            RegistryError::Exists(_) => ErrorKind::Conflict,
            RegistryError::Store(e) => e.kind(),
        }
    }
}

impl TenancyError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            TenancyError::NotAdmin => ErrorKind::Forbidden,
            TenancyError::MissingToken | TenancyError::BadToken => ErrorKind::Unauthorized,
            TenancyError::Config(..) => ErrorKind::Internal,
        }
    }
}

impl SandboxError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            SandboxError::Handler(f) => match f {
                HandlerFailure::BadRequest(_) => ErrorKind::BadRequest,
                HandlerFailure::UnsupportedMediaType(_) => ErrorKind::UnsupportedMediaType,
                HandlerFailure::PayloadTooLarge(_) => ErrorKind::PayloadTooLarge,
                HandlerFailure::Unprocessable(_) => ErrorKind::Unprocessable,
                HandlerFailure::Internal(_) => ErrorKind::Internal,
            },
            SandboxError::Timeout(_) => ErrorKind::Timeout,
            SandboxError::ServerMemoryBusy(_) => ErrorKind::Unavailable,
            SandboxError::InvalidComponent(_) => ErrorKind::Unprocessable,
            SandboxError::MemoryLimit(_)
            | SandboxError::Trap(_)
            | SandboxError::ResponseTooLarge(..)
            | SandboxError::BadTensor(_) => ErrorKind::Internal,
        }
    }
}

impl RuntimeError {
    /// A failure of a forward (a model that fails to load is the archive's fault: see
    /// [`ResidencyError::kind`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            RuntimeError::OutOfMemory { .. } => ErrorKind::InsufficientStorage,
            RuntimeError::Busy(_) => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        }
    }
}

impl ResidencyError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ResidencyError::Archive(e) => e.kind(),
            ResidencyError::Runtime(RuntimeError::Busy(_)) => ErrorKind::Unavailable,
            ResidencyError::Runtime(_) => ErrorKind::Unprocessable,
            ResidencyError::Handler(e) => e.kind(),
            ResidencyError::InsufficientMemory(_) => ErrorKind::InsufficientStorage,
            ResidencyError::Quarantined(_) => ErrorKind::Unavailable,
            ResidencyError::Internal(_) => ErrorKind::Internal,
        }
    }
}

impl UploadError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            UploadError::TooLarge(_) => ErrorKind::PayloadTooLarge,
            UploadError::Interrupted(_) => ErrorKind::BadRequest,
            UploadError::Archive(e) => e.kind(),
            UploadError::Check(CheckError::Model(RuntimeError::Busy(_))) => ErrorKind::Unavailable,
            UploadError::Check(_) => ErrorKind::Unprocessable,
            UploadError::Quota(_) => ErrorKind::Forbidden,
            UploadError::Store(e) => e.kind(),
            UploadError::Internal(_) => ErrorKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_errors_keep_the_inner_kind() {
        let full = || std::io::Error::from_raw_os_error(libc::ENOSPC);
        let no_space = ArchiveError::NoSpace {
            path: "/x".into(),
            source: full(),
        };
        assert_eq!(
            Error::from(ResidencyError::Archive(no_space)).kind,
            ErrorKind::InsufficientStorage
        );
        assert_eq!(
            Error::from(UploadError::Store(StoreError::Io(full()))).kind,
            ErrorKind::InsufficientStorage
        );
        let busy = SandboxError::ServerMemoryBusy(48);
        assert_eq!(
            Error::from(ResidencyError::Handler(busy)).kind,
            ErrorKind::Unavailable
        );
        // A component that is not a handler is the archive's fault, wherever it is found.
        let invalid = || SandboxError::InvalidComponent("x".into());
        assert_eq!(
            Error::from(ResidencyError::Handler(invalid())).kind,
            ErrorKind::Unprocessable
        );
        assert_eq!(Error::from(invalid()).kind, ErrorKind::Unprocessable);
        // Out of memory in a forward is a resource limit; a model that does not load is not.
        let oom = || RuntimeError::OutOfMemory {
            device: "cpu".into(),
            message: "m".into(),
        };
        assert_eq!(Error::from(oom()).kind, ErrorKind::InsufficientStorage);
        assert_eq!(
            Error::from(ResidencyError::Runtime(RuntimeError::Load("x".into()))).kind,
            ErrorKind::Unprocessable
        );
        // A check that could not run for lack of a slot is the server's moment, retryable.
        let busy = || RuntimeError::Busy("x".into());
        assert_eq!(
            Error::from(ResidencyError::Runtime(busy())).kind,
            ErrorKind::Unavailable
        );
        assert_eq!(
            Error::from(UploadError::Check(CheckError::Model(busy()))).kind,
            ErrorKind::Unavailable
        );
        assert_eq!(
            Error::from(UploadError::Check(CheckError::Model(
                RuntimeError::Refused("x".into())
            )))
            .kind,
            ErrorKind::Unprocessable
        );
        let e = Error::from(RegistryError::Store(StoreError::VersionExists(
            "m".into(),
            "1".into(),
        )));
        assert_eq!(e.kind, ErrorKind::Conflict);
        assert!(e.message.contains("already exists"), "{}", e.message);
    }
}
