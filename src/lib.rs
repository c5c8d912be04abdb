#![doc = include_str!("../docs/model.md")]
//!
//! # Layout
//! - [`fsm`]: the deal state machines, pure and synchronous.
//! - [`events`]: event envelopes, the codec, the hash chain and the PostgreSQL journal.
//! - [`projections`]: SQL status tables folded from the journal.
//! - [`adapters`]: the edges: network, data transfer, chain.
//! - [`domain`]: deal documents, parties, amounts and piece CIDs shared by the machines.
//! - [`audit`]: replay a deal's history, verify the journal's chains.
//! - [`deals`]: the `Deals` service: the seed's verbs, and `handle` for adapters.
//! - [`api`]: the node's HTTP JSON API (axum).
//! - [`runner`]: the effect runner: performs the outbox's effects, feeds results back.
//! - [`config`]: a node's TOML configuration, environment overrides and validation.
//! - [`db`]: where the database comes from (a URL, or the embedded cluster).
//! - [`ledger`]: the embedding front door.

pub mod adapters;
pub mod api;
pub mod audit;
pub mod config;
pub mod db;
pub mod deals;
pub mod domain;
pub mod events;
pub mod fsm;
pub mod fuzzing;
pub mod ledger;
pub mod projections;
pub mod runner;
mod tasks;
