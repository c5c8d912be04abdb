//! `/dealledger/transfer/1`: a transfer keeps one libp2p stream open for its whole life and
//! sends length-prefixed postcard frames on it — [`MarketRequest`]s from the side that opened
//! it, one [`MarketResponse`] per request from the provider, in order. Unlike one
//! request-response substream per chunk, nothing is negotiated per chunk, and a push can keep
//! several chunks in flight (each still acknowledged) so the pipe never drains.
//!
//! The frame format and its limits are the market codec's (`network::codec`): an oversized
//! length prefix is refused before anything is allocated, and bytes that do not decode are a
//! typed error.

use std::time::Duration;

use futures::AsyncWriteExt;
use libp2p::PeerId;

use crate::adapters::network::codec::{encode, read_framed, write_encoded};
use crate::adapters::network::message::{MarketRequest, MarketResponse};
use crate::adapters::network::{Client, NetworkError};

/// The opening side of a transfer stream: sends requests, reads the provider's answers in
/// the order the requests went out.
pub struct TransferChannel {
    stream: libp2p::Stream,
    peer: PeerId,
    timeout: Duration,
    max: u32,
}

impl std::fmt::Debug for TransferChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferChannel").field("peer", &self.peer).finish()
    }
}

impl TransferChannel {
    /// Opens a transfer stream to `peer` (dialing it if needed), with the node's request
    /// timeout per frame and its message size limit.
    pub async fn open(client: &Client, peer: PeerId) -> Result<Self, NetworkError> {
        let stream = client.open_transfer_stream(peer).await?;
        let (timeout, max) = (client.request_timeout(), client.max_message_bytes());
        Ok(Self { stream, peer, timeout, max })
    }

    fn failed(&self, reason: impl std::fmt::Display) -> NetworkError {
        NetworkError::Request { peer: self.peer.to_string(), reason: reason.to_string() }
    }

    /// Sends one request without waiting for its answer (read it later with
    /// [`TransferChannel::recv`]; answers come in request order).
    pub async fn send(&mut self, request: &MarketRequest) -> Result<(), NetworkError> {
        let frame = encode(request, self.max).map_err(|e| self.failed(e))?;
        self.send_frame(&frame).await
    }

    /// Sends one request already framed (a length prefix, then the request encoded, as
    /// `codec::encode` or `codec::chunk_frame_head` make it), without waiting for its answer.
    pub(crate) async fn send_frame(&mut self, frame: &[u8]) -> Result<(), NetworkError> {
        let write = write_encoded(&mut self.stream, frame);
        match tokio::time::timeout(self.timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => Err(self.failed("timed out sending on the transfer stream")),
        }
    }

    /// Reads the answer to the oldest request not yet answered.
    pub async fn recv(&mut self) -> Result<MarketResponse, NetworkError> {
        let read = read_framed::<MarketResponse, _>(&mut self.stream, self.max);
        match tokio::time::timeout(self.timeout, read).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(self.failed(e)),
            Err(_) => Err(self.failed("timed out waiting on the transfer stream")),
        }
    }

    /// Sends a request and waits for its answer.
    pub async fn request(
        &mut self,
        request: &MarketRequest,
    ) -> Result<MarketResponse, NetworkError> {
        self.send(request).await?;
        self.recv().await
    }

    /// Closes the stream; the provider sees a clean end.
    pub async fn close(mut self) {
        let _ = self.stream.close().await;
    }
}
