//! The library's typed error. Every variant carries what a user needs to act:
//! the file, the key or tensor, what was expected and, where there is one, the way out.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration file is unreadable, malformed or out of range.
    #[error("config {}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },

    /// A checkpoint directory is missing a file, or a file in it is damaged.
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },

    /// A data file (JSONL or text) is unreadable or malformed.
    #[error("data {}: {msg}", path.display())]
    Data { path: PathBuf, msg: String },

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The tokenizers crate reported an error.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// The requested device is not available in this build or on this machine.
    #[error("device: {0}")]
    Device(String),

    /// Data parallelism: a backend missing from the build, a launcher problem, or a
    /// failed collective.
    #[error("distributed: {0}")]
    Distributed(String),

    /// A request that cannot be met as asked: a flag's value, a missing argument, an
    /// output that exists without --force. The message says what to pass instead.
    #[error("{0}")]
    Usage(String),

    /// A run directory already exists.
    #[error("run directory {} already exists; pass --force to replace it, or set another [run] name", .0.display())]
    RunExists(PathBuf),

    /// Training produced a non-finite loss.
    #[error("stage {stage}: non-finite loss at step {step} ({term} = {value}); the last checkpoint on disk is intact. Lower the learning rate, or set on_nonfinite = \"skip\" in the stage's [*.train] to drop such steps")]
    NonFinite {
        stage: String,
        step: usize,
        term: &'static str,
        value: f32,
    },

    /// A tensor is missing, or its shape or dtype does not fit the model or the call.
    #[error("{0}")]
    Shape(String),

    /// Invalid input to a library call that is not tied to a file.
    #[error("{0}")]
    Invalid(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Process exit codes, by kind of failure. The `distill` binary exits with them, its
/// `--help` and docs/guide.md list them (both from `EXIT_CODES`).
pub mod exit {
    pub const OK: u8 = 0;
    /// Anything not below: an I/O error, a non-finite loss, a bug.
    pub const FAILURE: u8 = 1;
    /// A bad command line or config file, or a run directory that exists without --force.
    pub const USAGE: u8 = 2;
    /// A data or prompts file that cannot be read or parsed.
    pub const DATA: u8 = 3;
    /// A checkpoint or model file that is missing, damaged, inconsistent or cannot be written.
    pub const CHECKPOINT: u8 = 4;
    /// A device that is unknown, missing from the build, or not on this machine.
    pub const DEVICE: u8 = 5;
    /// A distributed launch: a backend missing from the build, ranks that disagree, a failed collective.
    pub const DISTRIBUTED: u8 = 6;
    /// Interrupted by SIGINT (Ctrl-C); SIGTERM gives 143. `distill` keeps the signals'
    /// default action, so the shell reports 128 + the signal number.
    pub const INTERRUPTED: u8 = 130;
}

/// Each exit code with what it means, for `distill --help` and the docs.
pub const EXIT_CODES: [(u8, &str); 8] = [
    (exit::OK, "success"),
    (
        exit::FAILURE,
        "any other failure: an I/O error, a non-finite loss, a bug",
    ),
    (
        exit::USAGE,
        "usage or config: a bad flag, a bad config key or value, an existing run directory without --force",
    ),
    (exit::DATA, "data: a data or prompts file that cannot be read or parsed"),
    (
        exit::CHECKPOINT,
        "checkpoint or model file: missing, damaged, inconsistent, or not writable (a full disk)",
    ),
    (
        exit::DEVICE,
        "device: unknown, not in this build (--features cuda), or not on this machine",
    ),
    (
        exit::DISTRIBUTED,
        "distributed launch: a backend not in this build, a launcher mismatch, ranks that disagree",
    ),
    (
        exit::INTERRUPTED,
        "interrupted by SIGINT (143: SIGTERM); the run directory is kept for `distill resume`",
    ),
];

impl Error {
    /// The process exit code for this error (`exit`).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config { .. } | Error::Usage(_) | Error::RunExists(_) => exit::USAGE,
            Error::Data { .. } => exit::DATA,
            Error::Checkpoint { .. } | Error::Shape(_) | Error::Tokenizer(_) => exit::CHECKPOINT,
            Error::Device(_) => exit::DEVICE,
            Error::Distributed(_) => exit::DISTRIBUTED,
            Error::Io { .. } | Error::NonFinite { .. } | Error::Invalid(_) | Error::Candle(_) => exit::FAILURE,
        }
    }
}

/// Adds the path to an I/O error.
pub(crate) trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}
