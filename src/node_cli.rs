//! The CLI's verbs against a running node's HTTP API (`dealledger deals list`, `deal show`,
//! `storage deal`): human tables by default, `--json` for scripts.

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use dealledger::adapters::http;

/// Where the node's API is and how to authenticate.
#[derive(Args, Debug, Clone)]
pub struct NodeApi {
    /// The node's API (`dealledger serve` with `api.listen`).
    #[arg(long, env = "DEALLEDGER_NODE", default_value = "http://127.0.0.1:7700")]
    pub node: String,
    /// The API token.
    #[arg(long, env = "DEALLEDGER_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum DealsCommand {
    /// Lists deals (oldest first), following pages.
    List {
        #[command(flatten)]
        api: NodeApi,
        /// storage, retrieval or retrieval-request.
        #[arg(long, default_value = "storage")]
        kind: String,
        /// Only this side (storage_client, storage_provider, ...).
        #[arg(long)]
        side: Option<String>,
        /// Only this state.
        #[arg(long)]
        state: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

#[derive(Subcommand)]
pub enum DealCommand {
    /// Fails a deal by hand (through Failing: funds released), recorded with who and why.
    Fail {
        /// The deal (stream) id.
        id: String,
        /// Why (recorded in the deal's journal).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        api: NodeApi,
    },
    /// Retries a deal paused in a recoverable failure (its effect runs again), recorded with
    /// who and why.
    Retry {
        /// The deal (stream) id.
        id: String,
        /// Why (recorded in the deal's journal).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        api: NodeApi,
    },
    /// Cancels a deal or a retrieval request, recorded with who and why.
    Cancel {
        /// The deal (stream) or request id.
        id: String,
        /// Why (recorded in the deal's journal).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        api: NodeApi,
    },
    /// One deal's status row.
    Show {
        /// The deal (stream) id.
        id: String,
        #[command(flatten)]
        api: NodeApi,
    },
}

#[derive(Subcommand)]
pub enum StorageCommand {
    /// Starts a storage deal of a file on the node, as its client.
    Deal {
        /// The file, on the node's file system.
        file: String,
        /// The provider's peer id.
        #[arg(long)]
        provider: String,
        /// Where the provider listens (multiaddr).
        #[arg(long)]
        provider_address: String,
        /// attoFIL per epoch.
        #[arg(long)]
        price_per_epoch: u128,
        /// Epochs of storage (default 180 days).
        #[arg(long, default_value_t = 180 * 2880)]
        duration_epochs: i64,
        #[command(flatten)]
        api: NodeApi,
    },
}

#[derive(Subcommand)]
pub enum RetrievalCommand {
    /// Retrieves a whole piece from a provider, part by part, paid through a channel; the
    /// node writes it to the file it prints.
    Start {
        /// The piece CID.
        piece_cid: String,
        /// The provider's peer id.
        #[arg(long)]
        provider: String,
        /// Where the provider listens (multiaddr).
        #[arg(long)]
        provider_address: String,
        /// The most to pay per byte, attoFIL.
        #[arg(long)]
        max_price_per_byte: u128,
        /// Bytes per retrieval deal (default: one deal for the whole piece).
        #[arg(long)]
        part_size: Option<u64>,
        #[command(flatten)]
        api: NodeApi,
    },
}

async fn call(
    api: &NodeApi,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let url = url::Url::parse(&api.node).with_context(|| format!("--node {}", api.node))?;
    anyhow::ensure!(url.scheme() == "http", "--node must be an http:// URL");
    let host = url.host_str().context("--node has no host")?.to_owned();
    let port = url.port().unwrap_or(80);
    let auth = api.token.as_ref().map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> =
        auth.as_deref().map(|a| ("Authorization", a)).into_iter().collect();
    let bytes = body.map(|b| b.to_string().into_bytes());
    let body = bytes.as_deref().map(|b| ("application/json", b));
    let response = http::request(&host, port, method, path, &headers, body, 64 << 20).await?;
    let value: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    if !(200..300).contains(&response.status) {
        let message = value["message"].as_str().unwrap_or("no message");
        anyhow::bail!("the node answered {}: {message}", response.status);
    }
    Ok(value)
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `dealledger deals list`
pub async fn deals(command: DealsCommand) -> anyhow::Result<()> {
    let DealsCommand::List { api, kind, side, state, limit } = command;
    let mut rows = Vec::new();
    let mut after: Option<String> = None;
    while rows.len() < limit {
        let mut path = format!("/v1/deals?kind={kind}&limit={}", (limit - rows.len()).min(500));
        for (key, value) in [("side", &side), ("state", &state), ("after", &after)] {
            if let Some(value) = value {
                path.push_str(&format!("&{key}={value}"));
            }
        }
        let page = call(&api, "GET", &path, None).await?;
        rows.extend(page["deals"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    if api.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let key = if kind == "retrieval-request" { "request_id" } else { "stream_id" };
    println!("{:<38} {:<19} {:<24} {:>10}  last event", "id", "side", "state", "bytes");
    for row in &rows {
        println!(
            "{:<38} {:<19} {:<24} {:>10}  {}",
            text(&row[key]),
            text(&row["side"]),
            text(&row["state"]),
            text(row.get("bytes_transferred").or(row.get("bytes_done")).unwrap_or(&Value::Null)),
            text(&row["last_event_at"]),
        );
    }
    println!("{} deals", rows.len());
    Ok(())
}

/// `dealledger deal show`
pub async fn deal(command: DealCommand) -> anyhow::Result<()> {
    let verb = match &command {
        DealCommand::Fail { .. } => "fail",
        DealCommand::Retry { .. } => "retry",
        DealCommand::Cancel { .. } | DealCommand::Show { .. } => "cancel",
    };
    let (id, api) = match command {
        DealCommand::Show { id, api } => (id, api),
        DealCommand::Cancel { id, reason, api }
        | DealCommand::Fail { id, reason, api }
        | DealCommand::Retry { id, reason, api } => {
            let operator = std::env::var("USER").unwrap_or_else(|_| "cli".into());
            let body = json!({ "reason": reason, "operator": operator });
            let now = call(&api, "POST", &format!("/v1/deals/{id}/{verb}"), Some(body)).await?;
            if api.json {
                println!("{}", serde_json::to_string_pretty(&now)?);
            } else {
                println!("{id}: {}", text(&now["state"]));
            }
            return Ok(());
        }
    };
    let found = call(&api, "GET", &format!("/v1/deals/{id}"), None).await?;
    if api.json {
        println!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(());
    }
    println!("{} {id}", text(&found["kind"]));
    if let Some(row) = found["deal"].as_object() {
        for (key, value) in row {
            println!("  {key:<22} {}", text(value));
        }
    }
    Ok(())
}

/// `dealledger storage deal`
pub async fn storage(command: StorageCommand) -> anyhow::Result<()> {
    let StorageCommand::Deal {
        file,
        provider,
        provider_address,
        price_per_epoch,
        duration_epochs,
        api,
    } = command;
    let body = json!({
        "file": file,
        "provider": provider,
        "provider_address": provider_address,
        "price_per_epoch": price_per_epoch.to_string(),
        "duration_epochs": duration_epochs,
    });
    let started = call(&api, "POST", "/v1/storage-deals", Some(body)).await?;
    if api.json {
        println!("{}", serde_json::to_string_pretty(&started)?);
    } else {
        println!("started storage deal {}", text(&started["stream_id"]));
        println!("  proposal {}", text(&started["proposal_cid"]));
        println!(
            "  piece    {} ({} bytes padded)",
            text(&started["piece_cid"]),
            text(&started["piece_size"])
        );
        println!("follow it: dealledger deal show {}", text(&started["stream_id"]));
    }
    Ok(())
}

/// `dealledger retrieval start`
pub async fn retrieval(command: RetrievalCommand) -> anyhow::Result<()> {
    let RetrievalCommand::Start {
        piece_cid,
        provider,
        provider_address,
        max_price_per_byte,
        part_size,
        api,
    } = command;
    let body = json!({
        "piece_cid": piece_cid,
        "provider": provider,
        "provider_address": provider_address,
        "max_price_per_byte": max_price_per_byte.to_string(),
        "part_size": part_size,
    });
    let started = call(&api, "POST", "/v1/retrievals", Some(body)).await?;
    if api.json {
        println!("{}", serde_json::to_string_pretty(&started)?);
    } else {
        println!("started retrieval {}", text(&started["request_id"]));
        println!(
            "  {} bytes, written to {}",
            text(&started["total_bytes"]),
            text(&started["output"])
        );
        println!("follow it: dealledger deal show {}", text(&started["request_id"]));
    }
    Ok(())
}
