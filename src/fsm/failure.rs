//! Failure classes: whether a failure can pass (recoverable) or ends the deal (fatal).
//!
//! Earlier markets software could not tell the two apart, so a publish that ran out of funds
//! failed the deal just as a forged signature did. Here every failure input has a class, fixed
//! by its kind so that the declared tables can route on it:
//!
//! - `EffectRetrying` — one attempt of an effect failed for a reason that may pass (the chain
//!   was unreachable, the market balance was short); the runner tries again at `retry_at`.
//!   The deal stays in its state.
//! - `EffectStalled` — the attempts ran out; the deal waits in a `*Paused` state until an
//!   operator retries it (`RetryRequested` re-enters the state before the failure, whose
//!   effect runs again, idempotently), cancels it or fails it.
//! - every other failure input (`PublishFailed`, `DataVerificationFailed`, a timeout, an
//!   operator's fail, ...) is fatal and leads through `Failing` to the terminal error.
//!
//! [`FailureStatus`] is what the status tables show of it: the class of the deal's last
//! failure, its attempt count and, while the runner is retrying, when it tries next.

use serde::{Deserialize, Serialize};

/// Whether a failure can pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureClass {
    /// Retried automatically up to the runner's limit, then waits for an operator's retry.
    Recoverable,
    /// Ends the deal: through `Failing` (funds released, transfer closed) to the error state.
    Fatal,
}

impl FailureClass {
    /// The name stored in the status tables' `failure_class` column.
    pub fn name(self) -> &'static str {
        match self {
            FailureClass::Recoverable => "recoverable",
            FailureClass::Fatal => "fatal",
        }
    }
}

/// One failed attempt of an effect that the runner will try again. Journal payload of every
/// machine's `EffectRetrying` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptFailed {
    /// The effect's kebab-case name (`publish-deal`).
    pub effect: String,
    /// Which attempt failed, from 1.
    pub attempt: u32,
    /// What went wrong.
    pub reason: String,
    /// When the runner tries again, in milliseconds since the Unix epoch (decided by the
    /// runner; machines never read a clock).
    pub retry_at_ms: i64,
}

/// An effect that kept failing for a recoverable reason until the runner's attempts ran out.
/// Journal payload of every machine's `EffectStalled` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stalled {
    /// The effect's kebab-case name.
    pub effect: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// The last attempt's error.
    pub reason: String,
}

/// What one event says about failure, as each machine classifies its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureFact<'a> {
    /// Not a failure.
    None,
    /// An attempt failed; another follows.
    Retrying(&'a AttemptFailed),
    /// The attempts ran out; the deal waits for an operator.
    Stalled(&'a Stalled),
    /// A fatal failure.
    Fatal,
}

/// The failure columns of a deal's status row.
///
/// Invariant: `next_retry_at_ms` is set only while the last event is an `EffectRetrying`, so
/// a row never promises a retry that nothing will make.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FailureStatus {
    /// The class of the deal's last failure, if it ever failed.
    pub class: Option<FailureClass>,
    /// Attempts made in the deal's last recoverable failure.
    pub attempts: u32,
    /// When the runner tries the failing effect again (ms since the Unix epoch).
    pub next_retry_at_ms: Option<i64>,
}

impl FailureStatus {
    /// Folds one event's fact.
    pub fn fold(&mut self, fact: FailureFact<'_>) {
        self.next_retry_at_ms = None;
        match fact {
            FailureFact::None => {}
            FailureFact::Retrying(attempt) => {
                self.class = Some(FailureClass::Recoverable);
                self.attempts = attempt.attempt;
                self.next_retry_at_ms = Some(attempt.retry_at_ms);
            }
            FailureFact::Stalled(stalled) => {
                self.class = Some(FailureClass::Recoverable);
                self.attempts = stalled.attempts;
            }
            FailureFact::Fatal => self.class = Some(FailureClass::Fatal),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(n: u32) -> AttemptFailed {
        AttemptFailed {
            effect: "publish-deal".into(),
            attempt: n,
            reason: "x".into(),
            retry_at_ms: 7,
        }
    }

    #[test]
    fn a_retrying_attempt_shows_its_count_and_next_time_until_the_next_event() {
        let mut status = FailureStatus::default();
        status.fold(FailureFact::Retrying(&attempt(2)));
        assert_eq!(
            status,
            FailureStatus {
                class: Some(FailureClass::Recoverable),
                attempts: 2,
                next_retry_at_ms: Some(7)
            }
        );
        status.fold(FailureFact::None);
        assert_eq!(status.next_retry_at_ms, None);
        assert_eq!(status.attempts, 2);
    }

    #[test]
    fn a_fatal_failure_after_a_stall_is_shown_as_fatal() {
        let mut status = FailureStatus::default();
        let stalled = Stalled { effect: "publish-deal".into(), attempts: 5, reason: "x".into() };
        status.fold(FailureFact::Stalled(&stalled));
        assert_eq!((status.class, status.attempts), (Some(FailureClass::Recoverable), 5));
        status.fold(FailureFact::Fatal);
        assert_eq!(status.class, Some(FailureClass::Fatal));
    }
}
