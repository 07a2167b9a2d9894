//! Parsing of the downward-API `annotations` (or `labels`) file.
//!
//! The kubelet writes one `key="value"` line per entry, keys sorted, where the value is quoted
//! with Go's `%q` (`strconv.Quote`): `\"`, `\\`, `\n`, `\t`, ..., `\xNN`, `\uNNNN` and
//! `\UNNNNNNNN` escapes, printable Unicode as is. JSON annotations such as
//! `migration-containers` therefore arrive with every `"` escaped; they must be unescaped
//! exactly or the sidecar reads a different spec than the webhook wrote.

use std::collections::BTreeMap;

/// A downward-API file that does not have the kubelet's format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PodinfoError {
    /// A line has no `=` between key and value.
    #[error("failed to parse podinfo line {line}: no '=' between key and value")]
    MissingEquals { line: usize },
    /// The value is not a Go double-quoted string.
    #[error("failed to parse podinfo line {line}: value of {key:?} is not a quoted string")]
    NotQuoted { line: usize, key: String },
    /// The value holds an escape sequence Go's `strconv.Unquote` would refuse.
    #[error(
        "failed to parse podinfo line {line}: value of {key:?} has a bad escape sequence: {reason}"
    )]
    BadEscape {
        line: usize,
        key: String,
        reason: String,
    },
}

/// Parses the kubelet's `key="value"` format into a map.
pub fn parse_podinfo(text: &str) -> Result<BTreeMap<String, String>, PodinfoError> {
    let mut entries = BTreeMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let (key, quoted) = raw
            .split_once('=')
            .ok_or(PodinfoError::MissingEquals { line })?;
        let value = unquote_go(quoted).map_err(|reason| match reason {
            UnquoteError::NotQuoted => PodinfoError::NotQuoted {
                line,
                key: key.to_owned(),
            },
            UnquoteError::Escape(reason) => PodinfoError::BadEscape {
                line,
                key: key.to_owned(),
                reason,
            },
        })?;
        entries.insert(key.to_owned(), value);
    }
    Ok(entries)
}

/// Formats a map the way the kubelet does (used by tests and by tools that fake a podinfo
/// directory for a sidecar running outside Kubernetes).
pub fn format_podinfo(entries: &BTreeMap<String, String>) -> String {
    entries
        .iter()
        .map(|(k, v)| format!("{k}={}\n", quote_go(v)))
        .collect()
}

enum UnquoteError {
    NotQuoted,
    Escape(String),
}

fn unquote_go(quoted: &str) -> Result<String, UnquoteError> {
    let inner = quoted
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .ok_or(UnquoteError::NotQuoted)?;
    let mut out = String::with_capacity(inner.len());
    // Go's \x and octal escapes denote bytes, which may form UTF-8 sequences together.
    let mut pending_bytes: Vec<u8> = Vec::new();
    let mut chars = inner.chars().peekable();
    let flush = |pending: &mut Vec<u8>, out: &mut String| -> Result<(), UnquoteError> {
        if !pending.is_empty() {
            let s = String::from_utf8(std::mem::take(pending))
                .map_err(|_| UnquoteError::Escape("byte escapes are not valid UTF-8".into()))?;
            out.push_str(&s);
        }
        Ok(())
    };
    while let Some(c) = chars.next() {
        if c == '"' {
            return Err(UnquoteError::Escape(
                "unescaped '\"' inside the value".into(),
            ));
        }
        if c != '\\' {
            flush(&mut pending_bytes, &mut out)?;
            out.push(c);
            continue;
        }
        let Some(e) = chars.next() else {
            return Err(UnquoteError::Escape("value ends in a lone '\\'".into()));
        };
        let mut take_hex = |n: usize| -> Result<u32, UnquoteError> {
            let digits: String = (0..n).filter_map(|_| chars.next()).collect();
            if digits.len() != n {
                return Err(UnquoteError::Escape(format!("\\{e} needs {n} hex digits")));
            }
            u32::from_str_radix(&digits, 16)
                .map_err(|_| UnquoteError::Escape(format!("\\{e}{digits} is not hexadecimal")))
        };
        let simple = match e {
            'a' => Some('\u{7}'),
            'b' => Some('\u{8}'),
            'f' => Some('\u{c}'),
            'n' => Some('\n'),
            'r' => Some('\r'),
            't' => Some('\t'),
            'v' => Some('\u{b}'),
            '\\' => Some('\\'),
            '"' => Some('"'),
            '\'' => Some('\''),
            _ => None,
        };
        if let Some(s) = simple {
            flush(&mut pending_bytes, &mut out)?;
            out.push(s);
            continue;
        }
        match e {
            'x' => pending_bytes.push(take_hex(2)? as u8),
            'u' | 'U' => {
                let code = take_hex(if e == 'u' { 4 } else { 8 })?;
                let ch = char::from_u32(code).ok_or_else(|| {
                    UnquoteError::Escape(format!("U+{code:X} is not a Unicode scalar value"))
                })?;
                flush(&mut pending_bytes, &mut out)?;
                out.push(ch);
            }
            '0'..='7' => {
                let mut value = e.to_digit(8).unwrap_or(0);
                for _ in 0..2 {
                    let d = chars.next().and_then(|d| d.to_digit(8)).ok_or_else(|| {
                        UnquoteError::Escape("octal escape needs 3 digits".into())
                    })?;
                    value = value * 8 + d;
                }
                let byte = u8::try_from(value)
                    .map_err(|_| UnquoteError::Escape(format!("octal escape {value} > 255")))?;
                pending_bytes.push(byte);
            }
            other => return Err(UnquoteError::Escape(format!("unknown escape \\{other}"))),
        }
    }
    flush(&mut pending_bytes, &mut out)?;
    Ok(out)
}

/// Go's `strconv.Quote`, for printable-or-escaped output.
fn quote_go(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() && (c as u32) <= 0xffff => {
                out.push_str(&format!("\\u{:04x}", c as u32))
            }
            c if c.is_control() => out.push_str(&format!("\\U{:08x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_kubelet_writes() {
        // Recorded from a kubelet (fieldpath.FormatMap): keys sorted, %q values, no final newline.
        let text = "kubernetes.io/config.seen=\"2024-05-01T10:00:00.1Z\"\n\
migration-containers=\"[{\\\"name\\\":\\\"memhog\\\",\\\"image\\\":\\\"memhog:1\\\",\\\"env\\\":[{\\\"name\\\":\\\"MSG\\\",\\\"value\\\":\\\"a\\\\nb\\\"}]}]\"\n\
migration-interface=\"dind\"\n\
note=\"caf\u{e9} \\t tab \\x41 \\u00e9 \\U0001F600 \\101\"";
        let map = parse_podinfo(text).unwrap();
        assert_eq!(map["migration-interface"], "dind");
        assert_eq!(
            map["migration-containers"],
            r#"[{"name":"memhog","image":"memhog:1","env":[{"name":"MSG","value":"a\nb"}]}]"#
        );
        assert_eq!(map["note"], "café \t tab A é 😀 A");
        let containers =
            crate::annotations::parse_containers(&map["migration-containers"]).unwrap();
        assert_eq!(
            containers[0].env.as_ref().unwrap()[0].value.as_deref(),
            Some("a\nb")
        );
    }

    #[test]
    fn format_then_parse_is_identity() {
        let mut map = BTreeMap::new();
        map.insert("a".to_string(), "plain".to_string());
        map.insert(
            "b".to_string(),
            "quote \" backslash \\ nl \n bell \u{7} del \u{7f} é".to_string(),
        );
        map.insert("c".to_string(), String::new());
        assert_eq!(parse_podinfo(&format_podinfo(&map)).unwrap(), map);
    }

    #[test]
    fn utf8_byte_escapes_combine() {
        assert_eq!(parse_podinfo("k=\"\\xc3\\xa9\"").unwrap()["k"], "é");
    }

    #[test]
    fn malformed_lines_are_errors_with_line_numbers() {
        assert_eq!(
            parse_podinfo("a=\"1\"\nnoequals").unwrap_err(),
            PodinfoError::MissingEquals { line: 2 }
        );
        assert!(matches!(
            parse_podinfo("a=1").unwrap_err(),
            PodinfoError::NotQuoted { line: 1, .. }
        ));
        for bad in [
            "a=\"\\q\"",
            "a=\"\\x4\"",
            "a=\"x\\\"",
            "a=\"\\xff\"",
            "a=\"\\777\"",
            "a=\"a\"b\"",
        ] {
            assert!(
                matches!(
                    parse_podinfo(bad).unwrap_err(),
                    PodinfoError::BadEscape { .. }
                ),
                "{bad}"
            );
        }
    }
}
