"""Helpers shared by the GPU benchmarks: a kept-alive HTTP client, percentile summaries,
nvidia-smi readings, and starting `tessera serve` on a free port."""
import http.client
import os
import statistics
import subprocess
import threading
import time
import urllib.parse

_conns = {}


def bench_args(*hidden):
    """The arguments every server benchmark takes (--bin, --handler, --out), plus `hidden` ones
    for the script's own child processes."""
    import argparse
    ap = argparse.ArgumentParser()
    for name in ("--bin", "--handler", "--out"):
        ap.add_argument(name)
    for name in hidden:
        ap.add_argument(name, help=argparse.SUPPRESS)
    return ap.parse_args()


def request(method, url, body=None, headers=None):
    """One request on a kept-alive connection; returns (status, body, headers, seconds)."""
    u = urllib.parse.urlsplit(url)
    conn = _conns.get(u.netloc)
    if conn is None:
        conn = _conns[u.netloc] = http.client.HTTPConnection(u.netloc, timeout=300)
    t = time.perf_counter()
    conn.request(method, u.path + (("?" + u.query) if u.query else ""), body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    return r.status, data, {k.lower(): v for k, v in r.getheaders()}, time.perf_counter() - t


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def summary(xs):
    return {"median_ms": statistics.median(xs) * 1e3, "p99_ms": pct(xs, 99) * 1e3, "n": len(xs)}


def smi_used_mib():
    try:
        out = subprocess.check_output(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"], text=True)
        return int(out.strip().splitlines()[0])
    except Exception:
        return None


def b64png(array):
    """A uint8 image array as base64 PNG text (the seed's request encoding)."""
    import base64
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def seed_lama_decode(body_bytes):
    """The seed's LaMa handler's decoding: JSON, base64 and PIL for the image and the mask,
    each side then padded (numpy's symmetric) to a multiple of 8; returns (image, mask, h, w),
    h and w the photo's own size."""
    import base64
    import io
    import json
    import numpy as np
    from PIL import Image
    body = json.loads(body_bytes)
    image = np.array(Image.open(io.BytesIO(base64.b64decode(body["image"]))).convert("RGB"))
    mask = np.array(Image.open(io.BytesIO(base64.b64decode(body["mask_image"]))).convert("L"))
    h, w = mask.shape
    ph, pw = -(-h // 8) * 8, -(-w // 8) * 8
    image = np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)), mode="symmetric")
    mask = np.pad(mask, ((0, ph - h), (0, pw - w)), mode="symmetric")
    return image, mask, h, w


def seed_lama_response(pixels):
    """The seed's LaMa handler's answer for a uint8 [H, W, 3] result: PIL PNG, base64, JSON."""
    import base64
    import io
    import json
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return json.dumps({"generated_image": base64.b64encode(buf.getvalue()).decode()}).encode()


def write_results(out_dir, results, lines):
    """Writes results.json and results.md under `out_dir` and prints the table."""
    import json
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text + "\n")
    print(text)


def start_server(binary, store, work, log_path, *extra):
    """Starts `tessera serve` on a free loopback port; returns (process, base url, log file)."""
    log = open(log_path, "w")
    srv = subprocess.Popen([binary, "serve", "--port", "0", "--model-store", store,
                            "--work-dir", os.path.join(work, "w"), *extra],
                           stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = srv.stdout.readline()
        if line.startswith("tessera listening on "):
            threading.Thread(target=lambda: [None for _ in srv.stdout], daemon=True).start()
            return srv, line.split()[-1], log
        if not line and srv.poll() is not None:
            break
    raise RuntimeError(f"server did not start; see {log_path}")


def wait_for_warm_up(base, name):
    """Waits while `GET /models` says model `name`'s warm-up is running; returns its state."""
    import json
    while True:
        listed = json.loads(request("GET", f"{base}/models")[1])["models"]
        state = next(m for m in listed if m["modelName"] == name).get("warmUp")
        if state != "running":
            return state
        time.sleep(0.05)


def make_store(work, config):
    """A model store folder under `work` and a model-config.yaml with `config`; returns both."""
    store = os.path.join(work, "store")
    os.makedirs(store, exist_ok=True)
    cfg = os.path.join(work, "model-config.yaml")
    with open(cfg, "w") as f:
        f.write(config)
    return store, cfg


def cuda_timed_ms(fn):
    """Milliseconds `fn()` takes, the GPU synchronised before and after."""
    import torch
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def server_bench_setup(extra_args=()):
    """The GPU server benchmarks' command line (--bin, --handlers, --out and `extra_args`, each
    (flag, add_argument keywords)) and a fresh work folder with an empty model store in it:
    returns (args, work, store)."""
    import argparse
    import tempfile
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--handlers", required=True, help="folder with the handlers' .wasm files")
    ap.add_argument("--out", required=True)
    for flag, kw in extra_args:
        ap.add_argument(flag, **kw)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    store = os.path.join(work, "store")
    os.makedirs(store)
    return args, work, store
