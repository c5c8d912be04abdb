//! Which connections coming back to the pool must be checked, and which are known clean.
//!
//! A use of a pooled connection that is cancelled halfway can leave it in a state the next
//! borrower must never see. sqlx 0.9.0 hands such connections back as they are: a `begin`
//! cancelled while its `BEGIN` is on the wire leaves a server-side transaction open
//! (transact-rs/sqlx#4385, #4393; the fix, #4394, is not released yet), and a statement
//! cancelled at the wrong moment can leave the connection reading another statement's
//! replies ("expected ParseComplete, got BindComplete"). The next borrower's statements would
//! then run inside a stale transaction — stale reads, held locks, "committed" writes lost — or
//! read wrong replies. So the pool checks every released connection ([`super::pool_options`])
//! and closes one that is not idle and in step.
//!
//! That check is a statement, the largest single cost of a one-statement append. A use that
//! ran to its end (its last statement answered, its transaction committed) cannot have left
//! anything behind, so the hot paths that know this hand their connection back through
//! [`release_clean`], which skips the check. A cancelled use never reaches that call: its
//! connection is dropped, and checked.

use sqlx::Postgres;
use sqlx::pool::PoolConnection;

tokio::task_local! {
    /// Set while a connection released through [`release_clean`] goes back to the pool.
    static FINISHED_USE: ();
}

/// Whether the connection being released comes from [`release_clean`].
pub(crate) fn released_clean() -> bool {
    FINISHED_USE.try_with(|_| ()).is_ok()
}

/// Hands `conn` back to the pool without the release check.
///
/// Call it only when every use of `conn` ran to its end with success: no future using it was
/// dropped before finishing, and no transaction on it is open (committed or rolled back, and
/// answered). Anything else must drop the connection instead, which gets it checked.
pub fn release_clean(mut conn: PoolConnection<Postgres>) {
    // `return_to_pool` is what dropping the connection spawns; running it inside the scope
    // tells the pool's `after_release` hook that this release is a clean one.
    let back = conn.return_to_pool();
    tokio::spawn(FINISHED_USE.scope((), back));
}

/// How long after a pooled connection turned out broken every connection is pinged before it
/// is handed out.
pub const BROKEN_WINDOW: std::time::Duration = std::time::Duration::from_secs(2);

/// Milliseconds since [`epoch`] until which connections are pinged before use (0: none).
static PING_UNTIL_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// Notes that a released connection failed its check: the server restarted or the network
/// dropped, so its siblings in the pool are likely dead too.
pub(crate) fn note_broken_connection() {
    let until = now_ms() + BROKEN_WINDOW.as_millis() as u64;
    PING_UNTIL_MS.fetch_max(until, std::sync::atomic::Ordering::AcqRel);
}

/// Whether a connection must be pinged before it is handed out even if it was used a moment
/// ago: a sibling was found broken recently. Without this, every connection pooled before a
/// server restart would fail one caller's request before being replaced.
pub(crate) fn ping_before_use() -> bool {
    now_ms() < PING_UNTIL_MS.load(std::sync::atomic::Ordering::Acquire)
}
