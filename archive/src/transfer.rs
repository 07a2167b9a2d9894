//! An archive on the wire, as both ends of a migration move it: the sender writes the tar
//! (optionally zstd) from a blocking task into a pipe whose other end is an HTTP request body,
//! so nothing is staged on disk; the receiver reads the request body as a blocking reader and,
//! once it stops reading (the restore failed), drains the rest so that the sender hears the
//! answer instead of a broken pipe.

use std::io::Write as _;
use ums_contract::agent::error_chain;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use tokio_util::io::{ReaderStream, StreamReader, SyncIoBridge};

use crate::pack::{write_archive, PlannedEntry};
use crate::Manifest;

/// The archive of `manifest` and `plan` as a byte stream, and the task writing it (its
/// answer: the archive's bytes before compression, or what failed).
pub fn stream(
    manifest: Manifest,
    plan: Vec<PlannedEntry>,
    zstd_level: Option<i32>,
) -> (
    impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    tokio::task::JoinHandle<Result<u64, String>>,
) {
    let (reader, writer) = tokio::io::duplex(1 << 20);
    let writer_task = tokio::task::spawn_blocking(move || {
        let bridge = SyncIoBridge::new(writer);
        let mut bridge = match zstd_level {
            Some(level) => {
                let mut encoder =
                    zstd::stream::write::Encoder::new(bridge, level).map_err(|e| e.to_string())?;
                let n =
                    write_archive(&mut encoder, &manifest, &plan).map_err(|e| error_chain(&e))?;
                let mut bridge = encoder.finish().map_err(|e| e.to_string())?;
                bridge.flush().map_err(|e| e.to_string())?;
                bridge.shutdown().map_err(|e| e.to_string())?;
                return Ok(n);
            }
            None => bridge,
        };
        let n = write_archive(&mut bridge, &manifest, &plan).map_err(|e| error_chain(&e))?;
        bridge.flush().map_err(|e| e.to_string())?;
        bridge.shutdown().map_err(|e| e.to_string())?;
        Ok(n)
    });
    (ReaderStream::with_capacity(reader, 1 << 20), writer_task)
}

/// A blocking reader over a request body, and the task that feeds it: once the reader is
/// dropped (the restore stopped) the task reads and discards the rest of the body, answering
/// how many bytes it discarded.
pub fn drained_reader<S, E>(
    mut data: S,
) -> (
    SyncIoBridge<impl tokio::io::AsyncRead + Unpin>,
    tokio::task::JoinHandle<u64>,
)
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    let pump = tokio::spawn(async move {
        let mut discarded = 0u64;
        let mut forwarding = true;
        while let Some(chunk) = data.next().await {
            if forwarding {
                if tx.send(chunk.map_err(std::io::Error::other)).await.is_err() {
                    forwarding = false;
                }
            } else {
                match chunk {
                    Ok(bytes) => discarded += bytes.len() as u64,
                    Err(_) => break,
                }
            }
        }
        discarded
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    (SyncIoBridge::new(StreamReader::new(stream)), pump)
}
