//! Two nodes on 127.0.0.1, each with its own database, make storage deals over real libp2p
//! sockets: ask, propose, accept or reject — and bad proposals change nothing.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use libp2p::Multiaddr;
use uuid::Uuid;

use dealledger::adapters::network::codec::MarketCodec;
use dealledger::adapters::network::message::{MarketRequest, MarketResponse, StorageAsk};
use dealledger::adapters::network::provider::{ProviderService, propose};
use dealledger::adapters::network::{self, Client};
use dealledger::db::testing::fresh_database;
use dealledger::deals::Deals;
use dealledger::domain::storage::ClientDealProposal;
use dealledger::domain::{ChainEpoch, PaddedPieceSize, PartyKey, TokenAmount};
use dealledger::events::Journal;
use dealledger::fsm::DecideContext;
use dealledger::fsm::fixtures::*;
use dealledger::fsm::storage_client::{StorageClient, StorageClientEvent};

fn ctx() -> DecideContext {
    DecideContext { epoch: ChainEpoch(NOW), ..DecideContext::default() }
}

fn ask() -> StorageAsk {
    StorageAsk {
        price_per_gib_epoch: TokenAmount(500_000_000),
        min_piece_size: PaddedPieceSize(128),
        max_piece_size: PaddedPieceSize(1 << 30),
    }
}

async fn deals() -> Deals {
    let (pool, _) = fresh_database(4).await.expect("a fresh test database");
    Deals::new(Journal::new(pool))
}

async fn events(deals: &Deals) -> i64 {
    deals.journal().count().await.unwrap()
}

/// A provider node serving the market protocols, and a client node that knows its address.
async fn two_nodes(provider_codec: MarketCodec) -> (Deals, Deals, Client) {
    let (provider_deals, client_deals) = (deals().await, deals().await);
    let (provider, provider_events, provider_loop) =
        network::new(&provider_key(), provider_codec, Duration::from_secs(10)).unwrap();
    tokio::spawn(provider_loop.run());
    let address =
        provider.listen("/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>().unwrap()).await.unwrap();
    let service = ProviderService::new(provider_deals.clone(), provider_key(), ask());
    tokio::spawn(service.serve(provider.clone(), provider_events, ctx()));
    let (client, _client_events, client_loop) =
        network::new(&client_key(), MarketCodec::default(), Duration::from_secs(10)).unwrap();
    tokio::spawn(client_loop.run());
    client.add_address(provider.peer_id(), address).await.unwrap();
    (provider_deals, client_deals, client)
}

/// A client deal with its funds reserved, ready to propose.
async fn funded_client_deal(deals: &Deals, proposal: ClientDealProposal) -> Uuid {
    let amount = proposal.proposal.client_balance_requirement().unwrap();
    let stream = deals.initiate_deal(proposal, &ctx()).await.unwrap().stream_id;
    deals
        .handle::<StorageClient>(stream, StorageClientEvent::FundsReserved { amount }, &ctx(), None)
        .await
        .unwrap();
    stream
}

#[tokio::test]
async fn a_storage_deal_is_proposed_and_accepted_over_the_network() {
    let (provider_deals, client_deals, client) = two_nodes(MarketCodec::default()).await;
    let provider = PartyKey::of(&provider_key()).peer_id().unwrap();
    // The client asks first
    let answer = client.request(provider, MarketRequest::Ask).await.unwrap();
    assert_eq!(answer, MarketResponse::Ask(ask()));
    // When it proposes a deal that meets the ask
    let stream = funded_client_deal(&client_deals, signed_proposal()).await;
    let state = propose(&client, &client_deals, stream, &ctx()).await.unwrap();
    // Then the provider accepted and signed it, and both journals say so
    assert_eq!(state, "StartDataTransfer");
    let provider_stream = Deals::storage_stream_id("storage_provider", &signed_proposal());
    let provider_status = provider_deals.get_storage_deal_status(provider_stream).await.unwrap();
    assert_eq!((provider_status.state, provider_status.code), ("WaitingForData", 18));
    let client_deal = client_deals.load::<StorageClient>(stream).await.unwrap();
    assert!(client_deal.data.signed_deal.unwrap().verify().is_ok());
    // And the status protocol reports the provider's side
    let status = client
        .request(provider, MarketRequest::Status { proposal_cid: signed_proposal().cid() })
        .await
        .unwrap();
    assert!(matches!(status, MarketResponse::Status { code: 18, .. }), "{status:?}");
}

#[tokio::test]
async fn a_proposal_below_the_ask_is_rejected_on_both_sides() {
    let (provider_deals, client_deals, client) = two_nodes(MarketCodec::default()).await;
    let mut cheap = proposal();
    cheap.storage_price_per_epoch = TokenAmount(0);
    let cheap = ClientDealProposal::sign(cheap, &client_key());
    let stream = funded_client_deal(&client_deals, cheap.clone()).await;
    let state = propose(&client, &client_deals, stream, &ctx()).await.unwrap();
    assert_eq!(state, "Failing");
    let provider_stream = Deals::storage_stream_id("storage_provider", &cheap);
    let provider_deal = provider_deals.get_storage_deal_status(provider_stream).await.unwrap();
    assert_eq!(provider_deal.state, "Rejecting");
    assert!(provider_deal.message.unwrap().contains("below the ask"));
    let client_deal = client_deals.get_storage_deal_status(stream).await.unwrap();
    assert!(client_deal.message.unwrap().contains("below the ask"));
}

#[tokio::test]
async fn a_forged_or_misdirected_proposal_is_refused_and_records_nothing() {
    let (provider_deals, _, client) = two_nodes(MarketCodec::default()).await;
    let provider = PartyKey::of(&provider_key()).peer_id().unwrap();
    let before = events(&provider_deals).await;
    // A proposal whose signature does not verify
    let mut forged = signed_proposal();
    forged.proposal.storage_price_per_epoch = TokenAmount(9_999_999);
    let answer = client.request(provider, MarketRequest::Propose(Box::new(forged))).await.unwrap();
    assert!(
        matches!(&answer, MarketResponse::Rejected { reason } if reason.contains("signature")),
        "{answer:?}"
    );
    // A valid proposal of another client, relayed by this peer
    let stranger = SigningKey::from_bytes(&[7; 32]);
    let mut theirs = proposal();
    theirs.client = PartyKey::of(&stranger);
    let relayed = ClientDealProposal::sign(theirs, &stranger);
    let answer = client.request(provider, MarketRequest::Propose(Box::new(relayed))).await.unwrap();
    assert!(
        matches!(&answer, MarketResponse::Rejected { reason } if reason.contains("sending peer")),
        "{answer:?}"
    );
    assert_eq!(events(&provider_deals).await, before);
}

#[tokio::test]
async fn an_oversized_message_is_refused_by_the_provider_without_effect() {
    let (provider_deals, _, client) = two_nodes(MarketCodec { max_message_bytes: 64 }).await;
    let provider = PartyKey::of(&provider_key()).peer_id().unwrap();
    let result =
        client.request(provider, MarketRequest::Propose(Box::new(signed_proposal()))).await;
    assert!(result.is_err(), "{result:?}");
    assert_eq!(events(&provider_deals).await, 0);
    // The node is still serving
    let answer = client.request(provider, MarketRequest::Ask).await.unwrap();
    assert!(matches!(answer, MarketResponse::Ask(_)));
}
