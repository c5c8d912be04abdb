//! `dealledger chain …` (what the chain adapter observes, on the devnet or a Lotus node) and
//! `dealledger devnet …` (the local chain's clock and faults).

use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use dealledger::adapters::chain::MessageKey;
use dealledger::adapters::chain::{
    Chain, DealObservation, Devnet, DevnetConfig, Lotus, OnChainDealState,
};
use dealledger::domain::{ChainEpoch, DealId, PartyKey, TokenAmount};
use sqlx::PgPool;

#[derive(Subcommand)]
pub enum ChainCommand {
    /// The chain's head epoch.
    Head {
        /// `devnet` (this node's database), a PostgreSQL URL holding a devnet, or a Lotus
        /// `http://host:1234/rpc/v0` URL.
        #[arg(long, default_value = "devnet")]
        chain: String,
        /// Lotus API token.
        #[arg(long, env = "LOTUS_TOKEN")]
        token: Option<String>,
    },
    /// What the adapter observes for a deal: the observation the watcher feeds the machines.
    Deal {
        /// The on-chain deal id.
        deal_id: u64,
        /// As for `chain head`.
        #[arg(long, default_value = "devnet")]
        chain: String,
        /// Lotus API token.
        #[arg(long, env = "LOTUS_TOKEN")]
        token: Option<String>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum DevnetCommand {
    /// Advances the clock by N epochs and runs the market's cron over them.
    Advance {
        /// Epochs to advance.
        epochs: i64,
    },
    /// Advances one epoch per period until interrupted, for nodes sharing this devnet.
    Serve {
        /// Milliseconds per epoch.
        #[arg(long, default_value_t = 1000)]
        epoch_ms: u64,
    },
    /// Credits a party's wallet (the devnet's faucet), so it can deposit and open channels.
    Fund {
        /// The party's peer id.
        party: String,
        /// attoFIL.
        amount: u128,
    },
    /// Slashes an active deal (the provider failed to prove it).
    Slash {
        /// The on-chain deal id.
        deal_id: u64,
    },
    /// Fails the sealing of a deal's sector.
    FailSealing {
        /// The on-chain deal id.
        deal_id: u64,
        /// Why.
        #[arg(long, default_value = "failed by the operator")]
        reason: String,
    },
}

/// A chain picked on the command line.
enum AnyChain {
    Devnet(Devnet),
    Lotus(Lotus),
}

async fn open_chain(pool: &PgPool, chain: &str, token: Option<String>) -> anyhow::Result<AnyChain> {
    Ok(if chain == "devnet" {
        AnyChain::Devnet(Devnet::open(pool.clone(), DevnetConfig::default()).await?)
    } else if chain.starts_with("postgres://") || chain.starts_with("postgresql://") {
        let pool = dealledger::db::pool_options().max_connections(2).connect(chain).await?;
        AnyChain::Devnet(Devnet::open(pool, DevnetConfig::default()).await?)
    } else if chain.starts_with("http://") || chain.starts_with("https://") {
        AnyChain::Lotus(Lotus::new(chain, token)?)
    } else {
        anyhow::bail!("--chain must be `devnet`, a postgres:// URL or a Lotus http:// URL")
    })
}

pub async fn run(pool: &PgPool, command: ChainCommand) -> anyhow::Result<()> {
    match command {
        ChainCommand::Head { chain, token } => {
            let head = match open_chain(pool, &chain, token).await? {
                AnyChain::Devnet(c) => c.head().await?,
                AnyChain::Lotus(c) => c.head().await?,
            };
            println!("{}", head.0);
        }
        ChainCommand::Deal { deal_id, chain, token, json } => {
            let id = DealId(deal_id);
            let seen = match open_chain(pool, &chain, token).await? {
                AnyChain::Devnet(c) => c.deal(id).await?,
                AnyChain::Lotus(c) => c.deal(id).await?,
            };
            let seen =
                seen.with_context(|| format!("no deal {deal_id} on this chain (at finality)"))?;
            if json {
                let mut value = serde_json::to_value(&seen)?;
                value["state"] = serde_json::to_value(seen.state())?;
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print_deal(&seen);
            }
        }
    }
    Ok(())
}

fn epoch(e: Option<ChainEpoch>) -> String {
    e.map_or_else(|| "-".into(), |e| e.0.to_string())
}

fn print_deal(d: &DealObservation) {
    let state = match d.state() {
        OnChainDealState::Published => "published",
        OnChainDealState::PreCommitted => "pre-committed",
        OnChainDealState::Active => "active",
        OnChainDealState::Slashed => "slashed",
        OnChainDealState::Expired => "expired",
        OnChainDealState::TimedOut => "timed out (never activated)",
    };
    println!("deal {}: {state}", d.deal_id.0);
    println!("  piece         {} ({} bytes padded)", d.piece_cid, d.piece_size.0);
    println!("  client        {}", d.client);
    println!("  provider      {}", d.provider);
    println!("  epochs        {} .. {}", d.start_epoch.0, d.end_epoch.0);
    println!("  sector        {}", d.sector.map_or_else(|| "-".into(), |s| s.0.to_string()));
    println!("  pre-committed {}", epoch(d.precommit_epoch));
    println!("  sector start  {}", epoch(d.sector_start_epoch));
    println!("  slashed       {}", epoch(d.slash_epoch));
    println!("  last updated  {}", epoch(d.last_updated_epoch));
}

pub async fn devnet(pool: &PgPool, command: DevnetCommand) -> anyhow::Result<()> {
    let devnet = Devnet::open(pool.clone(), DevnetConfig::default()).await?;
    match command {
        DevnetCommand::Advance { epochs } => {
            println!("head {}", devnet.advance(epochs).await?.0);
        }
        DevnetCommand::Serve { epoch_ms } => {
            println!("devnet clock: one epoch every {epoch_ms} ms; Ctrl-C stops it");
            let clock = devnet.clone().run_clock(Duration::from_millis(epoch_ms.max(1)));
            tokio::signal::ctrl_c().await?;
            clock.abort();
            println!("stopped at head {}", devnet.head().await?.0);
        }
        DevnetCommand::Fund { party, amount } => {
            let peer: libp2p::PeerId =
                party.parse().with_context(|| format!("{party:?} is not a peer id"))?;
            let key = PartyKey::from_peer_id(&peer).context("the peer id holds no ed25519 key")?;
            let message = MessageKey::of("faucet", uuid::Uuid::new_v4().as_bytes());
            devnet.fund(key, TokenAmount(amount), message).await?;
            println!("{party}: wallet {}", devnet.wallet_balance(key).await?);
        }
        DevnetCommand::Slash { deal_id } => {
            println!("slashed at epoch {}", devnet.slash(DealId(deal_id)).await?.0);
        }
        DevnetCommand::FailSealing { deal_id, reason } => {
            devnet.fail_sealing(DealId(deal_id), &reason).await?;
            println!("sealing of deal {deal_id} failed: {reason}");
        }
    }
    Ok(())
}
