//! Compiled handler components kept on disk between runs.
//!
//! Compiling a handler is the slow part of its first use (a CPython or SpiderMonkey component
//! takes seconds), and its machine code depends only on the component's bytes and this build
//! of the engine. Files are named by the component's sha256 and the engine's compatibility
//! fingerprint, written whole (temporary file + rename) so that a crash never leaves half a
//! file under a real name, and loaded with `Component::deserialize_file`, which refuses files
//! from another engine build. A file that fails to load is compiled again and replaced.
//!
//! The folder holds code the server runs: it is created owner-only, and a folder others can
//! write is refused (no cache is used, with a warning).
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::component::Component;
use wasmtime::Engine;

/// Compiled components kept; the oldest are removed past this.
const MAX_FILES: usize = 128;

/// Owned by this process's user, and writable by no one else.
fn owned_by_us_alone(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    m.uid() == uid && m.permissions().mode() & 0o022 == 0
}

pub struct CompileCache {
    dir: PathBuf,
    /// The engine build and settings the files are valid for.
    fingerprint: String,
}

impl CompileCache {
    /// The cache in `dir` (created if missing), or `None` when it cannot be used safely.
    pub fn open(dir: &Path, engine: &Engine) -> Option<CompileCache> {
        use std::os::unix::fs::DirBuilderExt;
        let made = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir);
        // The folder itself, not what a link would point to.
        let meta = made.and_then(|_| std::fs::symlink_metadata(dir));
        let usable = match &meta {
            Ok(m) => m.is_dir() && owned_by_us_alone(m),
            Err(_) => false,
        };
        if !usable {
            tracing::warn!(
                dir = %dir.display(),
                "not keeping compiled handlers: the folder cannot be created, is not ours, or \
                 others may write it"
            );
            return None;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        env!("CARGO_PKG_VERSION").hash(&mut h);
        Some(CompileCache {
            dir: dir.to_path_buf(),
            fingerprint: format!("{:016x}", h.finish()),
        })
    }

    fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(format!("{hash}-{}.cwasm", self.fingerprint))
    }

    /// The component whose sha256 is `hash`: loaded if kept, else compiled from `bytes` and
    /// kept.
    pub fn component(
        &self,
        engine: &Engine,
        hash: &str,
        bytes: &[u8],
    ) -> wasmtime::Result<Component> {
        if let Some(c) = self.cached(engine, hash) {
            return Ok(c);
        }
        let path = self.path(hash);
        let component = Component::from_binary(engine, bytes)?;
        if let Err(e) = self.keep(&path, &component) {
            tracing::warn!(path = %path.display(), "could not keep the compiled handler: {e:#}");
        }
        Ok(component)
    }

    /// The component whose bytes hash to `hash`, if it is in the cache (and loads).
    pub fn cached(&self, engine: &Engine, hash: &str) -> Option<Component> {
        let path = self.path(hash);
        // Checked at every load: a regular file (not a link) only this user can write.
        let trusted = std::fs::symlink_metadata(&path)
            .is_ok_and(|m| m.file_type().is_file() && owned_by_us_alone(&m));
        if !trusted {
            return None;
        }
        // SAFETY: the file is one this server wrote (whole, by rename) into a folder only its
        // user can write; deserialize_file checks the engine fingerprint and format.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(),
                    "compiled handler could not be loaded, compiling again: {e:#}");
                None
            }
        }
    }

    fn keep(&self, path: &Path, component: &Component) -> anyhow::Result<()> {
        let code = component.serialize()?;
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(&code)?;
                // On disk before it has its real name: a crash leaves no torn file there.
                f.sync_all()
            })
            .and_then(|_| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
        self.prune();
        Ok(())
    }

    /// Removes the oldest files past [`MAX_FILES`], and temporary files a crash left.
    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let entries: Vec<_> = entries.filter_map(|e| e.ok()).collect();
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for e in &entries {
            let stale = e
                .path()
                .extension()
                .is_some_and(|x| x.to_string_lossy().starts_with("tmp"))
                && e.metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < hour_ago);
            if stale {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
            .iter()
            .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if files.len() <= MAX_FILES {
            return;
        }
        files.sort();
        for (_, path) in &files[..files.len() - MAX_FILES] {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    #[test]
    fn components_are_kept_reloaded_and_recompiled_when_damaged() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("components");
        let engine = engine();
        let bytes = wat::parse_str(
            r#"(component (core module $m (func (export "f") (result i32) i32.const 7))
                          (core instance $i (instantiate $m)))"#,
        )
        .unwrap();
        let cache = CompileCache::open(&folder, &engine).unwrap();
        let mode = std::fs::metadata(&folder).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        cache.component(&engine, "abc", &bytes).unwrap();
        let kept = cache.path("abc");
        let code = std::fs::read(&kept).unwrap();
        assert!(!code.is_empty());
        // A later run loads the file: bytes that do not even parse still give the component.
        let again = CompileCache::open(&folder, &engine).unwrap();
        again.component(&engine, "abc", b"not wasm").unwrap();
        // A damaged file is compiled again and replaced.
        std::fs::write(&kept, b"garbage").unwrap();
        again.component(&engine, "abc", &bytes).unwrap();
        assert_eq!(std::fs::read(&kept).unwrap(), code);
        // Another engine build (other settings) does not share files.
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true).epoch_interruption(true);
        let other = Engine::new(&config).unwrap();
        let cache_other = CompileCache::open(&folder, &other).unwrap();
        assert_ne!(cache_other.path("abc"), kept);
        // A kept file others may write is not trusted: compiled again (and replaced).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o666)).unwrap();
            assert!(again.component(&engine, "abc", b"not wasm").is_err());
        }
        // A link in place of the folder is not used.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&folder, &link).unwrap();
        assert!(CompileCache::open(&link, &engine).is_none());
        // A folder others may write is not used.
        std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(CompileCache::open(&folder, &engine).is_none());
    }

    #[test]
    fn the_oldest_files_go_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompileCache::open(dir.path(), &engine()).unwrap();
        for i in 0..MAX_FILES + 3 {
            let path = cache.path(&format!("{i:04}"));
            std::fs::write(&path, b"x").unwrap();
            let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(i as u64);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        cache.prune();
        let left = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(left, MAX_FILES);
        assert!(!cache.path("0000").exists() && cache.path("0003").exists());
    }
}
