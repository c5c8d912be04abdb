//! `dealledger serve`: a node as a long-running service, configured by a TOML file
//! (`docs/node.example.toml`) with environment overrides — the market protocols on libp2p
//! (provider role), the effect runner on the devnet chain (funding, proposals, pushes,
//! publish, sealing, activation, expiry, channels, voucher redemption; every waiting effect
//! resumes on start), the HTTP API, the `deal_transitions` projector, deal timeouts and a
//! signed checkpoint every few minutes — until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use libp2p::Multiaddr;

use dealledger::adapters::chain::{Chain, Devnet, DevnetConfig, DevnetSealer};
use dealledger::adapters::network::codec::MarketCodec;
use dealledger::adapters::network::message::{MarketResponse, RetrievalAsk, StorageAsk};
use dealledger::adapters::network::provider::ProviderService;
use dealledger::adapters::network::{self, Client, NetworkEvent};
use dealledger::adapters::piece::store::PieceStore;
use dealledger::adapters::transfer::{ProviderTransfers, TransferOptions};
use dealledger::api::{Access, ApiState, ClientRole};
use dealledger::audit::{checkpoint, identity};
use dealledger::config::{ChainKind, NodeConfig, Role};
use dealledger::db::Database;
use dealledger::deals::Deals;
use dealledger::domain::{PaddedPieceSize, TokenAmount};
use dealledger::events::Journal;
use dealledger::fsm::DecideContext;
use dealledger::projections::projector::TransitionsProjector;
use dealledger::runner::{
    EffectRunner, RunnerConfig, RunnerNetwork, TimeoutPolicy, time_out_stuck_deals,
};

/// Options of `serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The node's configuration (TOML); defaults when absent. `dealledger config check`
    /// validates it.
    #[arg(long, env = "DEALLEDGER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Overrides `network.listen`.
    #[arg(long)]
    pub listen: Option<Multiaddr>,
    /// Overrides `api.listen`.
    #[arg(long)]
    pub api_listen: Option<String>,
    /// Overrides `chain.epoch_ms` (run the devnet's clock in this process).
    #[arg(long)]
    pub devnet_epoch_ms: Option<u64>,
}

/// The configuration `serve` runs with: the file, the environment, then the flags.
pub fn node_config(args: &ServeArgs) -> anyhow::Result<NodeConfig> {
    let config = match &args.config {
        Some(path) => NodeConfig::load(path)?,
        None => NodeConfig::default(),
    };
    let mut config = config.with_env(&|key| std::env::var(key).ok());
    if let Some(listen) = &args.listen {
        config.network.listen = listen.to_string();
    }
    if let Some(listen) = &args.api_listen {
        config.api.listen = Some(listen.clone());
    }
    if let Some(ms) = args.devnet_epoch_ms {
        config.chain.epoch_ms = ms;
    }
    config.validate()?;
    Ok(config)
}

/// `dealledger config check`: loads, overrides and validates; prints what the node would run.
pub fn check(path: Option<PathBuf>) -> anyhow::Result<()> {
    let args =
        ServeArgs { config: path.clone(), listen: None, api_listen: None, devnet_epoch_ms: None };
    let config = node_config(&args)?;
    let origin = path.map_or_else(|| "defaults".to_owned(), |p| p.display().to_string());
    println!("{origin}: ok");
    println!("  roles      {:?}", config.node.roles);
    println!("  database   {}", config.node.database_url.as_deref().unwrap_or("embedded"));
    println!("  libp2p     {}", config.network.listen);
    println!(
        "  chain      {:?} {}",
        config.chain.kind,
        config.chain.url.as_deref().unwrap_or("(this database)")
    );
    match &config.api.listen {
        Some(listen) => println!(
            "  api        http://{listen} (writes {}, reads {})",
            if config.api.token.is_some() { "with the token" } else { "disabled" },
            if config.api.open_reads || config.api.token.is_none() {
                "open"
            } else {
                "with the token"
            }
        ),
        None => println!("  api        off"),
    }
    Ok(())
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

/// A node without the provider role refuses what is asked of providers.
async fn refuse_inbound(client: Client, mut events: tokio::sync::mpsc::Receiver<NetworkEvent>) {
    while let Some(event) = events.recv().await {
        if let NetworkEvent::InboundRequest { request, channel, .. } = event {
            let answer = MarketResponse::Rejected { reason: "this node is not a provider".into() };
            if client.respond(&request, channel, answer).await.is_err() {
                return;
            }
        }
    }
}

/// Runs the node until SIGINT/SIGTERM.
pub async fn run(db: &Database, journal: &Journal, args: ServeArgs) -> anyhow::Result<()> {
    let config = node_config(&args)?;
    anyhow::ensure!(
        config.chain.kind == ChainKind::Devnet,
        "serve runs on the devnet for now; a Lotus node is read with `dealledger chain head|deal`"
    );
    let key = identity::load_or_create(db.home())?;
    let deals = Deals::new(journal.clone());
    let devnet_config =
        DevnetConfig { finality: config.chain.finality.unwrap_or(0), ..DevnetConfig::default() };
    let devnet = match &config.chain.url {
        None => Devnet::open(db.pool.clone(), devnet_config).await?,
        Some(url) => {
            let pool = dealledger::db::pool_options().max_connections(4).connect(url).await?;
            Devnet::open(pool, devnet_config).await?
        }
    };
    let ctx = DecideContext { epoch: devnet.head().await?, ..DecideContext::default() };
    let timeout = Duration::from_secs(config.network.request_timeout_secs.max(1));
    let (node, events, event_loop) = network::new(&key, MarketCodec::default(), timeout)?;
    let network_task = tokio::spawn(event_loop.run());
    let listen: Multiaddr = config.network.listen.parse()?;
    let address = node.listen(listen).await?;
    // Deals resumed below dial their counterparties where they were last reached.
    let known = network::addresses::restore(&node, journal.pool()).await?;
    tracing::info!(peers = known, "restored the address book");
    let pieces = PieceStore::new(db.home().join("pieces"));
    let provider_role = config.node.roles.contains(&Role::Provider);
    let client_role = config.node.roles.contains(&Role::Client);
    let serving = if provider_role {
        let ask = StorageAsk {
            price_per_gib_epoch: config.price_per_gib_epoch(),
            min_piece_size: PaddedPieceSize(config.provider.min_piece_size),
            max_piece_size: PaddedPieceSize(config.provider.max_piece_size),
        };
        let retrieval_ask = RetrievalAsk {
            price_per_byte: TokenAmount(
                config.provider.retrieval_price_per_byte.parse().unwrap_or(1),
            ),
            unseal_price: TokenAmount::ZERO,
            max_payment_interval: config.provider.max_payment_interval,
        };
        let transfers =
            ProviderTransfers::new(deals.clone(), pieces.clone(), TransferOptions::default());
        let service = ProviderService::new(deals.clone(), key.clone(), ask, transfers)
            .with_retrieval_ask(retrieval_ask)
            .with_payment_channels(Arc::new(devnet.clone()));
        tokio::spawn(service.serve(node.clone(), events, ctx.clone()))
    } else {
        tokio::spawn(refuse_inbound(node.clone(), events))
    };
    let clock = (config.chain.epoch_ms > 0)
        .then(|| devnet.clone().run_clock(Duration::from_millis(config.chain.epoch_ms)));
    let runner_config = RunnerConfig {
        lease: Duration::from_secs(config.intervals.effect_lease_secs.max(1)),
        max_attempts: config.intervals.effect_max_attempts,
        ..RunnerConfig::default()
    };
    let network_effects = RunnerNetwork {
        client: node.clone(),
        key: key.clone(),
        pieces: client_role.then(|| pieces.clone()),
        retrieved: client_role.then(|| db.home().join("retrieved")),
    };
    let runner = EffectRunner::new(
        deals.clone(),
        devnet.clone(),
        DevnetSealer::new(
            devnet.clone(),
            config.chain.precommit_epochs.unwrap_or(2),
            config.chain.prove_epochs.unwrap_or(3),
        ),
        runner_config,
    )
    .with_network(network_effects);
    let (stop_runner, runner_stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = tokio::spawn(runner.run(async {
        let _ = runner_stopped.await;
    }));
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let api = match &config.api.listen {
        Some(listen) => {
            let access =
                Access { token: config.api.token.clone(), open_reads: config.api.open_reads };
            let mut state =
                ApiState::new(deals.clone(), access).with_chain(Arc::new(devnet.clone()));
            if let Some(url) = &config.node.read_database_url {
                let replica = dealledger::db::pool_options()
                    .connect(url)
                    .await
                    .context("connecting to the read replica")?;
                state = state.with_reads(dealledger::events::Journal::new(replica));
            }
            if client_role {
                state = state.with_client(ClientRole {
                    network: node.clone(),
                    key: key.clone(),
                    pieces: pieces.clone(),
                    retrieved: db.home().join("retrieved"),
                });
            }
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding the API to {listen}"))?;
            println!("api      http://{}", listener.local_addr()?);
            let stopped = async {
                let _ = api_stopped.await;
            };
            Some(tokio::spawn(dealledger::api::serve(
                listener,
                dealledger::api::router(state),
                stopped,
            )))
        }
        None => None,
    };
    println!("node     {} listening on {address}/p2p/{}", node.peer_id(), node.peer_id());
    println!("roles    {:?}; database {}", config.node.roles, db.display_url);
    println!("ctrl-c or SIGTERM stops");

    let (stop_projector, projector_stopped) = tokio::sync::oneshot::channel::<()>();
    let projector = tokio::spawn(TransitionsProjector::new(journal.clone()).run(async {
        let _ = projector_stopped.await;
    }));
    let mut checkpoints =
        tokio::time::interval(Duration::from_secs(config.intervals.checkpoint_minutes.max(1) * 60));
    checkpoints.tick().await; // the first tick is immediate: sign one at start
    checkpoint::create(journal, &key, chrono::Utc::now()).await?;
    let policy = TimeoutPolicy {
        after: Duration::from_secs(config.intervals.deal_timeout_minutes.max(1) * 60),
        ..TimeoutPolicy::default()
    };
    let mut timeouts = tokio::time::interval(Duration::from_secs(60));
    let archive_after = (config.intervals.archive_after_days > 0)
        .then(|| Duration::from_secs(config.intervals.archive_after_days * 86_400));
    let mut archives = tokio::time::interval(Duration::from_secs(3_600));
    let stop = shutdown();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = checkpoints.tick() => {
                let signed = checkpoint::create(journal, &key, chrono::Utc::now()).await?;
                tracing::info!(id = signed.id, streams = signed.statement.streams, "signed a checkpoint");
            }
            _ = timeouts.tick() => {
                let epoch = devnet.head().await.unwrap_or(ctx.epoch);
                let now = DecideContext { epoch, ..DecideContext::default() };
                match time_out_stuck_deals(&deals, &policy, &now).await {
                    Ok(0) => {}
                    Ok(moved) => tracing::info!(moved, "timed out stuck deals"),
                    Err(e) => tracing::warn!(error = %e, "could not time out stuck deals"),
                }
            }
            _ = archives.tick(), if archive_after.is_some() => {
                let age = archive_after.unwrap_or_default();
                match dealledger::deals::retention::archive_ended(&deals, age, 500).await {
                    Ok(moved) if moved.streams == 0 => {}
                    Ok(moved) => tracing::info!(streams = moved.streams, events = moved.events,
                        "archived ended deals"),
                    Err(e) => tracing::warn!(error = %e, "could not archive ended deals"),
                }
            }
            () = &mut stop => break,
        }
    }
    // Graceful stop: the API finishes the requests in flight, no new network requests, the
    // runner and the projector finish their rounds; every command either committed or rolled
    // back (each is one transaction).
    let _ = stop_api.send(());
    if let Some(api) = api {
        api.await??;
    }
    // The runner finishes its round before the network goes: an effect cut off by a stopped
    // network would count as a failed attempt of the deal.
    let _ = stop_projector.send(());
    let _ = stop_runner.send(());
    projector.await??;
    runner.await??;
    serving.abort();
    network_task.abort();
    if let Some(clock) = clock {
        clock.abort();
    }
    checkpoint::create(journal, &key, chrono::Utc::now()).await?;
    println!("stopped; a final checkpoint was signed");
    Ok(())
}
