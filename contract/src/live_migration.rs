//! The `LiveMigration` resource's names (deploy/coordinator/crd.yaml), shared by the
//! coordinator that reconciles it and the kubectl plugin that drives it.

pub const GROUP: &str = "migration.ums-rs.io";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "LiveMigration";
pub const PLURAL: &str = "livemigrations";

/// The phases after which a LiveMigration changes no more.
pub const FINAL_PHASES: [&str; 2] = ["Succeeded", "Failed"];
