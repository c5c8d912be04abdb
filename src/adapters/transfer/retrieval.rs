//! Data transfer for retrieval deals (seed retrieval steps 2e-2k): the client pulls its part
//! in chunks; the provider stops at each payment interval (growing by the increase) until a
//! signed voucher for the bytes so far arrives. Which payment is due, and whether the client
//! pays it, are the machines' decisions; this module carries bytes and vouchers.

use ed25519_dalek::SigningKey;
use libp2p::PeerId;
use uuid::Uuid;

use super::{CHUNK_BYTES, PushError};
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
#[derive(Debug, Clone)]
pub struct ProviderRetrievals {
    deals: Deals,
    store: PieceStore,
}

impl ProviderRetrievals {
    /// Serving parts of pieces in `store`, recording through `deals`.
    pub fn new(deals: Deals, store: PieceStore) -> Self {
        Self { deals, store }
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
            MarketRequest::RetrievalPull { offset, .. } => {
                let mut state = deal.state;
                if state == ProviderState::Unsealed {
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
            MarketRequest::RetrievalPay { voucher, .. } => {
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
    /// The bytes received.
    pub bytes: Vec<u8>,
    /// Paid in total, in attoFIL.
    pub paid: TokenAmount,
}

/// Pulls a client retrieval deal's part from the provider deal `provider_stream`, paying each
/// interval with vouchers signed by `key` up to `funds_limit` in total. The deal must be
/// `Ongoing` (its payment channel and lane set up).
pub async fn pull(
    client: &Client,
    deals: &Deals,
    stream_id: Uuid,
    provider_stream: Uuid,
    key: &SigningKey,
    funds_limit: TokenAmount,
    ctx: &DecideContext,
) -> Result<PullOutcome, PushError> {
    let deal = deals.load::<RetrievalClient>(stream_id).await?;
    let (Some(terms), Some(channel), Some(lane)) =
        (deal.data.proposal.clone(), deal.data.channel.clone(), deal.data.lane)
    else {
        return Err(PushError::NotReady { stream_id, state: deal.state.name() });
    };
    if deal.state != ClientState::Ongoing {
        return Err(PushError::NotReady { stream_id, state: deal.state.name() });
    }
    let provider =
        terms.provider.peer_id().ok_or_else(|| PushError::Refused("bad provider key".into()))?;
    let record = |event: C| async move {
        deals.handle::<RetrievalClient>(stream_id, event, ctx, None).await
    };
    let mut received = Vec::with_capacity(terms.part.length as usize);
    let mut payments = deal.data.payments;
    loop {
        let offset = received.len() as u64;
        let pulled = client
            .request(
                provider,
                MarketRequest::RetrievalPull { deal_stream: provider_stream, offset },
            )
            .await
            .map_err(PushError::Interrupted)?;
        let MarketResponse::RetrievalBlocks { bytes, payment_due, complete, .. } = pulled else {
            return Err(PushError::Refused(format!("{pulled:?}")));
        };
        if !bytes.is_empty() {
            received.extend_from_slice(&bytes);
            let total = received.len() as u64;
            let event = if total == terms.part.length {
                C::AllBlocksReceived { bytes: total }
            } else {
                C::BlocksReceived { bytes: total }
            };
            record(event).await?;
        }
        let mut done = complete;
        if let Some((owed, last)) = payment_due {
            record(if last {
                C::LastPaymentRequested { owed }
            } else {
                C::PaymentRequested { owed }
            })
            .await?;
            if owed > funds_limit {
                let reason = format!("{owed} owed is over the funds limit of {funds_limit}");
                let stopped = record(C::FundsInsufficient { reason }).await?.deal;
                return Ok(PullOutcome {
                    state: stopped.state.name(),
                    bytes: received,
                    paid: stopped.data.paid,
                });
            }
            record(C::FundsAvailable).await?;
            let voucher = Box::new(SignedVoucher::sign(
                PaymentVoucher {
                    channel: channel.clone(),
                    lane,
                    nonce: payments.into(),
                    amount: owed,
                },
                key,
            ));
            record(C::PaymentSent { voucher: voucher.clone() }).await?;
            payments += 1;
            let paid = client
                .request(
                    provider,
                    MarketRequest::RetrievalPay { deal_stream: provider_stream, voucher },
                )
                .await
                .map_err(PushError::Interrupted)?;
            match paid {
                MarketResponse::PaymentAccepted { complete, .. } => done |= complete,
                other => return Err(PushError::Refused(format!("{other:?}"))),
            }
        }
        if done {
            record(C::ProviderCompleted).await?;
            // CheckComplete's effect, performed: every byte of the part arrived.
            let event = if received.len() as u64 == terms.part.length {
                C::CompletionVerified
            } else {
                C::CompletionVerificationFailed {
                    reason: format!("{} of {} bytes arrived", received.len(), terms.part.length),
                }
            };
            let after = record(event).await?.deal;
            return Ok(PullOutcome {
                state: after.state.name(),
                bytes: received,
                paid: after.data.paid,
            });
        }
    }
}
