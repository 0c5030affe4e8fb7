//! Fused causal self-attention for the CPU training path (issue 9); being written.
