//! Decoding with a KV cache (each new token costs one single-position forward),
//! greedy or with temperature, and the accuracy evaluation that decodes
//! held-out prompts and runs the verifier on the answers.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::data::{arithmetic, Example};
use crate::error::Result;
use crate::model::{KvCache, Llama};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub seed: u64,
}

/// Decodes continuations of `prompts`, which must all have the same length
/// (callers group prompts by length, so no padding or attention mask is needed).
/// Returns the new ids of each prompt, without the final EOS, and the FLOPs spent.
pub fn generate_batch(model: &Llama, prompts: &[Vec<u32>], eos: u32, s: &Sampling) -> Result<(Vec<Vec<u32>>, f64)> {
    let b = prompts.len();
    let t0 = prompts.first().map_or(0, |p| p.len());
    if b == 0 || t0 == 0 || prompts.iter().any(|p| p.len() != t0) {
        return Err(crate::error::Error::Invalid(
            "generate_batch needs non-empty prompts of one length".into(),
        ));
    }
    let max_new = s
        .max_new_tokens
        .min(model.cfg.max_position_embeddings.saturating_sub(t0));
    let flat: Vec<u32> = prompts.iter().flatten().copied().collect();
    let mut input = Tensor::from_vec(flat, (b, t0), model.device())?;
    let mut cache = KvCache::new();
    let mut out = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    let mut flops = 0.0;
    for _ in 0..max_new {
        let (_, t) = input.dims2()?;
        let ctx = cache.len() + t;
        flops += model.cfg.forward_flops_per_token(ctx) * (b * t) as f64;
        let logits = model.forward_cached(&input, Some(&mut cache))?; // (B, t, V)
        let last = logits.narrow(1, t - 1, 1)?.squeeze(1)?.detach(); // (B, V)
        let next: Vec<u32> = if s.temperature <= 0.0 {
            last.argmax(D::Minus1)?.to_vec1::<u32>()?
        } else {
            let rows = (last / s.temperature)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
            rows.iter().map(|r| sample(r, &mut rng)).collect()
        };
        for (i, &tok) in next.iter().enumerate() {
            if done[i] {
                continue;
            }
            if tok == eos {
                done[i] = true;
            } else {
                out[i].push(tok);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        input = Tensor::from_vec(next, (b, 1), model.device())?;
    }
    Ok((out, flops))
}

/// Draws an index from softmax(logits).
fn sample(logits: &[f32], rng: &mut ChaCha8Rng) -> u32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f64> = logits.iter().map(|&x| ((x - max) as f64).exp()).collect();
    let mut u = rng.random::<f64>() * w.iter().sum::<f64>();
    for (i, wi) in w.iter().enumerate() {
        u -= wi;
        if u <= 0.0 {
            return i as u32;
        }
    }
    (w.len() - 1) as u32
}

/// One decoded held-out example.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub prompt: String,
    pub output: String,
    pub expected: Option<i64>,
    pub correct: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Accuracy {
    /// Examples with a known answer that were decoded.
    pub evaluated: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub samples: Vec<Sample>,
    /// Tokens generated and FLOPs spent.
    pub tokens: u64,
    pub flops: f64,
}

/// Greedy-decodes up to `limit` examples that carry an answer and checks them
/// with the verifier.
pub fn accuracy(
    model: &Llama,
    tok: &Tokenizer,
    examples: &[Example],
    limit: usize,
    max_new_tokens: usize,
    batch_size: usize,
) -> Result<Accuracy> {
    let chosen: Vec<&Example> = examples.iter().filter(|e| e.answer.is_some()).take(limit).collect();
    // Group by prompt length so that each batch needs no padding.
    let mut by_len: BTreeMap<usize, Vec<(usize, Vec<u32>)>> = BTreeMap::new();
    for (i, e) in chosen.iter().enumerate() {
        let mut ids = vec![tok.bos];
        ids.extend(tok.encode(&e.prompt)?);
        by_len.entry(ids.len()).or_default().push((i, ids));
    }
    let mut outputs = vec![String::new(); chosen.len()];
    let (mut tokens, mut flops) = (0u64, 0.0);
    let greedy = Sampling {
        max_new_tokens,
        temperature: 0.0,
        seed: 0,
    };
    for group in by_len.values() {
        for chunk in group.chunks(batch_size.max(1)) {
            let prompts: Vec<Vec<u32>> = chunk.iter().map(|(_, p)| p.clone()).collect();
            let (gen, f) = generate_batch(model, &prompts, tok.eos, &greedy)?;
            flops += f;
            for ((i, _), ids) in chunk.iter().zip(gen) {
                tokens += ids.len() as u64;
                outputs[*i] = tok.decode(&ids)?;
            }
        }
    }
    let samples: Vec<Sample> = chosen
        .iter()
        .zip(outputs)
        .map(|(e, output)| Sample {
            correct: e.answer.is_some_and(|a| arithmetic::verify(&output, a)),
            prompt: e.prompt.clone(),
            expected: e.answer,
            output,
        })
        .collect();
    let correct = samples.iter().filter(|s| s.correct).count();
    Ok(Accuracy {
        evaluated: samples.len(),
        correct,
        accuracy: if samples.is_empty() {
            0.0
        } else {
            correct as f64 / samples.len() as f64
        },
        samples,
        tokens,
        flops,
    })
}
