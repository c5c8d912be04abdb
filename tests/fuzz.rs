//! The fuzz targets of `dealledger::fuzzing`, driven on stable Rust for a bounded number of
//! rounds: each round mutates a valid input (bit flips, interesting bytes, truncation,
//! duplicated, deleted or inserted runs, splices of two seeds), seeded so a failure is
//! reproducible. A panic fails with the target and the input in hex; so does any single
//! allocation above `MAX_ALLOCATION` while a target runs. `FUZZ_ROUNDS` (default 20,000 per
//! target) runs longer by hand; `fuzz/` runs the same targets under libFuzzer, and
//! `FUZZ_CORPUS=fuzz/corpus` makes this test write its seeds there as libFuzzer's corpus.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use dealledger::adapters::network::codec::encode;
use dealledger::adapters::network::message::{
    CancelledDeal, MarketRequest, MarketResponse, SignedStatusQuery,
};
use dealledger::audit::{bundle, checkpoint};
use dealledger::db::testing::fresh_database;
use dealledger::deals::Deals;
use dealledger::deals::script::{Parties, Script, storage_deal_commands};
use dealledger::domain::storage::{ClientDealProposal, StorageDeal};
use dealledger::events::{EventCodec, Journal};
use dealledger::fsm::DecideContext;
use dealledger::fsm::fixtures::{NOW, client_key, proposal, provider_key};

mod common;
use common::Xorshift;

/// The largest single allocation a target may make for an input of a few KiB.
const MAX_ALLOCATION: usize = 16 << 20;

/// The system allocator, remembering the largest single request.
struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// One to four mutations of a seed, sometimes spliced with another.
fn mutate(rng: &mut Xorshift, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut data = seeds[rng.below(seeds.len())].clone();
    for _ in 0..=rng.below(4) {
        let at = rng.below(data.len() + 1);
        match rng.below(7) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = [0x00, 0xff, 0x7f, 0x80, 0x01, rng.next() as u8][rng.below(6)];
            }
            2 => data.truncate(at),
            3 => {
                let end = (at + rng.below(32)).min(data.len());
                let run = data[at..end].to_vec();
                data.splice(at..at, run);
            }
            4 => {
                let end = (at + rng.below(32)).min(data.len());
                data.drain(at..end);
            }
            5 => {
                let run: Vec<u8> = (0..=rng.below(16)).map(|_| rng.next() as u8).collect();
                data.splice(at..at, run);
            }
            _ => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len());
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
        }
    }
    data
}

/// Runs `target` on every seed, then on `rounds` mutations of them.
fn fuzz(name: &str, target: fn(&[u8]), seeds: &[Vec<u8>], rounds: usize, seed: u64) {
    if let Ok(corpus) = std::env::var("FUZZ_CORPUS") {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(corpus).join(name);
        std::fs::create_dir_all(&dir).expect("corpus directory");
        for (i, input) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), input).expect("corpus file");
        }
    }
    let mut rng = Xorshift(seed);
    let inputs = seeds.iter().cloned().chain((0..rounds).map(|_| mutate(&mut rng, seeds)));
    for input in inputs {
        LARGEST.store(0, Ordering::Relaxed);
        let outcome = std::panic::catch_unwind(|| target(&input));
        let largest = LARGEST.load(Ordering::Relaxed);
        assert!(outcome.is_ok(), "{name} panicked on input {}", hex::encode(&input));
        assert!(
            largest <= MAX_ALLOCATION,
            "{name} allocated {largest} bytes at once for {} input bytes: {}",
            input.len(),
            hex::encode(&input)
        );
    }
}

fn rounds() -> usize {
    std::env::var("FUZZ_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20_000)
}

fn body(framed: Vec<u8>) -> Vec<u8> {
    framed[4..].to_vec()
}

fn signed() -> ClientDealProposal {
    ClientDealProposal::sign(proposal(), &client_key())
}

fn wire_seeds() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let cid = signed().cid();
    let deal_stream = uuid::Uuid::from_u128(7);
    let requests = [
        MarketRequest::Ask,
        MarketRequest::Propose(Box::new(signed())),
        MarketRequest::Status(Box::new(SignedStatusQuery::sign(cid, &client_key()))),
        MarketRequest::TransferOpen { proposal_cid: cid, total_bytes: 2048 },
        MarketRequest::TransferChunk { proposal_cid: cid, offset: 64, bytes: vec![7; 64] },
        MarketRequest::TransferFinish { proposal_cid: cid },
        MarketRequest::RetrievalQuery { piece_cid: proposal().piece_cid },
        MarketRequest::RetrievalPull { deal_stream, offset: 1024 },
        MarketRequest::Cancel {
            deal: CancelledDeal::Storage { proposal_cid: cid },
            reason: "changed my mind".into(),
        },
    ];
    let responses = [
        MarketResponse::Accepted(Box::new(StorageDeal::sign(signed(), &provider_key()))),
        MarketResponse::Rejected { reason: "price".into() },
        MarketResponse::Status {
            state: "Sealing".into(),
            code: 12,
            deal_id: Some(42),
            message: None,
            publish_message: Some(cid),
        },
        MarketResponse::TransferAccepted { resume_from: 512 },
        MarketResponse::ChunkAcknowledged { received: 1024 },
        MarketResponse::TransferVerified { verified: false, reason: Some("commP".into()) },
        MarketResponse::RetrievalAccepted { deal_stream },
        MarketResponse::RetrievalDealNotFound,
        MarketResponse::RetrievalBlocks {
            offset: 0,
            bytes: vec![3; 48],
            payment_due: None,
            complete: false,
        },
    ];
    let max = u32::MAX;
    (
        requests.iter().map(|r| body(encode(r, max).expect("encodes"))).collect(),
        responses.iter().map(|r| body(encode(r, max).expect("encodes"))).collect(),
    )
}

fn event_seeds() -> Vec<Vec<u8>> {
    let (client, provider) = storage_deal_commands(signed(), &provider_key());
    let client = client.iter().map(|e| EventCodec::encode(e).expect("encodes").payload);
    let provider = provider.iter().map(|e| EventCodec::encode(e).expect("encodes").payload);
    client.chain(provider).collect()
}

/// A provider deal played to its end, with a signed checkpoint pinning it, exported.
async fn bundle_seed() -> Vec<u8> {
    let (pool, _) = fresh_database(4).await.expect("database");
    let deals = Deals::new(Journal::new(pool));
    let ctx = DecideContext { epoch: dealledger::domain::ChainEpoch(NOW), ..Default::default() };
    let parties = Parties { client: &client_key(), provider: &provider_key() };
    let mut script = Script::new(&deals, ctx, false);
    let (_, provider) = script.storage_deal_to_active(signed(), &parties).await.expect("played");
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    checkpoint::create(deals.journal(), &key, chrono::Utc::now()).await.expect("checkpoint");
    let exported = bundle::export(deals.journal(), provider).await.expect("export");
    exported.to_bytes().expect("bytes")
}

#[tokio::test]
async fn no_decoder_panics_or_allocates_unboundedly_on_mutated_input() {
    // Given valid inputs for every decoder of outside bytes
    let (requests, responses) = wire_seeds();
    let events = event_seeds();
    let bundles = vec![bundle_seed().await];
    let rounds = rounds();
    // When each target runs on them and on seeded mutations of them
    // Then none panics, and none allocates more than MAX_ALLOCATION at once (checked in fuzz)
    use dealledger::fuzzing;
    fuzz("wire_request", fuzzing::wire_request, &requests, rounds, 0x5eed_0001);
    fuzz("wire_response", fuzzing::wire_response, &responses, rounds, 0x5eed_0002);
    fuzz("event_payload", fuzzing::event_payload, &events, rounds, 0x5eed_0003);
    // (a bundle is checked offline for every input that reads: fewer rounds buy the same time)
    fuzz("bundle", fuzzing::bundle, &bundles, rounds / 4, 0x5eed_0004);
    assert_eq!(fuzzing::TARGETS.len(), 4, "a new target needs seeds here");
}
