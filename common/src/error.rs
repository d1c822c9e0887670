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

impl CommonError {
    /// The server behind this error when it failed for a reason that
    /// passes (down, unreachable, timing out, restarting), named for a
    /// person: "the object store", "the message queue", "the progress
    /// store". `None` for an answer a retry does not change (bad input,
    /// a missing object, a refused command) and for local I/O.
    pub fn unavailable(&self) -> Option<&'static str> {
        match self {
            CommonError::Store(e) if store_is_transient(e) => Some("the object store"),
            CommonError::Progress(e) if redis_is_transient(e) => Some("the progress store"),
            // The queue client already reconnects for 30 s before it
            // reports a failure; whatever it reports is the broker's.
            CommonError::Queue(_) => Some("the message queue"),
            _ => None,
        }
    }
}

/// `object_store` gives missing objects, refused credentials, conflicts and
/// failed preconditions variants of their own; connection failures,
/// timeouts, 5xx and throttling (after its own retries) all arrive as
/// `Generic`.
pub fn store_is_transient(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}

/// Connection trouble and server states that pass (loading, failover) are
/// transient; a command the server refuses (a script error, a wrong type)
/// is not.
pub fn redis_is_transient(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || !matches!(e.retry_method(), redis::RetryMethod::NoRetry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_names_the_server_that_is_down_and_nothing_else() {
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let redis_down = CommonError::Progress(redis::RedisError::from(refused()));
        assert_eq!(redis_down.unavailable(), Some("the progress store"));
        let script = CommonError::Progress(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "WRONGTYPE",
        )));
        assert_eq!(script.unavailable(), None);
        let store_down = CommonError::Store(object_store::Error::Generic {
            store: "S3",
            source: Box::new(refused()),
        });
        assert_eq!(store_down.unavailable(), Some("the object store"));
        let missing = CommonError::Store(object_store::Error::NotFound {
            path: "x".into(),
            source: Box::new(refused()),
        });
        assert_eq!(missing.unavailable(), None);
        assert_eq!(CommonError::Io(refused()).unavailable(), None);
        assert_eq!(CommonError::Invalid("x".into()).unavailable(), None);
    }
}
