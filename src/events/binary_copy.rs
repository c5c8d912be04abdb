//! Reading events with `COPY ... TO STDOUT (FORMAT binary)`: the fast path for bulk reads of
//! the journal, parsing PostgreSQL's binary tuple format straight into [`RecordedEvent`]s.

use chrono::{DateTime, Utc};
use cid::Cid;
use futures::TryStreamExt;
use sqlx::PgPool;
use uuid::Uuid;

use super::envelope::RecordedEvent;
use super::error::JournalError;

/// `PGCOPY\n\xff\r\n\0`: the first bytes of every binary COPY, in either direction.
pub(crate) const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds from the Unix epoch to PostgreSQL's epoch, 2000-01-01.
pub(crate) const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Runs `select` (which must produce the columns of `COPY_EVENT_COLUMNS`, in order) through a binary
/// COPY and decodes the rows. `select` is built by the journal from numbers only.
pub(crate) async fn read_events(
    pool: &PgPool,
    select: &str,
) -> Result<Vec<RecordedEvent>, JournalError> {
    let mut conn = pool.acquire().await?;
    let mut events = Vec::new();
    let result = for_each_row(&mut conn, select, 13, |row| {
        events.push(decode(&row)?);
        Ok::<_, JournalError>(())
    })
    .await;
    if result.is_err() {
        // The connection may be in the middle of the COPY: close it rather than reuse it.
        drop(conn.detach());
    }
    result.map(|()| events)
}

/// One row of a binary COPY, borrowed from the read buffer: typed views of its fields.
pub(crate) struct CopyRow<'a> {
    fields: &'a [Option<&'a [u8]>],
}

impl<'a> CopyRow<'a> {
    /// The raw bytes of field `i`, `None` for NULL.
    pub(crate) fn get(&self, i: usize) -> Option<&'a [u8]> {
        self.fields.get(i).copied().flatten()
    }

    /// The bytes of field `i`, which must not be NULL.
    pub(crate) fn bytes(&self, i: usize) -> Result<&'a [u8], JournalError> {
        self.get(i).ok_or_else(|| malformed(format!("column {i} is NULL")))
    }

    /// Field `i` as an integer of any width (smallint, integer, bigint, xid8).
    pub(crate) fn int(&self, i: usize) -> Result<i64, JournalError> {
        let bytes = self.bytes(i)?;
        Ok(match bytes.len() {
            8 => i64::from_be_bytes(bytes.try_into().expect("8 bytes")),
            4 => i64::from(i32::from_be_bytes(bytes.try_into().expect("4 bytes"))),
            2 => i64::from(i16::from_be_bytes(bytes.try_into().expect("2 bytes"))),
            n => return Err(malformed(format!("integer column {i} has {n} bytes"))),
        })
    }

    /// Field `i` as a stream version: an integer that must not be negative.
    pub(crate) fn version(&self, i: usize) -> Result<u32, JournalError> {
        u32::try_from(self.int(i)?).map_err(|_| malformed("negative version"))
    }

    /// Field `i` as text.
    pub(crate) fn text(&self, i: usize) -> Result<&'a str, JournalError> {
        std::str::from_utf8(self.bytes(i)?).map_err(|e| malformed(e.to_string()))
    }

    /// Field `i` as a uuid.
    pub(crate) fn uuid(&self, i: usize) -> Result<Uuid, JournalError> {
        uuid(self.bytes(i)?)
    }

    /// Field `i` as a timestamptz.
    pub(crate) fn time(&self, i: usize) -> Result<DateTime<Utc>, JournalError> {
        DateTime::from_timestamp_micros(self.int(i)? + PG_EPOCH_MICROS)
            .ok_or_else(|| malformed(format!("column {i}: time out of range")))
    }
}

/// Runs `select`, which must produce `columns` columns, through a binary COPY on `conn` and
/// hands each row to `visit` as it arrives, without collecting them. On an error the
/// connection may be left in the middle of the COPY: the caller must not reuse it (a pooled
/// transaction's rollback, or `detach`, takes care of that).
pub(crate) async fn for_each_row<E: From<JournalError>>(
    conn: &mut sqlx::PgConnection,
    select: &str,
    columns: usize,
    mut visit: impl FnMut(CopyRow<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let mut tuples = TupleReader::new(columns)?;
    let statement = format!("COPY ({select}) TO STDOUT (FORMAT binary)");
    let mut chunks = conn.copy_out_raw(&statement).await.map_err(JournalError::from)?;
    // The stream must be read to its end even after the trailer, or the connection goes back
    // to the pool in the middle of the COPY protocol.
    while let Some(chunk) = chunks.try_next().await.map_err(JournalError::from)? {
        tuples.feed(&chunk, &mut visit)?;
    }
    Ok(())
}

/// As [`for_each_row`], but `visit` runs on a blocking thread, owning `state`, while this task
/// reads the next rows off the connection: the server's sending, this task's receiving and
/// `visit` then overlap instead of taking turns. For bulk reads whose per-row work is heavy
/// (a rebuild's fold). `progress` is called between batches. Returns `state` once every row
/// was visited; on an error the connection may be left in the middle of the COPY, as above.
pub(crate) async fn for_each_row_aside<S, E>(
    conn: &mut sqlx::PgConnection,
    select: &str,
    columns: usize,
    state: S,
    mut visit: impl FnMut(&mut S, CopyRow<'_>) -> Result<(), E> + Send + 'static,
    mut progress: impl FnMut(),
) -> Result<S, E>
where
    S: Send + 'static,
    E: From<JournalError> + Send + 'static,
{
    /// Messages (one row each, as the server sends them) handed over at a time: enough that
    /// the hand-over costs little per row.
    const BATCH: usize = 512;
    let mut tuples = TupleReader::new(columns)?;
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Vec<bytes::Bytes>>(8);
    let visitor = tokio::task::spawn_blocking(move || {
        let mut state = state;
        while let Some(batch) = receiver.blocking_recv() {
            for chunk in batch {
                tuples.feed(&chunk, &mut |row| visit(&mut state, row))?;
            }
        }
        Ok::<S, E>(state)
    });
    let statement = format!("COPY ({select}) TO STDOUT (FORMAT binary)");
    let read = async {
        let mut chunks = conn.copy_out_raw(&statement).await?;
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(chunk) = chunks.try_next().await? {
            batch.push(chunk);
            if batch.len() == BATCH {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                if sender.send(full).await.is_err() {
                    // The visitor stopped on an error, which it returns below.
                    return Ok(());
                }
                progress();
            }
        }
        let _ = sender.send(batch).await;
        Ok::<(), sqlx::Error>(())
    };
    let read = read.await;
    drop(sender);
    // The visitor's thread panicked or was cancelled: the rows were not all visited.
    let visited = visitor.await.map_err(|_| JournalError::Database(sqlx::Error::WorkerCrashed))?;
    read.map_err(JournalError::from)?;
    visited
}

/// Binary COPY data arriving in chunks, parsed into rows: the header once, then tuples, with
/// the bytes of a tuple split across chunks kept until the rest arrives. The server sends one
/// message per row, so most rows are parsed straight from their chunk without being copied.
struct TupleReader {
    columns: usize,
    pending: Vec<u8>,
    header_done: bool,
    trailer_seen: bool,
}

impl TupleReader {
    fn new(columns: usize) -> Result<Self, JournalError> {
        if columns > MAX_COLUMNS {
            return Err(malformed(format!("{columns} columns, at most {MAX_COLUMNS} supported")));
        }
        Ok(TupleReader { columns, pending: Vec::new(), header_done: false, trailer_seen: false })
    }

    /// Parses `chunk` (the next bytes of the COPY), handing each whole row to `visit`.
    fn feed<E: From<JournalError>>(
        &mut self,
        chunk: &[u8],
        visit: &mut impl FnMut(CopyRow<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.trailer_seen {
            return Ok(());
        }
        let from_pending = !self.pending.is_empty() || !self.header_done;
        if from_pending {
            self.pending.extend_from_slice(chunk);
        }
        let data: &[u8] = if from_pending { &self.pending } else { chunk };
        let mut offset = 0;
        if !self.header_done {
            match header_len(data)? {
                Some(len) => {
                    offset = len;
                    self.header_done = true;
                }
                None => return Ok(()),
            }
        }
        let mut fields = [None; MAX_COLUMNS];
        loop {
            match parse_tuple(&data[offset..], &mut fields[..self.columns])? {
                Tuple::Incomplete => break,
                Tuple::Trailer => {
                    self.trailer_seen = true;
                    break;
                }
                Tuple::Row(used) => {
                    visit(CopyRow { fields: &fields[..self.columns] })?;
                    offset += used;
                }
            }
        }
        if from_pending {
            self.pending.drain(..offset);
        } else {
            self.pending.extend_from_slice(&chunk[offset..]);
        }
        Ok(())
    }
}

/// The most columns [`for_each_row`] reads.
const MAX_COLUMNS: usize = 16;

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

/// What the buffer starts with.
enum Tuple {
    /// A row of this many bytes; its fields were pushed.
    Row(usize),
    /// The trailer: no more rows.
    Trailer,
    /// Not all of the next tuple has arrived.
    Incomplete,
}

/// Parses one tuple at the start of `buffer` into `fields`, which has one slot per column.
fn parse_tuple<'a>(
    buffer: &'a [u8],
    fields: &mut [Option<&'a [u8]>],
) -> Result<Tuple, JournalError> {
    let columns = fields.len();
    let Some(count) = buffer.get(..2) else { return Ok(Tuple::Incomplete) };
    let count = i16::from_be_bytes(count.try_into().expect("2 bytes"));
    if count == -1 {
        return Ok(Tuple::Trailer);
    }
    if count as usize != columns {
        return Err(malformed(format!("expected {columns} columns, got {count}")));
    }
    let mut at = 2usize;
    for slot in fields.iter_mut() {
        match field(buffer, &mut at) {
            Ok(value) => *slot = value,
            Err(None) => return Ok(Tuple::Incomplete),
            Err(Some(e)) => return Err(e),
        }
    }
    Ok(Tuple::Row(at))
}

fn uuid(bytes: &[u8]) -> Result<Uuid, JournalError> {
    Uuid::from_slice(bytes).map_err(|e| malformed(e.to_string()))
}

fn decode(row: &CopyRow<'_>) -> Result<RecordedEvent, JournalError> {
    let cid = |bytes: &[u8]| Cid::try_from(bytes).map_err(|e| malformed(format!("cid: {e}")));
    Ok(RecordedEvent {
        position: row.int(0)?,
        stream_id: row.uuid(1)?,
        stream_type: row.text(2)?.to_owned(),
        version: row.version(3)?,
        event_type: row.text(4)?.to_owned(),
        schema_version: row.int(5)? as i16,
        payload: row.bytes(6)?.to_vec(),
        recorded_at: row.time(7)?,
        correlation_id: row.get(8).map(uuid).transpose()?,
        causation_id: row.get(9).map(uuid).transpose()?,
        tx_id: row.int(10)? as u64,
        prev_cid: row.get(11).map(cid).transpose()?,
        cid: cid(row.bytes(12)?)?,
    })
}
