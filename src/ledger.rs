//! [`Ledger`]: the library's front door for services that embed it. One builder picks the
//! database (a URL or the embedded cluster), the chain (the devnet) and, optionally, the
//! network; `build` opens everything and starts what runs in the background — the provider's
//! market protocols, the effect runner, the `deal_transitions` projector. The seed's verbs are
//! methods; deal updates are a stream; the status tables are plain SQL on [`Ledger::pool`].
//!
//! ```no_run
//! # async fn example() -> Result<(), dealledger::ledger::LedgerError> {
//! use dealledger::ledger::{DatabaseChoice, Ledger};
//! let ledger = Ledger::builder()
//!     .database(DatabaseChoice::Embedded("./.dealledger".into()))
//!     .provider(dealledger::ledger::ProviderTerms::default())
//!     .network("/ip4/127.0.0.1/tcp/0".parse().expect("a multiaddr"))
//!     .build()
//!     .await?;
//! let active: i64 = sqlx::query_scalar("SELECT count(*) FROM storage_deals WHERE state = 'Active'")
//!     .fetch_one(ledger.pool())
//!     .await?;
//! ledger.shutdown().await?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use futures::Stream;
use libp2p::Multiaddr;
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::adapters::chain::{Chain, ChainError, Devnet, DevnetConfig, DevnetSealer};
use crate::adapters::network::codec::MarketCodec;
use crate::adapters::network::message::{RetrievalAsk, StorageAsk};
use crate::adapters::network::provider::ProviderService;
use crate::adapters::network::{self, Client, NetworkError};
use crate::adapters::piece::store::PieceStore;
use crate::adapters::transfer::{ProviderTransfers, TransferOptions};
use crate::db::{Database, DbError};
use crate::deals::{Deals, DealsError, RetrievalStatus, StorageDealRef, StorageDealStatus};
use crate::domain::retrieval::RetrievalRequest;
use crate::domain::storage::ClientDealProposal;
use crate::domain::{PaddedPieceSize, PartyKey, TokenAmount};
use crate::events::{Journal, JournalError};
use crate::fsm::DecideContext;
use crate::projections::ProjectionError;
use crate::projections::projector::TransitionsProjector;
use crate::projections::updates::{DealUpdate, UpdateFilter, subscribe_deal_updates};
use crate::runner::{EffectRunner, RunnerConfig, RunnerError, RunnerNetwork};

/// Why the ledger could not be opened or a verb failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The database.
    #[error(transparent)]
    Database(#[from] DbError),
    /// The journal (migrations, appends).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// A command.
    #[error(transparent)]
    Deals(#[from] DealsError),
    /// The chain.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The network.
    #[error(transparent)]
    Network(#[from] NetworkError),
    /// A projection or update stream.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// A background task failed.
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// A query of the embedder's own.
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    /// The node key could not be read or written.
    #[error("node key: {0}")]
    Key(String),
}

/// Where the ledger's database is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseChoice {
    /// An existing PostgreSQL server.
    Url(String),
    /// The embedded cluster under this home directory (started from the system's server
    /// binaries; stopped on shutdown when nothing else uses it).
    Embedded(PathBuf),
}

/// A provider's asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderTerms {
    /// Storage: attoFIL per GiB of padded piece per epoch.
    pub price_per_gib_epoch: TokenAmount,
    /// Smallest and largest padded pieces taken.
    pub piece_sizes: (PaddedPieceSize, PaddedPieceSize),
    /// Retrieval: attoFIL per byte, and the most bytes between two payments.
    pub retrieval_price_per_byte: TokenAmount,
    /// Retrieval: the most bytes sent between two payments.
    pub max_payment_interval: u64,
}

impl Default for ProviderTerms {
    fn default() -> Self {
        Self {
            price_per_gib_epoch: TokenAmount(1_000_000),
            piece_sizes: (PaddedPieceSize(128), PaddedPieceSize(32 << 30)),
            retrieval_price_per_byte: TokenAmount(1),
            max_payment_interval: 1 << 20,
        }
    }
}

/// Builds a [`Ledger`].
#[derive(Debug, Clone)]
pub struct LedgerBuilder {
    database: DatabaseChoice,
    devnet: Option<String>,
    listen: Option<Multiaddr>,
    provider: Option<ProviderTerms>,
    key: Option<SigningKey>,
    runner: RunnerConfig,
}

impl LedgerBuilder {
    /// The database (default: the embedded cluster under `./.dealledger`).
    pub fn database(mut self, database: DatabaseChoice) -> Self {
        self.database = database;
        self
    }

    /// A devnet in another database, shared with other nodes (default: in the ledger's own).
    pub fn shared_devnet(mut self, url: impl Into<String>) -> Self {
        self.devnet = Some(url.into());
        self
    }

    /// Joins the libp2p network, listening on `address`.
    pub fn network(mut self, address: Multiaddr) -> Self {
        self.listen = Some(address);
        self
    }

    /// Serves the market protocols as a provider with these asks (needs the network).
    pub fn provider(mut self, terms: ProviderTerms) -> Self {
        self.provider = Some(terms);
        self
    }

    /// The node's key (default: `identity.key` in the home directory, created on first use).
    pub fn key(mut self, key: SigningKey) -> Self {
        self.key = Some(key);
        self
    }

    /// How the effect runner claims, retries and waits.
    pub fn runner(mut self, config: RunnerConfig) -> Self {
        self.runner = config;
        self
    }

    /// Opens the database (applying migrations), the chain and the network, and starts the
    /// background work.
    pub async fn build(self) -> Result<Ledger, LedgerError> {
        let db = match &self.database {
            DatabaseChoice::Url(url) => {
                Database::open(Some(url), std::path::Path::new(".")).await?
            }
            DatabaseChoice::Embedded(home) => Database::open(None, home).await?,
        };
        let journal = Journal::open(db.pool.clone()).await?;
        let deals = Deals::new(journal.clone());
        let key = match self.key {
            Some(key) => key,
            None => crate::audit::identity::load_or_create(db.home())
                .map_err(|e| LedgerError::Key(e.to_string()))?,
        };
        let devnet = match &self.devnet {
            None => Devnet::open(db.pool.clone(), DevnetConfig::default()).await?,
            Some(url) => {
                let pool = crate::db::pool_options().max_connections(4).connect(url).await?;
                Devnet::open(pool, DevnetConfig::default()).await?
            }
        };
        let pieces = PieceStore::new(db.home().join("pieces"));
        let ctx = DecideContext { epoch: devnet.head().await?, ..DecideContext::default() };
        let mut tasks = Vec::new();
        let mut network_client = None;
        let mut address = None;
        if let Some(listen) = self.listen {
            let (client, events, event_loop) =
                network::new(&key, MarketCodec::default(), Duration::from_secs(60))?;
            tasks.push(tokio::spawn(event_loop.run()));
            address = Some(client.listen(listen).await?);
            network::addresses::restore(&client, journal.pool()).await?;
            if let Some(terms) = &self.provider {
                let ask = StorageAsk {
                    price_per_gib_epoch: terms.price_per_gib_epoch,
                    min_piece_size: terms.piece_sizes.0,
                    max_piece_size: terms.piece_sizes.1,
                };
                let transfers = ProviderTransfers::new(
                    deals.clone(),
                    pieces.clone(),
                    TransferOptions::default(),
                );
                let service = ProviderService::new(deals.clone(), key.clone(), ask, transfers)
                    .with_retrieval_ask(RetrievalAsk {
                        price_per_byte: terms.retrieval_price_per_byte,
                        unseal_price: TokenAmount::ZERO,
                        max_payment_interval: terms.max_payment_interval,
                    })
                    .with_payment_channels(Arc::new(devnet.clone()));
                tasks.push(tokio::spawn(service.serve(client.clone(), events, ctx.clone())));
            }
            network_client = Some(client);
        }
        let mut runner = EffectRunner::new(
            deals.clone(),
            devnet.clone(),
            DevnetSealer::new(devnet.clone(), 2, 3),
            self.runner,
        );
        if let Some(client) = &network_client {
            runner = runner.with_network(RunnerNetwork {
                client: client.clone(),
                key: key.clone(),
                pieces: Some(pieces.clone()),
                retrieved: Some(db.home().join("retrieved")),
            });
        }
        let (stop_runner, runner_stopped) = oneshot::channel::<()>();
        let runner = tokio::spawn(runner.run(async {
            let _ = runner_stopped.await;
        }));
        let (stop_projector, projector_stopped) = oneshot::channel::<()>();
        let projector = tokio::spawn(TransitionsProjector::new(journal.clone()).run(async {
            let _ = projector_stopped.await;
        }));
        Ok(Ledger {
            db,
            deals,
            devnet,
            key,
            pieces,
            network: network_client,
            address,
            tasks,
            runner: (stop_runner, runner),
            projector: (stop_projector, projector),
        })
    }
}

type Stoppable<E> = (oneshot::Sender<()>, JoinHandle<Result<(), E>>);

/// An open ledger with its background work running. Call [`Ledger::shutdown`] to stop it.
pub struct Ledger {
    db: Database,
    deals: Deals,
    devnet: Devnet,
    key: SigningKey,
    pieces: PieceStore,
    network: Option<Client>,
    address: Option<Multiaddr>,
    tasks: Vec<JoinHandle<()>>,
    runner: Stoppable<RunnerError>,
    projector: Stoppable<ProjectionError>,
}

impl Ledger {
    /// A builder with the defaults: embedded database under `./.dealledger`, devnet in it, no
    /// network.
    pub fn builder() -> LedgerBuilder {
        LedgerBuilder {
            database: DatabaseChoice::Embedded(PathBuf::from("./.dealledger")),
            devnet: None,
            listen: None,
            provider: None,
            key: None,
            runner: RunnerConfig::default(),
        }
    }

    /// A URL to the ledger's database (what `psql` or another node's `shared_devnet` takes).
    pub fn database_url(&self) -> &str {
        &self.db.display_url
    }

    /// The database, for the embedder's own SQL on the status tables and views.
    pub fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    /// The `Deals` service, for adapters and lower-level commands.
    pub fn deals(&self) -> &Deals {
        &self.deals
    }

    /// The devnet this ledger's deals go on (advance its clock, fund parties, inject faults).
    pub fn devnet(&self) -> &Devnet {
        &self.devnet
    }

    /// This node as a market party (its libp2p identity).
    pub fn party(&self) -> PartyKey {
        PartyKey::of(&self.key)
    }

    /// Where the node listens, when it joined the network.
    pub fn address(&self) -> Option<&Multiaddr> {
        self.address.as_ref()
    }

    /// The node's network client, when it joined the network (to add peers' addresses).
    pub fn network(&self) -> Option<&Client> {
        self.network.as_ref()
    }

    async fn context(&self) -> Result<DecideContext, LedgerError> {
        Ok(DecideContext { epoch: self.devnet.head().await?, ..DecideContext::default() })
    }

    /// Storage flow step 1 (client): stages `data`, signs a proposal of it with the node key
    /// on `terms` (piece CID and size are filled in) and records it; the runner deposits,
    /// proposes and pushes.
    pub async fn initiate_deal(
        &self,
        data: impl tokio::io::AsyncRead + Unpin,
        mut terms: crate::domain::storage::StorageDealProposal,
    ) -> Result<StorageDealRef, LedgerError> {
        let (piece, size, _) =
            self.pieces.stage(data).await.map_err(|e| LedgerError::Key(e.to_string()))?;
        terms.piece_cid = piece;
        terms.piece_size = size;
        terms.client = self.party();
        let signed = ClientDealProposal::sign(terms, &self.key);
        Ok(self.deals.initiate_deal(signed, &self.context().await?).await?)
    }

    /// The status of a storage deal (either side).
    pub async fn get_storage_deal_status(
        &self,
        stream_id: Uuid,
    ) -> Result<StorageDealStatus, LedgerError> {
        Ok(self.deals.get_storage_deal_status(stream_id).await?)
    }

    /// Retrieval flow step 1: a request for a whole piece, fetched part by part.
    pub async fn initiate_retrieval(
        &self,
        request: RetrievalRequest,
        max_attempts: u32,
    ) -> Result<Uuid, LedgerError> {
        Ok(self.deals.initiate_retrieval(request, max_attempts, &self.context().await?).await?)
    }

    /// An operator cancels a deal or a retrieval request (who and why are recorded); the
    /// runner closes its transfer, gives its funds back and tells the counterparty. Returns
    /// the new state; a state that cannot be cancelled is a rejection.
    pub async fn cancel(
        &self,
        stream_id: Uuid,
        operator: &str,
        reason: &str,
    ) -> Result<&'static str, LedgerError> {
        Ok(self.deals.cancel(stream_id, operator, reason, &self.context().await?).await?)
    }

    /// An operator fails a deal by hand: through `Failing`, never straight to the error state.
    pub async fn fail(
        &self,
        stream_id: Uuid,
        operator: &str,
        reason: &str,
    ) -> Result<&'static str, LedgerError> {
        Ok(self.deals.fail(stream_id, operator, reason, &self.context().await?).await?)
    }

    /// An operator retries a deal paused in a recoverable failure: the state before the
    /// failure is re-entered and its effect runs again, idempotently.
    pub async fn retry(
        &self,
        stream_id: Uuid,
        operator: &str,
        reason: &str,
    ) -> Result<&'static str, LedgerError> {
        Ok(self.deals.retry(stream_id, operator, reason, &self.context().await?).await?)
    }

    /// The status of a retrieval request.
    pub async fn get_retrieval_status(
        &self,
        request_id: Uuid,
    ) -> Result<RetrievalStatus, LedgerError> {
        Ok(self.deals.get_retrieval_status(request_id).await?)
    }

    /// The seed's `RegisterListener`: every deal update from now on that `filter` wants, from
    /// any process writing to this database. The stream holds a database connection until it
    /// is dropped.
    pub async fn register_listener(
        &self,
        filter: UpdateFilter,
    ) -> Result<impl Stream<Item = Result<DealUpdate, ProjectionError>> + Send + use<>, LedgerError>
    {
        let journal = self.deals.journal();
        let after = journal.latest_checkpoint().await?;
        Ok(subscribe_deal_updates(journal, after, filter).await?)
    }

    /// Stops the background work (each finishes its round), then the database (the
    /// embedded cluster stops if nothing else uses it). Drop listener streams first: each
    /// holds a connection the database waits for.
    pub async fn shutdown(self) -> Result<(), LedgerError> {
        for task in &self.tasks {
            task.abort();
        }
        let _ = self.runner.0.send(());
        let _ = self.projector.0.send(());
        if let Ok(result) = self.runner.1.await {
            result?;
        }
        if let Ok(result) = self.projector.1.await {
            result?;
        }
        self.db.close().await?;
        Ok(())
    }
}
