//! herald-bench still runs end to end. A tiny run, so the README's
//! benchmark command cannot rot unnoticed; nothing here looks at a rate or
//! a latency (timings belong in the benchmark, not in a test).

use std::process::Command;

#[test]
fn the_benchmark_runs_and_loses_nothing() {
    let bench = herald_tests::binaries::path("herald-bench");
    let output = Command::new(bench)
        .args(["--rounds", "1", "--publish-time", "300ms", "--ingress-time", "300ms", "--latency-time", "1s"])
        .args(["--xmpp-messages", "300", "--e2e-messages", "300", "--rate", "200", "--concurrency", "8"])
        .args(["--wide-channels", "1", "--wide-in-flight", "8", "--senders", "3"])
        .output()
        .expect("run herald-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "herald-bench failed:\n{stderr}\n{stdout}");
    let row = |what: &str| {
        stdout
            .lines()
            .find(|line| line.contains(what))
            .unwrap_or_else(|| panic!("no row for {what:?} in:\n{stdout}"))
            .to_owned()
    };
    assert!(row("end to end: messages per second").contains("300/300 delivered, 0 lost"), "{stdout}");
    assert!(
        row("the backlog draining").contains("delivery kept up"),
        "300 messages leave too little to drain:\n{stdout}"
    );
    assert!(row("end to end latency").contains("200/200 delivered, 0 lost"), "{stdout}");
    assert!(row("XMPP ceiling").contains("300/300 received"), "{stdout}");
    let floor = row("herald-ingress: CPU time per accepted request");
    assert!(floor.contains("+ publish") && !floor.contains("(at 0 req/s)"), "the HTTP floor answered:\n{stdout}");
    assert!(row("senders: herald-relay with 4 sender accounts").contains("4 sessions online"), "{stdout}");
    assert!(row("senders: whole path").contains("300/300 delivered, 0 lost"), "{stdout}");
    assert!(row("senders: XMPP ceiling for 3 senders").contains("300/300 received"), "{stdout}");
    for service in ["herald-ingress", "herald-relay"] {
        assert!(row(&format!("peak RSS (VmHWM) {service}")).contains(" MiB"), "{stdout}");
    }
}
