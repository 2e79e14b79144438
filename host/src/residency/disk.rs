//! The disk tier: archives unpacked under `<work dir>/unpacked/<key>`, kept so that a reload
//! after eviction skips the unpack and the check, and collected once their archive is gone.
//!
//! A folder's key is a hash of its archive's path and identity (size and mtime of a file, every
//! entry's name, size and mtime of a folder), so a replaced archive gets a new folder. Beside
//! each folder: `<key>.source` (the archive's path, written before the unpack, so every folder
//! can be traced back to its archive) and `<key>.checked` (written once its code passed the
//! check). [`collect`] removes folders whose archive was deleted or replaced (a deleted model
//! version, an operator's new archive), so the work dir does not grow with every version ever
//! served; folders in use by a load in progress or by a model still holding them ([`Pin`]) stay.
use crate::archive::{self, ArchiveError, DirEntry, Limits};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// The folder name of `archive` in the disk tier, and a folder archive's listing (scanned under
/// the archive rules, to copy it in).
pub fn key_of(
    archive: &Path,
    limits: Limits,
) -> Result<(String, Option<Vec<DirEntry>>), ArchiveError> {
    let meta = std::fs::metadata(archive).map_err(archive::io_err(archive))?;
    let mut h = Sha256::new();
    h.update(archive.to_string_lossy().as_bytes());
    let listing = if meta.is_dir() {
        let entries = archive::scan_dir(archive, limits)?;
        for e in &entries {
            h.update(e.rel.to_string_lossy().as_bytes());
            h.update([0]);
            h.update(e.len.to_le_bytes());
            h.update(e.mtime_ns.to_le_bytes());
        }
        Some(entries)
    } else {
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .unwrap_or_default();
        h.update(meta.len().to_le_bytes());
        h.update(mtime.as_nanos().to_le_bytes());
        None
    };
    Ok((hex::encode(&h.finalize()[..12]), listing))
}

/// The disk tier's folder of `work_dir`.
pub fn root(work_dir: &Path) -> PathBuf {
    work_dir.join("unpacked")
}

/// Where the archive behind `key` is named.
pub fn source_file(root: &Path, key: &str) -> PathBuf {
    root.join(format!("{key}.source"))
}

/// Written once `key`'s unpacked code passed the check (never inside the folder, which holds
/// the archive's own files).
pub fn checked_file(root: &Path, key: &str) -> PathBuf {
    root.join(format!("{key}.checked"))
}

/// Records which archive `key` came from, before anything is unpacked under it.
pub fn record_source(root: &Path, key: &str, archive: &Path) -> Result<(), ArchiveError> {
    let file = source_file(root, key);
    if file.is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(root).map_err(archive::io_err(root))?;
    std::fs::write(&file, archive.as_os_str().as_bytes()).map_err(archive::io_err(&file))
}

/// Folders in use, by key: a load in progress or a loaded model (resident, or evicted with
/// requests still running) holds a [`Pin`] on its folder, which [`collect`] never removes.
#[derive(Default)]
pub struct Pins {
    held: Mutex<HashMap<String, usize>>,
    /// Set when a folder lost its last pin or the store changed: worth a [`collect`].
    dirty: AtomicBool,
}

/// One use of a folder of the disk tier (see [`Pins`]).
pub struct Pin {
    pins: Arc<Pins>,
    key: String,
}

impl Pins {
    /// Pins `key`'s folder until the returned [`Pin`] is dropped.
    pub fn pin(self: &Arc<Self>, key: &str) -> Pin {
        *self
            .held
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default() += 1;
        Pin {
            pins: self.clone(),
            key: key.to_string(),
        }
    }

    /// Asks for a [`collect`] (an archive was deleted or replaced).
    pub fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// Whether a [`collect`] was asked for since the last call; clears the request.
    pub fn take_dirty(&self) -> bool {
        self.dirty.swap(false, Ordering::AcqRel)
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut held = self.pins.held.lock().unwrap();
        if let Some(n) = held.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.key);
                self.pins.mark_dirty();
            }
        }
    }
}

/// Whether `name` is a disk-tier key (what [`key_of`] makes: 24 hex digits).
fn is_key(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Whether the disk-tier entry `key` is stale: its source file is gone or names an archive that
/// no longer exists or now has another key. An entry without a source file (from before they
/// were written) cannot be traced and counts as stale: it is a cache, unpacked again if needed.
/// Any other error (a store that cannot be read for a moment) keeps the entry.
fn is_stale(root: &Path, key: &str, limits: Limits) -> bool {
    let bytes = match std::fs::read(source_file(root, key)) {
        Ok(b) => b,
        Err(e) => return e.kind() == std::io::ErrorKind::NotFound,
    };
    let archive = Path::new(std::ffi::OsStr::from_bytes(&bytes));
    match std::fs::metadata(archive) {
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        Ok(_) => matches!(key_of(archive, limits), Ok((k, _)) if k != key),
    }
}

/// Removes every disk-tier folder (and its `.source` / `.checked` files) whose archive was
/// deleted or replaced, except folders pinned; returns how many entries went. Callers skip it
/// while the model store cannot be read (every archive would look deleted).
pub fn collect(work_dir: &Path, limits: Limits, pins: &Pins) -> usize {
    let root = root(work_dir);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return 0;
    };
    let mut keys: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let key = name
                .strip_suffix(".source")
                .or_else(|| name.strip_suffix(".checked"))
                .unwrap_or(&name);
            // Unpacks in progress (and, after a crash, removed at start) are not entries.
            is_key(key).then(|| key.to_string())
        })
        .collect();
    keys.sort();
    keys.dedup();
    let mut removed = 0;
    for key in keys {
        let pinned = pins.held.lock().unwrap().contains_key(&key);
        if pinned || !is_stale(&root, &key, limits) {
            continue;
        }
        let dir = root.join(&key);
        // Under the pins' lock, so a load cannot pin the folder between the check and the
        // removal (a load that comes after unpacks it again): the checked mark goes first (a
        // folder never looks checked once its removal began), the folder is renamed out of the
        // way (deleted below, outside the lock; at start if the process dies first) and the
        // source goes last.
        // Unique, so a leftover of an earlier removal that failed halfway does not block this
        // one (leftovers go at the next start, as interrupted unpacks do).
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let doomed = root.join(format!(
            ".partial-gc-{key}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let moved = {
            let held = pins.held.lock().unwrap();
            if held.contains_key(&key) {
                continue;
            }
            let unchecked = remove_if_present(&checked_file(&root, &key));
            let moved = unchecked && (!dir.exists() || std::fs::rename(&dir, &doomed).is_ok());
            moved && remove_if_present(&source_file(&root, &key))
        };
        if !moved {
            tracing::warn!(folder = %dir.display(), "could not remove an unpacked archive whose archive is gone");
            continue;
        }
        if doomed.exists() {
            if let Err(e) = std::fs::remove_dir_all(&doomed) {
                tracing::warn!(folder = %doomed.display(), error = %e, "could not remove an unpacked archive (removed at the next start)");
            }
        }
        removed += 1;
    }
    removed
}

/// Removes `file`; true if it is gone.
fn remove_if_present(file: &Path) -> bool {
    match std::fs::remove_file(file) {
        Ok(()) => true,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_archive_bytes: 1 << 20,
        max_unpacked_bytes: 1 << 20,
    };

    /// A disk-tier entry for `archive` as a load leaves it: source, folder, checked mark.
    fn entry(work: &Path, archive: &Path) -> String {
        let (key, _) = key_of(archive, LIMITS).unwrap();
        let root = root(work);
        record_source(&root, &key, archive).unwrap();
        std::fs::create_dir_all(root.join(&key)).unwrap();
        std::fs::write(root.join(&key).join("model.pt"), b"weights").unwrap();
        std::fs::write(checked_file(&root, &key), b"").unwrap();
        key
    }

    #[test]
    fn entries_of_deleted_or_replaced_archives_go_unless_pinned() {
        let store = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let root = root(work.path());
        let archive = |name: &str, bytes: &[u8]| {
            let p = store.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let kept = entry(work.path(), &archive("kept.tar.gz", b"a"));
        let deleted_path = archive("deleted.tar.gz", b"b");
        let deleted = entry(work.path(), &deleted_path);
        let replaced_path = archive("replaced.tar.gz", b"c");
        let replaced = entry(work.path(), &replaced_path);
        let pinned_path = archive("pinned.tar.gz", b"d");
        let pinned = entry(work.path(), &pinned_path);
        // An entry from before source files were written, and a source left by a failed unpack.
        std::fs::create_dir_all(root.join("0123456789abcdef01234567")).unwrap();
        std::fs::write(source_file(&root, "fedcba9876543210fedcba98"), b"/nowhere").unwrap();
        // An unpack in progress, and a stray file: neither is an entry.
        std::fs::create_dir_all(root.join(".partial-1-2-3")).unwrap();
        std::fs::write(root.join("notes.txt"), b"").unwrap();

        std::fs::remove_file(&deleted_path).unwrap();
        std::fs::write(&replaced_path, b"a longer archive").unwrap();
        std::fs::remove_file(&pinned_path).unwrap();
        let pins = Arc::new(Pins::default());
        let pin = pins.pin(&pinned);

        assert_eq!(collect(work.path(), LIMITS, &pins), 4);
        let left = |key: &str| {
            (
                root.join(key).is_dir(),
                source_file(&root, key).is_file(),
                checked_file(&root, key).is_file(),
            )
        };
        assert_eq!(left(&kept), (true, true, true));
        assert_eq!(left(&pinned), (true, true, true));
        let old_style = "0123456789abcdef01234567";
        let failed = "fedcba9876543210fedcba98";
        for gone in [deleted.as_str(), &replaced, old_style, failed] {
            assert_eq!(left(gone), (false, false, false), "{gone}");
        }
        assert!(root.join(".partial-1-2-3").is_dir());
        assert!(root.join("notes.txt").is_file());
        assert!(!std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".partial-gc-")));

        // The last pin's release asks for a collection, which then takes the folder.
        assert!(!pins.take_dirty());
        drop(pin);
        assert!(pins.take_dirty());
        assert_eq!(collect(work.path(), LIMITS, &pins), 1);
        assert_eq!(left(&pinned), (false, false, false));
        assert_eq!(left(&kept), (true, true, true));
    }

    #[test]
    fn a_folder_archive_is_current_until_a_file_in_it_changes() {
        let store = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let folder = store.path().join("model");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("model.pt"), b"x").unwrap();
        let key = entry(work.path(), &folder);
        let pins = Pins::default();
        assert_eq!(collect(work.path(), LIMITS, &pins), 0);
        std::fs::write(folder.join("extra.txt"), b"y").unwrap();
        assert_eq!(collect(work.path(), LIMITS, &pins), 1);
        assert!(!root(work.path()).join(key).exists());
    }
}
