//! Decoding with a KV cache (each new token costs one single-position forward),
//! greedy or sampled (temperature, top-p, one random stream per row), and the
//! accuracy evaluation that decodes held-out prompts and runs the verifier on
//! the answers. Rejection sampling of teacher traces builds on this in
//! `traces.rs`.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::Result;
use crate::model::{KvCache, Llama};
use crate::prepare::data::{arithmetic, Example};
use crate::prepare::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus sampling: draw from the smallest set of tokens whose probability
    /// adds up to at least `top_p`. 1 keeps the whole distribution.
    pub top_p: f64,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// What one row of a batch produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Generated {
    /// New ids, without the final EOS.
    pub ids: Vec<u32>,
    /// Whether the row ended with EOS (false: it ran out of `max_new_tokens`).
    pub finished: bool,
}

/// The random stream of one row: row `row` of a job with seed `seed`. Each
/// row draws from its own ChaCha stream, so that a sample does not depend on
/// which other rows share its batch.
pub fn row_rng(seed: u64, row: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(row);
    rng
}

fn check_prompts(prompts: &[Vec<u32>]) -> Result<(usize, usize)> {
    let b = prompts.len();
    let t0 = prompts.first().map_or(0, |p| p.len());
    if b == 0 || t0 == 0 || prompts.iter().any(|p| p.len() != t0) {
        return Err(crate::error::Error::Invalid(
            "generation needs non-empty prompts of one length".into(),
        ));
    }
    Ok((b, t0))
}

/// Decodes continuations of `prompts`, which must all have the same length
/// (callers group prompts by length, so no padding or attention mask is
/// needed), with a KV cache: each new token costs one single-position forward.
/// `rngs` holds one stream per row for sampling (unused when greedy).
/// Returns each row's output and the FLOPs spent.
pub fn generate_rows(
    model: &Llama,
    prompts: &[Vec<u32>],
    eos: u32,
    s: &Sampling,
    rngs: &mut [ChaCha8Rng],
) -> Result<(Vec<Generated>, f64)> {
    let (b, t0) = check_prompts(prompts)?;
    if s.temperature > 0.0 && rngs.len() != b {
        return Err(crate::error::Error::Invalid(format!(
            "sampling needs one random stream per row: {} rows, {} streams",
            b,
            rngs.len()
        )));
    }
    let max_new = s
        .max_new_tokens
        .min(model.cfg.max_position_embeddings.saturating_sub(t0));
    let flat: Vec<u32> = prompts.iter().flatten().copied().collect();
    let mut input = Tensor::from_vec(flat, (b, t0), model.device())?;
    let mut cache = KvCache::new();
    let mut out = vec![
        Generated {
            ids: Vec::new(),
            finished: false
        };
        b
    ];
    let mut flops = 0.0;
    for _ in 0..max_new {
        let (_, t) = input.dims2()?;
        let ctx = cache.len() + t;
        flops += model.cfg.forward_flops_per_token(ctx) * (b * t) as f64;
        let logits = model.forward_cached(&input, Some(&mut cache))?; // (B, t, V)
        let last = logits.narrow(1, t - 1, 1)?.squeeze(1)?.detach(); // (B, V)
        check_finite(&last, cache.len())?;
        let next = pick(&last, s, rngs)?;
        if push(&mut out, &next, eos) {
            break;
        }
        input = Tensor::from_vec(next, (b, 1), model.device())?;
    }
    Ok((out, flops))
}

/// The same decoding without a cache: every step runs the whole sequence
/// again (O(n^2) work). Kept as the reference that the cached path is tested
/// against.
pub fn generate_rows_uncached(
    model: &Llama,
    prompts: &[Vec<u32>],
    eos: u32,
    s: &Sampling,
    rngs: &mut [ChaCha8Rng],
) -> Result<Vec<Generated>> {
    let (b, t0) = check_prompts(prompts)?;
    let max_new = s
        .max_new_tokens
        .min(model.cfg.max_position_embeddings.saturating_sub(t0));
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut out = vec![
        Generated {
            ids: Vec::new(),
            finished: false
        };
        b
    ];
    for _ in 0..max_new {
        let t = seqs[0].len();
        let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
        let input = Tensor::from_vec(flat, (b, t), model.device())?;
        let logits = model.forward(&input)?;
        let last = logits.narrow(1, t - 1, 1)?.squeeze(1)?.detach();
        check_finite(&last, t)?;
        let next = pick(&last, s, rngs)?;
        for (seq, &tok) in seqs.iter_mut().zip(&next) {
            seq.push(tok);
        }
        if push(&mut out, &next, eos) {
            break;
        }
    }
    Ok(out)
}

/// Refuses logits with a NaN or an infinity (at position `pos`): no token drawn from
/// them means anything, and argmax would still return one.
fn check_finite(logits: &Tensor, pos: usize) -> Result<()> {
    if !crate::model::llama::all_finite(logits)? {
        return Err(crate::error::Error::Invalid(format!(
            "the model's logits at position {pos} are not finite (NaN or infinite); its config.json or \
             weights are damaged"
        )));
    }
    Ok(())
}

/// Whether a prompt of `prompt_len` tokens leaves no room for a new token in a context
/// of `max_positions`: its decoding would end before it began, with nothing to judge.
pub fn too_long(prompt_len: usize, max_positions: usize) -> bool {
    prompt_len >= max_positions
}

/// Appends each row's next token; returns true when every row has finished.
fn push(out: &mut [Generated], next: &[u32], eos: u32) -> bool {
    for (g, &tok) in out.iter_mut().zip(next) {
        if g.finished {
            continue;
        }
        if tok == eos {
            g.finished = true;
        } else {
            g.ids.push(tok);
        }
    }
    out.iter().all(|g| g.finished)
}

/// The next token of every row: argmax when greedy, otherwise a draw from the
/// tempered, nucleus-truncated distribution with the row's own stream.
fn pick(last: &Tensor, s: &Sampling, rngs: &mut [ChaCha8Rng]) -> Result<Vec<u32>> {
    if s.temperature <= 0.0 {
        return Ok(last.argmax(D::Minus1)?.to_vec1::<u32>()?);
    }
    let rows = last.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .zip(rngs.iter_mut())
        .map(|(r, rng)| sample(r, s.temperature, s.top_p, rng))
        .collect())
}

/// Draws an index from softmax(logits / temperature), restricted to the
/// nucleus of mass `top_p`. Ties in probability keep the lower index first,
/// so the draw is a pure function of the logits and the stream.
pub fn sample(logits: &[f32], temperature: f64, top_p: f64, rng: &mut ChaCha8Rng) -> u32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut w: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, ((x as f64 - max) / temperature).exp()))
        .collect();
    let total: f64 = w.iter().map(|p| p.1).sum();
    if top_p < 1.0 {
        w.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut mass = 0.0;
        let mut keep = w.len();
        for (n, p) in w.iter().enumerate() {
            mass += p.1 / total;
            if mass >= top_p {
                keep = n + 1;
                break;
            }
        }
        w.truncate(keep);
    }
    let kept: f64 = w.iter().map(|p| p.1).sum();
    let mut u = rng.random::<f64>() * kept;
    for &(i, wi) in &w {
        u -= wi;
        if u <= 0.0 {
            return i;
        }
    }
    w.last().map_or(0, |p| p.0)
}

/// One decoded held-out example.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
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

impl Accuracy {
    /// The counts of decoded `samples`, which took `tokens` and `flops` to generate.
    pub fn of(samples: Vec<Sample>, tokens: u64, flops: f64) -> Self {
        let correct = samples.iter().filter(|s| s.correct).count();
        Self {
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
        }
    }
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
    let greedy = Sampling::greedy(max_new_tokens);
    for group in by_len.values() {
        for chunk in group.chunks(batch_size.max(1)) {
            let prompts: Vec<Vec<u32>> = chunk.iter().map(|(_, p)| p.clone()).collect();
            let (gen, f) = generate_rows(model, &prompts, tok.eos, &greedy, &mut [])?;
            flops += f;
            for ((i, _), g) in chunk.iter().zip(gen) {
                tokens += g.ids.len() as u64;
                outputs[*i] = tok.decode(&g.ids)?;
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
    Ok(Accuracy::of(samples, tokens, flops))
}
