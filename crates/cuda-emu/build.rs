//! Compiles `emu/launch.cpp`, which includes the CUDA kernels of
//! `crates/distill/src/kernels/divergence.cu` as host C++ (the built-ins come from
//! `emu/cuda_emu.h`), into a static library that `src/lib.rs` calls.

use std::path::Path;
use std::process::exit;

const KERNELS: &str = "../distill/src/kernels/divergence.cu";
const HEADER: &str = "emu/cuda_emu.h";
const LAUNCH: &str = "emu/launch.cpp";
/// `DISTILL_CUDA_EMU_SANITIZE=thread` builds the emulator with ThreadSanitizer: every
/// CUDA thread is an OS thread and every barrier a real synchronisation, so a
/// shared-memory access that no `__syncthreads()` orders is reported as a data race,
/// whatever the schedule. About 3x slower; for checking a kernel change by hand.
const SANITIZE: &str = "DISTILL_CUDA_EMU_SANITIZE";
/// `DISTILL_CUDA_EMU_KERNELS=<path>` compiles another copy of divergence.cu instead of
/// the workspace's: to run the tests on an edit before making it.
const OTHER_KERNELS: &str = "DISTILL_CUDA_EMU_KERNELS";

fn main() {
    for path in [KERNELS, HEADER, LAUNCH, "build.rs"] {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-env-changed={SANITIZE}");
    println!("cargo:rerun-if-env-changed={OTHER_KERNELS}");
    if !Path::new(KERNELS).exists() {
        eprintln!("distill-cuda-emu: {KERNELS} is missing; this crate tests that file and needs the whole workspace");
        exit(1);
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file(LAUNCH)
        .include("emu")
        .std("c++20")
        .define("DISTILL_CUDA_EMU", None)
        // IEEE f32 arithmetic as written, as the CPU kernels compute it: no a * b + c
        // fused into one rounding (CUDA does fuse by default; that difference is within
        // the tests' tolerances).
        .flag_if_supported("-ffp-contract=off")
        .warnings(true)
        .extra_warnings(true);
    if let Some(other) = std::env::var_os(OTHER_KERNELS).filter(|p| !p.is_empty()) {
        let path = match Path::new(&other).canonicalize() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("distill-cuda-emu: {OTHER_KERNELS}={}: {e}", Path::new(&other).display());
                exit(1);
            }
        };
        println!("cargo:rerun-if-changed={}", path.display());
        let quoted = format!("{:?}", path.display().to_string()); // a C string literal for #include
        build.define("DISTILL_EMU_KERNELS", quoted.as_str());
    }
    let sanitize = std::env::var(SANITIZE).unwrap_or_default();
    match sanitize.as_str() {
        "" => {}
        "thread" => {
            build.flag("-fsanitize=thread").flag("-g");
        }
        other => {
            eprintln!("distill-cuda-emu: {SANITIZE}={other} is not supported; use {SANITIZE}=thread or unset it");
            exit(1);
        }
    }
    if let Err(e) = build.try_compile("distill_cuda_emu") {
        eprintln!(
            "distill-cuda-emu: could not compile {LAUNCH} as C++20: {e}\n\
             This crate needs a C++20 compiler (g++ 12 or newer, or clang 16 or newer). \
             On Debian or Ubuntu: `apt-get install g++`; or point CXX at another compiler."
        );
        exit(1);
    }
    if sanitize == "thread" {
        // The runtime of the instrumented C++; the Rust code stays uninstrumented.
        println!("cargo:rustc-link-lib=dylib=tsan");
    }
    println!("cargo:rustc-link-lib=pthread");
}
