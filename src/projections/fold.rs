//! Folding journal events whose machine is only known at run time (by their stream type): a
//! deal of any machine, and the state step one event makes. Rebuilds, the transitions
//! projector and deal-update subscriptions all fold through here.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::ProjectionError;
use super::rows::{Projected, RowMeta};
use super::table::{RowValues, TableSpec};
use crate::events::{EventCodec, Journal, RecordedEvent};
use crate::fsm::retrieval_client::RetrievalClient;
use crate::fsm::retrieval_provider::RetrievalProvider;
use crate::fsm::retrieval_request::RetrievalRequestMachine;
use crate::fsm::storage_client::StorageClient;
use crate::fsm::storage_provider::StorageProvider;
use crate::fsm::{Deal, Label, Machine};

/// The payload of one stored event, borrowed from wherever it was read.
#[derive(Debug, Clone, Copy)]
pub struct EventRef<'a> {
    /// The event's stream.
    pub stream_id: Uuid,
    /// Its version.
    pub version: u32,
    /// Its stored name.
    pub event_type: &'a str,
    /// Its schema version.
    pub schema_version: i16,
    /// Its payload.
    pub payload: &'a [u8],
}

impl<'a> From<&'a RecordedEvent> for EventRef<'a> {
    fn from(e: &'a RecordedEvent) -> Self {
        Self {
            stream_id: e.stream_id,
            version: e.version,
            event_type: &e.event_type,
            schema_version: e.schema_version,
            payload: &e.payload,
        }
    }
}

/// One transition, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Step {
    /// State before.
    pub from: &'static str,
    /// The input.
    pub input: &'static str,
    /// State after.
    pub to: &'static str,
}

fn decode<M: Machine>(event: EventRef<'_>) -> Result<M::Event, ProjectionError> {
    Ok(EventCodec::decode_parts::<M::Event>(event.event_type, event.schema_version, event.payload)?)
}

fn apply<M: Machine>(deal: &mut Deal<M>, event: EventRef<'_>) -> Result<Step, ProjectionError> {
    let decoded = decode::<M>(event)?;
    let from = deal.state.name();
    let input = M::input(&decoded).name();
    deal.apply(&decoded).map_err(|source| ProjectionError::Transition {
        stream_id: event.stream_id,
        version: event.version,
        source,
    })?;
    Ok(Step { from, input, to: deal.state.name() })
}

fn step<M: Machine>(from: &str, event: EventRef<'_>) -> Result<Step, ProjectionError> {
    let state = if event.version == 1 {
        M::INITIAL
    } else {
        M::State::from_name(from).ok_or_else(|| ProjectionError::UnknownState {
            stream_id: event.stream_id,
            state: from.to_owned(),
        })?
    };
    let decoded = decode::<M>(event)?;
    let input = M::input(&decoded).name();
    let to =
        M::transition(state, M::input(&decoded)).ok_or_else(|| ProjectionError::Transition {
            stream_id: event.stream_id,
            version: event.version,
            source: crate::fsm::TransitionError { machine: M::NAME, state: state.name(), input },
        })?;
    Ok(Step { from: state.name(), input, to: to.name() })
}

/// Runs `$body` with `$m` as the machine type `$stream_type` names; unknown types are a
/// `ProjectionError::UnknownStreamType`.
macro_rules! each_machine {
    ($stream_type:expr, $stream_id:expr, |$m:ident| $body:expr) => {
        match $stream_type {
            t if t == <$crate::fsm::storage_client::StorageClient as $crate::fsm::Machine>::NAME => {
                type $m = $crate::fsm::storage_client::StorageClient;
                $body
            }
            t if t == <$crate::fsm::storage_provider::StorageProvider as $crate::fsm::Machine>::NAME => {
                type $m = $crate::fsm::storage_provider::StorageProvider;
                $body
            }
            t if t == <$crate::fsm::retrieval_client::RetrievalClient as $crate::fsm::Machine>::NAME => {
                type $m = $crate::fsm::retrieval_client::RetrievalClient;
                $body
            }
            t if t == <$crate::fsm::retrieval_provider::RetrievalProvider as $crate::fsm::Machine>::NAME => {
                type $m = $crate::fsm::retrieval_provider::RetrievalProvider;
                $body
            }
            t if t == <$crate::fsm::retrieval_request::RetrievalRequestMachine as $crate::fsm::Machine>::NAME => {
                type $m = $crate::fsm::retrieval_request::RetrievalRequestMachine;
                $body
            }
            other => Err($crate::projections::ProjectionError::UnknownStreamType {
                stream_id: $stream_id,
                stream_type: other.to_owned(),
            }),
        }
    };
}

pub(crate) use each_machine;

/// The step `event` makes from state `from` in the machine of `stream_type` (for version 1 the
/// initial state is used whatever `from` says).
pub fn step_of(
    stream_type: &str,
    from: &str,
    event: EventRef<'_>,
) -> Result<Step, ProjectionError> {
    each_machine!(stream_type, event.stream_id, |M| step::<M>(from, event))
}

/// A deal of whichever machine its stream type names.
#[derive(Debug, Clone)]
pub enum AnyDeal {
    StorageClient(Deal<StorageClient>),
    StorageProvider(Deal<StorageProvider>),
    RetrievalClient(Deal<RetrievalClient>),
    RetrievalProvider(Deal<RetrievalProvider>),
    RetrievalRequest(Deal<RetrievalRequestMachine>),
}

macro_rules! on_deal {
    ($any:expr, |$d:ident| $body:expr) => {
        match $any {
            AnyDeal::StorageClient($d) => $body,
            AnyDeal::StorageProvider($d) => $body,
            AnyDeal::RetrievalClient($d) => $body,
            AnyDeal::RetrievalProvider($d) => $body,
            AnyDeal::RetrievalRequest($d) => $body,
        }
    };
}

impl AnyDeal {
    /// An empty deal of the machine `stream_type` names.
    pub fn new(stream_type: &str, id: Uuid) -> Result<Self, ProjectionError> {
        Ok(match stream_type {
            t if t == StorageClient::NAME => AnyDeal::StorageClient(Deal::new(id)),
            t if t == StorageProvider::NAME => AnyDeal::StorageProvider(Deal::new(id)),
            t if t == RetrievalClient::NAME => AnyDeal::RetrievalClient(Deal::new(id)),
            t if t == RetrievalProvider::NAME => AnyDeal::RetrievalProvider(Deal::new(id)),
            t if t == RetrievalRequestMachine::NAME => AnyDeal::RetrievalRequest(Deal::new(id)),
            other => {
                return Err(ProjectionError::UnknownStreamType {
                    stream_id: id,
                    stream_type: other.to_owned(),
                });
            }
        })
    }

    /// Folds one event, checking it against the machine's table.
    pub fn apply(&mut self, event: EventRef<'_>) -> Result<Step, ProjectionError> {
        on_deal!(self, |d| apply(d, event))
    }

    /// The status table the deal's row goes to.
    pub fn table(&self) -> &'static TableSpec {
        fn of<M: Projected>(_: &Deal<M>) -> &'static TableSpec {
            M::TABLE
        }
        on_deal!(self, |d| of(d))
    }

    /// The deal's status row and its table.
    pub fn row(&self, meta: &RowMeta) -> (&'static TableSpec, RowValues) {
        fn of<M: Projected>(deal: &Deal<M>, meta: &RowMeta) -> (&'static TableSpec, RowValues) {
            (M::TABLE, M::row(deal, meta))
        }
        on_deal!(self, |d| of(d, meta))
    }
}

/// The deals a rebuild folds, by stream id. Hashed with foldhash rather than the standard
/// SipHash: a rebuild looks up a deal for every event, and the keys are stream ids, not
/// input an attacker chooses to collide. Each deal is boxed: a deal is over a kilobyte, and
/// growing the map to 100k deals moved every one of them at each doubling (a tenth of a
/// rebuild's CPU, measured with `perf`); boxed, a doubling moves pointers.
pub type FoldedDeals = HashMap<Uuid, Box<FoldedDeal>, foldhash::fast::RandomState>;

/// A deal being folded during a rebuild, with the facts its row needs.
#[derive(Debug, Clone)]
pub struct FoldedDeal {
    /// The deal.
    pub deal: AnyDeal,
    /// Its row's event facts.
    pub meta: RowMeta,
}

impl FoldedDeal {
    /// Folds one more event of the deal.
    pub fn fold(
        deals: &mut FoldedDeals,
        stream_type: &str,
        event: EventRef<'_>,
        recorded_at: DateTime<Utc>,
    ) -> Result<(), ProjectionError> {
        let folded = match deals.entry(event.stream_id) {
            std::collections::hash_map::Entry::Occupied(slot) => slot.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => slot.insert(Box::new(FoldedDeal {
                deal: AnyDeal::new(stream_type, event.stream_id)?,
                meta: RowMeta {
                    last_event_type: String::new(),
                    first_event_at: recorded_at,
                    last_event_at: recorded_at,
                },
            })),
        };
        folded.deal.apply(event)?;
        folded.meta.last_event_type.clear();
        folded.meta.last_event_type.push_str(event.event_type);
        folded.meta.last_event_at = recorded_at;
        Ok(())
    }
}

/// Follows the state of every stream it sees, so that each new event can be told as a step
/// (from, input, to). Remembers recent streams; replays a stream from the journal when it
/// meets one it does not remember.
#[derive(Debug)]
pub struct StateTracker {
    journal: Journal,
    states: HashMap<Uuid, (u32, &'static str)>,
}

/// Streams remembered before the tracker forgets them all and starts again.
const TRACKED_STREAMS: usize = 100_000;

impl StateTracker {
    /// A tracker reading missing history from `journal`.
    pub fn new(journal: Journal) -> Self {
        Self { journal, states: HashMap::new() }
    }

    /// The step `event` makes.
    pub async fn step(&mut self, event: &RecordedEvent) -> Result<Step, ProjectionError> {
        let from = match self.states.get(&event.stream_id) {
            Some((version, state)) if *version + 1 == event.version => *state,
            _ if event.version == 1 => "",
            _ => self.state_before(event).await?,
        };
        let step = step_of(&event.stream_type, from, event.into())?;
        if self.states.len() >= TRACKED_STREAMS {
            self.states.clear();
        }
        self.states.insert(event.stream_id, (event.version, step.to));
        Ok(step)
    }

    /// Replays the stream up to just before `event`.
    async fn state_before(&self, event: &RecordedEvent) -> Result<&'static str, ProjectionError> {
        let history = self.journal.read_stream(event.stream_id, 1).await?;
        let mut state = "";
        for earlier in history.iter().take_while(|e| e.version < event.version) {
            state = step_of(&earlier.stream_type, state, earlier.into())?.to;
        }
        Ok(state)
    }
}
