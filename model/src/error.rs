//! The one error type of the model crate. Messages are written for the
//! person who supplied the input: they say what was wrong and what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what it should be.
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// A checkpoint or model directory whose keys do not match the architecture.
    #[error("checkpoint mismatch: {0}")]
    Checkpoint(String),
    /// Input data (features, sequence, initial state, options) that cannot be used.
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        ModelError::Format {
            path: path.into(),
            message: message.into(),
        }
    }
}
