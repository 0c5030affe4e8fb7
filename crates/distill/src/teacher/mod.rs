//! What is made from a trained teacher before the students train: a pruned student
//! (`prune`), verified step-by-step traces by rejection sampling (`traces`), and an
//! offline cache of its logits (`logit_cache`).

pub mod logit_cache;
pub mod prune;
pub mod traces;
