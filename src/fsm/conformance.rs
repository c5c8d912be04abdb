//! Checks every machine against its own declaration: reachability, absorbing terminal states,
//! a way out of every state, every declared transition accepted through `decide`, every
//! undeclared input refused without change, and replay equal to the live path.

use std::collections::{HashMap, HashSet, VecDeque};

use proptest::prelude::*;
use uuid::Uuid;

use super::{Deal, DecideContext, Label, Machine, Rejection};
use crate::domain::ChainEpoch;
use crate::events::EventCodec;

/// A machine that can make an example event for any input, consistent with the deal so far.
pub trait Sample: Machine {
    /// An event of kind `input` that the deal's guards accept.
    fn sample(input: Self::Input, deal: &Deal<Self>) -> Self::Event;
    /// Whether `input` is only ever produced by `decide` itself.
    fn derived(input: Self::Input) -> bool;
    /// Inputs that loop back to `state`, applied after reaching it, so that its examples have
    /// something to act on (a request with a part in flight).
    fn setup(_state: Self::State) -> Vec<Self::Input> {
        Vec::new()
    }
}

fn ctx() -> DecideContext {
    DecideContext { epoch: ChainEpoch(super::fixtures::NOW), ..DecideContext::default() }
}

/// Shortest input path from the initial state to every reachable state.
fn paths<M: Machine>() -> HashMap<M::State, Vec<M::Input>> {
    let mut paths = HashMap::from([(M::INITIAL, Vec::new())]);
    let mut queue = VecDeque::from([M::INITIAL]);
    while let Some(state) = queue.pop_front() {
        for &input in M::Input::ALL {
            if let Some(next) = M::transition(state, input)
                && !paths.contains_key(&next)
            {
                let mut path = paths[&state].clone();
                path.push(input);
                paths.insert(next, path);
                queue.push_back(next);
            }
        }
    }
    paths
}

/// A deal driven to `state` along the shortest path, with its events.
fn deal_in<M: Sample>(state: M::State) -> (Deal<M>, Vec<M::Event>) {
    let mut deal = Deal::<M>::new(Uuid::nil());
    let mut events = Vec::new();
    for input in paths::<M>()[&state].iter().chain(&M::setup(state)) {
        let event = M::sample(*input, &deal);
        deal.apply(&event).expect("the path follows the table");
        events.push(event);
    }
    (deal, events)
}

/// Every state can be reached from the initial one.
pub fn every_state_is_reachable<M: Machine>() {
    let reachable = paths::<M>();
    for state in M::State::ALL {
        assert!(reachable.contains_key(state), "{}: {} is unreachable", M::NAME, state.name());
    }
}

/// Terminal states have no transitions; every other state has at least one.
pub fn terminal_states_are_absorbing<M: Machine>() {
    for &state in M::State::ALL {
        let outgoing = M::Input::ALL.iter().filter(|&&i| M::transition(state, i).is_some()).count();
        if M::is_terminal(state) {
            assert_eq!(outgoing, 0, "{}: terminal {} has transitions", M::NAME, state.name());
        } else {
            assert!(outgoing > 0, "{}: {} is a dead end but not terminal", M::NAME, state.name());
        }
    }
}

/// From every state some terminal state can be reached.
pub fn every_state_has_a_path_to_a_terminal<M: Machine>() {
    for &start in M::State::ALL {
        let mut seen = HashSet::from([start]);
        let mut queue = VecDeque::from([start]);
        let mut found = M::is_terminal(start);
        while let Some(state) = queue.pop_front() {
            for &input in M::Input::ALL {
                if let Some(next) = M::transition(state, input) {
                    found |= M::is_terminal(next);
                    if seen.insert(next) {
                        queue.push_back(next);
                    }
                }
            }
        }
        assert!(found, "{}: no terminal state reachable from {}", M::NAME, start.name());
    }
}

/// Every input appears in at least one declared transition.
pub fn every_input_is_used<M: Machine>() {
    for &input in M::Input::ALL {
        let used = M::State::ALL.iter().any(|&s| M::transition(s, input).is_some());
        assert!(used, "{}: input {} is declared but never accepted", M::NAME, input.name());
    }
}

/// Every declared transition is accepted through `decide` (derived inputs through `apply`, and
/// refused as commands), moving the deal to the declared state.
pub fn every_declared_transition_is_accepted<M: Sample>() {
    for &from in M::State::ALL {
        for &input in M::Input::ALL {
            let Some(to) = M::transition(from, input) else { continue };
            let (deal, _) = deal_in::<M>(from);
            let event = M::sample(input, &deal);
            let label = format!("{}: {} --{}--> {}", M::NAME, from.name(), input.name(), to.name());
            if M::derived(input) {
                let refused = deal.decide(event.clone(), &ctx());
                assert!(
                    matches!(refused, Err(Rejection::DerivedEvent { .. })),
                    "{label}: {refused:?}"
                );
                let mut applied = deal.clone();
                applied.apply(&event).expect(&label);
                assert_eq!(applied.state, to, "{label}");
                continue;
            }
            let decision =
                deal.decide(event.clone(), &ctx()).unwrap_or_else(|e| panic!("{label}: {e}"));
            let mut first = deal.clone();
            first.apply(&decision.events[0]).expect(&label);
            assert_eq!(first.state, to, "{label}");
            assert_eq!(decision.deal.version, deal.version + decision.events.len() as u32);
        }
    }
}

/// Every input the table does not declare for a state is refused, and the deal is unchanged.
pub fn every_undeclared_input_is_rejected<M: Sample>() {
    for &from in M::State::ALL {
        let (deal, _) = deal_in::<M>(from);
        for &input in M::Input::ALL {
            if M::transition(from, input).is_some() {
                continue;
            }
            let event = M::sample(input, &deal);
            let result = deal.decide(event.clone(), &ctx());
            assert!(result.is_err(), "{}: {} accepted {}", M::NAME, from.name(), input.name());
            let mut applied = deal.clone();
            let error = applied.apply(&event).expect_err("the table refuses it");
            assert_eq!((error.state, error.input), (from.name(), input.name()));
            assert_eq!(applied, deal, "a refused event changed the deal");
        }
    }
}

/// A random legal walk: the live deal, and the events that made it.
fn random_walk<M: Sample>(choices: &[u8]) -> (Deal<M>, Vec<M::Event>) {
    let mut deal = Deal::<M>::new(Uuid::nil());
    let mut events = Vec::new();
    for choice in choices {
        let allowed: Vec<M::Input> = M::Input::ALL
            .iter()
            .copied()
            .filter(|&i| M::transition(deal.state, i).is_some())
            .collect();
        if allowed.is_empty() {
            break;
        }
        let event = M::sample(allowed[*choice as usize % allowed.len()], &deal);
        deal.apply(&event).expect("a legal input");
        events.push(event);
    }
    (deal, events)
}

/// An input is derived by the machine exactly when its producer says so; the inputs nothing
/// sends yet are exactly `not_yet` (so a new dead input fails here until it is wired or
/// listed).
pub fn every_input_has_its_producer<M: Sample>(not_yet: &[&str]) {
    let mut dead = Vec::new();
    for &input in M::Input::ALL {
        let producer = M::producer(input);
        assert_eq!(
            producer == super::Producer::Derived,
            M::derived(input),
            "{}: {} derived or not?",
            M::NAME,
            input.name()
        );
        if matches!(producer, super::Producer::NotYet(_)) {
            dead.push(input.name());
        }
    }
    assert_eq!(dead, not_yet, "{}: inputs nothing sends", M::NAME);
}

/// Whatever the path, a deal that ended holds no reserved funds.
pub fn terminal_states_hold_no_funds<M: Sample>(choices: &[u8]) -> Result<(), TestCaseError> {
    let (deal, _) = random_walk::<M>(choices);
    if M::is_terminal(deal.state) {
        prop_assert_eq!(
            M::reserved(&deal.data),
            crate::domain::TokenAmount::ZERO,
            "{} ended in {} holding funds",
            M::NAME,
            deal.state.name()
        );
    }
    Ok(())
}

/// Replaying the encoded and decoded events of any legal walk gives the live deal.
pub fn replay_equals_live<M: Sample>(choices: &[u8]) -> Result<(), TestCaseError> {
    let (live, events) = random_walk::<M>(choices);
    let decoded: Vec<M::Event> = events
        .iter()
        .map(|e| {
            let stored = EventCodec::encode(e).expect("encodes");
            EventCodec::decode_parts::<M::Event>(
                &stored.event_type,
                stored.schema_version,
                &stored.payload,
            )
            .expect("decodes")
        })
        .collect();
    prop_assert_eq!(&decoded, &events);
    let replayed = Deal::<M>::replay(Uuid::nil(), &decoded).expect("a legal history replays");
    prop_assert_eq!(replayed, live);
    Ok(())
}

/// Declares the conformance tests of one machine.
#[macro_export]
macro_rules! conformance_tests {
    ($machine:ty) => {
        mod conformance {
            use super::*;
            use $crate::fsm::conformance as c;

            #[test]
            fn every_state_is_reachable() {
                c::every_state_is_reachable::<$machine>();
            }
            #[test]
            fn terminal_states_are_absorbing() {
                c::terminal_states_are_absorbing::<$machine>();
            }
            #[test]
            fn every_state_has_a_path_to_a_terminal() {
                c::every_state_has_a_path_to_a_terminal::<$machine>();
            }
            #[test]
            fn every_input_is_used() {
                c::every_input_is_used::<$machine>();
            }
            #[test]
            fn every_declared_transition_is_accepted() {
                c::every_declared_transition_is_accepted::<$machine>();
            }
            #[test]
            fn every_undeclared_input_is_rejected() {
                c::every_undeclared_input_is_rejected::<$machine>();
            }
            #[test]
            fn every_cancel_and_failure_cleans_up() {
                c::every_cancel_and_failure_cleans_up::<$machine>();
            }
            proptest::proptest! {
                #[test]
                fn replay_equals_live(choices in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..60)) {
                    c::replay_equals_live::<$machine>(&choices)?;
                }

                #[test]
                fn terminal_states_hold_no_funds(choices in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..60)) {
                    c::terminal_states_hold_no_funds::<$machine>(&choices)?;
                }
            }
        }
    };
}

/// Invariant: a cancel or a fatal failure, from any state that takes it, either enters a
/// state whose effects close the transfer and release the deal's funds (`Failing`,
/// `Cancelling`, or the provider's `Rejecting` on its way there), or ends the deal holding
/// nothing. So no failure can strand reserved funds or an open transfer.
pub fn every_cancel_and_failure_cleans_up<M: Sample>() {
    for &state in M::State::ALL {
        if M::is_terminal(state) {
            continue;
        }
        let (deal, _) = deal_in::<M>(state);
        for &input in M::Input::ALL {
            if M::transition(state, input).is_none() || M::derived(input) {
                continue;
            }
            let event = M::sample(input, &deal);
            let cancels = input.name() == "DealCancelled" || input.name() == "RequestCancelled";
            if !cancels && M::failure(&event) != super::FailureFact::Fatal {
                continue;
            }
            let Ok(decision) = deal.decide(event, &ctx()) else { continue };
            let after = &decision.deal;
            let names: Vec<&str> = decision.effects.iter().map(|(_, e)| e.name()).collect();
            let holds_nothing = M::reserved(&after.data) == crate::domain::TokenAmount::ZERO;
            let cleans = names.contains(&"close-transfer")
                && (names.contains(&"release-funds") || holds_nothing);
            let releases_later = after.state.name() == "Rejecting";
            let ends_empty = M::is_terminal(after.state) && holds_nothing;
            let request = M::NAME == "retrieval_request";
            assert!(
                cleans || releases_later || ends_empty || request,
                "{}: {} in {} leads to {} with effects {names:?}",
                M::NAME,
                input.name(),
                state.name(),
                after.state.name()
            );
        }
    }
}
