//! The last recorded state of recently written deals, so that a command on a deal this process
//! just moved decides without replaying its stream.
//!
//! Why it is safe: a cached deal is only a guess of where the stream is. The append that
//! records the decision still checks the expected version and the head's CID in its own
//! statement; if another process (or a retention run) moved the stream, that append is a
//! conflict, the entry is dropped and the command is decided again on a fresh replay. So the
//! cache can be stale, never wrong in what it lets through.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::fsm::{Deal, Machine};

/// How many deals are remembered; past it the cache starts over (a replay costs one read).
const CAPACITY: usize = 8_192;

/// Deals by stream id, each as its machine's `Deal<M>`; shared by clones of one `Deals`.
#[derive(Debug, Clone, Default)]
pub(crate) struct DealCache {
    deals: Arc<Mutex<HashMap<Uuid, Box<dyn Any + Send>>>>,
}

impl DealCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Box<dyn Any + Send>>> {
        self.deals.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// The deal last recorded on `stream_id` by this process, if it was of machine `M`.
    pub(crate) fn get<M: Machine>(&self, stream_id: Uuid) -> Option<Deal<M>> {
        self.lock().get(&stream_id)?.downcast_ref::<Deal<M>>().cloned()
    }

    /// Remembers `deal` as its stream's latest state, just after it was committed.
    pub(crate) fn put<M: Machine>(&self, deal: Deal<M>) {
        let mut deals = self.lock();
        if deals.len() >= CAPACITY && !deals.contains_key(&deal.id) {
            deals.clear();
        }
        deals.insert(deal.id, Box::new(deal));
    }

    /// Forgets `stream_id`: its cached state lost a race or may be stale.
    pub(crate) fn forget(&self, stream_id: Uuid) {
        self.lock().remove(&stream_id);
    }
}
