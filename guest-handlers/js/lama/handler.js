// LaMa handler in JavaScript: erase the masked object (the Rust handler in guest-handlers/lama,
// line for line, with the same responses).
//
// Request (the seed's): JSON {"image": <base64 PNG/JPEG>, "mask_image": <base64 PNG/JPEG>,
// "output_format": "png" | "jpeg"}. The mask becomes one channel as PIL's convert("L") does;
// image and mask are padded at the bottom/right to a multiple of 8 (numpy's symmetric mode), and
// the model's composite is cropped back. Response: {"generated_image": <base64 PNG or JPEG>}.
//
// All pixel work is the host's (the WIT `imaging` interface): the photo never enters this
// component's memory; `asInput` hands the padded pixels to the model directly.
//
// Built with componentize-js (guest-handlers/js/build.mjs, run by scripts/artifacts.sh).
import { Image } from 'tessera:handler/imaging@0.2.0';

const MODULO = 8;
// Three stride-2 downsamplings and reflection padding in the bottleneck need at least 2 pixels
// there: 16 at the input.
const MIN_SIDE = 16;

// result<T, handler-error> exports: return T, or throw the error variant.
function fail(tag, message) {
  throw { tag, val: message };
}
const bad = (message) => fail('bad-request', message);

function jsonBody(req) {
  let body;
  try {
    body = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(req.body));
  } catch (e) {
    bad(`request body is not valid JSON: ${e.message}`);
  }
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    bad('request body must be a JSON object');
  }
  return body;
}

function strField(body, key) {
  if (!Object.hasOwn(body, key)) bad(`missing field '${key}'`);
  const value = body[key];
  if (typeof value !== 'string') bad(`field '${key}' must be a string`);
  return value;
}

function wantsJpeg(body) {
  const fmt = body.output_format;
  if (typeof fmt !== 'string' || fmt === 'png') return false;
  if (fmt === 'jpeg' || fmt === 'jpg') return true;
  bad(`output_format '${fmt}' is not png or jpeg`);
}

const roundUp = (n) => Math.ceil(n / MODULO) * MODULO;

// Images are host resources: dropped as soon as a handler is done with them.
function using(images, f) {
  try {
    return f(...images);
  } finally {
    for (const image of images) image[Symbol.dispose]();
  }
}

// The base64 text goes to the host as UTF-8 bytes: a plain copy, where a WIT string would be
// re-encoded character by character.
const utf8 = (text) => new TextEncoder().encode(text);

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

export function preprocess(req) {
  const body = jsonBody(req);
  const jpeg = wantsJpeg(body);
  // Both decoded side by side on the host.
  const [image, mask] = Image.decodeBase64All([
    { field: 'image', text: utf8(strField(body, 'image')), format: 'rgb' },
    { field: 'mask_image', text: utf8(strField(body, 'mask_image')), format: 'luma' },
  ]);
  return using([image], () => {
    return using([mask], () => {
      const [w, h] = [image.width(), image.height()];
      const [mw, mh] = [mask.width(), mask.height()];
      if (mw !== w || mh !== h) {
        bad(`mask_image is ${mw}x${mh} but image is ${w}x${h}; they must be the same size`);
      }
      if (w < MIN_SIDE || h < MIN_SIDE) {
        bad(`image is ${w}x${h}; LaMa needs at least ${MIN_SIDE}x${MIN_SIDE} pixels`);
      }
      const [pw, ph] = [roundUp(w), roundUp(h)];
      const padded = [image.pad(pw, ph, 'symmetric'), mask.pad(pw, ph, 'symmetric')];
      const inputs = using(padded, (pi, pm) => [pi.asInput('image'), pm.asInput('mask')]);
      const context = new TextEncoder().encode(JSON.stringify({ width: w, height: h, jpeg }));
      return { inputs, context, cacheKey: undefined };
    });
  });
}

export function postprocess(outputs, context) {
  const ctx = JSON.parse(new TextDecoder().decode(context));
  if (outputs.length === 0) fail('internal', 'model returned no output');
  const out = Image.fromTensor(outputs[0]);
  const text = using([out], () => {
    const image = out.crop(0, 0, ctx.width, ctx.height);
    return using([image], () =>
      ctx.jpeg ? image.encodeBase64('jpeg', 95) : image.encodeBase64('png', 0),
    );
  });
  const body = concat(utf8('{"generated_image":"'), text, utf8('"}'));
  return { status: 200, contentType: 'application/json', body };
}
