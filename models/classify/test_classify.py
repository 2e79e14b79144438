"""Classifier export checks: the TorchScript answers equal the baseline's eager network and
preprocessing, and `tiny`'s answers do not depend on what shares the batch."""
import base64
import io
import os
import subprocess
import sys

import numpy as np
import torch
from loader import load  # models/conftest.py puts it on the path
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
classify = load("classify", os.path.join(HERE, "classify.py"))


def photos(n):
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]


def png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_torchscript_matches_the_baseline_and_batches_do_not_change_tiny(tmp_path):
    out = tmp_path / "tiny.pt"
    subprocess.check_call([sys.executable, os.path.join(HERE, "export.py"), "--arch", "tiny", "--out", str(out)])
    model = torch.jit.load(str(out))
    net = classify.network("tiny")
    imgs = photos(4)
    batch = torch.from_numpy(np.stack(imgs))
    with torch.inference_mode():
        score, top1 = model(batch)
        for i, a in enumerate(imgs):
            probs = torch.softmax(net(classify.preprocess(png(a))), dim=1)[0]
            ref_score, ref_top1 = probs.max(dim=0)
            assert int(top1[i]) == int(ref_top1)
            assert abs(float(score[i]) - float(ref_score)) < 1e-6
            alone = model(batch[i:i + 1].clone())
            assert torch.equal(alone[0], score[i:i + 1]) and torch.equal(alone[1], top1[i:i + 1])
    assert score.dtype == torch.float32 and top1.dtype == torch.int64


def test_the_normalisation_is_the_per_channel_one_and_other_sizes_are_refused(tmp_path):
    # scale and shift are laid out per sample of a 224x224 photo (one contiguous pass): the
    # result is bit for bit the per-channel broadcast's, and a photo of another size is an
    # error rather than a silently misread tensor.
    model = classify.classifier("tiny")
    x = torch.from_numpy(np.stack(photos(2)))
    std = torch.tensor(classify.STD).view(1, 3, 1, 1)
    per_channel = torch.addcmul(-torch.tensor(classify.MEAN).view(1, 3, 1, 1) / std,
                                x.permute(0, 3, 1, 2).float(), 1.0 / (255.0 * std))
    ours = torch.addcmul(model.shift, x.float(), model.scale).permute(0, 3, 1, 2)
    assert torch.equal(per_channel, ours)
    out = tmp_path / "tiny.pt"
    subprocess.check_call([sys.executable, os.path.join(HERE, "export.py"), "--arch", "tiny", "--out", str(out)])
    traced = torch.jit.load(str(out))
    for shape in [(1, 448, 112, 3), (1, 112, 112, 3)]:
        try:
            traced(torch.zeros(shape, dtype=torch.uint8))
        except RuntimeError as e:
            assert "size of tensor" in str(e) or "must match" in str(e), str(e)
        else:
            raise AssertionError(f"a {shape} photo was accepted")
