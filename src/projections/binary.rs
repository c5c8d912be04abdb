//! Status rows in PostgreSQL's binary `COPY` format.
//!
//! Rows are carried as text in each column's canonical form (see [`super::table`]); a rebuild
//! sends them as binary fields instead of CSV because the server then stores each value as it
//! comes rather than parsing and casting text: about half the server's time per row, which is
//! what bounds a rebuild. Each value is converted from the same canonical text the inline
//! projection binds, so both ways still share one encoding, and a value that is not in its
//! column's canonical form is an error here rather than a different row.

use chrono::DateTime;
use uuid::Uuid;

use super::ProjectionError;
use super::table::{RowValues, SqlType};
use crate::events::binary_copy::{PG_EPOCH_MICROS, SIGNATURE};

/// Binary `COPY` data under construction, cut into chunks so that one chunk can be on its way
/// to the server while the next is built. The first chunk starts with the header and the
/// last ([`CopyChunks::finish`]) ends with the trailer; rows never straddle two chunks.
pub(crate) struct CopyChunks {
    columns: &'static [(&'static str, SqlType)],
    chunk: Vec<u8>,
    rows: u64,
}

impl CopyChunks {
    /// A chunk is handed on once it holds this many bytes: large enough that sending costs
    /// little per row, small enough that the server starts storing early.
    const SIZE: usize = 1 << 20;

    /// Data for a table with `columns`, starting with the header: the signature, no flags,
    /// no header extension.
    pub(crate) fn new(columns: &'static [(&'static str, SqlType)]) -> Self {
        let mut chunk = Vec::with_capacity(Self::SIZE + 4096);
        chunk.extend_from_slice(SIGNATURE);
        chunk.extend_from_slice(&[0; 8]);
        CopyChunks { columns, chunk, rows: 0 }
    }

    /// Adds `row`; returns a full chunk to send, if this row filled one.
    pub(crate) fn push(&mut self, row: &RowValues) -> Result<Option<Vec<u8>>, ProjectionError> {
        push_row(&mut self.chunk, self.columns, row)?;
        self.rows += 1;
        if self.chunk.len() < Self::SIZE {
            return Ok(None);
        }
        let next = Vec::with_capacity(Self::SIZE + 4096);
        Ok(Some(std::mem::replace(&mut self.chunk, next)))
    }

    /// The last chunk, ending with the trailer (a tuple of -1 fields), and the rows added.
    pub(crate) fn finish(mut self) -> (Vec<u8>, u64) {
        self.chunk.extend_from_slice(&(-1i16).to_be_bytes());
        (self.chunk, self.rows)
    }
}

/// Appends one tuple: the field count, then each value with its length (-1 for NULL).
fn push_row(
    out: &mut Vec<u8>,
    columns: &[(&'static str, SqlType)],
    row: &RowValues,
) -> Result<(), ProjectionError> {
    let fields = i16::try_from(columns.len()).map_err(|_| bad("(row)", "", "too wide"))?;
    if row.len() != columns.len() {
        let (got, wanted) = (row.len(), columns.len());
        return Err(bad("(row)", &format!("{got} values"), &format!("not {wanted} values")));
    }
    out.extend_from_slice(&fields.to_be_bytes());
    for ((column, ty), value) in columns.iter().zip(row) {
        let Some(text) = value else {
            out.extend_from_slice(&(-1i32).to_be_bytes());
            continue;
        };
        let length_at = out.len();
        out.extend_from_slice(&[0; 4]);
        push_value(out, *ty, text).map_err(|reason| bad(column, text, reason))?;
        let length = i32::try_from(out.len() - length_at - 4)
            .map_err(|_| bad(column, "", "value over 2 GiB"))?;
        out[length_at..length_at + 4].copy_from_slice(&length.to_be_bytes());
    }
    Ok(())
}

fn bad(column: &str, value: &str, reason: &str) -> ProjectionError {
    ProjectionError::BadColumnValue {
        column: column.to_owned(),
        value: value.chars().take(80).collect(),
        reason: reason.to_owned(),
    }
}

/// Appends `text`, the canonical text of a value of type `ty`, in the type's binary form.
fn push_value(out: &mut Vec<u8>, ty: SqlType, text: &str) -> Result<(), &'static str> {
    match ty {
        SqlType::Text => out.extend_from_slice(text.as_bytes()),
        SqlType::Uuid => {
            let uuid = Uuid::parse_str(text).map_err(|_| "not a uuid")?;
            out.extend_from_slice(uuid.as_bytes());
        }
        SqlType::BigInt => {
            let n: i64 = text.parse().map_err(|_| "not a bigint")?;
            out.extend_from_slice(&n.to_be_bytes());
        }
        SqlType::Int => {
            let n: i32 = text.parse().map_err(|_| "not an integer")?;
            out.extend_from_slice(&n.to_be_bytes());
        }
        SqlType::SmallInt => {
            let n: i16 = text.parse().map_err(|_| "not a smallint")?;
            out.extend_from_slice(&n.to_be_bytes());
        }
        SqlType::Bool => out.push(match text {
            "true" => 1,
            "false" => 0,
            _ => return Err("not true or false"),
        }),
        SqlType::Timestamp => {
            let at = DateTime::parse_from_rfc3339(text).map_err(|_| "not an RFC 3339 time")?;
            let micros = at.timestamp_micros().checked_sub(PG_EPOCH_MICROS);
            out.extend_from_slice(&micros.ok_or("time out of range")?.to_be_bytes());
        }
        SqlType::Numeric => push_numeric(out, text)?,
    }
    Ok(())
}

/// PostgreSQL's binary `numeric`: digit count, weight (of the first base-10000 digit), sign,
/// display scale, then the base-10000 digits without leading or trailing zero digits.
fn push_numeric(out: &mut Vec<u8>, text: &str) -> Result<(), &'static str> {
    const NOT_DECIMAL: &str = "not a decimal number";
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    let is_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !is_digits(whole) || !is_digits(fraction) {
        return Err(NOT_DECIMAL);
    }
    let scale = i16::try_from(fraction.len()).map_err(|_| "scale too large")?;
    // Left-pad the whole part and right-pad the fraction to groups of four decimal digits.
    let whole_groups = whole.len().div_ceil(4);
    let padded = std::iter::repeat_n(0u8, whole_groups * 4 - whole.len())
        .chain(whole.bytes().map(|b| b - b'0'))
        .chain(fraction.bytes().map(|b| b - b'0'))
        .chain(std::iter::repeat_n(0u8, (4 - fraction.len() % 4) % 4));
    let mut digits: Vec<i16> = Vec::with_capacity(whole_groups + fraction.len().div_ceil(4));
    let (mut group, mut filled) = (0i16, 0);
    for digit in padded {
        group = group * 10 + i16::from(digit);
        filled += 1;
        if filled == 4 {
            digits.push(group);
            (group, filled) = (0, 0);
        }
    }
    let mut weight = i16::try_from(whole_groups).map_err(|_| "too many digits")? - 1;
    match digits.iter().position(|&d| d != 0) {
        None => {
            digits.clear();
            weight = 0;
        }
        Some(leading) => {
            digits.drain(..leading);
            weight -= leading as i16;
        }
    }
    while digits.last() == Some(&0) {
        digits.pop();
    }
    let count = i16::try_from(digits.len()).map_err(|_| "too many digits")?;
    let sign: u16 = if negative && count > 0 { 0x4000 } else { 0 };
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&scale.to_be_bytes());
    for digit in digits {
        out.extend_from_slice(&digit.to_be_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(text: &str) -> Vec<i16> {
        let mut out = Vec::new();
        push_numeric(&mut out, text).expect("a decimal");
        out.chunks(2).map(|pair| i16::from_be_bytes([pair[0], pair[1]])).collect()
    }

    #[test]
    fn numerics_are_base_10000_digits_without_leading_or_trailing_zeros() {
        // [digits, weight, sign, scale, digits...]
        assert_eq!(numeric("0"), vec![0, 0, 0, 0]);
        assert_eq!(numeric("-0"), vec![0, 0, 0, 0]);
        assert_eq!(numeric("123456789"), vec![3, 2, 0, 0, 1, 2345, 6789]);
        assert_eq!(numeric("10000"), vec![1, 1, 0, 0, 1]);
        assert_eq!(numeric("-0.5"), vec![1, -1, 0x4000, 1, 5000]);
        assert_eq!(numeric("12.00340"), vec![2, 0, 0, 5, 12, 34]);
        assert_eq!(numeric("1000000000000000000000000"), vec![1, 6, 0, 0, 1]);
    }

    #[test]
    fn rejects_values_not_in_their_columns_canonical_form() {
        let mut out = Vec::new();
        for (ty, text) in [
            (SqlType::Numeric, "1e5"),
            (SqlType::Numeric, ""),
            (SqlType::Numeric, "12.3.4"),
            (SqlType::Uuid, "not-a-uuid"),
            (SqlType::SmallInt, "40000"),
            (SqlType::Bool, "yes"),
            (SqlType::Timestamp, "yesterday"),
        ] {
            assert!(push_value(&mut out, ty, text).is_err(), "{ty:?} {text}");
        }
    }

    #[test]
    fn a_row_is_its_field_count_then_each_value_with_its_length() {
        let columns = [("id", SqlType::Int), ("note", SqlType::Text)];
        let mut out = Vec::new();
        push_row(&mut out, &columns, &vec![Some("7".into()), None]).expect("a row");
        assert_eq!(out, [0, 2, 0, 0, 0, 4, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff]);
    }
}
