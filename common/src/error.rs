//! The one error type of the common crate.

#[derive(Debug, thiserror::Error)]
pub enum CommonError {
    /// The caller's input cannot be used; the message says what to fix.
    #[error("{0}")]
    Invalid(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("message queue: {0}")]
    Queue(#[from] lapin::Error),
    #[error("progress store: {0}")]
    Progress(#[from] redis::RedisError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = CommonError> = std::result::Result<T, E>;
