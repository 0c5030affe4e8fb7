//! Sampling with the rollout engine: prompts of any lengths decode together with
//! continuous batching over a KV cache allocated once (`engine`, `slots`), greedy or
//! sampled (temperature, top-p, one random stream per row); the uncached reference it is
//! tested against; and the accuracy evaluation that decodes held-out prompts and runs the
//! verifier on the answers. Rejection sampling of teacher traces builds on this in
//! `teacher::traces`.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::Result;
use crate::model::engine::Engine;
use crate::model::Llama;
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
    /// Draw from the `top_k` most likely tokens only (before the nucleus, which then
    /// takes its mass of what they hold); 0 keeps them all.
    pub top_k: usize,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }

    /// Draws from the whole tempered distribution (no top-k, no nucleus), as the
    /// on-policy stages sample.
    pub fn full(max_new_tokens: usize, temperature: f64, seed: u64) -> Self {
        Self {
            max_new_tokens,
            temperature,
            top_p: 1.0,
            top_k: 0,
            seed,
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

/// Decodes continuations of `prompts` (of any lengths) with the rollout engine: at most
/// `batch_rows` sequences decode together, each in its own slot of a KV cache that is
/// allocated once; a finished sequence leaves its slot and the next waiting prompt takes
/// it (continuous batching), prefilled in the same step as the others decode. Row r
/// samples with `rngs[r]` (unused when greedy), so its output does not depend on which
/// rows share its steps. A prompt that leaves no room in the model's context yields
/// nothing (`too_long`). `on_done(rows_done)` is called as rows finish. Returns each
/// row's output and the FLOPs spent.
pub fn generate_rows(
    model: &Llama,
    prompts: &[Vec<u32>],
    eos: u32,
    s: &Sampling,
    rngs: &mut [ChaCha8Rng],
    batch_rows: usize,
    on_done: &mut dyn FnMut(usize),
) -> Result<(Vec<Generated>, f64)> {
    if s.temperature > 0.0 && rngs.len() != prompts.len() {
        return Err(crate::error::Error::Invalid(format!(
            "sampling needs one random stream per row: {} rows, {} streams",
            prompts.len(),
            rngs.len()
        )));
    }
    if prompts.iter().any(|p| p.is_empty()) {
        return Err(crate::error::Error::Invalid(
            "generation needs non-empty prompts".into(),
        ));
    }
    let mut engine = Engine::new(model, prompts, eos, s, batch_rows)?;
    while engine.step(rngs)? {
        on_done(engine.done);
    }
    on_done(engine.done);
    Ok((engine.out, engine.flops))
}

/// The same decoding without a cache, one row at a time: every step runs the row's
/// whole sequence again (O(n^2) work). Kept as the reference that the engine is tested
/// against.
pub fn generate_rows_uncached(
    model: &Llama,
    prompts: &[Vec<u32>],
    eos: u32,
    s: &Sampling,
    rngs: &mut [ChaCha8Rng],
) -> Result<Vec<Generated>> {
    let ctx = model.cfg.max_position_embeddings;
    let mut out = vec![Generated::default(); prompts.len()];
    for (r, prompt) in prompts.iter().enumerate() {
        let mut seq = prompt.clone();
        for _ in 0..s.max_new_tokens.min(ctx.saturating_sub(prompt.len())) {
            let input = Tensor::from_vec(seq.clone(), (1, seq.len()), model.device())?;
            let last = model.forward(&input)?.narrow(1, seq.len() - 1, 1)?.squeeze(1)?.detach();
            let tok = pick(&last, s, rngs, &[r])?[0];
            if tok == eos {
                out[r].finished = true;
                break;
            }
            out[r].ids.push(tok);
            seq.push(tok);
        }
    }
    Ok(out)
}

/// Whether a prompt of `prompt_len` tokens leaves no room for a new token in a context
/// of `max_positions`: its decoding would end before it began, with nothing to judge.
pub fn too_long(prompt_len: usize, max_positions: usize) -> bool {
    prompt_len >= max_positions
}

/// The next token of each row of `logits` (m, V): argmax when greedy (the first of
/// equal maxima), otherwise a draw from the tempered, nucleus-truncated distribution
/// with the stream `rngs[rows[i]]`. Logits with a NaN or an infinity are an error: no
/// token drawn from them means anything, and argmax would still return one.
pub(crate) fn pick(logits: &Tensor, s: &Sampling, rngs: &mut [ChaCha8Rng], rows: &[usize]) -> Result<Vec<u32>> {
    let (m, v) = logits.dims2()?;
    let flat = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if let Some(bad) = flat.iter().position(|x| !x.is_finite()) {
        return Err(crate::error::Error::Invalid(format!(
            "the model's logits are not finite (NaN or infinite) in row {} of {m}; its config.json or \
             weights are damaged",
            bad / v.max(1)
        )));
    }
    let greedy = s.temperature <= 0.0;
    let mut next = Vec::with_capacity(m);
    for (i, row) in flat.chunks(v).enumerate() {
        next.push(if greedy {
            argmax(row)
        } else {
            let rng = rngs.get_mut(rows[i]).ok_or_else(|| {
                crate::error::Error::Invalid(format!("sampling row {} has no random stream", rows[i]))
            })?;
            sample(row, s, rng)
        });
    }
    Ok(next)
}

/// The index of the first maximum.
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws an index from softmax(logits / temperature), restricted to the `top_k` most
/// likely tokens (0: all of them) and then to the nucleus of mass `top_p` of what is
/// left. Ties in probability keep the lower index first, so the draw is a pure function
/// of the logits and the stream.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut ChaCha8Rng) -> u32 {
    let (temperature, top_p) = (s.temperature, s.top_p);
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut w: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, ((x as f64 - max) / temperature).exp()))
        .collect();
    if s.top_k > 0 && s.top_k < w.len() {
        let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        w.select_nth_unstable_by(s.top_k - 1, order);
        w.truncate(s.top_k);
        w.sort_by(order);
    }
    let total: f64 = w.iter().map(|p| p.1).sum();
    if top_p < 1.0 {
        let keep = nucleus(&mut w, total, top_p);
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

/// Orders `w` by weight, largest first (ties: lower index first), far enough to hold the
/// nucleus, and returns its size: the fewest tokens whose mass reaches `top_p`. Only the
/// top of the vocabulary is sorted: the k largest are selected (k = 64, then 4 times
/// more while their mass falls short), so the prefix and the draw are those of a full
/// sort.
fn nucleus(w: &mut [(u32, f64)], total: f64, top_p: f64) -> usize {
    let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut k = w.len().min(64);
    loop {
        if k < w.len() {
            w.select_nth_unstable_by(k - 1, order);
        }
        w[..k].sort_by(order);
        let mut mass = 0.0;
        for (n, p) in w[..k].iter().enumerate() {
            mass += p.1 / total;
            if mass >= top_p {
                return n + 1;
            }
        }
        if k == w.len() {
            return k;
        }
        k = (k * 4).min(w.len());
    }
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
    let mut prompts = Vec::with_capacity(chosen.len());
    for e in &chosen {
        prompts.push(tok.encode_prompt(&e.prompt)?);
    }
    let greedy = Sampling::greedy(max_new_tokens);
    let (gen, flops) = generate_rows(model, &prompts, tok.eos, &greedy, &mut [], batch_size, &mut |_| {})?;
    let tokens = gen.iter().map(|g| g.ids.len() as u64).sum();
    let outputs = gen.iter().map(|g| tok.decode(&g.ids)).collect::<Result<Vec<_>>>()?;
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
