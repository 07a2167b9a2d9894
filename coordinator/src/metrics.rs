//! Prometheus metrics of the coordinator: migrations by outcome, the duration of each phase,
//! the bytes of state moved.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// How a migration this coordinator drove ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// The service runs at the destination.
    succeeded,
    /// Refused before anything was locked (4xx: the request, the pod's state).
    refused,
    /// Failed after the lock; the answer says what was undone.
    failed,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

/// The coordinator's metrics and their registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    migrations: Family<OutcomeLabels, Counter>,
    phases: Family<PhaseLabels, Histogram>,
    bytes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ums_coordinator");
        let migrations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "migrations",
            "Migrations driven by this coordinator, by outcome",
            migrations.clone(),
        );
        let phases = Family::<PhaseLabels, Histogram>::new_with_constructor(|| {
            // 10 ms .. ~80 min: a lock takes milliseconds, a large state's transfer minutes.
            Histogram::new(exponential_buckets(0.01, 2.0, 20))
        });
        registry.register(
            "phase_duration_seconds",
            "Time spent in each phase of a migration",
            phases.clone(),
        );
        let bytes = Counter::default();
        registry.register(
            "migrated_bytes",
            "Bytes of state (memory, files, volumes, images) moved by successful migrations",
            bytes.clone(),
        );
        Metrics {
            registry,
            migrations,
            phases,
            bytes,
        }
    }
}

impl Metrics {
    pub fn finished(&self, outcome: Outcome, phases: &[(String, u64)], bytes: u64) {
        self.migrations
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        for (phase, ms) in phases {
            self.phases
                .get_or_create(&PhaseLabels {
                    phase: phase.clone(),
                })
                .observe(*ms as f64 / 1000.0);
        }
        self.bytes.inc_by(bytes);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_phases_and_bytes_are_exposed() {
        let metrics = Metrics::default();
        metrics.finished(
            Outcome::succeeded,
            &[("migrating".into(), 1500), ("locking".into(), 20)],
            1024,
        );
        metrics.finished(Outcome::refused, &[], 0);
        let text = metrics.encode();
        assert!(
            text.contains("ums_coordinator_migrations_total{outcome=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ums_coordinator_migrations_total{outcome=\"refused\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ums_coordinator_phase_duration_seconds_count{phase=\"migrating\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ums_coordinator_migrated_bytes_total 1024"),
            "{text}"
        );
    }
}
