//! The node's HTTP JSON API (axum): what a backend needs from a running node — deals and their
//! status rows, audits, a server-sent-events stream of deal updates, starting storage deals,
//! health, readiness and Prometheus metrics. Reads come straight from the SQL projections, so
//! the API shows exactly what `psql` shows; writes go through the `Deals` service like any
//! other command. The document of every route is `docs/openapi.json`, served at
//! `/openapi.json`.

mod deals;
mod error;
mod metrics;
mod openapi;
mod stream;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;

use crate::events::Journal;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use ed25519_dalek::SigningKey;

pub use error::ApiError;
pub use openapi::{OPENAPI, ROUTES};

use crate::adapters::chain::Chain;
use crate::adapters::network::Client;
use crate::adapters::piece::store::PieceStore;
use crate::deals::Deals;
use crate::domain::ChainEpoch;

/// Who may call what.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// The bearer token writes need (and reads, unless `open_reads`). Without one, writes
    /// are disabled.
    pub token: Option<String>,
    /// Reads need no token.
    pub open_reads: bool,
}

/// What a node needs to start storage deals as a client.
#[derive(Clone)]
pub struct ClientRole {
    /// The node's libp2p client (to reach providers).
    pub network: Client,
    /// The node's key: it signs proposals.
    pub key: SigningKey,
    /// Where data to store is staged before it is pushed.
    pub pieces: PieceStore,
    /// Where retrieved data is written (`<request id>.bin`), by the node's effect runner.
    pub retrieved: std::path::PathBuf,
}

/// A boxed future of the chain head, for a chain behind `dyn`.
pub type HeadFuture<'a> = Pin<Box<dyn Future<Output = Result<ChainEpoch, String>> + Send + 'a>>;

/// The chain head, for `/metrics` and for deciding proposals' epochs.
pub trait HeadSource: Send + Sync {
    /// The current epoch.
    fn current_head(&self) -> HeadFuture<'_>;
}

impl<C: Chain> HeadSource for C {
    fn current_head(&self) -> HeadFuture<'_> {
        Box::pin(async move { self.head().await.map_err(|e| e.to_string()) })
    }
}

/// The API's shared state.
#[derive(Clone)]
pub struct ApiState {
    deals: Deals,
    reads: Journal,
    access: Arc<Access>,
    client: Option<ClientRole>,
    chain: Option<Arc<dyn HeadSource>>,
}

impl ApiState {
    /// An API over `deals` with `access` rules; read-only until a client role is given.
    pub fn new(deals: Deals, access: Access) -> Self {
        let reads = deals.journal().clone();
        Self { deals, reads, access: Arc::new(access), client: None, chain: None }
    }

    /// Serves status rows, lists and audits from `reads` — a streaming replica of the
    /// database `deals` writes to — so that reads scale apart from writes. Writes (commands)
    /// and the live event stream stay on the primary.
    pub fn with_reads(mut self, reads: Journal) -> Self {
        self.reads = reads;
        self
    }

    /// Lets the API start storage deals as this node's client.
    pub fn with_client(mut self, client: ClientRole) -> Self {
        self.client = Some(client);
        self
    }

    /// The chain the node follows (head epoch in metrics and for new proposals).
    pub fn with_chain(mut self, chain: Arc<dyn HeadSource>) -> Self {
        self.chain = Some(chain);
        self
    }

    async fn head(&self) -> Option<ChainEpoch> {
        match &self.chain {
            Some(chain) => chain.current_head().await.ok(),
            None => None,
        }
    }
}

/// Bearer-token check: writes always need the token; reads unless they are open.
async fn authorize(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let write = request.method() != Method::GET && request.method() != Method::HEAD;
    let path = request.uri().path();
    let public = matches!(path, "/health" | "/ready" | "/openapi.json" | "/metrics");
    if public || (!write && state.access.open_reads) {
        return Ok(next.run(request).await);
    }
    let Some(token) = &state.access.token else {
        return if write {
            Err(ApiError::Forbidden("writes are disabled: the node has no API token".into()))
        } else {
            Ok(next.run(request).await)
        };
    };
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
        Ok(next.run(request).await)
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Compares secrets without leaking where they differ through timing.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/health", get(deals::health))
        .route("/ready", get(deals::ready))
        .route("/metrics", get(metrics::metrics))
        .route("/openapi.json", get(openapi::document))
        .route("/v1/deals", get(deals::list))
        .route("/v1/deals/{id}", get(deals::show))
        .route("/v1/deals/{id}/audit", get(deals::audit))
        .route("/v1/deals/{id}/cancel", post(deals::cancel))
        .route("/v1/deals/{id}/fail", post(deals::fail))
        .route("/v1/deals/{id}/retry", post(deals::retry))
        .route("/v1/events", get(stream::events))
        .route("/v1/storage-deals", post(deals::start_storage_deal))
        .route("/v1/retrievals", post(deals::start_retrieval))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// Serves `router` on `listener` until `stop` resolves; requests in flight finish first.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(stop).await
}
