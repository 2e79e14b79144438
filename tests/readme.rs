//! The README's clients, run as written: a real server on the demo store that
//! `scripts/pack-demo.sh` packs, a photo, and the code blocks of the README's "Clients" section.
//!
//! Which blocks run: every fenced block between the `## Clients` heading and the next `## `
//! heading, and nothing outside it (the quick start's `bash scripts/demo.sh` and the "Real
//! weights" commands are instructions, not clients). The section holds only ```python and ```sh
//! blocks (checked). Python blocks run with the venv's python, shell blocks with
//! `bash -e -o pipefail`, each in a fresh process, in order, as a reader would paste them: cwd a
//! work dir holding `photo.png` and the server's `model-store/`, `TESSERA_URL` naming the server.
//! The Python and the shell clients each get their own server and store, since both register
//! and upload the same names.
mod support;

use base64::Engine;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

const PHOTO_W: u32 = 320;
const PHOTO_H: u32 = 240;

/// The fenced blocks of the README's Clients section: (info string, code), in order.
fn client_blocks() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let mut lines = readme
        .lines()
        .skip_while(|l| l.trim_end() != "## Clients")
        .skip(1)
        .take_while(|l| !l.starts_with("## "));
    let mut blocks = Vec::new();
    while let Some(line) = lines.next() {
        if let Some(info) = line.strip_prefix("```") {
            let code: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            blocks.push((info.trim().to_string(), code.join("\n") + "\n"));
        }
    }
    assert!(
        !blocks.is_empty(),
        "README.md has no ## Clients section with code blocks"
    );
    for (info, code) in &blocks {
        assert!(
            info == "python" || info == "sh",
            "a ```{info} block in README's Clients section: only python and sh blocks run there\n{code}"
        );
    }
    blocks
}

/// A test photo: a gradient with a bright disc in the middle (where the clients click).
fn photo() -> Vec<u8> {
    let (w, h) = (PHOTO_W as i64, PHOTO_H as i64);
    let mut px = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = (x - w / 2, y - h / 2);
            if dx * dx + dy * dy < 60 * 60 {
                px.extend([230, 180, 40]);
            } else {
                px.extend([(x * 255 / w) as u8, (y * 255 / h) as u8, 90]);
            }
        }
    }
    png_rgb(PHOTO_W, PHOTO_H, &px)
}

/// A work dir with `photo.png` and `model-store/` packed by `scripts/pack-demo.sh`, and a
/// server on that store.
fn setup() -> (tempfile::TempDir, Server) {
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("photo.png"), photo()).unwrap();
    let store = work.path().join("model-store");
    let out = Command::new("bash")
        .arg(workspace().join("scripts/pack-demo.sh"))
        .arg(&store)
        .env("TESSERA_BIN", BIN)
        .env("TESSERA_ARTIFACTS", artifacts())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/pack-demo.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["example", "sam", "lama", "sd"] {
        assert!(
            store.join(format!("{name}.tar.gz")).is_file(),
            "no {name}.tar.gz"
        );
    }
    let server = Server::start(&store, &[]);
    (work, server)
}

/// Runs one block in `dir` with `TESSERA_URL` set; returns its stdout. Panics, showing the
/// block and its output, if it fails or runs past `within`.
fn run_block(
    program: &Path,
    args: &[&str],
    code: &str,
    dir: &Path,
    server: &Server,
    within: Duration,
) -> String {
    let logs = tempfile::tempdir().unwrap();
    let script = logs.path().join("block");
    std::fs::write(&script, code).unwrap();
    let (out, err) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut child = Command::new(program)
        .args(args)
        .arg(&script)
        .current_dir(dir)
        .env("TESSERA_URL", &server.base)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until(within, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        status = child.wait().ok();
    }
    let (stdout, stderr) = (
        std::fs::read_to_string(&out).unwrap_or_default(),
        std::fs::read_to_string(&err).unwrap_or_default(),
    );
    let status = status.unwrap();
    assert!(
        status.success(),
        "README block failed ({status}, limit {within:?}):\n{code}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    eprintln!("---- README block ok ----\n{code}---- its output ----\n{stdout}");
    stdout
}

/// Runs every block of `kind` in order; returns their stdouts.
fn run_clients(
    kind: &str,
    program: &Path,
    args: &[&str],
) -> (tempfile::TempDir, Server, Vec<String>) {
    let (work, server) = setup();
    let outputs = client_blocks()
        .into_iter()
        .filter(|(info, _)| info == kind)
        .map(|(_, code)| {
            run_block(
                program,
                args,
                &code,
                work.path(),
                &server,
                Duration::from_secs(600),
            )
        })
        .collect();
    (work, server, outputs)
}

/// (width, height, color type, pixels) of a PNG file.
fn read_png(path: &Path) -> (u32, u32, png::ColorType, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap_or_else(|e| panic!("{} is not a PNG: {e}", path.display()));
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info.width, info.height, info.color_type, buf)
}

/// What every client run must have produced: the images, at the photo's size, and the
/// management calls' end state (example's uploaded version 2 is its default and serves).
fn check_results(work: &Path, server: &Server) {
    for file in ["out.png", "erased.png", "replaced.png"] {
        let (w, h, color, _) = read_png(&work.join(file));
        assert_eq!(
            (w, h, color),
            (PHOTO_W, PHOTO_H, png::ColorType::Rgb),
            "{file}"
        );
    }
    let (w, h, color, mask) = read_png(&work.join("mask.png"));
    assert_eq!((w, h, color), (PHOTO_W, PHOTO_H, png::ColorType::Grayscale));
    assert!(
        mask.iter().all(|&v| v == 0 || v == 255),
        "mask is not 0/255"
    );
    assert!(mask.contains(&255), "SAM's mask is empty");

    let model = get(&server.url("/models/example")).json();
    assert_eq!(model["defaultVersion"], "2", "{model}");
    assert_eq!(model["versions"], serde_json::json!(["2"]), "{model}");
    let body =
        serde_json::json!({"image": B64.encode(std::fs::read(work.join("photo.png")).unwrap())});
    let reply = post_json(&server.url("/predictions/example"), &body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-model-version"), Some("2"));
}

#[test]
fn python_clients_run_as_written() {
    let (work, server, outputs) = run_clients("python", &python(), &[]);
    let listing = outputs.last().unwrap();
    for name in ["example", "sam", "lama", "sd"] {
        assert!(
            listing.contains(&format!("\n{name} Loaded")),
            "the listing does not show {name} loaded:\n{listing}"
        );
    }
    assert!(listing.contains("'version': '2'"), "{listing}");
    check_results(work.path(), &server);
}

#[test]
fn shell_clients_run_as_written() {
    let tools = Command::new("sh")
        .args([
            "-c",
            "command -v curl && command -v jq && command -v base64",
        ])
        .output()
        .unwrap();
    assert!(
        tools.status.success(),
        "the README's shell clients need curl, jq and base64 on PATH (Debian: apt install curl jq)"
    );
    let (work, server, outputs) = run_clients("sh", Path::new("bash"), &["-e", "-o", "pipefail"]);
    let listing = outputs.last().unwrap();
    for name in ["example", "sam", "lama", "sd"] {
        assert!(
            listing.contains(&format!("\"modelName\": \"{name}\"")),
            "the listing does not show {name}:\n{listing}"
        );
    }
    assert!(listing.contains("\"version\": \"2\""), "{listing}");
    check_results(work.path(), &server);
}
