//! Given/when/then for machines: `given([events]).when(command).then([events])`.

use super::{Deal, DecideContext, Decision, Machine, Rejection};
use crate::domain::ChainEpoch;
use uuid::Uuid;

/// A deal built from past events, about to receive a command.
pub struct Given<M: Machine> {
    deal: Deal<M>,
    ctx: DecideContext,
}

/// Starts a scenario from past events. Panics if the events are not a legal history: the
/// fixture itself is wrong then.
pub fn given<M: Machine>(events: impl IntoIterator<Item = M::Event>) -> Given<M> {
    let events: Vec<M::Event> = events.into_iter().collect();
    let deal = Deal::replay(Uuid::nil(), &events).expect("the given events are a legal history");
    Given { deal, ctx: DecideContext::default() }
}

impl<M: Machine> Given<M> {
    /// Sets the chain epoch the command is decided at.
    pub fn at_epoch(mut self, epoch: i64) -> Self {
        self.ctx.epoch = ChainEpoch(epoch);
        self
    }

    /// Sends a command.
    pub fn when(self, command: M::Event) -> Then<M> {
        let result = self.deal.decide(command, &self.ctx);
        Then { before: self.deal, result }
    }
}

/// The outcome of a command, to assert on.
pub struct Then<M: Machine> {
    before: Deal<M>,
    result: Result<Decision<M>, Rejection>,
}

impl<M: Machine> Then<M> {
    fn decision(&self) -> &Decision<M> {
        match &self.result {
            Ok(decision) => decision,
            Err(rejection) => panic!("expected events, got rejection: {rejection}"),
        }
    }

    /// Asserts the events the command produced.
    pub fn then(self, expected: impl IntoIterator<Item = M::Event>) -> Self {
        let expected: Vec<M::Event> = expected.into_iter().collect();
        assert_eq!(self.decision().events, expected);
        self
    }

    /// Asserts the deal's state after the command.
    pub fn then_state(self, state: M::State) -> Self {
        assert_eq!(self.decision().deal.state, state);
        self
    }

    /// Asserts the names of the effects the command triggered, in order.
    pub fn then_effects(self, names: &[&str]) -> Self {
        let actual: Vec<&str> = self.decision().effects.iter().map(|(_, e)| e.name()).collect();
        assert_eq!(actual, names);
        self
    }

    /// Asserts the command was rejected as `check` expects, and that nothing changed.
    pub fn then_rejects(self, check: impl FnOnce(&Rejection) -> bool) -> Deal<M> {
        match &self.result {
            Err(rejection) => assert!(check(rejection), "unexpected rejection: {rejection:?}"),
            Ok(decision) => panic!("expected a rejection, got {:?}", decision.events),
        }
        self.before
    }

    /// The effects the command triggered.
    pub fn decision_effects(&self) -> Vec<crate::fsm::Effect> {
        self.decision().effects.iter().map(|(_, e)| e.clone()).collect()
    }

    /// The deal after the command.
    pub fn deal(&self) -> &Deal<M> {
        &self.decision().deal
    }
}
