//! `ums-ff run` as a container runtime drives it: the service's output and exit code, the
//! signals forwarded to it, and, in a PID namespace of its own (as in a container), the PID
//! counter advanced before the service starts.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The supervisor as these tests run it: its API on a free loopback port, no pod around it
/// (no annotations file: active).
fn ums_ff() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ums-ff"));
    command
        .env("UMS_FF_LISTEN", "127.0.0.1:0")
        .env("UMS_PODINFO", "/nonexistent/annotations")
        .env("UMS_FF_WORK_DIR", std::env::temp_dir().join("ums-ff-tests"));
    command
}

#[test]
fn the_services_output_and_exit_code_are_the_containers() {
    let out = ums_ff()
        .args(["run", "--", "sh", "-c", "echo out; echo err >&2; exit 3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("err\n"));

    let killed = ums_ff()
        .args(["run", "--", "sh", "-c", "kill -KILL $$"])
        .output()
        .unwrap();
    assert_eq!(killed.status.code(), Some(137), "128 + SIGKILL");

    let missing = ums_ff()
        .args(["run", "--", "/no/such/service"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("/no/such/service"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}

#[test]
fn a_termination_signal_reaches_the_service() {
    let mut supervisor = ums_ff()
        .args([
            "run",
            "--",
            "sh",
            "-c",
            "trap 'echo got-term; exit 7' TERM; echo ready; while true; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(supervisor.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    let status = Command::new("kill")
        .args(["-TERM", &supervisor.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let until = Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(status) = supervisor.try_wait().unwrap() {
            break status.code();
        }
        assert!(Instant::now() < until, "the service did not end on TERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(7));
    assert_eq!(lines.next().unwrap().unwrap(), "got-term");
}

/// In a PID namespace of its own the supervisor is PID 1 and the counter starts low: with a
/// first PID of 300 the service's shell lives above it.
#[test]
fn the_service_starts_above_the_first_pid_in_a_fresh_pid_namespace() {
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc"])
        .arg(env!("CARGO_BIN_EXE_ums-ff"))
        .env("UMS_FF_LISTEN", "127.0.0.1:0")
        .env("UMS_PODINFO", "/nonexistent/annotations")
        .env("UMS_FF_WORK_DIR", std::env::temp_dir().join("ums-ff-tests"))
        .args(["run", "--first-pid", "300", "--", "sh", "-c", "echo $$"])
        .output()
        .expect("unshare (util-linux) runs the supervisor in a new PID namespace");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(pid > 300, "the service's PID {pid}");
}
