//! The retrieval provider's side of one retrieval deal: accept terms, unseal, send the part in
//! chunks, stop for a payment at each interval (seed goal 2: trust grows as data flows), take
//! the last payment, complete, and redeem the vouchers.

use rust_fsm::{StateMachineImpl, state_machine};
use serde::{Deserialize, Serialize};

use super::effects::{Effect, OutboundMessage};
use super::{
    Deal, DecideContext, FailureFact, Label, Machine, Producer, Rejection, check_bytes,
    inconsistent,
};
use crate::alphabet;
use crate::domain::TokenAmount;
use crate::domain::retrieval::{RetrievalDealProposal, RetrievalTermsError, SignedVoucher};
use crate::events::JournalEvent;

state_machine! {
    #[state_machine(
        state(crate::fsm::retrieval_provider::State),
        input(crate::fsm::retrieval_provider::Input),
        output(crate::fsm::retrieval_provider::Output)
    )]
    pub machine(New)

    New => {
        DealAccepted => Unsealing [AcceptAndUnseal],
        DealRejected => Rejected [SendRejection],
        PieceNotFound => DealNotFound [SendNotFound],
    },
    Unsealing => {
        PieceUnsealed => Unsealed,
        UnsealFailed => Failing [CleanUp],
        DealCancelled => Cancelling [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    Unsealed => {
        DataTransferStarted => Ongoing,
        DealCancelled => Cancelling [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    Ongoing => {
        BlocksSent => Ongoing,
        PaymentDue => FundsNeeded [RequestPayment],
        AllBlocksSent => BlocksComplete,
        DataTransferFailed => Failing [CleanUp],
        DealCancelled => Cancelling [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    FundsNeeded => {
        PaymentReceived => Ongoing,
        DataTransferFailed => Failing [CleanUp],
        DealCancelled => Cancelling [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    BlocksComplete => {
        LastPaymentDue => FundsNeededLastPayment [RequestLastPayment],
        NoPaymentDue => Finalizing [SendCompletion],
        DealCancelled => Cancelling [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    FundsNeededLastPayment => {
        PaymentReceived => Finalizing [SendCompletion],
        DealCancelled => Cancelling [CleanUp],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    Finalizing => {
        CompletionSent => Completed [RedeemPayment],
        DealTimedOut => Failing [CleanUp],
        FailedByOperator => Failing [CleanUp],
    },
    Cancelling(CleanupCompleted) => Cancelled,
    Failing(CleanupCompleted) => Errored,
}

alphabet! {
    /// Where a provider's retrieval deal is. Codes are go-fil-markets' `DealStatus*` codes.
    pub enum State {
        /// Terms received, nothing decided yet.
        New = 0,
        /// Accepted; the sector holding the piece is being unsealed.
        Unsealing = 1,
        /// Unsealed; waiting for the client's pull transfer.
        Unsealed = 2,
        /// Something failed: the transfer is closed and vouchers received are kept.
        Failing = 8,
        /// Final: the terms were rejected.
        Rejected = 9,
        /// Sending paused until the client pays for what it has received.
        FundsNeeded = 10,
        /// Sending the part.
        Ongoing = 13,
        /// Everything sent; waiting for the final payment.
        FundsNeededLastPayment = 14,
        /// Final: every byte sent and paid; vouchers are redeemed.
        Completed = 15,
        /// Final: the piece is not stored here.
        DealNotFound = 16,
        /// Final: the deal failed and was cleaned up.
        Errored = 17,
        /// Every byte of the part was sent.
        BlocksComplete = 18,
        /// Paid in full; telling the client the deal is complete.
        Finalizing = 19,
        /// Cancelled: the transfer is being closed.
        Cancelling = 25,
        /// Final: the deal was cancelled and cleaned up.
        Cancelled = 26,
    }
}

alphabet! {
    /// The retrieval provider machine's inputs, one per event kind.
    pub enum Input {
        DealAccepted, DealRejected, PieceNotFound, PieceUnsealed, UnsealFailed,
        DataTransferStarted, BlocksSent, PaymentDue, PaymentReceived, AllBlocksSent,
        LastPaymentDue, NoPaymentDue, CompletionSent, DataTransferFailed, DealTimedOut,
        DealCancelled, CleanupCompleted,
        FailedByOperator,
    }
}

alphabet! {
    /// What the retrieval provider must do on entering a state.
    pub enum Output {
        AcceptAndUnseal, SendRejection, SendNotFound, RequestPayment, RequestLastPayment,
        SendCompletion, RedeemPayment, CleanUp,
    }
}

/// What happened to a provider's retrieval deal. Journal payload: append variants only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetrievalProviderEvent {
    /// The terms were accepted (seed retrieval step 2b).
    DealAccepted { proposal: Box<RetrievalDealProposal> },
    /// The terms were rejected.
    DealRejected { proposal: Box<RetrievalDealProposal>, reason: String },
    /// The piece is not stored here.
    PieceNotFound { proposal: Box<RetrievalDealProposal> },
    /// The sector was unsealed.
    PieceUnsealed,
    /// Unsealing failed.
    UnsealFailed { reason: String },
    /// The client's pull transfer was validated and started (steps 2f-2h).
    DataTransferStarted,
    /// Bytes sent so far (cumulative).
    BlocksSent { bytes: u64 },
    /// The payment interval is reached: the client owes `owed` in total (derived).
    PaymentDue { owed: TokenAmount },
    /// A valid voucher arrived.
    PaymentReceived { voucher: Box<SignedVoucher> },
    /// Every byte of the part was sent.
    AllBlocksSent { bytes: u64 },
    /// The final payment is due (derived).
    LastPaymentDue { owed: TokenAmount },
    /// Nothing more is owed (derived).
    NoPaymentDue,
    /// The client was told the deal is complete.
    CompletionSent,
    /// The transfer failed for good.
    DataTransferFailed { reason: String },
    /// A deadline passed (payment, transfer).
    DealTimedOut { reason: String },
    /// The client or an operator cancelled.
    DealCancelled { reason: String },
    /// The transfer is closed after a cancel or failure.
    CleanupCompleted,
    /// An operator failed the deal by hand: who and why.
    FailedByOperator { reason: String },
}

impl RetrievalProviderEvent {
    /// The machine input this event stands for.
    pub fn input(&self) -> Input {
        use RetrievalProviderEvent as E;
        match self {
            E::DealAccepted { .. } => Input::DealAccepted,
            E::DealRejected { .. } => Input::DealRejected,
            E::PieceNotFound { .. } => Input::PieceNotFound,
            E::PieceUnsealed => Input::PieceUnsealed,
            E::UnsealFailed { .. } => Input::UnsealFailed,
            E::DataTransferStarted => Input::DataTransferStarted,
            E::BlocksSent { .. } => Input::BlocksSent,
            E::PaymentDue { .. } => Input::PaymentDue,
            E::PaymentReceived { .. } => Input::PaymentReceived,
            E::AllBlocksSent { .. } => Input::AllBlocksSent,
            E::LastPaymentDue { .. } => Input::LastPaymentDue,
            E::NoPaymentDue => Input::NoPaymentDue,
            E::CompletionSent => Input::CompletionSent,
            E::DataTransferFailed { .. } => Input::DataTransferFailed,
            E::DealTimedOut { .. } => Input::DealTimedOut,
            E::DealCancelled { .. } => Input::DealCancelled,
            E::FailedByOperator { .. } => Input::FailedByOperator,
            E::CleanupCompleted => Input::CleanupCompleted,
        }
    }
}

impl JournalEvent for RetrievalProviderEvent {
    const SCHEMA_VERSION: i16 = 1;

    fn event_type(&self) -> &'static str {
        super::label::kebab(self.input().name())
    }
}

/// What a provider's retrieval events fold into.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProviderRetrieval {
    /// The terms.
    pub proposal: Option<RetrievalDealProposal>,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// What the client owes in total at the last request, in attoFIL.
    pub owed: TokenAmount,
    /// What the client has paid in total (the best voucher's amount), in attoFIL.
    pub paid: TokenAmount,
    /// Payments received.
    pub payments: u32,
    /// The best voucher received, to redeem.
    pub best_voucher: Option<SignedVoucher>,
    /// Why the deal was rejected, cancelled or failed.
    pub message: Option<String>,
}

/// The retrieval provider machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrievalProvider;

impl Machine for RetrievalProvider {
    const NAME: &'static str = "retrieval_provider";
    type State = State;
    type Input = Input;
    type Output = Output;
    type Event = RetrievalProviderEvent;
    type Data = ProviderRetrieval;
    const INITIAL: State = State::New;
    const TERMINAL: &'static [State] =
        &[State::Rejected, State::DealNotFound, State::Completed, State::Cancelled, State::Errored];

    fn transition(state: State, input: Input) -> Option<State> {
        machine::Impl::transition(&state, &input)
    }

    fn output(state: State, input: Input) -> Option<Output> {
        machine::Impl::output(&state, &input)
    }

    fn input(event: &RetrievalProviderEvent) -> Input {
        event.input()
    }

    fn fold(data: &mut ProviderRetrieval, event: &RetrievalProviderEvent) {
        use RetrievalProviderEvent as E;
        match event {
            E::DealAccepted { proposal } | E::PieceNotFound { proposal } => {
                data.proposal = Some((**proposal).clone())
            }
            E::DealRejected { proposal, reason } => {
                data.proposal = Some((**proposal).clone());
                data.message = Some(reason.clone());
            }
            E::BlocksSent { bytes } | E::AllBlocksSent { bytes } => data.bytes_sent = *bytes,
            E::PaymentDue { owed } | E::LastPaymentDue { owed } => data.owed = *owed,
            E::PaymentReceived { voucher } => {
                data.paid = voucher.voucher.amount;
                data.payments += 1;
                data.best_voucher = Some((**voucher).clone());
            }
            E::UnsealFailed { reason }
            | E::DataTransferFailed { reason }
            | E::DealTimedOut { reason }
            | E::DealCancelled { reason }
            | E::FailedByOperator { reason } => data.message = Some(reason.clone()),
            E::PieceUnsealed
            | E::DataTransferStarted
            | E::NoPaymentDue
            | E::CompletionSent
            | E::CleanupCompleted => {}
        }
    }

    fn decide(
        deal: &Deal<Self>,
        command: RetrievalProviderEvent,
        _ctx: &DecideContext,
    ) -> Result<Vec<RetrievalProviderEvent>, Rejection> {
        use RetrievalProviderEvent as E;
        match &command {
            E::DealAccepted { proposal }
            | E::DealRejected { proposal, .. }
            | E::PieceNotFound { proposal } => {
                deal.require_new()?;
                proposal.validate()?;
                return Ok(vec![command]);
            }
            E::PaymentDue { .. } | E::LastPaymentDue { .. } | E::NoPaymentDue => {
                return Err(Rejection::DerivedEvent { event: command.event_type() });
            }
            _ => {}
        }
        deal.require_started()?;
        let terms =
            deal.data.proposal.as_ref().ok_or(Rejection::DealNotFound { stream_id: deal.id })?;
        let price_of = |bytes| terms.price_of(bytes).ok_or(RetrievalTermsError::Overflow);
        match &command {
            E::BlocksSent { bytes } => {
                check_bytes(*bytes, deal.data.bytes_sent, terms.part.length)?;
                // The transfer pauses at each interval: ask for what the bytes so far cost.
                let unlocked = terms.bytes_unlocked_after(deal.data.payments);
                if *bytes >= unlocked && *bytes < terms.part.length {
                    let owed = price_of(*bytes)?;
                    return Ok(vec![command, E::PaymentDue { owed }]);
                }
            }
            E::AllBlocksSent { bytes } => {
                check_bytes(*bytes, deal.data.bytes_sent, terms.part.length)?;
                if *bytes != terms.part.length {
                    return Err(inconsistent(format!(
                        "sent {bytes} of {} bytes, not all",
                        terms.part.length
                    )));
                }
                let owed = price_of(*bytes)?;
                let next = if owed > deal.data.paid {
                    E::LastPaymentDue { owed }
                } else {
                    E::NoPaymentDue
                };
                return Ok(vec![command, next]);
            }
            E::PaymentReceived { voucher } => {
                voucher.verify(&terms.client)?;
                let amount = voucher.voucher.amount;
                if amount <= deal.data.paid {
                    return Err(RetrievalTermsError::VoucherNotIncreasing {
                        amount,
                        previous: deal.data.paid,
                    }
                    .into());
                }
                if amount < deal.data.owed {
                    return Err(inconsistent(format!(
                        "voucher pays {amount}, but {} is owed",
                        deal.data.owed
                    )));
                }
            }
            _ => {}
        }
        Ok(vec![command])
    }

    fn failure(event: &RetrievalProviderEvent) -> FailureFact<'_> {
        use RetrievalProviderEvent as E;
        match event {
            E::DealRejected { .. }
            | E::UnsealFailed { .. }
            | E::DataTransferFailed { .. }
            | E::DealTimedOut { .. }
            | E::FailedByOperator { .. } => FailureFact::Fatal,
            E::DealAccepted { .. }
            | E::PieceNotFound { .. }
            | E::PieceUnsealed
            | E::DataTransferStarted
            | E::BlocksSent { .. }
            | E::PaymentDue { .. }
            | E::PaymentReceived { .. }
            | E::AllBlocksSent { .. }
            | E::LastPaymentDue { .. }
            | E::NoPaymentDue
            | E::CompletionSent
            | E::DealCancelled { .. }
            | E::CleanupCompleted => FailureFact::None,
        }
    }

    fn producer(input: Input) -> Producer {
        use Producer::*;
        match input {
            Input::DealAccepted => Network("a client's terms, accepted"),
            Input::DealRejected => Network("a client's terms, refused"),
            Input::PieceNotFound => Network("a client's terms for a piece not here"),
            Input::PieceUnsealed => Network("the piece store keeps unsealed copies"),
            Input::UnsealFailed => NotYet("sealed-only pieces"),
            Input::DataTransferStarted => Transfer("the client's first pull"),
            Input::BlocksSent => Transfer("a pull answered"),
            Input::PaymentDue => Derived,
            Input::PaymentReceived => Transfer("a voucher the channel would honour"),
            Input::AllBlocksSent => Transfer("the last pull answered"),
            Input::LastPaymentDue => Derived,
            Input::NoPaymentDue => Derived,
            Input::CompletionSent => Transfer("completion answered"),
            Input::DataTransferFailed => NotYet("the provider never gives up a pull by itself"),
            Input::DealTimedOut => Timer,
            Input::FailedByOperator => Command(
                "operator fail: Deals::fail, POST /v1/deals/{id}/fail, dealledger deal fail",
            ),
            Input::DealCancelled => Command(
                "operator cancel: Deals::cancel, POST /v1/deals/{id}/cancel, dealledger deal cancel",
            ),
            Input::CleanupCompleted => Runner("after close-transfer and redeem-voucher"),
        }
    }

    fn effects(output: Output, deal: &Deal<Self>) -> Vec<Effect> {
        let data = &deal.data;
        let Some(terms) = data.proposal.as_ref() else { return Vec::new() };
        let client = terms.client;
        let send = |message| Effect::Send { to: client, message };
        match output {
            Output::AcceptAndUnseal => vec![
                send(OutboundMessage::RetrievalAccepted { deal_stream: deal.id }),
                Effect::UnsealPiece { piece_cid: terms.piece_cid, payload_cid: terms.payload_cid },
            ],
            Output::SendRejection => vec![send(OutboundMessage::RetrievalRejected {
                reason: data.message.clone().unwrap_or_default(),
            })],
            Output::SendNotFound => vec![send(OutboundMessage::RetrievalDealNotFound)],
            Output::RequestPayment => {
                vec![send(OutboundMessage::PaymentRequested { owed: data.owed, last: false })]
            }
            Output::RequestLastPayment => {
                vec![send(OutboundMessage::PaymentRequested { owed: data.owed, last: true })]
            }
            Output::SendCompletion => vec![send(OutboundMessage::RetrievalCompleted)],
            Output::RedeemPayment => redeem(data),
            Output::CleanUp => {
                let mut effects = vec![Effect::CloseTransfer { counterparty: client }];
                effects.extend(redeem(data));
                effects
            }
        }
    }
}

/// Redeem whatever was paid: vouchers received stay the provider's, even on a failed deal.
fn redeem(data: &ProviderRetrieval) -> Vec<Effect> {
    data.best_voucher
        .iter()
        .map(|v| Effect::RedeemVoucher { voucher: Box::new(v.clone()) })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::conformance::Sample;
    use crate::fsm::fixtures::*;
    use crate::fsm::testing::given;
    use RetrievalProviderEvent as E;

    fn terms() -> Box<RetrievalDealProposal> {
        Box::new(retrieval_terms())
    }

    fn price(bytes: u64) -> TokenAmount {
        retrieval_terms().price_of(bytes).expect("fixture prices do not overflow")
    }

    impl Sample for RetrievalProvider {
        fn sample(input: Input, deal: &Deal<Self>) -> E {
            let data = &deal.data;
            let reason = || "test reason".to_string();
            match input {
                Input::DealAccepted => E::DealAccepted { proposal: terms() },
                Input::DealRejected => E::DealRejected { proposal: terms(), reason: reason() },
                Input::PieceNotFound => E::PieceNotFound { proposal: terms() },
                Input::PieceUnsealed => E::PieceUnsealed,
                Input::UnsealFailed => E::UnsealFailed { reason: reason() },
                Input::DataTransferStarted => E::DataTransferStarted,
                Input::BlocksSent => E::BlocksSent { bytes: (data.bytes_sent + 100).min(999) },
                Input::PaymentDue => E::PaymentDue { owed: price(data.bytes_sent) },
                Input::PaymentReceived => {
                    let amount = data.owed.max(TokenAmount(data.paid.0 + 1));
                    E::PaymentReceived {
                        voucher: Box::new(voucher(amount.0, data.payments.into())),
                    }
                }
                Input::AllBlocksSent => E::AllBlocksSent { bytes: 1_000 },
                Input::LastPaymentDue => E::LastPaymentDue { owed: price(1_000) },
                Input::NoPaymentDue => E::NoPaymentDue,
                Input::CompletionSent => E::CompletionSent,
                Input::DataTransferFailed => E::DataTransferFailed { reason: reason() },
                Input::DealTimedOut => E::DealTimedOut { reason: reason() },
                Input::DealCancelled => E::DealCancelled { reason: reason() },
                Input::FailedByOperator => E::FailedByOperator { reason: reason() },
                Input::CleanupCompleted => E::CleanupCompleted,
            }
        }

        fn derived(input: Input) -> bool {
            matches!(input, Input::PaymentDue | Input::LastPaymentDue | Input::NoPaymentDue)
        }
    }

    crate::conformance_tests!(RetrievalProvider);

    /// Who sends each input; the ones nothing sends yet, named (issue 9 wires them).
    #[test]
    fn every_input_has_its_producer() {
        crate::fsm::conformance::every_input_has_its_producer::<RetrievalProvider>(&[
            "UnsealFailed",
            "DataTransferFailed",
        ]);
    }

    fn sending() -> Vec<E> {
        vec![E::DealAccepted { proposal: terms() }, E::PieceUnsealed, E::DataTransferStarted]
    }

    #[test]
    fn accepting_terms_answers_the_client_and_unseals() {
        given::<RetrievalProvider>([])
            .when(E::DealAccepted { proposal: terms() })
            .then_state(State::Unsealing)
            .then_effects(&["send", "unseal-piece"]);
    }

    #[test]
    fn rejects_terms_without_a_payment_interval() {
        let mut bad = retrieval_terms();
        bad.payment_interval = 0;
        given::<RetrievalProvider>([])
            .when(E::DealAccepted { proposal: Box::new(bad) })
            .then_rejects(|r| {
                r == &Rejection::RetrievalTerms(RetrievalTermsError::ZeroPaymentInterval)
            });
    }

    #[test]
    fn reaching_the_payment_interval_asks_for_payment() {
        given::<RetrievalProvider>(sending())
            .when(E::BlocksSent { bytes: 300 })
            .then([E::BlocksSent { bytes: 300 }, E::PaymentDue { owed: price(300) }])
            .then_state(State::FundsNeeded)
            .then_effects(&["send"]);
    }

    #[test]
    fn the_interval_grows_after_each_payment() {
        let mut history = sending();
        history.extend([
            E::BlocksSent { bytes: 300 },
            E::PaymentDue { owed: price(300) },
            E::PaymentReceived { voucher: Box::new(voucher(price(300).0, 0)) },
        ]);
        // After one payment the next stop is at 300 + 400 = 700 bytes, not 600.
        given::<RetrievalProvider>(history.clone())
            .when(E::BlocksSent { bytes: 600 })
            .then([E::BlocksSent { bytes: 600 }])
            .then_state(State::Ongoing);
        given::<RetrievalProvider>(history)
            .when(E::BlocksSent { bytes: 700 })
            .then_state(State::FundsNeeded);
    }

    #[test]
    fn rejects_a_voucher_signed_by_someone_else() {
        let mut history = sending();
        history.extend([E::BlocksSent { bytes: 300 }, E::PaymentDue { owed: price(300) }]);
        let forged = SignedVoucher::sign(voucher(price(300).0, 0).voucher, &stranger_key());
        given::<RetrievalProvider>(history)
            .when(E::PaymentReceived { voucher: Box::new(forged) })
            .then_rejects(|r| {
                matches!(
                    r,
                    Rejection::RetrievalTerms(RetrievalTermsError::BadVoucherSignature { .. })
                )
            });
    }

    #[test]
    fn rejects_a_voucher_that_pays_less_than_owed() {
        let mut history = sending();
        history.extend([E::BlocksSent { bytes: 300 }, E::PaymentDue { owed: price(300) }]);
        given::<RetrievalProvider>(history)
            .when(E::PaymentReceived { voucher: Box::new(voucher(5, 0)) })
            .then_rejects(|r| matches!(r, Rejection::Inconsistent { .. }));
    }

    #[test]
    fn all_blocks_sent_asks_for_the_last_payment_then_completes_and_redeems() {
        let mut history = sending();
        history.push(E::AllBlocksSent { bytes: 1_000 });
        history.push(E::LastPaymentDue { owed: price(1_000) });
        let last = voucher(price(1_000).0, 0);
        given::<RetrievalProvider>(history.clone())
            .when(E::PaymentReceived { voucher: Box::new(last.clone()) })
            .then_state(State::Finalizing)
            .then_effects(&["send"]);
        history.push(E::PaymentReceived { voucher: Box::new(last) });
        given::<RetrievalProvider>(history)
            .when(E::CompletionSent)
            .then_state(State::Completed)
            .then_effects(&["redeem-voucher"]);
    }

    #[test]
    fn a_cancelled_deal_closes_the_transfer_and_keeps_what_was_paid() {
        let mut history = sending();
        history.extend([
            E::BlocksSent { bytes: 300 },
            E::PaymentDue { owed: price(300) },
            E::PaymentReceived { voucher: Box::new(voucher(price(300).0, 0)) },
        ]);
        given::<RetrievalProvider>(history)
            .when(E::DealCancelled { reason: "client went away".into() })
            .then_state(State::Cancelling)
            .then_effects(&["close-transfer", "redeem-voucher"]);
    }
}
