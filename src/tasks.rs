//! Helper tasks that end with whatever started them.

/// Aborts its task when dropped, so that a helper task (serving transfers, following the
/// chain head) never outlives the future that spawned it.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `main` with `helper` polled beside it on the same task, and returns what `main`
/// returns. The helper (a reader filling a queue ahead of `main`, say) may finish first —
/// `main` goes on alone — and is dropped, wherever it is, when `main` finishes. Unlike a
/// spawned task, the helper may borrow from the caller.
pub(crate) async fn beside<T>(
    helper: impl std::future::Future<Output = ()>,
    main: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(helper, main);
    let mut helping = true;
    loop {
        tokio::select! {
            done = &mut main => return done,
            () = &mut helper, if helping => helping = false,
        }
    }
}

/// Hands one read to the consumer behind `queue`; whether the reader should go on: only if
/// the read succeeded (a failed one is the last, for the consumer to report) and the consumer
/// is still there.
pub(crate) async fn pass_on<T, E>(
    queue: &tokio::sync::mpsc::Sender<Result<T, E>>,
    read: Result<T, E>,
) -> bool {
    let succeeded = read.is_ok();
    queue.send(read).await.is_ok() && succeeded
}
