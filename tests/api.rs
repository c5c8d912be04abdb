//! The node's HTTP API through real HTTP on 127.0.0.1: a storage deal started with a POST and
//! driven to Active by the runners, reads from the projections, auth, errors, stable
//! pagination under concurrent inserts, server-sent deal updates, metrics and the OpenAPI
//! document.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use uuid::Uuid;

use dealledger::adapters::chain::{Devnet, DevnetConfig, DevnetSealer, MessageKey};
use dealledger::adapters::http::{HttpResponse, request};
use dealledger::adapters::network::codec::MarketCodec;
use dealledger::adapters::piece::store::PieceStore;
use dealledger::api::{Access, ApiState, ClientRole, OPENAPI};
use dealledger::db::testing::fresh_database;
use dealledger::domain::storage::ClientDealProposal;
use dealledger::domain::{PartyKey, TokenAmount};
use dealledger::fsm::fixtures::*;
use dealledger::runner::{EffectRunner, RunnerConfig, RunnerNetwork};

mod common;
use common::*;

const TOKEN: &str = "s3cret-token";

/// An API on the client node of two nodes sharing a devnet.
struct Api {
    port: u16,
    nodes: Nodes,
    devnet: Devnet,
    staged: PieceStore,
    retrieved: std::path::PathBuf,
}

async fn api(access: Access) -> Api {
    let (pool, _) = fresh_database(4).await.unwrap();
    let config = DevnetConfig { genesis_epoch: NOW, ..DevnetConfig::default() };
    let devnet = Devnet::open(pool, config).await.unwrap();
    for (key, name) in [(client_key(), "client"), (provider_key(), "provider")] {
        let faucet = MessageKey::of("faucet", name.as_bytes());
        devnet.fund(PartyKey::of(&key), TokenAmount(10u128.pow(24)), faucet).await.unwrap();
    }
    let nodes = nodes_checking(MarketCodec::default(), Some(Arc::new(devnet.clone()))).await;
    let staged_dir = dealledger::db::testing::scratch_dir("api").expect("a scratch directory");
    let staged = PieceStore::new(staged_dir.clone());
    let role = ClientRole {
        network: nodes.client.clone(),
        key: client_key(),
        pieces: staged.clone(),
        retrieved: staged_dir.join("retrieved"),
    };
    let state = ApiState::new(nodes.client_deals.clone(), access)
        .with_client(role)
        .with_chain(Arc::new(devnet.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(dealledger::api::serve(
        listener,
        dealledger::api::router(state),
        std::future::pending(),
    ));
    Api { port, nodes, devnet, staged, retrieved: staged_dir.join("retrieved") }
}

fn locked() -> Access {
    Access { token: Some(TOKEN.into()), open_reads: false }
}

impl Api {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> HttpResponse {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.as_deref().map(|a| ("Authorization", a)).into_iter().collect();
        let bytes = body.map(|b| b.to_string().into_bytes());
        let body = bytes.as_deref().map(|b| ("application/json", b));
        request("127.0.0.1", self.port, method, path, &headers, body, 1 << 20).await.unwrap()
    }

    async fn json(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let response = self.call(method, path, Some(TOKEN), body).await;
        let value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        (response.status, value)
    }

    /// Both nodes' runners: the client's with a network and staged pieces.
    fn runners(&self) -> (EffectRunner<Devnet, DevnetSealer>, EffectRunner<Devnet, DevnetSealer>) {
        let config =
            RunnerConfig { watch_poll: Duration::from_millis(20), ..RunnerConfig::default() };
        let sealer = DevnetSealer::new(self.devnet.clone(), 2, 3);
        let network = RunnerNetwork {
            client: self.nodes.client.clone(),
            key: client_key(),
            pieces: Some(self.staged.clone()),
            retrieved: Some(self.retrieved.clone()),
        };
        let client = EffectRunner::new(
            self.nodes.client_deals.clone(),
            self.devnet.clone(),
            sealer.clone(),
            config.clone(),
        )
        .with_network(network);
        let provider = EffectRunner::new(
            self.nodes.provider_deals.clone(),
            self.devnet.clone(),
            sealer,
            config,
        );
        (client, provider)
    }
}

#[tokio::test]
async fn a_storage_deal_started_over_http_reaches_active_and_reads_back() {
    let api = api(locked()).await;
    let file = dealledger::db::testing::scratch_dir("api-data").unwrap().join("data.bin");
    let bytes = data(150 * 1024, 31);
    tokio::fs::write(&file, &bytes).await.unwrap();
    let provider = PartyKey::of(&provider_key()).peer_id().unwrap().to_string();
    // When a backend starts a deal
    let body = json!({
        "file": file.to_string_lossy(),
        "provider": provider,
        "provider_address": api.nodes.provider_address.to_string(),
        "price_per_epoch": "100000000",
        "duration_epochs": 200 * 2880,
    });
    let (status, started) = api.json("POST", "/v1/storage-deals", Some(&body)).await;
    assert_eq!(status, 201, "{started}");
    let stream = started["stream_id"].as_str().unwrap().to_owned();
    // Then the runners take it to Active on both sides
    let (client, provider) = api.runners();
    for _ in 0..30 {
        for runner in [&client, &provider] {
            runner.recover().await.unwrap();
            runner.run_until_idle().await.unwrap();
        }
        let (_, deal) = api.json("GET", &format!("/v1/deals/{stream}"), None).await;
        if deal["deal"]["state"] == "Active" {
            break;
        }
        api.devnet.advance(1).await.unwrap();
    }
    let (status, deal) = api.json("GET", &format!("/v1/deals/{stream}"), None).await;
    assert_eq!(status, 200);
    assert_eq!(
        (deal["kind"].as_str(), deal["deal"]["state"].as_str()),
        (Some("storage"), Some("Active"))
    );
    assert_eq!(deal["deal"]["piece_cid"], started["piece_cid"]);
    let (_, page) = api.json("GET", "/v1/deals?side=storage_client&state=Active", None).await;
    assert_eq!(page["deals"].as_array().map(Vec::len), Some(1));
    let (status, audit) = api.json("GET", &format!("/v1/deals/{stream}/audit"), None).await;
    assert_eq!(status, 200);
    assert!(audit.to_string().contains("ReserveClientFunds"), "{audit}");
    // The provider holds exactly the file's bytes.
    let piece: dealledger::domain::PieceCid =
        started["piece_cid"].as_str().unwrap().parse().unwrap();
    assert!(api.nodes.pieces.read_range(&piece, 0, bytes.len() as u64).await.unwrap() == bytes);
}

#[tokio::test]
async fn writes_need_the_token_and_reads_too_unless_opened() {
    let api = api(locked()).await;
    let body = json!({ "file": "/nonexistent" });
    for token in [None, Some("wrong")] {
        let response = api.call("POST", "/v1/storage-deals", token, Some(&body)).await;
        assert_eq!(response.status, 401);
        assert_eq!(response.header("www-authenticate"), Some("Bearer"));
        assert_eq!(api.call("GET", "/v1/deals", token, None).await.status, 401);
    }
    // Health, readiness, metrics and the document are public.
    for path in ["/health", "/ready", "/metrics", "/openapi.json"] {
        assert_eq!(api.call("GET", path, None, None).await.status, 200, "{path}");
    }
    let open = self::api(Access { token: Some(TOKEN.into()), open_reads: true }).await;
    assert_eq!(open.call("GET", "/v1/deals", None, None).await.status, 200);
    assert_eq!(open.call("POST", "/v1/storage-deals", None, Some(&body)).await.status, 401);
    // Without a token configured, writes are disabled.
    let readonly = self::api(Access::default()).await;
    let response = readonly.call("POST", "/v1/storage-deals", Some(TOKEN), Some(&body)).await;
    assert_eq!(response.status, 403);
}

#[tokio::test]
async fn bad_requests_get_a_4xx_that_says_what_is_wrong_and_change_nothing() {
    let api = api(locked()).await;
    let events_before = api.nodes.client_deals.journal().count().await.unwrap();
    let check = |status: u16, value: &Value, expected: u16, needle: &str| {
        assert_eq!(status, expected, "{value}");
        let message = value["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    };
    let (s, v) = api.json("GET", "/v1/deals/not-a-uuid", None).await;
    check(s, &v, 400, "not a deal id");
    let (s, v) = api.json("GET", &format!("/v1/deals/{}", Uuid::new_v4()), None).await;
    check(s, &v, 404, "no deal");
    let (s, v) = api.json("GET", "/v1/deals?limit=0", None).await;
    check(s, &v, 400, "limit");
    let (s, v) = api.json("GET", "/v1/deals?kind=cats", None).await;
    check(s, &v, 400, "unknown kind");
    let response = api.call("POST", "/v1/storage-deals", Some(TOKEN), None).await;
    assert_eq!(response.status, 400);
    let malformed = request(
        "127.0.0.1",
        api.port,
        "POST",
        "/v1/storage-deals",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        Some(("application/json", b"{not json")),
        1 << 20,
    )
    .await
    .unwrap();
    assert_eq!(malformed.status, 400);
    let value: Value = serde_json::from_slice(&malformed.body).unwrap();
    assert_eq!(value["error"], "bad_request");
    let provider = PartyKey::of(&provider_key()).peer_id().unwrap().to_string();
    let base = json!({
        "file": "/nonexistent/file", "provider": provider, "provider_address": "/ip4/127.0.0.1/tcp/1",
        "price_per_epoch": "1", "duration_epochs": 600000,
    });
    let (s, v) = api.json("POST", "/v1/storage-deals", Some(&base)).await;
    check(s, &v, 400, "cannot read");
    let mut bad_price = base.clone();
    bad_price["price_per_epoch"] = json!("-5");
    let (s, v) = api.json("POST", "/v1/storage-deals", Some(&bad_price)).await;
    check(s, &v, 400, "price_per_epoch");
    let mut bad_peer = base.clone();
    bad_peer["provider"] = json!("nobody");
    let (s, v) = api.json("POST", "/v1/storage-deals", Some(&bad_peer)).await;
    check(s, &v, 400, "not a peer id");
    let mut unknown_field = base;
    unknown_field["colour"] = json!("blue");
    let (s, _) = api.json("POST", "/v1/storage-deals", Some(&unknown_field)).await;
    assert_eq!(s, 400);
    assert_eq!(api.nodes.client_deals.journal().count().await.unwrap(), events_before);
}

/// A client deal recorded directly (no runner), with a distinct proposal.
async fn recorded_deal(api: &Api, n: u64) -> Uuid {
    let mut terms = proposal();
    terms.label = format!("deal {n}");
    let signed = ClientDealProposal::sign(terms, &client_key());
    api.nodes.client_deals.initiate_deal(signed, &ctx()).await.unwrap().stream_id
}

#[tokio::test]
async fn pages_neither_repeat_nor_skip_rows_while_deals_are_added() {
    let api = api(locked()).await;
    let mut existing = Vec::new();
    for n in 0..30 {
        existing.push(recorded_deal(&api, n).await);
    }
    // Deals keep arriving while the client pages through.
    let writer = {
        let deals = api.nodes.client_deals.clone();
        tokio::spawn(async move {
            for n in 100..130 {
                let mut terms = proposal();
                terms.label = format!("late {n}");
                let signed = ClientDealProposal::sign(terms, &client_key());
                deals.initiate_deal(signed, &ctx()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let path = match &after {
            Some(a) => format!("/v1/deals?limit=7&after={a}"),
            None => "/v1/deals?limit=7".to_owned(),
        };
        let (status, page) = api.json("GET", &path, None).await;
        assert_eq!(status, 200, "{page}");
        for row in page["deals"].as_array().unwrap() {
            seen.push(Uuid::parse_str(row["stream_id"].as_str().unwrap()).unwrap());
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    writer.await.unwrap();
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "a row came twice");
    assert_eq!(&seen[..30], &existing[..], "the rows present before paging came once, in order");
}

#[tokio::test]
async fn deal_updates_stream_as_server_sent_events() {
    let api = api(locked()).await;
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", api.port)).await.unwrap();
    let head = format!(
        "GET /v1/events?types=storage_client HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(socket).lines();
    // Headers first
    while let Some(line) = lines.next_line().await.unwrap() {
        if line.is_empty() {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stream = recorded_deal(&api, 1).await;
    let update = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(data) = line.strip_prefix("data: ") {
                return serde_json::from_str::<Value>(data).unwrap();
            }
        }
        panic!("the stream ended");
    })
    .await
    .expect("an update within 10 s");
    assert_eq!(update["stream_id"], json!(stream));
    assert_eq!(
        (update["from"].as_str(), update["to"].as_str()),
        (Some("Unknown"), Some("ReserveClientFunds"))
    );
}

#[tokio::test]
async fn metrics_and_the_openapi_document_are_served() {
    let api = api(locked()).await;
    recorded_deal(&api, 1).await;
    let metrics = api.call("GET", "/metrics", None, None).await;
    let text = String::from_utf8(metrics.body).unwrap();
    for needle in [
        "dealledger_deals{side=\"storage_client\",state=\"ReserveClientFunds\"} 1",
        "dealledger_events_total 1",
        "dealledger_effects_pending 1",
        "dealledger_chain_head_epoch 1000",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let document = api.call("GET", "/openapi.json", None, None).await;
    assert_eq!(String::from_utf8(document.body).unwrap(), OPENAPI);
}

#[tokio::test]
async fn a_retrieval_started_over_http_writes_the_whole_piece_to_the_node() {
    let api = api(locked()).await;
    let original = data(200 * 1024, 41);
    let (piece, size) = dealledger::adapters::piece::commp::commp_of(&original);
    api.nodes.pieces.put(piece, size, original.as_slice()).await.unwrap();
    let provider = PartyKey::of(&provider_key()).peer_id().unwrap().to_string();
    let body = json!({
        "piece_cid": piece.to_string(),
        "provider": provider,
        "provider_address": api.nodes.provider_address.to_string(),
        "part_size": 80 * 1024,
        "max_price_per_byte": "3",
    });
    let (status, started) = api.json("POST", "/v1/retrievals", Some(&body)).await;
    assert_eq!(status, 201, "{started}");
    assert_eq!(started["total_bytes"], json!(original.len()));
    let request = started["request_id"].as_str().unwrap().to_owned();
    let (client, provider) = api.runners();
    for _ in 0..40 {
        for runner in [&client, &provider] {
            runner.recover().await.unwrap();
            runner.run_until_idle().await.unwrap();
        }
        let (_, found) = api.json("GET", &format!("/v1/deals/{request}"), None).await;
        if found["deal"]["state"] == "Completed" {
            break;
        }
    }
    let (_, found) = api.json("GET", &format!("/v1/deals/{request}"), None).await;
    assert_eq!(found["kind"], "retrieval-request");
    assert_eq!(found["deal"]["state"], "Completed", "{found}");
    let written = tokio::fs::read(started["output"].as_str().unwrap()).await.unwrap();
    assert!(written == original, "the node's file differs from the piece");
    // An unknown piece is a 404 with a reason.
    let mut unknown = body;
    unknown["piece_cid"] =
        json!(dealledger::domain::PieceCid::from_commitment([9; 32]).to_string());
    let (status, refused) = api.json("POST", "/v1/retrievals", Some(&unknown)).await;
    assert_eq!(status, 404, "{refused}");
}

#[tokio::test]
async fn an_operator_cancels_over_http_with_a_reason() {
    let api = api(locked()).await;
    let stream = recorded_deal(&api, 7).await;
    let body = json!({ "reason": "duplicate order", "operator": "carol" });
    // Without the token: refused
    let response = api.call("POST", &format!("/v1/deals/{stream}/cancel"), None, Some(&body)).await;
    assert_eq!(response.status, 401);
    // Unknown deal, empty reason: 404, 400
    let (status, _) =
        api.json("POST", &format!("/v1/deals/{}/cancel", Uuid::new_v4()), Some(&body)).await;
    assert_eq!(status, 404);
    let (status, _) = api
        .json("POST", &format!("/v1/deals/{stream}/cancel"), Some(&json!({ "reason": " " })))
        .await;
    assert_eq!(status, 400);
    // With both: the deal moves to Failing, and its row says who and why
    let (status, now) = api.json("POST", &format!("/v1/deals/{stream}/cancel"), Some(&body)).await;
    assert_eq!((status, now["state"].as_str()), (200, Some("Failing")), "{now}");
    let (_, found) = api.json("GET", &format!("/v1/deals/{stream}"), None).await;
    assert_eq!(found["deal"]["message"], "cancelled by carol: duplicate order");
    // Cancelling again is a conflict: the machine refuses it, nothing is recorded
    let (status, refused) =
        api.json("POST", &format!("/v1/deals/{stream}/cancel"), Some(&body)).await;
    assert_eq!(status, 409, "{refused}");
}

#[tokio::test]
async fn an_operator_fails_a_deal_over_http() {
    let api = api(locked()).await;
    let stream = recorded_deal(&api, 8).await;
    let body = json!({ "reason": "client asked", "operator": "erin" });
    let (status, now) = api.json("POST", &format!("/v1/deals/{stream}/fail"), Some(&body)).await;
    assert_eq!((status, now["state"].as_str()), (200, Some("Failing")), "{now}");
    let (_, found) = api.json("GET", &format!("/v1/deals/{stream}"), None).await;
    assert_eq!(found["deal"]["message"], "failed by erin: client asked");
}

#[tokio::test]
async fn an_operator_retries_a_paused_deal_over_http() {
    use dealledger::fsm::failure::Stalled;
    use dealledger::fsm::storage_client::{StorageClient, StorageClientEvent};
    let api = api(locked()).await;
    let stream = recorded_deal(&api, 9).await;
    let body = json!({ "reason": "wallet topped up", "operator": "frank" });
    // A deal that is not paused refuses a retry: 409, nothing recorded
    let (status, refused) =
        api.json("POST", &format!("/v1/deals/{stream}/retry"), Some(&body)).await;
    assert_eq!(status, 409, "{refused}");
    // Given its funding kept failing until the runner gave up (as the runner records it)
    let stalled = StorageClientEvent::EffectStalled(Stalled {
        effect: "reserve-funds".into(),
        attempts: 5,
        reason: "insufficient funds: wallet too low".into(),
    });
    api.nodes.client_deals.handle::<StorageClient>(stream, stalled, &ctx(), None).await.unwrap();
    let (_, found) = api.json("GET", &format!("/v1/deals/{stream}"), None).await;
    assert_eq!(found["deal"]["state"], "FundingPaused");
    assert_eq!(found["deal"]["failure_class"], "recoverable");
    assert_eq!(found["deal"]["attempts"], 5);
    // Without the token: refused
    let response = api.call("POST", &format!("/v1/deals/{stream}/retry"), None, Some(&body)).await;
    assert_eq!(response.status, 401);
    // With it: back to reserving funds, recorded with who and why
    let (status, now) = api.json("POST", &format!("/v1/deals/{stream}/retry"), Some(&body)).await;
    assert_eq!((status, now["state"].as_str()), (200, Some("ReserveClientFunds")), "{now}");
    let (_, audit) = api.json("GET", &format!("/v1/deals/{stream}/audit"), None).await;
    assert!(audit.to_string().contains("retried by frank: wallet topped up"), "{audit}");
}
