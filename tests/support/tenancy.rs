//! Helpers for tests that run a multi-tenant server: tenants files, uploads by token, and a
//! well-behaved tenant ("bob", model "good") whose requests run in the background and must
//! all succeed while a test attacks the server.
use super::*;
use base64::Engine;
use serde_json::json;
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const ALICE: &str = "alice-token-0123456789";
pub const BOB: &str = "bob-token-9876543210";
pub const OPS: &str = "ops-token-admin";
pub const CONFIG: &str = "maxWorkers: 2\nresponseTimeout: 30\ntessera:\n  model: model.pt\n";

pub fn digest(token: &str) -> String {
    format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(token.as_bytes()))
    )
}

pub fn tenants_yaml(bob_token: &str) -> String {
    format!(
        "tenants:\n\
         - name: alice\n  tokens: ['{}']\n  limits:\n    maxModels: 3\n    maxTotalMiB: 6\n    handlerMemoryMiB: 64\n    handlerTimeoutSeconds: 2\n\
         - name: bob\n  tokens: ['{}']\n\
         - name: ops\n  admin: true\n  tokens: ['{}']\n  limits:\n    residencyShare: 0.0\n",
        digest(ALICE),
        digest(bob_token),
        digest(OPS)
    )
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Packs an archive outside the store (what a tenant would upload).
pub fn archive(dir: &Path, name: &str, model: &str, handler: &str) -> Vec<u8> {
    let path = pack(dir, name, CONFIG, &artifact(model), &artifact(handler));
    std::fs::read(path).unwrap()
}

pub fn upload(server: &Server, token: &str, name: &str, version: &str, body: &[u8]) -> Reply {
    let auth = bearer(token);
    call(
        "POST",
        &server.url(&format!("/models/{name}/versions/{version}")),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/gzip"),
        ],
        Some(body),
    )
}

pub fn invoke(server: &Server, token: &str, path: &str, body: &serde_json::Value) -> Reply {
    invoke_at(&server.base, token, path, body)
}

/// [`invoke`] against the server at `base` (for threads that hold only its address).
pub fn invoke_at(base: &str, token: &str, path: &str, body: &serde_json::Value) -> Reply {
    let auth = bearer(token);
    post(
        &format!("{base}{path}"),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        &serde_json::to_vec(body).unwrap(),
    )
}

pub fn authed(server: &Server, method: &str, token: &str, path: &str) -> Reply {
    let auth = bearer(token);
    call(
        method,
        &server.url(path),
        &[("authorization", auth.as_str())],
        None,
    )
}

pub fn image_request() -> serde_json::Value {
    let png = png_rgb(8, 8, &noise(192, 11));
    json!({ "image": B64.encode(png), "gen_args": {"strength": 0.5} })
}

/// Keeps bob's model busy in the background and records every status it gets.
pub struct Bystander {
    stop: Arc<AtomicBool>,
    statuses: Arc<std::sync::Mutex<Vec<u16>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Bystander {
    pub fn start(base: String) -> Bystander {
        let stop = Arc::new(AtomicBool::new(false));
        let statuses = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (flag, seen) = (stop.clone(), statuses.clone());
        let handle = std::thread::spawn(move || {
            let body = image_request();
            while !flag.load(Ordering::Relaxed) {
                let r = invoke_at(&base, BOB, "/predictions/good", &body);
                seen.lock().unwrap().push(r.status);
                std::thread::sleep(Duration::from_millis(25));
            }
        });
        Bystander {
            stop,
            statuses,
            handle: Some(handle),
        }
    }

    /// Lets the bystander make at least a few requests (the attack may have been quick), stops
    /// it, and asserts that every request of the well-behaved tenant succeeded.
    pub fn finish(mut self) {
        let made = || self.statuses.lock().unwrap().len();
        assert!(
            wait_until(Duration::from_secs(60), || made() >= 3),
            "bystander made only {} requests",
            made()
        );
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap();
        let statuses = self.statuses.lock().unwrap();
        assert!(
            statuses.iter().all(|s| *s == 200),
            "well-behaved tenant saw failures: {statuses:?}"
        );
    }
}

pub struct Setup {
    pub server: Server,
    pub store: tempfile::TempDir,
    pub tenants: PathBuf,
    pub packs: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

pub fn setup(extra: &[&str]) -> Setup {
    setup_with(&tenants_yaml(BOB), extra)
}

pub fn setup_with(yaml: &str, extra: &[&str]) -> Setup {
    setup_full(yaml, extra, Launch::default())
}

pub fn setup_launch(extra: &[&str], how: Launch) -> Setup {
    setup_full(&tenants_yaml(BOB), extra, how)
}

fn setup_full(yaml: &str, extra: &[&str], how: Launch) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let tenants = dir.path().join("tenants.yaml");
    std::fs::write(&tenants, yaml).unwrap();
    let store = tempfile::tempdir().unwrap();
    let packs = tempfile::tempdir().unwrap();
    let mut args = vec!["--tenants", tenants.to_str().unwrap()];
    // Small limits unless the test sets its own.
    for (flag, value) in [("--max-unpacked-mib", "16"), ("--max-upload-mib", "6")] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    let server = Server::launch(store.path(), &args, how);
    let good = archive(
        packs.path(),
        "good",
        "example/model.pt",
        "handlers/example.wasm",
    );
    assert_eq!(upload(&server, BOB, "good", "1", &good).status, 201);
    Setup {
        server,
        store,
        tenants,
        packs,
        _dir: dir,
    }
}
