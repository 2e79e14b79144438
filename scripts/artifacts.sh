#!/usr/bin/env bash
# Builds what archives are made of: the handler components (wasm32-wasip2) and the exported
# TorchScript models, under $TESSERA_ARTIFACTS.
source "$(dirname "$0")/env.sh"
A="$TESSERA_ARTIFACTS"
mkdir -p "$A/handlers" "$A/example"

echo "==> building handler components"
cargo build -q --profile guest --target wasm32-wasip2 \
  -p tessera-handler-example -p tessera-handler-chaos -p tessera-handler-lama -p tessera-handler-sam \
  -p tessera-handler-sd -p tessera-handler-classify \
  -p tessera-test-other-world
for h in example chaos lama sam sd classify; do
  cp "$CARGO_TARGET_DIR/wasm32-wasip2/guest/tessera_handler_$h.wasm" "$A/handlers/$h.wasm"
done
cp "$CARGO_TARGET_DIR/wasm32-wasip2/guest/tessera_test_other_world.wasm" "$A/handlers/other-world.wasm"
# The example handler built against the previous contract (wit/v0.1): a build of its own, since
# its SDK feature would otherwise switch every handler above to the old contract.
cargo build -q --profile guest --target wasm32-wasip2 -p tessera-handler-example-v0-1
cp "$CARGO_TARGET_DIR/wasm32-wasip2/guest/tessera_handler_example_v0_1.wasm" "$A/handlers/example-v0-1.wasm"

echo "==> building the Python handler components (componentize-py)"
# --stub-wasi: the component imports no WASI at all (print, clocks and os.urandom trap inside it;
# handlers log through the host), where by default CPython would import wasi:sockets.
componentize-py -d wit -w handler componentize --stub-wasi app -p guest-handlers/python/lama \
  -o "$A/handlers/lama-py.wasm" >/dev/null
for h in chaos template; do
  componentize-py -d wit -w handler componentize --stub-wasi app -p "guest-handlers/python/$h" \
    -o "$A/handlers/$h-py.wasm" >/dev/null
done

echo "==> building the JavaScript handler components (componentize-js)"
for h in lama template; do
  node guest-handlers/js/build.mjs "guest-handlers/js/$h/handler.js" wit "$A/handlers/$h-js.wasm" >/dev/null
done

echo "==> exporting the example model"
python models/example/export.py --out "$A/example/model.pt"
python models/example/export.py --width 128 --depth 6 --seed 1 --out "$A/example/model-large.pt"
python models/example/export.py --width 128 --depth 6 --seed 2 --out "$A/example/model-large-2.pt"
python models/example/export.py --oom --out "$A/example/model-oom.pt"

echo "==> exporting the classifier (tiny)"
mkdir -p "$A/classify"
python models/classify/export.py --arch tiny --out "$A/classify/tiny.pt"

echo "==> exporting tiny LaMa"
mkdir -p "$A/lama"
python models/lama/export.py --tiny --out "$A/lama/model.pt" --save-state-dict "$A/lama/generator.pth"

echo "==> exporting tiny SAM"
mkdir -p "$A/sam"
python models/sam/export.py --tiny --seed 7 --out-dir "$A/sam" --save-state-dict "$A/sam/sam.pth"

echo "==> exporting tiny SD2 inpainting (+ the diffusers pipeline folder, tokenizer and SDK fixtures)"
mkdir -p "$A/sd"
python models/sd/export.py --tiny --out-dir "$A/sd" --save-pretrained "$A/sd/pipeline"
python models/sd/fixtures.py --tokenizer "$A/sd/tokenizer" --out-dir "$A/sd"
