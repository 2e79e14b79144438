//! Shared pieces of the end-to-end tests: locating build artifacts, packing archives with the
//! real `tessera pack`, and running a real server on an ephemeral loopback port.
#![allow(dead_code)]

pub mod tenancy;

/// Base64 as clients send images.
pub const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tessera");

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where `scripts/test.sh` puts handler components and exported models.
pub fn artifacts() -> PathBuf {
    std::env::var_os("TESSERA_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/artifacts"))
}

pub fn artifact(name: &str) -> PathBuf {
    let p = artifacts().join(name);
    assert!(
        p.exists(),
        "missing test artifact {} — run scripts/test.sh (it builds them)",
        p.display()
    );
    p
}

pub fn python() -> PathBuf {
    std::env::var_os("TESSERA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"))
}

/// Packs an archive named `<name>.tar.gz` into `store` with `tessera pack`.
pub fn pack(store: &Path, name: &str, config_yaml: &str, model: &Path, handler: &Path) -> PathBuf {
    std::fs::create_dir_all(store).unwrap();
    let out = store.join(format!("{name}.tar.gz"));
    // Archives name their TorchScript file model.pt; stage differently named files as that.
    let staged = tempfile::tempdir().unwrap();
    let model = if model.file_name().unwrap() == "model.pt" {
        model.to_path_buf()
    } else {
        let p = staged.path().join("model.pt");
        std::fs::copy(model, &p).unwrap();
        p
    };
    let (ok, err) = pack_archive(&out, config_yaml, &[model], handler, &[]);
    assert!(ok, "tessera pack failed for {name}: {err}");
    out
}

/// `tessera pack` with any number of model files and assets; the config is written to a
/// temporary file. Returns whether it succeeded and its stderr (callers assert either way).
pub fn pack_archive(
    out: &Path,
    config_yaml: &str,
    models: &[PathBuf],
    handler: &Path,
    assets: &[PathBuf],
) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("model-config.yaml");
    std::fs::write(&cfg, config_yaml).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["pack", "--config"]).arg(&cfg);
    for m in models {
        cmd.arg("--model").arg(m);
    }
    cmd.arg("--handler").arg(handler);
    for a in assets {
        cmd.arg("--asset").arg(a);
    }
    let out = cmd.arg("--output").arg(out).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `tessera serve`, killed on drop. Its stderr (the log) is collected.
pub struct Server {
    child: Child,
    pub base: String,
    log: Arc<Mutex<String>>,
    /// What the server printed on stdout (its start-up banner).
    stdout: Arc<Mutex<String>>,
    _work: tempfile::TempDir,
    _cage: Option<MemoryCage>,
}

/// How to start a test server, beyond its flags.
#[derive(Default)]
pub struct Launch {
    /// `--work-dir` (default: a fresh temporary folder).
    pub work_dir: Option<PathBuf>,
    /// Run the server in a memory cage of this many bytes (see [`MemoryCage`]).
    pub memory_limit: Option<u64>,
    /// Return once it listens, before it is ready (its preloads warm).
    pub listening_only: bool,
    /// Limit on open files (soft and hard), as a service manager would set it.
    pub fd_limit: Option<u64>,
    /// Environment variables set for the server (after the defaults, so they may replace them).
    pub env: Vec<(&'static str, String)>,
}

impl Server {
    pub fn start(store: &Path, extra: &[&str]) -> Server {
        Server::launch(store, extra, Launch::default())
    }

    pub fn launch(store: &Path, extra: &[&str], how: Launch) -> Server {
        let work = tempfile::tempdir().unwrap();
        let work_dir = how.work_dir.unwrap_or_else(|| work.path().to_path_buf());
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--port", "0", "--device", "cpu", "--model-store"])
            .arg(store)
            .arg("--work-dir")
            .arg(&work_dir)
            .args(extra)
            .env("RUST_LOG", "info,wasmtime=warn,cranelift=warn")
            // Tests pack copies of one file under several names to exercise eviction: held once
            // they would never be evicted. Tests of sharing pass `--share-weights on`.
            .env("TESSERA_SHARE_WEIGHTS", "off")
            .envs(how.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let cage = how.memory_limit.map(MemoryCage::new);
        if let Some(c) = &cage {
            c.confine(&mut cmd);
        }
        if let Some(n) = how.fd_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn tessera");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let banner = Arc::new(Mutex::new(String::new()));
        let lines = banner.clone();
        // Ready (preloads warm) comes after listening: tests start from a ready server.
        let listening_only = how.listening_only;
        std::thread::spawn(move || {
            let mut addr = None;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push_str(&format!("{line}\n"));
                if let Some(a) = line.strip_prefix("tessera listening on ") {
                    addr = Some(a.to_string());
                }
                if line == "tessera ready" || listening_only {
                    if let Some(a) = addr.take() {
                        let _ = tx.send(a);
                    }
                }
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(b) => b,
            Err(_) => {
                let _ = child.kill();
                panic!("server did not start; log:\n{}", log.lock().unwrap());
            }
        };
        Server {
            child,
            base,
            log,
            stdout: banner,
            _work: work,
            _cage: cage,
        }
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the log contains `needle`, up to `within`.
    pub fn wait_log(&self, needle: &str, within: Duration) -> bool {
        wait_until(within, || self.log().contains(needle))
    }

    pub fn is_alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the server.
    pub fn signal(&self, signal: i32) {
        // SAFETY: a plain kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// The server's exit status once it exits, if it does within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(within, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: String = log
                .chars()
                .rev()
                .take(6000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            eprintln!("---- server log (tail) ----\n{tail}");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A memory limit for a test server, so that a regression in a memory bound fails the test
/// (the kernel kills the caged server) instead of exhausting the machine. A memory cgroup
/// (v1 or v2, when this process may create one: CI runs as root), else RLIMIT_DATA (which
/// turns an over-allocation into a failed allocation rather than a kill).
pub struct MemoryCage {
    dir: Option<PathBuf>,
    bytes: u64,
}

impl MemoryCage {
    pub fn new(bytes: u64) -> MemoryCage {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "tessera-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let v2 = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .iter()
            .map(Path::new)
            .find(|p| {
                std::fs::read_to_string(p.join("cgroup.subtree_control"))
                    .is_ok_and(|c| c.split_whitespace().any(|w| w == "memory"))
            });
        let made = if v1.join("memory.limit_in_bytes").exists() {
            let d = v1.join(&name);
            (std::fs::create_dir(&d).is_ok()
                && std::fs::write(d.join("memory.limit_in_bytes"), bytes.to_string()).is_ok())
            .then_some(d)
        } else if let Some(root) = v2 {
            let d = root.join(&name);
            (std::fs::create_dir(&d).is_ok()
                && std::fs::write(d.join("memory.max"), bytes.to_string()).is_ok()
                && {
                    // Best effort: without it the cage still bounds memory (swap may absorb some).
                    let _ = std::fs::write(d.join("memory.swap.max"), "0");
                    true
                })
            .then_some(d)
        } else {
            None
        };
        if made.is_none() {
            eprintln!("no memory cgroup available: caging the server with RLIMIT_DATA instead");
        }
        MemoryCage { dir: made, bytes }
    }

    /// Makes `cmd`'s process enter the cage before it runs the server.
    pub fn confine(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let bytes = self.bytes;
        let procs = self.dir.as_ref().map(|d| {
            std::ffi::CString::new(d.join("cgroup.procs").to_string_lossy().into_owned()).unwrap()
        });
        // SAFETY: only async-signal-safe calls (open, write, close, setrlimit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(p) = &procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                } else {
                    let r = libc::rlimit {
                        rlim_cur: bytes,
                        rlim_max: bytes,
                    };
                    libc::setrlimit(libc::RLIMIT_DATA, &r);
                }
                Ok(())
            });
        }
    }
}

impl Drop for MemoryCage {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            // Empty once the server (and its children) have exited.
            for _ in 0..100 {
                if std::fs::remove_dir(d).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The sum of the values of the server's metric lines named `name` (a family, or a family and
/// suffix such as `_count`) whose labels include each of `labels` (e.g. `model="a"`); `None`
/// when no line matches.
pub fn metric(server: &Server, name: &str, labels: &[&str]) -> Option<f64> {
    let text = get(&server.url("/metrics")).text();
    let values: Vec<f64> = text
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Polls `cond` until it holds or the deadline passes.
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A minimal HTTP response.
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .new_agent()
}

fn finish(resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut resp = resp.expect("HTTP request failed at the transport level");
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = resp
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap_or_default();
    Reply {
        status,
        body,
        headers,
    }
}

/// Any method, with headers and an optional body.
pub fn call(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Reply {
    let mut builder = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let req = builder
        .body(body.map(|b| b.to_vec()).unwrap_or_default())
        .unwrap();
    finish(agent().run(req))
}

pub fn get(url: &str) -> Reply {
    finish(agent().get(url).call())
}

pub fn delete(url: &str) -> Reply {
    finish(agent().delete(url).call())
}

pub fn post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut req = agent().post(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    finish(req.send(body))
}

pub fn post_json(url: &str, value: &serde_json::Value) -> Reply {
    post(
        url,
        &[("content-type", "application/json")],
        &serde_json::to_vec(value).unwrap(),
    )
}

/// POSTs every body to `url` at once (a thread each); the replies in order, each checked to be
/// a 200, and the `x-batch-size` each says.
pub fn post_all_at_once(url: &str, bodies: &[&serde_json::Value]) -> (Vec<Reply>, Vec<usize>) {
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|body| s.spawn(move || post_json(url, body)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let sizes = replies
        .iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{}", r.text());
            r.header("x-batch-size").unwrap().parse().unwrap()
        })
        .collect();
    (replies, sizes)
}

/// Encodes 8-bit pixels of the given color type as PNG.
pub fn png_encode(w: u32, h: u32, color: png::ColorType, pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()
            .unwrap()
            .write_image_data(pixels)
            .unwrap();
    }
    out
}

/// Encodes RGB pixels as PNG.
pub fn png_rgb(w: u32, h: u32, pixels: &[u8]) -> Vec<u8> {
    png_encode(w, h, png::ColorType::Rgb, pixels)
}

/// Decodes a PNG to (width, height, RGB pixels).
pub fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let dec = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "expected RGB PNG");
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// Deterministic pseudo-random bytes (xorshift), for test images.
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A raw tar entry: (name, type, data, link target).
pub type RawEntry<'a> = (&'a str, tar::EntryType, &'a [u8], &'a str);

/// Writes a .tar.gz with raw, unvalidated entries.
pub fn raw_archive(path: &Path, entries: &[RawEntry]) {
    let file = std::fs::File::create(path).unwrap();
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_old();
        let raw = &mut h.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        if !link.is_empty() {
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        builder.append(&h, *data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap();
}

/// Writes, as `<dir>/<case>.tar.gz`, archives a server must refuse, built around a valid
/// config, handler and model: escapes by `..` and by an absolute path (`escape`), symlink,
/// hard link, device and FIFO entries, a gzip bomb (64 MiB of zeros), a core module instead of
/// a component, a component of another world, TorchScript that does not load, and a missing
/// handler. Returns the case names.
pub fn hostile_archives(dir: &Path, config: &[u8], escape: &str) -> Vec<&'static str> {
    let wasm = std::fs::read(artifact("handlers/example.wasm")).unwrap();
    let other_world = std::fs::read(artifact("handlers/other-world.wasm")).unwrap();
    let model = std::fs::read(artifact("example/model.pt")).unwrap();
    let zeros = vec![0u8; 64 << 20];
    let file = tar::EntryType::Regular;
    let archive = |handler: Option<&[u8]>, model: &[u8], extra: Option<RawEntry>| -> Vec<u8> {
        let mut entries: Vec<RawEntry> = vec![
            ("model-config.yaml", file, config, ""),
            ("model.pt", file, model, ""),
        ];
        entries.extend(handler.map(|h| ("handler.wasm", file, h, "")));
        entries.extend(extra);
        let tmp = tempfile::NamedTempFile::new().unwrap();
        raw_archive(tmp.path(), &entries);
        std::fs::read(tmp.path()).unwrap()
    };
    let good = |extra: RawEntry| archive(Some(&wasm), &model, Some(extra));
    let cases: Vec<(&'static str, Vec<u8>)> = vec![
        ("traversal", good(("../../escaped.txt", file, b"pwned", ""))),
        ("absolute", good((escape, file, b"pwned", ""))),
        (
            "symlink",
            good(("assets/link", tar::EntryType::Symlink, b"", "/etc/passwd")),
        ),
        (
            "hardlink",
            good(("assets/hard", tar::EntryType::Link, b"", "/etc/passwd")),
        ),
        (
            "chardev",
            good(("assets/dev", tar::EntryType::Char, b"", "")),
        ),
        ("fifo", good(("assets/fifo", tar::EntryType::Fifo, b"", ""))),
        ("bomb", good(("assets/zeros", file, &zeros, ""))),
        // The server's own optimised copies live there, loaded without a second check.
        (
            "reserved",
            good((".optimized/model.freeze.cpu.pt", file, &model, "")),
        ),
        ("corewasm", archive(Some(b"\0asm\x01\0\0\0"), &model, None)),
        ("otherworld", archive(Some(&other_world), &model, None)),
        (
            "badmodel",
            archive(Some(&wasm), b"PK not torchscript", None),
        ),
        ("nohandler", archive(None, &model, None)),
    ];
    for (name, bytes) in &cases {
        std::fs::write(dir.join(format!("{name}.tar.gz")), bytes).unwrap();
    }
    cases.into_iter().map(|(n, _)| n).collect()
}

/// The largest per-byte difference between two images of the same size.
pub fn max_abs_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len(), "images differ in size");
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Runs the project venv's python with `args`, `stdin` as JSON on its standard input; its
/// standard output parsed as JSON.
pub fn python_json(args: &[&str], stdin: &serde_json::Value) -> serde_json::Value {
    let mut child = Command::new(python())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    serde_json::to_writer(child.stdin.take().unwrap(), stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python {args:?} failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One HTTP/1.1 connection kept open across requests (what a load balancer's health checker
/// or a keep-alive client holds).
pub struct KeepAlive {
    stream: BufReader<std::net::TcpStream>,
}

impl KeepAlive {
    pub fn connect(base: &str) -> KeepAlive {
        let addr = base.trim_start_matches("http://");
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        KeepAlive {
            stream: BufReader::new(stream),
        }
    }

    /// `GET path` on this connection; returns the status (0 if the connection is gone).
    pub fn get(&mut self, path: &str) -> u16 {
        use std::io::Write;
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        if self.stream.get_mut().write_all(req.as_bytes()).is_err() {
            return 0;
        }
        let mut status_line = String::new();
        if self.stream.read_line(&mut status_line).unwrap_or(0) == 0 {
            return 0;
        }
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if self.stream.read_line(&mut line).unwrap_or(0) == 0 {
                return 0;
            }
            if line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        if self.stream.read_exact(&mut body).is_err() {
            return 0;
        }
        status
    }
}
