//! End-to-end tests: a real `tessera serve` on loopback, archives built by `tessera pack`,
//! requests over HTTP. Artifacts (handler components, exported TorchScript) come from
//! `scripts/test.sh`.
mod support;

use base64::Engine;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use support::*;

const EXAMPLE_CONFIG: &str =
    "minWorkers: 1\nmaxWorkers: 2\nbatchSize: 1\nmaxBatchDelay: 100\nresponseTimeout: 30\n\
tessera:\n  model: model.pt\nhandler:\n  max_pixels: 1000000\n";

fn example_store(dir: &Path) {
    pack(
        dir,
        "example",
        EXAMPLE_CONFIG,
        &artifact("example/model.pt"),
        &artifact("handlers/example.wasm"),
    );
}

fn example_request(w: u32, h: u32, seed: u64, gen_args: serde_json::Value) -> serde_json::Value {
    let png = png_rgb(w, h, &noise((w * h * 3) as usize, seed));
    json!({ "image": B64.encode(png), "gen_args": gen_args })
}

/// Runs the Python reference pipeline on the same TorchScript file and request.
fn reference_pixels(model: &Path, request: &serde_json::Value) -> (Vec<usize>, Vec<u8>) {
    let mut child = Command::new(python())
        .arg(workspace().join("models/example/reference.py"))
        .arg(model)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run python reference");
    serde_json::to_writer(child.stdin.take().unwrap(), request).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "reference failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let shape = v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    (shape, B64.decode(v["pixels"].as_str().unwrap()).unwrap())
}

fn response_pixels(reply: &Reply) -> (u32, u32, Vec<u8>) {
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    let png = B64
        .decode(body["generated_image"].as_str().expect("generated_image"))
        .unwrap();
    decode_png(&png)
}

#[test]
fn output_matches_python_reference_through_every_api() {
    let store = tempfile::tempdir().unwrap();
    example_store(store.path());
    let server = Server::start(store.path(), &[]);
    // gen_args as a JSON string, the way the seed's clients send it.
    let request = example_request(37, 23, 7, json!("{\"strength\": 0.75}"));
    let (shape, want) = reference_pixels(&artifact("example/model.pt"), &request);
    assert_eq!(shape, vec![23, 37, 3]);

    let body = serde_json::to_vec(&request).unwrap();
    let json_ct = ("content-type", "application/json");
    let replies = [
        (
            "torchserve",
            post(&server.url("/predictions/example"), &[json_ct], &body),
        ),
        (
            "sagemaker invoke",
            post(&server.url("/models/example/invoke"), &[json_ct], &body),
        ),
        (
            "sagemaker invocations",
            post(
                &server.url("/invocations"),
                &[
                    json_ct,
                    ("X-Amzn-SageMaker-Target-Model", "/example.tar.gz"),
                ],
                &body,
            ),
        ),
    ];
    for (api, reply) in &replies {
        let (w, h, got) = response_pixels(reply);
        assert_eq!((w, h), (37, 23), "{api}");
        let max_diff = max_abs_diff(&got, &want);
        assert_eq!(
            max_diff, 0,
            "{api}: output differs from the Python reference by up to {max_diff}"
        );
        assert!(reply.header("x-request-id").is_some());
        assert!(reply.header("x-inference-time").is_some());
    }
    // Only the first request loaded the model.
    let loads = replies
        .iter()
        .filter(|(_, r)| r.header("x-model-load-time").is_some())
        .count();
    assert_eq!(loads, 1);
    let listed = get(&server.url("/models")).json();
    assert_eq!(listed["models"][0]["modelName"], "example");
    assert_eq!(listed["models"][0]["state"], "Loaded");
    assert_eq!(get(&server.url("/ping")).status, 200);
}

/// A handler built against the previous contract (0.1.0, before host imaging) is served
/// unchanged: the example handler compiled both ways answers the same bytes.
#[test]
fn handlers_built_against_the_previous_contract_still_run() {
    let store = tempfile::tempdir().unwrap();
    example_store(store.path());
    pack(
        store.path(),
        "example-old",
        EXAMPLE_CONFIG,
        &artifact("example/model.pt"),
        &artifact("handlers/example-v0-1.wasm"),
    );
    let server = Server::start(store.path(), &[]);
    let requests = [
        example_request(37, 23, 7, json!({"strength": 0.5})),
        example_request(16, 9, 8, json!({"output_format": "jpeg"})),
        example_request(8, 8, 9, json!({"strength": 2.0})),
        example_request(1001, 1000, 9, json!({})),
        json!({"image": "not base64!"}),
    ];
    let mut statuses = Vec::new();
    for request in &requests {
        let new = post_json(&server.url("/predictions/example"), request);
        let old = post_json(&server.url("/predictions/example-old"), request);
        assert_eq!(old.status, new.status, "{}", old.text());
        assert_eq!(old.body, new.body);
        statuses.push(new.status);
    }
    assert_eq!(statuses, [200, 200, 400, 413, 400]);
}

/// The Python and JavaScript template handlers (guest-handlers/{python,js}/template) serve
/// the example model as the Rust handler does.
#[test]
fn the_python_and_javascript_templates_serve_the_example_model() {
    let store = tempfile::tempdir().unwrap();
    example_store(store.path());
    for lang in ["py", "js"] {
        pack(
            store.path(),
            &format!("template-{lang}"),
            EXAMPLE_CONFIG,
            &artifact("example/model.pt"),
            &artifact(&format!("handlers/template-{lang}.wasm")),
        );
    }
    let server = Server::start(store.path(), &[]);
    let rust = example_request(37, 23, 7, json!({"strength": 0.25}));
    let template = json!({"image": rust["image"], "strength": 0.25});
    let want = post_json(&server.url("/predictions/example"), &rust);
    assert_eq!(want.status, 200, "{}", want.text());
    let oversize = example_request(1001, 1000, 1, json!({}));
    for lang in ["py", "js"] {
        let url = server.url(&format!("/predictions/template-{lang}"));
        let got = post_json(&url, &template);
        assert_eq!(got.status, 200, "{lang}: {}", got.text());
        assert_eq!(got.json(), want.json(), "{lang}");
        let missing = post_json(&url, &json!({"strength": 0.5}));
        assert_eq!(missing.status, 400, "{lang}: {}", missing.text());
        let weak = post_json(&url, &json!({"image": rust["image"], "strength": 3}));
        assert_eq!(weak.status, 400, "{lang}: {}", weak.text());
        let big = post_json(&url, &oversize);
        assert_eq!(big.status, 413, "{lang}: {}", big.text());
    }
}

/// Packs the example's `model-large.pt` with its handler under each of `names` in `store`;
/// returns the model file's size.
fn pack_large_examples(store: &Path, names: &[&str]) -> u64 {
    let model = artifact("example/model-large.pt");
    for name in names {
        pack(
            store,
            name,
            EXAMPLE_CONFIG,
            &model,
            &artifact("handlers/example.wasm"),
        );
    }
    std::fs::metadata(&model).unwrap().len()
}

/// A model reloaded from the unpacked files on disk loads through its unified copy (written in
/// the background after the first load, in the server's own folder of the unpacked archive) and
/// answers the same bytes; a copy whose source changed is not used. The copy's size floor is
/// lowered to 0 here (by default only files of 64 MiB or more are copied).
#[test]
fn a_reload_from_disk_reads_the_unified_copy() {
    let store = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let size = pack_large_examples(store.path(), &["a", "b"]);
    // Room for one model on the device, none in host memory: every switch reloads from disk.
    let mib = ((size * 3 / 2) >> 20).to_string();
    let server = Server::launch(
        store.path(),
        &["--memory-budget-mib", &mib, "--host-memory-budget-mib", "0"],
        Launch {
            work_dir: Some(work.path().to_path_buf()),
            env: vec![("TESSERA_UNIFIED_COPY_MIN_BYTES", "0".into())],
            ..Launch::default()
        },
    );
    let request = example_request(24, 16, 5, json!({"strength": 0.5}));
    let call = |name: &str| {
        let r = post_json(&server.url(&format!("/predictions/{name}")), &request);
        assert_eq!(r.status, 200, "{}", r.text());
        r
    };
    let copies = || {
        let mut found = Vec::new();
        let mut stack = vec![work.path().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.to_string_lossy().ends_with(".pt.unified") {
                    found.push(p);
                }
            }
        }
        found
    };
    let first = call("a");
    assert_eq!(first.header("x-model-tier"), Some("store"));
    assert!(
        wait_until(Duration::from_secs(120), || copies().len() == 1),
        "no copy of a's model written: {:?}\n{}",
        copies(),
        server.log()
    );
    let copy = copies().remove(0);
    assert_eq!(
        copy.parent().unwrap().file_name().unwrap(),
        std::ffi::OsStr::new(".optimized"),
        "{copy:?}"
    );
    call("b");
    let back = call("a");
    assert_eq!(back.header("x-model-tier"), Some("disk"));
    assert_eq!(back.body, first.body, "output changed through the copy");
    assert_eq!(
        server
            .log()
            .matches("TorchScript loaded from its unified copy")
            .count(),
        1,
        "{}",
        server.log()
    );
    // The source rewritten in place (a new modification time): the copy is stale, not used.
    let name = copy
        .file_name()
        .unwrap()
        .to_string_lossy()
        .replace(".unified", "");
    let source = copy.parent().unwrap().parent().unwrap().join(name);
    let bytes = std::fs::read(&source).unwrap();
    std::fs::write(&source, &bytes).unwrap();
    call("b");
    let again = call("a");
    assert_eq!(again.body, first.body);
    assert!(
        server.log().contains("unified copy is stale"),
        "{}",
        server.log()
    );
}

/// The host-memory tier: a model evicted from the device keeps its weights in host memory and
/// comes back with one copy (a swap, not a load) giving the same bytes; concurrent requests
/// share one swap-in; when the tier is full the model in it longest goes, and comes back from
/// disk; an unloaded model leaves the tier too. On the CPU the tier's page-locking is off (the
/// device is host memory), so this is the mechanism and the bookkeeping; the GPU path is timed by
/// bench/residency_gpu.py.
#[test]
fn evicted_models_wait_in_host_memory_and_come_back_with_one_copy() {
    let store = tempfile::tempdir().unwrap();
    let size = pack_large_examples(store.path(), &["a", "b", "c"]);
    // Room for one model on the device and one in host memory.
    let mib = ((size * 3 / 2) >> 20).to_string();
    let server = Server::start(
        store.path(),
        &[
            "--memory-budget-mib",
            &mib,
            "--host-memory-budget-mib",
            &mib,
        ],
    );
    let request = example_request(24, 16, 5, json!({"strength": 0.5}));
    let call = |name: &str| post_json(&server.url(&format!("/predictions/{name}")), &request);
    let tier = |reply: &Reply| reply.header("x-model-tier").unwrap_or("none").to_string();
    let counter = |family: &str, name: &str, extra: &str| -> u64 {
        metric(&server, family, &[&format!("model=\"{name}\""), extra]).unwrap_or(0.0) as u64
    };
    let described = |name: &str| get(&server.url(&format!("/models/{name}"))).json();

    let first = call("a");
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(tier(&first), "store");
    let again = call("a");
    assert_eq!(tier(&again), "cpu", "resident now");
    // b's load evicts a into host memory.
    assert_eq!(call("b").status, 200);
    let a = described("a");
    assert_eq!(a["tier"], "host", "{a}");
    assert!(a["hostBytes"].as_u64().unwrap() > size / 2, "{a}");
    assert_eq!(a["state"], "Unloaded");
    assert_eq!(counter("tessera_model_swaps_total", "a", "to-host"), 1);
    // Back with one copy: same bytes, a swap and not a load.
    let back = call("a");
    assert_eq!(back.status, 200, "{}", back.text());
    assert_eq!(tier(&back), "host");
    assert!(back.header("x-model-load-time").is_some());
    assert_eq!(back.body, first.body, "output changed across the swap");
    assert_eq!(counter("tessera_model_loads_total", "a", "ok"), 1);
    assert_eq!(counter("tessera_model_swaps_total", "a", "from-host"), 1);
    assert_eq!(described("a")["tier"], "cpu");
    assert_eq!(described("b")["tier"], "host");
    // c's load evicts a into host memory, which is full: b (in longest) goes.
    assert_eq!(call("c").status, 200);
    assert_eq!(described("a")["tier"], "host");
    assert!(described("b").get("tier").is_none(), "{}", described("b"));
    // Four requests at once for a share one swap-in.
    let bodies = vec![&request; 4];
    let (replies, _) = post_all_at_once(&server.url("/predictions/a"), &bodies);
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.body, first.body);
    }
    assert_eq!(counter("tessera_model_swaps_total", "a", "from-host"), 2);
    assert_eq!(counter("tessera_model_loads_total", "a", "ok"), 1);
    // b was pushed out of host memory: it comes back from its unpacked files on disk.
    let b = call("b");
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(tier(&b), "disk");
    assert_eq!(counter("tessera_model_loads_total", "b", "ok"), 2);
    // Unloading a model in host memory takes it out of the tier.
    assert_eq!(described("a")["tier"], "host");
    assert_eq!(delete(&server.url("/models/a")).status, 200);
    assert!(
        get(&server.url("/metrics"))
            .text()
            .lines()
            .any(|l| l.starts_with("tessera_host_tier_bytes ") && l.ends_with(" 0")),
        "the tier is empty after the unload"
    );
    // A model waiting in host memory whose archive is removed from the store goes too.
    assert_eq!(call("c").status, 200);
    assert_eq!(described("b")["tier"], "host");
    std::fs::remove_file(store.path().join("b.tar.gz")).unwrap();
    let host_bytes = || metric(&server, "tessera_host_tier_bytes", &[]).unwrap() as u64;
    assert!(
        wait_until(Duration::from_secs(20), || host_bytes() == 0),
        "still {} bytes in host memory",
        host_bytes()
    );
    let log = server.log();
    assert!(log.contains("model moved to host memory"), "{log}");
    assert!(log.contains("model swapped in from host memory"), "{log}");
    assert!(
        log.contains("its archive is gone from the store: dropped from host memory"),
        "{log}"
    );
}

/// Two models of one tenant with byte-identical weights (one file packed under two names) are
/// held once and weighed once: with a third model of other weights, all three stay resident in a
/// budget of two and a half (a load still needs room for its whole archive while it loads);
/// without sharing the same requests evict. Each shows its weights as shared, answers are
/// unchanged, and the other keeps working when one is unloaded.
#[test]
fn identical_weights_of_two_models_are_held_and_weighed_once() {
    let store = tempfile::tempdir().unwrap();
    let model = artifact("example/model-large.pt");
    let size = std::fs::metadata(&model).unwrap().len();
    for (name, file) in [
        ("a", "example/model-large.pt"),
        ("b", "example/model-large.pt"),
        ("c", "example/model-large-2.pt"),
    ] {
        pack(
            store.path(),
            name,
            EXAMPLE_CONFIG,
            &artifact(file),
            &artifact("handlers/example.wasm"),
        );
    }
    let mib = ((size * 5 / 2) >> 20).to_string();
    let request = example_request(24, 16, 5, json!({"strength": 0.5}));
    for share in ["off", "on"] {
        let server = Server::start(
            store.path(),
            &["--share-weights", share, "--memory-budget-mib", &mib],
        );
        let call = |name: &str| post_json(&server.url(&format!("/predictions/{name}")), &request);
        let described = |name: &str| get(&server.url(&format!("/models/{name}"))).json();
        let used = || metric(&server, "tessera_residency_used_bytes", &[]).unwrap() as u64;
        let a = call("a");
        assert_eq!(a.status, 200, "{}", a.text());
        let alone = used();
        let b = call("b");
        assert_eq!(b.status, 200, "{}", b.text());
        assert_eq!(b.body, a.body);
        let c = call("c");
        assert_eq!(c.status, 200, "{}", c.text());
        assert_ne!(c.body, a.body);
        let evictions: u64 = ["a", "b", "c"]
            .iter()
            .map(|n| described(n)["evictions"].as_u64().unwrap())
            .sum();
        if share == "off" {
            assert!(evictions > 0, "three copies cannot fit without sharing");
            continue;
        }
        assert_eq!(evictions, 0);
        for name in ["a", "b"] {
            let d = described(name);
            assert_eq!(d["tier"], "cpu", "{d}");
            let resident = d["residentBytes"].as_u64().unwrap();
            assert!(resident > size / 2, "{d}");
            // All but the storages under 64 KiB (biases, the 3-channel convolutions).
            let shared = d["sharedBytes"].as_u64().unwrap();
            assert!(
                shared < resident && resident - shared < resident / 20,
                "{d}"
            );
        }
        assert_eq!(described("c")["sharedBytes"], 0);
        assert!(
            used() < 2 * alone + alone / 4,
            "a and b weighed once: {} vs {alone}",
            used()
        );
        assert!(server
            .log()
            .contains("weights shared with the tenant's other resident models"));
        // a unloaded: b keeps its weights and answers as before, now holding them alone.
        assert_eq!(delete(&server.url("/models/a")).status, 200);
        let again = call("b");
        assert_eq!(again.status, 200, "{}", again.text());
        assert_eq!(again.body, a.body);
        assert_eq!(described("b")["sharedBytes"], 0);
    }
}

/// The budget is a bound: a load that does not fit while the models holding the budget are busy
/// waits for one to become idle (then evicts it), and past its time limit is refused with 507
/// instead of loading over the budget. Resident bytes never exceed the budget meanwhile.
#[test]
fn loads_wait_for_room_instead_of_going_over_the_budget() {
    let store = tempfile::tempdir().unwrap();
    let model = artifact("example/model-large.pt");
    let size = std::fs::metadata(&model).unwrap().len();
    // The chaos handler answers {"mode": "ok"} through the model; "loop" spins until the
    // model's responseTimeout (504), keeping the model busy that long.
    let config = |timeout: u32| {
        format!("maxWorkers: 1\nresponseTimeout: {timeout}\ntessera:\n  model: model.pt\n")
    };
    for (name, timeout) in [("a", 12), ("b", 12), ("patient", 60), ("hasty", 1)] {
        pack(
            store.path(),
            name,
            &config(timeout),
            &model,
            &artifact("handlers/chaos.wasm"),
        );
    }
    let budget_mib = (size * 5 / 2) >> 20;
    let budget = budget_mib << 20;
    assert!(
        budget > 2 * size && budget < 3 * size,
        "model size {size} unsuitable"
    );
    let server = Server::start(
        store.path(),
        &["--memory-budget-mib", &budget_mib.to_string()],
    );
    let call = |name: &str, mode: &str| {
        post_json(
            &server.url(&format!("/predictions/{name}")),
            &json!({ "mode": mode }),
        )
    };
    for name in ["a", "b"] {
        let reply = call(name, "ok");
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let resident = || -> u64 {
        get(&server.url("/models")).json()["models"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["residentBytes"].as_u64())
            .sum()
    };
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let most = scope.spawn(|| {
            let mut most = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                most = most.max(resident());
                std::thread::sleep(Duration::from_millis(20));
            }
            most
        });
        let busy: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|name| scope.spawn(move || call(name, "loop").status))
            .collect();
        let in_flight = || metric(&server, "tessera_requests_in_flight", &[]).unwrap_or(0.0) as u64;
        assert!(wait_until(Duration::from_secs(10), || in_flight() >= 2));
        // Both models holding the budget are busy for seconds: a model that may wait 1 s is
        // refused, one that may wait 60 s gets the room once one of them is idle.
        let hasty = call("hasty", "ok");
        assert_eq!(hasty.status, 507, "{}", hasty.text());
        assert!(
            hasty.text().contains("no room for model 'hasty'"),
            "{}",
            hasty.text()
        );
        // Unloaded while its request runs, `a` still holds its memory: the budget counts it
        // until the request ends, so the next load still waits.
        assert_eq!(delete(&server.url("/models/a")).status, 200);
        let patient = call("patient", "ok");
        assert_eq!(patient.status, 200, "{}", patient.text());
        // The seconds it waited for room count as queue time (header and metric), not load.
        let header = |name: &str| -> f64 { patient.header(name).unwrap().parse().unwrap() };
        assert!(
            header("x-queue-time") > 1000.0 && header("x-queue-time") > header("x-model-load-time"),
            "queue {} ms, load {} ms",
            header("x-queue-time"),
            header("x-model-load-time")
        );
        let queued_s = metric(
            &server,
            "tessera_queue_duration_seconds_sum",
            &["model=\"patient\""],
        )
        .unwrap_or(0.0);
        assert!(queued_s > 1.0, "queue seconds {queued_s}");
        for t in busy {
            assert_eq!(t.join().unwrap(), 504);
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let most = most.join().unwrap();
        assert!(most > size, "the watch saw no resident model: {most}");
        assert!(
            most <= budget,
            "resident {most} bytes over the budget of {budget}"
        );
    });
    assert!(
        server.log().lines().any(|l| l.contains("patient")
            && l.contains("waiting for room: the models holding the budget are busy")),
        "{}",
        server.log()
    );
}

#[test]
fn three_models_with_budget_for_two_all_succeed_and_evict() {
    let store = tempfile::tempdir().unwrap();
    let size = pack_large_examples(store.path(), &["a", "b", "c"]);
    // Budget fits two copies, not three.
    let budget_mib = (size * 5 / 2) >> 20;
    assert!(
        budget_mib * (1 << 20) > 2 * size && budget_mib * (1 << 20) < 3 * size,
        "model size {size} unsuitable"
    );
    let server = Server::start(
        store.path(),
        &["--memory-budget-mib", &budget_mib.to_string()],
    );
    let request = example_request(16, 16, 3, json!({"strength": 0.5}));
    for round in 0..3 {
        for name in ["a", "b", "c"] {
            let reply = post_json(&server.url(&format!("/predictions/{name}")), &request);
            assert_eq!(
                reply.status,
                200,
                "round {round} model {name}: {}",
                reply.text()
            );
        }
        let models = get(&server.url("/models")).json();
        let loaded = models["models"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["state"] == "Loaded")
            .count();
        assert!(
            loaded <= 2,
            "round {round}: {loaded} models resident with a budget for two: {models}"
        );
    }
    let models = get(&server.url("/models")).json();
    let evictions: u64 = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["evictions"].as_u64().unwrap())
        .sum();
    assert!(
        evictions >= 6,
        "expected an eviction per request after the first two, saw {evictions}: {models}"
    );
    let metrics = get(&server.url("/metrics")).text();
    assert!(
        metrics.contains("tessera_model_evictions_total{"),
        "{metrics}"
    );
    assert!(server.wait_log("model evicted", Duration::from_secs(5)));
}

#[test]
fn bad_requests_get_clear_4xx() {
    let store = tempfile::tempdir().unwrap();
    example_store(store.path());
    let server = Server::start(store.path(), &["--max-request-mib", "1"]);
    // The start-up banner says what is served, where and on what.
    let banner = server.stdout();
    for needle in [
        "model store",
        "1 archive(s): example",
        "device       cpu",
        "residency budget",
        server.base.as_str(),
    ] {
        assert!(
            banner.contains(needle),
            "banner lacks '{needle}':\n{banner}"
        );
    }
    let unknown = post_json(&server.url("/predictions/nope"), &json!({}));
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["code"], 404);
    assert_eq!(
        post_json(&server.url("/predictions/..%2Fetc"), &json!({})).status,
        400
    );
    assert_eq!(
        post(&server.url("/invocations"), &[], b"{}").status,
        400,
        "missing target header"
    );
    // The router's own rejections are JSON too.
    for (method, path, status) in [
        ("GET", "/models?max_results=many", 400),
        ("POST", "/models/m/versions/1?default=maybe", 400),
        ("PATCH", "/ping", 405),
        ("POST", "/predictions/%FF", 400),
    ] {
        let r = call(method, &server.url(path), &[], None);
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        assert_eq!(r.json()["code"], status, "{method} {path}: {}", r.text());
    }

    let url = server.url("/predictions/example");
    let not_json = post(&url, &[], b"\x89PNG not json");
    assert_eq!(not_json.status, 400);
    assert!(not_json.json()["error"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    let missing = post_json(&url, &json!({"gen_args": "{}"}));
    assert_eq!(missing.status, 400);
    assert!(missing.json()["error"]
        .as_str()
        .unwrap()
        .contains("missing field 'image'"));
    let not_image = post_json(&url, &json!({"image": B64.encode(b"hello, not an image")}));
    assert_eq!(not_image.status, 400);
    assert!(not_image.json()["error"]
        .as_str()
        .unwrap()
        .contains("not a PNG or JPEG"));
    let bad_arg = post_json(&url, &example_request(4, 4, 1, json!({"strength": 3})));
    assert_eq!(bad_arg.status, 400);
    // Over the model's max_pixels (1e6) → 413 from the handler, before decoding.
    let huge = post_json(&url, &example_request(1100, 1000, 1, json!({})));
    assert_eq!(huge.status, 413, "{}", huge.text());
    // Over the server's body limit → 413 from the host.
    let too_big = post(
        &url,
        &[("content-type", "application/json")],
        &vec![b' '; 2 << 20],
    );
    assert_eq!(too_big.status, 413);
    assert!(too_big.json()["error"].as_str().unwrap().contains("limit"));
    // The server still serves good requests.
    assert_eq!(
        post_json(&url, &example_request(8, 8, 2, json!({}))).status,
        200
    );
}

#[test]
fn malicious_archives_are_rejected_and_nothing_escapes() {
    let store = tempfile::tempdir().unwrap();
    example_store(store.path());
    let escape = "/tmp/tessera-absolute-escape.txt";
    let cases = hostile_archives(store.path(), EXAMPLE_CONFIG.as_bytes(), escape);
    std::fs::write(
        store.path().join("notgzip.tar.gz"),
        b"plain text, not an archive",
    )
    .unwrap();

    // The server allows 16 MiB unpacked: the bomb's 64 MiB of zeros stop at the limit.
    let server = Server::start(store.path(), &["--max-unpacked-mib", "16"]);
    let request = example_request(8, 8, 1, json!({}));
    for name in cases.into_iter().chain(["notgzip"]) {
        let reply = post_json(&server.url(&format!("/predictions/{name}")), &request);
        assert_eq!(reply.status, 422, "{name}: {}", reply.text());
        assert!(reply.json()["error"].as_str().unwrap().len() > 10, "{name}");
    }
    assert!(
        !store.path().join("escaped.txt").exists()
            && !store.path().parent().unwrap().join("escaped.txt").exists()
    );
    assert!(!Path::new(escape).exists());
    // Good models still work.
    assert_eq!(
        post_json(&server.url("/predictions/example"), &request).status,
        200
    );
}

#[test]
fn misbehaving_handlers_fail_alone() {
    let store = tempfile::tempdir().unwrap();
    example_store(store.path());
    let chaos_cfg = "maxWorkers: 4\nresponseTimeout: 2\ntessera:\n  handlerMemoryMiB: 64\n";
    pack(
        store.path(),
        "chaos",
        chaos_cfg,
        &artifact("example/model.pt"),
        &artifact("handlers/chaos.wasm"),
    );
    let server = Server::start(store.path(), &["--max-response-mib", "16"]);
    let chaos = server.url("/predictions/chaos");
    let good = example_request(8, 8, 5, json!({}));

    // A handler looping forever is cut off at responseTimeout while others keep being served.
    let looping = {
        let url = chaos.clone();
        std::thread::spawn(move || post_json(&url, &json!({"mode": "loop"})))
    };
    for _ in 0..3 {
        assert_eq!(
            post_json(&server.url("/predictions/example"), &good).status,
            200
        );
    }
    let reply = looping.join().unwrap();
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert!(reply.json()["error"]
        .as_str()
        .unwrap()
        .contains("time limit"));

    let expect = [
        ("hog", 500, "memory limit"),
        // Images the host holds for a handler count against its memory limit too.
        ("image-hog", 500, "memory limit"),
        ("image-stage", 500, "staged under that name"),
        ("image-stretch", 413, "goes through 40000000000 pixels"),
        ("image-loop", 504, "time limit"),
        ("stack", 500, ""),
        ("trap", 500, "trapped"),
        ("big", 500, "exceeds the limit"),
        ("escape", 400, "must be relative"),
    ];
    for (mode, status, text) in expect {
        let reply = post_json(&chaos, &json!({"mode": mode}));
        assert_eq!(reply.status, status, "{mode}: {}", reply.text());
        assert!(
            reply.json()["error"].as_str().unwrap().contains(text),
            "{mode}: {}",
            reply.text()
        );
    }
    // Log flooding is cut at the per-call limit; the request itself succeeds.
    let flood = post_json(&chaos, &json!({"mode": "log"}));
    assert_eq!(flood.status, 200, "{}", flood.text());
    assert!(
        server.wait_log("dropped 99800 log lines", Duration::from_secs(5)),
        "{}",
        server.log()
    );
    assert_eq!(post_json(&chaos, &json!({"mode": "ok"})).status, 200);
    assert_eq!(
        post_json(&server.url("/predictions/example"), &good).status,
        200
    );
}

#[test]
fn full_queue_answers_429() {
    let store = tempfile::tempdir().unwrap();
    pack(
        store.path(),
        "chaos",
        "maxWorkers: 1\nresponseTimeout: 3\n",
        &artifact("example/model.pt"),
        &artifact("handlers/chaos.wasm"),
    );
    let server = Server::start(store.path(), &["--max-queue", "0"]);
    let url = server.url("/predictions/chaos");
    assert_eq!(
        post_json(&url, &json!({"mode": "ok"})).status,
        200,
        "load first"
    );
    // The first request's slot is given back after its response is written: a request sent
    // the moment the response arrives can still find the queue full.
    assert!(wait_until(Duration::from_secs(10), || get(
        &server.url("/models/chaos")
    )
    .json()["inFlight"]
        == 0));
    let busy = {
        let url = url.clone();
        std::thread::spawn(move || post_json(&url, &json!({"mode": "loop"})))
    };
    assert!(wait_until(Duration::from_secs(10), || get(
        &server.url("/models/chaos")
    )
    .json()["inFlight"]
        == 1));
    let rejected = post_json(&url, &json!({"mode": "ok"}));
    assert_eq!(rejected.status, 429, "{}", rejected.text());
    assert_eq!(busy.join().unwrap().status, 504);
    assert_eq!(post_json(&url, &json!({"mode": "ok"})).status, 200);
}

#[test]
fn sagemaker_management_api() {
    let store = tempfile::tempdir().unwrap();
    example_store(store.path());
    pack(
        store.path(),
        "large",
        EXAMPLE_CONFIG,
        &artifact("example/model-large.pt"),
        &artifact("handlers/example.wasm"),
    );
    let server = Server::start(store.path(), &["--memory-budget-mib", "1"]);
    let models = server.url("/models");
    let load = |name: &str, url: &str| post_json(&models, &json!({"model_name": name, "url": url}));
    assert_eq!(load("first", "example.tar.gz").status, 200);
    assert_eq!(load("first", "example.tar.gz").status, 409);
    let abs = format!("file://{}", store.path().join("example.tar.gz").display());
    assert_eq!(load("second", &abs).status, 200);
    assert_eq!(load("third", "/etc/passwd").status, 400);
    assert_eq!(load("bad/name", "example.tar.gz").status, 400);
    assert_eq!(load("missing", "nothere.tar.gz").status, 404);
    let too_big = load("big", "large.tar.gz");
    assert_eq!(too_big.status, 507, "{}", too_big.text());
    assert_eq!(
        get(&server.url("/models/big")).status,
        404,
        "a model that did not fit is not registered"
    );

    let page1 = get(&server.url("/models?max_results=1")).json();
    assert_eq!(page1["models"].as_array().unwrap().len(), 1);
    let token = page1["nextPageToken"]
        .as_str()
        .expect("a second page")
        .to_string();
    let page2 = get(&server.url(&format!("/models?max_results=1&next_page_token={token}"))).json();
    assert_eq!(page2["models"][0]["modelName"], "second");
    assert!(page2.get("nextPageToken").is_none());

    let described = get(&server.url("/models/first")).json();
    assert_eq!(described["modelName"], "first");
    assert_eq!(described["device"], "cpu");
    assert!(described["residentBytes"].as_u64().unwrap() > 0);
    let request = example_request(8, 8, 9, json!({}));
    assert_eq!(
        post_json(&server.url("/models/first/invoke"), &request).status,
        200
    );
    let counted = |text: &str| {
        text.lines()
            .any(|l| l.starts_with("tessera_requests_total{") && l.contains("model=\"first\""))
    };
    assert!(counted(&get(&server.url("/metrics")).text()));
    assert_eq!(delete(&server.url("/models/first")).status, 200);
    assert_eq!(get(&server.url("/models/first")).status, 404);
    assert_eq!(delete(&server.url("/models/first")).status, 404);
    // An unloaded model's series go with it (churn cannot grow the metric set).
    assert!(!counted(&get(&server.url("/metrics")).text()));
}

#[test]
fn pack_rejects_what_it_cannot_serve() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, EXAMPLE_CONFIG).unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"\0asm\x01\0\0\0").unwrap();
    let run = |handler: &Path, model: &Path, out: &str| {
        Command::new(BIN)
            .args(["pack", "--config"])
            .arg(&cfg)
            .arg("--model")
            .arg(model)
            .arg("--handler")
            .arg(handler)
            .arg("--output")
            .arg(dir.path().join(out))
            .output()
            .unwrap()
    };
    let core = run(&junk, &artifact("example/model.pt"), "x.tar.gz");
    assert!(!core.status.success());
    assert!(String::from_utf8_lossy(&core.stderr).contains("not a component"));
    let bad_model = run(&artifact("handlers/example.wasm"), &cfg, "y.tar.gz");
    assert!(!bad_model.status.success());
    let bad_name = run(
        &artifact("handlers/example.wasm"),
        &artifact("example/model.pt"),
        "no good.tar.gz",
    );
    assert!(!bad_name.status.success());
    assert!(!dir.path().join("x.tar.gz").exists() && !dir.path().join("y.tar.gz").exists());
}

#[test]
fn concurrent_first_requests_share_one_load() {
    let store = tempfile::tempdir().unwrap();
    pack(
        store.path(),
        "shared",
        EXAMPLE_CONFIG,
        &artifact("example/model-large.pt"),
        &artifact("handlers/example.wasm"),
    );
    let server = Server::start(store.path(), &[]);
    let request = example_request(16, 16, 4, json!({}));
    let url = server.url("/predictions/shared");
    let replies: Vec<Reply> = (0..4)
        .map(|_| {
            let (url, request) = (url.clone(), request.clone());
            std::thread::spawn(move || post_json(&url, &request))
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let metrics = get(&server.url("/metrics")).text();
    let loads = metrics
        .lines()
        .find(|l| {
            l.starts_with("tessera_model_loads_total{")
                && l.contains("model=\"shared\"")
                && l.contains("tenant=\"default\"")
                && l.contains("version=\"1\"")
                && l.contains("outcome=\"ok\"")
        })
        .expect("load counter");
    assert!(loads.ends_with(" 1"), "expected one load: {loads}");
    assert!(wait_until(Duration::from_secs(5), || server
        .log()
        .matches("model loaded")
        .count()
        == 1));
}

#[test]
fn out_of_memory_evicts_idle_models_then_answers_507() {
    let store = tempfile::tempdir().unwrap();
    example_store(store.path());
    pack(
        store.path(),
        "oom",
        "maxWorkers: 1\n",
        &artifact("example/model-oom.pt"),
        &artifact("handlers/chaos.wasm"),
    );
    let server = Server::start(store.path(), &[]);
    assert_eq!(
        post_json(
            &server.url("/predictions/example"),
            &example_request(8, 8, 1, json!({}))
        )
        .status,
        200
    );
    let reply = post_json(&server.url("/predictions/oom"), &json!({"mode": "ok"}));
    assert_eq!(reply.status, 507, "{}", reply.text());
    assert!(
        reply.json()["error"]
            .as_str()
            .unwrap()
            .contains("insufficient memory"),
        "{}",
        reply.text()
    );
    // The idle model was evicted first, to try to make room.
    assert!(
        server.wait_log("reason=\"out-of-memory\"", Duration::from_secs(5)),
        "{}",
        server.log()
    );
    let example = get(&server.url("/models/example")).json();
    assert_eq!(example["state"], "Unloaded");
    // Everything still works afterwards.
    assert_eq!(
        post_json(
            &server.url("/predictions/example"),
            &example_request(8, 8, 1, json!({}))
        )
        .status,
        200
    );
}

/// Packs the example model with `tessera.warmup` naming `warmup.json`, shipped as an asset with
/// `body` (not shipped when `None`); returns whether pack succeeded and its stderr.
fn pack_with_warmup(store: &Path, name: &str, body: Option<&[u8]>, times: u32) -> (bool, String) {
    let shipped: Vec<(&str, &[u8])> = body.map(|b| ("warmup.json", b)).into_iter().collect();
    pack_with_warmups(store, name, "warmup.json", &shipped, times)
}

/// Packs the example model with `tessera.warmup.request: listed` (YAML), shipping `shipped`
/// (file name, body) as assets.
fn pack_with_warmups(
    store: &Path,
    name: &str,
    listed: &str,
    shipped: &[(&str, &[u8])],
    times: u32,
) -> (bool, String) {
    let config = format!(
        "responseTimeout: 30\ntessera:\n  model: model.pt\n  warmup:\n    request: {listed}\n    times: {times}\n"
    );
    let assets = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (file, body) in shipped {
        let f = assets.path().join(file);
        std::fs::write(&f, body).unwrap();
        files.push(f);
    }
    pack_archive(
        &store.join(format!("{name}.tar.gz")),
        &config,
        &[artifact("example/model.pt")],
        &artifact("handlers/example.wasm"),
        &files,
    )
}

/// Forwards the server has run for the default tenant's model `name`.
fn forwards(server: &Server, name: &str) -> Option<u64> {
    let label = format!("model=\"{name}\",tenant=\"default\"");
    metric(
        server,
        "tessera_inference_duration_seconds_count",
        &[&label],
    )
    .map(|v| v as u64)
}

#[test]
fn warmup_requests_run_after_a_load_before_users() {
    let store = tempfile::tempdir().unwrap();
    let good = serde_json::to_vec(&example_request(24, 16, 5, json!({"strength": 0.5}))).unwrap();
    assert!(pack_with_warmup(store.path(), "warm", Some(&good), 2).0);
    // A warm-up the handler refuses is logged; the model still serves.
    assert!(pack_with_warmup(store.path(), "cold", Some(b"{\"not\": \"a request\"}"), 1).0);
    // An archive whose warm-up file is not packed is refused at pack time.
    let (ok, err) = pack_with_warmup(store.path(), "missing", None, 1);
    assert!(
        !ok && err.contains("warmup.request 'warmup.json' is not among the packed assets"),
        "{err}"
    );

    // Several requests (of different shapes: a CUDA graph is captured for each before users
    // come), each run `times` times, in order; each listed one must be packed.
    let other = serde_json::to_vec(&example_request(40, 32, 6, json!({"strength": 0.25}))).unwrap();
    let both: [(&str, &[u8]); 2] = [("a.json", &good), ("b.json", &other)];
    assert!(pack_with_warmups(store.path(), "pair", "[a.json, b.json]", &both, 1).0);
    let (ok, err) = pack_with_warmups(store.path(), "half", "[a.json, c.json]", &both, 1);
    assert!(
        !ok && err.contains("warmup.request 'c.json' is not among the packed assets"),
        "{err}"
    );

    let server = Server::start(store.path(), &[]);
    let request = example_request(20, 12, 9, json!({"strength": 0.75}));
    let reply = post_json(&server.url("/predictions/pair"), &request);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(forwards(&server, "pair"), Some(3));
    let reply = post_json(&server.url("/predictions/warm"), &request);
    assert_eq!(reply.status, 200, "{}", reply.text());
    // The user's forward came after both warm-up forwards: three by the time it answered.
    let warm_forwards = || forwards(&server, "warm");
    assert_eq!(warm_forwards(), Some(3));
    assert!(wait_until(Duration::from_secs(5), || server
        .log()
        .matches("warm-up request done")
        .count()
        == 4));
    assert_eq!(
        post_json(&server.url("/predictions/warm"), &request).status,
        200
    );
    assert_eq!(warm_forwards(), Some(4), "warm-up ran again");

    let reply = post_json(&server.url("/predictions/cold"), &request);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(server.wait_log(
        "warm-up request failed; serving without warm-up",
        Duration::from_secs(5)
    ));
    assert!(server.log().contains("missing field 'image'"));
}

/// `POST /models` and `--preload` answer with a model already warm: its warm-up forwards have
/// run by the time they return, and no user request pays for them.
#[test]
fn loads_answer_once_the_model_is_warm() {
    let store = tempfile::tempdir().unwrap();
    let good = serde_json::to_vec(&example_request(24, 16, 5, json!({"strength": 0.5}))).unwrap();
    assert!(pack_with_warmup(store.path(), "warm", Some(&good), 2).0);

    let server = Server::start(store.path(), &[]);
    let load = post_json(
        &server.url("/models"),
        &json!({"model_name": "loaded", "url": "warm.tar.gz"}),
    );
    assert_eq!(load.status, 200, "{}", load.text());
    assert_eq!(forwards(&server, "loaded"), Some(2));
    // The log is read from the server's stderr by another thread: wait for both lines.
    assert!(wait_until(Duration::from_secs(5), || server
        .log()
        .matches("warm-up request done")
        .count()
        == 2));
    drop(server);

    let server = Server::start(store.path(), &["--preload", "warm"]);
    // The server is ready (what the test helper waits for) once the preload is warm.
    assert_eq!(forwards(&server, "warm"), Some(2));
    let request = example_request(20, 12, 9, json!({"strength": 0.75}));
    let reply = post_json(&server.url("/predictions/warm"), &request);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(
        reply.header("x-model-load-time").is_none(),
        "the request paid for a load"
    );
    assert_eq!(forwards(&server, "warm"), Some(3));
}

/// The executors give the same bytes, at sizes seen and new: the server's default
/// (`profiling`), a model asking for `simple` (graphs as exported) in its config, and a server
/// whose default is `simple`.
#[test]
fn executor_modes_give_the_same_output() {
    let store = tempfile::tempdir().unwrap();
    let model = artifact("example/model.pt");
    let handler = artifact("handlers/example.wasm");
    pack(store.path(), "plain", EXAMPLE_CONFIG, &model, &handler);
    let simple = EXAMPLE_CONFIG.replace("tessera:\n", "tessera:\n  executor: simple\n");
    pack(store.path(), "simple", &simple, &model, &handler);
    let server = Server::start(store.path(), &[]);
    let other = Server::start(store.path(), &["--torchscript-executor", "simple"]);
    for (w, h) in [(16, 16), (24, 10), (16, 16), (33, 7)] {
        let request = example_request(w, h, 5, json!({"strength": 0.7}));
        let a = post_json(&server.url("/predictions/plain"), &request);
        let b = post_json(&server.url("/predictions/simple"), &request);
        let c = post_json(&other.url("/predictions/plain"), &request);
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.body, b.body, "{w}x{h}: the simple model differs");
        assert_eq!(a.body, c.body, "{w}x{h}: the simple server differs");
    }
    assert!(server.log().contains("default_executor=Profiling"));
    assert!(other.log().contains("default_executor=Simple"));
}
