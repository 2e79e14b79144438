// Builds a JavaScript handler into a Tessera handler component:
//   node guest-handlers/js/build.mjs <handler.js> <wit dir> <out.wasm>
// Every WASI feature of the engine is left out (stdio, random, clocks, http, fetch-event), so
// the component imports nothing but the tessera:handler world: console output is dropped,
// Math.random and Date.now are fixed at build time. Handlers log through the host.
import { componentize } from '@bytecodealliance/componentize-js';
import { readFile, writeFile } from 'node:fs/promises';
import { resolve } from 'node:path';

const [source, wit, out] = process.argv.slice(2);
if (!out) {
  console.error('usage: build.mjs <handler.js> <wit dir> <out.wasm>');
  process.exit(2);
}
const { component } = await componentize({
  sourcePath: resolve(source),
  witPath: resolve(wit),
  worldName: 'handler',
  disableFeatures: ['stdio', 'random', 'clocks', 'http', 'fetch-event'],
});
await writeFile(out, component);
console.log(`${out}: ${component.length} bytes`);
