//! Data transfer for storage deals (seed storage flow steps 4-8): the client pushes the deal's
//! bytes over `/dealledger/transfer/1` in chunks, each acknowledged with the bytes the provider
//! keeps. Transfer events become machine inputs; progress is recorded every
//! [`TransferOptions::progress_every`] bytes, not per chunk, so the journal does not bloat.
//! After a dropped connection either side reopens the transfer and it resumes from the last
//! offset recorded in the provider's journal, not from zero.

pub mod retrieval;

use std::collections::HashMap;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::adapters::piece::commp::CommP;

use crate::adapters::network::message::{MarketRequest, MarketResponse};
use crate::adapters::network::{Client, NetworkError};
use crate::adapters::piece::store::PieceStore;
use crate::deals::{Deals, DealsError};
use crate::fsm::storage_client::{State as ClientState, StorageClient, StorageClientEvent as C};
use crate::fsm::storage_provider::{
    State as ProviderState, StorageProvider, StorageProviderEvent as P,
};
use crate::fsm::{DecideContext, Label, Machine};

/// Bytes per chunk.
pub const CHUNK_BYTES: usize = 256 * 1024;

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
    /// The data could not be read; nothing about the transfer was recorded for it.
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
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
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
    let open = MarketRequest::TransferOpen { proposal_cid, total_bytes: total };
    let mut offset = match client.request(provider, open).await {
        Ok(MarketResponse::TransferAccepted { resume_from }) => resume_from,
        Ok(other) => return Err(PushError::Refused(format!("{other:?}"))),
        Err(e) if started.is_none() => return interrupted(e).await,
        Err(e) => return Err(PushError::Unreachable(e)),
    };
    if let Some(event) = started {
        record(event).await?;
    }
    let mut recorded = deal.data.bytes_sent;
    while offset < total {
        let end = (offset + options.chunk_bytes as u64).min(total);
        let mut bytes = vec![0u8; (end - offset) as usize];
        let read = async {
            data.seek(std::io::SeekFrom::Start(offset)).await?;
            data.read_exact(&mut bytes).await
        };
        if let Err(e) = read.await {
            return Err(PushError::Source(e));
        }
        match client
            .request(provider, MarketRequest::TransferChunk { proposal_cid, offset, bytes })
            .await
        {
            Ok(MarketResponse::ChunkAcknowledged { received })
                if received > offset && received <= total =>
            {
                offset = received;
            }
            Ok(other) => return Err(PushError::Refused(format!("{other:?}"))),
            Err(e) => return interrupted(e).await,
        }
        if offset - recorded >= options.progress_every && offset < total {
            record(C::DataTransferProgressed { bytes: offset }).await?;
            recorded = offset;
        }
    }
    let verdict =
        match client.request(provider, MarketRequest::TransferFinish { proposal_cid }).await {
            Ok(MarketResponse::TransferVerified { verified, reason }) => (verified, reason),
            Ok(other) => return Err(PushError::Refused(format!("{other:?}"))),
            Err(e) => return interrupted(e).await,
        };
    let mut state = record(C::DataTransferCompleted { bytes: total }).await?.deal.state;
    if let (false, reason) = verdict {
        let reason = reason.unwrap_or_else(|| "the provider could not verify the data".into());
        state = record(C::ProviderFailedDeal { reason }).await?.deal.state;
    }
    Ok(state.name())
}

/// One open push on the provider: the file being appended to and the commitment so far, so
/// that chunks neither replay the deal nor reopen the file, and the end needs no second read.
struct Session {
    file: tokio::fs::File,
    hasher: CommP,
    received: u64,
    recorded: u64,
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

    /// Answers one transfer request about the provider deal `stream_id`.
    pub async fn answer(
        &self,
        stream_id: Uuid,
        request: MarketRequest,
        ctx: &DecideContext,
    ) -> MarketResponse {
        match self.try_answer(stream_id, request, ctx).await {
            Ok(response) => response,
            Err(reason) => MarketResponse::Rejected { reason },
        }
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

    /// The client `peer` went away: each of its pushes still in flight is recorded as
    /// interrupted, as the client records its side, and its deal waits for the client to
    /// restart the push (from the offset recorded here) or times out with that reason.
    pub async fn connection_lost(&self, peer: libp2p::PeerId, ctx: &DecideContext) {
        let transferring: Result<Vec<Uuid>, sqlx::Error> = sqlx::query_scalar(
            "SELECT stream_id FROM storage_deals \
             WHERE side = $1 AND state = 'Transferring' AND client = $2",
        )
        .bind(StorageProvider::NAME)
        .bind(peer.to_base58())
        .fetch_all(self.deals.journal().pool())
        .await;
        let streams = match transferring {
            Ok(streams) => streams,
            Err(e) => return tracing::warn!(%peer, error = %e, "could not find its transfers"),
        };
        for stream in streams {
            self.sessions.lock().await.remove(&stream);
            let reason = format!("the connection to the client {peer} closed");
            let interrupted = P::DataTransferInterrupted { reason };
            // A push that finished meanwhile has moved on: nothing to record.
            if let Err(e) = self.record(stream, interrupted, ctx).await {
                tracing::debug!(%stream, error = %e, "transfer not interrupted");
            }
        }
    }

    async fn try_answer(
        &self,
        stream_id: Uuid,
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
                let recorded = deal.data.bytes_received;
                let (file, received, hasher) =
                    self.store.open_partial(&key, recorded).await.map_err(|e| text(&e))?;
                let session = Session { file, hasher, received, recorded };
                self.sessions.lock().await.insert(stream_id, session);
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
                session.file.write_all(&bytes).await.map_err(|e| text(&e))?;
                session.hasher.update(&bytes);
                session.received += bytes.len() as u64;
                let received = session.received;
                if received - session.recorded >= self.options.progress_every {
                    session.file.flush().await.map_err(|e| text(&e))?;
                    session.file.sync_data().await.map_err(|e| text(&e))?;
                    if let Err(e) = self
                        .record(stream_id, P::DataTransferProgressed { bytes: received }, ctx)
                        .await
                    {
                        sessions.remove(&stream_id);
                        return Err(e);
                    }
                    session.recorded = received;
                }
                Ok(MarketResponse::ChunkAcknowledged { received })
            }
            MarketRequest::TransferFinish { .. } => {
                let Some(mut session) = self.sessions.lock().await.remove(&stream_id) else {
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
                session.file.flush().await.map_err(|e| text(&e))?;
                let deal =
                    self.deals.load::<StorageProvider>(stream_id).await.map_err(|e| text(&e))?;
                let proposal = deal.data.proposal.clone().ok_or("no proposal")?;
                let key = proposal.cid().to_string();
                self.record(stream_id, P::DataTransferCompleted { bytes: session.received }, ctx)
                    .await?;
                // VerifyData's effect, performed: the commitment of the bytes received.
                let terms = &proposal.proposal;
                let verdict = commitment_verdict(session.hasher, terms);
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
        self.sessions.lock().await.remove(&stream_id);
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
