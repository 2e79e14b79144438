"""SAM export checks: the TorchScript encoder/decoder equal the reference SamPredictor on the
same weights and inputs, for one and several points, and for odd image sizes."""
import os

import numpy as np
import torch
from loader import load  # models/conftest.py puts it on the path
from segment_anything import SamPredictor
from segment_anything.utils.transforms import ResizeLongestSide

HERE = os.path.dirname(os.path.abspath(__file__))
export = load("sam_export", os.path.join(HERE, "export.py"))


def photo(h, w, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 200, y / h * 180, (x + y) / (w + h) * 255], -1) + rng.normal(0, 8, (h, w, 3))
    blob = ((x - w * 0.5) ** 2 + (y - h * 0.4) ** 2) < (min(h, w) * 0.25) ** 2
    img[blob] = [220, 40, 40]
    return np.clip(img, 0, 255).astype(np.uint8)


def test_torchscript_matches_reference_predictor(tmp_path):
    sam = export.build("vit_b", None, tiny=True, seed=9)
    export.export(sam, str(tmp_path))
    enc = torch.jit.load(str(tmp_path / "encoder.pt"))
    dec = torch.jit.load(str(tmp_path / "decoder.pt"))
    predictor = SamPredictor(sam)
    for (h, w), points, labels in [((300, 451), [[200, 120]], [1]),
                                   ((777, 512), [[100, 500], [300, 200], [10, 10]], [1, 1, 0]),
                                   ((64, 64), [[32, 30]], [1])]:
        image = photo(h, w, 1)
        predictor.set_image(image)
        resized = ResizeLongestSide(1024).apply_image(image)
        with torch.no_grad():
            rh, rw = resized.shape[:2]
            square = np.zeros((1024, 1024, 3), np.uint8)
            square[:rh, :rw] = resized
            emb = enc(torch.from_numpy(square), torch.tensor([rh, rw]))
            assert torch.allclose(emb, predictor.features, atol=1e-4, rtol=1e-4)
            # One click: a batch of one row.
            args = (emb, torch.tensor([points], dtype=torch.float32), torch.tensor([labels], dtype=torch.float32),
                    torch.tensor([[h, w]]))
            outs = [dec(*args, torch.tensor([i])) for i in range(3)]
            assert all(m.shape == (1, h * w) and c.tolist() == [i] for i, (m, _, c) in enumerate(outs))
            masks = torch.stack([m.reshape(h, w) for m, _, _ in outs])
            iou = outs[0][1][0]
            best_mask, _, best = dec(*args, torch.tensor([-1]))
            assert int(best) == int(torch.argmax(iou)) and torch.equal(best_mask.reshape(h, w), masks[int(best)])
        ref_masks, ref_iou, _ = predictor.predict(point_coords=np.array(points, dtype=np.float32),
                                                  point_labels=np.array(labels, dtype=np.float32), multimask_output=True)
        assert masks.shape == (3, h, w) and masks.dtype == torch.uint8
        if (h, w) == (300, 451):
            # The weights give non-trivial masks here, so agreement means something.
            assert all(0.02 < m.float().mean() < 0.995 for m in masks), [m.float().mean() for m in masks]
        agree = (masks.numpy().astype(bool) == ref_masks).mean()
        assert agree >= 0.9999, agree
        assert np.allclose(iou.numpy(), ref_iou, atol=1e-4)


def test_a_batch_of_clicks_on_different_photos_equals_each_alone(tmp_path):
    """The host batches clicks along dimension 0 with their cached embeddings: photos of
    different sizes (a tall and a wide one among them), each mask in its row's first h*w bytes,
    rows as long as the batch's largest mask."""
    sam = export.build("vit_b", None, tiny=True, seed=9)
    export.export(sam, str(tmp_path))
    enc = torch.jit.load(str(tmp_path / "encoder.pt"))
    dec = torch.jit.load(str(tmp_path / "decoder.pt"))
    clicks = [((300, 451), [[200, 120], [10, 10]], [1, 0], 1), ((777, 512), [[100, 500], [300, 200]], [1, 1], -1),
              ((64, 64), [[32, 30], [5, 60]], [1, 1], 0), ((40, 900), [[450, 20], [5, 5]], [1, 0], -1)]
    rows = []
    with torch.no_grad():
        for (h, w), points, labels, index in clicks:
            resized = ResizeLongestSide(1024).apply_image(photo(h, w, 2))
            rh, rw = resized.shape[:2]
            square = np.zeros((1024, 1024, 3), np.uint8)
            square[:rh, :rw] = resized
            emb = enc(torch.from_numpy(square), torch.tensor([rh, rw]))
            rows.append((emb, torch.tensor([points], dtype=torch.float32), torch.tensor([labels], dtype=torch.float32),
                         torch.tensor([[h, w]]), torch.tensor([index])))
        alone = [dec(*r) for r in rows]
        batched = dec(*[torch.cat([r[k] for r in rows]) for k in range(5)])
    masks, iou, chosen = batched
    assert masks.shape == (4, 777 * 512) and iou.shape == (4, 3) and chosen.shape == (4,)
    for b, ((h, w), _, _, _) in enumerate(clicks):
        m, i, c = alone[b]
        assert m.shape == (1, h * w)
        assert int(chosen[b]) == int(c[0])
        assert torch.allclose(iou[b], i[0], atol=1e-5)
        agree = (masks[b, :h * w] == m[0]).float().mean()
        assert agree >= 0.9999, agree
        assert int(masks[b, h * w:].sum()) == 0


def test_a_lower_precision_encoder_keeps_float32_around_it(tmp_path):
    """--encoder-dtype bfloat16 (GPU archives): the ViT runs in bfloat16 on a copy of its
    weights, the photo is normalised and the embeddings returned in float32, so the float32
    decoder takes them as they are; the masks stay the float32 encoder's but for a few edge pixels,
    and the model the export was given keeps its float32 weights."""
    sam = export.build("vit_b", None, tiny=True, seed=9)
    export.export(sam, str(tmp_path / "f32"))
    export.export(sam, str(tmp_path / "bf16"), encoder_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in sam.parameters())
    enc32 = torch.jit.load(str(tmp_path / "f32" / "encoder.pt"))
    enc16 = torch.jit.load(str(tmp_path / "bf16" / "encoder.pt"))
    assert {p.dtype for n, p in enc16.named_parameters() if n.startswith("vit.")} == {torch.bfloat16}
    dec = torch.jit.load(str(tmp_path / "bf16" / "decoder.pt"))
    h, w = 300, 451
    resized = ResizeLongestSide(1024).apply_image(photo(h, w, 1))
    square = np.zeros((1024, 1024, 3), np.uint8)
    square[:resized.shape[0], :resized.shape[1]] = resized
    with torch.no_grad():
        args = (torch.from_numpy(square), torch.tensor(resized.shape[:2]))
        e32, e16 = enc32(*args), enc16(*args)
        assert e16.dtype == torch.float32 and e16.shape == e32.shape
        assert float((e16 - e32).norm() / e32.norm()) < 0.02
        click = (torch.tensor([[[200.0, 120.0]]]), torch.tensor([[1.0]]), torch.tensor([[h, w]]))
        for i in range(3):
            m32 = dec(e32, *click, torch.tensor([i]))[0]
            m16 = dec(e16, *click, torch.tensor([i]))[0]
            assert (m32 == m16).float().mean() >= 0.99
