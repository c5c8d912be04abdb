//! The client's retrieval request: one piece, fetched part by part through retrieval deals and
//! tracked as a whole (seed goal 2). Parts are fetched one after another, so trust in the
//! provider grows before more is at stake; a failed part is retried up to a limit.

use rust_fsm::{StateMachineImpl, state_machine};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::effects::Effect;
use super::{Deal, DecideContext, FailureFact, Label, Machine, Producer, Rejection, inconsistent};
use crate::alphabet;
use crate::domain::TokenAmount;
use crate::domain::retrieval::RetrievalRequest;
use crate::events::JournalEvent;

state_machine! {
    #[state_machine(
        state(crate::fsm::retrieval_request::State),
        input(crate::fsm::retrieval_request::Input),
        output(crate::fsm::retrieval_request::Output)
    )]
    pub machine(New)

    New(RequestCreated) => Retrieving [StartNextPart],
    Retrieving => {
        PartStarted => Retrieving,
        PartCompleted => Retrieving [StartNextPart],
        PartFailed => Retrieving [RetryPart],
        AllPartsCompleted => Completed,
        RetriesExhausted => Failing [CancelDeals],
        RequestCancelled => Cancelling [CancelDeals],
    },
    Failing => {
        PartCompleted => Failing,
        PartFailed => Failing,
        CleanupCompleted => Errored,
    },
    Cancelling => {
        PartCompleted => Cancelling,
        PartFailed => Cancelling,
        CleanupCompleted => Cancelled,
    },
}

alphabet! {
    /// Where a retrieval request is. dealledger's own codes (go-fil-markets has no request).
    pub enum State {
        /// Nothing requested yet.
        New = 0,
        /// Parts are being fetched.
        Retrieving = 1,
        /// Final: every part arrived and was paid.
        Completed = 2,
        /// A part failed too often: open deals are being cancelled.
        Failing = 3,
        /// Final: the request failed.
        Errored = 4,
        /// Cancelled: open deals are being cancelled.
        Cancelling = 5,
        /// Final: the request was cancelled.
        Cancelled = 6,
    }
}

alphabet! {
    /// The request machine's inputs, one per event kind.
    pub enum Input {
        RequestCreated, PartStarted, PartCompleted, PartFailed, AllPartsCompleted,
        RetriesExhausted, RequestCancelled, CleanupCompleted,
    }
}

alphabet! {
    /// What the request must do on entering a state.
    pub enum Output {
        StartNextPart, RetryPart, CancelDeals,
    }
}

/// What happened to a retrieval request. Journal payload: append variants only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RetrievalRequestEvent {
    /// The user asked for a piece (seed retrieval step 1).
    RequestCreated { request: Box<RetrievalRequest>, max_attempts: u32 },
    /// A retrieval deal was started for a part.
    PartStarted { part_index: u32, deal_stream: Uuid },
    /// A part's deal completed.
    PartCompleted { part_index: u32, deal_stream: Uuid, bytes: u64, paid: TokenAmount },
    /// A part's deal failed.
    PartFailed { part_index: u32, deal_stream: Uuid, reason: String },
    /// Every part is in (derived; seed step 3: the user is told).
    AllPartsCompleted,
    /// A part failed `max_attempts` times (derived).
    RetriesExhausted { part_index: u32 },
    /// The user or an operator cancelled the request.
    RequestCancelled { reason: String },
    /// The open deals were cancelled.
    CleanupCompleted,
}

impl RetrievalRequestEvent {
    /// The machine input this event stands for.
    pub fn input(&self) -> Input {
        use RetrievalRequestEvent as E;
        match self {
            E::RequestCreated { .. } => Input::RequestCreated,
            E::PartStarted { .. } => Input::PartStarted,
            E::PartCompleted { .. } => Input::PartCompleted,
            E::PartFailed { .. } => Input::PartFailed,
            E::AllPartsCompleted => Input::AllPartsCompleted,
            E::RetriesExhausted { .. } => Input::RetriesExhausted,
            E::RequestCancelled { .. } => Input::RequestCancelled,
            E::CleanupCompleted => Input::CleanupCompleted,
        }
    }
}

impl JournalEvent for RetrievalRequestEvent {
    const SCHEMA_VERSION: i16 = 1;

    fn event_type(&self) -> &'static str {
        super::label::kebab(self.input().name())
    }
}

/// Progress of one part.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PartProgress {
    /// The deal currently fetching the part.
    pub deal_stream: Option<Uuid>,
    /// Whether the part arrived.
    pub completed: bool,
    /// Deals that failed for this part.
    pub failures: u32,
    /// Bytes received for the part.
    pub bytes: u64,
    /// Paid for the part, in attoFIL.
    pub paid: TokenAmount,
}

/// What a request's events fold into.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequestProgress {
    /// The request.
    pub request: Option<RetrievalRequest>,
    /// Failures allowed per part before the request fails.
    pub max_attempts: u32,
    /// One entry per part, in order.
    pub parts: Vec<PartProgress>,
    /// Bytes of the piece received.
    pub bytes_done: u64,
    /// Paid in total, in attoFIL.
    pub total_paid: TokenAmount,
    /// Why the request failed or was cancelled.
    pub message: Option<String>,
}

impl RequestProgress {
    /// Index of the first part neither completed nor being fetched.
    pub fn next_part(&self) -> Option<usize> {
        self.parts.iter().position(|p| !p.completed && p.deal_stream.is_none())
    }
}

/// The retrieval request machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetrievalRequestMachine;

impl Machine for RetrievalRequestMachine {
    const NAME: &'static str = "retrieval_request";
    type State = State;
    type Input = Input;
    type Output = Output;
    type Event = RetrievalRequestEvent;
    type Data = RequestProgress;
    const INITIAL: State = State::New;
    const TERMINAL: &'static [State] = &[State::Completed, State::Errored, State::Cancelled];

    fn transition(state: State, input: Input) -> Option<State> {
        machine::Impl::transition(&state, &input)
    }

    fn output(state: State, input: Input) -> Option<Output> {
        machine::Impl::output(&state, &input)
    }

    fn input(event: &RetrievalRequestEvent) -> Input {
        event.input()
    }

    fn fold(data: &mut RequestProgress, event: &RetrievalRequestEvent) {
        use RetrievalRequestEvent as E;
        match event {
            E::RequestCreated { request, max_attempts } => {
                data.parts = vec![PartProgress::default(); request.parts().len()];
                data.request = Some((**request).clone());
                data.max_attempts = *max_attempts;
            }
            E::PartStarted { part_index, deal_stream } => {
                if let Some(part) = data.parts.get_mut(*part_index as usize) {
                    part.deal_stream = Some(*deal_stream);
                }
            }
            E::PartCompleted { part_index, bytes, paid, .. } => {
                if let Some(part) = data.parts.get_mut(*part_index as usize) {
                    part.completed = true;
                    part.deal_stream = None;
                    part.bytes = *bytes;
                    part.paid = *paid;
                }
                data.bytes_done += bytes;
                data.total_paid = data.total_paid.checked_add(*paid).unwrap_or(data.total_paid);
            }
            E::PartFailed { part_index, reason, .. } => {
                if let Some(part) = data.parts.get_mut(*part_index as usize) {
                    part.deal_stream = None;
                    part.failures += 1;
                }
                data.message = Some(reason.clone());
            }
            E::RetriesExhausted { part_index } => {
                data.message =
                    Some(format!("part {part_index} failed {} times", data.max_attempts));
            }
            E::RequestCancelled { reason } => data.message = Some(reason.clone()),
            E::AllPartsCompleted | E::CleanupCompleted => {}
        }
    }

    fn decide(
        deal: &Deal<Self>,
        command: RetrievalRequestEvent,
        _ctx: &DecideContext,
    ) -> Result<Vec<RetrievalRequestEvent>, Rejection> {
        use RetrievalRequestEvent as E;
        if let E::RequestCreated { request, max_attempts } = &command {
            deal.require_new()?;
            if request.total_bytes == 0 || request.part_size == 0 || *max_attempts == 0 {
                return Err(inconsistent(
                    "a request needs bytes, a part size and at least one attempt",
                ));
            }
            if request.client == request.provider {
                return Err(inconsistent("client and provider are the same party"));
            }
            return Ok(vec![command]);
        }
        deal.require_started()?;
        let data = &deal.data;
        let part = |index: u32| {
            data.parts.get(index as usize).ok_or_else(|| inconsistent(format!("no part {index}")))
        };
        match &command {
            E::AllPartsCompleted | E::RetriesExhausted { .. } => {
                Err(Rejection::DerivedEvent { event: command.event_type() })
            }
            E::PartStarted { part_index, .. } => {
                let progress = part(*part_index)?;
                if progress.completed || progress.deal_stream.is_some() {
                    return Err(inconsistent(format!(
                        "part {part_index} is done or already being fetched"
                    )));
                }
                Ok(vec![command])
            }
            E::PartCompleted { part_index, deal_stream, .. } => {
                check_part_deal(part(*part_index)?, *part_index, *deal_stream, deal.state)?;
                let remaining = data.parts.iter().filter(|p| !p.completed).count();
                if remaining == 1 && deal.state == State::Retrieving {
                    Ok(vec![command, E::AllPartsCompleted])
                } else {
                    Ok(vec![command])
                }
            }
            E::PartFailed { part_index, deal_stream, .. } => {
                let progress = part(*part_index)?;
                check_part_deal(progress, *part_index, *deal_stream, deal.state)?;
                if progress.failures + 1 >= data.max_attempts && deal.state == State::Retrieving {
                    let exhausted = E::RetriesExhausted { part_index: *part_index };
                    Ok(vec![command, exhausted])
                } else {
                    Ok(vec![command])
                }
            }
            _ => Ok(vec![command]),
        }
    }

    fn failure(event: &RetrievalRequestEvent) -> FailureFact<'_> {
        use RetrievalRequestEvent as E;
        match event {
            // A failed part is retried by the request itself with a new deal; the deal's own
            // row carries that failure.
            E::RetriesExhausted { .. } => FailureFact::Fatal,
            E::RequestCreated { .. }
            | E::PartStarted { .. }
            | E::PartCompleted { .. }
            | E::PartFailed { .. }
            | E::AllPartsCompleted
            | E::RequestCancelled { .. }
            | E::CleanupCompleted => FailureFact::None,
        }
    }

    fn producer(input: Input) -> Producer {
        use Producer::*;
        match input {
            Input::RequestCreated => Command("Deals::initiate_retrieval, POST /v1/retrievals"),
            Input::PartStarted => Runner("start-retrieval-deal"),
            Input::PartCompleted => Notice("the part's retrieval deal completed"),
            Input::PartFailed => Notice("the part's retrieval deal failed"),
            Input::AllPartsCompleted => Derived,
            Input::RetriesExhausted => Derived,
            Input::RequestCancelled => Command(
                "operator cancel: Deals::cancel, POST /v1/deals/{id}/cancel, dealledger deal cancel",
            ),
            Input::CleanupCompleted => Runner("cancel-retrieval-deals"),
        }
    }

    fn effects(output: Output, deal: &Deal<Self>) -> Vec<Effect> {
        let data = &deal.data;
        let Some(request) = data.request.as_ref() else { return Vec::new() };
        let start = |index: usize| {
            request.parts().get(index).map(|range| Effect::StartRetrievalDeal {
                request_id: deal.id,
                part_index: index as u32,
                range: *range,
            })
        };
        match output {
            // One part at a time: the next starts when the previous completed.
            Output::StartNextPart | Output::RetryPart => {
                let busy = data.parts.iter().any(|p| p.deal_stream.is_some());
                let exhausted = data.parts.iter().any(|p| p.failures >= data.max_attempts);
                if busy || exhausted {
                    return Vec::new();
                }
                data.next_part().and_then(start).into_iter().collect()
            }
            Output::CancelDeals => vec![Effect::CancelRetrievalDeals { request_id: deal.id }],
        }
    }
}

/// A notice about a part must come from the deal fetching it (while retrieving).
fn check_part_deal(
    progress: &PartProgress,
    part_index: u32,
    deal_stream: Uuid,
    state: State,
) -> Result<(), Rejection> {
    if state == State::Retrieving && progress.deal_stream != Some(deal_stream) {
        return Err(inconsistent(format!("deal {deal_stream} is not fetching part {part_index}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::conformance::Sample;
    use crate::fsm::fixtures::*;
    use crate::fsm::testing::given;
    use RetrievalRequestEvent as E;

    fn created() -> E {
        E::RequestCreated { request: Box::new(retrieval_request()), max_attempts: 2 }
    }

    fn stream(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// The part in flight, if any, and its deal.
    fn in_flight(deal: &Deal<RetrievalRequestMachine>) -> (u32, Uuid) {
        deal.data
            .parts
            .iter()
            .enumerate()
            .find_map(|(i, p)| p.deal_stream.map(|s| (i as u32, s)))
            .unwrap_or((0, Uuid::nil()))
    }

    impl Sample for RetrievalRequestMachine {
        fn sample(input: Input, deal: &Deal<Self>) -> E {
            let (part_index, deal_stream) = in_flight(deal);
            match input {
                Input::RequestCreated => created(),
                Input::PartStarted => E::PartStarted {
                    part_index: deal.data.next_part().unwrap_or(0) as u32,
                    deal_stream: stream(deal.version as u128 + 100),
                },
                Input::PartCompleted => E::PartCompleted {
                    part_index,
                    deal_stream,
                    bytes: 1_000,
                    paid: TokenAmount(2_010),
                },
                Input::PartFailed => {
                    E::PartFailed { part_index, deal_stream, reason: "test".into() }
                }
                Input::AllPartsCompleted => E::AllPartsCompleted,
                Input::RetriesExhausted => E::RetriesExhausted { part_index },
                Input::RequestCancelled => E::RequestCancelled { reason: "test".into() },
                Input::CleanupCompleted => E::CleanupCompleted,
            }
        }

        fn derived(input: Input) -> bool {
            matches!(input, Input::AllPartsCompleted | Input::RetriesExhausted)
        }

        fn setup(state: State) -> Vec<Input> {
            if state == State::Retrieving { vec![Input::PartStarted] } else { Vec::new() }
        }
    }

    crate::conformance_tests!(RetrievalRequestMachine);

    /// Who sends each input; the ones nothing sends yet, named (issue 9 wires them).
    #[test]
    fn every_input_has_its_producer() {
        crate::fsm::conformance::every_input_has_its_producer::<RetrievalRequestMachine>(&[]);
    }

    #[test]
    fn a_request_starts_with_its_first_part_only() {
        let then = given::<RetrievalRequestMachine>([])
            .when(created())
            .then_state(State::Retrieving)
            .then_effects(&["start-retrieval-deal"]);
        assert!(matches!(
            &then.decision_effects()[0],
            Effect::StartRetrievalDeal { part_index: 0, range, .. } if range.length == 1_000
        ));
        assert_eq!(then.deal().data.parts.len(), 3);
    }

    #[test]
    fn each_completed_part_starts_the_next_and_the_last_completes_the_request() {
        let mut history = vec![created()];
        for (index, length) in [(0u32, 1_000u64), (1, 1_000), (2, 500)] {
            history.push(E::PartStarted { part_index: index, deal_stream: stream(index.into()) });
            let completed = E::PartCompleted {
                part_index: index,
                deal_stream: stream(index.into()),
                bytes: length,
                paid: TokenAmount(u128::from(length) * 2),
            };
            let then = given::<RetrievalRequestMachine>(history.clone()).when(completed.clone());
            if index < 2 {
                then.then([completed.clone()]).then_effects(&["start-retrieval-deal"]);
            } else {
                let then = then
                    .then([completed.clone(), E::AllPartsCompleted])
                    .then_state(State::Completed);
                assert_eq!(then.deal().data.bytes_done, 2_500);
                assert_eq!(then.deal().data.total_paid, TokenAmount(5_000));
            }
            history.push(completed);
        }
    }

    #[test]
    fn a_failed_part_is_retried_then_the_request_fails() {
        let failed =
            |n| E::PartFailed { part_index: 0, deal_stream: stream(n), reason: "gone".into() };
        let mut history = vec![created(), E::PartStarted { part_index: 0, deal_stream: stream(1) }];
        given::<RetrievalRequestMachine>(history.clone())
            .when(failed(1))
            .then([failed(1)])
            .then_effects(&["start-retrieval-deal"]);
        history.extend([failed(1), E::PartStarted { part_index: 0, deal_stream: stream(2) }]);
        given::<RetrievalRequestMachine>(history)
            .when(failed(2))
            .then([failed(2), E::RetriesExhausted { part_index: 0 }])
            .then_state(State::Failing)
            .then_effects(&["cancel-retrieval-deals"]);
    }

    #[test]
    fn rejects_a_notice_from_a_deal_that_is_not_fetching_the_part() {
        given::<RetrievalRequestMachine>([
            created(),
            E::PartStarted { part_index: 0, deal_stream: stream(1) },
        ])
        .when(E::PartCompleted {
            part_index: 0,
            deal_stream: stream(9),
            bytes: 1_000,
            paid: TokenAmount(1),
        })
        .then_rejects(|r| matches!(r, Rejection::Inconsistent { .. }));
    }
}
