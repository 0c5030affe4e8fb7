//! The run directory: checked before any work, made only once every input has been read
//! (with the resolved config and the tokenizer), and its cost ledger opened: a resumed
//! run first bills the segment a kill cut short.

use crate::config::Config;
use crate::cost::heartbeat::record_killed_segment;
use crate::cost::ledger::Ledger;
use crate::device::DeviceInfo;
use crate::distributed::Collective;
use crate::error::{Error, IoContext, Result};
use crate::prepare::tokenizer::Tokenizer;
use crate::progress::Progress;

use super::RunOptions;

/// A resumed run needs its directory; a new one must not overwrite one unless forced.
pub(crate) fn check(cfg: &Config, opts: &RunOptions) -> Result<()> {
    let dir = cfg.run_dir();
    if opts.resume && !dir.join("config.toml").is_file() {
        return Err(Error::Usage(format!(
            "{} is not a run directory (it has no config.toml); nothing to resume",
            dir.display()
        )));
    }
    if !opts.resume && dir.exists() && !opts.force {
        return Err(Error::RunExists(dir));
    }
    Ok(())
}

/// Makes (or, on resume, reopens) the run directory and returns its ledger. Rank 0
/// writes; the other ranks keep the ledger in memory, as rank 0 has it on disk.
pub(crate) fn open(
    cfg: &Config,
    opts: &RunOptions,
    tok: &Tokenizer,
    info: &DeviceInfo,
    comm: &dyn Collective,
    progress: &dyn Progress,
) -> Result<Ledger> {
    let run_dir = cfg.run_dir();
    let ledger = if !comm.is_root() {
        comm.barrier()?;
        if opts.resume {
            Ledger::open_in_memory(&run_dir)?
        } else {
            Ledger::new(&run_dir).in_memory()
        }
    } else if opts.resume {
        let mut ledger = Ledger::open(&run_dir)?;
        ledger.world = comm.world();
        record_killed_segment(&run_dir, &mut ledger, info, cfg, progress)?;
        comm.barrier()?;
        ledger
    } else {
        if run_dir.exists() {
            if !opts.force {
                return Err(Error::RunExists(run_dir));
            }
            std::fs::remove_dir_all(&run_dir).at(&run_dir)?;
        }
        std::fs::create_dir_all(&run_dir).at(&run_dir)?;
        crate::fsio::write_file_atomic(&run_dir.join("config.toml"), cfg.to_toml()?.as_bytes())?;
        let saved_tok = run_dir.join("tokenizer.json");
        let tok_tmp = run_dir.join(".tokenizer.json.tmp");
        tok.save(&tok_tmp)?;
        std::fs::rename(&tok_tmp, &saved_tok).at(&saved_tok)?;
        comm.barrier()?;
        Ledger::new(&run_dir)
    };
    Ok(ledger)
}
