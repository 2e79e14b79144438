"""A Tessera handler in Python: start here.

This one serves an image-to-image model (`models/example`: inputs `image` u8 [H, W, 3] and
`strength` f32 [1], output u8 [H, W, 3]). Request: JSON {"image": <base64 PNG/JPEG>,
"strength": 0..1}; response: {"generated_image": <base64 PNG>}.

Build (componentize-py is installed by scripts/env.sh):
    componentize-py -d wit -w handler componentize --stub-wasi app -p <this folder> -o handler.wasm
then pack it with your model: tessera pack --config model-config.yaml --model model.pt \
    --handler handler.wasm --output my-model.tar.gz

Rules of the sandbox: the component sees only the `tessera:handler` world. `--stub-wasi`
leaves every WASI interface out, so print(), clocks and os.urandom trap: log with host.log.
Pure-Python packages can be bundled with -p; native ones (numpy, Pillow) cannot, which is why
pixel work goes through the host's `imaging` interface, natively and outside the sandbox.
"""
import json
import struct

import wit_world
from componentize_py_types import Err
from wit_world.imports import host
from wit_world.imports.imaging import Encoding, Image, PixelFormat
from wit_world.imports.types import (
    Dtype,
    HandlerError_BadRequest,
    HandlerError_Internal,
    LogLevel,
    ModelInput,
    Response,
    Tensor,
)


def bad(message):
    """A 400 for the client; the other errors are HandlerError_UnsupportedMediaType (415),
    _PayloadTooLarge (413), _Unprocessable (422) and _Internal (500)."""
    return Err(HandlerError_BadRequest(message))


class WitWorld(wit_world.WitWorld):
    def preprocess(self, req):
        try:
            body = json.loads(req.body)
        except ValueError as e:
            raise bad(f"request body is not valid JSON: {e}")
        if not isinstance(body, dict) or not isinstance(body.get("image"), str):
            raise bad("send a JSON object with a base64 'image'")
        strength = body.get("strength", 1.0)
        if not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
            raise bad("strength must be a number in [0, 1]")
        # Decoded by the host; a corrupt, foreign or oversize image raises the right 4xx.
        # Base64 text goes to the host as bytes; the host decodes it and the image.
        text = body["image"].encode("utf-8", "surrogatepass")
        with Image.decode_base64("image", text, PixelFormat.RGB) as image:
            host.log(LogLevel.DEBUG, f"image {image.width()}x{image.height()}")
            inputs = [
                # The pixels go to the model without passing through this component.
                image.as_input("image"),
                Tensor(name="strength", dtype=Dtype.F32, shape=[1], data=struct.pack("<f", strength)),
            ]
        return ModelInput(inputs=inputs, context=b"", cache_key=None)

    def postprocess(self, outputs, context):
        if not outputs:
            raise Err(HandlerError_Internal("model returned no output"))
        with Image.from_tensor(outputs[0]) as image:
            text = image.encode_base64(Encoding.PNG, 0)  # base64 as ASCII bytes
        body = b'{"generated_image":"' + text + b'"}'
        return Response(status=200, content_type="application/json", body=body)
