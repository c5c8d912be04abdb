//! Reading events with `COPY ... TO STDOUT (FORMAT binary)`: the fast path for bulk reads of
//! the journal, parsing PostgreSQL's binary tuple format straight into [`RecordedEvent`]s.

use chrono::{DateTime, Utc};
use cid::Cid;
use futures::TryStreamExt;
use sqlx::PgPool;
use uuid::Uuid;

use super::envelope::RecordedEvent;
use super::error::JournalError;

/// `PGCOPY\n\xff\r\n\0`: the first bytes of every binary COPY.
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds from the Unix epoch to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Runs `select` (which must produce the columns of `COPY_EVENT_COLUMNS`, in order) through a binary
/// COPY and decodes the rows. `select` is built by the journal from numbers only.
pub(crate) async fn read_events(
    pool: &PgPool,
    select: &str,
) -> Result<Vec<RecordedEvent>, JournalError> {
    let mut conn = pool.acquire().await?;
    let result = copy_on(&mut conn, select).await;
    if result.is_err() {
        // The connection may be in the middle of the COPY: close it rather than reuse it.
        drop(conn.detach());
    }
    result
}

async fn copy_on(
    conn: &mut sqlx::PgConnection,
    select: &str,
) -> Result<Vec<RecordedEvent>, JournalError> {
    let statement = format!("COPY ({select}) TO STDOUT (FORMAT binary)");
    let mut chunks = conn.copy_out_raw(&statement).await?;
    let mut buffer: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut events = Vec::new();
    let mut offset = 0usize;
    let mut header_done = false;
    let mut trailer_seen = false;
    // The stream must be read to its end even after the trailer, or the connection goes back
    // to the pool in the middle of the COPY protocol.
    while let Some(chunk) = chunks.try_next().await? {
        if trailer_seen {
            continue;
        }
        buffer.extend_from_slice(&chunk);
        if !header_done {
            match header_len(&buffer)? {
                Some(len) => {
                    offset = len;
                    header_done = true;
                }
                None => continue,
            }
        }
        while let Some((event, used)) = parse_tuple(&buffer[offset..])? {
            offset += used;
            match event {
                Some(event) => events.push(event),
                None => {
                    trailer_seen = true;
                    break;
                }
            }
        }
        buffer.drain(..offset);
        offset = 0;
    }
    Ok(events)
}

fn malformed(reason: impl Into<String>) -> JournalError {
    JournalError::MalformedRow { position: -1, reason: reason.into() }
}

/// The header's length once all of it has arrived.
fn header_len(buffer: &[u8]) -> Result<Option<usize>, JournalError> {
    if buffer.len() < 19 {
        return Ok(None);
    }
    if &buffer[..11] != SIGNATURE {
        return Err(malformed("not a binary COPY stream"));
    }
    let extension = u32::from_be_bytes(buffer[15..19].try_into().expect("4 bytes")) as usize;
    Ok((buffer.len() >= 19 + extension).then_some(19 + extension))
}

/// Reads one field: `None` for NULL, the bytes otherwise. `Err(None)` when incomplete.
fn field<'a>(buffer: &'a [u8], at: &mut usize) -> Result<Option<&'a [u8]>, Option<JournalError>> {
    let len_bytes = buffer.get(*at..*at + 4).ok_or(None)?;
    let len = i32::from_be_bytes(len_bytes.try_into().expect("4 bytes"));
    *at += 4;
    if len < 0 {
        return Ok(None);
    }
    let bytes = buffer.get(*at..*at + len as usize).ok_or(None)?;
    *at += len as usize;
    Ok(Some(bytes))
}

/// One tuple: `Ok(None)` when it is not complete yet, `Ok(Some((None, n)))` for the trailer.
#[allow(clippy::type_complexity)]
fn parse_tuple(buffer: &[u8]) -> Result<Option<(Option<RecordedEvent>, usize)>, JournalError> {
    let Some(count) = buffer.get(..2) else { return Ok(None) };
    let count = i16::from_be_bytes(count.try_into().expect("2 bytes"));
    if count == -1 {
        return Ok(Some((None, 2)));
    }
    if count != 13 {
        return Err(malformed(format!("expected 13 columns, got {count}")));
    }
    let mut at = 2usize;
    let mut fields: [Option<&[u8]>; 13] = [None; 13];
    for slot in fields.iter_mut() {
        match field(buffer, &mut at) {
            Ok(value) => *slot = value,
            Err(None) => return Ok(None),
            Err(Some(e)) => return Err(e),
        }
    }
    Ok(Some((Some(decode(&fields)?), at)))
}

fn decode(f: &[Option<&[u8]>; 13]) -> Result<RecordedEvent, JournalError> {
    let required = |i: usize| f[i].ok_or_else(|| malformed(format!("column {i} is NULL")));
    let int = |i: usize| -> Result<i64, JournalError> {
        let bytes = required(i)?;
        Ok(match bytes.len() {
            8 => i64::from_be_bytes(bytes.try_into().expect("8 bytes")),
            4 => i64::from(i32::from_be_bytes(bytes.try_into().expect("4 bytes"))),
            2 => i64::from(i16::from_be_bytes(bytes.try_into().expect("2 bytes"))),
            n => return Err(malformed(format!("integer column {i} has {n} bytes"))),
        })
    };
    let uuid = |bytes: &[u8]| Uuid::from_slice(bytes).map_err(|e| malformed(e.to_string()));
    let text = |i: usize| -> Result<String, JournalError> {
        String::from_utf8(required(i)?.to_vec()).map_err(|e| malformed(e.to_string()))
    };
    let position = int(0)?;
    let micros = int(7)?;
    let recorded_at: DateTime<Utc> = DateTime::from_timestamp_micros(micros + PG_EPOCH_MICROS)
        .ok_or_else(|| malformed("recorded_at out of range"))?;
    let cid = |bytes: &[u8]| Cid::try_from(bytes).map_err(|e| malformed(format!("cid: {e}")));
    Ok(RecordedEvent {
        position,
        stream_id: uuid(required(1)?)?,
        stream_type: text(2)?,
        version: u32::try_from(int(3)?).map_err(|_| malformed("negative version"))?,
        event_type: text(4)?,
        schema_version: int(5)? as i16,
        payload: required(6)?.to_vec(),
        recorded_at,
        correlation_id: f[8].map(uuid).transpose()?,
        causation_id: f[9].map(uuid).transpose()?,
        tx_id: int(10)? as u64,
        prev_cid: f[11].map(cid).transpose()?,
        cid: cid(required(12)?)?,
    })
}
