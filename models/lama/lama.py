"""Our LaMa generator: the `ffc_resnet` of big-lama, written for TorchScript.

Architecture from Suvorov et al., "Resolution-robust Large Mask Inpainting with Fourier
Convolutions" (WACV 2022) and the public big-lama training config: input 4 channels (masked
image + mask), output 3, ngf 64, 3 stride-2 downsamplings, 18 FFC residual blocks whose
convolutions split channels 25 % local / 75 % global (the global part goes through a spectral
transform: 1x1 conv, real FFT, 1x1 conv on the spectrum, inverse FFT), no LFU, three transposed
convolutions up, reflection-padded 7x7 output convolution, sigmoid.

Every layer is registered as `model.<index>` with the same parameter names as the official
generator (`model.5.conv1.ffc.convg2g.fu.conv_layer.weight` ...), so the state dict of the
official `best.ckpt` (keys under `generator.`) loads with `strict=True`. Layers pass a
(local, global) pair along; a missing part is an empty tensor, decided at construction, so the
whole network scripts.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Pair = Tuple[Tensor, Tensor]


def _none() -> Tensor:
    return torch.empty(0)


class BatchNorm(nn.BatchNorm2d):
    """Inference-mode batch norm on the local part of a pair (buffers as nn.BatchNorm2d)."""

    def forward(self, x_l: Tensor, x_g: Tensor) -> Pair:  # type: ignore[override]
        return F.batch_norm(x_l, self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps), x_g


class Relu(nn.Module):
    def forward(self, x_l: Tensor, x_g: Tensor) -> Pair:
        return torch.relu(x_l), x_g


class Sigmoid(nn.Module):
    def forward(self, x_l: Tensor, x_g: Tensor) -> Pair:
        return torch.sigmoid(x_l), x_g


class ReflectPad(nn.Module):
    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x_l: Tensor, x_g: Tensor) -> Pair:
        p = self.pad
        return F.pad(x_l, [p, p, p, p], mode="reflect"), x_g


class Conv(nn.Conv2d):
    """The output convolution (7x7, bias) on the local part."""

    def forward(self, x_l: Tensor, x_g: Tensor) -> Pair:  # type: ignore[override]
        return F.conv2d(x_l, self.weight, self.bias), x_g


class UpConv(nn.ConvTranspose2d):
    """3x3 stride-2 transposed convolution (padding 1, output padding 1) on the local part."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=3, stride=2, padding=1, output_padding=1)

    def forward(self, x_l: Tensor, x_g: Tensor) -> Pair:  # type: ignore[override]
        return F.conv_transpose2d(x_l, self.weight, self.bias, 2, 1, 1), x_g


class Concat(nn.Module):
    """Joins the local and global parts back into one tensor (local channels first)."""

    def forward(self, x_l: Tensor, x_g: Tensor) -> Pair:
        return torch.cat([x_l, x_g], dim=1), _none()


class FourierUnit(nn.Module):
    """1x1 convolution + BN + ReLU applied to the real FFT of the input (ortho norm).

    The spectrum's real and imaginary parts are interleaved per channel. The FFTs always run in
    float32 (half-precision FFTs only take power-of-two sizes); the convolution runs in the
    model's dtype.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv_layer = nn.Conv2d(channels * 2, channels * 2, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(channels * 2)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        b, c, h, w = x.shape
        spec = torch.fft.rfftn(x.float(), dim=(-2, -1), norm="ortho")
        wf = spec.shape[-1]
        f = torch.stack((spec.real, spec.imag), dim=2).reshape(b, c * 2, h, wf)
        f = torch.relu(self.bn(self.conv_layer(f.to(dtype))))
        f = f.float().reshape(b, c, 2, h, wf)
        spec = torch.complex(f[:, :, 0].contiguous(), f[:, :, 1].contiguous())
        return torch.fft.irfftn(spec, s=[h, w], dim=(-2, -1), norm="ortho").to(dtype)


class SpectralTransform(nn.Module):
    """Global-to-global path: 1x1 reduce, Fourier unit with a residual, 1x1 expand (no LFU)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        half = cout // 2
        self.conv1 = nn.Sequential(nn.Conv2d(cin, half, kernel_size=1, bias=False), nn.BatchNorm2d(half),
                                   nn.ReLU(inplace=True))
        self.fu = FourierUnit(half)
        self.conv2 = nn.Conv2d(half, cout, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        return self.conv2(x + self.fu(x))


class FFC(nn.Module):
    """Fast Fourier convolution: local<->local/global convolutions plus the spectral path."""

    def __init__(self, cin: int, cout: int, kernel: int, ratio_in: float, ratio_out: float,
                 stride: int = 1, padding: int = 0):
        super().__init__()
        in_g = int(cin * ratio_in)
        in_l = cin - in_g
        out_g = int(cout * ratio_out)
        out_l = cout - out_g
        self.has_l, self.has_g = out_l > 0, out_g > 0
        self.in_l, self.in_g = in_l > 0, in_g > 0

        def conv(a: int, b: int) -> nn.Module:
            if a == 0 or b == 0:
                return nn.Identity()
            return nn.Conv2d(a, b, kernel, stride, padding, bias=False, padding_mode="reflect")

        self.convl2l = conv(in_l, out_l)
        self.convl2g = conv(in_l, out_g)
        self.convg2l = conv(in_g, out_l)
        self.convg2g = SpectralTransform(in_g, out_g) if in_g > 0 and out_g > 0 else nn.Identity()
        self.gate = nn.Identity()

    def forward(self, x_l: Tensor, x_g: Tensor) -> Pair:
        out_l, out_g = _none(), _none()
        if self.has_l:
            out_l = self.convl2l(x_l)
            if self.in_g:
                out_l = out_l + self.convg2l(x_g)
        if self.has_g:
            out_g = self.convl2g(x_l)
            if self.in_g:
                out_g = out_g + self.convg2g(x_g)
        return out_l, out_g


class FFCBnAct(nn.Module):
    """FFC followed by batch norm and ReLU on each part that exists."""

    def __init__(self, cin: int, cout: int, kernel: int, ratio_in: float, ratio_out: float,
                 stride: int = 1, padding: int = 0):
        super().__init__()
        self.ffc = FFC(cin, cout, kernel, ratio_in, ratio_out, stride, padding)
        out_g = int(cout * ratio_out)
        self.bn_l = nn.BatchNorm2d(cout - out_g) if cout - out_g > 0 else nn.Identity()
        self.bn_g = nn.BatchNorm2d(out_g) if out_g > 0 else nn.Identity()
        self.has_l, self.has_g = cout - out_g > 0, out_g > 0

    def forward(self, x_l: Tensor, x_g: Tensor) -> Pair:
        y_l, y_g = self.ffc(x_l, x_g)
        if self.has_l:
            y_l = torch.relu(self.bn_l(y_l))
        if self.has_g:
            y_g = torch.relu(self.bn_g(y_g))
        return y_l, y_g


class FFCResBlock(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.conv1 = FFCBnAct(dim, dim, 3, ratio, ratio, padding=1)
        self.conv2 = FFCBnAct(dim, dim, 3, ratio, ratio, padding=1)

    def forward(self, x_l: Tensor, x_g: Tensor) -> Pair:
        y_l, y_g = self.conv1(x_l, x_g)
        y_l, y_g = self.conv2(y_l, y_g)
        return x_l + y_l, x_g + y_g


class FFCResNetGenerator(nn.Module):
    """big-lama's generator. `forward` takes the 4-channel input [B, 4, H, W] (H, W multiples
    of 8) and returns the prediction [B, 3, H, W] in [0, 1]."""

    def __init__(self, input_nc: int = 4, output_nc: int = 3, ngf: int = 64, n_downsampling: int = 3,
                 n_blocks: int = 18, ratio: float = 0.75, max_features: int = 1024):
        super().__init__()
        layers: List[nn.Module] = [ReflectPad(3), FFCBnAct(input_nc, ngf, 7, 0.0, 0.0)]
        for i in range(n_downsampling):
            cin, cout = min(max_features, ngf * 2 ** i), min(max_features, ngf * 2 ** (i + 1))
            ratio_out = ratio if i == n_downsampling - 1 else 0.0
            layers.append(FFCBnAct(cin, cout, 3, 0.0, ratio_out, stride=2, padding=1))
        dim = min(max_features, ngf * 2 ** n_downsampling)
        layers += [FFCResBlock(dim, ratio) for _ in range(n_blocks)]
        layers.append(Concat())
        for i in range(n_downsampling):
            cin = min(max_features, ngf * 2 ** (n_downsampling - i))
            cout = min(max_features, ngf * 2 ** (n_downsampling - i) // 2)
            layers += [UpConv(cin, cout), BatchNorm(cout), Relu()]
        layers += [ReflectPad(3), Conv(ngf, output_nc, kernel_size=7), Sigmoid()]
        self.model = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        x_l, x_g = x, _none()
        for layer in self.model:
            x_l, x_g = layer(x_l, x_g)
        return x_l


# The longest photo side (pixels, after the handler's padding to a multiple of 8) whose FFT
# lengths the warm-up covers: the spectral blocks run at an eighth of each side.
WARM_UP_MAX_SIDE = 4096


def warm_fft(step: int, device: torch.device, max_side: int, cuda_only: bool = True) -> int:
    """One step of a LaMa model's warm-up (Tessera's `warm_up(step) -> next step or -1`): the
    real FFT and its inverse, as the spectral blocks run them, on a (step+1)² float32 spectral
    plane. On a GPU, cuFFT has the driver compile many of its kernels at first use, per length:
    40-300 ms each on an H100 (kept in the driver's cache on disk afterwards), so a photo size
    the machine has not run before would pay that inside a user's request. Covering every length
    up to `max_side` / 8 on square planes takes that compiling off the request path for photos
    whose sides are at most `max_side` (the kernels proved keyed by length, not by batch or by
    the other side: bench/results/jit_cache_probe_gpu_h100.md); a longer side (an 8192x512 photo
    is within LaMa's max_pixels) still compiles its length once. On the CPU there is nothing to
    compile: done at once (`cuda_only=False` runs the steps anyway, for tests)."""
    if cuda_only and device.type != "cuda":
        return -1
    side = step + 1
    x = torch.zeros(1, 1, side, side, device=device)
    spec = torch.fft.rfftn(x, dim=(-2, -1), norm="ortho")
    y = torch.fft.irfftn(spec, s=[side, side], dim=(-2, -1), norm="ortho")
    # The answer reads the result: TorchScript drops calls whose results go unused.
    return step + 1 if side < max_side // 8 and y.size(-1) == side else -1


# Photo sizes (width, height; multiples of 8, as the handler pads them) a LaMa model's warm-up
# runs whole on a GPU once its FFT lengths are done. The process's first forward loads the
# kernels and libraries cuDNN and cuBLAS use (0.6-1.2 s on an H100, which eager PyTorch's first
# call pays too), and each size's convolutions get their cuDNN plans on the thread that runs
# them (Tessera keeps a GPU model's forward threads across loads): common photo shapes.
WARM_UP_SIZES = [(512, 512), (1024, 768), (768, 1024), (1024, 1024)]


class FftWarmUp(nn.Module):
    """Tessera's warm-up method for a LaMa module: on a GPU, each FFT length (see `warm_fft`),
    then a forward at each of `WARM_UP_SIZES`; on the CPU nothing (`warm_up_on_cpu` runs the
    steps anyway, for tests)."""

    def __init__(self):
        super().__init__()
        # Follows the module's device (not in the state dict): where the warm-up runs.
        self.register_buffer("anchor", torch.zeros(0), persistent=False)
        self.warm_up_max_side = WARM_UP_MAX_SIDE
        self.warm_up_sizes: List[Tuple[int, int]] = list(WARM_UP_SIZES)
        self.warm_up_on_cpu = False

    @torch.jit.export
    def warm_up(self, step: int) -> int:
        device = self.anchor.device
        if device.type != "cuda" and not self.warm_up_on_cpu:
            return -1
        lengths = self.warm_up_max_side // 8
        if step < lengths:
            following = warm_fft(step, device, self.warm_up_max_side, cuda_only=False)
            return lengths if following == -1 else following
        k = step - lengths
        if k >= len(self.warm_up_sizes):
            return -1
        w, h = self.warm_up_sizes[k]
        image = torch.zeros(h, w, 3, dtype=torch.uint8, device=device)
        mask = torch.zeros(h, w, dtype=torch.uint8, device=device)
        # The answer reads the result, so that the call stays in the graph.
        ran = self.forward(image, mask).size(0) == h
        return step + 1 if ran and k + 1 < len(self.warm_up_sizes) else -1


class LamaInpaint(FftWarmUp):
    """What Tessera runs: uint8 image [H, W, 3] + uint8 mask [H, W] (H, W multiples of 8, as
    the handler pads them) -> uint8 image [H, W, 3]. Masked pixels (mask > 0) come from the
    generator, the others are the input's, bit for bit. `warm_up` is Tessera's warm-up method
    (see `warm_fft`)."""

    def __init__(self, generator: nn.Module, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.generator = generator
        self.dtype = dtype

    def forward(self, image: Tensor, mask: Tensor) -> Tensor:
        img = image.permute(2, 0, 1).unsqueeze(0).to(self.dtype) / 255.0
        hole = (mask > 0).to(self.dtype)[None, None]
        pred = self.generator(torch.cat([img * (1.0 - hole), hole], dim=1))
        pred_u8 = (pred[0].permute(1, 2, 0).float() * 255.0).round().clamp(0, 255).to(torch.uint8)
        return torch.where((mask > 0).unsqueeze(-1), pred_u8, image)


def tiny_generator() -> FFCResNetGenerator:
    """Same architecture, CI-sized: ngf 8, 2 residual blocks."""
    return FFCResNetGenerator(ngf=8, n_blocks=2)
