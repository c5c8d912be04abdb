//! The journal against a real PostgreSQL: appends, conflicts, append-only enforcement, the hash
//! chain and commit-safe subscription.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use sqlx::PgPool;
use uuid::Uuid;

use dealledger::db::testing::fresh_database;
use dealledger::events::outbox::{self, NewEffect};
use dealledger::events::{
    AppendStatement, ChainBreak, Checkpoint, Journal, JournalError, NewEvent,
};

async fn journal() -> (Journal, PgPool) {
    let (pool, _name) = fresh_database(10).await.expect("a fresh test database");
    (Journal::new(pool.clone()), pool)
}

fn event(name: &str, payload: &[u8]) -> NewEvent {
    NewEvent::new(name, 1, payload.to_vec())
}

#[tokio::test]
async fn appends_events_and_reads_them_back_in_order() {
    // Given an empty journal
    let (journal, _) = journal().await;
    let stream = Uuid::now_v7();
    let correlation = Uuid::now_v7();
    // When two appends write three events
    let first = journal
        .append(stream, "storage_provider", 0, &[event("deal-proposed", b"a")])
        .await
        .unwrap();
    let second = journal
        .append(
            stream,
            "storage_provider",
            1,
            &[event("deal-accepted", b"b").caused_by(correlation, correlation), event("x", b"c")],
        )
        .await
        .unwrap();
    // Then the stream reads back in version order with linked CIDs
    assert_eq!(first.first_version, 1);
    assert_eq!(second.first_version, 2);
    assert_eq!(second.head.version, 3);
    let events = journal.read_stream(stream, 1).await.unwrap();
    assert_eq!(events.iter().map(|e| e.version).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert_eq!(events[1].payload, b"b");
    assert_eq!(events[1].correlation_id, Some(correlation));
    assert_eq!(events[0].prev_cid, None);
    assert_eq!(events[1].prev_cid, Some(events[0].cid));
    assert_eq!(events[2].prev_cid, Some(events[1].cid));
    assert_eq!(second.head.cid, Some(events[2].cid));
    assert_eq!(journal.read_stream(stream, 3).await.unwrap().len(), 1);
    assert!(journal.verify_stream(stream).await.unwrap().first_bad.is_none());
}

#[tokio::test]
async fn rejects_an_append_with_a_stale_expected_version_and_writes_nothing() {
    // Given a stream at version 2
    let (journal, _) = journal().await;
    let stream = Uuid::now_v7();
    journal.append(stream, "s", 0, &[event("a", b""), event("b", b"")]).await.unwrap();
    // When a writer appends expecting version 1, or expecting a new stream
    let stale = journal.append(stream, "s", 1, &[event("c", b"")]).await.unwrap_err();
    let new = journal.append(stream, "s", 0, &[event("c", b"")]).await.unwrap_err();
    let ahead = journal.append(stream, "s", 5, &[event("c", b"")]).await.unwrap_err();
    // Then each is a typed conflict naming the real version and nothing was written
    for error in [stale, new, ahead] {
        assert!(
            matches!(error, JournalError::Conflict { actual: 2, stream_id, .. } if stream_id == stream),
            "{error:?}"
        );
    }
    assert_eq!(journal.count().await.unwrap(), 2);
}

/// Rows of the outbox: the companion write the tests below ride on an append.
async fn outbox_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(pool).await.unwrap()
}

fn enqueue_one(
    stream: Uuid,
    version: u32,
) -> impl Fn(&mut AppendStatement) -> Result<(), JournalError> + Sync {
    move |statement: &mut AppendStatement| {
        let effect = NewEffect { version, effect_type: "publish-deal", payload: vec![1] };
        outbox::enqueue_with(statement, stream, "storage_provider", &[effect])
    }
}

#[tokio::test]
async fn a_companion_write_commits_with_its_events_and_not_without_them() {
    // Given a stream at version 1
    let (journal, pool) = journal().await;
    let stream = Uuid::now_v7();
    journal.append(stream, "storage_provider", 0, &[event("a", b"1")]).await.unwrap();
    // When an append carrying an outbox row expects the right version, both are written
    let appended = journal
        .append_with(stream, "storage_provider", 1, &[event("b", b"2")], &enqueue_one(stream, 2))
        .await
        .unwrap();
    assert_eq!(appended.head.version, 2);
    assert_eq!(outbox_rows(&pool).await, 1);
    // When the same append runs again on the stale version, it is a conflict
    let stale = journal
        .append_with(stream, "storage_provider", 1, &[event("c", b"3")], &enqueue_one(stream, 2))
        .await;
    assert!(
        matches!(stale, Err(JournalError::Conflict { expected: 1, actual: 2, .. })),
        "{stale:?}"
    );
    // Then neither the events nor the companion row were written
    assert_eq!(journal.read_stream(stream, 1).await.unwrap().len(), 2);
    assert_eq!(outbox_rows(&pool).await, 1);
}

#[tokio::test]
async fn a_failing_companion_write_leaves_the_events_unwritten() {
    // Given a stream at version 1
    let (journal, pool) = journal().await;
    let stream = Uuid::now_v7();
    journal.append(stream, "storage_provider", 0, &[event("a", b"1")]).await.unwrap();
    // When an append's companion write fails in the database (an outbox row without a type)
    let failing = |statement: &mut AppendStatement| {
        let stream = statement.bind(stream)?;
        statement.write(format!(
            "INSERT INTO outbox (stream_id, stream_type, version, seq, effect_type, payload) \
             SELECT {stream}::uuid, 'storage_provider', 2, 0, NULL, '' WHERE {}",
            AppendStatement::APPENDED
        ));
        Ok(())
    };
    let result =
        journal.append_with(stream, "storage_provider", 1, &[event("b", b"2")], &failing).await;
    // Then the append fails as a database error and its events are not in the journal
    assert!(matches!(result, Err(JournalError::Database(_))), "{result:?}");
    assert_eq!(journal.read_stream(stream, 1).await.unwrap().len(), 1);
    assert_eq!(outbox_rows(&pool).await, 0);
    // And the stream takes the next append at the version it really is
    journal.append(stream, "storage_provider", 1, &[event("b", b"2")]).await.unwrap();
}

#[tokio::test]
async fn rejects_empty_appends_and_a_stream_of_another_type() {
    let (journal, _) = journal().await;
    let stream = Uuid::now_v7();
    journal.append(stream, "storage_client", 0, &[event("a", b"")]).await.unwrap();
    let empty = journal.append(stream, "storage_client", 1, &[]).await.unwrap_err();
    assert!(matches!(empty, JournalError::EmptyAppend));
    let other = journal.append(stream, "retrieval_client", 1, &[event("b", b"")]).await;
    assert!(matches!(other, Err(JournalError::StreamTypeMismatch { .. })), "{other:?}");
    assert_eq!(journal.count().await.unwrap(), 1);
}

#[tokio::test]
async fn two_writers_racing_on_one_stream_one_wins_and_the_other_conflicts() {
    let (journal, pool) = journal().await;
    for round in 0..50u32 {
        // Given a stream at version `round`
        let stream = Uuid::now_v7();
        if round > 0 {
            let seed: Vec<NewEvent> = (0..round).map(|_| event("seed", b"")).collect();
            journal.append(stream, "s", 0, &seed).await.unwrap();
        }
        // When two fresh journals (no shared cache) append at the same expected version
        let (a, b) = (Journal::new(pool.clone()), Journal::new(pool.clone()));
        let (event_a, event_b) = ([event("a", b"a")], [event("b", b"b")]);
        let (ra, rb) = tokio::join!(
            a.append(stream, "s", round, &event_a),
            b.append(stream, "s", round, &event_b),
        );
        // Then exactly one wins, the other gets Conflict, and no version is duplicated
        let results = [ra, rb];
        let wins = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "round {round}: {results:?}");
        let loser = results.into_iter().find_map(Result::err).unwrap();
        assert!(
            matches!(loser, JournalError::Conflict { expected, actual, .. }
                if expected == round && actual == round + 1),
            "{loser:?}"
        );
        let events = journal.read_stream(stream, 1).await.unwrap();
        assert_eq!(events.len() as u32, round + 1);
        assert!(journal.verify_stream(stream).await.unwrap().first_bad.is_none());
    }
}

#[tokio::test]
async fn append_inside_a_rolled_back_transaction_leaves_nothing() {
    let (journal, pool) = journal().await;
    let stream = Uuid::now_v7();
    let mut tx = pool.begin().await.unwrap();
    journal.append_in_tx(&mut tx, stream, "s", 0, &[event("a", b"")]).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(journal.count().await.unwrap(), 0);
    // and the stream can still start at version 1
    journal.append(stream, "s", 0, &[event("a", b"")]).await.unwrap();
    assert!(journal.verify_stream(stream).await.unwrap().first_bad.is_none());
}

#[tokio::test]
async fn an_append_after_cancelled_begins_is_committed_not_swallowed_by_a_leftover_transaction() {
    // Given a pool of one connection, and begins dropped while their BEGIN is on the wire
    // (sqlx 0.9.0 alone hands the connection back inside that transaction)
    let (pool, _name) = fresh_database(1).await.expect("a fresh test database");
    let journal = Journal::new(pool.clone());
    let mut cancelled = 0;
    for _ in 0..20 {
        use futures::FutureExt;
        if pool.begin().now_or_never().is_none() {
            cancelled += 1;
        }
    }
    assert!(cancelled > 0, "no begin was caught in flight");
    // When the journal appends through the same pool
    let stream = Uuid::now_v7();
    journal.append(stream, "s", 0, &[event("a", b"")]).await.unwrap();
    // Then another connection sees the event: it was committed, not left in an open transaction
    let observer = sqlx::postgres::PgPoolOptions::new()
        .connect_with(pool.connect_options().as_ref().clone())
        .await
        .expect("a second pool");
    let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE stream_id = $1")
        .bind(stream)
        .fetch_one(&observer)
        .await
        .unwrap();
    assert_eq!(seen, 1);
}

#[tokio::test]
async fn the_database_refuses_update_delete_and_truncate_on_events() {
    let (journal, pool) = journal().await;
    let stream = Uuid::now_v7();
    journal.append(stream, "s", 0, &[event("a", b"x")]).await.unwrap();
    // CASCADE gets TRUNCATE past the outbox foreign key, to the trigger.
    for sql in
        ["UPDATE events SET payload = '\\x00'", "DELETE FROM events", "TRUNCATE events CASCADE"]
    {
        let error = sqlx::query(sql).execute(&pool).await.unwrap_err();
        assert!(error.to_string().contains("append-only"), "{sql}: {error}");
    }
    assert_eq!(journal.read_stream(stream, 1).await.unwrap()[0].payload, b"x");
}

async fn tamper(pool: &PgPool, sql: &'static str) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("ALTER TABLE events DISABLE TRIGGER events_append_only")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(sql).execute(&mut *tx).await.unwrap();
    sqlx::query("ALTER TABLE events ENABLE TRIGGER events_append_only")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn stream_of_five(journal: &Journal) -> Uuid {
    let stream = Uuid::now_v7();
    let events: Vec<NewEvent> = (0..5u8).map(|i| event("e", &[i])).collect();
    journal.append(stream, "s", 0, &events).await.unwrap();
    stream
}

#[tokio::test]
async fn verify_stream_reports_an_altered_payload_at_its_version() {
    // Given a five-event stream whose third payload is changed behind the trigger's back
    let (journal, pool) = journal().await;
    let stream = stream_of_five(&journal).await;
    tamper(&pool, "UPDATE events SET payload = '\\xff' WHERE version = 3").await;
    // When the chain is verified
    let report = journal.verify_stream(stream).await.unwrap();
    // Then version 3 is the first bad one, its content altered
    let bad = report.first_bad.expect("tampering must be detected");
    assert_eq!(bad.version, 3);
    assert!(matches!(bad.reason, ChainBreak::ContentAltered { .. }), "{bad:?}");
}

#[tokio::test]
async fn verify_stream_reports_altered_time_dropped_and_swapped_events() {
    let (journal, pool) = journal().await;
    let cases: [(&'static str, u32); 3] = [
        ("UPDATE events SET recorded_at = recorded_at + interval '1 second' WHERE version = 2", 2),
        ("DELETE FROM events WHERE version = 4", 5),
        (
            "UPDATE events SET version = CASE version WHEN 2 THEN 3 ELSE 2 END \
             WHERE version IN (2, 3)",
            2,
        ),
    ];
    for (sql, first_bad) in cases {
        let stream = stream_of_five(&journal).await;
        let sql = sql.replace("WHERE", &format!("WHERE stream_id = '{stream}' AND"));
        let sql: &'static str = Box::leak(sql.into_boxed_str());
        // The swap needs the unique constraint out of the way for a moment.
        if sql.contains("CASE") {
            tamper(&pool, "ALTER TABLE events DROP CONSTRAINT events_stream_version_key CASCADE")
                .await;
            tamper(&pool, sql).await;
        } else {
            tamper(&pool, sql).await;
        }
        let report = journal.verify_stream(stream).await.unwrap();
        assert_eq!(report.first_bad.map(|b| b.version), Some(first_bad), "{sql}");
    }
}

#[tokio::test]
async fn a_follower_holds_back_a_later_commit_until_an_earlier_transaction_ends() {
    // Given writer A that appended inside a transaction it keeps open
    let (journal, pool) = journal().await;
    let mut a = pool.begin().await.unwrap();
    journal.append_in_tx(&mut a, Uuid::now_v7(), "s", 0, &[event("from-a", b"")]).await.unwrap();
    // When writer B appends and commits after it
    journal.append(Uuid::now_v7(), "s", 0, &[event("from-b", b"")]).await.unwrap();
    // Then a commit-safe read does not see B yet
    assert!(journal.read_all(Checkpoint::START, 100).await.unwrap().is_empty());
    let follower = journal.subscribe(Checkpoint::START).await.unwrap();
    tokio::pin!(follower);
    let early = tokio::time::timeout(Duration::from_millis(600), follower.next()).await;
    assert!(early.is_err(), "delivered before A ended: {early:?}");
    // And once A commits, both arrive, A's first (it began first)
    a.commit().await.unwrap();
    let mut names = Vec::new();
    for _ in 0..2 {
        let next = tokio::time::timeout(Duration::from_secs(10), follower.next()).await;
        names.push(next.unwrap().unwrap().unwrap().event_type);
    }
    assert_eq!(names, ["from-a", "from-b"]);
}

#[tokio::test]
async fn a_follower_delivers_every_committed_event_exactly_once_under_concurrent_writers() {
    const WRITERS: usize = 8;
    const PER_WRITER: usize = 1_250;
    let (journal, pool) = journal().await;
    let follower = journal.subscribe(Checkpoint::START).await.unwrap();
    // Given 8 writers, each committing batches of 1-5 events and sometimes holding its
    // transaction open while others commit, and one writer whose batches always roll back
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (journal, pool) = (journal.clone(), pool.clone());
            tokio::spawn(async move {
                let stream = Uuid::now_v7();
                let mut version = 0u32;
                let mut written = 0usize;
                let mut step = w;
                while written < PER_WRITER {
                    step = step.wrapping_mul(31).wrapping_add(7) % 1_000;
                    let size = (1 + step % 5).min(PER_WRITER - written);
                    let batch: Vec<NewEvent> = (0..size).map(|_| event("w", b"")).collect();
                    let mut tx = pool.begin().await.unwrap();
                    let appended =
                        journal.append_in_tx(&mut tx, stream, "s", version, &batch).await.unwrap();
                    if step % 7 == 0 {
                        tokio::time::sleep(Duration::from_millis((step % 20) as u64)).await;
                    }
                    if step % 13 == 0 {
                        tx.rollback().await.unwrap();
                        continue;
                    }
                    tx.commit().await.unwrap();
                    journal.committed(&appended);
                    version += size as u32;
                    written += size;
                }
            })
        })
        .collect();
    // When the follower reads until it has seen as many events as were committed
    let total = WRITERS * PER_WRITER;
    let delivered: Vec<_> = tokio::time::timeout(
        Duration::from_secs(120),
        follower.take(total).map(|e| e.unwrap()).collect::<Vec<_>>(),
    )
    .await
    .expect("every committed event is delivered");
    for writer in writers {
        writer.await.unwrap();
    }
    // Then each committed event came exactly once, in strictly increasing checkpoint order
    let positions: HashSet<i64> = delivered.iter().map(|e| e.position).collect();
    assert_eq!(positions.len(), total, "duplicates delivered");
    let committed: HashSet<i64> = sqlx::query_scalar::<_, i64>("SELECT position FROM events")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(positions, committed, "delivered set differs from the committed set");
    assert!(delivered.windows(2).all(|w| w[0].checkpoint() < w[1].checkpoint()));
}

#[tokio::test]
async fn appends_grouped_under_load_commit_with_their_outbox_rows_and_stale_ones_conflict() {
    // Given 48 streams at version 1, their heads known to one journal, and half of them
    // moved on to version 2 since by another journal (another process)
    let (journal, pool) = journal().await;
    let streams: Vec<Uuid> = (0..48).map(|_| Uuid::now_v7()).collect();
    for &stream in &streams {
        journal.append(stream, "s", 0, &[event("seed", b"")]).await.unwrap();
    }
    let (moved, unmoved) = streams.split_at(24);
    let elsewhere = Journal::new(pool.clone());
    for &stream in moved {
        elsewhere.append(stream, "s", 1, &[event("elsewhere", b"")]).await.unwrap();
    }
    // When 48 appends run at once through the first journal, one per stream at version 1,
    // each with an outbox row (so most go in groups)
    let append = |stream: Uuid, version: u32, who: &'static str| {
        let journal = journal.clone();
        async move {
            let effects = vec![NewEffect {
                version: version + 1,
                effect_type: who,
                payload: who.as_bytes().to_vec(),
            }];
            let alone = |statement: &mut AppendStatement| {
                outbox::enqueue_with(statement, stream, "s", &effects)
            };
            let result = journal
                .append_grouped(
                    stream,
                    "s",
                    version,
                    &[event(who, who.as_bytes())],
                    Some(&alone),
                    |_| outbox::shared_enqueue(stream, "s", &effects).into_iter().collect(),
                )
                .await;
            (stream, who, result)
        }
    };
    let results = futures::future::join_all(streams.iter().map(|&s| append(s, 1, "mine"))).await;
    let outbox_of = |stream: Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT effect_type FROM outbox WHERE stream_id = $1 ORDER BY id",
            )
            .bind(stream)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let conflicts_at_2 = |r: &Result<_, JournalError>| {
        matches!(r, Err(JournalError::Conflict { expected: 1, actual: 2, .. }))
    };
    // Then an append to a stream that moved conflicts, and nothing of it is written
    for &stream in moved {
        let (_, _, result) = results.iter().find(|(s, _, _)| *s == stream).unwrap();
        assert!(conflicts_at_2(result), "{result:?}");
        let events = journal.read_stream(stream, 1).await.unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].event_type, "elsewhere");
        assert!(outbox_of(stream).await.is_empty());
    }
    // And the others are written, chained, each with exactly its outbox row
    for &stream in unmoved {
        let (_, _, result) = results.iter().find(|(s, _, _)| *s == stream).unwrap();
        assert!(result.is_ok(), "{result:?}");
        let events = journal.read_stream(stream, 1).await.unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].event_type, "mine");
        assert!(journal.verify_stream(stream).await.unwrap().first_bad.is_none());
        assert_eq!(outbox_of(stream).await, vec!["mine".to_owned()]);
    }
    // And groups wrote some of them (a group statement that always failed would leave every
    // append to the one-by-one retry, which gives the same rows)
    assert!(journal.appended_in_groups() > 0);
    // When two appends race on each of those at version 2, in the same groups
    let runs = unmoved.iter().flat_map(|&s| [append(s, 2, "first"), append(s, 2, "second")]);
    let results = futures::future::join_all(runs).await;
    // Then per stream exactly one wins, with its outbox row, and the other conflicts
    for &stream in unmoved {
        let mine: Vec<_> = results.iter().filter(|(s, _, _)| *s == stream).collect();
        let winners: Vec<_> = mine.iter().filter(|(_, _, r)| r.is_ok()).collect();
        assert_eq!(winners.len(), 1, "{mine:?}");
        assert!(
            mine.iter().any(|(_, _, r)| matches!(
                r,
                Err(JournalError::Conflict { expected: 2, actual: 3, .. })
            )),
            "{mine:?}"
        );
        assert!(journal.verify_stream(stream).await.unwrap().first_bad.is_none());
        assert_eq!(outbox_of(stream).await, vec!["mine".to_owned(), winners[0].1.to_owned()]);
    }
}
