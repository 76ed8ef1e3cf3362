//! The front door under attack: a stranger's guesses never lock out an
//! account's owner, guessing never runs more argon2 checks than the budget
//! nor grows memory without bound, slow and idle connections are closed,
//! the connection cap holds, and readiness tells the truth during a broker
//! alarm.

use std::{net::IpAddr, time::Duration};

use herald_tests::{
    Broker, Stack, StackOptions, admin,
    binaries::{self, Service, ServiceEnv},
    blocker::Blocker,
    poll,
    proxy::amqp_authority,
    stack::{ingress_config, user_entry},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

use crate::{ALERTMANAGER, ARRIVAL};

/// A client whose requests come from `address` (any of 127.0.0.0/8).
fn client_from(address: &str) -> reqwest::Client {
    let address: IpAddr = address.parse().expect("ip");
    reqwest::Client::builder().local_address(address).build().expect("client")
}

async fn sample(http: &reqwest::Client, admin_url: &str, name: &str) -> f64 {
    admin::sample(&admin::metrics(http, admin_url).await, name).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_strangers_guesses_never_lock_out_the_owner_and_alertmanager_never_sees_a_4xx_lockout() {
    let stack = Stack::start(StackOptions { relay: false, ..Default::default() }).await;
    let stranger = client_from("127.0.0.2");
    let url = format!("{}/alertmanager/oncall", stack.ingress_url);
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let response = stranger
            .post(&url)
            .basic_auth(&stack.sender.jid, Some("a wrong guess"))
            .header("content-type", "application/json")
            .body(ALERTMANAGER)
            .send()
            .await
            .expect("post");
        if response.status() == 503 {
            assert!(response.headers().contains_key("retry-after"), "a 503 says when to retry");
        }
        statuses.push(response.status().as_u16());
    }
    assert!(statuses.iter().all(|s| *s == 401 || *s == 503), "{statuses:?}");
    assert!(statuses.contains(&503), "the stranger was locked out, with a status Alertmanager retries: {statuses:?}");
    // The owner's first login (nothing cached), from its own address.
    let owner = client_from("127.0.0.1");
    let response = owner
        .post(&url)
        .basic_auth(&stack.sender.jid, Some(&stack.http_password))
        .header("content-type", "application/json")
        .body(ALERTMANAGER)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 202, "the owner's right password is accepted");
    // On /msg the stranger's lockout is a 429.
    let response = stranger
        .post(format!("{}/msg/oncall", stack.ingress_url))
        .basic_auth(&stack.sender.jid, Some("a wrong guess"))
        .body("x")
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 429);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_guesses_never_run_more_password_checks_than_the_budget() {
    // The harness's ingress runs one check at a time (HERALD_AUTH_CONCURRENCY=1).
    let stack = Stack::start(StackOptions { relay: false, ..Default::default() }).await;
    let guesses = (0..40).map(|i| {
        let client = client_from(&format!("127.0.1.{}", i + 1));
        let url = format!("{}/msg/oncall", stack.ingress_url);
        let user = format!("guess-{i}@localhost");
        async move { client.post(url).basic_auth(user, Some("guess")).body("x").send().await.expect("post").status() }
    });
    let statuses = futures::future::join_all(guesses).await;
    assert!(statuses.iter().all(|s| *s == 401 || *s == 503), "{statuses:?}");
    let peak = sample(&stack.http, &stack.ingress_admin_url, "herald_password_checks_peak").await;
    assert_eq!(peak, 1.0, "never more than one check at once");
    // A known client meanwhile: served.
    assert_eq!(stack.post("/msg/oncall", Some("text/plain"), "still here").await.status(), 202);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_wrong_guesses_do_not_grow_the_ingress_memory() {
    let broker = Broker::connect().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users.toml");
    std::fs::write(&users, user_entry("someone@localhost", "right", None)).expect("users");
    let env = ServiceEnv::new(broker.url.clone(), broker.prefix.clone(), users, dir.path().join("unused.toml"));
    let mut vars = env.ingress();
    vars.push(("HERALD_AUTH_CONCURRENCY", "2".into()));
    let ingress = Service::spawn("herald-ingress", &vars);
    let http = reqwest::Client::new();
    let admin = format!("http://127.0.0.1:{}", env.ingress_admin_port);
    poll::until("the ingress to be ready", ARRIVAL, || async {
        let r = http.get(format!("{admin}/readyz")).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    // 1,000 guesses, 200 at a time, from 250 addresses.
    let url = format!("http://127.0.0.1:{}/msg/oncall", env.ingress_port);
    let clients: Vec<reqwest::Client> = (0..250).map(|i| client_from(&format!("127.0.2.{}", i + 1))).collect();
    for round in 0..5 {
        let guesses = (0..200).map(|i| {
            let (client, url) = (&clients[(round * 200 + i) % 250], &url);
            async move {
                client
                    .post(url)
                    .basic_auth(format!("u{i}@localhost"), Some("guess"))
                    .body("x")
                    .send()
                    .await
                    .map(|r| r.status())
            }
        });
        for status in futures::future::join_all(guesses).await {
            let status = status.expect("an answer");
            assert!(status == 401 || status == 503 || status == 429, "{status}");
        }
    }
    let peak_kib = binaries::peak_rss_kib(ingress.pid()).expect("VmHWM");
    // Two 19 MiB argon2 buffers and the rest of the service: far below
    // the hundreds of MiB an allocation per check reached.
    assert!(peak_kib < 128 * 1024, "peak RSS {peak_kib} KiB");
    println!("ingress peak RSS under 1,000 wrong guesses: {} MiB", peak_kib / 1024);
    assert!(ingress.terminate(ARRIVAL).await);
    broker.cleanup(&[]).await;
}

/// An in-process ingress with `tweak`ed settings; its URL, its admin URL,
/// the sender's credentials, and what stops it.
struct Ingress {
    url: String,
    admin: String,
    port: u16,
    user: String,
    password: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    broker: Broker,
    _dir: tempfile::TempDir,
}

impl Ingress {
    async fn start(amqp_url: Option<String>, tweak: impl FnOnce(&mut herald_ingress::config::Config)) -> Self {
        herald_shared::telemetry::init();
        let broker = Broker::connect().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let users = dir.path().join("users.toml");
        let (user, password) = ("door@localhost".to_owned(), "door-password".to_owned());
        std::fs::write(&users, user_entry(&user, &password, None)).expect("users");
        let mut config = ingress_config(&amqp_url.unwrap_or_else(|| broker.url.clone()), &broker.prefix, users);
        tweak(&mut config);
        let app = herald_ingress::Application::build(config).await.expect("ingress builds");
        let port = app.port();
        let (url, admin) = (format!("http://127.0.0.1:{port}"), format!("http://127.0.0.1:{}", app.admin_port()));
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move { app.run_until(token.cancelled_owned()).await.expect("ingress runs") });
        Self { url, admin, port, user, password, stop, task, broker, _dir: dir }
    }

    async fn post(&self, http: &reqwest::Client) -> reqwest::StatusCode {
        let url = format!("{}/msg/oncall", self.url);
        let response =
            http.post(url).basic_auth(&self.user, Some(&self.password)).header("content-type", "text/plain").body("hi");
        response.send().await.expect("post").status()
    }

    async fn ready(&self, http: &reqwest::Client) -> Result<(), String> {
        admin::readyz(http, &self.admin).await
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("ingress task");
        self.broker.cleanup(&[]).await;
    }
}

/// Reads until the server closes the connection; panics if it does not
/// within `deadline`.
async fn closed_within(stream: &mut TcpStream, deadline: Duration, what: &str) {
    let mut buffer = [0u8; 1024];
    let closed = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(deadline, closed).await.unwrap_or_else(|_| panic!("{what}: still open after {deadline:?}"));
}

/// Sends `GET /nothing` on a kept-alive connection and reads the whole
/// answer (headers, then `content-length` bytes); returns its status line.
async fn get_nothing(stream: &mut TcpStream) -> String {
    stream.write_all(b"GET /nothing HTTP/1.1\r\nHost: herald\r\n\r\n").await.expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.expect("an answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("ASCII head");
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().expect("length")))
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.expect("the body");
    head.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_idle_connections_are_closed() {
    let ingress = Ingress::start(None, |c| {
        c.http_header_timeout = Duration::from_secs(1);
        c.http_body_timeout = Duration::from_secs(1);
    })
    .await;
    let address = format!("127.0.0.1:{}", ingress.port);
    // Half a header, then nothing.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(&address).await.expect("connect");
        stream.write_all(b"POST /msg/oncall HTTP/1.1\r\nHost: herald\r\n").await.expect("write");
        slow.push(stream);
    }
    for stream in &mut slow {
        closed_within(stream, ARRIVAL, "a connection that never finished its header").await;
    }
    // A whole request, its answer, and then silence: the keep-alive
    // connection is closed too.
    let mut idle = TcpStream::connect(&address).await.expect("connect");
    assert!(get_nothing(&mut idle).await.starts_with("HTTP/1.1 404"));
    closed_within(&mut idle, ARRIVAL, "an idle keep-alive connection").await;
    // A body that stops halfway gets 408.
    let credentials = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", ingress.user, ingress.password))
    };
    let mut stalled = TcpStream::connect(&address).await.expect("connect");
    let head = format!(
        "POST /msg/oncall HTTP/1.1\r\nHost: herald\r\nAuthorization: Basic {credentials}\r\n\
         Content-Type: text/plain\r\nContent-Length: 100\r\n\r\nonly ten b"
    );
    stalled.write_all(head.as_bytes()).await.expect("write");
    let mut answer = [0u8; 12];
    tokio::time::timeout(ARRIVAL, stalled.read_exact(&mut answer)).await.expect("answered in time").expect("read");
    assert_eq!(&answer, b"HTTP/1.1 408");
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_connection_cap_refuses_new_connections_and_keeps_the_open_ones() {
    let ingress = Ingress::start(None, |c| c.http_max_connections = 4).await;
    let address = format!("127.0.0.1:{}", ingress.port);
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(&address).await.expect("connect");
        assert!(get_nothing(&mut stream).await.starts_with("HTTP/1.1 404"));
        open.push(stream);
    }
    let mut fifth = TcpStream::connect(&address).await.expect("the kernel accepts");
    closed_within(&mut fifth, ARRIVAL, "a connection over the cap").await;
    // An established one is still served.
    assert!(get_nothing(&mut open[0]).await.starts_with("HTTP/1.1 404"), "an established connection is still served");
    let refused = sample(&reqwest::Client::new(), &ingress.admin, "herald_http_connections_refused_total").await;
    assert!(refused >= 1.0, "{refused}");
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_flips_while_the_broker_blocks_publishers_and_recovers() {
    // Held for the test: with the container backend it holds the broker.
    let broker = Broker::connect().await;
    let broker_url = broker.url.clone();
    let blocker = Blocker::start(amqp_authority(&broker_url)).await;
    let ingress = Ingress::start(Some(blocker.amqp_url(&broker_url)), |_| {}).await;
    let http = reqwest::Client::new();
    poll::until("the ingress to be ready", ARRIVAL, || async { ingress.ready(&http).await.ok() }).await;
    assert_eq!(ingress.post(&http).await, 202);
    blocker.set_blocked(true);
    let why = poll::until("the ingress to say the broker blocks it", ARRIVAL, || async {
        ingress.ready(&http).await.err().filter(|why| why.contains("blocks"))
    })
    .await;
    assert!(why.contains("alarm"), "{why}");
    assert_eq!(ingress.post(&http).await, 503, "no 2xx while blocked");
    blocker.set_blocked(false);
    poll::until("the ingress to be ready again", ARRIVAL, || async { ingress.ready(&http).await.ok() }).await;
    assert_eq!(ingress.post(&http).await, 202);
    ingress.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_upload_gets_its_413_even_without_expect_100_continue() {
    let ingress = Ingress::start(None, |_| {}).await;
    let credentials = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", ingress.user, ingress.password))
    };
    let body = vec![b'x'; 12 * 1024 * 1024];
    for attempt in 0..5 {
        let mut stream = TcpStream::connect(format!("127.0.0.1:{}", ingress.port)).await.expect("connect");
        let head = format!(
            "POST /msg/oncall HTTP/1.1\r\nHost: herald\r\nAuthorization: Basic {credentials}\r\n\
             Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        // As Python's http.client does: the whole body, then the answer.
        stream.write_all(head.as_bytes()).await.expect("write the head");
        stream.write_all(&body).await.unwrap_or_else(|e| panic!("attempt {attempt}: the upload broke off: {e}"));
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).await.unwrap_or_else(|e| panic!("attempt {attempt}: no answer: {e}"));
        assert_eq!(&answer, b"HTTP/1.1 413", "attempt {attempt}");
    }
    ingress.stop().await;
}
