//! What may name things: the one character rule for model, tenant, version and file names, the
//! one check that keeps a relative path inside its folder, and [`ModelKey`], the identity of one
//! model version everywhere in the server.
//!
//! Names end up in file paths, log lines and metric labels, so every name from a client or an
//! archive passes through here before it touches any of them.
use std::fmt;
use std::path::{Component, Path, PathBuf};

/// Longest model or tenant name.
pub const MAX_NAME: usize = 128;
/// Longest version label.
pub const MAX_VERSION: usize = 32;
/// Deepest relative path accepted inside an archive or its assets.
pub const MAX_PATH_DEPTH: usize = 16;

/// The one rule for names: 1..=`max` characters from `A-Z a-z 0-9 . _ -`, not starting with `.`
/// or `-` (so a name is never a hidden file, an option or a path).
pub fn is_plain_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with(['.', '-'])
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Why a relative path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsafePath {
    ForbiddenCharacter,
    ParentDir,
    Absolute,
    TooDeep,
}

impl UnsafePath {
    pub fn reason(self) -> &'static str {
        match self {
            UnsafePath::ForbiddenCharacter => "forbidden character in path",
            UnsafePath::ParentDir => "'..' in path",
            UnsafePath::Absolute => "absolute path",
            UnsafePath::TooDeep => "path nested too deep",
        }
    }
}

/// `path` as a relative path that stays below whatever folder it is joined to: no `..`, no root,
/// no NUL or backslash, at most [`MAX_PATH_DEPTH`] components. `None` for the folder itself
/// (`""`, `./`).
pub fn relative_inside(path: &str) -> Result<Option<PathBuf>, UnsafePath> {
    if path.contains('\0') || path.contains('\\') {
        return Err(UnsafePath::ForbiddenCharacter);
    }
    let mut out = PathBuf::new();
    for comp in Path::new(path).components() {
        match comp {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err(UnsafePath::ParentDir),
            Component::RootDir | Component::Prefix(_) => return Err(UnsafePath::Absolute),
        }
    }
    if out.components().count() > MAX_PATH_DEPTH {
        return Err(UnsafePath::TooDeep);
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// One model version of one tenant: the key of residency, quarantine, metrics and logs. Shown
/// as `tenant/name@version`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelKey {
    pub tenant: String,
    pub name: String,
    pub version: String,
}

impl ModelKey {
    pub fn new(
        tenant: impl Into<String>,
        name: impl Into<String>,
        version: impl Into<String>,
    ) -> ModelKey {
        ModelKey {
            tenant: tenant.into(),
            name: name.into(),
            version: version.into(),
        }
    }

    /// Whether this is a version of `tenant`'s model `name`.
    pub fn is_version_of(&self, tenant: &str, name: &str) -> bool {
        self.tenant == tenant && self.name == name
    }
}

impl ModelKey {
    /// The `tenant`, `model`, `version` label values of every per-model metric.
    pub fn labels(&self) -> [&str; 3] {
        [&self.tenant, &self.name, &self.version]
    }
}

impl fmt::Display for ModelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}@{}", self.tenant, self.name, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names() {
        assert!(is_plain_name("sam_vit-h.2", MAX_NAME));
        for bad in ["", "../x", "a/b", ".hidden", "-x", "a b", "é", "x\0"] {
            assert!(!is_plain_name(bad, MAX_NAME), "{bad:?}");
        }
        assert!(is_plain_name(&"x".repeat(32), MAX_VERSION));
        assert!(!is_plain_name(&"x".repeat(33), MAX_VERSION));
    }

    #[test]
    fn relative_paths_stay_inside() {
        assert_eq!(relative_inside("./a/b"), Ok(Some(PathBuf::from("a/b"))));
        assert_eq!(relative_inside("./"), Ok(None));
        assert_eq!(relative_inside("/etc/passwd"), Err(UnsafePath::Absolute));
        assert_eq!(relative_inside("a/../../x"), Err(UnsafePath::ParentDir));
        assert_eq!(relative_inside(".."), Err(UnsafePath::ParentDir));
        assert_eq!(relative_inside("a\\b"), Err(UnsafePath::ForbiddenCharacter));
        assert_eq!(relative_inside(&"d/".repeat(17)), Err(UnsafePath::TooDeep));
    }

    #[test]
    fn keys_identify_one_version() {
        let k = ModelKey::new("alice", "sam", "2");
        assert_eq!(k.to_string(), "alice/sam@2");
        assert_eq!(k.labels(), ["alice", "sam", "2"]);
        assert!(k.is_version_of("alice", "sam"));
        // No prefix confusion: 'sam' is not a version of 'sa' nor of another tenant's 'sam'.
        assert!(!k.is_version_of("alice", "sa"));
        assert!(!k.is_version_of("alic", "sam"));
        assert_ne!(k, ModelKey::new("alice", "sam", "1"));
        let mut set = std::collections::HashSet::new();
        set.insert(k.clone());
        assert!(set.contains(&ModelKey::new("alice", "sam", "2")));
    }
}
