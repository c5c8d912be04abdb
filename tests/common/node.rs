//! A `dealledger serve` process driven by a test: started with its own home (and so its own
//! embedded database), called over its HTTP API, stopped with SIGTERM or killed with SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use dealledger::adapters::http::request;

pub const TOKEN: &str = "0123456789abcdef-service-test";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Node {
    pub home: PathBuf,
    pub api: u16,
    pub log: PathBuf,
    pub child: Child,
}

pub fn start(home: &Path, args: &[&str], api: u16, run: usize) -> Node {
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
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the node to print `prefix` and returns the rest of that line.
    pub async fn printed(&self, prefix: &str) -> String {
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

    pub async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
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

    pub fn terminate(&mut self) -> std::process::ExitStatus {
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

impl Node {
    /// Kills the process with SIGKILL (no clean-up of any kind) and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The node's peer id, from its start-up banner.
    pub async fn peer(&self) -> String {
        let line = self.printed("node     ").await;
        line.split_whitespace().next().unwrap().to_owned()
    }
}

/// A provider node that runs the devnet's clock (100 ms per epoch) and a client node on its own
/// database that uses the provider's devnet as its chain, both parties funded there.
pub struct TwoNodes {
    pub provider: Node,
    pub client: Node,
    pub provider_peer: String,
    pub client_peer: String,
    /// Where the provider listens for libp2p.
    pub provider_listen: String,
    /// The provider's `serve` arguments except `--listen`.
    pub provider_args: Vec<String>,
    /// The client's `serve` arguments.
    pub client_args: Vec<String>,
    pub devnet: dealledger::adapters::chain::Devnet,
    pub devnet_url: String,
}

/// Starts [`TwoNodes`] under `root`; `client_toml` and `provider_toml` are added to each node's
/// configuration file.
pub async fn two_funded_nodes(root: &Path, client_toml: &str, provider_toml: &str) -> TwoNodes {
    use dealledger::adapters::chain::{Devnet, DevnetConfig, MessageKey};
    use dealledger::domain::{PartyKey, TokenAmount};
    std::fs::create_dir_all(root).unwrap();
    let provider_config = root.join("provider.toml");
    std::fs::write(&provider_config, provider_toml).unwrap();
    let provider_args: Vec<String> = vec![
        "--config".into(),
        provider_config.to_string_lossy().into_owned(),
        "--devnet-epoch-ms".into(),
        "100".into(),
    ];
    let provider_listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let mut args: Vec<&str> = provider_args.iter().map(String::as_str).collect();
    args.extend(["--listen", provider_listen.as_str()]);
    let provider = start(&root.join("provider"), &args, free_port(), 0);
    let provider_peer = provider.peer().await;
    let roles = provider.printed("roles    ").await;
    let devnet_url = roles.split("database ").nth(1).unwrap().trim().to_owned();
    let client_config = root.join("client.toml");
    std::fs::write(&client_config, format!("[chain]\nurl = \"{devnet_url}\"\n{client_toml}"))
        .unwrap();
    let client_args = vec!["--config".to_owned(), client_config.to_string_lossy().into_owned()];
    let args: Vec<&str> = client_args.iter().map(String::as_str).collect();
    let client = start(&root.join("client"), &args, free_port(), 0);
    let client_peer = client.peer().await;
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
    TwoNodes {
        provider,
        client,
        provider_peer,
        client_peer,
        provider_listen,
        provider_args,
        client_args,
        devnet,
        devnet_url,
    }
}

/// Runs a `dealledger` command against a node's home (its embedded database); returns whether
/// it succeeded and what it printed.
pub fn run_on(home: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_dealledger"))
        .args(args)
        .env("DEALLEDGER_HOME", home)
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}
