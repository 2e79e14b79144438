//! `model-config.yaml` as a tenant writes it: parsing and validation never panic (nor run
//! away on anchors and aliases), and what is accepted answers its accessors.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera::archive::ModelConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = ModelConfig::parse(text) else {
        return;
    };
    let _ = config.handler_param("max_pixels");
    let _ = config.tessera.warmup.as_ref().map(|w| w.requests());
    for t in config
        .tessera
        .oip
        .iter()
        .flat_map(|o| o.inputs.iter().chain(&o.outputs))
    {
        let _ = t.dtype();
        let _ = t.accepts(&[1, 3, 224, 224]);
        let _ = t.accepts(&[]);
    }
});
