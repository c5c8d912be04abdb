//! Audit on real PostgreSQL: every kind of tampering (rows forged behind the append-only
//! trigger) is detected and pinpointed by `verify` and by a deal's audit.

use sqlx::PgPool;
use uuid::Uuid;

use dealledger::audit::find_streams;
use dealledger::audit::timeline::{AuditPoint, audit};
use dealledger::audit::verify::verify_all;
use dealledger::db::testing::fresh_database;
use dealledger::deals::Deals;
use dealledger::deals::script::{Parties, Script};
use dealledger::domain::ChainEpoch;
use dealledger::domain::storage::ClientDealProposal;
use dealledger::events::Journal;
use dealledger::fsm::DecideContext;
use dealledger::fsm::fixtures::*;

/// Two storage deals to Active, both sides: four streams of 10 (client) or 14 (provider) events.
async fn two_deals() -> (Deals, PgPool, [(Uuid, Uuid); 2]) {
    let (pool, _) = fresh_database(4).await.expect("a fresh test database");
    let deals = Deals::new(Journal::new(pool.clone()));
    let (client, provider) = (client_key(), provider_key());
    let parties = Parties { client: &client, provider: &provider };
    let ctx = DecideContext { epoch: ChainEpoch(NOW), ..DecideContext::default() };
    let mut script = Script::new(&deals, ctx, false);
    let mut pairs = [(Uuid::nil(), Uuid::nil()); 2];
    for (n, pair) in pairs.iter_mut().enumerate() {
        let mut terms = proposal();
        terms.label = format!("deal {n}");
        *pair = script
            .storage_deal_to_active(ClientDealProposal::sign(terms, &client_key()), &parties)
            .await
            .unwrap();
    }
    // The forgeries below change keys the outbox refers to; a forger would drop this too.
    sqlx::query("ALTER TABLE outbox DROP CONSTRAINT outbox_event_fkey")
        .execute(&pool)
        .await
        .unwrap();
    (deals, pool, pairs)
}

/// Runs `sql` with the append-only trigger disabled, as someone with table rights could.
async fn forge(pool: &PgPool, sql: String) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("ALTER TABLE events DISABLE TRIGGER events_append_only")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await.unwrap();
    sqlx::query("ALTER TABLE events ENABLE TRIGGER events_append_only")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

/// Asserts that `verify` reports exactly `expected` (stream, first bad version), and that the
/// deal's audit points at the same version.
async fn assert_detected(deals: &Deals, expected: &[(Uuid, u32)]) {
    let report = verify_all(deals.journal(), None, &mut |_| {}).await.unwrap();
    let mut found: Vec<(Uuid, u32)> =
        report.broken.iter().map(|b| (b.stream_id, b.version)).collect();
    found.sort();
    let mut expected = expected.to_vec();
    expected.sort();
    assert_eq!(found, expected, "{:#?}", report.broken);
    for (stream, version) in expected {
        let timeline = audit(deals.journal(), stream, None).await.unwrap();
        assert!(!timeline.verdict.holds());
        let pinpointed = timeline.verdict.chain.as_ref().map(|b| b.version).or(timeline
            .verdict
            .first_illegal
            .as_ref()
            .map(|i| i.version));
        assert_eq!(pinpointed, Some(version));
    }
}

#[tokio::test]
async fn an_untouched_journal_verifies_and_audits_clean() {
    let (deals, _, [(client, provider), _]) = two_deals().await;
    let report = verify_all(deals.journal(), None, &mut |_| {}).await.unwrap();
    assert_eq!((report.streams, report.broken.len()), (4, 0));
    for stream in [client, provider] {
        let timeline = audit(deals.journal(), stream, None).await.unwrap();
        assert!(timeline.verdict.holds(), "{:?}", timeline.verdict);
        assert_eq!(timeline.state, Some("Active"));
        assert!(timeline.entries.iter().flat_map(|e| &e.signatures).all(|s| s.valid));
        assert!(timeline.entries.iter().any(|e| !e.signatures.is_empty()));
    }
}

#[tokio::test]
async fn an_altered_payload_is_pinpointed() {
    let (deals, pool, [(_, provider), _]) = two_deals().await;
    forge(&pool, format!("UPDATE events SET payload = payload || '\\x00'::bytea WHERE stream_id = '{provider}' AND version = 5")).await;
    assert_detected(&deals, &[(provider, 5)]).await;
}

#[tokio::test]
async fn an_altered_timestamp_is_pinpointed() {
    let (deals, pool, [(client, _), _]) = two_deals().await;
    forge(&pool, format!("UPDATE events SET recorded_at = recorded_at - interval '1 day' WHERE stream_id = '{client}' AND version = 3")).await;
    assert_detected(&deals, &[(client, 3)]).await;
}

#[tokio::test]
async fn a_dropped_event_is_pinpointed() {
    let (deals, pool, [(_, provider), _]) = two_deals().await;
    forge(&pool, format!("DELETE FROM events WHERE stream_id = '{provider}' AND version = 4"))
        .await;
    // Version 5 now sits where version 4 should be.
    assert_detected(&deals, &[(provider, 5)]).await;
}

#[tokio::test]
async fn two_swapped_events_are_pinpointed() {
    let (deals, pool, [(client, _), _]) = two_deals().await;
    forge(
        &pool,
        format!(
            "ALTER TABLE events DROP CONSTRAINT events_stream_version_key; \
             UPDATE events SET version = CASE version WHEN 6 THEN 7 ELSE 6 END \
             WHERE stream_id = '{client}' AND version IN (6, 7)"
        ),
    )
    .await;
    assert_detected(&deals, &[(client, 6)]).await;
}

#[tokio::test]
async fn an_event_moved_to_another_stream_is_pinpointed_in_both() {
    let (deals, pool, [(_, first), (_, second)]) = two_deals().await;
    forge(&pool, format!("UPDATE events SET stream_id = '{second}', version = 15 WHERE stream_id = '{first}' AND version = 14")).await;
    // The first stream lost its last event: what remains is a valid, shorter chain that the
    // status row (at version 14) contradicts; the second gained an event that is not its own.
    let report = verify_all(deals.journal(), None, &mut |_| {}).await.unwrap();
    assert_eq!(
        report.broken.iter().map(|b| (b.stream_id, b.version)).collect::<Vec<_>>(),
        vec![(second, 15)]
    );
    let shortened = audit(deals.journal(), first, None).await.unwrap();
    assert!(!shortened.verdict.holds(), "the status row shows a version the journal lost");
    assert_eq!(
        audit(deals.journal(), second, None).await.unwrap().verdict.chain.map(|b| b.version),
        Some(15)
    );
}

#[tokio::test]
async fn a_row_inserted_with_a_forged_version_is_pinpointed() {
    let (deals, pool, [(client, _), _]) = two_deals().await;
    forge(
        &pool,
        format!(
            "INSERT INTO events (stream_id, stream_type, version, event_type, schema_version, payload, \
             recorded_at, prev_cid, cid) SELECT stream_id, stream_type, 11, event_type, schema_version, \
             payload, recorded_at, cid, cid FROM events WHERE stream_id = '{client}' AND version = 10"
        ),
    )
    .await;
    assert_detected(&deals, &[(client, 11)]).await;
}

#[tokio::test]
async fn an_audit_shows_the_deal_as_of_a_version_and_finds_deals_by_proposal_cid() {
    let (deals, pool, [(client, provider), _]) = two_deals().await;
    let at_three = audit(deals.journal(), provider, Some(AuditPoint::Version(3))).await.unwrap();
    assert_eq!(
        (at_three.state, at_three.version, at_three.entries.len()),
        (Some("WaitingForData"), 3, 3)
    );
    assert!(at_three.verdict.projection_diffs.is_none());
    let cid: String =
        sqlx::query_scalar("SELECT proposal_cid FROM storage_deals WHERE stream_id = $1")
            .bind(client)
            .fetch_one(&pool)
            .await
            .unwrap();
    let mut found = find_streams(&pool, &cid).await.unwrap();
    found.sort();
    let mut expected = vec![client, provider];
    expected.sort();
    assert_eq!(found, expected);
    assert!(find_streams(&pool, "bafy-nothing").await.is_err());
}

#[tokio::test]
async fn a_checkpoint_pins_history_even_against_a_consistent_rewrite() {
    use dealledger::audit::checkpoint;
    use dealledger::events::chain::expected_cid;
    let (deals, pool, [(client, _), _]) = two_deals().await;
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    checkpoint::create(deals.journal(), &key, chrono::Utc::now()).await.unwrap();
    assert!(checkpoint::verify_against(deals.journal(), None).await.unwrap().unwrap().holds());
    // Someone rewrites the client stream from version 3 on, recomputing every CID, so that
    // its chain is internally consistent again
    let mut events = deals.journal().read_stream(client, 1).await.unwrap();
    events[2].recorded_at -= chrono::Duration::hours(1);
    for i in 2..events.len() {
        events[i].prev_cid = Some(events[i - 1].cid);
        events[i].cid = expected_cid(&events[i]);
        let e = &events[i];
        forge(
            &pool,
            format!(
                "UPDATE events SET recorded_at = '{}', prev_cid = '\\x{}', cid = '\\x{}' \
                 WHERE stream_id = '{client}' AND version = {}",
                e.recorded_at.to_rfc3339(),
                hex::encode(e.prev_cid.unwrap().to_bytes()),
                hex::encode(e.cid.to_bytes()),
                e.version
            ),
        )
        .await;
    }
    // Then the chains all verify, but the checkpoint shows the rewritten head
    let report = verify_all(deals.journal(), None, &mut |_| {}).await.unwrap();
    assert!(report.broken.is_empty(), "{:?}", report.broken);
    let found = checkpoint::verify_against(deals.journal(), None).await.unwrap().unwrap();
    assert!(found.signature_valid && found.root_matches);
    assert_eq!(found.changed, vec![(client, 10)]);
    assert!(!found.holds());
}

#[tokio::test]
async fn a_bundle_round_trips_and_any_flipped_byte_makes_it_fail() {
    use dealledger::audit::{bundle, checkpoint};
    let (deals, _, [(_, provider), _]) = two_deals().await;
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    checkpoint::create(deals.journal(), &key, chrono::Utc::now()).await.unwrap();
    let exported = bundle::export(deals.journal(), provider).await.unwrap();
    let bytes = exported.to_bytes().unwrap();
    let read = bundle::DealBundle::from_bytes(&bytes).unwrap();
    assert_eq!(read, exported);
    let verdict = read.verify().unwrap();
    assert!(verdict.holds(), "{verdict:?}");
    assert_eq!(verdict.timeline.state, Some("Active"));
    let pinned = verdict.checkpoint.expect("a checkpoint in the bundle");
    assert_eq!(pinned.pinned_version, 14);
    // Every single-bit flip anywhere in the file is caught
    for index in 0..bytes.len() {
        let mut flipped = bytes.clone();
        flipped[index] ^= 0x01;
        let caught = match bundle::DealBundle::from_bytes(&flipped) {
            Err(_) => true,
            Ok(b) => b.verify().map_or(true, |v| !v.holds()),
        };
        assert!(caught, "a flip at byte {index} of {} went unnoticed", bytes.len());
    }
}
