//! dealledger's bench workloads written the way an esrs user would write them, so that
//! `cargo bench --bench commands` and `--bench rebuild` can print both side by side.
//!
//! - `commands URL PER_LEVEL`: storage provider deals played from proposal to Active, 13
//!   commands each (14 events: the validation is a second event, as in dealledger), at 1, 8
//!   and 32 deals at once. Each command is esrs's round trip: `AggregateManager::load`
//!   (replay the aggregate's events), `handle_command` (verify the signatures like
//!   dealledger's machine does), persist, and a `TransactionalEventHandler` that writes the
//!   status row and the outbox row in the same transaction.
//! - `rebuild URL DEALS EVENTS_PER_DEAL`: fills the event table with that many deals, then
//!   rebuilds the status view with esrs's `PgRebuilder::by_aggregate_id`.
//!
//! Prints one JSON object on its last line of stdout.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use esrs::handler::TransactionalEventHandler;
use esrs::manager::AggregateManager;
use esrs::rebuilder::{PgRebuilder, Rebuilder};
use esrs::store::postgres::{PgStore, PgStoreBuilder, PgStoreError};
use esrs::store::StoreEvent;
use esrs::{Aggregate, AggregateState};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// The terms of a storage deal, with the same fields as dealledger's proposal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Proposal {
    piece_cid: String,
    piece_size: u64,
    verified_deal: bool,
    client: [u8; 32],
    provider: [u8; 32],
    label: String,
    start_epoch: i64,
    end_epoch: i64,
    storage_price_per_epoch: String,
    provider_collateral: String,
    client_collateral: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ClientProposal {
    proposal: Proposal,
    client_signature: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SignedDeal {
    client_proposal: ClientProposal,
    provider_signature: Vec<u8>,
}

fn verify(key: &[u8; 32], message: &impl Serialize, signature: &[u8]) -> Result<(), Rejection> {
    let key = VerifyingKey::from_bytes(key).map_err(|_| Rejection::BadSignature)?;
    let signature = Signature::from_slice(signature).map_err(|_| Rejection::BadSignature)?;
    let bytes = serde_json::to_vec(message).map_err(|_| Rejection::BadSignature)?;
    key.verify(&bytes, &signature).map_err(|_| Rejection::BadSignature)
}

/// What happened to a deal. A command is the event it asks for, as in dealledger; the one
/// event only the aggregate derives (`ProposalValidated`) is refused as a command.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Event {
    ProposalReceived { proposal: ClientProposal },
    ProposalValidated,
    DealAccepted { deal: SignedDeal },
    DataTransferStarted,
    DataTransferProgressed { bytes: u64 },
    DataTransferCompleted { bytes: u64 },
    DataVerified { piece_cid: String },
    FundsReserved { amount: String },
    PublishSent { message: String },
    DealPublished { deal_id: u64 },
    DealHandedOff,
    DealPreCommitted { sector: u64 },
    DealActivated { epoch: i64 },
    DealFinalized,
}

impl Event {
    /// The state the event applies in (on the path these workloads play).
    fn source(&self) -> Status {
        match self {
            Event::ProposalReceived { .. } => Status::Unknown,
            Event::ProposalValidated => Status::Validating,
            Event::DealAccepted { .. } => Status::AcceptWait,
            Event::DataTransferStarted => Status::WaitingForData,
            Event::DataTransferProgressed { .. } | Event::DataTransferCompleted { .. } => {
                Status::Transferring
            }
            Event::DataVerified { .. } => Status::VerifyData,
            Event::FundsReserved { .. } => Status::ReserveProviderFunds,
            Event::PublishSent { .. } => Status::Publish,
            Event::DealPublished { .. } => Status::Publishing,
            Event::DealHandedOff => Status::Staged,
            Event::DealPreCommitted { .. } => Status::AwaitingPreCommit,
            Event::DealActivated { .. } => Status::Sealing,
            Event::DealFinalized => Status::Finalizing,
        }
    }

    /// The state a deal is in after this event (on the path these workloads play).
    fn target(&self) -> Status {
        match self {
            Event::ProposalReceived { .. } => Status::Validating,
            Event::ProposalValidated => Status::AcceptWait,
            Event::DealAccepted { .. } => Status::WaitingForData,
            Event::DataTransferStarted | Event::DataTransferProgressed { .. } => {
                Status::Transferring
            }
            Event::DataTransferCompleted { .. } => Status::VerifyData,
            Event::DataVerified { .. } => Status::ReserveProviderFunds,
            Event::FundsReserved { .. } => Status::Publish,
            Event::PublishSent { .. } => Status::Publishing,
            Event::DealPublished { .. } => Status::Staged,
            Event::DealHandedOff => Status::AwaitingPreCommit,
            Event::DealPreCommitted { .. } => Status::Sealing,
            Event::DealActivated { .. } => Status::Finalizing,
            Event::DealFinalized => Status::Active,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Event::ProposalReceived { .. } => "proposal-received",
            Event::ProposalValidated => "proposal-validated",
            Event::DealAccepted { .. } => "deal-accepted",
            Event::DataTransferStarted => "data-transfer-started",
            Event::DataTransferProgressed { .. } => "data-transfer-progressed",
            Event::DataTransferCompleted { .. } => "data-transfer-completed",
            Event::DataVerified { .. } => "data-verified",
            Event::FundsReserved { .. } => "funds-reserved",
            Event::PublishSent { .. } => "publish-sent",
            Event::DealPublished { .. } => "deal-published",
            Event::DealHandedOff => "deal-handed-off",
            Event::DealPreCommitted { .. } => "deal-pre-committed",
            Event::DealActivated { .. } => "deal-activated",
            Event::DealFinalized => "deal-finalized",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
enum Status {
    #[default]
    Unknown,
    Validating,
    AcceptWait,
    WaitingForData,
    Transferring,
    VerifyData,
    ReserveProviderFunds,
    Publish,
    Publishing,
    Staged,
    AwaitingPreCommit,
    Sealing,
    Finalizing,
    Active,
}

impl Status {
    /// The effect entering this state asks for, if any (dealledger writes it to its outbox).
    fn effect(self) -> Option<&'static str> {
        match self {
            Status::AcceptWait => Some("decide-on-proposal"),
            Status::WaitingForData => Some("send"),
            Status::VerifyData => Some("verify-piece-commitment"),
            Status::ReserveProviderFunds => Some("reserve-funds"),
            Status::Publish => Some("publish-deal"),
            Status::Publishing => Some("wait-for-message"),
            Status::Staged => Some("hand-off-to-sealing"),
            Status::AwaitingPreCommit => Some("watch-pre-commit"),
            Status::Sealing => Some("watch-activation"),
            Status::Finalizing => Some("clean-up-staged-data"),
            Status::Active => Some("watch-expiry"),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
struct DealState {
    status: Status,
    proposal: Option<ClientProposal>,
    bytes_received: u64,
}

#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error("{command} is not accepted in state {status:?}")]
    Illegal { command: &'static str, status: Status },
    #[error("bad signature")]
    BadSignature,
    #[error("{0} is derived by the aggregate, not a command")]
    Derived(&'static str),
    #[error("inconsistent: {0}")]
    Inconsistent(&'static str),
}

struct ProviderDeal;

impl ProviderDeal {
    /// Where `event` takes a deal in `status`, if it is legal there.
    fn next(status: Status, event: &Event) -> Option<Status> {
        (event.source() == status).then(|| event.target())
    }
}

impl Aggregate for ProviderDeal {
    const NAME: &'static str = "storage_provider_deal";
    type State = DealState;
    type Command = Event;
    type Event = Event;
    type Error = Rejection;

    fn handle_command(state: &DealState, command: Event) -> Result<Vec<Event>, Rejection> {
        match &command {
            Event::ProposalValidated => return Err(Rejection::Derived(command.name())),
            Event::ProposalReceived { proposal } => {
                verify(&proposal.proposal.client, &proposal.proposal, &proposal.client_signature)?;
            }
            Event::DealAccepted { deal } => {
                if Some(&deal.client_proposal) != state.proposal.as_ref() {
                    return Err(Rejection::Inconsistent("the signed deal is not the proposal"));
                }
                // The client proposal is the one verified when it was received: only the
                // provider's signature is new (as the ledger's machine does).
                let terms = &deal.client_proposal.proposal;
                verify(&terms.provider, &deal.client_proposal, &deal.provider_signature)?;
            }
            Event::DataTransferProgressed { bytes } | Event::DataTransferCompleted { bytes } => {
                check_bytes(state, *bytes)?;
            }
            _ => {}
        }
        // A received proposal is validated at once (the checks above): two events.
        let validated = matches!(command, Event::ProposalReceived { .. });
        let mut events = vec![command];
        if validated {
            events.push(Event::ProposalValidated);
        }
        // Every event must be a legal transition from where the previous one left the deal.
        let mut status = state.status;
        for event in &events {
            status = Self::next(status, event)
                .ok_or(Rejection::Illegal { command: event.name(), status })?;
        }
        Ok(events)
    }

    fn apply_event(mut state: DealState, event: Event) -> DealState {
        if let Some(next) = Self::next(state.status, &event) {
            state.status = next;
        }
        match event {
            Event::ProposalReceived { proposal } => state.proposal = Some(proposal),
            Event::DataTransferProgressed { bytes } | Event::DataTransferCompleted { bytes } => {
                state.bytes_received = bytes
            }
            _ => {}
        }
        state
    }
}

fn check_bytes(state: &DealState, bytes: u64) -> Result<(), Rejection> {
    let size = state.proposal.as_ref().map_or(0, |p| p.proposal.piece_size);
    if bytes < state.bytes_received || bytes > size {
        return Err(Rejection::Inconsistent("bytes out of range"));
    }
    Ok(())
}

/// The status view: one row per deal, written in the append's transaction.
struct StatusView;

/// The outbox: one row per effect a new state asks for, written in the append's transaction
/// (commands only: a rebuild must not enqueue effects again).
struct Outbox;

const VIEW: &str = "CREATE TABLE IF NOT EXISTS esrs_storage_deals (
    stream_id uuid PRIMARY KEY, state text NOT NULL, last_event_type text NOT NULL,
    version int NOT NULL, piece_cid text, piece_size bigint, client text, provider text,
    label text, start_epoch bigint, end_epoch bigint, price_per_epoch text, collateral text,
    bytes_transferred bigint NOT NULL DEFAULT 0, first_event_at timestamptz NOT NULL,
    last_event_at timestamptz NOT NULL);
  CREATE TABLE IF NOT EXISTS esrs_outbox (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id uuid NOT NULL, version int NOT NULL, effect_type text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(), completed_at timestamptz)";

#[async_trait]
impl TransactionalEventHandler<ProviderDeal, PgStoreError, PgConnection> for StatusView {
    async fn handle(
        &self,
        event: &StoreEvent<Event>,
        executor: &mut PgConnection,
    ) -> Result<(), PgStoreError> {
        let (id, version, at) = (event.aggregate_id, event.sequence_number, event.occurred_on);
        let (name, state) = (event.payload.name(), format!("{:?}", event.payload.target()));
        if let Event::ProposalReceived { proposal } = &event.payload {
            let p = &proposal.proposal;
            sqlx::query(
                "INSERT INTO esrs_storage_deals (stream_id, state, last_event_type, version,
                   piece_cid, piece_size, client, provider, label, start_epoch, end_epoch,
                   price_per_epoch, collateral, first_event_at, last_event_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14)",
            )
            .bind(id)
            .bind(state)
            .bind(name)
            .bind(version)
            .bind(&p.piece_cid)
            .bind(p.piece_size as i64)
            .bind(hex(&p.client))
            .bind(hex(&p.provider))
            .bind(&p.label)
            .bind(p.start_epoch)
            .bind(p.end_epoch)
            .bind(&p.storage_price_per_epoch)
            .bind(&p.provider_collateral)
            .bind(at)
            .execute(&mut *executor)
            .await?;
            return Ok(());
        }
        let bytes = match event.payload {
            Event::DataTransferProgressed { bytes } | Event::DataTransferCompleted { bytes } => {
                Some(bytes as i64)
            }
            _ => None,
        };
        sqlx::query(
            "UPDATE esrs_storage_deals SET state = $2, last_event_type = $3, version = $4,
               bytes_transferred = coalesce($5, bytes_transferred), last_event_at = $6
             WHERE stream_id = $1",
        )
        .bind(id)
        .bind(state)
        .bind(name)
        .bind(version)
        .bind(bytes)
        .bind(at)
        .execute(&mut *executor)
        .await?;
        Ok(())
    }

    async fn delete(
        &self,
        aggregate_id: Uuid,
        executor: &mut PgConnection,
    ) -> Result<(), PgStoreError> {
        sqlx::query("DELETE FROM esrs_storage_deals WHERE stream_id = $1")
            .bind(aggregate_id)
            .execute(&mut *executor)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl TransactionalEventHandler<ProviderDeal, PgStoreError, PgConnection> for Outbox {
    async fn handle(
        &self,
        event: &StoreEvent<Event>,
        executor: &mut PgConnection,
    ) -> Result<(), PgStoreError> {
        let effect = match event.payload {
            // Progress stays in Transferring: no new effect.
            Event::DataTransferProgressed { .. } => None,
            ref other => other.target().effect(),
        };
        if let Some(effect) = effect {
            sqlx::query(
                "INSERT INTO esrs_outbox (stream_id, version, effect_type) VALUES ($1, $2, $3)",
            )
            .bind(event.aggregate_id)
            .bind(event.sequence_number)
            .bind(effect)
            .execute(&mut *executor)
            .await?;
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One deal's 13 commands, signed with fixed keys, as dealledger's `storage_deal_commands`.
fn deal_commands(label: String) -> Vec<Event> {
    // Derived once per process, as dealledger's fixture keys are.
    static KEYS: std::sync::OnceLock<(SigningKey, SigningKey)> = std::sync::OnceLock::new();
    let (client, provider) =
        KEYS.get_or_init(|| (SigningKey::from_bytes(&[7; 32]), SigningKey::from_bytes(&[9; 32])));
    let proposal = Proposal {
        piece_cid: "baga6ea4seaqaqrthqy6zkdztyqo2qxrx5vg7tohl3wxyrhkbe6z46qwrcrfqkfy".into(),
        piece_size: 1 << 20,
        verified_deal: false,
        client: client.verifying_key().to_bytes(),
        provider: provider.verifying_key().to_bytes(),
        label,
        start_epoch: 10_000,
        end_epoch: 10_000 + 518_400,
        storage_price_per_epoch: "1000".into(),
        provider_collateral: "1000000".into(),
        client_collateral: "0".into(),
    };
    let client_signature = sign(client, &proposal);
    let client_proposal = ClientProposal { proposal: proposal.clone(), client_signature };
    let provider_signature = sign(provider, &client_proposal);
    let deal = SignedDeal { client_proposal: client_proposal.clone(), provider_signature };
    let size = proposal.piece_size;
    vec![
        Event::ProposalReceived { proposal: client_proposal },
        Event::DealAccepted { deal },
        Event::DataTransferStarted,
        Event::DataTransferProgressed { bytes: size / 2 },
        Event::DataTransferCompleted { bytes: size },
        Event::DataVerified { piece_cid: proposal.piece_cid.clone() },
        Event::FundsReserved { amount: proposal.provider_collateral.clone() },
        Event::PublishSent { message: "bafkreipublishmessage".into() },
        Event::DealPublished { deal_id: 42 },
        Event::DealHandedOff,
        Event::DealPreCommitted { sector: 7 },
        Event::DealActivated { epoch: proposal.start_epoch },
        Event::DealFinalized,
    ]
}

/// The signature over `message`'s JSON bytes, as `verify` checks it.
fn sign(key: &SigningKey, message: &impl Serialize) -> Vec<u8> {
    let bytes = serde_json::to_vec(message).expect("plain structs serialise");
    key.sign(&bytes).to_bytes().to_vec()
}

async fn store(pool: &PgPool) -> PgStore<ProviderDeal> {
    sqlx::raw_sql(VIEW).execute(pool).await.expect("status view");
    PgStoreBuilder::new(pool.clone())
        .add_transactional_event_handler(StatusView)
        .add_transactional_event_handler(Outbox)
        .try_build()
        .await
        .expect("esrs store")
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

async fn commands(pool: PgPool, per_level: usize) -> serde_json::Value {
    let manager = std::sync::Arc::new(AggregateManager::new(store(&pool).await));
    let mut levels = Vec::new();
    for (level, concurrency) in [1usize, 8, 32].into_iter().enumerate() {
        let started = Instant::now();
        let workers: Vec<_> = (0..concurrency)
            .map(|worker| {
                let manager = manager.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    for n in (worker..per_level).step_by(concurrency) {
                        let id = Uuid::new_v4();
                        for command in deal_commands(format!("bench {level} {n}")) {
                            let at = Instant::now();
                            let state = manager.load(id).await.expect("load");
                            let state = state.unwrap_or_else(|| AggregateState::with_id(id));
                            manager
                                .handle_command(state, command)
                                .await
                                .expect("store")
                                .expect("the command is accepted");
                            latencies.push(at.elapsed());
                        }
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for worker in workers {
            latencies.extend(worker.await.expect("worker"));
        }
        let seconds = started.elapsed().as_secs_f64();
        latencies.sort();
        levels.push(serde_json::json!({
            "concurrency": concurrency, "commands": latencies.len(), "seconds": seconds,
            "commands_per_s": latencies.len() as f64 / seconds,
            "p50_ms": percentile(&latencies, 0.5), "p99_ms": percentile(&latencies, 0.99),
        }));
    }
    serde_json::json!({ "peer": "esrs 0.18.0", "levels": levels })
}

async fn rebuild(pool: PgPool, deals: usize, per_deal: usize) -> serde_json::Value {
    let store = store(&pool).await;
    // One deal's events as esrs stores them (JSON payloads), repeated for every deal.
    let mut state = DealState::default();
    let mut payloads = Vec::new();
    for command in deal_commands("rebuild".into()) {
        for event in ProviderDeal::handle_command(&state, command).expect("legal") {
            payloads.push(serde_json::to_value(&event).expect("json"));
            state = ProviderDeal::apply_event(state, event);
        }
    }
    payloads.truncate(per_deal);
    let filled = Instant::now();
    sqlx::query(&format!(
        "INSERT INTO {} (id, aggregate_id, payload, occurred_on, sequence_number, version)
         SELECT gen_random_uuid(), md5(d::text)::uuid, e.payload, now(), e.seq, 1
         FROM generate_series(1, $1) d, unnest($2::jsonb[]) WITH ORDINALITY AS e(payload, seq)",
        store.table_name()
    ))
    .bind(deals as i64)
    .bind(&payloads)
    .execute(&pool)
    .await
    .expect("fill the event table");
    let fill_seconds = filled.elapsed().as_secs_f64();
    sqlx::query("ANALYZE").execute(&pool).await.expect("analyze");
    let events: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", store.table_name()))
        .fetch_one(&pool)
        .await
        .expect("count");
    let started = Instant::now();
    PgRebuilder::<ProviderDeal>::new()
        .with_transactional_event_handlers(vec![Box::new(StatusView)])
        .by_aggregate_id(pool.clone())
        .await
        .expect("rebuild");
    let seconds = started.elapsed().as_secs_f64();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM esrs_storage_deals")
        .fetch_one(&pool)
        .await
        .expect("count rows");
    serde_json::json!({
        "peer": "esrs 0.18.0 PgRebuilder::by_aggregate_id", "events": events, "deals": rows,
        "fill_seconds": fill_seconds, "seconds": seconds,
        "events_per_s": events as f64 / seconds,
    })
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: esrs-peer commands URL PER_LEVEL | rebuild URL DEALS EVENTS_PER_DEAL";
    let number = |i: usize| -> usize {
        args.get(i).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{usage}"))
    };
    let url = args.get(1).unwrap_or_else(|| panic!("{usage}"));
    let pool = PgPoolOptions::new().max_connections(40).connect(url).await.expect("connect");
    let result = match args.first().map(String::as_str) {
        Some("commands") => commands(pool, number(2)).await,
        Some("rebuild") => rebuild(pool, number(2), number(3)).await,
        _ => panic!("{usage}"),
    };
    println!("{result}");
}
