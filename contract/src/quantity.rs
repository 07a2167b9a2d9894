//! Exact arithmetic on Kubernetes resource quantities, for summing the original containers'
//! requests and limits into the runtime container's.
//!
//! A quantity is a decimal number with an optional exponent (`1e3`) or suffix (`n u m k M G T P
//! E` decimal, `Ki Mi Gi Ti Pi Ei` binary). Values are held as integer nano-units, which is
//! exact for every suffix and large enough (i128) for exabytes.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

const NANO: i128 = 1_000_000_000;

/// A quantity string that does not follow Kubernetes' grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid resource quantity {value:?}: {reason}")]
pub struct QuantityError {
    pub value: String,
    pub reason: &'static str,
}

/// Parses a quantity into nano-units.
pub fn parse_nanos(quantity: &str) -> Result<i128, QuantityError> {
    let err = |reason| QuantityError {
        value: quantity.to_owned(),
        reason,
    };
    let s = quantity.trim();
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    if number.is_empty() || number == "." {
        return Err(err("no number"));
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if fraction.contains('.') {
        return Err(err("more than one decimal point"));
    }
    // (multiplier, decimal exponent) of the suffix, in nano-units.
    let (multiplier, exponent): (i128, i32) = match suffix {
        "" => (1, 0),
        "n" => (1, -9),
        "u" => (1, -6),
        "m" => (1, -3),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        s if s.starts_with(['e', 'E']) => {
            let e: i32 = s[1..].parse().map_err(|_| err("bad exponent"))?;
            if !(-9..=18).contains(&e) {
                return Err(err("exponent out of range"));
            }
            (1, e)
        }
        _ => return Err(err("unknown suffix")),
    };
    let digits: String = format!("{whole}{fraction}");
    let mut value: i128 = digits.parse().map_err(|_| err("number too large"))?;
    // value * 10^(exponent - fraction.len()) * multiplier, in nano units (10^9).
    let scale = exponent + 9 - i32::try_from(fraction.len()).map_err(|_| err("too many digits"))?;
    if scale >= 0 {
        value = value
            .checked_mul(
                10i128
                    .checked_pow(scale as u32)
                    .ok_or_else(|| err("number too large"))?,
            )
            .ok_or_else(|| err("number too large"))?;
    } else {
        // Kubernetes rounds sub-nano precision up; so do we.
        let divisor = 10i128
            .checked_pow((-scale) as u32)
            .ok_or_else(|| err("too precise"))?;
        value = (value + divisor - 1) / divisor;
    }
    value = value
        .checked_mul(multiplier)
        .ok_or_else(|| err("number too large"))?;
    Ok(if negative { -value } else { value })
}

/// Formats nano-units as the shortest exact plain quantity (`2`, `1500m`, `250n`).
/// Memory sums that are whole bytes come out as plain byte counts, which Kubernetes accepts.
pub fn format_nanos(nanos: i128) -> String {
    if nanos % NANO == 0 {
        format!("{}", nanos / NANO)
    } else if nanos % 1_000_000 == 0 {
        format!("{}m", nanos / 1_000_000)
    } else {
        format!("{nanos}n")
    }
}

/// The exact sum of several quantities.
pub fn sum<'a>(
    quantities: impl IntoIterator<Item = &'a Quantity>,
) -> Result<Quantity, QuantityError> {
    let mut total: i128 = 0;
    for q in quantities {
        total = total.checked_add(parse_nanos(&q.0)?).ok_or(QuantityError {
            value: q.0.clone(),
            reason: "sum too large",
        })?;
    }
    Ok(Quantity(format_nanos(total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_suffix_form() {
        let cases: &[(&str, i128)] = &[
            ("1", NANO),
            ("0.5", NANO / 2),
            ("100m", NANO / 10),
            (".25", NANO / 4),
            ("1k", 1000 * NANO),
            ("1Ki", 1024 * NANO),
            ("1Mi", (1 << 20) * NANO),
            ("1.5Gi", 3 * (1 << 29) * NANO),
            ("128974848", 128_974_848 * NANO),
            ("129e6", 129_000_000 * NANO),
            ("129M", 129_000_000 * NANO),
            ("1E", 1_000_000_000_000_000_000 * NANO),
            ("2Ei", 2 * (1i128 << 60) * NANO),
            ("5n", 5),
            ("3u", 3000),
            ("-1", -NANO),
        ];
        for (text, nanos) in cases {
            assert_eq!(parse_nanos(text).unwrap(), *nanos, "{text}");
        }
    }

    #[test]
    fn refuses_malformed_quantities() {
        for bad in ["", "Mi", "1.2.3", "1X", "1e99", "12 Mi", "abc"] {
            assert!(parse_nanos(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sums_mixed_forms_exactly() {
        let q = |s: &str| Quantity(s.to_owned());
        assert_eq!(sum(&[q("100m"), q("0.25"), q("1")]).unwrap(), q("1350m"));
        assert_eq!(sum(&[q("1Gi"), q("512Mi")]).unwrap(), q("1610612736"));
        assert_eq!(sum(&[q("1"), q("1")]).unwrap(), q("2"));
        assert_eq!(sum(&[]).unwrap(), q("0"));
        assert!(sum(&[q("1"), q("x")]).is_err());
    }
}
