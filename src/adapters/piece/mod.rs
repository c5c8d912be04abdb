//! Piece data: computing piece commitments, and keeping pieces on disk.

pub mod commp;
mod node_hash;
pub mod store;
