"""SD2 inpainting export: the TorchScript loop against diffusers' StableDiffusionInpaintPipeline on
the same tiny weights, for each supported scheduler, and the tokenizer folder's layout."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reference  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer
    import tokenizer_files
    d = tmp_path_factory.mktemp("tok")
    tokenizer_files.write(d)
    return CLIPTokenizer.from_pretrained(str(d))


def test_tokenizer_folder_is_sd2s(tokenizer):
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 0)
    ids = tokenizer("a photo of a cat!", padding="max_length", max_length=77, truncation=True).input_ids
    # "!" is SD2's pad token: it is split out as id 0, not BPE'd as "!</w>".
    assert ids[:8] == [49406, 320, 1125, 539, 320, 2368, 0, 49407] and len(ids) == 77
    assert tokenizer.convert_ids_to_tokens(2368) == "cat</w>"


def scene(seed: int):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:512, 0:512]
    img = np.stack([xx // 2, yy // 2, (xx + yy) // 4], -1) + rng.integers(0, 40, (512, 512, 3))
    mask = np.zeros((512, 512), np.uint8)
    mask[120:330, 170:420] = 255
    return np.clip(img, 0, 255).astype(np.uint8), mask


@pytest.mark.parametrize("scheduler", ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_torchscript_loop_matches_diffusers(tmp_path, tokenizer, scheduler):
    out = tmp_path / "sd"
    subprocess.run([sys.executable, os.path.join(HERE, "export.py"), "--tiny", "--scheduler", scheduler,
                    "--seed", "3", "--out-dir", str(out), "--save-pretrained", str(out / "pipeline")], check=True)
    pipe = reference.load(str(out / "pipeline"))
    model = torch.jit.load(str(out / "sd.pt"))
    image, mask = scene(1)
    results = {}
    for steps, guidance, seed, prompt in [(4, 7.5, 5, "a futuristic vase"), (3, 1.0, 5, "a futuristic vase"),
                                          (4, 7.5, 6, "a futuristic vase"), (4, 7.5, 5, "a red car")]:
        want = reference.pipeline(pipe, image, mask, prompt, "blurry", steps, guidance, seed)
        ids = tokenizer(["blurry", prompt], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        got = model(ids, torch.from_numpy(image), torch.from_numpy(mask), torch.tensor(steps),
                    torch.tensor(guidance, dtype=torch.float32), torch.tensor(seed)).numpy()
        diff = np.abs(got.astype(int) - want.astype(int)).max()
        assert diff <= 2, f"{scheduler} steps={steps} guidance={guidance}: max diff {diff} grey levels"
        results[(steps, guidance, seed, prompt)] = got
    # The comparison has teeth: seed and prompt change the picture.
    base = results[(4, 7.5, 5, "a futuristic vase")].astype(int)
    assert np.abs(base - results[(4, 7.5, 6, "a futuristic vase")]).mean() > 5
    assert np.abs(base - results[(4, 7.5, 5, "a red car")]).mean() > 0.5


def test_rejects_unsupported_scheduler_options(tmp_path):
    sys.path.insert(0, HERE)
    import export
    parts = export.random_parts(True, 0, "PNDMScheduler")
    parts.scheduler_config = dict(parts.scheduler_config, _class_name="LMSDiscreteScheduler")
    with pytest.raises(SystemExit, match="not supported"):
        export.export(parts, str(tmp_path), "cpu", False, 4)


def test_pretrained_folder_exports_the_same_model(tmp_path):
    """--pretrained loads a save_pretrained folder (what the seed stores): its export computes
    what the export of the original weights computes."""
    first, second = tmp_path / "a", tmp_path / "b"
    subprocess.run([sys.executable, os.path.join(HERE, "export.py"), "--tiny", "--scheduler", "DDIMScheduler",
                    "--seed", "4", "--max-steps", "4", "--out-dir", str(first), "--save-pretrained",
                    str(first / "pipeline")], check=True)
    subprocess.run([sys.executable, os.path.join(HERE, "export.py"), "--pretrained", str(first / "pipeline"),
                    "--max-steps", "4", "--out-dir", str(second)], check=True)
    assert (second / "tokenizer" / "vocab.json").read_bytes() == (first / "tokenizer" / "vocab.json").read_bytes()
    image, mask = scene(2)
    ids = torch.randint(0, 49408, (2, 77))
    args = (ids, torch.from_numpy(image), torch.from_numpy(mask), torch.tensor(3), torch.tensor(7.5), torch.tensor(1))
    a = torch.jit.load(str(first / "sd.pt"))(*args)
    b = torch.jit.load(str(second / "sd.pt"))(*args)
    assert torch.equal(a, b)
    with pytest.raises(Exception):  # over the exported schedules
        torch.jit.load(str(second / "sd.pt"))(ids, torch.from_numpy(image), torch.from_numpy(mask),
                                               torch.tensor(5), torch.tensor(7.5), torch.tensor(1))
