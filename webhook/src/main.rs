use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ums_webhook::Args::parse();
    ums_webhook::args::init_tracing(args.log_format);
    args.run().await
}
