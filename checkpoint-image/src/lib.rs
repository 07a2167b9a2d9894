//! A container's checkpoint archive, as the kubelet writes it
//! (`checkpoint-<pod>_<namespace>-<container>-<time>.tar`: CRIU's images, the root-fs diff,
//! containerd's or CRI-O's config), turned into a **checkpoint OCI image**: one uncompressed
//! layer that is the archive itself, so its files sit at the image's root, and the manifest
//! annotation `org.criu.checkpoint.container.name` (and CRI-O's name for it) that makes
//! containerd >= 2.0 and CRI-O restore a container whose image it is, instead of starting it.
//! A pod whose container image is such an image is how a kubelet restores (KEP-2008).
//!
//! The layer is streamed to the registry as it arrives (chunked upload, digest computed on the
//! way): the archive is never held in memory or written to disk here.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt as _};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use oci_client::{Client, Reference};
use sha2::Digest as _;

/// The annotation containerd (2.x) reads to know an image is a checkpoint, with the
/// checkpointed container's name.
pub const CONTAINER_NAME_ANNOTATION: &str = "org.criu.checkpoint.container.name";
/// CRI-O's name for the same annotation.
pub const CRIO_CONTAINER_NAME_ANNOTATION: &str = "io.kubernetes.cri-o.annotations.checkpoint.name";
/// The layer: the archive as is, an uncompressed tar.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// The image configuration's media type.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// The size of each upload request to the registry.
const CHUNK: usize = 8 << 20;
/// How many chunks are read ahead while one uploads (memory: `CHUNK * (PREFETCH + 2)` at most).
const PREFETCH: usize = 2;

/// A checkpoint image could not be pushed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The target is not an image reference.
    #[error("{reference:?} is not an image reference: {message}")]
    Reference { reference: String, message: String },
    /// The archive stream failed or was empty.
    #[error("the checkpoint archive could not be read: {0}")]
    Archive(String),
    /// The registry refused or failed.
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
}

/// A pushed checkpoint image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedImage {
    /// `registry/repository@sha256:...`: what a pod's container names to be restored from it.
    pub reference: String,
    /// The manifest's digest.
    pub digest: String,
    /// The archive's size (the layer).
    pub archive_bytes: u64,
}

/// The image configuration of a checkpoint image whose one layer has `layer_digest` (its
/// `diff_id`: the layer is not compressed).
pub fn image_config(layer_digest: &str) -> Vec<u8> {
    let config = serde_json::json!({
        "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    // A map serialises with sorted keys: the same input gives the same digest.
    serde_json::to_vec(&config).unwrap_or_default()
}

/// The manifest of a checkpoint image of `container`.
pub fn manifest(container: &str, config: (&str, u64), layer: (&str, u64)) -> OciImageManifest {
    let annotations = BTreeMap::from([
        (CONTAINER_NAME_ANNOTATION.to_owned(), container.to_owned()),
        (
            CRIO_CONTAINER_NAME_ANNOTATION.to_owned(),
            container.to_owned(),
        ),
    ]);
    let descriptor = |media_type: &str, (digest, size): (&str, u64)| OciDescriptor {
        media_type: media_type.to_owned(),
        digest: digest.to_owned(),
        size: size as i64,
        urls: None,
        annotations: None,
        ..Default::default()
    };
    OciImageManifest {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_owned()),
        config: descriptor(CONFIG_MEDIA_TYPE, config),
        layers: vec![descriptor(LAYER_MEDIA_TYPE, layer)],
        subject: None,
        artifact_type: None,
        annotations: Some(annotations),
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// A registry client; `insecure` lists the registries (`host:port`) spoken to over plain HTTP.
/// With `cas` (PEM CA certificates), the registry's certificate must be signed by one of them
/// (a cluster's private registry); without, by a CA of the system's store.
///
/// The process needs a system CA store even with `cas`: oci-client 0.18 also builds a default
/// reqwest client, which panics when the store is empty (the images install ca-certificates).
pub fn client(insecure: &[String], cas: &[Vec<u8>]) -> Result<Client, ImageError> {
    let certificates: Vec<Certificate> = cas
        .iter()
        .map(|pem| Certificate {
            encoding: CertificateEncoding::Pem,
            data: pem.clone(),
        })
        .collect();
    Client::try_from(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(insecure.to_vec()),
        tls_certs_only: certificates,
        ..Default::default()
    })
    .map_err(|e| ImageError::Registry {
        registry: "(client)".into(),
        message: format!("cannot set up TLS: {e}"),
    })
}

/// Streams `archive` into the registry as the layer of a checkpoint image of `container`, then
/// pushes its configuration and manifest under `target` (`registry/repository:tag`). Returns
/// the image by digest.
pub async fn push<S, E>(
    client: &Client,
    target: &str,
    container: &str,
    archive: S,
) -> Result<PushedImage, ImageError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let reference: Reference =
        target
            .parse()
            .map_err(|e: oci_client::ParseError| ImageError::Reference {
                reference: target.to_owned(),
                message: e.to_string(),
            })?;
    let registry = reference.resolve_registry().to_owned();
    let registry_error = |e: oci_client::errors::OciDistributionError| ImageError::Registry {
        registry: registry.clone(),
        message: e.to_string(),
    };
    let layer = client
        .push_blob_stream_chunked(&reference, prefetched(rechunk(archive)))
        .await
        .map_err(|e| match e {
            oci_client::errors::OciDistributionError::PushNoDataError => {
                ImageError::Archive("it is empty".into())
            }
            oci_client::errors::OciDistributionError::GenericError(Some(m))
                if m.starts_with("archive: ") =>
            {
                ImageError::Archive(m.trim_start_matches("archive: ").to_owned())
            }
            e => registry_error(e),
        })?;
    let config = image_config(&layer.blob_digest);
    let config_digest = sha256_digest(&config);
    let config_size = config.len() as u64;
    client
        .push_blob(&reference, config, &config_digest)
        .await
        .map_err(registry_error)?;
    let manifest = manifest(
        container,
        (&config_digest, config_size),
        (&layer.blob_digest, layer.size),
    );
    let body = serde_json::to_vec(&manifest).map_err(|e| ImageError::Registry {
        registry: registry.clone(),
        message: e.to_string(),
    })?;
    let digest = sha256_digest(&body);
    client
        .push_manifest_raw(
            &reference,
            body,
            OCI_IMAGE_MEDIA_TYPE
                .parse()
                .map_err(|_| ImageError::Archive("bad media type".into()))?,
        )
        .await
        .map_err(registry_error)?;
    let repository = format!("{registry}/{}", reference.repository());
    tracing::info!(image = %repository, %digest, bytes = layer.size, %container, "checkpoint image pushed");
    Ok(PushedImage {
        reference: format!("{repository}@{digest}"),
        digest,
        archive_bytes: layer.size,
    })
}

/// Reads the next chunks while one is being uploaded (at most [`PREFETCH`] waiting): the
/// archive's sender and the registry work at the same time instead of in turns.
fn prefetched<S>(
    chunks: S,
) -> impl Stream<Item = oci_client::errors::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = oci_client::errors::Result<Bytes>> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(PREFETCH);
    tokio::spawn(async move {
        let mut chunks = Box::pin(chunks);
        while let Some(chunk) = chunks.next().await {
            let failed = chunk.is_err();
            // The upload gave up (its receiver is gone) or the archive failed: stop reading.
            if sender.send(chunk).await.is_err() || failed {
                break;
            }
        }
    });
    futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|chunk| (chunk, receiver))
    })
}

/// Groups the archive's pieces into upload requests of [`CHUNK`] bytes (one request per
/// network read would be thousands of requests).
fn rechunk<S, E>(
    archive: S,
) -> impl Stream<Item = oci_client::errors::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    futures_util::stream::unfold(
        (Box::pin(archive), false),
        |(mut archive, done)| async move {
            if done {
                return None;
            }
            let mut buffer = BytesMut::new();
            loop {
                match archive.next().await {
                    Some(Ok(piece)) => {
                        buffer.extend_from_slice(&piece);
                        if buffer.len() >= CHUNK {
                            return Some((Ok(buffer.freeze()), (archive, false)));
                        }
                    }
                    Some(Err(e)) => {
                        let error = oci_client::errors::OciDistributionError::GenericError(Some(
                            format!("archive: {e}"),
                        ));
                        return Some((Err(error), (archive, true)));
                    }
                    None if buffer.is_empty() => return None,
                    None => return Some((Ok(buffer.freeze()), (archive, true))),
                }
            }
        },
    )
}

/// What a registry says of an image reference (`lookup`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// It exists: its manifest's digest.
    Found(String),
    /// The registry answered that it has no such image (or repository).
    NotFound(String),
    /// The registry asks for credentials this client does not have.
    Unauthorized(String),
    /// No answer that says either (unreachable, TLS, a server error, not a reference).
    Unknown(String),
}

/// Asks the registry of `reference` whether it has the image (a manifest `HEAD`, anonymous),
/// as a node would before it pulls it.
pub async fn lookup(client: &Client, reference: &str) -> Lookup {
    use oci_client::errors::{OciDistributionError as E, OciErrorCode};
    let parsed: Reference = match reference.parse() {
        Ok(r) => r,
        Err(e) => return Lookup::Unknown(format!("not an image reference: {e}")),
    };
    match client
        .fetch_manifest_digest(&parsed, &oci_client::secrets::RegistryAuth::Anonymous)
        .await
    {
        Ok(digest) => Lookup::Found(digest),
        Err(E::ImageManifestNotFoundError(m)) => Lookup::NotFound(m),
        Err(E::RegistryError { envelope, url })
            if envelope.errors.iter().any(|e| {
                matches!(
                    e.code,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                )
            }) =>
        {
            Lookup::NotFound(format!("{url}: {envelope}"))
        }
        Err(e @ (E::UnauthorizedError { .. } | E::AuthenticationFailure(_))) => {
            Lookup::Unauthorized(e.to_string())
        }
        Err(E::RegistryError { envelope, url })
            if envelope
                .errors
                .iter()
                .any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)) =>
        {
            Lookup::Unauthorized(format!("{url}: {envelope}"))
        }
        Err(E::ServerError { code: 404, url, .. }) => Lookup::NotFound(format!("{url}: 404")),
        Err(e) => {
            // The whole chain: "error sending request" alone says nothing.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                text.push_str(&format!(": {inner}"));
                source = inner.source();
            }
            Lookup::Unknown(text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_names_the_container_for_containerd_and_cri_o() {
        let config = image_config("sha256:aa");
        let config_digest = sha256_digest(&config);
        let m = manifest(
            "main",
            (&config_digest, config.len() as u64),
            ("sha256:aa", 42),
        );
        let json = serde_json::to_value(&m).unwrap_or_default();
        assert_eq!(json["annotations"][CONTAINER_NAME_ANNOTATION], "main");
        assert_eq!(json["annotations"][CRIO_CONTAINER_NAME_ANNOTATION], "main");
        assert_eq!(json["layers"][0]["mediaType"], LAYER_MEDIA_TYPE);
        assert_eq!(json["layers"][0]["size"], 42);
        assert_eq!(json["config"]["digest"], config_digest);
        let config: serde_json::Value = serde_json::from_slice(&config).unwrap_or_default();
        assert_eq!(config["rootfs"]["diff_ids"][0], "sha256:aa");
        assert_eq!(config["os"], "linux");
    }

    #[tokio::test]
    async fn pieces_are_grouped_into_upload_chunks() {
        let pieces: Vec<Result<Bytes, std::io::Error>> = (0..5)
            .map(|_| Ok(Bytes::from(vec![7u8; CHUNK / 2 + 1])))
            .collect();
        let chunks: Vec<_> = rechunk(futures_util::stream::iter(pieces)).collect().await;
        let sizes: Vec<usize> = chunks
            .iter()
            .map(|c| c.as_ref().map_or(0, |b| b.len()))
            .collect();
        assert_eq!(sizes, vec![CHUNK + 2, CHUNK + 2, CHUNK / 2 + 1]);
    }

    #[tokio::test]
    async fn a_failing_archive_ends_the_stream_with_its_error() {
        let pieces: Vec<Result<Bytes, String>> = vec![
            Ok(Bytes::from_static(b"abc")),
            Err("connection reset".into()),
        ];
        let chunks: Vec<_> = rechunk(futures_util::stream::iter(pieces)).collect().await;
        assert_eq!(chunks.len(), 1);
        let error = chunks[0]
            .as_ref()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("archive: connection reset"), "{error}");
    }
}
