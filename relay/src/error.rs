//! The relay's error types: `Error` for the service, `DeliveryError` for the
//! outcome of one delivery, classified so that the consumer knows whether to
//! retry or park.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker unreachable: {0}")]
    Broker(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// Worth another attempt later: session down, timeout, connection reset,
    /// the server saying `wait`.
    #[error("transient: {0}")]
    Transient(String),
    /// The sender's XMPP session is down (server unreachable, login
    /// rejected): retried for as long as that lasts, never parked.
    #[error("sender offline: {0}")]
    SenderOffline(String),
    /// This relay holds no XMPP account for the job's sender; another
    /// replica may.
    #[error("no account: {0}")]
    NoAccount(String),
    /// The sender's session closed (idle) as the job reached it: a new
    /// session takes it. Never leaves the session pool.
    #[error("the XMPP session closed")]
    SessionClosed,
    /// Will never succeed as it is: park it for an operator.
    #[error("permanent: {0}")]
    Permanent(String),
}
