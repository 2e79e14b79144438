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
    println!("cargo:rerun-if-changed=src/runtime/graph_shim.cpp");
    println!("cargo:rerun-if-changed=src/runtime/tier_shim.cpp");
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
        .file("src/runtime/tier_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations");
    build.compile("tessera_cuda_shim");

    // CUDA graphs need libtorch's CUDA headers, which include the CUDA runtime's: the wheel's
    // NVIDIA packages carry them (site-packages/nvidia/*/include). Without both, the graph shim
    // is built to report that graphs are unsupported.
    let mut graphs = cc::Build::new();
    graphs
        .cpp(true)
        .file("src/runtime/graph_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations");
    match cuda_include(&lib) {
        Some(dir) if has_cuda => {
            graphs.include(dir);
            println!("cargo:rustc-link-lib=dylib=c10_cuda");
        }
        _ => {
            println!("cargo:warning=no CUDA headers next to libtorch: CUDA graphs unsupported in this build");
            graphs.define("TESSERA_NO_CUDA_GRAPHS", None);
        }
    }
    graphs.compile("tessera_graph_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=c10");
}

/// The include folder holding `cuda_runtime_api.h` and `crt/` (nvidia-cuda-crt) among the wheel's NVIDIA packages
/// (`<site-packages>/nvidia/<package>/include`; libtorch's lib dir is `<site-packages>/torch/lib`).
fn cuda_include(lib: &std::path::Path) -> Option<PathBuf> {
    let nvidia = lib.parent()?.parent()?.join("nvidia");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(nvidia)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("include")))
        .filter(|d| d.join("cuda_runtime_api.h").is_file() && d.join("crt/host_config.h").is_file())
        .collect();
    dirs.sort();
    dirs.into_iter().next()
}
