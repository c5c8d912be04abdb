//! The wire codec: a 4-byte big-endian length, then postcard. Lengths over the limit are
//! refused before anything is allocated; bytes that do not decode, or a message sent on the
//! wrong protocol, are typed errors — never a panic.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::{Serialize, de::DeserializeOwned};

use super::message::{MarketRequest, MarketResponse};

/// The default largest message, in bytes: a proposal is a few hundred bytes, a transfer
/// chunk at most [`crate::adapters::transfer::CHUNK_BYTES`] plus its envelope.
pub const DEFAULT_MAX_MESSAGE_BYTES: u32 = 1024 * 1024;

/// Why bytes on the wire were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The length prefix announces more than the limit.
    #[error("message of {length} bytes exceeds the {max}-byte limit")]
    TooLarge { length: u32, max: u32 },
    /// The bytes are not a postcard message of the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A request arrived on a protocol that does not carry it.
    #[error("{request} request on protocol {protocol}")]
    WrongProtocol { request: &'static str, protocol: String },
}

impl From<WireError> for io::Error {
    fn from(e: WireError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Encodes one message with its length prefix.
pub fn encode<T: Serialize>(message: &T, max: u32) -> Result<Vec<u8>, WireError> {
    // Serialised behind a placeholder prefix, so the body is never copied.
    let mut framed = postcard::to_extend(message, vec![0u8; 4])
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let length = u32::try_from(framed.len() - 4).unwrap_or(u32::MAX);
    if length > max {
        return Err(WireError::TooLarge { length, max });
    }
    framed[..4].copy_from_slice(&length.to_be_bytes());
    Ok(framed)
}

/// Room reserved for a transfer chunk's fields ahead of its data: the variant, a CID of up
/// to 64 digest bytes, the offset and the data's length, each with its own length prefix.
const CHUNK_HEAD_ROOM: usize = 4 + 128;

/// The frame of a [`MarketRequest::TransferChunk`] of `len` bytes, up to its data: the
/// length prefix, then the message's fields ending with the data's length. Appending exactly
/// `len` bytes makes the frame [`encode`] gives for the whole chunk, so a sender can read its
/// data straight into the frame instead of into a buffer of its own that is then copied.
/// The returned buffer has room for the data. Refused, like [`encode`], over `max`.
pub(crate) fn chunk_frame_head(
    proposal_cid: cid::Cid,
    offset: u64,
    len: usize,
    max: u32,
) -> Result<Vec<u8>, WireError> {
    let malformed = |e: postcard::Error| WireError::Malformed(e.to_string());
    let mut frame = Vec::with_capacity(CHUNK_HEAD_ROOM + len);
    frame.extend_from_slice(&[0u8; 4]);
    // The data is the chunk's last field: the chunk with no data ends in its empty length,
    // which the real length replaces (postcard writes both as the same varint).
    let empty = MarketRequest::TransferChunk { proposal_cid, offset, bytes: Vec::new() };
    let mut frame = postcard::to_extend(&empty, frame).map_err(malformed)?;
    if frame.pop() != Some(0) {
        return Err(WireError::Malformed("a chunk does not end in its data".into()));
    }
    let mut frame = postcard::to_extend(&len, frame).map_err(malformed)?;
    let length = u32::try_from(frame.len() - 4 + len).unwrap_or(u32::MAX);
    if length > max {
        return Err(WireError::TooLarge { length, max });
    }
    frame[..4].copy_from_slice(&length.to_be_bytes());
    Ok(frame)
}

/// Decodes one message body (without its prefix); trailing bytes are refused.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    let (message, rest) =
        postcard::take_from_bytes(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!("{} bytes after the message", rest.len())));
    }
    Ok(message)
}

/// Reads one length-prefixed message of at most `max` bytes: an oversized prefix is refused
/// before anything is allocated, and bytes that do not decode are `InvalidData`.
pub(crate) async fn read_framed<T: DeserializeOwned, R: AsyncRead + Unpin + Send>(
    io: &mut R,
    max: u32,
) -> io::Result<T> {
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let length = u32::from_be_bytes(prefix);
    if length > max {
        return Err(WireError::TooLarge { length, max }.into());
    }
    let mut body = vec![0u8; length as usize];
    io.read_exact(&mut body).await?;
    Ok(decode(&body)?)
}

/// Writes one frame (length prefix and postcard body) of at most `max` bytes and flushes it,
/// leaving the stream open for the next.
pub(crate) async fn write_frame<T: Serialize, W: AsyncWrite + Unpin + Send>(
    io: &mut W,
    message: &T,
    max: u32,
) -> io::Result<()> {
    write_encoded(io, &encode(message, max)?).await
}

/// Writes one frame already encoded ([`encode`], [`chunk_frame_head`] and its data) and
/// flushes it, leaving the stream open for the next.
pub(crate) async fn write_encoded<W: AsyncWrite + Unpin + Send>(
    io: &mut W,
    frame: &[u8],
) -> io::Result<()> {
    io.write_all(frame).await?;
    io.flush().await
}

/// `request`, if it belongs to `protocol`: a peer cannot slip, say, a proposal into a
/// transfer stream, where it would skip the proposal protocol's checks.
pub(crate) fn on_protocol(
    request: MarketRequest,
    protocol: &str,
) -> Result<MarketRequest, WireError> {
    if request.protocol() == protocol {
        Ok(request)
    } else {
        Err(WireError::WrongProtocol { request: request.protocol(), protocol: protocol.to_owned() })
    }
}

async fn write_framed<W: AsyncWrite + Unpin + Send>(io: &mut W, framed: Vec<u8>) -> io::Result<()> {
    io.write_all(&framed).await?;
    io.close().await
}

/// A request a peer sent that could not be read (malformed, oversized, on the wrong
/// protocol). libp2p's request-response does not report these, so the codec does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableRequest {
    /// The protocol it arrived on.
    pub protocol: String,
    /// Why it was refused.
    pub reason: String,
}

/// The request-response codec of the market protocols.
#[derive(Debug, Clone)]
pub struct MarketCodec {
    /// Largest message accepted or sent, in bytes.
    pub max_message_bytes: u32,
    unreadable: Option<tokio::sync::mpsc::UnboundedSender<UnreadableRequest>>,
}

impl Default for MarketCodec {
    fn default() -> Self {
        Self::with_max_message_bytes(DEFAULT_MAX_MESSAGE_BYTES)
    }
}

impl MarketCodec {
    /// A codec accepting and sending messages of at most `max` bytes.
    pub fn with_max_message_bytes(max: u32) -> Self {
        Self { max_message_bytes: max, unreadable: None }
    }

    /// The same codec, telling `sink` of every request it could not read.
    pub fn reporting_to(
        mut self,
        sink: tokio::sync::mpsc::UnboundedSender<UnreadableRequest>,
    ) -> Self {
        self.unreadable = Some(sink);
        self
    }
}

impl libp2p::request_response::Codec for MarketCodec {
    type Protocol = StreamProtocol;
    type Request = MarketRequest;
    type Response = MarketResponse;

    async fn read_request<T>(
        &mut self,
        protocol: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<MarketRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let read = read_framed::<MarketRequest, _>(io, self.max_message_bytes).await;
        let checked = read.and_then(|request| Ok(on_protocol(request, protocol.as_ref())?));
        if let (Err(e), Some(sink)) = (&checked, &self.unreadable) {
            let _ = sink
                .send(UnreadableRequest { protocol: protocol.to_string(), reason: e.to_string() });
        }
        checked
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<MarketResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_framed(io, self.max_message_bytes).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: MarketRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        // Encoded before the first await, so the future need not hold the message.
        let framed = encode(&request, self.max_message_bytes)?;
        write_framed(io, framed).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: MarketResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let framed = encode(&response, self.max_message_bytes)?;
        write_framed(io, framed).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsm::fixtures::signed_proposal;
    use proptest::prelude::*;

    #[test]
    fn a_proposal_round_trips_through_the_frame() {
        let request = MarketRequest::Propose(Box::new(signed_proposal()));
        let framed = encode(&request, DEFAULT_MAX_MESSAGE_BYTES).unwrap();
        assert_eq!(decode::<MarketRequest>(&framed[4..]).unwrap(), request);
    }

    #[test]
    fn refuses_a_chunk_frame_over_the_limit() {
        let proposal_cid = crate::events::chain::cid_of_bytes(b"proposal");
        let head = chunk_frame_head(proposal_cid, 0, 1000, 1000);
        assert!(matches!(head, Err(WireError::TooLarge { max: 1000, .. })), "{head:?}");
        let fits = chunk_frame_head(proposal_cid, 0, 900, 1000).unwrap();
        assert!(fits.capacity() >= fits.len() + 900, "room for the data");
    }

    #[test]
    fn refuses_a_message_over_the_limit_and_trailing_bytes() {
        let request = MarketRequest::Propose(Box::new(signed_proposal()));
        assert!(matches!(encode(&request, 16), Err(WireError::TooLarge { max: 16, .. })));
        let mut framed = encode(&request, DEFAULT_MAX_MESSAGE_BYTES).unwrap();
        framed.push(0);
        assert!(matches!(decode::<MarketRequest>(&framed[4..]), Err(WireError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<MarketRequest>(&bytes);
            let _ = decode::<MarketResponse>(&bytes);
        }

        #[test]
        fn a_chunk_frame_head_and_its_data_are_the_chunk_s_frame(
            digest in any::<[u8; 8]>(),
            offset in any::<u64>(),
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            // Given a chunk, when its head is built apart and its data appended, then the
            // frame is byte for byte the chunk's own.
            let proposal_cid = crate::events::chain::cid_of_bytes(&digest);
            let mut frame =
                chunk_frame_head(proposal_cid, offset, bytes.len(), DEFAULT_MAX_MESSAGE_BYTES)
                    .unwrap();
            frame.extend_from_slice(&bytes);
            let chunk = MarketRequest::TransferChunk { proposal_cid, offset, bytes };
            prop_assert_eq!(frame, encode(&chunk, DEFAULT_MAX_MESSAGE_BYTES).unwrap());
        }

        #[test]
        fn any_status_request_round_trips(digest in any::<[u8; 8]>()) {
            let cid = crate::events::chain::cid_of_bytes(&digest);
            let signed = super::super::message::SignedStatusQuery::sign(cid, &crate::fsm::fixtures::client_key());
            let request = MarketRequest::Status(Box::new(signed));
            let framed = encode(&request, DEFAULT_MAX_MESSAGE_BYTES).unwrap();
            prop_assert_eq!(decode::<MarketRequest>(&framed[4..]).unwrap(), request);
        }
    }
}
