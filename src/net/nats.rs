//! THIN SHELL: analytics through NATS JetStream.
//!
//! Two halves, both around the pure [`deployment`](crate::analytics::deployment) module:
//!
//! - The **publisher** (crate-internal, one per [`Server`](crate::Server) configured with
//!   [`ServerConfig::nats`](crate::ServerConfig::nats)): the analytics task hands it every
//!   event it applies without waiting (a bounded channel; full = counted
//!   drop), and its own task numbers them into a bounded [`Outbox`], publishes them with a
//!   `Nats-Msg-Id`, and keeps each until JetStream acknowledges it. While NATS is
//!   unreachable the outbox fills (bounded, counted) and is resent, oldest first, once it is
//!   back; a resend of an event that was already stored is dropped by JetStream's duplicate
//!   window.
//! - The **aggregator** ([`NatsAggregator`]): a durable pull consumer on the deployment's
//!   stream feeding one [`DeploymentAggregator`], acknowledging each message after it is
//!   applied, with one Prometheus exposition for the deployment.
//!
//! # Exact counts across restarts
//!
//! The aggregator keeps its state in memory only. When [`NatsAggregator::run`] starts, it
//! deletes its durable consumer and creates it again delivering the whole stream
//! ([`DeliverPolicy::All`]), so a restarted aggregator rebuilds exactly the state it had by
//! replaying every event, then goes on with new ones. While it runs, the durable consumer
//! carries it across NATS restarts and reconnects; a redelivered message (an ack lost in
//! one) is recognised by its stream sequence and skipped, and a second copy of an event
//! (a resend stored after the duplicate window) by its message id. This is exact as long as
//! the stream keeps every event of the deployment (the stream is created with no age or
//! size limit; an operator who sets one trades exactness for space), and the replay costs
//! a few microseconds per stored event at start. One aggregator per durable name.

use std::{
    borrow::Cow,
    future::Future,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, DeliverPolicy},
    context::PublishAckFuture,
    message::PublishMessage,
    stream,
};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::analytics::{
    deployment::{
        check_name, EventClock, MessageId, NameError, Names, Outbox, ServerFigures, ServerRecord,
        DUPLICATE_WINDOW,
    },
    AggregatorConfig, DeploymentAggregator, LogRecord, Metric, MetricKind, Snapshot,
};

/// How long the first connection may take before the server says NATS is
/// unreachable.
const UNREACHABLE_AFTER: Duration = Duration::from_secs(2);

/// Default events the channel from the analytics task to the publisher holds.
pub const DEFAULT_NATS_QUEUE: usize = 4_096;
/// Events published before waiting for their acknowledgments.
const IN_FLIGHT: usize = 256;
/// How long one publish or stream request waits for NATS.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait between attempts while NATS is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Where a server publishes its events (see [`ServerConfig::nats`](crate::ServerConfig::nats)).
#[derive(Debug, Clone)]
pub(crate) struct NatsSettings {
    pub(crate) url: String,
    pub(crate) names: Names,
    pub(crate) server_id: String,
    pub(crate) buffer: usize,
}

/// The publisher's counters, shared with its handle.
#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    duplicates: AtomicU64,
    buffered: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_buffer_full: AtomicU64,
    dropped_unsent: AtomicU64,
    errors: AtomicU64,
    /// Set by the client's event callback.
    connected: Arc<AtomicBool>,
}

/// What a server's NATS publisher has done, from [`Server::nats_stats`](crate::Server::nats_stats).
///
/// Every event offered ends in exactly one of: `published`, `buffered` (still waiting), or
/// one of the `dropped_*` counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsStats {
    /// Events JetStream acknowledged (each once, however often it was sent).
    pub published: u64,
    /// Acknowledgments that said the stream already had the event (a resend after a lost
    /// acknowledgment, dropped by the duplicate window).
    pub duplicates: u64,
    /// Events waiting for an acknowledgment now.
    pub buffered: u64,
    /// Events dropped because the channel from the analytics task was full.
    pub dropped_queue_full: u64,
    /// Events dropped because the outbox was at its limit (NATS unreachable too long).
    pub dropped_buffer_full: u64,
    /// Events still buffered when the server stopped and its grace ran out.
    pub dropped_unsent: u64,
    /// Failed publish or stream requests (each is retried).
    pub errors: u64,
    /// Whether the client is connected to NATS now.
    pub connected: bool,
}

impl Counters {
    fn stats(&self) -> NatsStats {
        NatsStats {
            published: self.published.load(Relaxed),
            duplicates: self.duplicates.load(Relaxed),
            buffered: self.buffered.load(Relaxed),
            dropped_queue_full: self.dropped_queue_full.load(Relaxed),
            dropped_buffer_full: self.dropped_buffer_full.load(Relaxed),
            dropped_unsent: self.dropped_unsent.load(Relaxed),
            errors: self.errors.load(Relaxed),
            connected: self.connected.load(Relaxed),
        }
    }
}

/// The analytics task's end of the publisher.
pub(crate) struct Tap {
    tx: mpsc::Sender<LogRecord<'static>>,
    counters: Arc<Counters>,
}

impl Tap {
    /// Hands an applied event to the publisher without waiting; a full channel drops it
    /// (counted), so NATS never slows the analytics pipeline.
    pub(crate) fn offer(&self, record: &LogRecord<'_>) {
        let owned = LogRecord {
            run: record.run.as_deref().map(|r| Cow::Owned(r.to_owned())),
            unix_ms: record.unix_ms,
            at_ms: record.at_ms,
            peer: record.peer,
            input: Cow::Owned(record.input.clone().into_owned()),
        };
        if self.tx.try_send(owned).is_err() {
            self.counters.dropped_queue_full.fetch_add(1, Relaxed);
        }
    }
}

/// The server's handle on its publisher: counters, and the wait for the final flush.
pub(crate) struct NatsPublisher {
    counters: Arc<Counters>,
    done: watch::Receiver<bool>,
}

impl NatsPublisher {
    pub(crate) fn stats(&self) -> NatsStats {
        self.counters.stats()
    }

    /// Waits (at most `grace`) until every event offered before the tap was dropped is
    /// acknowledged; what is left is counted in `dropped_unsent`.
    pub(crate) async fn flush(&self, grace: Duration) {
        let mut done = self.done.clone();
        if tokio::time::timeout(grace, done.wait_for(|d| *d))
            .await
            .is_err()
        {
            let left = self.counters.buffered.swap(0, Relaxed);
            self.counters.dropped_unsent.fetch_add(left, Relaxed);
        }
    }

    /// The publisher's figures as metrics for the server's exposition.
    pub(crate) fn metrics(&self) -> Vec<Metric> {
        let s = self.stats();
        let m = |name: &str, help: &str, kind, value: u64, reason: Option<&str>| Metric {
            name: name.into(),
            help: help.into(),
            kind,
            value: value as f64,
            labels: reason
                .map(|r| vec![("reason".to_string(), r.to_string())])
                .unwrap_or_default(),
        };
        let dropped = "Events not published to NATS, by reason.";
        vec![
            m(
                "quicast_nats_published_total",
                "Events acknowledged by JetStream.",
                MetricKind::Counter,
                s.published,
                None,
            ),
            m(
                "quicast_nats_duplicates_total",
                "Resent events JetStream already had (dropped by its duplicate window).",
                MetricKind::Counter,
                s.duplicates,
                None,
            ),
            m(
                "quicast_nats_buffered",
                "Events waiting for a JetStream acknowledgment.",
                MetricKind::Gauge,
                s.buffered,
                None,
            ),
            m(
                "quicast_nats_dropped_total",
                dropped,
                MetricKind::Counter,
                s.dropped_queue_full,
                Some("queue_full"),
            ),
            m(
                "quicast_nats_dropped_total",
                dropped,
                MetricKind::Counter,
                s.dropped_buffer_full,
                Some("buffer_full"),
            ),
            m(
                "quicast_nats_dropped_total",
                dropped,
                MetricKind::Counter,
                s.dropped_unsent,
                Some("unsent_at_shutdown"),
            ),
            m(
                "quicast_nats_errors_total",
                "Failed NATS publish or stream requests (retried).",
                MetricKind::Counter,
                s.errors,
                None,
            ),
            m(
                "quicast_nats_connected",
                "1 while connected to NATS.",
                MetricKind::Gauge,
                u64::from(s.connected),
                None,
            ),
        ]
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Tells one start of a server from the next: microseconds since the Unix epoch at start,
/// mixed with the process id so two servers started in the same microsecond differ.
fn run_id() -> u64 {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    micros ^ (u64::from(std::process::id()) << 48)
}

/// Creates the publisher: the tap for the analytics task, the server's handle, and the
/// task future (the server's `run` drives it).
pub(crate) fn publisher(
    settings: NatsSettings,
) -> (
    Tap,
    NatsPublisher,
    impl Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = mpsc::channel(DEFAULT_NATS_QUEUE);
    let counters = Arc::new(Counters::default());
    let (done_tx, done) = watch::channel(false);
    let task = publish_task(settings, rx, counters.clone(), done_tx);
    (
        Tap {
            tx,
            counters: counters.clone(),
        },
        NatsPublisher { counters, done },
        task,
    )
}

/// A NATS client that connects (and reconnects) in the background, quickly.
async fn client(url: &str, connected: Option<Arc<AtomicBool>>) -> Option<async_nats::Client> {
    let mut options = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(REQUEST_TIMEOUT)
        // The default backoff grows to seconds; events are waiting, so retry often.
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis(50 * attempts.min(20) as u64).min(MAX_BACKOFF)
        });
    if let Some(flag) = connected {
        let shown = url.to_owned();
        options = options.event_callback(move |event| {
            let (flag, url) = (flag.clone(), shown.clone());
            async move {
                match event {
                    async_nats::Event::Connected => {
                        flag.store(true, Relaxed);
                        info!(url, "NATS: connected");
                    }
                    async_nats::Event::Disconnected | async_nats::Event::Closed => {
                        flag.store(false, Relaxed);
                        warn!(
                            url,
                            "NATS: disconnected; events are buffered and resent once it is back"
                        );
                    }
                    _ => {}
                }
            }
        });
    }
    match options.connect(url).await {
        Ok(c) => Some(c),
        Err(e) => {
            // Only a bad URL fails here: connection errors are retried in the background.
            warn!(url, error = %e, "NATS: cannot use this address; events are not published");
            None
        }
    }
}

fn stream_config(names: &Names) -> stream::Config {
    stream::Config {
        name: names.stream(),
        subjects: vec![names.wildcard()],
        duplicate_window: DUPLICATE_WINDOW,
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        ..Default::default()
    }
}

/// The publisher task's state: the outbox and what it needs to fill it.
struct Publishing {
    outbox: Outbox<(String, Bytes)>,
    names: Names,
    server: String,
    counters: Arc<Counters>,
    rx: mpsc::Receiver<LogRecord<'static>>,
    /// False once the analytics task dropped its tap (the server is stopping).
    open: bool,
}

impl Publishing {
    fn take(&mut self, record: LogRecord<'static>) {
        let subject = self.names.subject(&record.input.stream);
        let record = ServerRecord {
            server: Cow::Borrowed(&self.server),
            record,
        };
        // An Input is plain strings and numbers: serializing it cannot fail.
        let body = serde_json::to_vec(&record).unwrap_or_default();
        match self.outbox.push((subject, Bytes::from(body))) {
            Ok(_) => self.counters.buffered.fetch_add(1, Relaxed),
            Err(_) => self.counters.dropped_buffer_full.fetch_add(1, Relaxed),
        };
    }

    /// Runs `fut` while moving whatever the analytics task sends into the outbox, so the
    /// channel keeps draining while NATS is slow or down.
    async fn taking<F: Future>(&mut self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return out,
                msg = self.rx.recv(), if self.open => match msg {
                    Some(record) => self.take(record),
                    None => self.open = false,
                },
            }
        }
    }

    /// Takes everything queued without waiting.
    fn take_queued(&mut self) {
        while let Ok(record) = self.rx.try_recv() {
            self.take(record);
        }
    }

    fn acked(&mut self, seq: u64, duplicate: bool) {
        if self.outbox.ack(seq) {
            self.counters.published.fetch_add(1, Relaxed);
            // Saturating: a flush that gave up has already moved the count to unsent.
            let _ = self
                .counters
                .buffered
                .fetch_update(Relaxed, Relaxed, |b| Some(b.saturating_sub(1)));
        }
        if duplicate {
            self.counters.duplicates.fetch_add(1, Relaxed);
        }
    }
}

async fn publish_task(
    settings: NatsSettings,
    rx: mpsc::Receiver<LogRecord<'static>>,
    counters: Arc<Counters>,
    done: watch::Sender<bool>,
) {
    let run = run_id();
    let mut p = Publishing {
        outbox: Outbox::new(settings.buffer),
        names: settings.names.clone(),
        server: settings.server_id.clone(),
        counters: counters.clone(),
        rx,
        open: true,
    };
    let Some(client) = client(&settings.url, Some(counters.connected.clone())).await else {
        // An unusable URL: every event is counted as dropped rather than silently lost.
        while p.rx.recv().await.is_some() {
            counters.dropped_buffer_full.fetch_add(1, Relaxed);
        }
        done.send_replace(true);
        return;
    };
    if !counters.connected.load(Relaxed) {
        // The first connection is retried in the background and raises no
        // event until it succeeds: say once that events wait for it.
        let (url, connected) = (settings.url.clone(), counters.connected.clone());
        tokio::spawn(async move {
            tokio::time::sleep(UNREACHABLE_AFTER).await;
            if !connected.load(Relaxed) {
                warn!(
                    url,
                    "NATS: unreachable; events are buffered and sent once it answers"
                );
            }
        });
    }
    let js = jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .build(client);
    info!(url = %settings.url, stream = %settings.names.stream(), server = %settings.server_id, run = %format!("{run:x}"), "NATS: publishing analytics events");
    let mut stream_ready = false;
    let mut backoff = Duration::ZERO;
    loop {
        if !backoff.is_zero() {
            p.taking(tokio::time::sleep(backoff)).await;
        }
        p.take_queued();
        if p.outbox.is_empty() {
            if !p.open {
                break;
            }
            match p.rx.recv().await {
                Some(record) => p.take(record),
                None => p.open = false,
            }
            continue;
        }
        if !stream_ready {
            let config = stream_config(&settings.names);
            match p.taking(js.get_or_create_stream(config)).await {
                Ok(_) => stream_ready = true,
                Err(e) => {
                    counters.errors.fetch_add(1, Relaxed);
                    debug!(error = %e, "NATS: stream not ready");
                    backoff = next_backoff(backoff);
                    continue;
                }
            }
        }
        // Publish a window of the oldest events, then collect their acknowledgments in
        // order. A failure leaves that event (and any not acknowledged) in the outbox for
        // the next round; JetStream drops the copies it already has by message id.
        let batch: Vec<(u64, String, Bytes)> = p
            .outbox
            .oldest(IN_FLIGHT)
            .map(|(seq, (subject, body))| (seq, subject.clone(), body.clone()))
            .collect();
        let mut acks: Vec<(u64, PublishAckFuture)> = Vec::with_capacity(batch.len());
        let mut failed = false;
        for (seq, subject, body) in batch {
            let id = MessageId {
                server: settings.server_id.clone(),
                run,
                seq,
            };
            let msg = PublishMessage::build()
                .payload(body)
                .message_id(id.to_string());
            match p.taking(js.send_publish(subject, msg)).await {
                Ok(ack) => acks.push((seq, ack)),
                Err(e) => {
                    debug!(error = %e, "NATS: publish failed");
                    failed = true;
                    break;
                }
            }
        }
        for (seq, ack) in acks {
            match p.taking(std::future::IntoFuture::into_future(ack)).await {
                Ok(ack) => p.acked(seq, ack.duplicate),
                Err(e) => {
                    debug!(error = %e, "NATS: no acknowledgment");
                    failed = true;
                    // A missing stream (deleted, or JetStream restarting) is created again.
                    stream_ready = false;
                    // NATS is down or unwell: waiting out each remaining timeout in turn
                    // would only delay the resend. What they carried stays in the outbox.
                    break;
                }
            }
        }
        if failed {
            counters.errors.fetch_add(1, Relaxed);
            backoff = next_backoff(backoff);
        } else {
            backoff = Duration::ZERO;
        }
    }
    done.send_replace(true);
}

fn next_backoff(b: Duration) -> Duration {
    (b * 2).clamp(Duration::from_millis(50), MAX_BACKOFF)
}

/// Default durable consumer name of a [`NatsAggregator`].
pub const DEFAULT_DURABLE: &str = "quicast-aggregator";
/// Messages asked for per pull.
const PULL_BATCH: usize = 512;
/// How long one pull waits for messages before asking again.
const PULL_EXPIRES: Duration = Duration::from_millis(250);
/// How long JetStream waits for an acknowledgment before redelivering. A message lost
/// with a pull comes back after this, while later events of its server run wait in the
/// aggregator's hold ([`DEFAULT_HOLD`](crate::analytics::deployment::DEFAULT_HOLD) covers
/// this long at 1,600 events/s per server).
const ACK_WAIT: Duration = Duration::from_secs(5);

/// Settings of a [`NatsAggregator`].
#[derive(Debug, Clone)]
pub struct NatsAggregatorConfig {
    url: String,
    names: Names,
    durable: String,
    analytics: AggregatorConfig,
}

impl NatsAggregatorConfig {
    /// Consumes deployment `deployment`'s events from the NATS server at `url`
    /// (e.g. `nats://127.0.0.1:4222`). The deployment name is checked like
    /// [`ServerConfig::nats`](crate::ServerConfig::nats)'s.
    pub fn new(url: impl Into<String>, deployment: &str) -> Result<Self, NameError> {
        Ok(NatsAggregatorConfig {
            url: url.into(),
            names: Names::new(deployment)?,
            durable: DEFAULT_DURABLE.into(),
            analytics: AggregatorConfig::default(),
        })
    }

    /// Durable consumer name (default [`DEFAULT_DURABLE`]). One aggregator per name: each
    /// start rewinds its consumer to the start of the stream.
    pub fn durable(&mut self, name: &str) -> Result<&mut Self, NameError> {
        check_name("durable consumer name", name)?;
        self.durable = name.into();
        Ok(self)
    }

    /// Limits and models of the aggregator (default [`AggregatorConfig::default`]).
    pub fn analytics(&mut self, config: AggregatorConfig) -> &mut Self {
        self.analytics = config;
        self
    }
}

/// What a [`NatsAggregator`] has consumed, from [`NatsAggregator::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsAggregatorStats {
    /// Messages received from the consumer, redeliveries included.
    pub received: u64,
    /// Messages acknowledged (after they were applied or skipped).
    pub acked: u64,
    /// Messages delivered more than once (an ack or a pull lost); a copy of an event
    /// already applied is skipped by its message id.
    pub redelivered: u64,
    /// Highest stream sequence received.
    pub stream_sequence: u64,
    /// Failed NATS requests (each is retried).
    pub errors: u64,
    /// Whether the consumer is set up and pulling now.
    pub consuming: bool,
}

struct AggState {
    agg: DeploymentAggregator,
    clock: EventClock,
    stats: NatsAggregatorStats,
}

/// Consumes every server's events from the deployment's JetStream stream into one
/// [`DeploymentAggregator`], for one `/metrics` of the whole deployment.
///
/// [`run`](Self::run) is the driver; the app spawns it (nothing is spawned behind its
/// back). See the [module docs](self) for how counts stay exact across restarts.
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use quicast::net::{NatsAggregator, NatsAggregatorConfig};
/// let agg = NatsAggregator::new(NatsAggregatorConfig::new("nats://127.0.0.1:4222", "prod")?);
/// tokio::spawn(agg.run());
/// println!("{}", agg.metrics_text());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NatsAggregator {
    config: Arc<NatsAggregatorConfig>,
    state: Arc<Mutex<AggState>>,
}

impl std::fmt::Debug for NatsAggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsAggregator")
            .field("stream", &self.config.names.stream())
            .field("durable", &self.config.durable)
            .finish_non_exhaustive()
    }
}

impl NatsAggregator {
    /// An aggregator with empty state; [`run`](Self::run) fills it.
    pub fn new(config: NatsAggregatorConfig) -> NatsAggregator {
        let agg = DeploymentAggregator::new(config.analytics.clone());
        NatsAggregator {
            config: Arc::new(config),
            state: Arc::new(Mutex::new(AggState {
                agg,
                clock: EventClock::new(Instant::now()),
                stats: NatsAggregatorStats::default(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AggState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The deployment's figures now (as [`Server::analytics`](crate::Server::analytics)
    /// is one server's).
    pub fn snapshot(&self) -> Snapshot {
        let s = self.lock();
        s.agg.snapshot(s.clock.now(wall_ms()))
    }

    /// Per-server figures: events applied, viewers, joins, duplicates skipped, gaps.
    pub fn servers(&self) -> std::collections::BTreeMap<String, ServerFigures> {
        self.lock().agg.servers().clone()
    }

    /// What has been consumed.
    pub fn stats(&self) -> NatsAggregatorStats {
        self.lock().stats
    }

    /// Prometheus text for the deployment: [`render`](crate::analytics::render) of the
    /// snapshot, the per-server families of [`DeploymentAggregator::metrics`] (label
    /// `server`), and the consumer's counters (`quicast_aggregator_*`).
    pub fn metrics_text(&self) -> String {
        let s = self.lock();
        let snapshot = s.agg.snapshot(s.clock.now(wall_ms()));
        let mut extra = s.agg.metrics();
        let st = s.stats;
        drop(s);
        let m = |name: &str, help: &str, kind, value: u64| Metric {
            name: name.into(),
            help: help.into(),
            kind,
            value: value as f64,
            labels: Vec::new(),
        };
        extra.extend([
            m(
                "quicast_aggregator_messages_received_total",
                "Messages received from the durable consumer, redeliveries included.",
                MetricKind::Counter,
                st.received,
            ),
            m(
                "quicast_aggregator_messages_acked_total",
                "Messages acknowledged after they were applied.",
                MetricKind::Counter,
                st.acked,
            ),
            m(
                "quicast_aggregator_redelivered_total",
                "Messages delivered more than once (copies of applied events are skipped).",
                MetricKind::Counter,
                st.redelivered,
            ),
            m(
                "quicast_aggregator_stream_sequence",
                "Highest stream sequence received.",
                MetricKind::Gauge,
                st.stream_sequence,
            ),
            m(
                "quicast_aggregator_errors_total",
                "Failed NATS requests (retried).",
                MetricKind::Counter,
                st.errors,
            ),
            m(
                "quicast_aggregator_consuming",
                "1 while the consumer is set up and pulling.",
                MetricKind::Gauge,
                u64::from(st.consuming),
            ),
        ]);
        crate::analytics::render(&snapshot, &extra)
    }

    /// Consumes until dropped: rewinds the durable consumer to the start of the stream,
    /// replays it, then applies new events as they come, reconnecting as needed.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops consuming; the state stays readable. A new `run` on the
    /// same aggregator would apply the stream again: start a new [`NatsAggregator`]
    /// instead.
    pub fn run(&self) -> impl Future<Output = ()> + Send + 'static {
        let this = self.clone();
        async move { this.consume().await }
    }

    async fn consume(&self) {
        let config = self.config.clone();
        let Some(client) = client(&config.url, None).await else {
            return;
        };
        let js = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .build(client);
        let mut rewound = false;
        let mut backoff = Duration::ZERO;
        loop {
            self.lock().stats.consuming = false;
            if !backoff.is_zero() {
                tokio::time::sleep(backoff).await;
            }
            backoff = next_backoff(backoff);
            let stream = match js.get_or_create_stream(stream_config(&config.names)).await {
                Ok(s) => s,
                Err(e) => {
                    self.error("stream", &e);
                    continue;
                }
            };
            if !rewound {
                match stream.delete_consumer(&config.durable).await {
                    Ok(_) => {}
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => {
                        self.error("delete consumer", &e);
                        continue;
                    }
                }
                rewound = true;
            }
            // After a rewind the consumer starts at the beginning; if it vanished while we
            // ran (deleted by hand), it resumes after the last message applied.
            let last = self.lock().stats.stream_sequence;
            let deliver_policy = if last == 0 {
                DeliverPolicy::All
            } else {
                DeliverPolicy::ByStartSequence {
                    start_sequence: last + 1,
                }
            };
            let consumer_config = pull::Config {
                durable_name: Some(config.durable.clone()),
                deliver_policy,
                ack_policy: AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                filter_subject: config.names.wildcard(),
                ..Default::default()
            };
            let consumer = match stream
                .get_or_create_consumer(&config.durable, consumer_config)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    self.error("consumer", &e);
                    continue;
                }
            };
            self.lock().stats.consuming = true;
            // Pull until something fails, then set up again.
            loop {
                let mut batch = match consumer
                    .batch()
                    .max_messages(PULL_BATCH)
                    .expires(PULL_EXPIRES)
                    .messages()
                    .await
                {
                    Ok(b) => b,
                    Err(e) => {
                        self.error("pull", &e);
                        break;
                    }
                };
                let mut failed = false;
                // A pull lost in a reconnect is only timed out by the client seconds after
                // its expiry: give up on it sooner and pull again.
                let patience = PULL_EXPIRES + Duration::from_secs(1);
                while let Ok(Some(msg)) = tokio::time::timeout(patience, batch.next()).await {
                    match msg {
                        Ok(msg) => {
                            self.handle(&msg);
                            // Acknowledged after it is applied. A lost ack means a
                            // redelivery, which `handle` skips.
                            match msg.ack().await {
                                Ok(()) => self.lock().stats.acked += 1,
                                Err(e) => self.error("ack", &*e),
                            }
                            backoff = Duration::ZERO;
                        }
                        Err(e) => {
                            self.error("message", &e);
                            failed = true;
                            break;
                        }
                    }
                }
                if failed {
                    break;
                }
            }
        }
    }

    fn error(&self, what: &str, e: &dyn std::fmt::Display) {
        self.lock().stats.errors += 1;
        debug!(what, error = %e, "NATS aggregator: retrying");
    }

    /// Applies one message (or counts why not).
    fn handle(&self, msg: &jetstream::Message) {
        let info = msg.info().ok();
        let stream_seq = info.as_ref().map(|i| i.stream_sequence);
        let redelivered = info.is_some_and(|i| i.delivered > 1);
        let id = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .and_then(|v| MessageId::parse(v.as_str()));
        let record = serde_json::from_slice::<ServerRecord>(&msg.payload).ok();
        let mut s = self.lock();
        s.stats.received += 1;
        if redelivered {
            s.stats.redelivered += 1;
        }
        let Some(stream_seq) = stream_seq else {
            s.agg.malformed();
            return;
        };
        s.stats.stream_sequence = s.stats.stream_sequence.max(stream_seq);
        // Order and duplicates are settled per server run by the message id, not by the
        // stream sequence: a message delivered to a pull that was lost comes back after
        // the ones behind it, and must still be applied.
        // The wall clock orders events across servers; a message without it is not
        // one a quicast server wrote.
        let wall = record.as_ref().and_then(|r| r.record.unix_ms);
        match (id, record, wall) {
            (Some(id), Some(record), Some(unix_ms)) if record.server == id.server => {
                let at = s.clock.event(unix_ms);
                s.agg.apply(&id, record.record.input.into_owned(), at);
            }
            _ => s.agg.malformed(),
        }
    }
}

fn is_not_found(e: &jetstream::stream::ConsumerError) -> bool {
    matches!(e.kind(), jetstream::stream::ConsumerErrorKind::JetStream(js)
        if js.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND)
}
