//! The adversarial suite for multi-tenancy: each case asserts the exact status, and a
//! well-behaved tenant's model is invoked in parallel the whole time and must never fail.
mod support;

use serde_json::json;
use std::path::Path;
use std::time::Duration;
use support::tenancy::*;
use support::*;

#[test]
fn authentication_is_required_and_checked() {
    let s = setup(&[]);
    let bystander = Bystander::start(s.server.base.clone());
    let server = &s.server;
    assert_eq!(get(&server.url("/ping")).status, 200, "ping needs no token");
    for path in ["/models", "/models/good", "/metrics"] {
        assert_eq!(get(&server.url(path)).status, 401, "{path} without a token");
        assert_eq!(
            authed(server, "GET", "wrong-token", path).status,
            401,
            "{path} with a wrong token"
        );
    }
    let no_token = post_json(&server.url("/predictions/good"), &image_request());
    assert_eq!(no_token.status, 401);
    assert_eq!(no_token.header("www-authenticate"), Some("Bearer"));
    let basic = post(
        &server.url("/predictions/good"),
        &[("authorization", "Basic Ym9iOmJvYg==")],
        b"{}",
    );
    assert_eq!(basic.status, 401);
    let good = archive(
        s.packs.path(),
        "x",
        "example/model.pt",
        "handlers/example.wasm",
    );
    let anon = call(
        "POST",
        &server.url("/models/x/versions/1"),
        &[],
        Some(&good),
    );
    assert_eq!(anon.status, 401);
    // Metrics name every tenant's models: admins only.
    assert_eq!(authed(server, "GET", BOB, "/metrics").status, 403);
    assert_eq!(authed(server, "GET", OPS, "/metrics").status, 200);
    bystander.finish();
}

#[test]
fn tenants_cannot_see_or_touch_each_others_models() {
    let s = setup(&[]);
    let bystander = Bystander::start(s.server.base.clone());
    let server = &s.server;
    let secret = archive(
        s.packs.path(),
        "secret",
        "example/model.pt",
        "handlers/example.wasm",
    );
    assert_eq!(upload(server, ALICE, "secret", "1", &secret).status, 201);
    assert_eq!(
        invoke(server, ALICE, "/predictions/secret", &image_request()).status,
        200
    );

    // Bob sees nothing of alice's model: every route answers as if it did not exist.
    let listed = authed(server, "GET", BOB, "/models").json();
    let names: Vec<&str> = listed["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["modelName"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["good"]);
    assert_eq!(authed(server, "GET", BOB, "/models/secret").status, 404);
    assert_eq!(
        invoke(server, BOB, "/predictions/secret", &image_request()).status,
        404
    );
    assert_eq!(
        invoke(server, BOB, "/predictions/secret/1", &image_request()).status,
        404
    );
    assert_eq!(
        invoke(server, BOB, "/models/secret/invoke", &image_request()).status,
        404
    );
    let target = bearer(BOB);
    let r = post(
        &server.url("/invocations"),
        &[
            ("authorization", target.as_str()),
            ("x-amzn-sagemaker-target-model", "/secret.tar.gz"),
        ],
        &serde_json::to_vec(&image_request()).unwrap(),
    );
    assert_eq!(r.status, 404);
    assert_eq!(authed(server, "DELETE", BOB, "/models/secret").status, 404);
    assert_eq!(
        authed(server, "DELETE", BOB, "/models/secret/versions/1").status,
        404
    );
    assert_eq!(
        authed(server, "PUT", BOB, "/models/secret/1/set-default").status,
        404
    );
    // Loading by url would reach into the shared store: refused for tenants.
    let auth = bearer(BOB);
    let by_url = post(
        &server.url("/models"),
        &[("authorization", auth.as_str())],
        &serde_json::to_vec(
            &json!({"model_name": "steal", "url": "tenants/alice/secret/1.tar.gz"}),
        )
        .unwrap(),
    );
    assert_eq!(by_url.status, 403);

    // Bob's own "secret" is his: uploading it does not overwrite alice's.
    let other = archive(
        s.packs.path(),
        "secret2",
        "example/model-large.pt",
        "handlers/example.wasm",
    );
    assert_eq!(upload(server, BOB, "secret", "1", &other).status, 201);
    let alice_out = invoke(server, ALICE, "/predictions/secret", &image_request());
    let bob_out = invoke(server, BOB, "/predictions/secret", &image_request());
    assert_eq!((alice_out.status, bob_out.status), (200, 200));
    assert_ne!(
        alice_out.body, bob_out.body,
        "each tenant is served its own archive"
    );
    // Versions are immutable: re-uploading one is a conflict, for the owner too.
    assert_eq!(upload(server, ALICE, "secret", "1", &secret).status, 409);
    assert_eq!(
        invoke(server, ALICE, "/predictions/secret", &image_request()).body,
        alice_out.body
    );
    bystander.finish();
}

#[test]
fn versions_default_and_explicit() {
    let s = setup(&[]);
    let server = &s.server;
    let v1 = archive(
        s.packs.path(),
        "v1",
        "example/model.pt",
        "handlers/example.wasm",
    );
    let v2 = archive(
        s.packs.path(),
        "v2",
        "example/model-large.pt",
        "handlers/example.wasm",
    );
    assert_eq!(upload(server, ALICE, "m", "1", &v1).json()["default"], true);
    let second = upload(server, ALICE, "m", "2", &v2);
    assert_eq!(second.status, 201);
    assert_eq!(second.json()["default"], false);
    let version_of = |path: &str| {
        invoke(server, ALICE, path, &image_request())
            .header("x-model-version")
            .map(str::to_string)
    };
    assert_eq!(version_of("/predictions/m").as_deref(), Some("1"));
    assert_eq!(version_of("/predictions/m/2").as_deref(), Some("2"));
    assert_eq!(
        authed(server, "PUT", ALICE, "/models/m/2/set-default").status,
        200
    );
    assert_eq!(version_of("/predictions/m").as_deref(), Some("2"));
    assert_eq!(version_of("/predictions/m/1").as_deref(), Some("1"));
    assert_eq!(
        authed(server, "PUT", ALICE, "/models/m/9/set-default").status,
        404
    );
    assert_eq!(
        invoke(server, ALICE, "/predictions/m/9", &image_request()).status,
        404
    );
    let described = authed(server, "GET", ALICE, "/models/m").json();
    assert_eq!(described["versions"], json!(["1", "2"]));
    assert_eq!(described["defaultVersion"], "2");
    // The default of a model with other versions stays (requests without a version need it).
    let refused = authed(server, "DELETE", ALICE, "/models/m/versions/2");
    assert_eq!(refused.status, 409, "{}", refused.text());
    assert_eq!(
        authed(server, "DELETE", ALICE, "/models/m/versions/1").status,
        200
    );
    assert_eq!(
        invoke(server, ALICE, "/predictions/m/1", &image_request()).status,
        404
    );
    assert_eq!(version_of("/predictions/m").as_deref(), Some("2"));
}

#[test]
fn hostile_names_and_archives_are_refused() {
    let s = setup(&[]);
    let bystander = Bystander::start(s.server.base.clone());
    let server = &s.server;
    let good = archive(
        s.packs.path(),
        "ok",
        "example/model.pt",
        "handlers/example.wasm",
    );
    for (name, version) in [
        ("..%2F..%2Fetc", "1"),
        ("a%2Fb", "1"),
        (".hidden", "1"),
        ("n", ".."),
        ("n", "..%2Fx"),
        ("%C3%A9", "1"),
    ] {
        let r = upload(server, ALICE, name, version, &good);
        assert_eq!(r.status, 400, "{name}/{version}: {}", r.text());
    }
    assert_eq!(
        upload(server, ALICE, &"x".repeat(129), "1", &good).status,
        400
    );

    let escape = "/tmp/tessera-tenant-escape.txt";
    for name in hostile_archives(s.packs.path(), CONFIG.as_bytes(), escape) {
        let bytes = std::fs::read(s.packs.path().join(format!("{name}.tar.gz"))).unwrap();
        let r = upload(server, ALICE, name, "1", &bytes);
        assert_eq!(r.status, 422, "{name}: {}", r.text());
        let installed = invoke(
            server,
            ALICE,
            &format!("/predictions/{name}"),
            &image_request(),
        );
        assert_eq!(installed.status, 404, "{name} was installed");
    }
    assert!(
        !s.store.path().join("escaped.txt").exists()
            && !s.store.path().join("tenants/escaped.txt").exists()
    );
    assert!(!Path::new(escape).exists());
    // Over the upload limit (6 MiB) → 413; not gzip at all → 422.
    assert_eq!(
        upload(server, ALICE, "huge", "1", &noise(7 << 20, 3)).status,
        413
    );
    assert_eq!(
        upload(server, ALICE, "plain", "1", b"just some text").status,
        422
    );
    // Nothing was left in staging.
    let staging: Vec<_> = std::fs::read_dir(s.store.path().join(".staging"))
        .unwrap()
        .collect();
    assert!(staging.is_empty(), "staging not cleaned: {staging:?}");
    bystander.finish();
}

#[test]
fn quotas_and_per_tenant_handler_limits() {
    let s = setup(&["--max-response-mib", "16"]);
    let bystander = Bystander::start(s.server.base.clone());
    let server = &s.server;
    let small = archive(
        s.packs.path(),
        "small",
        "example/model.pt",
        "handlers/example.wasm",
    );
    let chaos = archive(
        s.packs.path(),
        "chaos",
        "example/model.pt",
        "handlers/chaos.wasm",
    );
    // alice: at most 3 models and 6 MiB of archives.
    assert_eq!(upload(server, ALICE, "chaos", "1", &chaos).status, 201);
    assert_eq!(upload(server, ALICE, "m2", "1", &small).status, 201);
    assert_eq!(upload(server, ALICE, "m3", "1", &small).status, 201);
    let fourth = upload(server, ALICE, "m4", "1", &small);
    assert_eq!(fourth.status, 403, "{}", fourth.text());
    assert!(fourth.text().contains("at most 3 models"));
    let large = archive(
        s.packs.path(),
        "large",
        "example/model-large.pt",
        "handlers/example.wasm",
    );
    let over = upload(server, ALICE, "m3", "2", &large);
    assert_eq!(over.status, 201, "3.4 MiB fits: {}", over.text());
    let over = upload(server, ALICE, "m3", "3", &large);
    assert_eq!(over.status, 403, "{}", over.text());
    // bob has no such limits.
    assert_eq!(upload(server, BOB, "m4", "1", &small).status, 201);

    // alice's handlers get 2 s and 64 MiB whatever their model-config says (30 s here).
    let started = std::time::Instant::now();
    let looped = invoke(
        server,
        ALICE,
        "/predictions/chaos",
        &json!({"mode": "loop"}),
    );
    assert_eq!(looped.status, 504);
    assert!(started.elapsed() < Duration::from_secs(10));
    let expect = [
        ("hog", 500, "memory limit of 64 MiB"),
        ("image-hog", 500, "memory limit of 64 MiB"),
        ("stack", 500, "trapped"),
        ("trap", 500, "trapped"),
        ("big", 500, "exceeds the limit"),
    ];
    for (mode, status, text) in expect {
        let r = invoke(server, ALICE, "/predictions/chaos", &json!({"mode": mode}));
        assert_eq!(r.status, status, "{mode}: {}", r.text());
        assert!(r.text().contains(text), "{mode}: {}", r.text());
    }
    assert_eq!(
        invoke(server, ALICE, "/predictions/chaos", &json!({"mode": "log"})).status,
        200
    );
    assert!(server.wait_log("dropped 99800 log lines", Duration::from_secs(5)));
    assert!(
        server.log().contains("alice/chaos@1"),
        "handler log lines carry tenant and model"
    );
    bystander.finish();
}

#[test]
fn fair_share_protects_a_quiet_tenant() {
    // Budget for four large models; alice and bob share it equally, no quotas.
    let size = std::fs::metadata(artifact("example/model-large.pt"))
        .unwrap()
        .len();
    let budget_mib = ((size * 9 / 2) >> 20).to_string();
    let yaml = format!(
        "tenants:\n- name: alice\n  tokens: ['{}']\n- name: bob\n  tokens: ['{}']\n",
        digest(ALICE),
        digest(BOB)
    );
    let s = setup_with(&yaml, &["--memory-budget-mib", &budget_mib]);
    let server = &s.server;
    let large = archive(
        s.packs.path(),
        "large",
        "example/model-large.pt",
        "handlers/example.wasm",
    );
    for name in ["b1", "b2"] {
        assert_eq!(upload(server, BOB, name, "1", &large).status, 201);
        assert_eq!(
            invoke(
                server,
                BOB,
                &format!("/predictions/{name}"),
                &image_request()
            )
            .status,
            200
        );
    }
    for i in 0..6 {
        let name = format!("a{}", i % 3);
        if i < 3 {
            assert_eq!(upload(server, ALICE, &name, "1", &large).status, 201);
        }
        assert_eq!(
            invoke(
                server,
                ALICE,
                &format!("/predictions/{name}"),
                &image_request()
            )
            .status,
            200,
            "{name}"
        );
    }
    let bob_models = authed(server, "GET", BOB, "/models").json();
    for m in bob_models["models"].as_array().unwrap() {
        if m["modelName"] != "good" {
            assert_eq!(
                m["state"], "Loaded",
                "alice's churn evicted bob's model: {m}"
            );
        }
    }
    let alice_models = authed(server, "GET", ALICE, "/models").json();
    let evictions: u64 = alice_models["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["evictions"].as_u64().unwrap())
        .sum();
    assert!(
        evictions > 0,
        "alice's own models were rotated: {alice_models}"
    );
}

#[test]
fn tokens_rotate_without_restart() {
    let s = setup(&[]);
    let server = &s.server;
    assert_eq!(authed(server, "GET", BOB, "/models").status, 200);
    let new_token = "bob-rotated-token-42";
    std::fs::write(&s.tenants, tenants_yaml(new_token)).unwrap();
    assert!(wait_until(Duration::from_secs(10), || authed(
        server, "GET", new_token, "/models"
    )
    .status
        == 200));
    assert_eq!(authed(server, "GET", BOB, "/models").status, 401);
    // A broken file keeps the last good tenants.
    std::fs::write(&s.tenants, "tenants: [").unwrap();
    assert!(server.wait_log("keeping the previous tenants", Duration::from_secs(10)));
    assert_eq!(authed(server, "GET", new_token, "/models").status, 200);
}

#[test]
fn interrupted_uploads_leave_nothing_behind() {
    use std::io::Write;
    let s = setup(&[]);
    let good = archive(
        s.packs.path(),
        "half",
        "example/model.pt",
        "handlers/example.wasm",
    );
    // A client that sends half the archive and hangs up.
    let addr = s.server.base.trim_start_matches("http://").to_string();
    let send_half = |addr: &str| {
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        write!(
            sock,
            "POST /models/half/versions/1 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE}\r\ncontent-length: {}\r\n\r\n",
            good.len()
        )
        .unwrap();
        sock.write_all(&good[..good.len() / 2]).unwrap();
        sock.flush().unwrap();
        sock
    };
    drop(send_half(&addr));
    assert!(wait_until(Duration::from_secs(10), || std::fs::read_dir(
        s.store.path().join(".staging")
    )
    .map(|d| d.count() == 0)
    .unwrap_or(true)));
    assert_eq!(
        invoke(&s.server, ALICE, "/predictions/half", &image_request()).status,
        404
    );

    // The server dies mid-upload; after a restart nothing half-written is served or kept.
    let sock = send_half(&addr);
    assert!(wait_until(Duration::from_secs(10), || std::fs::read_dir(
        s.store.path().join(".staging")
    )
    .map(|d| d.count() > 0)
    .unwrap_or(false)));
    let Setup {
        server,
        store,
        tenants,
        ..
    } = s;
    drop(server); // SIGKILL
    drop(sock);
    assert!(
        std::fs::read_dir(store.path().join(".staging"))
            .unwrap()
            .count()
            > 0,
        "a partial upload is on disk"
    );
    let server = Server::start(store.path(), &["--tenants", tenants.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_dir(store.path().join(".staging"))
            .unwrap()
            .count(),
        0,
        "staging cleaned at start"
    );
    assert_eq!(
        invoke(&server, ALICE, "/predictions/half", &image_request()).status,
        404
    );
    assert_eq!(
        invoke(&server, BOB, "/predictions/good", &image_request()).status,
        200
    );
}

#[test]
fn open_bind_without_tenants_refuses_to_start() {
    let out = std::process::Command::new(BIN)
        .args([
            "serve",
            "--bind",
            "0.0.0.0",
            "--port",
            "0",
            "--model-store",
            "/nonexistent",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("refusing to listen on 0.0.0.0 without authentication"));
}

/// A tenant's Python handler is uploaded, validated and held to the tenant's handler limits
/// like a Rust one: a loop is cut at the time limit, unbounded allocation at the memory limit,
/// an escaping exception is a 500, and the tenant's other requests and others' go on.
#[test]
fn a_tenants_python_handler_is_held_to_its_limits() {
    let yaml = format!(
        "{}- name: carol\n  tokens: ['{}']\n  limits:\n    handlerMemoryMiB: 64\n    handlerTimeoutSeconds: 2\n",
        tenants_yaml(BOB),
        digest("carol-token")
    );
    // A Python component is ~18 MB: room for it in uploads and unpacked archives.
    let s = setup_with(
        &yaml,
        &["--max-upload-mib", "32", "--max-unpacked-mib", "64"],
    );
    let server = &s.server;
    let bystander = Bystander::start(server.base.clone());
    let chaos = archive(
        s.packs.path(),
        "chaos-py",
        "example/model.pt",
        "handlers/chaos-py.wasm",
    );
    let up = upload(server, "carol-token", "chaos-py", "1", &chaos);
    assert_eq!(up.status, 201, "{}", up.text());
    let expect = [
        ("ok", 200, "\"bytes\": 12"),
        ("loop", 504, "time limit"),
        ("hog", 500, "memory limit of 64 MiB"),
        ("raise", 500, "trapped"),
        ("ok", 200, "\"bytes\": 12"),
    ];
    for (mode, status, text) in expect {
        let r = invoke(
            server,
            "carol-token",
            "/predictions/chaos-py",
            &json!({ "mode": mode }),
        );
        assert_eq!(r.status, status, "{mode}: {}", r.text());
        assert!(r.text().contains(text), "{mode}: {}", r.text());
    }
    bystander.finish();
}
