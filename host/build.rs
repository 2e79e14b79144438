//! Link-time glue for libtorch.
//!
//! tch finds libtorch through torch-sys (which reads the PyPI torch wheel when
//! `LIBTORCH_USE_PYTORCH=1`). We add an rpath so the binary runs without `LD_LIBRARY_PATH`, and
//! force `libtorch_cuda` onto the link line when it exists: nothing in Rust references its
//! symbols directly, so `--as-needed` would drop it and CUDA would never register.
//! We also compile a tiny C++ shim for the CUDA caching allocator's statistics, which tch does
//! not bind (see `src/runtime/cuda_shim.cpp`).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/runtime/cuda_shim.cpp");
    println!("cargo:rerun-if-changed=src/runtime/torch_shim.cpp");
    let lib = match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => PathBuf::from(lib),
        Err(_) => {
            panic!("torch-sys did not report DEP_TCH_LIBTORCH_LIB; is LIBTORCH_USE_PYTORCH=1 set?")
        }
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let has_cuda = lib.join("libtorch_cuda.so").exists();
    if has_cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }

    let include = lib
        .parent()
        .expect("libtorch lib dir has a parent")
        .join("include");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("src/runtime/cuda_shim.cpp")
        .file("src/runtime/torch_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations");
    build.compile("tessera_cuda_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=c10");
}
