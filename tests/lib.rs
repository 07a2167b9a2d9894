//! The harness of the cross-part tests: real engines started per test, real `ums-sidecar`
//! processes, the workload image.

#![allow(clippy::unwrap_used)] // test harness: a panic is the failure report

#[path = "harness/engine_process.rs"]
pub mod engine_process;
#[path = "harness/sidecar_process.rs"]
pub mod sidecar_process;
#[path = "harness/workload.rs"]
pub mod workload;

use std::time::{Duration, Instant};

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` at the deadline.
pub async fn poll<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A short unique suffix for names and paths of one test.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}
