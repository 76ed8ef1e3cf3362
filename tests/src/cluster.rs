//! A private RabbitMQ cluster on this machine, for the scale-out suite:
//! three nodes on free loopback ports, each with its own node name, data,
//! log and configuration directories, clustered with `join_cluster`. The
//! machine's own broker is left alone; the nodes are stopped and their
//! directories removed when the cluster is dropped.
//!
//! It uses Debian's `rabbitmq-server` and `rabbitmqctl` (run as root, they
//! switch to the `rabbitmq` user, whose Erlang cookie every node shares).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::prosody::free_port;

/// How long a node may take to boot.
const BOOT: Duration = Duration::from_secs(90);

pub struct Node {
    /// `herald-<id>-<n>@localhost`.
    pub name: String,
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Boots `size` nodes and joins them to the first.
    pub async fn start(size: usize) -> Self {
        let dir = tempfile::Builder::new().prefix("herald-cluster-").tempdir().expect("tempdir");
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let nodes: Vec<Node> = (1..=size)
            .map(|n| {
                let node_dir = dir.path().join(format!("n{n}"));
                let node = Node {
                    name: format!("herald-{id}-{n}@localhost"),
                    port: free_port(),
                    dist_port: free_port(),
                    dir: node_dir,
                };
                node.prepare();
                node
            })
            .collect();
        chown_to_rabbitmq(dir.path());
        for node in &nodes {
            node.boot();
        }
        for node in &nodes {
            node.await_startup().await;
        }
        for node in &nodes[1..] {
            for args in [vec!["stop_app"], vec!["join_cluster", nodes[0].name.as_str()], vec!["start_app"]] {
                node.ctl(&args).await.unwrap_or_else(|e| panic!("{} {args:?}: {e}", node.name));
            }
        }
        Self { nodes, dir }
    }

    /// The HERALD_AMQP_URL list naming every node.
    pub fn url(&self) -> String {
        let mut url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.nodes[0].port);
        for node in &self.nodes[1..] {
            url.push_str(&format!(",127.0.0.1:{}", node.port));
        }
        url
    }

    /// The index of the node that leads quorum queue `queue`.
    pub async fn leader_of(&self, queue: &str) -> Option<usize> {
        let listing = self.nodes[0].ctl(&["list_queues", "-q", "--no-table-headers", "name", "leader"]).await.ok()?;
        let leader = listing.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(queue)).then(|| fields.next().map(str::to_owned)).flatten()
        })?;
        self.nodes.iter().position(|n| n.name == leader)
    }

    /// SIGKILL of node `i`'s Erlang VM: no clean shutdown.
    pub async fn kill(&self, i: usize) {
        let pid = self.nodes[i].ctl(&["eval", "os:getpid()."]).await.expect("the node's pid");
        let pid = pid.trim().trim_matches('"').to_owned();
        let status = Command::new("kill").args(["-KILL", &pid]).status().expect("kill");
        assert!(status.success(), "kill -KILL {pid}");
    }

    /// Boots node `i` again, with its data: it rejoins the cluster.
    pub async fn restart(&self, i: usize) {
        self.nodes[i].boot();
        self.nodes[i].await_startup().await;
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            let _ = node.ctl_blocking(&["stop"]);
        }
    }
}

impl Node {
    fn prepare(&self) {
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(self.dir.join(sub)).expect("node directory");
        }
        std::fs::write(self.dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        let config = format!(
            "listeners.tcp.local = 127.0.0.1:{}\nloopback_users = none\ncluster_name = herald-tests\n",
            self.port
        );
        std::fs::write(self.dir.join("rabbitmq.conf"), config).expect("config file");
    }

    fn env(&self, command: &mut Command) {
        let dir = |sub: &str| self.dir.join(sub).display().to_string();
        command
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir("log"))
            .env("RABBITMQ_CONFIG_FILE", dir("rabbitmq.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", dir("pid"));
    }

    fn boot(&self) {
        let mut command = Command::new("rabbitmq-server");
        self.env(&mut command);
        let status = command
            .arg("-detached")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run rabbitmq-server (apt-get install rabbitmq-server)");
        assert!(status.success(), "rabbitmq-server -detached for {}", self.name);
    }

    /// `await_startup` fails at once while the node's VM is not up yet:
    /// asked again until the deadline.
    async fn await_startup(&self) {
        let mut last = String::new();
        let end = tokio::time::Instant::now() + BOOT;
        while tokio::time::Instant::now() < end {
            match self.ctl(&["await_startup", "--timeout", "30"]).await {
                Ok(_) => return,
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("{} did not start within {BOOT:?}: {last}\nlogs in {}", self.name, self.dir.display());
    }

    /// `rabbitmqctl -n <node> <args>`; its output, or its error output.
    pub async fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let (name, args): (String, Vec<String>) = (self.name.clone(), args.iter().map(|a| (*a).to_owned()).collect());
        tokio::task::spawn_blocking(move || ctl(&name, &args)).await.expect("rabbitmqctl task")
    }

    fn ctl_blocking(&self, args: &[&str]) -> Result<String, String> {
        ctl(&self.name, &args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>())
    }
}

fn ctl(node: &str, args: &[String]) -> Result<String, String> {
    let output = Command::new("rabbitmqctl")
        .args(["-n", node])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run rabbitmqctl: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&output.stderr)))
    }
}

/// The nodes run as the `rabbitmq` user: their directories must be its.
fn chown_to_rabbitmq(dir: &Path) {
    let status = Command::new("chown").args(["-R", "rabbitmq:rabbitmq"]).arg(dir).status().expect("chown");
    assert!(status.success(), "chown -R rabbitmq {}", dir.display());
}
