//! `ums-sidecar`: the runtime container's agent (`serve`) and the per-container stand-in
//! (`ambassador`). Only the command-line surface exists so far; see the README's status table.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ums-sidecar", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the sidecar HTTP API next to the nested engine (not implemented yet).
    Serve,
    /// Stand in for one original container (not implemented yet).
    Ambassador { name: String },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve => anyhow::bail!("`ums-sidecar serve` is not implemented yet (issue 3)"),
        Command::Ambassador { name } => {
            anyhow::bail!("`ums-sidecar ambassador {name}` is not implemented yet (issue 3)")
        }
    }
}
