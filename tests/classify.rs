//! The image classifier of the TorchServe comparison (tiny network, CPU): its answers equal the
//! baseline's Python ones, batched requests get the same bytes as requests run alone, and bad
//! input gets clear 400s.
mod support;

use base64::Engine;
use serde_json::json;
use std::process::Command;
use support::*;

fn config() -> String {
    std::fs::read_to_string(workspace().join("models/classify/model-config.yaml")).unwrap()
}

/// A store with `classify.tar.gz` packed from `config`.
fn store_with(config: &str) -> tempfile::TempDir {
    let store = tempfile::tempdir().unwrap();
    let (ok, err) = pack_archive(
        &store.path().join("classify.tar.gz"),
        config,
        &[artifact("classify/tiny.pt")],
        &artifact("handlers/classify.wasm"),
        &[],
    );
    assert!(ok, "{err}");
    store
}

/// Distinct 224x224 photos as the seed's JSON requests.
fn requests(n: u64) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            let px = noise(224 * 224 * 3, 40 + i);
            json!({ "image": B64.encode(png_rgb(224, 224, &px)) })
        })
        .collect()
}

/// The baseline's answers (models/classify/reference.py: eager network, PIL, softmax).
fn reference(reqs: &[serde_json::Value]) -> Vec<serde_json::Value> {
    let script = workspace().join("models/classify/reference.py");
    let answers = python_json(&[script.to_str().unwrap(), "--arch", "tiny"], &json!(reqs));
    serde_json::from_value(answers).unwrap()
}

/// A 200 whose top-1 class is the reference's and whose score is within `tolerance` of it.
fn assert_answers(reply: &Reply, want: &serde_json::Value, tolerance: f64, what: &str) {
    assert_eq!(reply.status, 200, "{what}: {}", reply.text());
    let got = reply.json();
    assert_eq!(got["top1"], want["top1"], "{what}: {got} vs {want}");
    let (a, b) = (
        got["score"].as_f64().unwrap(),
        want["score"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < tolerance, "{what}: {got} vs {want}");
}

#[test]
fn answers_equal_the_torchserve_baselines() {
    let store = store_with(&config());
    let server = Server::start(store.path(), &[]);
    let reqs = requests(4);
    let want = reference(&reqs);
    for (req, want) in reqs.iter().zip(&want) {
        let reply = post_json(&server.url("/predictions/classify"), req);
        assert_answers(&reply, want, 1e-6, "as exported");
    }
}

/// `tessera.optimize`: the host freezes the model (and optimises it for inference) at load;
/// the answers stay the baseline's, within float rounding.
#[test]
fn optimized_models_answer_as_the_baseline() {
    let reqs = requests(3);
    let want = reference(&reqs);
    for how in ["freeze", "inference"] {
        let config = config().replace(
            "  batchable: true\n",
            &format!("  batchable: true\n  optimize: {how}\n"),
        );
        assert!(config.contains("optimize"), "{config}");
        let store = store_with(&config);
        let server = Server::start(store.path(), &[]);
        let url = server.url("/predictions/classify");
        let mut first = Vec::new();
        for (req, want) in reqs.iter().zip(&want) {
            let reply = post_json(&url, req);
            assert_answers(&reply, want, 1e-5, how);
            first.push(reply.body);
        }
        // A frozen module was saved at its first load and a reload reads it back
        // (`inference` is applied again on each load); either way a reload answers the same.
        let saved = |log: &str| log.contains("saved for the next loads");
        assert_eq!(
            saved(&server.log()),
            how == "freeze",
            "{how}: {}",
            server.log()
        );
        assert_eq!(delete(&server.url("/models/classify")).status, 200);
        for (req, first) in reqs.iter().zip(&first) {
            let reply = post_json(&url, req);
            assert_eq!(&reply.body, first, "{how}: answer after a reload");
        }
        let log = server.log();
        assert_eq!(
            log.contains("optimised model loaded as saved"),
            how == "freeze",
            "{how}: {log}"
        );
        assert!(!log.contains("does not load"), "{how}: {log}");
    }
}

#[test]
fn concurrent_requests_get_the_same_bytes_batched_as_alone() {
    let reqs = requests(8);
    // Batches of up to 8, waiting long enough (200 ms) for concurrent requests to meet.
    let batched = store_with(&config().replace("maxBatchDelay: 5", "maxBatchDelay: 200"));
    let server = Server::start(batched.path(), &[]);
    let url = server.url("/predictions/classify");
    assert_eq!(post_json(&url, &reqs[0]).status, 200); // loaded
    let (replies, sizes) = post_all_at_once(&url, &reqs.iter().collect::<Vec<_>>());
    assert!(
        sizes.iter().any(|&n| n > 1),
        "no request was batched: {sizes:?}"
    );
    // The batch-size histogram counts every request (the load's included) and their sizes.
    let metrics = get(&server.url("/metrics")).text();
    let metric = |name: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(name)
                    && l.contains(r#"model="classify",tenant="default",version="1""#)
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!(metric("tessera_batch_size_count"), Some(9.0), "{metrics}");
    let sum: usize = 1 + sizes.iter().sum::<usize>();
    assert_eq!(
        metric("tessera_batch_size_sum"),
        Some(sum as f64),
        "{metrics}"
    );
    let alone = store_with(&config().replace("batchSize: 8", "batchSize: 1"));
    let single = Server::start(alone.path(), &[]);
    for (req, batched) in reqs.iter().zip(&replies) {
        let reply = post_json(&single.url("/predictions/classify"), req);
        assert_eq!(reply.header("x-batch-size"), Some("1"));
        assert_eq!(
            reply.body, batched.body,
            "batched answer differs from alone"
        );
    }
}

#[test]
fn bad_requests_get_clear_400s_and_leave_the_batch() {
    let store = store_with(&config());
    let server = Server::start(store.path(), &[]);
    let url = server.url("/predictions/classify");
    let small = B64.encode(png_rgb(100, 80, &noise(100 * 80 * 3, 1)));
    for (body, text) in [
        (
            json!({ "image": small }),
            "expected a 224x224 image, got 100x80",
        ),
        (json!({ "image": "not base64!" }), "base64"),
        (json!({ "picture": "x" }), "expected a JSON object"),
        (json!(["image"]), "expected a JSON object"),
    ] {
        let reply = post_json(&url, &body);
        assert_eq!(reply.status, 400, "{body}: {}", reply.text());
        assert!(reply.text().contains(text), "{}", reply.text());
    }
    let reply = post(
        &url,
        &[("content-type", "application/json")],
        b"{\"image\": ",
    );
    assert_eq!(reply.status, 400, "{}", reply.text());
    // Good and bad requests at once: the bad ones fail alone, the good ones are answered.
    let good = requests(3);
    let bad = json!({ "image": small });
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for r in &good {
            let (url, bad) = (&url, &bad);
            handles.push(s.spawn(move || post_json(url, r)));
            handles.push(s.spawn(move || post_json(url, bad)));
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 400, 200, 400, 200, 400]);
}

/// A model that declares `batchable` but returns an output that is not batched (`top1` summed
/// over the batch): the batched forward cannot be split back, so its requests run one by one
/// and each still gets its own, right answer.
#[test]
fn a_batch_that_cannot_be_split_runs_its_requests_alone() {
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("odd.pt");
    let code = format!(
        "import sys, torch; sys.path.insert(0, {classify:?}); from classify import classifier\n\
         class Odd(torch.nn.Module):\n    def __init__(self):\n        super().__init__(); self.m = classifier('tiny')\n    \
         def forward(self, image):\n        score, top1 = self.m(image)\n        return score, top1.sum().reshape(1)\n\
         torch.jit.trace(Odd().eval(), torch.zeros(2, 224, 224, 3, dtype=torch.uint8)).save({odd:?})\n",
        classify = workspace().join("models/classify").to_str().unwrap(),
        odd = odd.to_str().unwrap(),
    );
    let status = Command::new(python()).args(["-c", &code]).status().unwrap();
    assert!(status.success());
    let store = tempfile::tempdir().unwrap();
    let (ok, err) = pack_archive(
        &store.path().join("classify.tar.gz"),
        &config().replace("maxBatchDelay: 5", "maxBatchDelay: 200"),
        &[odd],
        &artifact("handlers/classify.wasm"),
        &[],
    );
    assert!(ok, "{err}");
    let server = Server::start(store.path(), &[]);
    let url = server.url("/predictions/classify");
    let reqs = requests(6);
    let want = reference(&reqs);
    assert_eq!(post_json(&url, &reqs[0]).status, 200); // loaded
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = reqs
            .iter()
            .map(|r| {
                let url = &url;
                s.spawn(move || post_json(url, r))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (reply, want) in replies.iter().zip(&want) {
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["top1"], want["top1"]);
        assert_eq!(
            reply.header("x-batch-size"),
            Some("1"),
            "ran alone in the end"
        );
    }
    assert!(server.wait_log(
        "batched forward failed; running its requests one by one",
        std::time::Duration::from_secs(5)
    ));
    assert!(server.log().contains("not batched along dimension 0"));
}
