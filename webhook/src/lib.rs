//! `ums-webhook`: the mutating and validating admission webhook of UMS-rs.
//!
//! Where things are:
//! - [`mutate`] decides which rewrite a pod gets; [`wrap`] is the dind/pind rewrite and [`ff`]
//!   the service-level preparation, both pure `Pod -> Pod` functions;
//! - [`validate`] guards pods under migration and checks annotations;
//! - [`review`] turns AdmissionReviews into decisions and JSON patches;
//! - [`server`] and [`tls`] serve them over HTTPS, [`metrics`] counts them.

pub mod args;
pub mod config;
pub mod ff;
pub mod metrics;
pub mod mutate;
pub mod review;
pub mod server;
pub mod validate;
pub mod wrap;

pub use args::Args;
/// The serving certificate (shared with the coordinator: `ums-tls`).
pub use ums_tls::cert as tls;
