//! Tenant isolation that holds: hostile uploads and requests, each built here, each refused
//! with the right status while a well-behaved tenant's requests keep getting 200 and the server
//! stays up. Cases that could exhaust memory run the server in a memory cage, so a regression
//! fails the test instead of the machine.
mod support;

use base64::Engine;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::tenancy::*;
use support::*;

/// Writes hostile TorchScript files with the venv's torch: each takes the example handler's
/// inputs (image u8 [H, W, 3], strength) like the example model.
const HOSTILE_MODELS: &str = r#"
import sys, torch
from typing import List, Tuple
out, marker = sys.argv[1], sys.argv[2]

class Base(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.ones(1)
    def forward(self, image: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        return image

class Stateful(Base):
    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.w, self.training)
    def restore(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.w = state[0]
        self.training = state[1]

class SetstateWrites(Stateful):
    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.restore(state)
        torch.save(self.w, MARKER)

class SetstateForges(Stateful):
    # Prints what the check's child reports for a clean file, padded past stdio's buffer so it
    # reaches the pipe before the child's own report; its forward does what the policy refuses.
    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.restore(state)
        print('{"file": "model.pt", "ops": []}')
        for i in range(200):
            print("                                                               ")
    def forward(self, image: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        torch.save(self.w, MARKER)
        return image

class SetstateForgesThroughProc(Stateful):
    # Writes a clean report (between newlines, inside torch.save's archive) straight into the
    # check's report pipe, the child's first free descriptor, through /proc.
    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.restore(state)
        torch.save('\n{"file": "model.pt", "ops": []}\n', "/proc/self/fd/3")

class SetstateLoops(Stateful):
    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.restore(state)
        i = 0
        while i >= 0:
            i = (i + 1) % 1000

class SetstateHogs(Stateful):
    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        self.restore(state)
        keep: List[torch.Tensor] = []
        while len(keep) >= 0:
            keep.append(self.w.expand(1 << 22).clone())

class ForwardHogs(Base):
    def forward(self, image: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        # Each tensor depends on the input, so TorchScript cannot fold it into one constant.
        keep: List[torch.Tensor] = []
        while len(keep) >= 0:
            keep.append(strength.float().expand(1 << 22).clone())
        return image

class ForwardLoops(Base):
    def forward(self, image: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        x = strength
        while bool(x.sum() > -1.0):
            x = x * 1.0
        return image

class ForwardPrints(Base):
    def forward(self, image: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        print("hello from a tenant")
        return image

class ForwardSlow(Base):
    # Tens of milliseconds of arithmetic per forward (not a constant: it depends on the input).
    def forward(self, image: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        x = strength.float().expand(1 << 16).clone()
        for i in range(1500):
            x = torch.sin(x)
        return image + (x.sum() * 0.0).to(image.dtype)

class ForwardSeeds(Base):
    def forward(self, image: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)
        return image

for name, cls in [("setstate_writes", SetstateWrites), ("setstate_forges", SetstateForges),
                  ("setstate_forges_through_proc", SetstateForgesThroughProc),
                  ("setstate_loops", SetstateLoops),
                  ("setstate_hogs", SetstateHogs), ("forward_hogs", ForwardHogs),
                  ("forward_loops", ForwardLoops), ("forward_prints", ForwardPrints),
                  ("forward_seeds", ForwardSeeds), ("forward_slow", ForwardSlow)]:
    torch.jit.script(cls()).save(f"{out}/{name}.pt")
"#;

/// The hostile models, built once per test into `dir`; `marker` is the file the writing
/// `__setstate__` targets.
fn hostile_models(dir: &Path, marker: &Path) -> PathBuf {
    let script = HOSTILE_MODELS.replace("MARKER", &format!("{:?}", marker.to_str().unwrap()));
    // torch.jit.script reads the classes' source, so the script must be a file.
    let file = dir.join("make_hostile.py");
    std::fs::write(&file, script).unwrap();
    let out = std::process::Command::new(python())
        .arg(&file)
        .args([dir.to_str().unwrap(), marker.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building hostile models failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.to_path_buf()
}

/// An archive with the example handler, the config given and one TorchScript file, written as
/// raw tar so that checks `tessera pack` makes (it refuses hostile models too) are skipped.
fn archive_with(config: &str, model: &Path) -> Vec<u8> {
    let handler = std::fs::read(artifact("handlers/example.wasm")).unwrap();
    let model = std::fs::read(model).unwrap();
    let file = tar::EntryType::Regular;
    let tmp = tempfile::NamedTempFile::new().unwrap();
    raw_archive(
        tmp.path(),
        &[
            ("model-config.yaml", file, config.as_bytes(), ""),
            ("model.pt", file, &model, ""),
            ("handler.wasm", file, &handler, ""),
        ],
    );
    std::fs::read(tmp.path()).unwrap()
}

/// Uploads `model` with the example handler and `config` as version 1 of `name`.
fn upload_with(s: &Setup, token: &str, name: &str, config: &str, model: &Path) -> Reply {
    upload(&s.server, token, name, "1", &archive_with(config, model))
}

fn error_text(r: &Reply) -> String {
    r.json()["error"].as_str().unwrap_or_default().to_string()
}

const ONE_WORKER: &str = "maxWorkers: 1\nresponseTimeout: 30\ntessera:\n  model: model.pt\n";

#[test]
fn model_config_alias_bombs_are_refused() {
    let s = setup(&[]);
    let bystander = Bystander::start(s.server.base.clone());
    // 100 scalars, aliased 100 times, aliased 100 times, ... : 10^10 values in ~2 KiB.
    let mut yaml = String::from(ONE_WORKER);
    yaml.push_str("handler:\n  a: &a [");
    yaml.push_str(&vec!["x"; 100].join(", "));
    yaml.push_str("]\n");
    for (name, prev) in [("b", "a"), ("c", "b"), ("d", "c"), ("e", "d")] {
        let aliases = vec![format!("*{prev}"); 100].join(", ");
        yaml.push_str(&format!("  {name}: &{name} [{aliases}]\n"));
    }
    let body = archive_with(&yaml, &artifact("example/model.pt"));
    let r = upload(&s.server, ALICE, "bomb", "1", &body);
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        error_text(&r).contains("expands to more than"),
        "{}",
        r.text()
    );
    bystander.finish();
}

/// A GNU long-name record and a PAX record, each declaring a huge size (zeros, so the upload
/// is small): the tar crate used to read such records whole into memory.
#[test]
fn tar_metadata_records_are_bounded() {
    let s = setup_caged(&["--max-unpacked-mib", "4096"], 1536 << 20);
    let bystander = Bystander::start(s.server.base.clone());
    for kind in [b'L', b'x'] {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let mut h = tar::Header::new_gnu();
        h.set_path("././@LongLink").unwrap();
        h.set_entry_type(tar::EntryType::new(kind));
        let size: u64 = 2 << 30;
        h.set_size(size);
        h.set_cksum();
        gz.write_all(h.as_bytes()).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(size >> 20) {
            gz.write_all(&zeros).unwrap();
        }
        let body = gz.finish().unwrap();
        assert!(body.len() < 6 << 20, "{} bytes", body.len());
        let r = upload(&s.server, ALICE, "longname", "1", &body);
        assert_eq!(r.status, 422, "{}", r.text());
        assert!(error_text(&r).contains("metadata record"), "{}", r.text());
    }
    bystander.finish();
    assert!(s.server.log().contains("listening"));
}

fn setup_caged(extra: &[&str], bytes: u64) -> Setup {
    setup_launch(
        extra,
        Launch {
            memory_limit: Some(bytes),
            ..Launch::default()
        },
    )
}

#[test]
fn torchscript_that_reaches_outside_the_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("written-by-setstate");
    let models = hostile_models(dir.path(), &marker);
    let s = setup_caged(
        &[
            "--model-check-seconds",
            "20",
            "--model-check-memory-mib",
            "768",
        ],
        3 << 30,
    );
    let bystander = Bystander::start(s.server.base.clone());

    // __setstate__ that writes a file (the check's sandbox stops the write; the operator policy
    // refuses aten::save), that forges a clean report by printing it (the child's reports do
    // not share a stream with what a model prints) or by writing it into the report pipe
    // through /proc (the parent takes exactly one report line per file), or allocates without bound (it dies in the check's memory limit);
    // forwards that print or seed the process-wide generator (refused by operator).
    for (file, needle) in [
        ("setstate_writes.pt", "aten::save"),
        ("setstate_forges.pt", "aten::save"),
        ("setstate_forges_through_proc.pt", "report"),
        ("setstate_hogs.pt", ""),
        ("forward_prints.pt", "prim::Print"),
        ("forward_seeds.pt", "aten::manual_seed"),
    ] {
        let r = upload_with(&s, ALICE, "refused", ONE_WORKER, &models.join(file));
        assert_eq!(r.status, 422, "{file}: {}", r.text());
        assert!(error_text(&r).contains(needle), "{file}: {}", r.text());
    }
    assert!(!marker.exists(), "__setstate__ wrote {}", marker.display());

    // __setstate__ that never returns: the check is killed at its deadline; meanwhile another
    // upload is checked and installed (no global lock across checks or loads).
    let base = s.server.base.clone();
    let looping = archive_with(ONE_WORKER, &models.join("setstate_loops.pt"));
    let slow = std::thread::spawn(move || {
        let server_url = format!("{base}/models/loops/versions/1");
        let auth = bearer(ALICE);
        call(
            "POST",
            &server_url,
            &[("authorization", auth.as_str())],
            Some(&looping),
        )
    });
    // Its body is in staging: its check is starting.
    assert!(wait_until(Duration::from_secs(30), || {
        std::fs::read_dir(s.store.path().join(".staging")).is_ok_and(|d| d.count() > 0)
    }));
    let r = upload_with(&s, BOB, "good2", ONE_WORKER, &artifact("example/model.pt"));
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        !slow.is_finished(),
        "the looping check should still be running"
    );
    let r = slow.join().unwrap();
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(error_text(&r).contains("did not finish"), "{}", r.text());
    bystander.finish();
}

#[test]
fn a_forward_that_allocates_without_bound_gets_507() {
    let dir = tempfile::tempdir().unwrap();
    let models = hostile_models(dir.path(), &dir.path().join("unused"));
    // The cap is far below the cage: without it the kernel would kill the server.
    let s = setup_caged(&["--max-cpu-tensor-mib", "256"], 1536 << 20);
    let bystander = Bystander::start(s.server.base.clone());
    // Bob has no tenant time limit: this machine may fault memory in slowly.
    let config = "maxWorkers: 1\nresponseTimeout: 300\ntessera:\n  model: model.pt\n";
    let r = upload_with(&s, BOB, "hog", config, &models.join("forward_hogs.pt"));
    assert_eq!(r.status, 201, "{}", r.text());
    for _ in 0..3 {
        let r = invoke(&s.server, BOB, "/predictions/hog", &image_request());
        assert_eq!(r.status, 507, "{}", r.text());
        assert!(error_text(&r).contains("memory"), "{}", r.text());
    }
    bystander.finish();
}

/// Scheduling policies of the server's forward threads of model `model` (`f<n>.<i>-<model>`,
/// and the OpenMP workers they started, which inherit the name), from /proc.
fn thread_policies(pid: u32, model: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised command; the policy is field 41 overall.
        let policy = stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].split_whitespace().nth(38)?.parse().ok());
        let forward = comm.trim().starts_with('f') && comm.trim().ends_with(&format!("-{model}"));
        if let (true, Some(p)) = (forward, policy) {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_forward_that_never_ends_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let models = hostile_models(dir.path(), &dir.path().join("unused"));
    let s = setup(&[]);
    let bystander = Bystander::start(s.server.base.clone());
    let config = "maxWorkers: 1\nresponseTimeout: 2\ntessera:\n  model: model.pt\n";
    let r = upload_with(&s, BOB, "spin", config, &models.join("forward_loops.pt"));
    assert_eq!(r.status, 201, "{}", r.text());
    let spin = || invoke(&s.server, BOB, "/predictions/spin", &image_request());
    assert_eq!(spin().status, 504);
    // Past its deadline by responseTimeout, the model is quarantined and its thread idled.
    let mut last = 0;
    assert!(
        wait_until(Duration::from_secs(20), || {
            last = spin().status;
            last == 503
        }),
        "expected 503 after quarantine, last status {last}"
    );
    let r = spin();
    assert!(error_text(&r).contains("quarantined"), "{}", r.text());
    assert!(s
        .server
        .wait_log("model quarantined", Duration::from_secs(5)));
    const SCHED_IDLE: u32 = 5;
    let policies = thread_policies(s.server.pid(), "spin");
    assert!(
        !policies.is_empty() && policies.iter().all(|&p| p == SCHED_IDLE),
        "{policies:?}"
    );
    // Unloading clears the quarantine: the next request loads the model afresh.
    assert_eq!(authed(&s.server, "DELETE", BOB, "/models/spin").status, 200);
    assert_eq!(spin().status, 504);
    bystander.finish();
}

/// An 8x8 PNG carrying an iCCP chunk that inflates to `inflated` bytes.
fn png_with_icc(inflated: usize) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, 8, 8);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().unwrap();
        let mut profile = b"icc\0\0".to_vec();
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..inflated >> 20 {
            z.write_all(&zeros).unwrap();
        }
        profile.extend(z.finish().unwrap());
        w.write_chunk(png::chunk::iCCP, &profile).unwrap();
        w.write_image_data(&noise(192, 3)).unwrap();
    }
    out
}

/// A PNG whose header declares `w`x`h` (the pixel data is a stub: it is never reached).
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut small = png_rgb(1, 1, &[0, 0, 0]);
    // IHDR's width and height sit right after the signature and the chunk header.
    small[16..20].copy_from_slice(&w.to_be_bytes());
    small[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&small[12..29]);
    small[29..33].copy_from_slice(&crc.to_be_bytes());
    small
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    crc.sum()
}

#[test]
fn hostile_images_get_4xx_and_handler_memory_is_bounded() {
    let s = setup_caged(&["--handler-memory-total-mib", "1024"], 3 << 30);
    let bystander = Bystander::start(s.server.base.clone());
    let r = upload_with(&s, ALICE, "img", ONE_WORKER, &artifact("example/model.pt"));
    assert_eq!(r.status, 201, "{}", r.text());

    let huge = png_declaring(30_000, 30_000);
    let r = invoke(
        &s.server,
        ALICE,
        "/predictions/img",
        &json!({"image": B64.encode(&huge)}),
    );
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(error_text(&r).contains("30000x30000"), "{}", r.text());

    // 600 MiB of ICC profile behind 8x8 pixels, twelve at once: each is decoded without
    // inflating the profile (200), and none takes the server's handler memory with it.
    let icc = json!({"image": B64.encode(png_with_icc(600 << 20)), "gen_args": {"strength": 0.5}});
    let base = s.server.base.clone();
    let threads: Vec<_> = (0..12)
        .map(|_| {
            let (base, body) = (base.clone(), icc.clone());
            std::thread::spawn(move || invoke_at(&base, ALICE, "/predictions/img", &body).status)
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    bystander.finish();
}

#[test]
fn the_server_wide_handler_memory_bound_answers_503() {
    use tessera::sandbox::{HandlerEnv, HandlerRequest, Sandbox, SandboxError};
    let wasm = artifact("handlers/chaos.wasm");
    let hash = tessera::archive::sha256_file(&wasm).unwrap();
    let env = |mib: u64| HandlerEnv {
        model: "t/chaos@1".into(),
        assets: PathBuf::from("/nonexistent"),
        params: Default::default(),
        memory_bytes: mib << 20,
        max_response_bytes: 1 << 20,
        stage_cache: None,
    };
    let hog = || HandlerRequest {
        body: br#"{"mode": "hog"}"#.to_vec(),
        content_type: "application/json".into(),
        headers: vec![],
    };
    let deadline = || std::time::Instant::now() + Duration::from_secs(30);
    // The instance's own cap is below the server's: its own limit (500).
    let roomy = Sandbox::new(1 << 30).unwrap();
    let h = roomy.prepare(&wasm, &hash, env(64)).unwrap();
    assert!(matches!(
        roomy.preprocess(&h, hog(), "r", deadline()),
        Err(SandboxError::MemoryLimit(64))
    ));
    // The server's bound is below the instance's: the server-wide limit (503), every time,
    // because each finished call gives its memory back.
    let tight = Sandbox::new(48 << 20).unwrap();
    let h = tight.prepare(&wasm, &hash, env(256)).unwrap();
    for _ in 0..3 {
        assert!(matches!(
            tight.preprocess(&h, hog(), "r", deadline()),
            Err(SandboxError::ServerMemoryBusy(48))
        ));
    }
}

#[test]
fn warmup_bodies_are_bounded_like_requests() {
    let s = setup(&["--max-request-mib", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let warmup = dir.path().join("warmup.json");
    let mut body = b"{\"image\": \"".to_vec();
    body.resize(2 << 20, b'A');
    body.extend_from_slice(b"\"}");
    std::fs::write(&warmup, &body).unwrap();
    let config = format!("{ONE_WORKER}  warmup:\n    request: warmup.json\n    times: 1\n");
    let out = s.packs.path().join("warm.tar.gz");
    let (ok, err) = pack_archive(
        &out,
        &config,
        &[artifact("example/model.pt")],
        &artifact("handlers/example.wasm"),
        &[warmup],
    );
    assert!(ok, "{err}");
    assert_eq!(
        upload(&s.server, ALICE, "warm", "1", &std::fs::read(&out).unwrap()).status,
        201
    );
    let r = invoke(&s.server, ALICE, "/predictions/warm", &image_request());
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(s
        .server
        .wait_log("within the request size limit", Duration::from_secs(5)));
}

/// A single-tenant server whose work dir is `work`.
fn start_in(store: &Path, work: &Path) -> Server {
    let how = Launch {
        work_dir: Some(work.to_path_buf()),
        ..Launch::default()
    };
    Server::launch(store, &[], how)
}

#[test]
fn crash_leftovers_are_removed_at_start() {
    let store = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let partial = work.path().join("unpacked/.partial-x-1-0");
    let staged = store.path().join(".staging/12-0.d");
    std::fs::create_dir_all(partial.join("deep")).unwrap();
    std::fs::create_dir_all(&staged).unwrap();
    std::fs::write(partial.join("deep/model.pt"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(store.path().join(".staging/12-0.tar.gz"), b"half").unwrap();
    let server = start_in(store.path(), work.path());
    assert!(!partial.exists());
    assert!(!staged.exists());
    assert!(!store.path().join(".staging/12-0.tar.gz").exists());
    drop(server);
}

/// A work dir on a 3 MiB tmpfs: unpacking a bigger model runs out of space, which is the
/// server's problem (507, retryable), not a broken archive (422).
#[test]
fn a_full_work_dir_answers_507() {
    let work = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(work.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(work.path().to_path_buf());
    let store = tempfile::tempdir().unwrap();
    pack(
        store.path(),
        "large",
        ONE_WORKER,
        &artifact("example/model-large.pt"),
        &artifact("handlers/example.wasm"),
    );
    let server = start_in(store.path(), work.path());
    let r = post_json(&server.url("/predictions/large"), &image_request());
    assert_eq!(r.status, 507, "{}", r.text());
    assert!(error_text(&r).contains("space"), "{}", r.text());
}

/// SIGTERM with forwards queued and clients that already left: requests in flight are answered,
/// the queue drains, every forward thread is joined and the process exits 0 (a forward still
/// running in libtorch while the process tore down used to end it with SIGSEGV).
#[test]
fn sigterm_with_a_full_queue_drains_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let models = hostile_models(dir.path(), &dir.path().join("unused"));
    let mut s = setup(&["--drain-seconds", "30"]);
    let config = "maxWorkers: 1\nresponseTimeout: 60\ntessera:\n  model: model.pt\n";
    let r = upload_with(&s, BOB, "slow", config, &models.join("forward_slow.pt"));
    assert_eq!(r.status, 201, "{}", r.text());
    let slow = |base: &str| invoke_at(base, BOB, "/predictions/slow", &image_request());
    assert_eq!(slow(&s.server.base).status, 200); // loaded
                                                  // Clients that send a request and leave: their forwards stay queued.
    let addr = s.server.base.trim_start_matches("http://").to_string();
    let body = serde_json::to_vec(&image_request()).unwrap();
    for _ in 0..6 {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            c,
            "POST /predictions/slow HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {BOB}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        c.write_all(&body).unwrap();
    }
    // Clients that wait for their answers.
    let waiting: Vec<_> = (0..6)
        .map(|_| {
            let base = s.server.base.clone();
            std::thread::spawn(move || slow(&base).status)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    s.server.signal(libc::SIGTERM);
    let statuses: Vec<u16> = waiting.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(
        statuses.iter().all(|&c| c == 200 || c == 429),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200), "{statuses:?}");
    let status = s.server.wait_exit(Duration::from_secs(60));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{status:?}");
    assert!(s
        .server
        .wait_log("forward threads joined", Duration::from_secs(5)));
}
