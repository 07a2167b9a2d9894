//! `ums-certs`: writes a CA, a serving certificate for the webhook Service, a Secret manifest
//! and the CA bundle for the webhook configurations.

use std::path::PathBuf;

use clap::Parser;
use ums_certs::{generate, write_bundle, CertRequest};

#[derive(Debug, Parser)]
#[command(name = "ums-certs", version, about)]
struct Args {
    /// The webhook's Service name.
    #[arg(long, env = "UMS_WEBHOOK_SERVICE", default_value = "ums-webhook")]
    service: String,
    /// The namespace of the Service and of the Secret.
    #[arg(long, env = "UMS_WEBHOOK_NAMESPACE", default_value = "ums-system")]
    namespace: String,
    /// Name of the Secret in the written manifest.
    #[arg(long, env = "UMS_WEBHOOK_SECRET", default_value = "ums-webhook-tls")]
    secret_name: String,
    /// Extra subject alternative names, e.g. `--extra-name 127.0.0.1` to run the webhook by hand.
    #[arg(
        long = "extra-name",
        env = "UMS_CERTS_EXTRA_NAMES",
        value_delimiter = ','
    )]
    extra_names: Vec<String>,
    /// Validity in days.
    #[arg(long, env = "UMS_CERTS_DAYS", default_value_t = 365)]
    days: i64,
    /// The certificate also authenticates as a TLS client: for coordinators, which present it
    /// to their peers (mutual TLS).
    #[arg(long, env = "UMS_CERTS_CLIENT_AUTH")]
    client_auth: bool,
    /// Directory to write into (created if missing). Never commit its contents.
    #[arg(long, env = "UMS_CERTS_OUT", default_value = "certs/out")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let Args {
        service,
        namespace,
        secret_name,
        extra_names,
        days,
        client_auth,
        out,
    } = Args::parse();
    anyhow::ensure!(days > 0, "--days must be positive, got {days}");
    let bundle = generate(&CertRequest {
        service,
        namespace: namespace.clone(),
        extra_names,
        valid_for: time::Duration::days(days),
        client_auth,
    })?;
    let files = write_bundle(&bundle, &out, &secret_name, &namespace)?;
    println!(
        "serving certificate for: {}",
        bundle.server_names.join(", ")
    );
    println!("CA certificate:      {}", files.ca_cert.display());
    println!("CA key:              {}", files.ca_key.display());
    println!("serving certificate: {}", files.server_cert.display());
    println!("serving key:         {}", files.server_key.display());
    println!("Secret manifest:     {}", files.secret.display());
    println!("caBundle (base64):   {}", files.ca_bundle.display());
    Ok(())
}
