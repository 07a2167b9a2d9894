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

/// `stream` held to at most `bytes_per_second` (a migration's bandwidth cap; `None`: as fast
/// as it goes). Each piece (at most a twentieth of a second's worth, 16 KiB at least) goes
/// out once the time since the first byte covers what went before it, so the stream never
/// runs ahead of the cap by more than one piece.
pub fn paced<S>(
    stream: S,
    bytes_per_second: Option<u64>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
{
    struct Pace<S> {
        inner: std::pin::Pin<Box<S>>,
        rate: Option<u64>,
        started: Option<tokio::time::Instant>,
        sent: u64,
        pending: Bytes,
    }
    let state = Pace {
        inner: Box::pin(stream),
        rate: bytes_per_second.filter(|r| *r > 0),
        started: None,
        sent: 0,
        pending: Bytes::new(),
    };
    futures_util::stream::unfold(state, |mut state| async move {
        let Some(rate) = state.rate else {
            let item = state.inner.next().await?;
            return Some((item, state));
        };
        if state.pending.is_empty() {
            match state.inner.next().await? {
                Ok(bytes) => state.pending = bytes,
                Err(e) => return Some((Err(e), state)),
            }
        }
        let started = *state.started.get_or_insert_with(tokio::time::Instant::now);
        let due = started + std::time::Duration::from_secs_f64(state.sent as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
        let piece_len = ((rate / 20).max(16 * 1024) as usize).min(state.pending.len());
        let piece = state.pending.split_to(piece_len);
        state.sent += piece.len() as u64;
        Some((Ok(piece), state))
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(n: usize, size: usize) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
        futures_util::stream::iter((0..n).map(move |_| Ok(Bytes::from(vec![7u8; size]))))
    }

    #[tokio::test(start_paused = true)]
    async fn a_capped_stream_never_runs_ahead_of_its_rate() {
        // 1 MB at 200 kB/s: five seconds (less the last piece), every byte there, in order.
        let started = tokio::time::Instant::now();
        let out: Vec<Bytes> = paced(chunks(10, 100_000), Some(200_000))
            .map(|b| b.unwrap())
            .collect()
            .await;
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(out.iter().map(Bytes::len).sum::<usize>(), 1_000_000);
        assert!(
            out.iter().all(|b| b.len() <= 16 * 1024),
            "pieces of a twentieth of a second (16 KiB at least)"
        );
        assert!((4.9..5.0).contains(&elapsed), "{elapsed} s");
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_cap_it_goes_as_fast_as_it_goes() {
        let started = tokio::time::Instant::now();
        let out: Vec<Bytes> = paced(chunks(10, 100_000), None)
            .map(|b| b.unwrap())
            .collect()
            .await;
        assert_eq!(out.len(), 10);
        assert_eq!(started.elapsed(), std::time::Duration::ZERO);
    }
}
