#!/usr/bin/env python3
"""Export the example image-to-image model to TorchScript.

A small convolutional network that "restyles" an RGB image: it takes the image as uint8
[H, W, 3] plus a blend strength, and returns uint8 [H, W, 3]. It exists to exercise Tessera
end to end (handler, forward, residency) without a large download. Weights are random from a
fixed seed, so the same command always writes the same file; `--width`/`--depth` scale its size
(the residency tests pack differently sized copies).

    python models/example/export.py --out model.pt [--width 16] [--depth 2] [--seed 0]
"""
import argparse

import torch
from torch import nn


class Restyle(nn.Module):
    def __init__(self, width: int, depth: int):
        super().__init__()
        self.inp = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU()) for _ in range(depth)]
        )
        self.out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, image: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        x = image.permute(2, 0, 1).unsqueeze(0).to(self.inp.weight.dtype) / 255.0
        y = torch.sigmoid(self.out(self.blocks(torch.relu(self.inp(x)))))
        s = strength.to(x.dtype).reshape(1, 1, 1, 1).clamp(0.0, 1.0)
        mixed = x * (1.0 - s) + y * s
        return (mixed[0].permute(1, 2, 0) * 255.0).round().clamp(0, 255).to(torch.uint8)


class OutOfMemory(nn.Module):
    """Test-only: a forward that asks for 4 TiB, to exercise the server's out-of-memory path."""

    def forward(self, image: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        big = torch.empty([1 << 40], dtype=torch.float32, device=image.device)
        return big[:1] + strength


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--oom", action="store_true", help="test-only model whose forward runs out of memory")
    args = ap.parse_args()
    if args.oom:
        torch.jit.script(OutOfMemory()).save(args.out)
        print(f"wrote {args.out}: out-of-memory test model")
        return
    torch.manual_seed(args.seed)
    model = Restyle(args.width, args.depth).eval()
    scripted = torch.jit.script(model)
    scripted.save(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n} parameters ({n * 4 / 2**20:.2f} MiB fp32)")


if __name__ == "__main__":
    main()
