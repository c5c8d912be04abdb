//! The effect runner: claims due effects from the outbox, performs them through the chain
//! adapter, the sealing pipeline and (for status queries) the network, and feeds each result
//! back to the deal's machine as a command — in the same transaction that marks the effect
//! done. It never decides: every next step is the machine's.
//!
//! Crash safety comes from three rules. An effect is claimed with a lease, so a runner that
//! dies holding it loses it when the lease runs out. Every chain write is keyed by the
//! effect's deterministic id ([`perform::message_key`]), so performing an effect again after
//! a crash sends nothing new. And an effect's result and its completion commit together
//! ([`Deals::handle_effect_result`]). Waiting effects (watches) stay in the outbox until what
//! they wait for is observed, so after a restart a node resumes exactly where it was.

mod perform;
mod timeouts;

use std::time::Duration;

use ed25519_dalek::SigningKey;

pub use perform::{CHAIN_EFFECTS, Feedback, INLINE_EFFECTS, Outcome, WATCH_EFFECTS, message_key};
pub use timeouts::{TimeoutPolicy, time_out_stuck_deals};

use crate::adapters::chain::{Chain, ChainError, SealingPipeline, head_changes};
use crate::adapters::network::Client;
use crate::deals::{Deals, DealsError};
use crate::domain::storage::DealPolicy;
use crate::events::JournalError;
use crate::events::outbox::{self, PendingEffect};
use crate::fsm::effects::Effect;
use crate::fsm::failure::{AttemptFailed, Stalled};
use crate::fsm::retrieval_client::RetrievalClient;
use crate::fsm::retrieval_client::RetrievalClientEvent as RC;
use crate::fsm::retrieval_provider::RetrievalProvider;
use crate::fsm::retrieval_request::RetrievalRequestMachine;
use crate::fsm::storage_client::{StorageClient, StorageClientEvent as SC};
use crate::fsm::storage_provider::{StorageProvider, StorageProviderEvent as SP};
use crate::fsm::{DecideContext, Machine};

/// Why the runner could not perform an effect this time.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The chain refused or failed.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The ledger failed.
    #[error(transparent)]
    Deals(#[from] DealsError),
    /// The outbox could not be read or written.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The counterparty could not be reached.
    #[error("network: {0}")]
    Network(String),
    /// A stored effect does not decode.
    #[error("effect {id} does not decode: {reason}")]
    Undecodable { id: i64, reason: String },
    /// The deal lacks what its effect needs: a bug in a machine.
    #[error("inconsistent deal: {0}")]
    Inconsistent(String),
}

impl RunnerError {
    /// Whether the same attempt may succeed later (the chain or network was unreachable).
    pub fn is_transient(&self) -> bool {
        match self {
            RunnerError::Chain(e) => e.is_transient(),
            RunnerError::Network(_) | RunnerError::Journal(_) => true,
            RunnerError::Deals(DealsError::Journal(_)) => true,
            _ => false,
        }
    }
}

/// How the runner claims, waits and gives up.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// How long a claim holds before another runner may take the effect over.
    pub lease: Duration,
    /// Effects claimed per round.
    pub batch: i64,
    /// Deals whose effects of a round are performed side by side (each deal's own effects
    /// always run one after the other, in the order they were recorded).
    pub parallel: usize,
    /// Failed attempts before an effect's failure becomes a machine input.
    pub max_attempts: i32,
    /// Delay after the first failure; doubles with each attempt.
    pub backoff: Duration,
    /// How often a waiting effect looks again when no head change wakes it.
    pub watch_poll: Duration,
    /// How often the chain head is polled for changes.
    pub head_poll: Duration,
    /// Proposal limits the machines decide with.
    pub policy: DealPolicy,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            batch: 64,
            parallel: 16,
            max_attempts: 5,
            backoff: Duration::from_millis(200),
            watch_poll: Duration::from_secs(5),
            head_poll: Duration::from_millis(500),
            policy: DealPolicy::default(),
        }
    }
}

/// The network side of a runner: for effects that reach a counterparty — a storage client's
/// proposal, its push (and restarts), its status queries.
#[derive(Clone)]
pub struct RunnerNetwork {
    /// The node's libp2p client.
    pub client: Client,
    /// The node's signing key (signs status queries).
    pub key: SigningKey,
    /// Where a client's staged pieces are read from when pushed; without it, pushes are left
    /// to the caller.
    pub pieces: Option<crate::adapters::piece::store::PieceStore>,
    /// Where retrieved data is written (`<request id>.bin`, or `<deal id>.bin` for a deal
    /// outside a request); without it, retrievals are driven by the caller.
    pub retrieved: Option<std::path::PathBuf>,
}

/// Performs the outbox's chain effects for one node.
#[derive(Clone)]
pub struct EffectRunner<C, S> {
    deals: Deals,
    chain: C,
    sealer: S,
    network: Option<RunnerNetwork>,
    config: RunnerConfig,
}

/// Follows the chain head in a task of its own and signals each change on the returned
/// receiver; the task ends when the returned guard is dropped.
///
/// Why a task: the runner waits for a head change only between rounds. A head stream polled
/// there directly would keep its head query suspended mid-flight while rounds run (seconds
/// when busy), holding a pooled connection and reading the change late. Waiting on a watch
/// receiver is cancel-safe.
fn follow_heads<C: Chain + Clone>(
    chain: C,
    every: std::time::Duration,
) -> (tokio::sync::watch::Receiver<()>, crate::tasks::AbortOnDrop) {
    use futures::StreamExt;
    let (changed, receiver) = tokio::sync::watch::channel(());
    let task = tokio::spawn(async move {
        let mut heads = std::pin::pin!(head_changes(chain, every));
        while heads.next().await.is_some() {
            if changed.send(()).is_err() {
                return;
            }
        }
    });
    (receiver, crate::tasks::AbortOnDrop(task))
}

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// Effects claimed.
    pub claimed: usize,
    /// Effects whose result was fed to a machine.
    pub fed: usize,
    /// Effects put back to wait.
    pub waiting: usize,
    /// Attempts that failed.
    pub failed: usize,
}

impl<C: Chain + Clone, S: SealingPipeline + Clone> EffectRunner<C, S> {
    /// A runner feeding `deals` from `chain` and `sealer`.
    pub fn new(deals: Deals, chain: C, sealer: S, config: RunnerConfig) -> Self {
        Self { deals, chain, sealer, network: None, config }
    }

    /// Also performs status queries to counterparties over `network`.
    pub fn with_network(mut self, network: RunnerNetwork) -> Self {
        self.network = Some(network);
        self
    }

    fn effect_types(&self) -> Vec<&'static str> {
        // Sends are claimed even without a network: a provider's answers went out as
        // responses, and a send that needs the network waits for a runner that has one.
        let mut types = CHAIN_EFFECTS.to_vec();
        types.extend(INLINE_EFFECTS);
        types.push("send");
        if let Some(network) = &self.network {
            if network.pieces.is_some() || network.retrieved.is_some() {
                types.extend(["open-transfer", "restart-transfer"]);
            }
            if network.retrieved.is_some() {
                types.push("start-retrieval-deal");
            }
        }
        types
    }

    /// The context machines decide in: the chain's current epoch.
    async fn context(&self) -> Result<DecideContext, RunnerError> {
        Ok(DecideContext { epoch: self.chain.head().await?, policy: self.config.policy.clone() })
    }

    /// Recovery on start: every waiting effect becomes due now, so that deals resume where
    /// they were (effects claimed by a runner that crashed come back when their lease ends).
    pub async fn recover(&self) -> Result<u64, RunnerError> {
        let types = self.effect_types();
        Ok(outbox::wake(self.deals.journal().pool(), &types).await?)
    }

    /// Claims and performs one batch of due effects.
    pub async fn run_once(&self) -> Result<RoundReport, RunnerError> {
        let pool = self.deals.journal().pool();
        let types = self.effect_types();
        let claimed = outbox::claim(pool, &types, self.config.lease, self.config.batch).await?;
        let mut report = RoundReport { claimed: claimed.len(), ..RoundReport::default() };
        // One deal's effects run in the order they were recorded; different deals' effects
        // run side by side, so that one slow counterparty or push does not hold up the rest.
        let mut by_deal: Vec<Vec<&PendingEffect>> = Vec::new();
        let mut index_of = std::collections::HashMap::new();
        for pending in &claimed {
            let index = *index_of.entry(pending.stream_id).or_insert_with(|| {
                by_deal.push(Vec::new());
                by_deal.len() - 1
            });
            by_deal[index].push(pending);
        }
        use futures::StreamExt;
        let per_deal: Vec<_> =
            by_deal.into_iter().map(|effects| self.run_in_order(effects)).collect();
        let outcomes: Vec<Vec<_>> = futures::stream::iter(per_deal)
            .buffer_unordered(self.config.parallel.max(1))
            .collect()
            .await;
        for (pending, outcome) in outcomes.into_iter().flatten() {
            match outcome {
                Ok(Outcome::Feed(_)) => report.fed += 1,
                Ok(Outcome::Wait(_)) => report.waiting += 1,
                Ok(_) => {}
                Err(e) => {
                    report.failed += 1;
                    tracing::warn!(effect = pending.id, kind = %pending.effect_type,
                        attempt = pending.attempts, error = %e, "effect failed");
                }
            }
        }
        Ok(report)
    }

    /// Performs one deal's claimed effects one after the other.
    async fn run_in_order<'a>(
        &self,
        effects: Vec<&'a PendingEffect>,
    ) -> Vec<(&'a PendingEffect, Result<Outcome, RunnerError>)> {
        let mut outcomes = Vec::with_capacity(effects.len());
        for pending in effects {
            outcomes.push((pending, self.run_effect(pending).await));
        }
        outcomes
    }

    /// Runs rounds until the outbox has nothing due (for tests and the demo). Returns the
    /// total of the rounds.
    pub async fn run_until_idle(&self) -> Result<RoundReport, RunnerError> {
        let mut total = RoundReport::default();
        loop {
            let round = self.run_once().await?;
            total.claimed += round.claimed;
            total.fed += round.fed;
            total.waiting += round.waiting;
            total.failed += round.failed;
            if round.claimed == round.waiting + round.failed {
                return Ok(total);
            }
        }
    }

    /// Runs until `stop` resolves: rounds as long as there is work, and between them waits
    /// for a chain head change (which re-arms waiting effects), a new effect, or the poll.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) -> Result<(), RunnerError> {
        self.recover().await?;
        let (mut heads, _follower) = follow_heads(self.chain.clone(), self.config.head_poll);
        let pool = self.deals.journal().pool().clone();
        tokio::pin!(stop);
        loop {
            match self.run_once().await {
                Ok(round) if round.claimed > round.waiting + round.failed => continue,
                Ok(_) => {}
                // The database is away (restarting, network): keep the node up, try again.
                Err(e) => tracing::warn!(error = %e, "effect round failed"),
            }
            tokio::select! {
                _ = &mut stop => return Ok(()),
                head = heads.changed() => {
                    if head.is_ok()
                        && let Err(e) = outbox::wake(&pool, WATCH_EFFECTS).await
                    {
                        tracing::warn!(error = %e, "could not re-arm waiting effects");
                    }
                }
                _ = tokio::time::sleep(self.config.head_poll) => {}
            }
        }
    }

    /// Performs one claimed effect and settles it: result fed and effect completed together,
    /// a wait put back, a failure retried with backoff — and past the attempt limit, turned
    /// into the machine's failure input.
    async fn run_effect(&self, pending: &PendingEffect) -> Result<Outcome, RunnerError> {
        let pool = self.deals.journal().pool();
        let effect: Effect = match postcard::from_bytes(&pending.payload) {
            Ok(effect) => effect,
            Err(e) => {
                let error = RunnerError::Undecodable { id: pending.id, reason: e.to_string() };
                outbox::complete(pool, pending.id, Some(&error.to_string())).await?;
                return Err(error);
            }
        };
        let outcome = match self.perform(pending, &effect).await {
            Ok(outcome) => outcome,
            Err(e) => {
                self.failed(pending, &effect, &e).await?;
                return Err(e);
            }
        };
        match &outcome {
            Outcome::Feed(feedback) => {
                if let Err(e) = self.feed(pending, feedback.clone()).await {
                    // The deal moved on (the input is no longer expected): the result is
                    // stale, and the effect is done.
                    outbox::complete(pool, pending.id, Some(&e.to_string())).await?;
                }
            }
            Outcome::Done => outbox::complete(pool, pending.id, None).await?,
            Outcome::Skipped(note) => outbox::complete(pool, pending.id, Some(note)).await?,
            Outcome::Wait(delay) => outbox::release(pool, pending.id, *delay, None).await?,
        }
        Ok(outcome)
    }

    /// Feeds an effect's result to its deal and completes the effect in one transaction.
    async fn feed(&self, pending: &PendingEffect, feedback: Feedback) -> Result<(), DealsError> {
        let ctx = self.context().await.unwrap_or_default();
        let (id, stream) = (pending.id, pending.stream_id);
        let d = &self.deals;
        match feedback {
            Feedback::StorageClient(c) => {
                d.handle_effect_result::<StorageClient>(id, stream, c, &ctx, None).await?;
            }
            Feedback::StorageProvider(p) => {
                d.handle_effect_result::<StorageProvider>(id, stream, p, &ctx, None).await?;
            }
            Feedback::RetrievalClient(r) => {
                d.handle_effect_result::<RetrievalClient>(id, stream, r, &ctx, None).await?;
            }
            Feedback::RetrievalProvider(r) => {
                d.handle_effect_result::<RetrievalProvider>(id, stream, r, &ctx, None).await?;
            }
            Feedback::RetrievalRequest(request, r) => {
                d.handle_effect_result::<RetrievalRequestMachine>(id, request, r, &ctx, None)
                    .await?;
            }
        }
        Ok(())
    }

    /// A failed attempt. A recoverable error (the chain or the counterparty unreachable, a
    /// balance short) is retried with exponential backoff, each attempt recorded on the deal
    /// (`EffectRetrying`, with when the next comes) where its machine has a paused state for
    /// it; past the limit the deal pauses for an operator (`EffectStalled`) or, where it has
    /// no such state, fails. A fatal error becomes the machine's failure input at once.
    async fn failed(
        &self,
        pending: &PendingEffect,
        effect: &Effect,
        error: &RunnerError,
    ) -> Result<(), RunnerError> {
        let pool = self.deals.journal().pool();
        let reason = error.to_string();
        let attempt = u32::try_from(pending.attempts).unwrap_or(0);
        let kind = if !error.is_transient() {
            FailureKind::Fatal(reason.clone())
        } else if pending.attempts >= self.config.max_attempts {
            let effect = pending.effect_type.clone();
            FailureKind::Stalled(Stalled { effect, attempts: attempt, reason: reason.clone() })
        } else {
            let factor = 1u32 << (pending.attempts.clamp(1, 16) - 1) as u32;
            let delay = self.config.backoff.saturating_mul(factor);
            let now = chrono::Utc::now();
            let retry_at = chrono::Duration::from_std(delay)
                .ok()
                .and_then(|d| now.checked_add_signed(d))
                .unwrap_or(now);
            let failed = AttemptFailed {
                effect: pending.effect_type.clone(),
                attempt,
                reason: reason.clone(),
                retry_at_ms: retry_at.timestamp_millis(),
            };
            match failure_input(&pending.stream_type, effect, FailureKind::Retrying(failed)) {
                Some(feedback) => {
                    let recorded = self.feed_retry(pending, feedback, delay, &reason).await;
                    // A deal that moved on meanwhile takes no record; the effect still waits.
                    if recorded.is_err() {
                        outbox::release(pool, pending.id, delay, Some(&reason)).await?;
                    }
                }
                None => outbox::release(pool, pending.id, delay, Some(&reason)).await?,
            }
            return Ok(());
        };
        match failure_input(&pending.stream_type, effect, kind) {
            Some(feedback) => {
                if let Err(e) = self.feed(pending, feedback).await {
                    outbox::complete(pool, pending.id, Some(&format!("{reason}; {e}"))).await?;
                }
            }
            // Nothing in the machine to tell (a watch, a redemption after the deal ended):
            // the effect stays for an operator, with its error, after a long pause.
            None => {
                outbox::release(
                    pool,
                    pending.id,
                    self.config.backoff.saturating_mul(1 << 16),
                    Some(&reason),
                )
                .await?
            }
        }
        Ok(())
    }

    /// Records a failed attempt on its deal and gives the effect back, in one transaction.
    async fn feed_retry(
        &self,
        pending: &PendingEffect,
        feedback: Feedback,
        delay: Duration,
        error: &str,
    ) -> Result<(), DealsError> {
        let ctx = self.context().await.unwrap_or_default();
        let (id, stream, d) = (pending.id, pending.stream_id, &self.deals);
        match feedback {
            Feedback::StorageClient(c) => {
                d.handle_effect_retry::<StorageClient>(id, stream, c, &ctx, delay, error).await?;
            }
            Feedback::StorageProvider(p) => {
                d.handle_effect_retry::<StorageProvider>(id, stream, p, &ctx, delay, error).await?;
            }
            Feedback::RetrievalClient(r) => {
                d.handle_effect_retry::<RetrievalClient>(id, stream, r, &ctx, delay, error).await?;
            }
            Feedback::RetrievalProvider(_) | Feedback::RetrievalRequest(..) => {
                return Err(DealsError::WrongStreamType {
                    stream_id: stream,
                    expected: "a deal whose effects retry",
                    actual: pending.stream_type.clone(),
                });
            }
        }
        Ok(())
    }
}

/// How an effect failed, as the machines are told.
enum FailureKind {
    /// An attempt failed recoverably; another follows.
    Retrying(AttemptFailed),
    /// Recoverable, but the attempts ran out.
    Stalled(Stalled),
    /// Fatal, with the reason.
    Fatal(String),
}

/// The input a failure of `effect` becomes for a deal of `stream_type`, if its machine has one.
///
/// Where a machine has a paused state for the effect, attempts are recorded and a stall
/// pauses the deal for an operator. A retrieval's pull has none: a lost connection is
/// recorded attempt by attempt and then fails the deal with its reason, and the request it
/// belongs to fetches the part again with a new deal. Proposals and terms that cannot be
/// sent time the deal out.
fn failure_input(stream_type: &str, effect: &Effect, kind: FailureKind) -> Option<Feedback> {
    Some(match (stream_type, effect) {
        (StorageClient::NAME, Effect::ReserveFunds { .. }) => {
            Feedback::StorageClient(pausing(kind, |reason| SC::FundsReservationFailed { reason }))
        }
        (StorageClient::NAME, Effect::OpenTransfer { .. } | Effect::RestartTransfer { .. }) => {
            Feedback::StorageClient(pausing(kind, |reason| SC::DataTransferFailed { reason }))
        }
        (StorageProvider::NAME, Effect::ReserveFunds { .. }) => {
            Feedback::StorageProvider(pausing(kind, |reason| SP::FundsReservationFailed { reason }))
        }
        (StorageProvider::NAME, Effect::PublishDeal { .. } | Effect::WaitForMessage { .. }) => {
            Feedback::StorageProvider(pausing(kind, |reason| SP::PublishFailed { reason }))
        }
        (StorageProvider::NAME, Effect::HandOffToSealing { .. }) => {
            Feedback::StorageProvider(pausing(kind, |reason| SP::HandOffFailed { reason }))
        }
        (
            RetrievalClient::NAME,
            Effect::SetUpPaymentChannel { .. }
            | Effect::WaitForPaymentChannel { .. }
            | Effect::AllocateLane { .. },
        ) => Feedback::RetrievalClient(pausing(kind, |reason| RC::PaymentChannelFailed { reason })),
        (RetrievalClient::NAME, Effect::OpenTransfer { .. }) => {
            Feedback::RetrievalClient(match kind {
                FailureKind::Retrying(attempt) => RC::EffectRetrying(attempt),
                FailureKind::Stalled(s) => RC::DataTransferFailed {
                    reason: format!("{} after {} attempts: {}", s.effect, s.attempts, s.reason),
                },
                FailureKind::Fatal(reason) => RC::DataTransferFailed { reason },
            })
        }
        (RetrievalClient::NAME, Effect::Send { .. }) => Feedback::RetrievalClient(match kind {
            FailureKind::Retrying(_) => return None,
            FailureKind::Stalled(Stalled { reason, .. }) | FailureKind::Fatal(reason) => {
                RC::DealTimedOut { reason }
            }
        }),
        (StorageClient::NAME, Effect::Send { .. }) => Feedback::StorageClient(match kind {
            FailureKind::Retrying(_) => return None,
            FailureKind::Stalled(Stalled { reason, .. }) | FailureKind::Fatal(reason) => {
                SC::DealTimedOut { reason }
            }
        }),
        _ => return None,
    })
}

/// The event for `kind` on a machine that records attempts and pauses when they run out;
/// `fatal_event` is its failure input for the effect.
fn pausing<E: Retryable>(kind: FailureKind, fatal_event: impl FnOnce(String) -> E) -> E {
    match kind {
        FailureKind::Retrying(attempt) => E::retrying(attempt),
        FailureKind::Stalled(stalled) => E::stalled(stalled),
        FailureKind::Fatal(reason) => fatal_event(reason),
    }
}

/// Machines whose deals pause on a recoverable failure.
trait Retryable {
    fn retrying(attempt: AttemptFailed) -> Self;
    fn stalled(stalled: Stalled) -> Self;
}

macro_rules! retryable {
    ($($event:ty),*) => {$(
        impl Retryable for $event {
            fn retrying(attempt: AttemptFailed) -> Self {
                Self::EffectRetrying(attempt)
            }
            fn stalled(stalled: Stalled) -> Self {
                Self::EffectStalled(stalled)
            }
        }
    )*};
}

retryable!(SC, SP, RC);
