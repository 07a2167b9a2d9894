//! Post-copy (CRIU lazy pages): the destination resumes the processes before their memory has
//! arrived; each page comes on its first touch (userfaultfd), the rest in the background.
//!
//! - Source: runc reads [`RUNC_CRIU_CONFIG`] on every checkpoint; with `lazy-pages`, `address
//!   127.0.0.1` and a port in it, the engine's checkpoint writes every image but the memory
//!   and CRIU then serves the pages on that loopback port until all have been fetched (the
//!   engine's checkpoint call returns only then). CRIU unfreezes the source processes if the
//!   page stream breaks before the last page, and kills them once it has been delivered.
//! - Between the sidecars the pages ride the migration's own connection (pinned TLS, the
//!   peer's token): the source opens `POST /restore/pages/{migrationId}` and the two bodies,
//!   request and response, carry CRIU's page-server protocol both ways ([`carry_pages`],
//!   [`serve_pages`]).
//! - Destination: a `criu lazy-pages` daemon ([`LazyDaemon`]) reads the images that arrived,
//!   connects to a loopback port of this sidecar (which joins it to the source's stream) and
//!   waits on `lazy-pages.socket` in its work directory; the engine's restore, told by
//!   [`RUNC_CRIU_CONFIG`] (`lazy-pages`, `work-dir`) to restore lazily, hands the process's
//!   userfaultfd to it and returns with the process running.
//!
//! CRIU's page server makes a 4 MiB pipe; without CAP_SYS_RESOURCE that needs
//! `fs.pipe-max-size` >= 4 MiB, else the first page request fails ([`lazy_pages_possible`];
//! docs/state-paths.md).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::io::ReaderStream;

pub use crate::tcp::RUNC_CRIU_CONFIG;

/// The pipe size CRIU's page server asks for (`PIPE_MAX_SIZE` pages of 4 KiB).
pub const PIPE_SIZE_NEEDED: u64 = 4 << 20;
const PIPE_MAX_SIZE: &str = "/proc/sys/fs/pipe-max-size";
/// CAP_SYS_RESOURCE's bit in `CapEff`.
const CAP_SYS_RESOURCE: u32 = 24;

/// Errors of the post-copy machinery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PostCopyError {
    #[error("failed to {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CRIU's lazy-pages daemon {0}")]
    Daemon(String),
}

impl PostCopyError {
    fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        PostCopyError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Whether CRIU's page server can work here: CAP_SYS_RESOURCE, or `fs.pipe-max-size` of at
/// least 4 MiB. The reason if not.
pub fn lazy_pages_possible() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let has_resource = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0);
    if has_resource {
        return Ok(());
    }
    let size: u64 = std::fs::read_to_string(PIPE_MAX_SIZE)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if size >= PIPE_SIZE_NEEDED {
        Ok(())
    } else {
        Err(format!(
            "post-copy needs CAP_SYS_RESOURCE or {PIPE_MAX_SIZE} >= {PIPE_SIZE_NEEDED} (it is {size}): CRIU's page server makes a 4 MiB pipe. Run the runtime container privileged, or set the node's sysctl fs.pipe-max-size=4194304"
        ))
    }
}

/// A free loopback port (bound, then released for CRIU to take).
pub fn free_loopback_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Destination side: the lazy-pages daemons' connections, each waiting for the source's page
/// stream of the same migration.
#[derive(Debug, Default)]
pub struct PageTunnels {
    slots: Mutex<HashMap<String, Slot>>,
}

#[derive(Debug, Default)]
struct Slot {
    sender: Option<oneshot::Sender<TcpStream>>,
    receiver: Option<oneshot::Receiver<TcpStream>>,
    progress: std::sync::Arc<StreamProgress>,
}

/// How the source's page stream of one migration goes, for the restore that waits on it.
#[derive(Debug)]
pub struct StreamProgress {
    /// When bytes last came from the source (or the restore began).
    last: Mutex<std::time::Instant>,
    /// Why the stream ended, once it has.
    ended: Mutex<Option<String>>,
}

impl Default for StreamProgress {
    fn default() -> Self {
        StreamProgress {
            last: Mutex::new(std::time::Instant::now()),
            ended: Mutex::new(None),
        }
    }
}

impl StreamProgress {
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
    }

    fn end(&self, why: String) {
        self.ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(why);
    }

    fn idle(&self) -> Duration {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    fn ended(&self) -> Option<String> {
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A page stream that brings nothing for this long has failed (the daemon pulls the pages
/// without pause until the last).
const STREAM_STALL: Duration = Duration::from_secs(30);

impl PageTunnels {
    fn with_slot<T>(&self, id: &str, f: impl FnOnce(&mut Slot) -> T) -> T {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots.entry(id.to_owned()).or_insert_with(|| {
            let (sender, receiver) = oneshot::channel();
            Slot {
                sender: Some(sender),
                receiver: Some(receiver),
                progress: Default::default(),
            }
        });
        f(slot)
    }

    fn sender(&self, id: &str) -> Option<oneshot::Sender<TcpStream>> {
        self.with_slot(id, |s| s.sender.take())
    }

    fn progress(&self, id: &str) -> std::sync::Arc<StreamProgress> {
        self.with_slot(id, |s| s.progress.clone())
    }

    /// The daemon's connection for migration `id`, once it has connected.
    pub fn receiver(&self, id: &str) -> Option<oneshot::Receiver<TcpStream>> {
        self.with_slot(id, |s| s.receiver.take())
    }

    /// Forgets migration `id` (its restore is over).
    pub fn forget(&self, id: &str) {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// Destination side: one restore's `criu lazy-pages` daemon. Killed, its directory removed and
/// its migration's page stream forgotten on drop.
#[derive(Debug)]
pub struct LazyDaemon {
    child: tokio::process::Child,
    dir: PathBuf,
    work: PathBuf,
    accept: tokio::task::JoinHandle<()>,
    progress: std::sync::Arc<StreamProgress>,
    tunnels: std::sync::Arc<PageTunnels>,
    id: String,
}

impl LazyDaemon {
    /// Starts the daemon for migration `id` on a copy of `images` (the non-memory images that
    /// arrived), under `root`; returns once it waits for the restore.
    pub async fn start(
        root: &Path,
        id: &str,
        images: &Path,
        tunnels: std::sync::Arc<PageTunnels>,
    ) -> Result<Self, PostCopyError> {
        let dir = root
            .join("ums-lazy")
            .join(crate::checkpoint::file_safe_id(id));
        let copy = dir.join("images");
        let work = dir.join("work");
        let _ = std::fs::remove_dir_all(&dir);
        for d in [&copy, &work] {
            std::fs::create_dir_all(d).map_err(|e| PostCopyError::io("create", d, e))?;
        }
        crate::engine::files::copy_files(images, &copy)
            .map_err(|e| PostCopyError::io("copy the CRIU images from", images, e))?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| PostCopyError::io("bind", "127.0.0.1:0", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| PostCopyError::io("bind", "127.0.0.1:0", e))?
            .port();
        let sender = tunnels.sender(id);
        let progress = tunnels.progress(id);
        progress.touch();
        let accept = tokio::spawn(async move {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    if let Some(sender) = sender {
                        let _ = sender.send(stream);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "lazy-pages daemon's connection not accepted"),
            }
        });
        let spawned = tokio::process::Command::new("criu")
            .arg("lazy-pages")
            .arg("--page-server")
            .args(["--address", "127.0.0.1", "--port", &port.to_string()])
            .arg("--images-dir")
            .arg(&copy)
            .arg("--work-dir")
            .arg(&work)
            .args(["--log-file", "lazy-pages.log", "-v2"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                accept.abort();
                tunnels.forget(id);
                return Err(PostCopyError::io("run", "criu lazy-pages", e));
            }
        };
        let mut daemon = LazyDaemon {
            child,
            dir,
            work,
            accept,
            progress,
            tunnels,
            id: id.to_owned(),
        };
        let socket = daemon.work.join("lazy-pages.socket");
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                return Err(PostCopyError::Daemon(format!(
                    "exited ({status}) before it was ready: {}",
                    daemon.log_tail()
                )));
            }
            if tokio::time::Instant::now() > until {
                return Err(PostCopyError::Daemon(format!(
                    "made no {} in 10 s: {}",
                    socket.display(),
                    daemon.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(daemon)
    }

    /// Tells the engine's restore, through [`RUNC_CRIU_CONFIG`], to restore lazily from this
    /// daemon (`lazy-pages`, its `work-dir`), until dropped.
    pub fn configure_restore(&self) -> std::io::Result<crate::tcp::CriuConfigOverride> {
        crate::tcp::CriuConfigOverride::set(
            Path::new(RUNC_CRIU_CONFIG),
            &["lazy-pages", &format!("work-dir {}", self.work.display())],
        )
    }

    /// Waits until every page has been delivered (the daemon exits 0). The source's stream
    /// ending first, or bringing nothing for [`STREAM_STALL`], is a failure: the daemon is
    /// killed (the pages it lacks will not come).
    pub async fn finish(mut self) -> Result<(), PostCopyError> {
        let mut grace: Option<tokio::time::Instant> = None;
        let status = loop {
            match tokio::time::timeout(Duration::from_millis(200), self.child.wait()).await {
                Ok(status) => {
                    break status
                        .map_err(|e| PostCopyError::io("wait for", "criu lazy-pages", e))?
                }
                Err(_) => {
                    // A stream that ended may still be followed by the daemon's own exit.
                    if let Some(why) = self.progress.ended() {
                        let until = *grace.get_or_insert_with(|| {
                            tokio::time::Instant::now() + Duration::from_secs(2)
                        });
                        if tokio::time::Instant::now() > until {
                            let _ = self.child.kill().await;
                            return Err(PostCopyError::Daemon(format!(
                                "lost the source's page stream ({why}) before every page arrived"
                            )));
                        }
                    } else if self.progress.idle() > STREAM_STALL {
                        let _ = self.child.kill().await;
                        return Err(PostCopyError::Daemon(format!(
                            "got no page from the source for {} s",
                            STREAM_STALL.as_secs()
                        )));
                    }
                }
            }
        };
        if status.success() {
            Ok(())
        } else {
            Err(PostCopyError::Daemon(format!(
                "failed ({status}) before every page arrived: {}",
                self.log_tail()
            )))
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.work.join("lazy-pages.log")).unwrap_or_default();
        log_tail(&log)
    }
}

impl Drop for LazyDaemon {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        self.accept.abort();
        self.tunnels.forget(&self.id);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The last error lines of a CRIU log (or its last lines).
pub fn log_tail(log: &str) -> String {
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("Error")).collect();
    let lines: Vec<&str> = if errors.is_empty() {
        log.lines().collect()
    } else {
        errors
    };
    if lines.is_empty() {
        return "(no log)".into();
    }
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

/// Source side: the CRIU configuration of one lazy dump (`lazy-pages`, its page server on a
/// free loopback port), in force until dropped.
#[derive(Debug)]
pub struct LazyDumpConfig {
    pub page_server: SocketAddr,
    _config: crate::tcp::CriuConfigOverride,
}

impl LazyDumpConfig {
    pub fn set() -> std::io::Result<Self> {
        let port = free_loopback_port()?;
        let config = crate::tcp::CriuConfigOverride::set(
            Path::new(RUNC_CRIU_CONFIG),
            &["lazy-pages", "address 127.0.0.1", &format!("port {port}")],
        )?;
        Ok(LazyDumpConfig {
            page_server: SocketAddr::from(([127, 0, 0, 1], port)),
            _config: config,
        })
    }
}

/// Source side: waits until the lazy dump whose CRIU log is `log` serves its pages. The
/// engine's checkpoint call (`done`) ending first is a failure (its error, or the log's).
pub async fn wait_until_serving(
    log: &Path,
    done: &mut tokio::task::JoinHandle<Result<(), String>>,
) -> Result<(), String> {
    let until = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("Starting lazy pages server") {
            return Ok(());
        }
        if done.is_finished() {
            let outcome = done.await.map_err(|e| e.to_string()).and_then(|r| r);
            return Err(match outcome {
                Err(e) => format!("{e}; CRIU's log: {}", log_tail(&text)),
                Ok(()) => format!(
                    "the checkpoint ended without serving pages lazily ({RUNC_CRIU_CONFIG} not read?)"
                ),
            });
        }
        if tokio::time::Instant::now() > until {
            kill_criu();
            return Err("CRIU did not start serving pages in 300 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Destination side of `POST /restore/pages/{id}`: joins the source's stream (`body`) to the
/// daemon's connection; the returned stream is what the daemon sends back.
pub async fn serve_pages(
    tunnels: &PageTunnels,
    id: &str,
    body: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
) -> Result<impl Stream<Item = std::io::Result<Bytes>> + Send + 'static, String> {
    let receiver = tunnels
        .receiver(id)
        .ok_or_else(|| format!("the pages of migration {id:?} are already being carried"))?;
    let progress = tunnels.progress(id);
    let stream = tokio::time::timeout(Duration::from_secs(120), receiver)
        .await
        .map_err(|_| format!("no lazy-pages daemon of migration {id:?} connected in 120 s"))?
        .map_err(|_| format!("migration {id:?} has no lazy restore here"))?;
    let (reader, mut writer) = stream.into_split();
    tokio::spawn(async move {
        let mut body = std::pin::pin!(body);
        let why = loop {
            match body.next().await {
                Some(Ok(bytes)) => {
                    progress.touch();
                    if let Err(e) = writer.write_all(&bytes).await {
                        break format!("the lazy-pages daemon's connection: {e}");
                    }
                }
                Some(Err(e)) => break format!("the source's page stream broke: {e}"),
                None => break "the source closed the page stream".to_owned(),
            }
        };
        tracing::info!(reason = %why, "page stream ended");
        progress.end(why);
        let _ = writer.shutdown().await;
    });
    Ok(ReaderStream::with_capacity(reader, 256 << 10))
}

/// Source side: carries CRIU's page server (`page_server`, loopback) to the destination's
/// `url` until `verdict` says how the restore ended. Returns the bytes sent.
///
/// CRIU's lazy page server takes a clean end of its connection for "every page fetched" and
/// then kills the source processes; a reset makes it give up and thaw them. So the end CRIU
/// sees is decided here, never by the stream: a clean end (FIN) only when `verdict` is `true`
/// (the destination confirmed every page arrived), a reset on anything else.
pub async fn carry_pages(
    http: reqwest::Client,
    url: String,
    token: Option<String>,
    page_server: SocketAddr,
    verdict: oneshot::Receiver<bool>,
) -> Result<u64, String> {
    use tokio::io::AsyncReadExt as _;
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match TcpStream::connect(page_server).await {
            Ok(s) => break s,
            Err(e) if tokio::time::Instant::now() > until => {
                return Err(format!("CRIU's page server {page_server} refused: {e}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let _ = stream.set_nodelay(true);
    // Any close but the agreed one is a reset.
    stream
        .set_zero_linger()
        .map_err(|e| format!("SO_LINGER on the page server connection: {e}"))?;
    let (to_destination, body) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(8);
    let mut to_destination = Some(to_destination);
    let body = futures_util::stream::unfold(body, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut request = http
        .post(url)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(body));
    if let Some(t) = &token {
        request = request.bearer_auth(t);
    }
    let response = request.send();
    tokio::pin!(response);
    tokio::pin!(verdict);
    let mut back: Option<std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>> =
        None;
    let mut waiting_response = true;
    let mut problem: Option<String> = None;
    let mut sent = 0u64;
    let mut buf = vec![0u8; 256 << 10];
    let (mut criu_read, mut criu_write) = stream.split();
    let mut criu_open = true;
    let confirmed = loop {
        tokio::select! {
            read = criu_read.read(&mut buf), if criu_open => match read {
                Ok(0) | Err(_) => {
                    criu_open = false;
                    to_destination = None;
                }
                Ok(n) => {
                    sent += n as u64;
                    if let Some(tx) = &to_destination {
                        if tx.send(Ok(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                            to_destination = None;
                        }
                    }
                }
            },
            answered = &mut response, if waiting_response => {
                waiting_response = false;
                match answered {
                    Ok(r) if r.status().is_success() => back = Some(Box::pin(r.bytes_stream())),
                    Ok(r) => {
                        let status = r.status();
                        problem = Some(format!("destination refused the page stream: {status}"));
                    }
                    Err(e) => problem = Some(format!("page stream to the destination: {}", crate::error::chain(&e))),
                }
            },
            chunk = async { back.as_mut().expect("guarded").next().await }, if back.is_some() => match chunk {
                Some(Ok(bytes)) => {
                    if criu_write.write_all(&bytes).await.is_err() {
                        back = None;
                    }
                }
                Some(Err(e)) => {
                    problem = Some(format!("page stream broke: {}", crate::error::chain(&e)));
                    back = None;
                }
                None => back = None,
            },
            decided = &mut verdict => break decided.unwrap_or(false),
        }
    };
    drop(to_destination);
    if !confirmed {
        drop(stream);
        return Err(problem.unwrap_or_else(|| "the restore did not confirm every page".into()));
    }
    // Every page arrived: a clean end, then wait for CRIU to close its side.
    let _ = criu_write.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(n) = criu_read.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    Ok(sent)
}

/// Source side: kills CRIU processes of this runtime container (a lazy dump whose pages will
/// never be fetched waits forever; killed, it leaves the processes frozen for the rollback to
/// thaw). Returns how many were signalled.
pub fn kill_criu() -> usize {
    let mut killed = 0;
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.trim() == "criu"
                && nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .is_ok()
            {
                killed += 1;
            }
        }
    }
    killed
}
