//! The stages that run the trained teacher over the students' data: verified traces
//! (rejection sampling, the R1 recipe) and the offline logit cache.

use std::path::Path;
use std::time::Instant;

use super::prepare::Prepared;
use super::stage::StageEnv;
use super::sub_seed;
use crate::config::Config;
use crate::cost::heartbeat::Heartbeat;
use crate::cost::ledger::{Ledger, StageCost};
use crate::distributed;
use crate::distributed::Collective;
use crate::error::{Error, Result};
use crate::evaluate::report::TracesReport;
use crate::model::generate;
use crate::model::Llama;
use crate::prepare::data::{batch, Example};
use crate::prepare::tokenizer::Tokenizer;
use crate::progress::Progress;
use crate::teacher::logit_cache::{self, LogitCache};
use crate::teacher::traces;
use crate::train::checkpoint;

/// The `teacher-logits` stage: the teacher's top-k log-probabilities over `data`, written
/// to `<run>/logit-cache` once; a resumed run whose ledger has the stage reuses it.
pub(crate) fn teacher_logit_cache(
    env: &StageEnv,
    (teacher, teacher_dir): (&Llama, &Path),
    data: &[batch::Encoded],
    vocab: usize,
    ledger: &mut Ledger,
    progress: &Heartbeat,
) -> Result<LogitCache> {
    const STAGE: &str = "teacher-logits";
    let cfg = env.cfg;
    let dir = env.run_dir.join("logit-cache");
    let id = teacher_id(teacher, teacher_dir)?;
    let expect = logit_cache::Expect {
        teacher: id.clone(),
        data_fingerprint: logit_cache::fingerprint(data),
        k: cfg.distill.top_k,
        temperature: cfg.distill.temperature,
        vocab_size: vocab,
    };
    if ledger.completed(STAGE) {
        match LogitCache::open(&dir, data, &expect) {
            Ok(c) => {
                progress.message(&format!("{STAGE}: complete, read from {}", dir.display()));
                return Ok(c);
            }
            Err(e) => progress.message(&format!(
                "warning: {STAGE}: the cache is unusable ({e}); writing it again"
            )),
        }
    }
    let comm = env.comm;
    let range = distributed::shard_range(data.len(), comm.rank(), comm.world());
    progress.stage_start(STAGE, range.len());
    let batch = cfg.student.train.batch_size;
    // Each rank runs the teacher over its slice of the examples and writes its own
    // shards; rank 0 then writes the index over all of them, in example order.
    if comm.is_root() {
        logit_cache::prepare(&dir, data)?;
    }
    comm.barrier()?;
    let tag = if comm.world() > 1 {
        format!("r{:04}-", comm.rank())
    } else {
        String::new()
    };
    let part = logit_cache::write_part(&dir, teacher, data, range, &tag, &expect, batch, &|done, _| {
        progress.advance(done, "examples through the teacher")
    })?;
    let comm_t0 = Instant::now();
    let json = serde_json::to_vec(&part).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut shards = Vec::new();
    for bytes in comm.gather_bytes(&json)? {
        let p: logit_cache::Part = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Distributed(format!("a rank sent a bad logit-cache part: {e}")))?;
        shards.extend(p.shards);
    }
    let mut flops = [part.flops];
    comm.sum_f64(&mut flops)?;
    let flops = flops[0];
    let index = if comm.is_root() {
        let index = logit_cache::write_index(&dir, data, &expect, shards)?;
        comm.barrier()?;
        index
    } else {
        comm.barrier()?;
        logit_cache::read_index(&dir)?
    };
    let comm_seconds = if comm.world() > 1 {
        comm_t0.elapsed().as_secs_f64()
    } else {
        0.0
    };
    progress.stage_end();
    let tokens = data.iter().map(|e| e.ids.len() as u64 - 1).sum();
    let work = StageCost::work(STAGE, env.info, &cfg.cost, tokens, flops, 0.0);
    ledger.record(work.on_ranks(comm.world(), comm_seconds, None))?;
    progress.clear_after(ledger);
    progress.message(&format!(
        "{STAGE}: {} positions, top-{} at T = {}, {:.0} bytes per token ({:.2} MB) -> {}",
        index.rows,
        index.k,
        index.temperature,
        index.bytes_per_token,
        index.bytes as f64 / 1e6,
        dir.display()
    ));
    LogitCache::open(&dir, data, &expect)
}

/// The `traces` stage of the R1 recipe: the teacher's verified solutions of the
/// students' prompts (`traces.jsonl`), read back when a resumed run has them. Returns
/// the kept traces as training examples.
pub(crate) fn traces_stage(
    env: &StageEnv,
    prep: &Prepared,
    teacher: (&Llama, &Path),
    examples: &[Example],
    ledger: &mut Ledger,
    heartbeat: &Heartbeat,
) -> Result<(Vec<Example>, TracesReport)> {
    let path = env.run_dir.join("traces.jsonl");
    let (records, acc) = if ledger.completed("traces") && path.is_file() {
        let records = traces::read(&path)?;
        let acc = traces::Acceptance::of(&records);
        heartbeat.message(&format!("traces: complete, read from {}", path.display()));
        (records, acc)
    } else {
        let (records, acc) = write_traces(env.cfg, teacher, &prep.tok, examples, heartbeat, env.comm)?;
        if env.comm.is_root() {
            traces::write(&path, &records)?;
        }
        let work = StageCost::work("traces", env.info, &env.cfg.cost, acc.tokens, acc.flops, 0.0);
        ledger.record(work)?;
        heartbeat.clear_after(ledger);
        (records, acc)
    };
    heartbeat.message(&format!(
        "traces: kept {} of {} samples ({:.1}%), {} of {} prompts solved -> {}",
        acc.kept,
        acc.samples,
        100.0 * acc.acceptance_rate,
        acc.prompts_solved,
        acc.prompts,
        path.display()
    ));
    let kept: Vec<Example> = records
        .iter()
        .filter(|r| r.kept)
        .map(|r| Example {
            prompt: r.prompt.clone(),
            completion: r.completion.clone(),
            answer: r.answer,
        })
        .collect();
    if kept.is_empty() {
        return Err(Error::Invalid(format!(
            "the teacher solved none of {} prompts, so there are no traces to learn from ({}); \
             train the teacher longer, or raise traces.samples or traces.max_new_tokens",
            acc.prompts,
            path.display()
        )));
    }
    Ok((kept, TracesReport { path, acceptance: acc }))
}

/// Samples `[traces]` solutions from the teacher for every student prompt and
/// verifies them. With several ranks, each samples its shard of the prompts
/// (`--shard rank/world`) and every rank gets all the records, merged in (prompt,
/// sample) order.
fn write_traces(
    cfg: &Config,
    (teacher, teacher_dir): (&Llama, &Path),
    tok: &Tokenizer,
    examples: &[Example],
    progress: &dyn Progress,
    comm: &dyn Collective,
) -> Result<(Vec<traces::TraceRecord>, traces::Acceptance)> {
    let tc = &cfg.traces;
    let prompts: Vec<traces::Prompt> = examples
        .iter()
        .enumerate()
        .map(|(i, e)| traces::Prompt {
            id: i as u64,
            prompt: e.prompt.clone(),
            answer: e.answer,
        })
        .collect();
    if prompts.iter().all(|p| p.answer.is_none()) {
        return Err(Error::Invalid(
            "traces.enabled needs prompts with verifiable answers (`#### N` at the end of each completion); \
             the student examples have none"
                .into(),
        ));
    }
    let settings = traces::TraceSettings {
        samples: tc.samples,
        sampling: generate::Sampling {
            max_new_tokens: tc.max_new_tokens,
            temperature: tc.temperature,
            top_p: tc.top_p,
            top_k: tc.top_k,
            seed: sub_seed(cfg.run.seed, "traces"),
        },
        keep: tc.keep,
        max_completion_tokens: tc.max_completion_tokens,
        batch_rows: tc.batch_size,
    };
    let id = teacher_id(teacher, teacher_dir)?;
    let total = prompts.iter().filter(|p| p.answer.is_some()).count();
    progress.stage_start("traces", total);
    let samples = tc.samples.max(1);
    let mut on_batch = |done: usize, _of: usize| progress.advance((done / samples).min(total), "prompts sampled");
    let shard = traces::Shard {
        index: comm.rank(),
        count: comm.world(),
    };
    let out = traces::generate(teacher, tok, &id, &prompts, &settings, shard, &mut on_batch);
    progress.stage_end();
    if comm.world() == 1 {
        return out;
    }
    let (mine, acc) = out?;
    let mut records = Vec::new();
    for bytes in comm.gather_bytes(traces::to_jsonl(&mine)?.as_bytes())? {
        for line in String::from_utf8_lossy(&bytes).lines() {
            records.push(
                serde_json::from_str::<traces::TraceRecord>(line)
                    .map_err(|e| Error::Distributed(format!("a rank sent a bad trace record: {e}")))?,
            );
        }
    }
    records.sort_by_key(|r| (r.id, r.sample));
    let mut flops = [acc.flops];
    comm.sum_f64(&mut flops)?;
    let mut acc = traces::Acceptance::of(&records);
    acc.flops = flops[0];
    Ok((records, acc))
}

/// The id that traces and logit caches record for the teacher: its checkpoint's content
/// id, with "+int8" when it ran on int8 matmul weights (other numbers than the dense
/// teacher's, so a cache of the one is never taken for the other's).
fn teacher_id(teacher: &Llama, dir: &Path) -> Result<String> {
    let id = checkpoint::content_id(dir)?;
    Ok(match teacher.matmul_weights() {
        crate::config::MatmulWeights::Dense => id,
        w => format!("{id}+{}", w.name()),
    })
}
