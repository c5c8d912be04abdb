//! The `Deals` service: the library API with the seed's verbs. Every command goes the same way:
//! load the deal (as this process last recorded it, or by replaying its stream through its
//! machine), decide, then in ONE statement — one transaction — append the events with the
//! expected version, enqueue the effects and write the status row. A concurrent writer makes
//! the append conflict; the command is then decided again on the replayed deal, a bounded
//! number of times.

mod cache;
pub mod retention;
pub mod script;
mod status;

use serde::Serialize;
use uuid::Uuid;

use crate::domain::retrieval::RetrievalRequest;
use crate::domain::storage::ClientDealProposal;
use crate::events::outbox::{self, NewEffect};
use crate::events::{AppendStatement, CodecError, EventCodec, Journal, JournalError};
use crate::fsm::retrieval_request::{RetrievalRequestEvent, RetrievalRequestMachine};
use crate::fsm::storage_client::{StorageClient, StorageClientEvent};
use crate::fsm::storage_provider::{StorageProvider, StorageProviderEvent};
use crate::fsm::{Deal, DecideContext, Decision, Machine, Rejection, TransitionError};
use crate::projections::rows::Projected;
use crate::projections::{ProjectionError, inline};

pub use status::{RetrievalStatus, StorageDealStatus};

/// How many times a command is re-decided after losing a race before the conflict surfaces.
pub const DEFAULT_CONFLICT_RETRIES: u32 = 5;

/// Why a command did not go through.
#[derive(Debug, thiserror::Error)]
pub enum DealsError {
    /// The machine refused the command (illegal transition, bad signature, bad terms, ...).
    /// Nothing was appended; retrying the same command gives the same answer.
    #[error("rejected: {0}")]
    Rejected(#[from] Rejection),
    /// Other writers kept winning the race for this stream. Nothing was appended; the caller
    /// may retry later.
    #[error("stream {stream_id} kept changing: gave up after {attempts} attempts")]
    ConflictRetriesExhausted { stream_id: Uuid, attempts: u32 },
    /// The stream belongs to another machine (a storage deal id passed as a retrieval).
    #[error("stream {stream_id} is a {actual} stream, not {expected}")]
    WrongStreamType { stream_id: Uuid, expected: &'static str, actual: String },
    /// No stream with this id.
    #[error("no deal or request {stream_id}")]
    NotFound { stream_id: Uuid },
    /// The stored history does not replay through the machine: the journal needs an audit.
    #[error("stream {stream_id} does not replay: {source}")]
    Replay {
        stream_id: Uuid,
        #[source]
        source: TransitionError,
    },
    /// A stored payload cannot be decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The status row could not be written; nothing was recorded.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// The journal or database failed; the command may be retried.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

impl From<sqlx::Error> for DealsError {
    fn from(e: sqlx::Error) -> Self {
        DealsError::Journal(JournalError::Database(e))
    }
}

/// What an operator asks of a deal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorAction {
    /// [`Deals::cancel`].
    Cancel,
    /// [`Deals::fail`].
    Fail,
    /// [`Deals::retry`].
    Retry,
}

/// What recording a command does to the outbox row whose result it is.
#[derive(Debug, Clone)]
enum Settles {
    /// The effect is done.
    Complete(i64),
    /// The attempt failed; the effect is tried again after `delay`.
    Release { id: i64, delay: std::time::Duration, error: String },
}

/// Why an event happened: the operation it belongs to and what directly caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cause {
    /// The operation (one user request, one network exchange).
    pub correlation_id: Uuid,
    /// The message, transfer event or chain observation that caused it.
    pub causation_id: Uuid,
}

/// A storage deal just started: its stream and its proposal CID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StorageDealRef {
    /// The deal's stream.
    pub stream_id: Uuid,
    /// The proposal CID both sides know the deal by.
    pub proposal_cid: cid::Cid,
}

/// The ledger's deal API, for adapters and for services embedding the ledger.
#[derive(Debug, Clone)]
pub struct Deals {
    journal: Journal,
    conflict_retries: u32,
    recent: cache::DealCache,
}

impl Deals {
    /// A service writing through `journal`.
    pub fn new(journal: Journal) -> Self {
        Self {
            journal,
            conflict_retries: DEFAULT_CONFLICT_RETRIES,
            recent: cache::DealCache::default(),
        }
    }

    /// Sets how many times a command is re-decided after a conflict.
    pub fn with_conflict_retries(mut self, retries: u32) -> Self {
        self.conflict_retries = retries.max(1);
        self
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The stream id of a storage deal, derived from its side and proposal CID, so that the
    /// same proposal can never start two deals on one side.
    pub fn storage_stream_id(side: &str, proposal: &ClientDealProposal) -> Uuid {
        crate::domain::derived_id(&[side.as_bytes(), &proposal.cid().to_bytes()])
    }

    /// Storage flow step 1, client side: reserves funds and proposes.
    pub async fn initiate_deal(
        &self,
        proposal: ClientDealProposal,
        ctx: &DecideContext,
    ) -> Result<StorageDealRef, DealsError> {
        let stream_id = Self::storage_stream_id(StorageClient::NAME, &proposal);
        let proposal_cid = proposal.cid();
        let command = StorageClientEvent::DealInitiated { proposal: Box::new(proposal) };
        self.handle::<StorageClient>(stream_id, command, ctx, None).await?;
        Ok(StorageDealRef { stream_id, proposal_cid })
    }

    /// Storage flow step 1, provider side: a signed proposal arrived.
    pub async fn receive_proposal(
        &self,
        proposal: ClientDealProposal,
        ctx: &DecideContext,
        cause: Option<Cause>,
    ) -> Result<StorageDealRef, DealsError> {
        let stream_id = Self::storage_stream_id(StorageProvider::NAME, &proposal);
        let proposal_cid = proposal.cid();
        let command = StorageProviderEvent::ProposalReceived { proposal: Box::new(proposal) };
        self.handle::<StorageProvider>(stream_id, command, ctx, cause).await?;
        Ok(StorageDealRef { stream_id, proposal_cid })
    }

    /// Retrieval flow step 1: a request for a whole piece, fetched part by part.
    pub async fn initiate_retrieval(
        &self,
        request: RetrievalRequest,
        max_attempts: u32,
        ctx: &DecideContext,
    ) -> Result<Uuid, DealsError> {
        let request_id = Uuid::now_v7();
        let command =
            RetrievalRequestEvent::RequestCreated { request: Box::new(request), max_attempts };
        self.handle::<RetrievalRequestMachine>(request_id, command, ctx, None).await?;
        Ok(request_id)
    }

    /// An operator cancels a deal or a retrieval request, saying who and why (recorded in the
    /// event, shown by `audit`). The machine decides whether its state can be cancelled; the
    /// effect runner then closes its transfer and releases its funds. Returns the new state.
    pub async fn cancel(
        &self,
        stream_id: Uuid,
        operator: &str,
        reason: &str,
        ctx: &DecideContext,
    ) -> Result<&'static str, DealsError> {
        self.by_operator(stream_id, OperatorAction::Cancel, operator, reason, ctx).await
    }

    /// An operator fails a deal by hand, saying who and why: it goes through Failing (the
    /// runner releases its funds and closes its transfer), never straight to Error. A
    /// retrieval request is cancelled, not failed.
    pub async fn fail(
        &self,
        stream_id: Uuid,
        operator: &str,
        reason: &str,
        ctx: &DecideContext,
    ) -> Result<&'static str, DealsError> {
        self.by_operator(stream_id, OperatorAction::Fail, operator, reason, ctx).await
    }

    /// An operator retries a deal paused in a recoverable failure (a publish short of
    /// funds, a stalled push, a channel that could not be set up), saying who and why: it
    /// re-enters the state before the failure and that state's effect runs again,
    /// idempotently. A deal that is not paused refuses it (a `Rejected` transition error).
    pub async fn retry(
        &self,
        stream_id: Uuid,
        operator: &str,
        reason: &str,
        ctx: &DecideContext,
    ) -> Result<&'static str, DealsError> {
        self.by_operator(stream_id, OperatorAction::Retry, operator, reason, ctx).await
    }

    /// `action` on a deal by `operator`, for `reason`: [`Deals::cancel`], [`Deals::fail`] or
    /// [`Deals::retry`], for callers that take the action as data (the HTTP API).
    pub async fn by_operator(
        &self,
        stream_id: Uuid,
        action: OperatorAction,
        operator: &str,
        reason: &str,
        ctx: &DecideContext,
    ) -> Result<&'static str, DealsError> {
        use crate::fsm::Label;
        use crate::fsm::retrieval_client::{RetrievalClient, RetrievalClientEvent as RC};
        use crate::fsm::retrieval_provider::{RetrievalProvider, RetrievalProviderEvent as RP};
        use StorageClientEvent as SC;
        use StorageProviderEvent as SP;
        let head = self.journal.head(stream_id).await?;
        if head.version == 0 {
            return Err(DealsError::NotFound { stream_id });
        }
        let verb = match action {
            OperatorAction::Cancel => "cancelled",
            OperatorAction::Fail => "failed",
            OperatorAction::Retry => "retried",
        };
        let reason = format!("{verb} by {operator}: {reason}");
        let cancel = action == OperatorAction::Cancel;
        Ok(match (head.stream_type.as_str(), action) {
            (StorageClient::NAME, _) => {
                let c = match action {
                    OperatorAction::Cancel => SC::DealCancelled { reason },
                    OperatorAction::Fail => SC::FailedByOperator { reason },
                    OperatorAction::Retry => SC::RetryRequested { reason },
                };
                self.handle::<StorageClient>(stream_id, c, ctx, None).await?.deal.state.name()
            }
            (StorageProvider::NAME, _) => {
                let c = match action {
                    OperatorAction::Cancel => SP::DealCancelled { reason },
                    OperatorAction::Fail => SP::FailedByOperator { reason },
                    OperatorAction::Retry => SP::RetryRequested { reason },
                };
                self.handle::<StorageProvider>(stream_id, c, ctx, None).await?.deal.state.name()
            }
            (RetrievalClient::NAME, _) => {
                let c = match action {
                    OperatorAction::Cancel => RC::DealCancelled { reason },
                    OperatorAction::Fail => RC::FailedByOperator { reason },
                    OperatorAction::Retry => RC::RetryRequested { reason },
                };
                self.handle::<RetrievalClient>(stream_id, c, ctx, None).await?.deal.state.name()
            }
            (RetrievalProvider::NAME, OperatorAction::Cancel | OperatorAction::Fail) => {
                let c = if cancel {
                    RP::DealCancelled { reason }
                } else {
                    RP::FailedByOperator { reason }
                };
                self.handle::<RetrievalProvider>(stream_id, c, ctx, None).await?.deal.state.name()
            }
            (RetrievalRequestMachine::NAME, OperatorAction::Cancel) => {
                let c = RetrievalRequestEvent::RequestCancelled { reason };
                self.handle::<RetrievalRequestMachine>(stream_id, c, ctx, None)
                    .await?
                    .deal
                    .state
                    .name()
            }
            (other, _) => {
                return Err(DealsError::WrongStreamType {
                    stream_id,
                    expected: match action {
                        OperatorAction::Retry => "a deal that can pause",
                        _ => "a deal",
                    },
                    actual: other.to_owned(),
                });
            }
        })
    }

    /// Loads a deal by replaying its stream through machine `M`. A stream with no events is a
    /// deal in the initial state at version 0.
    pub async fn load<M: Projected>(&self, stream_id: Uuid) -> Result<Deal<M>, DealsError> {
        let recorded = self.journal.read_stream(stream_id, 1).await?;
        let mut deal = Deal::<M>::new(stream_id);
        for event in &recorded {
            if event.stream_type != M::NAME {
                return Err(DealsError::WrongStreamType {
                    stream_id,
                    expected: M::NAME,
                    actual: event.stream_type.clone(),
                });
            }
            let decoded: M::Event = EventCodec::decode(event)?;
            deal.apply(&decoded).map_err(|source| DealsError::Replay { stream_id, source })?;
        }
        Ok(deal)
    }

    /// Decides `command` for the deal on `stream_id` and records the outcome: events and
    /// effects in one transaction. On a lost race the deal is reloaded and the command decided
    /// again; a rejection (now or after reloading) appends nothing.
    pub async fn handle<M: Projected>(
        &self,
        stream_id: Uuid,
        command: M::Event,
        ctx: &DecideContext,
        cause: Option<Cause>,
    ) -> Result<Decision<M>, DealsError> {
        self.handle_completing(stream_id, command, ctx, cause, None).await
    }

    /// [`Deals::handle`] for the result of an effect: the outbox row `effect_id` is marked
    /// done in the same transaction that records the command, so a crash between the two
    /// cannot happen — either both are recorded or the effect is performed (idempotently)
    /// again. When the command is refused, the effect is not completed; the caller decides.
    pub async fn handle_effect_result<M: Projected>(
        &self,
        effect_id: i64,
        stream_id: Uuid,
        command: M::Event,
        ctx: &DecideContext,
        cause: Option<Cause>,
    ) -> Result<Decision<M>, DealsError> {
        self.handle_completing(stream_id, command, ctx, cause, Some(Settles::Complete(effect_id)))
            .await
    }

    /// [`Deals::handle`] for a failed attempt of an effect that will be tried again: the
    /// command (the machine's `EffectRetrying`) is recorded and the outbox row `effect_id`
    /// given back with `delay` and `error`, in one transaction — the row shows the attempt
    /// exactly when the runner will make it.
    pub async fn handle_effect_retry<M: Projected>(
        &self,
        effect_id: i64,
        stream_id: Uuid,
        command: M::Event,
        ctx: &DecideContext,
        delay: std::time::Duration,
        error: &str,
    ) -> Result<Decision<M>, DealsError> {
        let settles = Settles::Release { id: effect_id, delay, error: error.to_owned() };
        self.handle_completing(stream_id, command, ctx, None, Some(settles)).await
    }

    async fn handle_completing<M: Projected>(
        &self,
        stream_id: Uuid,
        command: M::Event,
        ctx: &DecideContext,
        cause: Option<Cause>,
        settles: Option<Settles>,
    ) -> Result<Decision<M>, DealsError> {
        for attempt in 1..=self.conflict_retries {
            let (deal, decision) = self.decide::<M>(stream_id, &command, ctx).await?;
            let recorded = self.record_completing(&deal, &decision, cause, settles.as_ref()).await;
            if recorded.is_err() {
                // Lost a race, or the outcome is unknown: the next attempt replays the stream.
                self.recent.forget(stream_id);
            }
            match recorded {
                Ok(()) => return Ok(decision),
                Err(DealsError::Journal(JournalError::Conflict { .. }))
                    if attempt < self.conflict_retries =>
                {
                    tracing::debug!(%stream_id, attempt, "append conflict; deciding again");
                }
                Err(DealsError::Journal(JournalError::Conflict { .. })) => {
                    return Err(DealsError::ConflictRetriesExhausted {
                        stream_id,
                        attempts: attempt,
                    });
                }
                Err(other) => return Err(other),
            }
        }
        Err(DealsError::ConflictRetriesExhausted { stream_id, attempts: self.conflict_retries })
    }

    /// Decides `command` on the deal as this process last recorded it or, when it has no
    /// such state or the command is refused there, as its stream replays now: a state cached
    /// here may be stale (another process moved the deal), and a stale state must not refuse
    /// a command the real one accepts. A stale state that accepts is caught by the append.
    async fn decide<M: Projected>(
        &self,
        stream_id: Uuid,
        command: &M::Event,
        ctx: &DecideContext,
    ) -> Result<(Deal<M>, Decision<M>), DealsError> {
        if let Some(deal) = self.recent.get::<M>(stream_id) {
            if let Ok(decision) = deal.decide(command.clone(), ctx) {
                return Ok((deal, decision));
            }
            self.recent.forget(stream_id);
        }
        let deal = self.load::<M>(stream_id).await?;
        let decision = deal.decide(command.clone(), ctx)?;
        Ok((deal, decision))
    }

    /// Records a decision made from `deal`: its events appended at `deal.version` and its
    /// effects enqueued, in one transaction. For embedders that call [`Deal::decide`]
    /// themselves; if the stream moved on since `deal` was loaded, this is a
    /// [`JournalError::Conflict`] and nothing is written.
    pub async fn record<M: Projected>(
        &self,
        deal: &Deal<M>,
        decision: &Decision<M>,
        cause: Option<Cause>,
    ) -> Result<(), DealsError> {
        self.record_completing(deal, decision, cause, None).await
    }

    async fn record_completing<M: Projected>(
        &self,
        deal: &Deal<M>,
        decision: &Decision<M>,
        cause: Option<Cause>,
        settles: Option<&Settles>,
    ) -> Result<(), DealsError> {
        let events = decision
            .events
            .iter()
            .map(|event| {
                let new = EventCodec::encode(event)?;
                Ok(match cause {
                    Some(c) => new.caused_by(c.correlation_id, c.causation_id),
                    None => new,
                })
            })
            .collect::<Result<Vec<_>, CodecError>>()?;
        let effects = decision
            .effects
            .iter()
            .map(|(version, effect)| {
                let payload = postcard::to_stdvec(effect).map_err(CodecError::Encode)?;
                Ok(NewEffect { version: *version, effect_type: effect.name(), payload })
            })
            .collect::<Result<Vec<_>, CodecError>>()?;
        let last_type = events.last().map(|e| e.event_type.as_str()).unwrap_or_default();
        let companions = |statement: &mut AppendStatement| {
            outbox::enqueue_with(statement, deal.id, M::NAME, &effects)?;
            match settles {
                Some(Settles::Complete(id)) => outbox::complete_with(statement, *id, None)?,
                Some(Settles::Release { id, delay, error }) => {
                    outbox::release_with(statement, *id, *delay, Some(error))?
                }
                None => {}
            }
            inline::project_with(statement, &decision.deal, last_type)
        };
        if settles.is_some() {
            // Settling an outbox row is rare (an effect's result) and stays out of groups.
            self.journal.append_with(deal.id, M::NAME, deal.version, &events, &companions).await?;
        } else {
            let shared = |recorded_at| {
                let outbox = outbox::shared_enqueue(deal.id, M::NAME, &effects);
                let row = inline::shared_project(&decision.deal, last_type, recorded_at);
                outbox.into_iter().chain([row]).collect()
            };
            self.journal
                .append_grouped(deal.id, M::NAME, deal.version, &events, Some(&companions), shared)
                .await?;
        }
        self.recent.put(decision.deal.clone());
        Ok(())
    }
}
