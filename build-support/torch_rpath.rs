//! Build script shared by every crate whose binaries or tests link libtorch.
//!
//! torch-sys tells only its direct dependents where libtorch lives, so `scripts/env.sh` exports
//! `SWITCHYARD_TORCH_LIB` and this script turns it into an rpath: binaries then run without
//! `LD_LIBRARY_PATH`. With `SWITCHYARD_LINK_CUDA=1` it also links `libtorch_cuda` explicitly, since
//! rustc's `--as-needed` otherwise drops it and CUDA is silently unavailable.

fn main() {
    println!("cargo:rerun-if-env-changed=SWITCHYARD_TORCH_LIB");
    println!("cargo:rerun-if-env-changed=SWITCHYARD_LINK_CUDA");
    let Ok(torch_lib) = std::env::var("SWITCHYARD_TORCH_LIB") else {
        println!(
            "cargo:warning=SWITCHYARD_TORCH_LIB is not set: binaries will need LD_LIBRARY_PATH (source scripts/env.sh)"
        );
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{torch_lib}");
    // switchyard-loadtest links libtorch in its tests only (the reference layer as a target, on the
    // CPU); its `switchyard` binary must load none, so never libtorch_cuda past --as-needed.
    let loads_no_libtorch = std::env::var("CARGO_PKG_NAME").is_ok_and(|name| name == "switchyard-loadtest");
    let link_cuda = std::env::var("SWITCHYARD_LINK_CUDA").is_ok_and(|value| value == "1");
    if link_cuda && !loads_no_libtorch && std::path::Path::new(&torch_lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-L{torch_lib},-ltorch_cuda,--as-needed");
    }
}
