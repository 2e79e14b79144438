//! Reliability under hostile clients and faults, against a real `tessera serve`: slow, idle and
//! stalled clients cannot crowd out normal ones; a store that cannot be read is 503, not 404,
//! and resident models keep serving through it; failing handlers fail alone; the disk tier
//! does not keep what no archive needs.
mod support;

use base64::Engine;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;

const CONFIG: &str =
    "maxWorkers: 1\nresponseTimeout: 30\ntessera:\n  model: model.pt\nhandler:\n  max_pixels: 1000000\n";

fn example(store: &Path, name: &str) {
    pack(
        store,
        name,
        CONFIG,
        &artifact("example/model.pt"),
        &artifact("handlers/example.wasm"),
    );
}

fn request() -> serde_json::Value {
    let png = png_rgb(8, 6, &noise(8 * 6 * 3, 1));
    json!({ "image": B64.encode(png), "gen_args": {"strength": 0.5} })
}

/// Raises this test process's own open-files limit (it holds hundreds of sockets).
fn raise_own_fd_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain out-pointer; raising the soft limit to the hard one.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

/// Whether the server closes `stream` within `within` (reads end or fail).
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    let started = Instant::now();
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // a response (e.g. 408/400) before the close
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return started.elapsed() <= within,
        }
    }
}

/// With the open-files limit a service manager commonly sets (here 512, soft and hard), 600
/// idle sockets and 50 slow-header ones used to leave no descriptor for anyone else; now
/// the oldest idle connection makes room for each newcomer, so a normal client is served
/// throughout, and slow or idle sockets are closed after the header timeout.
#[test]
fn idle_and_slow_clients_cannot_crowd_out_a_normal_one() {
    raise_own_fd_limit();
    let store = tempfile::tempdir().unwrap();
    example(store.path(), "example");
    let server = Server::launch(
        store.path(),
        &["--header-timeout-seconds", "3"],
        Launch {
            fd_limit: Some(512),
            ..Default::default()
        },
    );
    assert!(
        server.wait_log("max_connections=256", Duration::from_secs(5)),
        "{}",
        server.log()
    );
    let addr = server.base.trim_start_matches("http://").to_string();
    let body = request();
    assert_eq!(
        post_json(&server.url("/predictions/example"), &body).status,
        200
    );

    let mut idle = Vec::new();
    let mut slow = Vec::new();
    for i in 0..650 {
        let Ok(mut s) = TcpStream::connect(&addr) else {
            continue;
        };
        if i % 13 == 0 {
            let _ = s.write_all(b"GET /ping HTTP/1.1\r\nHo");
            slow.push(s);
        } else {
            idle.push(s);
        }
        if i % 100 == 99 {
            // A normal client, in the middle of the flood.
            let r = get(&server.url("/ping"));
            assert_eq!(r.status, 200, "ping during the flood ({i} sockets)");
        }
    }
    let r = post_json(&server.url("/predictions/example"), &body);
    assert_eq!(r.status, 200, "{}", r.text());
    // Those still open are closed by the header timeout.
    let mut survivor = slow.pop().unwrap();
    assert!(
        closed_within(&mut survivor, Duration::from_secs(6)),
        "a slow-header socket stayed open"
    );
    let mut still = idle.pop().unwrap();
    assert!(
        closed_within(&mut still, Duration::from_secs(6)),
        "an idle socket stayed open"
    );
    // A kept-alive connection waiting for its next request is closed the same way.
    let mut conn = KeepAlive::connect(&server.base);
    assert_eq!(conn.get("/ping"), 200);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        conn.get("/ping"),
        0,
        "an idle kept-alive connection stayed open"
    );
    assert_eq!(get(&server.url("/ping")).status, 200);
}

/// A body that stops arriving ends the request after --body-stall-seconds: an inference
/// answers 400 and frees its place, an upload removes its staging file.
#[test]
fn stalled_bodies_release_what_they_hold() {
    let store = tempfile::tempdir().unwrap();
    example(store.path(), "example");
    let server = Server::start(store.path(), &["--body-stall-seconds", "2"]);
    let addr = server.base.trim_start_matches("http://").to_string();

    let mut c = TcpStream::connect(&addr).unwrap();
    c.write_all(
        b"POST /predictions/example HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{\"image\": \"",
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "the stalled request was held"
    );
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("stalled"), "{text}");

    let mut up = TcpStream::connect(&addr).unwrap();
    up.write_all(
        b"POST /models/up/versions/1 HTTP/1.1\r\nhost: x\r\ncontent-type: application/octet-stream\r\ncontent-length: 1000000\r\n\r\n",
    )
    .unwrap();
    up.write_all(&[0u8; 4096]).unwrap();
    let staging = store.path().join(".staging");
    assert!(wait_until(Duration::from_secs(3), || std::fs::read_dir(
        &staging
    )
    .map(|d| d.count() > 0)
    .unwrap_or(false)));
    assert!(
        wait_until(Duration::from_secs(8), || std::fs::read_dir(&staging)
            .map(|d| d.count() == 0)
            .unwrap_or(true)),
        "the stalled upload's staging file stayed"
    );
    assert_eq!(
        post_json(&server.url("/predictions/example"), &request()).status,
        200
    );
}

/// With the store's directory gone (a lost mount), resident models keep serving; a model that
/// would have to be read from the store answers 503 with a retryable message, not 404; once the
/// store is back, everything is as before.
#[test]
fn store_trouble_is_503_and_resident_models_keep_serving() {
    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("store");
    example(&store, "resident");
    example(&store, "cold");
    let server = Server::start(&store, &[]);
    let body = request();
    assert_eq!(
        post_json(&server.url("/predictions/resident"), &body).status,
        200
    );

    let away = root.path().join("away");
    std::fs::rename(&store, &away).unwrap();
    let r = post_json(&server.url("/predictions/resident"), &body);
    assert_eq!(
        r.status,
        200,
        "a resident model stopped serving: {}",
        r.text()
    );
    for name in ["cold", "never-was"] {
        let r = post_json(&server.url(&format!("/predictions/{name}")), &body);
        assert_eq!(r.status, 503, "{name}: {}", r.text());
        assert!(r.text().contains("retry later"), "{}", r.text());
    }
    assert!(server.wait_log("model store unreadable", Duration::from_secs(5)));

    std::fs::rename(&away, &store).unwrap();
    assert_eq!(
        post_json(&server.url("/predictions/cold"), &body).status,
        200
    );
    assert_eq!(
        post_json(&server.url("/predictions/never-was"), &body).status,
        404
    );
}

/// Processes whose command line mentions `needle` (the check child of a server, say).
fn processes_mentioning(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmd)
                .contains(needle)
                .then_some(pid)
        })
        .collect()
}

/// kill -9 at several moments of a first load (unpacking, the sandboxed TorchScript check,
/// loading), then a restart on the same work dir: nothing half-unpacked is left or used, no
/// check process outlives its server, and the model loads cleanly and answers.
#[test]
fn kill_9_during_a_first_load_then_restart() {
    let store = tempfile::tempdir().unwrap();
    pack(
        store.path(),
        "large",
        CONFIG,
        &artifact("example/model-large.pt"),
        &artifact("handlers/example.wasm"),
    );
    let work = tempfile::tempdir().unwrap();
    let launch = || {
        Server::launch(
            store.path(),
            &[],
            Launch {
                work_dir: Some(work.path().to_path_buf()),
                ..Default::default()
            },
        )
    };
    let body = request();
    for delay_ms in [5, 60, 250, 600] {
        let mut server = launch();
        let url = server.url("/predictions/large");
        let b = body.clone();
        let client = std::thread::spawn(move || post_json(&url, &b).status);
        std::thread::sleep(Duration::from_millis(delay_ms));
        server.signal(libc::SIGKILL);
        assert!(server.wait_exit(Duration::from_secs(10)).is_some());
        let _ = client.join();
        let needle = work.path().to_string_lossy().into_owned();
        assert!(
            wait_until(Duration::from_secs(5), || processes_mentioning(&needle)
                .is_empty()),
            "a process of the killed server outlived it (kill at {delay_ms} ms)"
        );
    }
    let server = launch();
    let unpacked = work.path().join("unpacked");
    let partials = || {
        std::fs::read_dir(&unpacked)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(".partial-"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(partials(), 0, "an interrupted unpack was left");
    let r = post_json(&server.url("/predictions/large"), &body);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// An operator archive replaced in the store while its model is resident is reloaded at the
/// next request (its new bytes served); one removed is unloaded and answers 404.
#[test]
fn archives_replaced_or_removed_while_resident() {
    let store = tempfile::tempdir().unwrap();
    let archives = tempfile::tempdir().unwrap();
    example(store.path(), "m");
    let other = archives.path().join("other");
    pack(
        &other,
        "m",
        &CONFIG.replace("max_pixels: 1000000", "max_pixels: 10"),
        &artifact("example/model.pt"),
        &artifact("handlers/example.wasm"),
    );
    let server = Server::start(store.path(), &[]);
    let body = request();
    assert_eq!(post_json(&server.url("/predictions/m"), &body).status, 200);
    // The replacement allows 10 pixels: the same request is now refused by it.
    std::fs::copy(other.join("m.tar.gz"), store.path().join("m.tar.gz")).unwrap();
    let r = post_json(&server.url("/predictions/m"), &body);
    assert_eq!(r.status, 413, "the old archive kept serving: {}", r.text());
    assert!(server.wait_log("archive was replaced", Duration::from_secs(5)));
    std::fs::remove_file(store.path().join("m.tar.gz")).unwrap();
    let r = post_json(&server.url("/predictions/m"), &body);
    assert_eq!(r.status, 404, "{}", r.text());
    let listed = get(&server.url("/metrics")).text();
    assert!(listed.contains("tessera_resident_models 0"), "{listed}");
}

/// A handler that exhausts its memory or its time on every call, called by a burst of
/// concurrent clients: each call gets its designed answer (500 memory limit / trapped, 504
/// time limit; on a loaded machine any call may reach its responseTimeout first, a 504 too,
/// and a burst may meet 429/503), the same model answers normally right after, and another
/// model is served byte for byte the same throughout.
#[test]
fn a_burst_of_failing_handler_calls_fails_alone() {
    let store = tempfile::tempdir().unwrap();
    example(store.path(), "good");
    pack(
        store.path(),
        "chaos",
        "maxWorkers: 2\nresponseTimeout: 2\ntessera:\n  model: model.pt\n  handlerMemoryMiB: 64\n",
        &artifact("example/model.pt"),
        &artifact("handlers/chaos.wasm"),
    );
    let server = Server::start(store.path(), &[]);
    let good = server.url("/predictions/good");
    let body = request();
    let want = post_json(&good, &body);
    assert_eq!(want.status, 200, "{}", want.text());
    let designed = [
        ("hog", 500, "memory limit"),
        ("image-hog", 500, "memory limit"),
        ("loop", 504, "time limit"),
        ("trap", 500, "trapped"),
    ];
    let chaos = server.url("/predictions/chaos");
    let burst: Vec<_> = (0..24)
        .map(|i| {
            let (mode, status, word) = designed[i % designed.len()];
            let url = chaos.clone();
            std::thread::spawn(move || {
                let r = post_json(&url, &json!({ "mode": mode }));
                (mode, status, word, r.status, r.text())
            })
        })
        .collect();
    let bystander = {
        let (url, body, want) = (good.clone(), body.clone(), want.body.clone());
        std::thread::spawn(move || {
            for _ in 0..20 {
                let r = post_json(&url, &body);
                assert_eq!(r.status, 200, "{}", r.text());
                assert!(
                    r.body == want,
                    "another model's answer changed during the burst"
                );
            }
        })
    };
    for t in burst {
        let (mode, status, word, got, text) = t.join().unwrap();
        let designed = (got == status && text.contains(word))
            || (got == 504 && (text.contains("time limit") || text.contains("timed out")))
            || got == 429
            || got == 503;
        assert!(designed, "{mode}: {got} {text}");
    }
    bystander.join().unwrap();
    let r = post_json(&chaos, &json!({ "mode": "ok" }));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(post_json(&good, &body).body, want.body);
}

/// Unpacked archives stay on local disk for fast reloads, but not once their archive is gone:
/// a deleted version's folder, a replaced operator archive's old folder and a removed one's
/// (its idle model unloaded without waiting for a request) are removed by the server's upkeep
/// (every 2 s); the current archives' folders stay.
#[test]
fn unpacked_folders_of_deleted_or_replaced_archives_are_removed() {
    let store = tempfile::tempdir().unwrap();
    let archives = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    example(store.path(), "m");
    example(store.path(), "x");
    example(archives.path(), "v");
    let replacement = archives.path().join("replacement");
    pack(
        &replacement,
        "m",
        &CONFIG.replace("maxWorkers: 1", "maxWorkers: 2"),
        &artifact("example/model.pt"),
        &artifact("handlers/example.wasm"),
    );
    let server = Server::launch(
        store.path(),
        &[],
        Launch {
            work_dir: Some(work.path().to_path_buf()),
            ..Default::default()
        },
    );
    let upload = std::fs::read(archives.path().join("v.tar.gz")).unwrap();
    let octets = [("content-type", "application/octet-stream")];
    for v in ["1", "2"] {
        let r = post(
            &server.url(&format!("/models/u/versions/{v}")),
            &octets,
            &upload,
        );
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let body = request();
    for path in [
        "/predictions/m",
        "/predictions/x",
        "/predictions/u/1",
        "/predictions/u/2",
    ] {
        let r = post_json(&server.url(path), &body);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    let unpacked = work.path().join("unpacked");
    let folders = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&unpacked)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.contains('.'))
            .collect();
        v.sort();
        v
    };
    let sources = || -> Vec<String> {
        folders()
            .iter()
            .map(|k| std::fs::read_to_string(unpacked.join(format!("{k}.source"))).unwrap())
            .collect()
    };
    assert_eq!(folders().len(), 4, "{:?}", sources());

    // Version 1, the first upload, is the default: version 2 can go.
    let r = delete(&server.url("/models/u/versions/2"));
    assert_eq!(r.status, 200, "{}", r.text());
    std::fs::copy(replacement.join("m.tar.gz"), store.path().join("m.tar.gz")).unwrap();
    let r = post_json(&server.url("/predictions/m"), &body);
    assert_eq!(r.status, 200, "{}", r.text());
    std::fs::remove_file(store.path().join("x.tar.gz")).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || folders().len() == 2),
        "{:?}",
        sources()
    );
    assert!(server.wait_log(
        "its archive is gone from the store: unloaded",
        Duration::from_secs(5)
    ));
    let metrics = get(&server.url("/metrics")).text();
    assert!(metrics.contains("tessera_resident_models 2"), "{metrics}");
    for source in sources() {
        assert!(Path::new(&source).is_file(), "{source} is gone");
    }
    // Both remaining models still serve, and a restart keeps their folders.
    for path in ["/predictions/m", "/predictions/u/1"] {
        assert_eq!(post_json(&server.url(path), &body).status, 200, "{path}");
    }
    let kept = folders();
    drop(server);
    // A folder no archive accounts for (no source recorded): the next server's first
    // collection removes it, which shows that the collection ran.
    let stray = unpacked.join("0123456789abcdef01234567");
    std::fs::create_dir(&stray).unwrap();
    let server = Server::launch(
        store.path(),
        &[],
        Launch {
            work_dir: Some(work.path().to_path_buf()),
            ..Default::default()
        },
    );
    assert_eq!(post_json(&server.url("/predictions/m"), &body).status, 200);
    // The new server's first upkeep collects the disk tier: u/1's folder is not pinned (u/1 is
    // not loaded) and must survive it because its archive is still there.
    assert!(wait_until(Duration::from_secs(10), || !stray.exists()));
    assert_eq!(folders(), kept);
}
