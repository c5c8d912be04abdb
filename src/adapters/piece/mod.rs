//! Piece data: computing piece commitments, and keeping pieces on disk.

pub(crate) mod appender;
pub mod commp;
mod node_hash;
pub mod store;
