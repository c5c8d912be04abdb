//! A backend embedding dealledger: it runs a provider, reacts to the provider's deal updates
//! as they commit, and answers with its own SQL on the status tables. A second embedded
//! ledger plays the client (its own database, the provider's devnet).
//!
//! `cargo run --release --example embed`

use std::time::Duration;

use futures::StreamExt;

use dealledger::adapters::chain::Chain;
use dealledger::domain::storage::StorageDealProposal;
use dealledger::domain::{ChainEpoch, PaddedPieceSize, PieceCid, TokenAmount};
use dealledger::ledger::{DatabaseChoice, Ledger, LedgerError, ProviderTerms};
use dealledger::projections::updates::UpdateFilter;

#[tokio::main]
async fn main() -> Result<(), LedgerError> {
    let home = std::env::temp_dir().join(format!("dealledger-embed-{}", std::process::id()));
    let localhost = || "/ip4/127.0.0.1/tcp/0".parse().expect("a multiaddr");

    // The backend's provider, on its own embedded database.
    let provider = Ledger::builder()
        .database(DatabaseChoice::Embedded(home.join("provider")))
        .network(localhost())
        .provider(ProviderTerms::default())
        .build()
        .await?;
    // A client elsewhere: its own database, the same (devnet) chain.
    let client = Ledger::builder()
        .database(DatabaseChoice::Embedded(home.join("client")))
        .shared_devnet(provider.database_url())
        .network(localhost())
        .build()
        .await?;
    let devnet = provider.devnet().clone();
    for party in [provider.party(), client.party()] {
        let faucet = dealledger::adapters::chain::MessageKey::of("embed", &party.0);
        devnet.fund(party, TokenAmount(10u128.pow(21)), faucet).await?;
    }
    let clock = devnet.clone().run_clock(Duration::from_millis(50));

    // React to the provider's deals as they change, whoever drives them.
    let filter = UpdateFilter { stream_types: vec!["storage_provider".into()], stream_id: None };
    let mut updates = Box::pin(provider.register_listener(filter).await?);

    // The client proposes 256 KiB to the provider.
    let (peer, address) = (provider.party().peer_id().expect("a peer id"), provider.address());
    let network = client.network().expect("the client joined the network");
    network.add_address(peer, address.expect("the provider listens").clone()).await?;
    let head = devnet.head().await?;
    let terms = StorageDealProposal {
        piece_cid: PieceCid::from_commitment([0; 32]), // filled in from the data
        piece_size: PaddedPieceSize(0),
        verified_deal: false,
        client: client.party(),
        provider: provider.party(),
        label: "embedded".into(),
        start_epoch: ChainEpoch(head.0 + 100),
        end_epoch: ChainEpoch(head.0 + 100 + 180 * 2880),
        storage_price_per_epoch: TokenAmount(1_000),
        provider_collateral: TokenAmount(0),
        client_collateral: TokenAmount(0),
    };
    let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
    let deal = client.initiate_deal(data.as_slice(), terms).await?;
    println!("client proposed {} (stream {})", deal.proposal_cid, deal.stream_id);

    while let Some(update) =
        tokio::time::timeout(Duration::from_secs(60), updates.next()).await.ok().flatten()
    {
        let update = update?;
        println!(
            "provider deal {}: {} --{}--> {}",
            update.stream_id, update.step.from, update.step.input, update.step.to
        );
        if update.step.to == "Active" {
            break;
        }
    }

    // The backend's own SQL on the status tables.
    let summary: Vec<(String, String, i64, Option<i64>)> = sqlx::query_as(
        "SELECT provider, state, deals::bigint, bytes::bigint FROM provider_summary WHERE side = 'storage_provider'",
    )
    .fetch_all(provider.pool())
    .await?;
    for (who, state, deals, bytes) in summary {
        println!("{who}: {deals} deal(s) {state}, {} bytes", bytes.unwrap_or(0));
    }
    clock.abort();
    // A listener holds a database connection: drop it before shutting the ledger down.
    drop(updates);
    client.shutdown().await?;
    provider.shutdown().await?;
    let _ = std::fs::remove_dir_all(&home);
    Ok(())
}
