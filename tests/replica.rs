//! Read scale on one machine: a PostgreSQL streaming replica of the ledger's database (a second
//! cluster started by the test with `pg_basebackup -R`), from which status rows, audits and
//! the HTTP read endpoints are served while every write goes to the primary.

use std::time::Duration;

use serde_json::Value;
use uuid::Uuid;

use dealledger::adapters::http::request;
use dealledger::api::{Access, ApiState};
use dealledger::db::embedded::{Durability, EmbeddedPostgres};
use dealledger::deals::Deals;
use dealledger::domain::ChainEpoch;
use dealledger::events::Journal;
use dealledger::fsm::DecideContext;
use dealledger::fsm::fixtures::*;

/// Polls the replica until `stream` has a status row there, for at most ten seconds.
async fn replicated_state(replica: &sqlx::PgPool, stream: Uuid) -> Option<String> {
    for _ in 0..200 {
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM storage_deals WHERE stream_id = $1")
                .bind(stream)
                .fetch_optional(replica)
                .await
                .unwrap();
        if state.is_some() {
            return state;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test]
async fn a_deal_written_on_the_primary_is_read_audited_and_served_from_a_replica() {
    let root = dealledger::db::testing::scratch_dir("replica").expect("a scratch directory");
    let primary_home = root.join("primary");
    let primary = tokio::task::spawn_blocking(move || {
        EmbeddedPostgres::start(&primary_home, Durability::Throwaway)
    })
    .await
    .unwrap()
    .expect("the primary starts");
    let pool = dealledger::db::pool_options()
        .connect_with(primary.connect_options("postgres"))
        .await
        .unwrap();
    let journal = Journal::open(pool).await.expect("migrations on the primary");
    let deals = Deals::new(journal);
    // Given a streaming replica of it
    let (replica, primary) = tokio::task::spawn_blocking({
        let home = root.join("replica");
        move || (EmbeddedPostgres::start_replica(&primary, &home), primary)
    })
    .await
    .unwrap();
    let replica = replica.expect("the replica starts from a base backup");
    let replica_pool = dealledger::db::pool_options()
        .connect_with(replica.connect_options("postgres"))
        .await
        .unwrap();
    // When a deal is started on the primary
    let ctx = DecideContext { epoch: ChainEpoch(NOW), ..DecideContext::default() };
    let stream = deals.initiate_deal(signed_proposal(), &ctx).await.unwrap().stream_id;
    // Then the replica has its status row, its journal audits there, and it reports its lag
    assert_eq!(
        replicated_state(&replica_pool, stream).await.as_deref(),
        Some("ReserveClientFunds")
    );
    let reads = Journal::new(replica_pool.clone());
    let audit = dealledger::audit::timeline::audit(&reads, stream, None).await.unwrap();
    assert!(audit.verdict.holds(), "{:?}", audit.verdict);
    let lag = dealledger::db::replica_lag(&replica_pool).await.unwrap();
    assert!(lag.is_some(), "the replica says it is one");
    assert_eq!(dealledger::db::replica_lag(deals.journal().pool()).await.unwrap(), None);
    // And it refuses writes: the ledger can only write to the primary
    let write = sqlx::query("DELETE FROM storage_deals").execute(&replica_pool).await;
    assert!(write.is_err());
    // And the HTTP read endpoints answer from it
    let access = Access { token: None, open_reads: true };
    let state = ApiState::new(deals.clone(), access).with_reads(reads);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = dealledger::api::router(state);
    tokio::spawn(dealledger::api::serve(listener, router, std::future::pending()));
    let get = |path: String| async move {
        let response = request("127.0.0.1", port, "GET", &path, &[], None, 1 << 20).await.unwrap();
        (response.status, serde_json::from_slice::<Value>(&response.body).unwrap_or(Value::Null))
    };
    let (status, found) = get(format!("/v1/deals/{stream}")).await;
    assert_eq!((status, found["deal"]["state"].as_str()), (200, Some("ReserveClientFunds")));
    let (status, ready) = get("/ready".into()).await;
    assert_eq!(status, 200);
    assert!(ready["read_replica_lag_seconds"].is_number(), "{ready}");
    drop(replica);
    drop(primary);
    let _ = std::fs::remove_dir_all(&root);
}
