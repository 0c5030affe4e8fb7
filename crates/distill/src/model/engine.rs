//! The rollout engine's scheduler: continuous batching over the slots of a `KvSlots`
//! cache (`model::slots`).
//!
//! Each step admits waiting prompts into free slots, then runs one `forward_slots` over
//! the prefill tokens of the new prompts and the last token of every sequence being
//! decoded, then draws one token for each of them. A sequence that ends (EOS, or its
//! token budget) frees its slot for the next step. Samples of one prompt share its
//! prefill: a prompt that a slot already holds is copied, not recomputed.

use std::collections::{HashMap, VecDeque};

use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::kernels::decode::CacheRows;
use crate::model::generate::{pick, Generated, Sampling};
use crate::model::slots::KvSlots;
use crate::model::Llama;

/// Prompt tokens prefilled per step at most (one longer prompt still goes alone): bounds
/// the step's activations, and so the peak memory, when a whole batch of prompts
/// arrives at once.
const PREFILL_TOKENS: usize = 512;

/// A sequence in a slot.
#[derive(Clone, Copy)]
struct Active {
    row: usize,
    /// Tokens in the cache.
    len: usize,
    /// The last token drawn, not yet in the cache.
    last: u32,
    /// Tokens it may still draw.
    budget: usize,
}

/// How a newly admitted prompt gets its keys and values.
enum Prefill {
    /// Every prompt token is a query of this step.
    Full,
    /// Another slot holds the prompt: copy all but its last token, which is the query.
    Copied,
    /// Another prompt admitted in this step is the same: after the step, copy its whole
    /// prompt and draw from its logits.
    Twin(usize),
}

pub(crate) struct Engine<'a> {
    model: &'a Llama,
    prompts: &'a [Vec<u32>],
    eos: u32,
    sampling: &'a Sampling,
    cache: Option<KvSlots>,
    slots: Vec<Option<Active>>,
    waiting: VecDeque<usize>,
    /// The slot whose positions 0..len(prompt) hold each prompt, and whether those keys
    /// are computed yet.
    holder: HashMap<&'a [u32], (usize, bool)>,
    pub out: Vec<Generated>,
    /// Rows finished (or skipped: no room in the context).
    pub done: usize,
    pub flops: f64,
}

impl<'a> Engine<'a> {
    pub fn new(
        model: &'a Llama,
        prompts: &'a [Vec<u32>],
        eos: u32,
        sampling: &'a Sampling,
        batch_rows: usize,
    ) -> Result<Self> {
        let ctx = model.cfg.max_position_embeddings;
        let budget = |p: &Vec<u32>| sampling.max_new_tokens.min(ctx.saturating_sub(p.len()));
        let waiting: VecDeque<usize> = (0..prompts.len()).filter(|&r| budget(&prompts[r]) > 0).collect();
        // The last drawn token is never fed back, so a sequence needs len + budget - 1.
        let max_len = waiting
            .iter()
            .map(|&r| prompts[r].len() + budget(&prompts[r]) - 1)
            .max();
        let slots = batch_rows.max(1).min(waiting.len());
        let cache = match max_len {
            Some(m) if slots > 0 => Some(KvSlots::new(model, slots, m)?),
            _ => None,
        };
        Ok(Self {
            model,
            prompts,
            eos,
            sampling,
            cache,
            slots: vec![None; slots],
            done: prompts.len() - waiting.len(),
            waiting,
            holder: HashMap::new(),
            out: vec![Generated::default(); prompts.len()],
            flops: 0.0,
        })
    }

    /// One step; false once every row is done.
    pub fn step(&mut self, rngs: &mut [ChaCha8Rng]) -> Result<bool> {
        let Some(cache) = self.cache.take() else {
            return Ok(false);
        };
        let more = self.step_with(&cache, rngs);
        self.cache = Some(cache);
        more
    }

    fn step_with(&mut self, cache: &KvSlots, rngs: &mut [ChaCha8Rng]) -> Result<bool> {
        let admitted = self.admit(cache)?;
        let (tokens, rows, heads) = self.queries(&admitted, cache.max_len());
        if tokens.is_empty() {
            return Ok(false);
        }
        // forward_flops_per_token(ctx) is 2 * matmul params + (its attention part) * ctx.
        let cfg = &self.model.cfg;
        let per_token = cfg.forward_flops_per_token(0);
        let per_ctx = cfg.forward_flops_per_token(1) - per_token;
        let contexts: usize = rows.pos.iter().map(|&p| p + 1).sum();
        self.flops += per_token * rows.len() as f64 + per_ctx * contexts as f64;
        let hidden = self.model.forward_slots(&tokens, &rows, cache)?;
        let idx: Vec<u32> = heads.iter().map(|&(_, q)| q as u32).collect();
        let idx = candle_core::Tensor::from_vec(idx, heads.len(), hidden.device())?;
        let logits = self.model.head_logits(&hidden.index_select(&idx, 0)?)?.detach(); // (m, V)
        for (slot, prefill) in &admitted {
            if let Prefill::Twin(from) = prefill {
                let len = self.prompts[self.slots[*slot].map_or(0, |a| a.row)].len();
                cache.copy_prefix(*from, *slot, len)?;
            }
        }
        for (_, ready) in self.holder.values_mut() {
            *ready = true;
        }
        let draw_rows: Vec<usize> = heads.iter().map(|&(s, _)| self.slots[s].map_or(0, |a| a.row)).collect();
        let next = pick(&logits, self.sampling, rngs, &draw_rows)?;
        let slots: Vec<usize> = heads.iter().map(|&(s, _)| s).collect();
        let mut with_twins: Vec<(usize, u32)> = slots.iter().copied().zip(next.iter().copied()).collect();
        for (slot, prefill) in &admitted {
            if let Prefill::Twin(from) = prefill {
                let n = slots.iter().position(|s| s == from).unwrap_or(0);
                let row = self.slots[*slot].map_or(0, |a| a.row);
                let tok = pick(&logits.narrow(0, n, 1)?, self.sampling, rngs, &[row])?[0];
                with_twins.push((*slot, tok));
            }
        }
        for (slot, tok) in with_twins {
            self.advance(slot, tok);
        }
        Ok(true)
    }

    /// Fills free slots from the waiting rows; returns each new slot and how it is filled.
    fn admit(&mut self, cache: &KvSlots) -> Result<Vec<(usize, Prefill)>> {
        let mut admitted = Vec::new();
        let mut budget = PREFILL_TOKENS;
        for slot in 0..self.slots.len() {
            if self.slots[slot].is_some() {
                continue;
            }
            let Some(&row) = self.waiting.front() else { break };
            let prompt = self.prompts[row].as_slice();
            let cost = match self.holder.get(prompt) {
                None => prompt.len(),
                Some(&(_, ready)) => usize::from(ready),
            };
            if cost > budget && !admitted.is_empty() {
                break; // the next step takes it
            }
            budget = budget.saturating_sub(cost);
            self.waiting.pop_front();
            let ctx = self.model.cfg.max_position_embeddings;
            let budget = self.sampling.max_new_tokens.min(ctx - prompt.len());
            let prefill = match self.holder.get(prompt) {
                Some(&(from, true)) => {
                    if from != slot {
                        cache.copy_prefix(from, slot, prompt.len() - 1)?;
                    }
                    Prefill::Copied
                }
                Some(&(from, false)) => Prefill::Twin(from),
                None => Prefill::Full,
            };
            self.holder.retain(|_, (s, _)| *s != slot);
            if matches!(prefill, Prefill::Full | Prefill::Copied) {
                self.holder.insert(prompt, (slot, matches!(prefill, Prefill::Copied)));
            }
            self.slots[slot] = Some(Active {
                row,
                len: 0,
                last: 0,
                budget,
            });
            admitted.push((slot, prefill));
        }
        Ok(admitted)
    }

    /// The step's queries (token, slot, position) and, for each slot that draws from
    /// them, the index of the query whose logits it draws from.
    fn queries(&mut self, admitted: &[(usize, Prefill)], max_len: usize) -> (Vec<u32>, CacheRows, Vec<(usize, usize)>) {
        let mut tokens = Vec::new();
        let mut rows = CacheRows {
            slot: Vec::new(),
            pos: Vec::new(),
            max_len,
        };
        let mut heads = Vec::new();
        let new: HashMap<usize, &Prefill> = admitted.iter().map(|(s, p)| (*s, p)).collect();
        for (slot, active) in self.slots.iter_mut().enumerate() {
            let Some(a) = active else { continue };
            let prompt = &self.prompts[a.row];
            let (from, to) = match new.get(&slot) {
                Some(Prefill::Full) => (0, prompt.len()),
                Some(Prefill::Copied) => (prompt.len() - 1, prompt.len()),
                Some(Prefill::Twin(_)) => {
                    a.len = prompt.len();
                    continue;
                }
                None => {
                    tokens.push(a.last);
                    rows.slot.push(slot);
                    rows.pos.push(a.len);
                    a.len += 1;
                    heads.push((slot, tokens.len() - 1));
                    continue;
                }
            };
            for (pos, &t) in prompt.iter().enumerate().take(to).skip(from) {
                tokens.push(t);
                rows.slot.push(slot);
                rows.pos.push(pos);
            }
            a.len = prompt.len();
            heads.push((slot, tokens.len() - 1));
        }
        (tokens, rows, heads)
    }

    /// Records the token drawn for the sequence in `slot`, and frees the slot when the
    /// sequence ends.
    fn advance(&mut self, slot: usize, tok: u32) {
        let Some(a) = self.slots[slot].as_mut() else { return };
        let g = &mut self.out[a.row];
        a.budget -= 1;
        if tok == self.eos {
            g.finished = true;
        } else {
            g.ids.push(tok);
            a.last = tok;
        }
        if g.finished || a.budget == 0 {
            self.slots[slot] = None;
            self.done += 1;
        }
    }
}
