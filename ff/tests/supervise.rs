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

/// One HTTP/1.1 GET on plain HTTP: (status, body).
fn get(address: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The pod's annotations as the downward API writes them, for a container `app` whose
/// readiness is a command, whose liveness a TCP port nothing listens on.
fn write_podinfo(file: &std::path::Path, start_mode: &str, ready_file: &std::path::Path) {
    use k8s_openapi::api::core::v1::{Container, ExecAction, Probe, TCPSocketAction};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let app = Container {
        name: "app".into(),
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec![
                    "test".into(),
                    "-f".into(),
                    ready_file.display().to_string(),
                ]),
            }),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(closed.into()),
                host: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let annotations = std::collections::BTreeMap::from([
        (
            "migration-containers".to_owned(),
            ums_contract::annotations::encode_containers(&[app]),
        ),
        ("migration-start-mode".to_owned(), start_mode.to_owned()),
    ]);
    let text = ums_contract::podinfo::format_podinfo(&annotations);
    let temporary = file.with_extension("new");
    std::fs::write(&temporary, text).unwrap();
    std::fs::rename(&temporary, file).unwrap();
}

/// `ums-ff run [options] -- <a service that runs until stopped>` as container `app` of the pod
/// whose annotations are `podinfo`; the supervisor and the address its API listens on.
fn supervise_app(podinfo: &std::path::Path, options: &[&str]) -> (std::process::Child, String) {
    let mut supervisor = ums_ff()
        .env("UMS_PODINFO", podinfo)
        .env("UMS_FF_CONTAINER", "app")
        .arg("run")
        .args(options)
        .args(["--", "sh", "-c", "while true; do sleep 0.1; done"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(supervisor.stderr.take().unwrap()).lines();
    let address = loop {
        let line = log.next().unwrap().unwrap();
        if let Some(rest) = line.split_once("listen=").map(|(_, r)| r) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || log.for_each(drop));
    (supervisor, address)
}

/// The kubelet's probes, redirected to ums-ff by the webhook: ready while a passive pod waits
/// for its restore (nothing runs), then the service's own probes decide: a command run in the
/// container, a TCP connect.
#[test]
fn the_kubelets_probes_are_the_services_own_once_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let podinfo = dir.path().join("annotations");
    let ready = dir.path().join("ready");
    write_podinfo(&podinfo, "passive", &ready);
    let (mut supervisor, address) = supervise_app(&podinfo, &[]);

    assert_eq!(get(&address, "/probe/app?kind=readiness").0, 204, "waiting");
    assert_eq!(get(&address, "/probe/app?kind=liveness").0, 204, "waiting");
    assert_eq!(get(&address, "/probe/web?kind=readiness").0, 404);

    write_podinfo(&podinfo, "active", &ready);
    let until = Instant::now() + Duration::from_secs(20);
    while get(&address, "/probe/app").0 != 200 {
        assert!(Instant::now() < until, "the service did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = get(&address, "/probe/app?kind=readiness");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("test exited with 1"), "{body}");
    std::fs::write(&ready, "").unwrap();
    let (status, body) = get(&address, "/probe/app?kind=readiness");
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(&address, "/probe/app?kind=liveness");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("connect 127.0.0.1:"), "{body}");
    // A kind the container has no probe of: the service runs.
    assert_eq!(get(&address, "/probe/app?kind=startup").0, 200);

    // TERM reaches the service, which ends, and the supervisor with it.
    terminate(&mut supervisor);
}

/// Sends TERM to the supervisor and waits (20 s at most) for it to end with its service.
fn terminate(supervisor: &mut std::process::Child) {
    let term = Command::new("kill")
        .args(["-TERM", &supervisor.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let until = Instant::now() + Duration::from_secs(20);
    while supervisor.try_wait().unwrap().is_none() {
        if Instant::now() > until {
            let _ = supervisor.kill();
            panic!("the supervisor did not end on TERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An active pod is never ready before its service runs: from its first answer on, ums-ff is
/// starting (or running), not waiting, so the kubelet cannot see the passive copy's 204.
#[test]
fn an_active_pod_is_not_ready_before_its_service_runs() {
    let dir = tempfile::tempdir().unwrap();
    let podinfo = dir.path().join("annotations");
    // Its readiness: a file that never exists.
    write_podinfo(&podinfo, "active", &dir.path().join("never"));
    let (mut supervisor, address) = supervise_app(&podinfo, &["--first-pid", "1"]);
    let (status, body) = get(&address, "/probe/app?kind=readiness");
    assert_eq!(status, 503, "{body}");
    let (_, health) = get(&address, "/healthz");
    assert!(!health.contains("\"waiting\""), "{health}");
    // A TERM right at the service's start (before it leads its own group) still ends it.
    terminate(&mut supervisor);
}
