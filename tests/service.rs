//! Two `dealledger serve` processes on 127.0.0.1, each with its own embedded database, sharing
//! the provider's devnet. 200 storage deals are started through the client's HTTP API, and the
//! client is stopped with SIGTERM in the middle of them: it stops cleanly, and after a restart
//! every deal the API acknowledged reaches Active; nothing acknowledged is lost, and every
//! stream's chain verifies.

use std::time::{Duration, Instant};

use serde_json::json;

use dealledger::adapters::chain::Chain;

mod common;
use common::node::{TOKEN, TwoNodes, run_on, start, two_funded_nodes};

const DEALS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_node_stopped_with_sigterm_under_load_loses_no_acknowledged_deal() {
    let root = dealledger::db::testing::scratch_dir("service").expect("a scratch directory");
    // Given a provider node that runs the devnet's clock, and a client node on its own
    // database sharing the provider's devnet, both funded
    let nodes = two_funded_nodes(&root, "", "").await;
    let TwoNodes { mut provider, mut client, provider_peer, provider_listen, devnet, .. } = nodes;
    let (client_home, client_api) = (client.home.clone(), client.api);
    let client_args: Vec<&str> = nodes.client_args.iter().map(String::as_str).collect();
    let start_epoch = devnet.head().await.unwrap().0 + 3_000;
    // When 200 deals are started through the API and the client is stopped midway
    let files = root.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let mut acknowledged = Vec::new();
    for n in 0..DEALS {
        let file = files.join(format!("{n}.bin"));
        std::fs::write(&file, format!("deal {n} ").repeat(400)).unwrap();
        let body = json!({
            "file": file.to_string_lossy(),
            "provider": provider_peer,
            "provider_address": provider_listen,
            "price_per_epoch": "1000",
            "start_epoch": start_epoch,
            "duration_epochs": 180 * 2880,
        });
        let (status, started) = client.call("POST", "/v1/storage-deals", Some(&body)).await;
        if status == 201 {
            acknowledged.push(started["stream_id"].as_str().unwrap().to_owned());
        }
        // Stopped midway, and again after the last deal: the deals then in flight must
        // resume with no new request telling the node where the provider is.
        if n == DEALS / 2 || n == DEALS - 1 {
            let status = client.terminate();
            assert!(status.success(), "SIGTERM did not stop the client cleanly:\n{}", client.log());
            assert!(client.log().contains("stopped; a final checkpoint was signed"));
            client = start(&client_home, &client_args, client_api, n);
            client.printed("node     ").await;
        }
    }
    assert!(acknowledged.len() >= DEALS - 1, "only {} deals acknowledged", acknowledged.len());
    // Then after the restart every acknowledged deal reaches Active
    let started = Instant::now();
    loop {
        let (_, page) =
            client.call("GET", "/v1/deals?side=storage_client&state=Active&limit=500", None).await;
        let active: Vec<String> = page["deals"]
            .as_array()
            .map(|rows| {
                rows.iter().filter_map(|r| r["stream_id"].as_str().map(str::to_owned)).collect()
            })
            .unwrap_or_default();
        if acknowledged.iter().all(|id| active.contains(id)) {
            break;
        }
        if started.elapsed() > Duration::from_secs(240) {
            let mut stuck = Vec::new();
            for id in acknowledged.iter().filter(|id| !active.contains(id)) {
                let (_, found) = client.call("GET", &format!("/v1/deals/{id}"), None).await;
                stuck.push(format!(
                    "{id}: {} ({})",
                    found["deal"]["state"], found["deal"]["message"]
                ));
            }
            panic!(
                "{} of {} acknowledged deals Active; not: {stuck:#?}\n{}",
                acknowledged.len() - stuck.len(),
                acknowledged.len(),
                client.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // and the client's journal verifies.
    assert!(client.terminate().success());
    let (verified, printed) = run_on(&client.home, &["verify"]);
    assert!(verified, "{printed}");
    assert!(provider.terminate().success());
    // No secret reached a log: not the API token, not either node's identity key.
    for node in [&client, &provider] {
        let logs: String = std::fs::read_dir(&node.home)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect();
        assert!(!logs.contains(TOKEN), "the API token is in a log");
        let key = std::fs::read(node.home.join("identity.key")).unwrap();
        for form in [hex::encode(&key), String::from_utf8_lossy(&key).trim().to_owned()] {
            assert!(form.len() < 16 || !logs.contains(&form), "the node key is in a log");
        }
    }
    let _ = std::fs::remove_dir_all(&root);
}
