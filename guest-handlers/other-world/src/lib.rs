//! A valid component of a different world (`test:other/other`), used to check that uploads
//! refuse handlers that do not implement `tessera:handler`.
wit_bindgen::generate!({
    inline: "package test:other; world other { export run: func() -> u32; }",
    world: "other",
});

struct Other;

impl Guest for Other {
    fn run() -> u32 {
        7
    }
}

export!(Other);
