//! The container backend of the harness, through `testcontainers`: a RabbitMQ
//! and Prosody in containers instead of the local services.
//!
//! `HERALD_TEST_BACKEND` picks the backend: unset, empty or `local` is the
//! default (the local RabbitMQ, a Prosody process from Debian's package);
//! `containers` starts them in containers through a Docker API
//! (`DOCKER_HOST`, e.g. `unix:///run/podman/podman.sock` for podman).
//!
//! - RabbitMQ: `HERALD_TEST_RABBITMQ_IMAGE` (default
//!   `docker.io/library/rabbitmq:3.13-management`), user and password
//!   `herald`, its port 5672 published on a free port of 127.0.0.1. One
//!   container per test process (nextest runs each test in its own), shared
//!   by every `Broker` of the process and removed when the last one is
//!   dropped. `RabbitMq` has the fault controls: stop, kill, start again (on
//!   the same host port), pause, unpause.
//! - Prosody: `HERALD_TEST_PROSODY_IMAGE` (default
//!   `localhost/herald-demo-prosody:dev`, Debian's prosody package), on the
//!   host's network with the harness's generated directory mounted at the
//!   same path, so that the generated config works unchanged; `prosodyctl`
//!   runs inside the container (`exec`). The test certificates are still
//!   made with the host's `openssl`.
//!
//! Synchronous harness calls (`Prosody::register`) reach the container
//! through `block_on`, which needs a multi-thread Tokio runtime, as every
//! test here uses.
//!
//! Every container carries the label `herald-tests`: a test process killed
//! before it could remove its containers leaves them behind, and
//! `podman rm -f $(podman ps -aq --filter label=herald-tests)` removes them.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use testcontainers::bollard::models::{HostConfig, PortBinding};
use testcontainers::core::{ExecCommand, IntoContainerPort, Mount};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

use crate::poll;

/// The variable that picks the backend.
pub const BACKEND_VAR: &str = "HERALD_TEST_BACKEND";
/// The label on every container the harness starts.
pub const LABEL: &str = "herald-tests";
/// RabbitMQ's user and password in its container (`guest` may only connect
/// from the container's own loopback on a default RabbitMQ).
pub const RABBITMQ_USER: &str = "herald";
pub const RABBITMQ_PASSWORD: &str = "herald";

const DEFAULT_RABBITMQ_IMAGE: &str = "docker.io/library/rabbitmq:3.13-management";
const DEFAULT_PROSODY_IMAGE: &str = "localhost/herald-demo-prosody:dev";
const AMQP_PORT: u16 = 5672;
/// How long a RabbitMQ container may take to accept AMQP connections after
/// a start (a first boot on a busy 2-core machine takes tens of seconds).
const RABBITMQ_READY: Duration = Duration::from_secs(180);
/// How long an AMQP connection attempt may take while waiting for the broker.
const CONNECT_ATTEMPT: Duration = Duration::from_secs(5);
/// How long freezing a container may take, attempts included.
const PAUSE_DEADLINE: Duration = Duration::from_secs(30);
/// How long a graceful stop may take before it turns into SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(60);
/// How long a container may take to be gone after SIGKILL.
const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// How long a command run in a container may take.
const EXEC_DEADLINE: Duration = Duration::from_secs(60);
/// How often a container that is not ready yet is asked whether it runs.
const RUNNING_CHECK: Duration = Duration::from_secs(1);
/// How many times a container is started again if it stops while starting.
const START_ATTEMPTS: u32 = 3;
/// How much of a stopped container's output a failure shows.
const REPORT_LINES: usize = 60;

/// Where the tests' RabbitMQ and Prosody run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The local RabbitMQ service and a Prosody process per test.
    Local,
    /// Containers started through `testcontainers`.
    Containers,
}

/// The backend `HERALD_TEST_BACKEND` selects; panics on any other value, so
/// that a typo does not silently test the local services.
pub fn backend() -> Backend {
    let value = std::env::var_os(BACKEND_VAR).unwrap_or_default();
    match value.to_str() {
        Some("" | "local") => Backend::Local,
        Some("containers") => Backend::Containers,
        _ => panic!("{BACKEND_VAR}={value:?} is not a backend: use `local` (the default) or `containers`"),
    }
}

/// Whether the container backend is selected.
pub fn enabled() -> bool {
    backend() == Backend::Containers
}

/// Panics unless the container backend is selected: for tests that only
/// mean something with it, so that they can never pass vacuously.
pub fn require() {
    assert!(
        enabled(),
        "this test needs the container backend: run it with {BACKEND_VAR}=containers and DOCKER_HOST pointing at a \
         Docker API (e.g. unix:///run/podman/podman.sock)"
    );
}

/// An image variable's value, or `default`.
fn image_name(variable: &str, default: &str) -> String {
    std::env::var(variable).ok().filter(|v| !v.is_empty()).unwrap_or_else(|| default.to_owned())
}

/// `name[:tag]` as an image (`latest` when no tag is given; a colon before
/// the last `/` belongs to a registry's port).
fn image(reference: &str) -> GenericImage {
    let slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[slash..].rfind(':') {
        Some(colon) => GenericImage::new(&reference[..slash + colon], &reference[slash + colon + 1..]),
        None => GenericImage::new(reference, "latest"),
    }
}

/// Starts a container, or panics with what to check.
async fn start(request: testcontainers::ContainerRequest<GenericImage>, what: &str) -> ContainerAsync<GenericImage> {
    request.start().await.unwrap_or_else(|e| {
        panic!(
            "cannot start the {what} container: {e}. Is DOCKER_HOST ({:?}) a running Docker API (`podman system \
             service --time=0 unix:///run/podman/podman.sock`), and is the image there (`podman images`)?",
            std::env::var("DOCKER_HOST").unwrap_or_default()
        )
    })
}

/// Runs `future` to completion from synchronous code (a `Drop`, the
/// harness's synchronous helpers) on the current Tokio runtime, which must
/// be a multi-thread one.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let handle = tokio::runtime::Handle::try_current().expect("the container backend runs inside a Tokio runtime");
    assert_eq!(
        handle.runtime_flavor(),
        tokio::runtime::RuntimeFlavor::MultiThread,
        "the container backend needs a multi-thread runtime (#[tokio::test(flavor = \"multi_thread\")])"
    );
    tokio::task::block_in_place(|| handle.block_on(future))
}

/// Runs `command` in `container`; returns its exit code and its output
/// (stdout, then stderr).
pub async fn exec(container: &ContainerAsync<GenericImage>, command: &[&str]) -> (i64, String) {
    let mut result = container
        .exec(ExecCommand::new(command.iter().copied()))
        .await
        .unwrap_or_else(|e| panic!("run {command:?} in container {}: {e}", container.id()));
    let stdout = result.stdout_to_vec().await.unwrap_or_default();
    let stderr = result.stderr_to_vec().await.unwrap_or_default();
    let what = format!("{command:?} to exit");
    let code = poll::until(&what, EXEC_DEADLINE, || async { result.exit_code().await.ok().flatten() }).await;
    let output = format!("{}{}", String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr));
    (code, output)
}

/// Stops `container`: its stop signal (SIGTERM), then SIGKILL after
/// `grace` (at once for zero). Returns once it no longer runs.
pub async fn stop(container: &ContainerAsync<GenericImage>, grace: Duration) {
    let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
    // An error may only mean that it had stopped already: the wait says.
    if let Err(e) = container.stop_with_timeout(Some(seconds)).await {
        eprintln!("stopping container {}: {e}", container.id());
    }
    poll::until("the container to stop", grace + STOP_DEADLINE, || async {
        container.is_running().await.ok().filter(|running| !running).map(|_| ())
    })
    .await;
}

/// Polls `ready` until it holds, or until `container` no longer runs
/// (`Err`, with its exit code and last output); panics after `deadline`.
/// Whether it runs is asked at most once a second.
pub async fn until_ready_or_exited<F, Fut>(
    container: &ContainerAsync<GenericImage>,
    what: &str,
    deadline: Duration,
    ready: F,
) -> Result<(), String>
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let last_look = Mutex::new(Instant::now());
    poll::until(&format!("{what} to be ready"), deadline, || async {
        if ready().await {
            return Some(Ok(()));
        }
        if !due(&last_look) {
            return None;
        }
        match container.is_running().await {
            Ok(false) => Some(Err(exit_report(container).await)),
            _ => None,
        }
    })
    .await
}

/// Whether `RUNNING_CHECK` has passed since `last`; if so, `last` is now.
fn due(last: &Mutex<Instant>) -> bool {
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    let due = last.elapsed() >= RUNNING_CHECK;
    if due {
        *last = Instant::now();
    }
    due
}

/// Starts a stopped container again and waits until `ready`. Should it
/// stop while starting, it is started once more (twice at most): podman
/// 4.3 was seen to stop a container that was started again right after a
/// SIGKILL, a second after it booted (its exit code 0, its output cut off).
pub async fn start_again<F, Fut>(container: &ContainerAsync<GenericImage>, what: &str, deadline: Duration, ready: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    for attempt in 1..=START_ATTEMPTS {
        container.start().await.unwrap_or_else(|e| panic!("start the {what} container again: {e}"));
        match until_ready_or_exited(container, what, deadline, &ready).await {
            Ok(()) => return,
            Err(why) if attempt < START_ATTEMPTS => {
                eprintln!("the {what} container stopped while starting again (attempt {attempt}); once more: {why}");
                stop(container, Duration::ZERO).await;
            }
            Err(why) => panic!("the {what} container stopped while starting again, {START_ATTEMPTS} times: {why}"),
        }
    }
}

/// A stopped container's exit code and the end of its output.
async fn exit_report(container: &ContainerAsync<GenericImage>) -> String {
    let code = container.exit_code().await.ok().flatten();
    let stdout = container.stdout_to_vec().await.unwrap_or_default();
    let stderr = container.stderr_to_vec().await.unwrap_or_default();
    let output = format!("{}{}", String::from_utf8_lossy(&stdout), String::from_utf8_lossy(&stderr));
    let lines: Vec<&str> = output.lines().collect();
    let tail = lines[lines.len().saturating_sub(REPORT_LINES)..].join("\n");
    format!("container {} exited ({code:?}); its last output:\n{tail}", container.id())
}

/// The process's RabbitMQ container, while a `Broker` holds it.
static RABBITMQ: Mutex<Weak<RabbitMq>> = Mutex::new(Weak::new());
/// Held while a RabbitMQ container starts, so that a process starts one.
static RABBITMQ_STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The process's RabbitMQ container: the running one, or a new one.
pub async fn rabbitmq() -> Arc<RabbitMq> {
    let _one_at_a_time = RABBITMQ_STARTING.lock().await;
    if let Some(running) = running_rabbitmq() {
        return running;
    }
    let started = Arc::new(RabbitMq::start().await);
    *RABBITMQ.lock().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(&started);
    started
}

/// The process's RabbitMQ container, if one is running (held by a `Broker`).
pub fn running_rabbitmq() -> Option<Arc<RabbitMq>> {
    RABBITMQ.lock().unwrap_or_else(|p| p.into_inner()).upgrade()
}

/// A RabbitMQ in a container, its AMQP port published on 127.0.0.1, with
/// fault controls. The container is removed when this is dropped.
pub struct RabbitMq {
    container: ContainerAsync<GenericImage>,
    port: u16,
}

impl RabbitMq {
    /// Starts a container of `HERALD_TEST_RABBITMQ_IMAGE` and waits until it
    /// accepts AMQP connections.
    pub async fn start() -> Self {
        let reference = image_name("HERALD_TEST_RABBITMQ_IMAGE", DEFAULT_RABBITMQ_IMAGE);
        // A host port of our own: the engine keeps it across a stop and a
        // start (Docker assigns a new random port on each start).
        let port = crate::prosody::free_port();
        let request = image(&reference)
            .with_exposed_port(AMQP_PORT.tcp())
            .with_env_var("RABBITMQ_DEFAULT_USER", RABBITMQ_USER)
            .with_env_var("RABBITMQ_DEFAULT_PASS", RABBITMQ_PASSWORD)
            .with_label(LABEL, "rabbitmq")
            .with_host_config_modifier(move |config| publish_on_loopback(config, port, AMQP_PORT));
        let began = Instant::now();
        let container = start(request, &format!("RabbitMQ ({reference})")).await;
        let this = Self { container, port };
        if let Err(why) = until_ready_or_exited(&this.container, "RabbitMQ", RABBITMQ_READY, || this.accepts()).await {
            panic!("the RabbitMQ container did not start: {why}");
        }
        eprintln!("RabbitMQ container {} ({reference}) ready in {:.1?}", this.id(), began.elapsed());
        this
    }

    /// The URL of the broker (user and password `herald`).
    pub fn url(&self) -> String {
        format!("amqp://{RABBITMQ_USER}:{RABBITMQ_PASSWORD}@127.0.0.1:{}/%2f", self.port)
    }

    /// The host port its AMQP port is published on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The container's id.
    pub fn id(&self) -> &str {
        self.container.id()
    }

    /// Whether the broker accepts an AMQP connection now.
    async fn accepts(&self) -> bool {
        let url = self.url();
        match tokio::time::timeout(CONNECT_ATTEMPT, herald_shared::amqp::connect(&url, "herald-tests")).await {
            Ok(Ok(connection)) => {
                drop(connection.close(200, "ready".into()).await);
                true
            }
            _ => false,
        }
    }

    /// Stops the broker the way an operator would: the node shuts down
    /// (`rabbitmqctl shutdown`, since the local image's shell as PID 1
    /// ignores SIGTERM) and the container exits; SIGKILL after a minute.
    pub async fn stop(&self) {
        let (code, output) = exec(&self.container, &["rabbitmqctl", "shutdown"]).await;
        if code != 0 {
            eprintln!("rabbitmqctl shutdown exited {code}: {output}");
        }
        stop(&self.container, STOP_GRACE).await;
    }

    /// Kills the broker (SIGKILL): a crash.
    pub async fn kill(&self) {
        stop(&self.container, Duration::ZERO).await;
    }

    /// Starts the stopped container again (same data, same host port) and
    /// waits until the broker accepts connections.
    pub async fn start_again(&self) {
        let began = Instant::now();
        start_again(&self.container, "RabbitMQ", RABBITMQ_READY, || self.accepts()).await;
        eprintln!("RabbitMQ container {} ready again in {:.1?}", self.id(), began.elapsed());
        let published = self.container.get_host_port_ipv4(AMQP_PORT.tcp()).await.expect("published port");
        assert_eq!(published, self.port, "the broker's container came back on another host port");
    }

    /// Freezes every process of the container (the cgroup freezer): open
    /// connections stay open but nothing answers. runc gives up (and thaws)
    /// when a process does not freeze in time, as one waiting on the disk
    /// under a burst may not: it is asked again until the deadline.
    pub async fn pause(&self) {
        poll::until("the RabbitMQ container to freeze", PAUSE_DEADLINE, || async {
            match self.container.pause().await {
                Ok(()) => Some(()),
                Err(e) => {
                    eprintln!("pausing the RabbitMQ container failed ({e}); asking again");
                    None
                }
            }
        })
        .await;
    }

    /// Thaws a paused container.
    pub async fn unpause(&self) {
        self.container.unpause().await.expect("unpause the RabbitMQ container");
    }
}

/// Publishes `container_port` on 127.0.0.1:`host_port` only (not on every
/// interface, as a plain mapping would).
fn publish_on_loopback(config: &mut HostConfig, host_port: u16, container_port: u16) {
    let binding = PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(host_port.to_string()) };
    config.publish_all_ports = Some(false);
    config.port_bindings = Some([(format!("{container_port}/tcp"), Some(vec![binding]))].into_iter().collect());
}

/// Starts Prosody from `HERALD_TEST_PROSODY_IMAGE` with `config`, on the
/// host's network, `dir` (which holds the config, the data and the
/// certificates) mounted at the same path. The caller waits for its port.
pub async fn start_prosody(dir: &Path, config: &Path) -> ContainerAsync<GenericImage> {
    let reference = image_name("HERALD_TEST_PROSODY_IMAGE", DEFAULT_PROSODY_IMAGE);
    let dir = dir.to_str().expect("a UTF-8 temporary directory").to_owned();
    let config = config.to_str().expect("a UTF-8 config path").to_owned();
    let request = image(&reference)
        .with_entrypoint("prosody")
        .with_cmd(["--config", config.as_str()])
        .with_user("root")
        .with_mount(Mount::bind_mount(dir.clone(), dir))
        .with_label(LABEL, "prosody")
        // "host" is no network to create (podman does not list it): set
        // the mode itself, and publish nothing.
        .with_host_config_modifier(|config| {
            config.network_mode = Some("host".into());
            config.publish_all_ports = Some(false);
            config.port_bindings = None;
        });
    start(request, &format!("Prosody ({reference})")).await
}
