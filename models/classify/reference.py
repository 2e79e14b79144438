#!/usr/bin/env python3
"""The TorchServe baseline's answer for a request, in Python (eager network, the baseline's
preprocessing and softmax): the reference Tessera's classifier must match (top1 equal, score
within 1e-4, as the baseline's own run.sh checks servers).

    python models/classify/reference.py --arch tiny < request.json   # {"top1": .., "score": ..}
"""
import argparse
import base64
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classify import network, preprocess  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny", choices=["tiny", "resnet18"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    requests = json.load(sys.stdin)
    if isinstance(requests, dict):
        requests = [requests]
    net = network(args.arch, args.seed)
    answers = []
    with torch.inference_mode():
        for r in requests:
            probs = torch.softmax(net(preprocess(base64.b64decode(r["image"]))), dim=1)[0]
            score, top1 = probs.max(dim=0)
            answers.append({"top1": int(top1), "score": float(score)})
    print(json.dumps(answers))


if __name__ == "__main__":
    main()
