//! The retrieval client's side of one retrieval deal: propose terms, set up and fund a payment
//! channel once accepted, pull the part, pay at each interval with a voucher, pay the last
//! time, and check that every byte arrived before telling the request.

use rust_fsm::{StateMachineImpl, state_machine};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::effects::{Effect, Notice, OutboundMessage, TransferDirection};
use super::failure::{AttemptFailed, Stalled};
use super::{
    Deal, DecideContext, FailureFact, Label, Machine, Producer, Rejection, check_bytes,
    inconsistent,
};
use crate::alphabet;
use crate::domain::TokenAmount;
use crate::domain::retrieval::{
    ChannelAddress, RetrievalDealProposal, RetrievalTermsError, SignedVoucher,
};
use crate::events::JournalEvent;

state_machine! {
    #[state_machine(
        state(crate::fsm::retrieval_client::State),
        input(crate::fsm::retrieval_client::Input),
        output(crate::fsm::retrieval_client::Output)
    )]
    pub machine(New)

    New(DealProposed) => WaitForAcceptance [SendProposal],
    WaitForAcceptance => {
        DealAccepted => Accepted [SetUpPaymentChannel],
        DealRejected => Rejected [NotifyFailed],
        DealNotFound => DealNotFound [NotifyFailed],
        DealCancelled => Cancelling [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    Accepted => {
        PaymentChannelCreateInitiated => PaymentChannelCreating [WaitForPaymentChannel],
        PaymentChannelAddFundsInitiated => PaymentChannelAddingFunds [WaitForPaymentChannel],
        PaymentChannelFailed => Failing [CleanUp],
        EffectRetrying => Accepted,
        EffectStalled => PaymentChannelPaused,
        DealCancelled => Cancelling [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    PaymentChannelCreating => {
        PaymentChannelReady => PaymentChannelAllocatingLane [AllocateLane],
        PaymentChannelFailed => Failing [CleanUp],
        EffectRetrying => PaymentChannelCreating,
        EffectStalled => PaymentChannelPaused,
        DealCancelled => Cancelling [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    PaymentChannelAddingFunds => {
        PaymentChannelReady => PaymentChannelAllocatingLane [AllocateLane],
        PaymentChannelFailed => Failing [CleanUp],
        EffectRetrying => PaymentChannelAddingFunds,
        EffectStalled => PaymentChannelPaused,
        DealCancelled => Cancelling [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    PaymentChannelAllocatingLane => {
        LaneAllocated => Ongoing [OpenTransfer],
        PaymentChannelFailed => Failing [CleanUp],
        EffectRetrying => PaymentChannelAllocatingLane,
        EffectStalled => PaymentChannelPaused,
        DealCancelled => Cancelling [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    Ongoing => {
        BlocksReceived => Ongoing,
        PaymentRequested => FundsNeeded [CheckFunds],
        LastPaymentRequested => FundsNeededLastPayment [CheckFunds],
        AllBlocksReceived => BlocksComplete,
        DataTransferFailed => Failing [CleanUp],
        DealCancelled => Cancelling [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
        EffectRetrying => Ongoing,
    },
    FundsNeeded => {
        FundsAvailable => SendFunds [SendPayment],
        FundsInsufficient => InsufficientFunds,
        DataTransferFailed => Failing [CleanUp],
        DealCancelled => Cancelling [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
        EffectRetrying => FundsNeeded,
    },
    FundsNeededLastPayment => {
        FundsAvailable => SendFundsLastPayment [SendPayment],
        FundsInsufficient => InsufficientFunds,
        DataTransferFailed => Failing [CleanUp],
        DealCancelled => Cancelling [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
        EffectRetrying => FundsNeededLastPayment,
    },
    InsufficientFunds => {
        FundsAdded => SendFunds [SendPayment],
        FundsAddedForLastPayment => SendFundsLastPayment [SendPayment],
        DealCancelled => Cancelling [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    SendFunds => {
        PaymentSent => Ongoing,
        PaymentFailed => Failing [CleanUp],
        DealCancelled => Cancelling [CancelDeal],
        FailedByOperator => Failing [CleanUp],
        EffectRetrying => SendFunds,
        DataTransferFailed => Failing [CleanUp],
        DealTimedOut => Failing [CleanUp],
    },
    SendFundsLastPayment => {
        PaymentSent => Finalizing,
        PaymentFailed => Failing [CleanUp],
        DealCancelled => Cancelling [CancelDeal],
        FailedByOperator => Failing [CleanUp],
        EffectRetrying => SendFundsLastPayment,
        DataTransferFailed => Failing [CleanUp],
        DealTimedOut => Failing [CleanUp],
    },
    BlocksComplete => {
        LastPaymentRequested => FundsNeededLastPayment [CheckFunds],
        ProviderCompleted => CheckComplete [VerifyData],
        DealCancelled => Cancelling [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
        EffectRetrying => BlocksComplete,
        DataTransferFailed => Failing [CleanUp],
    },
    Finalizing => {
        ProviderCompleted => CheckComplete [VerifyData],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
        EffectRetrying => Finalizing,
        DataTransferFailed => Failing [CleanUp],
    },
    CheckComplete => {
        CompletionVerified => Completed [NotifyCompleted],
        CompletionVerificationFailed => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
        EffectRetrying => CheckComplete,
        DataTransferFailed => Failing [CleanUp],
        DealTimedOut => Failing [CleanUp],
    },
    PaymentChannelPaused => {
        RetryRequested => Accepted [SetUpPaymentChannel],
        DealCancelled => Cancelling [CancelDeal],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    Cancelling(CleanupCompleted) => Cancelled [NotifyFailed],
    Failing(CleanupCompleted) => Errored [NotifyFailed],
}

alphabet! {
    /// Where a client's retrieval deal is. Codes are go-fil-markets' `DealStatus*` codes.
    pub enum State {
        /// Nothing proposed yet.
        New = 0,
        /// Terms sent; waiting for the provider's answer.
        WaitForAcceptance = 3,
        /// A payment channel to the provider is being created.
        PaymentChannelCreating = 4,
        /// Funds are being added to the existing payment channel.
        PaymentChannelAddingFunds = 5,
        /// The provider accepted; setting up payment.
        Accepted = 6,
        /// Something failed: the transfer is closed and channel funds released.
        Failing = 8,
        /// Final: the provider rejected the terms (nothing was reserved yet).
        Rejected = 9,
        /// The provider wants payment; checking the channel has the funds.
        FundsNeeded = 10,
        /// Sending a voucher.
        SendFunds = 11,
        /// Sending the last voucher.
        SendFundsLastPayment = 12,
        /// Receiving the part.
        Ongoing = 13,
        /// The provider wants the final payment; checking funds.
        FundsNeededLastPayment = 14,
        /// Final: every byte received, verified and paid.
        Completed = 15,
        /// Final: the provider does not have the piece (nothing was reserved yet).
        DealNotFound = 16,
        /// Final: the deal failed and was cleaned up.
        Errored = 17,
        /// Every byte of the part arrived.
        BlocksComplete = 18,
        /// Paid in full; waiting for the provider to complete.
        Finalizing = 19,
        /// Checking that every byte arrived intact.
        CheckComplete = 21,
        /// The channel is out of funds; waiting for more.
        InsufficientFunds = 23,
        /// A lane of the payment channel is being allocated to this deal.
        PaymentChannelAllocatingLane = 24,
        /// Cancelled: the transfer is being closed and funds released.
        Cancelling = 25,
        /// Final: the deal was cancelled and cleaned up.
        Cancelled = 26,
        /// Setting up the payment channel kept failing for a recoverable reason (wallet short,
        /// chain unreachable): waiting for an operator to retry, cancel or fail.
        PaymentChannelPaused = 40,
    }
}

alphabet! {
    /// The retrieval client machine's inputs, one per event kind.
    pub enum Input {
        DealProposed, DealAccepted, DealRejected, DealNotFound, PaymentChannelCreateInitiated,
        PaymentChannelAddFundsInitiated, PaymentChannelReady, LaneAllocated,
        PaymentChannelFailed, BlocksReceived, PaymentRequested, LastPaymentRequested,
        AllBlocksReceived, FundsAvailable, FundsInsufficient, FundsAdded,
        FundsAddedForLastPayment, PaymentSent, PaymentFailed, ProviderCompleted,
        CompletionVerified, CompletionVerificationFailed, DataTransferFailed, DealTimedOut,
        DealCancelled, CleanupCompleted,
        FailedByOperator, EffectRetrying, EffectStalled, RetryRequested,
    }
}

alphabet! {
    /// What the retrieval client must do on entering a state.
    pub enum Output {
        SendProposal, SetUpPaymentChannel, WaitForPaymentChannel, AllocateLane, OpenTransfer,
        CheckFunds, SendPayment, VerifyData, NotifyCompleted, NotifyFailed, CleanUp, CancelDeal,
    }
}

/// Which part of which request a deal fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestPart {
    /// The request's stream.
    pub request_id: Uuid,
    /// The part's index in the request.
    pub part_index: u32,
}

/// What happened to a client's retrieval deal. Journal payload: append variants only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetrievalClientEvent {
    /// Terms were sent to the provider (seed retrieval step 2a).
    DealProposed { proposal: Box<RetrievalDealProposal>, part_of: Option<RequestPart> },
    /// The provider accepted (2b-2c).
    DealAccepted,
    /// The provider rejected the terms.
    DealRejected { reason: String },
    /// The provider does not have the piece.
    DealNotFound,
    /// A payment channel creation message was sent.
    PaymentChannelCreateInitiated,
    /// A message adding funds to the existing channel was sent (2d).
    PaymentChannelAddFundsInitiated,
    /// The channel exists and holds the funds.
    PaymentChannelReady { channel: ChannelAddress },
    /// A lane was allocated to this deal.
    LaneAllocated { lane: u64 },
    /// The payment channel could not be set up.
    PaymentChannelFailed { reason: String },
    /// Bytes received so far (cumulative).
    BlocksReceived { bytes: u64 },
    /// The provider asks to be paid `owed` in total.
    PaymentRequested { owed: TokenAmount },
    /// The provider asks for the final payment.
    LastPaymentRequested { owed: TokenAmount },
    /// Every byte of the part arrived.
    AllBlocksReceived { bytes: u64 },
    /// The channel holds enough for the payment.
    FundsAvailable,
    /// The channel does not hold enough.
    FundsInsufficient { reason: String },
    /// Funds were added after a shortfall.
    FundsAdded,
    /// Funds were added after a shortfall on the last payment (derived from `FundsAdded`).
    FundsAddedForLastPayment,
    /// A voucher was sent.
    PaymentSent { voucher: Box<SignedVoucher> },
    /// The voucher could not be sent.
    PaymentFailed { reason: String },
    /// The provider says every byte was sent and paid (2j).
    ProviderCompleted,
    /// Every byte was checked.
    CompletionVerified,
    /// The data did not check out.
    CompletionVerificationFailed { reason: String },
    /// The transfer failed for good.
    DataTransferFailed { reason: String },
    /// A deadline passed.
    DealTimedOut { reason: String },
    /// The user, the request or an operator cancelled.
    DealCancelled { reason: String },
    /// The transfer is closed and funds released after a cancel or failure.
    CleanupCompleted,
    /// An operator failed the deal by hand: who and why.
    FailedByOperator { reason: String },
    /// An attempt of the state's effect (a channel step, the pull) failed recoverably; the
    /// runner tries again.
    EffectRetrying(AttemptFailed),
    /// Setting up the channel kept failing recoverably; the deal waits for an operator.
    EffectStalled(Stalled),
    /// An operator retried a paused deal: who and why.
    RetryRequested { reason: String },
}

impl RetrievalClientEvent {
    /// The machine input this event stands for.
    pub fn input(&self) -> Input {
        use RetrievalClientEvent as E;
        match self {
            E::DealProposed { .. } => Input::DealProposed,
            E::DealAccepted => Input::DealAccepted,
            E::DealRejected { .. } => Input::DealRejected,
            E::DealNotFound => Input::DealNotFound,
            E::PaymentChannelCreateInitiated => Input::PaymentChannelCreateInitiated,
            E::PaymentChannelAddFundsInitiated => Input::PaymentChannelAddFundsInitiated,
            E::PaymentChannelReady { .. } => Input::PaymentChannelReady,
            E::LaneAllocated { .. } => Input::LaneAllocated,
            E::PaymentChannelFailed { .. } => Input::PaymentChannelFailed,
            E::BlocksReceived { .. } => Input::BlocksReceived,
            E::PaymentRequested { .. } => Input::PaymentRequested,
            E::LastPaymentRequested { .. } => Input::LastPaymentRequested,
            E::AllBlocksReceived { .. } => Input::AllBlocksReceived,
            E::FundsAvailable => Input::FundsAvailable,
            E::FundsInsufficient { .. } => Input::FundsInsufficient,
            E::FundsAdded => Input::FundsAdded,
            E::FundsAddedForLastPayment => Input::FundsAddedForLastPayment,
            E::PaymentSent { .. } => Input::PaymentSent,
            E::PaymentFailed { .. } => Input::PaymentFailed,
            E::ProviderCompleted => Input::ProviderCompleted,
            E::CompletionVerified => Input::CompletionVerified,
            E::CompletionVerificationFailed { .. } => Input::CompletionVerificationFailed,
            E::DataTransferFailed { .. } => Input::DataTransferFailed,
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

impl JournalEvent for RetrievalClientEvent {
    const SCHEMA_VERSION: i16 = 1;

    fn event_type(&self) -> &'static str {
        super::label::kebab(self.input().name())
    }
}

/// What a client's retrieval events fold into.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ClientRetrieval {
    /// The terms.
    pub proposal: Option<RetrievalDealProposal>,
    /// The request and part this deal serves, if any.
    pub part_of: Option<RequestPart>,
    /// The payment channel.
    pub channel: Option<ChannelAddress>,
    /// The lane of the channel.
    pub lane: Option<u64>,
    /// Funds this deal holds in the channel beyond what it has paid, in attoFIL.
    pub funds_reserved: TokenAmount,
    /// Bytes received so far.
    pub bytes_received: u64,
    /// What the provider asked for in total at its last request, in attoFIL.
    pub owed: TokenAmount,
    /// Whether the pending request is the final one.
    pub last_payment: bool,
    /// Paid in total (the last voucher's amount), in attoFIL.
    pub paid: TokenAmount,
    /// Vouchers sent.
    pub payments: u32,
    /// The last voucher sent.
    pub last_voucher: Option<SignedVoucher>,
    /// Why the deal was rejected, cancelled or failed.
    pub message: Option<String>,
}

/// The retrieval client machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrievalClient;

impl Machine for RetrievalClient {
    const NAME: &'static str = "retrieval_client";
    type State = State;
    type Input = Input;
    type Output = Output;
    type Event = RetrievalClientEvent;
    type Data = ClientRetrieval;
    const INITIAL: State = State::New;
    const TERMINAL: &'static [State] =
        &[State::Rejected, State::DealNotFound, State::Completed, State::Cancelled, State::Errored];

    fn transition(state: State, input: Input) -> Option<State> {
        machine::Impl::transition(&state, &input)
    }

    fn output(state: State, input: Input) -> Option<Output> {
        machine::Impl::output(&state, &input)
    }

    fn input(event: &RetrievalClientEvent) -> Input {
        event.input()
    }

    fn fold(data: &mut ClientRetrieval, event: &RetrievalClientEvent) {
        use RetrievalClientEvent as E;
        match event {
            E::DealProposed { proposal, part_of } => {
                data.proposal = Some((**proposal).clone());
                data.part_of = *part_of;
            }
            E::PaymentChannelReady { channel } => {
                data.channel = Some(channel.clone());
                data.funds_reserved =
                    data.proposal.as_ref().and_then(|p| p.total_price()).unwrap_or_default();
            }
            E::LaneAllocated { lane } => data.lane = Some(*lane),
            E::BlocksReceived { bytes } | E::AllBlocksReceived { bytes } => {
                data.bytes_received = *bytes
            }
            E::PaymentRequested { owed } => {
                data.owed = *owed;
                data.last_payment = false;
            }
            E::LastPaymentRequested { owed } => {
                data.owed = *owed;
                data.last_payment = true;
            }
            E::PaymentSent { voucher } => {
                let previous = data.paid;
                data.paid = voucher.voucher.amount;
                data.payments += 1;
                data.funds_reserved =
                    data.funds_reserved.saturating_sub(data.paid.saturating_sub(previous));
                data.last_voucher = Some((**voucher).clone());
            }
            E::DealRejected { reason }
            | E::PaymentChannelFailed { reason }
            | E::FundsInsufficient { reason }
            | E::PaymentFailed { reason }
            | E::CompletionVerificationFailed { reason }
            | E::DataTransferFailed { reason }
            | E::DealTimedOut { reason }
            | E::DealCancelled { reason }
            | E::FailedByOperator { reason }
            | E::EffectRetrying(AttemptFailed { reason, .. })
            | E::EffectStalled(Stalled { reason, .. }) => data.message = Some(reason.clone()),
            E::RetryRequested { .. } => data.message = None,
            E::DealNotFound => data.message = Some("the provider does not have the piece".into()),
            // Invariant: a deal in a terminal state holds no reserved funds.
            E::CompletionVerified | E::CleanupCompleted => data.funds_reserved = TokenAmount::ZERO,
            E::DealAccepted
            | E::PaymentChannelCreateInitiated
            | E::PaymentChannelAddFundsInitiated
            | E::FundsAvailable
            | E::FundsAdded
            | E::FundsAddedForLastPayment
            | E::ProviderCompleted => {}
        }
    }

    fn decide(
        deal: &Deal<Self>,
        command: RetrievalClientEvent,
        _ctx: &DecideContext,
    ) -> Result<Vec<RetrievalClientEvent>, Rejection> {
        use RetrievalClientEvent as E;
        if let E::DealProposed { proposal, .. } = &command {
            deal.require_new()?;
            proposal.validate()?;
            return Ok(vec![command]);
        }
        deal.require_started()?;
        let terms =
            deal.data.proposal.as_ref().ok_or(Rejection::DealNotFound { stream_id: deal.id })?;
        match &command {
            E::FundsAddedForLastPayment => {
                return Err(Rejection::DerivedEvent { event: command.event_type() });
            }
            // After a shortfall, the funds go to whichever payment was pending.
            E::FundsAdded if deal.data.last_payment => {
                return Ok(vec![E::FundsAddedForLastPayment]);
            }
            E::BlocksReceived { bytes } => {
                check_bytes(*bytes, deal.data.bytes_received, terms.part.length)?
            }
            E::AllBlocksReceived { bytes } => {
                check_bytes(*bytes, deal.data.bytes_received, terms.part.length)?;
                if *bytes != terms.part.length {
                    return Err(inconsistent(format!(
                        "received {bytes} of {} bytes",
                        terms.part.length
                    )));
                }
            }
            E::PaymentRequested { owed } | E::LastPaymentRequested { owed } => {
                let fair = terms
                    .price_of(deal.data.bytes_received)
                    .ok_or(RetrievalTermsError::Overflow)?;
                if *owed > fair {
                    return Err(inconsistent(format!(
                        "the provider asks {owed} for {} bytes worth {fair}",
                        deal.data.bytes_received
                    )));
                }
            }
            E::PaymentSent { voucher } => {
                voucher.verify(&terms.client)?;
                let amount = voucher.voucher.amount;
                if amount <= deal.data.paid {
                    return Err(RetrievalTermsError::VoucherNotIncreasing {
                        amount,
                        previous: deal.data.paid,
                    }
                    .into());
                }
                if amount > deal.data.owed {
                    return Err(inconsistent(format!(
                        "voucher pays {amount}, more than the {} owed",
                        deal.data.owed
                    )));
                }
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
            Input::DealProposed => Runner("start-retrieval-deal of the request; or Deals::handle"),
            Input::DealAccepted => Network("the provider's answer to the terms"),
            Input::DealRejected => Network("the provider's answer to the terms"),
            Input::DealNotFound => Network("the provider's answer to the terms"),
            Input::PaymentChannelCreateInitiated => Chain("set-up-payment-channel"),
            Input::PaymentChannelAddFundsInitiated => Chain("set-up-payment-channel"),
            Input::PaymentChannelReady => Chain("wait-for-payment-channel"),
            Input::LaneAllocated => Chain("allocate-lane"),
            Input::PaymentChannelFailed => Chain("a channel effect past its attempts"),
            Input::BlocksReceived => Transfer("pull"),
            Input::PaymentRequested => Transfer("pull: the provider asks for payment"),
            Input::LastPaymentRequested => Transfer("pull: the provider asks for the last payment"),
            Input::AllBlocksReceived => Transfer("pull"),
            Input::FundsAvailable => Transfer("pull: within the funds limit"),
            Input::FundsInsufficient => Transfer("pull: over the funds limit"),
            Input::FundsAdded => NotYet("topping up a channel mid-deal"),
            Input::FundsAddedForLastPayment => Derived,
            Input::PaymentSent => Transfer("pull: voucher signed and sent"),
            Input::PaymentFailed => NotYet("a voucher the provider refuses"),
            Input::ProviderCompleted => Transfer("pull: the provider says complete"),
            Input::CompletionVerified => Transfer("pull: every byte arrived"),
            Input::CompletionVerificationFailed => Transfer("pull: bytes missing"),
            Input::DataTransferFailed => Runner("open-transfer past its attempts"),
            Input::DealTimedOut => Timer,
            Input::FailedByOperator => Command(
                "operator fail: Deals::fail, POST /v1/deals/{id}/fail, dealledger deal fail",
            ),
            Input::DealCancelled => Command(
                "operator cancel: Deals::cancel, POST /v1/deals/{id}/cancel, dealledger deal cancel",
            ),
            Input::CleanupCompleted => Runner("after release-funds and close-transfer"),
            Input::EffectRetrying => Runner(
                "set-up-payment-channel, wait-for-payment-channel, allocate-lane, open-transfer",
            ),
            Input::EffectStalled => Runner("the channel effects, past the runner's attempts"),
            Input::RetryRequested => Command(
                "operator retry: Deals::retry, POST /v1/deals/{id}/retry, dealledger deal retry",
            ),
        }
    }

    fn failure(event: &RetrievalClientEvent) -> FailureFact<'_> {
        use RetrievalClientEvent as E;
        match event {
            E::EffectRetrying(attempt) => FailureFact::Retrying(attempt),
            E::EffectStalled(stalled) => FailureFact::Stalled(stalled),
            E::DealRejected { .. }
            | E::PaymentChannelFailed { .. }
            | E::PaymentFailed { .. }
            | E::CompletionVerificationFailed { .. }
            | E::DataTransferFailed { .. }
            | E::DealTimedOut { .. }
            | E::FailedByOperator { .. } => FailureFact::Fatal,
            // Out of funds stops the deal where it is until funds are added: not a failure.
            E::DealProposed { .. }
            | E::DealAccepted
            | E::DealNotFound
            | E::PaymentChannelCreateInitiated
            | E::PaymentChannelAddFundsInitiated
            | E::PaymentChannelReady { .. }
            | E::LaneAllocated { .. }
            | E::BlocksReceived { .. }
            | E::PaymentRequested { .. }
            | E::LastPaymentRequested { .. }
            | E::AllBlocksReceived { .. }
            | E::FundsAvailable
            | E::FundsInsufficient { .. }
            | E::FundsAdded
            | E::FundsAddedForLastPayment
            | E::PaymentSent { .. }
            | E::ProviderCompleted
            | E::CompletionVerified
            | E::DealCancelled { .. }
            | E::CleanupCompleted
            | E::RetryRequested { .. } => FailureFact::None,
        }
    }

    fn effects(output: Output, deal: &Deal<Self>) -> Vec<Effect> {
        let data = &deal.data;
        let Some(terms) = data.proposal.as_ref() else { return Vec::new() };
        let provider = terms.provider;
        let notify = |notice| {
            data.part_of.map(|part| Effect::Notify {
                stream_id: part.request_id,
                stream_type: super::retrieval_request::RetrievalRequestMachine::NAME.to_owned(),
                notice,
            })
        };
        match output {
            Output::SendProposal => vec![Effect::Send {
                to: provider,
                message: OutboundMessage::RetrievalProposal(Box::new(terms.clone())),
            }],
            Output::SetUpPaymentChannel => vec![Effect::SetUpPaymentChannel {
                provider,
                amount: terms.total_price().unwrap_or_default(),
            }],
            Output::WaitForPaymentChannel => vec![Effect::WaitForPaymentChannel { provider }],
            Output::AllocateLane => data
                .channel
                .iter()
                .map(|channel| Effect::AllocateLane { channel: channel.clone() })
                .collect(),
            Output::OpenTransfer => vec![Effect::OpenTransfer {
                counterparty: provider,
                direction: TransferDirection::Pull,
                range: Some(terms.part),
            }],
            Output::CheckFunds => data
                .channel
                .iter()
                .map(|channel| Effect::CheckFunds {
                    channel: channel.clone(),
                    amount: data.owed.saturating_sub(data.paid),
                })
                .collect(),
            Output::SendPayment => match (&data.channel, data.lane) {
                (Some(channel), Some(lane)) => vec![Effect::SendPayment {
                    to: provider,
                    channel: channel.clone(),
                    lane,
                    amount: data.owed,
                }],
                _ => Vec::new(),
            },
            Output::VerifyData => vec![Effect::VerifyReceivedData { range: terms.part }],
            Output::NotifyCompleted => data
                .part_of
                .and_then(|part| {
                    notify(Notice::PartCompleted {
                        part_index: part.part_index,
                        deal_stream: deal.id,
                        bytes: data.bytes_received,
                        paid: data.paid,
                    })
                })
                .into_iter()
                .collect(),
            Output::NotifyFailed => data
                .part_of
                .and_then(|part| {
                    notify(Notice::PartFailed {
                        part_index: part.part_index,
                        deal_stream: deal.id,
                        reason: data.message.clone().unwrap_or_default(),
                    })
                })
                .into_iter()
                .collect(),
            Output::CleanUp => {
                let mut effects = vec![Effect::CloseTransfer { counterparty: provider }];
                if data.channel.is_some() {
                    effects.push(Effect::ReleaseFunds {
                        wallet: terms.client,
                        amount: data.funds_reserved,
                    });
                }
                effects
            }
            // Cancelled: clean up, and tell the provider, so its side stops waiting for pulls
            // and payments that will not come.
            Output::CancelDeal => {
                let mut effects = Self::effects(Output::CleanUp, deal);
                effects.push(Effect::Send {
                    to: provider,
                    message: OutboundMessage::Cancelled {
                        reason: data.message.clone().unwrap_or_default(),
                    },
                });
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
    use RetrievalClientEvent as E;

    fn price(bytes: u64) -> TokenAmount {
        retrieval_terms().price_of(bytes).expect("fixture prices do not overflow")
    }

    fn proposed(part_of: Option<RequestPart>) -> E {
        E::DealProposed { proposal: Box::new(retrieval_terms()), part_of }
    }

    impl Sample for RetrievalClient {
        fn sample(input: Input, deal: &Deal<Self>) -> E {
            let data = &deal.data;
            let reason = || "test reason".to_string();
            match input {
                Input::DealProposed => proposed(None),
                Input::DealAccepted => E::DealAccepted,
                Input::DealRejected => E::DealRejected { reason: reason() },
                Input::DealNotFound => E::DealNotFound,
                Input::PaymentChannelCreateInitiated => E::PaymentChannelCreateInitiated,
                Input::PaymentChannelAddFundsInitiated => E::PaymentChannelAddFundsInitiated,
                Input::PaymentChannelReady => E::PaymentChannelReady { channel: channel() },
                Input::LaneAllocated => E::LaneAllocated { lane: 0 },
                Input::PaymentChannelFailed => E::PaymentChannelFailed { reason: reason() },
                Input::BlocksReceived => {
                    E::BlocksReceived { bytes: (data.bytes_received + 100).min(1_000) }
                }
                Input::PaymentRequested => E::PaymentRequested { owed: price(data.bytes_received) },
                Input::LastPaymentRequested => {
                    E::LastPaymentRequested { owed: price(data.bytes_received) }
                }
                Input::AllBlocksReceived => E::AllBlocksReceived { bytes: 1_000 },
                Input::FundsAvailable => E::FundsAvailable,
                Input::FundsInsufficient => E::FundsInsufficient { reason: reason() },
                Input::FundsAdded => E::FundsAdded,
                Input::FundsAddedForLastPayment => E::FundsAddedForLastPayment,
                Input::PaymentSent => {
                    let amount = data.owed.max(TokenAmount(data.paid.0 + 1));
                    E::PaymentSent { voucher: Box::new(voucher(amount.0, data.payments.into())) }
                }
                Input::PaymentFailed => E::PaymentFailed { reason: reason() },
                Input::ProviderCompleted => E::ProviderCompleted,
                Input::CompletionVerified => E::CompletionVerified,
                Input::CompletionVerificationFailed => {
                    E::CompletionVerificationFailed { reason: reason() }
                }
                Input::DataTransferFailed => E::DataTransferFailed { reason: reason() },
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
            input == Input::FundsAddedForLastPayment
        }
    }

    crate::conformance_tests!(RetrievalClient);

    /// Who sends each input; the ones nothing sends yet, named (issue 9 wires them).
    #[test]
    fn every_input_has_its_producer() {
        crate::fsm::conformance::every_input_has_its_producer::<RetrievalClient>(&[
            "FundsAdded",
            "PaymentFailed",
        ]);
    }

    fn ongoing(part_of: Option<RequestPart>) -> Vec<E> {
        vec![
            proposed(part_of),
            E::DealAccepted,
            E::PaymentChannelCreateInitiated,
            E::PaymentChannelReady { channel: channel() },
            E::LaneAllocated { lane: 0 },
        ]
    }

    #[test]
    fn acceptance_sets_up_a_payment_channel_for_the_whole_part() {
        let then = given::<RetrievalClient>([proposed(None)])
            .when(E::DealAccepted)
            .then_state(State::Accepted)
            .then_effects(&["set-up-payment-channel"]);
        assert!(matches!(
            &then.decision_effects()[0],
            Effect::SetUpPaymentChannel { amount, .. } if *amount == price(1_000)
        ));
    }

    #[test]
    fn a_lane_opens_the_pull_transfer() {
        given::<RetrievalClient>(ongoing(None)[..4].to_vec())
            .when(E::LaneAllocated { lane: 0 })
            .then_state(State::Ongoing)
            .then_effects(&["open-transfer"]);
    }

    #[test]
    fn refuses_to_pay_more_than_the_bytes_received_are_worth() {
        let mut history = ongoing(None);
        history.push(E::BlocksReceived { bytes: 300 });
        given::<RetrievalClient>(history)
            .when(E::PaymentRequested { owed: price(900) })
            .then_rejects(|r| matches!(r, Rejection::Inconsistent { .. }));
    }

    #[test]
    fn funds_added_after_a_shortfall_on_the_last_payment_pay_the_last_payment() {
        let mut history = ongoing(None);
        history.extend([
            E::AllBlocksReceived { bytes: 1_000 },
            E::LastPaymentRequested { owed: price(1_000) },
            E::FundsInsufficient { reason: "channel empty".into() },
        ]);
        given::<RetrievalClient>(history)
            .when(E::FundsAdded)
            .then([E::FundsAddedForLastPayment])
            .then_state(State::SendFundsLastPayment)
            .then_effects(&["send-payment"]);
    }

    #[test]
    fn a_completed_part_tells_its_request() {
        let part = RequestPart { request_id: Uuid::from_u128(7), part_index: 1 };
        let mut history = ongoing(Some(part));
        history.extend([
            E::AllBlocksReceived { bytes: 1_000 },
            E::LastPaymentRequested { owed: price(1_000) },
            E::FundsAvailable,
            E::PaymentSent { voucher: Box::new(voucher(price(1_000).0, 0)) },
            E::ProviderCompleted,
        ]);
        let then = given::<RetrievalClient>(history)
            .when(E::CompletionVerified)
            .then_state(State::Completed)
            .then_effects(&["notify"]);
        assert!(matches!(
            &then.decision_effects()[0],
            Effect::Notify { stream_id, notice: Notice::PartCompleted { part_index: 1, paid, .. }, .. }
                if *stream_id == part.request_id && *paid == price(1_000)
        ));
        assert_eq!(then.deal().data.funds_reserved, TokenAmount::ZERO);
    }

    #[test]
    fn a_cancelled_deal_releases_channel_funds_tells_the_provider_and_its_request() {
        let part = RequestPart { request_id: Uuid::from_u128(7), part_index: 0 };
        given::<RetrievalClient>(ongoing(Some(part)))
            .when(E::DealCancelled { reason: "user".into() })
            .then_state(State::Cancelling)
            .then_effects(&["close-transfer", "release-funds", "send"]);
        let mut history = ongoing(Some(part));
        history.push(E::DealCancelled { reason: "user".into() });
        given::<RetrievalClient>(history)
            .when(E::CleanupCompleted)
            .then_state(State::Cancelled)
            .then_effects(&["notify"]);
    }
}
