//! The real `herald-ingress` and `herald-relay` binaries, configured only
//! through their environment variables, as an operator runs them.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

/// The directory holding the workspace's binaries for this profile, after
/// making sure they are built.
pub fn bin_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // target/<profile>/deps/<test-binary> or target/<profile>/<binary>
        // → target/<profile>
        let exe = std::env::current_exe().expect("current exe");
        let mut dir = exe.parent().expect("target dir").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--workspace", "--bins"]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        // The test process carries the variables cargo set for it
        // (CARGO_PKG_*, CARGO_MANIFEST_DIR, …); build scripts such as ring's
        // see them as a changed environment and rebuild. Leave them out.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if (key.starts_with("CARGO_") && !matches!(&*key, "CARGO_HOME" | "CARGO_TARGET_DIR"))
                || key.starts_with("NEXTEST")
            {
                build.env_remove(&*key);
            }
        }
        let status = build.current_dir(env!("CARGO_MANIFEST_DIR")).status().expect("run cargo build");
        assert!(status.success(), "cargo build of the service binaries failed");
        dir
    })
}

/// A process's resident set now (`VmRSS`), in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// A process's peak resident set (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM")
}

/// Whether the kernel may back a process's memory with transparent huge
/// pages (`THP_enabled`, Linux 5.0 and later).
pub fn thp_enabled(pid: u32) -> Option<bool> {
    Some(status_field(pid, "THP_enabled")? != "0")
}

/// A `kB` field of `/proc/<pid>/status`.
fn status_kib(pid: u32, name: &str) -> Option<u64> {
    status_field(pid, name)?.split_whitespace().next()?.parse().ok()
}

/// The value of a field of `/proc/<pid>/status`, trimmed.
fn status_field(pid: u32, name: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let value = status.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))?;
    Some(value.trim().to_owned())
}

pub fn path(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// A running service process, killed if the test ends without stopping it.
pub struct Service {
    child: Option<Child>,
}

impl Service {
    pub fn spawn(name: &str, env: &[(&str, String)]) -> Self {
        Self::spawn_logged(name, env, None)
    }

    /// Like `spawn`, with stdout and stderr appended to `log` if given.
    pub fn spawn_logged(name: &str, env: &[(&str, String)], log: Option<&std::path::Path>) -> Self {
        let mut command = Command::new(path(name));
        command.env_clear();
        for key in ["PATH", "HOME", "RUST_BACKTRACE"] {
            if let Some(value) = std::env::var_os(key) {
                command.env(key, value);
            }
        }
        command.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        for (key, value) in env {
            command.env(key, value);
        }
        if let Some(log) = log {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file");
            command.stdout(file.try_clone().expect("clone")).stderr(file);
        }
        let child = command.stdin(Stdio::null()).spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        Self { child: Some(child) }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and returns whether the process exited successfully
    /// within `deadline`.
    pub async fn terminate(mut self, deadline: std::time::Duration) -> bool {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        crate::poll::until("the service to exit after SIGTERM", deadline, || {
            let status = child.try_wait().expect("wait");
            async move { status }
        })
        .await
        .success()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Where the two services find their broker, listener and files.
#[derive(Debug, Clone)]
pub struct ServiceEnv {
    pub amqp_url: String,
    pub prefix: String,
    pub ingress_port: u16,
    pub ingress_admin_port: u16,
    pub relay_admin_port: u16,
    pub users_file: std::path::PathBuf,
    pub accounts_file: std::path::PathBuf,
}

impl ServiceEnv {
    /// Free ports for the ingress and both admin listeners.
    pub fn new(
        amqp_url: String,
        prefix: String,
        users_file: std::path::PathBuf,
        accounts_file: std::path::PathBuf,
    ) -> Self {
        use crate::prosody::free_port;
        Self {
            amqp_url,
            prefix,
            ingress_port: free_port(),
            ingress_admin_port: free_port(),
            relay_admin_port: free_port(),
            users_file,
            accounts_file,
        }
    }

    pub fn ingress(&self) -> Vec<(&'static str, String)> {
        vec![
            ("HERALD_AMQP_URL", self.amqp_url.clone()),
            ("HERALD_AMQP_PREFIX", self.prefix.clone()),
            ("HERALD_LISTEN", format!("127.0.0.1:{}", self.ingress_port)),
            ("HERALD_ADMIN_LISTEN", format!("127.0.0.1:{}", self.ingress_admin_port)),
            ("HERALD_USERS_FILE", self.users_file.display().to_string()),
        ]
    }

    pub fn relay(&self) -> Vec<(&'static str, String)> {
        vec![
            ("HERALD_AMQP_URL", self.amqp_url.clone()),
            ("HERALD_AMQP_PREFIX", self.prefix.clone()),
            ("HERALD_ACCOUNTS_FILE", self.accounts_file.display().to_string()),
            ("HERALD_ADMIN_LISTEN", format!("127.0.0.1:{}", self.relay_admin_port)),
        ]
    }

    pub fn spawn_ingress(&self) -> Service {
        Service::spawn("herald-ingress", &self.ingress())
    }

    pub fn spawn_relay(&self) -> Service {
        Service::spawn("herald-relay", &self.relay())
    }
}
