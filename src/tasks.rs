//! Helper tasks that end with whatever started them.

/// Aborts its task when dropped, so that a helper task (serving transfers, following the
/// chain head) never outlives the future that spawned it.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
