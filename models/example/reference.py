#!/usr/bin/env python3
"""Reference pipeline for the example model: what the Tessera handler + model must produce.

Reads a JSON request (the same body sent to the server) on stdin, runs the TorchScript file
on it exactly as a Python serving stack would (decode the PNG, build the tensors, forward,
encode PNG) and prints the raw output pixels' sha256 and shape as JSON.

    python models/example/reference.py model.pt < request.json
"""
import base64
import hashlib
import io
import json
import sys

import numpy as np
import torch
from PIL import Image


def main() -> None:
    model = torch.jit.load(sys.argv[1], map_location="cpu").eval()
    req = json.load(sys.stdin)
    img = np.array(Image.open(io.BytesIO(base64.b64decode(req["image"]))).convert("RGB"))
    args = req.get("gen_args") or {}
    if isinstance(args, str):
        args = json.loads(args) if args.strip() else {}
    strength = torch.tensor([float(args.get("strength", 1.0))], dtype=torch.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(img), strength).numpy()
    print(json.dumps({"shape": list(out.shape), "sha256": hashlib.sha256(out.tobytes()).hexdigest(),
                      "pixels": base64.b64encode(out.tobytes()).decode()}))


if __name__ == "__main__":
    main()
