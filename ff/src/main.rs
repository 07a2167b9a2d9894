//! `ums-ff`: the supervisor of a service container for UMS-rs's service-level interface
//! (`migration-interface: ff`, UMS's fastfreeze). It is the container's entrypoint (the ff base
//! image's): `ums-ff run -- <the service's command>`.
//!
//! - [`supervise`]: the service as a session of its own with the container's stdio, signals
//!   forwarded, every process reaped, its exit code the container's;
//! - [`pid_counter`]: the service's PIDs kept free for a restore;
//! - [`criu`]: dump and restore of the service's tree from inside the container;
//! - [`carry`]: which root-fs files and volumes travel with it;
//! - [`api`]: the HTTP API the coordinator drives (the sidecar's contract), [`migrate`] the
//!   source side, [`restore`] the destination side; the archive is `ums-archive`'s, shared
//!   with the sidecar.
//!
//! The pod's `migration-start-mode` (downward API) decides what it does at start: `active`
//! starts the service; `passive` waits for a restore (and starts the service if the pod turns
//! active without one); `null` runs nothing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use ums_contract::StartMode;

mod api;
mod carry;
mod criu;
mod error;
mod migrate;
mod pid_counter;
mod probe;
mod restore;
mod state;
mod supervise;

use state::{Config, Ff, Phase};
use supervise::{End, Supervisor};

#[derive(Debug, Parser)]
#[command(name = "ums-ff", version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Runs the service as the container's main process, supervises it and serves the API that
    /// migrates it.
    Run(Box<RunArgs>),
    /// Does nothing and exits 0 (what the PID counter's short-lived processes run).
    #[command(hide = true)]
    Noop,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Before the service starts, make the PID counter pass this value (0: leave it), so that
    /// the processes of a restored service, which keep their PIDs, find theirs free.
    #[arg(long, env = "UMS_FF_FIRST_PID", default_value_t = 0)]
    first_pid: u32,
    /// Address of the HTTP API (the sidecar's port: the coordinator calls podIP:8888).
    #[arg(long, env = "UMS_FF_LISTEN", default_value = "0.0.0.0:8888")]
    listen: SocketAddr,
    /// The downward-API annotations file (no file: active, no migration).
    #[arg(long, env = "UMS_PODINFO", default_value = "/etc/podinfo/annotations")]
    podinfo: PathBuf,
    /// Public keys (base64, comma-separated) of the coordinator(s) whose signed tokens are
    /// accepted; set by the webhook. Without any, the API is open (run by hand).
    #[arg(long, env = "UMS_COORDINATOR_KEYS")]
    coordinator_keys: Option<String>,
    /// The container's name (what the coordinator probes); set by the webhook.
    #[arg(long, env = "UMS_FF_CONTAINER", default_value = "service")]
    container: String,
    /// Where dumps and incoming archives are staged (in the container's root fs).
    #[arg(long, env = "UMS_FF_WORK_DIR", default_value = "/var/lib/ums-ff")]
    work_dir: PathBuf,
    /// Root-fs paths (files or directories, comma-separated) that travel besides the files
    /// the service holds open.
    #[arg(long, env = "UMS_FF_PRESERVE", value_delimiter = ',')]
    preserve: Vec<PathBuf>,
    /// The container's pod-local volumes, `name=/mount/path,...` (set by the webhook).
    #[arg(long, env = "UMS_FF_VOLUMES", default_value = "")]
    volumes: String,
    /// The service's command and its arguments.
    #[arg(trailing_var_arg = true, required = true)]
    command: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Noop => Ok(()),
        Command::Run(run) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("UMS_FF_LOG")
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .init();
            // Few threads: each takes a PID of the container's namespace.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .max_blocking_threads(8)
                .enable_all()
                .build()?;
            let code = runtime.block_on(serve(*run))?;
            std::process::exit(code);
        }
    }
}

async fn serve(args: RunArgs) -> anyhow::Result<i32> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let volumes =
        carry::parse_volumes(&args.volumes).map_err(|e| anyhow::anyhow!("UMS_FF_VOLUMES: {e}"))?;
    let coordinator_keys = match args.coordinator_keys.as_deref().filter(|k| !k.is_empty()) {
        Some(keys) => {
            ums_contract::credential::parse_public_keys(keys).context("UMS_COORDINATOR_KEYS")?
        }
        None => Vec::new(),
    };
    std::fs::create_dir_all(&args.work_dir)
        .with_context(|| format!("cannot create {}", args.work_dir.display()))?;
    // Before the reaper takes every child's end.
    tracing::info!(criu = criu::version(), "CRIU");
    let supervisor = Supervisor::start()?;
    let tls =
        ums_tls::EphemeralCert::generate("ums-ff").context("failed to make the TLS certificate")?;
    let config = Config {
        command: args.command,
        first_pid: args.first_pid,
        podinfo: args.podinfo,
        container: args.container,
        work_dir: args.work_dir,
        preserve: args.preserve,
        volumes,
    };
    let ff = Arc::new(Ff::new(
        config,
        supervisor.clone(),
        coordinator_keys,
        tls.sha256().to_owned(),
    ));
    // An active pod is starting from the first probe on (never "waiting": a passive copy's
    // 204 would make it ready before its service runs).
    if ff
        .annotations()
        .is_ok_and(|a| a.start_mode_or_default() == StartMode::Active)
    {
        ff.set_phase(Phase::Starting);
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to bind {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, tls_sha256 = %tls.sha256(), open = ff.coordinator_keys.is_empty(), "ums-ff listening (HTTP, and TLS for peers on the same port)");
    let router = api::router(ff.clone());
    tokio::spawn(ums_tls::serve(
        listener,
        ums_tls::Transport::TlsOrPlain(tokio_rustls::TlsAcceptor::from(tls.server_config())),
        router,
        std::future::pending::<()>(),
    ));
    tokio::spawn(follow_start_mode(ff.clone()));
    let end = supervisor.ended().await;
    ff.set_phase(Phase::Ended);
    Ok(match end {
        End::Service(code) => code,
        End::Stopped => 0,
    })
}

/// Starts the service when the pod is (or turns) active and nothing runs or was restored here.
async fn follow_start_mode(ff: Arc<Ff>) {
    let mut last: Option<StartMode> = None;
    loop {
        match ff.annotations() {
            Ok(annotations) => {
                let mode = annotations.start_mode_or_default();
                if last != Some(mode) {
                    tracing::info!(start_mode = %mode, "start mode");
                    last = Some(mode);
                }
                if mode == StartMode::Active
                    && matches!(ff.phase(), Phase::Waiting | Phase::Starting)
                {
                    if let Ok(_busy) = ff.busy.try_lock() {
                        ff.set_phase(Phase::Starting);
                        if let Err(e) = start(&ff).await {
                            tracing::error!(error = %e, "cannot start the service");
                            ff.set_phase(Phase::Ended);
                            std::process::exit(127);
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the pod's annotations"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn start(ff: &Ff) -> anyhow::Result<()> {
    if ff.config.first_pid > 0 {
        let reached = pid_counter::advance_past(&ff.supervisor, ff.config.first_pid).await?;
        tracing::info!(reached, "PID counter advanced");
    }
    ff.supervisor.start_service(&ff.config.command)?;
    ff.set_phase(Phase::Running);
    Ok(())
}
