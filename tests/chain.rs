//! Whole deals on the devnet chain: two nodes on 127.0.0.1 (each with its own database), the
//! devnet in a third, and each node's effect runner performing what its machines decide —
//! publish, sealing, activation, expiry, slashing, payment channels and voucher redemption.
//! The machines decide every step; the test only moves the devnet's clock.

use std::time::Duration;

use uuid::Uuid;

use cid::Cid;
use dealledger::adapters::chain::{
    Chain, ChainError, ChannelState, DealObservation, Devnet, DevnetConfig, DevnetSealer,
    MarketBalance, MessageKey, MessageStatus, OnChainDealState,
};
use dealledger::adapters::network::codec::MarketCodec;
use dealledger::adapters::network::provider::propose_retrieval;
use dealledger::adapters::transfer::retrieval::pull;
use dealledger::adapters::transfer::{TransferOptions, push};
use dealledger::db::testing::fresh_database;
use dealledger::deals::Deals;
use dealledger::domain::retrieval::ChannelAddress;
use dealledger::domain::retrieval::{
    ByteRange, PaymentVoucher, RetrievalDealProposal, SignedVoucher,
};
use dealledger::domain::storage::ClientDealProposal;
use dealledger::domain::storage::StorageDeal;
use dealledger::domain::{ChainEpoch, DealId, PartyKey, TokenAmount};
use dealledger::events::outbox;
use dealledger::fsm::fixtures::*;
use dealledger::fsm::retrieval_client::{RetrievalClient, RetrievalClientEvent as RC};
use dealledger::fsm::retrieval_provider::RetrievalProvider;
use dealledger::fsm::{
    Label, Machine, storage_client::StorageClient, storage_provider::StorageProvider,
};
use dealledger::runner::{EffectRunner, RunnerConfig, RunnerNetwork};

mod common;
use common::*;

type Runner = EffectRunner<Devnet, DevnetSealer>;

/// Two nodes, the devnet they share, and a runner per node.
struct Market {
    nodes: Nodes,
    devnet: Devnet,
    client: Runner,
    provider: Runner,
}

const WALLET: TokenAmount = TokenAmount(1_000_000_000_000_000_000_000);

async fn market() -> Market {
    market_with(DevnetConfig { genesis_epoch: NOW, ..DevnetConfig::default() }).await
}

async fn market_with(config: DevnetConfig) -> Market {
    let (pool, _) = fresh_database(4).await.expect("a devnet database");
    let devnet = Devnet::open(pool, config).await.expect("the devnet opens");
    let channels = std::sync::Arc::new(devnet.clone());
    let nodes = nodes_checking(MarketCodec::default(), Some(channels)).await;
    for (party, key) in [(client_key(), "client"), (provider_key(), "provider")] {
        let party = PartyKey::of(&party);
        devnet.fund(party, WALLET, MessageKey::of("faucet", key.as_bytes())).await.unwrap();
    }
    let sealer = DevnetSealer::new(devnet.clone(), 2, 3);
    let config = RunnerConfig { watch_poll: Duration::from_millis(20), ..RunnerConfig::default() };
    let client = EffectRunner::new(
        nodes.client_deals.clone(),
        devnet.clone(),
        sealer.clone(),
        config.clone(),
    )
    .with_network(RunnerNetwork {
        client: nodes.client.clone(),
        key: client_key(),
        pieces: None,
        retrieved: None,
    });
    let provider = EffectRunner::new(nodes.provider_deals.clone(), devnet.clone(), sealer, config);
    Market { nodes, devnet, client, provider }
}

impl Market {
    /// Runs both nodes' effects until neither has anything new to feed its machines.
    async fn settle(&self) {
        for _ in 0..50 {
            self.client.recover().await.unwrap();
            self.provider.recover().await.unwrap();
            let fed = self.client.run_until_idle().await.unwrap().fed
                + self.provider.run_until_idle().await.unwrap().fed;
            if fed == 0 {
                return;
            }
        }
        panic!("the runners never settled");
    }

    /// The invariants every test ends on, on both nodes: a deal that ended holds no reserved
    /// funds, and every stream's chain and transitions verify.
    async fn assert_invariants(&self) {
        for deals in [&self.nodes.client_deals, &self.nodes.provider_deals] {
            let holding: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM storage_deals WHERE terminal AND funds_reserved <> 0",
            )
            .fetch_one(deals.journal().pool())
            .await
            .unwrap();
            assert_eq!(holding, 0, "a terminal deal still holds reserved funds");
            let report = dealledger::audit::verify::verify_all(deals.journal(), None, &mut |_| {})
                .await
                .unwrap();
            assert!(report.broken.is_empty(), "{:?}", report.broken);
        }
    }

    /// Moves the devnet's clock and lets both nodes react.
    async fn advance(&self, epochs: i64) -> ChainEpoch {
        let head = self.devnet.advance(epochs).await.unwrap();
        self.settle().await;
        head
    }

    async fn states(
        &self,
        proposal: &dealledger::domain::storage::ClientDealProposal,
    ) -> (&'static str, &'static str) {
        let c = self
            .nodes
            .client_deals
            .load::<StorageClient>(Deals::storage_stream_id(StorageClient::NAME, proposal))
            .await
            .unwrap();
        let p = self
            .nodes
            .provider_deals
            .load::<StorageProvider>(Deals::storage_stream_id(StorageProvider::NAME, proposal))
            .await
            .unwrap();
        (c.state.name(), p.state.name())
    }

    /// A piece of 64 KiB in the provider's store, and a client retrieval deal for all of it
    /// (3 attoFIL a byte, paid every 16 KiB) proposed and accepted. Returns the client's and
    /// the provider's deal streams.
    async fn proposed_retrieval(&self, seed: u8) -> (Uuid, Uuid) {
        let original = data(64 * 1024, seed);
        let (piece, size) = dealledger::adapters::piece::commp::commp_of(&original);
        self.nodes.pieces.put(piece, size, original.as_slice()).await.unwrap();
        let terms = RetrievalDealProposal {
            piece_cid: Some(piece),
            part: ByteRange { offset: 0, length: 64 * 1024 },
            price_per_byte: TokenAmount(3),
            payment_interval: 16 * 1024,
            payment_interval_increase: 0,
            unseal_price: TokenAmount(0),
            ..retrieval_terms()
        };
        let stream = Uuid::now_v7();
        let deals = &self.nodes.client_deals;
        let proposed = RC::DealProposed { proposal: Box::new(terms), part_of: None };
        deals.handle::<RetrievalClient>(stream, proposed, &ctx(), None).await.unwrap();
        let (_, provider_stream) =
            propose_retrieval(&self.nodes.client, deals, stream, &ctx()).await.unwrap();
        (stream, provider_stream.expect("the provider accepted the terms"))
    }

    /// A storage deal of 64 KiB proposed and pushed: the client waits for the provider's
    /// publish. Returns the proposal and the client's stream.
    async fn pushed_deal(&self, seed: u8) -> (ClientDealProposal, Uuid) {
        let bytes = data(64 * 1024, seed);
        let proposal = proposal_for(&bytes);
        let deals = &self.nodes.client_deals;
        let stream = deals.initiate_deal(proposal.clone(), &ctx()).await.unwrap().stream_id;
        // The client's runner deposits its funds and proposes.
        self.settle().await;
        assert_eq!(self.states(&proposal).await.0, "StartDataTransfer");
        let cursor = std::io::Cursor::new(&bytes);
        let pushed = push(
            &self.nodes.client,
            deals,
            stream,
            cursor,
            bytes.len() as u64,
            TransferOptions::default(),
            &ctx(),
        )
        .await
        .unwrap();
        assert_eq!(pushed, "CheckForAcceptance");
        (proposal, stream)
    }

    /// A storage deal of `bytes` proposed, pushed and brought to Active by the runners and
    /// the devnet. Returns the proposal and its on-chain deal id.
    async fn active_deal(
        &self,
        seed: u8,
    ) -> (dealledger::domain::storage::ClientDealProposal, DealId) {
        let (proposal, stream) = self.pushed_deal(seed).await;
        // Provider: collateral, publish, hand-off; client: status query, on-chain check.
        self.settle().await;
        assert_eq!(self.states(&proposal).await, ("AwaitingPreCommit", "AwaitingPreCommit"));
        self.advance(2).await;
        assert_eq!(self.states(&proposal).await, ("Sealing", "Sealing"));
        self.advance(3).await;
        assert_eq!(self.states(&proposal).await, ("Active", "Active"));
        let status = self.nodes.client_deals.get_storage_deal_status(stream).await.unwrap();
        let deal_id = status.deal_id.unwrap();
        (proposal, deal_id)
    }
}

#[tokio::test]
async fn a_storage_deal_runs_on_the_devnet_from_proposal_to_active_then_expired() {
    let m = market().await;
    let (proposal, deal_id) = m.active_deal(1).await;
    let p = &proposal.proposal;
    let seen = m.devnet.deal(deal_id).await.unwrap().expect("the deal is on chain");
    assert_eq!(seen.state(), OnChainDealState::Active);
    assert_eq!(seen.proposal_cid, Some(proposal.cid()));
    // Both sides' status rows agree with the chain.
    for (deals, side) in
        [(&m.nodes.client_deals, "storage_client"), (&m.nodes.provider_deals, "storage_provider")]
    {
        let rows: Vec<(String, String, Option<i64>)> =
            sqlx::query_as("SELECT side, state, deal_id FROM storage_deals")
                .fetch_all(deals.journal().pool())
                .await
                .unwrap();
        assert_eq!(rows, vec![(side.into(), "Active".into(), Some(deal_id.0 as i64))]);
    }
    // When the chain passes the deal's end epoch
    let head = m.devnet.head().await.unwrap();
    m.advance(p.end_epoch.0 - head.0 + 1).await;
    // Then both sides see it expire, and the market paid the provider the whole fee.
    assert_eq!(m.states(&proposal).await, ("Expired", "Expired"));
    let seen = m.devnet.deal(deal_id).await.unwrap().unwrap();
    assert_eq!(seen.state(), OnChainDealState::Expired);
    let fee = p.total_storage_fee().unwrap();
    let provider = m.devnet.market_balance(p.provider).await.unwrap();
    assert_eq!(provider.locked, TokenAmount::ZERO);
    assert_eq!(provider.escrow, p.provider_collateral.checked_add(fee).unwrap());
    let client = m.devnet.market_balance(p.client).await.unwrap();
    assert_eq!(client.locked, TokenAmount::ZERO);
    // Every effect of both nodes was performed; none is left waiting.
    for deals in [&m.nodes.client_deals, &m.nodes.provider_deals] {
        let open = outbox::pending(deals.journal().pool(), None, 100).await.unwrap();
        let chain_open: Vec<_> = open
            .iter()
            .filter(|e| dealledger::runner::CHAIN_EFFECTS.contains(&e.effect_type.as_str()))
            .map(|e| e.effect_type.clone())
            .collect();
        assert!(chain_open.is_empty(), "effects left: {chain_open:?}");
    }
    m.assert_invariants().await;
}

#[tokio::test]
async fn a_slashed_deal_ends_slashed_on_both_sides_and_burns_the_provider_collateral() {
    let m = market().await;
    let (proposal, deal_id) = m.active_deal(2).await;
    let before = m.devnet.market_balance(proposal.proposal.provider).await.unwrap();
    // Given the deal has been stored for 25 epochs past its start
    let head = m.devnet.head().await.unwrap();
    m.advance(proposal.proposal.start_epoch.0 - head.0 + 25).await;
    // When the provider fails to prove the sector
    m.devnet.slash(deal_id).await.unwrap();
    m.advance(1).await;
    // Then both deals end Slashed, and the provider lost its collateral.
    assert_eq!(m.states(&proposal).await, ("Slashed", "Slashed"));
    let after = m.devnet.market_balance(proposal.proposal.provider).await.unwrap();
    assert_eq!(after.locked, TokenAmount::ZERO);
    let earned = after.escrow.0 + proposal.proposal.provider_collateral.0 - before.escrow.0;
    let price = proposal.proposal.storage_price_per_epoch.0;
    assert_eq!(earned, 25 * price, "the provider is paid for the epochs it stored, no more");
    let client = m.devnet.market_balance(proposal.proposal.client).await.unwrap();
    assert_eq!(client.locked, TokenAmount::ZERO, "the rest of the fee went back to the client");
    m.assert_invariants().await;
}

#[tokio::test]
async fn a_deal_whose_sealing_fails_fails_on_the_provider_and_times_out_on_chain() {
    let m = market().await;
    let bytes = data(32 * 1024, 3);
    let proposal = proposal_for(&bytes);
    let deals = &m.nodes.client_deals;
    let stream = deals.initiate_deal(proposal.clone(), &ctx()).await.unwrap().stream_id;
    m.settle().await;
    let cursor = std::io::Cursor::new(&bytes);
    push(
        &m.nodes.client,
        deals,
        stream,
        cursor,
        bytes.len() as u64,
        TransferOptions::default(),
        &ctx(),
    )
    .await
    .unwrap();
    m.settle().await;
    let deal_id = deals.get_storage_deal_status(stream).await.unwrap().deal_id.unwrap();
    // When the sealing pipeline fails the sector
    m.devnet.fail_sealing(deal_id, "disk full").await.unwrap();
    m.settle().await;
    // Then the provider's deal fails through Failing, and the client learns at the start
    // epoch, when the chain drops the deal it never saw activated.
    assert_eq!(m.states(&proposal).await.1, "Error");
    let head = m.devnet.head().await.unwrap();
    m.advance(proposal.proposal.start_epoch.0 - head.0 + 1).await;
    assert_eq!(m.states(&proposal).await, ("Error", "Error"));
    assert_eq!(m.devnet.deal(deal_id).await.unwrap().unwrap().state(), OnChainDealState::TimedOut);
    let client = m.devnet.market_balance(proposal.proposal.client).await.unwrap();
    assert_eq!(client.locked, TokenAmount::ZERO, "the client's funds were unlocked");
    m.assert_invariants().await;
}

#[tokio::test]
async fn a_retrieval_is_paid_through_a_devnet_channel_and_the_provider_collects_the_vouchers() {
    let m = market().await;
    let original = data(1 << 20, 7);
    let (piece, size) = dealledger::adapters::piece::commp::commp_of(&original);
    m.nodes.pieces.put(piece, size, original.as_slice()).await.unwrap();
    let terms = RetrievalDealProposal {
        piece_cid: Some(piece),
        part: ByteRange { offset: 0, length: 1 << 20 },
        price_per_byte: TokenAmount(3),
        payment_interval: 256 * 1024,
        payment_interval_increase: 128 * 1024,
        unseal_price: TokenAmount(0),
        ..retrieval_terms()
    };
    let total = terms.total_price().unwrap();
    let stream = Uuid::now_v7();
    let deals = &m.nodes.client_deals;
    let proposed = RC::DealProposed { proposal: Box::new(terms.clone()), part_of: None };
    deals.handle::<RetrievalClient>(stream, proposed, &ctx(), None).await.unwrap();
    let (state, provider_stream) =
        propose_retrieval(&m.nodes.client, deals, stream, &ctx()).await.unwrap();
    assert_eq!(state, "Accepted");
    // The client's runner creates the channel with the deal's price and allocates a lane.
    m.settle().await;
    let client_deal = deals.load::<RetrievalClient>(stream).await.unwrap();
    assert_eq!(client_deal.state.name(), "Ongoing");
    let channel = client_deal.data.channel.clone().expect("a real channel");
    let state = m.devnet.channel(&channel).await.unwrap().expect("the channel is on chain");
    assert_eq!(state.balance, total);
    let wallet_before = m.devnet.wallet_balance(terms.provider).await.unwrap();
    let outcome = pull(
        &m.nodes.client,
        deals,
        stream,
        provider_stream.unwrap(),
        &client_key(),
        TokenAmount(u128::MAX),
        &ctx(),
    )
    .await
    .unwrap();
    assert_eq!((outcome.state, outcome.paid), ("Completed", total));
    assert!(outcome.bytes == original);
    // The provider's runner redeems the last voucher; settle and collect pay it out.
    m.settle().await;
    let provider =
        m.nodes.provider_deals.load::<RetrievalProvider>(provider_stream.unwrap()).await.unwrap();
    assert_eq!(provider.state.name(), "Completed");
    assert_eq!(m.devnet.channel(&channel).await.unwrap().unwrap().redeemed, total);
    // A voucher with a bad signature, or one replaying a redeemed nonce, is refused.
    let lane = client_deal.data.lane.unwrap();
    let forged = SignedVoucher::sign(
        PaymentVoucher { channel: channel.clone(), lane, nonce: 99, amount: total },
        &provider_key(),
    );
    assert!(m.devnet.check_voucher(&forged).await.is_err(), "a forged voucher passes");
    let replayed = SignedVoucher::sign(
        PaymentVoucher { channel: channel.clone(), lane, nonce: 0, amount: total },
        &client_key(),
    );
    assert!(m.devnet.submit_voucher(&replayed).await.is_err(), "a replayed nonce passes");
    m.devnet.settle(&channel).await.unwrap();
    m.devnet.advance(DevnetConfig::default().settle_delay).await.unwrap();
    m.devnet.collect(&channel).await.unwrap();
    let wallet_after = m.devnet.wallet_balance(terms.provider).await.unwrap();
    assert_eq!(
        wallet_after.0 - wallet_before.0,
        total.0,
        "the provider collects exactly the vouchers"
    );
    m.assert_invariants().await;
}

#[tokio::test]
async fn a_runner_that_dies_holding_effects_is_replaced_and_nothing_is_done_twice() {
    let m = market().await;
    let bytes = data(16 * 1024, 9);
    let proposal = proposal_for(&bytes);
    let deals = &m.nodes.client_deals;
    deals.initiate_deal(proposal.clone(), &ctx()).await.unwrap();
    // Given a runner that claimed the deposit effect and died before finishing it
    let pool = deals.journal().pool();
    let claimed =
        outbox::claim(pool, &["reserve-funds"], Duration::from_millis(50), 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    // ...after its chain message went out
    let effect: dealledger::fsm::effects::Effect =
        postcard::from_bytes(&claimed[0].payload).unwrap();
    let dealledger::fsm::effects::Effect::ReserveFunds { wallet, amount } = effect else {
        panic!("{effect:?}");
    };
    let key = dealledger::runner::message_key(&claimed[0]);
    m.devnet.add_balance(wallet, amount, key).await.unwrap();
    // When its lease runs out and another runner starts
    tokio::time::sleep(Duration::from_millis(80)).await;
    m.settle().await;
    // Then the deal moved on once (funded, then proposed), and the deposit was made once.
    assert_eq!(m.states(&proposal).await.0, "StartDataTransfer");
    let balance = m.devnet.market_balance(wallet).await.unwrap();
    assert_eq!(balance.escrow, amount, "the deposit happened exactly once");
}

#[tokio::test]
async fn observations_are_acted_on_only_once_final() {
    // Given a chain whose observations are final 5 epochs deep
    let m =
        market_with(DevnetConfig { genesis_epoch: NOW, finality: 5, ..DevnetConfig::default() })
            .await;
    let (proposal, _) = m.pushed_deal(11).await;
    m.settle().await;
    // Then the publish message landed but is not final: both sides wait
    assert_eq!(m.states(&proposal).await, ("CheckForAcceptance", "Publishing"));
    m.advance(4).await;
    assert_eq!(m.states(&proposal).await, ("CheckForAcceptance", "Publishing"));
    m.advance(1).await;
    assert_eq!(m.states(&proposal).await, ("AwaitingPreCommit", "AwaitingPreCommit"));
    // When the sector is pre-committed (2 epochs after hand-off), nobody acts before it is final
    m.advance(2).await;
    assert_eq!(m.states(&proposal).await, ("AwaitingPreCommit", "AwaitingPreCommit"));
    m.advance(5).await;
    assert_eq!(m.states(&proposal).await.1, "Sealing");
}

#[tokio::test]
async fn nodes_left_running_follow_the_chain_by_themselves() {
    let m = market().await;
    let (proposal, _) = m.pushed_deal(12).await;
    // Given both nodes' runners running and the devnet's clock ticking in real time
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let client = tokio::spawn(m.client.clone().run(until_stopped(stopped.clone())));
    let provider = tokio::spawn(m.provider.clone().run(until_stopped(stopped)));
    let clock = m.devnet.clone().run_clock(Duration::from_millis(20));
    // Then the deal becomes Active on both sides with no one driving it
    let started = std::time::Instant::now();
    while m.states(&proposal).await != ("Active", "Active") {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "stuck at {:?}",
            m.states(&proposal).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    clock.abort();
    stop.send(true).unwrap();
    client.await.unwrap().unwrap();
    provider.await.unwrap().unwrap();
}

/// The devnet, with publishing failing a set number of times: as if the node were
/// unreachable (recoverable), or refusing the message for good (fatal).
#[derive(Clone)]
struct FlakyPublish {
    devnet: Devnet,
    failures_left: std::sync::Arc<std::sync::atomic::AtomicU32>,
    fatal: bool,
}

impl Chain for FlakyPublish {
    async fn head(&self) -> Result<ChainEpoch, ChainError> {
        self.devnet.head().await
    }
    fn finality(&self) -> i64 {
        self.devnet.finality()
    }
    async fn market_balance(&self, party: PartyKey) -> Result<MarketBalance, ChainError> {
        self.devnet.market_balance(party).await
    }
    async fn add_balance(
        &self,
        party: PartyKey,
        amount: TokenAmount,
        key: MessageKey,
    ) -> Result<Cid, ChainError> {
        self.devnet.add_balance(party, amount, key).await
    }
    async fn withdraw_balance(
        &self,
        party: PartyKey,
        amount: TokenAmount,
        key: MessageKey,
    ) -> Result<Cid, ChainError> {
        self.devnet.withdraw_balance(party, amount, key).await
    }
    async fn publish_storage_deal(&self, deal: &StorageDeal) -> Result<Cid, ChainError> {
        use std::sync::atomic::Ordering;
        let left = self.failures_left.load(Ordering::SeqCst);
        if left > 0 {
            self.failures_left.store(left - 1, Ordering::SeqCst);
            if self.fatal {
                return Err(ChainError::Refused { reason: "deal label not allowed".into() });
            }
            return Err(ChainError::Unavailable("node restarting".into()));
        }
        self.devnet.publish_storage_deal(deal).await
    }
    async fn message_status(&self, message: Cid) -> Result<MessageStatus, ChainError> {
        self.devnet.message_status(message).await
    }
    async fn deal(&self, deal_id: DealId) -> Result<Option<DealObservation>, ChainError> {
        self.devnet.deal(deal_id).await
    }
    async fn get_or_create_channel(
        &self,
        from: PartyKey,
        to: PartyKey,
        amount: TokenAmount,
        key: MessageKey,
    ) -> Result<ChannelAddress, ChainError> {
        self.devnet.get_or_create_channel(from, to, amount, key).await
    }
    async fn channel_between(
        &self,
        from: PartyKey,
        to: PartyKey,
    ) -> Result<Option<ChannelAddress>, ChainError> {
        self.devnet.channel_between(from, to).await
    }
    async fn channel(&self, channel: &ChannelAddress) -> Result<Option<ChannelState>, ChainError> {
        self.devnet.channel(channel).await
    }
    async fn allocate_lane(
        &self,
        channel: &ChannelAddress,
        key: MessageKey,
    ) -> Result<u64, ChainError> {
        self.devnet.allocate_lane(channel, key).await
    }
    async fn check_voucher(&self, voucher: &SignedVoucher) -> Result<(), ChainError> {
        self.devnet.check_voucher(voucher).await
    }
    async fn submit_voucher(&self, voucher: &SignedVoucher) -> Result<TokenAmount, ChainError> {
        self.devnet.submit_voucher(voucher).await
    }
    async fn settle(&self, channel: &ChannelAddress) -> Result<ChainEpoch, ChainError> {
        self.devnet.settle(channel).await
    }
    async fn collect(&self, channel: &ChannelAddress) -> Result<(), ChainError> {
        self.devnet.collect(channel).await
    }
}

/// The market's provider runner replaced by one publishing through a flaky chain.
async fn flaky_provider(m: &Market, failures: u32) -> EffectRunner<FlakyPublish, DevnetSealer> {
    flaky_runner(m, failures, false)
}

fn flaky_runner(
    m: &Market,
    failures: u32,
    fatal: bool,
) -> EffectRunner<FlakyPublish, DevnetSealer> {
    let flaky = FlakyPublish {
        devnet: m.devnet.clone(),
        failures_left: std::sync::Arc::new(std::sync::atomic::AtomicU32::new(failures)),
        fatal,
    };
    let config = RunnerConfig {
        backoff: Duration::from_millis(5),
        max_attempts: 3,
        watch_poll: Duration::from_millis(20),
        ..RunnerConfig::default()
    };
    EffectRunner::new(
        m.nodes.provider_deals.clone(),
        flaky,
        DevnetSealer::new(m.devnet.clone(), 2, 3),
        config,
    )
}

/// Runs `runner` until its effects are done or waiting, sleeping through backoffs.
async fn drain(runner: &EffectRunner<FlakyPublish, DevnetSealer>) {
    for _ in 0..40 {
        runner.run_until_idle().await.unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
}

#[tokio::test]
async fn a_publish_that_fails_for_a_while_is_retried_with_backoff_and_succeeds() {
    let m = market().await;
    let (proposal, _) = m.pushed_deal(13).await;
    // Given a chain that cannot take the publish twice (the limit is 3 attempts)
    let provider = flaky_provider(&m, 2).await;
    drain(&provider).await;
    // Then the third attempt published the deal, once
    assert_eq!(m.states(&proposal).await.1, "AwaitingPreCommit");
    let publishes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM devnet.messages WHERE method = 'PublishStorageDeals'",
    )
    .fetch_one(m.devnet.pool())
    .await
    .unwrap();
    assert_eq!(publishes, 1);
}

/// The provider deal's row: state, failure class, attempts, whether a retry is scheduled,
/// and the message.
async fn failure_row(m: &Market, proposal: &ClientDealProposal) -> FailureRow {
    let stream = Deals::storage_stream_id(StorageProvider::NAME, proposal);
    sqlx::query_as(
        "SELECT state, failure_class, attempts, next_retry_at IS NOT NULL, message \
         FROM storage_deals WHERE stream_id = $1",
    )
    .bind(stream)
    .fetch_one(m.nodes.provider_deals.journal().pool())
    .await
    .unwrap()
}

type FailureRow = (String, Option<String>, i32, bool, Option<String>);

/// The provider deal's inputs, in order.
async fn provider_inputs(m: &Market, proposal: &ClientDealProposal) -> Vec<&'static str> {
    let stream = Deals::storage_stream_id(StorageProvider::NAME, proposal);
    let deals = &m.nodes.provider_deals;
    let audit = dealledger::audit::timeline::audit(deals.journal(), stream, None).await.unwrap();
    audit.entries.iter().filter_map(|e| e.input).collect()
}

async fn publishes(m: &Market) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM devnet.messages WHERE method = 'PublishStorageDeals'")
        .fetch_one(m.devnet.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_publish_that_keeps_failing_pauses_for_an_operator_who_can_fail_it() {
    let m = market().await;
    let (proposal, _) = m.pushed_deal(14).await;
    // Given a chain that never takes the publish (unreachable: a recoverable failure)
    let provider = flaky_provider(&m, u32::MAX).await;
    drain(&provider).await;
    // Then after 3 attempts, each recorded, the deal waits for an operator: its row shows the
    // class, the attempts and the reason, and no retry is scheduled any more.
    let (state, class, attempts, scheduled, message) = failure_row(&m, &proposal).await;
    assert_eq!(
        (state.as_str(), class.as_deref(), attempts),
        ("PublishPaused", Some("recoverable"), 3)
    );
    assert!(!scheduled);
    assert!(message.unwrap_or_default().contains("node restarting"));
    let inputs = provider_inputs(&m, &proposal).await;
    assert!(inputs.ends_with(&["EffectRetrying", "EffectRetrying", "EffectStalled"]), "{inputs:?}");
    // When the operator fails it instead of retrying
    let stream = Deals::storage_stream_id(StorageProvider::NAME, &proposal);
    let deals = &m.nodes.provider_deals;
    assert_eq!(deals.fail(stream, "erin", "node is gone", &ctx()).await.unwrap(), "Failing");
    drain(&provider).await;
    // Then it goes through Failing to Error, its collateral deposit back in the wallet
    let (state, class, ..) = failure_row(&m, &proposal).await;
    assert_eq!((state.as_str(), class.as_deref()), ("Error", Some("fatal")));
    let balance = m.devnet.market_balance(proposal.proposal.provider).await.unwrap();
    assert_eq!(balance.escrow, TokenAmount::ZERO, "the collateral deposit went back to the wallet");
    m.assert_invariants().await;
}

#[tokio::test]
async fn a_publish_the_chain_refuses_for_good_fails_the_deal_at_once() {
    let m = market().await;
    let (proposal, _) = m.pushed_deal(16).await;
    // Given a chain that refuses the publish (a fatal failure)
    let provider = flaky_runner(&m, u32::MAX, true);
    drain(&provider).await;
    // Then the deal fails on the first attempt, through Failing, with the reason
    let (state, class, attempts, _, message) = failure_row(&m, &proposal).await;
    assert_eq!((state.as_str(), class.as_deref(), attempts), ("Error", Some("fatal"), 0));
    assert!(message.unwrap_or_default().contains("deal label not allowed"));
    let inputs = provider_inputs(&m, &proposal).await;
    assert!(inputs.ends_with(&["PublishFailed", "CleanupCompleted"]), "{inputs:?}");
    assert!(!inputs.contains(&"EffectRetrying"));
    m.assert_invariants().await;
}

#[tokio::test]
async fn a_publish_short_of_funds_pauses_until_an_operator_adds_funds_and_retries() {
    let m = market().await;
    let (proposal, client_stream) = m.pushed_deal(15).await;
    let p = &proposal.proposal;
    // Given the client's market escrow was withdrawn after it reserved: the deal cannot lock it
    let need = p.client_balance_requirement().unwrap();
    m.devnet.withdraw_balance(p.client, need, MessageKey::of("test", b"drain")).await.unwrap();
    // When the provider's runner tries to publish
    let provider = flaky_provider(&m, 0).await;
    drain(&provider).await;
    // Then the deal pauses, recoverable, with the chain's reason; nothing was published
    let (state, class, attempts, _, message) = failure_row(&m, &proposal).await;
    assert_eq!(
        (state.as_str(), class.as_deref(), attempts),
        ("PublishPaused", Some("recoverable"), 3)
    );
    assert!(message.unwrap_or_default().contains("insufficient funds"));
    assert_eq!(publishes(&m).await, 0);
    // When the client adds funds and the provider's operator retries
    m.devnet.add_balance(p.client, need, MessageKey::of("test", b"refill")).await.unwrap();
    let stream = Deals::storage_stream_id(StorageProvider::NAME, &proposal);
    let deals = &m.nodes.provider_deals;
    assert_eq!(deals.retry(stream, "carol", "client topped up", &ctx()).await.unwrap(), "Publish");
    drain(&provider).await;
    m.settle().await;
    m.advance(2).await;
    m.advance(3).await;
    // Then both sides reach Active with exactly one publish on the devnet, and audit shows who
    // retried and why
    assert_eq!(m.states(&proposal).await, ("Active", "Active"));
    assert_eq!(publishes(&m).await, 1);
    let audit = dealledger::audit::timeline::audit(deals.journal(), stream, None).await.unwrap();
    let retried = audit.entries.iter().find(|e| e.input == Some("RetryRequested")).unwrap();
    assert_eq!(retried.to, Some("Publish"));
    let json = serde_json::to_string(&retried.event).unwrap();
    assert!(json.contains("retried by carol: client topped up"), "{json}");
    let client = m.nodes.client_deals.get_storage_deal_status(client_stream).await.unwrap();
    assert_eq!(client.state, "Active");
    m.assert_invariants().await;
}

#[tokio::test]
async fn a_deal_that_is_not_paused_refuses_a_retry_and_records_nothing() {
    let m = market().await;
    let (proposal, _) = m.pushed_deal(17).await;
    let stream = Deals::storage_stream_id(StorageProvider::NAME, &proposal);
    let deals = &m.nodes.provider_deals;
    let before = deals.journal().head(stream).await.unwrap().version;
    let refused = deals.retry(stream, "carol", "just because", &ctx()).await;
    assert!(matches!(refused, Err(dealledger::deals::DealsError::Rejected(_))), "{refused:?}");
    assert_eq!(deals.journal().head(stream).await.unwrap().version, before);
}

#[tokio::test]
async fn a_pull_without_a_funded_channel_or_with_a_foreign_voucher_is_refused() {
    use dealledger::adapters::network::message::{MarketRequest, MarketResponse};
    let m = market().await;
    let (stream, provider_stream) = m.proposed_retrieval(15).await;
    let deals = &m.nodes.client_deals;
    // Given no payment channel on chain yet: the provider sends nothing
    let pull = MarketRequest::RetrievalPull { deal_stream: provider_stream, offset: 0 };
    let answer = m.nodes.client.request(m.nodes.provider_peer, pull.clone()).await.unwrap();
    assert!(
        matches!(&answer, MarketResponse::Rejected { reason } if reason.contains("no payment channel")),
        "{answer:?}"
    );
    let provider = m.nodes.provider_deals.load::<RetrievalProvider>(provider_stream).await.unwrap();
    assert_eq!((provider.state.name(), provider.data.bytes_sent), ("Unsealed", 0));
    // When the client's runner funds the channel, bytes flow
    m.settle().await;
    let answer = m.nodes.client.request(m.nodes.provider_peer, pull).await.unwrap();
    assert!(
        matches!(answer, MarketResponse::RetrievalBlocks { ref bytes, .. } if !bytes.is_empty())
    );
    // A voucher signed by someone else than the channel's payer is refused, and not taken
    let channel = deals.load::<RetrievalClient>(stream).await.unwrap().data.channel.unwrap();
    let forged = SignedVoucher::sign(
        PaymentVoucher { channel, lane: 0, nonce: 1, amount: TokenAmount(3 * 16 * 1024) },
        &provider_key(),
    );
    let pay =
        MarketRequest::RetrievalPay { deal_stream: provider_stream, voucher: Box::new(forged) };
    let answer = m.nodes.client.request(m.nodes.provider_peer, pay).await.unwrap();
    assert!(matches!(answer, MarketResponse::Rejected { .. }), "{answer:?}");
    let provider = m.nodes.provider_deals.load::<RetrievalProvider>(provider_stream).await.unwrap();
    assert_eq!((provider.state.name(), provider.data.paid), ("FundsNeeded", TokenAmount::ZERO));
}

#[tokio::test]
async fn a_client_node_drives_a_deal_from_staged_data_to_active_by_itself() {
    let m = market().await;
    // Given a client whose runner proposes and pushes staged pieces
    let staged = dealledger::adapters::piece::store::PieceStore::new(
        dealledger::db::testing::scratch_dir("staged").expect("a scratch directory"),
    );
    let bytes = data(200 * 1024, 16);
    let (piece, size, _) = staged.stage(bytes.as_slice()).await.unwrap();
    let network = RunnerNetwork {
        client: m.nodes.client.clone(),
        key: client_key(),
        pieces: Some(staged),
        retrieved: None,
    };
    let config = RunnerConfig { watch_poll: Duration::from_millis(20), ..RunnerConfig::default() };
    let client = EffectRunner::new(
        m.nodes.client_deals.clone(),
        m.devnet.clone(),
        DevnetSealer::new(m.devnet.clone(), 2, 3),
        config,
    )
    .with_network(network);
    let mut terms = proposal_for(&bytes).proposal;
    (terms.piece_cid, terms.piece_size) = (piece, size);
    let proposal = ClientDealProposal::sign(terms, &client_key());
    // When the only thing the client does is initiate the deal
    m.nodes.client_deals.initiate_deal(proposal.clone(), &ctx()).await.unwrap();
    for _ in 0..20 {
        client.recover().await.unwrap();
        client.run_until_idle().await.unwrap();
        m.settle().await;
        if m.states(&proposal).await == ("Active", "Active") {
            break;
        }
        m.devnet.advance(1).await.unwrap();
    }
    // Then funding, proposal, push, commP check, publish, sealing and activation all happened
    assert_eq!(m.states(&proposal).await, ("Active", "Active"));
    let stored = m.nodes.pieces.read_range(&piece, 0, bytes.len() as u64).await.unwrap();
    assert!(stored == bytes, "the provider keeps exactly the staged bytes");
}

#[tokio::test]
async fn a_client_node_retrieves_a_whole_piece_part_by_part_by_itself() {
    use dealledger::domain::retrieval::RetrievalRequest;
    use dealledger::fsm::retrieval_request::RetrievalRequestMachine;
    let m = market().await;
    // Given a piece the provider stores
    let original = data(300 * 1024, 17);
    let (piece, size) = dealledger::adapters::piece::commp::commp_of(&original);
    m.nodes.pieces.put(piece, size, original.as_slice()).await.unwrap();
    // and a client whose runner drives retrievals into a directory
    let retrieved = dealledger::db::testing::scratch_dir("retrieved").expect("a scratch directory");
    let network = RunnerNetwork {
        client: m.nodes.client.clone(),
        key: client_key(),
        pieces: None,
        retrieved: Some(retrieved.clone()),
    };
    let config = RunnerConfig { watch_poll: Duration::from_millis(20), ..RunnerConfig::default() };
    let client = EffectRunner::new(
        m.nodes.client_deals.clone(),
        m.devnet.clone(),
        DevnetSealer::new(m.devnet.clone(), 2, 3),
        config,
    )
    .with_network(network);
    // When the only thing the client does is ask for the piece, in three parts
    let request = RetrievalRequest {
        payload_cid: piece.cid(),
        piece_cid: Some(piece),
        total_bytes: original.len() as u64,
        part_size: 100 * 1024,
        provider: PartyKey::of(&provider_key()),
        client: PartyKey::of(&client_key()),
        max_price_per_byte: TokenAmount(5),
    };
    let request_id = m.nodes.client_deals.initiate_retrieval(request, 3, &ctx()).await.unwrap();
    for _ in 0..40 {
        client.recover().await.unwrap();
        client.run_until_idle().await.unwrap();
        m.settle().await;
        let state = m.nodes.client_deals.load::<RetrievalRequestMachine>(request_id).await.unwrap();
        if state.state.name() == "Completed" {
            break;
        }
    }
    // Then every part was fetched and paid through a channel, and the file holds the piece
    let status = m.nodes.client_deals.get_retrieval_status(request_id).await.unwrap();
    assert_eq!(
        (status.state, status.parts_completed, status.bytes_done),
        ("Completed", 3, original.len() as u64)
    );
    assert!(status.total_paid.0 > 0);
    let file = tokio::fs::read(retrieved.join(format!("{request_id}.bin"))).await.unwrap();
    assert!(file == original, "the retrieved file differs from the piece");
}

#[tokio::test]
async fn a_rejected_proposal_ends_in_error_on_both_sides_with_the_deposit_returned() {
    let m = market().await;
    // Given a proposal priced below the provider's ask
    let mut terms = proposal_for(&data(16 * 1024, 18)).proposal;
    terms.storage_price_per_epoch = TokenAmount(0);
    let proposal = ClientDealProposal::sign(terms, &client_key());
    m.nodes.client_deals.initiate_deal(proposal.clone(), &ctx()).await.unwrap();
    // When the runners deposit, propose and clean up after the rejection
    m.settle().await;
    // Then both deals end in Error, and the client's deposit went back to its wallet, to the
    // last attoFIL
    assert_eq!(m.states(&proposal).await, ("Error", "Error"));
    let escrow = m.devnet.market_balance(proposal.proposal.client).await.unwrap().escrow;
    assert_eq!(escrow, TokenAmount::ZERO);
    assert_eq!(m.devnet.wallet_balance(proposal.proposal.client).await.unwrap(), WALLET);
    m.assert_invariants().await;
}

#[tokio::test]
async fn an_operator_cancels_a_deal_and_its_funds_come_back() {
    let m = market().await;
    // Given a deal the provider accepted, before any data moved
    let proposal = proposal_for(&data(16 * 1024, 19));
    let deal = m.nodes.client_deals.initiate_deal(proposal.clone(), &ctx()).await.unwrap();
    m.settle().await;
    assert_eq!(m.states(&proposal).await.0, "StartDataTransfer");
    // When an operator cancels it
    let state =
        m.nodes.client_deals.cancel(deal.stream_id, "alice", "wrong file", &ctx()).await.unwrap();
    assert_eq!(state, "Failing");
    m.settle().await;
    // Then it ends in Error with who and why, and the deposit went back to the wallet
    let status = m.nodes.client_deals.get_storage_deal_status(deal.stream_id).await.unwrap();
    assert_eq!(status.state, "Error");
    assert_eq!(status.message.as_deref(), Some("cancelled by alice: wrong file"));
    let escrow = m.devnet.market_balance(proposal.proposal.client).await.unwrap().escrow;
    assert_eq!(escrow, TokenAmount::ZERO);
    // And the provider was told over the network: its side went through Failing to Error too,
    // its collateral deposit back in its wallet
    let provider_stream = Deals::storage_stream_id(StorageProvider::NAME, &proposal);
    let provider = m.nodes.provider_deals.get_storage_deal_status(provider_stream).await.unwrap();
    assert_eq!(
        (provider.state, provider.message.as_deref()),
        ("Error", Some("cancelled by the client: cancelled by alice: wrong file"))
    );
    let escrow = m.devnet.market_balance(proposal.proposal.provider).await.unwrap().escrow;
    assert_eq!(escrow, TokenAmount::ZERO);
    // An active deal cannot be cancelled: it ends on chain
    let (active, _) = m.active_deal(20).await;
    let stream = Deals::storage_stream_id(StorageClient::NAME, &active);
    let refused = m.nodes.client_deals.cancel(stream, "alice", "changed my mind", &ctx()).await;
    assert!(matches!(refused, Err(dealledger::deals::DealsError::Rejected(_))), "{refused:?}");
    m.assert_invariants().await;
}

#[tokio::test]
async fn a_cancelled_retrieval_request_cancels_its_deal_and_ends_cancelled() {
    use dealledger::domain::retrieval::RetrievalRequest;
    use dealledger::fsm::retrieval_request::RetrievalRequestMachine;
    let m = market().await;
    let original = data(64 * 1024, 21);
    let (piece, size) = dealledger::adapters::piece::commp::commp_of(&original);
    m.nodes.pieces.put(piece, size, original.as_slice()).await.unwrap();
    let request = RetrievalRequest {
        payload_cid: piece.cid(),
        piece_cid: Some(piece),
        total_bytes: original.len() as u64,
        part_size: 32 * 1024,
        provider: PartyKey::of(&provider_key()),
        client: PartyKey::of(&client_key()),
        max_price_per_byte: TokenAmount(5),
    };
    let deals = &m.nodes.client_deals;
    let request_id = deals.initiate_retrieval(request, 3, &ctx()).await.unwrap();
    // Given its first part's deal was started (no data pulled: this runner does not pull)
    let retrieved = dealledger::db::testing::scratch_dir("cancel").expect("a scratch directory");
    let network = RunnerNetwork {
        client: m.nodes.client.clone(),
        key: client_key(),
        pieces: None,
        retrieved: Some(retrieved),
    };
    let config = RunnerConfig { watch_poll: Duration::from_millis(20), ..RunnerConfig::default() };
    let starter = EffectRunner::new(
        deals.clone(),
        m.devnet.clone(),
        DevnetSealer::new(m.devnet.clone(), 2, 3),
        config,
    )
    .with_network(network);
    let claimed = dealledger::events::outbox::claim(
        deals.journal().pool(),
        &["start-retrieval-deal"],
        Duration::from_millis(1),
        10,
    )
    .await
    .unwrap();
    assert_eq!(claimed.len(), 1);
    tokio::time::sleep(Duration::from_millis(5)).await;
    starter.run_once().await.unwrap();
    let part =
        deals.load::<RetrievalRequestMachine>(request_id).await.unwrap().data.parts[0].deal_stream;
    let part = part.expect("the first part has a deal");
    // and proposed to the provider, in the runner's next round (the runners perform different
    // deals' effects side by side, so without this round the request's cancel could overtake
    // the proposal, which is then rightly never sent, and the provider never hears of it)
    starter.run_once().await.unwrap();
    let provider_stream = dealledger::adapters::network::message::provider_retrieval_stream(
        &m.nodes.client.peer_id(),
        part,
    );
    let provider = m.nodes.provider_deals.load::<RetrievalProvider>(provider_stream).await;
    assert!(provider.unwrap().version > 0, "the provider recorded the proposal");
    // When an operator cancels the request
    assert_eq!(deals.cancel(request_id, "bob", "not needed", &ctx()).await.unwrap(), "Cancelling");
    m.settle().await;
    // Then its deal was cancelled too, and the request ended Cancelled
    let request = deals.load::<RetrievalRequestMachine>(request_id).await.unwrap();
    assert_eq!(request.state.name(), "Cancelled");
    let deal = deals.load::<RetrievalClient>(part).await.unwrap();
    assert!(matches!(deal.state.name(), "Cancelled" | "Cancelling"), "{}", deal.state.name());
    // And the provider heard of it: its side of the deal is cancelled too
    starter.run_until_idle().await.unwrap();
    m.settle().await;
    let provider = m.nodes.provider_deals.load::<RetrievalProvider>(provider_stream).await.unwrap();
    assert!(
        matches!(provider.state.name(), "Cancelled" | "Cancelling"),
        "{}",
        provider.state.name()
    );
}

#[tokio::test]
async fn an_operator_fails_a_sealing_deal_by_hand_and_it_goes_through_failing() {
    let m = market().await;
    let (proposal, _) = m.pushed_deal(22).await;
    m.settle().await;
    assert_eq!(m.states(&proposal).await.1, "AwaitingPreCommit");
    // When the provider's operator fails it by hand
    let stream = Deals::storage_stream_id(StorageProvider::NAME, &proposal);
    let deals = &m.nodes.provider_deals;
    assert_eq!(deals.fail(stream, "dave", "disk broken", &ctx()).await.unwrap(), "Failing");
    m.settle().await;
    // Then it went through Failing to Error, with who and why
    let status = deals.get_storage_deal_status(stream).await.unwrap();
    assert_eq!(
        (status.state, status.message.as_deref()),
        ("Error", Some("failed by dave: disk broken"))
    );
    let audit = dealledger::audit::timeline::audit(deals.journal(), stream, None).await.unwrap();
    let path: Vec<_> = audit.entries.iter().filter_map(|e| e.to).collect();
    assert!(path.ends_with(&["Failing", "Error"]), "{path:?}");
    m.assert_invariants().await;
}

#[tokio::test]
async fn a_retrieval_whose_transfer_dies_ends_errored_on_both_sides_never_stuck_ongoing() {
    use dealledger::runner::{TimeoutPolicy, time_out_stuck_deals};
    let m = market().await;
    let (stream, provider_stream) = m.proposed_retrieval(23).await;
    let deals = &m.nodes.client_deals;
    m.settle().await;
    assert_eq!(deals.load::<RetrievalClient>(stream).await.unwrap().state.name(), "Ongoing");
    // Given the provider can no longer be reached (its address now leads nowhere)
    let (gone, _loop) =
        client_node(m.nodes.provider_peer, "/ip4/127.0.0.1/tcp/9".parse().unwrap()).await;
    let retrieved = dealledger::db::testing::scratch_dir("dies").expect("a scratch directory");
    let config = RunnerConfig {
        backoff: Duration::from_millis(5),
        max_attempts: 3,
        watch_poll: Duration::from_millis(20),
        ..RunnerConfig::default()
    };
    let puller = EffectRunner::new(
        deals.clone(),
        m.devnet.clone(),
        DevnetSealer::new(m.devnet.clone(), 2, 3),
        config,
    )
    .with_network(RunnerNetwork {
        client: gone,
        key: client_key(),
        pieces: None,
        retrieved: Some(retrieved),
    });
    // When the client's runner tries to pull, and the provider's timeout sweep runs
    for _ in 0..40 {
        puller.run_until_idle().await.unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    m.settle().await;
    let policy = TimeoutPolicy { after: Duration::ZERO, ..TimeoutPolicy::default() };
    let moved = time_out_stuck_deals(&m.nodes.provider_deals, &policy, &ctx()).await.unwrap();
    assert_eq!(moved, 1);
    m.settle().await;
    // Then the client recorded each lost attempt and failed with that reason, through Failing
    let audit = dealledger::audit::timeline::audit(deals.journal(), stream, None).await.unwrap();
    let inputs: Vec<_> = audit.entries.iter().filter_map(|e| e.input).collect();
    assert!(
        inputs.ends_with(&[
            "EffectRetrying",
            "EffectRetrying",
            "DataTransferFailed",
            "CleanupCompleted"
        ]),
        "{inputs:?}"
    );
    let (state, class, message): (String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT state, failure_class, message FROM retrieval_deals WHERE stream_id = $1",
    )
    .bind(stream)
    .fetch_one(deals.journal().pool())
    .await
    .unwrap();
    assert_eq!((state.as_str(), class.as_deref()), ("Errored", Some("fatal")));
    assert!(message.unwrap_or_default().contains("after 3 attempts"));
    // And the provider, which heard nothing more, timed out and ended Errored too
    let provider = m.nodes.provider_deals.load::<RetrievalProvider>(provider_stream).await.unwrap();
    assert_eq!(provider.state.name(), "Errored");
}

#[tokio::test]
async fn archived_deals_leave_the_hot_journal_and_still_audit_verify_and_checkpoint() {
    use dealledger::deals::retention::archive_ended;
    let m = market().await;
    // Given a deal that ended on both sides (rejected: below the provider's ask) and one that
    // is still going
    let mut terms = proposal_for(&data(16 * 1024, 24)).proposal;
    terms.storage_price_per_epoch = TokenAmount(0);
    let ended = ClientDealProposal::sign(terms, &client_key());
    m.nodes.client_deals.initiate_deal(ended.clone(), &ctx()).await.unwrap();
    m.settle().await;
    assert_eq!(m.states(&ended).await, ("Error", "Error"));
    let (going, _) = m.pushed_deal(25).await;
    let deals = &m.nodes.provider_deals;
    let journal = deals.journal();
    let before = journal.count().await.unwrap();
    let stream = Deals::storage_stream_id(StorageProvider::NAME, &ended);
    let history = journal.read_stream(stream, 1).await.unwrap();
    // When the provider archives deals that ended (here: any age)
    let moved = archive_ended(deals, Duration::ZERO, 100).await.unwrap();
    // Then only the ended deal moved, whole, with its effects; nothing was deleted
    assert_eq!((moved.streams, moved.events), (1, history.len() as u64));
    assert!(moved.effects > 0);
    assert_eq!(journal.count().await.unwrap(), before - history.len() as i64);
    assert_eq!(journal.archived_count().await.unwrap(), history.len() as i64);
    assert_eq!(journal.read_stream(stream, 1).await.unwrap(), history);
    let going_stream = Deals::storage_stream_id(StorageProvider::NAME, &going);
    let hot: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = $1")
        .bind(going_stream)
        .fetch_one(journal.pool())
        .await
        .unwrap();
    assert!(hot > 0, "a deal still going stays in the hot journal");
    // And audit, verify, checkpoints and rebuilds still read it
    let audit = dealledger::audit::timeline::audit(journal, stream, None).await.unwrap();
    assert!(audit.verdict.holds(), "{:?}", audit.verdict);
    let report = dealledger::audit::verify::verify_all(journal, None, &mut |_| {}).await.unwrap();
    assert!(report.broken.is_empty(), "{:?}", report.broken);
    assert_eq!(report.events, before as u64);
    let key = provider_key();
    dealledger::audit::checkpoint::create(journal, &key, chrono::Utc::now()).await.unwrap();
    let checked = dealledger::audit::checkpoint::verify_against(journal, None).await.unwrap();
    assert!(checked.unwrap().holds());
    let tables = dealledger::projections::rebuild::inline_tables(None).unwrap();
    let diffs =
        dealledger::projections::rebuild::check_inline(journal.pool(), &tables, &mut |_| {})
            .await
            .unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
    // And the archived deal still refuses what it refused before, with nothing appended
    let again = deals.receive_proposal(ended.clone(), &ctx(), None).await;
    assert!(matches!(again, Err(dealledger::deals::DealsError::Rejected(_))), "{again:?}");
    assert_eq!(journal.count().await.unwrap(), before - history.len() as i64);
    // (even written straight to the journal, a new first event for an archived stream is a
    // conflict, so a stream can never be forked across the two tables)
    let forged = dealledger::events::NewEvent::new("proposal-received", 1, vec![0]);
    let appended = journal.append(stream, StorageProvider::NAME, 0, &[forged]).await;
    assert!(
        matches!(appended, Err(dealledger::events::JournalError::Conflict { .. })),
        "{appended:?}"
    );
    assert_eq!(journal.read_stream(stream, 1).await.unwrap(), history);
    // And the events cannot be taken out of the archive
    let deleted = sqlx::query("DELETE FROM events_archive").execute(journal.pool()).await;
    assert!(deleted.is_err());
}

#[tokio::test]
async fn a_parts_notice_that_arrives_before_its_request_recorded_the_deal_waits_and_is_not_lost() {
    use dealledger::domain::retrieval::RetrievalRequest;
    use dealledger::fsm::retrieval_client::RequestPart;
    use dealledger::fsm::retrieval_request::{
        RetrievalRequestEvent as RR, RetrievalRequestMachine,
    };
    let m = market().await;
    let deals = &m.nodes.client_deals;
    let (piece, _) = dealledger::adapters::piece::commp::commp_of(&data(8 * 1024, 5));
    let request = RetrievalRequest {
        payload_cid: piece.cid(),
        piece_cid: Some(piece),
        total_bytes: 8 * 1024,
        part_size: 8 * 1024,
        provider: PartyKey::of(&provider_key()),
        client: PartyKey::of(&client_key()),
        max_price_per_byte: TokenAmount(5),
    };
    let request_id = deals.initiate_retrieval(request, 3, &ctx()).await.unwrap();
    // Given the request's start-retrieval-deal effect was cut off after creating the part's
    // deal (its claim is held by a runner that died), and that deal already ended: rejected
    let pool = deals.journal().pool();
    let held =
        outbox::claim(pool, &["start-retrieval-deal"], Duration::from_secs(600), 10).await.unwrap();
    assert_eq!(held.len(), 1);
    let deal = Uuid::now_v7();
    let part = ByteRange { offset: 0, length: 8 * 1024 };
    let terms = RetrievalDealProposal { piece_cid: Some(piece), part, ..retrieval_terms() };
    let part_of = Some(RequestPart { request_id, part_index: 0 });
    let proposed = RC::DealProposed { proposal: Box::new(terms), part_of };
    deals.handle::<RetrievalClient>(deal, proposed, &ctx(), None).await.unwrap();
    let rejected = RC::DealRejected { reason: "no capacity".into() };
    deals.handle::<RetrievalClient>(deal, rejected, &ctx(), None).await.unwrap();
    // (the deal's proposal is never sent: a dead runner holds it too)
    let _ = outbox::claim(pool, &["send"], Duration::from_secs(600), 10).await.unwrap();
    // When a runner performs the deal's notice to the request
    let runner = EffectRunner::new(
        deals.clone(),
        m.devnet.clone(),
        DevnetSealer::new(m.devnet.clone(), 2, 3),
        RunnerConfig { watch_poll: Duration::from_millis(20), ..RunnerConfig::default() },
    );
    runner.run_until_idle().await.unwrap();
    // Then it waits: the request has not recorded the deal, and nothing was refused
    let part =
        |request: &dealledger::fsm::Deal<RetrievalRequestMachine>| request.data.parts[0].clone();
    let before = deals.load::<RetrievalRequestMachine>(request_id).await.unwrap();
    assert_eq!((part(&before).deal_stream, part(&before).failures), (None, 0));
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE stream_id = $1 AND effect_type = 'notify' \
         AND completed_at IS NULL",
    )
    .bind(deal)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(open, 1, "the notice must still be pending");
    // And when the retried start effect records the deal, the notice reaches the request
    let started = RR::PartStarted { part_index: 0, deal_stream: deal };
    deals.handle::<RetrievalRequestMachine>(request_id, started, &ctx(), None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    runner.run_until_idle().await.unwrap();
    let after = deals.load::<RetrievalRequestMachine>(request_id).await.unwrap();
    assert_eq!(part(&after).failures, 1, "the part's failed deal was counted: {after:?}");
}
