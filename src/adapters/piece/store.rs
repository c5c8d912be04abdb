//! The piece store: received pieces as files under `$DEALLEDGER_HOME/pieces/`, named by their
//! piece CID, from which byte ranges are served to retrievals.

use std::io::SeekFrom;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::appender::PieceAppender;
use super::commp::CommP;
use crate::domain::{PaddedPieceSize, PieceCid};

/// Why a piece could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum PieceStoreError {
    /// The file system failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bytes do not hash to the piece CID they were stored under; nothing was kept.
    #[error("the data's commitment is {actual}, not {expected}")]
    CommitmentMismatch { expected: PieceCid, actual: PieceCid },
    /// The data does not fit the piece size.
    #[error(transparent)]
    CommP(#[from] super::commp::CommPError),
    /// No such piece here.
    #[error("piece {0} is not stored here")]
    NotFound(PieceCid),
    /// A chunk that does not continue the data received so far.
    #[error("chunk at offset {got}, but {expected} bytes are kept")]
    OutOfOrder { expected: u64, got: u64 },
}

/// Pieces on disk.
#[derive(Debug, Clone)]
pub struct PieceStore {
    dir: PathBuf,
}

impl PieceStore {
    /// A store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, piece: &PieceCid) -> PathBuf {
        self.dir.join(piece.to_string())
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PieceStoreError + '_ {
        move |source| PieceStoreError::Io { path: path.to_path_buf(), source }
    }

    /// Stores `data` as piece `expected` of `size` padded bytes, after checking its commitment
    /// while writing. On a mismatch nothing is kept and the actual commitment is reported.
    pub async fn put(
        &self,
        expected: PieceCid,
        size: PaddedPieceSize,
        mut data: impl tokio::io::AsyncRead + Unpin,
    ) -> Result<u64, PieceStoreError> {
        tokio::fs::create_dir_all(&self.dir).await.map_err(Self::io(&self.dir))?;
        let final_path = self.path(&expected);
        let partial = self.dir.join(format!("{expected}.partial"));
        let hasher = Self::write_hashing(&partial, &mut data).await?;
        let bytes = hasher.bytes();
        let actual = match hasher.finish_at(size) {
            Ok(actual) => actual,
            Err(e) => {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(e.into());
            }
        };
        if actual != expected {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(PieceStoreError::CommitmentMismatch { expected, actual });
        }
        tokio::fs::rename(&partial, &final_path).await.map_err(Self::io(&final_path))?;
        Ok(bytes)
    }

    /// Copies `data` into a new file at `path`, computing its piece commitment on the way.
    async fn write_hashing(
        path: &Path,
        data: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Result<CommP, PieceStoreError> {
        let mut file = tokio::fs::File::create(path).await.map_err(Self::io(path))?;
        let mut hasher = CommP::new();
        let mut buffer = vec![0u8; 1 << 16];
        loop {
            let read = data.read(&mut buffer).await.map_err(Self::io(path))?;
            if read == 0 {
                break;
            }
            hasher.update(&buffer[..read]);
            file.write_all(&buffer[..read]).await.map_err(Self::io(path))?;
        }
        file.flush().await.map_err(Self::io(path))?;
        Ok(hasher)
    }

    /// Stores data whose commitment is not known yet (a client staging what it will propose):
    /// computes it while writing and keeps the data under it. Returns the piece, its padded
    /// size and the bytes kept.
    pub async fn stage(
        &self,
        mut data: impl tokio::io::AsyncRead + Unpin,
    ) -> Result<(PieceCid, PaddedPieceSize, u64), PieceStoreError> {
        tokio::fs::create_dir_all(&self.dir).await.map_err(Self::io(&self.dir))?;
        let partial = self.dir.join(format!("staging-{}.partial", uuid::Uuid::new_v4()));
        let hasher = Self::write_hashing(&partial, &mut data).await?;
        let bytes = hasher.bytes();
        let (piece, size) = hasher.finish();
        let final_path = self.path(&piece);
        tokio::fs::rename(&partial, &final_path).await.map_err(Self::io(&final_path))?;
        Ok((piece, size, bytes))
    }

    /// The piece's file, to read from (a client pushing it).
    pub async fn open(&self, piece: &PieceCid) -> Result<tokio::fs::File, PieceStoreError> {
        let path = self.path(piece);
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(PieceStoreError::NotFound(*piece))
            }
            Err(e) => Err(Self::io(&path)(e)),
        }
    }

    /// Reads `length` bytes of the piece from `offset`.
    pub async fn read_range(
        &self,
        piece: &PieceCid,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, PieceStoreError> {
        let path = self.path(piece);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(PieceStoreError::NotFound(*piece));
            }
            Err(e) => return Err(Self::io(&path)(e)),
        };
        file.seek(SeekFrom::Start(offset)).await.map_err(Self::io(&path))?;
        let mut out = Vec::with_capacity(length as usize);
        file.take(length).read_to_end(&mut out).await.map_err(Self::io(&path))?;
        Ok(out)
    }

    /// The stored bytes of a piece, if it is here.
    pub async fn size(&self, piece: &PieceCid) -> Option<u64> {
        tokio::fs::metadata(self.path(piece)).await.ok().map(|m| m.len())
    }

    /// Whether the piece is here.
    pub async fn has(&self, piece: &PieceCid) -> bool {
        tokio::fs::try_exists(self.path(piece)).await.unwrap_or(false)
    }
}

/// A deal's data being received: appended chunk by chunk to a partial file, then checked
/// against the piece commitment and kept under the piece's CID.
impl PieceStore {
    fn partial(&self, deal: &str) -> PathBuf {
        self.dir.join(format!("{deal}.partial"))
    }

    /// Bytes of the deal's partial data kept so far, after cutting it to `keep` bytes: what
    /// was received beyond the last recorded offset is dropped and sent again.
    pub async fn resume(&self, deal: &str, keep: u64) -> Result<u64, PieceStoreError> {
        tokio::fs::create_dir_all(&self.dir).await.map_err(Self::io(&self.dir))?;
        let path = self.partial(deal);
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .await
            .map_err(Self::io(&path))?;
        let length = file.metadata().await.map_err(Self::io(&path))?.len();
        let kept = length.min(keep);
        file.set_len(kept).await.map_err(Self::io(&path))?;
        Ok(kept)
    }

    /// Opens the deal's partial data for appending, cut to `keep` bytes, with the commitment
    /// hasher already fed with what is kept (read once, on a resumed transfer).
    pub(crate) async fn open_partial(
        &self,
        deal: &str,
        keep: u64,
    ) -> Result<(PieceAppender, u64, CommP), PieceStoreError> {
        let kept = self.resume(deal, keep).await?;
        let path = self.partial(deal);
        let mut hasher = CommP::new();
        if kept > 0 {
            let mut file = tokio::fs::File::open(&path).await.map_err(Self::io(&path))?;
            let mut buffer = vec![0u8; 1 << 16];
            loop {
                let read = file.read(&mut buffer).await.map_err(Self::io(&path))?;
                if read == 0 {
                    break;
                }
                hasher.update(&buffer[..read]);
            }
        }
        let opening = path.clone();
        let opened = tokio::task::spawn_blocking(move || PieceAppender::open(&opening, kept)).await;
        let appender =
            opened.unwrap_or_else(|e| Err(std::io::Error::other(e))).map_err(Self::io(&path))?;
        Ok((appender, kept, hasher))
    }

    /// Keeps the deal's partial data as `piece` (its commitment already checked by the caller),
    /// or drops it when `keep` is false.
    pub async fn settle_partial(
        &self,
        deal: &str,
        piece: &PieceCid,
        keep: bool,
    ) -> Result<(), PieceStoreError> {
        let path = self.partial(deal);
        if keep {
            let final_path = self.path(piece);
            tokio::fs::rename(&path, &final_path).await.map_err(Self::io(&final_path))
        } else {
            tokio::fs::remove_file(&path).await.map_err(Self::io(&path))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::piece::commp::commp_of;

    #[tokio::test]
    async fn stores_a_piece_whose_commitment_matches_and_serves_ranges() {
        let dir = std::env::temp_dir().join(format!("dealledger-pieces-{}", uuid::Uuid::new_v4()));
        let store = PieceStore::new(&dir);
        let data: Vec<u8> = (0..5_000u32).map(|i| (i % 251) as u8).collect();
        let (piece, size) = commp_of(&data);
        assert_eq!(store.put(piece, size, data.as_slice()).await.unwrap(), 5_000);
        assert_eq!(store.read_range(&piece, 1_000, 10).await.unwrap(), data[1_000..1_010]);
        // Data that does not match its claimed piece is refused and not kept.
        let wrong = crate::domain::PieceCid::from_commitment([3; 32]);
        let refused = store.put(wrong, size, data.as_slice()).await;
        assert!(
            matches!(refused, Err(PieceStoreError::CommitmentMismatch { actual, .. }) if actual == piece)
        );
        assert!(!store.has(&wrong).await);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
