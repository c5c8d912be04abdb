//! The storage client's side of a storage deal: reserve funds, propose (step 1), push the data
//! once the provider accepts (steps 4-7), then follow the deal until the chain shows it
//! published, sealed, active and finally expired or slashed.

use cid::Cid;
use rust_fsm::{StateMachineImpl, state_machine};
use serde::{Deserialize, Serialize};

use super::effects::{Effect, OutboundMessage, TransferDirection};
use super::failure::{AttemptFailed, Stalled};
use super::{
    Deal, DecideContext, FailureFact, Label, Machine, Producer, Rejection, check_bytes,
    inconsistent,
};
use crate::alphabet;
use crate::domain::storage::{ClientDealProposal, ProposalError, StorageDeal};
use crate::domain::{ChainEpoch, DealId, SectorNumber, TokenAmount};
use crate::events::JournalEvent;

state_machine! {
    #[state_machine(
        state(crate::fsm::storage_client::State),
        input(crate::fsm::storage_client::Input),
        output(crate::fsm::storage_client::Output)
    )]
    pub machine(Unknown)

    Unknown(DealInitiated) => ReserveClientFunds [ReserveFunds],
    ReserveClientFunds => {
        FundingInitiated => ClientFunding [WaitForFunding],
        FundsReserved => FundsReserved [SendProposal],
        FundsReservationFailed => Failing [CleanUp],
        EffectRetrying => ReserveClientFunds,
        EffectStalled => FundingPaused,
        DealCancelled => Failing [CancelDeal],
        FailedByOperator => Failing [CleanUp],
    },
    ClientFunding => {
        FundsReserved => FundsReserved [SendProposal],
        FundsReservationFailed => Failing [CleanUp],
        DealCancelled => Failing [CancelDeal],
        FailedByOperator => Failing [CleanUp],
    },
    FundsReserved => {
        DealAccepted => StartDataTransfer [OpenTransfer],
        DealRejected => Failing [CleanUp],
        DealCancelled => Failing [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    StartDataTransfer => {
        DataTransferQueued => TransferQueued,
        DataTransferStarted => Transferring,
        DataTransferFailed => Failing [CleanUp],
        EffectRetrying => StartDataTransfer,
        EffectStalled => TransferPaused,
        DealCancelled => Failing [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    TransferQueued => {
        DataTransferStarted => Transferring,
        DataTransferFailed => Failing [CleanUp],
        DealCancelled => Failing [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    Transferring => {
        DataTransferProgressed => Transferring,
        DataTransferInterrupted => ClientTransferRestart [RestartTransfer],
        DataTransferCompleted => CheckForAcceptance [QueryDealStatus],
        DataTransferFailed => Failing [CleanUp],
        DealCancelled => Failing [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    ClientTransferRestart => {
        DataTransferRestarted => Transferring,
        DataTransferFailed => Failing [CleanUp],
        EffectRetrying => ClientTransferRestart,
        EffectStalled => TransferPaused,
        DealCancelled => Failing [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    CheckForAcceptance => {
        DealPublished => ProposalAccepted [VerifyDealOnChain],
        ProviderFailedDeal => Failing [CleanUp],
        DealCancelled => Failing [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    ProposalAccepted => {
        PublishConfirmed => AwaitingPreCommit [WatchPreCommit],
        PublishVerificationFailed => Failing [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    AwaitingPreCommit => {
        DealPreCommitted => Sealing [WatchActivation],
        DealActivated => Active [WatchExpiry],
        DealTimedOut => Failing [CleanUp],
        DealSlashed => Slashed,
        FailedByOperator => Failing [CleanUp],
    },
    Sealing => {
        DealActivated => Active [WatchExpiry],
        DealTimedOut => Failing [CleanUp],
        DealSlashed => Slashed,
        FailedByOperator => Failing [CleanUp],
    },
    Active => {
        DealExpired => Expired,
        DealSlashed => Slashed,
    },
    FundingPaused => {
        RetryRequested => ReserveClientFunds [ReserveFunds],
        DealCancelled => Failing [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    // The push resumes from the offset the provider recorded, not from zero.
    TransferPaused => {
        RetryRequested => ClientTransferRestart [RestartTransfer],
        DealCancelled => Failing [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    Failing(CleanupCompleted) => Error,
}

alphabet! {
    /// Where a client's deal is. Codes are go-fil-markets' `StorageDeal*` status codes.
    pub enum State {
        /// Nothing initiated yet.
        Unknown = 0,
        /// The provider published the deal; the client is checking it on chain.
        ProposalAccepted = 3,
        /// The deal's sector is being sealed.
        Sealing = 5,
        /// The deal is active on chain.
        Active = 7,
        /// The deal reached its end epoch.
        Expired = 8,
        /// The provider's collateral was slashed.
        Slashed = 9,
        /// Something failed: reserved funds are released and the transfer closed.
        Failing = 11,
        /// Funds are reserved; the proposal is on its way to the provider.
        FundsReserved = 12,
        /// Data sent; waiting for the provider to publish the deal.
        CheckForAcceptance = 13,
        /// Accepted by the provider; opening the push transfer.
        StartDataTransfer = 16,
        /// Sending the data.
        Transferring = 17,
        /// Reserving the storage fee and collateral in the client's market balance.
        ReserveClientFunds = 21,
        /// A message adding market funds is on its way to the chain.
        ClientFunding = 23,
        /// Final: the deal failed and everything it held was released.
        Error = 26,
        /// The transfer was interrupted; the client is restarting it.
        ClientTransferRestart = 28,
        /// Published and verified; waiting for the sector to be pre-committed.
        AwaitingPreCommit = 29,
        /// The transfer is queued behind others.
        TransferQueued = 30,
        /// Reserving the client's funds kept failing for a recoverable reason (market
        /// balance short, chain unreachable): waiting for an operator to retry, cancel or fail.
        FundingPaused = 40,
        /// The push kept failing (the provider unreachable): waiting for an operator to retry
        /// (it resumes where the provider's journal says), cancel or fail; timed out otherwise.
        TransferPaused = 43,
    }
}

alphabet! {
    /// The client machine's inputs, one per event kind.
    pub enum Input {
        DealInitiated, FundingInitiated, FundsReserved, FundsReservationFailed, DealAccepted,
        DealRejected, DataTransferQueued, DataTransferStarted, DataTransferProgressed,
        DataTransferInterrupted, DataTransferRestarted, DataTransferCompleted, DataTransferFailed,
        DealPublished, ProviderFailedDeal, PublishConfirmed, PublishVerificationFailed,
        DealPreCommitted, DealActivated, DealExpired, DealSlashed, DealTimedOut, DealCancelled,
        CleanupCompleted,
        FailedByOperator, EffectRetrying, EffectStalled, RetryRequested,
    }
}

alphabet! {
    /// What the client must do on entering a state.
    pub enum Output {
        ReserveFunds, WaitForFunding, SendProposal, OpenTransfer, RestartTransfer,
        QueryDealStatus, VerifyDealOnChain, WatchPreCommit, WatchActivation, WatchExpiry, CleanUp,
        CancelDeal,
    }
}

/// What happened to a client's deal. Journal payload: append variants only, never reorder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StorageClientEvent {
    /// The user started a deal with a signed proposal.
    DealInitiated { proposal: Box<ClientDealProposal> },
    /// A message adding market funds was sent.
    FundingInitiated { message: Cid },
    /// The storage fee and client collateral are reserved.
    FundsReserved { amount: TokenAmount },
    /// The funds could not be reserved.
    FundsReservationFailed { reason: String },
    /// The provider returned the counter-signed deal (step 2).
    DealAccepted { deal: Box<StorageDeal> },
    /// The provider rejected the proposal.
    DealRejected { reason: String },
    /// The push transfer waits in a queue.
    DataTransferQueued,
    /// The push transfer started (step 7).
    DataTransferStarted,
    /// Bytes sent so far (cumulative).
    DataTransferProgressed { bytes: u64 },
    /// The transfer stopped but may be restarted.
    DataTransferInterrupted { reason: String },
    /// The transfer was restarted.
    DataTransferRestarted,
    /// Every byte was sent.
    DataTransferCompleted { bytes: u64 },
    /// The transfer failed for good.
    DataTransferFailed { reason: String },
    /// The provider reports the deal published with this id and message.
    DealPublished { deal_id: DealId, message: Cid },
    /// The provider reports the deal failed on its side.
    ProviderFailedDeal { reason: String },
    /// The chain shows the published deal is the one proposed.
    PublishConfirmed,
    /// The chain does not show the deal the provider reported.
    PublishVerificationFailed { reason: String },
    /// The sector holding the piece was pre-committed.
    DealPreCommitted { sector: SectorNumber },
    /// The deal was activated.
    DealActivated { epoch: ChainEpoch },
    /// The deal reached its end epoch.
    DealExpired { epoch: ChainEpoch },
    /// The provider's collateral was slashed.
    DealSlashed { epoch: ChainEpoch },
    /// A deadline passed.
    DealTimedOut { reason: String },
    /// The user or an operator cancelled the deal.
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

impl StorageClientEvent {
    /// The machine input this event stands for.
    pub fn input(&self) -> Input {
        use StorageClientEvent as E;
        match self {
            E::DealInitiated { .. } => Input::DealInitiated,
            E::FundingInitiated { .. } => Input::FundingInitiated,
            E::FundsReserved { .. } => Input::FundsReserved,
            E::FundsReservationFailed { .. } => Input::FundsReservationFailed,
            E::DealAccepted { .. } => Input::DealAccepted,
            E::DealRejected { .. } => Input::DealRejected,
            E::DataTransferQueued => Input::DataTransferQueued,
            E::DataTransferStarted => Input::DataTransferStarted,
            E::DataTransferProgressed { .. } => Input::DataTransferProgressed,
            E::DataTransferInterrupted { .. } => Input::DataTransferInterrupted,
            E::DataTransferRestarted => Input::DataTransferRestarted,
            E::DataTransferCompleted { .. } => Input::DataTransferCompleted,
            E::DataTransferFailed { .. } => Input::DataTransferFailed,
            E::DealPublished { .. } => Input::DealPublished,
            E::ProviderFailedDeal { .. } => Input::ProviderFailedDeal,
            E::PublishConfirmed => Input::PublishConfirmed,
            E::PublishVerificationFailed { .. } => Input::PublishVerificationFailed,
            E::DealPreCommitted { .. } => Input::DealPreCommitted,
            E::DealActivated { .. } => Input::DealActivated,
            E::DealExpired { .. } => Input::DealExpired,
            E::DealSlashed { .. } => Input::DealSlashed,
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

impl JournalEvent for StorageClientEvent {
    const SCHEMA_VERSION: i16 = 1;

    fn event_type(&self) -> &'static str {
        super::label::kebab(self.input().name())
    }
}

/// What a client's events fold into.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClientDeal {
    /// The signed proposal.
    pub proposal: Option<ClientDealProposal>,
    /// Its CID.
    pub proposal_cid: Option<Cid>,
    /// The provider's counter-signed deal.
    pub signed_deal: Option<StorageDeal>,
    /// Funds this deal holds reserved in the client's market balance, in attoFIL.
    pub funds_reserved: TokenAmount,
    /// The funding message, while one is pending.
    pub funding_message: Option<Cid>,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// How many times the transfer was interrupted.
    pub transfer_interruptions: u32,
    /// The on-chain deal id, once published.
    pub deal_id: Option<DealId>,
    /// The publish message.
    pub publish_message: Option<Cid>,
    /// The sector holding the piece.
    pub sector: Option<SectorNumber>,
    /// Epoch of activation.
    pub activation_epoch: Option<ChainEpoch>,
    /// Why the deal failed.
    pub message: Option<String>,
}

/// The storage client machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageClient;

impl Machine for StorageClient {
    const NAME: &'static str = "storage_client";
    type State = State;
    type Input = Input;
    type Output = Output;
    type Event = StorageClientEvent;
    type Data = ClientDeal;
    const INITIAL: State = State::Unknown;
    const TERMINAL: &'static [State] = &[State::Expired, State::Slashed, State::Error];

    fn transition(state: State, input: Input) -> Option<State> {
        machine::Impl::transition(&state, &input)
    }

    fn output(state: State, input: Input) -> Option<Output> {
        machine::Impl::output(&state, &input)
    }

    fn input(event: &StorageClientEvent) -> Input {
        event.input()
    }

    fn fold(data: &mut ClientDeal, event: &StorageClientEvent) {
        use StorageClientEvent as E;
        match event {
            E::DealInitiated { proposal } => {
                data.proposal_cid = Some(proposal.cid());
                data.proposal = Some((**proposal).clone());
            }
            E::FundingInitiated { message } => data.funding_message = Some(*message),
            E::FundsReserved { amount } => {
                data.funds_reserved = *amount;
                data.funding_message = None;
            }
            E::DealAccepted { deal } => data.signed_deal = Some((**deal).clone()),
            E::DataTransferProgressed { bytes } | E::DataTransferCompleted { bytes } => {
                data.bytes_sent = *bytes
            }
            E::DataTransferInterrupted { .. } => data.transfer_interruptions += 1,
            E::DealPublished { deal_id, message } => {
                data.deal_id = Some(*deal_id);
                data.publish_message = Some(*message);
            }
            // Confirmed on chain: the market actor now holds the funds, not our reservation.
            E::PublishConfirmed => data.funds_reserved = TokenAmount::ZERO,
            E::DealPreCommitted { sector } => data.sector = Some(*sector),
            E::DealActivated { epoch } => data.activation_epoch = Some(*epoch),
            E::FundsReservationFailed { reason }
            | E::DealRejected { reason }
            | E::DataTransferFailed { reason }
            | E::ProviderFailedDeal { reason }
            | E::PublishVerificationFailed { reason }
            | E::DealTimedOut { reason }
            | E::DealCancelled { reason }
            | E::FailedByOperator { reason }
            | E::EffectRetrying(AttemptFailed { reason, .. })
            | E::EffectStalled(Stalled { reason, .. }) => data.message = Some(reason.clone()),
            E::RetryRequested { .. } => data.message = None,
            // Invariant: a deal in a terminal state holds no reserved funds.
            E::CleanupCompleted => data.funds_reserved = TokenAmount::ZERO,
            E::DataTransferQueued
            | E::DataTransferStarted
            | E::DataTransferRestarted
            | E::DealExpired { .. }
            | E::DealSlashed { .. } => {}
        }
    }

    fn decide(
        deal: &Deal<Self>,
        command: StorageClientEvent,
        ctx: &DecideContext,
    ) -> Result<Vec<StorageClientEvent>, Rejection> {
        use StorageClientEvent as E;
        if let E::DealInitiated { proposal } = &command {
            deal.require_new()?;
            proposal.validate(&ctx.policy)?;
            let start = proposal.proposal.start_epoch;
            if start <= ctx.epoch {
                return Err(ProposalError::StartEpochElapsed {
                    start: start.0,
                    current: ctx.epoch.0,
                }
                .into());
            }
            return Ok(vec![command]);
        }
        deal.require_started()?;
        let proposal =
            deal.data.proposal.as_ref().ok_or(Rejection::DealNotFound { stream_id: deal.id })?;
        match &command {
            E::DealAccepted { deal: signed } => {
                if &signed.client_proposal != proposal {
                    return Err(inconsistent("the provider signed a different proposal"));
                }
                // The client proposal is the one verified when the deal began.
                signed.verify_provider_signature()?;
            }
            E::FundsReserved { amount } => {
                let needed = proposal.proposal.client_balance_requirement().unwrap_or_default();
                if *amount != needed {
                    return Err(inconsistent(format!(
                        "reserved {amount}, but the deal needs {needed}"
                    )));
                }
            }
            E::DataTransferProgressed { bytes } | E::DataTransferCompleted { bytes } => {
                check_bytes(*bytes, deal.data.bytes_sent, proposal.proposal.piece_size.0)?;
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
            Input::DealInitiated => Command("Deals::initiate_deal, POST /v1/storage-deals"),
            Input::FundingInitiated => NotYet("deposits land at once on the devnet"),
            Input::FundsReserved => Chain("reserve-funds: the deposit"),
            Input::FundsReservationFailed => Chain("reserve-funds refused, or past its attempts"),
            Input::DealAccepted => Network("the provider's answer to the proposal"),
            Input::DealRejected => Network("the provider's answer to the proposal"),
            Input::DataTransferQueued => NotYet("pushes start at once"),
            Input::DataTransferStarted => Transfer("push opened"),
            Input::DataTransferProgressed => Transfer("push progress, every 4 MiB"),
            Input::DataTransferInterrupted => Transfer("push connection lost"),
            Input::DataTransferRestarted => Transfer("push resumed"),
            Input::DataTransferCompleted => Transfer("every byte acknowledged"),
            Input::DataTransferFailed => Runner("open-transfer past its attempts"),
            Input::DealPublished => Network("the provider's status answer"),
            Input::ProviderFailedDeal => Network("the provider's status answer"),
            Input::PublishConfirmed => Chain("verify-deal-on-chain"),
            Input::PublishVerificationFailed => Chain("verify-deal-on-chain"),
            Input::DealPreCommitted => Chain("watch-pre-commit"),
            Input::DealActivated => Chain("watch-pre-commit, watch-activation"),
            Input::DealExpired => Chain("watch-expiry"),
            Input::DealSlashed => Chain("watch-* on a slashed deal"),
            Input::DealTimedOut => Timer,
            Input::FailedByOperator => Command(
                "operator fail: Deals::fail, POST /v1/deals/{id}/fail, dealledger deal fail",
            ),
            Input::DealCancelled => Command(
                "operator cancel: Deals::cancel, POST /v1/deals/{id}/cancel, dealledger deal cancel",
            ),
            Input::CleanupCompleted => Runner("after release-funds and close-transfer"),
            Input::EffectRetrying => Runner("reserve-funds, open-transfer, restart-transfer"),
            Input::EffectStalled => Runner("the same effects, past the runner's attempts"),
            Input::RetryRequested => Command(
                "operator retry: Deals::retry, POST /v1/deals/{id}/retry, dealledger deal retry",
            ),
        }
    }

    fn failure(event: &StorageClientEvent) -> FailureFact<'_> {
        use StorageClientEvent as E;
        match event {
            E::EffectRetrying(attempt) => FailureFact::Retrying(attempt),
            E::EffectStalled(stalled) => FailureFact::Stalled(stalled),
            E::FundsReservationFailed { .. }
            | E::DealRejected { .. }
            | E::DataTransferFailed { .. }
            | E::ProviderFailedDeal { .. }
            | E::PublishVerificationFailed { .. }
            | E::DealTimedOut { .. }
            | E::FailedByOperator { .. } => FailureFact::Fatal,
            E::DealInitiated { .. }
            | E::FundingInitiated { .. }
            | E::FundsReserved { .. }
            | E::DealAccepted { .. }
            | E::DataTransferQueued
            | E::DataTransferStarted
            | E::DataTransferProgressed { .. }
            | E::DataTransferInterrupted { .. }
            | E::DataTransferRestarted
            | E::DataTransferCompleted { .. }
            | E::DealPublished { .. }
            | E::PublishConfirmed
            | E::DealPreCommitted { .. }
            | E::DealActivated { .. }
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
        let (client, provider) = (proposal.client, proposal.provider);
        let requirement = proposal.client_balance_requirement().unwrap_or_default();
        let deal_id = data.deal_id;
        match output {
            Output::ReserveFunds => {
                vec![Effect::ReserveFunds { wallet: client, amount: requirement }]
            }
            Output::WaitForFunding => {
                vec![Effect::WaitForFunding { wallet: client, message: data.funding_message }]
            }
            Output::SendProposal => vec![Effect::Send {
                to: provider,
                message: OutboundMessage::StorageProposal(Box::new(client_proposal.clone())),
            }],
            Output::OpenTransfer => vec![Effect::OpenTransfer {
                counterparty: provider,
                direction: TransferDirection::Push,
                range: None,
            }],
            Output::RestartTransfer => vec![Effect::RestartTransfer { counterparty: provider }],
            Output::QueryDealStatus => vec![Effect::Send {
                to: provider,
                message: OutboundMessage::StorageStatusQuery {
                    proposal_cid: client_proposal.cid(),
                },
            }],
            Output::VerifyDealOnChain => deal_id
                .map(|deal_id| Effect::VerifyDealOnChain {
                    deal_id,
                    proposal_cid: client_proposal.cid(),
                })
                .into_iter()
                .collect(),
            Output::WatchPreCommit => deal_id
                .map(|deal_id| {
                    vec![
                        Effect::ReleaseFunds { wallet: client, amount: requirement },
                        Effect::WatchPreCommit { deal_id },
                    ]
                })
                .unwrap_or_default(),
            Output::WatchActivation => {
                deal_id.map(|deal_id| Effect::WatchActivation { deal_id }).into_iter().collect()
            }
            Output::WatchExpiry => deal_id
                .map(|deal_id| Effect::WatchExpiry { deal_id, end_epoch: proposal.end_epoch })
                .into_iter()
                .collect(),
            Output::CleanUp => vec![
                Effect::CloseTransfer { counterparty: provider },
                Effect::ReleaseFunds { wallet: client, amount: data.funds_reserved },
            ],
            // Cancelled: clean up, and tell a provider that accepted the deal, so it cancels
            // its side instead of waiting for data or a publish that will not come.
            Output::CancelDeal => {
                let mut effects = Self::effects(Output::CleanUp, deal);
                if data.signed_deal.is_some() {
                    effects.push(Effect::Send {
                        to: provider,
                        message: OutboundMessage::Cancelled {
                            reason: data.message.clone().unwrap_or_default(),
                        },
                    });
                }
                effects
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::conformance::Sample;
    use crate::fsm::fixtures::*;
    use crate::fsm::testing::given;
    use StorageClientEvent as E;

    fn reason() -> String {
        "test reason".into()
    }

    fn requirement() -> TokenAmount {
        proposal().client_balance_requirement().expect("fixture amounts do not overflow")
    }

    impl Sample for StorageClient {
        fn sample(input: Input, deal: &Deal<Self>) -> E {
            match input {
                Input::DealInitiated => E::DealInitiated { proposal: Box::new(signed_proposal()) },
                Input::FundingInitiated => E::FundingInitiated { message: message_cid(b"fund") },
                Input::FundsReserved => E::FundsReserved { amount: requirement() },
                Input::FundsReservationFailed => E::FundsReservationFailed { reason: reason() },
                Input::DealAccepted => E::DealAccepted { deal: Box::new(storage_deal()) },
                Input::DealRejected => E::DealRejected { reason: reason() },
                Input::DataTransferQueued => E::DataTransferQueued,
                Input::DataTransferStarted => E::DataTransferStarted,
                Input::DataTransferProgressed => {
                    E::DataTransferProgressed { bytes: (deal.data.bytes_sent + 512).min(2048) }
                }
                Input::DataTransferInterrupted => E::DataTransferInterrupted { reason: reason() },
                Input::DataTransferRestarted => E::DataTransferRestarted,
                Input::DataTransferCompleted => E::DataTransferCompleted { bytes: 2048 },
                Input::DataTransferFailed => E::DataTransferFailed { reason: reason() },
                Input::DealPublished => {
                    E::DealPublished { deal_id: DealId(42), message: message_cid(b"publish") }
                }
                Input::ProviderFailedDeal => E::ProviderFailedDeal { reason: reason() },
                Input::PublishConfirmed => E::PublishConfirmed,
                Input::PublishVerificationFailed => {
                    E::PublishVerificationFailed { reason: reason() }
                }
                Input::DealPreCommitted => E::DealPreCommitted { sector: SectorNumber(7) },
                Input::DealActivated => E::DealActivated { epoch: ChainEpoch(9_000) },
                Input::DealExpired => E::DealExpired { epoch: ChainEpoch(600_000) },
                Input::DealSlashed => E::DealSlashed { epoch: ChainEpoch(20_000) },
                Input::DealTimedOut => E::DealTimedOut { reason: reason() },
                Input::DealCancelled => E::DealCancelled { reason: reason() },
                Input::FailedByOperator => E::FailedByOperator { reason: reason() },
                Input::CleanupCompleted => E::CleanupCompleted,
                Input::EffectRetrying => E::EffectRetrying(attempt_failed()),
                Input::EffectStalled => E::EffectStalled(stalled()),
                Input::RetryRequested => E::RetryRequested { reason: reason() },
            }
        }

        fn derived(_input: Input) -> bool {
            false
        }
    }

    crate::conformance_tests!(StorageClient);

    /// Who sends each input; the ones nothing sends yet, named (issue 9 wires them).
    #[test]
    fn every_input_has_its_producer() {
        crate::fsm::conformance::every_input_has_its_producer::<StorageClient>(&[
            "FundingInitiated",
            "DataTransferQueued",
        ]);
    }

    fn initiated() -> E {
        E::DealInitiated { proposal: Box::new(signed_proposal()) }
    }

    #[test]
    fn initiating_a_deal_reserves_the_fee_and_collateral() {
        let then = given::<StorageClient>([])
            .at_epoch(NOW)
            .when(initiated())
            .then([initiated()])
            .then_state(State::ReserveClientFunds)
            .then_effects(&["reserve-funds"]);
        assert!(matches!(
            &then.decision_effects()[0],
            Effect::ReserveFunds { amount, .. } if *amount == requirement()
        ));
    }

    #[test]
    fn rejects_a_proposal_whose_start_epoch_has_passed() {
        given::<StorageClient>([]).at_epoch(10_000).when(initiated()).then_rejects(|r| {
            r == &Rejection::Proposal(ProposalError::StartEpochElapsed {
                start: 10_000,
                current: 10_000,
            })
        });
    }

    #[test]
    fn rejects_initiating_the_same_deal_twice() {
        given::<StorageClient>([initiated()])
            .when(initiated())
            .then_rejects(|r| matches!(r, Rejection::DealExists { .. }));
    }

    #[test]
    fn rejects_reserving_an_amount_other_than_the_requirement() {
        given::<StorageClient>([initiated()])
            .when(E::FundsReserved { amount: TokenAmount(1) })
            .then_rejects(|r| matches!(r, Rejection::Inconsistent { .. }));
    }

    #[test]
    fn a_rejected_proposal_fails_through_failing_and_releases_the_reservation() {
        let then =
            given::<StorageClient>([initiated(), E::FundsReserved { amount: requirement() }])
                .when(E::DealRejected { reason: "price too low".into() })
                .then_state(State::Failing)
                .then_effects(&["close-transfer", "release-funds"]);
        assert!(matches!(
            &then.decision_effects()[1],
            Effect::ReleaseFunds { amount, .. } if *amount == requirement()
        ));
    }

    #[test]
    fn an_interrupted_transfer_is_restarted() {
        given::<StorageClient>([
            initiated(),
            E::FundsReserved { amount: requirement() },
            E::DealAccepted { deal: Box::new(storage_deal()) },
            E::DataTransferStarted,
        ])
        .when(E::DataTransferInterrupted { reason: "peer went away".into() })
        .then_state(State::ClientTransferRestart)
        .then_effects(&["restart-transfer"]);
    }

    #[test]
    fn rejects_a_deal_counter_signed_by_someone_else() {
        // Given a deal whose funds are reserved
        let signed = crate::domain::storage::StorageDeal::sign(signed_proposal(), &stranger_key());
        given::<StorageClient>([initiated(), E::FundsReserved { amount: requirement() }])
            // When the answer carries our proposal, counter-signed by another key
            .when(E::DealAccepted { deal: Box::new(signed) })
            // Then it is refused for its provider signature
            .then_rejects(|r| {
                matches!(
                    r,
                    Rejection::Proposal(
                        crate::domain::storage::ProposalError::BadProviderSignature { .. }
                    )
                )
            });
    }

    #[test]
    fn confirming_the_publish_moves_funds_from_reservation_to_chain() {
        let then = given::<StorageClient>([
            initiated(),
            E::FundsReserved { amount: requirement() },
            E::DealAccepted { deal: Box::new(storage_deal()) },
            E::DataTransferStarted,
            E::DataTransferCompleted { bytes: 2048 },
            E::DealPublished { deal_id: DealId(42), message: message_cid(b"publish") },
        ])
        .when(E::PublishConfirmed)
        .then_state(State::AwaitingPreCommit)
        .then_effects(&["release-funds", "watch-pre-commit"]);
        assert_eq!(then.deal().data.funds_reserved, TokenAmount::ZERO);
    }
}
