//! The ingress's one error type. Over HTTP every error is a JSON problem
//! document (RFC 9457); client errors are logged at `info` at most, server
//! errors at `warn`/`error` with their cause, and no internal detail reaches
//! the client.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_shared::{ValidationError, telemetry::Repeated};
use serde::Serialize;

/// How long a client should wait before retrying a 503.
pub const RETRY_AFTER_SECONDS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("valid credentials are required (HTTP Basic, user@host:password)")]
    Unauthorized,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Malformed(String),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{0}")]
    TooLarge(String),
    #[error("no such route")]
    NotFound,
    #[error("this route does not take this method")]
    MethodNotAllowed,
    /// No job of this user's with this id within the job status window.
    #[error("no job {0} of yours is known (job status is kept for HERALD_JOB_STATUS_WINDOW)")]
    UnknownJob(uuid::Uuid),
    /// Too many failed logins from this client (its address, or its own
    /// tries of this account).
    #[error("too many failed logins from this client; retry in {0} s")]
    TooManyAttempts(u64),
    /// Busy for now (the password checks are all taken, or a notification
    /// sender is throttled): retry after this many seconds.
    #[error("busy; retry in {0} s")]
    Overloaded(u64),
    /// The client did not send its body in time.
    #[error("the request body did not arrive within {0} s")]
    RequestTimeout(u64),
    /// The user's policy does not allow this recipient.
    #[error("{0}")]
    Forbidden(String),
    /// The user's rate limit is spent; retry after this many seconds.
    #[error("this user's rate limit is reached; retry in {0} s")]
    RateLimited(u64),
    /// The notification template failed on this notification (an operator's
    /// template that expects what this payload lacks): 500, so that the
    /// sender retries rather than drops it.
    #[error("cannot render the message template: {0}")]
    Render(String),
    /// The broker is unreachable or did not confirm: retry later.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// Start-up problems: bad configuration, unreadable files.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The error as a notification route answers it: Alertmanager and
    /// Grafana drop a notification on a 4xx and retry a 5xx, so a refusal
    /// that only means "not now" must be a 503 there.
    pub fn for_notification(self) -> Self {
        match self {
            Error::TooManyAttempts(seconds) | Error::RateLimited(seconds) => Error::Overloaded(seconds),
            other => other,
        }
    }
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
}

impl Error {
    fn status(&self) -> StatusCode {
        match self {
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::Malformed(_) => StatusCode::BAD_REQUEST,
            Error::Invalid(ValidationError::BodyTooLong { .. }) | Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::NotFound | Error::UnknownJob(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::TooManyAttempts(_) | Error::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::Unavailable(_) | Error::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::Internal(_) | Error::Config(_) | Error::Io(_) | Error::Render(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn slug(&self) -> &'static str {
        match self {
            Error::Unauthorized => "unauthorized",
            Error::UnsupportedMediaType(_) => "unsupported-media-type",
            Error::Malformed(_) => "malformed-request",
            Error::Invalid(ValidationError::BodyTooLong { .. }) | Error::TooLarge(_) => "too-large",
            Error::Invalid(_) => "invalid-message",
            Error::NotFound => "not-found",
            Error::UnknownJob(_) => "unknown-job",
            Error::MethodNotAllowed => "method-not-allowed",
            Error::TooManyAttempts(_) => "too-many-failed-logins",
            Error::RateLimited(_) => "rate-limited",
            Error::Forbidden(_) => "forbidden-recipient",
            Error::Unavailable(_) => "unavailable",
            Error::Overloaded(_) => "busy",
            Error::RequestTimeout(_) => "request-timeout",
            Error::Render(_) => "template-failed",
            Error::Internal(_) | Error::Config(_) | Error::Io(_) => "internal",
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let detail = if status.is_server_error() {
            match &self {
                Error::Unavailable(cause) => {
                    static REPEATED: Repeated = Repeated::new(std::time::Duration::from_secs(1));
                    if let Some(times) = REPEATED.tick() {
                        tracing::warn!(%cause, times, "answering 503 (one line a second at most, with the count)");
                    }
                    "the message queue cannot take the message right now; retry later".to_owned()
                }
                Error::Overloaded(seconds) => format!("busy; retry in {seconds} s"),
                Error::Render(cause) => {
                    tracing::warn!(%cause, "the notification template failed");
                    "the message template failed on this notification; see the ingress log".to_owned()
                }
                other => {
                    tracing::error!(error = %other, "internal error");
                    "internal error".to_owned()
                }
            }
        } else {
            tracing::debug!(status = status.as_u16(), error = %self, "request refused");
            self.to_string()
        };
        let problem = Problem {
            kind: format!("urn:herald:problem:{}", self.slug()),
            title: status.canonical_reason().unwrap_or("error"),
            status: status.as_u16(),
            detail,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        match self {
            Error::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"herald\""));
            }
            Error::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
            }
            Error::TooManyAttempts(seconds) | Error::RateLimited(seconds) | Error::Overloaded(seconds) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            _ => {}
        }
        response
    }
}
