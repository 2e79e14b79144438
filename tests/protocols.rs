//! Protocols and operations against a real `tessera serve`: SageMaker's multi-model container
//! contract, the auth modes, health and readiness, request ids and logs, metrics labels.
mod support;

use base64::Engine;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::*;

const EXAMPLE_CONFIG: &str =
    "maxWorkers: 1\nresponseTimeout: 30\ntessera:\n  model: model.pt\nhandler:\n  max_pixels: 1000000\n";

fn example_archive(dir: &Path, name: &str, model: &str) -> std::path::PathBuf {
    pack(
        dir,
        name,
        EXAMPLE_CONFIG,
        &artifact(model),
        &artifact("handlers/example.wasm"),
    )
}

fn example_request() -> serde_json::Value {
    let png = png_rgb(9, 7, &noise(9 * 7 * 3, 3));
    json!({ "image": B64.encode(png), "gen_args": {"strength": 0.5} })
}

/// Runs a Python client script of `tests/` against `server`; it must end "all checks passed".
fn run_client(server: &Server, script: &str, args: &[&std::ffi::OsStr]) {
    let mut cmd = Command::new(python());
    cmd.arg(workspace().join(script)).args(args);
    run_checked(server, &mut cmd, "all checks passed");
}

/// Runs `cmd` against `server`: it must succeed and print `needle`.
fn run_checked(server: &Server, cmd: &mut Command, needle: &str) {
    let out = cmd.output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{report}\nserver log:\n{}",
        server.log()
    );
    assert!(report.contains(needle), "{report}");
}

/// The platform's side of the SageMaker contract (tests/sagemaker_contract.py) against the
/// server in SageMaker mode, switched on by SageMaker's own environment variable: LoadModel
/// from the unpacked directory, 409/404/507, invoke, unload and reload.
#[test]
fn sagemaker_multi_model_contract() {
    let archives = tempfile::tempdir().unwrap();
    let fits = example_archive(archives.path(), "fits", "example/model.pt");
    let big = example_archive(archives.path(), "big", "example/model-large.pt");
    let big_bytes = std::fs::metadata(artifact("example/model-large.pt"))
        .unwrap()
        .len();
    assert!(
        big_bytes > 3 << 20,
        "model-large.pt must exceed the 3 MiB budget"
    );
    let root = tempfile::tempdir().unwrap();
    let request = archives.path().join("request.json");
    std::fs::write(&request, example_request().to_string()).unwrap();

    // As SageMaker starts it (`serve`, its environment); loopback and port 0 only because this
    // is a test (the defaults are 0.0.0.0:8080, checked in config's unit test).
    std::env::set_var("SAGEMAKER_MULTI_MODEL", "true");
    let server = Server::start(
        root.path(),
        &["--bind", "127.0.0.1", "--memory-budget-mib", "3"],
    );
    std::env::remove_var("SAGEMAKER_MULTI_MODEL");
    assert!(
        server.wait_log("sagemaker=true", Duration::from_secs(5)),
        "{}",
        server.log()
    );
    assert!(
        server.stdout().contains("open: no tokens"),
        "{}",
        server.stdout()
    );

    run_client(
        &server,
        "tests/sagemaker_contract.py",
        &[
            server.base.as_ref(),
            root.path().as_os_str(),
            fits.as_os_str(),
            big.as_os_str(),
            request.as_os_str(),
        ],
    );
}

/// A directory holding a link, or more than the unpacked-size limit, is refused as an archive
/// with the same entries would be; nothing of it stays in the work dir.
#[test]
fn sagemaker_directories_follow_the_archive_rules() {
    let archives = tempfile::tempdir().unwrap();
    let fits = example_archive(archives.path(), "fits", "example/model.pt");
    let root = tempfile::tempdir().unwrap();
    let unpack = |name: &str| {
        let dest = root.path().join(name).join("model");
        std::fs::create_dir_all(&dest).unwrap();
        let ok = Command::new("tar")
            .arg("xzf")
            .arg(&fits)
            .arg("-C")
            .arg(&dest)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        dest
    };
    let linked = unpack("linked");
    std::os::unix::fs::symlink("/etc/passwd", linked.join("assets-passwd")).unwrap();
    let huge = unpack("huge");
    std::fs::write(huge.join("padding.bin"), vec![0u8; 2 << 20]).unwrap();
    let work = tempfile::tempdir().unwrap();
    let server = Server::launch(
        root.path(),
        &[
            "--sagemaker",
            "--bind",
            "127.0.0.1",
            "--max-unpacked-mib",
            "1",
        ],
        Launch {
            work_dir: Some(work.path().to_path_buf()),
            ..Default::default()
        },
    );
    for (name, dir, why) in [
        ("linked", &linked, "links are not allowed"),
        ("huge", &huge, "exceeds the limit"),
    ] {
        let r = post_json(
            &server.url("/models"),
            &json!({"model_name": name, "url": dir.display().to_string()}),
        );
        assert_eq!(r.status, 422, "{name}: {}", r.text());
        assert!(r.text().contains(why), "{name}: {}", r.text());
    }
    // No uploads in SageMaker mode (the model root is the platform's).
    let r = post(
        &server.url("/models/up/versions/1"),
        &[("content-type", "application/octet-stream")],
        &std::fs::read(&fits).unwrap(),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let unpacked = work.path().join("unpacked");
    let left: Vec<_> = std::fs::read_dir(&unpacked)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the work dir: {left:?}");
}

fn write_admin_tokens(dir: &Path, token: &str) -> std::path::PathBuf {
    let p = dir.join("admins");
    std::fs::write(
        &p,
        format!("# operators\n{}\n", support::tenancy::digest(token)),
    )
    .unwrap();
    p
}

/// `open-inference`: anyone may run models, only an admin token may manage them or read
/// metrics; `--metrics-address` serves metrics to a scraper without a token.
#[test]
fn open_inference_mode_splits_inference_from_management() {
    let store = tempfile::tempdir().unwrap();
    example_archive(store.path(), "example", "example/model.pt");
    let admins = write_admin_tokens(store.path(), "root-token");
    let server = Server::start(
        store.path(),
        &[
            "--auth-mode",
            "open-inference",
            "--admin-tokens",
            admins.to_str().unwrap(),
            "--metrics-address",
            "127.0.0.1:0",
            "--preload",
            "example",
        ],
    );
    // stderr is read by another thread: the line may land just after "tessera ready".
    assert!(
        server.wait_log("preloaded", Duration::from_secs(5)),
        "{}",
        server.log()
    );
    assert!(
        server.stdout().contains("open-inference"),
        "{}",
        server.stdout()
    );
    let body = example_request().to_string();
    let ct = ("content-type", "application/json");
    let r = post(&server.url("/predictions/example"), &[ct], body.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    // Management and metrics without a token, or with a wrong one: 401.
    for (method, path) in [
        ("GET", "/models"),
        ("GET", "/metrics"),
        ("DELETE", "/models/example"),
    ] {
        let r = call(method, &server.url(path), &[], None);
        assert_eq!(r.status, 401, "{method} {path}: {}", r.text());
        let r = call(
            method,
            &server.url(path),
            &[("authorization", "Bearer nope")],
            None,
        );
        assert_eq!(r.status, 401, "{method} {path}: {}", r.text());
    }
    let admin = ("authorization", "Bearer root-token");
    let r = call("GET", &server.url("/models"), &[admin], None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["models"][0]["modelName"], "example");
    let r = call("GET", &server.url("/metrics"), &[admin], None);
    assert_eq!(r.status, 200);
    // The scraper's address: metrics without a token, and nothing else.
    let metrics_url = server
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix("tessera metrics on ").map(str::to_string))
        .expect("metrics address printed");
    let r = get(&metrics_url);
    assert_eq!(r.status, 200);
    assert!(r.text().contains("tessera_requests_total"));
    let models_there = metrics_url.replace("/metrics", "/models");
    assert_eq!(get(&models_there).status, 404);
}

/// The default mode still refuses an address beyond loopback without tokens; `open` takes it.
#[test]
fn open_binds_need_an_explicit_mode() {
    let store = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["serve", "--port", "0", "--bind", "0.0.0.0", "--model-store"])
        .arg(store.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to listen on 0.0.0.0"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["serve", "--auth-mode", "open-inference", "--model-store"])
        .arg(store.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs --admin-tokens"), "{err}");
}

/// Liveness answers at once; readiness (and SageMaker's /ping) only once the preloads are warm,
/// and not while draining.
#[test]
fn readiness_waits_for_preloads_and_ends_with_the_drain() {
    let store = tempfile::tempdir().unwrap();
    // A warm-up that spins until the 2 s request deadline: the server is live, not ready.
    let config = "maxWorkers: 1\nresponseTimeout: 2\ntessera:\n  warmup:\n    request: warmup.json\n    times: 1\n";
    let assets = tempfile::tempdir().unwrap();
    let spin = json!({"mode": "loop"});
    std::fs::write(assets.path().join("warmup.json"), spin.to_string()).unwrap();
    let (ok, err) = pack_archive(
        &store.path().join("slow.tar.gz"),
        config,
        &[artifact("example/model.pt")],
        &artifact("handlers/chaos.wasm"),
        &[assets.path().join("warmup.json")],
    );
    assert!(ok, "{err}");
    let mut server = Server::launch(
        store.path(),
        &["--preload", "slow", "--drain-delay-seconds", "2"],
        Launch {
            listening_only: true,
            ..Default::default()
        },
    );
    assert_eq!(get(&server.url("/v2/health/live")).status, 200);
    let ready = get(&server.url("/v2/health/ready"));
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert_eq!(get(&server.url("/ping")).status, 503);
    assert!(wait_until(Duration::from_secs(60), || get(
        &server.url("/v2/health/ready")
    )
    .status
        == 200));
    assert_eq!(get(&server.url("/ping")).status, 200);
    // Draining: a keep-alive client sees readiness drop while a request still runs (it spins
    // to its deadline and is answered 504, not cut off).
    let running = {
        let url = server.url("/predictions/slow");
        std::thread::spawn(move || post_json(&url, &spin))
    };
    let mut conn = KeepAlive::connect(&server.base);
    assert_eq!(conn.get("/v2/health/ready"), 200);
    std::thread::sleep(Duration::from_millis(300));
    server.signal(libc::SIGTERM);
    // For --drain-delay-seconds the server still takes connections and answers not ready, on
    // open connections and new ones alike, so a load balancer stops sending before they are
    // refused; then new connections are refused while the running request finishes.
    assert!(wait_until(Duration::from_secs(1), || conn
        .get("/v2/health/ready")
        == 503));
    assert_eq!(get(&server.url("/v2/health/ready")).status, 503);
    assert_eq!(get(&server.url("/ping")).status, 503);
    assert_eq!(get(&server.url("/v2/health/live")).status, 200);
    let addr = server.base.trim_start_matches("http://").to_string();
    assert!(wait_until(Duration::from_secs(5), || {
        std::net::TcpStream::connect(&addr).is_err()
    }));
    assert_eq!(running.join().unwrap().status, 504);
    let status = server.wait_exit(Duration::from_secs(30)).expect("exits");
    assert!(status.success(), "{status:?}");
}

/// Each request logs one line with its id, tenant, model@version, route, status and stage
/// times; a client's x-request-id is kept and returned, a bad one replaced; a traceparent's
/// trace id reaches the log. `--log-format json` writes one JSON object per line.
#[test]
fn request_ids_traces_and_one_json_log_line_per_request() {
    let store = tempfile::tempdir().unwrap();
    example_archive(store.path(), "example", "example/model.pt");
    let server = Server::start(store.path(), &["--log-format", "json"]);
    let body = example_request().to_string();
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = post(
        &server.url("/predictions/example"),
        &[
            ("content-type", "application/json"),
            ("x-request-id", "client-id-42"),
            ("traceparent", trace),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-request-id"), Some("client-id-42"));
    let bad = post(
        &server.url("/predictions/example"),
        &[
            ("content-type", "application/json"),
            ("x-request-id", "bad id\twith spaces"),
        ],
        body.as_bytes(),
    );
    let replaced = bad.header("x-request-id").unwrap().to_string();
    assert!(!replaced.is_empty() && replaced != "bad id\twith spaces");
    let missing = get(&server.url("/models/nope"));
    assert_eq!(missing.status, 404);
    assert!(missing.header("x-request-id").is_some());

    let find = |id: &str| -> serde_json::Value {
        let mut found = None;
        wait_until(Duration::from_secs(5), || {
            found = server
                .log()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["message"] == "request" && v["request_id"] == id);
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no request line for {id}:\n{}", server.log()))
    };
    let line = find("client-id-42");
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["tenant"], "default");
    assert_eq!(line["model"], "example");
    assert_eq!(line["version"], "1");
    assert_eq!(line["route"], "/predictions/example");
    assert_eq!(line["status"], 200);
    assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    for field in ["ms", "queue_ms", "pre_ms", "forward_ms", "post_ms"] {
        assert!(line[field].as_f64().is_some(), "{field}: {line}");
    }
    let line = find(&replaced);
    assert_eq!(line["status"], 200);
    let line = find(missing.header("x-request-id").unwrap());
    assert_eq!(line["status"], 404);
    assert!(
        line["error"].as_str().unwrap().contains("not found"),
        "{line}"
    );
    // Every line of the log is JSON.
    for l in server.log().lines().filter(|l| !l.trim().is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(l).is_ok(),
            "not JSON: {l}"
        );
    }
}

/// Every per-model family carries tenant, model and version; state gauges are there.
#[test]
fn metrics_share_one_label_set() {
    let store = tempfile::tempdir().unwrap();
    example_archive(store.path(), "example", "example/model.pt");
    let server = Server::start(store.path(), &[]);
    let body = example_request().to_string();
    let r = post(
        &server.url("/predictions/example"),
        &[("content-type", "application/json")],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200);
    let text = get(&server.url("/metrics")).text();
    let labels = [
        r#"model="example""#,
        r#"tenant="default""#,
        r#"version="1""#,
    ];
    for family in [
        "tessera_requests_total{code=\"200\",",
        "tessera_request_duration_seconds_count{",
        "tessera_queue_duration_seconds_count{",
        "tessera_inference_duration_seconds_count{",
        "tessera_model_loads_total{",
        "tessera_model_load_duration_seconds_count{",
        "tessera_model_resident_bytes{",
        "tessera_batch_size_count{",
        "tessera_queue_depth{",
        "tessera_requests_in_flight{",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(family) && labels.iter().all(|x| l.contains(x))),
            "{family} with {labels:?}:\n{text}"
        );
    }
    for gauge in [
        "tessera_residency_budget_bytes ",
        "tessera_residency_used_bytes ",
        "tessera_resident_models 1",
        "process_resident_memory_bytes ",
        "process_open_fds ",
    ] {
        assert!(text.contains(gauge), "{gauge}:\n{text}");
    }
}

/// A model with OIP tensors declared, exported by torch into `dir`, packed into `store`.
fn oip_archive(dir: &Path, store: &Path) {
    let model = dir.join("model.pt");
    let script = r#"
import sys, torch
from typing import Tuple
class M(torch.nn.Module):
    def forward(self, x: torch.Tensor, img: torch.Tensor, ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return x * 2.0 + 1.0, img.to(torch.float32).mean(dim=[1, 2]), ids + 1
torch.jit.script(M()).save(sys.argv[1])
"#;
    // From a file: torch.jit.script reads the class's source.
    let export = dir.join("export.py");
    std::fs::write(&export, script).unwrap();
    let ok = Command::new(python())
        .arg(&export)
        .arg(&model)
        .status()
        .unwrap()
        .success();
    assert!(ok, "exporting the OIP test model");
    let config = "maxWorkers: 2\nresponseTimeout: 30\ntessera:\n  oip:\n    inputs:\n      - {name: x, datatype: FP32, shape: [-1, 4]}\n      - {name: img, datatype: UINT8, shape: [-1, -1, -1]}\n      - {name: ids, datatype: INT64, shape: [-1, -1]}\n    outputs:\n      - {name: y, datatype: FP32, shape: [-1, 4]}\n      - {name: mean, datatype: FP32, shape: [-1]}\n      - {name: next, datatype: INT64, shape: [-1, -1]}\n";
    pack(
        store,
        "oip",
        config,
        &model,
        &artifact("handlers/example.wasm"),
    );
}

/// Open Inference Protocol v2 with the unmodified `tritonclient[http]` from PyPI: metadata,
/// readiness, FP32/UINT8/INT64 inference in binary and JSON form, errors
/// (tests/oip_client.py); a model without `tessera.oip` is refused with a pointer to its
/// handler route.
#[test]
fn open_inference_protocol_with_tritonclient() {
    let dir = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    oip_archive(dir.path(), store.path());
    example_archive(store.path(), "example", "example/model.pt");
    let server = Server::start(store.path(), &[]);
    let hostport = server.base.trim_start_matches("http://").to_string();
    run_client(
        &server,
        "tests/oip_client.py",
        &[hostport.as_ref(), "oip".as_ref()],
    );

    // A handler-only model: 400 naming the route to use.
    let r = post_json(
        &server.url("/v2/models/example/infer"),
        &json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("/predictions/example"), "{}", r.text());
    // Hostile tensors are refused before anything is allocated or run.
    for (body, why) in [
        (
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1u64 << 40, 4], "data": [1.0]}]}),
            "larger than",
        ),
        (
            json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": [1.0]}]}),
            "x",
        ),
        (
            json!({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}),
            "not supported",
        ),
        (json!({"inputs": "x"}), "invalid"),
    ] {
        let r = post_json(&server.url("/v2/models/oip/infer"), &body);
        assert!(
            r.status == 400 || r.status == 413,
            "{body}: {} {}",
            r.status,
            r.text()
        );
        assert!(r.text().contains(why), "{body}: {}", r.text());
    }
}

/// TorchServe's management API on its own port, driven with the request shapes TorchServe
/// documents: register by query parameters (loaded now or at first use), list with
/// limit/next_page_token, describe (default, all, one version), scale workers synchronously
/// and not, set-default, unregister a version and a model; TorchServe-only model-config keys
/// are accepted with a warning.
#[test]
fn torchserve_management_dialect() {
    let store = tempfile::tempdir().unwrap();
    let ts_config = format!("startupTimeout: 120\nparallelType: pp\n{EXAMPLE_CONFIG}");
    pack(
        store.path(),
        "example",
        &ts_config,
        &artifact("example/model.pt"),
        &artifact("handlers/example.wasm"),
    );
    let server = Server::start(store.path(), &["--management-address", "127.0.0.1:0"]);
    let mgmt = server
        .stdout()
        .lines()
        .find_map(|l| {
            l.strip_prefix("tessera management (TorchServe API) on ")
                .map(str::to_string)
        })
        .expect("management address printed");
    let m = |path: &str| format!("{mgmt}{path}");
    let body = example_request();

    let r = call("POST", &m("/models?url=example.tar.gz&model_name=ex2&initial_workers=1&synchronous=true&batch_size=4"), &[], None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("registered with 1 initial workers"),
        "{}",
        r.text()
    );
    assert_eq!(r.json()["ignored"], json!(["batch_size"]));
    assert!(server.wait_log(
        "TorchServe keys Tessera does not use",
        Duration::from_secs(5)
    ));
    assert_eq!(
        post_json(&server.url("/predictions/ex2"), &body).status,
        200
    );
    let again = call(
        "POST",
        &m("/models?url=example.tar.gz&model_name=ex2"),
        &[],
        None,
    );
    assert_eq!(again.status, 409, "{}", again.text());
    let remote = call(
        "POST",
        &m("/models?url=https://example.com/x.mar&model_name=x"),
        &[],
        None,
    );
    assert_eq!(remote.status, 400, "{}", remote.text());
    let missing = call("POST", &m("/models?model_name=x"), &[], None);
    assert_eq!(missing.status, 400, "{}", missing.text());

    // initial_workers defaults to 0: registered, loaded by its first request.
    let r = call(
        "POST",
        &m("/models?url=example.tar.gz&model_name=lazy"),
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let d = get(&m("/models/lazy")).json();
    assert_eq!(d[0]["loaded"], false, "{d}");
    assert_eq!(d[0]["workers"], json!([]));
    assert_eq!(
        post_json(&server.url("/predictions/lazy"), &body).status,
        200
    );
    assert_eq!(get(&m("/models/lazy")).json()[0]["loaded"], true);

    // Scaling a registered model that is not loaded loads it with that many workers.
    let r = call(
        "POST",
        &m("/models?url=example.tar.gz&model_name=lazy2"),
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call(
        "PUT",
        &m("/models/lazy2?min_worker=2&max_worker=2&synchronous=true"),
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let d = get(&m("/models/lazy2")).json();
    assert_eq!(d[0]["loaded"], true, "{d}");
    assert_eq!(d[0]["workers"].as_array().unwrap().len(), 2, "{d}");

    // Lists page with limit / next_page_token.
    let page = get(&m("/models?limit=1")).json();
    assert_eq!(page["models"].as_array().unwrap().len(), 1, "{page}");
    let token = page["nextPageToken"]
        .as_str()
        .expect("next page")
        .to_string();
    let rest = get(&m(&format!("/models?limit=10&next_page_token={token}"))).json();
    let names: Vec<&str> = rest["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["modelName"].as_str().unwrap())
        .collect();
    assert!(
        !names.is_empty() && !names.contains(&page["models"][0]["modelName"].as_str().unwrap())
    );

    // Describe: an array of versions with their workers.
    let d = get(&m("/models/ex2")).json();
    assert_eq!(d[0]["modelName"], "ex2");
    assert_eq!(d[0]["modelVersion"], "1");
    assert_eq!(d[0]["workers"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(
        get(&m("/models/ex2/all")).json().as_array().unwrap().len(),
        1
    );
    assert_eq!(get(&m("/models/ex2/1")).json()[0]["modelVersion"], "1");
    assert_eq!(get(&m("/models/ex2/7")).status, 404);

    // Scale workers: synchronous (200, done on return), then not (202, done soon).
    let r = call(
        "PUT",
        &m("/models/ex2?min_worker=2&max_worker=2&synchronous=true"),
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        get(&m("/models/ex2")).json()[0]["workers"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(get(&server.url("/models/ex2")).json()["maxWorkers"], 2);
    let r = call("PUT", &m("/models/ex2?max_worker=3"), &[], None);
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(wait_until(Duration::from_secs(30), || {
        get(&m("/models/ex2")).json()[0]["workers"]
            .as_array()
            .map(|w| w.len())
            == Some(3)
    }));
    assert_eq!(
        post_json(&server.url("/predictions/ex2"), &body).status,
        200
    );
    let r = call(
        "PUT",
        &m("/models/ex2?min_worker=3&max_worker=1"),
        &[],
        None,
    );
    assert_eq!(r.status, 400);
    let r = call(
        "PUT",
        &m("/models/ex2?max_worker=1000&synchronous=true"),
        &[],
        None,
    );
    assert_eq!(r.status, 400);

    // Uploaded versions: set-default and unregister one version.
    let archive = std::fs::read(store.path().join("example.tar.gz")).unwrap();
    for v in ["1", "2"] {
        let r = post(
            &server.url(&format!("/models/vers/versions/{v}")),
            &[("content-type", "application/gzip")],
            &archive,
        );
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let r = call("PUT", &m("/models/vers/2/set-default"), &[], None);
    assert_eq!(r.status, 200, "{}", r.text());
    let d = get(&m("/models/vers")).json();
    assert_eq!(
        (d[0]["modelVersion"].as_str(), d[0]["isDefault"].as_bool()),
        (Some("2"), Some(true)),
        "{d}"
    );
    assert_eq!(
        get(&m("/models/vers/all")).json().as_array().unwrap().len(),
        2
    );
    assert_eq!(call("DELETE", &m("/models/vers/1"), &[], None).status, 200);
    assert_eq!(
        get(&m("/models/vers/all")).json().as_array().unwrap().len(),
        1
    );

    // Unregister a registered model's version, and a whole model.
    assert_eq!(call("DELETE", &m("/models/ex2/1"), &[], None).status, 200);
    assert_eq!(get(&m("/models/ex2")).status, 404);
    assert_eq!(call("DELETE", &m("/models/lazy"), &[], None).status, 200);
    assert_eq!(get(&m("/models/lazy")).status, 404);
    // The main port keeps its SageMaker shapes.
    assert_eq!(get(&server.url("/models/vers")).json()["modelName"], "vers");
}

/// The API description at /openapi.json drives schemathesis (PyPI) against the running server:
/// every documented operation, generated inputs (coverage, fuzzing and stateful phases), and
/// not one 5xx. Path names point at a real model so requests reach handlers and models.
#[test]
fn openapi_description_survives_schemathesis() {
    let store = tempfile::tempdir().unwrap();
    example_archive(store.path(), "example", "example/model.pt");
    let dir = tempfile::tempdir().unwrap();
    oip_archive(dir.path(), store.path());
    let mut server = Server::start(store.path(), &[]);
    let doc = get(&server.url("/openapi.json"));
    assert_eq!(doc.status, 200);
    let paths = doc.json()["paths"].as_object().unwrap().len();
    assert!(paths >= 18, "{paths} paths described");
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(&config, "[parameters]\n\"path.name\" = \"example\"\n").unwrap();
    run_checked(
        &server,
        Command::new(python())
            .args(["-m", "schemathesis.cli", "--config-file"])
            .arg(&config)
            .args(["run", &server.url("/openapi.json")])
            .args([
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "30",
                "--seed",
                "1",
            ])
            .args(["--report", "junit", "--report-dir"])
            .arg(dir.path())
            .current_dir(dir.path()),
        "passed",
    );
    assert!(server.is_alive(), "the server died under schemathesis");
    assert_eq!(get(&server.url("/v2/health/ready")).status, 200);
}

/// An OIP response that would be over --max-response-mib is refused before it is encoded: as
/// JSON text (up to 16 characters per FP32 value) the outputs do not fit, as binary they do.
#[test]
fn oip_responses_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    oip_archive(dir.path(), store.path());
    let server = Server::start(store.path(), &["--max-response-mib", "1"]);
    let rows = 20_000usize; // y: 20000 x 4 FP32 = 320 KB binary, over 1 MiB as JSON text
    let request = |binary: bool| {
        json!({
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [rows, 4], "data": vec![0.5f32; rows * 4]},
                {"name": "img", "datatype": "UINT8", "shape": [1, 1, 1], "data": [7]},
                {"name": "ids", "datatype": "INT64", "shape": [1, 1], "data": [41]},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": binary}}],
        })
    };
    let r = post_json(&server.url("/v2/models/oip/infer"), &request(false));
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("binary"), "{}", r.text());
    let r = post_json(&server.url("/v2/models/oip/infer"), &request(true));
    assert_eq!(r.status, 200, "{}", r.text());
    let header: usize = r
        .header("inference-header-content-length")
        .expect("binary response")
        .parse()
        .unwrap();
    let bytes = r.body.len() - header;
    assert_eq!(bytes, rows * 4 * 4);
    let y = f32::from_le_bytes(r.body[header..header + 4].try_into().unwrap());
    assert_eq!(y, 2.0);
}
