"""The parameter layout of the official big-lama generator, written out from the public
reference implementation (saicinpainting/training/modules/ffc.py, FFCResNetGenerator with the
big-lama config) independently of our module, so a test can check that a checkpoint with the
official names loads into ours with strict=True.

In the reference, `generator.model` is an nn.Sequential:
  0 ReflectionPad2d(3)           1 FFC_BN_ACT(4 -> 64, 7x7, ratio 0 -> 0)
  2 FFC_BN_ACT(64 -> 128, s2)    3 FFC_BN_ACT(128 -> 256, s2)   4 FFC_BN_ACT(256 -> 512, s2, 0 -> 0.75)
  5..22 FFCResnetBlock(512, ratio 0.75, no LFU): conv1, conv2 = FFC_BN_ACT
  23 ConcatTupleLayer
  24/27/30 ConvTranspose2d(512->256, 256->128, 128->64)   25/28/31 BatchNorm2d   26/29/32 ReLU
  33 ReflectionPad2d(3)   34 Conv2d(64 -> 3, 7x7)   35 Sigmoid
An FFC holds convl2l/convl2g/convg2l (Conv2d, bias=False) and convg2g (SpectralTransform:
conv1 = Sequential(Conv2d 1x1, BatchNorm2d, ReLU), fu.conv_layer (1x1 over 2x channels),
fu.bn, conv2 1x1); parts with zero channels are Identity and hold nothing. FFC_BN_ACT adds bn_l
and bn_g (BatchNorm2d, or Identity where that part has no channels).
"""
from typing import Dict, List, Tuple

Shape = Tuple[int, ...]


def _bn(prefix: str, c: int) -> Dict[str, Shape]:
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def _ffc_bn_act(prefix: str, cin: int, cout: int, k: int, rin: float, rout: float) -> Dict[str, Shape]:
    in_g, out_g = int(cin * rin), int(cout * rout)
    in_l, out_l = cin - in_g, cout - out_g
    keys: Dict[str, Shape] = {}
    if in_l and out_l:
        keys[f"{prefix}.ffc.convl2l.weight"] = (out_l, in_l, k, k)
    if in_l and out_g:
        keys[f"{prefix}.ffc.convl2g.weight"] = (out_g, in_l, k, k)
    if in_g and out_l:
        keys[f"{prefix}.ffc.convg2l.weight"] = (out_l, in_g, k, k)
    if in_g and out_g:
        half = out_g // 2
        st = f"{prefix}.ffc.convg2g"
        keys[f"{st}.conv1.0.weight"] = (half, in_g, 1, 1)
        keys.update(_bn(f"{st}.conv1.1", half))
        keys[f"{st}.fu.conv_layer.weight"] = (half * 2, half * 2, 1, 1)
        keys.update(_bn(f"{st}.fu.bn", half * 2))
        keys[f"{st}.conv2.weight"] = (out_g, half, 1, 1)
    if out_l:
        keys.update(_bn(f"{prefix}.bn_l", out_l))
    if out_g:
        keys.update(_bn(f"{prefix}.bn_g", out_g))
    return keys


def generator_keys(ngf: int = 64, n_blocks: int = 18, ratio: float = 0.75) -> Dict[str, Shape]:
    keys = _ffc_bn_act("model.1", 4, ngf, 7, 0, 0)
    chans: List[int] = [ngf, ngf * 2, ngf * 4, ngf * 8]
    for i in range(3):
        keys.update(_ffc_bn_act(f"model.{2 + i}", chans[i], chans[i + 1], 3, 0, ratio if i == 2 else 0))
    for b in range(n_blocks):
        for conv in ("conv1", "conv2"):
            keys.update(_ffc_bn_act(f"model.{5 + b}.{conv}", chans[3], chans[3], 3, ratio, ratio))
    idx = 5 + n_blocks + 1  # after the ConcatTupleLayer
    for i in range(3):
        cin, cout = chans[3 - i], chans[2 - i]
        keys[f"model.{idx}.weight"] = (cin, cout, 3, 3)  # ConvTranspose2d: (in, out, k, k)
        keys[f"model.{idx}.bias"] = (cout,)
        keys.update(_bn(f"model.{idx + 1}", cout))
        idx += 3
    idx += 1  # ReflectionPad2d
    keys[f"model.{idx}.weight"] = (3, ngf, 7, 7)
    keys[f"model.{idx}.bias"] = (3,)
    return keys
