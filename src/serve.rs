//! `dealledger serve`: a provider node as a long-running service — the market protocols on
//! libp2p, the effect runner on the devnet chain (publish, sealing, activation, expiry,
//! voucher redemption; it resumes every waiting effect on start), the `deal_transitions`
//! projector, and a signed checkpoint every few minutes — until SIGINT or SIGTERM. The HTTP
//! API and Lotus-backed publishing are not part of it yet.

use std::time::Duration;

use clap::Args;
use libp2p::Multiaddr;

use dealledger::adapters::chain::{Devnet, DevnetConfig, DevnetSealer};
use dealledger::adapters::network::codec::MarketCodec;
use dealledger::adapters::network::message::StorageAsk;
use dealledger::adapters::network::provider::ProviderService;
use dealledger::adapters::network::{self};
use dealledger::adapters::piece::store::PieceStore;
use dealledger::adapters::transfer::{ProviderTransfers, TransferOptions};
use dealledger::audit::{checkpoint, identity};
use dealledger::db::Database;
use dealledger::deals::Deals;
use dealledger::domain::{ChainEpoch, PaddedPieceSize, TokenAmount};
use dealledger::events::Journal;
use dealledger::fsm::DecideContext;
use dealledger::projections::projector::TransitionsProjector;
use dealledger::runner::{EffectRunner, RunnerConfig, TimeoutPolicy, time_out_stuck_deals};

/// Options of `serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Where the node listens.
    #[arg(long, default_value = "/ip4/127.0.0.1/tcp/0")]
    pub listen: Multiaddr,
    /// Lowest storage price, in attoFIL per GiB of padded piece per epoch.
    #[arg(long, default_value_t = 1_000_000)]
    pub price_per_gib_epoch: u128,
    /// The chain epoch proposals are checked against (until the chain adapter tells it).
    #[arg(long, default_value_t = 0)]
    pub epoch: i64,
    /// The devnet chain: `devnet` (in this node's database) or a PostgreSQL URL of a devnet
    /// shared with other nodes.
    #[arg(long, default_value = "devnet")]
    pub chain: String,
    /// Run the devnet's clock in this process, one epoch every this many milliseconds
    /// (0: another process, e.g. `dealledger devnet serve`, runs it).
    #[arg(long, default_value_t = 0)]
    pub devnet_epoch_ms: u64,
    /// Minutes between signed journal checkpoints.
    #[arg(long, default_value_t = 10)]
    pub checkpoint_minutes: u64,
}

/// Resolves when the process is asked to stop.
async fn shutdown() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
}

/// Runs the provider node until SIGINT/SIGTERM.
pub async fn run(db: &Database, journal: &Journal, args: ServeArgs) -> anyhow::Result<()> {
    let key = identity::load_or_create(db.home())?;
    let deals = Deals::new(journal.clone());
    let ctx = DecideContext { epoch: ChainEpoch(args.epoch), ..DecideContext::default() };
    let (node, events, event_loop) =
        network::new(&key, MarketCodec::default(), Duration::from_secs(60))?;
    let network_task = tokio::spawn(event_loop.run());
    let address = node.listen(args.listen.clone()).await?;
    let ask = StorageAsk {
        price_per_gib_epoch: TokenAmount(args.price_per_gib_epoch),
        min_piece_size: PaddedPieceSize(128),
        max_piece_size: PaddedPieceSize(32 << 30),
    };
    let pieces = PieceStore::new(db.home().join("pieces"));
    let transfers = ProviderTransfers::new(deals.clone(), pieces, TransferOptions::default());
    let devnet = if args.chain == "devnet" {
        Devnet::open(db.pool.clone(), DevnetConfig::default()).await?
    } else {
        let pool = dealledger::db::pool_options().max_connections(4).connect(&args.chain).await?;
        Devnet::open(pool, DevnetConfig::default()).await?
    };
    let deals_for_runner = deals.clone();
    let timeout_deals = deals.clone();
    let service = ProviderService::new(deals, key.clone(), ask, transfers)
        .with_payment_channels(std::sync::Arc::new(devnet.clone()));
    let serving = tokio::spawn(service.serve(node.clone(), events, ctx));
    let clock = (args.devnet_epoch_ms > 0)
        .then(|| devnet.clone().run_clock(Duration::from_millis(args.devnet_epoch_ms)));
    let sealer = DevnetSealer::new(devnet.clone(), 2, 3);
    let runner = EffectRunner::new(deals_for_runner, devnet, sealer, RunnerConfig::default());
    let (stop_runner, runner_stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(runner.run(async {
        let _ = runner_stopped.await;
    }));
    println!("provider {} listening on {address}/p2p/{}", node.peer_id(), node.peer_id());
    println!("database {}; ctrl-c or SIGTERM stops", db.display_url);

    let (stop_projector, projector_stopped) = tokio::sync::oneshot::channel::<()>();
    let projector = tokio::spawn(TransitionsProjector::new(journal.clone()).run(async {
        let _ = projector_stopped.await;
    }));
    let mut checkpoints =
        tokio::time::interval(Duration::from_secs(args.checkpoint_minutes.max(1) * 60));
    checkpoints.tick().await; // the first tick is immediate: sign one at start
    checkpoint::create(journal, &key, chrono::Utc::now()).await?;
    let mut timeouts = tokio::time::interval(Duration::from_secs(60));
    let stop = shutdown();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = checkpoints.tick() => {
                let signed = checkpoint::create(journal, &key, chrono::Utc::now()).await?;
                tracing::info!(id = signed.id, streams = signed.statement.streams, "signed a checkpoint");
            }
            _ = timeouts.tick() => {
                let ctx = DecideContext { epoch: ChainEpoch(args.epoch), ..DecideContext::default() };
                match time_out_stuck_deals(&timeout_deals, &TimeoutPolicy::default(), &ctx).await {
                    Ok(0) => {}
                    Ok(moved) => tracing::info!(moved, "timed out stuck deals"),
                    Err(e) => tracing::warn!(error = %e, "could not time out stuck deals"),
                }
            }
            () = &mut stop => break,
        }
    }
    // Graceful stop: no new requests; the projector finishes its batch; in-flight commands
    // either committed or rolled back (each is one transaction).
    serving.abort();
    network_task.abort();
    let _ = stop_projector.send(());
    let _ = stop_runner.send(());
    projector.await??;
    runner.await??;
    if let Some(clock) = clock {
        clock.abort();
    }
    checkpoint::create(journal, &key, chrono::Utc::now()).await?;
    println!("stopped; a final checkpoint was signed");
    Ok(())
}
