//! Where archives come from: a local model-store directory of `<name>.tar.gz` files.
//!
//! The store only resolves names and URLs to archive files; it never unpacks or loads. Names
//! and URLs are validated here before they touch a path, and a URL must point inside the store.
use std::path::{Path, PathBuf};

/// Archive suffix in the store.
pub const ARCHIVE_SUFFIX: &str = ".tar.gz";
const MAX_NAME: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid model name '{0}': use 1-128 characters from A-Z a-z 0-9 . _ - (not starting with . or -)")]
    BadName(String),
    #[error("no archive '{0}' in the model store")]
    NotFound(String),
    #[error("model url '{0}' is not an archive inside the model store")]
    BadUrl(String),
    #[error("model store I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Checks a model name: a safe character set and bounded length, so it can name files.
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(
            name.chars().take(MAX_NAME + 8).collect(),
        ))
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
}

impl LocalStore {
    pub fn new(root: PathBuf) -> LocalStore {
        LocalStore { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
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
    /// relative to the store; the file must exist inside the store.
    pub fn resolve_url(&self, url: &str) -> Result<PathBuf, StoreError> {
        let raw = url.strip_prefix("file://").unwrap_or(url);
        let candidate = if Path::new(raw).is_absolute() {
            PathBuf::from(raw)
        } else {
            self.root.join(raw.trim_start_matches('/'))
        };
        // A directory url (SageMaker passes a prefix) holding exactly the archive also works.
        let candidate = if candidate.is_dir() {
            single_archive_in(&candidate)?
        } else {
            candidate
        };
        let root = self.root.canonicalize()?;
        let real = candidate
            .canonicalize()
            .map_err(|_| StoreError::NotFound(url.to_string()))?;
        if !real.starts_with(&root) || !real.is_file() {
            return Err(StoreError::BadUrl(url.to_string()));
        }
        Ok(real)
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
        assert!(store.resolve_url("/etc/passwd").is_err());
        assert!(store.resolve_url("../../etc/passwd").is_err());
        assert_eq!(store.list().unwrap(), vec!["a".to_string()]);
    }
}
