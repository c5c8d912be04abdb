//! Load with faults: two `dealledger serve` nodes on 127.0.0.1 (each with its own embedded
//! database, sharing the provider's devnet) make storage deals and then paid retrievals of
//! their pieces through the client's HTTP API, while the test, at seeded random moments,
//! SIGKILLs the client, SIGKILLs the provider, restarts each node's PostgreSQL under load and
//! cuts the network between the nodes for longer than their request timeout.
//!
//! Afterwards: every deal the API acknowledged is Active, every retrieval Completed with the
//! original bytes, each deal published once, no voucher redeemed twice, and on both nodes the
//! journal verifies and the projections equal a rebuild.
//!
//! CI runs a small configuration. `LOAD_DEALS`, `LOAD_RETRIEVALS` and `LOAD_SEED` scale and
//! vary it (issue #10's figure: `LOAD_DEALS=2000 LOAD_RETRIEVALS=500`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use dealledger::adapters::chain::Chain;
use dealledger::db::{Durability, EmbeddedPostgres};

mod common;
use common::Xorshift;
use common::node::{Node, TwoNodes, free_port, run_on, start, two_funded_nodes};

/// The nodes' request timeout: a partition longer than this breaks transfers in flight.
const REQUEST_TIMEOUT_SECS: u64 = 3;

/// How long `count` deals may take to get where they are going after the last fault.
fn patience(count: usize) -> Duration {
    Duration::from_secs(300) + Duration::from_millis(200) * count as u32
}

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A TCP relay between the client and the provider that can cut the link: while cut, bytes
/// stop flowing both ways and new connections hang unanswered, like a partition (no resets);
/// when healed, everything still open flows again.
struct Link {
    cut: watch::Sender<bool>,
    upstream: Arc<Mutex<SocketAddr>>,
    port: u16,
}

impl Link {
    async fn open(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, watching) = watch::channel(false);
        let upstream = Arc::new(Mutex::new(upstream));
        let target = upstream.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (watching, target) = (watching.clone(), target.clone());
                tokio::spawn(async move {
                    flowing(&watching).await;
                    let to = *target.lock().unwrap();
                    let Ok(outbound) = TcpStream::connect(to).await else { return };
                    let (from_client, to_client) = inbound.into_split();
                    let (from_provider, to_provider) = outbound.into_split();
                    tokio::join!(
                        relay(from_client, to_provider, watching.clone()),
                        relay(from_provider, to_client, watching),
                    );
                });
            }
        });
        Self { cut, upstream, port }
    }

    fn address(&self) -> String {
        format!("/ip4/127.0.0.1/tcp/{}", self.port)
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }

    fn point_at(&self, upstream: SocketAddr) {
        *self.upstream.lock().unwrap() = upstream;
    }
}

async fn flowing(watching: &watch::Receiver<bool>) {
    let _ = watching.clone().wait_for(|cut| !*cut).await;
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    watching: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        flowing(&watching).await;
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Bytes read just before a cut are held back with the rest.
        flowing(&watching).await;
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

fn socket_of(multiaddr: &str) -> SocketAddr {
    let port = multiaddr.rsplit('/').next().unwrap();
    format!("127.0.0.1:{port}").parse().unwrap()
}

/// The faults, each at a seeded position in a loop of `len` steps.
#[derive(Debug)]
struct Faults {
    kill_client: usize,
    kill_provider: usize,
    restart_client_database: usize,
    restart_provider_database: usize,
    cut_link: usize,
}

impl Faults {
    fn draw(rng: &mut Xorshift, len: usize) -> Self {
        let (low, span) = (len / 8, (len * 3 / 4).max(1));
        let mut taken = HashSet::new();
        let mut next = || loop {
            let at = low + rng.below(span);
            if taken.insert(at) || taken.len() >= span {
                return at;
            }
        };
        Self {
            kill_client: next(),
            kill_provider: next(),
            restart_client_database: next(),
            restart_provider_database: next(),
            cut_link: next(),
        }
    }
}

struct Cluster {
    nodes: TwoNodes,
    link: Link,
    /// Node starts so far: each run of a node logs to its own `serve-<run>.log`.
    runs: usize,
}

/// Kills `node` with SIGKILL and starts it again on its home and API port with `args`.
async fn kill_and_restart(node: &mut Node, args: &[&str], run: usize) {
    node.kill();
    let (home, api) = (node.home.clone(), node.api);
    *node = start(&home, args, api, run);
    node.printed("node     ").await;
}

impl Cluster {
    async fn apply(&mut self, faults: &Faults, step: usize) {
        if step == faults.kill_client {
            eprintln!("step {step}: SIGKILL the client");
            self.runs += 1;
            let args: Vec<&str> = self.nodes.client_args.iter().map(String::as_str).collect();
            kill_and_restart(&mut self.nodes.client, &args, self.runs).await;
        }
        if step == faults.kill_provider {
            eprintln!("step {step}: SIGKILL the provider");
            self.runs += 1;
            // On a new port: the relay is pointed at it, as a peer's new address would be.
            let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
            let mut args: Vec<&str> = self.nodes.provider_args.iter().map(String::as_str).collect();
            args.extend(["--listen", listen.as_str()]);
            kill_and_restart(&mut self.nodes.provider, &args, self.runs).await;
            self.link.point_at(socket_of(&listen));
        }
        if step == faults.restart_client_database {
            eprintln!("step {step}: restart the client's PostgreSQL");
            restart_database(&self.nodes.client).await;
        }
        if step == faults.restart_provider_database {
            eprintln!("step {step}: restart the provider's PostgreSQL (the devnet's too)");
            restart_database(&self.nodes.provider).await;
        }
        if step == faults.cut_link {
            let cut = Duration::from_secs(REQUEST_TIMEOUT_SECS * 5 / 2);
            eprintln!("step {step}: cut the link for {cut:?}");
            self.link.set_cut(true);
            tokio::time::sleep(cut).await;
            self.link.set_cut(false);
        }
    }

    /// Waits until every id in `ids` is in `goal` on the client; panics with the laggards.
    async fn wait_for(&self, ids: &[String], goal: &str, limit: Duration) {
        let started = Instant::now();
        loop {
            let mut behind = Vec::new();
            for id in ids {
                let (_, found) =
                    self.nodes.client.call("GET", &format!("/v1/deals/{id}"), None).await;
                if found["deal"]["state"] != goal {
                    behind.push((
                        id.clone(),
                        found["deal"]["state"].clone(),
                        found["deal"]["message"].clone(),
                    ));
                }
            }
            if behind.is_empty() {
                return;
            }
            if started.elapsed() > limit {
                panic!(
                    "{} of {} not {goal} after {limit:?}: {behind:#?}\nclient log tail:\n{}",
                    behind.len(),
                    ids.len(),
                    tail(&self.nodes.client)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Restarts the PostgreSQL a node started under its home: all its connections drop.
async fn restart_database(node: &Node) {
    let home = node.home.clone();
    tokio::task::spawn_blocking(move || {
        EmbeddedPostgres::start(&home, Durability::Durable).unwrap().restart().unwrap()
    })
    .await
    .unwrap();
}

fn tail(node: &Node) -> String {
    let log = node.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deals_and_retrievals_survive_kills_a_database_restart_and_a_partition() {
    let deals = setting("LOAD_DEALS", 40) as usize;
    let retrievals = setting("LOAD_RETRIEVALS", 8) as usize;
    let seed = setting("LOAD_SEED", 10);
    let mut rng = Xorshift(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let root = dealledger::db::testing::scratch_dir("faults").expect("a scratch directory");
    eprintln!("seed {seed}, {deals} deals, {retrievals} retrievals, under {}", root.display());
    // Given two funded nodes whose link runs through a relay the test can cut, with a short
    // request timeout, and a provider that asks to be paid every 4 KiB
    let network = format!("[network]\nrequest_timeout_secs = {REQUEST_TIMEOUT_SECS}\n");
    let provider_toml = format!("{network}[provider]\nmax_payment_interval = 4096\n");
    let nodes = two_funded_nodes(&root, &network, &provider_toml).await;
    let link = Link::open(socket_of(&nodes.provider_listen)).await;
    // Deals must be sealed before they start; a large run needs more time for that.
    let start_epoch = nodes.devnet.head().await.unwrap().0 + 3_000 + 30 * deals as i64;
    let mut cluster = Cluster { nodes, link, runs: 0 };
    let files = root.join("files");
    std::fs::create_dir_all(&files).unwrap();

    // When storage deals are started through the API while the faults strike
    let faults = Faults::draw(&mut rng, deals);
    eprintln!("storage faults at {faults:?}");
    let mut acknowledged = Vec::new();
    let mut originals = Vec::new();
    for n in 0..deals {
        cluster.apply(&faults, n).await;
        let size = 2_000 + rng.below(30_000);
        let bytes: Vec<u8> = (0..size).map(|_| rng.below(256) as u8).collect();
        let file = files.join(format!("{n}.bin"));
        std::fs::write(&file, &bytes).unwrap();
        let body = json!({
            "file": file.to_string_lossy(),
            "provider": cluster.nodes.provider_peer,
            "provider_address": cluster.link.address(),
            "price_per_epoch": "1000",
            "start_epoch": start_epoch,
            "duration_epochs": 180 * 2880,
        });
        let (status, started) =
            cluster.nodes.client.call("POST", "/v1/storage-deals", Some(&body)).await;
        if status == 201 {
            acknowledged.push(started["stream_id"].as_str().unwrap().to_owned());
            originals.push((started["piece_cid"].as_str().unwrap().to_owned(), bytes));
        } else {
            eprintln!("step {n}: the API answered {status}: {started}");
        }
    }
    // the API refuses only while its node is down or its database restarts
    assert!(acknowledged.len() + 3 >= deals, "only {} of {deals} acknowledged", acknowledged.len());
    // Then every acknowledged deal becomes Active
    cluster.wait_for(&acknowledged, "Active", patience(acknowledged.len())).await;

    // When paid retrievals of those pieces run, in two parts each, while the faults strike again
    let faults = Faults::draw(&mut rng, retrievals);
    eprintln!("retrieval faults at {faults:?}");
    let mut requests = Vec::new();
    for r in 0..retrievals {
        cluster.apply(&faults, r).await;
        let (piece, bytes) = &originals[rng.below(originals.len())];
        let body = json!({
            "piece_cid": piece,
            "provider": cluster.nodes.provider_peer,
            "provider_address": cluster.link.address(),
            "part_size": bytes.len().div_ceil(2),
            "max_price_per_byte": "2",
        });
        let (status, started) =
            cluster.nodes.client.call("POST", "/v1/retrievals", Some(&body)).await;
        if status == 201 {
            let id = started["request_id"].as_str().unwrap().to_owned();
            requests.push((id, started["output"].as_str().unwrap().to_owned(), bytes.clone()));
        } else {
            eprintln!("step {r}: the API answered {status}: {started}");
        }
    }
    assert!(requests.len() + 3 >= retrievals, "only {} of {retrievals} retrievals", requests.len());
    // Then every retrieval completes with the original bytes
    let ids: Vec<String> = requests.iter().map(|(id, _, _)| id.clone()).collect();
    cluster.wait_for(&ids, "Completed", patience(ids.len())).await;
    for (id, output, bytes) in &requests {
        let written = std::fs::read(output).unwrap();
        assert!(&written == bytes, "retrieval {id} wrote other bytes than the piece");
    }

    // and on the chain each deal was published once, and no voucher was redeemed twice
    let pool = dealledger::db::pool_options()
        .max_connections(1)
        .connect(&cluster.nodes.devnet_url)
        .await
        .unwrap();
    let published: i64 =
        sqlx::query_scalar("SELECT count(*) FROM devnet.deals").fetch_one(&pool).await.unwrap();
    assert_eq!(published as usize, acknowledged.len(), "deals on chain");
    let publishes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM devnet.messages WHERE method = 'PublishStorageDeals'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(publishes as usize, acknowledged.len(), "publish messages");
    // (the devnet lives in the provider's database, beside the provider's status tables)
    let (paid, redeemed): (String, String) = sqlx::query_as(
        "SELECT (SELECT coalesce(sum(funds_paid), 0) FROM retrieval_deals)::text, \
                (SELECT coalesce(sum(redeemed), 0) FROM devnet.lanes)::text",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let (paid, redeemed): (u128, u128) = (paid.parse().unwrap(), redeemed.parse().unwrap());
    assert!(paid > 0, "the provider was paid nothing");
    assert!(redeemed <= paid, "redeemed {redeemed}, vouchers received worth {paid}");
    pool.close().await;
    eprintln!(
        "{} of {deals} storage deals acknowledged, all Active; {} of {retrievals} retrievals, all \
         Completed; vouchers received {paid} attoFIL, redeemed {redeemed}",
        acknowledged.len(),
        requests.len()
    );

    // and both nodes stop cleanly, their journals verify and their projections equal a rebuild
    let Cluster { nodes, .. } = cluster;
    let TwoNodes { mut provider, mut client, .. } = nodes;
    assert!(client.terminate().success(), "client stop:\n{}", tail(&client));
    assert!(provider.terminate().success(), "provider stop:\n{}", tail(&provider));
    for node in [&client, &provider] {
        check_node(&node.home);
    }
    let _ = std::fs::remove_dir_all(&root);
}

fn check_node(home: &Path) {
    let (ok, text) = run_on(home, &["verify"]);
    assert!(ok, "verify on {}:\n{text}", home.display());
    let (ok, text) = run_on(home, &["projections", "check"]);
    assert!(ok, "projections check on {}:\n{text}", home.display());
}
