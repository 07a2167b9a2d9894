use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ums_coordinator::Args::parse();
    ums_coordinator::args::init_tracing(args.log_format);
    args.run().await
}
