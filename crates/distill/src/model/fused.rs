//! Fused CPU kernels for the transformer's hot ops (issue 9); being written.
