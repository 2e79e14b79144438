"""LaMa handler in Python: erase the masked object (the Rust handler in guest-handlers/lama, line
for line, with the same responses).

Request (the seed's): JSON {"image": <base64 PNG/JPEG>, "mask_image": <base64 PNG/JPEG>,
"output_format": "png" | "jpeg"}. The mask becomes one channel as PIL's convert("L") does; image
and mask are padded at the bottom/right to a multiple of 8 (numpy's symmetric mode), and the
model's composite is cropped back. Response: {"generated_image": <base64 PNG or JPEG>}.

All pixel work is the host's (the WIT `imaging` interface): the photo never enters this
component's memory; `as_input` hands the padded pixels to the model directly.

Built with componentize-py (scripts/artifacts.sh):
    componentize-py -d wit -w handler componentize --stub-wasi app -p guest-handlers/python/lama -o lama-py.wasm
"""
import json

import wit_world
from componentize_py_types import Err
from wit_world.imports.imaging import Base64Image, Encoding, Image, PadMode, PixelFormat
from wit_world.imports.types import (
    HandlerError_BadRequest,
    HandlerError_Internal,
    ModelInput,
    Response,
)

MODULO = 8
# Three stride-2 downsamplings and reflection padding in the bottleneck need at least 2 pixels
# there: 16 at the input.
MIN_SIDE = 16


def bad(message):
    return Err(HandlerError_BadRequest(message))


def json_body(req):
    try:
        body = json.loads(req.body)
    except ValueError as e:
        raise bad(f"request body is not valid JSON: {e}")
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    return body


def str_field(body, key):
    if key not in body:
        raise bad(f"missing field '{key}'")
    value = body[key]
    if not isinstance(value, str):
        raise bad(f"field '{key}' must be a string")
    return value


def wants_jpeg(body):
    fmt = body.get("output_format")
    if not isinstance(fmt, str) or fmt == "png":
        return False
    if fmt in ("jpeg", "jpg"):
        return True
    raise bad(f"output_format '{fmt}' is not png or jpeg")


def round_up(n):
    return -(-n // MODULO) * MODULO


class WitWorld(wit_world.WitWorld):
    def preprocess(self, req):
        body = json_body(req)
        jpeg = wants_jpeg(body)
        # The base64 text goes to the host as bytes (a lone surrogate JSON let through is not
        # base64 either: the host says so).
        image_text = str_field(body, "image").encode("utf-8", "surrogatepass")
        mask_text = str_field(body, "mask_image").encode("utf-8", "surrogatepass")
        # Both decoded side by side on the host.
        image, mask = Image.decode_base64_all([
            Base64Image(field="image", text=image_text, format=PixelFormat.RGB),
            Base64Image(field="mask_image", text=mask_text, format=PixelFormat.LUMA),
        ])
        with image, mask:
            w, h = image.width(), image.height()
            mw, mh = mask.width(), mask.height()
            if (mw, mh) != (w, h):
                raise bad(f"mask_image is {mw}x{mh} but image is {w}x{h}; they must be the same size")
            if w < MIN_SIDE or h < MIN_SIDE:
                raise bad(f"image is {w}x{h}; LaMa needs at least {MIN_SIDE}x{MIN_SIDE} pixels")
            pw, ph = round_up(w), round_up(h)
            with image.pad(pw, ph, PadMode.SYMMETRIC) as padded_image, \
                    mask.pad(pw, ph, PadMode.SYMMETRIC) as padded_mask:
                inputs = [padded_image.as_input("image"), padded_mask.as_input("mask")]
        context = json.dumps({"width": w, "height": h, "jpeg": jpeg}).encode()
        return ModelInput(inputs=inputs, context=context, cache_key=None)

    def postprocess(self, outputs, context):
        ctx = json.loads(context)
        if not outputs:
            raise Err(HandlerError_Internal("model returned no output"))
        with Image.from_tensor(outputs[0]) as out, \
                out.crop(0, 0, ctx["width"], ctx["height"]) as image:
            if ctx["jpeg"]:
                text = image.encode_base64(Encoding.JPEG, 95)
            else:
                text = image.encode_base64(Encoding.PNG, 0)
        body = b'{"generated_image":"' + text + b'"}'
        return Response(status=200, content_type="application/json", body=body)
