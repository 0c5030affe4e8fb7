//! Teacher-written reasoning traces with rejection sampling, the recipe behind
//! DeepSeek-R1's distilled models: the teacher samples K solutions per
//! prompt, the task's verifier checks each final answer, and only verified
//! traces are kept for the student's supervised fine-tuning.
//!
//! Generation is split into a fixed, global plan of batches (prompts grouped
//! by token length, then cut into batches in prompt order). Shard `i/n` runs
//! batches `i, i + n, i + 2n, ...`, and every sample draws from its own random
//! stream, `(seed, prompt id * K + sample)`. A batch therefore computes the
//! same numbers whichever process runs it, and merging the shards gives the
//! single-process file byte for byte.
//!
//! The trace file is JSONL, one record per sample (kept or not), sorted by
//! prompt id and sample number.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Keep;
use crate::error::{Error, Result};
use crate::fsio::write_file_atomic;
use crate::model::generate::{self, generate_rows, row_rng, Sampling};
use crate::model::Llama;
use crate::prepare::data::{arithmetic, read_jsonl_records};
use crate::prepare::tokenizer::Tokenizer;

/// Settings of one trace-generation job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceSettings {
    /// Samples drawn per prompt (K).
    pub samples: usize,
    pub sampling: Sampling,
    pub keep: Keep,
    /// Correct traces longer than this many tokens are rejected; None keeps any length.
    pub max_completion_tokens: Option<usize>,
    /// Rows (prompt samples) decoded together.
    pub batch_rows: usize,
}

/// One prompt to solve; `answer` is what the verifier checks against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub id: u64,
    pub prompt: String,
    pub answer: Option<i64>,
}

/// The verifier's judgement of one sample.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The final `#### N` equals the expected answer.
    Correct,
    /// A final answer that is not the expected one.
    Wrong,
    /// The sample ended without a `#### N` line.
    NoAnswer,
    /// The sample ran out of `max_new_tokens` (or of the model's context) before ending.
    Unfinished,
    /// The prompt leaves no room for a new token in the model's context
    /// (`max_position_embeddings`), so nothing was generated. Shorten the prompt or use a
    /// model with a longer context.
    PromptTooLong,
    /// Correct, but longer than `max_completion_tokens`.
    TooLong,
    /// The prompt has no expected answer, so nothing can be verified.
    Unverifiable,
}

/// One sampled trace, as written to the trace file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TraceRecord {
    /// The prompt's index in the input.
    pub id: u64,
    /// Which of the K samples of that prompt.
    pub sample: u32,
    pub prompt: String,
    pub completion: String,
    /// The expected answer.
    pub answer: Option<i64>,
    /// The answer the sample gave.
    pub predicted: Option<i64>,
    pub verdict: Verdict,
    /// Whether rejection sampling kept it.
    pub kept: bool,
    /// Completion length in tokens.
    pub tokens: usize,
    /// Content id of the teacher checkpoint (`checkpoint::content_id`).
    pub teacher: String,
    pub temperature: f64,
    pub top_p: f64,
    /// The top-k cut of the sampling, 0 for none (then not written, so that files of
    /// jobs without one read as before).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub top_k: usize,
    pub max_new_tokens: usize,
    pub seed: u64,
}

fn is_zero(k: &usize) -> bool {
    *k == 0
}

/// A shard of a generation job: `index` of `count`, counted from 0 (as Slurm
/// array task ids and Kubernetes completion indexes are).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Parses `i/n` with 0 <= i < n.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::Invalid(format!(
                "--shard {s:?}: expected i/n with 0 <= i < n, e.g. 0/4 (shards count from 0, like $SLURM_ARRAY_TASK_ID)"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// Counts of a generation job, for the report and the ledger.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Acceptance {
    /// Prompts with an expected answer that were sampled.
    pub prompts: usize,
    pub samples: usize,
    pub correct: usize,
    pub kept: usize,
    /// Prompts with at least one kept trace.
    pub prompts_solved: usize,
    /// kept / samples.
    pub acceptance_rate: f64,
    /// Generated tokens, over all samples.
    pub tokens: u64,
    pub flops: f64,
    /// Prompts too long for the model's context: sampled not at all, each of their
    /// samples recorded as `prompt_too_long` (and counted in `samples`).
    #[serde(default)]
    pub prompts_too_long: usize,
}

impl Acceptance {
    pub fn of(records: &[TraceRecord]) -> Self {
        let solved: BTreeSet<u64> = records.iter().filter(|r| r.kept).map(|r| r.id).collect();
        let prompts: BTreeSet<u64> = records.iter().map(|r| r.id).collect();
        let kept = records.iter().filter(|r| r.kept).count();
        Acceptance {
            prompts: prompts.len(),
            samples: records.len(),
            correct: records
                .iter()
                .filter(|r| matches!(r.verdict, Verdict::Correct | Verdict::TooLong))
                .count(),
            kept,
            prompts_solved: solved.len(),
            acceptance_rate: if records.is_empty() {
                0.0
            } else {
                kept as f64 / records.len() as f64
            },
            tokens: records.iter().map(|r| r.tokens as u64).sum(),
            flops: 0.0,
            prompts_too_long: records
                .iter()
                .filter(|r| r.verdict == Verdict::PromptTooLong)
                .map(|r| r.id)
                .collect::<BTreeSet<u64>>()
                .len(),
        }
    }
}

/// Samples K traces for each prompt of `shard` that has an expected answer,
/// verifies them, and applies the keep policy. Returns the records sorted by
/// (id, sample). `on_batch(done, total)` is called as samples finish.
pub fn generate(
    model: &Llama,
    tok: &Tokenizer,
    teacher_id: &str,
    prompts: &[Prompt],
    s: &TraceSettings,
    shard: Shard,
    on_batch: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<TraceRecord>, Acceptance)> {
    if s.samples == 0 || s.samples > u32::MAX as usize {
        return Err(Error::Invalid(format!(
            "samples must be in 1..=2^32-1, got {}",
            s.samples
        )));
    }
    let mut ids = BTreeSet::new();
    if let Some(p) = prompts.iter().find(|p| !ids.insert(p.id)) {
        return Err(Error::Invalid(format!("prompt id {} appears twice", p.id)));
    }
    let mut encoded = Vec::new();
    for p in prompts.iter().filter(|p| p.answer.is_some()) {
        encoded.push((p.id, tok.encode_prompt(&p.prompt)?));
    }
    // Prompt i (in order of id) belongs to shard i mod n. Each sample draws from its own
    // stream, so what it writes does not depend on the shard or its batch neighbours.
    encoded.sort_by_key(|(id, _)| *id);
    let mine: Vec<&(u64, Vec<u32>)> = encoded.iter().skip(shard.index).step_by(shard.count).collect();
    let by_id: BTreeMap<u64, &Prompt> = prompts.iter().map(|p| (p.id, p)).collect();
    let mut rows = Vec::with_capacity(mine.len() * s.samples);
    let mut rngs = Vec::with_capacity(rows.capacity());
    for (id, e) in &mine {
        for k in 0..s.samples {
            rows.push(e.clone());
            rngs.push(row_rng(s.sampling.seed, id * s.samples as u64 + k as u64));
        }
    }
    let total = rows.len();
    let (out, flops) = generate_rows(
        model,
        &rows,
        tok.eos,
        &s.sampling,
        &mut rngs,
        s.batch_rows,
        &mut |done| on_batch(done, total),
    )?;
    let context = model.cfg.max_position_embeddings;
    let mut records = Vec::with_capacity(total);
    for (n, (id, e)) in mine.iter().enumerate() {
        let too_long = generate::too_long(e.len(), context);
        let p = by_id[id];
        let mut kept_one = false;
        for k in 0..s.samples {
            let g = &out[n * s.samples + k];
            let completion = tok.decode(&g.ids)?;
            let predicted = arithmetic::extract_answer(&completion);
            let verdict = match (p.answer, predicted) {
                (None, _) => Verdict::Unverifiable,
                _ if too_long => Verdict::PromptTooLong,
                _ if !g.finished => Verdict::Unfinished,
                (Some(_), None) => Verdict::NoAnswer,
                (Some(a), Some(b)) if a != b => Verdict::Wrong,
                _ if s.max_completion_tokens.is_some_and(|m| g.ids.len() > m) => Verdict::TooLong,
                _ => Verdict::Correct,
            };
            let kept = verdict == Verdict::Correct && (s.keep == Keep::All || !kept_one);
            kept_one |= kept;
            records.push(TraceRecord {
                id: p.id,
                sample: k as u32,
                prompt: p.prompt.clone(),
                completion,
                answer: p.answer,
                predicted,
                verdict,
                kept,
                tokens: g.ids.len(),
                teacher: teacher_id.to_string(),
                temperature: s.sampling.temperature,
                top_p: s.sampling.top_p,
                top_k: s.sampling.top_k,
                max_new_tokens: s.sampling.max_new_tokens,
                seed: s.sampling.seed,
            });
        }
    }
    records.sort_by_key(|r| (r.id, r.sample));
    let mut acc = Acceptance::of(&records);
    acc.flops = flops;
    Ok((records, acc))
}

/// The records as JSONL, one per line.
pub fn to_jsonl(records: &[TraceRecord]) -> Result<String> {
    let mut out = String::new();
    for r in records {
        out += &serde_json::to_string(r).map_err(|e| Error::Invalid(format!("cannot write a trace record: {e}")))?;
        out.push('\n');
    }
    Ok(out)
}

/// Writes a trace file atomically.
pub fn write(path: &Path, records: &[TraceRecord]) -> Result<()> {
    write_file_atomic(path, to_jsonl(records)?.as_bytes())
}

/// Reads a trace file; a malformed line, or a record no generation writes (a kept sample
/// that is not correct, a sample number or sampling setting out of range), is an error
/// naming the file and line.
pub fn read(path: &Path) -> Result<Vec<TraceRecord>> {
    let records: Vec<TraceRecord> = read_jsonl_records(path, |e| {
        format!("not a trace record ({e}); was it written by `distill generate --out`?")
    })?;
    for (i, r) in records.iter().enumerate() {
        let problem = if r.kept && r.verdict != Verdict::Correct {
            Some(format!("is kept but its verdict is {:?}, not correct", r.verdict))
        } else if r.sample == u32::MAX {
            Some(format!(
                "has sample number {}, beyond the most samples a job draws",
                r.sample
            ))
        } else if !(r.temperature.is_finite() && r.temperature >= 0.0) {
            Some(format!("has temperature {}, not a finite number >= 0", r.temperature))
        } else if !(r.top_p > 0.0 && r.top_p <= 1.0) {
            Some(format!("has top_p {}, not in (0, 1]", r.top_p))
        } else {
            None
        };
        if let Some(p) = problem {
            // Lines are counted without blank ones here; name the record as well.
            return Err(Error::Data {
                path: path.to_path_buf(),
                msg: format!(
                    "record {} (prompt {} sample {}) {p}; the file was not written by `distill generate --out`, \
                     or was edited",
                    i + 1,
                    r.id,
                    r.sample
                ),
            });
        }
    }
    Ok(records)
}

/// Joins shard files into one trace file's records, sorted by (id, sample).
/// Every shard must come from the same teacher and settings, and no sample
/// may appear twice. With `expected` (the prompts the job was given), every
/// prompt with an answer must have all of its samples: a missing shard is an
/// error, not a smaller file.
pub fn merge(shards: &[PathBuf], expected: Option<&[Prompt]>) -> Result<Vec<TraceRecord>> {
    let mut all: BTreeMap<(u64, u32), (TraceRecord, &Path)> = BTreeMap::new();
    let mut job: Option<(String, u64, u64, usize, usize, u64)> = None;
    for path in shards {
        for r in read(path)? {
            let key = (
                r.teacher.clone(),
                r.temperature.to_bits(),
                r.top_p.to_bits(),
                r.top_k,
                r.max_new_tokens,
                r.seed,
            );
            match &job {
                None => job = Some(key),
                Some(j) if *j != key => {
                    return Err(Error::Data {
                        path: path.clone(),
                        msg: format!(
                            "prompt {} sample {} comes from another job (teacher {}, temperature {}, top_p {}, \
                             top_k {}, max_new_tokens {}, seed {}) than the first shard's; merge only shards of one run",
                            r.id, r.sample, r.teacher, r.temperature, r.top_p, r.top_k, r.max_new_tokens, r.seed
                        ),
                    });
                }
                Some(_) => {}
            }
            if let Some((_, other)) = all.get(&(r.id, r.sample)) {
                return Err(Error::Data {
                    path: path.clone(),
                    msg: format!(
                        "prompt {} sample {} is also in {}; was one shard given twice?",
                        r.id,
                        r.sample,
                        other.display()
                    ),
                });
            }
            all.insert((r.id, r.sample), (r, path.as_path()));
        }
    }
    if let Some(prompts) = expected {
        let samples = all.keys().map(|k| k.1).max().map_or(0, |m| m + 1);
        for p in prompts.iter().filter(|p| p.answer.is_some()) {
            for k in 0..samples {
                if !all.contains_key(&(p.id, k)) {
                    let names: Vec<String> = shards.iter().map(|s| s.display().to_string()).collect();
                    return Err(Error::Invalid(format!(
                        "prompt {} sample {k} is in none of the {} shards ({}); is a shard missing?",
                        p.id,
                        shards.len(),
                        names.join(", ")
                    )));
                }
            }
        }
    }
    Ok(all.into_values().map(|(r, _)| r).collect())
}

/// Reads prompts from JSONL: `{"prompt": ...}` with an optional integer
/// `"answer"`, or a `"completion"` whose final `#### N` gives the answer.
/// Ids are the 0-based record numbers.
pub fn read_prompts(path: &Path) -> Result<Vec<Prompt>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Record {
        prompt: String,
        #[serde(default)]
        answer: Option<i64>,
        #[serde(default)]
        completion: Option<String>,
    }
    let records: Vec<Record> = read_jsonl_records(path, |e| {
        format!(
            "expected {{\"prompt\": string, \"answer\": integer (optional), \
             \"completion\": string (optional)}}: {e}"
        )
    })?;
    let out: Vec<Prompt> = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| Prompt {
            id: i as u64,
            answer: r
                .answer
                .or_else(|| r.completion.as_deref().and_then(arithmetic::extract_answer)),
            prompt: r.prompt,
        })
        .collect();
    if out.is_empty() {
        return Err(Error::Data {
            path: path.to_path_buf(),
            msg: "no prompts in the file".into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_parsing_counts_from_zero() -> Result<()> {
        assert_eq!(Shard::parse("0/3")?, Shard { index: 0, count: 3 });
        assert_eq!(Shard::parse("2/3")?, Shard { index: 2, count: 3 });
        for bad in ["3/3", "1/0", "a/2", "1", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn acceptance_counts_kept_and_solved() {
        let rec = |id, sample, verdict, kept| TraceRecord {
            id,
            sample,
            prompt: String::new(),
            completion: String::new(),
            answer: Some(1),
            predicted: None,
            verdict,
            kept,
            tokens: 2,
            teacher: String::new(),
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 8,
            seed: 0,
        };
        let a = Acceptance::of(&[
            rec(0, 0, Verdict::Correct, true),
            rec(0, 1, Verdict::Correct, false),
            rec(1, 0, Verdict::Wrong, false),
            rec(1, 1, Verdict::TooLong, false),
        ]);
        assert_eq!(
            (a.prompts, a.samples, a.correct, a.kept, a.prompts_solved),
            (2, 4, 3, 1, 1)
        );
        assert_eq!(a.acceptance_rate, 0.25);
        assert_eq!(a.tokens, 8);
    }
}
