//! `dealledger demo`: the first command a new user runs. Plays whole deals through the ledger
//! on the embedded database and shows what it recorded.
//!
//! The counterparties, the data transfer, the chain and the sealing pipeline are played by the
//! library's [`Script`] in this process, in the order the seed's flows give their inputs; the
//! machines, the journal and the outbox are the real ones.

use clap::Args;
use ed25519_dalek::SigningKey;

use dealledger::adapters::piece::commp::commp_of;
use dealledger::adapters::piece::store::PieceStore;
use dealledger::db::Database;
use dealledger::deals::Deals;
use dealledger::deals::script::{Parties, Script};
use dealledger::domain::ChainEpoch;
use dealledger::domain::retrieval::RetrievalDealProposal;
use dealledger::domain::storage::{ClientDealProposal, StorageDealProposal};
use dealledger::events::Journal;
use dealledger::fsm::fixtures;
use dealledger::fsm::storage_client::{StorageClient, StorageClientEvent};
use dealledger::fsm::storage_provider::{StorageProvider, StorageProviderEvent};
use dealledger::fsm::{DecideContext, Machine};

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

/// Runs the demo.
pub async fn run(db: &Database, journal: &Journal, args: DemoArgs) -> anyhow::Result<()> {
    let deals = Deals::new(journal.clone());
    let client_key = SigningKey::generate(&mut rand::rng());
    let provider_key = SigningKey::generate(&mut rand::rng());
    let parties = Parties { client: &client_key, provider: &provider_key };
    let ctx = DecideContext { epoch: ChainEpoch(1_000), ..DecideContext::default() };
    let mut script = Script::new(&deals, ctx.clone(), true);
    script.data_bytes = Some(args.size);
    let started = std::time::Instant::now();
    println!("dealledger demo on {}\n", db.display_url);

    let pieces = PieceStore::new(db.home().join("pieces"));
    let data = |n: u32| -> Vec<u8> {
        let mut bytes = vec![0u8; args.size as usize];
        rand::fill(&mut bytes[..]);
        let tag = n.to_be_bytes();
        let len = tag.len().min(bytes.len());
        bytes[..len].copy_from_slice(&tag[..len]);
        bytes
    };
    let proposal = |bytes: &[u8], n: u32| {
        let (piece_cid, piece_size) = commp_of(bytes);
        let terms = StorageDealProposal {
            piece_cid,
            piece_size,
            label: format!("demo deal {n}"),
            client: dealledger::domain::PartyKey::of(&client_key),
            provider: dealledger::domain::PartyKey::of(&provider_key),
            ..fixtures::proposal()
        };
        ClientDealProposal::sign(terms, &client_key)
    };

    println!(
        "storage: {} deals of {} bytes each, commP computed, pieces stored",
        args.deals, args.size
    );
    let mut streams = Vec::new();
    for n in 0..args.deals {
        let bytes = data(n);
        let signed = proposal(&bytes, n);
        // What the provider does with received bytes: store them, checking the commitment.
        let terms = &signed.proposal;
        pieces.put(terms.piece_cid, terms.piece_size, bytes.as_slice()).await?;
        let pair = script.storage_deal_to_active(signed, &parties).await?;
        let end = fixtures::proposal().end_epoch;
        script.end_deal(pair, false, end).await?;
        streams.push(pair);
    }
    let slashed =
        script.storage_deal_to_active(proposal(&data(args.deals), args.deals), &parties).await?;
    script.end_deal(slashed, true, ChainEpoch(20_000)).await?;
    let bytes = data(args.deals + 1);
    let signed = proposal(&bytes, args.deals + 1);
    let mut received = bytes;
    received[0] ^= 0xff; // one byte damaged on the way
    let refused = pieces
        .put(signed.proposal.piece_cid, signed.proposal.piece_size, received.as_slice())
        .await;
    let reason = match refused {
        Err(e) => e.to_string(),
        Ok(_) => anyhow::bail!("damaged data was accepted as the proposed piece"),
    };
    let failing = failing_deal(&mut script, signed, &provider_key, reason).await?;

    println!("retrieval: one request, fetched in parts, paid as the bytes arrive");
    let request = dealledger::domain::retrieval::RetrievalRequest {
        provider: dealledger::domain::PartyKey::of(&provider_key),
        client: dealledger::domain::PartyKey::of(&client_key),
        total_bytes: 2_500,
        part_size: 1_000,
        ..fixtures::retrieval_request()
    };
    let request_id = deals.initiate_retrieval(request.clone(), 3, &ctx).await?;
    let mut vouchers = 0;
    for (index, part) in request.parts().into_iter().enumerate() {
        let terms = RetrievalDealProposal {
            part,
            client: request.client,
            provider: request.provider,
            ..fixtures::retrieval_terms()
        };
        vouchers += script.retrieve_part(request_id, index as u32, terms, &parties).await?;
    }

    println!("\n{:<38} {:<18} {:<14} {:>4}  note", "stream", "side", "state", "code");
    let shown = streams.iter().chain([&slashed, &failing]);
    for (client, provider) in shown {
        for stream in [client, provider] {
            let s = deals.get_storage_deal_status(*stream).await?;
            let note =
                s.message.clone().unwrap_or_else(|| format!("{} bytes", s.bytes_transferred));
            println!("{:<38} {:<18} {:<14} {:>4}  {}", s.stream_id, s.side, s.state, s.code, note);
        }
    }
    let status = deals.get_retrieval_status(request_id).await?;
    println!(
        "\nretrieval request {}: {} ({} of {} parts, {} of {} bytes, {} vouchers, paid {})",
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
        "{} steps, each re-checked by replaying its stream, in {:.2} s",
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

/// A deal whose data does not match its piece commitment: the provider fails it after the
/// transfer, releases what it held, and the client learns it from the provider's status.
async fn failing_deal(
    script: &mut Script<'_>,
    proposal: ClientDealProposal,
    provider_key: &SigningKey,
    reason: String,
) -> anyhow::Result<(uuid::Uuid, uuid::Uuid)> {
    use StorageClientEvent as C;
    use StorageProviderEvent as P;
    let client = Deals::storage_stream_id(StorageClient::NAME, &proposal);
    let provider = Deals::storage_stream_id(StorageProvider::NAME, &proposal);
    let signed = dealledger::domain::storage::StorageDeal::sign(proposal.clone(), provider_key);
    let amount = proposal.proposal.client_balance_requirement().unwrap_or_default();
    let data_bytes = script.data_bytes.unwrap_or(proposal.proposal.piece_size.0);
    script
        .step::<StorageClient>(client, C::DealInitiated { proposal: Box::new(proposal.clone()) })
        .await?;
    script.step::<StorageClient>(client, C::FundsReserved { amount }).await?;
    for event in [
        P::ProposalReceived { proposal: Box::new(proposal) },
        P::DealAccepted { deal: Box::new(signed.clone()) },
        P::DataTransferStarted,
        P::DataTransferCompleted { bytes: data_bytes },
        P::DataVerificationFailed { reason: reason.clone() },
        P::CleanupCompleted,
    ] {
        script.step::<StorageProvider>(provider, event).await?;
    }
    for event in [
        C::DealAccepted { deal: Box::new(signed) },
        C::DataTransferStarted,
        C::DataTransferCompleted { bytes: data_bytes },
        C::ProviderFailedDeal { reason },
        C::CleanupCompleted,
    ] {
        script.step::<StorageClient>(client, event).await?;
    }
    Ok((client, provider))
}
