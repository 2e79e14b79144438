#!/usr/bin/env python3
"""Export LaMa (big-lama generator) to TorchScript for Tessera.

Weights, one of:
  --checkpoint best.ckpt   the official big-lama Lightning checkpoint (generator.* keys, strict)
  --torchscript big-lama.pt  a ready TorchScript LaMa taking (image [1,3,H,W] in [0,1],
                           mask [1,1,H,W] in {0,1}) and returning the inpainted image
  --random                 full-size random weights (benchmarks)
  --tiny                   the same architecture at CI size (ngf 8, 2 blocks), random weights
Options: --fp16 (GPU), --seed, --save-state-dict FILE (the generator weights, for parity tests),
--optimize (freeze and fold batch norm into the convolutions, for the --device it runs on).

    python models/lama/export.py --tiny --out lama.pt --save-state-dict lama.pth
"""
import argparse
import os
import sys

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lama import FFCResNetGenerator, FftWarmUp, LamaInpaint, tiny_generator  # noqa: E402


class TorchScriptLama(FftWarmUp):
    """Adapts a ready TorchScript LaMa (float image + mask in, float image out) to Tessera's
    uint8 interface, with the same exact-composite rule as LamaInpaint."""

    def __init__(self, inner: torch.jit.ScriptModule, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        img = image.permute(2, 0, 1).unsqueeze(0).to(self.dtype) / 255.0
        hole = (mask > 0).to(self.dtype)[None, None]
        pred = self.inner(img, hole)
        pred_u8 = (pred[0].permute(1, 2, 0).float() * 255.0).round().clamp(0, 255).to(torch.uint8)
        return torch.where((mask > 0).unsqueeze(-1), pred_u8, image)


def randomize(generator: nn.Module, seed: int) -> None:
    """Random weights, and random batch-norm statistics so activations stay in range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in generator.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def load_checkpoint(generator: nn.Module, path: str) -> None:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt)
    gen = {k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")}
    if not gen:
        raise SystemExit(f"{path}: no 'generator.*' weights (is this a big-lama checkpoint?)")
    generator.load_state_dict(gen, strict=True)


def build(args) -> nn.Module:
    dtype = torch.float16 if args.fp16 else torch.float32
    if args.torchscript:
        inner = torch.jit.load(args.torchscript, map_location="cpu").eval()
        if args.fp16:
            inner = inner.half()
        return TorchScriptLama(inner, dtype)
    torch.manual_seed(args.seed)
    generator = tiny_generator() if args.tiny else FFCResNetGenerator()
    if args.checkpoint:
        load_checkpoint(generator, args.checkpoint)
    else:
        randomize(generator, args.seed)
    if args.save_state_dict:
        torch.save(generator.state_dict(), args.save_state_dict)
    generator = generator.eval()
    if args.fp16:
        generator = generator.half()
    return LamaInpaint(generator, dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint")
    src.add_argument("--torchscript")
    src.add_argument("--random", action="store_true")
    src.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-state-dict")
    ap.add_argument("--optimize", action="store_true")
    ap.add_argument("--device", default="cpu", help="device the export is optimised on (with --optimize)")
    args = ap.parse_args()
    model = build(args).eval().to(args.device)
    scripted = torch.jit.script(model)
    if args.optimize:
        # Freezing inlines the weights and lets TorchScript fold each BatchNorm into the
        # convolution before it; the result is specialised for --device. It keeps only
        # `forward` unless told: Tessera's warm-up method too. (optimize_for_inference on top
        # writes graphs that torch 2.11 cannot load back: "required keyword attribute 'value'
        # is undefined".)
        scripted = torch.jit.freeze(scripted, preserved_attrs=["warm_up"])
    scripted.save(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n / 1e6:.2f} M parameters, {'fp16' if args.fp16 else 'fp32'}")


if __name__ == "__main__":
    main()
