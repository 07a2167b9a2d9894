//! Kubernetes quantities to engine units (bytes, nano-CPUs).

/// A quantity in nano-units, or `None` if malformed (the contract's exact parser).
pub fn nanos(quantity: &str) -> Option<i128> {
    ums_contract::quantity::parse_nanos(quantity).ok()
}

/// Bytes (rounded up).
pub fn bytes(quantity: &str) -> Option<i64> {
    let n = nanos(quantity)?;
    i64::try_from((n + 999_999_999) / 1_000_000_000).ok()
}

/// Nano-CPUs (Docker's `NanoCpus`).
pub fn nano_cpus(quantity: &str) -> Option<i64> {
    i64::try_from(nanos(quantity)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_memory_and_cpu() {
        assert_eq!(bytes("256Mi"), Some(256 << 20));
        assert_eq!(bytes("1G"), Some(1_000_000_000));
        assert_eq!(bytes("1.5Ki"), Some(1536));
        assert_eq!(nano_cpus("250m"), Some(250_000_000));
        assert_eq!(nano_cpus("2"), Some(2_000_000_000));
        assert_eq!(bytes("lots"), None);
    }
}
