//! Established TCP connections of a container's processes, read from `/proc`: the migration
//! must carry them (same addresses at the destination) or close them, and says how many.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};

pub use ums_archive::TcpConnection;

/// What a restore does with the connections of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcpRestore {
    /// The checkpoint has none.
    None,
    /// Every connection's local address exists here: restored established.
    Kept,
    /// Restored closed (the peer sees the connection end).
    Closed,
}

/// Socket inodes open in the given processes.
fn socket_inodes(pids: &[u32]) -> BTreeSet<u64> {
    let mut inodes = BTreeSet::new();
    for pid in pids {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let target = target.to_string_lossy();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']'))
                {
                    if let Ok(inode) = inode.parse() {
                        inodes.insert(inode);
                    }
                }
            }
        }
    }
    inodes
}

/// Parses `0100007F:4E1F` (IPv4) or a 32-hex-digit IPv6 address with its port, as
/// `/proc/net/tcp{,6}` prints them (address words in host byte order).
fn parse_address(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(address, 16).ok()?.to_le_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(&address[i * 8..i * 8 + 8], 16).ok()?;
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The ESTABLISHED entries of a `/proc/net/tcp`-format table whose inode is in `inodes`.
pub fn parse_table(table: &str, inodes: &BTreeSet<u64>) -> Vec<TcpConnection> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state, inode) = (
                fields.get(1)?,
                fields.get(2)?,
                fields.get(3)?,
                fields.get(9)?,
            );
            if *state != "01" || !inodes.contains(&inode.parse().ok()?) {
                return None;
            }
            Some(TcpConnection {
                local: parse_address(local)?,
                remote: parse_address(remote)?,
            })
        })
        .collect()
}

/// The established TCP connections held by the container whose init process is `init_pid`.
pub fn established_connections(init_pid: u32) -> Vec<TcpConnection> {
    let inodes = socket_inodes(&ums_proc::process_tree(init_pid));
    if inodes.is_empty() {
        return Vec::new();
    }
    let mut connections = Vec::new();
    for table in ["tcp", "tcp6"] {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{init_pid}/net/{table}")) {
            connections.extend(parse_table(&text, &inodes));
        }
    }
    connections
}

pub use ums_proc::local_addresses;

/// The local addresses of `connections` that this network namespace lacks.
pub fn missing_local_addresses(
    connections: &[TcpConnection],
    here: &BTreeSet<IpAddr>,
) -> BTreeSet<IpAddr> {
    connections
        .iter()
        .map(|c| c.local.ip())
        .filter(|ip| !here.contains(ip))
        .collect()
}

/// Failure to prepare the restore of closed connections.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClosedRestoreError {
    /// The `ip_nonlocal_bind` sysctl could not be read or written.
    #[error("failed to set {path} for the restore of closed TCP connections: {source}")]
    Sysctl {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// CRIU's configuration file could not be written.
    #[error("failed to add tcp-close to {RUNC_CRIU_CONFIG}: {0}")]
    CriuConfig(#[source] std::io::Error),
}

/// What restoring connections *closed* needs, for both engines, held for one restore and
/// undone on drop:
/// - non-local binds (`ip_nonlocal_bind` in the pod's network namespace): CRIU binds each
///   socket back to its old local address (the source pod's IP) before it closes it, and that
///   address does not exist here. Adding the address to an interface would make it local and
///   break this pod's own traffic to the source (the migration's connection); the sysctl
///   changes no route.
/// - `tcp-close` in the CRIU configuration runc reads: neither Docker's API nor libpod's REST
///   restore can ask for it (libpod silently ignores a `tcpClose` parameter).
#[derive(Debug)]
pub struct ClosedRestore {
    sysctls: Vec<(&'static str, String)>,
    _criu_config: Option<CriuConfigOverride>,
}

impl ClosedRestore {
    /// Prepares the restore of `connections`, whose local addresses (some of them) are not in
    /// `here`.
    pub fn prepare(
        connections: &[TcpConnection],
        here: &BTreeSet<IpAddr>,
    ) -> Result<Self, ClosedRestoreError> {
        let missing = missing_local_addresses(connections, here);
        let mut prepared = ClosedRestore {
            sysctls: Vec::new(),
            _criu_config: None,
        };
        let mut paths = Vec::new();
        if missing.iter().any(IpAddr::is_ipv4) {
            paths.push("/proc/sys/net/ipv4/ip_nonlocal_bind");
        }
        if missing.iter().any(IpAddr::is_ipv6) {
            paths.push("/proc/sys/net/ipv6/ip_nonlocal_bind");
        }
        for path in paths {
            let old = std::fs::read_to_string(path)
                .map_err(|source| ClosedRestoreError::Sysctl { path, source })?;
            std::fs::write(path, "1")
                .map_err(|source| ClosedRestoreError::Sysctl { path, source })?;
            tracing::debug!(path, "non-local binds allowed for closed TCP connections");
            prepared.sysctls.push((path, old.trim().to_owned()));
        }
        prepared._criu_config = Some(
            CriuConfigOverride::set(std::path::Path::new(RUNC_CRIU_CONFIG), &["tcp-close"])
                .map_err(ClosedRestoreError::CriuConfig)?,
        );
        Ok(prepared)
    }
}

impl Drop for ClosedRestore {
    fn drop(&mut self) {
        for (path, old) in &self.sysctls {
            if let Err(e) = std::fs::write(path, old) {
                tracing::warn!(path, error = %e, "failed to restore a sysctl");
            }
        }
    }
}

/// The CRIU configuration file runc reads on every checkpoint and restore (CRIU's options that
/// the engines' APIs do not expose go here).
pub const RUNC_CRIU_CONFIG: &str = "/etc/criu/runc.conf";

/// Whether a CRIU configuration file sets `option` (a line of its own, `#` comments ignored).
pub fn criu_config_has(path: &std::path::Path, option: &str) -> bool {
    std::fs::read_to_string(path)
        .map(|text| {
            text.lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .any(|l| l == option || l == format!("--{option}"))
        })
        .unwrap_or(false)
}

/// Extra lines in a CRIU configuration file for the duration of one operation; the file's
/// earlier content (or its absence) comes back on drop. Operations that need it are serialised
/// by the sidecar (one migration or restore at a time).
#[derive(Debug)]
pub struct CriuConfigOverride {
    path: std::path::PathBuf,
    previous: Option<Vec<u8>>,
}

impl CriuConfigOverride {
    pub fn set(path: &std::path::Path, options: &[&str]) -> std::io::Result<Self> {
        let previous = match std::fs::read(path) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let mut content = previous.clone().unwrap_or_default();
        if !content.is_empty() && !content.ends_with(b"\n") {
            content.push(b'\n');
        }
        for option in options {
            content.extend_from_slice(option.as_bytes());
            content.push(b'\n');
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, content)?;
        Ok(CriuConfigOverride {
            path: path.to_owned(),
            previous,
        })
    }
}

impl Drop for CriuConfigOverride {
    fn drop(&mut self) {
        let result = match &self.previous {
            Some(bytes) => std::fs::write(&self.path, bytes),
            None => std::fs::remove_file(&self.path),
        };
        if let Err(e) = result {
            tracing::warn!(path = %self.path.display(), error = %e, "failed to put back CRIU's configuration");
        }
    }
}

/// The connections whose both ends are in `connections` (one container's connection to
/// another's, over the pod's loopback or its own addresses): each end is restored by its own
/// CRIU run, one container after the other, so whichever comes back first would send to a
/// socket that does not exist yet, get a reset, and lose the connection.
pub fn internal_connections(connections: &[TcpConnection]) -> Vec<TcpConnection> {
    connections
        .iter()
        .filter(|c| {
            connections
                .iter()
                .any(|other| other.local == c.remote && other.remote == c.local)
        })
        .cloned()
        .collect()
}

/// Failure to hold or release the lock of internal connections.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionLockError {
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
}

/// The netfilter chain that holds the lock (in the pod's network namespace).
const LOCK_CHAIN: &str = "UMS-RESTORE-LOCK";

/// Packets of connections internal to a restore dropped from the first container's restore
/// until the last one's (CRIU's own network lock covers one restore run only): TCP
/// retransmits what was dropped once both ends exist. Released on drop.
#[derive(Debug)]
pub struct ConnectionLock {
    tools: Vec<&'static str>,
}

fn iptables(tool: &str, args: &[&str]) -> Result<(), ConnectionLockError> {
    let command = format!("{tool} {}", args.join(" "));
    let output = std::process::Command::new(tool)
        .arg("-w")
        .args(args)
        .output()
        .map_err(|e| ConnectionLockError::Command {
            command: command.clone(),
            message: e.to_string(),
        })?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ConnectionLockError::Command {
            command,
            message: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// The rule that drops one direction of a connection.
fn drop_rule(c: &TcpConnection) -> Vec<String> {
    [
        "-A",
        LOCK_CHAIN,
        "-p",
        "tcp",
        "-s",
        &c.local.ip().to_string(),
        "--sport",
        &c.local.port().to_string(),
        "-d",
        &c.remote.ip().to_string(),
        "--dport",
        &c.remote.port().to_string(),
        "-j",
        "DROP",
    ]
    .map(str::to_owned)
    .to_vec()
}

impl ConnectionLock {
    /// Locks the connections internal to `connections`; `None` when there are none (no
    /// netfilter tool is needed then).
    pub fn hold(connections: &[TcpConnection]) -> Result<Option<Self>, ConnectionLockError> {
        let internal = internal_connections(connections);
        if internal.is_empty() {
            return Ok(None);
        }
        let mut lock = ConnectionLock { tools: Vec::new() };
        for (tool, v4) in [("iptables", true), ("ip6tables", false)] {
            let family: Vec<_> = internal
                .iter()
                .filter(|c| c.local.is_ipv4() == v4)
                .collect();
            if family.is_empty() {
                continue;
            }
            // A chain left by a sidecar that died while holding it is reused.
            if iptables(tool, &["-N", LOCK_CHAIN]).is_err() {
                iptables(tool, &["-F", LOCK_CHAIN])?;
            }
            lock.tools.push(tool);
            for c in family {
                let rule = drop_rule(c);
                iptables(tool, &rule.iter().map(String::as_str).collect::<Vec<_>>())?;
            }
            iptables(tool, &["-I", "OUTPUT", "-j", LOCK_CHAIN])?;
        }
        tracing::info!(
            connections = internal.len(),
            "connections between restored containers locked until all are restored"
        );
        Ok(Some(lock))
    }
}

impl Drop for ConnectionLock {
    fn drop(&mut self) {
        for tool in &self.tools {
            // The jump may be missing if holding failed half way: only the chain matters then.
            while iptables(tool, &["-D", "OUTPUT", "-j", LOCK_CHAIN]).is_ok() {}
            for args in [["-F", LOCK_CHAIN], ["-X", LOCK_CHAIN]] {
                if let Err(e) = iptables(tool, &args) {
                    tracing::warn!(error = %e, "failed to release the lock of internal connections");
                }
            }
        }
    }
}

/// Keep the connections when every local address exists here, else close them.
pub fn restore_mode(connections: &[TcpConnection], here: &BTreeSet<IpAddr>) -> TcpRestore {
    if connections.is_empty() {
        TcpRestore::None
    } else if connections.iter().all(|c| here.contains(&c.local.ip())) {
        TcpRestore::Kept
    } else {
        TcpRestore::Closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:4E1F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0 100 0 0 10 0
   1: 0100007F:9C40 0100007F:4E1F 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0 20 4 30 10 -1
   2: 0100007F:9C41 0100007F:4E1F 01 00000000:00000000 00:00000000 00000000     0        0 333 1 0 20 4 30 10 -1";
        let inodes = BTreeSet::from([111, 222]);
        let found = parse_table(table, &inodes);
        assert_eq!(
            found,
            [TcpConnection {
                local: "127.0.0.1:40000".parse().unwrap(),
                remote: "127.0.0.1:19999".parse().unwrap()
            }]
        );
        let v6 = parse_address("0000000000000000FFFF00000100007F:0050").unwrap();
        assert_eq!(v6, "[::ffff:127.0.0.1]:80".parse().unwrap());
    }

    #[test]
    fn criu_config_override_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("criu/runc.conf");
        {
            let _held = CriuConfigOverride::set(&path, &["tcp-close"]).unwrap();
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "tcp-close\n");
        }
        assert!(!path.exists(), "a file that was absent is removed again");
        std::fs::write(&path, "tcp-established").unwrap();
        {
            let _held = CriuConfigOverride::set(&path, &["tcp-close"]).unwrap();
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                "tcp-established\ntcp-close\n"
            );
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "tcp-established");
        assert!(criu_config_has(&path, "tcp-established"));
        assert!(!criu_config_has(&path, "tcp-close"));
        std::fs::write(&path, "# tcp-close\n--tcp-close\n").unwrap();
        assert!(criu_config_has(&path, "tcp-close"));
        assert!(!criu_config_has(
            &dir.path().join("absent.conf"),
            "tcp-close"
        ));
    }

    #[test]
    fn keeps_only_when_every_local_address_is_here() {
        let c = |l: &str| TcpConnection {
            local: l.parse().unwrap(),
            remote: "10.0.0.9:5432".parse().unwrap(),
        };
        let here = BTreeSet::from(["10.0.0.1".parse().unwrap()]);
        assert_eq!(restore_mode(&[], &here), TcpRestore::None);
        assert_eq!(
            restore_mode(&[c("10.0.0.1:40000")], &here),
            TcpRestore::Kept
        );
        assert_eq!(
            restore_mode(&[c("10.0.0.1:40000"), c("10.0.0.2:40001")], &here),
            TcpRestore::Closed
        );
        assert_eq!(
            missing_local_addresses(&[c("10.0.0.1:40000"), c("10.0.0.2:40001")], &here),
            BTreeSet::from(["10.0.0.2".parse().unwrap()])
        );
    }

    #[test]
    fn internal_connections_are_those_whose_peer_end_is_restored_too() {
        let c = |l: &str, r: &str| TcpConnection {
            local: l.parse().unwrap(),
            remote: r.parse().unwrap(),
        };
        let front = c("127.0.0.1:40000", "127.0.0.1:9000");
        let back = c("127.0.0.1:9000", "127.0.0.1:40000");
        let outside = c("10.0.0.1:40001", "10.0.0.9:5432");
        // Same port, other peer port: not the other end.
        let stranger = c("127.0.0.1:9000", "127.0.0.1:40002");
        let all = [front.clone(), outside.clone(), back.clone(), stranger];
        assert_eq!(internal_connections(&all), [front.clone(), back.clone()]);
        assert!(internal_connections(&[front.clone(), outside]).is_empty());
        assert!(ConnectionLock::hold(&[front]).unwrap().is_none());
        assert_eq!(
            drop_rule(&back).join(" "),
            "-A UMS-RESTORE-LOCK -p tcp -s 127.0.0.1 --sport 9000 -d 127.0.0.1 --dport 40000 -j DROP"
        );
    }
}
