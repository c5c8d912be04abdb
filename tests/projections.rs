//! Projections on real PostgreSQL: inline rows equal the fold of the journal, rebuilds equal
//! live and are atomic, the asynchronous projector loses and duplicates nothing, deal updates
//! cross processes, and the reader role reads only what it should.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use futures::StreamExt;
use sqlx::PgPool;
use uuid::Uuid;

use dealledger::db::testing::fresh_database;
use dealledger::deals::Deals;
use dealledger::deals::script::{Parties, Script, storage_deal_commands};
use dealledger::domain::storage::ClientDealProposal;
use dealledger::domain::{ChainEpoch, PartyKey};
use dealledger::events::{Checkpoint, EventCodec, Journal};
use dealledger::fsm::fixtures::*;
use dealledger::fsm::storage_client::{StorageClient, StorageClientEvent};
use dealledger::fsm::storage_provider::StorageProvider;
use dealledger::fsm::{Deal, DecideContext};
use dealledger::projections::ProjectionError;
use dealledger::projections::projector::{self, TransitionsProjector};
use dealledger::projections::rebuild::{check_inline, diff_row, inline_tables, rebuild_inline};
use dealledger::projections::rows::STORAGE_DEALS;
use dealledger::projections::updates::{UpdateFilter, subscribe_deal_updates};

async fn setup(connections: u32) -> (Deals, PgPool) {
    let (pool, _) = fresh_database(connections).await.expect("a fresh test database");
    (Deals::new(Journal::new(pool.clone())), pool)
}

fn ctx() -> DecideContext {
    DecideContext { epoch: ChainEpoch(NOW), ..DecideContext::default() }
}

fn proposal_numbered(n: u32) -> ClientDealProposal {
    let mut terms = proposal();
    terms.label = format!("deal {n}");
    ClientDealProposal::sign(terms, &client_key())
}

fn no_progress(_: u64) {}

/// Invariant: every status row equals the fold of its stream, and every stream has its row.
async fn assert_projections_match_the_journal(pool: &PgPool) {
    let diffs = check_inline(pool, &inline_tables(None).unwrap(), &mut no_progress).await.unwrap();
    assert!(diffs.is_empty(), "{} rows differ, first: {:?}", diffs.len(), diffs.first());
}

/// Each storage row's key, state and version, in key order: enough to tell a table left
/// alone from one rebuilt.
/// How many rows `storage_deals` shows to `db` (a pool, or a connection mid-test).
async fn storage_deal_count<'e>(db: impl sqlx::PgExecutor<'e>) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM storage_deals").fetch_one(db).await.unwrap()
}

async fn storage_rows(pool: &PgPool) -> Vec<(Uuid, String, i32)> {
    sqlx::query_as("SELECT stream_id, state, version FROM storage_deals ORDER BY 1")
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Records `deals` storage deals, each cut after a different number of commands, both sides,
/// each in one transaction, from `writers` concurrent tasks.
async fn mixed_workload(deals: &Deals, count: u32, writers: u32) {
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let deals = deals.clone();
            tokio::spawn(async move {
                for n in (w..count).step_by(writers as usize) {
                    let proposal = proposal_numbered(n);
                    let (client, provider) =
                        storage_deal_commands(proposal.clone(), &provider_key());
                    let client_cut = 1 + n as usize % client.len();
                    let provider_cut = 1 + n as usize % provider.len();
                    let id = Deals::storage_stream_id("storage_client", &proposal);
                    let decision = Deal::<StorageClient>::new(id)
                        .decide_all(client.into_iter().take(client_cut), &ctx())
                        .unwrap();
                    deals.record(&Deal::new(id), &decision, None).await.unwrap();
                    let id = Deals::storage_stream_id("storage_provider", &proposal);
                    let decision = Deal::<StorageProvider>::new(id)
                        .decide_all(provider.into_iter().take(provider_cut), &ctx())
                        .unwrap();
                    deals.record(&Deal::new(id), &decision, None).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn a_rebuild_equals_the_live_tables_after_a_mixed_workload_of_10k_deals() {
    // Given 10,000 deals (5,000 proposals, both sides) in every state of the storage flow
    let (deals, pool) = setup(10).await;
    mixed_workload(&deals, 5_000, 8).await;
    let before: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM storage_deals GROUP BY 1 ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(before.len() >= 10, "the workload covers many states: {before:?}");
    assert_projections_match_the_journal(&pool).await;
    // When the tables are rebuilt from scratch
    let report =
        rebuild_inline(&pool, &inline_tables(None).unwrap(), &mut no_progress).await.unwrap();
    // Then they hold exactly what they held
    assert_eq!(report.streams, 10_000);
    let after: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM storage_deals GROUP BY 1 ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(before, after);
    assert_projections_match_the_journal(&pool).await;
}

#[tokio::test]
async fn check_reports_a_corrupted_row_and_a_rebuild_repairs_it() {
    let (deals, pool) = setup(4).await;
    mixed_workload(&deals, 20, 2).await;
    sqlx::query("UPDATE storage_deals SET state = 'Active', state_code = 7 WHERE version = 1")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE retrieval_requests SET state = 'x'").execute(&pool).await.unwrap();
    let diffs = check_inline(&pool, &inline_tables(None).unwrap(), &mut no_progress).await.unwrap();
    let corrupted: i64 = sqlx::query_scalar("SELECT count(*) FROM storage_deals WHERE version = 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(corrupted > 0);
    assert_eq!(diffs.len() as i64, corrupted * 2, "each bad row is reported from both sides");
    assert!(diffs.iter().all(|d| d.table == "storage_deals"));
    assert!(diffs.iter().any(|d| d.kind == "unexpected in live" && d.row.contains("\"Active\"")));
    rebuild_inline(&pool, &inline_tables(None).unwrap(), &mut no_progress).await.unwrap();
    assert_projections_match_the_journal(&pool).await;
}

#[tokio::test]
async fn a_row_copied_in_binary_equals_the_same_row_cast_from_text() {
    // Given a storage row with edge values in every column type: NULLs, quotes, commas and
    // non-ASCII text, extreme integers, numerics that are huge, negative or fractional, and
    // times on both sides of PostgreSQL's epoch
    let (_deals, pool) = setup(2).await;
    let texts = [
        Some(Uuid::now_v7().to_string()),
        Some("storage_client".into()),
        Some("bafy\"quoted\", with commas".into()),
        None,
        Some(i64::MIN.to_string()),
        Some("true".into()),
        Some("ünïcödé ✓ client".into()),
        Some(String::new()),
        Some("a label\nwith a newline and \\ backslash".into()),
        Some(i64::MAX.to_string()),
        Some("0".into()),
        Some("123456789012345678901234567890".into()),
        Some("-0.00010".into()),
        Some("0".into()),
        Some("42".into()),
        None,
        Some("-1".into()),
        Some("ReserveClientFunds".into()),
        Some(i16::MIN.to_string()),
        Some("false".into()),
        Some("ProposalSent".into()),
        Some(i32::MAX.to_string()),
        Some("2026-12-02T04:00:00.123456Z".into()),
        Some("1999-12-31T23:59:59.999999Z".into()),
        None,
        Some("10000".into()),
        Some("99990000.0001".into()),
        Some("recoverable".into()),
        Some("0".into()),
        None,
    ];
    let row: Vec<Option<String>> = texts.into_iter().collect();
    assert_eq!(row.len(), STORAGE_DEALS.columns.len());
    // When it is copied in binary into the base table
    let mut conn = pool.acquire().await.unwrap();
    STORAGE_DEALS.copy_into(&mut conn, "storage_deals_rows", [&row]).await.unwrap();
    drop(conn);
    // Then it equals the row PostgreSQL casts from the same text, column by column
    let diffs = diff_row(&pool, &STORAGE_DEALS, &row).await.unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
    // And a value not in its column's canonical form is refused, and nothing is written
    let mut bad = row.clone();
    bad[0] = Some(Uuid::now_v7().to_string());
    bad[11] = Some("1e5".into());
    let mut conn = pool.acquire().await.unwrap();
    let refused = STORAGE_DEALS.copy_into(&mut conn, "storage_deals_rows", [&bad]).await;
    assert!(matches!(refused, Err(ProjectionError::BadColumnValue { .. })), "{refused:?}");
    let count = storage_deal_count(&mut *conn).await;
    assert_eq!(count, 1);
}

#[tokio::test]
async fn a_copy_built_aside_that_meets_a_bad_row_after_sending_chunks_writes_nothing() {
    // Given 20,000 good storage rows (several chunks of COPY data) followed by one whose
    // numeric is not in canonical form
    let (_deals, pool) = setup(2).await;
    let good = |n: u32| {
        let mut row: Vec<Option<String>> = vec![None; STORAGE_DEALS.columns.len()];
        row[0] = Some(Uuid::now_v7().to_string());
        row[1] = Some("storage_client".into());
        row[8] = Some(format!("row {n} {}", "x".repeat(100)));
        row[17] = Some("ProposalSent".into());
        row[18] = Some("0".into());
        row[19] = Some("false".into());
        row[20] = Some("ProposalSent".into());
        row[21] = Some("1".into());
        row[22] = Some("2026-12-02T04:00:00Z".into());
        row[23] = Some("2026-12-02T04:00:00Z".into());
        row[25] = Some("0".into());
        row[26] = Some("0".into());
        row[28] = Some("0".into());
        row
    };
    let build = move || {
        let mut bad = good(u32::MAX);
        bad[11] = Some("1e5".into());
        (0..20_000).map(good).chain([bad])
    };
    // When they are copied with the rows built on another thread
    let mut conn = pool.acquire().await.unwrap();
    let refused = STORAGE_DEALS.copy_built_aside(&mut conn, "storage_deals_rows", "", build).await;
    // Then the bad row is refused and none of the rows sent before it was written
    assert!(matches!(refused, Err(ProjectionError::BadColumnValue { .. })), "{refused:?}");
    let count = storage_deal_count(&mut *conn).await;
    assert_eq!(count, 0);
    // And the same rows without the bad one are all written
    let written = STORAGE_DEALS
        .copy_built_aside(&mut conn, "storage_deals_rows", "", move || (0..20_000).map(good))
        .await
        .unwrap();
    assert_eq!(written, 20_000);
    let count = storage_deal_count(&mut *conn).await;
    assert_eq!(count, 20_000);
}

#[tokio::test]
async fn a_rebuild_over_an_event_that_does_not_decode_fails_and_changes_nothing() {
    // Given live tables over a journal of a few thousand events (several batches of a fold),
    // the last of which does not decode
    let (deals, pool) = setup(3).await;
    mixed_workload(&deals, 300, 2).await;
    let before = storage_rows(&pool).await;
    let garbage = dealledger::events::NewEvent {
        event_type: "proposal-sent".into(),
        schema_version: 1,
        payload: vec![0xff; 7],
        correlation_id: None,
        causation_id: None,
    };
    Journal::new(pool.clone())
        .append(Uuid::now_v7(), "storage_client", 0, &[garbage])
        .await
        .unwrap();
    // When the tables are rebuilt
    let failed = rebuild_inline(&pool, &inline_tables(None).unwrap(), &mut no_progress).await;
    // Then the rebuild reports the event, and the tables are as they were
    assert!(
        matches!(failed, Err(ProjectionError::Codec(_) | ProjectionError::Transition { .. })),
        "{failed:?}"
    );
    assert_eq!(storage_rows(&pool).await, before);
    // And the pool's connections still work (none was handed back in the middle of a COPY)
    for _ in 0..6 {
        let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&pool).await.unwrap();
        assert_eq!(one, 1);
    }
}

/// Each base table's indexes and constraints as the catalog prints them.
async fn base_table_catalog(pool: &PgPool) -> Vec<(String, String, String)> {
    sqlx::query_as(
        "SELECT tablename::text, indexname::text, indexdef FROM pg_indexes \
          WHERE tablename IN ('storage_deals_rows', 'retrieval_deals_rows', \
                              'retrieval_requests_rows') \
         UNION ALL \
         SELECT conrelid::regclass::text, conname::text, pg_get_constraintdef(oid) \
           FROM pg_constraint \
          WHERE conrelid IN ('storage_deals_rows'::regclass, 'retrieval_deals_rows'::regclass, \
                             'retrieval_requests_rows'::regclass) \
         ORDER BY 1, 2, 3",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_rebuild_swaps_in_tables_with_the_same_indexes_constraints_and_readers() {
    // Given live status tables and their base tables' indexes and constraints
    let (deals, pool) = setup(4).await;
    mixed_workload(&deals, 50, 2).await;
    let catalog = base_table_catalog(&pool).await;
    assert!(catalog.len() >= 10, "indexes and constraints: {catalog:?}");
    // When the tables are rebuilt twice (the second time from a swapped-in table)
    for _ in 0..2 {
        rebuild_inline(&pool, &inline_tables(None).unwrap(), &mut no_progress).await.unwrap();
    }
    // Then the base tables have the same indexes and constraints, under the same names
    assert_eq!(base_table_catalog(&pool).await, catalog);
    // And the views and functions over them answer from the new rows
    let summed: i64 = sqlx::query_scalar("SELECT sum(deals)::bigint FROM provider_summary")
        .fetch_one(&pool)
        .await
        .unwrap();
    let rows = storage_deal_count(&pool).await;
    assert_eq!(summed, rows);
    sqlx::query("SELECT count(*) FROM active_deals_expiring_before(10000000)")
        .execute(&pool)
        .await
        .unwrap();
    // And the reader role reads the views but not the new base table
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET ROLE dealledger_reader").execute(&mut *conn).await.unwrap();
    sqlx::query("SELECT count(*) FROM storage_deals").execute(&mut *conn).await.unwrap();
    let refused = sqlx::query("SELECT count(*) FROM storage_deals_rows").execute(&mut *conn).await;
    assert!(refused.unwrap_err().to_string().contains("permission denied"));
    sqlx::query("RESET ROLE").execute(&mut *conn).await.unwrap();
    drop(conn);
    // And commands write their rows into the swapped-in table
    let fresh = deals.initiate_deal(proposal_numbered(9_999), &ctx()).await.unwrap().stream_id;
    let state: String = sqlx::query_scalar("SELECT state FROM storage_deals WHERE stream_id = $1")
        .bind(fresh)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state, "ReserveClientFunds");
    assert_projections_match_the_journal(&pool).await;
}

#[tokio::test]
async fn commands_recorded_during_rebuilds_all_reach_the_swapped_in_tables() {
    // Given writers recording deals without pause
    let (deals, pool) = setup(10).await;
    let writing = {
        let deals = deals.clone();
        tokio::spawn(async move { mixed_workload(&deals, 500, 4).await })
    };
    // When the tables are rebuilt again and again while they write (each rebuild's swap
    // holds the writers back, whose prepared statements then meet a new table)
    let mut rebuilds = 0;
    while !writing.is_finished() || rebuilds < 2 {
        rebuild_inline(&pool, &inline_tables(None).unwrap(), &mut no_progress).await.unwrap();
        rebuilds += 1;
    }
    writing.await.unwrap();
    // Then every deal has its row, equal to the fold of its stream
    let rows = storage_deal_count(&pool).await;
    assert_eq!(rows, 1_000, "after {rebuilds} rebuilds");
    assert_projections_match_the_journal(&pool).await;
}

#[tokio::test]
async fn a_rebuild_killed_midway_leaves_the_old_tables_intact() {
    // Given live tables that differ from the journal's fold in one row, so that a finished
    // rebuild and an untouched table can be told apart
    let (deals, pool) = setup(6).await;
    mixed_workload(&deals, 1_000, 4).await;
    for delay_ms in [1u64, 5, 15, 40, 80] {
        sqlx::query("UPDATE storage_deals SET state = 'Corrupted' WHERE version = 2")
            .execute(&pool)
            .await
            .unwrap();
        let old = storage_rows(&pool).await;
        // When a rebuild is killed after a while
        let pool_for_task = pool.clone();
        let task = tokio::spawn(async move {
            let tables = inline_tables(None).unwrap();
            rebuild_inline(&pool_for_task, &tables, &mut no_progress).await
        });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        task.abort();
        let finished = matches!(task.await, Ok(Ok(_)));
        // Then the table is either exactly the old one or exactly the rebuilt one, never a mix
        let now = storage_rows(&pool).await;
        if finished {
            assert_projections_match_the_journal(&pool).await;
        } else {
            assert_eq!(now, old, "a rebuild killed after {delay_ms} ms changed the table");
        }
    }
    rebuild_inline(&pool, &inline_tables(None).unwrap(), &mut no_progress).await.unwrap();
    assert_projections_match_the_journal(&pool).await;
}

#[tokio::test]
async fn the_transitions_projector_loses_and_duplicates_nothing_under_concurrent_writers() {
    let (deals, pool) = setup(16).await;
    let journal = deals.journal().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let projector = tokio::spawn(TransitionsProjector::new(journal.clone()).run(async {
        let _ = stop_rx.await;
    }));
    // Given one writer that holds its transaction open while 8 others commit deals
    let held = {
        let proposal = proposal_numbered(1_000_000);
        let id = Deals::storage_stream_id("storage_client", &proposal);
        let event = StorageClientEvent::DealInitiated { proposal: Box::new(proposal) };
        let mut tx = pool.begin().await.unwrap();
        journal
            .append_in_tx(&mut tx, id, "storage_client", 0, &[EventCodec::encode(&event).unwrap()])
            .await
            .unwrap();
        tx
    };
    mixed_workload(&deals, 400, 8).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_commit: i64 =
        sqlx::query_scalar("SELECT count(*) FROM deal_transitions").fetch_one(&pool).await.unwrap();
    assert_eq!(before_commit, 0, "nothing after the open transaction is projected before it ends");
    held.commit().await.unwrap();
    mixed_workload_more(&deals).await;
    // Then, once caught up, every event has exactly one transition row
    assert!(projector::wait_until_caught_up(&pool, Duration::from_secs(60)).await.unwrap());
    let (events, transitions, missing): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM deal_transitions), \
                (SELECT count(*) FROM events e WHERE NOT EXISTS (SELECT 1 FROM deal_transitions t \
                  WHERE t.stream_id = e.stream_id AND t.version = e.version AND t.position = e.position))",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((transitions, missing), (events, 0));
    let illegal: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM deal_transitions a JOIN deal_transitions b \
         ON a.stream_id = b.stream_id AND b.version = a.version + 1 WHERE a.to_state <> b.from_state",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(illegal, 0, "each transition starts where the previous one ended");
    // And a rebuild gives the same rows
    let live: Vec<(Uuid, i32, String, String)> = sqlx::query_as(
        "SELECT stream_id, version, from_state, to_state FROM deal_transitions ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    stop_tx.send(()).unwrap();
    projector.await.unwrap().unwrap();
    projector::rebuild_transitions(&journal, &mut no_progress).await.unwrap();
    let rebuilt: Vec<(Uuid, i32, String, String)> = sqlx::query_as(
        "SELECT stream_id, version, from_state, to_state FROM deal_transitions ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(live, rebuilt);
}

async fn mixed_workload_more(deals: &Deals) {
    let mut script = Script::new(deals, ctx(), false);
    let (client, provider) = (client_key(), provider_key());
    script
        .storage_deal_to_active(
            proposal_numbered(2_000_000),
            &Parties { client: &client, provider: &provider },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn deal_updates_reach_a_subscriber_in_another_process() {
    // Given a subscriber on its own pool (as another process would be)
    let (deals, pool) = setup(4).await;
    let (other_pool, _) = (pool.clone(), ());
    let other = Journal::new(
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with((*pool.connect_options()).clone())
            .await
            .unwrap(),
    );
    let filter = UpdateFilter { stream_types: vec!["storage_provider".into()], stream_id: None };
    let updates = subscribe_deal_updates(&other, Checkpoint::START, filter).await.unwrap();
    tokio::pin!(updates);
    // When a deal moves on the provider side
    let client_key = client_key();
    let provider_key = provider_key();
    let mut script = Script::new(&deals, ctx(), false);
    script
        .storage_deal_to_active(
            signed_proposal(),
            &Parties { client: &client_key, provider: &provider_key },
        )
        .await
        .unwrap();
    // Then the subscriber sees each provider transition, in order
    let mut steps = Vec::new();
    while steps.len() < 14 {
        let update = tokio::time::timeout(Duration::from_secs(10), updates.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(update.stream_type, "storage_provider");
        steps.push((update.step.from, update.step.to));
    }
    assert_eq!(steps[0], ("Unknown", "Validating"));
    assert_eq!(steps[1], ("Validating", "AcceptWait"));
    assert_eq!(steps.last().copied(), Some(("Finalizing", "Active")));
    drop(other_pool);
}

#[tokio::test]
async fn the_views_answer_the_daily_questions() {
    let (deals, pool) = setup(4).await;
    let (client, provider) = (client_key(), provider_key());
    let parties = Parties { client: &client, provider: &provider };
    let mut script = Script::new(&deals, ctx(), false);
    script.storage_deal_to_active(proposal_numbered(1), &parties).await.unwrap();
    let stuck = deals.initiate_deal(proposal_numbered(2), &ctx()).await.unwrap().stream_id;
    // A deal that has not moved for two hours (the clock is moved for the test's sake).
    sqlx::query(
        "UPDATE storage_deals SET last_event_at = now() - interval '2 hours' WHERE stream_id = $1",
    )
    .bind(stuck)
    .execute(&pool)
    .await
    .unwrap();
    let stuck_rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT stream_id, state FROM stuck_deals").fetch_all(&pool).await.unwrap();
    assert_eq!(stuck_rows, vec![(stuck, "ReserveClientFunds".to_string())]);
    let expiring: Vec<(Uuid,)> =
        sqlx::query_as("SELECT stream_id FROM active_deals_expiring_before(10000000)")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(expiring.len(), 2, "both sides of the active deal");
    let none: i64 = sqlx::query_scalar("SELECT count(*) FROM active_deals_expiring_before(10)")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(none, 0);
    let summary: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT provider, side, state, deals FROM provider_summary ORDER BY side, state",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let provider_id = PartyKey::of(&provider).to_string();
    assert!(summary.iter().all(|(p, ..)| *p == provider_id));
    assert!(summary.contains(&(provider_id.clone(), "storage_client".into(), "Active".into(), 1)));
    assert!(summary.contains(&(provider_id, "storage_provider".into(), "Active".into(), 1)));
}

#[tokio::test]
async fn the_reader_role_reads_the_status_tables_and_nothing_else() {
    let (deals, pool) = setup(2).await;
    deals.initiate_deal(signed_proposal(), &ctx()).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET ROLE dealledger_reader").execute(&mut *conn).await.unwrap();
    for allowed in [
        "SELECT count(*) FROM storage_deals",
        "SELECT count(*) FROM stuck_deals",
        "SELECT count(*) FROM provider_summary",
        "SELECT count(*) FROM deal_transitions",
    ] {
        sqlx::query(allowed).execute(&mut *conn).await.unwrap_or_else(|e| panic!("{allowed}: {e}"));
    }
    for refused in [
        "SELECT count(*) FROM events",
        "SELECT count(*) FROM outbox",
        "SELECT count(*) FROM storage_deals_rows",
        "UPDATE storage_deals SET state = 'x'",
        "DELETE FROM retrieval_requests",
        "INSERT INTO projection_checkpoints (name, tx_id, position) VALUES ('x', 0, 0)",
    ] {
        let error = sqlx::query(refused).execute(&mut *conn).await.unwrap_err();
        assert!(error.to_string().contains("permission denied"), "{refused}: {error}");
    }
    sqlx::query("RESET ROLE").execute(&mut *conn).await.unwrap();
    let _ = SigningKey::from_bytes(&[0; 32]);
}
