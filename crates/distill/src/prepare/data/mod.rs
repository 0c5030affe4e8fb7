//! Data: the built-in arithmetic task, the user's JSONL or text files, and
//! tokenised, padded, masked batches.

pub mod arithmetic;
pub mod batch;

use std::collections::HashSet;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{DataConfig, DataSource};
use crate::error::{Error, Result};

/// One training or evaluation example. The loss covers the completion only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub prompt: String,
    pub completion: String,
    /// The verified final answer, when the task has one (arithmetic, or a JSONL
    /// completion that ends in `#### N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<i64>,
}

/// Train and held-out examples.
pub struct Splits {
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
}

// ChaCha stream numbers, so that each use of the seed draws independently.
const STREAM_TRAIN: u64 = 1;
const STREAM_EVAL: u64 = 2;
const STREAM_SPLIT: u64 = 3;

pub fn load(cfg: &DataConfig, seed: u64) -> Result<Splits> {
    match cfg.source {
        DataSource::Arithmetic => {
            let d = arithmetic::Difficulty {
                min_steps: cfg.min_steps,
                max_steps: cfg.max_steps,
                max_operand: cfg.max_operand,
                allow_multiply: cfg.allow_multiply,
            };
            let train = arithmetic::generate(cfg.train_examples, &d, seed, STREAM_TRAIN);
            // Held-out means unseen: drop any eval problem whose text is in train.
            let seen: HashSet<&str> = train.iter().map(|e| e.prompt.as_str()).collect();
            let eval = arithmetic::generate(cfg.eval_examples * 2, &d, seed, STREAM_EVAL)
                .into_iter()
                .filter(|e| !seen.contains(e.prompt.as_str()))
                .take(cfg.eval_examples)
                .collect();
            Ok(Splits { train, eval })
        }
        DataSource::Jsonl | DataSource::Text => {
            let path = cfg
                .path
                .as_deref()
                .ok_or_else(|| Error::Invalid("data.path is required".into()))?;
            let all = if cfg.source == DataSource::Jsonl {
                read_jsonl(path)?
            } else {
                read_text(path, cfg.seq_len)?
            };
            split(all, cfg.eval_fraction, seed, path)
        }
    }
}

/// A seeded shuffle, then the last `fraction` is held out.
fn split(mut all: Vec<Example>, fraction: f64, seed: u64, path: &Path) -> Result<Splits> {
    if all.len() < 2 {
        return Err(Error::Data {
            path: path.to_path_buf(),
            msg: format!(
                "{} usable example(s); need at least 2 (one to train, one to hold out)",
                all.len()
            ),
        });
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(STREAM_SPLIT);
    all.shuffle(&mut rng);
    let n_eval = ((all.len() as f64 * fraction).round() as usize).clamp(1, all.len() - 1);
    let eval = all.split_off(all.len() - n_eval);
    Ok(Splits { train: all, eval })
}

/// Parses every non-blank line of a JSONL file as a `T`. A line that does not
/// parse is an error naming the file and the line; `expected` says what the
/// line should have been, given the parser's complaint.
pub(crate) fn read_jsonl_records<T: serde::de::DeserializeOwned>(
    path: &Path,
    expected: impl Fn(&serde_json::Error) -> String,
) -> Result<Vec<T>> {
    let text = read_data_file(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(line).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            msg: format!("line {}: {}", i + 1, expected(&e)),
        })?);
    }
    Ok(out)
}

/// JSONL of `{"prompt": ..., "completion": ...}`; a line that does not parse is
/// an error naming the line.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Record {
        prompt: String,
        completion: String,
    }
    let records: Vec<Record> = read_jsonl_records(path, |e| {
        format!("expected {{\"prompt\": string, \"completion\": string}}: {e}")
    })?;
    Ok(records
        .into_iter()
        .map(|r| Example {
            answer: arithmetic::extract_answer(&r.completion),
            prompt: r.prompt,
            completion: r.completion,
        })
        .collect())
}

/// Plain text, cut at line boundaries into pieces of about `seq_len` tokens
/// (4 characters per token is a safe over-estimate; pieces are truncated to
/// `seq_len` tokens when batched). The whole piece is trained on.
pub fn read_text(path: &Path, seq_len: usize) -> Result<Vec<Example>> {
    let text = read_data_file(path)?;
    let budget = seq_len * 4;
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if !cur.is_empty() && cur.len() + line.len() + 1 > budget {
            out.push(std::mem::take(&mut cur));
        }
        cur.push_str(line);
        cur.push('\n');
    }
    if !cur.trim().is_empty() {
        out.push(cur);
    }
    Ok(out
        .into_iter()
        .filter(|s| !s.trim().is_empty())
        .map(|completion| Example {
            prompt: String::new(),
            completion,
            answer: None,
        })
        .collect())
}

/// The text of a data file; a file that cannot be read is a data error naming it.
fn read_data_file(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        msg: format!("cannot read it ({e}); check data.path in the config, or the --input flag"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::IoContext;

    #[test]
    fn arithmetic_eval_never_overlaps_train() -> Result<()> {
        let cfg = DataConfig {
            train_examples: 300,
            eval_examples: 50,
            max_operand: 5,
            ..DataConfig::default()
        };
        let s = load(&cfg, 9)?;
        assert_eq!(s.train.len(), 300);
        assert_eq!(s.eval.len(), 50);
        let train: HashSet<_> = s.train.iter().map(|e| &e.prompt).collect();
        assert!(s.eval.iter().all(|e| !train.contains(&e.prompt)));
        Ok(())
    }

    #[test]
    fn jsonl_errors_name_the_line() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"prompt\":\"a\",\"completion\":\"b #### 2\"}\n{\"prompt\":1}\n").at(&p)?;
        let err = read_jsonl(&p).unwrap_err().to_string();
        assert!(err.contains("d.jsonl") && err.contains("line 2"), "{err}");
        std::fs::write(&p, "{\"prompt\":\"a\",\"completion\":\"b #### 2\"}\n\n").at(&p)?;
        let ok = read_jsonl(&p)?;
        assert_eq!(ok[0].answer, Some(2));
        Ok(())
    }

    #[test]
    fn text_is_cut_into_pieces_and_split() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        let p = dir.path().join("t.txt");
        let body: String = (0..200).map(|i| format!("line number {i} of the text\n")).collect();
        std::fs::write(&p, &body).at(&p)?;
        let pieces = read_text(&p, 16)?;
        assert!(pieces.len() > 10);
        assert!(pieces.iter().all(|e| e.completion.len() <= 64 + 30));
        let joined: String = pieces.iter().map(|e| e.completion.as_str()).collect();
        assert_eq!(joined, body, "no text is lost when cutting");
        let s = split(pieces, 0.1, 1, &p)?;
        assert!(!s.eval.is_empty() && !s.train.is_empty());
        Ok(())
    }
}
