//! The server: streams published by the app, FEC-encoded once, pumped to viewers.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use subtle::ConstantTimeEq;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, info, trace, warn};

use super::{
    admission::{self, Admission, Decision, Ticket},
    analytics::{pipeline, Feedback, Pipeline},
    control::{self, FrameError, FrameReader, WriterError},
    tls,
};
use crate::{
    analytics::{
        Aggregator, Input, InputKind, Metric, MetricKind, Published, Rejected, Snapshot, Validator,
    },
    config::ServerConfig,
    fec::{EncodedBlock, Encoder},
    session::{Sender, SenderConfig, SenderStats, TokenBucket},
    wire::{self, ControlMessage, Flags, RepairEntry, MAX_STRING_LEN},
    CloseCode, ServerError,
};

/// How long a viewer may linger after EndOfStream before the server closes it.
const END_LINGER: Duration = Duration::from_secs(5);

/// Sender-side counters, shared by all connections.
#[derive(Debug, Default)]
struct Counters {
    connections_accepted: AtomicU64,
    connections_refused: AtomicU64,
    viewers_rejected: AtomicU64,
    viewers: AtomicU64,
    blocks_published: AtomicU64,
    shards_encoded: AtomicU64,
    media_bytes: AtomicU64,
    datagrams_sent: AtomicU64,
    datagrams_dropped: AtomicU64,
    datagrams_too_large: AtomicU64,
    bytes_sent: AtomicU64,
    blocks_skipped: AtomicU64,
    control_errors: AtomicU64,
    datagrams_from_viewers: AtomicU64,
    reports: AtomicU64,
    reports_rejected: AtomicU64,
    shards_expired: AtomicU64,
    blocks_dropped: AtomicU64,
    repairs_asked: AtomicU64,
    repairs_answered: AtomicU64,
    repairs_expired: AtomicU64,
    repair_shards: AtomicU64,
    repair_datagrams_malformed: AtomicU64,
    congestion_events: AtomicU64,
    viewers_congested: AtomicU64,
    retries_sent: AtomicU64,
    refused_handshakes: AtomicU64,
    refused_per_source: AtomicU64,
    refused_server_full: AtomicU64,
    hello_evicted: AtomicU64,
    viewers_stalled: AtomicU64,
    reports_impossible: AtomicU64,
    /// Connections ended, by [`CLOSE_REASONS`] index.
    closed: [AtomicU64; CLOSE_REASONS.len()],
}

/// Why connections end, as counted in `quicast_connections_closed_total`:
/// the close codes (indexed by their value), then ends that carry none.
const CLOSE_REASONS: [&str; 18] = [
    CloseCode::Normal.name(),
    CloseCode::ProtocolViolation.name(),
    CloseCode::FrameTooLarge.name(),
    CloseCode::UnsupportedVersion.name(),
    CloseCode::Unauthorized.name(),
    CloseCode::NoSuchStream.name(),
    CloseCode::ServerFull.name(),
    CloseCode::RateLimited.name(),
    CloseCode::Shutdown.name(),
    CloseCode::HelloTimeout.name(),
    CloseCode::DatagramsUnsupported.name(),
    CloseCode::ControlStalled.name(),
    CloseCode::PublisherFailed.name(),
    // The QUIC handshake did not finish in time.
    "handshake_timeout",
    // The QUIC handshake failed (TLS, version, or the peer gave up).
    "handshake_failed",
    // The viewer closed the connection (any code).
    "peer_closed",
    // Nothing heard from the viewer for the idle timeout.
    "idle_timeout",
    // Any other transport failure.
    "lost",
];

/// A snapshot of the server's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ServerStats {
    /// QUIC connections that completed the handshake.
    pub connections_accepted: u64,
    /// Connection attempts refused, for any reason below.
    pub connections_refused: u64,
    /// Attempts refused by QUIC because `max_handshakes` were in progress.
    pub refused_handshakes: u64,
    /// Attempts refused by QUIC because their address had `max_per_source`
    /// connections not yet admitted.
    pub refused_per_source: u64,
    /// Connections closed with `server_full`: every viewer slot was taken.
    pub refused_server_full: u64,
    /// QUIC Retry packets sent to unvalidated addresses.
    pub retries_sent: u64,
    /// Connections waiting for Hello closed early to make room in the
    /// `max_awaiting_hello` budget (also counted as `hello_timeout`).
    pub hello_evicted: u64,
    /// Viewers closed because their control stream did not drain.
    pub viewers_stalled: u64,
    /// Reports with values no real viewer can have (counters beyond what was
    /// published to it, stalls longer than it has been connected, counters
    /// going backwards); each closed its connection.
    pub reports_impossible: u64,
    /// Connections in the QUIC handshake now.
    pub handshaking: u64,
    /// Connections past the handshake that have not sent Hello yet.
    pub awaiting_hello: u64,
    /// Connections ended, by reason: the close code's name
    /// ([`CloseCode::name`]), or `handshake_timeout`, `handshake_failed`,
    /// `peer_closed`, `idle_timeout`, `lost`. Reasons never seen are absent.
    pub closed: std::collections::BTreeMap<&'static str, u64>,
    /// Hellos answered with Reject (bad token, unknown stream, ...).
    pub viewers_rejected: u64,
    /// Viewers subscribed right now.
    pub viewers: u64,
    /// Blocks published, over all streams.
    pub blocks_published: u64,
    /// Shards produced by the encoder (data and parity), once per block.
    pub shards_encoded: u64,
    /// Media bytes published.
    pub media_bytes: u64,
    /// Datagrams handed to quinn, over all viewers.
    pub datagrams_sent: u64,
    /// Datagrams dropped at the sender: quinn's send buffer was full and it
    /// discarded the oldest queued one to take a new one.
    pub datagrams_dropped: u64,
    /// Datagrams larger than the path's `max_datagram_size()`, not sent.
    pub datagrams_too_large: u64,
    /// Datagram bytes handed to quinn.
    pub bytes_sent: u64,
    /// Blocks skipped because a viewer fell `viewer_queue` blocks behind.
    pub blocks_skipped: u64,
    /// Connections closed for a bad control frame, rate or protocol error.
    pub control_errors: u64,
    /// Datagrams viewers sent (not part of the protocol; dropped).
    pub datagrams_from_viewers: u64,
    /// Reports received.
    pub reports: u64,
    /// Reports the validator refused: the impossible ones (which closed their
    /// connection, see `reports_impossible`), and reports claiming more blocks
    /// rebuilt than delivered, which a receiver can send for a moment (dropped).
    pub reports_rejected: u64,
    /// Analytics events accepted into the queue.
    pub events_accepted: u64,
    /// Analytics events dropped because the queue was full or closed.
    pub events_dropped: u64,
    /// Analytics events applied by the aggregator.
    pub events_applied: u64,
    /// Events written to the event log and flushed (one line each).
    pub events_logged: u64,
    /// Events the event log could not take (a write or flush failed, e.g. a
    /// full disk): applied, not logged. With a log configured, accepted =
    /// logged + log errors once the pipeline has drained.
    pub events_log_errors: u64,
    /// Shards not sent because their block could no longer reach the viewer
    /// by its deadline (or the sender's queue was over its bound).
    pub shards_expired: u64,
    /// Blocks a congested viewer was not sent at all, so that the blocks it
    /// was sent could arrive whole (their shards are in `shards_expired`).
    pub blocks_dropped: u64,
    /// Repair requests received (one per code group and attempt, copies included).
    pub repairs_asked: u64,
    /// Repair requests answered with at least one shard.
    pub repairs_answered: u64,
    /// Repair requests too late to answer, or for blocks no longer kept.
    pub repairs_expired: u64,
    /// Shards sent as repair answers.
    pub repair_shards: u64,
    /// Viewer datagrams that were not a valid repair request (dropped).
    pub repair_datagrams_malformed: u64,
    /// Times a viewer's path was found unable to carry its stream.
    pub congestion_events: u64,
    /// Viewers whose path cannot carry the stream right now.
    pub viewers_congested: u64,
}

#[derive(Clone)]
enum Item {
    /// A block and the instant its timestamp stands for.
    Block(Arc<EncodedBlock>, Instant),
    End {
        last_seq: u64,
    },
    /// The publisher failed: viewers get Goodbye with `publisher_failed`.
    Failed {
        reason: String,
    },
}

struct StreamEntry {
    id: u32,
    tx: broadcast::Sender<Item>,
    epoch: Instant,
    token: Option<Bytes>,
    viewers: Arc<AtomicUsize>,
}

type Task = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

struct Shared {
    config: ServerConfig,
    /// The redundancy policy, capped at what is encoded.
    policy: crate::analytics::RedundancyPolicy,
    /// The congestion-window floor every connection's controller reads; the
    /// pumps keep it at the stream's rate. One per endpoint, so with streams
    /// of different rates it follows whichever viewer updated it last.
    floor: Arc<super::cc::RateFloor>,
    streams: Mutex<HashMap<String, StreamEntry>>,
    next_stream_id: AtomicU32,
    next_viewer: AtomicU64,
    counters: Counters,
    connections: AtomicUsize,
    admission: Arc<Admission>,
    shutdown: watch::Sender<bool>,
    analytics: Pipeline,
    /// The NATS publisher, when configured.
    nats: Option<super::nats::NatsPublisher>,
    /// The analytics task, until `run` takes it to drive it.
    analytics_task: Mutex<Option<Task>>,
}

/// A quicast server: publish streams into it, run it, viewers connect.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use quicast::{Identity, Server, ServerConfig};
/// let config = ServerConfig::new(Identity::DevCertificate { dir: "certs".into() });
/// let server = Server::bind(config)?;
/// let mut live = server.publish("live", None)?;
/// tokio::spawn(server.run()); // nothing is spawned until the app does this
/// live.send(bytes::Bytes::from_static(b"media"), true)?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Server {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds a UDP socket at the configured address. Must be called inside a
    /// tokio runtime.
    pub fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        let socket = std::net::UdpSocket::bind(config.listen).map_err(ServerError::Bind)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| ServerError::Bind(std::io::Error::other("no async runtime")))?;
        let socket = runtime.wrap_udp_socket(socket).map_err(ServerError::Bind)?;
        Self::bind_socket(config, socket)
    }

    /// Serves on an existing socket, for example a
    /// [`LossySocket`](crate::sim::LossySocket) that simulates loss.
    pub fn bind_socket(
        config: ServerConfig,
        socket: Arc<dyn quinn::AsyncUdpSocket>,
    ) -> Result<Server, ServerError> {
        let crypto = tls::server_crypto(&config.identity)?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let floor = Arc::new(super::cc::RateFloor::new(config.min_window));
        server_config.transport_config(tls::transport(
            config.congestion,
            Some(floor.clone()),
            config.idle_timeout,
            config.keep_alive,
            // Viewers have no reason to send datagrams; a small buffer lets us
            // count and drop the ones they send anyway.
            Some(16 * 1024),
            config.datagram_send_buffer,
        ));
        let runtime = quinn::default_runtime()
            .ok_or_else(|| ServerError::Bind(std::io::Error::other("no async runtime")))?;
        let endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            runtime,
        )
        .map_err(ServerError::Bind)?;
        let (shutdown, _) = watch::channel(false);
        // A viewer can only be sent parity that was encoded.
        let mut policy = config.policy.clone();
        policy.max_ratio(config.fec.redundancy());
        let mut analytics = config.analytics.clone();
        analytics.policy(policy.clone());
        let (tap, nats, nats_task) = match &config.nats {
            Some((url, names)) => {
                let (tap, nats, task) = super::nats::publisher(super::nats::NatsSettings {
                    url: url.clone(),
                    names: names.clone(),
                    server_id: config.server_id.clone(),
                    buffer: config.nats_buffer,
                });
                (Some(tap), Some(nats), Some(task))
            }
            None => (None, None, None),
        };
        let (analytics, task) = pipeline(
            Aggregator::new(analytics),
            config.analytics_queue,
            config
                .event_log
                .clone()
                .map(|path| super::analytics::LogConfig {
                    path,
                    max_bytes: config.event_log_max_bytes,
                    keep: config.event_log_keep,
                }),
            tap,
        );
        // The NATS publisher runs beside the analytics task, driven by `run`.
        let task = async move {
            match nats_task {
                Some(n) => drop(tokio::join!(task, n)),
                None => task.await,
            }
        };
        Ok(Server {
            endpoint,
            shared: Arc::new(Shared {
                policy,
                floor,
                streams: Mutex::new(HashMap::new()),
                next_stream_id: AtomicU32::new(1),
                next_viewer: AtomicU64::new(1),
                admission: Admission::new(admission::Limits {
                    max_handshakes: config.max_handshakes,
                    retry_above: config.retry_above,
                    max_per_source: config.max_per_source,
                    max_awaiting_hello: config.max_awaiting_hello,
                    max_viewers: config.max_connections,
                }),
                config,
                counters: Counters::default(),
                connections: AtomicUsize::new(0),
                shutdown,
                analytics,
                nats,
                analytics_task: Mutex::new(Some(Box::pin(task))),
            }),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Creates stream `name` and returns the handle that publishes into it.
    ///
    /// `token`, when given, admits viewers of this stream in addition to the
    /// server-wide token.
    pub fn publish(&self, name: &str, token: Option<Bytes>) -> Result<Publisher, ServerError> {
        if name.is_empty() || name.len() > MAX_STRING_LEN {
            return Err(ServerError::InvalidStreamName(name.into()));
        }
        let mut streams = self
            .shared
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if streams.contains_key(name) {
            return Err(ServerError::StreamExists(name.into()));
        }
        if streams.len() >= self.shared.config.max_streams {
            return Err(ServerError::TooManyStreams(self.shared.config.max_streams));
        }
        let id = self.shared.next_stream_id.fetch_add(1, Relaxed);
        let (tx, _) = broadcast::channel(self.shared.config.viewer_queue);
        let epoch = Instant::now();
        let viewers = Arc::new(AtomicUsize::new(0));
        streams.insert(
            name.to_owned(),
            StreamEntry {
                id,
                tx: tx.clone(),
                epoch,
                token: token.filter(|t| !t.is_empty()),
                viewers: viewers.clone(),
            },
        );
        info!(stream = name, id, "stream published");
        Ok(Publisher {
            name: name.to_owned(),
            encoder: Encoder::new(id, self.shared.config.fec.clone()),
            tx,
            epoch,
            seq: 0,
            viewers,
            shared: self.shared.clone(),
            finished: false,
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> ServerStats {
        let c = &self.shared.counters;
        let (handshaking, awaiting_hello, _) = self.shared.admission.counts();
        ServerStats {
            connections_accepted: c.connections_accepted.load(Relaxed),
            connections_refused: c.connections_refused.load(Relaxed),
            refused_handshakes: c.refused_handshakes.load(Relaxed),
            refused_per_source: c.refused_per_source.load(Relaxed),
            refused_server_full: c.refused_server_full.load(Relaxed),
            retries_sent: c.retries_sent.load(Relaxed),
            hello_evicted: c.hello_evicted.load(Relaxed),
            viewers_stalled: c.viewers_stalled.load(Relaxed),
            reports_impossible: c.reports_impossible.load(Relaxed),
            handshaking: handshaking as u64,
            awaiting_hello: awaiting_hello as u64,
            closed: CLOSE_REASONS
                .iter()
                .zip(&c.closed)
                .map(|(name, n)| (*name, n.load(Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
            viewers_rejected: c.viewers_rejected.load(Relaxed),
            viewers: c.viewers.load(Relaxed),
            blocks_published: c.blocks_published.load(Relaxed),
            shards_encoded: c.shards_encoded.load(Relaxed),
            media_bytes: c.media_bytes.load(Relaxed),
            datagrams_sent: c.datagrams_sent.load(Relaxed),
            datagrams_dropped: c.datagrams_dropped.load(Relaxed),
            datagrams_too_large: c.datagrams_too_large.load(Relaxed),
            bytes_sent: c.bytes_sent.load(Relaxed),
            blocks_skipped: c.blocks_skipped.load(Relaxed),
            control_errors: c.control_errors.load(Relaxed),
            datagrams_from_viewers: c.datagrams_from_viewers.load(Relaxed),
            shards_expired: c.shards_expired.load(Relaxed),
            blocks_dropped: c.blocks_dropped.load(Relaxed),
            repairs_asked: c.repairs_asked.load(Relaxed),
            repairs_answered: c.repairs_answered.load(Relaxed),
            repairs_expired: c.repairs_expired.load(Relaxed),
            repair_shards: c.repair_shards.load(Relaxed),
            repair_datagrams_malformed: c.repair_datagrams_malformed.load(Relaxed),
            congestion_events: c.congestion_events.load(Relaxed),
            viewers_congested: c.viewers_congested.load(Relaxed),
            reports: c.reports.load(Relaxed),
            reports_rejected: c.reports_rejected.load(Relaxed),
            events_accepted: self.shared.analytics.accepted.load(Relaxed),
            events_dropped: self.shared.analytics.dropped.load(Relaxed),
            events_applied: self.lock_aggregator().applied(),
            events_logged: self.shared.analytics.logged.load(Relaxed),
            events_log_errors: self.shared.analytics.log_errors.load(Relaxed),
        }
    }

    fn lock_aggregator(&self) -> std::sync::MutexGuard<'_, Aggregator> {
        self.shared
            .analytics
            .aggregator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The live analytics: per stream and overall viewers, watch and join
    /// time, loss before and after FEC, stalls, latency, QoE, chosen parity, in
    /// totals and 10 s / 60 s windows.
    pub fn analytics(&self) -> Snapshot {
        self.lock_aggregator().snapshot(Instant::now())
    }

    /// Prometheus text exposition of [`analytics`](Self::analytics) and
    /// [`stats`](Self::stats), served as
    /// [`CONTENT_TYPE`](crate::analytics::CONTENT_TYPE).
    pub fn metrics_text(&self) -> String {
        let stats = self.stats();
        let snapshot = self.analytics();
        let counter = |name: &str, help: &str, value: u64| Metric {
            name: name.into(),
            help: help.into(),
            kind: MetricKind::Counter,
            value: value as f64,
            labels: Vec::new(),
        };
        let extra = [
            counter(
                "quicast_connections_accepted_total",
                "QUIC connections that completed the handshake.",
                stats.connections_accepted,
            ),
            counter(
                "quicast_connections_refused_total",
                "Connections refused at the connection limit.",
                stats.connections_refused,
            ),
            counter(
                "quicast_viewers_rejected_total",
                "Hellos answered with Reject.",
                stats.viewers_rejected,
            ),
            counter(
                "quicast_blocks_published_total",
                "Blocks published over all streams.",
                stats.blocks_published,
            ),
            counter(
                "quicast_media_bytes_total",
                "Media bytes published.",
                stats.media_bytes,
            ),
            counter(
                "quicast_datagrams_sent_total",
                "Datagrams handed to QUIC, all viewers.",
                stats.datagrams_sent,
            ),
            counter(
                "quicast_datagrams_dropped_total",
                "Datagrams dropped at the sender (send buffer full).",
                stats.datagrams_dropped,
            ),
            counter(
                "quicast_datagrams_too_large_total",
                "Datagrams above the path's maximum datagram size.",
                stats.datagrams_too_large,
            ),
            counter(
                "quicast_datagram_bytes_sent_total",
                "Datagram bytes handed to QUIC.",
                stats.bytes_sent,
            ),
            counter(
                "quicast_blocks_skipped_total",
                "Blocks skipped for viewers that fell behind.",
                stats.blocks_skipped,
            ),
            counter(
                "quicast_control_errors_total",
                "Connections closed for bad control input.",
                stats.control_errors,
            ),
            counter(
                "quicast_datagrams_from_viewers_total",
                "Datagrams viewers sent (dropped).",
                stats.datagrams_from_viewers,
            ),
            counter(
                "quicast_shards_expired_total",
                "Shards not sent: their block could no longer arrive in time.",
                stats.shards_expired,
            ),
            counter(
                "quicast_blocks_dropped_total",
                "Blocks not sent to a congested viewer, so that the others arrive whole.",
                stats.blocks_dropped,
            ),
            counter(
                "quicast_repairs_asked_total",
                "Repair requests received (per code group and attempt, copies included).",
                stats.repairs_asked,
            ),
            counter(
                "quicast_repairs_answered_total",
                "Repair requests answered with shards.",
                stats.repairs_answered,
            ),
            counter(
                "quicast_repairs_expired_total",
                "Repair requests too late to answer.",
                stats.repairs_expired,
            ),
            counter(
                "quicast_repair_shards_total",
                "Shards sent as repair answers.",
                stats.repair_shards,
            ),
            counter(
                "quicast_congestion_events_total",
                "Times a viewer's path could not carry its stream.",
                stats.congestion_events,
            ),
            Metric {
                name: "quicast_viewers_congested".into(),
                help: "Viewers whose path cannot carry the stream right now.".into(),
                kind: MetricKind::Gauge,
                value: stats.viewers_congested as f64,
                labels: Vec::new(),
            },
            counter(
                "quicast_reports_rejected_total",
                "Viewer reports refused by validation.",
                stats.reports_rejected,
            ),
            counter(
                "quicast_events_accepted_total",
                "Analytics events accepted.",
                stats.events_accepted,
            ),
            counter(
                "quicast_events_dropped_total",
                "Analytics events dropped (queue full).",
                stats.events_dropped,
            ),
            counter(
                "quicast_events_logged_total",
                "Analytics events written to the event log and flushed.",
                stats.events_logged,
            ),
            counter(
                "quicast_events_log_errors_total",
                "Analytics events the event log could not take (write or flush failed).",
                stats.events_log_errors,
            ),
            counter(
                "quicast_retries_sent_total",
                "QUIC Retry packets sent to unvalidated addresses.",
                stats.retries_sent,
            ),
            counter(
                "quicast_viewers_stalled_total",
                "Viewers closed because their control stream did not drain.",
                stats.viewers_stalled,
            ),
            counter(
                "quicast_reports_impossible_total",
                "Reports with impossible values (connection closed).",
                stats.reports_impossible,
            ),
        ];
        let labelled = |name: &str, help: &str, kind, label: &str, value: &str, n: u64| Metric {
            name: name.into(),
            help: help.into(),
            kind,
            value: n as f64,
            labels: vec![(label.into(), value.into())],
        };
        let refused = [
            ("handshake_budget", stats.refused_handshakes),
            ("per_source", stats.refused_per_source),
            ("server_full", stats.refused_server_full),
        ];
        // Every reason, zeros included, so a rate() over any of them works
        // from the first scrape.
        let closed: Vec<(&str, u64)> = CLOSE_REASONS
            .iter()
            .zip(&self.shared.counters.closed)
            .map(|(reason, n)| (*reason, n.load(Relaxed)))
            .collect();
        let open = [
            ("handshaking", stats.handshaking),
            ("awaiting_hello", stats.awaiting_hello),
            ("viewer", stats.viewers),
        ];
        // (name, help, kind, label, labelled values)
        type Family<'a> = (&'a str, &'a str, MetricKind, &'a str, &'a [(&'a str, u64)]);
        let families: [Family; 3] = [
            (
                "quicast_connections_refused_by_total",
                "Connection attempts refused, by budget.",
                MetricKind::Counter,
                "reason",
                &refused,
            ),
            (
                "quicast_connections_closed_total",
                "Connections ended, by reason (close code name or transport outcome).",
                MetricKind::Counter,
                "reason",
                &closed,
            ),
            (
                "quicast_connections",
                "Open connections by state.",
                MetricKind::Gauge,
                "state",
                &open,
            ),
        ];
        let mut extra = extra.to_vec();
        for (name, help, kind, label, values) in families {
            for &(value, n) in values {
                extra.push(labelled(name, help, kind, label, value, n));
            }
        }
        if let Some(nats) = &self.shared.nats {
            extra.extend(nats.metrics());
        }
        crate::analytics::render(&snapshot, &extra)
    }

    /// What the NATS publisher has done, when [`ServerConfig::nats`] is set.
    pub fn nats_stats(&self) -> Option<super::nats::NatsStats> {
        self.shared.nats.as_ref().map(|n| n.stats())
    }

    /// Accepts and serves connections until [`shutdown`](Self::shutdown).
    ///
    /// The returned future is the server's driver: the app spawns or awaits it.
    /// Each connection runs as a task in a `JoinSet` owned by this future, so
    /// dropping the future aborts every connection; nothing outlives it.
    pub fn run(&self) -> impl Future<Output = ()> + Send + 'static {
        let endpoint = self.endpoint.clone();
        let shared = self.shared.clone();
        async move {
            let mut tasks = tokio::task::JoinSet::new();
            let mut aux = tokio::task::JoinSet::new();
            let analytics = shared
                .analytics_task
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(task) = analytics {
                aux.spawn(task);
            }
            let mut shutdown = shared.shutdown.subscribe();
            loop {
                tokio::select! {
                    incoming = endpoint.accept() => {
                        let Some(incoming) = incoming else { break };
                        let Some((incoming, ticket)) = admit(&shared, incoming) else {
                            continue;
                        };
                        shared.connections.fetch_add(1, Relaxed);
                        let shared = shared.clone();
                        tasks.spawn(async move {
                            let remote = incoming.remote_address();
                            let result = serve(&shared, incoming, ticket).await;
                            shared.counters.closed[close_reason(&result)].fetch_add(1, Relaxed);
                            if let Err(e) = result {
                                debug!(%remote, error = %e, "connection ended");
                            }
                            shared.connections.fetch_sub(1, Relaxed);
                        });
                    }
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                    _ = shutting_down(&mut shutdown) => break,
                }
            }
            // Let connections say Goodbye, bounded in time.
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
            tasks.abort_all();
            // Their Leave events are queued by now: apply them and flush the log.
            shared.analytics.close(Duration::from_secs(2)).await;
            if let Some(nats) = &shared.nats {
                nats.flush(Duration::from_secs(2)).await;
            }
            aux.abort_all();
        }
    }

    /// Says Goodbye to every viewer, stops accepting, waits (at most `grace`)
    /// for connections to close, then applies every accepted analytics event and
    /// flushes the event log.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the shutdown is signalled before the first await; dropping
    /// the future only stops the waiting.
    pub async fn shutdown(&self, grace: Duration) {
        self.shared.shutdown.send_replace(true);
        let _ = tokio::time::timeout(grace, async {
            while self.shared.connections.load(Relaxed) > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        // Every accepted event is applied and logged before this returns.
        self.shared.analytics.close(grace).await;
        if let Some(nats) = &self.shared.nats {
            nats.flush(grace).await;
        }
        self.endpoint
            .close(CloseCode::Shutdown.varint(), b"server shutting down");
        let _ = tokio::time::timeout(grace, self.endpoint.wait_idle()).await;
    }
}

/// Resolves once shutdown is signalled. The watch guard stays inside, so the
/// future is `Send`.
async fn shutting_down(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.map(|_| ());
}

/// Publishes blocks into one stream.
///
/// Each block is FEC-encoded once, here, on the caller's task; every viewer's
/// pump sends the same shared `Bytes`. [`finish`](Self::finish) ends the
/// stream normally; [`fail`](Self::fail), or dropping the publisher without
/// `finish` (an error path that returned early, a panic), ends it as failed:
/// viewers get `Goodbye` with [`CloseCode::PublisherFailed`], so a broken
/// source never looks like a complete stream.
pub struct Publisher {
    name: String,
    encoder: Encoder,
    tx: broadcast::Sender<Item>,
    epoch: Instant,
    seq: u64,
    viewers: Arc<AtomicUsize>,
    shared: Arc<Shared>,
    finished: bool,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("name", &self.name)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// Encodes and sends one block; returns its sequence number.
    ///
    /// Never blocks: viewers that fall behind skip blocks (counted), they do
    /// not slow the publisher. `sync` marks a point where decoding can start.
    ///
    /// The block is stamped now: its latency and deadline count from this
    /// call. When its bytes arrived earlier (a block gathered from a pipe),
    /// use [`send_taken`](Self::send_taken) so the wait counts too.
    pub fn send(&mut self, block: Bytes, sync: bool) -> Result<u64, ServerError> {
        self.send_taken(block, sync, Instant::now())
    }

    /// As [`send`](Self::send), for a block whose first byte reached the
    /// application at `taken`: viewers measure its latency, and both sides
    /// its deadline, from then, so time spent gathering the block (or in any
    /// queue before this call) is part of every figure rather than hidden
    /// before it. A `taken` later than now counts as now; one before the
    /// stream was created, as its creation.
    pub fn send_taken(
        &mut self,
        block: Bytes,
        sync: bool,
        taken: Instant,
    ) -> Result<u64, ServerError> {
        let flags = if sync { Flags::SYNC } else { Flags::empty() };
        let seq = self.seq;
        let now = taken.min(Instant::now()).max(self.epoch);
        // Wraps; receivers unwrap.
        let ts = now.saturating_duration_since(self.epoch).as_micros() as u32;
        let encoded = self.encoder.encode(seq, ts, flags, &block)?;
        self.seq += 1;
        let c = &self.shared.counters;
        c.blocks_published.fetch_add(1, Relaxed);
        c.shards_encoded
            .fetch_add(encoded.datagrams().len() as u64, Relaxed);
        c.media_bytes.fetch_add(block.len() as u64, Relaxed);
        // No receivers is not an error: the stream is live whether watched or not.
        let _ = self.tx.send(Item::Block(Arc::new(encoded), now));
        Ok(seq)
    }

    /// The stream clock in microseconds since the stream was created.
    pub fn clock_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Sequence number the next block will get.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// Viewers subscribed right now.
    pub fn viewers(&self) -> usize {
        self.viewers.load(Relaxed)
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits until at least `n` viewers are subscribed.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: it only polls a counter.
    pub async fn wait_for_viewers(&self, n: usize) {
        while self.viewers() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Ends the stream: viewers get EndOfStream after the last block, and the
    /// name can no longer be subscribed to.
    pub fn finish(mut self) {
        let last_seq = self.seq.saturating_sub(1);
        self.end(Item::End { last_seq });
    }

    /// Ends the stream as failed: viewers get `Goodbye` with
    /// [`CloseCode::PublisherFailed`] and `reason` (for example "reading
    /// movie.ts: ..."), and the name can no longer be subscribed to.
    pub fn fail(mut self, reason: impl Into<String>) {
        self.end(Item::Failed {
            reason: reason.into(),
        });
    }

    fn end(&mut self, item: Item) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let failed = matches!(item, Item::Failed { .. });
        let _ = self.tx.send(item);
        self.shared
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
        if failed {
            info!(stream = %self.name, blocks = self.seq, "stream failed");
        } else {
            info!(stream = %self.name, blocks = self.seq, "stream finished");
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        // Not finished: the publisher's owner gave up on the stream, and
        // may not know it (an early return, a panic).
        if !self.finished {
            warn!(stream = %self.name, blocks = self.seq, "publisher dropped without finish: viewers are told the stream failed");
        }
        self.end(Item::Failed {
            reason: "publisher dropped without finishing the stream".into(),
        });
    }
}

/// Why a connection ended from the server's side.
#[derive(Debug, thiserror::Error)]
enum ConnEnd {
    #[error("handshake timed out")]
    HandshakeTimeout,
    #[error("handshake: {0}")]
    HandshakeFailed(quinn::ConnectionError),
    #[error("connection: {0}")]
    Lost(#[from] quinn::ConnectionError),
    #[error("closed: {code}: {reason}")]
    Closed { code: CloseCode, reason: String },
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
}

/// The [`CLOSE_REASONS`] index of how a connection ended.
fn close_reason(end: &Result<(), ConnEnd>) -> usize {
    let other = |name: &str| {
        CLOSE_REASONS
            .iter()
            .position(|r| *r == name)
            .expect("listed")
    };
    let lost = |e: &quinn::ConnectionError| match e {
        quinn::ConnectionError::ApplicationClosed(_)
        | quinn::ConnectionError::ConnectionClosed(_)
        | quinn::ConnectionError::Reset => other("peer_closed"),
        quinn::ConnectionError::TimedOut => other("idle_timeout"),
        _ => other("lost"),
    };
    match end {
        Ok(()) => CloseCode::Normal.code() as usize,
        Err(ConnEnd::Closed { code, .. }) => code.code() as usize,
        Err(ConnEnd::HandshakeTimeout) => other("handshake_timeout"),
        Err(ConnEnd::HandshakeFailed(_)) => other("handshake_failed"),
        Err(ConnEnd::Lost(e)) => lost(e),
        Err(ConnEnd::Write(quinn::WriteError::ConnectionLost(e))) => lost(e),
        Err(ConnEnd::Write(_)) => other("lost"),
    }
}

/// Runs a new attempt through the admission budgets: answers it with a Retry
/// or a refusal (counted), or returns it with its ticket.
fn admit(shared: &Shared, incoming: quinn::Incoming) -> Option<(quinn::Incoming, Ticket)> {
    let remote = incoming.remote_address();
    let c = &shared.counters;
    let (decision, ticket) = shared
        .admission
        .incoming(remote.ip(), incoming.remote_address_validated());
    match (decision, ticket) {
        (Decision::Accept, Some(ticket)) => return Some((incoming, ticket)),
        (Decision::Retry, _) => match incoming.retry() {
            Ok(()) => {
                c.retries_sent.fetch_add(1, Relaxed);
                trace!(%remote, "retry");
            }
            // Only a validated address cannot be retried, and those are not.
            Err(e) => e.into_incoming().ignore(),
        },
        (Decision::RefuseHandshakes, _) => {
            c.connections_refused.fetch_add(1, Relaxed);
            c.refused_handshakes.fetch_add(1, Relaxed);
            trace!(%remote, "refused: handshake budget");
            incoming.refuse();
        }
        (Decision::RefusePerSource, _) => {
            c.connections_refused.fetch_add(1, Relaxed);
            c.refused_per_source.fetch_add(1, Relaxed);
            trace!(%remote, "refused: per-source budget");
            incoming.refuse();
        }
        (Decision::Accept, None) => incoming.ignore(),
    }
    None
}

fn close(conn: &quinn::Connection, code: CloseCode, reason: impl Into<String>) -> ConnEnd {
    let reason = reason.into();
    conn.close(code.varint(), reason.as_bytes());
    ConnEnd::Closed { code, reason }
}

/// Sends Reject, then closes with the same code.
async fn reject(
    shared: &Shared,
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    code: CloseCode,
    reason: &str,
) -> ConnEnd {
    shared.counters.viewers_rejected.fetch_add(1, Relaxed);
    let msg = ControlMessage::Reject {
        code: code.code(),
        reason: reason.into(),
    };
    // Best effort: the close below carries the same code and reason.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        control::write(send, &msg).await?;
        send.finish().map_err(|_| quinn::WriteError::ClosedStream)?;
        // Give the Reject a moment to leave before the close overtakes it.
        let _ = tokio::time::timeout(Duration::from_millis(100), send.stopped()).await;
        Ok::<_, quinn::WriteError>(())
    })
    .await;
    close(conn, code, reason)
}

fn token_ok(expected: &[&Bytes], given: &[u8]) -> bool {
    if expected.is_empty() {
        return true;
    }
    // Compare against every accepted token without early exit, so timing says
    // nothing about which one (or which prefix) matched.
    expected
        .iter()
        .fold(subtle::Choice::from(0), |ok, t| {
            ok | t.as_ref().ct_eq(given)
        })
        .into()
}

async fn serve(
    shared: &Shared,
    incoming: quinn::Incoming,
    mut ticket: Ticket,
) -> Result<(), ConnEnd> {
    let began = Instant::now();
    let connecting = incoming.accept().map_err(ConnEnd::HandshakeFailed)?;
    // Dropping an unfinished handshake closes it and frees its place.
    let conn = match tokio::time::timeout(shared.config.handshake_timeout, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Err(ConnEnd::HandshakeFailed(e)),
        Err(_) => return Err(ConnEnd::HandshakeTimeout),
    };
    shared.counters.connections_accepted.fetch_add(1, Relaxed);
    match ticket.handshake_done(&conn) {
        Err(admission::Full) => {
            shared.counters.refused_server_full.fetch_add(1, Relaxed);
            return Err(close(&conn, CloseCode::ServerFull, "server full"));
        }
        Ok(true) => {
            shared.counters.hello_evicted.fetch_add(1, Relaxed);
        }
        Ok(false) => {}
    }
    // One hello timeout, from the end of the handshake to a complete Hello.
    let deadline = tokio::time::Instant::now() + shared.config.hello_timeout;
    // Closed by us while waiting: evicted from the Hello budget.
    let evicted = |conn: &quinn::Connection| {
        matches!(
            conn.close_reason(),
            Some(quinn::ConnectionError::LocallyClosed)
        )
        .then(|| ConnEnd::Closed {
            code: CloseCode::HelloTimeout,
            reason: "too many connections waiting for hello".into(),
        })
    };
    let (mut send, recv) = match tokio::time::timeout_at(deadline, conn.accept_bi()).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(evicted(&conn).unwrap_or(e.into())),
        Err(_) => return Err(close(&conn, CloseCode::HelloTimeout, "no control stream")),
    };
    let mut reader = FrameReader::new(recv, shared.config.max_control_frame);
    let hello = match tokio::time::timeout_at(deadline, reader.next()).await {
        Err(_) => return Err(close(&conn, CloseCode::HelloTimeout, "no hello")),
        Ok(Ok(Some(msg))) => msg,
        Ok(Ok(None)) => return Err(close(&conn, CloseCode::ProtocolViolation, "no hello")),
        Ok(Err(e)) => {
            return Err(evicted(&conn).unwrap_or_else(|| frame_error(shared, &conn, e)));
        }
    };
    let ControlMessage::Hello {
        version,
        stream,
        token,
        agent,
        latency_ms,
    } = hello
    else {
        shared.counters.control_errors.fetch_add(1, Relaxed);
        return Err(close(
            &conn,
            CloseCode::ProtocolViolation,
            format!("expected hello, got {}", hello.name()),
        ));
    };
    if version != wire::VERSION {
        let reason = format!("unsupported version {version}");
        return Err(reject(
            shared,
            &conn,
            &mut send,
            CloseCode::UnsupportedVersion,
            &reason,
        )
        .await);
    }
    let lookup = {
        let streams = shared.streams.lock().unwrap_or_else(|e| e.into_inner());
        streams.get(&stream).map(|e| {
            let mut tokens: Vec<Bytes> = shared.config.token.iter().cloned().collect();
            tokens.extend(e.token.iter().cloned());
            (e.id, e.tx.subscribe(), e.epoch, tokens, e.viewers.clone())
        })
    };
    let Some((stream_id, mut rx, epoch, tokens, viewers)) = lookup else {
        // Behind a server-wide token, only an authorized viewer learns which
        // stream names exist.
        if let Some(required) = &shared.config.token {
            if !token_ok(&[required], &token) {
                let reason = if token.is_empty() {
                    "token required"
                } else {
                    "invalid token"
                };
                return Err(
                    reject(shared, &conn, &mut send, CloseCode::Unauthorized, reason).await,
                );
            }
        }
        let reason = format!("no such stream {stream:?}");
        return Err(reject(shared, &conn, &mut send, CloseCode::NoSuchStream, &reason).await);
    };
    if !token_ok(&tokens.iter().collect::<Vec<_>>(), &token) {
        let reason = if token.is_empty() {
            "token required"
        } else {
            "invalid token"
        };
        return Err(reject(shared, &conn, &mut send, CloseCode::Unauthorized, reason).await);
    }
    let Some(max_datagram) = conn.max_datagram_size() else {
        let reason = "peer does not accept datagrams";
        return Err(reject(
            shared,
            &conn,
            &mut send,
            CloseCode::DatagramsUnsupported,
            reason,
        )
        .await);
    };
    let needed = shared.config.fec.shard_size() + wire::MAX_HEADER_LEN;
    if max_datagram < needed {
        warn!(
            max_datagram,
            needed,
            "path datagram size below shard size; oversized shards will be counted and dropped"
        );
    }
    if ticket.admit().is_err() {
        shared.counters.refused_server_full.fetch_add(1, Relaxed);
        return Err(reject(
            shared,
            &conn,
            &mut send,
            CloseCode::ServerFull,
            "server full",
        )
        .await);
    }
    // From here on control output goes through the queue and its writer.
    let (ctl, ctl_rx) = mpsc::channel(control::QUEUE);
    let _ = ctl.try_send(ControlMessage::Welcome {
        stream_id,
        clock_us: epoch.elapsed().as_micros() as u64,
        report_interval_ms: shared.config.report_interval.as_millis() as u64,
    });
    let writer = control::writer(send, ctl_rx, shared.config.control_drain);
    tokio::pin!(writer);
    info!(remote = %conn.remote_address(), stream, agent, "viewer joined");
    let viewer = shared.next_viewer.fetch_add(1, Relaxed);
    let (feedback_tx, feedback) = watch::channel(Feedback::default());
    let event = |kind| Input {
        viewer,
        stream: stream.clone(),
        kind,
    };
    shared
        .analytics
        .send(
            event(InputKind::Join { agent }),
            Some(feedback_tx),
            Some(conn.remote_address()),
        )
        .await;
    viewers.fetch_add(1, Relaxed);
    shared.counters.viewers.fetch_add(1, Relaxed);
    let mut sender = SenderConfig::new(Duration::from_millis(latency_ms));
    sender
        .parity(shared.config.parity)
        .repair(shared.config.repair)
        .policy(shared.policy.clone());
    let mut viewer = Viewer {
        id: viewer,
        stream: stream.clone(),
        feedback,
        validator: Validator::new(),
        began,
        offered: Offered::default(),
        sender: Sender::new(sender, conn.rtt()),
        congested: false,
        handed: 0,
        floor_set: None,
    };
    let mut writer_done = false;
    let result = tokio::select! {
        r = pump(shared, &conn, ctl, &mut reader, &mut rx, &mut viewer) => r,
        w = &mut writer => {
            writer_done = true;
            Err(writer_end(shared, &conn, w))
        }
    };
    if !writer_done && conn.close_reason().is_none() {
        // A Goodbye or EndOfStream may still be queued: let it leave, bounded.
        let _ = tokio::time::timeout(Duration::from_millis(500), &mut writer).await;
    }
    if let Err(ConnEnd::Closed { code, reason }) = &result {
        // The pump leaves the close to us when a message had to go first.
        conn.close(code.varint(), reason.as_bytes());
    }
    // Whatever quinn took but never put on the wire was dropped at the sender.
    let framed = conn.stats().frame_tx.datagram;
    shared
        .counters
        .datagrams_dropped
        .fetch_add(viewer.handed.saturating_sub(framed), Relaxed);
    if viewer.congested {
        shared.counters.viewers_congested.fetch_sub(1, Relaxed);
    }
    viewers.fetch_sub(1, Relaxed);
    shared.counters.viewers.fetch_sub(1, Relaxed);
    let reason = leave_reason(&result);
    shared
        .analytics
        .send(event(InputKind::Leave { reason }), None, None)
        .await;
    info!(remote = %conn.remote_address(), stream, "viewer left");
    result
}

/// Per-viewer state of the pump.
struct Viewer {
    id: u64,
    stream: String,
    feedback: watch::Receiver<Feedback>,
    validator: Validator,
    /// When its connection attempt arrived.
    began: Instant,
    /// What its reports are bounded by.
    offered: Offered,
    /// What goes to this viewer, and when.
    sender: Sender,
    /// Whether `viewers_congested` counts this viewer.
    congested: bool,
    /// Datagrams handed to quinn.
    handed: u64,
    /// When this viewer last set the congestion floor's rate.
    floor_set: Option<Instant>,
}

/// What one viewer was offered since it joined.
#[derive(Debug, Default)]
struct Offered {
    blocks: u64,
    shards: u64,
    /// Most shards of one block, to bound what a skipped block could add.
    max_block_shards: u64,
}

impl Viewer {
    /// The most a real viewer's report can count now.
    fn published(&self, sent_shards: u64, now: Instant) -> Published {
        Published {
            sent_shards,
            blocks: self.offered.blocks,
            shards: self.offered.shards,
            elapsed_ms: now.saturating_duration_since(self.began).as_millis() as u64,
        }
    }

    fn input(&self, kind: InputKind) -> Input {
        Input {
            viewer: self.id,
            stream: self.stream.clone(),
            kind,
        }
    }
}

/// How a viewer's connection ended, in the words of the event log's Leave:
/// "viewer left" for every clean end the viewer chose (Leave, a finished
/// control stream, a close with code `normal`), else the code and reason.
fn leave_reason(end: &Result<(), ConnEnd>) -> String {
    let lost = |e: &quinn::ConnectionError| match e {
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == CloseCode::Normal.varint() =>
        {
            "viewer left".to_string()
        }
        quinn::ConnectionError::ApplicationClosed(c) => {
            let code = CloseCode::from_code(c.error_code.into_inner()).map_or_else(
                || format!("{:#x}", c.error_code.into_inner()),
                |c| c.name().into(),
            );
            format!(
                "viewer closed: {code}: {}",
                String::from_utf8_lossy(&c.reason)
            )
        }
        quinn::ConnectionError::TimedOut => "idle timeout".into(),
        e => format!("connection lost: {e}"),
    };
    match end {
        Ok(()) => "viewer left".into(),
        Err(ConnEnd::Closed {
            code: CloseCode::Normal,
            reason,
        }) => reason.clone(),
        Err(ConnEnd::Closed { code, reason }) => format!("{}: {reason}", code.name()),
        Err(ConnEnd::Lost(e)) | Err(ConnEnd::Write(quinn::WriteError::ConnectionLost(e))) => {
            lost(e)
        }
        Err(e) => e.to_string(),
    }
}

fn frame_error(shared: &Shared, conn: &quinn::Connection, e: FrameError) -> ConnEnd {
    match e {
        // The viewer went away (or closed): no violation of ours to report.
        FrameError::Read(quinn::ReadError::ConnectionLost(e)) => ConnEnd::Lost(e),
        // A viewer may reset its own control stream to go away; the other
        // read errors are local states, never something the viewer broke.
        FrameError::Read(quinn::ReadError::Reset(code)) => close(
            conn,
            CloseCode::Normal,
            format!("viewer reset its control stream (code {code})"),
        ),
        FrameError::Read(e) => close(conn, CloseCode::Normal, format!("control stream: {e}")),
        FrameError::Decode(e) => {
            shared.counters.control_errors.fetch_add(1, Relaxed);
            close(conn, CloseCode::for_decode_error(&e), e.to_string())
        }
    }
}

/// How the control writer's end ends the connection.
fn writer_end(shared: &Shared, conn: &quinn::Connection, end: Result<(), WriterError>) -> ConnEnd {
    match end {
        Err(WriterError::Stalled(bound)) => {
            shared.counters.viewers_stalled.fetch_add(1, Relaxed);
            close(
                conn,
                CloseCode::ControlStalled,
                format!("control stream not drained within {} ms", bound.as_millis()),
            )
        }
        Err(WriterError::Write(e)) => ConnEnd::Write(e),
        // Only the pump can close the queue, and it has returned by then.
        Ok(()) => close(conn, CloseCode::Normal, "closed"),
    }
}

/// Queues a control message for the viewer's writer, never waiting: a full
/// queue means the viewer has not taken [`control::QUEUE`] messages, and it
/// is closed (counted).
fn queue(
    shared: &Shared,
    conn: &quinn::Connection,
    ctl: &mpsc::Sender<ControlMessage>,
    msg: ControlMessage,
) -> Result<(), ConnEnd> {
    match ctl.try_send(msg) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(_)) => {
            shared.counters.viewers_stalled.fetch_add(1, Relaxed);
            Err(close(
                conn,
                CloseCode::ControlStalled,
                format!("{} control messages not drained", control::QUEUE),
            ))
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            Err(close(conn, CloseCode::Normal, "control stream closed"))
        }
    }
}

/// Datagram bytes quinn is given ahead of the wire, at most: enough for a
/// couple of blocks, so a burst is not held back, and no more, so that waiting
/// shards stay in the [`Sender`] where they can expire or let a repair pass.
const QUINN_DEPTH: usize = 48 * 1024;

/// Hands quinn what the viewer's [`Sender`] releases now; returns when it
/// wants to be called again.
///
/// Per shard this only clones a `Bytes` and calls quinn; the shared counters
/// are updated once per call.
fn transmit(
    shared: &Shared,
    conn: &quinn::Connection,
    viewer: &mut Viewer,
    now: Instant,
) -> Option<Instant> {
    let before = viewer.sender.stats();
    let (mut handed, mut too_large) = (0u64, 0u64);
    let buffer = shared.config.datagram_send_buffer;
    let reserve = buffer.saturating_sub(QUINN_DEPTH.min(buffer));
    let mut space = conn.datagram_send_buffer_space().saturating_sub(reserve);
    while let Some(dg) = viewer.sender.poll_transmit(now, space) {
        space -= dg.len();
        match conn.send_datagram(dg) {
            Ok(()) => handed += 1,
            Err(quinn::SendDatagramError::TooLarge) => {
                too_large += 1;
                trace!("datagram too large for path");
            }
            Err(e) => {
                trace!(error = %e, "send_datagram failed");
                break;
            }
        }
    }
    add_sender_stats(shared, before, viewer.sender.stats());
    let c = &shared.counters;
    viewer.handed += handed;
    c.datagrams_sent.fetch_add(handed, Relaxed);
    c.datagrams_too_large.fetch_add(too_large, Relaxed);
    let congested = viewer.sender.is_congested();
    if congested != viewer.congested {
        viewer.congested = congested;
        if congested {
            c.viewers_congested.fetch_add(1, Relaxed);
        } else {
            c.viewers_congested.fetch_sub(1, Relaxed);
        }
    }
    viewer.sender.poll_timeout(now)
}

fn repair(
    shared: &Shared,
    viewer: &mut Viewer,
    now: Instant,
    dg: &Bytes,
    scratch: &mut Vec<RepairEntry>,
) {
    if wire::decode_repair(&mut &dg[..], scratch).is_err() {
        shared
            .counters
            .repair_datagrams_malformed
            .fetch_add(1, Relaxed);
        trace!(len = dg.len(), "malformed repair datagram");
        return;
    }
    let before = viewer.sender.stats();
    viewer.sender.handle_repair(now, scratch);
    add_sender_stats(shared, before, viewer.sender.stats());
}

/// Adds what one viewer's sender counted between `before` and `after` to
/// the server-wide counters.
fn add_sender_stats(shared: &Shared, before: SenderStats, after: SenderStats) {
    let c = &shared.counters;
    for (counter, a, b) in [
        (&c.bytes_sent, after.bytes, before.bytes),
        (&c.shards_expired, after.expired, before.expired),
        (
            &c.blocks_dropped,
            after.blocks_dropped,
            before.blocks_dropped,
        ),
        (&c.repair_shards, after.repair_shards, before.repair_shards),
        (
            &c.congestion_events,
            after.congestion_events,
            before.congestion_events,
        ),
        (&c.repairs_asked, after.repairs_asked, before.repairs_asked),
        (
            &c.repairs_answered,
            after.repairs_answered,
            before.repairs_answered,
        ),
        (
            &c.repairs_expired,
            after.repairs_expired,
            before.repairs_expired,
        ),
    ] {
        if a > b {
            counter.fetch_add(a - b, Relaxed);
        }
    }
}

async fn pump(
    shared: &Shared,
    conn: &quinn::Connection,
    ctl: mpsc::Sender<ControlMessage>,
    reader: &mut FrameReader,
    rx: &mut broadcast::Receiver<Item>,
    viewer: &mut Viewer,
) -> Result<(), ConnEnd> {
    let mut shutdown = shared.shutdown.subscribe();
    let mut limiter = TokenBucket::new(shared.config.control_rate, shared.config.control_rate * 2);
    let mut linger: Option<tokio::time::Instant> = None;
    let mut scratch = Vec::new();
    loop {
        let now = Instant::now();
        viewer.sender.set_rtt(conn.rtt());
        let wake = transmit(shared, conn, viewer, now);
        let linger_sleep = async {
            match linger {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let send_timer = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            item = rx.recv(), if linger.is_none() => match item {
                Ok(Item::Block(block, at)) => {
                    trace!(target: "quicast::cc", seq = block.seq(), path = ?conn.stats().path, space = conn.datagram_send_buffer_space(), "block");
                    let now = Instant::now();
                    let wire = block.wire_bytes(usize::MAX) as u64;
                    let shards = block.datagrams().len() as u64;
                    let offered = &mut viewer.offered;
                    offered.blocks += 1;
                    offered.shards += shards;
                    offered.max_block_shards = offered.max_block_shards.max(shards);
                    viewer.sender.push_block(now, block, at);
                    if viewer.floor_set.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
                        viewer.floor_set = Some(now);
                        // Data at the measured rate plus at most all encoded parity.
                        let rate = viewer.sender.rate() * (1.0 + shared.config.fec.redundancy());
                        shared.floor.set_rate(rate as u64, wire);
                    }
                }
                Ok(Item::End { last_seq }) => {
                    queue(shared, conn, &ctl, ControlMessage::EndOfStream { last_seq })?;
                    linger = Some(tokio::time::Instant::now() + END_LINGER);
                }
                Ok(Item::Failed { reason }) => {
                    let code = CloseCode::PublisherFailed;
                    // As at shutdown: the writer sends it, the caller closes.
                    queue(shared, conn, &ctl, ControlMessage::Goodbye { code: code.code(), reason: reason.clone() })?;
                    return Err(ConnEnd::Closed { code, reason });
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    shared.counters.blocks_skipped.fetch_add(n, Relaxed);
                    let offered = &mut viewer.offered;
                    offered.blocks += n;
                    offered.shards += n.saturating_mul(offered.max_block_shards.max(1));
                    debug!(skipped = n, "viewer fell behind; skipping to newer blocks");
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(close(conn, CloseCode::Normal, "stream closed"));
                }
            },
            _ = send_timer => {}
            msg = reader.next() => {
                let msg = match msg {
                    Ok(Some(msg)) => msg,
                    Ok(None) => return Err(close(conn, CloseCode::Normal, "viewer left")),
                    Err(e) => return Err(frame_error(shared, conn, e)),
                };
                if !limiter.take(Instant::now()) {
                    shared.counters.control_errors.fetch_add(1, Relaxed);
                    return Err(close(conn, CloseCode::RateLimited, "control message rate exceeded"));
                }
                match msg {
                    ControlMessage::Report(report) => {
                        shared.counters.reports.fetch_add(1, Relaxed);
                        // Datagrams that left: quinn's evictions never count as path loss.
                        let sent_shards = conn.stats().frame_tx.datagram;
                        let limits = viewer.published(sent_shards, Instant::now());
                        match viewer.validator.check_within(&report, &limits) {
                            Ok(report) => shared.analytics.offer(viewer.input(InputKind::Report {
                                report,
                                sent_shards,
                            })),
                            // A real receiver counts a rebuilt block before the
                            // blocks ahead of it are released, so this one can be
                            // honest for a moment: dropped, not closed.
                            Err(e @ Rejected::RecoveredExceedsDelivered) => {
                                shared.counters.reports_rejected.fetch_add(1, Relaxed);
                                debug!(error = %e, "report dropped");
                            }
                            // No real viewer sends this: nothing of it may reach the figures.
                            Err(e) => {
                                let c = &shared.counters;
                                c.reports_rejected.fetch_add(1, Relaxed);
                                c.reports_impossible.fetch_add(1, Relaxed);
                                c.control_errors.fetch_add(1, Relaxed);
                                debug!(error = %e, ?limits, "impossible report");
                                return Err(close(
                                    conn,
                                    CloseCode::ProtocolViolation,
                                    format!("impossible report: {e}"),
                                ));
                            }
                        }
                    }
                    ControlMessage::Stall => shared.analytics.offer(viewer.input(InputKind::Stall)),
                    ControlMessage::Resume => shared.analytics.offer(viewer.input(InputKind::Resume)),
                    ControlMessage::Event(e) => shared.analytics.offer(viewer.input(InputKind::App(e))),
                    ControlMessage::Leave => return Err(close(conn, CloseCode::Normal, "viewer left")),
                    other => {
                        shared.counters.control_errors.fetch_add(1, Relaxed);
                        return Err(close(
                            conn,
                            CloseCode::ProtocolViolation,
                            format!("unexpected {} from viewer", other.name()),
                        ));
                    }
                }
            }
            Ok(()) = viewer.feedback.changed() => {
                let (summary, loss) = {
                    let fb = viewer.feedback.borrow_and_update();
                    (fb.summary, fb.loss)
                };
                // A congested path is not given more parity (the sender holds
                // it at the floor), whatever the loss the congestion caused.
                viewer.sender.set_loss(loss);
                if let Some(summary) = summary {
                    queue(shared, conn, &ctl, ControlMessage::Summary(summary))?;
                }
            }
            dg = conn.read_datagram() => match dg {
                Ok(dg) => {
                    shared.counters.datagrams_from_viewers.fetch_add(1, Relaxed);
                    repair(shared, viewer, Instant::now(), &dg, &mut scratch);
                }
                Err(e) => return Err(e.into()),
            },
            _ = shutting_down(&mut shutdown) => {
                let bye = ControlMessage::Goodbye {
                    code: CloseCode::Shutdown.code(),
                    reason: "server shutting down".into(),
                };
                // The writer sends it and finishes the stream; the caller
                // closes once it has (bounded).
                let _ = ctl.try_send(bye);
                return Err(ConnEnd::Closed {
                    code: CloseCode::Shutdown,
                    reason: "server shutting down".into(),
                });
            }
            _ = linger_sleep => return Err(close(conn, CloseCode::Normal, "end of stream")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_check_accepts_any_configured_token_only() {
        let a = Bytes::from_static(b"alpha");
        let b = Bytes::from_static(b"bravo");
        assert!(token_ok(&[], b""));
        assert!(token_ok(&[&a, &b], b"bravo"));
        assert!(token_ok(&[&a], b"alpha"));
        assert!(!token_ok(&[&a, &b], b"alph"));
        assert!(!token_ok(&[&a], b""));
        assert!(!token_ok(&[&a], b"alphaa"));
    }
}
