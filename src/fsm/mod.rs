//! The deal state machines. Each machine lives in its own module with its
//! `rust_fsm::state_machine!` declaration on top: that table is the single source of truth for
//! which transitions exist and which effect each one has. Everything else — replay, the
//! `fsm show` tables, diagrams, generated docs and the conformance tests — reads the table
//! through [`Machine::transition`] and [`Machine::output`].
//!
//! Machines are pure and synchronous: [`Machine::decide`] turns a command into events (or a
//! typed rejection) and [`Deal::apply`] folds an event into the deal. Time, epochs and ids
//! arrive in the [`DecideContext`]; nothing here reads a clock, draws randomness or does I/O.

#[cfg(test)]
pub mod conformance;
pub mod effects;
pub mod failure;
pub mod fixtures;
pub mod label;
pub mod retrieval_client;
pub mod retrieval_provider;
pub mod retrieval_request;
pub mod storage_client;
pub mod storage_provider;
pub mod table;
#[cfg(test)]
pub mod testing;

use std::fmt::Debug;

use serde::Serialize;
use uuid::Uuid;

use crate::domain::ChainEpoch;
use crate::domain::retrieval::RetrievalTermsError;
use crate::domain::storage::{DealPolicy, ProposalError};
use crate::events::JournalEvent;

pub use effects::Effect;
pub use failure::{FailureClass, FailureFact, FailureStatus};
pub use label::Label;

/// A declared deal state machine: its alphabets (from its `state_machine!` table), its events
/// and the deal data they fold into.
pub trait Machine: Sized + Copy + Debug + PartialEq + Send + Sync + 'static {
    /// The machine's name, also the type of its journal streams (`storage_provider`).
    const NAME: &'static str;
    /// The states, with their go-fil-markets status codes.
    type State: Label;
    /// The input kinds: one per event kind.
    type Input: Label;
    /// The output kinds: what must happen on entering a state.
    type Output: Label;
    /// The journal payload: an input kind with its facts.
    type Event: JournalEvent + Clone + Debug + PartialEq + Send + Sync;
    /// What the events fold into besides the state.
    type Data: Default + Clone + Debug + PartialEq + Serialize + Send + Sync;

    /// The state of a deal with no events.
    const INITIAL: Self::State;
    /// States that accept no input.
    const TERMINAL: &'static [Self::State];

    /// The declared transition for `(state, input)`, if any.
    fn transition(state: Self::State, input: Self::Input) -> Option<Self::State>;
    /// The declared output for `(state, input)`, if any.
    fn output(state: Self::State, input: Self::Input) -> Option<Self::Output>;
    /// The input kind an event stands for.
    fn input(event: &Self::Event) -> Self::Input;
    /// Folds an event's facts into the deal data (the state is moved by [`Deal::apply`]).
    fn fold(data: &mut Self::Data, event: &Self::Event);
    /// Checks a command against the deal and returns the events it causes, first the command's
    /// own event, then any that follow from it without outside help.
    fn decide(
        deal: &Deal<Self>,
        command: Self::Event,
        ctx: &DecideContext,
    ) -> Result<Vec<Self::Event>, Rejection>;
    /// The effects an output stands for, given the deal data after the transition.
    fn effects(output: Self::Output, deal: &Deal<Self>) -> Vec<Effect>;
    /// Whether `state` is final.
    fn is_terminal(state: Self::State) -> bool {
        Self::TERMINAL.contains(&state)
    }
    /// Who sends the machine `input` (listed in `docs/fsm/<machine>.md`). An exhaustive
    /// `match` in every machine, so a new input cannot be declared without saying who sends
    /// it.
    fn producer(input: Self::Input) -> Producer;
    /// What `event` says about failure: not one, a recoverable attempt or stall, or fatal. An
    /// exhaustive `match` in every machine, so no failure event goes unclassified.
    fn failure(event: &Self::Event) -> FailureFact<'_>;
    /// Funds the deal holds reserved: deposited for it and neither locked by the chain nor
    /// given back. Invariant (checked for every machine): zero in every terminal state.
    fn reserved(_data: &Self::Data) -> crate::domain::TokenAmount {
        crate::domain::TokenAmount::ZERO
    }
}

/// Who sends a machine one of its inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Producer {
    /// A user's command: the library API (`Deals`, `Ledger`), the node's HTTP API or CLI.
    Command(&'static str),
    /// The machine itself: the event follows from another without outside help.
    Derived,
    /// The network adapter, translating a counterparty's request or answer.
    Network(&'static str),
    /// The data-transfer adapter.
    Transfer(&'static str),
    /// The effect runner, from what the chain or the sealing pipeline reports.
    Chain(&'static str),
    /// The effect runner, performing one of the deal's own effects.
    Runner(&'static str),
    /// The timeout sweep (`runner::time_out_stuck_deals`, every minute in `serve`).
    Timer,
    /// Another stream of this ledger, through a notify effect.
    Notice(&'static str),
    /// Declared for a flow that is not wired yet: nothing sends it today.
    NotYet(&'static str),
}

impl std::fmt::Display for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Producer::Command(what) => write!(f, "command: {what}"),
            Producer::Derived => f.write_str("derived by the machine"),
            Producer::Network(what) => write!(f, "network adapter: {what}"),
            Producer::Transfer(what) => write!(f, "transfer adapter: {what}"),
            Producer::Chain(what) => write!(f, "chain (effect runner): {what}"),
            Producer::Runner(what) => write!(f, "effect runner: {what}"),
            Producer::Timer => f.write_str("timeout sweep"),
            Producer::Notice(what) => write!(f, "notice: {what}"),
            Producer::NotYet(what) => write!(f, "NOT WIRED YET: {what}"),
        }
    }
}

/// What the machines need to know about the world to decide: passed in, never read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecideContext {
    /// The current chain epoch.
    pub epoch: ChainEpoch,
    /// Proposal limits.
    pub policy: DealPolicy,
}

impl Default for DecideContext {
    fn default() -> Self {
        Self { epoch: ChainEpoch(0), policy: DealPolicy::default() }
    }
}

/// An input the declared table does not allow in the deal's current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[error("{machine}: input {input} is not allowed in state {state}")]
pub struct TransitionError {
    /// The machine's name.
    pub machine: &'static str,
    /// The state the deal was in.
    pub state: &'static str,
    /// The input refused.
    pub input: &'static str,
}

/// Why a command was refused. A rejection is a domain answer, never an operational failure:
/// nothing was appended, and retrying the same command gives the same answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The table does not allow this input now. Callers report it; it is not retried.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// A storage proposal or deal is invalid (signature, size, epochs, label, ...).
    #[error(transparent)]
    Proposal(#[from] ProposalError),
    /// Retrieval terms or a voucher are invalid.
    #[error(transparent)]
    RetrievalTerms(#[from] RetrievalTermsError),
    /// The event may only be produced by the machine itself, never sent as a command.
    #[error("{event} is decided by the machine and cannot be sent as a command")]
    DerivedEvent { event: &'static str },
    /// A command for a deal that was never started: inputs never create deals implicitly.
    #[error("deal {stream_id} does not exist")]
    DealNotFound { stream_id: Uuid },
    /// A start command for a deal that already exists.
    #[error("deal {stream_id} already exists")]
    DealExists { stream_id: Uuid },
    /// The command's facts contradict what the deal already holds.
    #[error("{what}")]
    Inconsistent { what: String },
}

/// A deal: its stream, the version folded so far, its state and its data.
#[derive(Debug, Clone, PartialEq)]
pub struct Deal<M: Machine> {
    /// The journal stream of the deal.
    pub id: Uuid,
    /// The number of events folded (the stream's version).
    pub version: u32,
    /// The current state.
    pub state: M::State,
    /// The data folded from the events.
    pub data: M::Data,
    /// The class, attempts and next retry of the deal's last failure.
    pub failure: FailureStatus,
}

/// The outcome of a command: the events to append and the effects to enqueue with them.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision<M: Machine> {
    /// Events to append, in order, starting at version `deal.version + 1`.
    pub events: Vec<M::Event>,
    /// The deal after the events.
    pub deal: Deal<M>,
    /// The effects of the transitions, each with the version of the event that caused it.
    pub effects: Vec<(u32, Effect)>,
}

impl<M: Machine> Deal<M> {
    /// A deal with no events, in the initial state.
    pub fn new(id: Uuid) -> Self {
        Self {
            id,
            version: 0,
            state: M::INITIAL,
            data: M::Data::default(),
            failure: FailureStatus::default(),
        }
    }

    /// Rebuilds a deal by replaying its events through the machine. A journal the table does not
    /// allow is an error: replay never invents a state.
    pub fn replay<'a>(
        id: Uuid,
        events: impl IntoIterator<Item = &'a M::Event>,
    ) -> Result<Self, TransitionError> {
        let mut deal = Self::new(id);
        for event in events {
            deal.apply(event)?;
        }
        Ok(deal)
    }

    /// Moves the deal by one event: checks the declared table, moves the state, folds the
    /// data, and returns the transition's output. A refused event changes nothing.
    pub fn apply(&mut self, event: &M::Event) -> Result<Option<M::Output>, TransitionError> {
        let input = M::input(event);
        let next = M::transition(self.state, input).ok_or(TransitionError {
            machine: M::NAME,
            state: self.state.name(),
            input: input.name(),
        })?;
        let output = M::output(self.state, input);
        self.state = next;
        self.version += 1;
        M::fold(&mut self.data, event);
        self.failure.fold(M::failure(event));
        Ok(output)
    }

    /// Decides a command: the machine's guards, then every resulting event through the table.
    pub fn decide(&self, command: M::Event, ctx: &DecideContext) -> Result<Decision<M>, Rejection> {
        let events = M::decide(self, command, ctx)?;
        let mut deal = self.clone();
        let mut effects = Vec::new();
        for event in &events {
            if let Some(output) = deal.apply(event)? {
                effects.extend(M::effects(output, &deal).into_iter().map(|e| (deal.version, e)));
            }
        }
        Ok(Decision { events, deal, effects })
    }

    /// Decides several commands in a row, each on the deal the previous ones produced: one
    /// decision to record in one transaction. The first rejection rejects them all.
    pub fn decide_all(
        &self,
        commands: impl IntoIterator<Item = M::Event>,
        ctx: &DecideContext,
    ) -> Result<Decision<M>, Rejection> {
        let mut all = Decision { events: Vec::new(), deal: self.clone(), effects: Vec::new() };
        for command in commands {
            let next = all.deal.decide(command, ctx)?;
            all.events.extend(next.events);
            all.effects.extend(next.effects);
            all.deal = next.deal;
        }
        Ok(all)
    }

    /// Whether the deal is in a final state.
    pub fn is_terminal(&self) -> bool {
        M::is_terminal(self.state)
    }

    /// Refuses a command unless the deal has been started.
    pub fn require_started(&self) -> Result<(), Rejection> {
        if self.version == 0 { Err(Rejection::DealNotFound { stream_id: self.id }) } else { Ok(()) }
    }

    /// Refuses a start command on a deal that already exists.
    pub fn require_new(&self) -> Result<(), Rejection> {
        if self.version == 0 { Ok(()) } else { Err(Rejection::DealExists { stream_id: self.id }) }
    }
}

/// A rejection for facts that contradict the deal.
pub(crate) fn inconsistent(what: impl Into<String>) -> Rejection {
    Rejection::Inconsistent { what: what.into() }
}

/// Checks a cumulative byte count: it never goes backwards and never exceeds `limit`.
pub(crate) fn check_bytes(bytes: u64, previous: u64, limit: u64) -> Result<(), Rejection> {
    if bytes < previous {
        return Err(inconsistent(format!("byte count went back from {previous} to {bytes}")));
    }
    if bytes > limit {
        return Err(inconsistent(format!("{bytes} bytes exceed the {limit} expected")));
    }
    Ok(())
}

#[cfg(test)]
mod purity {
    /// Invariant: machines are pure. Nothing under `src/fsm/` reads a clock, draws randomness
    /// or does I/O; time and ids arrive in the `DecideContext` and the commands.
    #[test]
    fn no_machine_reads_a_clock_draws_randomness_or_does_io() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/fsm");
        let forbidden = [
            "now(",
            "Instant::",
            "SystemTime",
            "rand::",
            "thread_rng",
            "sqlx",
            "tokio",
            "std::fs",
            "std::net",
            "new_v4",
            "now_v7",
        ];
        for entry in std::fs::read_dir(&dir).expect("src/fsm exists") {
            let path = entry.expect("a directory entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            // The table module writes the generated docs; the fixtures are test data.
            if name == "table.rs" || name == "fixtures.rs" || name == "mod.rs" {
                continue;
            }
            let source = std::fs::read_to_string(&path).expect("readable source");
            for word in forbidden {
                assert!(!source.contains(word), "{} uses {word}", path.display());
            }
        }
    }
}
