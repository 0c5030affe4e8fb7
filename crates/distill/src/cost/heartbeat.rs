//! The heartbeat: which stage is running, since when its time is unbilled, when the
//! process was last alive and what work the stage has done in this process
//! (`heartbeat.json` in the run directory). A thread rewrites it every
//! `HEARTBEAT_PERIOD` from the moment the run directory exists to the end of the run, so
//! a kill anywhere (start-up, a stage, evaluation, between stages) loses at most that
//! much time from the ledger. A resumed run turns a leftover heartbeat into an
//! `interrupted` ledger record. The heartbeat also forwards progress and appends every
//! step, with the run's running cost, to `metrics/<stage>.jsonl`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;

use crate::config::Config;
use crate::cost::ledger::{unix_now, Ledger, StageCost};
use crate::device::DeviceInfo;
use crate::error::{IoContext, Result};
use crate::progress::{Progress, StepLog};

/// The heartbeat file, in the run directory.
pub(crate) const HEARTBEAT: &str = "heartbeat.json";

/// How often the heartbeat thread rewrites the file.
const HEARTBEAT_PERIOD: Duration = Duration::from_millis(200);

/// What the time since the ledger's last record was spent on, as far as it went.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(crate) struct Beat {
    stage: String,
    /// When this segment's unbilled time began: the end of the process's last ledger
    /// record, or the run's start.
    started_unix: f64,
    alive_unix: f64,
    /// The ranks the segment ran on: a resume on another number of ranks still bills
    /// the killed segment at its own. (Heartbeats written before this field: 1.)
    #[serde(default = "one_rank")]
    world: usize,
    /// The devices of each rank and their price per device-hour, likewise: a resume on
    /// other hardware bills the killed segment at the hardware that ran it. (Heartbeats
    /// written before these fields: the resuming run's.)
    #[serde(default)]
    device: Option<DeviceInfo>,
    #[serde(default)]
    price_per_device_hour: Option<f64>,
    /// Work of the stage in this segment so far (training stages report it every step).
    #[serde(default)]
    tokens: u64,
    #[serde(default)]
    flops: f64,
}

/// The beat, shared with the thread that keeps the file current.
type Shared = Arc<Mutex<Option<Beat>>>;

fn write_beat(path: &Path, beat: &Shared) {
    let mut guard = beat.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(b) = guard.as_mut() {
        b.alive_unix = unix_now();
        // Best effort: a lost beat costs at most the time until the next one.
        if let Ok(bytes) = serde_json::to_vec(b) {
            let tmp = path.with_extension("json.tmp");
            if std::fs::write(&tmp, bytes).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    }
}

/// Rewrites the heartbeat every `HEARTBEAT_PERIOD` until dropped.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    fn start(path: PathBuf, beat: Shared) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("distill-heartbeat".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    write_beat(&path, &beat);
                    std::thread::park_timeout(HEARTBEAT_PERIOD);
                }
            })
            .ok();
        Self { stop, thread }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Forwards progress, keeps the heartbeat file current, appends every step to
/// `metrics/<stage>.jsonl`, and adds the run's running cost to each step.
pub(crate) struct Heartbeat<'a> {
    run_dir: PathBuf,
    /// Files are written (rank 0 only).
    write: bool,
    inner: &'a dyn Progress,
    beat: Shared,
    dollars_per_second: f64,
    /// Dollars of the ledger records written before the current segment.
    spent_before: std::cell::Cell<f64>,
    /// Dropped (and so stopped and joined) before the file is removed.
    ticker: std::cell::RefCell<Option<Ticker>>,
}

impl<'a> Heartbeat<'a> {
    /// The heartbeat of a run on `world` ranks of `info`'s devices, forwarding to
    /// `inner`; `write`: this process writes the files (rank 0). Its first segment,
    /// `stage` ("prepare", or "resume" for a resumed run's start-up), starts where the
    /// ledger's unbilled time does.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        run_dir: &Path,
        write: bool,
        inner: &'a dyn Progress,
        cfg: &crate::config::CostConfig,
        info: &DeviceInfo,
        world: usize,
        ledger: &Ledger,
        stage: &str,
    ) -> Self {
        let price_per_device_hour = crate::cost::ledger::price_per_hour(cfg, info);
        let beat: Shared = Arc::new(Mutex::new(Some(Beat {
            stage: stage.to_string(),
            started_unix: ledger.unbilled_since_unix(),
            alive_unix: unix_now(),
            world,
            device: Some(info.clone()),
            price_per_device_hour: Some(price_per_device_hour),
            tokens: 0,
            flops: 0.0,
        })));
        let ticker = write.then(|| Ticker::start(run_dir.join(HEARTBEAT), beat.clone()));
        Heartbeat {
            run_dir: run_dir.to_path_buf(),
            write,
            inner,
            beat,
            dollars_per_second: price_per_device_hour * (info.count * world) as f64 / 3600.0,
            spent_before: std::cell::Cell::new(ledger.summary().total_dollars),
            ticker: std::cell::RefCell::new(ticker),
        }
    }

    fn with_beat<R>(&self, f: impl FnOnce(&mut Beat) -> R) -> Option<R> {
        self.beat.lock().unwrap_or_else(PoisonError::into_inner).as_mut().map(f)
    }

    fn beat(&self) {
        if self.write {
            write_beat(&self.run_dir.join(HEARTBEAT), &self.beat);
        }
    }

    /// A ledger record was written: a new segment starts where its billed time ended.
    pub(crate) fn clear_after(&self, ledger: &Ledger) {
        self.spent_before.set(ledger.summary().total_dollars);
        let since = ledger.unbilled_since_unix();
        self.with_beat(|b| {
            b.started_unix = since;
            b.stage = "between stages".into();
            (b.tokens, b.flops) = (0, 0.0);
        });
        self.beat();
    }

    /// The run has ended: the ticker stops and the file goes.
    pub(crate) fn clear(&self) {
        drop(self.ticker.borrow_mut().take());
        *self.beat.lock().unwrap_or_else(PoisonError::into_inner) = None;
        if self.write {
            let _ = std::fs::remove_file(self.run_dir.join(HEARTBEAT));
        }
    }

    fn metrics_path(&self, stage: &str) -> PathBuf {
        self.run_dir.join("metrics").join(format!("{stage}.jsonl"))
    }

    /// A stage (re)starts after step `step`: metrics of later steps, from a
    /// segment that was killed, are dropped so that every step appears once.
    pub(crate) fn truncate_metrics(&self, stage: &str, step: usize) -> Result<()> {
        if !self.write {
            return Ok(());
        }
        let path = self.metrics_path(stage);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        crate::fsio::write_file_atomic(&path, kept.as_bytes())
    }

    fn append_metrics(&self, stage: &str, log: &StepLog) {
        use std::io::Write as _;
        if !self.write {
            return;
        }
        let path = self.metrics_path(stage);
        let _ = std::fs::create_dir_all(self.run_dir.join("metrics"));
        if let (Ok(mut line), Ok(mut f)) = (
            serde_json::to_string(log),
            std::fs::OpenOptions::new().create(true).append(true).open(&path),
        ) {
            line.push('\n');
            // Metrics are a log, not state: a failed write must not stop training.
            let _ = f.write_all(line.as_bytes());
        }
    }
}

impl Progress for Heartbeat<'_> {
    fn stage_start(&self, stage: &str, total_steps: usize) {
        self.with_beat(|b| b.stage = stage.to_string());
        self.beat();
        if total_steps > 0 {
            self.inner.stage_start(stage, total_steps);
        }
    }
    fn step(&self, log: &StepLog) {
        let mut log = log.clone();
        let stage = self.with_beat(|b| {
            (b.tokens, b.flops) = (log.segment_tokens, log.segment_flops);
            (b.stage.clone(), unix_now() - b.started_unix)
        });
        self.beat();
        if let Some((stage, elapsed)) = stage {
            log.dollars = self.spent_before.get() + elapsed * self.dollars_per_second;
            self.append_metrics(&stage, &log);
        }
        self.inner.step(&log);
    }
    fn advance(&self, done: usize, msg: &str) {
        self.beat();
        self.inner.advance(done, msg);
    }
    fn message(&self, msg: &str) {
        self.inner.message(msg);
    }
    fn stage_end(&self) {
        self.beat();
        self.inner.stage_end();
    }
}

/// On resume: bills the segment a kill cut short, from its heartbeat. A damaged
/// heartbeat is billed too: from the end of the ledger's last record to the file's last
/// write, on this run's devices, as the stage "unknown".
pub(crate) fn record_killed_segment(
    run_dir: &Path,
    ledger: &mut Ledger,
    info: &DeviceInfo,
    cfg: &Config,
    progress: &dyn Progress,
) -> Result<()> {
    let path = run_dir.join(HEARTBEAT);
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(());
    };
    match serde_json::from_slice::<Beat>(&bytes) {
        Ok(b) => {
            let wall = (b.alive_unix - b.started_unix).max(0.0);
            progress.message(&format!(
                "{}: the last run was killed {wall:.1} s into this segment; resuming",
                b.stage
            ));
            let dev = b.device.as_ref().unwrap_or(info);
            let mut killed = StageCost::interrupted(&b.stage, dev, &cfg.cost, wall, (b.tokens, b.flops));
            if let Some(price) = b.price_per_device_hour {
                killed.price_per_device_hour = price; // on_ranks prices the dollars with it
            }
            ledger.record_as_billed(killed.on_ranks(b.world, 0.0, None))?;
        }
        Err(e) => bill_damaged_heartbeat(&path, &e, ledger, info, cfg, progress)?,
    }
    std::fs::remove_file(&path).at(&path)
}

fn bill_damaged_heartbeat(
    path: &Path,
    e: &serde_json::Error,
    ledger: &mut Ledger,
    info: &DeviceInfo,
    cfg: &Config,
    progress: &dyn Progress,
) -> Result<()> {
    let written = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64());
    let since = ledger.stages.iter().rev().find_map(|c| c.ended_unix);
    match (since, written) {
        (Some(since), Some(written)) if written >= since => {
            let wall = written - since;
            progress.message(&format!(
                "warning: {} is damaged ({e}); the killed segment is billed {wall:.1} s, \
                 from the ledger's last record to the file's last write, as stage \"unknown\"",
                path.display()
            ));
            let killed = StageCost::interrupted("unknown", info, &cfg.cost, wall, (0, 0.0));
            ledger.record_as_billed(killed.on_ranks(ledger.world, 0.0, None))
        }
        _ => {
            progress.message(&format!(
                "warning: {} is damaged ({e}) and the ledger has no end time to bill from; \
                 the killed segment's time is not billed",
                path.display()
            ));
            Ok(())
        }
    }
}

pub(crate) fn one_rank() -> usize {
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment killed on 2 ranks of one GPU each, resumed on 1 rank of CPU cores, is
    /// billed for the 2 GPUs at their price.
    #[test]
    fn a_killed_segment_is_billed_on_the_ranks_it_ran_on() -> std::result::Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let gpus = DeviceInfo {
            kind: "cuda".into(),
            name: "NVIDIA H100".into(),
            count: 1,
            ..Default::default()
        };
        let beat = Beat {
            stage: "teacher".into(),
            started_unix: 1000.0,
            alive_unix: 1360.0,
            world: 2,
            device: Some(gpus),
            price_per_device_hour: Some(2.0),
            tokens: 0,
            flops: 0.0,
        };
        std::fs::write(dir.path().join(HEARTBEAT), serde_json::to_vec(&beat)?)?;
        let mut ledger = Ledger::new(dir.path()).in_memory(); // this run: 1 rank
        let info = DeviceInfo {
            kind: "cpu".into(),
            count: 2,
            ..Default::default()
        };
        record_killed_segment(
            dir.path(),
            &mut ledger,
            &info,
            &Config::default(),
            &crate::progress::Silent,
        )?;
        let killed = &ledger.stages[0];
        assert!(killed.interrupted);
        // Billed at the 2 ranks of one H100 at $2 that ran it, not at this run's 1 rank
        // of 2 CPU cores.
        assert_eq!((killed.world_size, killed.device_count), (2, 1));
        assert!((killed.device_hours - 360.0 / 3600.0 * 2.0).abs() < 1e-12, "{killed:?}");
        assert!((killed.dollars - killed.device_hours * 2.0).abs() < 1e-12, "{killed:?}");
        assert!(!dir.path().join(HEARTBEAT).exists());
        // A heartbeat from before the field: one rank.
        let old = r#"{"stage":"student","started_unix":0.0,"alive_unix":36.0}"#;
        std::fs::write(dir.path().join(HEARTBEAT), old)?;
        record_killed_segment(
            dir.path(),
            &mut ledger,
            &info,
            &Config::default(),
            &crate::progress::Silent,
        )?;
        assert_eq!(ledger.stages[1].world_size, 1);
        Ok(())
    }
}
