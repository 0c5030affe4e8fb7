//! The prepare stage: the data, the teacher to load (a folder, a GGUF file or a Hub
//! model), the tokenizer, the students' vocabulary and the tokenised splits. Everything
//! is read and checked here, before the run directory is made.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::stage::same_on_every_rank;
use crate::config::{Config, PromptPool};
use crate::distributed::Collective;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::prepare::data::{self, batch::Encoded, Splits};
use crate::prepare::tokenizer::Tokenizer;
use crate::progress::Progress;
use crate::teacher::{logit_cache, traces};
use crate::train::checkpoint;

/// What the stages after `prepare` start from.
pub(crate) struct Prepared {
    pub(crate) splits: Splits,
    pub(crate) tok: Tokenizer,
    /// The students' vocabulary: the teacher's when it is loaded (it may pad its
    /// vocabulary beyond the tokenizer, as many Hugging Face models do).
    pub(crate) vocab: usize,
    pub(crate) train_enc: Vec<Encoded>,
    pub(crate) eval_enc: Vec<Encoded>,
    /// A teacher loaded from a checkpoint, and where it came from.
    pub(crate) teacher: Option<(Llama, PathBuf)>,
    /// The prompts of `onpolicy.prompts_path` when the on-policy stage samples on a
    /// file (`onpolicy.prompts = "file"`); empty otherwise.
    pub(crate) prompt_file: Vec<data::Example>,
}

impl Prepared {
    /// The encoded training examples of the teacher (the first `teacher.train_examples`)
    /// and of the students (the last `student.train_examples`).
    pub(crate) fn train_slices(&self, cfg: &Config) -> (&[Encoded], &[Encoded]) {
        let n = self.train_enc.len();
        let teacher = &self.train_enc[..cfg.teacher.train_examples.unwrap_or(n).min(n)];
        (teacher, students_part(cfg, &self.train_enc))
    }
}

/// The students' part of a training split: its last `student.train_examples` items
/// (all of them when that is unset or larger), the problems the traces are written for.
pub(crate) fn students_part<'a, T>(cfg: &Config, all: &'a [T]) -> &'a [T] {
    let n = all.len();
    &all[n - cfg.student.train_examples.unwrap_or(n).min(n)..]
}

/// Reads and checks every input of the run.
pub(crate) fn prepare(
    cfg: &Config,
    resume: bool,
    dev: &Device,
    comm: &dyn Collective,
    progress: &dyn Progress,
) -> Result<Prepared> {
    let splits = data::load(&cfg.data, cfg.run.seed)?;
    let teacher_src = teacher_source(cfg, comm, progress)?;
    let loaded = match &teacher_src {
        Some(dir) => Some(checkpoint::load(dir, dev)?),
        None => None,
    };
    let tok = match (&cfg.tokenizer.path, &loaded) {
        (Some(p), _) => Tokenizer::load(p)?,
        (None, Some((_, t))) => t.clone(),
        (None, None) => run_tokenizer(cfg, resume, &splits)?,
    };
    let (vocab, teacher) = match (loaded, teacher_src) {
        (Some((teacher, teacher_tok)), Some(dir)) => {
            let vocab = checked_teacher_vocab(cfg, &tok, &teacher, &teacher_tok, &dir)?;
            (vocab, Some((teacher, dir)))
        }
        _ => (tok.vocab_size(), None),
    };
    let (train_enc, dropped) = batch_encode(&tok, &splits.train, cfg)?;
    let (eval_enc, _) = batch_encode(&tok, &splits.eval, cfg)?;
    if comm.world() > 1 {
        // The gradient sums assume every rank holds the same data and vocabulary.
        let id = format!(
            "{} {} {} {} {} {}",
            logit_cache::fingerprint(&train_enc),
            logit_cache::fingerprint(&eval_enc),
            vocab,
            tok.bos,
            tok.eos,
            tok.pad
        );
        same_on_every_rank(comm, "tokenised data and vocabulary", &id)?;
    }
    if dropped > 0 {
        progress.message(&format!(
            "{dropped} training examples had no completion left after truncation to seq_len and were skipped"
        ));
    }
    if train_enc.is_empty() || eval_enc.is_empty() {
        return Err(Error::Invalid(format!(
            "no usable {} examples: every one is empty or its completion falls past data.seq_len = {}",
            if train_enc.is_empty() { "training" } else { "held-out" },
            cfg.data.seq_len
        )));
    }
    let prompt_file = prompt_file(cfg, &tok)?;
    Ok(Prepared {
        splits,
        tok,
        vocab,
        train_enc,
        eval_enc,
        teacher,
        prompt_file,
    })
}

/// The prompts of `onpolicy.prompts_path` (the prompt files of `distill generate
/// --input`; answers and completions are not used), read and checked now (each must
/// leave room for a sampled token in `data.seq_len`) rather than when the on-policy
/// stage starts.
fn prompt_file(cfg: &Config, tok: &Tokenizer) -> Result<Vec<data::Example>> {
    let o = &cfg.onpolicy;
    let (true, PromptPool::File, Some(path)) = (o.enabled, o.prompts, &o.prompts_path) else {
        return Ok(Vec::new());
    };
    if let Err(e) = std::fs::metadata(path) {
        return Err(Error::Data {
            path: path.clone(),
            msg: format!("cannot read it ({e}); check onpolicy.prompts_path in the config"),
        });
    }
    let prompts = traces::read_prompts(path)?;
    for (i, p) in prompts.iter().enumerate() {
        let len = tok.encode_prompt(&p.prompt)?.len();
        if len > cfg.data.seq_len {
            return Err(Error::Data {
                path: path.clone(),
                msg: format!(
                    "prompt {} is {len} tokens, which leaves no room for a sampled token in data.seq_len = {}; \
                     shorten it or raise data.seq_len",
                    i + 1,
                    cfg.data.seq_len
                ),
            });
        }
    }
    Ok(prompts
        .into_iter()
        .map(|p| data::Example {
            prompt: p.prompt,
            completion: String::new(),
            answer: None,
        })
        .collect())
}

fn batch_encode(tok: &Tokenizer, examples: &[data::Example], cfg: &Config) -> Result<(Vec<Encoded>, usize)> {
    data::batch::encode(tok, examples, cfg.data.seq_len)
}

/// A teacher to load: a folder or file, or a Hub model resolved to its folder in the
/// Hub cache (rank 0 fills the cache; the others then find the files there).
fn teacher_source(cfg: &Config, comm: &dyn Collective, progress: &dyn Progress) -> Result<Option<PathBuf>> {
    match (&cfg.teacher.checkpoint, &cfg.teacher.hub) {
        (Some(dir), _) => Ok(Some(dir.clone())),
        (None, Some(id)) => {
            let rev = cfg.teacher.revision.as_deref().unwrap_or("main");
            if !comm.is_root() {
                comm.barrier()?;
            }
            let dir = crate::prepare::hub::resolve(id, rev)?;
            if comm.is_root() {
                comm.barrier()?;
            }
            progress.message(&format!("teacher: hub model {id}@{rev} -> {}", dir.display()));
            Ok(Some(dir))
        }
        (None, None) => Ok(None),
    }
}

/// The tokenizer of a run without a loaded teacher or `tokenizer.path`: the one a
/// resumed run saved, else one trained on the training split.
fn run_tokenizer(cfg: &Config, resume: bool, splits: &Splits) -> Result<Tokenizer> {
    let saved = cfg.run_dir().join("tokenizer.json");
    if resume && saved.is_file() {
        return Tokenizer::load(&saved);
    }
    let texts = splits
        .train
        .iter()
        .flat_map(|e| [e.prompt.as_str(), e.completion.as_str()]);
    Tokenizer::train(texts, cfg.tokenizer.vocab_size)
}

/// The students' vocabulary is the teacher's: KD compares their logits token by token.
/// The run's tokenizer must be the teacher's, and the teacher must cover the run's
/// sequence length.
fn checked_teacher_vocab(
    cfg: &Config,
    tok: &Tokenizer,
    teacher: &Llama,
    teacher_tok: &Tokenizer,
    teacher_dir: &Path,
) -> Result<usize> {
    let same = tok.vocab_map() == teacher_tok.vocab_map();
    if !same || tok.vocab_size() > teacher.cfg.vocab_size {
        return Err(Error::Config {
            path: cfg.tokenizer.path.clone().unwrap_or_else(|| teacher_dir.to_path_buf()),
            msg: format!(
                "teacher/student vocabulary mismatch: the teacher {} has {} tokens (vocab_size {}), \
                 tokenizer.path has {} tokens{}; distillation needs one vocabulary \
                 (drop tokenizer.path to use the teacher's tokenizer)",
                teacher_dir.display(),
                teacher_tok.vocab_size(),
                teacher.cfg.vocab_size,
                tok.vocab_size(),
                if same { "" } else { " with different token ids" },
            ),
        });
    }
    if teacher.cfg.max_position_embeddings < cfg.data.seq_len {
        return Err(Error::Config {
            path: teacher_dir.to_path_buf(),
            msg: format!(
                "the teacher's max_position_embeddings {} is shorter than data.seq_len {}; lower data.seq_len",
                teacher.cfg.max_position_embeddings, cfg.data.seq_len
            ),
        });
    }
    Ok(teacher.cfg.vocab_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_files_read_prompts_and_name_the_bad_line() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Invalid(e.to_string()))?;
        let p = dir.path().join("p.jsonl");
        let mut cfg = Config::default();
        (cfg.onpolicy.enabled, cfg.onpolicy.prompts) = (true, PromptPool::File);
        cfg.onpolicy.prompts_path = Some(p.clone());
        let tok = Tokenizer::train(["a b c #### 3\n"; 8].iter().copied(), 300)?;
        let write = |text: &str| std::fs::write(&p, text).map_err(|e| Error::Invalid(e.to_string()));
        write("{\"prompt\":\"a\"}\n\n{\"prompt\":\"b\",\"completion\":\"c #### 3\"}\n")?;
        let ok = prompt_file(&cfg, &tok)?;
        let got: Vec<(&str, &str, Option<i64>)> = ok.iter().map(|e| (&*e.prompt, &*e.completion, e.answer)).collect();
        assert_eq!(got, [("a", "", None), ("b", "", None)]);
        write("{\"prompt\":\"a\"}\n{\"text\":\"b\"}\n")?;
        let err = prompt_file(&cfg, &tok).unwrap_err().to_string();
        assert!(
            err.contains("p.jsonl") && err.contains("line 2") && err.contains("prompt"),
            "{err}"
        );
        write("\n")?;
        let err = prompt_file(&cfg, &tok).unwrap_err().to_string();
        assert!(err.contains("p.jsonl") && err.contains("no prompts"), "{err}");
        cfg.onpolicy.prompts_path = Some(dir.path().join("missing.jsonl"));
        let err = prompt_file(&cfg, &tok).unwrap_err().to_string();
        assert!(
            err.contains("missing.jsonl") && err.contains("onpolicy.prompts_path"),
            "{err}"
        );
        Ok(())
    }
}
