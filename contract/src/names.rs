//! Kubernetes object names (RFC 1123), checked as the API server checks them, for the tools
//! that take names from users before anything reaches the API server.

/// A DNS label: 1 to 63 lower-case letters, digits and '-', starting and ending with a letter
/// or digit (namespaces, Service names).
pub fn is_dns1123_label(value: &str) -> bool {
    is_label_of(value, 63)
}

/// A DNS subdomain: at most 253 characters, labels of lower-case letters, digits and '-'
/// joined by '.' (pod names).
pub fn is_dns1123_subdomain(value: &str) -> bool {
    value.len() <= 253 && value.split('.').all(|label| is_label_of(label, 253))
}

fn is_label_of(label: &str, max: usize) -> bool {
    let bytes = label.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= max
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_subdomains_as_kubernetes_takes_them() {
        for good in ["a", "shop-eu", "x1"] {
            assert!(is_dns1123_label(good), "{good}");
        }
        for bad in ["", "-a", "a-", "Shop", "a_b", "a.b", &"x".repeat(64)] {
            assert!(!is_dns1123_label(bad), "{bad}");
        }
        assert!(is_dns1123_subdomain("svc-1.v2"));
        for bad in ["", "svc.", ".svc", "svc/x", "Svc", &"x".repeat(254)] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
    }
}
