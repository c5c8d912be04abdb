//! The Lotus adapter against Lotus's documented example responses, served by a small local
//! JSON-RPC server on 127.0.0.1 — never the internet.
//!
//! Source of the examples: filecoin-project/lotus, `documentation/en/api-v0-methods.md`
//! (the `Response:` blocks of ChainHead, StateMarketStorageDeal, StateSearchMsg,
//! StateMarketBalance and PaychGet), trimmed to the fields the adapter reads plus a few it
//! must ignore.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use dealledger::adapters::chain::lotus::{deal_observation, message_status_of};
use dealledger::adapters::chain::{
    Chain, ChainError, Lotus, MessageKey, MessageStatus, OnChainDealState,
};
use dealledger::domain::{ChainEpoch, DealId, PartyKey, TokenAmount};

const TOKEN: &str = "test-token";

/// `StateMarketStorageDeal`'s documented example, with its state epochs replaced.
fn documented_deal(sector_start: i64, slash: i64) -> Value {
    json!({
        "Proposal": {
            "PieceCID": { "/": "bafy2bzacea3wsdh6y3a36tb3skempjoxqpuyompjbmfeyf34fi3uy6uue42v4" },
            "PieceSize": 1032,
            "VerifiedDeal": true,
            "Client": "f01234",
            "Provider": "f01234",
            "Label": "string value",
            "StartEpoch": 10101,
            "EndEpoch": 10101,
            "StoragePricePerEpoch": "0",
            "ProviderCollateral": "0",
            "ClientCollateral": "0"
        },
        "State": {
            "SectorStartEpoch": sector_start,
            "LastUpdatedEpoch": 10101,
            "SlashEpoch": slash
        }
    })
}

/// `StateSearchMsg`'s documented example, with a decoded PublishStorageDeals return.
fn documented_search(height: i64, exit_code: i64) -> Value {
    json!({
        "Message": { "/": "bafy2bzacea3wsdh6y3a36tb3skempjoxqpuyompjbmfeyf34fi3uy6uue42v4" },
        "Receipt": { "ExitCode": exit_code, "Return": "Ynl0ZSBhcnJheQ==", "GasUsed": 9, "EventsRoot": null },
        "ReturnDec": { "IDs": [5432], "ValidDeals": "gA==" },
        "TipSet": [{ "/": "bafy2bzacea3wsdh6y3a36tb3skempjoxqpuyompjbmfeyf34fi3uy6uue42v4" }],
        "Height": height
    })
}

#[test]
fn the_documented_deal_example_decodes_to_an_observation() {
    // Given the documented example (both SectorStartEpoch and SlashEpoch set)
    let seen = deal_observation(DealId(7), &documented_deal(10101, 10101)).unwrap();
    // Then every field comes through, and a set SlashEpoch means slashed.
    assert_eq!(seen.deal_id, DealId(7));
    assert_eq!(seen.piece_size.0, 1032);
    assert_eq!(
        seen.piece_cid.to_string(),
        "bafy2bzacea3wsdh6y3a36tb3skempjoxqpuyompjbmfeyf34fi3uy6uue42v4"
    );
    assert_eq!((seen.client.as_str(), seen.provider.as_str()), ("f01234", "f01234"));
    assert_eq!((seen.start_epoch, seen.end_epoch), (ChainEpoch(10101), ChainEpoch(10101)));
    assert_eq!(seen.sector_start_epoch, Some(ChainEpoch(10101)));
    assert_eq!(seen.slash_epoch, Some(ChainEpoch(10101)));
    assert_eq!(seen.state(), OnChainDealState::Slashed);
}

#[test]
fn minus_one_epochs_mean_not_yet() {
    let published = deal_observation(DealId(1), &documented_deal(-1, -1)).unwrap();
    assert_eq!((published.sector_start_epoch, published.slash_epoch), (None, None));
    assert_eq!(published.state(), OnChainDealState::Published);
    let active = deal_observation(DealId(1), &documented_deal(10101, -1)).unwrap();
    assert_eq!(active.state(), OnChainDealState::Active);
}

#[test]
fn a_message_counts_only_once_final() {
    let landed = message_status_of(&documented_search(10101, 0), 10101).unwrap();
    assert_eq!(
        landed,
        MessageStatus::Landed { epoch: ChainEpoch(10101), deal_id: Some(DealId(5432)) }
    );
    assert_eq!(
        message_status_of(&documented_search(10101, 0), 10100).unwrap(),
        MessageStatus::Pending
    );
    assert_eq!(message_status_of(&Value::Null, 10101).unwrap(), MessageStatus::Pending);
    let failed = message_status_of(&documented_search(10101, 16), 20000).unwrap();
    assert!(matches!(failed, MessageStatus::Failed { .. }), "{failed:?}");
}

#[test]
fn malformed_responses_are_typed_errors() {
    let mut bad_cid = documented_deal(-1, -1);
    bad_cid["Proposal"]["PieceCID"] = json!({ "/": "not-a-cid" });
    let mut no_state = documented_deal(-1, -1);
    no_state.as_object_mut().unwrap().remove("State");
    let mut string_epoch = documented_deal(-1, -1);
    string_epoch["State"]["SlashEpoch"] = json!("-1");
    for malformed in [bad_cid, no_state, string_epoch, json!([]), json!(null)] {
        let result = deal_observation(DealId(1), &malformed);
        assert!(matches!(result, Err(ChainError::Malformed(_))), "{malformed}: {result:?}");
    }
    let no_receipt = json!({ "Height": 1 });
    assert!(matches!(message_status_of(&no_receipt, 10), Err(ChainError::Malformed(_))));
}

/// A JSON-RPC server replaying canned results by method; records the calls it gets.
struct FakeLotus {
    url: String,
    calls: Arc<Mutex<Vec<(String, Value)>>>,
}

async fn fake_lotus(results: HashMap<&'static str, Value>) -> FakeLotus {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/rpc/v0", listener.local_addr().unwrap());
    let calls = Arc::new(Mutex::new(Vec::new()));
    let recorded = calls.clone();
    let results = Arc::new(results);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (results, recorded) = (results.clone(), recorded.clone());
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                let (head, body) = loop {
                    let n = socket.read(&mut buffer).await.unwrap();
                    request.extend_from_slice(&buffer[..n]);
                    if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&request[..end]).to_string();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break (head, request[end + 4..end + 4 + length].to_vec());
                        }
                    }
                };
                let authorized = head.contains(&format!("Authorization: Bearer {TOKEN}"));
                let call: Value = serde_json::from_slice(&body).unwrap();
                let method =
                    call["method"].as_str().unwrap().trim_start_matches("Filecoin.").to_owned();
                recorded.lock().unwrap().push((method.clone(), call["params"].clone()));
                let (status, payload) = if !authorized {
                    ("401 Unauthorized", String::new())
                } else if method == "Garbled" {
                    ("200 OK", "{not json".to_owned())
                } else {
                    match results.get(method.as_str()) {
                        Some(result) => ("200 OK", json!({ "jsonrpc": "2.0", "result": result, "id": 1 }).to_string()),
                        None => (
                            "200 OK",
                            json!({ "jsonrpc": "2.0", "error": { "code": 1, "message": format!("{method} not found") }, "id": 1 })
                                .to_string(),
                        ),
                    }
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
                    payload.len()
                );
                socket.write_all(response.as_bytes()).await.unwrap();
            });
        }
    });
    FakeLotus { url, calls }
}

fn documented_node(head: i64) -> HashMap<&'static str, Value> {
    HashMap::from([
        (
            "ChainHead",
            json!({ "Cids": [{ "/": "bafy2bzacea3wsdh6y3a36tb3skempjoxqpuyompjbmfeyf34fi3uy6uue42v4" }], "Blocks": [], "Height": head }),
        ),
        (
            "ChainGetTipSetByHeight",
            json!({ "Cids": [{ "/": "bafy2bzacebp3shtrn43k7g3unredz7fxn4gj533d3o43tqn2p2ipxxhrvchve" }], "Blocks": [], "Height": head - 900 }),
        ),
        ("StateMarketStorageDeal", documented_deal(10101, -1)),
        ("StateSearchMsg", documented_search(10101, 0)),
        (
            "StateMarketBalance",
            json!({ "Escrow": "340282366920938463463374607431768211455", "Locked": "17" }),
        ),
        (
            "PaychGet",
            json!({ "Channel": "f01234", "WaitSentinel": { "/": "bafy2bzacea3wsdh6y3a36tb3skempjoxqpuyompjbmfeyf34fi3uy6uue42v4" } }),
        ),
    ])
}

#[tokio::test]
async fn the_adapter_reads_a_node_at_finality() {
    let node = fake_lotus(documented_node(11_500)).await;
    let party = PartyKey::of(&ed25519_dalek::SigningKey::from_bytes(&[3; 32]));
    let lotus = Lotus::new(&node.url, Some(TOKEN.into())).unwrap().with_address(party, "f01234");
    assert_eq!(lotus.head().await.unwrap(), ChainEpoch(11_500));
    // A deal is read at the tipset 900 epochs below the head.
    let seen = lotus.deal(DealId(5432)).await.unwrap().expect("the deal");
    assert_eq!(seen.state(), OnChainDealState::Active);
    let calls = node.calls.lock().unwrap().clone();
    let by_height = calls.iter().find(|(m, _)| m == "ChainGetTipSetByHeight").unwrap();
    assert_eq!(by_height.1[0], json!(10_600));
    let deal_call = calls.iter().find(|(m, _)| m == "StateMarketStorageDeal").unwrap();
    assert_eq!(deal_call.1[0], json!(5432));
    // A publish message at 10101 is final at head 11500 (10101 <= 10600): it gives the deal id.
    let message = dealledger::events::chain::cid_of_bytes(b"publish");
    assert_eq!(
        lotus.message_status(message).await.unwrap(),
        MessageStatus::Landed { epoch: ChainEpoch(10101), deal_id: Some(DealId(5432)) }
    );
    // Big integers as strings, up to u128.
    let balance = lotus.market_balance(party).await.unwrap();
    assert_eq!((balance.escrow, balance.locked), (TokenAmount(u128::MAX), TokenAmount(17)));
    let channel = lotus
        .get_or_create_channel(party, party, TokenAmount(5), MessageKey::of("t", b"1"))
        .await
        .unwrap();
    assert_eq!(channel.0, "f01234");
}

#[tokio::test]
async fn a_message_younger_than_finality_is_still_pending() {
    let node = fake_lotus(documented_node(10_500)).await;
    let lotus = Lotus::new(&node.url, Some(TOKEN.into())).unwrap();
    let message = dealledger::events::chain::cid_of_bytes(b"publish");
    assert_eq!(lotus.message_status(message).await.unwrap(), MessageStatus::Pending);
}

#[tokio::test]
async fn node_errors_are_typed() {
    let node = fake_lotus(HashMap::new()).await;
    // No token: refused, not retried.
    let anonymous = Lotus::new(&node.url, None).unwrap();
    assert!(matches!(anonymous.head().await, Err(ChainError::Refused { .. })));
    let lotus = Lotus::new(&node.url, Some(TOKEN.into())).unwrap();
    // An error object from the node.
    assert!(matches!(lotus.head().await, Err(ChainError::NotFound { .. })));
    // A body that is not JSON.
    assert!(matches!(lotus.call("Garbled", json!([])).await, Err(ChainError::Malformed(_))));
    // Nothing listening: unavailable, worth retrying.
    let closed = Lotus::new("http://127.0.0.1:9/rpc/v0", None).unwrap();
    let down = closed.head().await.unwrap_err();
    assert!(down.is_transient(), "{down:?}");
    // A party with no configured address cannot be asked about.
    let party = PartyKey::of(&ed25519_dalek::SigningKey::from_bytes(&[4; 32]));
    assert!(matches!(lotus.market_balance(party).await, Err(ChainError::Unsupported { .. })));
    // HTTPS is refused up front.
    assert!(matches!(
        Lotus::new("https://example.invalid/rpc/v0", None),
        Err(ChainError::Unsupported { .. })
    ));
}

/// Any JSON a node might answer, built from a few shapes and arbitrary values.
fn arbitrary_json() -> impl proptest::strategy::Strategy<Value = Value> {
    use proptest::prelude::*;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            proptest::collection::hash_map(
                prop_oneof![
                    Just("Proposal".to_owned()),
                    Just("State".to_owned()),
                    Just("PieceCID".to_owned()),
                    Just("/".to_owned()),
                    Just("Height".to_owned()),
                    Just("Receipt".to_owned()),
                    Just("ExitCode".to_owned()),
                    "[A-Za-z]{1,10}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest::proptest! {
    /// Whatever JSON a node answers, decoding it gives an observation or a typed error.
    #[test]
    fn arbitrary_json_never_panics(value in arbitrary_json(), height in proptest::prelude::any::<i64>()) {
        let _ = deal_observation(DealId(1), &value);
        let _ = message_status_of(&value, height);
        let mut deal = documented_deal(-1, -1);
        deal["State"] = value.clone();
        let _ = deal_observation(DealId(1), &deal);
    }
}
