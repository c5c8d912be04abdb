//! Appending received data to a partial piece file without going through the page cache.
//!
//! A piece is written once, hashed as it arrives, and read back only when a retrieval asks
//! for it: caching it as it is written only costs memory the kernel must first find and
//! zero — on a virtual machine, memory the host must hand back — for pages nobody reads
//! soon. So whole blocks are written with `O_DIRECT` from an aligned staging buffer; only
//! the last, partial block of a transfer goes through an ordinary write. Where the file
//! system refuses `O_DIRECT` (tmpfs, for one, at open; some stacked file systems only at the
//! first write), every write is an ordinary one.
//!
//! Invariant: [`PieceAppender::sync`] returns an offset every byte below which is on disk,
//! and the file never holds a byte that was not appended.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The alignment and size unit of direct writes: a multiple of every common logical block
/// size, and the page size.
const BLOCK: usize = 4096;
/// Bytes staged before a direct write.
const STAGE: usize = 1 << 20;

/// Appends to a partial piece file; see the module documentation.
pub(crate) struct PieceAppender {
    /// The same file opened with `O_DIRECT`, if the file system allows it.
    direct: Option<File>,
    /// The file opened for ordinary writes: the last partial block, and everything when
    /// there is no direct handle.
    buffered: File,
    /// The staging buffer, `STAGE` bytes from `start` aligned to `BLOCK` (the rest is slack
    /// to align it, so that no unsafe allocation is needed).
    stage: Vec<u8>,
    start: usize,
    /// Bytes staged, not yet written.
    filled: usize,
    /// Where the staged bytes go in the file: always a multiple of `BLOCK` when direct.
    offset: u64,
}

impl std::fmt::Debug for PieceAppender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PieceAppender")
            .field("direct", &self.direct.is_some())
            .field("appended", &self.appended())
            .finish()
    }
}

impl PieceAppender {
    /// Appends to the file at `path`, which holds `kept` bytes already (it must exist and be
    /// exactly that long).
    pub(crate) fn open(path: &Path, kept: u64) -> io::Result<Self> {
        let buffered = OpenOptions::new().read(true).write(true).open(path)?;
        let direct = open_direct(path);
        let (stage, start) = if direct.is_some() {
            let stage = vec![0u8; STAGE + BLOCK];
            let start = stage.as_ptr().align_offset(BLOCK);
            (stage, start)
        } else {
            (Vec::new(), 0)
        };
        let mut appender = Self { direct, buffered, stage, start, filled: 0, offset: kept };
        if appender.direct.is_some() {
            // Direct writes start on a block boundary: the kept part of the last block is
            // staged again and rewritten with what follows it.
            let partial = (kept % BLOCK as u64) as usize;
            appender.offset = kept - partial as u64;
            let (start, offset) = (appender.start, appender.offset);
            appender.buffered.read_exact_at(&mut appender.stage[start..start + partial], offset)?;
            appender.filled = partial;
        }
        Ok(appender)
    }

    /// Bytes in the file once everything appended is written.
    pub(crate) fn appended(&self) -> u64 {
        self.offset + self.filled as u64
    }

    /// Appends `bytes`.
    pub(crate) fn append(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        if self.direct.is_none() {
            self.buffered.write_all_at(bytes, self.offset)?;
            self.offset += bytes.len() as u64;
            return Ok(());
        }
        while !bytes.is_empty() {
            let take = (STAGE - self.filled).min(bytes.len());
            let at = self.start + self.filled;
            self.stage[at..at + take].copy_from_slice(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled == STAGE {
                self.write_whole_blocks()?;
            }
        }
        Ok(())
    }

    /// Writes the staged whole blocks directly and keeps the rest staged.
    fn write_whole_blocks(&mut self) -> io::Result<()> {
        let Some(direct) = &self.direct else { return Ok(()) };
        let whole = self.filled - self.filled % BLOCK;
        if whole == 0 {
            return Ok(());
        }
        match direct.write_all_at(&self.stage[self.start..self.start + whole], self.offset) {
            Ok(()) => {}
            // Some file systems (stacked ones, for one) open with O_DIRECT but refuse the
            // writes: everything staged is written the ordinary way, and so is the rest.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.direct = None;
                let staged = &self.stage[self.start..self.start + self.filled];
                self.buffered.write_all_at(staged, self.offset)?;
                self.offset += self.filled as u64;
                self.filled = 0;
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        self.stage.copy_within(self.start + whole..self.start + self.filled, self.start);
        self.offset += whole as u64;
        self.filled -= whole;
        Ok(())
    }

    /// Makes the file durable up to the offset it returns: everything appended when there
    /// is no direct handle, otherwise every whole block (the partial last block stays staged
    /// until more data or [`PieceAppender::finish`] completes it).
    pub(crate) fn sync(&mut self) -> io::Result<u64> {
        self.write_whole_blocks()?;
        match &self.direct {
            Some(direct) => direct.sync_data()?,
            None => self.buffered.sync_data()?,
        }
        Ok(self.offset)
    }

    /// Writes everything staged (the partial last block with an ordinary write), makes it
    /// durable, and returns the file's length.
    pub(crate) fn finish(mut self) -> io::Result<u64> {
        self.write_whole_blocks()?;
        if self.filled > 0 {
            let tail = &self.stage[self.start..self.start + self.filled];
            self.buffered.write_all_at(tail, self.offset)?;
            self.offset += self.filled as u64;
            self.filled = 0;
        }
        self.buffered.sync_data()?;
        Ok(self.offset)
    }
}

/// The file opened for direct writes, where the platform and file system allow it.
#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok()
}

/// The file opened for direct writes: only Linux's `O_DIRECT` is used.
#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> Option<File> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::current_dir().unwrap().join("target").join("appender-tests");
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(format!("{name}-{}", uuid::Uuid::new_v4()))
    }

    fn data(length: usize) -> Vec<u8> {
        (0..length).map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8).collect()
    }

    #[test]
    fn appended_chunks_of_any_size_land_in_the_file_in_order() {
        // Given an empty partial file (under target/, a disk file system that takes O_DIRECT
        // where the machine allows it), when chunks of odd sizes are appended, synced midway
        // and finished, then the file holds exactly the bytes appended.
        let path = scratch("order");
        std::fs::write(&path, b"").unwrap();
        let expected = data(3 * STAGE + 12_345);
        let mut appender = PieceAppender::open(&path, 0).unwrap();
        let mut durable = 0;
        for (i, chunk) in expected.chunks(77_777).enumerate() {
            appender.append(chunk).unwrap();
            if i % 5 == 4 {
                let synced = appender.sync().unwrap();
                assert!(synced >= durable && synced <= appender.appended());
                durable = synced;
            }
        }
        assert_eq!(appender.finish().unwrap(), expected.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_synced_offset_is_on_disk_and_resuming_there_rewrites_nothing_before_it() {
        // Given a transfer synced midway and then abandoned, when the file is cut to the
        // synced offset (as a resumed transfer does) and appending resumes from there at an
        // offset that is not a whole block, then the file equals the data appended in one go.
        let path = scratch("resume");
        std::fs::write(&path, b"").unwrap();
        let expected = data(2 * STAGE + 5_000);
        let mut first = PieceAppender::open(&path, 0).unwrap();
        first.append(&expected[..STAGE + 9_999]).unwrap();
        let synced = first.sync().unwrap();
        assert!(synced > 0);
        assert_eq!(std::fs::read(&path).unwrap()[..synced as usize], expected[..synced as usize]);
        drop(first);
        // Resume from an offset inside a block, as after a recorded progress of older data.
        let kept = synced - 100;
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(kept).unwrap();
        let mut resumed = PieceAppender::open(&path, kept).unwrap();
        assert_eq!(resumed.appended(), kept);
        resumed.append(&expected[kept as usize..]).unwrap();
        assert_eq!(resumed.finish().unwrap(), expected.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        std::fs::remove_file(path).unwrap();
    }
}
