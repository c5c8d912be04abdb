//! Two nodes on 127.0.0.1, each with its own database, make storage deals over real libp2p
//! sockets: ask, propose, accept or reject — and bad proposals change nothing.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use uuid::Uuid;

use dealledger::adapters::network::codec::MarketCodec;
use dealledger::adapters::network::message::{MarketRequest, MarketResponse, SignedStatusQuery};
use dealledger::adapters::network::provider::propose;
use dealledger::adapters::piece::commp::commp_of;
use dealledger::adapters::transfer::channel::TransferChannel;
use dealledger::adapters::transfer::{PushError, TransferOptions, push};
use dealledger::deals::Deals;
use dealledger::domain::storage::ClientDealProposal;
use dealledger::domain::{PartyKey, TokenAmount};
use dealledger::fsm::fixtures::*;
use dealledger::fsm::storage_client::{StorageClient, StorageClientEvent};

mod common;
use common::*;

async fn events(deals: &Deals) -> i64 {
    deals.journal().count().await.unwrap()
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

/// A client deal for `bytes`, funded and proposed to (and accepted by) the provider.
async fn proposed_deal(n: &Nodes, bytes: &[u8]) -> (ClientDealProposal, Uuid) {
    let proposal = proposal_for(bytes);
    let stream = funded_client_deal(&n.client_deals, proposal.clone()).await;
    propose(&n.client, &n.client_deals, stream, &ctx()).await.unwrap();
    (proposal, stream)
}

/// Pushes all of `bytes` for the client deal `stream`; the client deal's state after.
async fn push_all(n: &Nodes, stream: Uuid, bytes: &[u8]) -> Result<&'static str, PushError> {
    let (cursor, total) = (std::io::Cursor::new(bytes), bytes.len() as u64);
    push(&n.client, &n.client_deals, stream, cursor, total, TransferOptions::default(), &ctx())
        .await
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
    // And the status protocol reports the provider's side to the deal's client only
    let ask_status = |key: &SigningKey| {
        let query = SignedStatusQuery::sign(signed_proposal().cid(), key);
        client.request(provider, MarketRequest::Status(Box::new(query)))
    };
    let status = ask_status(&client_key()).await.unwrap();
    assert!(matches!(status, MarketResponse::Status { code: 18, .. }), "{status:?}");
    let stranger = ask_status(&SigningKey::from_bytes(&[8; 32])).await.unwrap();
    assert!(matches!(stranger, MarketResponse::Rejected { .. }), "{stranger:?}");
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
async fn a_forged_or_misdirected_proposal_is_refused_logged_and_touches_no_deal() {
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
    // Both refusals are in the log, with the sending peer, the protocol and the reason.
    let logged = refused(&provider_deals).await;
    let client_peer = PartyKey::of(&client_key()).peer_id().unwrap().to_string();
    assert_eq!(logged.len(), 2, "{logged:?}");
    assert!(
        logged.iter().all(|(peer, protocol, _)| *peer == client_peer
            && protocol == "/dealledger/storage/propose/1")
    );
    assert!(logged[0].2.contains("signature") && logged[1].2.contains("sending peer"));
}

/// The provider's log of refused requests: (peer, protocol, reason), oldest first.
async fn refused(deals: &Deals) -> Vec<(String, String, String)> {
    sqlx::query_as("SELECT peer, protocol, reason FROM refused_messages ORDER BY id")
        .fetch_all(deals.journal().pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn an_oversized_message_is_refused_by_the_provider_without_effect() {
    let (provider_deals, _, client) = two_nodes(MarketCodec::with_max_message_bytes(64)).await;
    let provider = PartyKey::of(&provider_key()).peer_id().unwrap();
    let result =
        client.request(provider, MarketRequest::Propose(Box::new(signed_proposal()))).await;
    assert!(result.is_err(), "{result:?}");
    assert_eq!(events(&provider_deals).await, 0);
    // The unreadable request is in the log (written as the provider's swarm reports it).
    let mut logged = refused(&provider_deals).await;
    for _ in 0..100 {
        if !logged.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        logged = refused(&provider_deals).await;
    }
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0].1, "/dealledger/storage/propose/1");
    // The node is still serving
    let answer = client.request(provider, MarketRequest::Ask).await.unwrap();
    assert!(matches!(answer, MarketResponse::Ask(_)));
}

/// Random-looking bytes, reproducible.
const EIGHT_MIB: usize = 8 << 20;

#[tokio::test]
async fn eight_mib_are_pushed_verified_and_kept_until_the_chain_is_needed() {
    let n = nodes(MarketCodec::default()).await;
    let bytes = data(EIGHT_MIB, 1);
    let proposal = proposal_for(&bytes);
    let stream = funded_client_deal(&n.client_deals, proposal.clone()).await;
    assert_eq!(
        propose(&n.client, &n.client_deals, stream, &ctx()).await.unwrap(),
        "StartDataTransfer"
    );
    let state = push(
        &n.client,
        &n.client_deals,
        stream,
        std::io::Cursor::new(&bytes),
        bytes.len() as u64,
        TransferOptions::default(),
        &ctx(),
    )
    .await
    .unwrap();
    assert_eq!(state, "CheckForAcceptance");
    let provider_stream = Deals::storage_stream_id("storage_provider", &proposal);
    let provider = n.provider_deals.get_storage_deal_status(provider_stream).await.unwrap();
    assert_eq!(
        (provider.state, provider.bytes_transferred),
        ("ReserveProviderFunds", EIGHT_MIB as u64)
    );
    let piece = proposal.proposal.piece_cid;
    assert_eq!(
        n.pieces.read_range(&piece, 3_000_000, 1_000).await.unwrap(),
        bytes[3_000_000..3_001_000]
    );
    // Progress was recorded every 4 MiB (the default granularity), not per 256 KiB chunk: at
    // 4 and 8 MiB.
    let progress: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'data-transfer-progressed'",
    )
    .fetch_one(n.provider_deals.journal().pool())
    .await
    .unwrap();
    assert_eq!(progress, 2, "{progress} progress events");
}

#[tokio::test]
async fn data_that_does_not_match_the_piece_commitment_fails_the_deal_on_both_sides() {
    let n = nodes(MarketCodec::default()).await;
    let promised = data(1 << 20, 2);
    let mut sent = promised.clone();
    sent[12_345] ^= 1;
    let proposal = proposal_for(&promised);
    let stream = funded_client_deal(&n.client_deals, proposal.clone()).await;
    propose(&n.client, &n.client_deals, stream, &ctx()).await.unwrap();
    let state = push(
        &n.client,
        &n.client_deals,
        stream,
        std::io::Cursor::new(&sent),
        sent.len() as u64,
        TransferOptions::default(),
        &ctx(),
    )
    .await
    .unwrap();
    assert_eq!(state, "Failing");
    let client = n.client_deals.get_storage_deal_status(stream).await.unwrap();
    assert!(client.message.unwrap().contains("commitment"));
    let provider_stream = Deals::storage_stream_id("storage_provider", &proposal);
    let provider = n.provider_deals.get_storage_deal_status(provider_stream).await.unwrap();
    assert_eq!(provider.state, "Failing");
    assert!(provider.message.unwrap().contains("commitment"));
    assert!(!n.pieces.has(&proposal.proposal.piece_cid).await);
}

#[tokio::test]
async fn a_transfer_killed_midway_resumes_from_the_recorded_offset() {
    let n = nodes(MarketCodec::default()).await;
    let bytes = data(EIGHT_MIB, 3);
    let (proposal, stream) = proposed_deal(&n, &bytes).await;
    let provider_stream = Deals::storage_stream_id("storage_provider", &proposal);
    // Given a push under way
    let (client, deals, copy) = (n.client.clone(), n.client_deals.clone(), bytes.clone());
    let pushing = tokio::spawn(async move {
        push(
            &client,
            &deals,
            stream,
            std::io::Cursor::new(&copy),
            copy.len() as u64,
            TransferOptions::default(),
            &ctx(),
        )
        .await
    });
    // When the client's connection dies after the provider recorded some progress
    loop {
        let received = n
            .provider_deals
            .get_storage_deal_status(provider_stream)
            .await
            .unwrap()
            .bytes_transferred;
        if received >= 2 << 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    n.client_loop.abort();
    let interrupted = pushing.await.unwrap();
    assert!(matches!(interrupted, Err(PushError::Interrupted(_))), "{interrupted:?}");
    let waiting = n.client_deals.get_storage_deal_status(stream).await.unwrap();
    assert_eq!(waiting.state, "ClientTransferRestart");
    // Then the provider records the lost connection too, and waits for the client's restart
    let mut provider_state = String::new();
    for _ in 0..400 {
        provider_state =
            n.provider_deals.get_storage_deal_status(provider_stream).await.unwrap().state.into();
        if provider_state == "ProviderTransferAwaitRestart" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(provider_state, "ProviderTransferAwaitRestart");
    let recorded =
        n.provider_deals.get_storage_deal_status(provider_stream).await.unwrap().bytes_transferred;
    // And a new connection resumes where the provider's journal says, and the piece verifies
    let (client, _loop) = client_node(n.provider_peer, n.provider_address.clone()).await;
    let state = push(
        &client,
        &n.client_deals,
        stream,
        std::io::Cursor::new(&bytes),
        bytes.len() as u64,
        TransferOptions::default(),
        &ctx(),
    )
    .await
    .unwrap();
    assert_eq!(state, "CheckForAcceptance");
    let provider = n.provider_deals.get_storage_deal_status(provider_stream).await.unwrap();
    assert_eq!(provider.state, "ReserveProviderFunds");
    assert!(recorded >= 2 << 20 && recorded < EIGHT_MIB as u64);
    let restarted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'data-transfer-restarted'",
    )
    .fetch_one(n.client_deals.journal().pool())
    .await
    .unwrap();
    assert_eq!(restarted, 1);
    let provider_restarts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type IN \
         ('data-transfer-interrupted', 'data-transfer-restarted')",
    )
    .fetch_one(n.provider_deals.journal().pool())
    .await
    .unwrap();
    assert_eq!(provider_restarts, 2, "the provider recorded the interruption and the restart");
    assert_eq!(
        n.pieces.read_range(&proposal.proposal.piece_cid, 0, EIGHT_MIB as u64).await.unwrap(),
        bytes
    );
}

#[tokio::test]
async fn retrieval_terms_are_quoted_then_accepted_or_refused_over_the_network() {
    use dealledger::adapters::network::provider::propose_retrieval;
    use dealledger::domain::retrieval::{ByteRange, RetrievalDealProposal};
    use dealledger::fsm::retrieval_client::{RetrievalClient, RetrievalClientEvent};
    use dealledger::fsm::retrieval_provider::RetrievalProvider;
    let n = nodes(MarketCodec::default()).await;
    let (_, piece) = stored_piece(&n, 64 * 1024, 4).await;
    let quote = n
        .client
        .request(n.provider_peer, MarketRequest::RetrievalQuery { piece_cid: piece })
        .await
        .unwrap();
    assert!(
        matches!(quote, MarketResponse::RetrievalQuote { available: true, bytes: 65_536, .. }),
        "{quote:?}"
    );
    let terms = |piece_cid, price| RetrievalDealProposal {
        payload_cid: dealledger::events::chain::cid_of_bytes(b"payload"),
        piece_cid: Some(piece_cid),
        part: ByteRange { offset: 0, length: 32_768 },
        price_per_byte: TokenAmount(price),
        payment_interval: 8_192,
        payment_interval_increase: 8_192,
        unseal_price: TokenAmount(0),
        client: PartyKey::of(&client_key()),
        provider: PartyKey::of(&provider_key()),
    };
    let unknown = dealledger::domain::PieceCid::from_commitment([5; 32]);
    for (terms, client_state, provider_state) in [
        (terms(piece, 2), "Accepted", Some("Unsealed")),
        (terms(unknown, 2), "DealNotFound", Some("DealNotFound")),
        (terms(piece, 0), "Rejected", Some("Rejected")),
    ] {
        let stream = Uuid::now_v7();
        let proposed =
            RetrievalClientEvent::DealProposed { proposal: Box::new(terms), part_of: None };
        n.client_deals.handle::<RetrievalClient>(stream, proposed, &ctx(), None).await.unwrap();
        let (state, provider_stream) =
            propose_retrieval(&n.client, &n.client_deals, stream, &ctx()).await.unwrap();
        assert_eq!(state, client_state);
        if let Some(provider_stream) = provider_stream {
            let deal = n.provider_deals.load::<RetrievalProvider>(provider_stream).await.unwrap();
            assert_eq!(Some(dealledger::fsm::Label::name(deal.state)), provider_state);
        } else {
            let states: Vec<String> = sqlx::query_scalar(
                "SELECT state FROM retrieval_deals WHERE side = 'retrieval_provider' ORDER BY first_event_at DESC LIMIT 1",
            )
            .fetch_all(n.provider_deals.journal().pool())
            .await
            .unwrap();
            assert_eq!(states.first().map(String::as_str), provider_state);
        }
    }
}

/// `len` bytes of test data (from `seed`) kept by the provider as a piece: the bytes and
/// their piece CID.
async fn stored_piece(n: &Nodes, len: usize, seed: u8) -> (Vec<u8>, dealledger::domain::PieceCid) {
    let bytes = data(len, seed);
    let (piece, size) = commp_of(&bytes);
    n.pieces.put(piece, size, bytes.as_slice()).await.unwrap();
    (bytes, piece)
}

/// A client retrieval deal for `part` of `piece`, accepted by the provider over the network,
/// with its payment channel and lane set up (the chain adapter's part, played here). Returns
/// the client's and the provider's deal streams.
async fn accepted_retrieval(
    n: &Nodes,
    piece: dealledger::domain::PieceCid,
    part: dealledger::domain::retrieval::ByteRange,
    lane: u64,
) -> (Uuid, Uuid) {
    let stream = proposed_retrieval(n, piece, part).await;
    accepted_retrieval_of(n, stream, lane).await
}

/// Sends the client retrieval deal `stream`'s terms, expects them accepted, and records a
/// payment channel with `lane`: the client deal and the provider's.
async fn accepted_retrieval_of(n: &Nodes, stream: Uuid, lane: u64) -> (Uuid, Uuid) {
    use dealledger::adapters::network::provider::propose_retrieval;
    use dealledger::domain::retrieval::ChannelAddress;
    use dealledger::fsm::retrieval_client::{RetrievalClient, RetrievalClientEvent as RC};
    let (state, provider_stream) =
        propose_retrieval(&n.client, &n.client_deals, stream, &ctx()).await.unwrap();
    assert_eq!(state, "Accepted");
    for event in [
        RC::PaymentChannelCreateInitiated,
        RC::PaymentChannelReady { channel: ChannelAddress("t2-test-channel".into()) },
        RC::LaneAllocated { lane },
    ] {
        n.client_deals.handle::<RetrievalClient>(stream, event, &ctx(), None).await.unwrap();
    }
    (stream, provider_stream.unwrap())
}

/// Terms for `part` of `piece` at 2 attoFIL a byte, proposed on a new client retrieval deal
/// (not yet sent).
async fn proposed_retrieval(
    n: &Nodes,
    piece: dealledger::domain::PieceCid,
    part: dealledger::domain::retrieval::ByteRange,
) -> Uuid {
    use dealledger::domain::retrieval::RetrievalDealProposal;
    use dealledger::fsm::retrieval_client::{RetrievalClient, RetrievalClientEvent as RC};
    let terms = RetrievalDealProposal {
        payload_cid: dealledger::events::chain::cid_of_bytes(b"payload"),
        piece_cid: Some(piece),
        part,
        price_per_byte: TokenAmount(2),
        payment_interval: 512 * 1024,
        payment_interval_increase: 256 * 1024,
        unseal_price: TokenAmount(0),
        client: PartyKey::of(&client_key()),
        provider: PartyKey::of(&provider_key()),
    };
    let stream = Uuid::now_v7();
    let proposed = RC::DealProposed { proposal: Box::new(terms), part_of: None };
    n.client_deals.handle::<RetrievalClient>(stream, proposed, &ctx(), None).await.unwrap();
    stream
}

#[tokio::test]
async fn a_provider_that_stopped_before_unsealing_unseals_on_the_first_pull() {
    use dealledger::adapters::network::message::provider_retrieval_stream;
    use dealledger::adapters::transfer::retrieval::pull;
    use dealledger::domain::retrieval::ByteRange;
    use dealledger::fsm::retrieval_client::RetrievalClient;
    use dealledger::fsm::retrieval_provider::{RetrievalProvider, RetrievalProviderEvent as RP};
    // Given a provider that recorded a retrieval deal as accepted and stopped before it
    // recorded the unsealing (the client never saw the answer)
    let n = nodes(MarketCodec::default()).await;
    let (original, piece) = stored_piece(&n, 1 << 20, 8).await;
    let part = ByteRange { offset: 0, length: 1 << 20 };
    let stream = proposed_retrieval(&n, piece, part).await;
    let terms = n.client_deals.load::<RetrievalClient>(stream).await.unwrap().data.proposal;
    let provider_stream = provider_retrieval_stream(&n.client.peer_id(), stream);
    let accepted = RP::DealAccepted { proposal: Box::new(terms.unwrap()) };
    n.provider_deals
        .handle::<RetrievalProvider>(provider_stream, accepted, &ctx(), None)
        .await
        .unwrap();
    let provider = n.provider_deals.load::<RetrievalProvider>(provider_stream).await.unwrap();
    assert_eq!(dealledger::fsm::Label::name(provider.state), "Unsealing");
    // When the client proposes again, gets the same acceptance, sets up payment and pulls
    let (stream, accepted_stream) = accepted_retrieval_of(&n, stream, 0).await;
    assert_eq!(accepted_stream, provider_stream);
    let (key, limit) = (client_key(), TokenAmount(u128::MAX));
    let outcome =
        pull(&n.client, &n.client_deals, stream, provider_stream, &key, limit, &ctx()).await;
    // Then the first pull unseals the piece and the whole part arrives, paid
    let outcome = outcome.unwrap();
    assert_eq!(outcome.state, "Completed");
    assert!(outcome.bytes == original, "the retrieved bytes differ from the original");
    let provider = n.provider_deals.load::<RetrievalProvider>(provider_stream).await.unwrap();
    assert_eq!(dealledger::fsm::Label::name(provider.state), "Completed");
}

#[tokio::test]
async fn a_four_mib_piece_is_retrieved_through_two_paid_deals_and_matches() {
    use dealledger::adapters::transfer::retrieval::pull;
    use dealledger::domain::retrieval::ByteRange;
    use dealledger::fsm::retrieval_provider::RetrievalProvider;
    let n = nodes(MarketCodec::default()).await;
    let (original, piece) = stored_piece(&n, 4 << 20, 5).await;
    let mut retrieved = Vec::new();
    for (index, offset) in [0u64, 2 << 20].into_iter().enumerate() {
        let part = ByteRange { offset, length: 2 << 20 };
        let (stream, provider_stream) = accepted_retrieval(&n, piece, part, index as u64).await;
        let outcome = pull(
            &n.client,
            &n.client_deals,
            stream,
            provider_stream,
            &client_key(),
            TokenAmount(u128::MAX),
            &ctx(),
        )
        .await
        .unwrap();
        assert_eq!(outcome.state, "Completed");
        assert_eq!(outcome.paid, TokenAmount(2 * (2 << 20)));
        let provider = n.provider_deals.load::<RetrievalProvider>(provider_stream).await.unwrap();
        assert_eq!(dealledger::fsm::Label::name(provider.state), "Completed");
        // 512 KiB, then +768 KiB, then the rest: two interval payments and the last one.
        assert_eq!(provider.data.payments, 3);
        retrieved.extend(outcome.bytes);
    }
    assert!(retrieved == original, "the retrieved bytes differ from the original");
}

#[tokio::test]
async fn a_client_at_its_funds_limit_stops_with_only_what_the_provider_sent() {
    use dealledger::adapters::transfer::retrieval::pull;
    use dealledger::domain::retrieval::ByteRange;
    use dealledger::fsm::retrieval_provider::RetrievalProvider;
    let n = nodes(MarketCodec::default()).await;
    let (original, piece) = stored_piece(&n, 2 << 20, 6).await;
    let (stream, provider_stream) =
        accepted_retrieval(&n, piece, ByteRange { offset: 0, length: 2 << 20 }, 0).await;
    // Enough for the first interval (512 KiB at 2 attoFIL a byte), not for the second.
    let limit = TokenAmount(2 * 512 * 1024);
    let outcome =
        pull(&n.client, &n.client_deals, stream, provider_stream, &client_key(), limit, &ctx())
            .await
            .unwrap();
    assert_eq!(outcome.state, "InsufficientFunds");
    assert_eq!(outcome.paid, limit);
    let provider = n.provider_deals.load::<RetrievalProvider>(provider_stream).await.unwrap();
    assert_eq!(dealledger::fsm::Label::name(provider.state), "FundsNeeded");
    // The client holds exactly what was sent before the provider stopped for payment: the
    // paid first interval and the unpaid second one, byte for byte.
    assert_eq!(outcome.bytes.len() as u64, provider.data.bytes_sent);
    assert_eq!(provider.data.bytes_sent, (512 + 768) * 1024);
    assert!(outcome.bytes == original[..outcome.bytes.len()]);
}

#[tokio::test]
async fn the_same_proposal_sent_again_gets_the_same_answer_and_records_nothing() {
    let (provider_deals, _, client) = two_nodes(MarketCodec::default()).await;
    let provider = PartyKey::of(&provider_key()).peer_id().unwrap();
    // Given a proposal the provider accepted
    let proposal = signed_proposal();
    let first =
        client.request(provider, MarketRequest::Propose(Box::new(proposal.clone()))).await.unwrap();
    assert!(matches!(first, MarketResponse::Accepted(_)), "{first:?}");
    let recorded = events(&provider_deals).await;
    // When a client that restarted before it saw the answer sends it again
    let again = client.request(provider, MarketRequest::Propose(Box::new(proposal))).await.unwrap();
    // Then it gets the same signed deal, and the provider records nothing more
    assert_eq!(again, first);
    assert_eq!(events(&provider_deals).await, recorded);
}

#[tokio::test]
async fn a_client_that_lost_the_verdict_pushes_again_and_gets_the_same_verdict() {
    let n = nodes(MarketCodec::default()).await;
    let bytes = data(300 * 1024, 9);
    let (proposal, stream) = proposed_deal(&n, &bytes).await;
    // Given the provider received and verified every byte
    push_all(&n, stream, &bytes).await.unwrap();
    let total = bytes.len() as u64;
    let provider_events = events(&n.provider_deals).await;
    // When the client, having lost the answer, opens and finishes the transfer again
    let proposal_cid = proposal.cid();
    let open = MarketRequest::TransferOpen { proposal_cid, total_bytes: total };
    let opened = n.client.request(n.provider_peer, open).await.unwrap();
    assert_eq!(opened, MarketResponse::TransferAccepted { resume_from: total });
    let finished = n
        .client
        .request(n.provider_peer, MarketRequest::TransferFinish { proposal_cid })
        .await
        .unwrap();
    // Then it hears the same verdict, and the provider records nothing more
    assert_eq!(finished, MarketResponse::TransferVerified { verified: true, reason: None });
    assert_eq!(events(&n.provider_deals).await, provider_events);
}

#[tokio::test]
async fn only_a_deals_client_can_cancel_it_over_the_network_and_a_refusal_is_logged() {
    use dealledger::adapters::network::{self, message::CancelledDeal};
    let nodes = nodes(MarketCodec::default()).await;
    let stream = funded_client_deal(&nodes.client_deals, signed_proposal()).await;
    propose(&nodes.client, &nodes.client_deals, stream, &ctx()).await.unwrap();
    let before = events(&nodes.provider_deals).await;
    let cancel = MarketRequest::Cancel {
        deal: CancelledDeal::Storage { proposal_cid: signed_proposal().cid() },
        reason: "mine now".into(),
    };
    // Given another peer that knows the proposal's CID
    let (stranger, _events, stranger_loop) =
        network::new(&stranger_key(), MarketCodec::default(), Duration::from_secs(10)).unwrap();
    tokio::spawn(stranger_loop.run());
    stranger.add_address(nodes.provider_peer, nodes.provider_address.clone()).await.unwrap();
    // When it cancels the deal
    let answer = stranger.request(nodes.provider_peer, cancel.clone()).await.unwrap();
    // Then it is refused, logged with its peer, and the deal is untouched
    assert!(
        matches!(&answer, MarketResponse::Rejected { reason } if reason.contains("only the deal's client")),
        "{answer:?}"
    );
    assert_eq!(events(&nodes.provider_deals).await, before);
    let logged = refused(&nodes.provider_deals).await;
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0].0, stranger.peer_id().to_string());
    assert_eq!(logged[0].1, "/dealledger/deal/cancel/1");
    // When the deal's own client cancels it, the provider's side goes to Failing
    let answer = nodes.client.request(nodes.provider_peer, cancel).await.unwrap();
    assert_eq!(answer, MarketResponse::CancelAcknowledged { state: "Failing".into() });
}

#[tokio::test]
async fn a_proposal_for_another_provider_is_refused_logged_and_touches_no_deal() {
    let (provider_deals, _, client) = two_nodes(MarketCodec::default()).await;
    let provider = PartyKey::of(&provider_key()).peer_id().unwrap();
    let before = events(&provider_deals).await;
    // Given a valid proposal of this client, made out to another provider
    let mut terms = proposal();
    terms.provider = PartyKey::of(&stranger_key());
    let elsewhere = ClientDealProposal::sign(terms, &client_key());
    // When it is sent to this provider
    let answer =
        client.request(provider, MarketRequest::Propose(Box::new(elsewhere))).await.unwrap();
    // Then it is refused and logged, and no deal was touched
    assert!(
        matches!(&answer, MarketResponse::Rejected { reason } if reason.contains("another provider")),
        "{answer:?}"
    );
    assert_eq!(events(&provider_deals).await, before);
    let logged = refused(&provider_deals).await;
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(logged[0].2.contains("another provider"));
}

#[tokio::test]
async fn a_provider_that_stopped_before_its_verdict_gives_it_when_the_client_pushes_again() {
    use dealledger::fsm::storage_provider::{StorageProvider, StorageProviderEvent as SP};
    let n = nodes(MarketCodec::default()).await;
    let bytes = data(256 * 1024, 9);
    let (proposal, stream) = proposed_deal(&n, &bytes).await;
    let provider_stream = Deals::storage_stream_id("storage_provider", &proposal);
    // Given every byte reached the provider and it recorded the transfer complete, but it
    // stopped before the commitment's verdict (the deal waits in VerifyData)
    let proposal_cid = proposal.cid();
    let total = bytes.len() as u64;
    let open = MarketRequest::TransferOpen { proposal_cid, total_bytes: total };
    let mut channel = TransferChannel::open(&n.client, n.provider_peer).await.unwrap();
    channel.request(&open).await.unwrap();
    let chunk = MarketRequest::TransferChunk { proposal_cid, offset: 0, bytes: bytes.clone() };
    let answer = channel.request(&chunk).await.unwrap();
    assert_eq!(answer, MarketResponse::ChunkAcknowledged { received: total });
    let completed = SP::DataTransferCompleted { bytes: total };
    n.provider_deals
        .handle::<StorageProvider>(provider_stream, completed, &ctx(), None)
        .await
        .unwrap();
    let waiting = n.provider_deals.get_storage_deal_status(provider_stream).await.unwrap();
    assert_eq!(waiting.state, "VerifyData");
    // When the client pushes again
    let cursor = std::io::Cursor::new(&bytes);
    let state =
        push(&n.client, &n.client_deals, stream, cursor, total, TransferOptions::default(), &ctx())
            .await
            .unwrap();
    // Then the provider verifies what it received, keeps the piece, and both sides move on
    assert_eq!(state, "CheckForAcceptance");
    let provider = n.provider_deals.get_storage_deal_status(provider_stream).await.unwrap();
    assert_eq!(provider.state, "ReserveProviderFunds");
    assert_eq!(n.pieces.read_range(&proposal.proposal.piece_cid, 0, total).await.unwrap(), bytes);
}

#[tokio::test]
async fn only_a_deals_client_can_push_its_data_and_a_refusal_is_logged() {
    use dealledger::adapters::network;
    let n = nodes(MarketCodec::default()).await;
    let bytes = data(1 << 20, 5);
    let (proposal, stream) = proposed_deal(&n, &bytes).await;
    let before = events(&n.provider_deals).await;
    // Given another peer that knows the accepted proposal's CID
    let (stranger, _events, stranger_loop) =
        network::new(&stranger_key(), MarketCodec::default(), Duration::from_secs(10)).unwrap();
    tokio::spawn(stranger_loop.run());
    stranger.add_address(n.provider_peer, n.provider_address.clone()).await.unwrap();
    // When it opens the deal's transfer and sends bytes of its own
    let proposal_cid = proposal.cid();
    let open = MarketRequest::TransferOpen { proposal_cid, total_bytes: 4 };
    let opened = stranger.request(n.provider_peer, open).await.unwrap();
    let chunk = MarketRequest::TransferChunk { proposal_cid, offset: 0, bytes: vec![1, 2, 3, 4] };
    let chunked = stranger.request(n.provider_peer, chunk).await.unwrap();
    // Then both are refused and logged with its peer, and the deal records nothing
    for answer in [&opened, &chunked] {
        assert!(
            matches!(answer, MarketResponse::Rejected { reason } if reason.contains("is not the client")),
            "{answer:?}"
        );
    }
    assert_eq!(events(&n.provider_deals).await, before);
    let logged = refused(&n.provider_deals).await;
    assert_eq!(logged.len(), 2, "{logged:?}");
    assert!(logged.iter().all(|(peer, protocol, _)| peer == &stranger.peer_id().to_string()
        && protocol == "/dealledger/transfer/1"));
    // And the deal's own client still pushes its data
    let state = push_all(&n, stream, &bytes).await.unwrap();
    assert_eq!(state, "CheckForAcceptance");
}

#[tokio::test]
async fn a_malformed_frame_on_a_transfer_stream_is_refused_logged_and_ends_only_that_stream() {
    use futures::{AsyncReadExt, AsyncWriteExt};
    let n = nodes(MarketCodec::default()).await;
    // Given a transfer stream open to the provider
    let mut stream = n.client.open_transfer_stream(n.provider_peer).await.unwrap();
    // When the client writes a frame whose body is not a message
    let mut frame = 5u32.to_be_bytes().to_vec();
    frame.extend([0xff; 5]);
    stream.write_all(&frame).await.unwrap();
    stream.flush().await.unwrap();
    // Then the provider closes the stream without an answer
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(answer.is_empty(), "{answer:?}");
    // And logs the refusal with the client's peer, recording nothing on any deal
    let logged = refused(&n.provider_deals).await;
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0].0, n.client.peer_id().to_string());
    assert_eq!(logged[0].1, "/dealledger/transfer/1");
    assert_eq!(events(&n.provider_deals).await, 0);
    // And a new stream is served as usual
    let bytes = data(1 << 20, 6);
    let (_, deal) = proposed_deal(&n, &bytes).await;
    let state = push_all(&n, deal, &bytes).await.unwrap();
    assert_eq!(state, "CheckForAcceptance");
}

#[tokio::test]
async fn a_push_stream_reset_midway_is_recorded_as_interrupted_and_the_push_resumes() {
    let n = nodes(MarketCodec::default()).await;
    let bytes = data(1 << 20, 7);
    let (proposal, stream) = proposed_deal(&n, &bytes).await;
    let provider_stream = Deals::storage_stream_id("storage_provider", &proposal);
    // Given a push opened on a stream, with a first chunk acknowledged
    let proposal_cid = proposal.cid();
    let mut channel = TransferChannel::open(&n.client, n.provider_peer).await.unwrap();
    let open = MarketRequest::TransferOpen { proposal_cid, total_bytes: bytes.len() as u64 };
    assert_eq!(
        channel.request(&open).await.unwrap(),
        MarketResponse::TransferAccepted { resume_from: 0 }
    );
    let chunk =
        MarketRequest::TransferChunk { proposal_cid, offset: 0, bytes: bytes[..4096].to_vec() };
    assert_eq!(
        channel.request(&chunk).await.unwrap(),
        MarketResponse::ChunkAcknowledged { received: 4096 }
    );
    // When the client drops the stream without closing it (the connection stays up)
    drop(channel);
    // Then the provider records the push as interrupted and waits for a restart
    let mut state = String::new();
    for _ in 0..400 {
        state =
            n.provider_deals.get_storage_deal_status(provider_stream).await.unwrap().state.into();
        if state == "ProviderTransferAwaitRestart" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(state, "ProviderTransferAwaitRestart");
    // And the client's push restarts it and the piece verifies
    let state = push_all(&n, stream, &bytes).await.unwrap();
    assert_eq!(state, "CheckForAcceptance");
    let total = bytes.len() as u64;
    assert_eq!(n.pieces.read_range(&proposal.proposal.piece_cid, 0, total).await.unwrap(), bytes);
}

#[tokio::test]
async fn the_end_of_an_abandoned_stream_does_not_interrupt_the_push_reopened_on_another() {
    let n = nodes(MarketCodec::default()).await;
    let bytes = data(256 << 10, 8);
    let (proposal, _) = proposed_deal(&n, &bytes).await;
    let provider_stream = Deals::storage_stream_id("storage_provider", &proposal);
    let proposal_cid = proposal.cid();
    let open = MarketRequest::TransferOpen { proposal_cid, total_bytes: bytes.len() as u64 };
    // Given a push opened on one stream, then reopened on a second one
    let mut first = TransferChannel::open(&n.client, n.provider_peer).await.unwrap();
    first.request(&open).await.unwrap();
    let mut second = TransferChannel::open(&n.client, n.provider_peer).await.unwrap();
    assert_eq!(
        second.request(&open).await.unwrap(),
        MarketResponse::TransferAccepted { resume_from: 0 }
    );
    // When the first stream is dropped
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Then the push on the second goes on: not interrupted, chunks acknowledged
    let state = n.provider_deals.get_storage_deal_status(provider_stream).await.unwrap().state;
    assert_eq!(state, "Transferring");
    let chunk = MarketRequest::TransferChunk { proposal_cid, offset: 0, bytes: bytes.clone() };
    assert_eq!(
        second.request(&chunk).await.unwrap(),
        MarketResponse::ChunkAcknowledged { received: bytes.len() as u64 }
    );
    let finish = MarketRequest::TransferFinish { proposal_cid };
    assert_eq!(
        second.request(&finish).await.unwrap(),
        MarketResponse::TransferVerified { verified: true, reason: None }
    );
}
