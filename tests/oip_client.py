#!/usr/bin/env python3
"""Drives a Tessera server with tritonclient[http], unmodified, as a Triton/KServe user would:
server and model metadata, readiness, inference with FP32, UINT8 and INT64 inputs in binary
(the client's default) and JSON form, a subset of outputs, and the errors a client meets.

    oip_client.py HOST:PORT MODEL

MODEL takes x: FP32 [-1, 4], img: UINT8 [-1, -1, -1], ids: INT64 [-1, -1] and returns
y = x * 2 + 1 (FP32), mean = img's mean over its last two dimensions (FP32), next = ids + 1
(INT64). Exits non-zero with the first broken expectation.
"""
import sys

import numpy as np
import tritonclient.http as http
from tritonclient.utils import InferenceServerException


def check(what, ok, detail=""):
    if not ok:
        sys.exit(f"FAIL {what} {detail}")
    print(f"ok   {what}")


def inputs(x, img, ids, binary):
    out = []
    for name, arr, dt in [("x", x, "FP32"), ("img", img, "UINT8"), ("ids", ids, "INT64")]:
        t = http.InferInput(name, list(arr.shape), dt)
        t.set_data_from_numpy(arr, binary_data=binary)
        out.append(t)
    return out


def expect_error(what, call, *needles):
    try:
        call()
    except InferenceServerException as e:
        text = str(e)
        check(what, all(n in text for n in needles), repr(text))
        return
    sys.exit(f"FAIL {what}: no error")


def main():
    url, model = sys.argv[1], sys.argv[2]
    c = http.InferenceServerClient(url=url)
    check("server live", c.is_server_live())
    check("server ready", c.is_server_ready())
    meta = c.get_server_metadata()
    check("server metadata", meta["name"] == "tessera" and "binary_tensor_data" in meta["extensions"], meta)

    m = c.get_model_metadata(model)
    names = [(t["name"], t["datatype"]) for t in m["inputs"]]
    check("model metadata inputs", names == [("x", "FP32"), ("img", "UINT8"), ("ids", "INT64")], m)
    check("model metadata outputs", [t["name"] for t in m["outputs"]] == ["y", "mean", "next"], m)
    check("model ready", c.is_model_ready(model))
    check("model ready at its version", c.is_model_ready(model, model_version=m["versions"][0]))
    check("absent model not ready", not c.is_model_ready("absent-model"))

    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    img = rng.integers(0, 256, size=(2, 3, 5), dtype=np.uint8)
    ids = rng.integers(-(2**40), 2**40, size=(2, 3), dtype=np.int64)
    want_y = x * np.float32(2) + np.float32(1)
    want_mean = img.astype(np.float32).mean(axis=(1, 2))
    want_next = ids + 1

    for binary in (True, False):
        label = "binary" if binary else "JSON"
        outs = [http.InferRequestedOutput(n, binary_data=binary) for n in ("y", "mean", "next")]
        r = c.infer(model, inputs(x, img, ids, binary), outputs=outs, request_id=f"req-{label}")
        check(f"infer ({label}) y", np.array_equal(r.as_numpy("y"), want_y), r.as_numpy("y"))
        check(f"infer ({label}) mean", np.allclose(r.as_numpy("mean"), want_mean, rtol=1e-6), r.as_numpy("mean"))
        got = r.as_numpy("next")
        check(f"infer ({label}) next", got.dtype == np.int64 and np.array_equal(got, want_next), got)
        resp = r.get_response()
        check(f"infer ({label}) id and version", resp["id"] == f"req-{label}" and resp["model_version"] == m["versions"][0], resp)

    # The client's defaults: binary inputs, no outputs named (all come back, binary).
    r = c.infer(model, inputs(x, img, ids, True))
    check("infer with the client's defaults", np.array_equal(r.as_numpy("next"), want_next))
    # One output of three, as JSON.
    r = c.infer(model, inputs(x, img, ids, True), outputs=[http.InferRequestedOutput("mean", binary_data=False)])
    check("a subset of outputs", r.as_numpy("y") is None and np.allclose(r.as_numpy("mean"), want_mean))
    # Batch of one, other sizes: any size on -1 dimensions.
    r = c.infer(model, inputs(x[:1], img[:1, :2], ids[:1], True))
    check("another batch size", np.array_equal(r.as_numpy("y"), want_y[:1]))

    bad = inputs(x, img, ids, True)
    bad[0] = http.InferInput("x", [2, 4], "FP64")
    bad[0].set_data_from_numpy(x.astype(np.float64))
    expect_error("wrong datatype", lambda: c.infer(model, bad), "'x' must be FP32")
    short = inputs(x, img, ids, True)[:2]
    expect_error("missing input", lambda: c.infer(model, short), "'ids' is missing")
    wrong = inputs(x.reshape(4, 2), img, ids, True)
    expect_error("wrong shape", lambda: c.infer(model, wrong), "'x' must have shape")
    expect_error("absent model", lambda: c.infer("absent-model", inputs(x, img, ids, True)), "not found")
    expect_error("unknown output", lambda: c.infer(model, inputs(x, img, ids, True),
                 outputs=[http.InferRequestedOutput("nope")]), "unknown output 'nope'")
    print("oip client: all checks passed")


if __name__ == "__main__":
    main()
