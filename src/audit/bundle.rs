//! Deal bundles: one deal's whole history in a self-contained file — its events with their
//! CIDs (the signed proposal and deal are among them), and the latest signed checkpoint with
//! the Merkle proof of the deal's head — that an auditor or counterparty checks offline.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::AuditError;
use super::checkpoint::{self, ProofStep, SignedCheckpoint, StreamHead, root_cid, root_from_proof};
use super::timeline::{Timeline, audit_offline};
use crate::events::{Journal, RecordedEvent};

/// The first bytes of every bundle file.
pub const MAGIC: &[u8; 9] = b"DLBUNDLE1";

/// A deal's evidence. postcard-encoded after [`MAGIC`].
///
/// Invariant: every byte is covered by a hash or a signature — the events' fields by their
/// CIDs, the checkpoint by its signature and proof — so flipping any byte makes the bundle
/// fail. Nothing unprotected (positions, database ids, a separate stream id) is carried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DealBundle {
    /// Every event, in version order, with its CIDs.
    pub events: Vec<BundledEvent>,
    /// The latest checkpoint covering the deal, with the proof of its head.
    pub checkpoint: Option<BundledCheckpoint>,
}

/// An event as its CID covers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundledEvent {
    pub stream_id: Uuid,
    pub stream_type: String,
    pub version: u32,
    pub event_type: String,
    pub schema_version: i16,
    pub payload: Vec<u8>,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    pub prev_cid: Option<cid::Cid>,
    pub cid: cid::Cid,
}

impl From<RecordedEvent> for BundledEvent {
    fn from(e: RecordedEvent) -> Self {
        Self {
            stream_id: e.stream_id,
            stream_type: e.stream_type,
            version: e.version,
            event_type: e.event_type,
            schema_version: e.schema_version,
            payload: e.payload,
            recorded_at: e.recorded_at,
            correlation_id: e.correlation_id,
            causation_id: e.causation_id,
            prev_cid: e.prev_cid,
            cid: e.cid,
        }
    }
}

impl From<&BundledEvent> for RecordedEvent {
    /// Position and transaction are not part of the evidence; they read as zero.
    fn from(e: &BundledEvent) -> Self {
        Self {
            position: 0,
            stream_id: e.stream_id,
            stream_type: e.stream_type.clone(),
            version: e.version,
            event_type: e.event_type.clone(),
            schema_version: e.schema_version,
            payload: e.payload.clone(),
            recorded_at: e.recorded_at,
            correlation_id: e.correlation_id,
            causation_id: e.causation_id,
            tx_id: 0,
            prev_cid: e.prev_cid,
            cid: e.cid,
        }
    }
}

/// A checkpoint's signed statement and the proof that it covers the deal's head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundledCheckpoint {
    /// What the node signed.
    pub statement: super::checkpoint::CheckpointStatement,
    /// The node key.
    pub signer: crate::domain::PartyKey,
    /// Its signature.
    pub signature: ed25519_dalek::Signature,
    /// The deal's head it pinned.
    pub head: StreamHead,
    /// The Merkle path from that head to the signed root.
    pub proof: Vec<ProofStep>,
}

/// What an offline check of a bundle found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BundleVerdict {
    /// The replayed timeline: chain, legality, signatures of proposal and deal.
    pub timeline: Timeline,
    /// The checkpoint's findings, if the bundle carries one.
    pub checkpoint: Option<CheckpointFindings>,
}

/// A bundled checkpoint, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointFindings {
    /// Who signed it (compare with the node you expect).
    pub signer: String,
    /// Whether the signature verifies.
    pub signature_valid: bool,
    /// Whether the head and its proof lead to the signed root.
    pub proof_valid: bool,
    /// Whether the bundle's event at the pinned version has the pinned CID.
    pub head_matches: bool,
    /// The version the checkpoint pins.
    pub pinned_version: u32,
}

impl BundleVerdict {
    /// Whether everything in the bundle holds.
    pub fn holds(&self) -> bool {
        self.timeline.verdict.holds()
            && self
                .checkpoint
                .as_ref()
                .is_none_or(|c| c.signature_valid && c.proof_valid && c.head_matches)
    }
}

/// Collects a deal's bundle from the journal.
pub async fn export(journal: &Journal, stream_id: Uuid) -> Result<DealBundle, AuditError> {
    let events = journal.read_stream(stream_id, 1).await?;
    if events.is_empty() {
        return Err(AuditError::NotFound(stream_id.to_string()));
    }
    let checkpoint = match checkpoint::load(journal, None).await? {
        Some((signed, heads)) => heads.iter().position(|h| h.stream_id == stream_id).map(|index| {
            let (_, proof) = checkpoint::merkle(&heads, Some(index));
            let SignedCheckpoint { statement, signer, signature, .. } = signed;
            BundledCheckpoint { statement, signer, signature, head: heads[index].clone(), proof }
        }),
        None => None,
    };
    Ok(DealBundle { events: events.into_iter().map(BundledEvent::from).collect(), checkpoint })
}

/// Why a bundle file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Not a bundle (wrong magic bytes).
    #[error("not a dealledger bundle")]
    NotABundle,
    /// Bytes follow the bundle: it was altered or truncated.
    #[error("{0} unexpected bytes after the bundle")]
    TrailingBytes(usize),
    /// The bytes after the magic do not decode.
    #[error("malformed bundle: {0}")]
    Malformed(#[from] postcard::Error),
}

impl DealBundle {
    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, BundleError> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend(postcard::to_stdvec(self)?);
        Ok(bytes)
    }

    /// Reads a bundle file's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BundleError> {
        let body = bytes.strip_prefix(MAGIC.as_slice()).ok_or(BundleError::NotABundle)?;
        let (bundle, rest) = postcard::take_from_bytes(body)?;
        if !rest.is_empty() {
            return Err(BundleError::TrailingBytes(rest.len()));
        }
        Ok(bundle)
    }

    /// Checks the bundle offline.
    pub fn verify(&self) -> Result<BundleVerdict, AuditError> {
        let events: Vec<RecordedEvent> = self.events.iter().map(RecordedEvent::from).collect();
        let timeline = audit_offline(&events)?;
        let checkpoint = self.checkpoint.as_ref().map(|b| {
            let root = root_from_proof(&b.head, &b.proof);
            let pinned = self.events.iter().find(|e| e.version == b.head.version);
            let signed = SignedCheckpoint {
                id: 0,
                statement: b.statement.clone(),
                signer: b.signer,
                signature: b.signature,
            };
            CheckpointFindings {
                signer: b.signer.to_string(),
                signature_valid: signed.signature_valid(),
                proof_valid: root_cid(&root).to_bytes() == b.statement.root_cid
                    && b.head.stream_id == timeline.stream_id,
                head_matches: pinned.is_some_and(|e| e.cid.to_bytes() == b.head.cid),
                pinned_version: b.head.version,
            }
        });
        Ok(BundleVerdict { timeline, checkpoint })
    }
}
