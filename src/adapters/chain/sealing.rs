//! The sealing pipeline the provider hands pieces to (seed step 10: "the StorageProvider tells
//! the StorageMiner to add the piece and begin sealing"). The pipeline only seals; what the
//! chain then shows (pre-committed, active) reaches the deal through the chain watcher.

use std::future::Future;

use super::{ChainError, Devnet};
use crate::domain::{DealId, PaddedPieceSize, PieceCid, SectorNumber};

/// Where a handed-off piece stands in the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealingStatus {
    /// The pipeline never received this deal.
    Unknown,
    /// Accepted into `sector`; sealing goes on.
    Sealing { sector: SectorNumber },
    /// Sealing failed for good.
    Failed { reason: String },
}

/// A sealing pipeline (a storage miner).
pub trait SealingPipeline: Send + Sync + 'static {
    /// Adds a published deal's piece to a sector. Handing off the same deal twice is a no-op.
    fn hand_off(
        &self,
        deal_id: DealId,
        piece_cid: PieceCid,
        size: PaddedPieceSize,
    ) -> impl Future<Output = Result<SectorNumber, ChainError>> + Send;

    /// Where the deal's piece stands.
    fn status(
        &self,
        deal_id: DealId,
    ) -> impl Future<Output = Result<SealingStatus, ChainError>> + Send;
}

/// The devnet's pipeline: pre-commits the sector `precommit_after` epochs after hand-off and
/// proves it `activate_after` epochs later — or fails it on command
/// ([`Devnet::fail_sealing`]) — so the whole lifecycle runs on one machine.
#[derive(Debug, Clone)]
pub struct DevnetSealer {
    devnet: Devnet,
    /// Epochs from hand-off to pre-commit.
    pub precommit_after: i64,
    /// Epochs from pre-commit to proof (activation).
    pub activate_after: i64,
}

impl DevnetSealer {
    /// A pipeline sealing on `devnet` with the given delays in epochs.
    pub fn new(devnet: Devnet, precommit_after: i64, activate_after: i64) -> Self {
        Self { devnet, precommit_after, activate_after }
    }
}

impl SealingPipeline for DevnetSealer {
    async fn hand_off(
        &self,
        deal_id: DealId,
        _piece_cid: PieceCid,
        _size: PaddedPieceSize,
    ) -> Result<SectorNumber, ChainError> {
        self.devnet.schedule_sealing(deal_id, self.precommit_after, self.activate_after).await?;
        match self.status(deal_id).await? {
            SealingStatus::Sealing { sector } => Ok(sector),
            SealingStatus::Failed { reason } => Err(ChainError::Refused { reason }),
            SealingStatus::Unknown => {
                Err(ChainError::NotFound { what: format!("sealing of deal {}", deal_id.0) })
            }
        }
    }

    async fn status(&self, deal_id: DealId) -> Result<SealingStatus, ChainError> {
        Ok(match self.devnet.sealing_of(deal_id).await? {
            None => SealingStatus::Unknown,
            Some((_, Some(reason))) => SealingStatus::Failed { reason },
            Some((sector, None)) => SealingStatus::Sealing { sector },
        })
    }
}
