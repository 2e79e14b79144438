"""A deliberately misbehaving Python handler for the sandbox tests (never shipped to users).

The JSON body's `mode` picks the misbehaviour: `loop` spins forever, `hog` allocates without
bound, `raise` lets an exception escape. Anything else passes a small image through the example
model (inputs `image` u8 [2, 2, 3] and `strength` f32 [1]) and answers the output's size.
"""
import json
import struct

import wit_world
from wit_world.imports.types import Dtype, ModelInput, Response, Tensor


class WitWorld(wit_world.WitWorld):
    def preprocess(self, req):
        mode = json.loads(req.body).get("mode")
        if mode == "loop":
            n = 0
            while True:
                n += 1
        if mode == "hog":
            keep = []
            while True:
                keep.append(bytearray(16 << 20))
        if mode == "raise":
            raise RuntimeError("a bug in the handler")
        inputs = [
            Tensor(name="image", dtype=Dtype.U8, shape=[2, 2, 3], data=bytes([7] * 12)),
            Tensor(name="strength", dtype=Dtype.F32, shape=[1], data=struct.pack("<f", 0.0)),
        ]
        return ModelInput(inputs=inputs, context=str(mode).encode(), cache_key=None)

    def postprocess(self, outputs, context):
        body = json.dumps({"mode": context.decode(), "bytes": len(outputs[0].data)})
        return Response(status=200, content_type="application/json", body=body.encode())
