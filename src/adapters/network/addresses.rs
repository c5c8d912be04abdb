//! The node's address book (`peer_addresses`): where each counterparty was last reached.
//! A deal names its counterparty by key only, so without it a node that restarts could not
//! dial the providers of the deals it resumes.

use libp2p::{Multiaddr, PeerId};
use sqlx::PgPool;

use super::{Client, NetworkError};

/// Tells the swarm where `peer` is and remembers it for the next start.
pub async fn learn(
    client: &Client,
    pool: &PgPool,
    peer: PeerId,
    address: Multiaddr,
) -> Result<(), NetworkError> {
    client.add_address(peer, address.clone()).await?;
    sqlx::query(
        "INSERT INTO peer_addresses (peer, address) VALUES ($1, $2) \
         ON CONFLICT (peer) DO UPDATE SET address = EXCLUDED.address, updated_at = now()",
    )
    .bind(peer.to_base58())
    .bind(address.to_string())
    .execute(pool)
    .await
    .map_err(|e| NetworkError::Setup(format!("remembering {peer}'s address: {e}")))?;
    Ok(())
}

/// Gives the swarm every address remembered; returns how many. Unreadable rows are skipped
/// with a warning (the node still starts).
pub async fn restore(client: &Client, pool: &PgPool) -> Result<usize, NetworkError> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT peer, address FROM peer_addresses")
        .fetch_all(pool)
        .await
        .map_err(|e| NetworkError::Setup(format!("reading the address book: {e}")))?;
    let mut restored = 0;
    for (peer, address) in rows {
        match (peer.parse::<PeerId>(), address.parse::<Multiaddr>()) {
            (Ok(peer), Ok(address)) => {
                client.add_address(peer, address).await?;
                restored += 1;
            }
            _ => tracing::warn!(%peer, %address, "unreadable address book entry"),
        }
    }
    Ok(restored)
}
