//! Crash recovery: a node process (both sides of a market, as in the demo, on one database,
//! with the devnet in another) is killed with SIGKILL at seeded random moments while it drives
//! a storage deal and then a paid retrieval, and restarted each time. After the last restart
//! every deal completes, nothing was done twice with visible effect (one deposit per party,
//! one publish, vouchers redeemed once) and every stream's hash chain verifies.
//!
//! The node is this test binary re-run as a child with `DEALLEDGER_CRASH_CHILD` set, running
//! only the `node_process` test; without that variable `node_process` does nothing.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

use dealledger::adapters::chain::{Chain, Devnet, DevnetConfig, DevnetSealer, MessageKey};
use dealledger::adapters::network::codec::MarketCodec;
use dealledger::adapters::network::provider::{ProviderService, propose, propose_retrieval};
use dealledger::adapters::network::{self};
use dealledger::adapters::piece::store::PieceStore;
use dealledger::adapters::transfer::retrieval::pull;
use dealledger::adapters::transfer::{ProviderTransfers, TransferOptions, push};
use dealledger::db::testing::{fresh_database, url_of};
use dealledger::deals::Deals;
use dealledger::domain::retrieval::{ByteRange, RetrievalDealProposal};
use dealledger::domain::{PartyKey, TokenAmount};
use dealledger::events::Journal;
use dealledger::fsm::fixtures::*;
use dealledger::fsm::retrieval_client::{RetrievalClient, RetrievalClientEvent as RC};
use dealledger::fsm::storage_client::StorageClient;
use dealledger::fsm::storage_provider::StorageProvider;
use dealledger::fsm::{DecideContext, Label, Machine};
use dealledger::runner::{EffectRunner, RunnerConfig, RunnerNetwork};

mod common;
use common::{Xorshift, ask, data, proposal_for};

const CHILD: &str = "DEALLEDGER_CRASH_CHILD";
const LEDGER_URL: &str = "DEALLEDGER_CRASH_LEDGER";
const DEVNET_URL: &str = "DEALLEDGER_CRASH_DEVNET";
const PIECES: &str = "DEALLEDGER_CRASH_PIECES";
/// At most this many runs are killed at a random moment before the last one.
const RUNS: usize = 40;
const WALLET: TokenAmount = TokenAmount(1_000_000_000_000_000_000_000);
const DATA_SEED: u8 = 21;
const DATA_LEN: usize = 256 * 1024;
/// The client's retrieval deal, known across restarts.
const RETRIEVAL: Uuid = Uuid::from_u128(0x0dea_1000_0000_4000_8000_0000_0000_0001);

/// The node: drives its deals from wherever the journal says they are, until both are done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_process() {
    if std::env::var(CHILD).is_err() {
        return;
    }
    let url = |name| std::env::var(name).expect("set by the parent");
    let connect = |u: String| async move {
        dealledger::db::pool_options().max_connections(6).connect(&u).await.unwrap()
    };
    let deals = Deals::new(Journal::new(connect(url(LEDGER_URL)).await));
    let devnet = Devnet::open(connect(url(DEVNET_URL)).await, devnet_config()).await.unwrap();
    let pieces = PieceStore::new(std::path::PathBuf::from(url(PIECES)));
    let ctx = DecideContext { epoch: devnet.head().await.unwrap(), ..DecideContext::default() };

    let (provider, provider_events, provider_loop) =
        network::new(&provider_key(), MarketCodec::default(), Duration::from_secs(5)).unwrap();
    tokio::spawn(provider_loop.run());
    let address = provider.listen("/ip4/127.0.0.1/tcp/0".parse().unwrap()).await.unwrap();
    let transfers = ProviderTransfers::new(deals.clone(), pieces, TransferOptions::default());
    let service = ProviderService::new(deals.clone(), provider_key(), ask(), transfers)
        .with_payment_channels(std::sync::Arc::new(devnet.clone()));
    tokio::spawn(service.serve(provider.clone(), provider_events, ctx.clone()));
    let (client, _events, client_loop) =
        network::new(&client_key(), MarketCodec::default(), Duration::from_secs(5)).unwrap();
    tokio::spawn(client_loop.run());
    client.add_address(provider.peer_id(), address).await.unwrap();
    let config = RunnerConfig {
        watch_poll: Duration::from_millis(20),
        lease: Duration::from_millis(100),
        ..RunnerConfig::default()
    };
    let runner = EffectRunner::new(
        deals.clone(),
        devnet.clone(),
        DevnetSealer::new(devnet.clone(), 4, 6),
        config,
    )
    .with_network(RunnerNetwork {
        client: client.clone(),
        key: client_key(),
        pieces: None,
        retrieved: None,
    });
    runner.recover().await.unwrap();

    let bytes = data(DATA_LEN, DATA_SEED);
    let proposal = proposal_for(&bytes);
    let storage = Deals::storage_stream_id(StorageClient::NAME, &proposal);
    if deals.journal().head(storage).await.unwrap().version == 0 {
        deals.initiate_deal(proposal.clone(), &ctx).await.unwrap();
    }
    let provider_storage = Deals::storage_stream_id(StorageProvider::NAME, &proposal);
    loop {
        runner.run_until_idle().await.unwrap();
        let state = deals.load::<StorageClient>(storage).await.unwrap().state.name();
        let provider_state =
            deals.load::<StorageProvider>(provider_storage).await.unwrap().state.name();
        println!("storage: client {state}, provider {provider_state}");
        match state {
            "FundsReserved" => {
                // The runner proposes; a run killed before it did leaves it to this one.
                let _ = propose(&client, &deals, storage, &ctx).await;
            }
            "StartDataTransfer" | "Transferring" | "ClientTransferRestart" => {
                let cursor = std::io::Cursor::new(&bytes);
                let options = TransferOptions::default();
                let _ =
                    push(&client, &deals, storage, cursor, bytes.len() as u64, options, &ctx).await;
            }
            "AwaitingPreCommit" | "Sealing" => {
                devnet.advance(1).await.unwrap();
                runner.recover().await.unwrap();
            }
            "Active" if provider_state == "Active" => break,
            _ => {
                runner.recover().await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    let (piece, _) = dealledger::adapters::piece::commp::commp_of(&bytes);
    if deals.journal().head(RETRIEVAL).await.unwrap().version == 0 {
        let proposed =
            RC::DealProposed { proposal: Box::new(retrieval_terms_for(piece)), part_of: None };
        deals.handle::<RetrievalClient>(RETRIEVAL, proposed, &ctx, None).await.unwrap();
    }
    loop {
        runner.run_until_idle().await.unwrap();
        let deal = deals.load::<RetrievalClient>(RETRIEVAL).await.unwrap();
        println!("retrieval: client {}", deal.state.name());
        match deal.state.name() {
            "WaitForAcceptance" => {
                propose_retrieval(&client, &deals, RETRIEVAL, &ctx).await.unwrap();
            }
            "Ongoing"
            | "FundsNeeded"
            | "FundsNeededLastPayment"
            | "SendFunds"
            | "SendFundsLastPayment"
            | "BlocksComplete"
            | "Finalizing"
            | "CheckComplete" => {
                let provider_stream: Uuid = sqlx::query_scalar(
                    "SELECT stream_id FROM retrieval_deals WHERE side = 'retrieval_provider'",
                )
                .fetch_one(deals.journal().pool())
                .await
                .unwrap();
                let key = client_key();
                let limit = TokenAmount(u128::MAX);
                match pull(&client, &deals, RETRIEVAL, provider_stream, &key, limit, &ctx).await {
                    Ok(outcome) => {
                        println!("pulled: {} ({} bytes)", outcome.state, outcome.bytes.len())
                    }
                    Err(e) => println!("pull stopped: {e}"),
                }
            }
            "Completed" => {
                // The provider's runner redeems its vouchers before the node is done.
                let open = dealledger::events::outbox::pending(deals.journal().pool(), None, 1000)
                    .await
                    .unwrap()
                    .into_iter()
                    .filter(|e| e.effect_type == "redeem-voucher")
                    .count();
                if open == 0 {
                    break;
                }
                runner.recover().await.unwrap();
            }
            // The runner is setting up the payment channel and lane.
            "Accepted"
            | "PaymentChannelCreating"
            | "PaymentChannelAddingFunds"
            | "PaymentChannelAllocatingLane" => {
                runner.recover().await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => panic!("the retrieval ended in {other}"),
        }
    }
    println!("node done");
}

fn devnet_config() -> DevnetConfig {
    DevnetConfig { genesis_epoch: NOW, ..DevnetConfig::default() }
}

fn retrieval_terms_for(piece: dealledger::domain::PieceCid) -> RetrievalDealProposal {
    RetrievalDealProposal {
        payload_cid: dealledger::events::chain::cid_of_bytes(b"crash payload"),
        piece_cid: Some(piece),
        part: ByteRange { offset: 0, length: DATA_LEN as u64 },
        price_per_byte: TokenAmount(5),
        payment_interval: 8 * 1024,
        payment_interval_increase: 4 * 1024,
        unseal_price: TokenAmount(0),
        client: PartyKey::of(&client_key()),
        provider: PartyKey::of(&provider_key()),
    }
}

/// Starts the node; its output goes to `log` (read back when the test fails).
fn spawn_node(
    ledger: &str,
    devnet: &str,
    pieces: &std::path::Path,
    log: &std::path::Path,
) -> Child {
    let output = std::fs::File::create(log).unwrap();
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "node_process", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env(LEDGER_URL, ledger)
        .env(DEVNET_URL, devnet)
        .env(PIECES, pieces)
        .stdout(output.try_clone().unwrap())
        .stderr(Stdio::from(output))
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn a_node_killed_at_random_points_completes_its_deals_after_restarts() {
    if std::env::var(CHILD).is_ok() {
        return;
    }
    // Given a ledger database, a devnet with funded parties and a piece directory
    let (ledger, _) = fresh_database(4).await.unwrap();
    let (devnet_pool, _) = fresh_database(4).await.unwrap();
    let devnet = Devnet::open(devnet_pool.clone(), devnet_config()).await.unwrap();
    for (key, name) in [(client_key(), "client"), (provider_key(), "provider")] {
        devnet
            .fund(PartyKey::of(&key), WALLET, MessageKey::of("faucet", name.as_bytes()))
            .await
            .unwrap();
    }
    let pieces = dealledger::db::testing::scratch_dir("crash").expect("a scratch directory");
    let (ledger_url, devnet_url) = (url_of(&ledger), url_of(&devnet_pool));
    // When the node is killed with SIGKILL at seeded random moments, and restarted each time
    // (reproducible kill moments)
    let mut seed = Xorshift(0x5eed_cafe);
    let mut kills = 0;
    std::fs::create_dir_all(&pieces).unwrap();
    let log = |run: usize| pieces.join(format!("node-{run}.log"));
    let tail = |run: usize| std::fs::read_to_string(log(run)).unwrap_or_default();
    for run in 0..RUNS {
        let mut node = spawn_node(&ledger_url, &devnet_url, &pieces, &log(run));
        let after = Duration::from_millis(30 + seed.next() % 120);
        tokio::time::sleep(after).await;
        if node.try_wait().unwrap().is_none() {
            node.kill().unwrap();
            kills += 1;
        }
        let status = node.wait().unwrap();
        assert!(status.success() || status.code().is_none(), "run {run} failed:\n{}", tail(run));
        if status.success() {
            break;
        }
    }
    // Then a last run completes both deals
    let mut node = spawn_node(&ledger_url, &devnet_url, &pieces, &log(RUNS));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = node.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = node.kill();
            let log = tail(RUNS);
            let last: Vec<&str> = log.lines().rev().take(60).collect();
            panic!(
                "the node did not finish; its log ends:\n{}",
                last.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "the last run failed ({kills} kills before):\n{}", tail(RUNS));
    assert!(kills >= 5, "only {kills} runs were killed: the kill moments are too late");
    let deals = Deals::new(Journal::new(ledger.clone()));
    let proposal = proposal_for(&data(DATA_LEN, DATA_SEED));
    for (side, stream) in [
        ("client", Deals::storage_stream_id(StorageClient::NAME, &proposal)),
        ("provider", Deals::storage_stream_id(StorageProvider::NAME, &proposal)),
    ] {
        let state = deals.get_storage_deal_status(stream).await.unwrap().state;
        assert_eq!(state, "Active", "{side}");
    }
    let retrieval = deals.load::<RetrievalClient>(RETRIEVAL).await.unwrap();
    assert_eq!(retrieval.state.name(), "Completed");
    let total = retrieval_terms_for(proposal.proposal.piece_cid).total_price().unwrap();
    assert_eq!(retrieval.data.paid, total);
    // Nothing done twice with visible effect: one deposit per party, one publish, one
    // channel holding the price, whose vouchers redeem exactly the price.
    let methods: Vec<(String, i64)> =
        sqlx::query_as("SELECT method, count(*) FROM devnet.messages GROUP BY 1 ORDER BY 1")
            .fetch_all(&devnet_pool)
            .await
            .unwrap();
    let count = |m: &str| methods.iter().find(|(n, _)| n == m).map_or(0, |(_, c)| *c);
    assert_eq!(count("AddBalance"), 2, "{methods:?}");
    assert_eq!(count("PublishStorageDeals"), 1, "{methods:?}");
    assert_eq!(count("PaychGetOrCreate"), 1, "{methods:?}");
    let channel = retrieval.data.channel.clone().unwrap();
    let state = devnet.channel(&channel).await.unwrap().unwrap();
    assert_eq!((state.balance, state.redeemed), (total, total));
    // And every stream's chain and transitions verify.
    let report =
        dealledger::audit::verify::verify_all(deals.journal(), None, &mut |_| {}).await.unwrap();
    assert!(report.broken.is_empty(), "{:?}", report.broken);
}
