#!/usr/bin/env python3
"""Export the image classifier of the TorchServe comparison (`tiny` or `resnet18`, the
baseline's seeded weights) to TorchScript for Tessera: uint8 [N, 224, 224, 3] -> (score f32 [N],
top1 i64 [N]); see classify.py.

    python models/classify/export.py --arch tiny --out tiny.pt
"""
import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from classify import SIZE, classifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="tiny", choices=["tiny", "resnet18"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = classifier(args.arch, args.seed)
    example = torch.randint(0, 256, (2, SIZE, SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.11 marks TorchScript deprecated; it works
        traced = torch.jit.trace(model, example)
        traced.save(args.out)
    print(f"wrote {args.out}: {args.arch}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")


if __name__ == "__main__":
    main()
