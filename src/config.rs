//! A node's configuration: a TOML file, then environment overrides, then validation that
//! names every problem at once (`dealledger config check`). Unknown keys are errors, so a
//! typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::{PaddedPieceSize, TokenAmount};

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type, ...).
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// The values do not hold together; every problem is listed.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// Which sides of the market a node plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Proposes storage deals and retrieves.
    Client,
    /// Stores and serves.
    Provider,
}

/// The chain a node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ChainKind {
    /// The local devnet (in PostgreSQL).
    #[default]
    Devnet,
    /// A Lotus full node over JSON-RPC.
    Lotus,
}

/// `[node]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// The roles this node plays.
    pub roles: Vec<Role>,
    /// The database; the embedded cluster when absent.
    pub database_url: Option<String>,
    /// A streaming replica of the database that serves the API's reads (status rows, lists,
    /// audits); the primary when absent.
    pub read_database_url: Option<String>,
}

impl Default for NodeSection {
    fn default() -> Self {
        Self {
            roles: vec![Role::Client, Role::Provider],
            database_url: None,
            read_database_url: None,
        }
    }
}

/// `[network]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// libp2p listen address.
    pub listen: String,
    /// Seconds before a request to a peer times out.
    pub request_timeout_secs: u64,
}

impl Default for NetworkSection {
    fn default() -> Self {
        Self { listen: "/ip4/127.0.0.1/tcp/0".into(), request_timeout_secs: 60 }
    }
}

/// `[chain]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ChainSection {
    /// `devnet` or `lotus`.
    pub kind: ChainKind,
    /// Devnet: a PostgreSQL URL (the node's own database when absent). Lotus: its
    /// `http://host:1234/rpc/v0` URL.
    pub url: Option<String>,
    /// Lotus API token (env `LOTUS_TOKEN` overrides).
    pub token: Option<String>,
    /// Devnet: run its clock in this process, one epoch per this many milliseconds (0: no).
    pub epoch_ms: u64,
    /// Epochs an observation must be buried under before it is acted on (Lotus: 900).
    pub finality: Option<i64>,
    /// Devnet sealing: epochs from hand-off to pre-commit (default 2).
    pub precommit_epochs: Option<i64>,
    /// Devnet sealing: epochs from pre-commit to proof (default 3).
    pub prove_epochs: Option<i64>,
}

/// `[provider]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderSection {
    /// attoFIL per GiB of padded piece per epoch, as a decimal string.
    pub price_per_gib_epoch: String,
    /// Smallest padded piece taken.
    pub min_piece_size: u64,
    /// Largest padded piece taken.
    pub max_piece_size: u64,
    /// Retrieval: attoFIL per byte.
    pub retrieval_price_per_byte: String,
    /// Retrieval: the most bytes sent between two payments.
    pub max_payment_interval: u64,
}

impl Default for ProviderSection {
    fn default() -> Self {
        Self {
            price_per_gib_epoch: "1000000".into(),
            min_piece_size: 128,
            max_piece_size: 32 << 30,
            retrieval_price_per_byte: "1".into(),
            max_payment_interval: 1 << 20,
        }
    }
}

/// `[client]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ClientSection {
    /// The most a retrieval may cost in total, attoFIL as a decimal string (no limit when
    /// absent).
    pub retrieval_funds_limit: Option<String>,
}

/// `[api]`
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Where the HTTP API listens (`127.0.0.1:7700`); no API when absent.
    pub listen: Option<String>,
    /// Bearer token for writes (env `DEALLEDGER_API_TOKEN` overrides); writes are disabled
    /// without one.
    pub token: Option<String>,
    /// Reads need no token.
    pub open_reads: bool,
}

/// `[intervals]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntervalsSection {
    /// Minutes between signed journal checkpoints.
    pub checkpoint_minutes: u64,
    /// Minutes a deal may stay in one state before it times out.
    pub deal_timeout_minutes: u64,
    /// Seconds an effect's claim lasts (a crashed runner's claims return after it).
    pub effect_lease_secs: u64,
    /// Failed attempts before an effect's failure becomes the deal's input.
    pub effect_max_attempts: i32,
    /// Days after which ended deals move to `events_archive` (0: never archive).
    pub archive_after_days: u64,
}

impl Default for IntervalsSection {
    fn default() -> Self {
        Self {
            checkpoint_minutes: 10,
            deal_timeout_minutes: 60,
            effect_lease_secs: 30,
            effect_max_attempts: 5,
            archive_after_days: 0,
        }
    }
}

/// A node's whole configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// `[node]`
    pub node: NodeSection,
    /// `[network]`
    pub network: NetworkSection,
    /// `[chain]`
    pub chain: ChainSection,
    /// `[provider]`
    pub provider: ProviderSection,
    /// `[client]`
    pub client: ClientSection,
    /// `[api]`
    pub api: ApiSection,
    /// `[intervals]`
    pub intervals: IntervalsSection,
}

/// Reads an environment variable (a seam for tests).
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl NodeConfig {
    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: origin.to_owned(), message: e.to_string() })
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Applies the environment's overrides: `DATABASE_URL`, `DEALLEDGER_READ_DATABASE_URL`,
    /// `DEALLEDGER_LISTEN`,
    /// `DEALLEDGER_API_LISTEN`, `DEALLEDGER_API_TOKEN`, `LOTUS_TOKEN`.
    pub fn with_env(mut self, env: EnvLookup<'_>) -> Self {
        if let Some(url) = env("DATABASE_URL") {
            self.node.database_url = Some(url);
        }
        if let Some(url) = env("DEALLEDGER_READ_DATABASE_URL") {
            self.node.read_database_url = Some(url);
        }
        if let Some(listen) = env("DEALLEDGER_LISTEN") {
            self.network.listen = listen;
        }
        if let Some(listen) = env("DEALLEDGER_API_LISTEN") {
            self.api.listen = Some(listen);
        }
        if let Some(token) = env("DEALLEDGER_API_TOKEN") {
            self.api.token = Some(token);
        }
        if let Some(token) = env("LOTUS_TOKEN") {
            self.chain.token = Some(token);
        }
        self
    }

    /// Every problem with the values, or `Ok` when the node can start with them.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.node.roles.is_empty() {
            problems.push("node.roles: a node plays at least one role (client, provider)".into());
        }
        if self.network.listen.parse::<libp2p::Multiaddr>().is_err() {
            problems.push(format!("network.listen: {:?} is not a multiaddr", self.network.listen));
        }
        if let Some(listen) = &self.api.listen
            && listen.parse::<SocketAddr>().is_err()
        {
            problems.push(format!("api.listen: {listen:?} is not host:port"));
        }
        if self.api.token.as_ref().is_some_and(|t| t.len() < 16) {
            problems.push("api.token: use at least 16 characters".into());
        }
        for (key, value) in [
            ("provider.price_per_gib_epoch", Some(&self.provider.price_per_gib_epoch)),
            ("provider.retrieval_price_per_byte", Some(&self.provider.retrieval_price_per_byte)),
            ("client.retrieval_funds_limit", self.client.retrieval_funds_limit.as_ref()),
        ] {
            if let Some(value) = value
                && value.parse::<u128>().is_err()
            {
                problems.push(format!("{key}: {value:?} is not attoFIL as a decimal string"));
            }
        }
        let (min, max) = (self.provider.min_piece_size, self.provider.max_piece_size);
        for (key, size) in [("provider.min_piece_size", min), ("provider.max_piece_size", max)] {
            if !PaddedPieceSize(size).is_valid() {
                problems.push(format!(
                    "{key}: {size} is not a padded piece size (a power of two ≥ 128)"
                ));
            }
        }
        if min > max {
            problems.push("provider.min_piece_size is larger than max_piece_size".into());
        }
        match (self.chain.kind, &self.chain.url) {
            (ChainKind::Lotus, None) => problems.push("chain.url: a Lotus chain needs its URL".into()),
            (ChainKind::Lotus, Some(url)) if !url.starts_with("http://") => {
                problems.push(format!("chain.url: {url:?}: Lotus is reached over http:// only"));
            }
            (ChainKind::Lotus, Some(_)) if self.node.roles.contains(&Role::Provider) => problems.push(
                "chain.kind: a provider cannot publish deals through Lotus (ed25519 deals; see the README); use the devnet"
                    .into(),
            ),
            (ChainKind::Devnet, Some(url))
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) =>
            {
                problems.push(format!("chain.url: {url:?}: a devnet is a PostgreSQL URL"));
            }
            _ => {}
        }
        if self.intervals.checkpoint_minutes == 0 {
            problems.push("intervals.checkpoint_minutes: at least 1".into());
        }
        if self.intervals.effect_max_attempts < 1 {
            problems.push("intervals.effect_max_attempts: at least 1".into());
        }
        if problems.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(problems)) }
    }

    /// The storage price, parsed (valid after [`NodeConfig::validate`]).
    pub fn price_per_gib_epoch(&self) -> TokenAmount {
        TokenAmount(self.provider.price_per_gib_epoch.parse().unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn an_empty_file_is_a_valid_default_node() {
        let config = NodeConfig::from_toml("", "empty").unwrap().with_env(&no_env);
        config.validate().unwrap();
        assert_eq!(config.node.roles, vec![Role::Client, Role::Provider]);
    }

    #[test]
    fn the_documented_example_is_valid() {
        let text = include_str!("../docs/node.example.toml");
        let config = NodeConfig::from_toml(text, "docs/node.example.toml").unwrap();
        config.validate().unwrap();
        assert_eq!(config.api.listen.as_deref(), Some("127.0.0.1:7700"));
    }

    #[test]
    fn rejects_an_unknown_key_with_its_place() {
        let error =
            NodeConfig::from_toml("[api]\nlisten = \"127.0.0.1:1\"\ntokn = \"x\"\n", "node.toml")
                .unwrap_err()
                .to_string();
        assert!(error.contains("node.toml") && error.contains("tokn"), "{error}");
    }

    #[test]
    fn lists_every_invalid_value_at_once() {
        let text = r#"
            [node]
            roles = []
            [network]
            listen = "not an address"
            [api]
            listen = "nowhere"
            token = "short"
            [provider]
            price_per_gib_epoch = "-1"
            min_piece_size = 1000
            [chain]
            kind = "lotus"
        "#;
        let error = NodeConfig::from_toml(text, "t").unwrap().validate().unwrap_err().to_string();
        for key in [
            "node.roles",
            "network.listen",
            "api.listen",
            "api.token",
            "provider.price_per_gib_epoch",
            "provider.min_piece_size",
            "chain.url",
        ] {
            assert!(error.contains(key), "{key} missing from {error}");
        }
    }

    proptest::proptest! {
        /// Whatever a configuration file holds, loading and validating it gives a value or an
        /// error that names the problem.
        #[test]
        fn arbitrary_text_never_panics(text in "[ -~\n]{0,200}") {
            if let Ok(config) = NodeConfig::from_toml(&text, "fuzz") {
                let _ = config.validate();
            }
        }
    }

    #[test]
    fn the_environment_overrides_the_file() {
        let env = |key: &str| match key {
            "DEALLEDGER_API_TOKEN" => Some("from-the-environment".to_owned()),
            "DEALLEDGER_API_LISTEN" => Some("127.0.0.1:9999".to_owned()),
            _ => None,
        };
        let config = NodeConfig::from_toml("[api]\ntoken = \"from-the-file-xxxxx\"\n", "t")
            .unwrap()
            .with_env(&env);
        assert_eq!(config.api.token.as_deref(), Some("from-the-environment"));
        assert_eq!(config.api.listen.as_deref(), Some("127.0.0.1:9999"));
    }
}
