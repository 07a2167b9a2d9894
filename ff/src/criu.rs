//! CRIU from inside the service's container, with the least privilege it allows
//! (`--unprivileged`: CHECKPOINT_RESTORE, SETPCAP, SYS_PTRACE where Yama wants it; seccomp
//! unconfined; measured in shared/ENGINES.md).
//!
//! - The dump leaves the tree stopped (`--leave-stopped`): after a migration that failed it is
//!   resumed where it stopped (SIGCONT), with nothing to restore; after one that succeeded it is
//!   killed.
//! - The service's stdin, stdout and stderr are the container's pipes, whose other ends the
//!   runtime holds: the restore gives the restored process this container's own
//!   (`--inherit-fd fd[N]:pipe:[inode]`), so the service's log stays the container's log.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::supervise::Supervisor;

/// The CRIU binary.
const CRIU: &str = "criu";

/// A CRIU run that failed.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("cannot run criu: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("criu {action} failed (exit {code}); the end of its log {log}: {tail}")]
    Failed {
        action: &'static str,
        code: i32,
        log: String,
        tail: String,
    },
    #[error("criu restore wrote no PID to {0}")]
    NoPid(String),
}

/// What the restore needs to know of the dumped service besides CRIU's images: written as
/// `ums-ff.json` among them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DumpFacts {
    /// The service's PID (the tree's root).
    pub pid: i32,
    /// Its PIDs and TIDs.
    pub tree: Vec<i32>,
    /// Its standard descriptors that are pipes: (descriptor, `pipe:[inode]`).
    pub stdio_pipes: Vec<(i32, String)>,
}

/// The name of [`DumpFacts`]' file in the dump directory.
pub const FACTS_FILE: &str = "ums-ff.json";

/// The standard descriptors of `pid` that are pipes.
pub fn stdio_pipes(pid: i32) -> Vec<(i32, String)> {
    let mut pipes: Vec<(i32, String)> = Vec::new();
    for fd in 0..3 {
        let Ok(link) = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")) else {
            continue;
        };
        let link = link.display().to_string();
        // One mapping per pipe: stdout and stderr may be the same.
        if link.starts_with("pipe:[") && !pipes.iter().any(|(_, l)| *l == link) {
            pipes.push((fd, link));
        }
    }
    pipes
}

/// CRIU's version line (`Version: 4.2`), or why it cannot be had. Asked once, before the
/// supervisor's reaper owns `waitpid(-1)` (serve calls it first): a later `output()` would find
/// its child already reaped ("No child processes").
pub fn version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| match Command::new(CRIU).arg("--version").output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned(),
        Err(e) => format!("criu unavailable: {e}"),
    })
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(8);
    lines[from..].join(" | ")
}

/// What every CRIU call of ums-ff says: the action, unprivileged, the images' directory, the
/// log. (`-v` takes its level attached: `--verbosity 2` would be a stray argument.)
fn common_args(action: &str, dir: &Path, log: &Path) -> Vec<String> {
    vec![
        action.into(),
        "--unprivileged".into(),
        "--images-dir".into(),
        dir.display().to_string(),
        "--log-file".into(),
        log.display().to_string(),
        "--verbosity=2".into(),
    ]
}

async fn run(
    supervisor: &Supervisor,
    action: &'static str,
    args: Vec<String>,
    log: &Path,
) -> Result<(), CriuError> {
    let stderr = log.with_extension("stderr");
    let mut command = Command::new(CRIU);
    command.args(&args).stdin(Stdio::inherit());
    if action == "restore" {
        // `--inherit-fd fd[1]:pipe:[..]`: CRIU's own stdout and stderr are the container's
        // pipes the restored service writes to.
        command.stdout(Stdio::inherit()).stderr(Stdio::inherit());
    } else {
        // What CRIU says before its log is open (a bad argument) goes beside the log.
        command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr)?);
    }
    tracing::debug!(?args, "criu");
    let code = supervisor.run_to_end(command).await?;
    if code != 0 {
        let mut said = tail(log);
        if said.is_empty() {
            said = tail(&stderr);
        }
        return Err(CriuError::Failed {
            action,
            code,
            log: log.display().to_string(),
            tail: said,
        });
    }
    Ok(())
}

/// Dumps the tree of `pid` into `dir` (which exists) and leaves it stopped; what the restore
/// needs besides the images, and the dump's milliseconds.
pub async fn dump(
    supervisor: &Supervisor,
    pid: Pid,
    dir: &Path,
) -> Result<(DumpFacts, u64), CriuError> {
    let facts = DumpFacts {
        pid: pid.as_raw(),
        tree: ums_proc::process_tree(pid.as_raw() as u32)
            .into_iter()
            .map(|p| p as i32)
            .collect(),
        stdio_pipes: stdio_pipes(pid.as_raw()),
    };
    let log = dir.join("dump.log");
    let started = Instant::now();
    let mut args = common_args("dump", dir, &log);
    args.extend([
        "--tree".into(),
        pid.as_raw().to_string(),
        "--leave-stopped".into(),
        "--skip-in-flight".into(),
    ]);
    run(supervisor, "dump", args, &log).await?;
    let ms = started.elapsed().as_millis() as u64;
    Ok((facts, ms))
}

/// Lets a tree the dump left stopped run on.
pub fn resume(tree: &[i32]) -> Vec<String> {
    signal_all(tree, Signal::SIGCONT)
}

/// Ends a tree that now runs elsewhere.
pub fn kill_tree(tree: &[i32]) -> Vec<String> {
    signal_all(tree, Signal::SIGKILL)
}

fn signal_all(tree: &[i32], sig: Signal) -> Vec<String> {
    let mut problems = Vec::new();
    for pid in tree {
        if let Err(e) = kill(Pid::from_raw(*pid), sig) {
            // A thread that ended with its process is no problem.
            if e != nix::errno::Errno::ESRCH {
                problems.push(format!("{sig} to {pid}: {e}"));
            }
        }
    }
    problems
}

/// Restores the tree dumped in `dir`, detached (it becomes this process's child once CRIU
/// exits); the restored root's PID and the restore's milliseconds.
pub async fn restore(
    supervisor: &Supervisor,
    dir: &Path,
    facts: &DumpFacts,
) -> Result<(Pid, u64), CriuError> {
    let log = dir.join("restore.log");
    let pidfile: PathBuf = dir.join("restored.pid");
    let started = Instant::now();
    let mut args = common_args("restore", dir, &log);
    args.extend([
        "--restore-detached".into(),
        "--pidfile".into(),
        pidfile.display().to_string(),
    ]);
    for (fd, pipe) in &facts.stdio_pipes {
        args.push("--inherit-fd".into());
        args.push(format!("fd[{fd}]:{pipe}"));
    }
    run(supervisor, "restore", args, &log).await?;
    let text = std::fs::read_to_string(&pidfile).unwrap_or_default();
    let pid: i32 = text
        .trim()
        .parse()
        .map_err(|_| CriuError::NoPid(pidfile.display().to_string()))?;
    Ok((Pid::from_raw(pid), started.elapsed().as_millis() as u64))
}
