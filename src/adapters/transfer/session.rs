//! One push being received by the provider. The bytes go to a writer thread that appends
//! them to the partial piece file and feeds the commitment hasher, so neither disk writes nor
//! hashing hold up the stream; every `progress_every` bytes a syncer thread beside it makes
//! the file durable and a recorder task appends the progress to the deal. Invariant: a progress event is
//! recorded only for bytes already synced to disk, so a restart resumes from bytes that are
//! really there; and all progress is recorded before the transfer's completion.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::adapters::piece::commp::CommP;

/// Chunks queued for the writer thread at most.
const QUEUED_CHUNKS: usize = 8;

/// Records one durable offset on the deal; the error says why it could not.
pub(crate) type RecordProgress =
    Box<dyn Fn(u64) -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// What the writer thread saw when the push ended.
pub(crate) struct Received {
    /// The commitment hasher over every byte received.
    pub hasher: CommP,
    /// Bytes received in total.
    pub bytes: u64,
}

/// Records a transfer's progress off the data path: offsets are published as they happen,
/// a task appends them to the deal one at a time, skipping any a later offset overtook. Both
/// sides of a push use it, so recording never stalls the stream.
pub(crate) struct ProgressRecorder {
    task: JoinHandle<()>,
    failure: Arc<Mutex<Option<String>>>,
}

impl ProgressRecorder {
    /// Starts recording the offsets sent on the returned channel (starting above `initial`)
    /// through `record`. The recording stops when the sender is dropped.
    pub(crate) fn start(initial: u64, record: RecordProgress) -> (watch::Sender<u64>, Self) {
        let (offsets, published) = watch::channel(initial);
        let failure = Arc::new(Mutex::new(None));
        let task = tokio::spawn(record_progress(published, record, failure.clone()));
        (offsets, Self { task, failure })
    }

    /// Why a progress could not be recorded, if one could not.
    pub(crate) fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|poison| poison.into_inner()).clone()
    }

    /// Waits until the last offset published is recorded. The sender must be dropped first.
    pub(crate) async fn finish(mut self) -> Result<(), String> {
        let _ = (&mut self.task).await;
        self.failure().map_or(Ok(()), Err)
    }
}

/// An open push on the provider.
pub(crate) struct Session {
    chunks: mpsc::Sender<Vec<u8>>,
    writer: JoinHandle<Result<Received, String>>,
    recorder: ProgressRecorder,
    /// Bytes accepted so far (queued or written).
    pub received: u64,
    /// The transfer stream the push came on (0: none): only that stream's end interrupts it.
    pub carrier: u64,
}

impl Session {
    /// Starts receiving, from the transfer stream `carrier`, into `file` (which holds
    /// `received` bytes, already fed to `hasher`), syncing and recording progress every
    /// `progress_every` bytes through `record`.
    pub(crate) fn start(
        file: std::fs::File,
        hasher: CommP,
        received: u64,
        carrier: u64,
        progress_every: u64,
        record: RecordProgress,
    ) -> Self {
        let (chunks, queue) = mpsc::channel(QUEUED_CHUNKS);
        let (durable, recorder) = ProgressRecorder::start(received, record);
        let writer = tokio::task::spawn_blocking(move || {
            write_chunks(file, hasher, received, progress_every, queue, durable)
        });
        Self { chunks, writer, recorder, received, carrier }
    }

    /// Why the push cannot go on, if something failed behind it (a progress the deal
    /// refused).
    pub(crate) fn failure(&self) -> Option<String> {
        self.recorder.failure()
    }

    /// Accepts the next chunk; it is written and hashed behind the caller's back.
    pub(crate) async fn accept(&mut self, bytes: Vec<u8>) -> Result<u64, String> {
        if let Some(failure) = self.failure() {
            return Err(failure);
        }
        let length = bytes.len() as u64;
        if self.chunks.send(bytes).await.is_err() {
            return Err(self.failure().unwrap_or_else(|| "the piece writer stopped".into()));
        }
        self.received += length;
        Ok(self.received)
    }

    /// Ends the push: waits until every byte is written and every progress recorded.
    pub(crate) async fn finish(self) -> Result<Received, String> {
        let Session { chunks, writer, recorder, .. } = self;
        drop(chunks);
        let written = writer.await.map_err(|e| format!("the piece writer failed: {e}"))?;
        // The writer dropped its end of the progress channel: the recorder stops once it
        // has recorded the last durable offset.
        recorder.finish().await?;
        written
    }
}

/// The writer thread: appends and hashes; every `progress_every` bytes it hands the offset
/// to a syncer thread, which makes the file durable up to there and publishes the offset.
/// Syncing beside the writing keeps the disk's flush time off the data path.
fn write_chunks(
    file: std::fs::File,
    hasher: CommP,
    received: u64,
    progress_every: u64,
    queue: mpsc::Receiver<Vec<u8>>,
    durable: watch::Sender<u64>,
) -> Result<Received, String> {
    let syncing = file.try_clone().map_err(|e| format!("cannot sync the piece: {e}"))?;
    std::thread::scope(|scope| {
        let (to_sync, written_up_to) = std::sync::mpsc::channel();
        let syncer = scope.spawn(move || sync_offsets(syncing, written_up_to, durable));
        let written = append_and_hash(file, hasher, received, progress_every, queue, to_sync);
        // The syncer ends once the writer dropped its sender; its failure is the cause of
        // the writer's, if both failed.
        let synced = syncer.join().map_err(|_| "the piece syncer panicked".to_string())?;
        synced.and(written)
    })
}

/// Appends each chunk to `file` and feeds it to `hasher`; every `progress_every` bytes
/// sends the offset written so far to the syncer.
fn append_and_hash(
    mut file: std::fs::File,
    mut hasher: CommP,
    mut received: u64,
    progress_every: u64,
    mut queue: mpsc::Receiver<Vec<u8>>,
    to_sync: std::sync::mpsc::Sender<u64>,
) -> Result<Received, String> {
    use std::io::Write;
    let mut handed = received;
    while let Some(bytes) = queue.blocking_recv() {
        file.write_all(&bytes).map_err(|e| format!("cannot write the piece: {e}"))?;
        hasher.update(&bytes);
        received += bytes.len() as u64;
        if received - handed >= progress_every {
            to_sync.send(received).map_err(|_| "the piece syncer stopped".to_string())?;
            handed = received;
        }
    }
    file.flush().map_err(|e| format!("cannot write the piece: {e}"))?;
    Ok(Received { hasher, bytes: received })
}

/// The syncer thread: for each offset written (the latest one when several are waiting),
/// makes the file durable and only then publishes the offset as durable. `sync_data` covers
/// every byte written before it is called, so the published offset is always on disk.
fn sync_offsets(
    file: std::fs::File,
    written_up_to: std::sync::mpsc::Receiver<u64>,
    durable: watch::Sender<u64>,
) -> Result<(), String> {
    while let Ok(mut offset) = written_up_to.recv() {
        offset = written_up_to.try_iter().last().unwrap_or(offset);
        file.sync_data().map_err(|e| format!("cannot sync the piece: {e}"))?;
        durable.send_replace(offset);
    }
    Ok(())
}

/// Records each new durable offset (skipping any a faster writer already passed); stops at
/// the first the deal refuses, leaving the reason in `failure`.
async fn record_progress(
    mut synced: watch::Receiver<u64>,
    record: RecordProgress,
    failure: Arc<Mutex<Option<String>>>,
) {
    while synced.changed().await.is_ok() {
        let bytes = *synced.borrow_and_update();
        if let Err(reason) = record(bytes).await {
            *failure.lock().unwrap_or_else(|poison| poison.into_inner()) = Some(reason);
            return;
        }
    }
}
