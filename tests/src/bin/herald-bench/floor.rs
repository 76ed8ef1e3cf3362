//! CPU floors: what the work Herald cannot avoid costs on this machine, so
//! that Herald's own CPU per message can be set beside it.
//!
//! - **HTTP**: a bare HTTP/1 server on hyper, as the ingress's (keep-alive,
//!   TCP_NODELAY, two tokio workers on two cores), that reads each POST's
//!   body and answers 202 with a job-like JSON body, and does nothing else:
//!   no authentication, no validation, no broker. It runs as a child process
//!   (this binary again, with [`SERVE_ENV`] set), so that its CPU time is its
//!   own, under the same closed-loop load as the ingress alone.
//! - **Confirmed publish**: the bench's own CPU per confirmed publish while it
//!   measures the broker ceiling (lapin, one channel, as many in flight as
//!   the HTTP load), which is what the ingress's publishing costs at least.

use std::convert::Infallible;
use std::process::Stdio;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpListener;

use crate::http_load::{self, Limit, Outcome, Target};
use crate::options::Options;

/// Set in the child process: serve the HTTP floor instead of benchmarking.
pub const SERVE_ENV: &str = "HERALD_BENCH_SERVE_HTTP_FLOOR";

/// The HTTP floor's run.
#[derive(Debug)]
pub struct HttpFloor {
    pub load: Outcome,
    /// The server's CPU time per answered request, seconds.
    pub cpu_per_request: f64,
}

/// In the child: serves on a free loopback port, printed on stdout, until
/// killed.
pub async fn serve() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the HTTP floor's port");
    println!("{}", listener.local_addr().expect("local address").port());
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        drop(stream.set_nodelay(true));
        tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(answer)));
    }
}

/// Reads the body, answers 202 with one job, as the ingress does.
async fn answer(request: hyper::Request<Incoming>) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let to = request.uri().path().rsplit('/').next().unwrap_or_default().to_owned();
    drop(request.into_body().collect().await);
    let body = format!(r#"{{"jobs":[{{"id":"00000000-0000-7000-8000-000000000000","to":"{to}"}}]}}"#);
    let response = hyper::Response::builder()
        .status(hyper::StatusCode::ACCEPTED)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response");
    Ok(response)
}

/// This program's path. The bench rebuilds the workspace's binaries when it
/// starts, itself among them when the tree changed: the running file is
/// then replaced, and Linux names it `<path> (deleted)`, while the new
/// build, from the same tree, is at `<path>`.
fn this_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("this binary");
    match exe.to_str().and_then(|path| path.strip_suffix(" (deleted)")) {
        Some(rebuilt) => rebuilt.into(),
        None => exe,
    }
}

/// Starts the floor server, drives it as the ingress alone was driven (the
/// same connections and requests, at the ingress's `rate`: a server
/// answering faster batches more work per wake-up, and would cost less per
/// request for that alone), and stops it.
pub async fn http(target: &Target, options: &Options, rate: f64) -> HttpFloor {
    let mut child = tokio::process::Command::new(this_binary())
        .env(SERVE_ENV, "1")
        .env("TOKIO_WORKER_THREADS", "2")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the HTTP floor server");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut port = String::new();
    tokio::io::BufReader::new(stdout).read_line(&mut port).await.expect("the HTTP floor's port");
    let port: u16 = port.trim().parse().expect("a port number");
    let pid = child.id().expect("a running child");
    let url = reqwest::Url::parse(&target.url).expect("target URL");
    let floor = Arc::new(Target {
        http: target.http.clone(),
        url: format!("http://127.0.0.1:{port}{}", url.path()),
        users: target.users.clone(),
        body_bytes: target.body_bytes,
    });
    let before = crate::machine::cpu_seconds(&[pid]);
    let load =
        http_load::closed_loop_paced(floor, options.concurrency, Limit::For(options.ingress_time), Some(rate)).await;
    let cpu = crate::machine::cpu_seconds(&[pid]) - before;
    drop(child.kill().await);
    HttpFloor { cpu_per_request: cpu / load.accepted.len().max(1) as f64, load }
}
