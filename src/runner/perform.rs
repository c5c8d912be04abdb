//! Performing one effect: the chain call (or network request) it stands for, and the machine
//! input its result becomes. Nothing here decides where a deal goes next — the result is fed
//! to the deal's machine, which does.

use std::time::Duration;

use uuid::Uuid;

use super::{EffectRunner, RunnerError};
use crate::adapters::chain::{Chain, MessageKey, MessageStatus, OnChainDealState, SealingPipeline};
use crate::adapters::chain::{DealObservation, SealingStatus};
use crate::deals::DealsError;
use crate::domain::{DealId, TokenAmount};
use crate::events::outbox::PendingEffect;
use crate::fsm::effects::{Effect, Notice, OutboundMessage, TransferDirection};
use crate::fsm::failure::Stalled;
use crate::fsm::retrieval_client::{RetrievalClient, RetrievalClientEvent as RC};
use crate::fsm::retrieval_provider::{RetrievalProvider, RetrievalProviderEvent as RP};
use crate::fsm::retrieval_request::{RetrievalRequestEvent as RR, RetrievalRequestMachine};
use crate::fsm::storage_client::{StorageClient, StorageClientEvent as SC};
use crate::fsm::storage_provider::{StorageProvider, StorageProviderEvent as SP};
use crate::fsm::{
    Machine, retrieval_client, retrieval_provider, retrieval_request, storage_client,
    storage_provider,
};

/// A machine input an effect's result became, for the stream that caused the effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feedback {
    /// For a storage client deal.
    StorageClient(SC),
    /// For a storage provider deal.
    StorageProvider(SP),
    /// For a retrieval client deal.
    RetrievalClient(RC),
    /// For a retrieval provider deal.
    RetrievalProvider(RP),
    /// For another stream: the retrieval request a deal belongs to.
    RetrievalRequest(Uuid, RR),
}

/// What performing an effect came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done; its result is this input.
    Feed(Feedback),
    /// Done; nothing to tell the machine.
    Done,
    /// Done elsewhere, or not this runner's to do: completed with this note.
    Skipped(&'static str),
    /// What it waits for has not happened yet: look again after this long (or at the next
    /// chain head).
    Wait(Duration),
}

/// The effect types this runner performs; other effects are left in the outbox for the
/// adapters that perform them (the network and transfer adapters).
pub const CHAIN_EFFECTS: &[&str] = &[
    "reserve-funds",
    "wait-for-funding",
    "release-funds",
    "publish-deal",
    "wait-for-message",
    "verify-deal-on-chain",
    "hand-off-to-sealing",
    "watch-pre-commit",
    "watch-activation",
    "watch-expiry",
    "clean-up-staged-data",
    "close-transfer",
    "set-up-payment-channel",
    "wait-for-payment-channel",
    "allocate-lane",
    "redeem-voucher",
    "notify",
    "cancel-retrieval-deals",
];

/// Effects that an adapter performs as the counterparty's request arrives, recording the
/// result itself: the provider service decides on a proposal and unseals, the transfer
/// adapters verify the piece, check funds, pay and verify received data. Every runner claims
/// them only to mark them done with a note, so a deal's open effects are exactly the ones
/// still to perform (and an ended deal has none).
pub const INLINE_EFFECTS: &[&str] = &[
    "decide-on-proposal",
    "await-transfer-restart",
    "verify-piece-commitment",
    "unseal-piece",
    "check-funds",
    "send-payment",
    "verify-received-data",
];

/// Effects that wait on the chain: re-armed at every new head.
pub const WATCH_EFFECTS: &[&str] = &[
    "wait-for-message",
    "verify-deal-on-chain",
    "watch-pre-commit",
    "watch-activation",
    "watch-expiry",
    "send",
];

/// The deterministic id of an effect's chain message: performing it twice sends it once.
pub fn message_key(effect: &PendingEffect) -> MessageKey {
    let mut subject = effect.stream_id.as_bytes().to_vec();
    subject.extend_from_slice(&effect.version.to_be_bytes());
    subject.extend_from_slice(&effect.seq.to_be_bytes());
    MessageKey::of(&effect.effect_type, &subject)
}

impl<C: Chain + Clone, S: SealingPipeline + Clone> EffectRunner<C, S> {
    /// Performs one claimed effect and says what it came to.
    pub(super) async fn perform(
        &self,
        pending: &PendingEffect,
        effect: &Effect,
    ) -> Result<Outcome, RunnerError> {
        let stream = pending.stream_id;
        let key = message_key(pending);
        let side = pending.stream_type.as_str();
        let storage = |client: SC, provider: SP| match side {
            StorageClient::NAME => Outcome::Feed(Feedback::StorageClient(client)),
            _ => Outcome::Feed(Feedback::StorageProvider(provider)),
        };
        let poll = self.config.watch_poll;
        Ok(match effect {
            Effect::ReserveFunds { wallet, amount } => {
                // Each deal deposits what it needs, keyed by the effect: a repeat adds nothing.
                self.chain.add_balance(*wallet, *amount, key).await?;
                storage(
                    SC::FundsReserved { amount: *amount },
                    SP::FundsReserved { amount: *amount },
                )
            }
            Effect::WaitForFunding { message: Some(message), .. } => {
                match self.chain.message_status(*message).await? {
                    MessageStatus::Pending => Outcome::Wait(poll),
                    MessageStatus::Failed { reason, .. } => storage(
                        SC::FundsReservationFailed { reason: reason.clone() },
                        SP::FundsReservationFailed { reason },
                    ),
                    MessageStatus::Landed { .. } => Outcome::Skipped("funding landed"),
                }
            }
            Effect::WaitForFunding { message: None, .. } => Outcome::Skipped("no funding message"),
            Effect::ReleaseFunds { wallet, amount } => {
                if self.published(pending).await? {
                    // The deal is on chain: the market actor holds its funds and releases them
                    // itself at expiry or slashing. Nothing to withdraw.
                } else if amount.0 > 0 {
                    let available = self.chain.market_balance(*wallet).await?.available();
                    let back = (*amount).min(available);
                    if back.0 > 0 {
                        self.chain.withdraw_balance(*wallet, back, key).await?;
                    }
                }
                self.after_cleanup_step(pending).await?
            }
            Effect::CloseTransfer { .. } => {
                // Transfers check the deal's state on every request: a deal that left its
                // transfer states gets no more bytes. Nothing is held open here.
                self.after_cleanup_step(pending).await?
            }
            Effect::PublishDeal { deal } => match self.chain.publish_storage_deal(deal).await {
                Ok(message) => {
                    Outcome::Feed(Feedback::StorageProvider(SP::PublishSent { message }))
                }
                Err(e) if !e.is_transient() => {
                    Outcome::Feed(Feedback::StorageProvider(SP::PublishFailed {
                        reason: e.to_string(),
                    }))
                }
                Err(e) => return Err(e.into()),
            },
            Effect::WaitForMessage { message } => {
                match self.chain.message_status(*message).await? {
                    MessageStatus::Pending => Outcome::Wait(poll),
                    MessageStatus::Landed { deal_id: Some(deal_id), .. } => {
                        Outcome::Feed(Feedback::StorageProvider(SP::DealPublished { deal_id }))
                    }
                    MessageStatus::Landed { deal_id: None, .. } => {
                        Outcome::Feed(Feedback::StorageProvider(SP::PublishFailed {
                            reason: "the publish message landed without a deal id".into(),
                        }))
                    }
                    // The message ran out of gas or funds on chain: sending it again as it is
                    // gives the same result, so the deal pauses for an operator to fix the
                    // wallet and retry.
                    MessageStatus::Failed { reason, .. } => {
                        Outcome::Feed(Feedback::StorageProvider(SP::EffectStalled(Stalled {
                            effect: pending.effect_type.clone(),
                            attempts: u32::try_from(pending.attempts).unwrap_or(0),
                            reason: format!("the publish message failed on chain: {reason}"),
                        })))
                    }
                }
            }
            Effect::VerifyDealOnChain { deal_id, proposal_cid } => {
                match self.chain.deal(*deal_id).await? {
                    None => Outcome::Wait(poll),
                    Some(seen) if seen.proposal_cid.is_none_or(|c| c == *proposal_cid) => {
                        Outcome::Feed(Feedback::StorageClient(SC::PublishConfirmed))
                    }
                    Some(_) => {
                        Outcome::Feed(Feedback::StorageClient(SC::PublishVerificationFailed {
                            reason: format!(
                                "deal {} on chain is not proposal {proposal_cid}",
                                deal_id.0
                            ),
                        }))
                    }
                }
            }
            Effect::HandOffToSealing { deal_id, piece_cid, size } => {
                match self.sealer.hand_off(*deal_id, *piece_cid, *size).await {
                    Ok(_) => Outcome::Feed(Feedback::StorageProvider(SP::DealHandedOff)),
                    Err(e) if !e.is_transient() => {
                        Outcome::Feed(Feedback::StorageProvider(SP::HandOffFailed {
                            reason: e.to_string(),
                        }))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Effect::WatchPreCommit { deal_id }
            | Effect::WatchActivation { deal_id }
            | Effect::WatchExpiry { deal_id, .. } => self.watch(pending, effect, *deal_id).await?,
            Effect::CleanUpStagedData { .. } => {
                // The unsealed copy stays in the piece store: it serves retrievals.
                Outcome::Feed(Feedback::StorageProvider(SP::DealFinalized))
            }
            Effect::Send { message: OutboundMessage::StorageStatusQuery { .. }, .. } => {
                let Some(network) = &self.network else {
                    return Ok(Outcome::Wait(self.config.watch_poll));
                };
                let ctx = self.context().await?;
                match crate::adapters::network::provider::query_status(
                    &network.client,
                    &self.deals,
                    stream,
                    &network.key,
                    &ctx,
                )
                .await
                {
                    Ok(Some(_)) => Outcome::Skipped("status recorded"),
                    Ok(None) => Outcome::Wait(poll),
                    // The deal moved on (failed, cancelled) since it asked: nothing to learn.
                    Err(crate::adapters::network::provider::ProposeError::Deals(
                        crate::deals::DealsError::Rejected(_),
                    )) => Outcome::Skipped("the deal moved on before the answer"),
                    Err(e) => return Err(RunnerError::Network(e.to_string())),
                }
            }
            Effect::Send { message: OutboundMessage::StorageProposal(_), .. }
                if side == StorageClient::NAME =>
            {
                let Some(network) = &self.network else {
                    return Ok(Outcome::Wait(self.config.watch_poll));
                };
                let ctx = self.context().await?;
                match crate::adapters::network::provider::propose(
                    &network.client,
                    &self.deals,
                    stream,
                    &ctx,
                )
                .await
                {
                    // The answer (accepted or rejected) is recorded by `propose`.
                    Ok(_) => Outcome::Skipped("proposal answered"),
                    Err(crate::adapters::network::provider::ProposeError::NotReady(_)) => {
                        Outcome::Skipped("the deal moved on before the proposal was sent")
                    }
                    Err(e) => return Err(RunnerError::Network(e.to_string())),
                }
            }
            Effect::Send { message: OutboundMessage::RetrievalProposal(_), .. }
                if side == RetrievalClient::NAME =>
            {
                let Some(network) = &self.network else {
                    return Ok(Outcome::Wait(self.config.watch_poll));
                };
                let ctx = self.context().await?;
                match crate::adapters::network::provider::propose_retrieval(
                    &network.client,
                    &self.deals,
                    stream,
                    &ctx,
                )
                .await
                {
                    Ok(_) => Outcome::Skipped("terms answered"),
                    Err(crate::adapters::network::provider::ProposeError::NotReady(_)) => {
                        Outcome::Skipped("the deal moved on before the terms were sent")
                    }
                    Err(e) => return Err(RunnerError::Network(e.to_string())),
                }
            }
            Effect::Send { to, message: OutboundMessage::Cancelled { reason } }
                if side == StorageClient::NAME || side == RetrievalClient::NAME =>
            {
                self.tell_cancelled(pending, *to, reason).await?
            }
            // The rejection went back as the answer to the client's request; the deal may
            // now clean up.
            Effect::Send { message: OutboundMessage::StorageRejected { .. }, .. }
                if side == StorageProvider::NAME =>
            {
                Outcome::Feed(Feedback::StorageProvider(SP::RejectionSent))
            }
            Effect::Send { .. } => Outcome::Skipped("sent by the network adapter"),
            Effect::DecideOnProposal { .. } | Effect::UnsealPiece { .. } => {
                Outcome::Skipped("the provider service performs it when the request arrives")
            }
            Effect::AwaitTransferRestart { .. }
            | Effect::VerifyPieceCommitment { .. }
            | Effect::CheckFunds { .. }
            | Effect::SendPayment { .. }
            | Effect::VerifyReceivedData { .. } => {
                Outcome::Skipped("the transfer adapter performs it as the data moves")
            }
            Effect::OpenTransfer { direction: TransferDirection::Pull, .. }
                if side == RetrievalClient::NAME =>
            {
                self.pull(stream).await?
            }
            Effect::CancelRetrievalDeals { request_id } => {
                self.cancel_request_deals(*request_id).await?
            }
            Effect::StartRetrievalDeal { request_id, part_index, range } => {
                self.start_retrieval_deal(*request_id, *part_index, *range).await?
            }
            Effect::OpenTransfer { direction: TransferDirection::Push, .. }
            | Effect::RestartTransfer { .. }
                if side == StorageClient::NAME =>
            {
                self.push(stream).await?
            }
            Effect::Notify { stream_id, stream_type, notice } => {
                if stream_type != RetrievalRequestMachine::NAME {
                    return Ok(Outcome::Skipped("no such notice target"));
                }
                let (part_index, deal_stream) = match notice {
                    Notice::PartCompleted { part_index, deal_stream, .. }
                    | Notice::PartFailed { part_index, deal_stream, .. } => {
                        (*part_index, *deal_stream)
                    }
                };
                // A deal can finish before its request has recorded starting it: the request's
                // start-retrieval-deal effect, cut off between creating the deal and recording
                // it, records it only when retried. The notice waits for that instead of being
                // refused and lost (which left the request retrieving for ever).
                let request = self.deals.load::<RetrievalRequestMachine>(*stream_id).await?;
                let not_yet_started = request.state == retrieval_request::State::Retrieving
                    && request
                        .data
                        .parts
                        .get(part_index as usize)
                        .is_some_and(|part| part.deal_stream.is_none() && !part.completed);
                if not_yet_started {
                    tracing::debug!(%stream_id, %deal_stream, part_index,
                        "the request has not recorded this part's deal yet; the notice waits");
                    return Ok(Outcome::Wait(poll));
                }
                let event = match notice.clone() {
                    Notice::PartCompleted { part_index, deal_stream, bytes, paid } => {
                        RR::PartCompleted { part_index, deal_stream, bytes, paid }
                    }
                    Notice::PartFailed { part_index, deal_stream, reason } => {
                        RR::PartFailed { part_index, deal_stream, reason }
                    }
                };
                Outcome::Feed(Feedback::RetrievalRequest(*stream_id, event))
            }
            Effect::SetUpPaymentChannel { provider, amount } => {
                let client = self.retrieval_client(stream).await?;
                let existed = self.chain.channel_between(client, *provider).await?.is_some();
                self.chain.get_or_create_channel(client, *provider, *amount, key).await?;
                Outcome::Feed(Feedback::RetrievalClient(if existed {
                    RC::PaymentChannelAddFundsInitiated
                } else {
                    RC::PaymentChannelCreateInitiated
                }))
            }
            Effect::WaitForPaymentChannel { provider } => {
                let client = self.retrieval_client(stream).await?;
                match self.chain.channel_between(client, *provider).await? {
                    Some(channel) => {
                        Outcome::Feed(Feedback::RetrievalClient(RC::PaymentChannelReady {
                            channel,
                        }))
                    }
                    None => Outcome::Wait(poll),
                }
            }
            Effect::AllocateLane { channel } => {
                let lane = self.chain.allocate_lane(channel, key).await?;
                Outcome::Feed(Feedback::RetrievalClient(RC::LaneAllocated { lane }))
            }
            Effect::RedeemVoucher { voucher } => {
                self.chain.submit_voucher(voucher).await?;
                // Part of a failed or cancelled deal's clean-up, it may be the last step.
                self.after_cleanup_step(pending).await?
            }
            _ => Outcome::Skipped("not a chain effect"),
        })
    }

    /// Pushes a storage client deal's staged piece to its provider (or resumes the push).
    /// The push records its own progress and outcome; an interruption is recorded as the
    /// machine's input, whose restart effect pushes again.
    async fn push(&self, stream: Uuid) -> Result<Outcome, RunnerError> {
        let Some(network) = &self.network else {
            return Ok(Outcome::Skipped("no network on this runner"));
        };
        let Some(pieces) = &network.pieces else {
            return Ok(Outcome::Skipped("pushes are driven by the caller"));
        };
        let deal = self.deals.load::<StorageClient>(stream).await?;
        use storage_client::State as S;
        if !matches!(
            deal.state,
            S::StartDataTransfer | S::TransferQueued | S::Transferring | S::ClientTransferRestart
        ) {
            return Ok(Outcome::Skipped("the deal moved on before the push"));
        }
        let Some(proposal) = deal.data.proposal.as_ref() else {
            return Err(RunnerError::Inconsistent(format!("deal {stream} has no proposal")));
        };
        let piece = proposal.proposal.piece_cid;
        let file =
            pieces.open(&piece).await.map_err(|e| RunnerError::Inconsistent(e.to_string()))?;
        let total = file
            .metadata()
            .await
            .map_err(|e| RunnerError::Inconsistent(format!("staged piece {piece}: {e}")))?
            .len();
        let ctx = self.context().await?;
        let options = crate::adapters::transfer::TransferOptions::default();
        match crate::adapters::transfer::push(
            &network.client,
            &self.deals,
            stream,
            file,
            total,
            options,
            &ctx,
        )
        .await
        {
            Ok(_) => Ok(Outcome::Skipped("pushed")),
            // Recorded as DataTransferInterrupted: the machine asks for a restart.
            Err(crate::adapters::transfer::PushError::Interrupted(_)) => {
                Ok(Outcome::Skipped("interrupted; the deal restarts it"))
            }
            Err(crate::adapters::transfer::PushError::NotReady { .. }) => {
                Ok(Outcome::Skipped("the deal moved on before the push"))
            }
            Err(e) => Err(RunnerError::Network(e.to_string())),
        }
    }

    /// Pulls a retrieval client deal's part from its provider into the retrieved file,
    /// paying as it goes (or resumes the pull). The pull records its own progress.
    async fn pull(&self, stream: Uuid) -> Result<Outcome, RunnerError> {
        let Some(network) = &self.network else {
            return Ok(Outcome::Skipped("no network on this runner"));
        };
        let Some(dir) = &network.retrieved else {
            return Ok(Outcome::Skipped("pulls are driven by the caller"));
        };
        let deal = self.deals.load::<RetrievalClient>(stream).await?;
        // Every state a pull resumes from (a runner that crashed mid-pull left it there).
        use retrieval_client::State as S;
        if !matches!(
            deal.state,
            S::Ongoing
                | S::FundsNeeded
                | S::FundsNeededLastPayment
                | S::SendFunds
                | S::SendFundsLastPayment
                | S::BlocksComplete
                | S::Finalizing
                | S::CheckComplete
        ) {
            return Ok(Outcome::Skipped("the deal moved on before the pull"));
        }
        let Some(terms) = deal.data.proposal.clone() else {
            return Err(RunnerError::Inconsistent(format!("retrieval {stream} has no terms")));
        };
        let provider_stream = crate::adapters::network::message::provider_retrieval_stream(
            &network.client.peer_id(),
            stream,
        );
        let (name, base) = match deal.data.part_of {
            Some(part) => (part.request_id, terms.part.offset),
            None => (stream, 0),
        };
        let io = |e: std::io::Error| RunnerError::Inconsistent(format!("retrieved data: {e}"));
        tokio::fs::create_dir_all(dir).await.map_err(io)?;
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{name}.bin")))
            .await
            .map_err(io)?;
        let limit = terms.total_price().unwrap_or(TokenAmount(u128::MAX));
        let ctx = self.context().await?;
        let sink = crate::adapters::transfer::retrieval::PullSink { file: &mut file, base };
        match crate::adapters::transfer::retrieval::pull_into(
            &network.client,
            &self.deals,
            stream,
            provider_stream,
            &network.key,
            limit,
            &ctx,
            Some(sink),
        )
        .await
        {
            Ok(_) => Ok(Outcome::Skipped("pulled")),
            Err(crate::adapters::transfer::PushError::NotReady { .. }) => {
                Ok(Outcome::Skipped("the deal moved on before the pull"))
            }
            Err(e) => Err(RunnerError::Network(e.to_string())),
        }
    }

    /// The request's next part: terms from the provider's retrieval ask (refused above the
    /// request's price), a client deal proposing them, and the request told which deal
    /// fetches the part. The deal's id follows from the request, the part and the attempt, so
    /// starting it again after a crash finds the same deal.
    async fn start_retrieval_deal(
        &self,
        request_id: Uuid,
        part_index: u32,
        range: crate::domain::retrieval::ByteRange,
    ) -> Result<Outcome, RunnerError> {
        use crate::adapters::network::message::{MarketRequest, MarketResponse};
        let Some(network) = &self.network else {
            return Ok(Outcome::Skipped("no network on this runner"));
        };
        let request = self.deals.load::<RetrievalRequestMachine>(request_id).await?;
        let Some(wanted) = request.data.request.clone() else {
            return Err(RunnerError::Inconsistent(format!("request {request_id} has no terms")));
        };
        let attempt = request.data.parts.get(part_index as usize).map_or(0, |p| p.failures);
        let deal_stream = crate::domain::derived_id(&[
            request_id.as_bytes(),
            &part_index.to_be_bytes(),
            &attempt.to_be_bytes(),
        ]);
        if self.deals.journal().head(deal_stream).await?.version == 0 {
            let provider = wanted.provider.peer_id().ok_or_else(|| {
                RunnerError::Inconsistent("the provider key is not a peer".into())
            })?;
            let Some(piece_cid) = wanted.piece_cid else {
                return Err(RunnerError::Inconsistent("the request names no piece".into()));
            };
            let quote = network
                .client
                .request(provider, MarketRequest::RetrievalQuery { piece_cid })
                .await
                .map_err(|e| RunnerError::Network(e.to_string()))?;
            let MarketResponse::RetrievalQuote { available: true, ask, .. } = quote else {
                return Ok(Outcome::Feed(Feedback::RetrievalRequest(
                    request_id,
                    RR::PartFailed {
                        part_index,
                        deal_stream,
                        reason: "the provider does not have the piece".into(),
                    },
                )));
            };
            let terms = crate::domain::retrieval::RetrievalDealProposal {
                payload_cid: wanted.payload_cid,
                piece_cid: Some(piece_cid),
                part: range,
                price_per_byte: ask.price_per_byte.min(wanted.max_price_per_byte),
                payment_interval: ask.max_payment_interval.max(1),
                payment_interval_increase: ask.max_payment_interval / 2,
                unseal_price: ask.unseal_price,
                client: wanted.client,
                provider: wanted.provider,
            };
            let part_of =
                Some(crate::fsm::retrieval_client::RequestPart { request_id, part_index });
            let ctx = self.context().await?;
            let proposed = RC::DealProposed { proposal: Box::new(terms), part_of };
            self.deals.handle::<RetrievalClient>(deal_stream, proposed, &ctx, None).await?;
        }
        Ok(Outcome::Feed(Feedback::RetrievalRequest(
            request_id,
            RR::PartStarted { part_index, deal_stream },
        )))
    }

    /// A cancelled or failed request: the deal fetching its current part is cancelled too,
    /// and the request's clean-up is done.
    async fn cancel_request_deals(&self, request_id: Uuid) -> Result<Outcome, RunnerError> {
        let request = self.deals.load::<RetrievalRequestMachine>(request_id).await?;
        let ctx = self.context().await?;
        for part in &request.data.parts {
            let Some(deal_stream) = part.deal_stream else { continue };
            let deal = self.deals.load::<RetrievalClient>(deal_stream).await?;
            if deal.is_terminal() {
                continue;
            }
            let reason = format!("its request {request_id} ended");
            match self
                .deals
                .handle::<RetrievalClient>(deal_stream, RC::DealCancelled { reason }, &ctx, None)
                .await
            {
                // Not cancellable where it is (completing): it finishes on its own.
                Ok(_) | Err(DealsError::Rejected(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Outcome::Feed(Feedback::RetrievalRequest(request_id, RR::CleanupCompleted)))
    }

    /// Whether the storage deal that caused `pending` has been published on chain.
    async fn published(&self, pending: &PendingEffect) -> Result<bool, RunnerError> {
        Ok(match pending.stream_type.as_str() {
            StorageClient::NAME => {
                self.deals.load::<StorageClient>(pending.stream_id).await?.data.deal_id.is_some()
            }
            StorageProvider::NAME => {
                self.deals.load::<StorageProvider>(pending.stream_id).await?.data.deal_id.is_some()
            }
            _ => false,
        })
    }

    /// After a clean-up effect of a failing deal: when it was the last one of its event, the
    /// deal is told its clean-up completed.
    /// Tells the provider its client cancelled the deal, as part of the deal's clean-up. A
    /// provider that cannot be reached is tried again with backoff; past the attempts the
    /// clean-up goes on without it (the provider's side then times out by itself).
    async fn tell_cancelled(
        &self,
        pending: &PendingEffect,
        provider: crate::domain::PartyKey,
        reason: &str,
    ) -> Result<Outcome, RunnerError> {
        use crate::adapters::network::message::{CancelledDeal, MarketRequest};
        let Some(network) = &self.network else {
            return Ok(Outcome::Wait(self.config.watch_poll));
        };
        let stream = pending.stream_id;
        let deal = if pending.stream_type == StorageClient::NAME {
            let deal = self.deals.load::<StorageClient>(stream).await?;
            let Some(proposal_cid) = deal.data.proposal_cid else {
                return self.after_cleanup_step(pending).await;
            };
            CancelledDeal::Storage { proposal_cid }
        } else {
            CancelledDeal::Retrieval { client_deal: stream }
        };
        let Some(peer) = provider.peer_id() else {
            return self.after_cleanup_step(pending).await;
        };
        let request = MarketRequest::Cancel { deal, reason: reason.to_owned() };
        match network.client.request(peer, request).await {
            Ok(answer) => tracing::info!(%stream, ?answer, "told the provider of the cancel"),
            Err(e) if pending.attempts < self.config.max_attempts => {
                return Err(RunnerError::Network(e.to_string()));
            }
            Err(e) => {
                tracing::warn!(%stream, error = %e, "could not tell the provider of the cancel")
            }
        }
        self.after_cleanup_step(pending).await
    }

    async fn after_cleanup_step(&self, pending: &PendingEffect) -> Result<Outcome, RunnerError> {
        let pool = self.deals.journal().pool();
        let others = crate::events::outbox::open_siblings(
            pool,
            pending.stream_id,
            pending.version,
            pending.id,
        )
        .await?;
        if others > 0 {
            return Ok(Outcome::Done);
        }
        let id = pending.stream_id;
        Ok(match pending.stream_type.as_str() {
            StorageClient::NAME
                if self.deals.load::<StorageClient>(id).await?.state
                    == storage_client::State::Failing =>
            {
                Outcome::Feed(Feedback::StorageClient(SC::CleanupCompleted))
            }
            StorageProvider::NAME
                if self.deals.load::<StorageProvider>(id).await?.state
                    == storage_provider::State::Failing =>
            {
                Outcome::Feed(Feedback::StorageProvider(SP::CleanupCompleted))
            }
            RetrievalClient::NAME => {
                let state = self.deals.load::<RetrievalClient>(id).await?.state;
                if matches!(
                    state,
                    retrieval_client::State::Failing | retrieval_client::State::Cancelling
                ) {
                    Outcome::Feed(Feedback::RetrievalClient(RC::CleanupCompleted))
                } else {
                    Outcome::Done
                }
            }
            RetrievalProvider::NAME => {
                let state = self.deals.load::<RetrievalProvider>(id).await?.state;
                if matches!(
                    state,
                    retrieval_provider::State::Failing | retrieval_provider::State::Cancelling
                ) {
                    Outcome::Feed(Feedback::RetrievalProvider(RP::CleanupCompleted))
                } else {
                    Outcome::Done
                }
            }
            _ => Outcome::Done,
        })
    }

    async fn retrieval_client(&self, stream: Uuid) -> Result<crate::domain::PartyKey, RunnerError> {
        let deal = self.deals.load::<RetrievalClient>(stream).await?;
        deal.data
            .proposal
            .map(|p| p.client)
            .ok_or_else(|| RunnerError::Inconsistent(format!("retrieval {stream} has no terms")))
    }

    /// A watch effect: what the chain shows for the deal at finality, as the input the deal
    /// waits for — or a wait until the next head.
    async fn watch(
        &self,
        pending: &PendingEffect,
        effect: &Effect,
        deal_id: DealId,
    ) -> Result<Outcome, RunnerError> {
        let poll = self.config.watch_poll;
        let seen = self.chain.deal(deal_id).await?;
        let provider_side = pending.stream_type == StorageProvider::NAME;
        if provider_side
            && !matches!(effect, Effect::WatchExpiry { .. })
            && let SealingStatus::Failed { reason } = self.sealer.status(deal_id).await?
        {
            return Ok(Outcome::Feed(Feedback::StorageProvider(SP::SealingFailed { reason })));
        }
        let Some(seen) = seen else {
            // Lotus drops a deal from the market once it has expired.
            return Ok(match effect {
                Effect::WatchExpiry { end_epoch, .. } if self.chain.head().await? >= *end_epoch => {
                    both(
                        pending,
                        SC::DealExpired { epoch: *end_epoch },
                        SP::DealExpired { epoch: *end_epoch },
                    )
                }
                _ => Outcome::Wait(poll),
            });
        };
        Ok(observed(pending, effect, &seen).unwrap_or(Outcome::Wait(poll)))
    }
}

/// The same observation for whichever side the effect's stream is.
fn both(pending: &PendingEffect, client: SC, provider: SP) -> Outcome {
    if pending.stream_type == StorageClient::NAME {
        Outcome::Feed(Feedback::StorageClient(client))
    } else {
        Outcome::Feed(Feedback::StorageProvider(provider))
    }
}

/// The input a watch effect gets from an observation, if the observation is news for it.
fn observed(pending: &PendingEffect, effect: &Effect, seen: &DealObservation) -> Option<Outcome> {
    let state = seen.state();
    let slashed = || {
        let epoch = seen.slash_epoch.unwrap_or_default();
        both(pending, SC::DealSlashed { epoch }, SP::DealSlashed { epoch })
    };
    let timed_out = || {
        let reason = format!("deal {} was not activated by its start epoch", seen.deal_id.0);
        both(pending, SC::DealTimedOut { reason: reason.clone() }, SP::DealTimedOut { reason })
    };
    let activated = || {
        let epoch = seen.sector_start_epoch.unwrap_or_default();
        both(pending, SC::DealActivated { epoch }, SP::DealActivated { epoch })
    };
    match (effect, state) {
        (_, OnChainDealState::Slashed) => Some(slashed()),
        (Effect::WatchExpiry { .. }, OnChainDealState::Expired) => {
            let epoch = seen.closed_epoch.unwrap_or(seen.end_epoch);
            Some(both(pending, SC::DealExpired { epoch }, SP::DealExpired { epoch }))
        }
        (Effect::WatchExpiry { .. }, _) => None,
        (_, OnChainDealState::TimedOut) => Some(timed_out()),
        (_, OnChainDealState::Active | OnChainDealState::Expired) => Some(activated()),
        (Effect::WatchPreCommit { .. }, OnChainDealState::PreCommitted) => {
            seen.sector.map(|sector| {
                both(pending, SC::DealPreCommitted { sector }, SP::DealPreCommitted { sector })
            })
        }
        _ => None,
    }
}
