//! `dealledger demo`: the first command a new user runs.

use clap::Args;
use uuid::Uuid;

use dealledger::db::Database;
use dealledger::events::{Journal, NewEvent};

/// Options of the demo.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// How many streams to write.
    #[arg(long, default_value_t = 3)]
    pub deals: u32,
}

/// Appends a few streams, re-verifies their hash chains and prints what to query next.
pub async fn run(db: &Database, journal: &Journal, args: DemoArgs) -> anyhow::Result<()> {
    println!("dealledger demo on {}", db.display_url);
    for _ in 0..args.deals {
        let stream = Uuid::now_v7();
        let names = ["deal-proposed", "deal-accepted", "data-transfer-completed"];
        for (version, name) in names.iter().enumerate() {
            journal
                .append(
                    stream,
                    "storage_provider",
                    version as u32,
                    &[NewEvent::new(*name, 1, vec![])],
                )
                .await?;
        }
        let check = journal.verify_stream(stream).await?;
        println!(
            "stream {stream}: {} events, chain {}",
            check.events,
            if check.first_bad.is_none() { "intact" } else { "BROKEN" }
        );
    }
    println!("\nnext: psql \"{}\" -c 'select * from events order by position'", db.display_url);
    Ok(())
}
