//! A service's admin listener as the tests read it: readiness and metrics.

/// `GET {admin_url}/readyz`: `Ok` on 200, else the reason it gave (or why
/// it could not be asked).
pub async fn readyz(http: &reqwest::Client, admin_url: &str) -> Result<(), String> {
    let response = http.get(format!("{admin_url}/readyz")).send().await.map_err(|e| e.to_string())?;
    let ok = response.status() == 200;
    let text = response.text().await.unwrap_or_default();
    if ok { Ok(()) } else { Err(text) }
}

/// `GET {admin_url}/metrics` as text.
pub async fn metrics(http: &reqwest::Client, admin_url: &str) -> String {
    let response = http.get(format!("{admin_url}/metrics")).send().await.expect("metrics");
    response.text().await.expect("metrics text")
}

/// The value of the first sample line starting with `prefix`; `None` for a
/// counter no event has created yet.
pub fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}
