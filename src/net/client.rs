//! The viewer: connect, say Hello, then a `Stream` of in-order events.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures_core::Stream;
use tokio::sync::mpsc;
use tracing::{debug, trace};

use super::{
    control::{self, FrameError, FrameReader},
    tls,
};
use crate::{
    config::ClientConfig,
    session::{Event, Receiver, ReceiverConfig, ReceiverStats},
    wire::{self, ClientEvent, ControlMessage, Report, Summary},
    ClientError, CloseCode,
};

/// First wait before a reconnect attempt; doubled after each failure.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnect attempts.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Connects viewers to a quicast server.
#[derive(Debug, Clone, Copy)]
pub struct Client;

impl Client {
    /// Connects on a fresh local UDP socket and subscribes to the configured
    /// stream. Returns once the server has sent Welcome.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future abandons the connection attempt.
    pub async fn connect(config: ClientConfig) -> Result<Subscription, ClientError> {
        let endpoint = Self::endpoint(config.server, None)?;
        Self::connect_with(&endpoint, config).await
    }

    /// A client endpoint on an ephemeral port of the server's address family,
    /// on `socket` if given (e.g. a [`LossySocket`](crate::sim::LossySocket)).
    pub fn endpoint(
        server: SocketAddr,
        socket: Option<Arc<dyn quinn::AsyncUdpSocket>>,
    ) -> Result<quinn::Endpoint, ClientError> {
        let runtime = quinn::default_runtime()
            .ok_or_else(|| ClientError::Bind(std::io::Error::other("no async runtime")))?;
        let socket = match socket {
            Some(s) => s,
            None => {
                let bind: SocketAddr = if server.is_ipv6() {
                    "[::]:0".parse().expect("valid address")
                } else {
                    "0.0.0.0:0".parse().expect("valid address")
                };
                let std = std::net::UdpSocket::bind(bind).map_err(ClientError::Bind)?;
                runtime.wrap_udp_socket(std).map_err(ClientError::Bind)?
            }
        };
        quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            None,
            socket,
            runtime,
        )
        .map_err(ClientError::Bind)
    }

    /// Connects through an existing endpoint (shared by several viewers, or on a
    /// simulated lossy socket).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: dropping the future abandons the connection attempt.
    pub async fn connect_with(
        endpoint: &quinn::Endpoint,
        config: ClientConfig,
    ) -> Result<Subscription, ClientError> {
        let timeout = config.handshake_timeout;
        match tokio::time::timeout(timeout, Self::handshake(endpoint, config)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout),
        }
    }

    async fn handshake(
        endpoint: &quinn::Endpoint,
        config: ClientConfig,
    ) -> Result<Subscription, ClientError> {
        let started = Instant::now();
        let link = open(endpoint, &config).await?;
        let mut rc = ReceiverConfig::new(link.stream_id, config.latency);
        rc.decoder(config.decoder.clone())
            .sync_wait(config.sync_wait);
        let mut receiver = Receiver::new(rc);
        receiver.start(started);
        receiver.set_clock(link.sender_clock_us, link.at);
        receiver.set_rtt(link.conn.rtt());
        let shared = Arc::new(Mutex::new(Status {
            receiver,
            summary: None,
            conn: link.conn.clone(),
            closed: false,
            reconnects: 0,
            missed: 0,
        }));
        let (app_tx, app_rx) = mpsc::channel(64);
        let session = Session {
            next_report: tokio::time::Instant::now() + link.report_interval,
            link,
            endpoint: endpoint.clone(),
            config,
            shared: shared.clone(),
            app_rx,
            pending: None,
            done: false,
            left: false,
            base: Report::default(),
            base_at: started,
            resumed: None,
            rtt_at: Instant::now(),
        };
        let events = Box::pin(futures_unfold(session));
        Ok(Subscription {
            events,
            shared,
            app_tx,
        })
    }
}

/// One connection to the server, past Welcome.
struct Link {
    conn: quinn::Connection,
    send: quinn::SendStream,
    reader: FrameReader,
    stream_id: u32,
    /// The sender's stream clock at `at`, estimated from Welcome and the RTT.
    sender_clock_us: u64,
    at: Instant,
    report_interval: Duration,
}

/// QUIC handshake, Hello, Welcome.
async fn open(endpoint: &quinn::Endpoint, config: &ClientConfig) -> Result<Link, ClientError> {
    let crypto = tls::client_crypto(&config.roots)?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
    client_config.transport_config(tls::transport(
        config.congestion,
        // A viewer sends control traffic only: nothing to hold a window for.
        None,
        config.idle_timeout,
        config.keep_alive,
        Some(config.datagram_receive_buffer),
        64 * 1024,
    ));
    let conn = endpoint
        .connect_with(client_config, config.server, &config.server_name)?
        .await
        .map_err(map_close)?;
    let (mut send, recv) = conn.open_bi().await.map_err(map_close)?;
    let hello = ControlMessage::Hello {
        version: wire::VERSION,
        stream: config.stream.clone(),
        token: config.token.clone(),
        agent: config.agent.clone(),
        latency_ms: (config.latency.as_millis() as u64).clamp(1, wire::MAX_LATENCY_MS),
    };
    let hello_at = Instant::now();
    if let Err(e) = control::write(&mut send, &hello).await {
        return Err(write_error(&conn, e));
    }
    let mut reader = FrameReader::new(recv, wire::MAX_CONTROL_FRAME);
    let msg = match reader.next().await {
        Ok(Some(msg)) => msg,
        Ok(None) | Err(FrameError::Read(_)) => {
            return Err(closed(&conn, "server closed the control stream"))
        }
        Err(e) => return Err(ClientError::Protocol(e.to_string())),
    };
    let read_at = Instant::now();
    let (stream_id, clock_us, report_interval_ms) = match msg {
        ControlMessage::Welcome {
            stream_id,
            clock_us,
            report_interval_ms,
        } => (stream_id, clock_us, report_interval_ms),
        ControlMessage::Reject { code, reason } => {
            return Err(ClientError::from_code(code, reason, true))
        }
        other => {
            return Err(ClientError::Protocol(format!(
                "expected welcome, got {}",
                other.name()
            )))
        }
    };
    // Hello and Welcome are a round trip of their own. quinn's smoothed RTT
    // can be far above it for seconds after a handshake packet was lost (its
    // first sample then includes the retransmission timeout); the exchange
    // itself is inflated only if Hello or Welcome was.
    let rtt = conn.rtt().min(read_at.saturating_duration_since(hello_at));
    debug!(stream_id, ?rtt, quinn_rtt = ?conn.rtt(), "welcome");
    // Only the initial estimate: Welcome left the server half an RTT ago if
    // the path is symmetric and Welcome was not retransmitted. The receiver
    // corrects it from the datagrams' one-way offsets (see `Receiver::set_clock`).
    let half_rtt = rtt / 2;
    Ok(Link {
        conn,
        send,
        reader,
        stream_id,
        sender_clock_us: clock_us + half_rtt.as_micros() as u64,
        at: read_at,
        report_interval: Duration::from_millis(report_interval_ms.clamp(50, 60_000)),
    })
}

/// Whether a failed connection is worth reconnecting: transport failures and
/// a server going away, not rejections, protocol errors or our own close.
fn retryable(e: &ClientError) -> bool {
    match e {
        ClientError::Connection(quinn::ConnectionError::LocallyClosed) => false,
        ClientError::Connection(_) | ClientError::Stream(_) | ClientError::Timeout => true,
        ClientError::Goodbye { code, .. } => *code == CloseCode::Shutdown,
        _ => false,
    }
}

/// Maps a connection close to an error; an application close carries the
/// server's code and reason.
fn map_close(e: quinn::ConnectionError) -> ClientError {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let code = close.error_code.into_inner();
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            // Codes that refuse a subscription are rejections whenever they come.
            let rejected = matches!(
                CloseCode::from_code(code),
                Some(
                    CloseCode::Unauthorized
                        | CloseCode::NoSuchStream
                        | CloseCode::UnsupportedVersion
                        | CloseCode::ServerFull
                        | CloseCode::DatagramsUnsupported
                )
            );
            ClientError::from_code(code, reason, rejected)
        }
        e => ClientError::Connection(e),
    }
}

fn closed(conn: &quinn::Connection, fallback: &str) -> ClientError {
    match conn.close_reason() {
        Some(e) => map_close(e),
        None => ClientError::Stream(fallback.into()),
    }
}

fn write_error(conn: &quinn::Connection, e: quinn::WriteError) -> ClientError {
    match e {
        quinn::WriteError::ConnectionLost(e) => map_close(e),
        e => closed(conn, &e.to_string()),
    }
}

struct Status {
    receiver: Receiver,
    summary: Option<Summary>,
    /// The current connection; replaced on reconnect.
    conn: quinn::Connection,
    /// The app closed the subscription: do not reconnect.
    closed: bool,
    /// Connections re-established after one was lost.
    reconnects: u64,
    /// Blocks published while disconnected that were never seen.
    missed: u64,
}

/// A viewer's subscription: a `Stream` of [`Event`]s in sequence order.
///
/// Polling the stream drives the viewer: it reads datagrams and control
/// messages, expires deadlines and sends the periodic reports. Nothing runs
/// in the background, so an app that stops polling stops the viewer (quinn
/// keeps the connection alive and buffers, then drops, datagrams). Dropping
/// the subscription closes the connection.
pub struct Subscription {
    events: Pin<Box<dyn Stream<Item = Result<Event, ClientError>> + Send>>,
    shared: Arc<Mutex<Status>>,
    app_tx: mpsc::Sender<ClientEvent>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("remote", &self.lock().conn.remote_address())
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next event; `None` after [`Event::End`] or an error.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the work in progress lives in the subscription, not in
    /// the returned future.
    pub async fn next(&mut self) -> Option<Result<Event, ClientError>> {
        std::future::poll_fn(|cx| self.events.as_mut().poll_next(cx)).await
    }

    /// Receiver counters so far.
    pub fn stats(&self) -> ReceiverStats {
        self.lock().receiver.stats().clone()
    }

    /// Times the connection was lost and re-established.
    pub fn reconnects(&self) -> u64 {
        self.lock().reconnects
    }

    /// Blocks published while the viewer was disconnected that it never saw:
    /// neither delivered nor counted in [`ReceiverStats::blocks_lost`]. A
    /// report of delivered blocks is only whole with these added in. See
    /// [`Event::Reconnected`].
    pub fn blocks_missed(&self) -> u64 {
        self.lock().missed
    }

    /// The latest analytics summary from the server.
    pub fn summary(&self) -> Option<Summary> {
        self.lock().summary
    }

    /// The current QUIC connection (RTT, path statistics); a new one after a
    /// reconnect.
    pub fn connection(&self) -> quinn::Connection {
        self.lock().conn.clone()
    }

    /// Queues an application event (pause, quality switch, ...) for the server.
    /// Sent while the subscription is polled. Returns `false` when the queue
    /// (64 events) is full or the subscription has ended.
    pub fn send_event(&self, name: impl Into<String>, value: impl Into<String>) -> bool {
        self.app_tx
            .try_send(ClientEvent {
                name: name.into(),
                value: value.into(),
            })
            .is_ok()
    }

    /// Closes the connection now, telling the server the viewer left. No
    /// reconnect follows.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.conn.close(CloseCode::Normal.varint(), b"viewer left");
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Stream for Subscription {
    type Item = Result<Event, ClientError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.as_mut().poll_next(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.close();
    }
}

struct Session {
    link: Link,
    endpoint: quinn::Endpoint,
    config: ClientConfig,
    shared: Arc<Mutex<Status>>,
    app_rx: mpsc::Receiver<ClientEvent>,
    next_report: tokio::time::Instant,
    /// An event to return before anything else (after a reconnect).
    pending: Option<Event>,
    done: bool,
    left: bool,
    /// The receiver's counters when the current connection began: a report
    /// counts from here, since the server bounds each connection's reports
    /// by what it sent on that connection.
    base: Report,
    base_at: Instant,
    /// After a reconnect, until the first block: the attempts it took and
    /// the highest sequence known before the outage.
    resumed: Option<(u32, Option<u64>)>,
    /// When the receiver's RTT was last refreshed from quinn's estimate.
    rtt_at: Instant,
}

/// How often the receiver's RTT follows quinn's estimate while datagrams
/// keep coming. The timer alone is not enough: on a steady stream a datagram
/// always arrives before the next deadline, so the timer arm may never win,
/// and the receiver would judge repairs on a stale (or, before this, no) RTT.
const RTT_REFRESH: Duration = Duration::from_millis(20);

/// `futures::stream::unfold` without the dependency: the session's state lives
/// in one boxed future between polls, so an in-flight write is never torn.
fn futures_unfold(session: Session) -> impl Stream<Item = Result<Event, ClientError>> + Send {
    type Step = (Session, Option<Result<Event, ClientError>>);
    struct Unfold {
        state: Option<Session>,
        fut: Option<Pin<Box<dyn std::future::Future<Output = Step> + Send>>>,
    }
    impl Stream for Unfold {
        type Item = Result<Event, ClientError>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            if self.fut.is_none() {
                let Some(mut s) = self.state.take() else {
                    return Poll::Ready(None);
                };
                self.fut = Some(Box::pin(async move {
                    let item = s.next_event().await;
                    (s, item)
                }));
            }
            let fut = self.fut.as_mut().expect("set above");
            match fut.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready((s, item)) => {
                    self.fut = None;
                    if item.is_some() {
                        self.state = Some(s);
                    }
                    Poll::Ready(item)
                }
            }
        }
    }
    Unfold {
        state: Some(session),
        fut: None,
    }
}

impl Session {
    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn next_event(&mut self) -> Option<Result<Event, ClientError>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(event) = self.pending.take() {
                return Some(Ok(event));
            }
            match self.step().await {
                Ok(Some(event)) => {
                    if let Some((attempts, before)) = self.resumed.take() {
                        // The first event after a reconnect says how far the
                        // stream moved on meanwhile.
                        let first = match &event {
                            Event::Block { seq, .. } | Event::Lost { seq } => Some(*seq),
                            _ => None,
                        };
                        let missed = match (before, first) {
                            (Some(before), Some(first)) => first.saturating_sub(before + 1),
                            _ => 0,
                        };
                        self.lock().missed += missed;
                        self.pending = Some(event);
                        return Some(Ok(Event::Reconnected { attempts, missed }));
                    }
                    if event == Event::End {
                        self.leave().await;
                        self.done = true;
                    }
                    return Some(Ok(event));
                }
                Ok(None) => {}
                Err(e) => {
                    if let Err(e) = self.recover(e).await {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    /// Does one unit of work: returns an event, nothing yet, or a failure of
    /// the current connection.
    async fn step(&mut self) -> Result<Option<Event>, ClientError> {
        let (event, timeout, stall) = {
            let mut st = self.lock();
            // An event is taken only when no stall change is due: one taken
            // alongside it would be dropped by the early return below (a
            // block delivered after a stall vanished that way).
            match st.receiver.poll_stall() {
                Some(stall) => (None, None, Some(stall)),
                None => (st.receiver.poll_event(), st.receiver.poll_timeout(), None),
            }
        };
        if let Some(stalled) = stall {
            let msg = if stalled {
                ControlMessage::Stall
            } else {
                ControlMessage::Resume
            };
            self.write(&msg).await?;
            return Ok(None);
        }
        if event.is_some() {
            return Ok(event);
        }
        let timer = async {
            match timeout {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let link = &mut self.link;
        tokio::select! {
            dg = link.conn.read_datagram() => {
                let dg = dg.map_err(map_close)?;
                let now = Instant::now();
                let rtt = (now.saturating_duration_since(self.rtt_at) >= RTT_REFRESH)
                    .then(|| link.conn.rtt());
                if rtt.is_some() {
                    self.rtt_at = now;
                }
                let mut st = self.lock();
                if let Some(rtt) = rtt {
                    st.receiver.set_rtt(rtt);
                }
                st.receiver.handle_datagram(now, dg);
            }
            msg = link.reader.next() => match msg {
                Ok(Some(msg)) => self.handle_control(msg)?,
                Ok(None) | Err(FrameError::Read(_)) => {
                    return Err(closed(&self.link.conn, "server closed the control stream"));
                }
                Err(e) => {
                    self.link
                        .conn
                        .close(CloseCode::ProtocolViolation.varint(), b"bad control frame");
                    return Err(ClientError::Protocol(e.to_string()));
                }
            },
            _ = timer => {
                let rtt = link.conn.rtt();
                let mut st = self.lock();
                st.receiver.set_rtt(rtt);
                st.receiver.handle_timeout(Instant::now());
            }
            _ = tokio::time::sleep_until(self.next_report) => {
                self.next_report += self.link.report_interval;
                let report = self.report(Instant::now());
                self.write(&ControlMessage::Report(report)).await?;
            }
            Some(ev) = self.app_rx.recv() => self.write(&ControlMessage::Event(ev)).await?,
        }
        // Repair requests are datagrams: a lost one must not wait for a
        // stream retransmission, and copies cover the loss.
        loop {
            let Some(dg) = self.lock().receiver.poll_repair() else {
                break;
            };
            if let Err(e) = self.link.conn.send_datagram(dg) {
                trace!(error = %e, "repair request not sent");
            }
        }
        Ok(None)
    }

    /// The receiver's report, counted from the current connection's start.
    /// Stall time is capped at the time since then: a stall that began before
    /// a reconnect belongs to the connection that was lost.
    fn report(&self, now: Instant) -> Report {
        let mut r = self.lock().receiver.report(now);
        let b = &self.base;
        for (v, base) in [
            (&mut r.blocks_delivered, b.blocks_delivered),
            (&mut r.blocks_recovered, b.blocks_recovered),
            (&mut r.blocks_lost, b.blocks_lost),
            (&mut r.shards_late, b.shards_late),
            (&mut r.shards_received, b.shards_received),
            (&mut r.shards_missing, b.shards_missing),
            (&mut r.stalls, b.stalls),
            (&mut r.stall_ms, b.stall_ms),
        ] {
            *v = v.saturating_sub(base);
        }
        let since = now.saturating_duration_since(self.base_at).as_millis() as u64;
        r.stall_ms = r.stall_ms.min(since);
        r
    }

    async fn write(&mut self, msg: &ControlMessage) -> Result<(), ClientError> {
        control::write(&mut self.link.send, msg)
            .await
            .map_err(|e| write_error(&self.link.conn, e))
    }

    /// After the connection failed with `e`: reconnects with backoff when the
    /// config allows and `e` is worth it, resuming at the live edge; else `e`.
    async fn recover(&mut self, e: ClientError) -> Result<(), ClientError> {
        let Some(window) = self.config.reconnect else {
            return Err(e);
        };
        if !retryable(&e) || self.lock().closed {
            return Err(e);
        }
        debug!(error = %e, "connection lost; reconnecting");
        self.link
            .conn
            .close(CloseCode::Normal.varint(), b"reconnecting");
        let give_up = Instant::now() + window;
        let mut backoff = RECONNECT_BACKOFF_MIN;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            tokio::time::sleep(backoff).await;
            if self.lock().closed {
                return Err(e);
            }
            let attempt = tokio::time::timeout(
                self.config.handshake_timeout,
                open(&self.endpoint, &self.config),
            )
            .await
            .unwrap_or(Err(ClientError::Timeout));
            match attempt {
                Ok(link) => {
                    let (base, before) = {
                        let mut st = self.lock();
                        st.conn = link.conn.clone();
                        st.reconnects += 1;
                        let before = st.receiver.highest_seq();
                        st.receiver
                            .restart(link.stream_id, link.sender_clock_us, link.at);
                        st.receiver.set_rtt(link.conn.rtt());
                        let now = Instant::now();
                        // Counters so far belong to the lost connection; the
                        // report's interval figures start over here too.
                        let mut base = st.receiver.report(now);
                        let finished = st.receiver.stats().stalled.as_millis() as u64;
                        if base.stall_ms > finished {
                            // A stall still running (the outage itself) is
                            // this connection's to report, from its start.
                            base.stalls = base.stalls.saturating_sub(1);
                            base.stall_ms = finished;
                        }
                        (base, before)
                    };
                    self.base = base;
                    self.base_at = Instant::now();
                    // Reconnected twice before any block: the gap starts
                    // where the first outage did.
                    let before = before.or(self.resumed.and_then(|(_, b)| b));
                    self.resumed = Some((attempts, before));
                    self.next_report = tokio::time::Instant::now() + link.report_interval;
                    self.link = link;
                    return Ok(());
                }
                Err(rejected @ ClientError::Rejected { .. }) => return Err(rejected),
                Err(err) => debug!(attempts, error = %err, "reconnect failed"),
            }
            if Instant::now() + backoff >= give_up {
                return Err(e);
            }
            backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        }
    }

    fn handle_control(&mut self, msg: ControlMessage) -> Result<(), ClientError> {
        match msg {
            ControlMessage::EndOfStream { last_seq } => {
                self.lock().receiver.end_of_stream(last_seq, Instant::now());
            }
            ControlMessage::Summary(s) => self.lock().summary = Some(s),
            ControlMessage::Goodbye { code, reason } => {
                return Err(ClientError::from_code(code, reason, false));
            }
            other => {
                self.link
                    .conn
                    .close(CloseCode::ProtocolViolation.varint(), b"unexpected message");
                return Err(ClientError::Protocol(format!(
                    "unexpected {} from server",
                    other.name()
                )));
            }
        }
        Ok(())
    }

    /// Tells the server we are done, with a final report, then closes.
    async fn leave(&mut self) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        let report = self.report(Instant::now());
        let send = &mut self.link.send;
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            control::write(send, &ControlMessage::Report(report)).await?;
            control::write(send, &ControlMessage::Leave).await?;
            let _ = send.finish();
            Ok::<_, quinn::WriteError>(())
        })
        .await;
    }
}
