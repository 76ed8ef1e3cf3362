//! HTTP handlers: extract, authenticate, validate into a job, publish, map
//! errors. Nothing else happens here.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, Request, State, rejection::PathRejection},
    http::{HeaderMap, StatusCode, Uri, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use herald_shared::{
    Body, Job, MessageKind, Recipient, ValidationError,
    amqp::ConfirmChannel,
    domain::{MAX_SUBJECT_BYTES, MAX_THREAD_BYTES, ShortText},
    job::now_ms,
    outcomes::{Record, writer::Writer},
};
use serde::Serialize;

use crate::{
    alerts::{self, Source, Templates},
    auth::{Authenticated, Authenticator},
    error::Error,
    idempotency,
    jobs::Jobs,
    metrics::{self, Metrics},
    payload::{self, RawMessage},
    publisher::{self, AcceptedJob},
    users::User,
};

/// Recipients one request may name: enough for a team and its rooms, few
/// enough that one request cannot flood the queue.
pub const MAX_RECIPIENTS: usize = 50;

/// Room for form or JSON encoding around the largest accepted body (JSON
/// escapes can take up to six bytes per character).
const ENVELOPE_FACTOR: usize = 6;
const ENVELOPE_EXTRA_BYTES: usize = 8 * 1024;
/// Largest Alertmanager or Grafana notification accepted (many alerts).
const NOTIFICATION_BODY_LIMIT: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct AppState {
    pub auth: Arc<Authenticator>,
    pub publisher: Arc<ConfirmChannel>,
    pub max_body_bytes: usize,
    pub metrics: Arc<Metrics>,
    pub templates: Arc<Templates>,
    /// Recent jobs, from the outcomes stream: status and idempotency keys.
    pub jobs: Arc<Jobs>,
    /// Where this replica records the jobs it accepted.
    pub outcomes: Writer,
    /// How long an idempotency key holds.
    pub idempotency_window: Duration,
    /// How long a client may take to send a request's body.
    pub body_timeout: Duration,
    /// The XMPP server's stanza limit, as the relay has it.
    pub max_stanza_bytes: usize,
}

/// The HTTP API. Requests need a `ConnectInfo<SocketAddr>` extension (the
/// server adds it), for throttling by client address.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/msg", post(msg))
        .route("/msg/{to}", post(msg))
        .route("/alertmanager", post(alertmanager))
        .route("/alertmanager/{to}", post(alertmanager))
        .route("/grafana", post(grafana))
        .route("/grafana/{to}", post(grafana))
        .route("/jobs/{id}", get(job_status))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state.metrics), metrics::count_requests))
        .with_state(state)
}

/// The largest request body a message route reads: the message limit, and
/// room for its form or JSON encoding. A notification carries many alerts
/// (`NOTIFICATION_BODY_LIMIT`); what it renders to is cut to the message
/// limit, not refused.
fn message_body_limit(max_body_bytes: usize) -> usize {
    max_body_bytes.saturating_mul(ENVELOPE_FACTOR).saturating_add(ENVELOPE_EXTRA_BYTES)
}

impl axum::extract::FromRef<AppState> for Arc<Authenticator> {
    fn from_ref(state: &AppState) -> Self {
        Arc::clone(&state.auth)
    }
}

/// The 202 answer: one entry per job.
#[derive(Debug, Serialize)]
pub struct Accepted {
    pub jobs: Vec<AcceptedJob>,
}

/// `POST /msg/{to}`, and `POST /msg` with `to` in the body or the query
/// string.
async fn msg(
    State(state): State<AppState>,
    Authenticated(user): Authenticated,
    to: Result<Option<Path<String>>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, Error> {
    let to = path_recipient(to)?;
    accept(&state, &user, to, &uri, &headers, request).await
}

/// `POST /alertmanager/{to}`, and `POST /alertmanager?to=…&to=…`.
async fn alertmanager(
    State(state): State<AppState>,
    user: Result<Authenticated, Error>,
    to: Result<Option<Path<String>>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, Error> {
    notification(&state, user, Source::Alertmanager, to, &uri, &headers, request).await.map_err(Error::for_notification)
}

/// `POST /grafana/{to}`, and `POST /grafana?to=…&to=…`.
async fn grafana(
    State(state): State<AppState>,
    user: Result<Authenticated, Error>,
    to: Result<Option<Path<String>>, PathRejection>,
    uri: Uri,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, Error> {
    notification(&state, user, Source::Grafana, to, &uri, &headers, request).await.map_err(Error::for_notification)
}

fn path_recipient(to: Result<Option<Path<String>>, PathRejection>) -> Result<Option<String>, Error> {
    Ok(to.map_err(|e| Error::Malformed(e.body_text()))?.map(|Path(to)| to))
}

/// `GET /jobs/{id}`: what became of one of the user's jobs, as this
/// replica knows it from the outcomes stream.
async fn job_status(
    State(state): State<AppState>,
    Authenticated(user): Authenticated,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, Error> {
    let Path(id) = id.map_err(|e| Error::Malformed(e.body_text()))?;
    let id = uuid::Uuid::try_parse(&id).map_err(|_| Error::Malformed(format!("{id:?} is not a job id")))?;
    match state.jobs.status(id, &user.jid) {
        Some(status) => Ok(Json(status).into_response()),
        None => Err(Error::UnknownJob(id)),
    }
}

/// Anything else: a problem document rather than an empty 404.
async fn not_found() -> Error {
    Error::NotFound
}

/// A route asked with another method: a problem document (axum adds the
/// `Allow` header).
async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed
}

async fn accept(
    state: &AppState,
    user: &User,
    path_to: Option<String>,
    uri: &Uri,
    headers: &HeaderMap,
    request: Request,
) -> Result<Response, Error> {
    let body = read_body(request, message_body_limit(state.max_body_bytes), state.body_timeout).await?;
    let key = idempotency::key_from(headers)?;
    let content_type = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("invalid"));
    let mut raw = payload::parse(content_type, &body, payload::parse_query(uri.query())?)?;
    if let Some(to) = path_to {
        raw.to = vec![to];
    }
    enqueue(state, user, raw, key).await
}

/// A notification from Alertmanager or Grafana: one message, rendered by
/// the source's template, to the recipients in the path or the query
/// string (which may also set `type`, `subject` and `thread`).
async fn notification(
    state: &AppState,
    user: Result<Authenticated, Error>,
    source: Source,
    path_to: Result<Option<Path<String>>, PathRejection>,
    uri: &Uri,
    headers: &HeaderMap,
    request: Request,
) -> Result<Response, Error> {
    let Authenticated(user) = user?;
    let path_to = path_recipient(path_to)?;
    let limit = NOTIFICATION_BODY_LIMIT.max(message_body_limit(state.max_body_bytes));
    let body = read_body(request, limit, state.body_timeout).await?;
    let content_type = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("invalid"));
    if !content_type.is_some_and(|ct| {
        ct.parse::<mime::Mime>().is_ok_and(|m| m.essence_str() == mime::APPLICATION_JSON.essence_str())
    }) {
        return Err(Error::UnsupportedMediaType("a notification is application/json".into()));
    }
    let rendered = state.templates.render(source, &body)?;
    // A repeat of the same notification (an HA pair of Alertmanagers, a
    // retry after a lost answer) keys itself, unless the client set a key.
    let key = idempotency::key_from(headers)?.or(rendered.key);
    let mut raw = payload::parse_query(uri.query())?;
    if let Some(to) = path_to {
        raw.to = vec![to];
    }
    // A control character in someone's annotation must not lose the alert.
    let text = herald_shared::domain::xml_safe(&rendered.text).into_owned();
    raw.body = Some(alerts::fit(text, state.max_body_bytes));
    raw.cut_to_fit = true;
    enqueue(state, &user, raw, key).await
}

/// Validates, applies the user's policy, publishes one job per recipient
/// and answers 202 once the broker confirmed every one. With an
/// idempotency key, a repeat within the window gets the first answer.
async fn enqueue(state: &AppState, user: &User, raw: RawMessage, key: Option<String>) -> Result<Response, Error> {
    let cut_to_fit = raw.cut_to_fit;
    let jobs = build_jobs(user, raw, state.max_body_bytes)?;
    let mut jobs = fit_stanza(jobs, state.max_stanza_bytes, cut_to_fit)?;
    let recipients: Vec<String> = jobs.iter().map(job_recipient).collect();
    if let Some(key) = &key {
        jobs = jobs
            .into_iter()
            .map(|job| {
                let id = herald_shared::job::idempotent_id(&user.jid, key, job_to(&job));
                job.with_id(id)
            })
            .collect();
        // A repeat (on this replica or another): every job of it was
        // accepted within the window. Answered as the first time, with
        // nothing published, even while the broker is away.
        if jobs.iter().all(|job| state.jobs.accepted_idempotent(job.id(), &user.jid, state.idempotency_window)) {
            tracing::debug!(user = %user.jid, "repeated idempotency key: the first answer, nothing published");
            return Ok((StatusCode::ACCEPTED, Json(Accepted { jobs: accepted(&jobs, &recipients) })).into_response());
        }
    }
    // Without a confirm channel (the background task reconnects every 2 s)
    // answer 503 at once: before the rate limit takes tokens for a request
    // that cannot be accepted (a client retrying through an outage would
    // otherwise come out of it rate-limited), and without every request
    // trying to reconnect in turn.
    // A blocked connection (a broker alarm) would hold the publish until
    // the confirm timeout: say so at once too.
    if let Some(why) = state.publisher.unavailable() {
        return Err(Error::Unavailable(why.into()));
    }
    check_policy(user, &jobs)?;
    // One job per recipient, so that one failing recipient never blocks or
    // repeats the others; 202 only once the broker confirmed every one.
    let started = std::time::Instant::now();
    let idempotent = key.is_some();
    match jobs.as_slice() {
        // Most requests have one recipient: no futures to collect.
        [job] => publisher::publish(&state.publisher, job, idempotent).await?,
        jobs => {
            futures::future::try_join_all(jobs.iter().map(|job| publisher::publish(&state.publisher, job, idempotent)))
                .await?;
        }
    }
    state.metrics.publish_seconds.observe(started.elapsed().as_secs_f64());
    state.metrics.jobs_published.inc_by(jobs.len() as u64);
    // Only now, once the broker has them: a repeat must never be answered
    // with jobs that were not queued.
    let at_ms = now_ms();
    for job in &jobs {
        let (owner, to) = (user.jid.to_string(), job_to(job).to_string());
        let record = Record::Accepted { id: job.id(), owner, to, at_ms, idempotent };
        state.jobs.apply(record.clone());
        state.outcomes.record(record);
    }
    tracing::debug!(jobs = jobs.len(), user = %user.jid, "accepted");
    Ok((StatusCode::ACCEPTED, Json(Accepted { jobs: accepted(&jobs, &recipients) })).into_response())
}

fn accepted(jobs: &[Job], recipients: &[String]) -> Vec<AcceptedJob> {
    jobs.iter().zip(recipients).map(|(job, to)| AcceptedJob { id: job.id(), to: to.clone() }).collect()
}

fn job_to(job: &Job) -> &Recipient {
    match job {
        Job::V1(v1) => &v1.to,
    }
}

/// How much of an oversized body is read and dropped before the 413, so
/// that a client still sending it (one that did not ask for
/// `Expect: 100-continue`) reads the answer instead of a reset connection.
const DRAIN_BYTES: usize = 16 * 1024 * 1024;

/// The body, read only once the request is authenticated (so an anonymous
/// client cannot make the ingress buffer its uploads), up to `limit` bytes.
/// A compressed body is refused with 415, unread. An oversized one is
/// refused with 413 after reading (and dropping) up to `DRAIN_BYTES` more
/// of it, or at once if its declared length is over the
/// limit and the client waits for `100 Continue` before sending it (reading
/// would send that); a client that stops sending gets 408 once `timeout`
/// has passed since the body was first asked for.
async fn read_body(request: Request, limit: usize, timeout: Duration) -> Result<Bytes, Error> {
    use futures::StreamExt;
    let too_large = || Error::TooLarge(format!("the request body is over the limit of {limit} bytes"));
    if let Some(coding) = request.headers().get(header::CONTENT_ENCODING)
        && !coding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Err(Error::UnsupportedMediaType(format!(
            "Content-Encoding {} is not supported; send the body uncompressed",
            String::from_utf8_lossy(coding.as_bytes())
        )));
    }
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    let waits_to_send =
        request.headers().get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let drained = if waits_to_send { 0 } else { DRAIN_BYTES };
    if declared.is_some_and(|n| n > limit.saturating_add(drained)) {
        return Err(too_large());
    }
    let mut stream = request.into_body().into_data_stream();
    let read = async {
        let mut body = Vec::with_capacity(declared.unwrap_or(0).min(limit));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Error::Malformed(format!("cannot read the request body: {e}")))?;
            if body.len() + chunk.len() > limit {
                let mut read = body.len() + chunk.len();
                drop(body);
                while read <= limit.saturating_add(DRAIN_BYTES) {
                    match stream.next().await {
                        Some(Ok(chunk)) => read += chunk.len(),
                        _ => break,
                    }
                }
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(body))
    };
    tokio::time::timeout(timeout, read).await.unwrap_or(Err(Error::RequestTimeout(timeout.as_secs().max(1))))
}

/// Checks that every job's stanza fits the XMPP server's limit, which the
/// relay would otherwise park the job over after its 202. A notification's
/// shared body is cut instead, as far as the largest job needs.
fn fit_stanza(jobs: Vec<Job>, max: usize, cut: bool) -> Result<Vec<Job>, Error> {
    let largest = jobs.iter().map(Job::xml_size).max().unwrap_or(0);
    if largest <= max {
        return Ok(jobs);
    }
    let Some(Job::V1(first)) = jobs.first() else { return Ok(jobs) };
    if !cut {
        return Err(Error::TooLarge(format!(
            "the message would be up to {largest} bytes of XML, over the XMPP server's stanza limit of {max} bytes \
             (HERALD_MAX_STANZA_BYTES)"
        )));
    }
    let body = first.body.as_str();
    let room = max.saturating_sub(largest - herald_shared::domain::xml_text_len(body));
    let body = Body::parse(alerts::fit(body.to_owned(), room), room)?;
    Ok(jobs.into_iter().map(|job| job.with_body(body.clone())).collect())
}

/// The user's allow-list, then their rate limit (a refused request takes
/// no tokens).
fn check_policy(user: &User, jobs: &[Job]) -> Result<(), Error> {
    let recipients: Vec<&Recipient> = jobs.iter().map(job_to).collect();
    if let Some(to) = user.policy.forbidden(recipients) {
        tracing::info!(user = %user.jid, %to, "refused: recipient not in the user's allow list");
        return Err(Error::Forbidden(format!("{} may not send to {to}", user.jid)));
    }
    user.policy.take(jobs.len()).inspect_err(|e| {
        if matches!(e, Error::RateLimited(_)) {
            tracing::info!(user = %user.jid, "refused: rate limit reached");
        }
    })
}

/// Validates the raw fields into one job per distinct recipient, sent as
/// the user's sender. Any invalid field refuses the whole request.
pub fn build_jobs(user: &User, raw: RawMessage, max_body_bytes: usize) -> Result<Vec<Job>, Error> {
    if raw.to.len() > MAX_RECIPIENTS {
        return Err(ValidationError::TooManyRecipients { count: raw.to.len(), max: MAX_RECIPIENTS }.into());
    }
    let mut recipients: Vec<Recipient> = Vec::with_capacity(raw.to.len().max(1));
    for to in raw.to.iter().map(String::as_str).chain(raw.to.is_empty().then_some("")) {
        let to = Recipient::parse(to, user.jid.domain())?;
        if !recipients.contains(&to) {
            recipients.push(to);
        }
    }
    let kind = MessageKind::parse(raw.kind.as_deref())?;
    let body = Body::parse(raw.body.unwrap_or_default(), max_body_bytes)?;
    let subject = ShortText::parse_optional("subject", raw.subject, MAX_SUBJECT_BYTES)?;
    let thread = ShortText::parse_optional("thread", raw.thread, MAX_THREAD_BYTES)?;
    Ok(recipients
        .into_iter()
        .map(|to| Job::new_v1(user.sender.clone(), to, kind, body.clone(), subject.clone(), thread.clone()))
        .collect())
}

fn job_recipient(job: &Job) -> String {
    job_to(job).to_string()
}

#[cfg(test)]
mod tests {
    //! HTTP behaviour that needs no broker: the router, called with
    //! `oneshot`. The confirm channel is never opened here.
    use std::net::SocketAddr;

    use axum::{body::Body, extract::ConnectInfo, http::Request};
    use herald_shared::{Topology, amqp::BrokerUrls};
    use tower::ServiceExt;

    use super::*;
    use crate::{admission::Admission, users::Users};

    fn state() -> AppState {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        let hash = crate::hash_password::hash("pw").expect("hash");
        let users =
            Users::parse(&format!("[[users]]\njid = \"a@example.com\"\npassword_hash = \"{hash}\"\n")).expect("users");
        let admission = Admission::new(1, 8, Duration::from_secs(2));
        let urls = BrokerUrls::parse("amqp://127.0.0.1:1/%2f").expect("urls");
        AppState {
            auth: Arc::new(Authenticator::new(
                users,
                Duration::from_secs(60),
                5,
                false,
                admission,
                Arc::clone(&metrics),
            )),
            publisher: Arc::new(ConfirmChannel::new(urls.clone(), "test", Topology::new("t"), Vec::new())),
            max_body_bytes: 8 * 1024,
            metrics,
            templates: Arc::new(Templates::load(None, None).expect("templates")),
            jobs: Arc::new(Jobs::new(Duration::from_secs(60), 100)),
            outcomes: Writer::new(urls.clone(), "test", Topology::new("t"), Default::default()).0,
            idempotency_window: Duration::from_secs(60),
            body_timeout: Duration::from_secs(5),
            max_stanza_bytes: 4096,
        }
    }

    async fn call(mut request: Request<Body>) -> Response {
        request.extensions_mut().insert(ConnectInfo::<SocketAddr>("192.0.2.1:1234".parse().expect("addr")));
        router(state()).oneshot(request).await.unwrap_or_else(|e| match e {})
    }

    fn content_type(response: &Response) -> Option<&str> {
        response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn a_body_declared_too_large_is_refused_before_100_continue() {
        let never_sent = || {
            Body::from_stream(futures::stream::poll_fn(|_| -> std::task::Poll<Option<Result<Bytes, std::io::Error>>> {
                panic!("the body was asked for, so hyper would have answered 100 Continue")
            }))
        };
        let request = Request::post("/msg/bob")
            .header(header::CONTENT_LENGTH, "1000")
            .header(header::EXPECT, "100-Continue")
            .body(never_sent())
            .expect("request");
        let refused = read_body(request, 100, Duration::from_secs(5)).await;
        assert!(matches!(refused, Err(Error::TooLarge(_))), "{refused:?}");
        // Without the Expect header the client is sending it anyway: it is
        // read (and dropped) so that the client reads the 413.
        let request =
            Request::post("/msg/bob").header(header::CONTENT_LENGTH, "1000").body(never_sent()).expect("request");
        let read = tokio::spawn(read_body(request, 100, Duration::from_secs(5)));
        assert!(read.await.expect_err("it reads the body").is_panic());
    }

    #[tokio::test]
    async fn a_compressed_body_is_refused_unread() {
        for coding in ["gzip", "br", "x-anything"] {
            let request = Request::post("/msg/bob")
                .header(header::CONTENT_ENCODING, coding)
                .body(Body::from("not gzip at all"))
                .expect("request");
            let refused = read_body(request, 100, Duration::from_secs(5)).await;
            assert!(matches!(&refused, Err(Error::UnsupportedMediaType(m)) if m.contains(coding)), "{refused:?}");
        }
        let request = Request::post("/msg/bob")
            .header(header::CONTENT_ENCODING, "Identity")
            .body(Body::from("hi"))
            .expect("request");
        assert_eq!(read_body(request, 100, Duration::from_secs(5)).await.expect("read"), "hi");
    }

    #[tokio::test]
    async fn a_wrong_method_is_a_problem_document_with_allow() {
        let response = call(Request::get("/msg/bob").body(Body::empty()).expect("request")).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(content_type(&response), Some("application/problem+json"));
        assert_eq!(response.headers().get(header::ALLOW).and_then(|v| v.to_str().ok()), Some("POST"));
    }

    #[tokio::test]
    async fn an_unknown_route_and_missing_credentials_are_problem_documents() {
        let response = call(Request::post("/nothing").body(Body::empty()).expect("request")).await;
        assert_eq!(
            (response.status(), content_type(&response)),
            (StatusCode::NOT_FOUND, Some("application/problem+json"))
        );
        let response = call(Request::post("/msg/bob").body(Body::from("hi")).expect("request")).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
    }

    #[tokio::test]
    async fn a_notification_too_large_for_the_stanza_is_cut_not_refused() {
        use base64::Engine;
        let credentials = base64::engine::general_purpose::STANDARD.encode("a@example.com:pw");
        let mut notification: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/alertmanager-firing.json")).expect("fixture");
        // 6,000 bytes of text: within the 8 KiB body limit, over the 4 KiB
        // stanza limit with everything around it.
        notification["alerts"][0]["annotations"]["description"] = "<".repeat(1500).into();
        let request = Request::post("/alertmanager/bob")
            .header(header::AUTHORIZATION, format!("Basic {credentials}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(notification.to_string()))
            .expect("request");
        let response = call(request).await;
        // Past validation and the size check: refused only because this
        // test has no broker.
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(response.into_body(), 64 * 1024).await.expect("body");
        let problem: serde_json::Value = serde_json::from_slice(&body).expect("problem JSON");
        assert_eq!(problem["type"], "urn:herald:problem:unavailable", "{problem}");
    }

    #[tokio::test]
    async fn a_message_whose_stanza_could_not_fit_is_refused_before_the_broker() {
        use base64::Engine;
        let credentials = base64::engine::general_purpose::STANDARD.encode("a@example.com:pw");
        // 900 '<' are 3,600 bytes as XML: within the 8 KiB body limit, but
        // over a 4,096-byte stanza with its envelope and JIDs.
        let request = Request::post("/msg/bob")
            .header(header::AUTHORIZATION, format!("Basic {credentials}"))
            .header(header::CONTENT_TYPE, "text/plain")
            .body(Body::from("<".repeat(900)))
            .expect("request");
        assert_eq!(call(request).await.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
