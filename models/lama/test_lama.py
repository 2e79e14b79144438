"""LaMa export checks: official checkpoint layout loads strictly, TorchScript equals eager,
the ready-TorchScript adapter works, compositing keeps unmasked pixels exact."""
import os
import subprocess
import sys

import torch
from loader import load  # models/conftest.py puts it on the path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import lama  # noqa: E402
import official_keys  # noqa: E402

export = load("lama_export", os.path.join(HERE, "export.py"))


def official_checkpoint(path, ngf=64, n_blocks=18):
    """A Lightning-style checkpoint with the official big-lama key names and shapes, plus the
    discriminator/loss entries a real best.ckpt also carries."""
    g = torch.Generator().manual_seed(1)
    state = {}
    for name, shape in official_keys.generator_keys(ngf, n_blocks).items():
        if name.endswith("num_batches_tracked"):
            state["generator." + name] = torch.tensor(7)
        elif name.endswith("running_var"):
            state["generator." + name] = torch.rand(shape, generator=g) + 0.5
        else:
            state["generator." + name] = torch.randn(shape, generator=g) * 0.05
    state["discriminator.model0.0.ffc.convl2l.weight"] = torch.zeros(1)
    state["loss_resnet_pl.impl.conv1.weight"] = torch.zeros(1)
    torch.save({"state_dict": state, "epoch": 0, "pytorch-lightning_version": "1.2.9"}, path)
    return state


def test_official_layout_loads_strictly(tmp_path):
    ckpt = tmp_path / "best.ckpt"
    state = official_checkpoint(ckpt)
    generator = lama.FFCResNetGenerator()
    export.load_checkpoint(generator, str(ckpt))  # strict=True inside
    ours = generator.state_dict()
    assert len(ours) == len([k for k in state if k.startswith("generator.")])
    for k, v in ours.items():
        assert torch.equal(v, state["generator." + k]), k


def test_missing_or_extra_keys_are_refused(tmp_path):
    ckpt = tmp_path / "bad.ckpt"
    state = official_checkpoint(ckpt, ngf=8, n_blocks=2)
    state.pop("generator.model.5.conv1.ffc.convg2g.fu.conv_layer.weight")
    torch.save({"state_dict": state}, ckpt)
    try:
        export.load_checkpoint(lama.tiny_generator(), str(ckpt))
    except RuntimeError as e:
        assert "fu.conv_layer.weight" in str(e)
    else:
        raise AssertionError("a checkpoint missing a key loaded")


def sample(h=37, w=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g)
    mask = torch.zeros(h, w, dtype=torch.uint8)
    mask[h // 4: 3 * h // 4, w // 3: 2 * w // 3] = 255
    pad = lambda a: torch.from_numpy(__import__("numpy").pad(a.numpy(), ((0, (-h) % 8), (0, (-w) % 8)) + ((0, 0),) * (a.dim() - 2), mode="symmetric"))
    return pad(img), pad(mask)


def test_scripted_equals_eager_and_keeps_unmasked_pixels(tmp_path):
    out = tmp_path / "lama.pt"
    sd = tmp_path / "g.pth"
    subprocess.check_call([sys.executable, os.path.join(HERE, "export.py"), "--tiny", "--out", str(out),
                           "--save-state-dict", str(sd)])
    generator = lama.tiny_generator()
    generator.load_state_dict(torch.load(sd))
    eager = lama.LamaInpaint(generator.eval())
    scripted = torch.jit.load(str(out))
    for seed, (h, w) in enumerate([(37, 50), (64, 64), (9, 130)]):
        img, mask = sample(h, w, seed)
        with torch.no_grad():
            a, b = eager(img, mask), scripted(img, mask)
        assert (a.int() - b.int()).abs().max() <= 1
        keep = mask == 0
        assert torch.equal(b[keep], img[keep])
        assert not torch.equal(b[~keep], img[~keep]), "the hole was not filled"


class _FloatLama(torch.nn.Module):
    """Stands in for a shared big-lama.pt: float image/mask in, inpainted float image out."""

    def __init__(self):
        super().__init__()
        self.g = lama.tiny_generator().eval()

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pred = self.g(torch.cat([image * (1 - mask), mask], dim=1))
        return mask * pred + (1 - mask) * image


def test_ready_torchscript_is_adapted(tmp_path):
    src = tmp_path / "big-lama.pt"
    torch.jit.script(_FloatLama()).save(str(src))
    out = tmp_path / "adapted.pt"
    subprocess.check_call([sys.executable, os.path.join(HERE, "export.py"), "--torchscript", str(src),
                           "--out", str(out)])
    img, mask = sample()
    with torch.no_grad():
        got = torch.jit.load(str(out))(img, mask)
    assert got.shape == img.shape and got.dtype == torch.uint8
    assert torch.equal(got[mask == 0], img[mask == 0])



def test_warm_up_steps_through_every_spectral_length(tmp_path):
    """Tessera's warm-up method: the exported model has it and ends at once on the CPU; the
    steps it takes on a GPU (run here on the CPU) cover each FFT length 1..max_side/8 once."""
    out = tmp_path / "lama.pt"
    subprocess.check_call([sys.executable, os.path.join(HERE, "export.py"), "--tiny", "--out", str(out)])
    m = torch.jit.load(str(out))
    assert m.warm_up(0) == -1
    # --optimize (freezing) keeps it.
    optimized = tmp_path / "lama-optimized.pt"
    subprocess.check_call([sys.executable, os.path.join(HERE, "export.py"), "--tiny", "--optimize",
                           "--out", str(optimized)])
    assert torch.jit.load(str(optimized)).warm_up(0) == -1
    # Scripted, the FFTs stay in the graph (their results feed the answer).
    graph = str(torch.jit.script(lama.warm_fft).graph)
    assert "aten::fft_rfftn" in graph and "aten::fft_irfftn" in graph, graph
    assert m.warm_up_max_side == lama.WARM_UP_MAX_SIDE
    assert "anchor" not in lama.LamaInpaint(lama.tiny_generator()).state_dict()

    sides, step, real = [], 0, torch.fft.rfftn

    def spy(x, *args, **kwargs):
        sides.append(tuple(x.shape[-2:]))
        return real(x, *args, **kwargs)

    torch.fft.rfftn = spy
    try:
        while step != -1:
            assert len(sides) < 100
            step = lama.warm_fft(step, torch.device("cpu"), 64, cuda_only=False)
    finally:
        torch.fft.rfftn = real
    assert sides == [(n, n) for n in range(1, 9)]


def test_warm_up_runs_whole_forwards_after_the_fft_lengths():
    """After the FFT lengths, the warm-up runs the model at each warm-up photo size, scripted as
    Tessera loads it (run here on the CPU, which a GPU-only warm-up skips otherwise)."""
    m = lama.LamaInpaint(lama.tiny_generator()).eval()
    m.warm_up_max_side, m.warm_up_sizes, m.warm_up_on_cpu = 32, [(32, 24), (40, 32)], True
    scripted = torch.jit.script(m)
    seen = []
    real = m.forward
    m.forward = lambda image, mask: seen.append(tuple(image.shape)) or real(image, mask)
    for module in (m, scripted):
        steps, step = [], 0
        with torch.no_grad():
            while step != -1:
                assert len(steps) < 20
                steps.append(step)
                step = module.warm_up(step)
        # Four FFT lengths (sides 1..32/8), then one step per size.
        assert steps == list(range(6)), steps
    assert seen == [(24, 32, 3), (32, 40, 3)]
    assert lama.LamaInpaint(lama.tiny_generator()).warm_up(0) == -1
