//! The `Deals` service on real PostgreSQL: whole storage deals on both sides, a chunked, paid
//! retrieval, rejection and failure paths — and in every failure case, an unchanged journal.

use sqlx::PgPool;
use uuid::Uuid;

use dealledger::db::testing::fresh_database;
use dealledger::deals::script::{Parties, Script};
use dealledger::deals::{Deals, DealsError};
use dealledger::domain::retrieval::{ByteRange, RetrievalDealProposal};
use dealledger::domain::storage::{ClientDealProposal, ProposalError};
use dealledger::domain::{ChainEpoch, TokenAmount};
use dealledger::events::outbox;
use dealledger::fsm::fixtures::*;
use dealledger::fsm::storage_client::{StorageClient, StorageClientEvent as SC};
use dealledger::fsm::storage_provider::{StorageProvider, StorageProviderEvent as SP};
use dealledger::fsm::{Deal, DecideContext, Label, Machine, Rejection};
use dealledger::projections::rows::Projected;
use ed25519_dalek::SigningKey;

async fn deals() -> (Deals, PgPool) {
    let (pool, _) = fresh_database(8).await.expect("a fresh test database");
    (Deals::new(dealledger::events::Journal::new(pool.clone())), pool)
}

fn ctx() -> DecideContext {
    DecideContext { epoch: ChainEpoch(NOW), ..DecideContext::default() }
}

/// Runs a command that must be accepted, and checks that replaying the journal gives the deal
/// the live path produced.
async fn run<M: Projected>(deals: &Deals, stream: Uuid, command: M::Event) -> Deal<M> {
    let deal = Script::new(deals, ctx(), true).step::<M>(stream, command).await.expect("accepted");
    // Invariant: the inline status row is written with the events (read-your-writes).
    let sql = format!("SELECT state, version FROM {} WHERE {} = $1", M::TABLE.name, M::TABLE.key);
    let (state, version): (String, i32) = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(stream)
        .fetch_one(deals.journal().pool())
        .await
        .expect("the status row exists");
    assert_eq!((state.as_str(), version as u32), (deal.state.name(), deal.version));
    deal
}

fn parties() -> (SigningKey, SigningKey) {
    (client_key(), provider_key())
}

/// Invariant: every status row equals the fold of its stream (ends every test that writes).
async fn assert_projections_match_the_journal(pool: &PgPool) {
    let tables = dealledger::projections::rebuild::inline_tables(None).unwrap();
    let diffs =
        dealledger::projections::rebuild::check_inline(pool, &tables, &mut |_| {}).await.unwrap();
    assert!(diffs.is_empty(), "status rows differ from the journal: {diffs:?}");
}

/// Rows in the journal and the outbox, to show that a refused command wrote nothing.
async fn counts(pool: &PgPool) -> (i64, i64) {
    let events = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(pool).await.unwrap();
    let effects = sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(pool).await.unwrap();
    (events, effects)
}

async fn effect_types(pool: &PgPool, stream: Uuid) -> Vec<String> {
    outbox::pending(pool, Some(stream), 1_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.effect_type)
        .collect()
}

/// Drives a storage deal on both sides until it is active; returns (client, provider) streams.
async fn deal_to_active(deals: &Deals, proposal: ClientDealProposal) -> (Uuid, Uuid) {
    let (client, provider) = parties();
    Script::new(deals, ctx(), true)
        .storage_deal_to_active(proposal, &Parties { client: &client, provider: &provider })
        .await
        .expect("the deal reaches Active")
}

#[tokio::test]
async fn a_storage_deal_runs_to_active_and_then_expires_on_both_sides() {
    let (deals, pool) = deals().await;
    let (client, provider) = deal_to_active(&deals, signed_proposal()).await;
    for stream in [client, provider] {
        let status = deals.get_storage_deal_status(stream).await.unwrap();
        assert_eq!((status.state, status.code), ("Active", 7));
        assert!(status.deal_id.is_some());
        assert_eq!(status.bytes_transferred, 2048);
        assert_eq!(status.funds_reserved, TokenAmount::ZERO);
    }
    let provider_effects = effect_types(&pool, provider).await;
    for expected in [
        "decide-on-proposal",
        "send",
        "verify-piece-commitment",
        "reserve-funds",
        "publish-deal",
        "wait-for-message",
        "release-funds",
        "hand-off-to-sealing",
        "watch-expiry",
    ] {
        assert!(
            provider_effects.iter().any(|e| e == expected),
            "no {expected}: {provider_effects:?}"
        );
    }
    run::<StorageClient>(&deals, client, SC::DealExpired { epoch: ChainEpoch(600_000) }).await;
    run::<StorageProvider>(&deals, provider, SP::DealExpired { epoch: ChainEpoch(600_000) }).await;
    for stream in [client, provider] {
        let status = deals.get_storage_deal_status(stream).await.unwrap();
        assert_eq!((status.state, status.code), ("Expired", 8));
        assert!(deals.journal().verify_stream(stream).await.unwrap().first_bad.is_none());
    }
    assert_projections_match_the_journal(&pool).await;
}

#[tokio::test]
async fn an_active_deal_can_be_slashed_and_then_accepts_nothing() {
    let (deals, pool) = deals().await;
    let (client, provider) = deal_to_active(&deals, signed_proposal()).await;
    run::<StorageProvider>(&deals, provider, SP::DealSlashed { epoch: ChainEpoch(20_000) }).await;
    run::<StorageClient>(&deals, client, SC::DealSlashed { epoch: ChainEpoch(20_000) }).await;
    assert_eq!(deals.get_storage_deal_status(provider).await.unwrap().code, 9);
    let before = counts(&pool).await;
    let late = deals
        .handle::<StorageProvider>(provider, SP::DealExpired { epoch: ChainEpoch(1) }, &ctx(), None)
        .await;
    assert!(matches!(late, Err(DealsError::Rejected(Rejection::Transition(_)))), "{late:?}");
    assert_eq!(counts(&pool).await, before);
    assert_projections_match_the_journal(&pool).await;
}

#[tokio::test]
async fn a_rejected_proposal_fails_the_client_deal_through_failing_and_releases_funds() {
    let (deals, pool) = deals().await;
    let proposal = signed_proposal();
    let requirement = proposal.proposal.client_balance_requirement().unwrap();
    let client = deals.initiate_deal(proposal.clone(), &ctx()).await.unwrap().stream_id;
    run::<StorageClient>(&deals, client, SC::FundsReserved { amount: requirement }).await;
    let provider = deals.receive_proposal(proposal, &ctx(), None).await.unwrap().stream_id;
    run::<StorageProvider>(&deals, provider, SP::DealRejected { reason: "price".into() }).await;
    run::<StorageProvider>(&deals, provider, SP::RejectionSent).await;
    run::<StorageProvider>(&deals, provider, SP::CleanupCompleted).await;
    run::<StorageClient>(&deals, client, SC::DealRejected { reason: "price".into() }).await;
    let failing = deals.get_storage_deal_status(client).await.unwrap();
    assert_eq!((failing.state, failing.funds_reserved), ("Failing", requirement));
    assert!(effect_types(&pool, client).await.contains(&"release-funds".to_string()));
    run::<StorageClient>(&deals, client, SC::CleanupCompleted).await;
    let done = deals.get_storage_deal_status(client).await.unwrap();
    assert_eq!((done.state, done.code, done.funds_reserved), ("Error", 26, TokenAmount::ZERO));
    assert_eq!(done.message.as_deref(), Some("price"));
    assert_eq!(deals.get_storage_deal_status(provider).await.unwrap().state, "Error");
    assert_projections_match_the_journal(&pool).await;
}

#[tokio::test]
async fn a_proposal_with_a_bad_signature_is_rejected_and_records_nothing() {
    let (deals, pool) = deals().await;
    let mut forged = signed_proposal();
    forged.proposal.provider_collateral = TokenAmount(1);
    let before = counts(&pool).await;
    let client = deals.initiate_deal(forged.clone(), &ctx()).await;
    let provider = deals.receive_proposal(forged, &ctx(), None).await;
    for result in [client.map(|_| ()), provider.map(|_| ())] {
        assert!(
            matches!(
                result,
                Err(DealsError::Rejected(Rejection::Proposal(
                    ProposalError::BadClientSignature { .. }
                )))
            ),
            "{result:?}"
        );
    }
    assert_eq!(counts(&pool).await, before);
}

#[tokio::test]
async fn the_same_proposal_cannot_start_two_deals() {
    let (deals, pool) = deals().await;
    deals.receive_proposal(signed_proposal(), &ctx(), None).await.unwrap();
    let before = counts(&pool).await;
    let again = deals.receive_proposal(signed_proposal(), &ctx(), None).await;
    assert!(matches!(again, Err(DealsError::Rejected(Rejection::DealExists { .. }))), "{again:?}");
    assert_eq!(counts(&pool).await, before);
}

#[tokio::test]
async fn an_illegal_transition_or_unknown_deal_is_rejected_and_records_nothing() {
    let (deals, pool) = deals().await;
    let client = deals.initiate_deal(signed_proposal(), &ctx()).await.unwrap().stream_id;
    let before = counts(&pool).await;
    let illegal = deals
        .handle::<StorageClient>(client, SC::DealActivated { epoch: ChainEpoch(1) }, &ctx(), None)
        .await;
    assert!(
        matches!(&illegal, Err(DealsError::Rejected(Rejection::Transition(t)))
            if t.state == "ReserveClientFunds" && t.input == "DealActivated"),
        "{illegal:?}"
    );
    let unknown =
        deals.handle::<StorageClient>(Uuid::now_v7(), SC::DataTransferStarted, &ctx(), None).await;
    assert!(matches!(unknown, Err(DealsError::Rejected(Rejection::DealNotFound { .. }))));
    let wrong_machine = deals.load::<StorageProvider>(client).await;
    assert!(matches!(wrong_machine, Err(DealsError::WrongStreamType { .. })));
    assert_eq!(counts(&pool).await, before);
}

#[tokio::test]
async fn a_decision_made_on_a_stale_version_is_a_conflict_and_records_nothing() {
    let (deals, pool) = deals().await;
    let client = deals.initiate_deal(signed_proposal(), &ctx()).await.unwrap().stream_id;
    let stale = deals.load::<StorageClient>(client).await.unwrap();
    let first = stale.decide(SC::FundingInitiated { message: message_cid(b"a") }, &ctx()).unwrap();
    let second =
        stale.decide(SC::DealCancelled { reason: "changed my mind".into() }, &ctx()).unwrap();
    deals.record(&stale, &first, None).await.unwrap();
    let before = counts(&pool).await;
    let conflict = deals.record(&stale, &second, None).await;
    assert!(
        matches!(
            conflict,
            Err(DealsError::Journal(dealledger::events::JournalError::Conflict {
                expected: 1,
                actual: 2,
                ..
            }))
        ),
        "{conflict:?}"
    );
    assert_eq!(counts(&pool).await, before);
}

#[tokio::test]
async fn racing_commands_are_decided_one_after_the_other() {
    let (deals, _) = deals().await;
    let provider = accepted_provider_deal(&deals).await;
    run::<StorageProvider>(&deals, provider, SP::DataTransferStarted).await;
    // Given a deal receiving data, when a cancel and the transfer's completion race
    let context = ctx();
    let (a, b) = tokio::join!(
        deals.handle::<StorageProvider>(
            provider,
            SP::DealCancelled { reason: "operator".into() },
            &context,
            None
        ),
        deals.handle::<StorageProvider>(
            provider,
            SP::DataTransferCompleted { bytes: 2048 },
            &context,
            None
        ),
    );
    // Then the journal holds a legal history: either both (completed, then cancelled from
    // VerifyData) or one of them, with the other refused by the machine.
    let deal = deals.load::<StorageProvider>(provider).await.unwrap();
    let accepted = [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count() as u32;
    assert_eq!(deal.version, 4 + accepted);
    for result in [a.map(|_| ()), b.map(|_| ())] {
        if let Err(e) = result {
            assert!(matches!(e, DealsError::Rejected(Rejection::Transition(_))), "{e:?}");
        }
    }
    assert!(deals.journal().verify_stream(provider).await.unwrap().first_bad.is_none());
    assert_projections_match_the_journal(deals.journal().pool()).await;
}

/// A provider deal receiving nothing yet, recorded through `deals` (which remembers it).
async fn accepted_provider_deal(deals: &Deals) -> Uuid {
    let proposal = signed_proposal();
    let signed = dealledger::domain::storage::StorageDeal::sign(proposal.clone(), &provider_key());
    let provider = deals.receive_proposal(proposal, &ctx(), None).await.unwrap().stream_id;
    run::<StorageProvider>(deals, provider, SP::DealAccepted { deal: Box::new(signed) }).await;
    provider
}

/// Two ledgers on one database (two processes): a deal accepted through the first, which
/// remembers it, then moved on (transfer started) through the second. Returns the first.
async fn deal_moved_by_another_process() -> (Deals, PgPool, Uuid) {
    let (here, pool) = deals().await;
    let there = Deals::new(dealledger::events::Journal::new(pool.clone()));
    let provider = accepted_provider_deal(&here).await;
    there.handle::<StorageProvider>(provider, SP::DataTransferStarted, &ctx(), None).await.unwrap();
    (here, pool, provider)
}

#[tokio::test]
async fn a_deal_another_process_moved_takes_a_command_only_its_new_state_allows() {
    // Given a deal this ledger recorded last and another process moved on
    let (here, pool, provider) = deal_moved_by_another_process().await;
    // When a command only the new state allows comes here
    let command = SP::DataTransferCompleted { bytes: 2048 };
    let done = here.handle::<StorageProvider>(provider, command, &ctx(), None).await;
    // Then it is accepted, not refused on the state this ledger remembered
    assert_eq!(done.expect("decided on the deal as it is now").deal.version, 5);
    assert_projections_match_the_journal(&pool).await;
}

#[tokio::test]
async fn a_command_decided_on_a_state_another_process_moved_on_is_decided_again() {
    // Given a deal this ledger recorded last and another process moved on
    let (here, pool, provider) = deal_moved_by_another_process().await;
    // When a command both states allow comes here
    let command = SP::DealCancelled { reason: "operator".into() };
    let cancelled = here.handle::<StorageProvider>(provider, command, &ctx(), None).await;
    // Then it follows the other process's event instead of overwriting or forking the stream
    let events = here.journal().read_stream(provider, 1).await.unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types[3], "data-transfer-started", "{types:?}");
    assert_eq!(
        cancelled.expect("accepted after deciding again").deal.version as usize,
        events.len()
    );
    assert!(here.journal().verify_stream(provider).await.unwrap().first_bad.is_none());
    assert_projections_match_the_journal(&pool).await;
}

fn terms_for(range: ByteRange) -> RetrievalDealProposal {
    RetrievalDealProposal { part: range, ..retrieval_terms() }
}

#[tokio::test]
async fn a_chunked_retrieval_completes_through_several_paid_deals() {
    let (deals, pool) = deals().await;
    let request = retrieval_request();
    let parts = request.parts();
    let request_id = deals.initiate_retrieval(request, 3, &ctx()).await.unwrap();
    assert_eq!(effect_types(&pool, request_id).await, ["start-retrieval-deal"]);
    let (client, provider) = parties();
    let parties = Parties { client: &client, provider: &provider };
    let mut script = Script::new(&deals, ctx(), true);
    let mut payments = 0;
    for (index, range) in parts.iter().enumerate() {
        payments += script
            .retrieve_part(request_id, index as u32, terms_for(*range), &parties)
            .await
            .unwrap();
    }
    let status = deals.get_retrieval_status(request_id).await.unwrap();
    assert_eq!((status.state, status.parts, status.parts_completed), ("Completed", 3, 3));
    assert_eq!(status.bytes_done, 2_500);
    let expected_paid: u128 = parts.iter().map(|r| terms_for(*r).total_price().unwrap().0).sum();
    assert_eq!(status.total_paid, TokenAmount(expected_paid));
    assert!(payments >= 6, "each 1,000-byte part pays at 300 and 700 bytes and at the end");
    assert_projections_match_the_journal(&pool).await;
}

#[tokio::test]
async fn an_embedded_ledger_takes_the_operators_cancel_fail_and_retry() {
    use dealledger::ledger::{DatabaseChoice, Ledger};
    let home = dealledger::db::testing::scratch_dir("ledger").expect("a scratch directory");
    let ledger = Ledger::builder()
        .database(DatabaseChoice::Embedded(home.clone()))
        .key(client_key())
        .build()
        .await
        .expect("an embedded ledger starts");
    // Given two deals started through the facade
    let first = ledger.initiate_deal(vec![7u8; 2048].as_slice(), proposal()).await.unwrap();
    let mut other = proposal();
    other.label = "second".into();
    let second = ledger.initiate_deal(vec![8u8; 2048].as_slice(), other).await.unwrap();
    // Then a deal that is not paused refuses a retry, and the others are recorded with who
    // and why, through Failing
    assert!(ledger.retry(first.stream_id, "gil", "nothing is paused").await.is_err());
    assert_eq!(ledger.cancel(first.stream_id, "gil", "changed plans").await.unwrap(), "Failing");
    assert_eq!(ledger.fail(second.stream_id, "gil", "bad data").await.unwrap(), "Failing");
    let status = ledger.get_storage_deal_status(second.stream_id).await.unwrap();
    assert_eq!(status.message.as_deref(), Some("failed by gil: bad data"));
    ledger.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&home);
}

#[tokio::test]
async fn deals_moved_at_once_have_status_rows_and_effects_equal_to_playing_them_alone() {
    // Given 48 provider deals played from proposal to Active by 24 tasks at once, so that
    // most commands are recorded in groups (group commit), status row updates included
    let (ledger, pool) = deals().await;
    let workers: Vec<_> = (0..24)
        .map(|worker| {
            let deals = ledger.clone();
            tokio::spawn(async move {
                let mut streams = Vec::new();
                for n in (worker..48).step_by(24) {
                    let mut terms = proposal();
                    terms.label = format!("at once {n}");
                    let signed = ClientDealProposal::sign(terms, &client_key());
                    let stream = Deals::storage_stream_id(StorageProvider::NAME, &signed);
                    let (_, commands) =
                        dealledger::deals::script::storage_deal_commands(signed, &provider_key());
                    for command in commands {
                        deals.handle::<StorageProvider>(stream, command, &ctx(), None).await?;
                    }
                    streams.push(stream);
                }
                Ok::<_, DealsError>(streams)
            })
        })
        .collect();
    let mut streams = Vec::new();
    for worker in workers {
        streams.extend(worker.await.unwrap().unwrap());
    }
    // Then every deal is Active, and each status row equals the fold of its stream
    let active: i64 =
        sqlx::query_scalar("SELECT count(*) FROM storage_deals WHERE state = 'Active'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(active, 48);
    assert_projections_match_the_journal(&pool).await;
    // And groups recorded some of the commands (if every group statement failed, the
    // one-by-one retry would write the same rows, and this test would not test groups)
    assert!(ledger.journal().appended_in_groups() > 0);
    // And each deal's outbox holds what the same deal played alone enqueues
    let (alone_deals, alone_pool) = deals().await;
    let mut terms = proposal();
    terms.label = "alone".into();
    let signed = ClientDealProposal::sign(terms, &client_key());
    let alone = Deals::storage_stream_id(StorageProvider::NAME, &signed);
    let (_, commands) = dealledger::deals::script::storage_deal_commands(signed, &provider_key());
    for command in commands {
        alone_deals.handle::<StorageProvider>(alone, command, &ctx(), None).await.unwrap();
    }
    let effects_of = |pool: PgPool, stream: Uuid| async move {
        sqlx::query_as::<_, (i32, i16, String)>(
            "SELECT version, seq, effect_type FROM outbox WHERE stream_id = $1 ORDER BY id",
        )
        .bind(stream)
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let expected = effects_of(alone_pool, alone).await;
    assert!(!expected.is_empty());
    for stream in streams {
        assert_eq!(effects_of(pool.clone(), stream).await, expected);
    }
}
