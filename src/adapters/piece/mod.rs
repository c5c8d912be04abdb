//! Piece data: computing piece commitments, and keeping pieces on disk.

pub mod commp;
pub mod store;
