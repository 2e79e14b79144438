#!/usr/bin/env python3
"""Export Segment Anything (reference code: PyPI `segment-anything-py`) to TorchScript for
Tessera, split in two so the expensive part is reused:

  encoder.pt  (image uint8 [1024, 1024, 3]: the photo resized to longest side 1024 and
              zero-padded to the square by the handler, image_hw i64 [2]: the resized photo's
              height and width) -> image embeddings [1, 256, 64, 64]. Normalisation and the
              zero padding are done here, as SamPredictor does them; the input shape never
              changes, so a new photo size costs no new specialisation or plan.
  decoder.pt  a batch of B clicks (one per photo, batched by the host along dimension 0):
              image embeddings [B, ...], point_coords f32 [B, N, 2] in original pixels,
              point_labels f32 [B, N], orig_hw i64 [B, 2], mask_index i64 [B], -1 = best ->
              (masks uint8 [B, M] in {0, 1}, row b its photo's h x w mask row-major in its
              first h*w bytes, M the batch's largest h*w; iou_predictions f32 [B, 3], chosen
              index i64 [B]).
              Coordinate scaling, the padding point SAM adds without a box, mask choice,
              upscaling, crop and threshold are done here.

Weights: --checkpoint sam_vit_h_4b8939.pth (official), --random (full size), or --tiny (the same
architecture, CI-sized). --variant vit_b | vit_l | vit_h.

    python models/sam/export.py --variant vit_b --random --out-dir build/sam_vit_b

Also writes OUT_DIR/warmup.json, a small click request for `tessera.warmup` (an archive asset).
"""
import argparse
import copy
import os
from functools import partial
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

IMG = 1024


def tiny_sam() -> Sam:
    """SAM's architecture at CI size: a 2-block ViT (one windowed, one global), 32-dim prompts."""
    dim = 32
    return Sam(
        image_encoder=ImageEncoderViT(depth=2, embed_dim=48, img_size=IMG, mlp_ratio=2,
                                      norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=2, patch_size=16,
                                      qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1], window_size=14,
                                      out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(IMG // 16, IMG // 16),
                                     input_image_size=(IMG, IMG), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
                                 transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=32),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def randomize(sam: Sam, seed: int) -> None:
    """Random weights that keep activations in range (the defaults leave some layers at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def build(variant: str, checkpoint, tiny: bool, seed: int) -> Sam:
    # Buffers (the prompt encoder's random Fourier features) come from the global generator.
    torch.manual_seed(seed)
    if tiny:
        sam = tiny_sam()
        randomize(sam, seed)
    else:
        sam = sam_model_registry[variant](checkpoint=None)
        if checkpoint:
            state = torch.load(checkpoint, map_location="cpu")
            sam.load_state_dict(state, strict=True)
        else:
            randomize(sam, seed)
    return sam.eval()


# TorchScript cannot read module globals: the scripted wrappers spell 1024 (SAM's input
# size) out.
class Encoder(nn.Module):
    """uint8 [1024, 1024, 3] (the photo resized to longest side 1024, zero-padded to the square
    by the handler) + int64 [2] (the resized photo's height and width) -> embeddings; wraps the
    traced ViT. Every call has the same input shapes whatever the photo's size, so nothing
    in the encoder is specialised or planned again for a new photo size. Normalising the
    padded square and zeroing what lies outside the photo equals SAM's normalise-then-pad."""

    def __init__(self, vit: nn.Module, mean: Tensor, std: Tensor, vit_dtype: torch.dtype, out_dtype: torch.dtype):
        super().__init__()
        self.vit = vit
        self.register_buffer("mean", mean.reshape(1, 3, 1, 1))
        self.register_buffer("std", std.reshape(1, 3, 1, 1))
        # Empty tensors that carry the ViT's dtype and the embeddings' (the decoder's): the
        # ViT may run in a lower precision than the rest (export's --encoder-dtype).
        self.register_buffer("vit_dtype", torch.zeros(0, dtype=vit_dtype))
        self.register_buffer("out_dtype", torch.zeros(0, dtype=out_dtype))

    def forward(self, image: Tensor, image_hw: Tensor) -> Tensor:
        x = image.permute(2, 0, 1).unsqueeze(0).to(self.mean.dtype)
        x = (x - self.mean) / self.std
        hw = image_hw.to(x.device)
        rows = torch.arange(1024, device=x.device).reshape(1, 1, 1024, 1) < hw[0]
        cols = torch.arange(1024, device=x.device).reshape(1, 1, 1, 1024) < hw[1]
        x = torch.where(rows & cols, x, torch.zeros_like(x))
        return self.vit(x.to(self.vit_dtype.dtype)).to(self.out_dtype.dtype)


class PromptCore(nn.Module):
    """Prompt encoder (points only, plus SAM's padding point) and mask decoder, written with
    trace-friendly tensor ops so the traced graph takes any number of points."""

    def __init__(self, sam: Sam):
        super().__init__()
        self.prompt = sam.prompt_encoder
        self.decoder = sam.mask_decoder

    def forward(self, emb: Tensor, coords: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        # coords [B, N, 2] in the 1024-frame, labels [B, N] (one click on each of B photos,
        # row b for emb[b]); SAM appends a "not a point".
        pad_c = torch.zeros_like(coords[:, :1])
        pad_l = -torch.ones_like(labels[:, :1])
        coords = torch.cat([coords, pad_c], dim=1) + 0.5
        labels = torch.cat([labels, pad_l], dim=1)
        pe = self.prompt.pe_layer.forward_with_coords(coords, (IMG, IMG))
        lab = labels.unsqueeze(-1)
        pe = pe * (lab != -1)
        pe = pe + self.prompt.not_a_point_embed.weight * (lab == -1)
        pe = pe + self.prompt.point_embeddings[0].weight * (lab == 0)
        pe = pe + self.prompt.point_embeddings[1].weight * (lab == 1)
        dense = self.prompt.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            emb.shape[0], -1, emb.shape[-2], emb.shape[-1])
        return self.decode(emb, pe, dense)

    def decode(self, emb: Tensor, sparse: Tensor, dense: Tensor) -> Tuple[Tensor, Tensor]:
        """MaskDecoder.predict_masks with the three multimask outputs, one prompt per image.
        Written out because its `repeat_interleave(..., tokens.shape[0])` (several prompts on
        one image) traces into a CPU-side count that breaks the graph on CUDA; with one prompt
        per image it is the identity."""
        d = self.decoder
        tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0).unsqueeze(0)
        tokens = tokens.expand(sparse.shape[0], -1, -1)
        tokens = torch.cat((tokens, sparse), dim=1)
        src = emb + dense
        b, c, h, w = src.shape
        hs, src = d.transformer(src, self.prompt.get_dense_pe(), tokens)
        iou_out = hs[:, 0, :]
        mask_out = hs[:, 1: 1 + d.num_mask_tokens, :]
        up = d.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = torch.stack([mlp(mask_out[:, i, :]) for i, mlp in enumerate(d.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = up.shape
        masks = (hyper @ up.reshape(b, c, h * w)).reshape(b, -1, h, w)
        iou = d.iou_prediction_head(iou_out)
        return masks[:, 1:], iou[:, 1:]


class Decoder(nn.Module):
    """A batch of clicks, row b one click on one photo (rows share N, the points per click):
    embeddings [B, C, 64, 64], point_coords f32 [B, N, 2] in original pixels, point_labels
    f32 [B, N], orig_hw i64 [B, 2], mask_index i64 [B] (0-2, or -1 for the highest predicted
    IoU) -> (masks uint8 [B, M]: row b's mask at its photo's h x w, row-major, in its first
    h*w bytes, M the batch's largest h*w, zeros after; iou_predictions f32 [B, 3]; chosen
    index i64 [B]). Only the chosen masks are upscaled and copied back."""

    def __init__(self, core: nn.Module, threshold: float = 0.0):
        super().__init__()
        self.core = core
        self.threshold = threshold

    def forward(self, emb: Tensor, point_coords: Tensor, point_labels: Tensor, orig_hw: Tensor,
                mask_index: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        hw = orig_hw.cpu()
        wanted = mask_index.reshape(-1).cpu()
        coords = point_coords.to(emb.dtype).clone()
        sizes: List[Tuple[int, int, int, int]] = []
        for b in range(hw.shape[0]):
            h = int(hw[b, 0])
            w = int(hw[b, 1])
            scale = 1024.0 / float(max(h, w))
            newh = int(h * scale + 0.5)
            neww = int(w * scale + 0.5)
            coords[b, :, 0] = coords[b, :, 0] * (float(neww) / float(w))
            coords[b, :, 1] = coords[b, :, 1] * (float(newh) / float(h))
            sizes.append((h, w, newh, neww))
        low_res, iou = self.core(emb, coords, point_labels.to(emb.dtype))
        best = torch.zeros_like(wanted)
        if bool((wanted < 0).any()):
            best = torch.argmax(iou, dim=1).cpu()
        masks: List[Tensor] = []
        chosen: List[int] = []
        for b in range(len(sizes)):
            h, w, newh, neww = sizes[b]
            idx = int(wanted[b])
            if idx < 0:
                idx = int(best[b])
            mask = low_res[b: b + 1, idx: idx + 1].float()
            mask = F.interpolate(mask, [1024, 1024], mode="bilinear", align_corners=False)
            mask = mask[..., :newh, :neww]
            mask = F.interpolate(mask, [h, w], mode="bilinear", align_corners=False)
            masks.append((mask[0, 0] > self.threshold).to(torch.uint8))
            chosen.append(idx)
        index = torch.tensor(chosen, dtype=torch.int64)
        if len(masks) == 1:
            return masks[0].reshape(1, -1), iou.float(), index
        # Row b holds its photo's h*w mask first: padding to the batch's largest mask, not to
        # its largest height and width (a tall and a wide photo would square each other).
        out = torch.zeros([len(masks), max([m.numel() for m in masks])], dtype=torch.uint8, device=emb.device)
        for b in range(len(masks)):
            out[b, :masks[b].numel()] = masks[b].reshape(-1)
        return out, iou.float(), index


def encoder(sam: Sam, device: str = "cpu", dtype: torch.dtype = torch.float32, encoder_dtype=None):
    """The scripted Encoder; `encoder_dtype` (default `dtype`) is the ViT's precision: the photo
    is normalised in `dtype` and the embeddings come back in `dtype`."""
    vit_dtype = encoder_dtype or dtype
    vit_module = sam.image_encoder.to(device=device)
    if vit_dtype != dtype:  # a copy: `sam` keeps its precision (the decoder shares nothing with it)
        vit_module = copy.deepcopy(vit_module).to(dtype=vit_dtype)
    with torch.no_grad():
        vit = torch.jit.trace(vit_module, torch.zeros(1, 3, IMG, IMG, device=device, dtype=vit_dtype))
    mean = sam.pixel_mean.reshape(3).to(device=device, dtype=dtype)
    std = sam.pixel_std.reshape(3).to(device=device, dtype=dtype)
    return torch.jit.script(Encoder(vit, mean, std, vit_dtype, dtype))


def export(sam: Sam, out_dir: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
           encoder_dtype=None) -> None:
    os.makedirs(out_dir, exist_ok=True)
    sam = sam.to(device=device, dtype=dtype)
    with torch.no_grad():
        encoder(sam, device, dtype, encoder_dtype).save(os.path.join(out_dir, "encoder.pt"))
        emb = torch.zeros(1, sam.prompt_encoder.embed_dim, IMG // 16, IMG // 16, device=device, dtype=dtype)
        # Traced at 2 photos x 2 points: both sizes stay symbolic in the graph.
        emb = emb.expand(2, -1, -1, -1).contiguous()
        core = torch.jit.trace(PromptCore(sam), (emb, torch.zeros(2, 2, 2, device=device, dtype=dtype),
                                                torch.ones(2, 2, device=device, dtype=dtype)))
        torch.jit.script(Decoder(core)).save(os.path.join(out_dir, "decoder.pt"))


def write_warmup(path: str) -> None:
    """A small click for `tessera.warmup`, replayed after each load: the encoder sees the one
    input shape every photo gives it, so TorchScript's profiling and fusion for it (seconds on
    a GPU) and CUDA's one-time set-up happen before the first user's click."""
    import base64
    import io
    import json

    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:48, 0:64]
    image = np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    with open(path, "w") as f:
        json.dump({"image": base64.b64encode(buf.getvalue()).decode(),
                   "gen_args": {"point_coords": [32, 20], "point_labels": 1}}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint")
    src.add_argument("--random", action="store_true")
    src.add_argument("--tiny", action="store_true")
    ap.add_argument("--variant", default="vit_h", choices=["vit_b", "vit_l", "vit_h"])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--save-state-dict", help="also save the weights (for parity tests)")
    ap.add_argument("--encoder-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the image encoder's (ViT's) precision; the photo's normalisation, the "
                         "embeddings and the prompt decoder stay float32")
    args = ap.parse_args()
    sam = build(args.variant, args.checkpoint, args.tiny, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.save_state_dict:
        torch.save(sam.state_dict(), args.save_state_dict)
    export(sam, args.out_dir, args.device, encoder_dtype=getattr(torch, args.encoder_dtype))
    write_warmup(os.path.join(args.out_dir, "warmup.json"))
    n = sum(p.numel() for p in sam.parameters())
    print(f"wrote {args.out_dir}/encoder.pt, decoder.pt, warmup.json: {'tiny' if args.tiny else args.variant}, {n / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
