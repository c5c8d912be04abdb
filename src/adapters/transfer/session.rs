//! One push being received by the provider. Each chunk goes to two threads: one appends it
//! to the partial piece file (bypassing the page cache, see `piece::appender`), one feeds the
//! commitment hasher, so neither disk writes nor hashing hold up the stream, nor each other.
//! Every `progress_every` bytes the disk's thread makes the file durable and a recorder task
//! appends the progress to the deal. Invariant: a progress event is
//! recorded only for bytes already synced to disk, so a restart resumes from bytes that are
//! really there; and all progress is recorded before the transfer's completion.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::adapters::piece::appender::PieceAppender;
use crate::adapters::piece::commp::CommP;

/// Chunks queued for each of the disk's and the hasher's threads at most.
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
    /// Each chunk goes to both threads: the disk's and the hasher's.
    to_disk: mpsc::Sender<Arc<Vec<u8>>>,
    to_hasher: mpsc::Sender<Arc<Vec<u8>>>,
    disk: JoinHandle<Result<u64, String>>,
    hasher: JoinHandle<CommP>,
    recorder: ProgressRecorder,
    /// Bytes accepted so far (queued or written).
    pub received: u64,
    /// The transfer stream the push came on (0: none): only that stream's end interrupts it.
    pub carrier: u64,
}

impl Session {
    /// Starts receiving, from the transfer stream `carrier`, through `appender` (whose file
    /// holds `received` bytes, already fed to `hasher`), syncing and recording progress
    /// every `progress_every` bytes through `record`.
    pub(crate) fn start(
        appender: PieceAppender,
        hasher: CommP,
        received: u64,
        carrier: u64,
        progress_every: u64,
        record: RecordProgress,
    ) -> Self {
        let (to_disk, disk_queue) = mpsc::channel(QUEUED_CHUNKS);
        let (to_hasher, hasher_queue) = mpsc::channel(QUEUED_CHUNKS);
        let (durable, recorder) = ProgressRecorder::start(received, record);
        let disk = tokio::task::spawn_blocking(move || {
            write_chunks(appender, received, progress_every, disk_queue, durable)
        });
        let hasher = tokio::task::spawn_blocking(move || hash_chunks(hasher, hasher_queue));
        Self { to_disk, to_hasher, disk, hasher, recorder, received, carrier }
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
        let bytes = Arc::new(bytes);
        let queued = match self.to_disk.send(bytes.clone()).await {
            Ok(()) => self.to_hasher.send(bytes).await.is_ok(),
            Err(_) => false,
        };
        if !queued {
            return Err(self.failure().unwrap_or_else(|| "the piece writer stopped".into()));
        }
        self.received += length;
        Ok(self.received)
    }

    /// Ends the push: waits until every byte is written and hashed and every progress
    /// recorded.
    pub(crate) async fn finish(self) -> Result<Received, String> {
        let Session { to_disk, to_hasher, disk, hasher, recorder, .. } = self;
        drop((to_disk, to_hasher));
        let written = disk.await.map_err(|e| format!("the piece writer failed: {e}"))?;
        let hasher = hasher.await.map_err(|e| format!("the piece hasher failed: {e}"))?;
        // The writer dropped its end of the progress channel: the recorder stops once it
        // has recorded the last durable offset.
        recorder.finish().await?;
        Ok(Received { hasher, bytes: written? })
    }
}

/// The disk's thread: appends each chunk and every `progress_every` bytes makes the file
/// durable and publishes the durable offset (never one below the `received` it started at,
/// which was durable already). Returns the file's length.
fn write_chunks(
    mut appender: PieceAppender,
    received: u64,
    progress_every: u64,
    mut queue: mpsc::Receiver<Arc<Vec<u8>>>,
    durable: watch::Sender<u64>,
) -> Result<u64, String> {
    let mut synced = received;
    while let Some(bytes) = queue.blocking_recv() {
        appender.append(&bytes).map_err(|e| format!("cannot write the piece: {e}"))?;
        if appender.appended() - synced >= progress_every {
            let on_disk = appender.sync().map_err(|e| format!("cannot sync the piece: {e}"))?;
            if on_disk > synced {
                synced = on_disk;
                durable.send_replace(synced);
            }
        }
    }
    appender.finish().map_err(|e| format!("cannot write the piece: {e}"))
}

/// The hasher's thread: feeds every chunk to the commitment hasher.
fn hash_chunks(mut hasher: CommP, mut queue: mpsc::Receiver<Arc<Vec<u8>>>) -> CommP {
    while let Some(bytes) = queue.blocking_recv() {
        hasher.update(&bytes);
    }
    hasher
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
