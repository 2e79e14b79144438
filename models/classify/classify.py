"""Image classification as the TorchServe CPU baseline (`bench/torchserve`, our peer) does it:
the networks (seeded, so the same weights), its preprocessing (PIL decode to RGB, float CHW /
255, ImageNet mean/std), softmax and the top-1 answer. Shared by the export, the reference and
the tests."""
import io

import numpy as np
import torch
from torch import Tensor, nn

SIZE = 224
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


class TinyCNN(nn.Module):
    """The baseline's `tiny`: two strided convolutions, global pooling, a linear layer."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=4, stride=4),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def network(arch: str, seed: int = 0) -> nn.Module:
    """The baseline's network for `arch` (`tiny` or `resnet18`), initialised as it is: the
    global seed set right before construction."""
    torch.manual_seed(seed)
    if arch == "tiny":
        return TinyCNN().eval()
    if arch == "resnet18":
        import torchvision
        return torchvision.models.resnet18(weights=None).eval()
    raise SystemExit(f"unknown arch {arch} (tiny, resnet18)")


def preprocess(png: bytes) -> Tensor:
    """PNG bytes -> normalised float [1, 3, 224, 224], the baseline's steps."""
    from PIL import Image
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


class Classifier(nn.Module):
    """What Tessera runs: uint8 [N, 224, 224, 3] photos -> (score f32 [N], top1 i64 [N]), the
    normalisation done here (on the model's device) rather than in the handler. For `tiny` the
    last layer is computed row by row (the same weights and sums as `nn.Linear`), so a photo's
    answer is the same bytes whichever other requests share its batch; `resnet18`'s
    convolutions pick algorithms by batch size, so its scores may differ in the last bits."""

    def __init__(self, net: nn.Module, row_wise_head: bool):
        super().__init__()
        self.net = net
        self.row_wise_head = row_wise_head
        # (x / 255 - mean) / std as one multiply-add per sample: x * scale + shift, with scale
        # and shift spelled out per sample of a [SIZE, SIZE, 3] photo. Broadcast per channel
        # instead ([1, 3, 1, 1] against the channels-last view), libtorch's loop ran along the
        # 3 channels and took 200-390 us a photo on one core, 10.8 % of the server's CPU per
        # `tiny` request (perf); laid out like the photo it is one contiguous pass (58-68 us),
        # with the same products and sums, so the same bytes.
        std = torch.tensor(STD)
        scale = (1.0 / (255.0 * std)).view(1, 1, 3).expand(SIZE, SIZE, 3)
        shift = (-torch.tensor(MEAN) / std).view(1, 1, 3).expand(SIZE, SIZE, 3)
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("shift", shift.contiguous())

    def forward(self, image: Tensor):
        # The photo stays in its pixel-interleaved layout: one pass converts it to float, one
        # normalises it, and the convolutions take the channels-last view as it is. A photo of
        # another size does not broadcast against scale and shift: an error, as before.
        x = torch.addcmul(self.shift, image.float(), self.scale).permute(0, 3, 1, 2)
        if self.row_wise_head:
            feats = torch.flatten(self.net.features(x), 1)
            logits = (feats.unsqueeze(1) * self.net.fc.weight).sum(-1) + self.net.fc.bias
        else:
            logits = self.net(x)
        score, top1 = torch.softmax(logits, dim=1).max(dim=1)
        return score, top1


def classifier(arch: str, seed: int = 0) -> Classifier:
    return Classifier(network(arch, seed), row_wise_head=arch == "tiny").eval()
