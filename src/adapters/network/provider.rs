//! The market protocols on both sides: the provider answers inbound requests by turning them
//! into commands to its machines, and the client turns a provider's answer into commands to
//! its own. Every decision is the machines' (and the provider's pure ask policy); this module
//! only translates.

use ed25519_dalek::SigningKey;
use libp2p::PeerId;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::message::provider_retrieval_stream;
use super::message::{
    CancelledDeal, MarketRequest, MarketResponse, RetrievalAsk, SignedStatusQuery, StorageAsk,
};
use super::refusals;
use super::{Client, NetworkError, NetworkEvent};
use crate::adapters::transfer::ProviderTransfers;
use crate::adapters::transfer::retrieval::ProviderRetrievals;
use crate::deals::{Cause, Deals, DealsError};
use crate::domain::PartyKey;
use crate::domain::TokenAmount;
use crate::domain::retrieval::RetrievalDealProposal;
use crate::domain::storage::{ClientDealProposal, StorageDeal};
use crate::fsm::retrieval_client::{RetrievalClient, RetrievalClientEvent};
use crate::fsm::retrieval_provider::{RetrievalProvider, RetrievalProviderEvent};
use crate::fsm::storage_client::{StorageClient, StorageClientEvent};
use crate::fsm::storage_provider::{State, StorageProvider, StorageProviderEvent};
use crate::fsm::{DecideContext, Label, Machine};

/// Frames of a transfer stream read ahead of the one being answered: at most this many
/// messages (each within the codec's size limit) wait in memory per stream.
const FRAMES_READ_AHEAD: usize = 4;

/// A provider's answers to the market protocols.
#[derive(Debug, Clone)]
pub struct ProviderService {
    deals: Deals,
    key: SigningKey,
    ask: StorageAsk,
    retrieval_ask: RetrievalAsk,
    transfers: ProviderTransfers,
    retrievals: ProviderRetrievals,
}

impl ProviderService {
    /// A provider signing with `key` (its libp2p identity), taking deals that meet `ask` and
    /// keeping their data with `transfers`.
    pub fn new(
        deals: Deals,
        key: SigningKey,
        ask: StorageAsk,
        transfers: ProviderTransfers,
    ) -> Self {
        let retrieval_ask = RetrievalAsk {
            price_per_byte: TokenAmount(1),
            unseal_price: TokenAmount::ZERO,
            max_payment_interval: 1 << 20,
        };
        let retrievals = ProviderRetrievals::new(deals.clone(), transfers.pieces().clone());
        Self { deals, key, ask, retrieval_ask, transfers, retrievals }
    }

    /// Checks retrieval payments against the chain's payment channels: a pull needs a funded
    /// channel, a voucher must be one the channel would honour.
    pub fn with_payment_channels(
        mut self,
        channels: std::sync::Arc<dyn crate::adapters::chain::PaymentChannels>,
    ) -> Self {
        self.retrievals = self.retrievals.with_payment_channels(channels);
        self
    }

    /// Sets the prices retrievals must meet (default: 1 attoFIL a byte, free unsealing,
    /// payment at least every MiB).
    pub fn with_retrieval_ask(mut self, ask: RetrievalAsk) -> Self {
        self.retrieval_ask = ask;
        self
    }

    /// The answer to one request from `peer`.
    pub async fn answer(
        &self,
        peer: PeerId,
        request: MarketRequest,
        ctx: &DecideContext,
    ) -> MarketResponse {
        match request {
            MarketRequest::Ask => MarketResponse::Ask(self.ask.clone()),
            MarketRequest::Propose(proposal) => self.on_proposal(peer, *proposal, ctx).await,
            MarketRequest::Status(query) => self.status(&query).await,
            request @ (MarketRequest::TransferOpen { .. }
            | MarketRequest::TransferChunk { .. }
            | MarketRequest::TransferFinish { .. }
            | MarketRequest::RetrievalPull { .. }
            | MarketRequest::RetrievalPay { .. }) => {
                // Not on a transfer stream of its own: nothing ends with it.
                self.answer_transfer(peer, request, &mut None, 0, ctx).await
            }
            MarketRequest::RetrievalQuery { piece_cid } => {
                let bytes = self.transfers.pieces().size(&piece_cid).await;
                MarketResponse::RetrievalQuote {
                    available: bytes.is_some(),
                    bytes: bytes.unwrap_or(0),
                    ask: self.retrieval_ask.clone(),
                }
            }
            MarketRequest::RetrievalPropose(terms) => {
                self.on_retrieval(peer, *terms, Uuid::now_v7(), ctx).await
            }
            MarketRequest::RetrievalProposeFor { terms, client_deal } => {
                let deal_stream = provider_retrieval_stream(&peer, client_deal);
                self.on_retrieval(peer, *terms, deal_stream, ctx).await
            }
            MarketRequest::Cancel { deal, reason } => self.on_cancel(peer, deal, reason, ctx).await,
        }
    }

    /// The answer to one request on a transfer stream from `peer`. `pushing` remembers the
    /// provider deal the stream pushes to, found (and its client checked) on the first
    /// request, so that chunks cost no lookup.
    async fn answer_transfer(
        &self,
        peer: PeerId,
        request: MarketRequest,
        pushing: &mut Option<(cid::Cid, Uuid)>,
        carrier: u64,
        ctx: &DecideContext,
    ) -> MarketResponse {
        match request {
            MarketRequest::TransferOpen { proposal_cid, .. }
            | MarketRequest::TransferChunk { proposal_cid, .. }
            | MarketRequest::TransferFinish { proposal_cid } => {
                let stream = match *pushing {
                    Some((cid, stream)) if cid == proposal_cid => stream,
                    _ => match self.clients_deal(peer, proposal_cid, "push its data").await {
                        Ok(stream) => pushing.insert((proposal_cid, stream)).1,
                        Err(refusal) => return refusal,
                    },
                };
                self.transfers.answer(stream, carrier, request, ctx).await
            }
            request
            @ (MarketRequest::RetrievalPull { .. } | MarketRequest::RetrievalPay { .. }) => {
                self.retrievals.answer(peer, request, ctx).await
            }
            other => MarketResponse::Rejected {
                reason: format!("{} is not a transfer request", other.protocol()),
            },
        }
    }

    /// The provider deal of `proposal_cid`, if `peer` is its client: only the client may
    /// `act` on it (push its data — the seed's PushValidator — or cancel it). Otherwise the
    /// response refusing it.
    async fn clients_deal(
        &self,
        peer: PeerId,
        proposal_cid: cid::Cid,
        act: &str,
    ) -> Result<Uuid, MarketResponse> {
        let stream = self.provider_stream(proposal_cid).await?;
        let deal = self
            .deals
            .load::<StorageProvider>(stream)
            .await
            .map_err(|e| MarketResponse::Error { reason: e.to_string() })?;
        let client = deal.data.proposal.and_then(|p| p.proposal.client.peer_id());
        if client != Some(peer) {
            return Err(MarketResponse::Rejected {
                reason: format!(
                    "only the deal's client may {act}: peer {peer} is not the client of deal \
                     {proposal_cid}"
                ),
            });
        }
        Ok(stream)
    }

    /// Serves every transfer stream peers open to this node until the network stops.
    async fn accept_transfers(
        self,
        mut incoming: libp2p_stream::IncomingStreams,
        max_message_bytes: u32,
        ctx: DecideContext,
    ) {
        use futures::StreamExt;
        while let Some((peer, stream)) = incoming.next().await {
            let service = self.clone();
            let ctx = ctx.clone();
            tokio::spawn(async move {
                service.serve_transfer_stream(peer, stream, max_message_bytes, &ctx).await
            });
        }
    }

    /// Answers the requests of one transfer stream, in order, until the peer closes it. A
    /// frame that cannot be read (oversized, malformed, not a transfer request) is logged as
    /// refused and ends the stream: after it, frame boundaries cannot be trusted. A push whose
    /// stream ends before its finish is recorded as interrupted (yamux reads a reset stream as
    /// an end, so a closed and a reset stream are one case).
    async fn serve_transfer_stream(
        &self,
        peer: PeerId,
        stream: libp2p::Stream,
        max_message_bytes: u32,
        ctx: &DecideContext,
    ) {
        use crate::adapters::network::codec::{on_protocol, read_framed, write_frame};
        use crate::adapters::network::message::TRANSFER_PROTOCOL;
        static CARRIERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let carrier = CARRIERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pool = self.deals.journal().pool();
        let mut pushing = None;
        // Frames are read ahead while earlier ones are answered, so the stream's receive
        // window keeps opening and the sender never waits on this loop's disk or database.
        let (mut reader, mut writer) = futures::AsyncReadExt::split(stream);
        let (frames, mut requests) = mpsc::channel(FRAMES_READ_AHEAD);
        let read_ahead = async move {
            loop {
                let read = read_framed::<MarketRequest, _>(&mut reader, max_message_bytes).await;
                if !crate::tasks::pass_on(&frames, read).await {
                    break;
                }
            }
        };
        let serve = async {
            loop {
                let Some(read) = requests.recv().await else {
                    break std::io::Error::other("the transfer stream's reader stopped");
                };
                let request = match read.and_then(|r| Ok(on_protocol(r, TRANSFER_PROTOCOL)?)) {
                    Ok(request) => request,
                    Err(e) => {
                        if e.kind() == std::io::ErrorKind::InvalidData {
                            tracing::info!(%peer, reason = %e, "refused an unreadable transfer frame");
                            let reason = e.to_string();
                            refusals::record(pool, Some(peer), TRANSFER_PROTOCOL, &reason, None)
                                .await;
                        }
                        break e;
                    }
                };
                let subject = refusals::subject(&request);
                let response =
                    self.answer_transfer(peer, request, &mut pushing, carrier, ctx).await;
                if let Some(reason) = refusals::refusal(&response) {
                    refusals::record(pool, Some(peer), TRANSFER_PROTOCOL, reason, subject).await;
                }
                if let Err(e) = write_frame(&mut writer, &response, max_message_bytes).await {
                    break e;
                }
            }
        };
        // The stream ends when the answering loop does; the reader may finish first (after
        // queueing the frame that failed) and the queue is still answered.
        let ended = crate::tasks::beside(read_ahead, serve).await;
        // A push lives on one stream: one that ends (closed, reset, broken, or cut off by a
        // bad frame) before its finish stopped midway.
        if let Some((_, deal)) = pushing {
            let reason = format!("the transfer stream from {peer} ended: {ended}");
            self.transfers.stream_ended(deal, carrier, reason, ctx).await;
        }
    }

    /// The client cancelled a deal: the provider's side is cancelled too, if its machine
    /// allows it in its state. Only the deal's client is heard: a storage deal's client must
    /// be the sending peer, and a retrieval deal's stream derives from the sender itself.
    async fn on_cancel(
        &self,
        peer: PeerId,
        deal: CancelledDeal,
        reason: String,
        ctx: &DecideContext,
    ) -> MarketResponse {
        let reason = format!("cancelled by the client: {reason}");
        let decided = match deal {
            CancelledDeal::Storage { proposal_cid } => {
                let stream = match self.clients_deal(peer, proposal_cid, "cancel it").await {
                    Ok(stream) => stream,
                    Err(refusal) => return refusal,
                };
                let command = StorageProviderEvent::DealCancelled { reason };
                self.deals
                    .handle::<StorageProvider>(stream, command, ctx, None)
                    .await
                    .map(|d| d.deal.state.name())
            }
            CancelledDeal::Retrieval { client_deal } => {
                let stream = provider_retrieval_stream(&peer, client_deal);
                let command = RetrievalProviderEvent::DealCancelled { reason };
                self.deals
                    .handle::<RetrievalProvider>(stream, command, ctx, None)
                    .await
                    .map(|d| d.deal.state.name())
            }
        };
        match decided {
            Ok(state) => MarketResponse::CancelAcknowledged { state: state.to_owned() },
            Err(DealsError::Rejected(e)) => MarketResponse::Rejected { reason: e.to_string() },
            Err(e) => MarketResponse::Error { reason: e.to_string() },
        }
    }

    async fn on_retrieval(
        &self,
        peer: PeerId,
        terms: RetrievalDealProposal,
        deal_stream: Uuid,
        ctx: &DecideContext,
    ) -> MarketResponse {
        use RetrievalProviderEvent as R;
        let rejected = |reason: String| MarketResponse::Rejected { reason };
        if terms.client.peer_id() != Some(peer) {
            return rejected(format!("the terms' client is not the sending peer {peer}"));
        }
        if terms.provider != PartyKey::of(&self.key) {
            return rejected("the terms name another provider".into());
        }
        if let Err(e) = terms.validate() {
            return rejected(e.to_string());
        }
        let stored = match terms.piece_cid {
            Some(piece) => self.transfers.pieces().size(&piece).await,
            None => None,
        };
        // The same terms proposed again for the same client deal (a client that restarted
        // before it saw the answer): the same answer, nothing recorded twice.
        if let Ok(existing) = self.deals.load::<RetrievalProvider>(deal_stream).await
            && existing.version > 0
        {
            use crate::fsm::retrieval_provider::State;
            return match (existing.data.proposal == Some(terms), existing.state) {
                (false, _) => rejected("another deal already has this id".into()),
                (true, State::Rejected) => rejected("the terms were rejected".into()),
                (true, State::DealNotFound) => MarketResponse::RetrievalDealNotFound,
                (true, _) => MarketResponse::RetrievalAccepted { deal_stream },
            };
        }
        let proposal = Box::new(terms.clone());
        let (command, response) = match stored {
            None => (R::PieceNotFound { proposal }, MarketResponse::RetrievalDealNotFound),
            Some(bytes) if terms.part.offset + terms.part.length > bytes => {
                let reason = format!("the piece holds {bytes} bytes; the part ends beyond them");
                (R::DealRejected { proposal, reason: reason.clone() }, rejected(reason))
            }
            Some(_) => match self.retrieval_ask.refuses(&terms) {
                Some(reason) => {
                    (R::DealRejected { proposal, reason: reason.clone() }, rejected(reason))
                }
                None => (
                    R::DealAccepted { proposal },
                    MarketResponse::RetrievalAccepted { deal_stream },
                ),
            },
        };
        let accepted = matches!(command, R::DealAccepted { .. });
        if let Err(e) =
            self.deals.handle::<RetrievalProvider>(deal_stream, command, ctx, None).await
        {
            return MarketResponse::Error { reason: e.to_string() };
        }
        // The piece store keeps unsealed copies: unsealing is done as soon as it is asked.
        if accepted
            && let Err(e) = self
                .deals
                .handle::<RetrievalProvider>(deal_stream, R::PieceUnsealed, ctx, None)
                .await
        {
            return MarketResponse::Error { reason: e.to_string() };
        }
        response
    }

    async fn on_proposal(
        &self,
        peer: PeerId,
        proposal: ClientDealProposal,
        ctx: &DecideContext,
    ) -> MarketResponse {
        let rejected = |reason: String| MarketResponse::Rejected { reason };
        // Bad input changes nothing: these are refused before any deal exists.
        if proposal.proposal.client.peer_id() != Some(peer) {
            return rejected(format!("the proposal's client is not the sending peer {peer}"));
        }
        if proposal.proposal.provider != PartyKey::of(&self.key) {
            return rejected("the proposal names another provider".into());
        }
        let cause = Cause { correlation_id: Uuid::now_v7(), causation_id: Uuid::now_v7() };
        // The decision already holds the deal after validation: no need to replay it again.
        let stream_id = Deals::storage_stream_id(StorageProvider::NAME, &proposal);
        let existing = match self.deals.load::<StorageProvider>(stream_id).await {
            Ok(deal) => deal,
            Err(e) => return MarketResponse::Error { reason: e.to_string() },
        };
        let validated = if existing.version > 0 {
            // The same proposal again (a client that restarted before it saw the answer):
            // the answer it was given, or the decision it is still waiting for.
            existing
        } else {
            let received =
                StorageProviderEvent::ProposalReceived { proposal: Box::new(proposal.clone()) };
            match self.deals.handle::<StorageProvider>(stream_id, received, ctx, Some(cause)).await
            {
                Ok(decision) => decision.deal,
                Err(DealsError::Rejected(rejection)) => return rejected(rejection.to_string()),
                Err(e) => return MarketResponse::Error { reason: e.to_string() },
            }
        };
        if validated.state != State::AcceptWait {
            return match validated.data.signed_deal {
                Some(signed) => MarketResponse::Accepted(Box::new(signed)),
                None => rejected(
                    validated
                        .data
                        .message
                        .unwrap_or_else(|| format!("the deal is {}", validated.state.name())),
                ),
            };
        }
        // AcceptWait: the provider's policy decides, the machine records it.
        let command = match self.ask.refuses(&proposal.proposal) {
            Some(reason) => StorageProviderEvent::DealRejected { reason },
            None => StorageProviderEvent::DealAccepted {
                deal: Box::new(StorageDeal::sign(proposal, &self.key)),
            },
        };
        let response = match &command {
            StorageProviderEvent::DealAccepted { deal } => MarketResponse::Accepted(deal.clone()),
            StorageProviderEvent::DealRejected { reason } => rejected(reason.clone()),
            _ => unreachable!("only an acceptance or a rejection is decided here"),
        };
        match self.deals.handle::<StorageProvider>(stream_id, command, ctx, Some(cause)).await {
            Ok(_) => response,
            Err(e) => MarketResponse::Error { reason: e.to_string() },
        }
    }

    /// The provider deal of a proposal CID, or the response saying there is none.
    async fn provider_stream(&self, proposal_cid: cid::Cid) -> Result<Uuid, MarketResponse> {
        let stream: Option<Uuid> = sqlx::query_scalar(
            "SELECT stream_id FROM storage_deals WHERE proposal_cid = $1 AND side = $2",
        )
        .bind(proposal_cid.to_string())
        .bind(StorageProvider::NAME)
        .fetch_optional(self.deals.journal().pool())
        .await
        .map_err(|e| MarketResponse::Error { reason: e.to_string() })?;
        stream.ok_or_else(|| MarketResponse::Error {
            reason: format!("no deal with proposal {proposal_cid}"),
        })
    }

    async fn status(&self, signed: &SignedStatusQuery) -> MarketResponse {
        if !signed.verifies() {
            return MarketResponse::Rejected {
                reason: "the status query's signature does not verify".into(),
            };
        }
        let stream = match self.provider_stream(signed.query.proposal_cid).await {
            Ok(stream) => stream,
            Err(response) => return response,
        };
        let client = match self.deals.load::<StorageProvider>(stream).await {
            Ok(deal) => deal.data.proposal.map(|p| p.proposal.client),
            Err(e) => return MarketResponse::Error { reason: e.to_string() },
        };
        if client != Some(signed.query.client) {
            return MarketResponse::Rejected {
                reason: "only the deal's client may ask its status".into(),
            };
        }
        match self.deals.get_storage_deal_status(stream).await {
            Ok(s) => MarketResponse::Status {
                state: s.state.to_owned(),
                code: s.code,
                deal_id: s.deal_id.map(|d| d.0),
                message: s.message,
                publish_message: s.publish_message,
            },
            Err(e) => MarketResponse::Error { reason: e.to_string() },
        }
    }

    /// Answers inbound requests until the network stops.
    pub async fn serve(
        self,
        client: Client,
        mut events: mpsc::Receiver<NetworkEvent>,
        ctx: DecideContext,
    ) {
        let transfers = match client.accept_transfer_streams() {
            Ok(incoming) => {
                let accept = self.clone().accept_transfers(
                    incoming,
                    client.max_message_bytes(),
                    ctx.clone(),
                );
                Some(tokio::spawn(accept))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot serve transfers");
                None
            }
        };
        // The transfers stop being served when `serve` returns.
        let _stop_transfers = transfers.map(crate::tasks::AbortOnDrop);
        while let Some(event) = events.recv().await {
            match event {
                NetworkEvent::InboundRequest { peer, request, channel } => {
                    let response = self.answer(peer, request.clone(), &ctx).await;
                    if let Some(reason) = refusals::refusal(&response) {
                        let pool = self.deals.journal().pool();
                        let protocol = request.protocol();
                        let subject = refusals::subject(&request);
                        refusals::record(pool, Some(peer), protocol, reason, subject).await;
                    }
                    if client.respond(&request, channel, response).await.is_err() {
                        return;
                    }
                }
                NetworkEvent::InboundFailure { peer, protocol, reason } => {
                    tracing::info!(?peer, %reason, "refused an unreadable request");
                    let pool = self.deals.journal().pool();
                    refusals::record(pool, peer, &protocol, &reason, None).await;
                }
            }
        }
    }
}

/// Why the client side of a proposal could not complete.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// The deal is not waiting to propose (it has no proposal, or is past that point).
    #[error("deal {0} is not waiting to send its proposal")]
    NotReady(Uuid),
    /// The provider could not be reached or did not answer.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// The ledger refused the provider's answer (for instance a deal signed by someone else).
    #[error(transparent)]
    Deals(#[from] DealsError),
    /// The provider answered with something that is not an answer to a proposal.
    #[error("unexpected answer to a proposal: {0}")]
    Unexpected(String),
}

/// Sends a client deal's proposal to its provider and records the answer: the effect
/// `send(StorageProposal)` of state FundsReserved, performed.
pub async fn propose(
    client: &Client,
    deals: &Deals,
    stream_id: Uuid,
    ctx: &DecideContext,
) -> Result<&'static str, ProposeError> {
    let deal = deals.load::<StorageClient>(stream_id).await?;
    let Some(proposal) = deal.data.proposal.clone() else {
        return Err(ProposeError::NotReady(stream_id));
    };
    if deal.state != crate::fsm::storage_client::State::FundsReserved {
        return Err(ProposeError::NotReady(stream_id));
    }
    let provider = proposal.proposal.provider.peer_id().ok_or(ProposeError::NotReady(stream_id))?;
    let response = client.request(provider, MarketRequest::Propose(Box::new(proposal))).await?;
    let command = match response {
        MarketResponse::Accepted(signed) => StorageClientEvent::DealAccepted { deal: signed },
        MarketResponse::Rejected { reason } => StorageClientEvent::DealRejected { reason },
        other => return Err(ProposeError::Unexpected(format!("{other:?}"))),
    };
    let decision = deals.handle::<StorageClient>(stream_id, command, ctx, None).await?;
    Ok(decision.deal.state.name())
}

/// Asks a client deal's provider where the deal stands (the effect `send(StorageStatusQuery)`
/// of state CheckForAcceptance, performed) and records what it learns: the deal's on-chain
/// id and publish message once published, or the provider's failure. Returns `None` while
/// there is nothing new to record (ask again later).
pub async fn query_status(
    client: &Client,
    deals: &Deals,
    stream_id: Uuid,
    key: &ed25519_dalek::SigningKey,
    ctx: &DecideContext,
) -> Result<Option<&'static str>, ProposeError> {
    let deal = deals.load::<StorageClient>(stream_id).await?;
    let Some(proposal) = deal.data.proposal.clone() else {
        return Err(ProposeError::NotReady(stream_id));
    };
    let provider = proposal.proposal.provider.peer_id().ok_or(ProposeError::NotReady(stream_id))?;
    let query = SignedStatusQuery::sign(proposal.cid(), key);
    let response = client.request(provider, MarketRequest::Status(Box::new(query))).await?;
    let command = match response {
        MarketResponse::Status {
            deal_id: Some(deal_id), publish_message: Some(message), ..
        } => StorageClientEvent::DealPublished { deal_id: crate::domain::DealId(deal_id), message },
        MarketResponse::Status { state, message, .. } if state == "Failing" || state == "Error" => {
            StorageClientEvent::ProviderFailedDeal {
                reason: message.unwrap_or_else(|| format!("the provider's deal is {state}")),
            }
        }
        MarketResponse::Status { .. } => return Ok(None),
        other => return Err(ProposeError::Unexpected(format!("{other:?}"))),
    };
    let decision = deals.handle::<StorageClient>(stream_id, command, ctx, None).await?;
    Ok(Some(decision.deal.state.name()))
}

/// Sends a client retrieval deal's terms to its provider and records the answer: the effect
/// `send(RetrievalProposal)` of state WaitForAcceptance, performed. Returns the client deal's
/// state and, when accepted, the provider's deal stream.
pub async fn propose_retrieval(
    client: &Client,
    deals: &Deals,
    stream_id: Uuid,
    ctx: &DecideContext,
) -> Result<(&'static str, Option<Uuid>), ProposeError> {
    use crate::fsm::retrieval_client::State;
    let deal = deals.load::<RetrievalClient>(stream_id).await?;
    let Some(terms) = deal.data.proposal.clone() else {
        return Err(ProposeError::NotReady(stream_id));
    };
    if deal.state != State::WaitForAcceptance {
        return Err(ProposeError::NotReady(stream_id));
    }
    let provider = terms.provider.peer_id().ok_or(ProposeError::NotReady(stream_id))?;
    let request =
        MarketRequest::RetrievalProposeFor { terms: Box::new(terms), client_deal: stream_id };
    let response = client.request(provider, request).await?;
    let (command, provider_stream) = match response {
        MarketResponse::RetrievalAccepted { deal_stream } => {
            (RetrievalClientEvent::DealAccepted, Some(deal_stream))
        }
        MarketResponse::RetrievalDealNotFound => (RetrievalClientEvent::DealNotFound, None),
        MarketResponse::Rejected { reason } => {
            (RetrievalClientEvent::DealRejected { reason }, None)
        }
        other => return Err(ProposeError::Unexpected(format!("{other:?}"))),
    };
    let decision = deals.handle::<RetrievalClient>(stream_id, command, ctx, None).await?;
    Ok((decision.deal.state.name(), provider_stream))
}
