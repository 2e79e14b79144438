#!/usr/bin/env python3
"""Drives SageMaker's multi-model container contract against a running server, the way the
platform does: /ping until healthy, LoadModel with the directory SageMaker unpacked a model
archive into (/opt/ml/models/<name>/model), ListModels, DescribeModel, invoke with the
X-Amzn-SageMaker-Target-Model header, UnloadModel, and the contract's status codes (409 for a
model already loaded, 404 for one that is not, 507 for one that does not fit).

    sagemaker_contract.py BASE_URL MODEL_ROOT ARCHIVE BIG_ARCHIVE REQUEST_JSON

MODEL_ROOT plays /opt/ml/models (the server's model root); ARCHIVE is a model archive that fits,
BIG_ARCHIVE one that cannot fit the server's memory budget; REQUEST_JSON an inference request
body for ARCHIVE's model. Standard library only, so it runs against a container as well.
Exits non-zero with the first broken rule.
"""
import json
import os
import sys
import tarfile
import time
import urllib.error
import urllib.request


def call(method, url, body=None, headers=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in req.headers:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def expect(what, got, want, body=b""):
    if got != want:
        sys.exit(f"FAIL {what}: status {got}, expected {want}: {body[:300]!r}")
    print(f"ok   {what}: {got}")


def unpack_as_sagemaker(archive, root, name):
    """SageMaker downloads model.tar.gz and unpacks it into <root>/<name>/model."""
    dest = os.path.join(root, name, "model")
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(archive) as t:
        t.extractall(dest, filter="data")
    return dest


def main():
    base, root, archive, big_archive, request_file = sys.argv[1:6]
    request = open(request_file, "rb").read()
    deadline = time.time() + 120
    while True:
        try:
            status, body = call("GET", f"{base}/ping")
        except OSError:
            status, body = 0, b""
        if status == 200 or time.time() > deadline:
            break
        time.sleep(0.2)
    expect("GET /ping", status, 200, body)

    status, body = call("GET", f"{base}/models")
    expect("ListModels, nothing loaded", status, 200, body)
    if json.loads(body)["models"]:
        sys.exit(f"FAIL ListModels lists models before any LoadModel: {body!r}")

    url = unpack_as_sagemaker(archive, root, "m1")
    status, body = call("POST", f"{base}/models", {"model_name": "m1", "url": url})
    expect("LoadModel from the unpacked directory", status, 200, body)
    status, body = call("POST", f"{base}/models", {"model_name": "m1", "url": url})
    expect("LoadModel again: already loaded", status, 409, body)

    status, body = call("GET", f"{base}/models")
    expect("ListModels", status, 200, body)
    listed = json.loads(body)["models"]
    if [m["modelName"] for m in listed] != ["m1"] or listed[0]["modelUrl"] != url:
        sys.exit(f"FAIL ListModels: {listed!r}")
    status, body = call("GET", f"{base}/models/m1")
    expect("DescribeModel", status, 200, body)
    if json.loads(body)["modelName"] != "m1":
        sys.exit(f"FAIL DescribeModel: {body!r}")

    target = {"X-Amzn-SageMaker-Target-Model": "m1.tar.gz", "Content-Type": "application/json"}
    status, body = call("POST", f"{base}/models/m1/invoke", request, target)
    expect("InvokeModel", status, 200, body)
    first = body
    status, body = call("POST", f"{base}/models/m1/invoke", request, target)
    expect("InvokeModel again", status, 200, body)
    if body != first:
        sys.exit("FAIL the same request answered differently")

    status, body = call("POST", f"{base}/models/absent/invoke", request, target)
    expect("InvokeModel of a model not loaded", status, 404, body)
    status, body = call("GET", f"{base}/models/absent")
    expect("DescribeModel of a model not loaded", status, 404, body)
    missing = os.path.join(root, "absent", "model")
    status, body = call("POST", f"{base}/models", {"model_name": "absent", "url": missing})
    expect("LoadModel from a directory that does not exist", status, 404, body)

    big = unpack_as_sagemaker(big_archive, root, "big")
    status, body = call("POST", f"{base}/models", {"model_name": "big", "url": big})
    expect("LoadModel of a model that cannot fit", status, 507, body)
    status, body = call("GET", f"{base}/models/big")
    expect("a model that did not load is not listed", status, 404, body)

    status, body = call("DELETE", f"{base}/models/m1")
    expect("UnloadModel", status, 200, body)
    status, body = call("DELETE", f"{base}/models/m1")
    expect("UnloadModel again", status, 404, body)
    status, body = call("POST", f"{base}/models/m1/invoke", request, target)
    expect("InvokeModel after unload", status, 404, body)

    status, body = call("POST", f"{base}/models", {"model_name": "m1", "url": url})
    expect("LoadModel after unload", status, 200, body)
    status, body = call("POST", f"{base}/models/m1/invoke", request, target)
    expect("InvokeModel after reload", status, 200, body)
    if body != first:
        sys.exit("FAIL a reloaded model answered differently")
    print("sagemaker contract: all checks passed")


if __name__ == "__main__":
    main()
