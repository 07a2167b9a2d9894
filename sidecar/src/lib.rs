//! `ums-sidecar`: the agent in a wrapped pod's runtime container, and the ambassador that
//! stands in for each original container.
//!
//! Where things are:
//! - [`spec`] translates the original Kubernetes containers into nested engine specs;
//! - [`engine`] is the engine trait and its Docker driver;
//! - [`archive`] packs and unpacks migration archives (the `ums-archive` crate, shared with
//!   `ums-ff`; format documented there);
//! - [`volumes`] decides which pod volumes travel and puts arrived ones in place;
//! - [`api`] is the HTTP API, [`migrate`] the live migration ([`abort`]: an operator's stop),
//!   [`postcopy`] its lazy-pages
//!   mode, [`pending`] the dump kept as the source's journal until the migration ends,
//!   [`ambassador`] the stand-in.

pub use ums_contract::abort;
pub mod ambassador;
pub mod api;
pub mod checkpoint;
pub mod cli;
pub mod engine;
pub mod error;
pub mod images;
pub mod migrate;
pub mod nested;
pub mod openapi;
pub mod pending;
pub mod podinfo;
pub mod postcopy;
pub mod quantity_bytes;
pub mod restore;
pub mod serve;
pub mod spec;
pub mod tcp;
pub mod volumes;

/// The archive format, shared with `ums-ff` (its own crate, below both).
pub use ums_archive as archive;
