//! One deal's history, replayed event by event through its machine.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::AuditError;
use crate::events::chain::{self, FirstBadVersion};
use crate::events::{EventCodec, Journal, JournalEvent, RecordedEvent};
use crate::fsm::retrieval_client::{RetrievalClient, RetrievalClientEvent};
use crate::fsm::retrieval_provider::{RetrievalProvider, RetrievalProviderEvent};
use crate::fsm::retrieval_request::RetrievalRequestMachine;
use crate::fsm::storage_client::{StorageClient, StorageClientEvent};
use crate::fsm::storage_provider::{StorageProvider, StorageProviderEvent};
use crate::fsm::{Deal, Label};
use crate::projections::rebuild::{RowDiff, diff_row};
use crate::projections::rows::{Projected, RowMeta};

/// Where to stop replaying: the deal as it was then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditPoint {
    /// After this version.
    Version(u32),
    /// After the last event recorded at or before this time.
    Time(DateTime<Utc>),
}

/// A signed document carried by an event, and whether its signature verifies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignatureCheck {
    /// What was signed.
    pub document: &'static str,
    /// Who signed it (peer id).
    pub signer: String,
    /// Whether the signature verifies.
    pub valid: bool,
}

/// One event of the timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineEntry {
    /// The event's version.
    pub version: u32,
    /// When it was recorded.
    pub recorded_at: DateTime<Utc>,
    /// Its stored name.
    pub event_type: String,
    /// Its schema version.
    pub schema_version: i16,
    /// The machine input it stands for (none if it does not decode).
    pub input: Option<&'static str>,
    /// State before.
    pub from: Option<&'static str>,
    /// State after (none if the transition is illegal).
    pub to: Option<&'static str>,
    /// The effects the transition triggered.
    pub effects: Vec<&'static str>,
    /// The operation it belongs to.
    pub correlation_id: Option<Uuid>,
    /// What caused it.
    pub causation_id: Option<Uuid>,
    /// Signed documents in the event.
    pub signatures: Vec<SignatureCheck>,
    /// The event's CID.
    pub cid: String,
    /// The decoded event, in the current schema.
    pub event: serde_json::Value,
    /// The schema the event was stored with, when it was upcast to read it.
    pub upcast_from: Option<i16>,
    /// The stored payload, as written, in hex.
    pub payload_hex: String,
}

/// What is wrong with an event's place in the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IllegalEvent {
    /// The version.
    pub version: u32,
    /// Why it does not replay.
    pub reason: String,
}

/// The audit's conclusions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// The first version where the hash chain fails; none when intact.
    pub chain: Option<FirstBadVersion>,
    /// The first event that does not decode or is not a legal transition; none when all are.
    pub first_illegal: Option<IllegalEvent>,
    /// Documents whose signature does not verify, by version.
    pub bad_signatures: Vec<(u32, &'static str)>,
    /// Where the reproduced state differs from the status row (checked for the whole history).
    pub projection_diffs: Option<Vec<RowDiff>>,
}

impl Verdict {
    /// Whether everything holds.
    pub fn holds(&self) -> bool {
        self.chain.is_none()
            && self.first_illegal.is_none()
            && self.bad_signatures.is_empty()
            && self.projection_diffs.as_ref().is_none_or(Vec::is_empty)
    }
}

/// A deal's audited history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeline {
    /// The stream.
    pub stream_id: Uuid,
    /// Its machine.
    pub stream_type: String,
    /// The state reproduced (as of the audit point).
    pub state: Option<&'static str>,
    /// Its status code.
    pub state_code: Option<u16>,
    /// Events replayed.
    pub version: u32,
    /// Events in the stream in all.
    pub events_in_stream: usize,
    /// The events, in order.
    pub entries: Vec<TimelineEntry>,
    /// The deal data reproduced.
    pub deal: serde_json::Value,
    /// The conclusions.
    pub verdict: Verdict,
}

/// A machine whose events can carry signed documents.
pub trait Audited: Projected {
    /// The signed documents in `event`, checked; `before` is the deal before it.
    fn signatures(_event: &Self::Event, _before: &Deal<Self>) -> Vec<SignatureCheck> {
        Vec::new()
    }
}

fn check(document: &'static str, signer: crate::domain::PartyKey, valid: bool) -> SignatureCheck {
    SignatureCheck { document, signer: signer.to_string(), valid }
}

impl Audited for StorageClient {
    fn signatures(event: &StorageClientEvent, _before: &Deal<Self>) -> Vec<SignatureCheck> {
        match event {
            StorageClientEvent::DealInitiated { proposal } => {
                vec![check(
                    "client deal proposal",
                    proposal.proposal.client,
                    proposal.verify().is_ok(),
                )]
            }
            StorageClientEvent::DealAccepted { deal } => vec![check(
                "provider-signed deal",
                deal.client_proposal.proposal.provider,
                deal.verify().is_ok(),
            )],
            _ => Vec::new(),
        }
    }
}

impl Audited for StorageProvider {
    fn signatures(event: &StorageProviderEvent, _before: &Deal<Self>) -> Vec<SignatureCheck> {
        match event {
            StorageProviderEvent::ProposalReceived { proposal } => {
                vec![check(
                    "client deal proposal",
                    proposal.proposal.client,
                    proposal.verify().is_ok(),
                )]
            }
            StorageProviderEvent::DealAccepted { deal } => vec![check(
                "provider-signed deal",
                deal.client_proposal.proposal.provider,
                deal.verify().is_ok(),
            )],
            _ => Vec::new(),
        }
    }
}

impl Audited for RetrievalClient {
    fn signatures(event: &RetrievalClientEvent, before: &Deal<Self>) -> Vec<SignatureCheck> {
        match (event, before.data.proposal.as_ref()) {
            (RetrievalClientEvent::PaymentSent { voucher }, Some(terms)) => {
                vec![check("payment voucher", terms.client, voucher.verify(&terms.client).is_ok())]
            }
            _ => Vec::new(),
        }
    }
}

impl Audited for RetrievalProvider {
    fn signatures(event: &RetrievalProviderEvent, before: &Deal<Self>) -> Vec<SignatureCheck> {
        match (event, before.data.proposal.as_ref()) {
            (RetrievalProviderEvent::PaymentReceived { voucher }, Some(terms)) => {
                vec![check("payment voucher", terms.client, voucher.verify(&terms.client).is_ok())]
            }
            _ => Vec::new(),
        }
    }
}

impl Audited for RetrievalRequestMachine {}

/// Replays `events` through `M`, building the timeline; stops moving the deal at the first
/// event that does not decode or is illegal, but still lists every event.
fn replay<M: Audited>(
    events: &[RecordedEvent],
) -> (Vec<TimelineEntry>, Deal<M>, Option<IllegalEvent>) {
    let Some(first) = events.first() else {
        return (Vec::new(), Deal::new(Uuid::nil()), None);
    };
    let mut deal = Deal::<M>::new(first.stream_id);
    let mut illegal: Option<IllegalEvent> = None;
    let mut entries = Vec::with_capacity(events.len());
    for recorded in events {
        let mut entry = TimelineEntry {
            version: recorded.version,
            recorded_at: recorded.recorded_at,
            event_type: recorded.event_type.clone(),
            schema_version: recorded.schema_version,
            input: None,
            from: None,
            to: None,
            effects: Vec::new(),
            correlation_id: recorded.correlation_id,
            causation_id: recorded.causation_id,
            signatures: Vec::new(),
            cid: recorded.cid.to_string(),
            event: serde_json::Value::Null,
            upcast_from: (recorded.schema_version != <M::Event as JournalEvent>::SCHEMA_VERSION)
                .then_some(recorded.schema_version),
            payload_hex: hex::encode(&recorded.payload),
        };
        match EventCodec::decode::<M::Event>(recorded) {
            Err(e) => {
                illegal.get_or_insert(IllegalEvent {
                    version: recorded.version,
                    reason: e.to_string(),
                });
            }
            Ok(event) => {
                entry.event = serde_json::to_value(&event).unwrap_or_default();
                entry.input = Some(M::input(&event).name());
                entry.signatures = M::signatures(&event, &deal);
                if event.event_type() != recorded.event_type {
                    illegal.get_or_insert(IllegalEvent {
                        version: recorded.version,
                        reason: format!(
                            "stored as {} but the payload is {}",
                            recorded.event_type,
                            event.event_type()
                        ),
                    });
                }
                if illegal.is_none() {
                    entry.from = Some(deal.state.name());
                    match deal.apply(&event) {
                        Ok(output) => {
                            entry.to = Some(deal.state.name());
                            if let Some(output) = output {
                                entry.effects =
                                    M::effects(output, &deal).iter().map(|e| e.name()).collect();
                            }
                        }
                        Err(e) => {
                            illegal = Some(IllegalEvent {
                                version: recorded.version,
                                reason: e.to_string(),
                            });
                        }
                    }
                }
            }
        }
        entries.push(entry);
    }
    (entries, deal, illegal)
}

/// The timeline of `all` (a stream's events) replayed through `M` up to `at`, without the
/// status-row comparison: needs no database.
fn build<M: Audited>(
    stream_id: Uuid,
    all: &[RecordedEvent],
    at: Option<AuditPoint>,
) -> (Timeline, Deal<M>) {
    let chain = chain::first_break(all);
    let events: Vec<RecordedEvent> = all
        .iter()
        .filter(|e| match at {
            None => true,
            Some(AuditPoint::Version(v)) => e.version <= v,
            Some(AuditPoint::Time(t)) => e.recorded_at <= t,
        })
        .cloned()
        .collect();
    let (entries, deal, first_illegal) = replay::<M>(&events);
    let bad_signatures = entries
        .iter()
        .flat_map(|e| {
            e.signatures.iter().filter(|s| !s.valid).map(move |s| (e.version, s.document))
        })
        .collect();
    let replayed = first_illegal.is_none();
    let timeline = Timeline {
        stream_id,
        stream_type: M::NAME.to_owned(),
        state: replayed.then(|| deal.state.name()),
        state_code: replayed.then(|| deal.state.code()).flatten(),
        version: deal.version,
        events_in_stream: all.len(),
        entries,
        deal: serde_json::to_value(&deal.data).unwrap_or_default(),
        verdict: Verdict { chain, first_illegal, bad_signatures, projection_diffs: None },
    };
    (timeline, deal)
}

async fn audit_typed<M: Audited>(
    journal: &Journal,
    stream_id: Uuid,
    all: Vec<RecordedEvent>,
    at: Option<AuditPoint>,
) -> Result<Timeline, AuditError> {
    let (mut timeline, deal) = build::<M>(stream_id, &all, at);
    if let (None, None, Some(first), Some(last)) =
        (at, &timeline.verdict.first_illegal, all.first(), all.last())
    {
        let meta = RowMeta {
            last_event_type: last.event_type.clone(),
            first_event_at: first.recorded_at,
            last_event_at: last.recorded_at,
        };
        timeline.verdict.projection_diffs =
            Some(diff_row(journal.pool(), M::TABLE, &M::row(&deal, &meta)).await?);
    }
    Ok(timeline)
}

/// Audits events without a database (a bundle): chain, legality and signatures.
pub fn audit_offline(events: &[RecordedEvent]) -> Result<Timeline, AuditError> {
    let Some(first) = events.first() else {
        return Err(AuditError::NotFound("an empty stream".into()));
    };
    let (stream_id, stream_type) = (first.stream_id, first.stream_type.clone());
    let result: Result<Timeline, crate::projections::ProjectionError> =
        crate::projections::fold::each_machine!(stream_type.as_str(), stream_id, |M| Ok(
            build::<M>(stream_id, events, None).0
        ));
    result.map_err(|_| AuditError::UnknownStreamType { stream_id, stream_type })
}

/// Audits one stream, as of `at` (its whole history when `None`).
pub async fn audit(
    journal: &Journal,
    stream_id: Uuid,
    at: Option<AuditPoint>,
) -> Result<Timeline, AuditError> {
    let events = journal.read_stream(stream_id, 1).await?;
    let Some(first) = events.first() else {
        return Err(AuditError::NotFound(stream_id.to_string()));
    };
    let stream_type = first.stream_type.clone();
    let result: Result<Result<Timeline, AuditError>, crate::projections::ProjectionError> =
        crate::projections::fold::each_machine!(stream_type.as_str(), stream_id, |M| Ok(
            audit_typed::<M>(journal, stream_id, events, at).await
        ));
    match result {
        Ok(timeline) => timeline,
        Err(_) => Err(AuditError::UnknownStreamType { stream_id, stream_type }),
    }
}
