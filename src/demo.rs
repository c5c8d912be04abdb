//! `dealledger demo`: the first command a new user runs. Plays whole deals through the ledger
//! on the embedded database and shows what it recorded.
//!
//! Storage deals are proposed and their data pushed between two libp2p nodes on 127.0.0.1, and
//! the provider checks each piece's commitment; a stored piece is then pulled back in paid
//! parts. The chain is the devnet (in this database's `devnet` schema, its clock moved by the
//! demo), and one effect runner performs what the machines decide: deposits, publish, sealing,
//! activation, expiry, slashing, payment channels, lanes, voucher redemption, telling a
//! request its part is done. Starting each part's deal (choosing its terms) is still played by
//! the library's [`Script`], checked step by step against replay.

use clap::Args;
use ed25519_dalek::SigningKey;

use anyhow::Context;
use dealledger::adapters::chain::{Chain, Devnet, DevnetConfig, DevnetSealer, MessageKey};
use dealledger::adapters::network;
use dealledger::adapters::network::codec::MarketCodec;
use dealledger::adapters::network::message::{MarketRequest, MarketResponse, StorageAsk};
use dealledger::adapters::network::provider::ProviderService;
use dealledger::adapters::network::provider::propose_retrieval;
use dealledger::adapters::piece::commp::commp_of;
use dealledger::adapters::piece::store::PieceStore;
use dealledger::adapters::transfer::retrieval::pull;
use dealledger::adapters::transfer::{ProviderTransfers, TransferOptions, push};
use dealledger::db::Database;
use dealledger::deals::Deals;
use dealledger::deals::script::Script;
use dealledger::domain::ChainEpoch;
use dealledger::domain::PartyKey;
use dealledger::domain::retrieval::RetrievalDealProposal;
use dealledger::domain::retrieval::RetrievalRequest;
use dealledger::domain::storage::{ClientDealProposal, StorageDealProposal};
use dealledger::domain::{PaddedPieceSize, TokenAmount};
use dealledger::events::Journal;
use dealledger::events::chain::cid_of_bytes;
use dealledger::fsm::fixtures;
use dealledger::fsm::retrieval_client::{RequestPart, RetrievalClient, RetrievalClientEvent as RC};
use dealledger::fsm::retrieval_request::{RetrievalRequestEvent as RR, RetrievalRequestMachine};
use dealledger::fsm::storage_client::StorageClient;
use dealledger::fsm::storage_provider::StorageProvider;
use dealledger::fsm::{DecideContext, Machine};
use dealledger::runner::{EffectRunner, RunnerConfig, RunnerNetwork};
use libp2p::Multiaddr;
use std::time::Duration;
use uuid::Uuid;

/// Options of the demo.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How many storage deals to run to Active and expire.
    #[arg(long, default_value_t = 3)]
    pub deals: u32,
    /// Bytes of generated data per deal; its piece commitment (commP) is computed.
    #[arg(long, default_value_t = 1 << 20)]
    pub size: u64,
}

/// Two ledgers on one server, as two machines would have: the provider writes to the node's
/// database, the client to a database of its own. Each has a libp2p node on 127.0.0.1 and an
/// effect runner; the devnet (the node database's `devnet` schema, which lives on between runs
/// like a real chain) is their chain, its clock moved by the caller. The demo and
/// `dealledger bench deals` play their deals on it.
pub(crate) struct Market {
    /// The provider's ledger (the node's database).
    pub provider: Deals,
    /// The client's ledger (its own database on the same server).
    pub client: Deals,
    pub client_key: SigningKey,
    pub provider_key: SigningKey,
    pub devnet: Devnet,
    /// The devnet's head when the market opened; deals start after it.
    pub genesis: ChainEpoch,
    pub ctx: DecideContext,
    pub client_net: network::Client,
    pub provider_peer: libp2p::PeerId,
    /// Where the provider listens.
    pub address: Multiaddr,
    /// The provider's answer to the ask.
    pub ask: StorageAsk,
    client_runner: EffectRunner<Devnet, DevnetSealer>,
    provider_runner: EffectRunner<Devnet, DevnetSealer>,
    /// One settling at a time: callers with deals in flight at once take turns (each round
    /// performs every deal's due effects, side by side).
    settling: tokio::sync::Mutex<()>,
    /// Whether the runners run by themselves ([`Market::run_in_background`]).
    background: std::sync::atomic::AtomicBool,
}

impl Market {
    /// Funds both parties on the devnet, starts both nodes and asks the provider its price.
    pub async fn open(db: &Database, journal: &Journal) -> anyhow::Result<Self> {
        let deals = Deals::new(journal.clone());
        let client_pool = client_database(db).await?;
        let client_deals = Deals::new(Journal::open(client_pool).await?);
        let client_key = SigningKey::generate(&mut rand::rng());
        let provider_key = SigningKey::generate(&mut rand::rng());
        let devnet = Devnet::open(db.pool.clone(), DevnetConfig::default()).await?;
        let genesis = devnet.head().await?;
        for (key, name) in [(&client_key, "client"), (&provider_key, "provider")] {
            let faucet = MessageKey::of("demo-faucet", &PartyKey::of(key).0);
            devnet.fund(PartyKey::of(key), TokenAmount(10u128.pow(24)), faucet).await?;
            tracing::debug!(party = name, "funded on the devnet");
        }
        let ctx = DecideContext { epoch: genesis, ..DecideContext::default() };
        let pieces = PieceStore::new(db.home().join("pieces"));
        // The provider serves the market protocols; the client knows where it listens.
        let (provider_net, provider_events, provider_loop) =
            network::new(&provider_key, MarketCodec::default(), Duration::from_secs(30))?;
        tokio::spawn(provider_loop.run());
        let address = provider_net.listen("/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>()?).await?;
        let ask = StorageAsk {
            price_per_gib_epoch: TokenAmount(1_000_000),
            min_piece_size: PaddedPieceSize(128),
            max_piece_size: PaddedPieceSize(32 << 30),
        };
        let transfers = ProviderTransfers::new(deals.clone(), pieces, TransferOptions::default());
        let provider = ProviderService::new(deals.clone(), provider_key.clone(), ask, transfers)
            .with_payment_channels(std::sync::Arc::new(devnet.clone()));
        tokio::spawn(provider.serve(provider_net.clone(), provider_events, ctx.clone()));
        let (client_net, _client_events, client_loop) =
            network::new(&client_key, MarketCodec::default(), Duration::from_secs(30))?;
        tokio::spawn(client_loop.run());
        let sealer = DevnetSealer::new(devnet.clone(), 2, 3);
        let config =
            RunnerConfig { watch_poll: Duration::from_millis(20), ..RunnerConfig::default() };
        let client_runner =
            EffectRunner::new(client_deals.clone(), devnet.clone(), sealer.clone(), config.clone())
                .with_network(RunnerNetwork {
                    client: client_net.clone(),
                    key: client_key.clone(),
                    pieces: None,
                    retrieved: None,
                });
        let provider_runner = EffectRunner::new(deals.clone(), devnet.clone(), sealer, config);
        let provider_peer = provider_net.peer_id();
        client_net.add_address(provider_peer, address.clone()).await?;
        let MarketResponse::Ask(ask) =
            client_net.request(provider_peer, MarketRequest::Ask).await?
        else {
            anyhow::bail!("the provider did not answer the ask");
        };
        Ok(Self {
            provider: deals,
            client: client_deals,
            client_key,
            provider_key,
            devnet,
            genesis,
            ctx,
            client_net,
            provider_peer,
            address,
            ask,
            client_runner,
            provider_runner,
            settling: tokio::sync::Mutex::new(()),
            background: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Lets both nodes' runners perform everything due until the machines wait on the chain.
    /// Once the runners run in the background, this only gives them a moment.
    pub async fn settle(&self) -> anyhow::Result<()> {
        if self.background.load(std::sync::atomic::Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(5)).await;
            return Ok(());
        }
        let _turn = self.settling.lock().await;
        loop {
            let mut fed = 0;
            for runner in [&self.client_runner, &self.provider_runner] {
                runner.recover().await?;
                fed += runner.run_until_idle().await?.fed;
            }
            if fed == 0 {
                return Ok(());
            }
        }
    }

    /// Runs both nodes' runners by themselves, as `serve` does, until the returned sender is
    /// dropped: deals then move without [`Market::settle`] (which only waits a moment).
    pub fn run_in_background(&self) -> tokio::sync::watch::Sender<bool> {
        self.background.store(true, std::sync::atomic::Ordering::Release);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        for runner in [&self.client_runner, &self.provider_runner] {
            let mut stopped = stopped.clone();
            tokio::spawn(runner.clone().run(async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            }));
        }
        stop
    }

    /// Moves the devnet's clock `epochs` ahead, then settles.
    pub async fn advance(&self, epochs: i64) -> anyhow::Result<()> {
        self.devnet.advance(epochs).await?;
        self.settle().await
    }

    /// The client's signed proposal for `bytes` (its commP computed) at the provider's asking
    /// price, starting 100 epochs after genesis.
    pub fn proposal(&self, bytes: &[u8], label: String) -> ClientDealProposal {
        let template = fixtures::proposal();
        let duration = template.end_epoch.0 - template.start_epoch.0;
        let (piece_cid, piece_size) = commp_of(bytes);
        let price = (self.ask.price_per_gib_epoch.0 * u128::from(piece_size.0)).div_ceil(1 << 30);
        let terms = StorageDealProposal {
            piece_cid,
            piece_size,
            label,
            client: PartyKey::of(&self.client_key),
            provider: PartyKey::of(&self.provider_key),
            storage_price_per_epoch: TokenAmount(price),
            start_epoch: ChainEpoch(self.genesis.0 + 100),
            end_epoch: ChainEpoch(self.genesis.0 + 100 + duration),
            ..template
        };
        ClientDealProposal::sign(terms, &self.client_key)
    }

    /// Proposes a deal and pushes its data over the network; returns the client's state after
    /// the push (`CheckForAcceptance` once the provider verified the piece).
    pub async fn over_network(
        &self,
        signed: ClientDealProposal,
        bytes: &[u8],
    ) -> anyhow::Result<&'static str> {
        let stream = self.client.initiate_deal(signed, &self.ctx).await?.stream_id;
        // The runner deposits the client's funds in the market and proposes. With other deals
        // in flight, another caller's round may be performing this deal's effects: wait for it.
        let waited = std::time::Instant::now();
        let state = loop {
            self.settle().await?;
            let state = self.client.get_storage_deal_status(stream).await?.state;
            let pending = ["ReserveClientFunds", "ClientFunding", "FundsReserved"];
            if !pending.contains(&state) || waited.elapsed() > Duration::from_secs(60) {
                break state;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        anyhow::ensure!(state == "StartDataTransfer", "the provider did not accept: {state}");
        Ok(push(
            &self.client_net,
            &self.client,
            stream,
            std::io::Cursor::new(bytes),
            bytes.len() as u64,
            TransferOptions::default(),
            &self.ctx,
        )
        .await?)
    }

    /// The (client, provider) stream ids of a deal.
    pub fn streams(signed: &ClientDealProposal) -> (Uuid, Uuid) {
        (
            Deals::storage_stream_id(StorageClient::NAME, signed),
            Deals::storage_stream_id(StorageProvider::NAME, signed),
        )
    }
}

/// Runs the demo.
pub async fn run(db: &Database, journal: &Journal, args: DemoArgs) -> anyhow::Result<()> {
    let market = Market::open(db, journal).await?;
    let Market { provider: deals, client: client_deals, devnet, genesis, ctx, .. } = &market;
    let (client_key, provider_key) = (&market.client_key, &market.provider_key);
    let mut script = Script::new(client_deals, ctx.clone(), true);
    script.data_bytes = Some(args.size);
    let started = std::time::Instant::now();
    // Live progress on a terminal (hidden when the output is not one): every deal pushed,
    // every chain phase, every retrieval part.
    let steps = u64::from(args.deals) + 2 + 4 + 3 + 1;
    let progress = indicatif::ProgressBar::new(steps).with_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    progress.enable_steady_tick(Duration::from_millis(100));
    let step = |message: String| {
        progress.set_message(message);
        progress.inc(1);
    };
    println!("dealledger demo: provider on {}", db.display_url);
    println!("                 client on the same server, database {CLIENT_DATABASE}\n");
    let data = |n: u32| -> Vec<u8> {
        let mut bytes = vec![0u8; args.size as usize];
        rand::fill(&mut bytes[..]);
        let tag = n.to_be_bytes();
        let len = tag.len().min(bytes.len());
        bytes[..len].copy_from_slice(&tag[..len]);
        bytes
    };
    let (ask, client_net, provider_peer) = (&market.ask, &market.client_net, market.provider_peer);
    println!("provider {provider_peer} listening on {}", market.address);
    println!("client   {}", client_net.peer_id());
    println!(
        "ask: {} attoFIL per GiB-epoch, pieces of {}..={} bytes\n",
        ask.price_per_gib_epoch.0, ask.min_piece_size.0, ask.max_piece_size.0
    );
    let proposal = |bytes: &[u8], n: u32| market.proposal(bytes, format!("demo deal {n}"));
    let over_network = |signed: ClientDealProposal, bytes: Vec<u8>| {
        let market = &market;
        async move { market.over_network(signed, &bytes).await }
    };
    let settle = || market.settle();
    let advance = |epochs: i64| market.advance(epochs);
    let storage_pair = Market::streams;

    println!(
        "storage: {} deals of {} bytes each: proposed, pushed and commP-verified over libp2p",
        args.deals, args.size
    );
    let mut streams = Vec::new();
    let mut signed_deals = Vec::new();
    let mut first_piece = None;
    for n in 0..args.deals {
        let bytes = data(n);
        let signed = proposal(&bytes, n);
        if first_piece.is_none() {
            first_piece = Some((signed.proposal.piece_cid, bytes.clone()));
        }
        step(format!("storage deal {n}: proposed, pushed, commP verified"));
        let state = over_network(signed.clone(), bytes).await?;
        anyhow::ensure!(state == "CheckForAcceptance", "deal {n} ended the transfer in {state}");
        streams.push(storage_pair(&signed));
        signed_deals.push(signed);
    }
    let bytes = data(args.deals);
    let signed = proposal(&bytes, args.deals);
    step("the deal to be slashed: proposed and pushed".into());
    over_network(signed.clone(), bytes).await?;
    let slashed = storage_pair(&signed);
    // One byte damaged on the way: the provider's commitment check fails the deal.
    let bytes = data(args.deals + 1);
    let failing_signed = proposal(&bytes, args.deals + 1);
    let mut damaged = bytes;
    damaged[0] ^= 0xff;
    step("a damaged piece: pushed, refused by its commitment".into());
    let state = over_network(failing_signed.clone(), damaged).await?;
    anyhow::ensure!(state == "Failing", "a damaged piece was not refused ({state})");
    let failing = storage_pair(&failing_signed);

    println!("chain: devnet from epoch {}: collateral, publish, sealing and activation", genesis.0);
    step("chain: collateral and publish".into());
    settle().await?;
    step("chain: sectors pre-committed".into());
    advance(2).await?;
    step("chain: sectors proven, deals active".into());
    advance(3).await?;
    for (client, provider) in streams.iter().chain([&slashed]) {
        for (side, stream) in [(&client_deals, client), (&deals, provider)] {
            let state = side.get_storage_deal_status(*stream).await?.state;
            anyhow::ensure!(state == "Active", "deal {stream} is {state}, not Active");
        }
    }
    let slashed_id = deals
        .get_storage_deal_status(slashed.1)
        .await?
        .deal_id
        .context("the slashed deal has no on-chain id")?;
    advance(signed.proposal.start_epoch.0 - devnet.head().await?.0 + 30).await?;
    devnet.slash(slashed_id).await?;
    println!("chain: deal {} slashed at epoch {}", slashed_id.0, devnet.head().await?.0);
    step(format!("chain: deal {} slashed", slashed_id.0));
    advance(1).await?;
    let (piece_cid, original) = first_piece.context("--deals must be at least 1")?;
    println!("retrieval: deal 0's piece, pulled back over libp2p in three paid deals");
    let request = RetrievalRequest {
        payload_cid: cid_of_bytes(&original[..original.len().min(64)]),
        piece_cid: Some(piece_cid),
        total_bytes: original.len() as u64,
        part_size: (original.len() as u64).div_ceil(3).max(1),
        provider: PartyKey::of(provider_key),
        client: PartyKey::of(client_key),
        max_price_per_byte: TokenAmount(2),
    };
    let request_id = client_deals.initiate_retrieval(request.clone(), 3, ctx).await?;
    let mut retrieved = Vec::with_capacity(original.len());
    let mut vouchers = 0;
    for (index, part) in request.parts().into_iter().enumerate() {
        step(format!("retrieval part {index}: channel, pull, vouchers"));
        let part_index = index as u32;
        let terms = RetrievalDealProposal {
            payload_cid: request.payload_cid,
            piece_cid: Some(piece_cid),
            part,
            price_per_byte: TokenAmount(2),
            payment_interval: 128 * 1024,
            payment_interval_increase: 64 * 1024,
            unseal_price: TokenAmount::ZERO,
            client: request.client,
            provider: request.provider,
        };
        let stream = Uuid::now_v7();
        let part_of = Some(RequestPart { request_id, part_index });
        client_deals
            .handle::<RetrievalClient>(
                stream,
                RC::DealProposed { proposal: Box::new(terms), part_of },
                ctx,
                None,
            )
            .await?;
        // The request's start-retrieval-deal effect, performed.
        script
            .step::<RetrievalRequestMachine>(
                request_id,
                RR::PartStarted { part_index, deal_stream: stream },
            )
            .await?;
        let (state, provider_stream) =
            propose_retrieval(client_net, client_deals, stream, ctx).await?;
        let provider_stream =
            provider_stream.with_context(|| format!("part {index} was not accepted: {state}"))?;
        // The runner creates (then tops up) the payment channel and allocates a lane.
        settle().await?;
        let outcome = pull(
            client_net,
            client_deals,
            stream,
            provider_stream,
            client_key,
            TokenAmount(u128::MAX),
            ctx,
        )
        .await?;
        anyhow::ensure!(outcome.state == "Completed", "part {index} ended in {}", outcome.state);
        vouchers += client_deals.load::<RetrievalClient>(stream).await?.data.payments;
        // The runner tells the request (the deal's notify effect).
        settle().await?;
        retrieved.extend(outcome.bytes);
    }
    anyhow::ensure!(retrieved == original, "the retrieved bytes differ from the stored piece");
    // The provider's runner redeems the vouchers on the channel.
    settle().await?;
    let end = signed_deals.iter().map(|s| s.proposal.end_epoch.0).max().unwrap_or_default();
    println!("chain: advancing past the end epoch {end}: the deals expire");
    step("chain: end epoch passed, deals expired".into());
    advance(end - devnet.head().await?.0 + 1).await?;
    progress.finish_and_clear();

    println!("\n{:<38} {:<18} {:<14} {:>4}  note", "stream", "side", "state", "code");
    let shown = streams.iter().chain([&slashed, &failing]);
    for (client, provider) in shown {
        for (side, stream) in [(&client_deals, client), (&deals, provider)] {
            let s = side.get_storage_deal_status(*stream).await?;
            let note =
                s.message.clone().unwrap_or_else(|| format!("{} bytes", s.bytes_transferred));
            println!("{:<38} {:<18} {:<14} {:>4}  {}", s.stream_id, s.side, s.state, s.code, note);
        }
    }
    let status = client_deals.get_retrieval_status(request_id).await?;
    println!(
        "\nretrieval request {}: {} ({} of {} parts, {} of {} bytes verified byte for byte, {} vouchers, paid {})",
        status.request_id,
        status.state,
        status.parts_completed,
        status.parts,
        status.bytes_done,
        status.total_bytes,
        vouchers,
        status.total_paid
    );

    let audited = streams[0].1;
    let audit = dealledger::audit::timeline::audit(journal, audited, None).await?;
    let v = &audit.verdict;
    println!(
        "\naudit of provider deal {audited}: {} events, chain {}, transitions {}, signatures {}, \
         status row {}",
        audit.events_in_stream,
        if v.chain.is_none() { "intact" } else { "BROKEN" },
        if v.first_illegal.is_none() { "all legal" } else { "ILLEGAL" },
        if v.bad_signatures.is_empty() { "valid" } else { "INVALID" },
        if v.projection_diffs.as_ref().is_some_and(Vec::is_empty) {
            "reproduced"
        } else {
            "DIFFERS"
        }
    );
    println!("(full timeline: cargo run -- audit {audited})");
    println!(
        "{} scripted steps (starting each part of the request) re-checked by replaying their \
         streams; whole demo {:.2} s",
        script.steps,
        started.elapsed().as_secs_f64()
    );
    println!(
        "\nnext:\n  psql \"{}\" -c 'select stream_type, event_type, count(*) from events group by 1, 2'",
        db.display_url
    );
    println!("  psql \"{}\" -c 'select * from stuck_deals'", db.display_url);
    println!(
        "  psql \"{}\" -c 'select provider, side, state, deals from provider_summary'",
        db.display_url
    );
    println!("  cargo run -- verify && cargo run -- checkpoint");
    println!("  cargo run -- fsm show storage_provider");
    Ok(())
}

/// The client's database in the demo, next to the provider's on the same server.
const CLIENT_DATABASE: &str = "dealledger_demo_client";

/// Creates (on first use) and opens the demo client's database.
async fn client_database(db: &Database) -> anyhow::Result<sqlx::PgPool> {
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(CLIENT_DATABASE)
            .fetch_one(&db.pool)
            .await?;
    if !exists {
        let create = format!("CREATE DATABASE {CLIENT_DATABASE}");
        sqlx::query(sqlx::AssertSqlSafe(create)).execute(&db.pool).await?;
    }
    let options = db.pool.connect_options().as_ref().clone().database(CLIENT_DATABASE);
    Ok(dealledger::db::pool_options().max_connections(8).connect_with(options).await?)
}
