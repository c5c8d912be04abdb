//! Data transfer for storage deals (seed storage flow steps 4-8): the client pushes the deal's
//! bytes over one `/dealledger/transfer/1` stream ([`channel`]) in chunks, each acknowledged
//! with the bytes the provider keeps, with up to [`CHUNKS_IN_FLIGHT`] sent ahead of their
//! acknowledgements. Transfer events become machine inputs; progress is recorded every
//! [`TransferOptions::progress_every`] bytes, not per chunk, so the journal does not bloat.
//! After a dropped connection either side reopens the transfer and it resumes from the last
//! offset recorded in the provider's journal, not from zero.

pub mod channel;
pub mod retrieval;
mod session;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Mutex;
use uuid::Uuid;

use crate::adapters::piece::commp::CommP;

use crate::adapters::network::codec::chunk_frame_head;
use crate::adapters::network::message::{MarketRequest, MarketResponse};
use crate::adapters::network::{Client, NetworkError};
use crate::adapters::piece::store::PieceStore;
use crate::deals::{Deals, DealsError};
use crate::fsm::storage_client::{State as ClientState, StorageClient, StorageClientEvent as C};
use crate::fsm::storage_provider::{
    State as ProviderState, StorageProvider, StorageProviderEvent as P,
};
use crate::fsm::{DecideContext, Label};
use channel::TransferChannel;
use session::{ProgressRecorder, RecordProgress, Session};

/// Bytes per chunk.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// Chunks a push keeps sent but not yet acknowledged: enough to keep the stream busy while
/// the provider writes, hashes and acknowledges, few enough that a refusal stops it soon.
pub const CHUNKS_IN_FLIGHT: usize = 16;

/// Chunks a push reads from its data ahead of sending them.
const CHUNKS_READ_AHEAD: usize = 4;

/// How a transfer is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferOptions {
    /// Bytes per chunk.
    pub chunk_bytes: usize,
    /// Bytes between two recorded progress events.
    pub progress_every: u64,
}

impl Default for TransferOptions {
    fn default() -> Self {
        Self { chunk_bytes: CHUNK_BYTES, progress_every: 4 << 20 }
    }
}

/// Why a push did not complete.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    /// The deal is not in a state that transfers data.
    #[error("deal {stream_id} is in {state}, not ready to transfer")]
    NotReady { stream_id: Uuid, state: &'static str },
    /// The connection failed; the interruption is recorded and the push can be restarted.
    #[error("transfer interrupted: {0}")]
    Interrupted(NetworkError),
    /// The provider could not be reached to open (or reopen) the push; nothing was recorded,
    /// so whoever drives the push tries again.
    #[error("cannot open the transfer: {0}")]
    Unreachable(NetworkError),
    /// The provider refused or answered out of protocol.
    #[error("the provider refused the transfer: {0}")]
    Refused(String),
    /// The ledger refused a step.
    #[error(transparent)]
    Deals(#[from] DealsError),
    /// The data could not be read, or a chunk of it does not fit a message (a chunk size over
    /// the node's message limit); nothing about the transfer was recorded for it.
    #[error("cannot read the data to send: {0}")]
    Source(#[source] std::io::Error),
}

/// Pushes `data` (the deal's piece data, `total` bytes, read chunk by chunk so memory stays
/// flat whatever its size) to the provider, or resumes an interrupted push from the offset the
/// provider recorded. Returns the client deal's state after the provider's verdict.
pub async fn push<R>(
    client: &Client,
    deals: &Deals,
    stream_id: Uuid,
    mut data: R,
    total: u64,
    options: TransferOptions,
    ctx: &DecideContext,
) -> Result<&'static str, PushError>
where
    R: tokio::io::AsyncRead + tokio::io::AsyncSeek + Unpin,
{
    use tokio::io::AsyncSeekExt;
    let deal = deals.load::<StorageClient>(stream_id).await?;
    let (Some(proposal), Some(_)) = (deal.data.proposal.clone(), deal.data.signed_deal.as_ref())
    else {
        return Err(PushError::NotReady { stream_id, state: deal.state.name() });
    };
    let started = match deal.state {
        ClientState::StartDataTransfer | ClientState::TransferQueued => {
            Some(C::DataTransferStarted)
        }
        ClientState::ClientTransferRestart => Some(C::DataTransferRestarted),
        ClientState::Transferring => None,
        state => return Err(PushError::NotReady { stream_id, state: state.name() }),
    };
    let provider = proposal
        .proposal
        .provider
        .peer_id()
        .ok_or_else(|| PushError::Refused("bad provider key".into()))?;
    let proposal_cid = proposal.cid();
    let record =
        |event: C| async move { deals.handle::<StorageClient>(stream_id, event, ctx, None).await };
    let interrupted = |e: NetworkError| async move {
        record(C::DataTransferInterrupted { reason: e.to_string() }).await?;
        Err::<&'static str, PushError>(PushError::Interrupted(e))
    };
    let opened = match TransferChannel::open(client, provider).await {
        Ok(mut channel) => {
            let open = MarketRequest::TransferOpen { proposal_cid, total_bytes: total };
            channel.request(&open).await.map(|answer| (channel, answer))
        }
        Err(e) => Err(e),
    };
    let (mut channel, mut offset) = match opened {
        Ok((channel, MarketResponse::TransferAccepted { resume_from })) => (channel, resume_from),
        Ok((_, other)) => return Err(PushError::Refused(format!("{other:?}"))),
        Err(e) if started.is_none() => return interrupted(e).await,
        Err(e) => return Err(PushError::Unreachable(e)),
    };
    if let Some(event) = started {
        record(event).await?;
    }
    // Acknowledged offsets are recorded every `progress_every` bytes, off the data path.
    let mut recorded = deal.data.bytes_sent;
    let (acknowledged, progress) = ProgressRecorder::start(recorded, {
        let (deals, ctx) = (deals.clone(), ctx.clone());
        Box::new(move |bytes| {
            let (deals, ctx) = (deals.clone(), ctx.clone());
            Box::pin(async move {
                let progressed = C::DataTransferProgressed { bytes };
                let decision = deals.handle::<StorageClient>(stream_id, progressed, &ctx, None);
                decision.await.map(|_| ()).map_err(|e| e.to_string())
            })
        })
    });
    // Chunks go out while earlier ones are still being acknowledged; each acknowledgement
    // must name exactly the end of its chunk, so a provider that kept less stops the push.
    let mut unacknowledged = std::collections::VecDeque::with_capacity(CHUNKS_IN_FLIGHT);
    let mut sent = offset;
    if offset < total {
        data.seek(std::io::SeekFrom::Start(offset)).await.map_err(PushError::Source)?;
    }
    // The data is read ahead of the stream, so that reading a chunk (for a file, a hop to
    // the blocking pool) overlaps sending the ones before it. Each chunk is read straight
    // into its frame, behind the chunk's fields: no buffer of its own to zero and copy.
    let (frames, mut read) = tokio::sync::mpsc::channel(CHUNKS_READ_AHEAD);
    let read_ahead = {
        let (data, chunk_bytes, mut at) = (&mut data, options.chunk_bytes as u64, sent);
        let max = client.max_message_bytes();
        async move {
            while at < total {
                let end = (at + chunk_bytes).min(total);
                let frame = read_chunk_frame(data, proposal_cid, at, end, max).await;
                if !crate::tasks::pass_on(&frames, frame.map(|frame| (end, frame))).await {
                    break;
                }
                at = end;
            }
        }
    };
    let send_all = async {
        loop {
            if offset >= total {
                break None;
            }
            if sent < total && unacknowledged.len() < CHUNKS_IN_FLIGHT {
                let (end, frame) = match read.recv().await {
                    Some(Ok(framed)) => framed,
                    Some(Err(e)) => break Some(Err(PushError::Source(e))),
                    None => {
                        let stopped = std::io::Error::other("the data reader stopped");
                        break Some(Err(PushError::Source(stopped)));
                    }
                };
                if let Err(e) = channel.send_frame(&frame).await {
                    break Some(Ok(e));
                }
                unacknowledged.push_back(end);
                sent = end;
                continue;
            }
            let expected = unacknowledged.pop_front().unwrap_or(total);
            match channel.recv().await {
                Ok(MarketResponse::ChunkAcknowledged { received }) if received == expected => {
                    offset = received;
                }
                Ok(other) => break Some(Err(PushError::Refused(format!("{other:?}")))),
                Err(e) => break Some(Ok(e)),
            }
            if offset - recorded >= options.progress_every && offset < total {
                acknowledged.send_replace(offset);
                recorded = offset;
            }
        }
    };
    let stopped = crate::tasks::beside(read_ahead, send_all).await;
    // Whichever way the loop ended, the progress already published is recorded first, so
    // the journal keeps its order: progress, then the interruption or the completion.
    drop(acknowledged);
    let recorded = progress.finish().await;
    match stopped {
        Some(Err(error)) => return Err(error),
        Some(Ok(lost)) => return interrupted(lost).await,
        None => recorded.map_err(|reason| PushError::Refused(format!("progress: {reason}")))?,
    }
    let verdict = match channel.request(&MarketRequest::TransferFinish { proposal_cid }).await {
        Ok(MarketResponse::TransferVerified { verified, reason }) => (verified, reason),
        Ok(other) => return Err(PushError::Refused(format!("{other:?}"))),
        Err(e) => return interrupted(e).await,
    };
    channel.close().await;
    let mut state = record(C::DataTransferCompleted { bytes: total }).await?.deal.state;
    if let (false, reason) = verdict {
        let reason = reason.unwrap_or_else(|| "the provider could not verify the data".into());
        state = record(C::ProviderFailedDeal { reason }).await?.deal.state;
    }
    Ok(state.name())
}

/// Reads the data from `at` to `end` into a [`MarketRequest::TransferChunk`] frame of the
/// deal `proposal_cid`, ready to send. A chunk over the message limit `max`, or data that
/// ends early, is an error.
async fn read_chunk_frame<R>(
    data: &mut R,
    proposal_cid: cid::Cid,
    at: u64,
    end: u64,
    max: u32,
) -> std::io::Result<Vec<u8>>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let len = (end - at) as usize;
    let mut frame = chunk_frame_head(proposal_cid, at, len, max)?;
    let whole = frame.len() + len;
    while frame.len() < whole {
        // Never past the chunk's end, whatever room the buffer has.
        let mut rest = data.take((whole - frame.len()) as u64);
        if rest.read_buf(&mut frame).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(frame)
}

/// The provider's side of pushes: validates them against its deals (the seed's
/// PushValidator), keeps the bytes in the piece store, records progress, and checks the piece
/// commitment when the push ends.
#[derive(Clone)]
pub struct ProviderTransfers {
    deals: Deals,
    store: PieceStore,
    options: TransferOptions,
    sessions: Arc<Mutex<HashMap<Uuid, Session>>>,
}

impl std::fmt::Debug for ProviderTransfers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderTransfers")
            .field("store", &self.store)
            .field("options", &self.options)
            .finish()
    }
}

impl ProviderTransfers {
    /// Transfers into `store`, recording through `deals`.
    pub fn new(deals: Deals, store: PieceStore, options: TransferOptions) -> Self {
        Self { deals, store, options, sessions: Arc::default() }
    }

    /// The piece store the transfers write to.
    pub fn pieces(&self) -> &PieceStore {
        &self.store
    }

    /// Answers one transfer request about the provider deal `stream_id`, arriving on the
    /// transfer stream numbered `carrier` (0: none), which a push it opens then belongs to.
    pub async fn answer(
        &self,
        stream_id: Uuid,
        carrier: u64,
        request: MarketRequest,
        ctx: &DecideContext,
    ) -> MarketResponse {
        match self.try_answer(stream_id, carrier, request, ctx).await {
            Ok(response) => response,
            Err(reason) => MarketResponse::Rejected { reason },
        }
    }

    /// Records a push's durable progress on the provider deal `stream_id`.
    fn progress(&self, stream_id: Uuid, ctx: &DecideContext) -> RecordProgress {
        let (deals, ctx) = (self.deals.clone(), ctx.clone());
        Box::new(move |bytes| {
            let (deals, ctx) = (deals.clone(), ctx.clone());
            Box::pin(async move {
                let progressed = P::DataTransferProgressed { bytes };
                let decision = deals.handle::<StorageProvider>(stream_id, progressed, &ctx, None);
                decision.await.map(|_| ()).map_err(|e| e.to_string())
            })
        })
    }

    async fn record(
        &self,
        stream_id: Uuid,
        event: P,
        ctx: &DecideContext,
    ) -> Result<ProviderState, String> {
        let decision = self.deals.handle::<StorageProvider>(stream_id, event, ctx, None).await;
        decision.map(|d| d.deal.state).map_err(|e| e.to_string())
    }

    /// The transfer stream `carrier` ended: if the push to `stream_id` it carried is still
    /// open (not finished, and not already reopened on another stream), it stopped midway
    /// and is recorded as interrupted.
    pub async fn stream_ended(
        &self,
        stream_id: Uuid,
        carrier: u64,
        reason: String,
        ctx: &DecideContext,
    ) {
        let carried = self.sessions.lock().await.get(&stream_id).map(|s| s.carrier);
        if carried == Some(carrier) {
            self.interrupted(stream_id, reason, ctx).await;
        }
    }

    /// The push to the provider deal `stream_id` stopped midway for `reason`: recorded as
    /// interrupted, after the last durable progress, and the deal waits for the client to
    /// restart the push.
    async fn interrupted(&self, stream_id: Uuid, reason: String, ctx: &DecideContext) {
        let session = self.sessions.lock().await.remove(&stream_id);
        if let Some(session) = session {
            let _ = session.finish().await;
        }
        let interrupted = P::DataTransferInterrupted { reason };
        // A push that finished meanwhile has moved on: nothing to record.
        if let Err(e) = self.record(stream_id, interrupted, ctx).await {
            tracing::debug!(stream = %stream_id, error = %e, "transfer not interrupted");
        }
    }

    async fn try_answer(
        &self,
        stream_id: Uuid,
        carrier: u64,
        request: MarketRequest,
        ctx: &DecideContext,
    ) -> Result<MarketResponse, String> {
        let text = |e: &dyn std::fmt::Display| e.to_string();
        match request {
            MarketRequest::TransferOpen { total_bytes, .. } => {
                let deal =
                    self.deals.load::<StorageProvider>(stream_id).await.map_err(|e| text(&e))?;
                let proposal = deal.data.proposal.clone().ok_or("no proposal")?;
                if total_bytes > proposal.proposal.piece_size.0 {
                    return Err(format!("{total_bytes} bytes do not fit the deal's piece"));
                }
                match deal.state {
                    ProviderState::WaitingForData => {
                        self.record(stream_id, P::DataTransferStarted, ctx).await?;
                    }
                    ProviderState::ProviderTransferAwaitRestart => {
                        self.record(stream_id, P::DataTransferRestarted, ctx).await?;
                    }
                    ProviderState::Transferring => {}
                    // Every byte arrived but the node stopped before its verdict: give it now.
                    ProviderState::VerifyData => {
                        self.verify_again(stream_id, &deal, ctx).await?;
                        return Ok(MarketResponse::TransferAccepted {
                            resume_from: deal.data.bytes_received,
                        });
                    }
                    // Every byte already arrived and was checked (the client restarted before
                    // it saw the verdict): nothing more to send; the finish repeats the verdict.
                    state if settled(state) => {
                        return Ok(MarketResponse::TransferAccepted {
                            resume_from: deal.data.bytes_received,
                        });
                    }
                    state => {
                        return Err(format!("deal is in {}, not waiting for data", state.name()));
                    }
                }
                let key = proposal.cid().to_string();
                let mut sessions = self.sessions.lock().await;
                // A push reopened over one still open: the old one's last writes land first.
                if let Some(previous) = sessions.remove(&stream_id) {
                    let _ = previous.finish().await;
                }
                let recorded = deal.data.bytes_received;
                let (appender, received, hasher) =
                    self.store.open_partial(&key, recorded).await.map_err(|e| text(&e))?;
                let every = self.options.progress_every;
                let record = self.progress(stream_id, ctx);
                let session = Session::start(appender, hasher, received, carrier, every, record);
                sessions.insert(stream_id, session);
                Ok(MarketResponse::TransferAccepted { resume_from: received })
            }
            MarketRequest::TransferChunk { offset, bytes, .. } => {
                let mut sessions = self.sessions.lock().await;
                let session = sessions
                    .get_mut(&stream_id)
                    .ok_or("no open transfer for this deal: open it first")?;
                if offset != session.received {
                    return Err(format!(
                        "chunk at offset {offset}, but {} bytes are kept",
                        session.received
                    ));
                }
                let received = match session.accept(bytes).await {
                    Ok(received) => received,
                    Err(reason) => {
                        if let Some(failed) = sessions.remove(&stream_id) {
                            let _ = failed.finish().await;
                        }
                        return Err(reason);
                    }
                };
                Ok(MarketResponse::ChunkAcknowledged { received })
            }
            MarketRequest::TransferFinish { .. } => {
                let Some(session) = self.sessions.lock().await.remove(&stream_id) else {
                    // A finish repeated after the verdict: the same verdict.
                    let deal = self
                        .deals
                        .load::<StorageProvider>(stream_id)
                        .await
                        .map_err(|e| text(&e))?;
                    if deal.state == ProviderState::VerifyData {
                        return self.verify_again(stream_id, &deal, ctx).await;
                    }
                    if !settled(deal.state) {
                        return Err("no open transfer for this deal".into());
                    }
                    return Ok(MarketResponse::TransferVerified { verified: true, reason: None });
                };
                let received = session.finish().await?;
                let deal =
                    self.deals.load::<StorageProvider>(stream_id).await.map_err(|e| text(&e))?;
                let proposal = deal.data.proposal.clone().ok_or("no proposal")?;
                let key = proposal.cid().to_string();
                self.record(stream_id, P::DataTransferCompleted { bytes: received.bytes }, ctx)
                    .await?;
                // VerifyData's effect, performed: the commitment of the bytes received.
                let terms = &proposal.proposal;
                let verdict = commitment_verdict(received.hasher, terms);
                self.settle_verdict(stream_id, &key, terms, verdict, ctx).await
            }
            other => Err(format!("{} is not a transfer request", other.protocol())),
        }
    }

    /// VerifyData's effect, performed again for a deal left in VerifyData (the node stopped
    /// between recording the completed transfer and the verdict): from the received data if
    /// it is still partial, or — when the store already kept it as the piece, which it does
    /// only after the commitment matched — from that.
    async fn verify_again(
        &self,
        stream_id: Uuid,
        deal: &crate::fsm::Deal<StorageProvider>,
        ctx: &DecideContext,
    ) -> Result<MarketResponse, String> {
        // Whatever session this process still holds for the deal is over.
        let session = self.sessions.lock().await.remove(&stream_id);
        if let Some(session) = session {
            let _ = session.finish().await;
        }
        let proposal = deal.data.proposal.clone().ok_or("no proposal")?;
        let key = proposal.cid().to_string();
        let terms = &proposal.proposal;
        if self.store.size(&terms.piece_cid).await.is_some() {
            self.record(stream_id, P::DataVerified { piece_cid: terms.piece_cid }, ctx).await?;
            return Ok(MarketResponse::TransferVerified { verified: true, reason: None });
        }
        let verdict = match self.store.open_partial(&key, deal.data.bytes_received).await {
            Ok((_, _, hasher)) => commitment_verdict(hasher, terms),
            Err(e) => Err(format!("the received data is gone: {e}")),
        };
        self.settle_verdict(stream_id, &key, terms, verdict, ctx).await
    }

    /// Keeps or drops the received data by `verdict` and records it on the deal.
    async fn settle_verdict(
        &self,
        stream_id: Uuid,
        key: &str,
        terms: &crate::domain::storage::StorageDealProposal,
        verdict: Result<(), String>,
        ctx: &DecideContext,
    ) -> Result<MarketResponse, String> {
        self.store
            .settle_partial(key, &terms.piece_cid, verdict.is_ok())
            .await
            .map_err(|e| e.to_string())?;
        match verdict {
            Ok(()) => {
                self.record(stream_id, P::DataVerified { piece_cid: terms.piece_cid }, ctx).await?;
                Ok(MarketResponse::TransferVerified { verified: true, reason: None })
            }
            Err(reason) => {
                self.record(stream_id, P::DataVerificationFailed { reason: reason.clone() }, ctx)
                    .await?;
                Ok(MarketResponse::TransferVerified { verified: false, reason: Some(reason) })
            }
        }
    }
}

/// Whether the commitment of the bytes `hasher` saw is the proposal's piece CID.
fn commitment_verdict(
    hasher: CommP,
    terms: &crate::domain::storage::StorageDealProposal,
) -> Result<(), String> {
    match hasher.finish_at(terms.piece_size) {
        Ok(actual) if actual == terms.piece_cid => Ok(()),
        Ok(actual) => Err(format!("the data's commitment is {actual}, not {}", terms.piece_cid)),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether a provider deal is past its transfer: every byte arrived and its commitment
/// matched.
fn settled(state: ProviderState) -> bool {
    use ProviderState as S;
    matches!(
        state,
        S::ReserveProviderFunds
            | S::ProviderFunding
            | S::Publish
            | S::Publishing
            | S::Staged
            | S::AwaitingPreCommit
            | S::Sealing
            | S::Finalizing
            | S::Active
            | S::Expired
            | S::Slashed
    )
}
