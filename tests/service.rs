//! Two `dealledger serve` processes on 127.0.0.1, each with its own embedded database, sharing
//! the provider's devnet. 200 storage deals are started through the client's HTTP API, and the
//! client is stopped with SIGTERM in the middle of them: it stops cleanly, and after a restart
//! every deal the API acknowledged reaches Active; nothing acknowledged is lost, and every
//! stream's chain verifies.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use dealledger::adapters::chain::{Chain, Devnet, DevnetConfig, MessageKey};
use dealledger::adapters::http::request;
use dealledger::domain::{PartyKey, TokenAmount};

const TOKEN: &str = "0123456789abcdef-service-test";
const DEALS: usize = 200;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Node {
    home: PathBuf,
    api: u16,
    log: PathBuf,
    child: Child,
}

fn start(home: &Path, args: &[&str], api: u16, run: usize) -> Node {
    std::fs::create_dir_all(home).unwrap();
    let log = home.join(format!("serve-{run}.log"));
    let output = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_dealledger"))
        .arg("serve")
        .args(args)
        .args(["--api-listen", &format!("127.0.0.1:{api}")])
        .env("DEALLEDGER_HOME", home)
        .env("DEALLEDGER_API_TOKEN", TOKEN)
        .env_remove("DATABASE_URL")
        .stdout(output.try_clone().unwrap())
        .stderr(Stdio::from(output))
        .spawn()
        .unwrap();
    Node { home: home.to_owned(), api, log, child }
}

/// A node still running when its test ends (it failed midway) is stopped like an operator
/// would, so that it also stops the database it started, instead of running on.
impl Drop for Node {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
            let started = Instant::now();
            while matches!(self.child.try_wait(), Ok(None)) {
                if started.elapsed() > Duration::from_secs(20) {
                    let _ = self.child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Node {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the node to print `prefix` and returns the rest of that line.
    async fn printed(&self, prefix: &str) -> String {
        let started = Instant::now();
        loop {
            if let Some(line) = self.log().lines().find_map(|l| l.strip_prefix(prefix)) {
                return line.trim().to_owned();
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no {prefix:?} in:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let body = bytes.as_deref().map(|b| ("application/json", b));
        let auth = format!("Bearer {TOKEN}");
        match request(
            "127.0.0.1",
            self.api,
            method,
            path,
            &[("Authorization", &auth)],
            body,
            8 << 20,
        )
        .await
        {
            Ok(r) => (r.status, serde_json::from_slice(&r.body).unwrap_or(Value::Null)),
            Err(_) => (0, Value::Null),
        }
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "no clean stop:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_node_stopped_with_sigterm_under_load_loses_no_acknowledged_deal() {
    let root = std::env::temp_dir().join(format!("dealledger-service-{}", uuid::Uuid::new_v4()));
    // Given a provider node that runs the devnet's clock
    let provider_p2p = free_port();
    let provider_listen = format!("/ip4/127.0.0.1/tcp/{provider_p2p}");
    let mut provider = start(
        &root.join("provider"),
        &["--listen", &provider_listen, "--devnet-epoch-ms", "100"],
        free_port(),
        0,
    );
    let provider_peer = provider.printed("node     ").await;
    let provider_peer = provider_peer.split_whitespace().next().unwrap().to_owned();
    let roles = provider.printed("roles    ").await;
    let devnet_url = roles.split("database ").nth(1).unwrap().trim().to_owned();
    // and a client node on its own database, sharing the provider's devnet
    let config = root.join("client.toml");
    std::fs::write(&config, format!("[chain]\nurl = \"{devnet_url}\"\n")).unwrap();
    let client_home = root.join("client");
    let client_api = free_port();
    let config_arg = config.to_string_lossy().to_string();
    let client_args = ["--config", config_arg.as_str()];
    let mut client = start(&client_home, &client_args, client_api, 0);
    let client_peer = client.printed("node     ").await;
    let client_peer = client_peer.split_whitespace().next().unwrap().to_owned();
    // Both parties funded on the devnet
    let pool =
        dealledger::db::pool_options().max_connections(2).connect(&devnet_url).await.unwrap();
    let devnet = Devnet::open(pool, DevnetConfig::default()).await.unwrap();
    for peer in [&provider_peer, &client_peer] {
        let party = PartyKey::from_peer_id(&peer.parse().unwrap()).unwrap();
        devnet
            .fund(party, TokenAmount(10u128.pow(24)), MessageKey::of("faucet", peer.as_bytes()))
            .await
            .unwrap();
    }
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
    let verify = Command::new(env!("CARGO_BIN_EXE_dealledger"))
        .arg("verify")
        .env("DEALLEDGER_HOME", &client.home)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
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
