//! The libp2p node: one swarm (TCP, noise, yamux, identify, ping, the market's
//! request-response protocols and the `/dealledger/transfer/1` stream protocol), owned by one
//! task, the [`EventLoop`]. Transfer streams are opened and accepted through the [`Client`]
//! without a round through the loop (`libp2p-stream`'s control). Others talk to it
//! through a [`Client`] whose commands carry a oneshot reply, and hear from it through a
//! bounded stream of [`NetworkEvent`]s — as in rust-libp2p's file-sharing example. This module
//! only moves messages; deciding what they mean is the machines' job.

pub mod addresses;
pub mod codec;
pub mod message;
pub mod provider;
pub mod refusals;

use std::collections::HashMap;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, identify, noise, ping, tcp, yamux};
use tokio::sync::{mpsc, oneshot};

use codec::{MarketCodec, UnreadableRequest};
use message::{
    ASK_PROTOCOL, CANCEL_PROTOCOL, MarketRequest, MarketResponse, PROPOSE_PROTOCOL,
    RETRIEVAL_PROPOSE_PROTOCOL, RETRIEVAL_QUERY_PROTOCOL, STATUS_PROTOCOL, TRANSFER_PROTOCOL,
};

/// Commands and events waiting at most, each way.
const CHANNEL_CAPACITY: usize = 64;

/// Why a network operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    /// The node could not be built (transport, key).
    #[error("cannot build the node: {0}")]
    Setup(String),
    /// Listening on the address failed.
    #[error("cannot listen on {address}: {reason}")]
    Listen { address: String, reason: String },
    /// The request could not be delivered or answered (unreachable peer, timeout, refused or
    /// malformed message on the other side).
    #[error("request to {peer} failed: {reason}")]
    Request { peer: String, reason: String },
    /// The node's event loop has stopped.
    #[error("the network event loop has stopped")]
    Stopped,
}

/// One request-response behaviour per protocol: a behaviour with several protocols would
/// negotiate the first one both sides support, not the one the request belongs to.
#[derive(NetworkBehaviour)]
struct MarketBehaviour {
    ask: request_response::Behaviour<MarketCodec>,
    propose: request_response::Behaviour<MarketCodec>,
    status: request_response::Behaviour<MarketCodec>,
    /// `/dealledger/transfer/1` is a stream protocol, not request-response: a push or a pull
    /// keeps one stream open and pipelines its frames (see `adapters::transfer::channel`).
    transfer: libp2p_stream::Behaviour,
    retrieval_query: request_response::Behaviour<MarketCodec>,
    retrieval_propose: request_response::Behaviour<MarketCodec>,
    cancel: request_response::Behaviour<MarketCodec>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

impl MarketBehaviour {
    fn for_protocol(&mut self, protocol: &str) -> &mut request_response::Behaviour<MarketCodec> {
        match protocol {
            ASK_PROTOCOL => &mut self.ask,
            PROPOSE_PROTOCOL => &mut self.propose,
            RETRIEVAL_QUERY_PROTOCOL => &mut self.retrieval_query,
            RETRIEVAL_PROPOSE_PROTOCOL => &mut self.retrieval_propose,
            CANCEL_PROTOCOL => &mut self.cancel,
            _ => &mut self.status,
        }
    }
}

/// What the network tells the rest of the node.
#[derive(Debug)]
pub enum NetworkEvent {
    /// A peer asks something; answer through [`Client::respond`] with the channel.
    InboundRequest {
        peer: PeerId,
        request: MarketRequest,
        channel: ResponseChannel<MarketResponse>,
    },
    /// A peer's request could not be read (malformed, oversized, wrong protocol): nothing was
    /// delivered.
    /// `peer` is unknown when the request could not even be read (libp2p does not say who
    /// sent it).
    InboundFailure { peer: Option<PeerId>, protocol: String, reason: String },
}

#[derive(Debug)]
enum Command {
    Listen {
        address: Multiaddr,
        reply: oneshot::Sender<Result<Multiaddr, NetworkError>>,
    },
    AddAddress {
        peer: PeerId,
        address: Multiaddr,
        done: oneshot::Sender<()>,
    },
    Request {
        peer: PeerId,
        request: MarketRequest,
        reply: oneshot::Sender<Result<MarketResponse, NetworkError>>,
    },
    Respond {
        protocol: &'static str,
        channel: ResponseChannel<MarketResponse>,
        response: MarketResponse,
    },
}

/// A handle on the node; cheap to clone.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    peer_id: PeerId,
    /// Opens and accepts `/dealledger/transfer/1` streams.
    streams: libp2p_stream::Control,
    /// How long a request (or one frame of a transfer) may wait for its answer.
    request_timeout: Duration,
    /// Largest message sent or accepted, in bytes (the codec's limit).
    max_message_bytes: u32,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("peer_id", &self.peer_id).finish()
    }
}

impl Client {
    /// This node's peer id (the identity of its signing key).
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn send(&self, command: Command) -> Result<(), NetworkError> {
        self.commands.send(command).await.map_err(|_| NetworkError::Stopped)
    }

    /// Listens on `address` (port 0 picks one) and returns the address really bound.
    pub async fn listen(&self, address: Multiaddr) -> Result<Multiaddr, NetworkError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Listen { address, reply }).await?;
        answer.await.map_err(|_| NetworkError::Stopped)?
    }

    /// Tells the node where a peer can be reached; returns once the node knows, so that a
    /// transfer stream opened next (which dials outside the command queue) finds it.
    pub async fn add_address(&self, peer: PeerId, address: Multiaddr) -> Result<(), NetworkError> {
        let (done, applied) = oneshot::channel();
        self.send(Command::AddAddress { peer, address, done }).await?;
        applied.await.map_err(|_| NetworkError::Stopped)
    }

    /// Sends a request and waits for the answer. A transfer request goes on a transfer
    /// stream of its own (a push or a pull that sends many keeps one open with
    /// `adapters::transfer::channel::TransferChannel` instead).
    pub async fn request(
        &self,
        peer: PeerId,
        request: MarketRequest,
    ) -> Result<MarketResponse, NetworkError> {
        if request.protocol() == TRANSFER_PROTOCOL {
            use crate::adapters::transfer::channel::TransferChannel;
            let mut channel = TransferChannel::open(self, peer).await?;
            let answer = channel.request(&request).await;
            channel.close().await;
            return answer;
        }
        let (reply, answer) = oneshot::channel();
        self.send(Command::Request { peer, request, reply }).await?;
        answer.await.map_err(|_| NetworkError::Stopped)?
    }

    /// Opens a `/dealledger/transfer/1` stream to `peer`, dialing it if needed.
    pub async fn open_transfer_stream(&self, peer: PeerId) -> Result<libp2p::Stream, NetworkError> {
        let mut streams = self.streams.clone();
        let open = streams.open_stream(peer, StreamProtocol::new(TRANSFER_PROTOCOL));
        match tokio::time::timeout(self.request_timeout, open).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => {
                Err(NetworkError::Request { peer: peer.to_string(), reason: e.to_string() })
            }
            Err(_) => Err(NetworkError::Request {
                peer: peer.to_string(),
                reason: "timed out opening the transfer stream".into(),
            }),
        }
    }

    /// The transfer streams peers open to this node. Only one taker: a second call is an
    /// error, since each stream must be served exactly once.
    pub fn accept_transfer_streams(&self) -> Result<libp2p_stream::IncomingStreams, NetworkError> {
        self.streams
            .clone()
            .accept(StreamProtocol::new(TRANSFER_PROTOCOL))
            .map_err(|e| NetworkError::Setup(e.to_string()))
    }

    /// How long one request, or one frame of a transfer, may wait for its answer.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Largest message this node sends or accepts, in bytes.
    pub fn max_message_bytes(&self) -> u32 {
        self.max_message_bytes
    }

    /// Answers an inbound `request` through its channel.
    pub async fn respond(
        &self,
        request: &MarketRequest,
        channel: ResponseChannel<MarketResponse>,
        response: MarketResponse,
    ) -> Result<(), NetworkError> {
        self.send(Command::Respond { protocol: request.protocol(), channel, response }).await
    }
}

/// The task that owns the swarm. Run it with `tokio::spawn(event_loop.run())`; it stops when
/// every [`Client`] is dropped.
pub struct EventLoop {
    swarm: Swarm<MarketBehaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetworkEvent>,
    pending_listen: Option<oneshot::Sender<Result<Multiaddr, NetworkError>>>,
    /// Keyed by protocol too: each behaviour numbers its requests on its own.
    pending_requests: HashMap<
        (&'static str, OutboundRequestId),
        oneshot::Sender<Result<MarketResponse, NetworkError>>,
    >,
    /// Requests the codec could not read.
    unreadable: mpsc::UnboundedReceiver<UnreadableRequest>,
}

/// Builds a node whose identity is `key` (the same key signs its deals).
pub fn new(
    key: &SigningKey,
    codec: MarketCodec,
    request_timeout: Duration,
) -> Result<(Client, mpsc::Receiver<NetworkEvent>, EventLoop), NetworkError> {
    let setup = |e: &dyn std::fmt::Display| NetworkError::Setup(e.to_string());
    let keypair =
        libp2p::identity::Keypair::ed25519_from_bytes(key.to_bytes()).map_err(|e| setup(&e))?;
    let (unreadable_tx, unreadable) = mpsc::unbounded_channel();
    let max_message_bytes = codec.max_message_bytes;
    let codec = codec.reporting_to(unreadable_tx);
    let behaviour = |protocol: &'static str| {
        request_response::Behaviour::with_codec(
            codec.clone(),
            [(StreamProtocol::new(protocol), ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(request_timeout),
        )
    };
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| setup(&e))?
        .with_behaviour(|key| MarketBehaviour {
            ask: behaviour(ASK_PROTOCOL),
            propose: behaviour(PROPOSE_PROTOCOL),
            status: behaviour(STATUS_PROTOCOL),
            transfer: libp2p_stream::Behaviour::new(),
            retrieval_query: behaviour(RETRIEVAL_QUERY_PROTOCOL),
            retrieval_propose: behaviour(RETRIEVAL_PROPOSE_PROTOCOL),
            cancel: behaviour(CANCEL_PROTOCOL),
            identify: identify::Behaviour::new(identify::Config::new(
                "/dealledger/1".into(),
                key.public(),
            )),
            ping: ping::Behaviour::default(),
        })
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let peer_id = *swarm.local_peer_id();
    let streams = swarm.behaviour().transfer.new_control();
    let (command_tx, command_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (event_tx, event_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let event_loop = EventLoop {
        swarm,
        commands: command_rx,
        events: event_tx,
        pending_listen: None,
        pending_requests: HashMap::new(),
        unreadable,
    };
    let client =
        Client { commands: command_tx, peer_id, streams, request_timeout, max_message_bytes };
    Ok((client, event_rx, event_loop))
}

impl EventLoop {
    /// Runs until every client is gone.
    pub async fn run(mut self) {
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event).await,
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => return,
                },
                Some(refused) = self.unreadable.recv() => {
                    let event = NetworkEvent::InboundFailure {
                        peer: None,
                        protocol: refused.protocol,
                        reason: refused.reason,
                    };
                    let _ = self.events.send(event).await;
                }
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Listen { address, reply } => match self.swarm.listen_on(address.clone()) {
                Ok(_) => self.pending_listen = Some(reply),
                Err(e) => {
                    let _ = reply.send(Err(NetworkError::Listen {
                        address: address.to_string(),
                        reason: e.to_string(),
                    }));
                }
            },
            Command::AddAddress { peer, address, done } => {
                self.swarm.add_peer_address(peer, address);
                let _ = done.send(());
            }
            Command::Request { peer, request, reply } => {
                let protocol = request.protocol();
                let id =
                    self.swarm.behaviour_mut().for_protocol(protocol).send_request(&peer, request);
                self.pending_requests.insert((protocol, id), reply);
            }
            Command::Respond { protocol, channel, response } => {
                // Fails only if the peer went away; it will ask again.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .for_protocol(protocol)
                    .send_response(channel, response);
            }
        }
    }

    async fn on_swarm_event(&mut self, event: SwarmEvent<MarketBehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                if let Some(reply) = self.pending_listen.take() {
                    let _ = reply.send(Ok(address));
                }
            }
            SwarmEvent::Behaviour(MarketBehaviourEvent::Ask(event)) => {
                self.on_market(ASK_PROTOCOL, event).await
            }
            SwarmEvent::Behaviour(MarketBehaviourEvent::Propose(event)) => {
                self.on_market(PROPOSE_PROTOCOL, event).await
            }
            SwarmEvent::Behaviour(MarketBehaviourEvent::Status(event)) => {
                self.on_market(STATUS_PROTOCOL, event).await
            }
            SwarmEvent::Behaviour(MarketBehaviourEvent::RetrievalQuery(event)) => {
                self.on_market(RETRIEVAL_QUERY_PROTOCOL, event).await
            }
            SwarmEvent::Behaviour(MarketBehaviourEvent::RetrievalPropose(event)) => {
                self.on_market(RETRIEVAL_PROPOSE_PROTOCOL, event).await
            }
            SwarmEvent::Behaviour(MarketBehaviourEvent::Cancel(event)) => {
                self.on_market(CANCEL_PROTOCOL, event).await
            }
            SwarmEvent::ListenerError { error, .. } => {
                if let Some(reply) = self.pending_listen.take() {
                    let _ = reply.send(Err(NetworkError::Listen {
                        address: String::new(),
                        reason: error.to_string(),
                    }));
                }
            }
            _ => {}
        }
    }

    async fn on_market(
        &mut self,
        protocol: &'static str,
        event: request_response::Event<MarketRequest, MarketResponse>,
    ) {
        use request_response::{Event, Message};
        match event {
            Event::Message { peer, message: Message::Request { request, channel, .. }, .. } => {
                let _ =
                    self.events.send(NetworkEvent::InboundRequest { peer, request, channel }).await;
            }
            Event::Message { message: Message::Response { request_id, response }, .. } => {
                if let Some(reply) = self.pending_requests.remove(&(protocol, request_id)) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure { peer, request_id, error, .. } => {
                if let Some(reply) = self.pending_requests.remove(&(protocol, request_id)) {
                    let _ = reply.send(Err(NetworkError::Request {
                        peer: peer.to_string(),
                        reason: error.to_string(),
                    }));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, protocol, "inbound request failed");
                let reason = error.to_string();
                let _ = self
                    .events
                    .send(NetworkEvent::InboundFailure {
                        peer: Some(peer),
                        protocol: protocol.to_owned(),
                        reason,
                    })
                    .await;
            }
            Event::ResponseSent { .. } => {}
        }
    }
}
