//! What a migration agent (the sidecar, `ums-ff`) reads of the processes and the network
//! namespace it runs in: the process tree under a PID, from `/proc`, and the addresses of the
//! namespace's interfaces (a credential names the pod IP it is for; a TCP connection can only be
//! restored where its local address exists), and its own peak memory (what a report quotes).

use std::collections::BTreeSet;
use std::net::IpAddr;

/// The processes of the tree rooted at `root` (itself first), from every thread's `children`
/// in `/proc`; a process that ends while it is read is left out.
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut pids = vec![root];
    let mut index = 0;
    while index < pids.len() {
        let pid = pids[index];
        index += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                if !pids.contains(&child) {
                    pids.push(child);
                }
            }
        }
    }
    pids
}

/// This network namespace's addresses, IPv4 and IPv6.
pub fn local_addresses() -> BTreeSet<IpAddr> {
    let mut addresses = BTreeSet::new();
    if let Ok(interfaces) = nix::ifaddrs::getifaddrs() {
        for interface in interfaces {
            let Some(address) = interface.address else {
                continue;
            };
            if let Some(v4) = address.as_sockaddr_in() {
                addresses.insert(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = address.as_sockaddr_in6() {
                addresses.insert(IpAddr::V6(v6.ip()));
            }
        }
    }
    addresses
}

/// This process's peak resident memory (`VmHWM`), KiB.
pub fn peak_rss_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_in_its_parents_tree() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let me = std::process::id();
        let tree = process_tree(me);
        assert_eq!(tree[0], me);
        assert!(tree.contains(&child.id()), "{tree:?}");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_process_has_a_peak_resident_size() {
        assert!(peak_rss_kib().is_some_and(|kib| kib > 0));
    }

    #[test]
    fn loopback_is_a_local_address() {
        assert!(local_addresses().contains(&IpAddr::from([127, 0, 0, 1])));
    }
}
