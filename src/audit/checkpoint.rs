//! Signed journal checkpoints: a Merkle root over every stream's head, signed by the node key.
//!
//! Leaves are the stream heads sorted by stream id, `sha256(0 ‖ stream_id ‖ version ‖ cid)`;
//! a node is `sha256(1 ‖ left ‖ right)`, and an odd node is carried up unchanged. The root is
//! written as a CID (raw, sha2-256 multihash over the 32 bytes).

use chrono::{DateTime, Utc};
use cid::Cid;
use ed25519_dalek::{Signature, SigningKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::AuditError;
use crate::domain::{PartyKey, sign, verify};
use crate::events::Journal;
use crate::events::chain::{RAW_CODEC, SHA2_256};

/// Domain separation for checkpoint signatures.
const CHECKPOINT_CONTEXT: &str = "dealledger/journal-checkpoint/1";

/// One stream's head: its last version and that event's CID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHead {
    /// The stream.
    pub stream_id: Uuid,
    /// Its last version at the checkpoint.
    pub version: u32,
    /// The CID of that event.
    pub cid: Vec<u8>,
}

/// What the node signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointStatement {
    /// The Merkle root of the heads, as CID bytes.
    pub root_cid: Vec<u8>,
    /// Streams covered.
    pub streams: u64,
    /// Events covered (sum of head versions).
    pub events: u64,
    /// When it was made, in microseconds since the Unix epoch.
    pub created_at_micros: i64,
}

/// A signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCheckpoint {
    /// Its id in `journal_checkpoints`.
    pub id: i64,
    /// What was signed.
    pub statement: CheckpointStatement,
    /// The node key that signed it.
    pub signer: PartyKey,
    /// The signature.
    pub signature: Signature,
}

impl SignedCheckpoint {
    /// Whether the signature verifies.
    pub fn signature_valid(&self) -> bool {
        verify(CHECKPOINT_CONTEXT, &self.statement, &self.signer, &self.signature)
    }

    /// The root as a CID.
    pub fn root(&self) -> Option<Cid> {
        Cid::try_from(self.statement.root_cid.as_slice()).ok()
    }
}

fn leaf(head: &StreamHead) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update([0u8]);
    hash.update(head.stream_id.as_bytes());
    hash.update(head.version.to_be_bytes());
    hash.update(&head.cid);
    hash.finalize().into()
}

fn node(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update([1u8]);
    hash.update(left);
    hash.update(right);
    hash.finalize().into()
}

/// One step of a Merkle proof: the sibling hash and whether it sits on the left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofStep {
    /// Whether the sibling is the left operand.
    pub sibling_on_left: bool,
    /// The sibling's hash.
    pub sibling: [u8; 32],
}

/// The Merkle root of `heads` (sorted by stream id), and the proof for the head at `prove`.
pub fn merkle(heads: &[StreamHead], prove: Option<usize>) -> ([u8; 32], Vec<ProofStep>) {
    let mut level: Vec<[u8; 32]> = heads.iter().map(leaf).collect();
    if level.is_empty() {
        return (Sha256::digest([]).into(), Vec::new());
    }
    let mut index = prove.unwrap_or(usize::MAX);
    let mut proof = Vec::new();
    while level.len() > 1 {
        let mut next = Vec::with_capacity(level.len().div_ceil(2));
        for (i, pair) in level.chunks(2).enumerate() {
            match pair {
                [left, right] => {
                    if index / 2 == i && index != usize::MAX {
                        let sibling_on_left = index % 2 == 1;
                        let sibling = if sibling_on_left { *left } else { *right };
                        proof.push(ProofStep { sibling_on_left, sibling });
                    }
                    next.push(node(left, right));
                }
                [single] => next.push(*single),
                _ => unreachable!("chunks(2) yields one or two"),
            }
        }
        if index != usize::MAX {
            index /= 2;
        }
        level = next;
    }
    (level[0], proof)
}

/// Recomputes a root from one head and its proof.
pub fn root_from_proof(head: &StreamHead, proof: &[ProofStep]) -> [u8; 32] {
    proof.iter().fold(leaf(head), |hash, step| {
        if step.sibling_on_left { node(&step.sibling, &hash) } else { node(&hash, &step.sibling) }
    })
}

/// The CID of a Merkle root.
pub fn root_cid(root: &[u8; 32]) -> Cid {
    let hash = multihash::Multihash::<64>::wrap(SHA2_256, root).expect("32 bytes fit");
    Cid::new_v1(RAW_CODEC, hash)
}

/// Every stream's committed head, sorted by stream id, read in one statement.
async fn current_heads(journal: &Journal) -> Result<Vec<StreamHead>, AuditError> {
    let rows: Vec<(Uuid, i32, Vec<u8>)> = sqlx::query_as(
        "SELECT DISTINCT ON (stream_id) stream_id, version, cid FROM journal_events \
         ORDER BY stream_id, version DESC",
    )
    .fetch_all(journal.pool())
    .await?;
    Ok(rows
        .into_iter()
        .map(|(stream_id, version, cid)| StreamHead { stream_id, version: version as u32, cid })
        .collect())
}

/// Signs the current head of every stream and stores the checkpoint.
pub async fn create(
    journal: &Journal,
    key: &SigningKey,
    now: DateTime<Utc>,
) -> Result<SignedCheckpoint, AuditError> {
    let heads = current_heads(journal).await?;
    let (root, _) = merkle(&heads, None);
    let statement = CheckpointStatement {
        root_cid: root_cid(&root).to_bytes(),
        streams: heads.len() as u64,
        events: heads.iter().map(|h| u64::from(h.version)).sum(),
        created_at_micros: now.timestamp_micros(),
    };
    let signature = sign(CHECKPOINT_CONTEXT, &statement, key);
    let signer = PartyKey::of(key);
    let mut tx = journal.pool().begin().await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO journal_checkpoints (created_at, streams, events, root_cid, signer, signature) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(DateTime::from_timestamp_micros(statement.created_at_micros).unwrap_or(now))
    .bind(statement.streams as i64)
    .bind(statement.events as i64)
    .bind(&statement.root_cid)
    .bind(signer.0.as_slice())
    .bind(signature.to_bytes().as_slice())
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO journal_checkpoint_heads (checkpoint_id, stream_id, version, cid) \
         SELECT $1, h.stream_id, h.version, h.cid FROM UNNEST($2::uuid[], $3::int[], $4::bytea[]) \
         AS h(stream_id, version, cid)",
    )
    .bind(id)
    .bind(heads.iter().map(|h| h.stream_id).collect::<Vec<_>>())
    .bind(heads.iter().map(|h| h.version as i32).collect::<Vec<_>>())
    .bind(heads.iter().map(|h| h.cid.clone()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(SignedCheckpoint { id, statement, signer, signature })
}

/// The latest checkpoint (or checkpoint `id`) with its heads.
pub async fn load(
    journal: &Journal,
    id: Option<i64>,
) -> Result<Option<(SignedCheckpoint, Vec<StreamHead>)>, AuditError> {
    type Row = (i64, DateTime<Utc>, i64, i64, Vec<u8>, Vec<u8>, Vec<u8>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT id, created_at, streams, events, root_cid, signer, signature FROM journal_checkpoints \
         WHERE $1::bigint IS NULL OR id = $1 ORDER BY id DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(journal.pool())
    .await?;
    let Some((id, created_at, streams, events, root_cid, signer, signature)) = row else {
        return Ok(None);
    };
    let malformed =
        || AuditError::NotFound(format!("checkpoint {id} (malformed signer or signature)"));
    let checkpoint = SignedCheckpoint {
        id,
        statement: CheckpointStatement {
            root_cid,
            streams: streams as u64,
            events: events as u64,
            created_at_micros: created_at.timestamp_micros(),
        },
        signer: PartyKey(signer.try_into().map_err(|_| malformed())?),
        signature: Signature::from_slice(&signature).map_err(|_| malformed())?,
    };
    let heads: Vec<(Uuid, i32, Vec<u8>)> = sqlx::query_as(
        "SELECT stream_id, version, cid FROM journal_checkpoint_heads WHERE checkpoint_id = $1 ORDER BY stream_id",
    )
    .bind(id)
    .fetch_all(journal.pool())
    .await?;
    let heads = heads
        .into_iter()
        .map(|(stream_id, version, cid)| StreamHead { stream_id, version: version as u32, cid })
        .collect();
    Ok(Some((checkpoint, heads)))
}

/// What checking the journal against a checkpoint found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointVerification {
    /// The checkpoint.
    pub id: i64,
    /// The signer's peer id.
    pub signer: String,
    /// Whether the node's signature verifies.
    pub signature_valid: bool,
    /// Whether the stored heads hash to the signed root.
    pub root_matches: bool,
    /// Heads whose event is missing or has another CID now: history before the checkpoint was
    /// changed there.
    pub changed: Vec<(Uuid, u32)>,
}

impl CheckpointVerification {
    /// Whether the journal still holds exactly what the checkpoint pinned.
    pub fn holds(&self) -> bool {
        self.signature_valid && self.root_matches && self.changed.is_empty()
    }
}

/// Checks the journal against checkpoint `id` (the latest when `None`). Together with
/// `verify` (every chain intact) this proves that nothing before the checkpoint changed.
pub async fn verify_against(
    journal: &Journal,
    id: Option<i64>,
) -> Result<Option<CheckpointVerification>, AuditError> {
    let Some((checkpoint, heads)) = load(journal, id).await? else { return Ok(None) };
    let (root, _) = merkle(&heads, None);
    let changed: Vec<(Uuid, i32)> = sqlx::query_as(
        "SELECT h.stream_id, h.version FROM journal_checkpoint_heads h \
         LEFT JOIN journal_events e ON e.stream_id = h.stream_id AND e.version = h.version \
         WHERE h.checkpoint_id = $1 AND e.cid IS DISTINCT FROM h.cid ORDER BY 1",
    )
    .bind(checkpoint.id)
    .fetch_all(journal.pool())
    .await?;
    Ok(Some(CheckpointVerification {
        id: checkpoint.id,
        signer: checkpoint.signer.to_string(),
        signature_valid: checkpoint.signature_valid(),
        root_matches: root_cid(&root).to_bytes() == checkpoint.statement.root_cid,
        changed: changed.into_iter().map(|(s, v)| (s, v as u32)).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads(n: usize) -> Vec<StreamHead> {
        (0..n)
            .map(|i| StreamHead {
                stream_id: Uuid::from_u128(i as u128),
                version: i as u32 + 1,
                cid: vec![i as u8; 36],
            })
            .collect()
    }

    #[test]
    fn every_head_proves_its_way_to_the_root() {
        for n in [1, 2, 3, 5, 8, 13] {
            let heads = heads(n);
            let (root, _) = merkle(&heads, None);
            for (i, head) in heads.iter().enumerate() {
                let (again, proof) = merkle(&heads, Some(i));
                assert_eq!(again, root);
                assert_eq!(root_from_proof(head, &proof), root, "n={n} i={i}");
                let mut forged = head.clone();
                forged.version += 1;
                assert_ne!(root_from_proof(&forged, &proof), root);
            }
        }
    }
}
