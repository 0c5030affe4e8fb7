//! Held-out evaluation of every model: loss, and accuracy from greedy answers checked
//! by the verifier; the report (`report`) and its charts (`charts`).

pub mod arms;
pub mod charts;
pub mod report;

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Serialize;

use crate::config::Config;
use crate::cost::ledger::{Ledger, StageCost};
use crate::device::DeviceInfo;
use crate::distributed;
use crate::distributed::Collective;
use crate::error::{Error, Result};
use crate::model::generate::{self, Accuracy};
use crate::model::Llama;
use crate::prepare::data::{self, batch, Example};
use crate::prepare::tokenizer::Tokenizer;
use crate::progress::Progress;
use crate::train::{self, checkpoint};

/// Held-out figures of one model.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ModelReport {
    pub name: String,
    pub checkpoint: PathBuf,
    pub params: usize,
    pub eval_loss: f32,
    pub accuracy: Option<f64>,
    pub correct: usize,
    pub evaluated: usize,
    pub samples: Vec<generate::Sample>,
}

/// The held-out set: its examples (for the verifier) and their encodings (for the loss).
pub struct HeldOut<'a> {
    pub tok: &'a Tokenizer,
    pub enc: &'a [batch::Encoded],
    pub examples: &'a [Example],
}

/// The `eval` stage: every model's held-out figures. A resumed run that had finished is
/// evaluated again (the figures are deterministic) but billed once.
pub fn stage<'a>(
    models: impl Iterator<Item = (&'a str, &'a Llama, PathBuf)>,
    held_out: &HeldOut,
    (cfg, info): (&Config, &DeviceInfo),
    comm: &dyn Collective,
    ledger: &mut Ledger,
    progress: &dyn Progress,
) -> Result<Vec<ModelReport>> {
    let HeldOut {
        tok,
        enc: eval_enc,
        examples: eval_examples,
    } = *held_out;
    progress.stage_start("eval", 0);
    progress.message("evaluating on the held-out set");
    let mut reports = Vec::new();
    let (mut tokens, mut flops) = (0u64, 0.0);
    for (name, model, dir) in models {
        let (report, t, f) = evaluate(name, model, tok, &dir, eval_enc, eval_examples, cfg, comm)?;
        tokens += t;
        flops += f;
        reports.push(report);
    }
    // A resumed run that had finished is evaluated again (the figures are
    // deterministic); that time is billed too, as every second of a run is.
    ledger.record(StageCost::work("eval", info, &cfg.cost, tokens, flops, 0.0))?;
    Ok(reports)
}

/// Held-out loss and (for tasks with answers) greedy-decoding accuracy, the work split
/// over the ranks.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    name: &str,
    model: &Llama,
    tok: &Tokenizer,
    dir: &Path,
    eval_enc: &[batch::Encoded],
    eval_examples: &[Example],
    cfg: &Config,
    comm: &dyn Collective,
) -> Result<(ModelReport, u64, f64)> {
    let eval_loss = train::eval_loss_on(model, eval_enc, cfg.eval.batch_size, tok.pad, comm)?;
    if !eval_loss.is_finite() {
        // A NaN or infinite loss is a broken model, never a figure to report.
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: format!(
                "{name}: the held-out loss is {eval_loss}, so the model's outputs are not finite; check its \
                 config.json (rms_norm_eps, rope_theta) and weights against the model's source"
            ),
        });
    }
    let tokens: u64 = eval_enc.iter().map(|e| (e.ids.len() - 1) as u64).sum();
    let mut flops: f64 = eval_enc
        .iter()
        .map(|e| model.cfg.forward_flops_per_token(e.ids.len()) * (e.ids.len() - 1) as f64)
        .sum();
    let acc: Option<Accuracy> = if eval_examples.iter().any(|e| e.answer.is_some()) && cfg.eval.examples > 0 {
        Some(sharded_accuracy(model, tok, eval_examples, cfg, comm)?)
    } else {
        None
    };
    flops += acc.as_ref().map_or(0.0, |a| a.flops);
    let gen_tokens = acc.as_ref().map_or(0, |a| a.tokens);
    Ok((
        ModelReport {
            name: name.to_string(),
            checkpoint: dir.to_path_buf(),
            params: model.cfg.num_params(),
            eval_loss,
            accuracy: acc.as_ref().map(|a| a.accuracy),
            correct: acc.as_ref().map_or(0, |a| a.correct),
            evaluated: acc.as_ref().map_or(0, |a| a.evaluated),
            samples: acc.map(|a| a.samples.into_iter().take(3).collect()).unwrap_or_default(),
        },
        tokens + gen_tokens,
        flops,
    ))
}

/// Greedy-decoding accuracy with the examples split over the ranks (contiguous slices,
/// so the samples gathered in rank order are in the examples' order).
fn sharded_accuracy(
    model: &Llama,
    tok: &Tokenizer,
    examples: &[Example],
    cfg: &Config,
    comm: &dyn Collective,
) -> Result<Accuracy> {
    let (e, world) = (&cfg.eval, comm.world());
    if world == 1 {
        return generate::accuracy(model, tok, examples, e.examples, e.max_new_tokens, e.batch_size);
    }
    let chosen: Vec<Example> = examples
        .iter()
        .filter(|x| x.answer.is_some())
        .take(e.examples)
        .cloned()
        .collect();
    let mine = &chosen[distributed::shard_range(chosen.len(), comm.rank(), world)];
    let part = generate::accuracy(model, tok, mine, mine.len(), e.max_new_tokens, e.batch_size)?;
    let mut samples = Vec::with_capacity(chosen.len());
    let json = serde_json::to_vec(&part.samples).map_err(|e| Error::Invalid(e.to_string()))?;
    for bytes in comm.gather_bytes(&json)? {
        let s: Vec<generate::Sample> = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Distributed(format!("a rank sent bad evaluation samples: {e}")))?;
        samples.extend(s);
    }
    let mut totals = [part.tokens as f64, part.flops];
    comm.sum_f64(&mut totals)?;
    Ok(Accuracy::of(samples, totals[0] as u64, totals[1]))
}

/// `distill eval --checkpoint DIR`: rebuilds the held-out set from the
/// checkpoint's own `distill.toml` (or `config`, when given) and evaluates it.
pub fn eval_checkpoint(
    dir: &Path,
    config: Option<&Config>,
    device: &Device,
    weights: crate::config::MatmulWeights,
) -> Result<ModelReport> {
    // A GGUF file loads frozen, straight into its f32 or int8 weights; the checks below still run.
    let (model, tok) = checkpoint::load_with(dir, device, weights)?;
    let cfg = match config {
        Some(c) => c.clone(),
        None => {
            let p = dir.join("distill.toml");
            if !p.is_file() {
                return Err(Error::Checkpoint {
                    path: dir.to_path_buf(),
                    msg: "distill.toml is missing, so the held-out set is unknown; pass --config FILE".into(),
                });
            }
            Config::load(&p)?
        }
    };
    let mut model = model;
    model.set_compute_dtype(cfg.compute_dtype(device)?)?;
    let mut model = model.with_matmul_weights(weights)?;
    model.set_kernels(cfg.kernels()?);
    let splits = data::load(&cfg.data, cfg.run.seed)?;
    let (eval_enc, _) = batch::encode(&tok, &splits.eval, cfg.data.seq_len)?;
    let longest = eval_enc.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    if longest > model.cfg.max_position_embeddings {
        return Err(Error::Checkpoint {
            path: if dir.is_dir() {
                dir.join("config.json")
            } else {
                dir.to_path_buf()
            },
            msg: format!(
                "max_position_embeddings {} is shorter than the held-out sequences ({longest} tokens); \
                 lower data.seq_len ({}) in the config, or check the model's context length",
                model.cfg.max_position_embeddings, cfg.data.seq_len
            ),
        });
    }
    let name = dir
        .file_name()
        .map_or("model".into(), |n| n.to_string_lossy().to_string());
    let report = evaluate(
        &name,
        &model,
        &tok,
        dir,
        &eval_enc,
        &splits.eval,
        &cfg,
        &distributed::Single,
    );
    // Errors of the model's forward or decoding (a shape, non-finite logits) name the checkpoint.
    report.map(|r| r.0).map_err(|e| match e {
        Error::Candle(_) | Error::Shape(_) | Error::Invalid(_) | Error::Tokenizer(_) => Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: e.to_string(),
        },
        other => other,
    })
}
