//! Tokenised examples, the deterministic batch order, and padded batches with
//! a loss mask that covers completion tokens only.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::Example;
use crate::error::{Error, Result};
use crate::prepare::tokenizer::Tokenizer;

/// `[bos] prompt completion [eos]`, truncated to `seq_len + 1` ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// Ids before the first completion token (bos + prompt).
    pub prompt_len: usize,
}

impl Encoded {
    /// Positions whose target is a completion token: what `make_batch` counts in
    /// `loss_tokens` for this example.
    pub fn loss_tokens(&self) -> usize {
        self.ids.len().saturating_sub(self.prompt_len)
    }
}

/// Encodes examples; examples left with no completion token after truncation
/// are dropped, and their number returned.
pub fn encode(tok: &Tokenizer, examples: &[Example], seq_len: usize) -> Result<(Vec<Encoded>, usize)> {
    let mut out = Vec::with_capacity(examples.len());
    let mut dropped = 0;
    for ex in examples {
        let mut ids = tok.encode_prompt(&ex.prompt)?;
        let prompt_len = ids.len();
        ids.extend(tok.encode(&ex.completion)?);
        ids.push(tok.eos);
        ids.truncate(seq_len + 1);
        if ids.len() <= prompt_len {
            dropped += 1;
            continue;
        }
        out.push(Encoded { ids, prompt_len });
    }
    Ok((out, dropped))
}

/// A padded batch. Position t predicts token t + 1.
pub struct Batch {
    pub inputs: Tensor,  // (B, T) u32
    pub targets: Tensor, // (B*T,) u32
    pub mask: Tensor,    // (B*T,) f32, 1 where the target is a completion token
    /// Tokens the loss counts (sum of the mask).
    pub loss_tokens: usize,
    /// Non-padding input tokens.
    pub tokens: usize,
    /// Positions computed, padding included (B * T).
    pub positions: usize,
}

pub fn make_batch(items: &[&Encoded], pad: u32, device: &Device) -> Result<Batch> {
    let b = items.len();
    let t = items.iter().map(|e| e.ids.len() - 1).max().unwrap_or(0);
    if b == 0 || t == 0 {
        return Err(Error::Invalid("empty batch".into()));
    }
    let mut inputs = vec![pad; b * t];
    let mut targets = vec![pad; b * t];
    let mut mask = vec![0f32; b * t];
    let mut loss_tokens = 0;
    for (r, e) in items.iter().enumerate() {
        let n = e.ids.len() - 1;
        inputs[r * t..r * t + n].copy_from_slice(&e.ids[..n]);
        targets[r * t..r * t + n].copy_from_slice(&e.ids[1..]);
        // Target index i is id i + 1; completion ids start at prompt_len.
        for m in &mut mask[r * t + e.prompt_len - 1..r * t + n] {
            *m = 1.0;
            loss_tokens += 1;
        }
    }
    Ok(Batch {
        inputs: Tensor::from_vec(inputs, (b, t), device)?,
        targets: Tensor::from_vec(targets, b * t, device)?,
        mask: Tensor::from_vec(mask, b * t, device)?,
        loss_tokens,
        tokens: items.iter().map(|e| e.ids.len() - 1).sum(),
        positions: b * t,
    })
}

/// The order in which training examples are visited: epoch after epoch, each a
/// fresh permutation from (seed, epoch). Micro-batch k is a pure function of k,
/// so a resumed run needs only the step to continue where it stopped.
pub struct Order {
    n: usize,
    seed: u64,
    cached: Option<(usize, Vec<usize>)>,
}

impl Order {
    pub fn new(n: usize, seed: u64) -> Self {
        Self { n, seed, cached: None }
    }

    fn perm(&mut self, epoch: usize) -> &[usize] {
        if self.cached.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(epoch as u64);
            let mut p: Vec<usize> = (0..self.n).collect();
            p.shuffle(&mut rng);
            self.cached = Some((epoch, p));
        }
        self.cached.as_ref().map(|(_, p)| p.as_slice()).unwrap_or(&[])
    }

    /// Indices of micro-batch `k` of size `bs`.
    pub fn micro_batch(&mut self, k: usize, bs: usize) -> Vec<usize> {
        (k * bs..(k + 1) * bs)
            .map(|g| {
                let (epoch, i) = (g / self.n, g % self.n);
                self.perm(epoch)[i]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_covers_completion_and_eos_only() -> Result<()> {
        let e = Encoded {
            ids: vec![1, 10, 11, 20, 21, 2],
            prompt_len: 3,
        };
        let short = Encoded {
            ids: vec![1, 10, 20, 2],
            prompt_len: 2,
        };
        let b = make_batch(&[&e, &short], 0, &Device::Cpu)?;
        assert_eq!(
            b.inputs.to_vec2::<u32>()?,
            vec![vec![1, 10, 11, 20, 21], vec![1, 10, 20, 0, 0]]
        );
        assert_eq!(b.targets.to_vec1::<u32>()?, vec![10, 11, 20, 21, 2, 10, 20, 2, 0, 0]);
        assert_eq!(b.mask.to_vec1::<f32>()?, vec![0., 0., 1., 1., 1., 0., 1., 1., 0., 0.]);
        assert_eq!(b.loss_tokens, 5);
        Ok(())
    }

    #[test]
    fn order_visits_every_example_once_per_epoch() {
        let mut o = Order::new(10, 5);
        let mut first: Vec<usize> = (0..5).flat_map(|k| o.micro_batch(k, 2)).collect();
        first.sort();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        let again: Vec<usize> = Order::new(10, 5).micro_batch(3, 4);
        assert_eq!(again, o.micro_batch(3, 4));
    }
}
