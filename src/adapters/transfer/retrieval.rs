//! Data transfer for retrieval deals (seed retrieval steps 2e-2k): the client pulls its part
//! in chunks; the provider stops at each payment interval (growing by the increase) until a
//! signed voucher for the bytes so far arrives. Which payment is due, and whether the client
//! pays it, are the machines' decisions; this module carries bytes and vouchers.

use ed25519_dalek::SigningKey;
use libp2p::PeerId;
use uuid::Uuid;

use super::channel::TransferChannel;
use super::{CHUNK_BYTES, PushError};
use crate::adapters::chain::PaymentChannels;
use crate::adapters::network::Client;
use crate::adapters::network::message::{MarketRequest, MarketResponse};
use crate::adapters::piece::store::PieceStore;
use crate::deals::Deals;
use crate::domain::TokenAmount;
use crate::domain::retrieval::{PaymentVoucher, SignedVoucher};
use crate::fsm::retrieval_client::{
    RetrievalClient, RetrievalClientEvent as C, State as ClientState,
};
use crate::fsm::retrieval_provider::{
    RetrievalProvider, RetrievalProviderEvent as P, State as ProviderState,
};
use crate::fsm::{DecideContext, Label};

/// The provider's side of retrieval pulls.
#[derive(Clone)]
pub struct ProviderRetrievals {
    deals: Deals,
    store: PieceStore,
    channels: Option<std::sync::Arc<dyn PaymentChannels>>,
}

impl std::fmt::Debug for ProviderRetrievals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderRetrievals")
            .field("store", &self.store)
            .field("checks_payment_channels", &self.channels.is_some())
            .finish_non_exhaustive()
    }
}

impl ProviderRetrievals {
    /// Serving parts of pieces in `store`, recording through `deals`.
    pub fn new(deals: Deals, store: PieceStore) -> Self {
        Self { deals, store, channels: None }
    }

    /// Checks payment channels on `channels` (the chain): no byte flows before the client has
    /// a channel funded for the deal, and no voucher is taken that the channel would refuse.
    pub fn with_payment_channels(mut self, channels: std::sync::Arc<dyn PaymentChannels>) -> Self {
        self.channels = Some(channels);
        self
    }

    /// Answers a pull or a payment from `peer` for the provider deal `deal_stream`.
    pub async fn answer(
        &self,
        peer: PeerId,
        request: MarketRequest,
        ctx: &DecideContext,
    ) -> MarketResponse {
        match self.try_answer(peer, request, ctx).await {
            Ok(response) => response,
            Err(reason) => MarketResponse::Rejected { reason },
        }
    }

    async fn try_answer(
        &self,
        peer: PeerId,
        request: MarketRequest,
        ctx: &DecideContext,
    ) -> Result<MarketResponse, String> {
        let (MarketRequest::RetrievalPull { deal_stream, .. }
        | MarketRequest::RetrievalPay { deal_stream, .. }) = &request
        else {
            return Err("not a retrieval transfer request".into());
        };
        let deal_stream = *deal_stream;
        let deal =
            self.deals.load::<RetrievalProvider>(deal_stream).await.map_err(|e| e.to_string())?;
        let terms = deal.data.proposal.clone().ok_or("no such retrieval deal")?;
        // The pull validator: only the deal's client, only for an accepted, unsealed deal.
        if terms.client.peer_id() != Some(peer) {
            return Err(format!("{peer} is not this deal's client"));
        }
        let record = |event: P| async move {
            self.deals
                .handle::<RetrievalProvider>(deal_stream, event, ctx, None)
                .await
                .map_err(|e| e.to_string())
        };
        match request {
            MarketRequest::RetrievalPull { offset, .. } if offset < deal.data.bytes_sent => {
                // The client restarted and lost bytes it was sent: send them again. They were
                // recorded (and priced) when first sent, so nothing is recorded now.
                let end = deal.data.bytes_sent.min(offset + CHUNK_BYTES as u64);
                let piece = terms.piece_cid.ok_or("no piece CID")?;
                let bytes = self
                    .store
                    .read_range(&piece, terms.part.offset + offset, end - offset)
                    .await
                    .map_err(|e| e.to_string())?;
                let payment_due = match deal.state {
                    ProviderState::FundsNeeded => Some((deal.data.owed, false)),
                    ProviderState::FundsNeededLastPayment => Some((deal.data.owed, true)),
                    _ => None,
                };
                let complete =
                    matches!(deal.state, ProviderState::Finalizing | ProviderState::Completed);
                Ok(MarketResponse::RetrievalBlocks { offset, bytes, payment_due, complete })
            }
            MarketRequest::RetrievalPull { offset, .. } => {
                let mut state = deal.state;
                if state == ProviderState::Unsealing {
                    // The node stopped between accepting the deal and unsealing its piece
                    // (the piece store keeps unsealed copies, so there is nothing to do but
                    // record it): the client's first pull finishes it.
                    state = record(P::PieceUnsealed).await?.deal.state;
                }
                if state == ProviderState::Unsealed {
                    // The pull validator: the client's channel must be funded for the deal.
                    if let Some(channels) = &self.channels {
                        let price = terms.total_price().ok_or("the deal's price overflows")?;
                        channels.check_funded(terms.client, terms.provider, price).await?;
                    }
                    state = record(P::DataTransferStarted).await?.deal.state;
                }
                let due = |d: &crate::fsm::Deal<RetrievalProvider>| match d.state {
                    ProviderState::FundsNeeded => Some((d.data.owed, false)),
                    ProviderState::FundsNeededLastPayment => Some((d.data.owed, true)),
                    _ => None,
                };
                if state != ProviderState::Ongoing {
                    let complete =
                        matches!(state, ProviderState::Finalizing | ProviderState::Completed);
                    return Ok(MarketResponse::RetrievalBlocks {
                        offset,
                        bytes: Vec::new(),
                        payment_due: due(&deal),
                        complete,
                    });
                }
                if offset != deal.data.bytes_sent {
                    return Err(format!(
                        "pull from {offset}, but {} bytes were sent",
                        deal.data.bytes_sent
                    ));
                }
                let unlocked = terms.bytes_unlocked_after(deal.data.payments);
                let end = unlocked.min(terms.part.length).min(offset + CHUNK_BYTES as u64);
                let piece = terms.piece_cid.ok_or("no piece CID")?;
                let bytes = self
                    .store
                    .read_range(&piece, terms.part.offset + offset, end - offset)
                    .await
                    .map_err(|e| e.to_string())?;
                let event = if end == terms.part.length {
                    P::AllBlocksSent { bytes: end }
                } else {
                    P::BlocksSent { bytes: end }
                };
                let after = record(event).await?.deal;
                let complete = after.state == ProviderState::Finalizing;
                if complete {
                    record(P::CompletionSent).await?;
                }
                Ok(MarketResponse::RetrievalBlocks {
                    offset,
                    bytes,
                    payment_due: due(&after),
                    complete,
                })
            }
            MarketRequest::RetrievalPay { voucher, .. }
                if deal.data.best_voucher.as_ref() == Some(&*voucher) =>
            {
                // The voucher already taken, sent again by a client that restarted before it
                // saw the answer: answer the same, record nothing.
                let complete =
                    matches!(deal.state, ProviderState::Finalizing | ProviderState::Completed);
                Ok(MarketResponse::PaymentAccepted { paid: deal.data.paid, complete })
            }
            MarketRequest::RetrievalPay { voucher, .. } => {
                if let Some(channels) = &self.channels {
                    channels.check_voucher(&voucher, terms.client, terms.provider).await?;
                }
                let after = record(P::PaymentReceived { voucher }).await?.deal;
                let complete = after.state == ProviderState::Finalizing;
                if complete {
                    record(P::CompletionSent).await?;
                }
                Ok(MarketResponse::PaymentAccepted { paid: after.data.paid, complete })
            }
            _ => Err("not a retrieval transfer request".into()),
        }
    }
}

/// What a pull ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullOutcome {
    /// The client deal's state: `Completed`, or `InsufficientFunds` at the funds limit.
    pub state: &'static str,
    /// Where in the part [`PullOutcome::bytes`] start: 0, or the offset a resumed pull
    /// started from (the bytes before it arrived in an earlier pull).
    pub offset: u64,
    /// The bytes received by this pull.
    pub bytes: Vec<u8>,
    /// Paid in total, in attoFIL.
    pub paid: TokenAmount,
}

/// Pulls a client retrieval deal's part from the provider deal `provider_stream`, paying each
/// interval with vouchers signed by `key` up to `funds_limit` in total. The deal's payment
/// channel and lane must be set up. A pull resumes wherever the client's journal says the
/// deal is — after a crash or a dropped connection, from the last bytes it recorded, the
/// payment it was about to make, or the voucher the provider may not have received.
pub async fn pull(
    client: &Client,
    deals: &Deals,
    stream_id: Uuid,
    provider_stream: Uuid,
    key: &SigningKey,
    funds_limit: TokenAmount,
    ctx: &DecideContext,
) -> Result<PullOutcome, PushError> {
    pull_into(client, deals, stream_id, provider_stream, key, funds_limit, ctx, None).await
}

/// A file retrieved bytes are written to, each at `base` + its offset in the part, before
/// they are recorded as received — so what the journal says arrived is on disk, and a
/// resumed pull continues the same file.
pub struct PullSink<'a> {
    /// The file.
    pub file: &'a mut tokio::fs::File,
    /// Where the part's first byte goes.
    pub base: u64,
}

/// [`pull`], writing the bytes into `sink` as they arrive.
#[allow(clippy::too_many_arguments)]
pub async fn pull_into(
    client: &Client,
    deals: &Deals,
    stream_id: Uuid,
    provider_stream: Uuid,
    key: &SigningKey,
    funds_limit: TokenAmount,
    ctx: &DecideContext,
    mut sink: Option<PullSink<'_>>,
) -> Result<PullOutcome, PushError> {
    let deal = deals.load::<RetrievalClient>(stream_id).await?;
    let (Some(terms), Some(channel), Some(lane)) =
        (deal.data.proposal.clone(), deal.data.channel.clone(), deal.data.lane)
    else {
        return Err(PushError::NotReady { stream_id, state: deal.state.name() });
    };
    let provider =
        terms.provider.peer_id().ok_or_else(|| PushError::Refused("bad provider key".into()))?;
    let record = |event: C| async move {
        deals.handle::<RetrievalClient>(stream_id, event, ctx, None).await.map(|d| d.deal)
    };
    let start = deal.data.bytes_received;
    let mut received = Vec::with_capacity((terms.part.length - start) as usize);
    let mut deal = deal;
    let mut idle = 0;
    let mut stream = None;
    // One transfer stream for the whole pull, closed cleanly however the pull ends.
    let pulled = async {
        loop {
            let outcome =
                |deal: &crate::fsm::Deal<RetrievalClient>, received: Vec<u8>| PullOutcome {
                    state: deal.state.name(),
                    offset: start,
                    bytes: received,
                    paid: deal.data.paid,
                };
            deal = match deal.state {
                ClientState::FundsNeeded | ClientState::FundsNeededLastPayment => {
                    if deal.data.owed > funds_limit {
                        let reason = format!(
                            "{} owed is over the funds limit of {funds_limit}",
                            deal.data.owed
                        );
                        let stopped = record(C::FundsInsufficient { reason }).await?;
                        return Ok(outcome(&stopped, received));
                    }
                    record(C::FundsAvailable).await?
                }
                ClientState::SendFunds | ClientState::SendFundsLastPayment => {
                    let voucher = Box::new(SignedVoucher::sign(
                        PaymentVoucher {
                            channel: channel.clone(),
                            lane,
                            nonce: deal.data.payments.into(),
                            amount: deal.data.owed,
                        },
                        key,
                    ));
                    let paid = record(C::PaymentSent { voucher: voucher.clone() }).await?;
                    pay(&mut stream, client, provider, provider_stream, voucher, &record)
                        .await?
                        .unwrap_or(paid)
                }
                ClientState::CheckComplete => {
                    // VerifyData's effect, performed: every byte of the part arrived.
                    let event = if deal.data.bytes_received == terms.part.length {
                        C::CompletionVerified
                    } else {
                        C::CompletionVerificationFailed {
                            reason: format!(
                                "{} of {} bytes arrived",
                                deal.data.bytes_received, terms.part.length
                            ),
                        }
                    };
                    let after = record(event).await?;
                    return Ok(outcome(&after, received));
                }
                ClientState::Ongoing | ClientState::BlocksComplete | ClientState::Finalizing => {
                    let offset = deal.data.bytes_received;
                    let pull =
                        MarketRequest::RetrievalPull { deal_stream: provider_stream, offset };
                    let pulled = ask(&mut stream, client, provider, &pull).await?;
                    let MarketResponse::RetrievalBlocks { bytes, payment_due, complete, .. } =
                        pulled
                    else {
                        return Err(PushError::Refused(format!("{pulled:?}")));
                    };
                    let mut after = deal;
                    let progressed = !bytes.is_empty() || payment_due.is_some() || complete;
                    if !bytes.is_empty() {
                        if let Some(sink) = sink.as_mut() {
                            use tokio::io::{AsyncSeekExt, AsyncWriteExt};
                            let at = std::io::SeekFrom::Start(sink.base + offset);
                            sink.file.seek(at).await.map_err(PushError::Source)?;
                            sink.file.write_all(&bytes).await.map_err(PushError::Source)?;
                            sink.file.flush().await.map_err(PushError::Source)?;
                        }
                        received.extend_from_slice(&bytes);
                        let total = offset + bytes.len() as u64;
                        after = record(if total == terms.part.length {
                            C::AllBlocksReceived { bytes: total }
                        } else {
                            C::BlocksReceived { bytes: total }
                        })
                        .await?;
                    }
                    match payment_due {
                        // Asked again for what was already paid: the voucher was lost on the way.
                        Some((owed, _)) if owed <= after.data.paid => {
                            let voucher = after.data.last_voucher.clone().ok_or_else(|| {
                                PushError::Refused(
                                    "payment asked again, no voucher recorded".into(),
                                )
                            })?;
                            let voucher = Box::new(voucher);
                            if let Some(done) = pay(
                                &mut stream,
                                client,
                                provider,
                                provider_stream,
                                voucher,
                                &record,
                            )
                            .await?
                            {
                                after = done;
                            }
                        }
                        Some((owed, last)) => {
                            after = record(if last {
                                C::LastPaymentRequested { owed }
                            } else {
                                C::PaymentRequested { owed }
                            })
                            .await?;
                        }
                        None if complete => after = record(C::ProviderCompleted).await?,
                        None => {}
                    }
                    idle = if progressed { 0 } else { idle + 1 };
                    if idle > 3 {
                        return Err(PushError::Refused("the provider sends nothing".into()));
                    }
                    after
                }
                _ => return Ok(outcome(&deal, received)),
            };
        }
    }
    .await;
    if let Some(open) = stream.take() {
        open.close().await;
    }
    pulled
}

/// Asks `request` on the pull's transfer stream, opening it first if there is none; a stream
/// that failed is dropped, so the next ask (after the failure is recorded) opens a new one.
async fn ask(
    channel: &mut Option<TransferChannel>,
    client: &Client,
    provider: PeerId,
    request: &MarketRequest,
) -> Result<MarketResponse, PushError> {
    let open = match channel {
        Some(open) => open,
        None => channel
            .insert(TransferChannel::open(client, provider).await.map_err(PushError::Interrupted)?),
    };
    match open.request(request).await {
        Ok(response) => Ok(response),
        Err(e) => {
            *channel = None;
            Err(PushError::Interrupted(e))
        }
    }
}

/// Sends a voucher; when the provider says the part is complete, records it. Returns the
/// deal after recording, if anything was recorded.
async fn pay<F, Fut>(
    channel: &mut Option<TransferChannel>,
    client: &Client,
    provider: PeerId,
    provider_stream: Uuid,
    voucher: Box<SignedVoucher>,
    record: &F,
) -> Result<Option<crate::fsm::Deal<RetrievalClient>>, PushError>
where
    F: Fn(C) -> Fut,
    Fut: std::future::Future<
            Output = Result<crate::fsm::Deal<RetrievalClient>, crate::deals::DealsError>,
        >,
{
    let pay = MarketRequest::RetrievalPay { deal_stream: provider_stream, voucher };
    let paid = ask(channel, client, provider, &pay).await?;
    match paid {
        MarketResponse::PaymentAccepted { complete: true, .. } => {
            Ok(Some(record(C::ProviderCompleted).await?))
        }
        MarketResponse::PaymentAccepted { .. } => Ok(None),
        other => Err(PushError::Refused(format!("{other:?}"))),
    }
}
