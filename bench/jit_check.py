import sys, time, os, subprocess, torch
sys.path.insert(0, "models/lama")
os.makedirs("/tmp/lama32", exist_ok=True)
pt = "/tmp/lama32/model.pt"
subprocess.check_call([sys.executable, "models/lama/export.py", "--random", "--out", pt, "--device", "cuda"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
img = torch.randint(0, 255, (512, 512, 3), dtype=torch.uint8); mask = (torch.rand(512, 512) > 0.7).to(torch.uint8) * 255
def bench(tag, n=30):
    m = torch.jit.load(pt, map_location="cuda")
    with torch.no_grad():
        for _ in range(6): m(img.cuda(), mask.cuda()).cpu()
        torch.cuda.synchronize(); xs = []
        for _ in range(n):
            t = time.perf_counter(); m(img.cuda(), mask.cuda()).cpu(); xs.append(time.perf_counter() - t)
    g = torch.jit.last_executed_optimized_graph()
    xs.sort(); print(f"{tag}: median {xs[n//2]*1e3:.1f} ms; fusion groups {str(g).count('TensorExprGroup')}, DifferentiableGraph {str(g).count('DifferentiableGraph')}, nodes {len(list(g.nodes()))}", flush=True)
bench("default (profiling + texpr fuser)")
m = torch.jit.load(pt, map_location="cuda")
with torch.no_grad():
    for _ in range(6): m(img.cuda(), mask.cuda()).cpu()
    torch.cuda.synchronize(); ph = []
    for _ in range(30):
        t0 = time.perf_counter(); a, b = img.cuda(), mask.cuda(); t1 = time.perf_counter(); out = m(a, b); t2 = time.perf_counter(); out.cpu(); t3 = time.perf_counter()
        ph.append((t1 - t0, t2 - t1, t3 - t2))
    ph.sort(key=sum); p = ph[15]
    print("python phases (median call): inputs %.1f, launch %.1f, outputs %.1f ms" % tuple(x * 1e3 for x in p), flush=True)
torch._C._jit_set_texpr_fuser_enabled(False); bench("texpr fuser off"); torch._C._jit_set_texpr_fuser_enabled(True)
torch._C._jit_set_profiling_executor(False); bench("legacy executor"); torch._C._jit_set_profiling_executor(True)
torch._C._set_graph_executor_optimize(False); bench("graph executor optimize off"); torch._C._set_graph_executor_optimize(True)
import threading
th = threading.Thread(target=bench, args=("default, in a new thread",)); th.start(); th.join()

# The server on the same file: which libraries does it load while fusing, and how fast is its forward?
if len(sys.argv) > 1:
    import json, tempfile, base64, io
    sys.path.insert(0, "bench")
    from common import b64png, request, start_server
    import numpy as np
    work = tempfile.mkdtemp(); store = os.path.join(work, "store"); os.makedirs(store)
    cfg = os.path.join(work, "c.yaml"); open(cfg, "w").write("maxWorkers: 1\ntessera:\n  model: model.pt\n")
    subprocess.check_call([sys.argv[1], "pack", "--config", cfg, "--model", pt, "--handler", sys.argv[2], "--output", os.path.join(store, "lama.tar.gz"), "--skip-model-check"])
    os.environ["RUST_LOG"] = "info,tessera::runtime=trace"
    srv, base, log = start_server(sys.argv[1], store, work, "/tmp/srv.log", "--device", "cuda")
    del os.environ["RUST_LOG"]
    body = json.dumps({"image": b64png(img.numpy()), "mask_image": b64png(mask.numpy())}).encode()
    inf = []
    for i in range(20):
        st, data, h, t = request("POST", f"{base}/predictions/lama", body, {"content-type": "application/json"})
        assert st == 200, data[:300]
        inf.append(float(h["x-inference-time"]))
    srv.terminate(); srv.wait()
    inf = sorted(inf[6:]); print(f"server forward median {inf[len(inf)//2]:.1f} ms")
    import re
    phases = [tuple(float(x) for x in re.findall(r"_ms=([0-9.]+)", l))
              for l in open("/tmp/srv.log", errors="replace") if "forward phases" in l][6:]
    phases.sort(key=sum)
    if phases:
        print("server phases (median call): inputs %.1f, launch %.1f, outputs %.1f ms" % phases[len(phases) // 2])
