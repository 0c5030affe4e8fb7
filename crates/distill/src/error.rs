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
