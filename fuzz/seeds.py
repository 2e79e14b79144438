#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (small, committed): fuzz/seeds/<target>/<name>.
Run from the repository root with the project's venv (Pillow); the files are deterministic.

    python fuzz/seeds.py
"""
import base64
import gzip
import io
import json
import os
import shutil
import tarfile

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "seeds")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def png(mode, size, **kw):
    img = Image.new(mode, size)
    n = size[0] * size[1]
    if mode in ("L", "P", "I;16"):
        img.putdata([(i * 37 * (257 if mode == "I;16" else 1)) % (65536 if mode == "I;16" else 256) for i in range(n)])
    else:
        img.putdata([tuple((i * k) % 256 for k in (37, 91, 13, 200)[:len(mode)]) for i in range(n)])
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def tar_gz(members, gz=True):
    """A tar (gzip'd unless `gz` is false) of (name, bytes or None for a folder, kind)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                t.addfile(info)
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = data
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if gz else raw


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    small = png("RGB", (4, 3))
    b64 = base64.b64encode(small).decode()
    # request_json: the seed requests' shapes, escapes, nesting, arrays, a non-object.
    put("request_json", "lama", json.dumps({"image": b64, "mask_image": b64}))
    put("request_json", "sam", json.dumps({"image": b64, "gen_args": json.dumps(
        {"point_coords": [[10, 20]], "point_labels": [1], "dilate_kernel_size": 15})}))
    put("request_json", "sd", json.dumps({"image": b64, "mask_image": b64, "prompt": "a futuristic vase",
                                          "negative_prompt": None, "gen_args": {"num_inference_steps": 25, "seed": 1}}))
    put("request_json", "escapes", '{"a": "x\\u00e9\\n\\"y\\"", "b": [1, -2.5e3, true, null, {"c": []}], "a": "dup"}')
    put("request_json", "array", '[1, "two", {"three": 3}]')
    # base64: plain, padded, unpadded, whitespace, a data URL.
    put("base64", "padded", base64.b64encode(b"hello world!!").decode())
    put("base64", "unpadded", base64.b64encode(b"hello").decode().rstrip("="))
    put("base64", "wrapped", "aGVs\nbG8g\r\nd29y bGQ=")
    put("base64", "data_url", "data:image/png;base64," + b64)
    # image_decode: PNG in each colour type and bit depth the decoder handles, and JPEG.
    put("image_decode", "rgb.png", small)
    put("image_decode", "rgba.png", png("RGBA", (3, 2)))
    put("image_decode", "gray.png", png("L", (5, 5)))
    put("image_decode", "gray16.png", png("I;16", (2, 2)))
    put("image_decode", "palette.png", png("P", (4, 4)))
    put("image_decode", "optimized.png", png("RGB", (9, 9), optimize=True))
    put("image_decode", "rgb.jpg", png("RGB", (16, 8), format="JPEG", quality=80))
    put("image_decode", "gray.jpg", png("L", (8, 8), format="JPEG"))
    # JPEG's other decoding paths: progressive scans (colour and grey), 4:2:0 chroma with a
    # restart interval, CMYK.
    put("image_decode", "progressive.jpg", png("RGB", (24, 16), format="JPEG", progressive=True))
    put("image_decode", "progressive-gray.jpg", png("L", (17, 9), format="JPEG", progressive=True))
    put("image_decode", "subsampled-restarts.jpg",
        png("RGB", (33, 17), format="JPEG", subsampling=2, restart_marker_blocks=1))
    put("image_decode", "cmyk.jpg", png("CMYK", (8, 8), format="JPEG"))
    # clip_tokenizer: prompts; after a 0xff byte, bytes for from_packed (a header and less).
    put("clip_tokenizer", "prompt", "a photo of the cat and the dog, 4k!")
    put("clip_tokenizer", "unicode", "Ünïcödé  漢字 <|startoftext|>tab\there<|endoftext|>")
    put("clip_tokenizer", "packed", b"the cat\xffTSCLIPB1" + (2).to_bytes(4, "little") + (1).to_bytes(4, "little")
        + (3).to_bytes(4, "little") + (0).to_bytes(4, "little") + (0).to_bytes(4, "little")
        + (1).to_bytes(4, "little") + (1).to_bytes(4, "little") + bytes(16) + b"abc")
    # ... and a valid packed table (tokenizer_files.write_packed on a small vocabulary).
    import sys
    import tempfile
    sys.path.insert(0, os.path.join(ROOT, "models", "sd"))
    import tokenizer_files
    with tempfile.TemporaryDirectory() as d:
        alphabet = list(tokenizer_files.bytes_to_unicode().values())
        vocab = alphabet + [c + "</w>" for c in alphabet] + ["th", "the</w>", "ca", "cat</w>"]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        with open(os.path.join(d, "vocab.json"), "w") as f:
            json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
        with open(os.path.join(d, "merges.txt"), "w") as f:
            f.write("#version: 0.2\nt h\nth e</w>\nc a\nca t</w>\n")
        tokenizer_files.write_packed(__import__("pathlib").Path(d))
        table = open(os.path.join(d, "clip-bpe.bin"), "rb").read()
    put("clip_tokenizer", "packed_valid", b"the cat sat\xff" + table)
    # archive_unpack: a well-formed model archive, then ones each check refuses.
    config = open(os.path.join(ROOT, "models", "example", "model-config.yaml"), "rb").read() \
        if os.path.exists(os.path.join(ROOT, "models", "example", "model-config.yaml")) else b"minWorkers: 1\n"
    good = [("model-config.yaml", config, "file"), ("model.pt", b"PK\x03\x04not really", "file"),
            ("handler.wasm", b"\x00asm\x0d\x00\x01\x00", "file"), ("assets", None, "dir"),
            ("assets/warmup.json", b"{}", "file")]
    put("archive_unpack", "good.tar.gz", tar_gz(good))
    put("archive_unpack", "plain.tar", tar_gz(good, gz=False))
    put("archive_unpack", "traversal.tar.gz", tar_gz(good + [("../escape", b"x", "file")]))
    put("archive_unpack", "symlink.tar.gz", tar_gz(good + [("assets/link", "/etc/passwd", "symlink")]))
    put("archive_unpack", "no_handler.tar.gz", tar_gz(good[:2]))
    # model_config: the shipped configs.
    for family in ["example", "lama", "sam", "sd", "classify"]:
        path = os.path.join(ROOT, "models", family, "model-config.yaml")
        if os.path.exists(path):
            put("model_config", family + ".yaml", open(path, "rb").read())
    put("model_config", "anchors.yaml", "a: &x [1, 2]\nb: *x\ntessera: {model: m.pt}\n")
    # tenants_file: the tests' shapes.
    digest = "sha256:" + "ab" * 32
    put("tenants_file", "two", f"tenants:\n- name: a\n  tokens: ['{digest}']\n- name: b\n  tokens: ['{digest[:-2]}cd']\n"
        "  limits: {residencyShare: 0.25}\n")
    put("tenants_file", "empty_tokens", "tenants:\n- name: a\n  tokens: []\n")
    put("tenants_file", "bad_name", f"tenants:\n- name: ../a\n  tokens: ['{digest}']\n")
    # guest_tensors: raw bytes (the target reads them as a list of tensors).
    put("guest_tensors", "few", bytes(range(64)))
    put("guest_tensors", "big_dims", b"\x03name\x02\x04" + b"\xff" * 40)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
