//! The storage provider's side of a storage deal: seed storage flow steps 1-10 as seen by the
//! provider — validate and accept a signed proposal, receive the data, check its commitment,
//! publish the deal, hand the piece to sealing, and follow it on chain until it ends.

use cid::Cid;
use rust_fsm::{StateMachineImpl, state_machine};
use serde::{Deserialize, Serialize};

use super::effects::{Effect, OutboundMessage};
use super::failure::{AttemptFailed, Stalled};
use super::{
    Deal, DecideContext, FailureFact, Label, Machine, Producer, Rejection, check_bytes,
    inconsistent,
};
use crate::alphabet;
use crate::domain::storage::{ClientDealProposal, StorageDeal};
use crate::domain::{ChainEpoch, DealId, PieceCid, SectorNumber, TokenAmount};
use crate::events::JournalEvent;

state_machine! {
    #[state_machine(
        state(crate::fsm::storage_provider::State),
        input(crate::fsm::storage_provider::Input),
        output(crate::fsm::storage_provider::Output)
    )]
    pub machine(Unknown)

    Unknown(ProposalReceived) => Validating,
    Validating => {
        ProposalValidated => AcceptWait [DecideOnProposal],
        ProposalInvalid => Rejecting [SendRejection],
        FailedByOperator => Failing [CleanUp],
    },
    AcceptWait => {
        DealAccepted => WaitingForData [SendAcceptance],
        DealRejected => Rejecting [SendRejection],
        DealCancelled => Failing [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    WaitingForData => {
        DataTransferStarted => Transferring,
        DataTransferFailed => Failing [CleanUp],
        DealCancelled => Failing [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    Transferring => {
        DataTransferProgressed => Transferring,
        DataTransferInterrupted => ProviderTransferAwaitRestart [AwaitTransferRestart],
        DataTransferCompleted => VerifyData [VerifyData],
        DataTransferFailed => Failing [CleanUp],
        DealCancelled => Failing [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    ProviderTransferAwaitRestart => {
        DataTransferRestarted => Transferring,
        DataTransferFailed => Failing [CleanUp],
        DealCancelled => Failing [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    VerifyData => {
        DataVerified => ReserveProviderFunds [ReserveFunds],
        DataVerificationFailed => Failing [CleanUp],
        DealCancelled => Failing [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    ReserveProviderFunds => {
        FundingInitiated => ProviderFunding [WaitForFunding],
        FundsReserved => Publish [PublishDeal],
        FundsReservationFailed => Failing [CleanUp],
        EffectRetrying => ReserveProviderFunds,
        EffectStalled => FundingPaused,
        DealCancelled => Failing [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    ProviderFunding => {
        FundsReserved => Publish [PublishDeal],
        FundsReservationFailed => Failing [CleanUp],
        DealCancelled => Failing [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    Publish => {
        PublishSent => Publishing [WaitForPublish],
        PublishFailed => Failing [CleanUp],
        EffectRetrying => Publish,
        EffectStalled => PublishPaused,
        DealCancelled => Failing [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    Publishing => {
        DealPublished => Staged [HandOffToSealing],
        PublishFailed => Failing [CleanUp],
        EffectRetrying => Publishing,
        EffectStalled => PublishPaused,
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    Staged => {
        DealHandedOff => AwaitingPreCommit [WatchPreCommit],
        HandOffFailed => Failing [CleanUp],
        EffectRetrying => Staged,
        EffectStalled => HandOffPaused,
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    AwaitingPreCommit => {
        DealPreCommitted => Sealing [WatchActivation],
        DealActivated => Finalizing [FinalizeDeal],
        SealingFailed => Failing [CleanUp],
        DealTimedOut => Failing [CleanUp],
        DealSlashed => Slashed,
        FailedByOperator => Failing [CleanUp],
    },
    Sealing => {
        DealActivated => Finalizing [FinalizeDeal],
        SealingFailed => Failing [CleanUp],
        DealTimedOut => Failing [CleanUp],
        DealSlashed => Slashed,
        FailedByOperator => Failing [CleanUp],
    },
    Finalizing => {
        DealFinalized => Active [WatchExpiry],
        DealSlashed => Slashed,
    },
    Active => {
        DealExpired => Expired,
        DealSlashed => Slashed,
    },
    FundingPaused => {
        RetryRequested => ReserveProviderFunds [ReserveFunds],
        DealCancelled => Failing [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    // The publish message may be on chain already: a paused publish is retried or failed,
    // not cancelled (as in Publishing).
    PublishPaused => {
        RetryRequested => Publish [PublishDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    HandOffPaused => {
        RetryRequested => Staged [HandOffToSealing],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    Rejecting(RejectionSent) => Failing [CleanUp],
    Failing(CleanupCompleted) => Error,
}

alphabet! {
    /// Where a provider's deal is. Codes are go-fil-markets' `StorageDeal*` status codes.
    pub enum State {
        /// No proposal yet.
        Unknown = 0,
        /// A signed deal is on its way to the sealing pipeline.
        Staged = 4,
        /// The piece's sector is being sealed.
        Sealing = 5,
        /// The deal is active on chain; staged data is being cleaned up.
        Finalizing = 6,
        /// The piece is sealed and the deal is active: the provider proves it until it ends.
        Active = 7,
        /// The deal reached its end epoch.
        Expired = 8,
        /// The provider failed to prove the sector: collateral was slashed.
        Slashed = 9,
        /// The proposal is rejected; the rejection is being sent to the client.
        Rejecting = 10,
        /// Something failed: reserved funds are released and the transfer closed.
        Failing = 11,
        /// The proposal's terms are being checked against the market (epochs).
        Validating = 14,
        /// Waiting for the acceptance policy (price, capacity) to decide.
        AcceptWait = 15,
        /// The transfer is open and bytes are arriving.
        Transferring = 17,
        /// Accepted; waiting for the client to open the push transfer.
        WaitingForData = 18,
        /// All bytes arrived; their piece commitment is being checked.
        VerifyData = 19,
        /// Reserving the provider collateral in the market.
        ReserveProviderFunds = 20,
        /// A message adding market funds is on its way to the chain.
        ProviderFunding = 22,
        /// Publishing the deal to the storage market actor.
        Publish = 24,
        /// The publish message is on chain; waiting for it to land.
        Publishing = 25,
        /// Final: the deal failed and everything it held was released.
        Error = 26,
        /// The transfer was interrupted; waiting for the client to restart it.
        ProviderTransferAwaitRestart = 27,
        /// Handed to sealing; waiting for the sector to be pre-committed.
        AwaitingPreCommit = 29,
        /// Reserving the collateral kept failing for a recoverable reason (market balance
        /// short, chain unreachable): waiting for an operator to retry, cancel or fail.
        FundingPaused = 40,
        /// Publishing kept failing for a recoverable reason (gas, funds, chain unreachable):
        /// waiting for an operator to retry or fail.
        PublishPaused = 41,
        /// Handing the piece to sealing kept failing: waiting for an operator.
        HandOffPaused = 42,
    }
}

alphabet! {
    /// The provider machine's inputs, one per event kind.
    pub enum Input {
        ProposalReceived, ProposalValidated, ProposalInvalid, DealAccepted, DealRejected,
        RejectionSent, DataTransferStarted, DataTransferProgressed, DataTransferInterrupted,
        DataTransferRestarted, DataTransferCompleted, DataTransferFailed, DataVerified,
        DataVerificationFailed, FundingInitiated, FundsReserved, FundsReservationFailed,
        PublishSent, PublishFailed, DealPublished, DealHandedOff, HandOffFailed,
        DealPreCommitted, DealActivated, DealFinalized, DealExpired, DealSlashed, SealingFailed,
        DealTimedOut, DealCancelled, CleanupCompleted,
        FailedByOperator, EffectRetrying, EffectStalled, RetryRequested,
    }
}

alphabet! {
    /// What the provider must do on entering a state.
    pub enum Output {
        DecideOnProposal, SendAcceptance, SendRejection, AwaitTransferRestart, VerifyData,
        ReserveFunds, WaitForFunding, PublishDeal, WaitForPublish, HandOffToSealing,
        WatchPreCommit, WatchActivation, FinalizeDeal, WatchExpiry, CleanUp,
    }
}

/// What happened to a provider's deal. Journal payload: append variants only, never reorder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageProviderEvent {
    /// A signed proposal arrived from a client (step 1).
    ProposalReceived { proposal: Box<ClientDealProposal> },
    /// The proposal's terms hold against the market (derived).
    ProposalValidated,
    /// The proposal cannot be taken as it stands, e.g. its start epoch passed (derived).
    ProposalInvalid { reason: String },
    /// The provider counter-signed the deal (step 2).
    DealAccepted { deal: Box<StorageDeal> },
    /// The acceptance policy declined the proposal.
    DealRejected { reason: String },
    /// The client has been told of the rejection.
    RejectionSent,
    /// The client opened the push transfer (steps 5-6).
    DataTransferStarted,
    /// Bytes received so far (cumulative), recorded at the transfer's reporting granularity.
    DataTransferProgressed { bytes: u64 },
    /// The transfer stopped but may be restarted (disconnect, node restart).
    DataTransferInterrupted { reason: String },
    /// The client restarted the transfer.
    DataTransferRestarted,
    /// All bytes arrived (step 8).
    DataTransferCompleted { bytes: u64 },
    /// The transfer failed for good.
    DataTransferFailed { reason: String },
    /// The received data's commitment equals the proposal's piece CID.
    DataVerified { piece_cid: PieceCid },
    /// The received data's commitment differs, or could not be computed.
    DataVerificationFailed { reason: String },
    /// A message adding market funds was sent.
    FundingInitiated { message: Cid },
    /// The provider collateral is reserved.
    FundsReserved { amount: TokenAmount },
    /// The collateral could not be reserved.
    FundsReservationFailed { reason: String },
    /// The publish message was sent (step 9).
    PublishSent { message: Cid },
    /// Publishing failed (out of gas, out of funds, rejected by the actor).
    PublishFailed { reason: String },
    /// The publish message landed and the market actor gave the deal an id.
    DealPublished { deal_id: DealId },
    /// The sealing pipeline took the piece (step 10).
    DealHandedOff,
    /// The sealing pipeline refused the piece.
    HandOffFailed { reason: String },
    /// The sector holding the piece was pre-committed.
    DealPreCommitted { sector: SectorNumber },
    /// The sector was proven and the deal activated.
    DealActivated { epoch: ChainEpoch },
    /// Staged data was cleaned up.
    DealFinalized,
    /// The deal reached its end epoch.
    DealExpired { epoch: ChainEpoch },
    /// The deal's collateral was slashed.
    DealSlashed { epoch: ChainEpoch },
    /// The sector failed to seal.
    SealingFailed { reason: String },
    /// A deadline passed (transfer, publish or sealing before the start epoch).
    DealTimedOut { reason: String },
    /// An operator or the client cancelled the deal.
    DealCancelled { reason: String },
    /// Funds were released and the transfer closed after a failure.
    CleanupCompleted,
    /// An operator failed the deal by hand: who and why.
    FailedByOperator { reason: String },
    /// An attempt of the state's effect failed recoverably; the runner tries again.
    EffectRetrying(AttemptFailed),
    /// The state's effect kept failing recoverably; the deal waits for an operator.
    EffectStalled(Stalled),
    /// An operator retried a paused deal: who and why.
    RetryRequested { reason: String },
}

impl StorageProviderEvent {
    /// The machine input this event stands for.
    pub fn input(&self) -> Input {
        use StorageProviderEvent as E;
        match self {
            E::ProposalReceived { .. } => Input::ProposalReceived,
            E::ProposalValidated => Input::ProposalValidated,
            E::ProposalInvalid { .. } => Input::ProposalInvalid,
            E::DealAccepted { .. } => Input::DealAccepted,
            E::DealRejected { .. } => Input::DealRejected,
            E::RejectionSent => Input::RejectionSent,
            E::DataTransferStarted => Input::DataTransferStarted,
            E::DataTransferProgressed { .. } => Input::DataTransferProgressed,
            E::DataTransferInterrupted { .. } => Input::DataTransferInterrupted,
            E::DataTransferRestarted => Input::DataTransferRestarted,
            E::DataTransferCompleted { .. } => Input::DataTransferCompleted,
            E::DataTransferFailed { .. } => Input::DataTransferFailed,
            E::DataVerified { .. } => Input::DataVerified,
            E::DataVerificationFailed { .. } => Input::DataVerificationFailed,
            E::FundingInitiated { .. } => Input::FundingInitiated,
            E::FundsReserved { .. } => Input::FundsReserved,
            E::FundsReservationFailed { .. } => Input::FundsReservationFailed,
            E::PublishSent { .. } => Input::PublishSent,
            E::PublishFailed { .. } => Input::PublishFailed,
            E::DealPublished { .. } => Input::DealPublished,
            E::DealHandedOff => Input::DealHandedOff,
            E::HandOffFailed { .. } => Input::HandOffFailed,
            E::DealPreCommitted { .. } => Input::DealPreCommitted,
            E::DealActivated { .. } => Input::DealActivated,
            E::DealFinalized => Input::DealFinalized,
            E::DealExpired { .. } => Input::DealExpired,
            E::DealSlashed { .. } => Input::DealSlashed,
            E::SealingFailed { .. } => Input::SealingFailed,
            E::DealTimedOut { .. } => Input::DealTimedOut,
            E::DealCancelled { .. } => Input::DealCancelled,
            E::FailedByOperator { .. } => Input::FailedByOperator,
            E::CleanupCompleted => Input::CleanupCompleted,
            E::EffectRetrying(_) => Input::EffectRetrying,
            E::EffectStalled(_) => Input::EffectStalled,
            E::RetryRequested { .. } => Input::RetryRequested,
        }
    }
}

impl JournalEvent for StorageProviderEvent {
    const SCHEMA_VERSION: i16 = 1;

    fn event_type(&self) -> &'static str {
        super::label::kebab(self.input().name())
    }
}

/// What a provider's events fold into.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProviderDeal {
    /// The client-signed proposal.
    pub proposal: Option<ClientDealProposal>,
    /// Its CID.
    pub proposal_cid: Option<Cid>,
    /// The counter-signed deal, once accepted.
    pub signed_deal: Option<StorageDeal>,
    /// Bytes received so far.
    pub bytes_received: u64,
    /// Collateral this deal holds reserved in the provider's market balance, in attoFIL.
    pub funds_reserved: TokenAmount,
    /// The funding message, while one is pending.
    pub funding_message: Option<Cid>,
    /// The publish message.
    pub publish_message: Option<Cid>,
    /// The on-chain deal id, once published.
    pub deal_id: Option<DealId>,
    /// The sector holding the piece, once pre-committed.
    pub sector: Option<SectorNumber>,
    /// Epoch of activation.
    pub activation_epoch: Option<ChainEpoch>,
    /// How many times the transfer was interrupted.
    pub transfer_interruptions: u32,
    /// Why the deal was rejected or failed.
    pub message: Option<String>,
}

/// The storage provider machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageProvider;

impl Machine for StorageProvider {
    const NAME: &'static str = "storage_provider";
    type State = State;
    type Input = Input;
    type Output = Output;
    type Event = StorageProviderEvent;
    type Data = ProviderDeal;
    const INITIAL: State = State::Unknown;
    const TERMINAL: &'static [State] = &[State::Expired, State::Slashed, State::Error];

    fn transition(state: State, input: Input) -> Option<State> {
        machine::Impl::transition(&state, &input)
    }

    fn output(state: State, input: Input) -> Option<Output> {
        machine::Impl::output(&state, &input)
    }

    fn input(event: &StorageProviderEvent) -> Input {
        event.input()
    }

    fn fold(data: &mut ProviderDeal, event: &StorageProviderEvent) {
        use StorageProviderEvent as E;
        match event {
            E::ProposalReceived { proposal } => {
                data.proposal_cid = Some(proposal.cid());
                data.proposal = Some((**proposal).clone());
            }
            E::DealAccepted { deal } => data.signed_deal = Some((**deal).clone()),
            E::DataTransferProgressed { bytes } | E::DataTransferCompleted { bytes } => {
                data.bytes_received = *bytes
            }
            E::DataTransferInterrupted { .. } => data.transfer_interruptions += 1,
            E::FundingInitiated { message } => data.funding_message = Some(*message),
            E::FundsReserved { amount } => {
                data.funds_reserved = *amount;
                data.funding_message = None;
            }
            E::PublishSent { message } => data.publish_message = Some(*message),
            // Published: the collateral is now locked by the market actor, not by us.
            E::DealPublished { deal_id } => {
                data.deal_id = Some(*deal_id);
                data.funds_reserved = TokenAmount::ZERO;
            }
            E::DealPreCommitted { sector } => data.sector = Some(*sector),
            E::DealActivated { epoch } => data.activation_epoch = Some(*epoch),
            E::ProposalInvalid { reason }
            | E::DealRejected { reason }
            | E::DataTransferFailed { reason }
            | E::DataVerificationFailed { reason }
            | E::FundsReservationFailed { reason }
            | E::PublishFailed { reason }
            | E::HandOffFailed { reason }
            | E::SealingFailed { reason }
            | E::DealTimedOut { reason }
            | E::DealCancelled { reason }
            | E::FailedByOperator { reason }
            | E::EffectRetrying(AttemptFailed { reason, .. })
            | E::EffectStalled(Stalled { reason, .. }) => data.message = Some(reason.clone()),
            E::RetryRequested { .. } => data.message = None,
            // Invariant: a deal in a terminal state holds no reserved funds.
            E::CleanupCompleted => data.funds_reserved = TokenAmount::ZERO,
            E::ProposalValidated
            | E::RejectionSent
            | E::DataTransferStarted
            | E::DataTransferRestarted
            | E::DataVerified { .. }
            | E::DealHandedOff
            | E::DealFinalized
            | E::DealExpired { .. }
            | E::DealSlashed { .. } => {}
        }
    }

    fn decide(
        deal: &Deal<Self>,
        command: StorageProviderEvent,
        ctx: &DecideContext,
    ) -> Result<Vec<StorageProviderEvent>, Rejection> {
        use StorageProviderEvent as E;
        if let E::ProposalReceived { proposal } = &command {
            deal.require_new()?;
            proposal.validate(&ctx.policy)?;
            let start = proposal.proposal.start_epoch;
            let verdict = if start <= ctx.epoch {
                E::ProposalInvalid {
                    reason: format!("start epoch {} has passed (now {})", start.0, ctx.epoch.0),
                }
            } else {
                E::ProposalValidated
            };
            return Ok(vec![command, verdict]);
        }
        deal.require_started()?;
        let proposal =
            deal.data.proposal.as_ref().ok_or(Rejection::DealNotFound { stream_id: deal.id })?;
        match &command {
            E::ProposalValidated | E::ProposalInvalid { .. } => {
                return Err(Rejection::DerivedEvent { event: command.event_type() });
            }
            E::DealAccepted { deal: signed } => {
                if &signed.client_proposal != proposal {
                    return Err(inconsistent("the signed deal is not the proposal received"));
                }
                // The client proposal is the one verified when the deal began.
                signed.verify_provider_signature()?;
            }
            E::DataTransferProgressed { bytes } | E::DataTransferCompleted { bytes } => {
                check_bytes(*bytes, deal.data.bytes_received, proposal.proposal.piece_size.0)?;
            }
            E::DataVerified { piece_cid } if *piece_cid != proposal.proposal.piece_cid => {
                return Err(inconsistent(format!(
                    "verified piece {piece_cid} is not the proposed piece {}",
                    proposal.proposal.piece_cid
                )));
            }
            E::FundsReserved { amount }
                if *amount != proposal.proposal.provider_balance_requirement() =>
            {
                return Err(inconsistent(format!(
                    "reserved {amount}, but the deal needs {}",
                    proposal.proposal.provider_balance_requirement()
                )));
            }
            _ => {}
        }
        Ok(vec![command])
    }

    fn reserved(data: &Self::Data) -> TokenAmount {
        data.funds_reserved
    }

    fn producer(input: Input) -> Producer {
        use Producer::*;
        match input {
            Input::ProposalReceived => Network("a client's proposal"),
            Input::ProposalValidated => Derived,
            Input::ProposalInvalid => Derived,
            Input::DealAccepted => Network("the provider's ask accepts the proposal"),
            Input::DealRejected => Network("the provider's ask refuses the proposal"),
            Input::RejectionSent => {
                Runner("send(StorageRejected), answered by the network adapter")
            }
            Input::DataTransferStarted => Transfer("push opened by the client"),
            Input::DataTransferProgressed => Transfer("bytes kept, every 4 MiB"),
            Input::DataTransferInterrupted => Network("the client's connection closed mid-push"),
            Input::DataTransferRestarted => Transfer("push reopened by the client"),
            Input::DataTransferCompleted => Transfer("the client finished the push"),
            Input::DataTransferFailed => NotYet("the provider never gives up a push by itself"),
            Input::DataVerified => Transfer("the piece commitment matches"),
            Input::DataVerificationFailed => Transfer("the piece commitment differs"),
            Input::FundingInitiated => NotYet("deposits land at once on the devnet"),
            Input::FundsReserved => Chain("reserve-funds: the collateral deposit"),
            Input::FundsReservationFailed => Chain("reserve-funds refused, or past its attempts"),
            Input::PublishSent => Chain("publish-deal"),
            Input::PublishFailed => Chain("publish-deal or wait-for-message"),
            Input::DealPublished => Chain("wait-for-message"),
            Input::DealHandedOff => Chain("hand-off-to-sealing"),
            Input::HandOffFailed => Chain("hand-off-to-sealing refused"),
            Input::DealPreCommitted => Chain("watch-pre-commit"),
            Input::DealActivated => Chain("watch-pre-commit, watch-activation"),
            Input::DealFinalized => Runner("clean-up-staged-data"),
            Input::DealExpired => Chain("watch-expiry"),
            Input::DealSlashed => Chain("watch-* on a slashed deal"),
            Input::SealingFailed => Chain("the sealing pipeline failed the sector"),
            Input::DealTimedOut => Timer,
            Input::FailedByOperator => Command(
                "operator fail: Deals::fail, POST /v1/deals/{id}/fail, dealledger deal fail",
            ),
            Input::DealCancelled => Command(
                "operator cancel: Deals::cancel, POST /v1/deals/{id}/cancel, dealledger deal cancel",
            ),
            Input::CleanupCompleted => Runner("after release-funds and close-transfer"),
            Input::EffectRetrying => {
                Runner("reserve-funds, publish-deal, wait-for-message, hand-off-to-sealing")
            }
            Input::EffectStalled => Runner("the same effects, past the runner's attempts"),
            Input::RetryRequested => Command(
                "operator retry: Deals::retry, POST /v1/deals/{id}/retry, dealledger deal retry",
            ),
        }
    }

    fn failure(event: &StorageProviderEvent) -> FailureFact<'_> {
        use StorageProviderEvent as E;
        match event {
            E::EffectRetrying(attempt) => FailureFact::Retrying(attempt),
            E::EffectStalled(stalled) => FailureFact::Stalled(stalled),
            E::ProposalInvalid { .. }
            | E::DealRejected { .. }
            | E::DataTransferFailed { .. }
            | E::DataVerificationFailed { .. }
            | E::FundsReservationFailed { .. }
            | E::PublishFailed { .. }
            | E::HandOffFailed { .. }
            | E::SealingFailed { .. }
            | E::DealTimedOut { .. }
            | E::FailedByOperator { .. } => FailureFact::Fatal,
            E::ProposalReceived { .. }
            | E::ProposalValidated
            | E::DealAccepted { .. }
            | E::RejectionSent
            | E::DataTransferStarted
            | E::DataTransferProgressed { .. }
            | E::DataTransferInterrupted { .. }
            | E::DataTransferRestarted
            | E::DataTransferCompleted { .. }
            | E::DataVerified { .. }
            | E::FundingInitiated { .. }
            | E::FundsReserved { .. }
            | E::PublishSent { .. }
            | E::DealPublished { .. }
            | E::DealHandedOff
            | E::DealPreCommitted { .. }
            | E::DealActivated { .. }
            | E::DealFinalized
            | E::DealExpired { .. }
            | E::DealSlashed { .. }
            | E::DealCancelled { .. }
            | E::CleanupCompleted
            | E::RetryRequested { .. } => FailureFact::None,
        }
    }

    fn effects(output: Output, deal: &Deal<Self>) -> Vec<Effect> {
        let data = &deal.data;
        let Some(client_proposal) = data.proposal.as_ref() else { return Vec::new() };
        let proposal = &client_proposal.proposal;
        let proposal_cid = client_proposal.cid();
        let (client, provider) = (proposal.client, proposal.provider);
        let deal_id = data.deal_id;
        match output {
            Output::DecideOnProposal => vec![Effect::DecideOnProposal { proposal_cid }],
            Output::SendAcceptance => data
                .signed_deal
                .iter()
                .map(|signed| Effect::Send {
                    to: client,
                    message: OutboundMessage::StorageAccepted(Box::new(signed.clone())),
                })
                .collect(),
            Output::SendRejection => vec![Effect::Send {
                to: client,
                message: OutboundMessage::StorageRejected {
                    proposal_cid,
                    reason: data.message.clone().unwrap_or_default(),
                },
            }],
            Output::AwaitTransferRestart => {
                vec![Effect::AwaitTransferRestart { counterparty: client }]
            }
            Output::VerifyData => vec![Effect::VerifyPieceCommitment {
                expected: proposal.piece_cid,
                size: proposal.piece_size,
            }],
            Output::ReserveFunds => vec![Effect::ReserveFunds {
                wallet: provider,
                amount: proposal.provider_balance_requirement(),
            }],
            Output::WaitForFunding => {
                vec![Effect::WaitForFunding { wallet: provider, message: data.funding_message }]
            }
            Output::PublishDeal => data
                .signed_deal
                .iter()
                .map(|signed| Effect::PublishDeal { deal: Box::new(signed.clone()) })
                .collect(),
            Output::WaitForPublish => data
                .publish_message
                .map(|message| Effect::WaitForMessage { message })
                .into_iter()
                .collect(),
            Output::HandOffToSealing => deal_id
                .map(|deal_id| {
                    vec![
                        Effect::ReleaseFunds {
                            wallet: provider,
                            amount: proposal.provider_balance_requirement(),
                        },
                        Effect::HandOffToSealing {
                            deal_id,
                            piece_cid: proposal.piece_cid,
                            size: proposal.piece_size,
                        },
                    ]
                })
                .unwrap_or_default(),
            Output::WatchPreCommit => {
                deal_id.map(|deal_id| Effect::WatchPreCommit { deal_id }).into_iter().collect()
            }
            Output::WatchActivation => {
                deal_id.map(|deal_id| Effect::WatchActivation { deal_id }).into_iter().collect()
            }
            Output::FinalizeDeal => {
                vec![Effect::CleanUpStagedData { piece_cid: proposal.piece_cid }]
            }
            Output::WatchExpiry => deal_id
                .map(|deal_id| Effect::WatchExpiry { deal_id, end_epoch: proposal.end_epoch })
                .into_iter()
                .collect(),
            Output::CleanUp => vec![
                Effect::CloseTransfer { counterparty: client },
                Effect::ReleaseFunds { wallet: provider, amount: data.funds_reserved },
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::PaddedPieceSize;
    use crate::domain::storage::{ProposalError, StorageDealProposal};
    use crate::fsm::conformance::Sample;
    use crate::fsm::fixtures::*;
    use crate::fsm::testing::given;
    use StorageProviderEvent as E;

    fn reason() -> String {
        "test reason".into()
    }

    impl Sample for StorageProvider {
        fn sample(input: Input, deal: &Deal<Self>) -> E {
            match input {
                Input::ProposalReceived => {
                    E::ProposalReceived { proposal: Box::new(signed_proposal()) }
                }
                Input::ProposalValidated => E::ProposalValidated,
                Input::ProposalInvalid => E::ProposalInvalid { reason: reason() },
                Input::DealAccepted => E::DealAccepted { deal: Box::new(storage_deal()) },
                Input::DealRejected => E::DealRejected { reason: reason() },
                Input::RejectionSent => E::RejectionSent,
                Input::DataTransferStarted => E::DataTransferStarted,
                Input::DataTransferProgressed => {
                    E::DataTransferProgressed { bytes: (deal.data.bytes_received + 512).min(2048) }
                }
                Input::DataTransferInterrupted => E::DataTransferInterrupted { reason: reason() },
                Input::DataTransferRestarted => E::DataTransferRestarted,
                Input::DataTransferCompleted => E::DataTransferCompleted { bytes: 2048 },
                Input::DataTransferFailed => E::DataTransferFailed { reason: reason() },
                Input::DataVerified => E::DataVerified { piece_cid: proposal().piece_cid },
                Input::DataVerificationFailed => E::DataVerificationFailed { reason: reason() },
                Input::FundingInitiated => E::FundingInitiated { message: message_cid(b"fund") },
                Input::FundsReserved => E::FundsReserved { amount: proposal().provider_collateral },
                Input::FundsReservationFailed => E::FundsReservationFailed { reason: reason() },
                Input::PublishSent => E::PublishSent { message: message_cid(b"publish") },
                Input::PublishFailed => E::PublishFailed { reason: reason() },
                Input::DealPublished => E::DealPublished { deal_id: DealId(42) },
                Input::DealHandedOff => E::DealHandedOff,
                Input::HandOffFailed => E::HandOffFailed { reason: reason() },
                Input::DealPreCommitted => E::DealPreCommitted { sector: SectorNumber(7) },
                Input::DealActivated => E::DealActivated { epoch: ChainEpoch(9_000) },
                Input::DealFinalized => E::DealFinalized,
                Input::DealExpired => E::DealExpired { epoch: ChainEpoch(600_000) },
                Input::DealSlashed => E::DealSlashed { epoch: ChainEpoch(20_000) },
                Input::SealingFailed => E::SealingFailed { reason: reason() },
                Input::DealTimedOut => E::DealTimedOut { reason: reason() },
                Input::DealCancelled => E::DealCancelled { reason: reason() },
                Input::FailedByOperator => E::FailedByOperator { reason: reason() },
                Input::CleanupCompleted => E::CleanupCompleted,
                Input::EffectRetrying => E::EffectRetrying(attempt_failed()),
                Input::EffectStalled => E::EffectStalled(stalled()),
                Input::RetryRequested => E::RetryRequested { reason: reason() },
            }
        }

        fn derived(input: Input) -> bool {
            matches!(input, Input::ProposalValidated | Input::ProposalInvalid)
        }
    }

    crate::conformance_tests!(StorageProvider);

    /// Who sends each input; the ones nothing sends yet, named (issue 9 wires them).
    #[test]
    fn every_input_has_its_producer() {
        crate::fsm::conformance::every_input_has_its_producer::<StorageProvider>(&[
            "DataTransferFailed",
            "FundingInitiated",
        ]);
    }

    fn received(proposal: ClientDealProposal) -> E {
        E::ProposalReceived { proposal: Box::new(proposal) }
    }

    fn accepted_history() -> Vec<E> {
        vec![
            received(signed_proposal()),
            E::ProposalValidated,
            E::DealAccepted { deal: Box::new(storage_deal()) },
        ]
    }

    fn published_history() -> Vec<E> {
        let mut events = accepted_history();
        events.extend([
            E::DataTransferStarted,
            E::DataTransferCompleted { bytes: 2048 },
            E::DataVerified { piece_cid: proposal().piece_cid },
            E::FundsReserved { amount: proposal().provider_collateral },
            E::PublishSent { message: message_cid(b"publish") },
        ]);
        events
    }

    #[test]
    fn accepts_a_valid_proposal_and_asks_the_policy() {
        given::<StorageProvider>([])
            .at_epoch(NOW)
            .when(received(signed_proposal()))
            .then([received(signed_proposal()), E::ProposalValidated])
            .then_state(State::AcceptWait)
            .then_effects(&["decide-on-proposal"]);
    }

    #[test]
    fn records_a_rejection_when_the_start_epoch_has_passed() {
        given::<StorageProvider>([])
            .at_epoch(10_000)
            .when(received(signed_proposal()))
            .then_state(State::Rejecting)
            .then_effects(&["send"]);
    }

    #[test]
    fn rejects_a_proposal_with_a_bad_client_signature() {
        let mut forged = signed_proposal();
        forged.proposal.storage_price_per_epoch = TokenAmount(1);
        given::<StorageProvider>([]).when(received(forged)).then_rejects(|r| {
            matches!(r, Rejection::Proposal(ProposalError::BadClientSignature { .. }))
        });
    }

    #[test]
    fn rejects_a_proposal_signed_by_someone_else() {
        let forged = ClientDealProposal::sign(proposal(), &stranger_key());
        given::<StorageProvider>([]).when(received(forged)).then_rejects(|r| {
            matches!(r, Rejection::Proposal(ProposalError::BadClientSignature { .. }))
        });
    }

    fn rejects_changed_proposal(
        change: impl FnOnce(&mut StorageDealProposal),
        expected: ProposalError,
    ) {
        let mut changed = proposal();
        change(&mut changed);
        let signed = ClientDealProposal::sign(changed, &client_key());
        given::<StorageProvider>([])
            .when(received(signed))
            .then_rejects(|r| r == &Rejection::Proposal(expected.clone()));
    }

    #[test]
    fn rejects_a_piece_size_that_is_not_a_power_of_two() {
        rejects_changed_proposal(
            |p| p.piece_size = PaddedPieceSize(3000),
            ProposalError::InvalidPieceSize { size: 3000 },
        );
    }

    #[test]
    fn rejects_a_piece_smaller_than_128_bytes() {
        rejects_changed_proposal(
            |p| p.piece_size = PaddedPieceSize(64),
            ProposalError::InvalidPieceSize { size: 64 },
        );
    }

    #[test]
    fn rejects_a_deal_that_ends_before_it_starts() {
        rejects_changed_proposal(
            |p| p.end_epoch = ChainEpoch(9_000),
            ProposalError::EndNotAfterStart { start: 10_000, end: 9_000 },
        );
    }

    #[test]
    fn rejects_a_deal_shorter_than_180_days() {
        rejects_changed_proposal(
            |p| p.end_epoch = ChainEpoch(10_100),
            ProposalError::DurationOutOfBounds { duration: 100, min: 518_400, max: 1_555_200 },
        );
    }

    #[test]
    fn rejects_a_label_longer_than_the_policy_allows() {
        rejects_changed_proposal(
            |p| p.label = "x".repeat(300),
            ProposalError::LabelTooLong { length: 300, max: 256 },
        );
    }

    #[test]
    fn refuses_an_input_for_a_deal_that_does_not_exist() {
        given::<StorageProvider>([])
            .when(E::DataTransferStarted)
            .then_rejects(|r| matches!(r, Rejection::DealNotFound { .. }));
    }

    #[test]
    fn refuses_a_derived_event_sent_as_a_command() {
        given::<StorageProvider>([received(signed_proposal())])
            .when(E::ProposalValidated)
            .then_rejects(|r| matches!(r, Rejection::DerivedEvent { .. }));
    }

    #[test]
    fn rejects_a_signed_deal_for_another_proposal() {
        let mut other = proposal();
        other.label = "other".into();
        let signed =
            StorageDeal::sign(ClientDealProposal::sign(other, &client_key()), &provider_key());
        given::<StorageProvider>(accepted_history()[..2].to_vec())
            .when(E::DealAccepted { deal: Box::new(signed) })
            .then_rejects(|r| matches!(r, Rejection::Inconsistent { .. }));
    }

    #[test]
    fn rejects_a_deal_counter_signed_by_someone_else() {
        let signed = StorageDeal::sign(signed_proposal(), &stranger_key());
        given::<StorageProvider>(accepted_history()[..2].to_vec())
            .when(E::DealAccepted { deal: Box::new(signed) })
            .then_rejects(|r| {
                matches!(r, Rejection::Proposal(ProposalError::BadProviderSignature { .. }))
            });
    }

    #[test]
    fn rejects_data_verified_against_another_piece() {
        let mut history = accepted_history();
        history.extend([E::DataTransferStarted, E::DataTransferCompleted { bytes: 2048 }]);
        given::<StorageProvider>(history)
            .when(E::DataVerified { piece_cid: crate::domain::PieceCid::from_commitment([1; 32]) })
            .then_rejects(|r| matches!(r, Rejection::Inconsistent { .. }));
    }

    #[test]
    fn rejects_progress_that_goes_backwards() {
        let mut history = accepted_history();
        history.extend([E::DataTransferStarted, E::DataTransferProgressed { bytes: 1024 }]);
        given::<StorageProvider>(history)
            .when(E::DataTransferProgressed { bytes: 512 })
            .then_rejects(|r| matches!(r, Rejection::Inconsistent { .. }));
    }

    #[test]
    fn publishing_releases_the_reservation_and_hands_off_to_sealing() {
        let then = given::<StorageProvider>(published_history())
            .when(E::DealPublished { deal_id: DealId(42) })
            .then_state(State::Staged)
            .then_effects(&["release-funds", "hand-off-to-sealing"]);
        assert_eq!(then.deal().data.funds_reserved, TokenAmount::ZERO);
        assert_eq!(then.deal().data.deal_id, Some(DealId(42)));
    }

    #[test]
    fn a_failed_publish_passes_through_failing_and_releases_the_collateral() {
        let then = given::<StorageProvider>(published_history())
            .when(E::PublishFailed { reason: "out of gas".into() })
            .then_state(State::Failing)
            .then_effects(&["close-transfer", "release-funds"]);
        let released = then.deal().clone();
        assert!(matches!(
            &then.decision_effects()[1],
            Effect::ReleaseFunds { amount, .. } if *amount == proposal().provider_collateral
        ));
        let mut history = published_history();
        history.push(E::PublishFailed { reason: "out of gas".into() });
        let done =
            given::<StorageProvider>(history).when(E::CleanupCompleted).then_state(State::Error);
        assert_eq!(done.deal().data.funds_reserved, TokenAmount::ZERO);
        assert_eq!(released.data.message.as_deref(), Some("out of gas"));
    }

    #[test]
    fn a_terminal_deal_accepts_no_input() {
        let mut history = published_history();
        history.extend([
            E::DealPublished { deal_id: DealId(42) },
            E::DealHandedOff,
            E::DealPreCommitted { sector: SectorNumber(7) },
            E::DealActivated { epoch: ChainEpoch(9_000) },
            E::DealFinalized,
            E::DealExpired { epoch: ChainEpoch(600_000) },
        ]);
        given::<StorageProvider>(history)
            .when(E::DealSlashed { epoch: ChainEpoch(600_001) })
            .then_rejects(|r| matches!(r, Rejection::Transition(t) if t.state == "Expired"));
    }
}
