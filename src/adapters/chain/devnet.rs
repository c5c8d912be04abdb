//! A local chain: the seed's StorageMarketActor and a PaymentChannel actor, kept in their own
//! PostgreSQL schema (`devnet`) so that several nodes can share one chain by sharing its
//! database. Every message is one transaction that first locks the clock row: like a real
//! chain, the devnet applies one message at a time, so its invariants (locked never exceeds
//! escrow, a lane's nonce only grows, a channel never pays out more than it holds) hold under
//! any number of concurrent callers.
//!
//! Epochs advance on command ([`Devnet::advance`], `dealledger devnet advance N`) or in real time
//! ([`Devnet::run_clock`], `dealledger devnet serve`). Each advance runs the market's cron over
//! the epochs passed: sealing progress, HandleStorageDealPayment at every proving period,
//! CloseExpiredStorageDeal at the end epoch, and dropping deals not activated by their start.

use std::time::Duration;

use cid::Cid;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::{
    Chain, ChainError, ChannelState, DealObservation, MarketBalance, MessageKey, MessageStatus,
};
use crate::domain::retrieval::{ChannelAddress, SignedVoucher};
use crate::domain::storage::StorageDeal;
use crate::domain::{ChainEpoch, DealId, PaddedPieceSize, PartyKey, SectorNumber, TokenAmount};

/// How the devnet behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevnetConfig {
    /// Epochs between two storage payments (HandleStorageDealPayment).
    pub proving_period: i64,
    /// Epochs between `settle` and the moment a channel can be collected.
    pub settle_delay: i64,
    /// Epochs an observation waits before it is reported (0: a devnet does not re-org).
    pub finality: i64,
    /// The epoch a new devnet starts at.
    pub genesis_epoch: i64,
}

impl Default for DevnetConfig {
    fn default() -> Self {
        Self { proving_period: 10, settle_delay: 10, finality: 0, genesis_epoch: 0 }
    }
}

/// The devnet: a handle on its schema. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Devnet {
    pool: PgPool,
    config: DevnetConfig,
}

const SCHEMA: &str = r#"
CREATE SCHEMA IF NOT EXISTS devnet;
CREATE TABLE IF NOT EXISTS devnet.clock (
    id    boolean PRIMARY KEY DEFAULT true CHECK (id),
    epoch bigint  NOT NULL
);
CREATE TABLE IF NOT EXISTS devnet.wallets (
    party   bytea PRIMARY KEY,
    balance numeric(40,0) NOT NULL CHECK (balance >= 0)
);
CREATE TABLE IF NOT EXISTS devnet.market_participants (
    party  bytea PRIMARY KEY,
    escrow numeric(40,0) NOT NULL,
    locked numeric(40,0) NOT NULL,
    CONSTRAINT locked_within_escrow CHECK (locked >= 0 AND locked <= escrow)
);
CREATE TABLE IF NOT EXISTS devnet.messages (
    cid     bytea  PRIMARY KEY,
    method  text   NOT NULL,
    epoch   bigint NOT NULL,
    deal_id bigint,
    result  text
);
CREATE TABLE IF NOT EXISTS devnet.deals (
    deal_id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    proposal_cid        bytea  NOT NULL UNIQUE,
    publish_message     bytea  NOT NULL,
    client              bytea  NOT NULL,
    provider            bytea  NOT NULL,
    piece_cid           text   NOT NULL,
    piece_size          bigint NOT NULL,
    start_epoch         bigint NOT NULL,
    end_epoch           bigint NOT NULL,
    price_per_epoch     numeric(40,0) NOT NULL,
    client_collateral   numeric(40,0) NOT NULL,
    provider_collateral numeric(40,0) NOT NULL,
    published_epoch     bigint NOT NULL,
    sector              bigint,
    precommit_epoch     bigint,
    sector_start_epoch  bigint,
    last_payment_epoch  bigint,
    paid                numeric(40,0) NOT NULL DEFAULT 0,
    slash_epoch         bigint,
    closed_epoch        bigint,
    timed_out_epoch     bigint
);
CREATE TABLE IF NOT EXISTS devnet.sealing (
    deal_id          bigint PRIMARY KEY REFERENCES devnet.deals (deal_id),
    sector           bigint NOT NULL,
    handed_off_epoch bigint NOT NULL,
    precommit_at     bigint NOT NULL,
    activate_at      bigint NOT NULL,
    failed_reason    text
);
CREATE TABLE IF NOT EXISTS devnet.channels (
    address     text PRIMARY KEY,
    from_party  bytea NOT NULL,
    to_party    bytea NOT NULL,
    balance     numeric(40,0) NOT NULL CHECK (balance >= 0),
    lanes       bigint NOT NULL DEFAULT 0,
    settling_at bigint,
    collected   boolean NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS devnet.lanes (
    address  text   NOT NULL REFERENCES devnet.channels (address),
    lane     bigint NOT NULL,
    -- The nonce of the voucher last redeemed on the lane; NULL until the first.
    nonce    bigint,
    redeemed numeric(40,0) NOT NULL DEFAULT 0,
    PRIMARY KEY (address, lane)
);
"#;

/// A signed amount for `numeric` arithmetic in SQL.
fn plus(amount: TokenAmount) -> String {
    amount.0.to_string()
}

fn minus(amount: TokenAmount) -> String {
    format!("-{}", amount.0)
}

fn amount(text: &str) -> Result<TokenAmount, ChainError> {
    text.parse::<u128>()
        .map(TokenAmount)
        .map_err(|_| ChainError::Malformed(format!("devnet amount {text:?}")))
}

fn refused(reason: impl Into<String>) -> ChainError {
    ChainError::Refused { reason: reason.into() }
}

/// A balance too low for the message: it goes through once funds are added.
fn short(reason: impl Into<String>) -> ChainError {
    ChainError::InsufficientFunds { reason: reason.into() }
}

fn party_of(bytes: &[u8]) -> Result<PartyKey, ChainError> {
    bytes
        .try_into()
        .map(PartyKey)
        .map_err(|_| ChainError::Malformed("devnet party is not 32 bytes".into()))
}

/// `price × epochs`, refusing what does not fit.
fn fee(price: TokenAmount, epochs: i64) -> Result<TokenAmount, ChainError> {
    u128::try_from(epochs.max(0))
        .ok()
        .and_then(|e| price.checked_mul(e))
        .ok_or_else(|| refused("storage fee overflows"))
}

impl Devnet {
    /// Opens the devnet in `pool`'s database, creating its schema on first use.
    pub async fn open(pool: PgPool, config: DevnetConfig) -> Result<Self, ChainError> {
        let mut tx = pool.begin().await?;
        // Two nodes opening the same devnet at once must not race on CREATE.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('dealledger-devnet'))")
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO devnet.clock (epoch) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(config.genesis_epoch)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Self { pool, config })
    }

    /// The database the devnet lives in.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The devnet's configuration.
    pub fn config(&self) -> DevnetConfig {
        self.config
    }

    /// Starts a message: locks the clock (one message at a time) and returns the epoch.
    async fn begin(&self) -> Result<(Transaction<'static, Postgres>, ChainEpoch), ChainError> {
        let mut tx = self.pool.begin().await?;
        let epoch: i64 = sqlx::query_scalar("SELECT epoch FROM devnet.clock FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
        Ok((tx, ChainEpoch(epoch)))
    }

    /// The result recorded for an already applied message, if any.
    async fn applied(
        tx: &mut Transaction<'_, Postgres>,
        key: MessageKey,
    ) -> Result<Option<Option<String>>, ChainError> {
        Ok(sqlx::query_scalar("SELECT result FROM devnet.messages WHERE cid = $1")
            .bind(key.0.to_bytes())
            .fetch_optional(&mut **tx)
            .await?)
    }

    async fn record_message(
        tx: &mut Transaction<'_, Postgres>,
        key: MessageKey,
        method: &str,
        epoch: ChainEpoch,
        deal_id: Option<DealId>,
        result: Option<&str>,
    ) -> Result<(), ChainError> {
        sqlx::query(
            "INSERT INTO devnet.messages (cid, method, epoch, deal_id, result) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(key.0.to_bytes())
        .bind(method)
        .bind(epoch.0)
        .bind(deal_id.map(|d| d.0 as i64))
        .bind(result)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Moves `delta` (signed text) into a wallet; refuses to go below zero.
    async fn shift_wallet(
        tx: &mut Transaction<'_, Postgres>,
        party: PartyKey,
        delta: String,
    ) -> Result<(), ChainError> {
        let why = || format!("wallet of {party} has too little");
        Self::shift(
            tx,
            "UPDATE devnet.wallets SET balance = balance + $2::numeric WHERE party = $1",
            "INSERT INTO devnet.wallets (party, balance) VALUES ($1, $2::numeric)",
            party,
            [delta, "0".into()],
            why,
        )
        .await
    }

    /// Moves escrow and locked amounts of a market participant (signed text deltas).
    async fn shift_market(
        tx: &mut Transaction<'_, Postgres>,
        party: PartyKey,
        escrow: String,
        locked: String,
    ) -> Result<(), ChainError> {
        let why = || format!("market balance of {party} does not cover it");
        Self::shift(
            tx,
            "UPDATE devnet.market_participants \
             SET escrow = escrow + $2::numeric, locked = locked + $3::numeric WHERE party = $1",
            "INSERT INTO devnet.market_participants (party, escrow, locked) \
             VALUES ($1, $2::numeric, $3::numeric)",
            party,
            [escrow, locked],
            why,
        )
        .await
    }

    /// Applies signed deltas to a party's row (creating it on first credit); the table's
    /// CHECK constraints refuse any balance going negative, and that is a refusal
    /// (the message's transaction is then dropped: nothing of it is applied).
    async fn shift(
        tx: &mut Transaction<'_, Postgres>,
        update: &'static str,
        insert: &'static str,
        party: PartyKey,
        deltas: [String; 2],
        why: impl Fn() -> String,
    ) -> Result<(), ChainError> {
        let refuse = |e: sqlx::Error| match e {
            sqlx::Error::Database(d) if d.is_check_violation() => short(why()),
            other => other.into(),
        };
        let updated = sqlx::query(sqlx::AssertSqlSafe(update))
            .bind(party.0.as_slice())
            .bind(&deltas[0])
            .bind(&deltas[1])
            .execute(&mut **tx)
            .await
            .map_err(refuse)?;
        if updated.rows_affected() == 0 {
            sqlx::query(sqlx::AssertSqlSafe(insert))
                .bind(party.0.as_slice())
                .bind(&deltas[0])
                .bind(&deltas[1])
                .execute(&mut **tx)
                .await
                .map_err(refuse)?;
        }
        Ok(())
    }

    async fn balance_in(
        tx: &mut Transaction<'_, Postgres>,
        party: PartyKey,
    ) -> Result<MarketBalance, ChainError> {
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT escrow::text, locked::text FROM devnet.market_participants \
             WHERE party = $1 FOR UPDATE",
        )
        .bind(party.0.as_slice())
        .fetch_optional(&mut **tx)
        .await?;
        Ok(match row {
            Some((escrow, locked)) => {
                MarketBalance { escrow: amount(&escrow)?, locked: amount(&locked)? }
            }
            None => MarketBalance::default(),
        })
    }

    /// Faucet: credits a wallet (devnet only). Keyed, so a repeated funding is applied once.
    pub async fn fund(
        &self,
        party: PartyKey,
        value: TokenAmount,
        key: MessageKey,
    ) -> Result<(), ChainError> {
        let (mut tx, epoch) = self.begin().await?;
        if Self::applied(&mut tx, key).await?.is_none() {
            Self::shift_wallet(&mut tx, party, plus(value)).await?;
            Self::record_message(&mut tx, key, "Faucet", epoch, None, None).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A wallet's balance (outside the market).
    pub async fn wallet_balance(&self, party: PartyKey) -> Result<TokenAmount, ChainError> {
        let balance: Option<String> =
            sqlx::query_scalar("SELECT balance::text FROM devnet.wallets WHERE party = $1")
                .bind(party.0.as_slice())
                .fetch_optional(&self.pool)
                .await?;
        balance.as_deref().map(amount).unwrap_or(Ok(TokenAmount::ZERO))
    }

    /// Advances the clock by `epochs` and runs the market's cron over them. Returns the new
    /// head.
    pub async fn advance(&self, epochs: i64) -> Result<ChainEpoch, ChainError> {
        let (mut tx, from) = self.begin().await?;
        let to = ChainEpoch(from.0 + epochs.max(0));
        self.progress_sealing(&mut tx, to).await?;
        self.settle_deals(&mut tx, to).await?;
        sqlx::query("UPDATE devnet.clock SET epoch = $1").bind(to.0).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(to)
    }

    /// Advances one epoch every `period` until the task is aborted (`devnet serve`, or a
    /// node running the devnet in-process in real time).
    pub fn run_clock(self, period: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                if let Err(e) = self.advance(1).await {
                    tracing::warn!(error = %e, "devnet clock could not advance");
                }
            }
        })
    }

    /// Pre-commits and proves sectors whose delays have passed by `to`.
    async fn progress_sealing(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        to: ChainEpoch,
    ) -> Result<(), ChainError> {
        sqlx::query(
            "UPDATE devnet.deals d SET sector = s.sector, precommit_epoch = s.precommit_at \
             FROM devnet.sealing s \
             WHERE s.deal_id = d.deal_id AND s.failed_reason IS NULL \
               AND d.precommit_epoch IS NULL AND d.slash_epoch IS NULL \
               AND d.timed_out_epoch IS NULL \
               AND s.precommit_at <= $1 AND s.precommit_at <= d.start_epoch",
        )
        .bind(to.0)
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "UPDATE devnet.deals d \
             SET sector_start_epoch = s.activate_at, last_payment_epoch = d.start_epoch \
             FROM devnet.sealing s \
             WHERE s.deal_id = d.deal_id AND s.failed_reason IS NULL \
               AND d.precommit_epoch IS NOT NULL AND d.sector_start_epoch IS NULL \
               AND d.slash_epoch IS NULL AND d.timed_out_epoch IS NULL \
               AND s.activate_at <= $1 AND s.activate_at <= d.start_epoch",
        )
        .bind(to.0)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Pays, closes and drops deals up to `to`: HandleStorageDealPayment at each proving
    /// period, CloseExpiredStorageDeal at the end epoch, and deals never activated by their
    /// start epoch dropped (client refunded, provider collateral burned).
    async fn settle_deals(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        to: ChainEpoch,
    ) -> Result<(), ChainError> {
        let rows = sqlx::query(
            "SELECT deal_id, client, provider, start_epoch, end_epoch, \
                    price_per_epoch::text AS price, client_collateral::text AS cc, \
                    provider_collateral::text AS pc, sector_start_epoch, last_payment_epoch \
             FROM devnet.deals \
             WHERE slash_epoch IS NULL AND closed_epoch IS NULL AND timed_out_epoch IS NULL \
               AND start_epoch < $1 \
             ORDER BY deal_id FOR UPDATE",
        )
        .bind(to.0)
        .fetch_all(&mut **tx)
        .await?;
        for row in rows {
            let deal_id: i64 = row.try_get("deal_id")?;
            let client = party_of(row.try_get("client")?)?;
            let provider = party_of(row.try_get("provider")?)?;
            let (start, end): (i64, i64) = (row.try_get("start_epoch")?, row.try_get("end_epoch")?);
            let price = amount(row.try_get("price")?)?;
            let client_collateral = amount(row.try_get("cc")?)?;
            let provider_collateral = amount(row.try_get("pc")?)?;
            let activated: Option<i64> = row.try_get("sector_start_epoch")?;
            if activated.is_none() {
                // Not proven by its start epoch: the deal is dropped.
                let refund = fee(price, end - start)?
                    .checked_add(client_collateral)
                    .ok_or_else(|| refused("refund overflows"))?;
                Self::shift_market(tx, client, "0".into(), minus(refund)).await?;
                Self::shift_market(
                    tx,
                    provider,
                    minus(provider_collateral),
                    minus(provider_collateral),
                )
                .await?;
                sqlx::query("UPDATE devnet.deals SET timed_out_epoch = $2 WHERE deal_id = $1")
                    .bind(deal_id)
                    .bind(start + 1)
                    .execute(&mut **tx)
                    .await?;
                continue;
            }
            let last: i64 = row.try_get::<Option<i64>, _>("last_payment_epoch")?.unwrap_or(start);
            let period = self.config.proving_period.max(1);
            let paid_to = if to.0 >= end { end } else { start + (to.0 - start) / period * period };
            if paid_to > last {
                let payment = fee(price, paid_to - last)?;
                Self::shift_market(tx, client, minus(payment), minus(payment)).await?;
                Self::shift_market(tx, provider, plus(payment), "0".into()).await?;
                sqlx::query(
                    "UPDATE devnet.deals SET last_payment_epoch = $2, paid = paid + $3::numeric \
                     WHERE deal_id = $1",
                )
                .bind(deal_id)
                .bind(paid_to)
                .bind(plus(payment))
                .execute(&mut **tx)
                .await?;
            }
            if to.0 >= end {
                Self::shift_market(tx, client, "0".into(), minus(client_collateral)).await?;
                Self::shift_market(tx, provider, "0".into(), minus(provider_collateral)).await?;
                sqlx::query("UPDATE devnet.deals SET closed_epoch = $2 WHERE deal_id = $1")
                    .bind(deal_id)
                    .bind(end)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        Ok(())
    }

    /// SlashStorageDealCollateral: the provider failed to keep the deal. Storage is paid up to
    /// now, the rest of the fee and the client's collateral go back to the client, and the
    /// provider's collateral is burned.
    pub async fn slash(&self, deal_id: DealId) -> Result<ChainEpoch, ChainError> {
        let (mut tx, epoch) = self.begin().await?;
        let row = sqlx::query(
            "SELECT client, provider, start_epoch, end_epoch, price_per_epoch::text AS price, \
                    client_collateral::text AS cc, provider_collateral::text AS pc, \
                    paid::text AS paid, last_payment_epoch, sector_start_epoch, \
                    slash_epoch, closed_epoch, timed_out_epoch \
             FROM devnet.deals WHERE deal_id = $1 FOR UPDATE",
        )
        .bind(deal_id.0 as i64)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ChainError::NotFound { what: format!("deal {}", deal_id.0) })?;
        let ended: [Option<i64>; 3] = [
            row.try_get("slash_epoch")?,
            row.try_get("closed_epoch")?,
            row.try_get("timed_out_epoch")?,
        ];
        if ended.iter().any(Option::is_some) {
            return Err(refused(format!("deal {} already ended", deal_id.0)));
        }
        if row.try_get::<Option<i64>, _>("sector_start_epoch")?.is_none() {
            return Err(refused(format!("deal {} is not active", deal_id.0)));
        }
        let client = party_of(row.try_get("client")?)?;
        let provider = party_of(row.try_get("provider")?)?;
        let (start, end): (i64, i64) = (row.try_get("start_epoch")?, row.try_get("end_epoch")?);
        let price = amount(row.try_get("price")?)?;
        let last: i64 = row.try_get::<Option<i64>, _>("last_payment_epoch")?.unwrap_or(start);
        let paid_to = epoch.0.clamp(start, end).max(last);
        let payment = fee(price, paid_to - last)?;
        let total = fee(price, end - start)?;
        let paid_before = amount(row.try_get("paid")?)?;
        let unpaid = total.saturating_sub(paid_before).saturating_sub(payment);
        let client_collateral = amount(row.try_get("cc")?)?;
        let provider_collateral = amount(row.try_get("pc")?)?;
        let release = unpaid.checked_add(client_collateral).ok_or_else(|| refused("overflow"))?;
        Self::shift_market(&mut tx, client, minus(payment), minus(payment)).await?;
        Self::shift_market(&mut tx, client, "0".into(), minus(release)).await?;
        Self::shift_market(&mut tx, provider, plus(payment), "0".into()).await?;
        Self::shift_market(
            &mut tx,
            provider,
            minus(provider_collateral),
            minus(provider_collateral),
        )
        .await?;
        sqlx::query(
            "UPDATE devnet.deals SET slash_epoch = $2, last_payment_epoch = $3, \
             paid = paid + $4::numeric WHERE deal_id = $1",
        )
        .bind(deal_id.0 as i64)
        .bind(epoch.0)
        .bind(paid_to)
        .bind(plus(payment))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(epoch)
    }

    /// Queues a deal's piece for sealing: pre-committed `precommit_after` epochs from now and
    /// proven `activate_after` epochs from now. Handing off the same deal twice is a no-op.
    pub(crate) async fn schedule_sealing(
        &self,
        deal_id: DealId,
        precommit_after: i64,
        activate_after: i64,
    ) -> Result<(), ChainError> {
        let (mut tx, epoch) = self.begin().await?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM devnet.deals WHERE deal_id = $1)")
                .bind(deal_id.0 as i64)
                .fetch_one(&mut *tx)
                .await?;
        if !exists {
            return Err(ChainError::NotFound { what: format!("deal {}", deal_id.0) });
        }
        sqlx::query(
            "INSERT INTO devnet.sealing \
               (deal_id, sector, handed_off_epoch, precommit_at, activate_at) \
             VALUES ($1, $1 % 1000000, $2, $3, $4) ON CONFLICT (deal_id) DO NOTHING",
        )
        .bind(deal_id.0 as i64)
        .bind(epoch.0)
        .bind(epoch.0 + precommit_after.max(0))
        .bind(epoch.0 + precommit_after.max(0) + activate_after.max(0))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Fails the sealing of a deal's sector (on command): it will never be proven.
    pub async fn fail_sealing(&self, deal_id: DealId, reason: &str) -> Result<(), ChainError> {
        let (mut tx, _) = self.begin().await?;
        let failed = sqlx::query(
            "UPDATE devnet.sealing SET failed_reason = $2 WHERE deal_id = $1 \
             AND NOT EXISTS (SELECT 1 FROM devnet.deals d \
                             WHERE d.deal_id = $1 AND d.sector_start_epoch IS NOT NULL)",
        )
        .bind(deal_id.0 as i64)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        if failed.rows_affected() == 0 {
            return Err(refused(format!("deal {} is not being sealed", deal_id.0)));
        }
        tx.commit().await?;
        Ok(())
    }

    /// The sealing record of a deal: (sector, failure reason), if it was handed off.
    pub(crate) async fn sealing_of(
        &self,
        deal_id: DealId,
    ) -> Result<Option<(SectorNumber, Option<String>)>, ChainError> {
        let row: Option<(i64, Option<String>)> =
            sqlx::query_as("SELECT sector, failed_reason FROM devnet.sealing WHERE deal_id = $1")
                .bind(deal_id.0 as i64)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(sector, reason)| (SectorNumber(sector as u64), reason)))
    }

    /// The epoch up to which observations are final.
    async fn final_epoch(&self) -> Result<i64, ChainError> {
        Ok(self.head().await?.0 - self.config.finality)
    }

    /// The channel address of the pair: one channel per (payer, payee), as Lotus's PaychGet.
    fn channel_address(from: PartyKey, to: PartyKey) -> ChannelAddress {
        let digest = Sha256::new().chain_update(from.0).chain_update(to.0).finalize();
        ChannelAddress(format!("t2{}", hex::encode(&digest[..10])))
    }

    async fn channel_in(
        tx: &mut Transaction<'_, Postgres>,
        channel: &ChannelAddress,
    ) -> Result<ChannelState, ChainError> {
        let row = sqlx::query(
            "SELECT from_party, to_party, balance::text AS balance, lanes, settling_at, \
                    collected, \
                    (SELECT COALESCE(SUM(redeemed), 0)::text FROM devnet.lanes l \
                     WHERE l.address = c.address) AS redeemed \
             FROM devnet.channels c WHERE address = $1 FOR UPDATE",
        )
        .bind(&channel.0)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| ChainError::NotFound { what: format!("channel {}", channel.0) })?;
        Ok(ChannelState {
            address: channel.clone(),
            from: party_of(row.try_get("from_party")?)?,
            to: party_of(row.try_get("to_party")?)?,
            balance: amount(row.try_get("balance")?)?,
            redeemed: amount(row.try_get("redeemed")?)?,
            lanes: row.try_get::<i64, _>("lanes")? as u64,
            settling_at: row.try_get::<Option<i64>, _>("settling_at")?.map(ChainEpoch),
            collected: row.try_get("collected")?,
        })
    }

    /// Checks a voucher against the channel inside a message.
    async fn check_in(
        tx: &mut Transaction<'_, Postgres>,
        epoch: ChainEpoch,
        signed: &SignedVoucher,
    ) -> Result<(), ChainError> {
        let voucher = &signed.voucher;
        let state = Self::channel_in(tx, &voucher.channel).await?;
        if state.collected || state.settling_at.is_some_and(|at| epoch >= at) {
            return Err(refused(format!("channel {} is settled", voucher.channel.0)));
        }
        signed.verify(&state.from).map_err(|e| refused(e.to_string()))?;
        let lane: Option<(Option<i64>, String)> = sqlx::query_as(
            "SELECT nonce, redeemed::text FROM devnet.lanes WHERE address = $1 AND lane = $2",
        )
        .bind(&voucher.channel.0)
        .bind(voucher.lane as i64)
        .fetch_optional(&mut **tx)
        .await?;
        let (nonce, redeemed) =
            lane.ok_or_else(|| refused(format!("lane {} not allocated", voucher.lane)))?;
        let redeemed = amount(&redeemed)?;
        if let Some(nonce) = nonce.filter(|n| voucher.nonce as i64 <= *n) {
            return Err(refused(format!(
                "voucher nonce {} is not above the lane's {nonce}",
                voucher.nonce
            )));
        }
        if voucher.amount < redeemed {
            return Err(refused("voucher pays less than the lane already redeemed"));
        }
        let after = state
            .redeemed
            .saturating_sub(redeemed)
            .checked_add(voucher.amount)
            .ok_or_else(|| refused("voucher amount overflows"))?;
        if after > state.balance {
            return Err(refused(format!(
                "vouchers would redeem {} from a channel holding {}",
                after.0, state.balance.0
            )));
        }
        Ok(())
    }
}

impl Chain for Devnet {
    async fn head(&self) -> Result<ChainEpoch, ChainError> {
        let epoch: i64 =
            sqlx::query_scalar("SELECT epoch FROM devnet.clock").fetch_one(&self.pool).await?;
        Ok(ChainEpoch(epoch))
    }

    fn finality(&self) -> i64 {
        self.config.finality
    }

    async fn market_balance(&self, party: PartyKey) -> Result<MarketBalance, ChainError> {
        let mut tx = self.pool.begin().await?;
        let balance = Self::balance_in(&mut tx, party).await?;
        tx.commit().await?;
        Ok(balance)
    }

    async fn add_balance(
        &self,
        party: PartyKey,
        value: TokenAmount,
        key: MessageKey,
    ) -> Result<Cid, ChainError> {
        let (mut tx, epoch) = self.begin().await?;
        if Self::applied(&mut tx, key).await?.is_none() {
            Self::shift_wallet(&mut tx, party, minus(value)).await?;
            Self::shift_market(&mut tx, party, plus(value), "0".into()).await?;
            Self::record_message(&mut tx, key, "AddBalance", epoch, None, None).await?;
        }
        tx.commit().await?;
        Ok(key.0)
    }

    async fn withdraw_balance(
        &self,
        party: PartyKey,
        value: TokenAmount,
        key: MessageKey,
    ) -> Result<Cid, ChainError> {
        let (mut tx, epoch) = self.begin().await?;
        if Self::applied(&mut tx, key).await?.is_none() {
            let balance = Self::balance_in(&mut tx, party).await?;
            if balance.available() < value {
                return Err(refused(format!(
                    "{party} has {} unlocked, cannot withdraw {}",
                    balance.available().0,
                    value.0
                )));
            }
            Self::shift_market(&mut tx, party, minus(value), "0".into()).await?;
            Self::shift_wallet(&mut tx, party, plus(value)).await?;
            Self::record_message(&mut tx, key, "WithdrawBalance", epoch, None, None).await?;
        }
        tx.commit().await?;
        Ok(key.0)
    }

    async fn publish_storage_deal(&self, deal: &StorageDeal) -> Result<Cid, ChainError> {
        let proposal_cid = deal.client_proposal.cid();
        let (mut tx, epoch) = self.begin().await?;
        let existing: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT publish_message FROM devnet.deals WHERE proposal_cid = $1")
                .bind(proposal_cid.to_bytes())
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(message) = existing {
            return Cid::try_from(message).map_err(|e| ChainError::Malformed(e.to_string()));
        }
        // VerifyStorageDeal: both signatures, epochs, balances.
        deal.verify().map_err(|e| refused(e.to_string()))?;
        let p = &deal.client_proposal.proposal;
        if p.start_epoch <= epoch {
            return Err(refused(format!(
                "start epoch {} is not after the current epoch {}",
                p.start_epoch.0, epoch.0
            )));
        }
        if p.end_epoch <= p.start_epoch {
            return Err(refused("end epoch is not after start epoch"));
        }
        let client_requirement =
            p.client_balance_requirement().ok_or_else(|| refused("deal amounts overflow"))?;
        let provider_requirement = p.provider_balance_requirement();
        for (party, needed, who) in [
            (p.client, client_requirement, "client"),
            (p.provider, provider_requirement, "provider"),
        ] {
            let balance = Self::balance_in(&mut tx, party).await?;
            if balance.available() < needed {
                return Err(short(format!(
                    "{who} market balance {} unlocked is below the {} the deal locks",
                    balance.available().0,
                    needed.0
                )));
            }
        }
        Self::shift_market(&mut tx, p.client, "0".into(), plus(client_requirement)).await?;
        Self::shift_market(&mut tx, p.provider, "0".into(), plus(provider_requirement)).await?;
        let message = MessageKey::of("PublishStorageDeals", &proposal_cid.to_bytes());
        let deal_id: i64 = sqlx::query_scalar(
            "INSERT INTO devnet.deals (proposal_cid, publish_message, client, provider, \
               piece_cid, piece_size, start_epoch, end_epoch, price_per_epoch, \
               client_collateral, provider_collateral, published_epoch) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::numeric, $10::numeric, $11::numeric, $12) \
             RETURNING deal_id",
        )
        .bind(proposal_cid.to_bytes())
        .bind(message.0.to_bytes())
        .bind(p.client.0.as_slice())
        .bind(p.provider.0.as_slice())
        .bind(p.piece_cid.to_string())
        .bind(p.piece_size.0 as i64)
        .bind(p.start_epoch.0)
        .bind(p.end_epoch.0)
        .bind(plus(p.storage_price_per_epoch))
        .bind(plus(p.client_collateral))
        .bind(plus(p.provider_collateral))
        .bind(epoch.0)
        .fetch_one(&mut *tx)
        .await?;
        let deal_id = DealId(deal_id as u64);
        Self::record_message(&mut tx, message, "PublishStorageDeals", epoch, Some(deal_id), None)
            .await?;
        tx.commit().await?;
        Ok(message.0)
    }

    async fn message_status(&self, message: Cid) -> Result<MessageStatus, ChainError> {
        let row: Option<(i64, Option<i64>, Option<String>)> =
            sqlx::query_as("SELECT epoch, deal_id, result FROM devnet.messages WHERE cid = $1")
                .bind(message.to_bytes())
                .fetch_optional(&self.pool)
                .await?;
        let final_epoch = self.final_epoch().await?;
        Ok(match row {
            Some((epoch, _, _)) if epoch > final_epoch => MessageStatus::Pending,
            Some((epoch, deal_id, None)) => MessageStatus::Landed {
                epoch: ChainEpoch(epoch),
                deal_id: deal_id.map(|d| DealId(d as u64)),
            },
            Some((epoch, _, Some(reason))) => {
                MessageStatus::Failed { epoch: ChainEpoch(epoch), reason }
            }
            None => MessageStatus::Pending,
        })
    }

    async fn deal(&self, deal_id: DealId) -> Result<Option<DealObservation>, ChainError> {
        let final_epoch = self.final_epoch().await?;
        let row = sqlx::query(
            "SELECT proposal_cid, client, provider, piece_cid, piece_size, start_epoch, \
                    end_epoch, published_epoch, sector, precommit_epoch, sector_start_epoch, \
                    last_payment_epoch, slash_epoch, closed_epoch, timed_out_epoch \
             FROM devnet.deals WHERE deal_id = $1",
        )
        .bind(deal_id.0 as i64)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        if row.try_get::<i64, _>("published_epoch")? > final_epoch {
            return Ok(None);
        }
        let at = |column: &str| -> Result<Option<ChainEpoch>, ChainError> {
            Ok(row
                .try_get::<Option<i64>, _>(column)?
                .filter(|epoch| *epoch <= final_epoch)
                .map(ChainEpoch))
        };
        let proposal_cid: Vec<u8> = row.try_get("proposal_cid")?;
        let piece: String = row.try_get("piece_cid")?;
        let precommit_epoch = at("precommit_epoch")?;
        Ok(Some(DealObservation {
            deal_id,
            proposal_cid: Some(
                Cid::try_from(proposal_cid).map_err(|e| ChainError::Malformed(e.to_string()))?,
            ),
            piece_cid: piece.parse().map_err(|e| ChainError::Malformed(format!("{e}")))?,
            piece_size: PaddedPieceSize(row.try_get::<i64, _>("piece_size")? as u64),
            client: party_of(row.try_get("client")?)?.to_string(),
            provider: party_of(row.try_get("provider")?)?.to_string(),
            start_epoch: ChainEpoch(row.try_get("start_epoch")?),
            end_epoch: ChainEpoch(row.try_get("end_epoch")?),
            sector: precommit_epoch
                .and(row.try_get::<Option<i64>, _>("sector")?)
                .map(|s| SectorNumber(s as u64)),
            precommit_epoch,
            sector_start_epoch: at("sector_start_epoch")?,
            slash_epoch: at("slash_epoch")?,
            closed_epoch: at("closed_epoch")?,
            timed_out_epoch: at("timed_out_epoch")?,
            last_updated_epoch: at("last_payment_epoch")?,
        }))
    }

    async fn get_or_create_channel(
        &self,
        from: PartyKey,
        to: PartyKey,
        value: TokenAmount,
        key: MessageKey,
    ) -> Result<ChannelAddress, ChainError> {
        let address = Self::channel_address(from, to);
        let (mut tx, epoch) = self.begin().await?;
        if Self::applied(&mut tx, key).await?.is_none() {
            Self::shift_wallet(&mut tx, from, minus(value)).await?;
            let added = sqlx::query(
                "INSERT INTO devnet.channels AS c (address, from_party, to_party, balance) \
                 VALUES ($1, $2, $3, $4::numeric) \
                 ON CONFLICT (address) DO UPDATE SET balance = c.balance + $4::numeric \
                 WHERE NOT c.collected AND c.settling_at IS NULL",
            )
            .bind(&address.0)
            .bind(from.0.as_slice())
            .bind(to.0.as_slice())
            .bind(plus(value))
            .execute(&mut *tx)
            .await?;
            if added.rows_affected() == 0 {
                return Err(refused(format!("channel {} is settling", address.0)));
            }
            Self::record_message(&mut tx, key, "PaychGetOrCreate", epoch, None, None).await?;
        }
        tx.commit().await?;
        Ok(address)
    }

    async fn channel_between(
        &self,
        from: PartyKey,
        to: PartyKey,
    ) -> Result<Option<ChannelAddress>, ChainError> {
        let address = Self::channel_address(from, to);
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM devnet.channels WHERE address = $1)")
                .bind(&address.0)
                .fetch_one(&self.pool)
                .await?;
        Ok(exists.then_some(address))
    }

    async fn channel(&self, channel: &ChannelAddress) -> Result<Option<ChannelState>, ChainError> {
        let mut tx = self.pool.begin().await?;
        let state = match Self::channel_in(&mut tx, channel).await {
            Ok(state) => Some(state),
            Err(ChainError::NotFound { .. }) => None,
            Err(other) => return Err(other),
        };
        tx.commit().await?;
        Ok(state)
    }

    async fn allocate_lane(
        &self,
        channel: &ChannelAddress,
        key: MessageKey,
    ) -> Result<u64, ChainError> {
        let (mut tx, epoch) = self.begin().await?;
        if let Some(result) = Self::applied(&mut tx, key).await? {
            let lane = result.and_then(|r| r.parse::<u64>().ok());
            return lane.ok_or_else(|| ChainError::Malformed("devnet lane result".into()));
        }
        let state = Self::channel_in(&mut tx, channel).await?;
        let lane = state.lanes;
        sqlx::query("UPDATE devnet.channels SET lanes = lanes + 1 WHERE address = $1")
            .bind(&channel.0)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO devnet.lanes (address, lane) VALUES ($1, $2)")
            .bind(&channel.0)
            .bind(lane as i64)
            .execute(&mut *tx)
            .await?;
        // The message's outcome is the lane, so repeating it answers the same lane.
        sqlx::query(
            "INSERT INTO devnet.messages (cid, method, epoch, result) VALUES ($1, $2, $3, $4)",
        )
        .bind(key.0.to_bytes())
        .bind("PaychAllocateLane")
        .bind(epoch.0)
        .bind(lane.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(lane)
    }

    async fn check_voucher(&self, voucher: &SignedVoucher) -> Result<(), ChainError> {
        let (mut tx, epoch) = self.begin().await?;
        Self::check_in(&mut tx, epoch, voucher).await?;
        tx.rollback().await?;
        Ok(())
    }

    async fn submit_voucher(&self, signed: &SignedVoucher) -> Result<TokenAmount, ChainError> {
        let voucher = &signed.voucher;
        let (mut tx, epoch) = self.begin().await?;
        let current: Option<(Option<i64>, String)> = sqlx::query_as(
            "SELECT nonce, redeemed::text FROM devnet.lanes WHERE address = $1 AND lane = $2",
        )
        .bind(&voucher.channel.0)
        .bind(voucher.lane as i64)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((nonce, redeemed)) = &current {
            let redeemed = amount(redeemed)?;
            // The voucher already on the lane: submitting it again changes nothing.
            if *nonce == Some(voucher.nonce as i64) && redeemed == voucher.amount {
                let state = Self::channel_in(&mut tx, &voucher.channel).await?;
                signed.verify(&state.from).map_err(|e| refused(e.to_string()))?;
                return Ok(redeemed);
            }
        }
        Self::check_in(&mut tx, epoch, signed).await?;
        sqlx::query(
            "UPDATE devnet.lanes SET nonce = $3, redeemed = $4::numeric \
             WHERE address = $1 AND lane = $2",
        )
        .bind(&voucher.channel.0)
        .bind(voucher.lane as i64)
        .bind(voucher.nonce as i64)
        .bind(plus(voucher.amount))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(voucher.amount)
    }

    async fn settle(&self, channel: &ChannelAddress) -> Result<ChainEpoch, ChainError> {
        let (mut tx, epoch) = self.begin().await?;
        let state = Self::channel_in(&mut tx, channel).await?;
        if let Some(at) = state.settling_at {
            return Ok(at);
        }
        let at = ChainEpoch(epoch.0 + self.config.settle_delay);
        sqlx::query("UPDATE devnet.channels SET settling_at = $2 WHERE address = $1")
            .bind(&channel.0)
            .bind(at.0)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(at)
    }

    async fn collect(&self, channel: &ChannelAddress) -> Result<(), ChainError> {
        let (mut tx, epoch) = self.begin().await?;
        let state = Self::channel_in(&mut tx, channel).await?;
        if state.collected {
            return Ok(());
        }
        match state.settling_at {
            Some(at) if epoch >= at => {}
            Some(at) => return Err(refused(format!("channel settles at epoch {}", at.0))),
            None => return Err(refused("channel is not settling")),
        }
        Self::shift_wallet(&mut tx, state.to, plus(state.redeemed)).await?;
        Self::shift_wallet(&mut tx, state.from, plus(state.balance.saturating_sub(state.redeemed)))
            .await?;
        sqlx::query("UPDATE devnet.channels SET collected = true WHERE address = $1")
            .bind(&channel.0)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
