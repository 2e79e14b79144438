#!/usr/bin/env python3
"""Handler time per request (preprocess + postprocess, as the server reports them in
x-preprocess-time / x-postprocess-time), per language and pixel path, on the seed's LaMa and SAM
requests at 1024x683 and 2048x1536, next to the seed's Python handler code (PIL / numpy / cv2)
doing the same work in-process. Each request carries a new photo (SAM's embedding cache never
hits). Also: component size, first load of each handler with a cold and a warm compile cache,
and the floor (a 16x16 LaMa request) per language.

    python bench/handlers_cpu.py [--repeat 5] [--out bench/results/handlers_cpu]

Variants: `rust-before` (the handlers as they were before host imaging, commit BEFORE, built
against WIT 0.1.0 and served as such), `rust-sandbox` (today's Rust handler with the SDK's pixel
code compiled into it), `rust-host`, `python-host`, `js-host` (the WIT `imaging` interface).
Needs a release build (target/release/tessera or TESSERA_BIN) and the test artifacts; builds
the `rust-before` and `rust-sandbox` variants with cargo (and a git worktree) unless --handlers
names a folder that holds them ({lama,sam}-{before,sandbox}.wasm; for a machine without
cargo). Every variant's answers are checked to be the same bytes, but those from before host
imaging: LaMa's must be the same pixels (its PNG encoder was another), SAM's are not compared
(its resize was the image crate's triangle filter, within a grey level of today's).
Writes OUT.md and OUT.json.
"""
import argparse
import base64
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import seed_lama_decode, seed_lama_response, start_server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
ARTIFACTS = os.environ.get("TESSERA_ARTIFACTS", os.path.join(TARGET, "artifacts"))
BINARY = os.environ.get("TESSERA_BIN", os.path.join(TARGET, "release", "tessera"))
SIZES = [(1024, 683), (2048, 1536)]
LAMA_CONFIG = "maxWorkers: 1\nresponseTimeout: 300\ntessera:\n  model: model.pt\n"
SAM_CONFIG = ("maxWorkers: 1\nresponseTimeout: 300\ntessera:\n  model: decoder.pt\n  cachedStage:\n"
              "    model: encoder.pt\n    inputs: [image, image_hw]\n    cacheMiB: 64\n")
VARIANTS = {
    "lama": ["rust-before", "rust-sandbox", "rust-host", "python-host", "js-host"],
    "sam": ["rust-before", "rust-sandbox", "rust-host"],
}
FILES = {"rust-host": "{m}.wasm", "rust-sandbox": "{m}-sandbox.wasm", "rust-before": "{m}-before.wasm",
         "python-host": "{m}-py.wasm", "js-host": "{m}-js.wasm"}
# The last commit before host imaging (#20).
BEFORE = "7438626"


def build_sandbox_variants(out):
    """The Rust handlers built with their pixel work inside the sandbox."""
    guest = os.path.join(TARGET, "wasm32-wasip2", "guest")
    for m in ("lama", "sam"):
        subprocess.run(["cargo", "build", "-q", "--profile", "guest", "--target", "wasm32-wasip2",
                        "-p", f"tessera-handler-{m}", "--features", "in-sandbox"], check=True)
        shutil.copy(os.path.join(guest, f"tessera_handler_{m}.wasm"),
                    os.path.join(out, f"{m}-sandbox.wasm"))
    # Leave the normal builds in place for whatever runs next.
    subprocess.run(["cargo", "build", "-q", "--profile", "guest", "--target", "wasm32-wasip2",
                    "-p", "tessera-handler-lama", "-p", "tessera-handler-sam"], check=True)
    tree = os.path.join(out, "before-tree")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "-f", "-q", tree, BEFORE], check=True)
    try:
        target = os.path.join(out, "before-target")
        subprocess.run(["cargo", "build", "-q", "--profile", "guest", "--target", "wasm32-wasip2",
                        "-p", "tessera-handler-lama", "-p", "tessera-handler-sam"],
                       check=True, cwd=tree, env={**os.environ, "CARGO_TARGET_DIR": target})
        for m in ("lama", "sam"):
            shutil.copy(os.path.join(target, "wasm32-wasip2", "guest", f"tessera_handler_{m}.wasm"),
                        os.path.join(out, f"{m}-before.wasm"))
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], check=False)


def scene(w, h, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1)
    image = np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    mask = (((xx - 0.55 * w) ** 2 + (yy - 0.45 * h) ** 2) < (0.3 * min(w, h)) ** 2)
    return image, (mask * 255).astype(np.uint8)


def png_b64(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def lama_request(w, h, seed):
    image, mask = scene(w, h, seed)
    return {"image": png_b64(image), "mask_image": png_b64(mask)}


def sam_request(w, h, seed):
    image, _ = scene(w, h, seed)
    return {"image": png_b64(image),
            "gen_args": {"point_coords": [w // 2, h // 2], "point_labels": 1,
                         "dilate_kernel_size": 15}}


def pixels(reply):
    """A JSON reply with every base64 PNG in it replaced by its mode, size and pixels: the
    handlers before commit BEFORE encoded PNGs with another compressor."""
    def norm(v):
        if isinstance(v, dict):
            return tuple(sorted((k, norm(x)) for k, x in v.items()))
        if isinstance(v, list):
            return tuple(norm(x) for x in v)
        if isinstance(v, str) and v.startswith("iVBOR"):
            im = Image.open(io.BytesIO(base64.b64decode(v)))
            return (im.mode, im.size, im.tobytes())
        return v
    return norm(json.loads(reply))


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        headers = {k.lower(): v for k, v in r.headers.items()}
        return r.read(), headers


# The seed's Python handler code, doing the same pixel work in-process.

def seed_lama(body_bytes):
    t0 = time.perf_counter()
    image, mask, h, w = seed_lama_decode(body_bytes)
    t1 = time.perf_counter()
    seed_lama_response(image[:h, :w])  # the forward's composite, same shape
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def seed_sam(body_bytes):
    import cv2
    from segment_anything.utils.transforms import ResizeLongestSide
    t0 = time.perf_counter()
    body = json.loads(body_bytes)
    image = np.array(Image.open(io.BytesIO(base64.b64decode(body["image"]))).convert("RGB"))
    resized = ResizeLongestSide(1024).apply_image(image)
    rh, rw = resized.shape[:2]
    np.pad(resized, ((0, 1024 - rh), (0, 1024 - rw), (0, 0)))
    t1 = time.perf_counter()
    h, w = image.shape[:2]
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: h // 2, w // 4: w // 2] = 1  # the decoder's mask
    k = body["gen_args"]["dilate_kernel_size"]
    dilated = cv2.dilate(mask, np.ones((k, k), np.uint8))
    buf = io.BytesIO()
    Image.fromarray(dilated * 255).save(buf, format="PNG")
    json.dumps({"generated_image": base64.b64encode(buf.getvalue()).decode(),
                "scores": [0.9, 0.8, 0.7]})
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def pack(store, name, config, models, handler):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "model-config.yaml")
        open(cfg, "w").write(config)
        args = [BINARY, "pack", "--config", cfg, "--handler", handler,
                "-o", os.path.join(store, f"{name}.tar.gz")]
        for m in models:
            args += ["--model", m]
        subprocess.run(args, check=True, capture_output=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--handlers", help="folder with the *-sandbox.wasm variants (else built)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "handlers_cpu"))
    ap.add_argument("--machine", default=os.uname().nodename)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="tessera-handlers-")
    handlers = os.path.join(work, "handlers")
    os.makedirs(handlers)
    for f in os.listdir(os.path.join(ARTIFACTS, "handlers")):
        shutil.copy(os.path.join(ARTIFACTS, "handlers", f), handlers)
    if args.handlers:
        for f in ("lama-sandbox.wasm", "sam-sandbox.wasm", "lama-before.wasm", "sam-before.wasm"):
            shutil.copy(os.path.join(args.handlers, f), handlers)
    else:
        build_sandbox_variants(handlers)
    store = os.path.join(work, "store")
    os.makedirs(store)
    models = {"lama": (LAMA_CONFIG, [os.path.join(ARTIFACTS, "lama", "model.pt")]),
              "sam": (SAM_CONFIG, [os.path.join(ARTIFACTS, "sam", f) for f in ("encoder.pt", "decoder.pt")])}
    sizes = {}
    for m, variants in VARIANTS.items():
        for v in variants:
            path = os.path.join(handlers, FILES[v].format(m=m))
            sizes[f"{m}/{v}"] = os.path.getsize(path)
            pack(store, f"{m}-{v}", *models[m], path)

    results = {"machine": args.machine, "repeat": args.repeat, "component_bytes": sizes,
               "load_ms": {}, "requests": []}
    cache = os.path.join(work, "component-cache")
    for run in ("cold", "warm"):
        srv, base, log = start_server(BINARY, store, work, os.path.join(work, f"server-{run}.log"),
                                      "--component-cache", cache, "--device", "cpu")
        try:
            for m, variants in VARIANTS.items():
                for v in variants:
                    body = lama_request(16, 16, 0) if m == "lama" else sam_request(64, 48, 0)
                    _, hdr = post(f"{base}/predictions/{m}-{v}", body)
                    results["load_ms"].setdefault(f"{m}/{v}", {})[run] = float(hdr.get("x-model-load-time", "nan"))
                    if run == "warm":
                        # The floor: a tiny request, instantiation and little else.
                        floor = [post(f"{base}/predictions/{m}-{v}", body)[1] for _ in range(args.repeat)]
                        results.setdefault("floor_ms", {})[f"{m}/{v}"] = [
                            float(h["x-preprocess-time"]) + float(h["x-postprocess-time"]) for h in floor]
            if run == "cold":
                continue
            seed = 1
            for m, variants in VARIANTS.items():
                make = lama_request if m == "lama" else sam_request
                seed_fn = seed_lama if m == "lama" else seed_sam
                for (w, h) in SIZES:
                    for i in range(args.repeat):
                        seed += 1
                        body = make(w, h, seed)
                        raw = json.dumps(body).encode()
                        answers = {}
                        for v in variants:
                            reply, hdr = post(f"{base}/predictions/{m}-{v}", body)
                            answers[v] = reply
                            results["requests"].append({
                                "model": m, "size": f"{w}x{h}", "i": i, "variant": v,
                                "pre_ms": float(hdr["x-preprocess-time"]),
                                "post_ms": float(hdr["x-postprocess-time"])})
                        pre, post_ms = seed_fn(raw)
                        results["requests"].append({"model": m, "size": f"{w}x{h}", "i": i,
                                                    "variant": "seed-python", "pre_ms": pre,
                                                    "post_ms": post_ms})
                        distinct = {r for v, r in answers.items() if v != "rust-before"}
                        assert len(distinct) == 1, f"{m} {w}x{h}: variants answered differently"
                        if m == "lama":
                            assert pixels(answers["rust-before"]) == pixels(answers["rust-host"]), \
                                f"{m} {w}x{h}: rust-before answered other pixels"
        finally:
            srv.terminate()
            srv.wait()
            log.close()
    shutil.rmtree(work, ignore_errors=True)

    lines = [f"# Handler time per request, CPU ({args.machine})", "",
             f"Each request a new photo; {args.repeat} per size; pre / post = the server's "
             "x-preprocess-time / x-postprocess-time (a fresh instance each, compiled code cached), "
             "seed-python = the seed's PIL/numpy/cv2 code in-process on the same body; "
             f"rust-before = the handlers of commit {BEFORE} (before host imaging). "
             "All variants answered the same bytes, but rust-before: LaMa's the same pixels "
             "(its PNG encoder was another), SAM's not compared (its resize differed by up to "
             "a grey level).", "",
             "| model | size | variant | pre ms (each request) | post ms (each request) | median total ms |",
             "|---|---|---|---|---|---|"]
    for m, variants in VARIANTS.items():
        for (w, h) in SIZES:
            for v in variants + ["seed-python"]:
                rs = [r for r in results["requests"]
                      if r["model"] == m and r["size"] == f"{w}x{h}" and r["variant"] == v]
                pre = ", ".join(f"{r['pre_ms']:.1f}" for r in rs)
                post_s = ", ".join(f"{r['post_ms']:.1f}" for r in rs)
                med = statistics.median(r["pre_ms"] + r["post_ms"] for r in rs)
                lines.append(f"| {m} | {w}x{h} | {v} | {pre} | {post_s} | {med:.1f} |")
    lines += ["", "| handler | component bytes | first load ms, cold compile cache | "
              "first load ms, warm cache | floor ms (16x16 request, each) |", "|---|---|---|---|---|"]
    for key, size in sizes.items():
        load = results["load_ms"][key]
        floor = ", ".join(f"{x:.2f}" for x in results["floor_ms"][key])
        lines.append(f"| {key} | {size} | {load['cold']:.0f} | {load['warm']:.0f} | {floor} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
