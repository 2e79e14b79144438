// A Tessera handler in JavaScript: start here.
//
// This one serves an image-to-image model (`models/example`: inputs `image` u8 [H, W, 3] and
// `strength` f32 [1], output u8 [H, W, 3]). Request: JSON {"image": <base64 PNG/JPEG>,
// "strength": 0..1}; response: {"generated_image": <base64 PNG>}.
//
// Build (componentize-js is installed by scripts/env.sh):
//   node guest-handlers/js/build.mjs handler.js wit handler.wasm
// then pack it with your model: tessera pack --config model-config.yaml --model model.pt \
//   --handler handler.wasm --output my-model.tar.gz
//
// Rules of the sandbox: the component sees only the `tessera:handler` world (no WASI: console
// output is dropped, Math.random and Date.now are fixed); log with `log` from the host
// interface. WIT types: records are objects with camelCase keys, enums are strings, list<u8> is
// a Uint8Array, list<u64> a BigUint64Array; return a result's value, throw {tag, val} for its
// error (tags: bad-request 400, unsupported-media-type 415, payload-too-large 413,
// unprocessable 422, internal 500). Host calls that fail throw an error whose `payload` is that
// variant: rethrown as it is, the client gets it.
import { log } from 'tessera:handler/host@0.2.0';
import { Image } from 'tessera:handler/imaging@0.2.0';

const bad = (message) => {
  throw { tag: 'bad-request', val: message };
};

export function preprocess(req) {
  let body;
  try {
    body = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(req.body));
  } catch (e) {
    bad(`request body is not valid JSON: ${e.message}`);
  }
  if (typeof body !== 'object' || body === null || typeof body.image !== 'string') {
    bad("send a JSON object with a base64 'image'");
  }
  const strength = body.strength ?? 1.0;
  if (typeof strength !== 'number' || !(strength >= 0 && strength <= 1)) {
    bad('strength must be a number in [0, 1]');
  }
  // Decoded by the host; a corrupt, foreign or oversize image throws the right 4xx.
  // The text goes as UTF-8 bytes: a plain copy, where a WIT string would be re-encoded
  // character by character (slow for megabytes).
  const image = Image.decodeBase64('image', new TextEncoder().encode(body.image), 'rgb');
  try {
    log('debug', `image ${image.width()}x${image.height()}`);
    const inputs = [
      // The pixels go to the model without passing through this component.
      image.asInput('image'),
      {
        name: 'strength',
        dtype: 'f32',
        shape: new BigUint64Array([1n]),
        data: new Uint8Array(new Float32Array([strength]).buffer),
      },
    ];
    return { inputs, context: new Uint8Array(0), cacheKey: undefined };
  } finally {
    image[Symbol.dispose]();
  }
}

export function postprocess(outputs, context) {
  if (outputs.length === 0) throw { tag: 'internal', val: 'model returned no output' };
  const image = Image.fromTensor(outputs[0]);
  let text;
  try {
    text = image.encodeBase64('png', 0); // base64 as ASCII bytes
  } finally {
    image[Symbol.dispose]();
  }
  const [head, tail] = [new TextEncoder().encode('{"generated_image":"'), new TextEncoder().encode('"}')];
  const body = new Uint8Array(head.length + text.length + tail.length);
  body.set(head);
  body.set(text, head.length);
  body.set(tail, head.length + text.length);
  return { status: 200, contentType: 'application/json', body };
}
