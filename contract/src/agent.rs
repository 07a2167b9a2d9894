//! What the migration agents (a wrapped pod's sidecar, an ff pod's `ums-ff`) answer their
//! coordinator in the same words: migration IDs, a failed migration's body, an error's causes.

/// A migration ID as agents take it in paths and queries: 1 to 63 ASCII letters, digits and
/// '-' (what a coordinator makes, and nothing that could climb out of a directory).
pub fn is_migration_id(id: &str) -> bool {
    (1..=63).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The message of a migration that failed during `phase`.
pub fn failure_message(phase: &str, error: &str) -> String {
    format!("migration failed during {phase}: {error}")
}

/// The details of a migration that failed during `phase`, beside the message: what went
/// wrong, what the rollback did (one line each, `FAILED` in the lines that failed), and where
/// that left the service at the source.
pub fn failure_detail(phase: &str, error: &str, rollback: &[String]) -> serde_json::Value {
    let source_state = if rollback.is_empty() {
        "untouched"
    } else if rollback.iter().any(|line| line.contains("FAILED")) {
        "rollback failed for some containers: see rollback"
    } else {
        "restored to running"
    };
    serde_json::json!({
        "phase": phase,
        "error": error,
        "rollback": rollback,
        "sourceState": source_state,
    })
}

/// An error and its causes on one line, each cause once (a cause its error already quotes is
/// not repeated).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_ids_are_short_names() {
        assert!(is_migration_id("m18ede2619321f065"));
        assert!(is_migration_id("a-b"));
        assert!(!is_migration_id(""));
        assert!(!is_migration_id("../etc"));
        assert!(!is_migration_id(&"a".repeat(64)));
    }

    #[test]
    fn a_failure_says_where_it_left_the_service() {
        assert_eq!(
            failure_detail("dumping", "boom", &[])["sourceState"],
            "untouched"
        );
        let resumed = failure_detail("sending", "gone", &["resumed 12".into()]);
        assert_eq!(resumed["sourceState"], "restored to running");
        assert_eq!(resumed["rollback"][0], "resumed 12");
        let failed = failure_detail("sending", "gone", &["resume 12 FAILED".into()]);
        assert!(failed["sourceState"]
            .as_str()
            .unwrap()
            .starts_with("rollback failed"));
        assert_eq!(
            failure_message("sending", "gone"),
            "migration failed during sending: gone"
        );
    }

    #[test]
    fn causes_follow_their_error_once() {
        #[derive(Debug)]
        struct Outer(std::io::Error, bool);
        impl std::fmt::Display for Outer {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                if self.1 {
                    write!(f, "reading: {}", self.0)
                } else {
                    write!(f, "reading")
                }
            }
        }
        impl std::error::Error for Outer {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let io = || std::io::Error::other("disk gone");
        assert_eq!(error_chain(&Outer(io(), false)), "reading: disk gone");
        assert_eq!(error_chain(&Outer(io(), true)), "reading: disk gone");
    }
}
