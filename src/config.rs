//! Configuration of the [`Server`](crate::Server) and the [`Client`](crate::Client).
//!
//! Fields are private; every setter documents its default and what changing it
//! trades away. `Default` is built from the named constants below.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use rustls_pki_types::CertificateDer;

pub use crate::analytics::{AggregatorConfig, RedundancyPolicy};
pub use crate::fec::{DecoderConfig, FecConfig};

/// Default listen address of the server: loopback, port 4433.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4433";
/// Default bytes of datagrams quinn may queue per connection before dropping the oldest.
pub const DEFAULT_DATAGRAM_SEND_BUFFER: usize = 128 * 1024;
/// Default absolute lower bound of the congestion window: none. The server's
/// floor follows each stream's rate instead; see [`ServerConfig::min_window`].
pub const DEFAULT_MIN_WINDOW: u64 = 0;
/// Default size one event log file may reach before it is rotated: 64 MiB.
pub const DEFAULT_EVENT_LOG_MAX_BYTES: u64 = 64 << 20;
/// Default rotated event log files kept (`PATH.1` .. `PATH.3`).
pub const DEFAULT_EVENT_LOG_KEEP: usize = 3;
/// Default [`ServerConfig::server_id`].
pub const DEFAULT_SERVER_ID: &str = "server";
/// Default analytics queue, in events.
pub const DEFAULT_ANALYTICS_QUEUE: usize = 4096;
/// Default limit on admitted viewers (connections past Hello).
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default limit on connections still in the QUIC handshake.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;
/// Default number of handshakes in progress from which new, unvalidated
/// addresses are sent a Retry first.
pub const DEFAULT_RETRY_ABOVE: usize = 64;
/// Default limit on connections one IP address may have that are not yet
/// admitted viewers (in the handshake or waiting for Hello).
pub const DEFAULT_MAX_PER_SOURCE: usize = 32;
/// Default limit on connections past the handshake that have not sent Hello.
pub const DEFAULT_MAX_AWAITING_HELLO: usize = 256;
/// Default time a QUIC handshake may take.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Default time a viewer's control stream may take to accept one write.
pub const DEFAULT_CONTROL_DRAIN: Duration = Duration::from_secs(2);
/// Default limit on published streams.
pub const DEFAULT_MAX_STREAMS: usize = 64;
/// Default blocks a viewer may fall behind the publisher before it skips ahead.
pub const DEFAULT_VIEWER_QUEUE: usize = 64;
/// Default time from the end of the handshake to a complete Hello.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// Default interval of viewer reports.
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Default QUIC idle timeout: how long a silent peer is considered alive.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default QUIC keep-alive interval.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(2);
/// Default QUIC idle timeout of a viewer: a server silent this long is dead.
/// QUIC uses the smaller of the two sides' timeouts, so the server notices a
/// dead viewer as fast.
pub const DEFAULT_CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default QUIC keep-alive interval of a viewer: four per idle timeout, so a
/// live but quiet path never times out from three lost keep-alives.
pub const DEFAULT_CLIENT_KEEP_ALIVE: Duration = Duration::from_millis(500);
/// Default control messages a viewer may send per second (sustained).
pub const DEFAULT_CONTROL_RATE: u32 = 50;
/// Default latency budget of a viewer: from a block's sender timestamp to delivery.
pub const DEFAULT_LATENCY: Duration = Duration::from_millis(200);

/// Congestion controller for the QUIC connection.
///
/// quinn applies congestion control to datagrams too. A loss-based controller
/// (Cubic, NewReno) reads every lost packet as congestion and shrinks its
/// window, so under random, non-congestive loss, exactly the loss FEC exists
/// for, the sender queues and then drops media. BBR models bandwidth and RTT
/// instead and holds the media rate; it is the default. `benches/loss.rs`
/// measures all three side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CongestionControl {
    /// BBR (quinn's experimental BBRv1 implementation). Default.
    #[default]
    Bbr,
    /// Cubic, quinn's own default.
    Cubic,
    /// NewReno.
    NewReno,
}

impl std::str::FromStr for CongestionControl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "bbr" => Ok(Self::Bbr),
            "cubic" => Ok(Self::Cubic),
            "newreno" | "new-reno" | "reno" => Ok(Self::NewReno),
            _ => Err(format!(
                "unknown congestion controller {s:?} (bbr, cubic, newreno)"
            )),
        }
    }
}

/// How many of a block's encoded parity shards each viewer is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Parity {
    /// From each viewer's reported loss, RTT and latency budget, the fewest
    /// parity shards that keep its expected residual block loss after repair
    /// under the policy's target (see [`RedundancyPolicy::plan`]), capped by
    /// what was encoded. Default.
    #[default]
    Adaptive,
    /// Every parity shard the encoder made (see [`FecConfig`]).
    All,
    /// At most this many parity shards per code group. `Fixed(0)` sends plain
    /// datagrams with no protection, for comparison.
    Fixed(usize),
}

/// Where the server's certificate comes from.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Identity {
    /// PEM files: certificate chain and private key.
    Files {
        /// Certificate chain (PEM).
        cert: PathBuf,
        /// Private key (PEM).
        key: PathBuf,
    },
    /// A self-signed development certificate for `localhost`, `127.0.0.1` and
    /// `::1`, generated by rcgen into `dir/dev.pem` on first use and reused
    /// after. Clients trust it by loading the same file.
    DevCertificate {
        /// Directory of `dev.pem`.
        dir: PathBuf,
    },
    /// Certificate chain and key already in memory (DER).
    Der {
        /// Certificate chain.
        certs: Vec<CertificateDer<'static>>,
        /// PKCS#8 private key.
        key: Arc<Vec<u8>>,
    },
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) identity: Identity,
    pub(crate) fec: FecConfig,
    pub(crate) parity: Parity,
    pub(crate) repair: bool,
    pub(crate) congestion: CongestionControl,
    pub(crate) min_window: u64,
    pub(crate) datagram_send_buffer: usize,
    pub(crate) max_connections: usize,
    pub(crate) max_handshakes: usize,
    pub(crate) retry_above: usize,
    pub(crate) max_per_source: usize,
    pub(crate) max_awaiting_hello: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) control_drain: Duration,
    pub(crate) max_streams: usize,
    pub(crate) viewer_queue: usize,
    pub(crate) hello_timeout: Duration,
    pub(crate) report_interval: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) keep_alive: Duration,
    pub(crate) max_control_frame: usize,
    pub(crate) control_rate: u32,
    pub(crate) token: Option<Bytes>,
    pub(crate) analytics: AggregatorConfig,
    pub(crate) policy: RedundancyPolicy,
    pub(crate) analytics_queue: usize,
    pub(crate) event_log: Option<PathBuf>,
    pub(crate) event_log_max_bytes: u64,
    pub(crate) event_log_keep: usize,
    pub(crate) nats: Option<(String, crate::analytics::deployment::Names)>,
    pub(crate) server_id: String,
    pub(crate) nats_buffer: usize,
}

impl ServerConfig {
    /// A config serving `identity`, all else default.
    pub fn new(identity: Identity) -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            identity,
            fec: FecConfig::default(),
            parity: Parity::default(),
            repair: true,
            congestion: CongestionControl::default(),
            min_window: DEFAULT_MIN_WINDOW,
            datagram_send_buffer: DEFAULT_DATAGRAM_SEND_BUFFER,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            retry_above: DEFAULT_RETRY_ABOVE,
            max_per_source: DEFAULT_MAX_PER_SOURCE,
            max_awaiting_hello: DEFAULT_MAX_AWAITING_HELLO,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            control_drain: DEFAULT_CONTROL_DRAIN,
            max_streams: DEFAULT_MAX_STREAMS,
            viewer_queue: DEFAULT_VIEWER_QUEUE,
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
            report_interval: DEFAULT_REPORT_INTERVAL,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keep_alive: DEFAULT_KEEP_ALIVE,
            max_control_frame: crate::wire::MAX_CONTROL_FRAME,
            control_rate: DEFAULT_CONTROL_RATE,
            token: None,
            analytics: AggregatorConfig::default(),
            policy: RedundancyPolicy::default(),
            analytics_queue: DEFAULT_ANALYTICS_QUEUE,
            event_log: None,
            event_log_max_bytes: DEFAULT_EVENT_LOG_MAX_BYTES,
            event_log_keep: DEFAULT_EVENT_LOG_KEEP,
            nats: None,
            server_id: DEFAULT_SERVER_ID.into(),
            nats_buffer: crate::analytics::deployment::DEFAULT_OUTBOX_LIMIT,
        }
    }

    /// Limits and QoE model of the analytics aggregator. Default
    /// [`AggregatorConfig::default`]; its redundancy policy is replaced by
    /// [`redundancy_policy`](Self::redundancy_policy).
    pub fn analytics(&mut self, config: AggregatorConfig) -> &mut Self {
        self.analytics = config;
        self
    }

    /// The decision loop from viewer loss to parity, for [`Parity::Adaptive`].
    /// Default [`RedundancyPolicy::default`] (residual block loss under 1e-4).
    /// Its `max_ratio` is set to the encoded [`FecConfig::redundancy`]: a
    /// viewer can only be sent parity that was encoded.
    pub fn redundancy_policy(&mut self, policy: RedundancyPolicy) -> &mut Self {
        self.policy = policy;
        self
    }

    /// Analytics events that may wait for the aggregator. Default
    /// [`DEFAULT_ANALYTICS_QUEUE`]. When full, reports and app events are
    /// dropped and counted (`events_dropped`); joins and leaves wait up to 1 s.
    pub fn analytics_queue(&mut self, events: usize) -> &mut Self {
        self.analytics_queue = events.max(16);
        self
    }

    /// Writes every accepted analytics event as one JSON line
    /// ([`LogRecord`](crate::analytics::LogRecord): run id, wall-clock time,
    /// the viewer's address on joins and leaves) to `path`: the durable
    /// record. Default none. Each run starts a new file: a non-empty regular
    /// file left by a previous run is rotated to `PATH.1` first (as below; with
    /// `keep = 0` it is truncated). Every batch is flushed as it is written,
    /// and [`Server::shutdown`](crate::Server::shutdown) applies and logs
    /// every accepted event before it returns.
    pub fn event_log(&mut self, path: Option<PathBuf>) -> &mut Self {
        self.event_log = path;
        self
    }

    /// Bounds the event log: a file that would grow past `max_bytes` is
    /// renamed `PATH.1` (older ones move to `PATH.2` .. `PATH.keep`, the
    /// oldest is deleted) and a new one started. Default
    /// [`DEFAULT_EVENT_LOG_MAX_BYTES`] and [`DEFAULT_EVENT_LOG_KEEP`]: at most
    /// 256 MiB on disk. `keep = 0` truncates in place.
    pub fn event_log_rotation(&mut self, max_bytes: u64, keep: usize) -> &mut Self {
        self.event_log_max_bytes = max_bytes.max(4096);
        self.event_log_keep = keep;
        self
    }

    /// Also publishes every accepted analytics event to NATS JetStream at `url` (e.g.
    /// `nats://10.0.0.5:4222`), for one view of a deployment of several servers (see
    /// [`NatsAggregator`](crate::net::NatsAggregator)). Default `None`: off; the local
    /// [`event_log`](Self::event_log) is the record for one machine.
    ///
    /// Events go to subject `quicast.<deployment>.events.<stream>` in the JetStream stream
    /// `QUICAST_<deployment>` (created if missing), one JSON event-log line with the
    /// [`server_id`](Self::server_id) added, with a `Nats-Msg-Id` of
    /// `server:run:sequence` (see [`deployment`](crate::analytics::deployment)). Publishing
    /// never slows the server: while NATS is unreachable events wait in a buffer of
    /// [`nats_buffer`](Self::nats_buffer) events and are resent once it is back; drops are
    /// counted (`quicast_nats_dropped_total`). [`Server::shutdown`](crate::Server::shutdown)
    /// waits up to its grace for the buffer to be acknowledged. `deployment` must be 1 to
    /// 64 characters of `[A-Za-z0-9_-]`.
    pub fn nats(
        &mut self,
        url: Option<String>,
        deployment: &str,
    ) -> Result<&mut Self, crate::analytics::deployment::NameError> {
        self.nats = match url {
            Some(url) => Some((url, crate::analytics::deployment::Names::new(deployment)?)),
            None => None,
        };
        Ok(self)
    }

    /// This server's id in its events on NATS (the `server` label of the aggregator's
    /// metrics). Default [`DEFAULT_SERVER_ID`]; give each server of a deployment its own
    /// (1 to 64 characters of `[A-Za-z0-9_-]`). Two servers with one id are counted as one
    /// server with two runs.
    pub fn server_id(
        &mut self,
        id: &str,
    ) -> Result<&mut Self, crate::analytics::deployment::NameError> {
        crate::analytics::deployment::check_name("server id", id)?;
        self.server_id = id.into();
        Ok(self)
    }

    /// Events kept while NATS is unreachable (default
    /// [`DEFAULT_OUTBOX_LIMIT`](crate::analytics::deployment::DEFAULT_OUTBOX_LIMIT), about
    /// 16 MiB). More rides out a longer outage; past it new events are dropped and counted
    /// (`quicast_nats_dropped_total{reason="buffer_full"}`).
    pub fn nats_buffer(&mut self, events: usize) -> &mut Self {
        self.nats_buffer = events.max(1);
        self
    }

    /// UDP address to listen on. Default [`DEFAULT_LISTEN`] (loopback only);
    /// use `0.0.0.0:PORT` or `[::]:PORT` to serve other hosts.
    pub fn listen(&mut self, addr: SocketAddr) -> &mut Self {
        self.listen = addr;
        self
    }

    /// FEC parameters for every stream. Default [`FecConfig::default`].
    pub fn fec(&mut self, fec: FecConfig) -> &mut Self {
        self.fec = fec;
        self
    }

    /// Whether viewers' repair requests are answered. Default on.
    ///
    /// When a viewer's budget leaves time for a round trip, the parity it was
    /// not sent up front (and then the data shards it lacks) is sent on
    /// request, so far less parity has to go up front. Off leaves proactive
    /// parity alone, sized as if no repair round fit, whatever the budget.
    pub fn repair(&mut self, on: bool) -> &mut Self {
        self.repair = on;
        self
    }

    /// How much of the encoded parity each viewer gets up front. Default
    /// [`Parity::Adaptive`]. Blocks are encoded once with the most parity any
    /// viewer may need; this only trims what is sent, never re-encodes.
    pub fn parity(&mut self, parity: Parity) -> &mut Self {
        self.parity = parity;
        self
    }

    /// Congestion controller. Default BBR; see [`CongestionControl`] for why.
    pub fn congestion(&mut self, cc: CongestionControl) -> &mut Self {
        self.congestion = cc;
        self
    }

    /// Absolute lower bound of every viewer connection's congestion window,
    /// in bytes. Default [`DEFAULT_MIN_WINDOW`] (0: none).
    ///
    /// Whatever this is, the window has a floor that follows the stream: about
    /// `2 × rate × RTT + one block`, with the RTT capped at twice the path's
    /// minimum, and 64 KiB before the stream's rate is known (`src/net/cc.rs`).
    /// Live media has a fixed rate and FEC for loss, so a controller that
    /// throttles below that rate only moves loss from the network to the
    /// sender's queue. quinn's BBR does so transiently after STARTUP (measured:
    /// its window fell to 25 KB for 250 ms on a 44 KB bandwidth-delay path, and
    /// blocks missed their deadline). Because the floor's RTT is capped, a path
    /// that cannot carry the stream still gets backed off: a queue that grows
    /// the RTT past about four minimum RTTs leaves the floor carrying less
    /// than the stream.
    ///
    /// This bound applies on top, even above what the stream needs, and is not
    /// capped: set it only to force a window. The window also sets quinn's
    /// pacing rate (window × 1.25 / RTT), which decides how fast a block's
    /// burst of shards leaves. Measured with `benches/loss.rs` (8 Mbit/s,
    /// 20 ms one-way, 30 ms budget, 5% loss, with the floor then a constant):
    /// 64 KiB paced a 27 KB block over about 13 ms, and 2.5% of blocks missed
    /// the budget; 256 KiB sent it in about 3.5 ms, and none did. A larger
    /// bound sends bursts faster into a bottleneck queue and keeps sending
    /// into a path that cannot carry the stream instead of backing off; the
    /// rate-based floor alone adds up to a block's pacing time to latency.
    pub fn min_window(&mut self, bytes: u64) -> &mut Self {
        self.min_window = bytes;
        self
    }

    /// Bytes of outgoing datagrams quinn may queue per connection. Default
    /// [`DEFAULT_DATAGRAM_SEND_BUFFER`] (128 KiB, about 130 ms at 8 Mbit/s).
    ///
    /// When the congestion window is full, quinn drops the *oldest* queued
    /// datagram to make room (we use `send_datagram`, never
    /// `send_datagram_wait`, so a slow viewer never stalls the others). A larger
    /// buffer rides out longer dips but delivers media that has aged past most
    /// latency budgets; a smaller one drops sooner and keeps what it sends fresh.
    pub fn datagram_send_buffer(&mut self, bytes: usize) -> &mut Self {
        self.datagram_send_buffer = bytes.max(2048);
        self
    }

    /// Most admitted viewers at once (connections past a good Hello). Default
    /// [`DEFAULT_MAX_CONNECTIONS`]. A connection that completes its handshake
    /// while these are taken is closed with `server_full` (0x6). Each viewer
    /// costs a task, buffers up to the datagram send buffer and a control
    /// buffer of `max_control_frame`. Connections not yet admitted have their
    /// own budgets ([`max_handshakes`](Self::max_handshakes),
    /// [`max_awaiting_hello`](Self::max_awaiting_hello)) and never take these slots.
    pub fn max_connections(&mut self, n: usize) -> &mut Self {
        self.max_connections = n.max(1);
        self
    }

    /// Most connections in the QUIC handshake at once. Default
    /// [`DEFAULT_MAX_HANDSHAKES`]. Beyond it new connection attempts are
    /// refused by QUIC (`CONNECTION_REFUSED`) before any crypto is done. Each
    /// costs quinn's connection state for at most
    /// [`handshake_timeout`](Self::handshake_timeout).
    pub fn max_handshakes(&mut self, n: usize) -> &mut Self {
        self.max_handshakes = n.max(1);
        self
    }

    /// From how many handshakes in progress a new attempt from an address
    /// that has not proven it receives our packets is answered with a QUIC
    /// Retry first. Default [`DEFAULT_RETRY_ABOVE`]; 0 always sends Retry,
    /// `usize::MAX` never does. A Retry costs the server no state and an
    /// honest client one round trip; Initials from spoofed or silent sources
    /// then hold nothing.
    pub fn retry_above(&mut self, n: usize) -> &mut Self {
        self.retry_above = n;
        self
    }

    /// Most connections one IP address may have that are not yet admitted
    /// viewers (in the handshake or waiting for Hello). Default
    /// [`DEFAULT_MAX_PER_SOURCE`]; beyond it new attempts from that address
    /// are refused. Admitted viewers are not counted: many viewers behind one
    /// NAT are fine, many silent handshakes are not.
    pub fn max_per_source(&mut self, n: usize) -> &mut Self {
        self.max_per_source = n.max(1);
        self
    }

    /// Most connections past the handshake that have not yet sent Hello.
    /// Default [`DEFAULT_MAX_AWAITING_HELLO`]. When a handshake completes with
    /// this budget taken, the connection waiting longest is closed with
    /// `hello_timeout` to make room: an honest client says Hello one round
    /// trip after its handshake, so it is never the oldest for long: with
    /// budget `B` and hello timeout `T`, silent connections made slower than
    /// `B / T` per second (128/s by default) time out before any is evicted,
    /// and faster ones still give every new connection `B / rate` seconds.
    pub fn max_awaiting_hello(&mut self, n: usize) -> &mut Self {
        self.max_awaiting_hello = n.max(1);
        self
    }

    /// Time a QUIC handshake may take before the attempt is dropped. Default
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`]. Shorter frees handshake slots sooner;
    /// too short fails clients on long or lossy paths.
    pub fn handshake_timeout(&mut self, t: Duration) -> &mut Self {
        self.handshake_timeout = t;
        self
    }

    /// Time one write on a viewer's control stream may take. Default
    /// [`DEFAULT_CONTROL_DRAIN`]. Control output (Welcome, Summary,
    /// EndOfStream, Goodbye) goes through a queue of 16 messages per viewer,
    /// written by its own writer, so media never waits for it; a viewer whose
    /// stream accepts no write within this bound, or that lets the queue fill,
    /// is closed with `control_stalled` and counted (`viewers_stalled`).
    pub fn control_drain(&mut self, t: Duration) -> &mut Self {
        self.control_drain = t.max(Duration::from_millis(10));
        self
    }

    /// Most streams that can be published at once. Default [`DEFAULT_MAX_STREAMS`].
    pub fn max_streams(&mut self, n: usize) -> &mut Self {
        self.max_streams = n.max(1);
        self
    }

    /// Blocks a viewer may fall behind the publisher. Default
    /// [`DEFAULT_VIEWER_QUEUE`]. A viewer further behind skips to the newest
    /// blocks; the skipped ones are counted (`blocks_skipped`). Larger values use
    /// more memory per stream (blocks are shared, not copied per viewer).
    pub fn viewer_queue(&mut self, blocks: usize) -> &mut Self {
        self.viewer_queue = blocks.max(1);
        self
    }

    /// Time from the end of the QUIC handshake to a complete Hello (opening
    /// the control stream and sending Hello both count against it). Default
    /// [`DEFAULT_HELLO_TIMEOUT`]. Beyond it the connection is closed with
    /// `hello_timeout` and counted. Shorter frees the budget of silent
    /// connections sooner; too short fails clients on slow paths.
    pub fn hello_timeout(&mut self, t: Duration) -> &mut Self {
        self.hello_timeout = t;
        self
    }

    /// How often viewers are asked to report. Default [`DEFAULT_REPORT_INTERVAL`].
    /// Shorter reacts faster to loss changes, at more control traffic.
    pub fn report_interval(&mut self, t: Duration) -> &mut Self {
        self.report_interval = t.max(Duration::from_millis(50));
        self
    }

    /// QUIC idle timeout. Default [`DEFAULT_IDLE_TIMEOUT`]. Shorter detects dead
    /// viewers sooner; too short closes viewers on a brief outage.
    pub fn idle_timeout(&mut self, t: Duration) -> &mut Self {
        self.idle_timeout = t;
        self
    }

    /// QUIC keep-alive interval. Default [`DEFAULT_KEEP_ALIVE`]; must be well
    /// under the idle timeout.
    pub fn keep_alive(&mut self, t: Duration) -> &mut Self {
        self.keep_alive = t;
        self
    }

    /// Largest control frame accepted from a viewer. Default
    /// [`MAX_CONTROL_FRAME`](crate::wire::MAX_CONTROL_FRAME); a larger frame
    /// closes the connection with `frame_too_large`.
    pub fn max_control_frame(&mut self, bytes: usize) -> &mut Self {
        self.max_control_frame = bytes.clamp(64, 1 << 20);
        self
    }

    /// Control messages per second a viewer may send, sustained, with a burst of
    /// twice that. Default [`DEFAULT_CONTROL_RATE`]. Above it the connection is
    /// closed with `rate_limited`.
    pub fn control_rate(&mut self, per_second: u32) -> &mut Self {
        self.control_rate = per_second.max(1);
        self
    }

    /// Server-wide access token. Default none (open). When set, a Hello must
    /// carry it, or a stream token of the stream it asks for; compared in
    /// constant time.
    pub fn token(&mut self, token: Option<Bytes>) -> &mut Self {
        self.token = token.filter(|t| !t.is_empty());
        self
    }
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub(crate) server: SocketAddr,
    pub(crate) server_name: String,
    pub(crate) roots: Vec<CertificateDer<'static>>,
    pub(crate) stream: String,
    pub(crate) token: Bytes,
    pub(crate) agent: String,
    pub(crate) latency: Duration,
    pub(crate) decoder: DecoderConfig,
    pub(crate) congestion: CongestionControl,
    pub(crate) idle_timeout: Duration,
    pub(crate) keep_alive: Duration,
    pub(crate) handshake_timeout: Duration,
    pub(crate) datagram_receive_buffer: usize,
    pub(crate) reconnect: Option<Duration>,
    pub(crate) sync_wait: Duration,
}

/// Default time a viewer keeps trying to reconnect after losing its connection.
pub const DEFAULT_RECONNECT: Duration = Duration::from_secs(30);

impl ClientConfig {
    /// Watch `stream` at `server`; the server certificate must chain to one of
    /// the roots added with [`add_root`](Self::add_root) or
    /// [`load_roots`](Self::load_roots).
    pub fn new(server: SocketAddr, stream: impl Into<String>) -> Self {
        ClientConfig {
            server,
            server_name: "localhost".into(),
            roots: Vec::new(),
            stream: stream.into(),
            token: Bytes::new(),
            agent: concat!("quicast/", env!("CARGO_PKG_VERSION")).into(),
            latency: DEFAULT_LATENCY,
            decoder: DecoderConfig::default(),
            sync_wait: crate::session::DEFAULT_SYNC_WAIT,
            congestion: CongestionControl::default(),
            idle_timeout: DEFAULT_CLIENT_IDLE_TIMEOUT,
            keep_alive: DEFAULT_CLIENT_KEEP_ALIVE,
            handshake_timeout: Duration::from_secs(5),
            datagram_receive_buffer: 4 << 20,
            reconnect: Some(DEFAULT_RECONNECT),
        }
    }

    /// How long to keep reconnecting after the connection drops (server
    /// restart, idle timeout, network outage). Default [`DEFAULT_RECONNECT`];
    /// `None` reports the failure at once.
    ///
    /// Attempts back off from 100 ms, doubling, to 2 s. A reconnected viewer
    /// resumes at the live edge: blocks it was still waiting for are counted
    /// lost, and [`Event::Reconnected`](crate::Event::Reconnected) marks the
    /// gap with the blocks missed meanwhile (also
    /// [`Subscription::reconnects`](crate::Subscription::reconnects) and
    /// [`Subscription::blocks_missed`](crate::Subscription::blocks_missed)).
    /// Rejections (wrong token, unknown stream) are never retried, nor is
    /// a failure of the first connection.
    pub fn reconnect(&mut self, window: Option<Duration>) -> &mut Self {
        self.reconnect = window;
        self
    }

    /// Name the server certificate must be valid for. Default `localhost`.
    pub fn server_name(&mut self, name: impl Into<String>) -> &mut Self {
        self.server_name = name.into();
        self
    }

    /// Trusts `cert` (a CA or the server's own self-signed certificate).
    pub fn add_root(&mut self, cert: CertificateDer<'static>) -> &mut Self {
        self.roots.push(cert);
        self
    }

    /// Trusts every certificate in a PEM file, such as the dev certificate.
    pub fn load_roots(&mut self, pem: &std::path::Path) -> Result<&mut Self, crate::TlsError> {
        self.roots.extend(crate::net::tls::load_certs(pem)?);
        Ok(self)
    }

    /// Access token sent in Hello. Default none.
    pub fn token(&mut self, token: impl Into<Bytes>) -> &mut Self {
        self.token = token.into();
        self
    }

    /// Client agent string sent in Hello (analytics). Default `quicast/VERSION`.
    pub fn agent(&mut self, agent: impl Into<String>) -> &mut Self {
        self.agent = agent.into();
        self
    }

    /// Latency budget, from a block's sender timestamp to its delivery. Default
    /// [`DEFAULT_LATENCY`]. A block not rebuilt by then is reported `Lost`, and
    /// shards arriving later are counted late, never delivered. It must exceed
    /// the one-way delay plus the time to send one block; more budget tolerates
    /// more jitter and reordering at the cost of delay.
    pub fn latency(&mut self, budget: Duration) -> &mut Self {
        self.latency = budget;
        self
    }

    /// How long a viewer that joins mid-stream waits for a sync point before
    /// it delivers from wherever the stream is. Default
    /// [`DEFAULT_SYNC_WAIT`](crate::session::DEFAULT_SYNC_WAIT), 2 s; see
    /// [`ReceiverConfig::sync_wait`](crate::session::ReceiverConfig::sync_wait).
    pub fn sync_wait(&mut self, t: Duration) -> &mut Self {
        self.sync_wait = t;
        self
    }

    /// FEC decoder limits (window, memory). Default [`DecoderConfig::default`].
    pub fn decoder(&mut self, config: DecoderConfig) -> &mut Self {
        self.decoder = config;
        self
    }

    /// Congestion controller of the client side (it sends little). Default BBR.
    pub fn congestion(&mut self, cc: CongestionControl) -> &mut Self {
        self.congestion = cc;
        self
    }

    /// QUIC idle timeout: how long a silent server is considered alive. Default
    /// [`DEFAULT_CLIENT_IDLE_TIMEOUT`] (2 s): a live server sends media and
    /// keep-alives far more often, so silence this long means it is gone, and
    /// the viewer reconnects (see [`reconnect`](Self::reconnect)) instead of
    /// waiting. Longer rides out longer blackouts on one connection.
    pub fn idle_timeout(&mut self, t: Duration) -> &mut Self {
        self.idle_timeout = t;
        self
    }

    /// QUIC keep-alive interval. Default [`DEFAULT_CLIENT_KEEP_ALIVE`]; keep it
    /// well under the idle timeout.
    pub fn keep_alive(&mut self, t: Duration) -> &mut Self {
        self.keep_alive = t;
        self
    }

    /// Time allowed for the QUIC handshake plus Hello/Welcome. Default 5 s.
    pub fn handshake_timeout(&mut self, t: Duration) -> &mut Self {
        self.handshake_timeout = t;
        self
    }

    /// Bytes of received datagrams quinn buffers before the app reads them
    /// (oldest dropped beyond). Default 4 MiB.
    pub fn datagram_receive_buffer(&mut self, bytes: usize) -> &mut Self {
        self.datagram_receive_buffer = bytes.max(64 * 1024);
        self
    }

    /// The stream this config subscribes to.
    pub fn stream(&self) -> &str {
        &self.stream
    }
}
