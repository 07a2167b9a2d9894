//! `kubectl migrate` (installed as `kubectl-migrate` on the PATH, kubectl finds it): moves a
//! pod with UMS-rs by creating a `LiveMigration` with the user's kubeconfig, and shows its
//! progress until it ends; lists them; cancels one by deleting it (the coordinator rolls the
//! migration back while the state has not arrived).
//!
//! ```text
//! kubectl migrate POD --to-node NODE | --to-cluster HOST:PORT [-n NS] [--keep] [--post-copy]
//!                 [--bandwidth 64Mi] [--completion-timeout-per-gib S] [--no-wait]
//! kubectl migrate list [-n NS | -A]
//! kubectl migrate cancel NAME|MIGRATION-ID [-n NS]
//! ```

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};
use kube::Api;
use ums_contract::live_migration::{FINAL_PHASES, GROUP, KIND, PLURAL, VERSION};

mod live_migration;

use live_migration::Destination;

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-migrate",
    bin_name = "kubectl migrate",
    version,
    about = "Live-migrate a pod with UMS-rs (a LiveMigration, with your kubeconfig)",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The pod to migrate.
    pod: Option<String>,
    /// Another node of the pod's cluster (with --to-cluster: a node of that cluster).
    #[arg(long)]
    to_node: Option<String>,
    /// Another cluster's ums-coordinator, host:port or https://host:port.
    #[arg(long)]
    to_cluster: Option<String>,
    /// Keep the source pod (emptied) instead of deleting it.
    #[arg(long)]
    keep: bool,
    /// Resume at the destination before the memory has arrived (wrapped pods with one
    /// container).
    #[arg(long)]
    post_copy: bool,
    /// The most bytes per second the state may take (a number or a quantity such as 64Mi).
    #[arg(long)]
    bandwidth: Option<String>,
    /// Seconds per GiB of the pod's memory the move may take before it is aborted.
    #[arg(long)]
    completion_timeout_per_gib: Option<u64>,
    /// At the completion timeout, switch to post-copy instead of aborting (wrapped pods with
    /// one container).
    #[arg(long)]
    allow_post_copy: bool,
    /// Create the LiveMigration and return.
    #[arg(long)]
    no_wait: bool,
    /// How long to show the progress before giving up waiting (the migration goes on).
    #[arg(long, default_value_t = 1800)]
    timeout_seconds: u64,
    #[command(flatten)]
    target: Target,
}

#[derive(Debug, clap::Args)]
struct Target {
    /// The namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    context: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The LiveMigrations of a namespace (or of all, with -A).
    List {
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Cancel a migration: delete its LiveMigration (by name, or by migration id).
    Cancel { id: String },
}

fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, KIND), PLURAL)
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let options = kube::config::KubeConfigOptions {
        context: cli.target.context.clone(),
        ..Default::default()
    };
    let config = kube::Config::from_kubeconfig(&options)
        .await
        .context("cannot read the kubeconfig (KUBECONFIG or ~/.kube/config)")?;
    let namespace = cli
        .target
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config)?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource());
    match cli.command {
        Some(Command::List { all_namespaces }) => {
            let api = if all_namespaces {
                Api::all_with(client, &resource())
            } else {
                api
            };
            let objects: Vec<serde_json::Value> = api
                .list(&ListParams::default())
                .await
                .context("cannot list LiveMigrations (is UMS-rs's CRD installed?)")?
                .items
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<_, _>>()?;
            println!("{}", live_migration::table(&objects, all_namespaces));
            Ok(())
        }
        Some(Command::Cancel { id }) => cancel(&api, &namespace, &id).await,
        None => {
            let Some(pod) = cli.pod else {
                bail!("name the pod to migrate: kubectl migrate POD --to-node NODE | --to-cluster HOST:PORT (or: list, cancel ID)");
            };
            if cli.to_node.is_none() && cli.to_cluster.is_none() {
                bail!("say where pod {pod} goes: --to-node NODE (another node of this cluster) or --to-cluster HOST:PORT (another cluster's coordinator), or both");
            }
            let to = Destination {
                node: cli.to_node,
                cluster: cli.to_cluster,
            };
            let mut object = live_migration::object(&pod, &to, cli.keep, cli.post_copy);
            if let Some(bandwidth) = &cli.bandwidth {
                object["spec"]["bandwidthPerMigration"] = serde_json::json!(bandwidth);
            }
            if let Some(timeout) = cli.completion_timeout_per_gib {
                object["spec"]["completionTimeoutPerGiB"] = serde_json::json!(timeout);
            }
            if cli.allow_post_copy {
                object["spec"]["allowPostCopy"] = serde_json::json!(true);
            }
            let object: DynamicObject = serde_json::from_value(object)?;
            let created = api
                .create(&PostParams::default(), &object)
                .await
                .with_context(|| {
                    format!("cannot create the LiveMigration of pod {namespace}/{pod}")
                })?;
            let name = created.metadata.name.clone().unwrap_or_default();
            println!(
                "livemigration/{name} created: pod {namespace}/{pod} to {}",
                live_migration::destination_text(&created.data["spec"])
            );
            if cli.no_wait {
                return Ok(());
            }
            follow(&api, &name, Duration::from_secs(cli.timeout_seconds)).await
        }
    }
}

/// Shows each phase as it passes, then the summary; an error if the migration failed.
async fn follow(api: &Api<DynamicObject>, name: &str, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut shown = String::new();
    loop {
        let object = api
            .get_opt(name)
            .await?
            .with_context(|| format!("livemigration/{name} was deleted (cancelled)"))?;
        let status = &object.data["status"];
        let phase = status["phase"].as_str().unwrap_or("Pending");
        if phase != shown {
            println!("[{:>6.1}s] {phase}", started.elapsed().as_secs_f64());
            shown = phase.to_owned();
        }
        if FINAL_PHASES.contains(&phase) {
            let text = live_migration::summary(name, status);
            if phase == "Succeeded" {
                println!("{text}");
                return Ok(());
            }
            bail!("{text}");
        }
        if started.elapsed() > timeout {
            bail!("livemigration/{name} is still {phase} after {} s; it goes on (kubectl migrate list, kubectl migrate cancel {name})", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Deletes the LiveMigration named `id`, or the one whose migration id is `id`.
async fn cancel(api: &Api<DynamicObject>, namespace: &str, id: &str) -> anyhow::Result<()> {
    let object = match api.get_opt(id).await? {
        Some(object) => object,
        None => api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find(|o| o.data["status"]["migrationId"] == id)
            .with_context(|| format!("no LiveMigration named {id} or with migration id {id} in namespace {namespace}"))?,
    };
    let name = object.metadata.name.clone().unwrap_or_default();
    let phase = object.data["status"]["phase"]
        .as_str()
        .unwrap_or("Pending")
        .to_owned();
    api.delete(&name, &DeleteParams::default()).await?;
    if FINAL_PHASES.contains(&phase.as_str()) {
        println!("livemigration/{name} deleted (it had already ended: {phase})");
    } else {
        println!("livemigration/{name} deleted: its migration ({phase}) is aborted; the service stays at the source unless its state had already arrived");
    }
    Ok(())
}
