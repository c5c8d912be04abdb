//! What the integration tests share: a provider node and a client node on 127.0.0.1, each
//! with its own database, and deterministic test data.
#![allow(dead_code)]

pub mod node;

use std::time::Duration;

use libp2p::Multiaddr;

use dealledger::adapters::network::codec::MarketCodec;
use dealledger::adapters::network::message::StorageAsk;
use dealledger::adapters::network::provider::ProviderService;
use dealledger::adapters::network::{self, Client};
use dealledger::adapters::piece::commp::commp_of;
use dealledger::adapters::piece::store::PieceStore;
use dealledger::adapters::transfer::{ProviderTransfers, TransferOptions};
use dealledger::db::testing::fresh_database;
use dealledger::deals::Deals;
use dealledger::domain::storage::ClientDealProposal;
use dealledger::domain::{ChainEpoch, PaddedPieceSize, TokenAmount};
use dealledger::events::Journal;
use dealledger::fsm::DecideContext;
use dealledger::fsm::fixtures::*;

pub fn ctx() -> DecideContext {
    DecideContext { epoch: ChainEpoch(NOW), ..DecideContext::default() }
}

pub fn ask() -> StorageAsk {
    StorageAsk {
        price_per_gib_epoch: TokenAmount(500_000_000),
        min_piece_size: PaddedPieceSize(128),
        max_piece_size: PaddedPieceSize(1 << 30),
    }
}

pub async fn deals() -> Deals {
    let (pool, _) = fresh_database(4).await.expect("a fresh test database");
    Deals::new(Journal::new(pool))
}

/// A provider node serving the market protocols, and a client node that knows its address.
pub async fn two_nodes(provider_codec: MarketCodec) -> (Deals, Deals, Client) {
    let nodes = nodes(provider_codec).await;
    (nodes.provider_deals, nodes.client_deals, nodes.client)
}

pub struct Nodes {
    pub provider_deals: Deals,
    pub client_deals: Deals,
    pub client: Client,
    pub client_loop: tokio::task::JoinHandle<()>,
    pub provider_address: Multiaddr,
    pub provider_peer: libp2p::PeerId,
    pub pieces: PieceStore,
}

pub async fn nodes(provider_codec: MarketCodec) -> Nodes {
    nodes_checking(provider_codec, None).await
}

/// [`nodes`] whose provider checks retrieval payments against `channels` (a chain).
pub async fn nodes_checking(
    provider_codec: MarketCodec,
    channels: Option<std::sync::Arc<dyn dealledger::adapters::chain::PaymentChannels>>,
) -> Nodes {
    let (provider_deals, client_deals) = (deals().await, deals().await);
    let (provider, provider_events, provider_loop) =
        network::new(&provider_key(), provider_codec, Duration::from_secs(10)).unwrap();
    tokio::spawn(provider_loop.run());
    let address =
        provider.listen("/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>().unwrap()).await.unwrap();
    let pieces = PieceStore::new(
        dealledger::db::testing::scratch_dir("pieces").expect("a scratch directory"),
    );
    let transfers =
        ProviderTransfers::new(provider_deals.clone(), pieces.clone(), TransferOptions::default());
    let mut service =
        ProviderService::new(provider_deals.clone(), provider_key(), ask(), transfers);
    if let Some(channels) = channels {
        service = service.with_payment_channels(channels);
    }
    tokio::spawn(service.serve(provider.clone(), provider_events, ctx()));
    let (client, client_loop) = client_node(provider.peer_id(), address.clone()).await;
    Nodes {
        provider_deals,
        client_deals,
        client,
        client_loop,
        provider_address: address,
        provider_peer: provider.peer_id(),
        pieces,
    }
}

/// A client node (the fixtures' client key) that knows where the provider is.
pub async fn client_node(
    provider: libp2p::PeerId,
    address: Multiaddr,
) -> (Client, tokio::task::JoinHandle<()>) {
    let (client, _client_events, client_loop) =
        network::new(&client_key(), MarketCodec::default(), Duration::from_secs(10)).unwrap();
    let handle = tokio::spawn(client_loop.run());
    client.add_address(provider, address).await.unwrap();
    (client, handle)
}

/// xorshift64: the tests' reproducible randomness (data, kill moments, mutations). The state
/// must not start at zero.
pub struct Xorshift(pub u64);

impl Xorshift {
    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next() % n as u64) as usize }
    }
}

/// Deterministic pseudo-random bytes.
pub fn data(len: usize, seed: u8) -> Vec<u8> {
    let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15u64 ^ u64::from(seed));
    (0..len).map(|_| rng.next() as u8).collect()
}

/// A signed proposal for `bytes`, priced to meet the ask.
pub fn proposal_for(bytes: &[u8]) -> ClientDealProposal {
    let (piece_cid, piece_size) = commp_of(bytes);
    let mut terms = proposal();
    terms.piece_cid = piece_cid;
    terms.piece_size = piece_size;
    terms.storage_price_per_epoch = TokenAmount(100_000_000);
    ClientDealProposal::sign(terms, &client_key())
}
