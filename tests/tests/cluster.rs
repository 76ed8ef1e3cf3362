//! Scale-out on a private three-node RabbitMQ cluster: two ingresses and
//! two relays on one prefix, each given the list of the nodes. The node
//! that leads the work queue is killed mid-burst, then the relays are
//! restarted one after the other; nothing accepted may be lost, both relays
//! deliver, and the services' logs stay quiet (no ERROR line, a handful of
//! WARN lines).

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use herald_tests::{
    Prosody, Receiver, admin,
    binaries::{Service, ServiceEnv},
    cluster::Cluster,
    fixture::{HTTP_PASSWORD, report},
    load::{self, Sent, Tally},
    poll,
    stack::user_entry,
};

const DEADLINE: Duration = Duration::from_secs(60);

struct Services {
    env: Vec<ServiceEnv>,
    logs: PathBuf,
    http: reqwest::Client,
}

impl Services {
    fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    fn spawn_ingress(&self, i: usize) -> Service {
        Service::spawn_logged("herald-ingress", &self.env[i].ingress(), Some(&self.log(&format!("ingress-{i}"))))
    }

    fn spawn_relay(&self, i: usize, generation: usize) -> Service {
        let mut env = self.env[i].relay();
        env.push(("HERALD_INSTANCE", format!("r{i}")));
        env.push(("HERALD_ONLINE_TIMEOUT", "2s".into()));
        Service::spawn_logged("herald-relay", &env, Some(&self.log(&format!("relay-{i}-{generation}"))))
    }

    async fn ready(&self, port: u16) -> bool {
        admin::readyz(&self.http, &format!("http://127.0.0.1:{port}")).await.is_ok()
    }

    async fn wait_ready(&self, port: u16) {
        poll::until("a service to be ready", DEADLINE, || async { self.ready(port).await.then_some(()) }).await;
    }

    /// Bursts of `n` to each ingress at once, with a shared progress count.
    fn bursts(
        &self,
        sender: &str,
        recipient: &str,
        n: usize,
    ) -> (Arc<AtomicUsize>, Vec<tokio::task::JoinHandle<Sent>>) {
        let progress = Arc::new(AtomicUsize::new(0));
        let tasks = self
            .env
            .iter()
            .map(|env| {
                let (http, user, progress) = (self.http.clone(), sender.to_owned(), Arc::clone(&progress));
                let url = format!("http://127.0.0.1:{}/msg/{recipient}", env.ingress_port);
                tokio::spawn(async move { load::burst(&http, &url, &user, HTTP_PASSWORD, n, 16, progress).await })
            })
            .collect();
        (progress, tasks)
    }

    async fn delivered(&self, admin_port: u16) -> f64 {
        let text = admin::metrics(&self.http, &format!("http://127.0.0.1:{admin_port}")).await;
        admin::sample(&text, r#"herald_deliveries_total{outcome="delivered"}"#).unwrap_or(0.0)
    }
}

async fn wait_progress(progress: &AtomicUsize, at_least: usize) {
    poll::until(&format!("{at_least} messages accepted"), Duration::from_secs(120), || async {
        (progress.load(Ordering::SeqCst) >= at_least).then_some(())
    })
    .await;
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Sent>>) -> Sent {
    let mut all = Sent::default();
    for task in tasks {
        let sent = task.await.expect("burst");
        all.accepted.extend(sent.accepted);
        all.refused += sent.refused;
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn two_ingresses_and_two_relays_ride_out_a_node_failure_and_a_rolling_restart() {
    herald_shared::telemetry::install_crypto_provider();
    let cluster = Cluster::start(3).await;
    let prosody = Prosody::start().await;
    let (sender, recipient) = (prosody.register("sender"), prosody.register("recipient"));
    let dir = tempfile::Builder::new()
        .prefix("herald-scale-")
        .disable_cleanup(herald_tests::keep_files())
        .tempdir()
        .expect("tempdir");
    eprintln!("service logs in {}", dir.path().display());
    let (users, accounts) = (dir.path().join("users.toml"), dir.path().join("accounts.toml"));
    std::fs::write(&users, user_entry(&sender.jid, HTTP_PASSWORD, None)).expect("users");
    std::fs::write(&accounts, prosody.accounts_entry(&sender)).expect("accounts");
    let prefix = format!("herald-scale-{}", uuid::Uuid::new_v4().simple());
    let env: Vec<ServiceEnv> =
        (0..2).map(|_| ServiceEnv::new(cluster.url(), prefix.clone(), users.clone(), accounts.clone())).collect();
    let services = Services { env, logs: dir.path().to_owned(), http: reqwest::Client::new() };
    let mut rx = Receiver::connect(&prosody, &recipient).await;
    let ingresses = [services.spawn_ingress(0), services.spawn_ingress(1)];
    let relays = [services.spawn_relay(0, 0), services.spawn_relay(1, 0)];
    for env in &services.env {
        services.wait_ready(env.ingress_admin_port).await;
        services.wait_ready(env.relay_admin_port).await;
    }

    // 1. The node leading the work queue dies mid-burst.
    let work = format!("{prefix}.work");
    let (progress, bursts) = services.bursts(&sender.jid, &recipient.jid, 1500);
    wait_progress(&progress, 600).await;
    let leader = cluster.leader_of(&work).await.expect("the work queue has a leader");
    let killed_at = Instant::now();
    cluster.kill(leader).await;
    let (mut healed, mut probes) = (Vec::new(), Vec::new());
    for env in &services.env {
        let response = poll::until("an ingress to accept again", DEADLINE, || async {
            let url = format!("http://127.0.0.1:{}/msg/{}", env.ingress_port, recipient.jid);
            let response = services
                .http
                .post(url)
                .basic_auth(&sender.jid, Some(HTTP_PASSWORD))
                .header("content-type", "text/plain")
                .body("probe")
                .send()
                .await
                .ok()?;
            (response.status() == 202).then_some(response)
        })
        .await;
        healed.push(killed_at.elapsed());
        probes.push(herald_tests::fixture::job_id(response).await);
    }
    let mut sent = collect(bursts).await;
    sent.accepted.extend(probes.into_iter().map(|id| (id, "probe".to_owned())));
    let received = load::receive_all(&mut rx, &sent, DEADLINE).await;
    let tally = Tally::of(&sent, &received);
    println!(
        "FAULT cluster: node {leader} (the work queue's leader) SIGKILLed mid-burst; each ingress answered 202 again \
         within {:?} ({} retried answers in all)",
        healed, sent.refused
    );
    report("leader's node SIGKILLed mid-burst, 2 ingresses and 2 relays with the URL list", &tally);

    // 2. A rolling restart of both relays while posts go on.
    let (progress, bursts) = services.bursts(&sender.jid, &recipient.jid, 1000);
    let [relay_0, relay_1] = relays;
    wait_progress(&progress, 300).await;
    assert!(relay_0.terminate(DEADLINE).await, "relay 0 exits 0 on SIGTERM");
    let relay_0 = services.spawn_relay(0, 1);
    services.wait_ready(services.env[0].relay_admin_port).await;
    wait_progress(&progress, 1000).await;
    assert!(relay_1.terminate(DEADLINE).await, "relay 1 exits 0 on SIGTERM");
    let relay_1 = services.spawn_relay(1, 1);
    services.wait_ready(services.env[1].relay_admin_port).await;
    let sent = collect(bursts).await;
    let tally = Tally::of(&sent, &load::receive_all(&mut rx, &sent, DEADLINE).await);
    report("rolling restart of both relays on the cluster", &tally);

    // 3. Both relays take their share.
    let (_, bursts) = services.bursts(&sender.jid, &recipient.jid, 200);
    let sent = collect(bursts).await;
    let tally = Tally::of(&sent, &load::receive_all(&mut rx, &sent, DEADLINE).await);
    report("both relays consuming", &tally);
    for env in &services.env {
        assert!(services.delivered(env.relay_admin_port).await > 0.0, "each relay delivers a share");
    }

    for service in [relay_0, relay_1] {
        assert!(service.terminate(DEADLINE).await);
    }
    for service in ingresses {
        assert!(service.terminate(DEADLINE).await);
    }
    // 4. Quiet logs: a broker node's death is no operator emergency for
    // Herald, and the per-request 503s are summarised.
    for entry in std::fs::read_dir(dir.path()).expect("logs") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "log") {
            continue;
        }
        let log = std::fs::read_to_string(&path).expect("log");
        let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
        let warnings = log.lines().filter(|l| l.contains(" WARN ")).count();
        println!("LOGS {}: {} WARN, {} ERROR", path.display(), warnings, errors.len());
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
        assert!(warnings <= 10, "{}: {warnings} WARN lines:\n{log}", path.display());
    }
}
