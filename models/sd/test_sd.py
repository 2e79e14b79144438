"""SD2 inpainting export: the TorchScript loop against diffusers' StableDiffusionInpaintPipeline on
the same tiny weights, for each supported scheduler; prepare/step/finish driven the way the server
drives them (by hand, and step as a CUDA graph where there is a GPU) against forward; and the
tokenizer folder's layout."""
import itertools
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


SCHEDULERS = ["PNDMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"]


class Exported:
    def __init__(self, scheduler, pipe, model):
        self.scheduler, self.pipe, self.model = scheduler, pipe, model


@pytest.fixture(scope="module", params=SCHEDULERS)
def exported(request, tmp_path_factory):
    """The tiny export for one scheduler and diffusers' pipeline on the same weights, shared by the
    tests below (an export takes a while on a CPU)."""
    out = tmp_path_factory.mktemp(request.param) / "sd"
    subprocess.run([sys.executable, os.path.join(HERE, "export.py"), "--tiny", "--scheduler", request.param,
                    "--seed", "3", "--out-dir", str(out), "--save-pretrained", str(out / "pipeline")], check=True)
    return Exported(request.param, reference.load(str(out / "pipeline")), torch.jit.load(str(out / "sd.pt")))


def request_args(tokenizer, image, mask, prompt, steps, guidance, seed, device="cpu"):
    ids = tokenizer(["blurry", prompt], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    return (ids.to(device), torch.from_numpy(image).to(device), torch.from_numpy(mask).to(device),
            torch.tensor(steps), torch.tensor(guidance, dtype=torch.float32), torch.tensor(seed))


def test_torchscript_loop_matches_diffusers(exported, tokenizer):
    image, mask = scene(1)
    results = {}
    for steps, guidance, seed, prompt in [(4, 7.5, 5, "a futuristic vase"), (3, 1.0, 5, "a futuristic vase"),
                                          (4, 7.5, 6, "a futuristic vase"), (4, 7.5, 5, "a red car")]:
        want = reference.pipeline(exported.pipe, image, mask, prompt, "blurry", steps, guidance, seed)
        got = exported.model(*request_args(tokenizer, image, mask, prompt, steps, guidance, seed)).numpy()
        diff = np.abs(got.astype(int) - want.astype(int)).max()
        assert diff <= 2, f"{exported.scheduler} steps={steps} guidance={guidance}: max diff {diff} grey levels"
        results[(steps, guidance, seed, prompt)] = got
    # The comparison has teeth: seed and prompt change the picture.
    base = results[(4, 7.5, 5, "a futuristic vase")].astype(int)
    assert np.abs(base - results[(4, 7.5, 6, "a futuristic vase")]).mean() > 5
    assert np.abs(base - results[(4, 7.5, 5, "a red car")]).mean() > 0.5


def test_prepare_step_finish_by_hand_matches_forward(exported, tokenizer):
    """The server's way: each step's outputs copied into fresh input buffers (a captured graph's
    static inputs). With and without classifier-free guidance; 6 PNDM steps reach every formula."""
    model = exported.model
    image, mask = scene(1)
    for steps, guidance in [(6, 7.5), (3, 1.0)]:
        args = request_args(tokenizer, image, mask, "a futuristic vase", steps, guidance, 5)
        with torch.no_grad():
            want = model(*args)
            count, state = model.prepare(*args)
            layout = [(s.shape, s.dtype, s.device) for s in state]
            assert count >= steps and layout[6][1] == torch.int64 and layout[7][1] == torch.float32
            for i in range(count):
                out = model.step(torch.tensor(i), state)
                assert [(s.shape, s.dtype, s.device) for s in out] == layout
                # Constant entries come back as they went in; no output is another slot's input.
                assert all(out[k] is state[k] for k in range(3, 8))
                for k, o in enumerate(out):
                    assert all(o.data_ptr() != s.data_ptr() for j, s in enumerate(state) if j != k)
                state = [s.clone() for s in out]
            got = model.finish(state)
        assert torch.equal(got, want), f"{exported.scheduler} steps={steps} guidance={guidance}"


def own_kinds(model, name: str) -> set:
    """Node kinds of a method and of the module's own methods it calls, not of the traced submodules
    (those are as before: their aten::Int only does shape arithmetic on host scalars)."""
    graph = getattr(model, name).graph
    self_type = next(graph.inputs()).type()
    kinds, nodes = set(), list(graph.nodes())
    while nodes:
        node = nodes.pop()
        kinds.add(node.kind())
        nodes += [n for block in node.blocks() for n in block.nodes()]
        if node.kind() == "prim::CallMethod" and next(node.inputs()).type() == self_type:
            kinds |= own_kinds(model, node.s("name"))
    return kinds


def test_step_reads_nothing_back_to_the_host(exported):
    """What a CUDA graph cannot capture: a device value read on the host, a tensor made from host values."""
    syncs = {"aten::item", "aten::_local_scalar_dense", "aten::Int", "aten::Float", "aten::Bool",
             "aten::IntImplicit", "aten::FloatImplicit", "aten::ScalarImplicit", "aten::tensor", "aten::as_tensor"}
    for name in ("step", "finish"):
        assert not own_kinds(exported.model, name) & syncs, name


# The executors under which a method computes the same bits however often it ran: TorchScript's
# fuser (NNC, GPU only) makes a run's last bits depend on the executor's history (profiling run,
# fused plan, fallbacks), so with it a replay may differ from forward by a grey level.
EXECUTORS = {"profiling, no fuser": lambda: torch.jit.fuser("none"),
             "no optimisation": lambda: torch.jit.optimized_execution(False)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_step_replays_as_a_cuda_graph(tmp_path, tokenizer, scheduler):
    """One captured step replayed for the whole loop (inputs static, outputs copied back into them)
    gives forward's image exactly, with and without classifier-free guidance (two graphs)."""
    import export
    export.export(export.random_parts(True, 3, scheduler, "cuda"), str(tmp_path), "cuda", False, 8)
    model = torch.jit.load(str(tmp_path / "sd.pt"))
    image, mask = scene(1)
    for (steps, guidance), executor in itertools.product([(6, 7.5), (3, 1.0)], EXECUTORS):
        args = request_args(tokenizer, image, mask, "a futuristic vase", steps, guidance, 5, "cuda")
        with torch.no_grad(), EXECUTORS[executor]():
            want = model(*args)
            count, static = model.prepare(*args)
            static_i = torch.zeros([], dtype=torch.int64, device="cuda")
            # Warm-up on a side stream and on copies, so that the static inputs keep the prepared state.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                warm = [s.clone() for s in static]
                for i in range(2):
                    out = model.step(torch.full([], i, dtype=torch.int64, device="cuda"), warm)
                    warm = [s.clone() for s in out]
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = model.step(static_i, static)
            for i in range(count):
                static_i.fill_(i)
                graph.replay()
                for s, o in zip(static, out):
                    if o is not s:
                        s.copy_(o)
            got = model.finish(static)
        assert torch.equal(got, want), f"{scheduler} steps={steps} guidance={guidance} {executor}"


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

