//! A tenant's upload (or an operator's archive) as the host unpacks it: gzip, tar and the
//! model folder's checks under tight limits. Never a panic; on success the folder holds what
//! the archive named and is within the limits; on failure nothing is left behind.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use tessera::archive::{unpack, Limits};

const LIMITS: Limits = Limits {
    max_archive_bytes: 1 << 20,
    max_unpacked_bytes: 4 << 20,
};

fn work() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-fuzz-unpack-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a work folder");
    dir
}

fn size_of(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).expect("readable") {
        let e = e.expect("entry");
        let meta = std::fs::symlink_metadata(e.path()).expect("metadata");
        assert!(
            !meta.file_type().is_symlink(),
            "a link was unpacked: {:?}",
            e.path()
        );
        total += if meta.is_dir() {
            size_of(&e.path())
        } else {
            meta.len()
        };
    }
    total
}

fuzz_target!(|data: &[u8]| {
    let work = work();
    let archive = work.join("model.tar.gz");
    let dest = work.join("unpacked");
    std::fs::write(&archive, data).expect("written");
    match unpack(&archive, &dest, LIMITS) {
        Ok(u) => {
            assert!(u.dir.starts_with(&dest));
            assert!(size_of(&dest) <= LIMITS.max_unpacked_bytes);
            std::fs::remove_dir_all(&dest).expect("removed");
        }
        Err(_) => assert!(!dest.exists(), "a failed unpack left {dest:?}"),
    }
    // Nothing else: no partial folders beside the destination.
    let left: Vec<_> = std::fs::read_dir(&work)
        .expect("readable")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n != "model.tar.gz")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
});
