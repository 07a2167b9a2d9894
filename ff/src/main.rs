//! `ums-ff`: the supervisor of a service container for UMS-rs's service-level interface
//! (`migration-interface: ff`, UMS's fastfreeze). It is the container's entrypoint:
//! `ums-ff run -- <the service's command>` starts the service, relays nothing itself (the
//! service writes to the container's own stdout and stderr: the container's log stays the
//! service's log), forwards the signals the runtime sends to the service's process group, reaps
//! every process that ends in the container, and exits as the service exits.
//!
//! To come (issue 20): the HTTP API for the coordinator, the checkpoint of the service's tree
//! with CRIU from inside the container (`--unprivileged`), the transfer to the destination's
//! `ums-ff`, and the restore before it starts anything else (`pid_counter.rs` keeps the
//! service's PIDs free for it).

use clap::Parser;

mod pid_counter;
mod supervise;

#[derive(Debug, Parser)]
#[command(name = "ums-ff", version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Runs the service as the container's main process and supervises it.
    Run {
        /// Before the service starts, make the PID counter pass this value (0: leave it), so
        /// that the processes of a restored service, which keep their PIDs, find theirs free.
        #[arg(long, env = "UMS_FF_FIRST_PID", default_value_t = 0)]
        first_pid: u32,
        /// The service's command and its arguments.
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Does nothing and exits 0 (what the PID counter's short-lived processes run).
    #[command(hide = true)]
    Noop,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Noop => Ok(()),
        Command::Run { first_pid, command } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("UMS_FF_LOG")
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .init();
            if first_pid > 0 {
                let reached = pid_counter::advance_past(first_pid)?;
                tracing::info!(reached, "PID counter advanced");
            }
            let code = supervise::run(&command).await?;
            std::process::exit(code);
        }
    }
}
