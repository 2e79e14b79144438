#!/usr/bin/env python3
"""Export Stable Diffusion 2 inpainting (reference code: PyPI `diffusers` + `transformers`) to one
TorchScript file for Tessera, the whole denoising loop included.

  sd.pt  (input_ids i64 [2, 77] (negative prompt, prompt), image u8 [H, W, 3], mask u8 [H, W],
          steps i64 [], guidance f32 [], seed i64 []) -> image u8 [H, W, 3]

The text encoder, 9-channel UNet and AutoencoderKL are traced; the loop around them is scripted
and runs on the device: classifier-free guidance, masked-image latents, and the scheduler that the
checkpoint's scheduler_config.json names (DDIM, PNDM or Euler discrete). The noise comes from a
CPU torch.Generator seeded with `seed` and is drawn in diffusers' order (initial latents, then the
masked image's VAE sample), so a seed gives the same noise as
`StableDiffusionInpaintPipeline(..., generator=torch.Generator("cpu").manual_seed(seed))`.
The schedules (timesteps, sigmas) for every step count up to --max-steps are computed by
diffusers' own scheduler class at export time and stored in the module.

Weights: --pretrained DIR (a folder saved with `save_pretrained`, as the seed stores it),
--random (full size) or --tiny (the same architecture, CI-sized). The tokenizer files go to
OUT_DIR/tokenizer/ and a small warm-up request to OUT_DIR/warmup.json (the archive's assets).

    python models/sd/export.py --random --device cuda --fp16 --out-dir build/sd
"""
import argparse
import json
import os
import shutil
import sys
from typing import List

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tokenizer_files  # noqa: E402

from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,  # noqa: E402
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

MAX_LEN = 77

# stabilityai/stable-diffusion-2-inpainting, as its model_index.json and component configs give it.
UNET_SD2 = dict(
    sample_size=64, in_channels=9, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=1024, use_linear_projection=True, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1,
    center_input_sample=False, dual_cross_attention=False, upcast_attention=False,
)
VAE_SD2 = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", norm_num_groups=32, sample_size=512,
    scaling_factor=0.18215,
)
TEXT_SD2 = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
    num_hidden_layers=23, max_position_embeddings=MAX_LEN, hidden_act="gelu", layer_norm_eps=1e-5,
    projection_dim=512, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
SCHEDULER_SD2 = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
}

# The same architectures at CI size. The UNet keeps SD2's 64x64 latent (512² images, what
# crop-for-filling produces) so the whole pipeline is exercised at its real geometry.
UNET_TINY = dict(UNET_SD2, block_out_channels=(32, 64), attention_head_dim=(2, 4), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8)
VAE_TINY = dict(VAE_SD2, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
TEXT_TINY = dict(TEXT_SD2, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                 projection_dim=32)

SCHEDULERS = {"DDIMScheduler": DDIMScheduler, "PNDMScheduler": PNDMScheduler,
              "EulerDiscreteScheduler": EulerDiscreteScheduler}


class Parts:
    def __init__(self, text_encoder, unet, vae, scheduler_config: dict):
        self.text_encoder, self.unet, self.vae, self.scheduler_config = text_encoder, unet, vae, scheduler_config


def random_parts(tiny: bool, seed: int, scheduler: str, device: str = "cpu") -> Parts:
    """Random weights (PyTorch's default initialisation), built on `device` (fast on a GPU)."""
    torch.manual_seed(seed)
    with torch.device(device):
        text = CLIPTextModel(CLIPTextConfig(**(TEXT_TINY if tiny else TEXT_SD2)))
        unet = UNet2DConditionModel(**(UNET_TINY if tiny else UNET_SD2))
        vae = AutoencoderKL(**(VAE_TINY if tiny else VAE_SD2))
    cfg = dict(SCHEDULER_SD2)
    if scheduler != "PNDMScheduler":
        cfg = dict(SCHEDULERS[scheduler].from_config(cfg).config, _class_name=scheduler)
    return Parts(text, unet, vae, cfg)


def pretrained_parts(folder: str) -> Parts:
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        cfg = json.load(f)
    return Parts(CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                 UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
                 AutoencoderKL.from_pretrained(folder, subfolder="vae"), cfg)


def save_pretrained(parts: Parts, folder: str) -> None:
    """The pipeline folder diffusers' `save_pretrained` writes (the reference loads it)."""
    from diffusers import StableDiffusionInpaintPipeline
    from transformers import CLIPTokenizer
    tok_dir = os.path.join(folder, "tokenizer")
    tokenizer_files.write(__import__("pathlib").Path(tok_dir))
    scheduler = SCHEDULERS[parts.scheduler_config["_class_name"]].from_config(parts.scheduler_config)
    pipe = StableDiffusionInpaintPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tok_dir),
        unet=parts.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder)


class TextEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)[0]


class UNet(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]


class VaeEncode(nn.Module):
    """vae.encode(x).latent_dist as (mean, std), the terms of its `sample()`."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor):
        dist = self.vae.encode(x).latent_dist
        return dist.mean, dist.std


class VaeDecode(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decode(z, return_dict=False)[0]


def schedule_tables(cfg: dict, max_steps: int):
    """Per step count n (1..max_steps): the timesteps diffusers' scheduler runs and, for Euler, its
    sigmas and initial noise scale; padded into [max_steps + 1, L] tables."""
    sched = SCHEDULERS[cfg["_class_name"]].from_config(cfg)
    rows_t, rows_s, init = [], [], []
    for n in range(1, max_steps + 1):
        sched.set_timesteps(n)
        rows_t.append(sched.timesteps.to(torch.float64))
        rows_s.append(sched.sigmas.to(torch.float32) if hasattr(sched, "sigmas") else torch.zeros(1))
        init.append(float(sched.init_noise_sigma))
    width_t = max(len(r) for r in rows_t)
    width_s = max(len(r) for r in rows_s)
    timesteps = torch.zeros(max_steps + 1, width_t, dtype=torch.float64)
    sigmas = torch.zeros(max_steps + 1, width_s, dtype=torch.float32)
    counts = torch.zeros(max_steps + 1, dtype=torch.int64)
    for n, (t, s) in enumerate(zip(rows_t, rows_s), start=1):
        timesteps[n, : len(t)] = t
        sigmas[n, : len(s)] = s
        counts[n] = len(t)
    return sched, timesteps, sigmas, counts, torch.tensor([0.0] + init, dtype=torch.float32)


class SDInpaint(nn.Module):
    def __init__(self, parts: Parts, text, unet, vae_encode, vae_decode, dtype: torch.dtype, max_steps: int):
        super().__init__()
        cfg = parts.scheduler_config
        kind = cfg["_class_name"]
        if kind not in SCHEDULERS:
            raise SystemExit(f"scheduler {kind} is not supported (DDIM, PNDM, Euler discrete are)")
        sched, timesteps, sigmas, counts, init = schedule_tables(cfg, max_steps)
        prediction = sched.config.prediction_type
        if prediction not in ("epsilon", "v_prediction"):
            raise SystemExit(f"prediction_type {prediction} is not supported")
        for key in ("thresholding", "clip_sample"):
            if sched.config.get(key, False):
                raise SystemExit(f"scheduler option {key} is not supported")
        if kind == "EulerDiscreteScheduler" and (
                sched.config.get("use_karras_sigmas") or sched.config.get("use_exponential_sigmas")
                or sched.config.get("use_beta_sigmas") or sched.config.get("timestep_type") == "continuous"):
            raise SystemExit("Euler with karras/exponential/beta sigmas or continuous timesteps is not supported")
        self.kind = kind
        self.prediction = prediction
        self.text = text
        self.unet = unet
        self.vae_encode = vae_encode
        self.vae_decode = vae_decode
        self.dtype = dtype
        self.num_train = int(sched.config.num_train_timesteps)
        self.max_steps = max_steps
        self.latent_channels = int(parts.vae.config.latent_channels)
        self.scale_factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        self.scaling = float(parts.vae.config.scaling_factor)
        self.register_buffer("alphas_cumprod", sched.alphas_cumprod.to(torch.float32).clone())
        final = getattr(sched, "final_alpha_cumprod", torch.tensor(1.0))
        self.register_buffer("final_alpha_cumprod", torch.as_tensor(final, dtype=torch.float32).clone())
        self.register_buffer("timesteps", timesteps)
        self.register_buffer("sigmas", sigmas)
        self.register_buffer("counts", counts)
        self.register_buffer("init_sigma", init)
        self.register_buffer("anchor", torch.zeros(1, dtype=dtype))

    def alpha(self, t: int) -> Tensor:
        if t >= 0:
            return self.alphas_cumprod[t]
        return self.final_alpha_cumprod

    def ddim_step(self, eps: Tensor, t: int, sample: Tensor, n: int) -> Tensor:
        prev_t = t - self.num_train // n
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alpha(prev_t)
        beta_prod_t = 1 - alpha_prod_t
        if self.prediction == "epsilon":
            pred_original_sample = (sample - beta_prod_t ** (0.5) * eps) / alpha_prod_t ** (0.5)
            pred_epsilon = eps
        else:
            pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * eps
            pred_epsilon = (alpha_prod_t**0.5) * eps + (beta_prod_t**0.5) * sample
        # eta = 0: std_dev_t = 0 * variance ** 0.5
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = 0.0 * variance ** (0.5)
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
        return alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction

    def pndm_prev(self, sample: Tensor, t: int, prev_t: int, eps: Tensor) -> Tensor:
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alpha(prev_t)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        if self.prediction == "v_prediction":
            eps = (alpha_prod_t**0.5) * eps + (beta_prod_t**0.5) * sample
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** (0.5)
        denom = alpha_prod_t * beta_prod_t_prev ** (0.5) + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** (0.5)
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * eps / denom

    def euler_step(self, eps: Tensor, i: int, sample: Tensor, sigmas: Tensor) -> Tensor:
        out_dtype = eps.dtype
        sample = sample.to(torch.float32)
        sigma = sigmas[i]
        sigma_hat = sigma * (0.0 + 1)
        if self.prediction == "epsilon":
            pred_original_sample = sample - sigma_hat * eps
        else:
            pred_original_sample = eps * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        derivative = (sample - pred_original_sample) / sigma_hat
        dt = sigmas[i + 1] - sigma_hat
        return (sample + derivative * dt).to(out_dtype)

    def forward(self, input_ids: Tensor, image: Tensor, mask: Tensor, steps: Tensor, guidance: Tensor,
                seed: Tensor) -> Tensor:
        device = self.anchor.device
        n = int(steps.item())
        if n < 1 or n > self.max_steps:
            raise ValueError("steps must be between 1 and max_steps")
        scale = float(guidance.item())
        cfg = scale > 1.0
        h, w = image.shape[0], image.shape[1]
        if h % self.scale_factor != 0 or w % self.scale_factor != 0:
            raise ValueError("image sides must be multiples of the VAE scale factor")

        ids = input_ids.to(device)
        if cfg:
            embeds = self.text(ids).to(self.dtype)  # [negative; prompt], as diffusers concatenates them
        else:
            embeds = self.text(ids[1:]).to(self.dtype)

        # image_processor / mask_processor: [0, 1] floats, image to [-1, 1], mask binarised at 0.5.
        init_image = (image.to(device).permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 255.0) * 2.0 - 1.0
        mask_f = mask.to(device).unsqueeze(0).unsqueeze(0).to(torch.float32) / 255.0
        mask_condition = (mask_f >= 0.5).to(torch.float32)

        g = torch.Generator()
        g.manual_seed(int(seed.item()))
        lh, lw = h // self.scale_factor, w // self.scale_factor
        noise = torch.randn([1, self.latent_channels, lh, lw], generator=g, dtype=self.dtype).to(device)
        if self.kind == "EulerDiscreteScheduler":
            latents = noise * self.init_sigma[n]
        else:
            latents = noise * 1.0

        masked_image = (init_image * (mask_condition < 0.5)).to(self.dtype)
        small_mask = torch.nn.functional.interpolate(mask_condition, size=[lh, lw]).to(self.dtype)
        mean, std = self.vae_encode(masked_image)
        vae_noise = torch.randn(mean.shape, generator=g, dtype=mean.dtype).to(device)
        masked_latents = self.scaling * (mean + std * vae_noise)
        if cfg:
            small_mask = torch.cat([small_mask, small_mask])
            masked_latents = torch.cat([masked_latents, masked_latents])
        masked_latents = masked_latents.to(self.dtype)

        count = int(self.counts[n].item())
        table = self.timesteps[n]
        sigmas = self.sigmas[n]
        ets: List[Tensor] = []
        cur_sample = latents
        counter = 0
        for i in range(count):
            t_value = float(table[i].item())
            model_in = torch.cat([latents, latents]) if cfg else latents
            if self.kind == "EulerDiscreteScheduler":
                sigma = sigmas[i]
                model_in = model_in / ((sigma**2 + 1) ** 0.5)
            model_in = torch.cat([model_in, small_mask, masked_latents], dim=1)
            t_tensor = torch.full([1], t_value, dtype=torch.float32, device=device)
            eps = self.unet(model_in, t_tensor, embeds)
            if cfg:
                chunks = eps.chunk(2)
                eps = chunks[0] + scale * (chunks[1] - chunks[0])
            if self.kind == "DDIMScheduler":
                latents = self.ddim_step(eps, int(t_value), latents, n)
            elif self.kind == "EulerDiscreteScheduler":
                latents = self.euler_step(eps, i, latents, sigmas)
            else:
                t = int(t_value)
                prev_t = t - self.num_train // n
                if counter != 1:
                    if len(ets) > 3:
                        ets = ets[-3:]
                    ets.append(eps)
                else:
                    prev_t = t
                    t = t + self.num_train // n
                sample = latents
                if len(ets) == 1 and counter == 0:
                    cur_sample = latents
                elif len(ets) == 1 and counter == 1:
                    eps = (eps + ets[-1]) / 2
                    sample = cur_sample
                elif len(ets) == 2:
                    eps = (3 * ets[-1] - ets[-2]) / 2
                elif len(ets) == 3:
                    eps = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
                else:
                    eps = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
                latents = self.pndm_prev(sample, t, prev_t, eps)
                counter += 1

        decoded = self.vae_decode(latents / self.scaling)
        decoded = (decoded * 0.5 + 0.5).clamp(0, 1)
        out = decoded[0].permute(1, 2, 0).to(torch.float32)
        return (out * 255).round().to(torch.uint8)


def export(parts: Parts, out_dir: str, device: str, fp16: bool, max_steps: int) -> None:
    dtype = torch.float16 if fp16 else torch.float32
    text = parts.text_encoder.to(device).eval()  # the pipeline runs it in its own dtype
    unet = parts.unet.to(device, dtype).eval()
    vae = parts.vae.to(device, dtype).eval()
    if fp16:
        text = text.to(dtype)
    cfg_unet = unet.config
    lat = cfg_unet.sample_size
    img = lat * 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad():
        ids = torch.zeros(2, MAX_LEN, dtype=torch.int64, device=device)
        t_text = torch.jit.trace(TextEncoder(text), (ids,), check_trace=False)
        x = torch.randn(2, cfg_unet.in_channels, lat, lat, device=device, dtype=dtype)
        ctx = torch.randn(2, MAX_LEN, cfg_unet.cross_attention_dim, device=device, dtype=dtype)
        t_unet = torch.jit.trace(UNet(unet), (x, torch.tensor([999.0], device=device), ctx), check_trace=False)
        pix = torch.randn(1, 3, img, img, device=device, dtype=dtype)
        t_enc = torch.jit.trace(VaeEncode(vae), (pix,), check_trace=False)
        z = torch.randn(1, vae.config.latent_channels, lat, lat, device=device, dtype=dtype)
        t_dec = torch.jit.trace(VaeDecode(vae), (z,), check_trace=False)
    module = torch.jit.script(SDInpaint(parts, t_text, t_unet, t_enc, t_dec, dtype, max_steps).to(device))
    os.makedirs(out_dir, exist_ok=True)
    module.save(os.path.join(out_dir, "sd.pt"))


def write_warmup(path: str) -> None:
    """A small request for `tessera.warmup`: run after each load so that TorchScript's one-time
    optimisation of the loop (seconds on a GPU) happens before users arrive. Crop-for-filling
    scales it to the 512² window, so the model sees the shapes every request gives it."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    def b64png(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    y, x = np.mgrid[0:48, 0:64]
    image = np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)
    mask = np.zeros((48, 64), np.uint8)
    mask[12:36, 20:44] = 255
    with open(path, "w") as f:
        json.dump({"image": b64png(image), "mask_image": b64png(mask), "prompt": "a vase on a table",
                   "negative_prompt": "", "gen_args": {"num_inference_steps": 2, "guidance_scale": 7.5,
                                                       "seed": 0}}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pretrained", help="a pipeline folder saved with save_pretrained")
    src.add_argument("--random", action="store_true", help="full-size random weights")
    src.add_argument("--tiny", action="store_true", help="CI-sized random weights")
    ap.add_argument("--scheduler", default="PNDMScheduler", choices=sorted(SCHEDULERS),
                    help="with --random/--tiny: the scheduler to configure (a pretrained folder names its own)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--save-pretrained", help="also save the pipeline folder (for parity tests)")
    args = ap.parse_args()

    parts = (pretrained_parts(args.pretrained) if args.pretrained
             else random_parts(args.tiny, args.seed, args.scheduler, args.device))
    if args.save_pretrained:
        save_pretrained(parts, args.save_pretrained)
    tok_out = os.path.join(args.out_dir, "tokenizer")
    os.makedirs(args.out_dir, exist_ok=True)
    if args.pretrained:
        shutil.copytree(os.path.join(args.pretrained, "tokenizer"), tok_out, dirs_exist_ok=True)
    else:
        tokenizer_files.write(__import__("pathlib").Path(tok_out))
    export(parts, args.out_dir, args.device, args.fp16, args.max_steps)
    write_warmup(os.path.join(args.out_dir, "warmup.json"))
    print(f"wrote {args.out_dir}/sd.pt ({parts.scheduler_config['_class_name']}), {tok_out}/ and warmup.json")


if __name__ == "__main__":
    main()
