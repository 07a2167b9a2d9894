//! `ums-coordinator`: one per cluster. UMS's `POST /migrate {name, namespace, destinationUrl,
//! keep, interface}` moves a wrapped pod to another cluster with one request.
//!
//! Where things are:
//! - [`pod`]: pure decisions: is a pod migratable now, and the destination's pod built from it;
//! - [`migrate`]: the source side's flow (check, lock, create, migrate, activate, finish) and
//!   its rollback; [`destination`]: the peer's side (create, restore, delete), with
//!   [`prerequisites`]: what a pod needs in its namespace, checked before the copy is made;
//! - [`journal`]: what a source pod carries so that anyone can finish its migration;
//!   [`recovery`]: at start and every minute, the migrations a stop interrupted (copies
//!   deleted, locks released, migrations whose state left finished from their journal);
//!   [`outcome`]: what a destination asks its source of a copy whose restored state runs
//!   while it is still passive (made active, or deleted as a stale duplicate);
//! - [`live_migration`]: the `LiveMigration` resource, reconciled by the same state machine;
//! - [`orchestrator`]: the orchestrator-level interface's source side (UMS's `ssu`: an
//!   unwrapped pod checkpointed through [`kubelet`], its archives sent by the node part), with
//!   [`checkpoint_journal`]: what a coordinator that died after the stop needs to restore it,
//!   and [`empty_dirs`]: the pod's emptyDir volumes, archived on the node and put back by an
//!   init container of the restored pod;
//! - [`checkpoint_upload`]: the orchestrator-level interface's destination half: checkpoint
//!   archives stream in and become checkpoint OCI images in this cluster's registry, once
//!   [`restore_preflight`] found nothing here that would make the restore fail;
//! - [`target`]: where a migration goes, another cluster's coordinator or another node of
//!   this cluster (the copy made here by the same destination code), with [`placement`]:
//!   which node takes a copy and what it is called;
//! - [`peer`]: mutual TLS to the other coordinator; [`api`]: the routes; [`auth`]: who may call
//!   which route; [`state`]: what they share;
//!   [`metrics`]: Prometheus.

pub mod api;
pub mod args;
pub mod auth;
pub mod checkpoint_journal;
pub mod checkpoint_upload;
pub mod destination;
pub mod empty_dirs;
pub mod error;
pub mod evacuation;
pub mod events;
pub mod journal;
pub mod kubelet;
pub mod live_migration;
pub mod metrics;
pub mod migrate;
pub mod orchestrator;
pub mod outcome;
pub mod peer;
pub mod placement;
pub mod pod;
pub mod prerequisites;
pub mod queue;
pub mod recovery;
pub mod restore_preflight;
pub mod state;
pub mod target;

pub use args::Args;
