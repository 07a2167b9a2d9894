//! The migration policies of a cluster (KubeVirt's names): at most `--max-parallel-migrations`
//! migrations at once from this cluster, at most `--max-outbound-per-node` from one node; the
//! rest wait in the order they came, in phase `queued` (visible in `GET /migrations` and a
//! LiveMigration's status). [`admissible`] is the decision, pure; [`Slots`] the waiting.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub per_cluster: usize,
    pub per_node: usize,
}

/// A migration, running or waiting, and the node it leaves (`None`: not bound to one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub node: Option<String>,
}

/// The waiting migrations that may start now, in order: each one in turn if the running ones
/// plus those already admitted leave room in the cluster and on its node. A waiting one whose
/// node is full does not hold back those behind it on other nodes.
pub fn admissible(running: &[Entry], waiting: &[Entry], limits: Limits) -> Vec<String> {
    let mut taken: Vec<&Entry> = running.iter().collect();
    let mut admitted = Vec::new();
    for entry in waiting {
        if taken.len() >= limits.per_cluster {
            break;
        }
        let on_node = taken
            .iter()
            .filter(|t| t.node.is_some() && t.node == entry.node)
            .count();
        if entry.node.is_some() && on_node >= limits.per_node {
            continue;
        }
        taken.push(entry);
        admitted.push(entry.id.clone());
    }
    admitted
}

#[derive(Debug, Default)]
struct Occupancy {
    running: Vec<Entry>,
    waiting: VecDeque<Entry>,
}

/// The slots of the cluster's migrations.
#[derive(Debug)]
pub struct Slots {
    limits: Limits,
    occupancy: Mutex<Occupancy>,
    changed: Notify,
}

/// A running migration's slot: given back when dropped.
#[derive(Debug)]
pub struct Slot<'a> {
    slots: &'a Slots,
    id: String,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Ok(mut o) = self.slots.occupancy.lock() {
            o.running.retain(|e| e.id != self.id);
        }
        self.slots.changed.notify_waiters();
    }
}

impl Slots {
    pub fn new(limits: Limits) -> Self {
        Slots {
            limits: Limits {
                per_cluster: limits.per_cluster.max(1),
                per_node: limits.per_node.max(1),
            },
            occupancy: Mutex::default(),
            changed: Notify::new(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Waits, in order, for a slot for migration `id` leaving `node`; `on_wait` is called once
    /// if it has to wait, with the number of migrations ahead of it, so that the caller can
    /// show it as queued. `None` once `cancel` fires while it waits.
    pub async fn acquire(
        &self,
        id: &str,
        node: Option<String>,
        cancel: &CancellationToken,
        mut on_wait: impl FnMut(usize),
    ) -> Option<Slot<'_>> {
        if let Ok(mut o) = self.occupancy.lock() {
            o.waiting.push_back(Entry {
                id: id.to_owned(),
                node,
            });
        }
        let mut told = false;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let ahead = {
                let Ok(mut o) = self.occupancy.lock() else {
                    return None;
                };
                let waiting: Vec<Entry> = o.waiting.iter().cloned().collect();
                if admissible(&o.running, &waiting, self.limits).contains(&id.to_owned()) {
                    if let Some(at) = o.waiting.iter().position(|e| e.id == id) {
                        if let Some(entry) = o.waiting.remove(at) {
                            o.running.push(entry);
                        }
                    }
                    drop(o);
                    // Others behind may fit too.
                    self.changed.notify_waiters();
                    return Some(Slot {
                        slots: self,
                        id: id.to_owned(),
                    });
                }
                o.waiting.iter().position(|e| e.id == id).unwrap_or(0)
            };
            if !told {
                told = true;
                on_wait(ahead);
            }
            tokio::select! {
                () = &mut notified => {}
                () = cancel.cancelled() => {
                    if let Ok(mut o) = self.occupancy.lock() {
                        o.waiting.retain(|e| e.id != id);
                    }
                    self.changed.notify_waiters();
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, node: &str) -> Entry {
        Entry {
            id: id.into(),
            node: Some(node.into()),
        }
    }

    #[test]
    fn waiting_migrations_start_in_order_within_the_limits() {
        let limits = Limits {
            per_cluster: 3,
            per_node: 2,
        };
        let waiting = [
            entry("a", "n1"),
            entry("b", "n1"),
            entry("c", "n1"),
            entry("d", "n2"),
        ];
        assert_eq!(admissible(&[], &waiting, limits), ["a", "b", "d"]);
        let running = [entry("x", "n2"), entry("y", "n2")];
        assert_eq!(admissible(&running, &waiting, limits), ["a"]);
        let one = Limits {
            per_cluster: 1,
            per_node: 1,
        };
        assert_eq!(admissible(&[], &waiting, one), ["a"]);
        assert!(admissible(&[entry("a", "n1")], &waiting[1..], one).is_empty());
    }

    #[tokio::test]
    async fn a_slot_is_given_back_and_a_cancelled_wait_leaves_the_queue() {
        let slots = Slots::new(Limits {
            per_cluster: 1,
            per_node: 1,
        });
        let never = CancellationToken::new();
        let first = slots
            .acquire("a", Some("n1".into()), &never, |_| panic!("a waits"))
            .await
            .unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let mut waited = None;
        assert!(slots
            .acquire("b", Some("n1".into()), &cancel, |ahead| waited =
                Some(ahead))
            .await
            .is_none());
        assert_eq!(waited, Some(0));
        let second = {
            let slots = &slots;
            let wait = slots.acquire("c", Some("n2".into()), &never, |_| {});
            tokio::pin!(wait);
            tokio::select! {
                _ = &mut wait => panic!("c ran beside a with a limit of one"),
                () = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            }
            drop(first);
            wait.await
        };
        assert!(second.is_some());
    }
}
