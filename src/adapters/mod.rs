//! Adapters: the edges of the ledger (network, data transfer, chain). They translate what
//! arrives into machine inputs and carry effects out; they never decide.

pub mod chain;
pub mod http;
pub mod network;
pub mod piece;
pub mod transfer;
