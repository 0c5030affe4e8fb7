//! CPU kernels, a leaf of the crate: the building blocks every fused kernel uses
//! (`cpu`), the transformer's fused ops, each beside its plain candle twin (`ops`), and
//! causal attention (`attention`), attention over a KV cache for decoding (`decode`),
//! matmuls by 8-bit weights for a model that only runs forward (`int8`). The loss kernels live with their losses (`loss`);
//! the CUDA source of the divergence kernels is `divergence.cu`.

pub mod attention;
pub mod cpu;
pub mod decode;
pub mod int8;
pub mod ops;
pub mod tiles;
