//! The harness of the cross-part tests: the real runtime images run as pods on the outer
//! engine (nested engines, sidecars and ambassadors as in production), a real registry, the
//! workload image.

#![allow(clippy::unwrap_used)] // test harness: a panic is the failure report

#[path = "harness/cluster.rs"]
pub mod cluster;
#[path = "harness/coordinator.rs"]
pub mod coordinator;
#[path = "harness/outer.rs"]
pub mod outer;
#[path = "harness/registry.rs"]
pub mod registry;
#[path = "harness/runtime_pod.rs"]
pub mod runtime_pod;
#[path = "harness/service_pod.rs"]
pub mod service_pod;
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
