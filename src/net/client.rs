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
use tracing::debug;

use super::{
    control::{self, FrameError, FrameReader},
    tls,
};
use crate::{
    config::ClientConfig,
    session::{Event, Receiver, ReceiverConfig, ReceiverStats},
    wire::{self, ClientEvent, ControlMessage, Summary},
    ClientError, CloseCode,
};

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
        let crypto = tls::client_crypto(&config.roots)?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(crypto));
        client_config.transport_config(tls::transport(
            config.congestion,
            crate::config::DEFAULT_MIN_WINDOW,
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
        };
        if let Err(e) = control::write(&mut send, &hello).await {
            return Err(write_error(&conn, e));
        }
        let mut reader = FrameReader::new(recv, wire::MAX_CONTROL_FRAME);
        let msg = match reader.next().await {
            Ok(Some(msg)) => msg,
            Ok(None) => return Err(closed(&conn, "server closed the control stream")),
            Err(FrameError::Read(_)) => {
                return Err(closed(&conn, "server closed the control stream"))
            }
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        };
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
        let now = Instant::now();
        let mut rc = ReceiverConfig::new(stream_id, config.latency);
        rc.decoder(config.decoder.clone());
        let mut receiver = Receiver::new(rc);
        receiver.start(started);
        // Welcome left the server half an RTT ago.
        let half_rtt = conn.rtt() / 2;
        receiver.set_clock(clock_us + half_rtt.as_micros() as u64, now);
        debug!(stream_id, rtt = ?conn.rtt(), "welcome");
        let shared = Arc::new(Mutex::new(Status {
            receiver,
            summary: None,
        }));
        let (app_tx, app_rx) = mpsc::channel(64);
        let report_interval = Duration::from_millis(report_interval_ms.clamp(50, 60_000));
        let session = Session {
            conn: conn.clone(),
            send,
            reader,
            shared: shared.clone(),
            app_rx,
            report_interval,
            next_report: tokio::time::Instant::now() + report_interval,
            done: false,
            left: false,
        };
        let events = Box::pin(futures_unfold(session));
        Ok(Subscription {
            conn,
            events,
            shared,
            app_tx,
        })
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
}

/// A viewer's subscription: a `Stream` of [`Event`]s in sequence order.
///
/// Polling the stream drives the viewer: it reads datagrams and control
/// messages, expires deadlines and sends the periodic reports. Nothing runs
/// in the background, so an app that stops polling stops the viewer (quinn
/// keeps the connection alive and buffers, then drops, datagrams). Dropping
/// the subscription closes the connection.
pub struct Subscription {
    conn: quinn::Connection,
    events: Pin<Box<dyn Stream<Item = Result<Event, ClientError>> + Send>>,
    shared: Arc<Mutex<Status>>,
    app_tx: mpsc::Sender<ClientEvent>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("remote", &self.conn.remote_address())
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

    /// The latest analytics summary from the server.
    pub fn summary(&self) -> Option<Summary> {
        self.lock().summary
    }

    /// The QUIC connection (RTT, path statistics).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
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

    /// Closes the connection now, telling the server the viewer left.
    pub fn close(&self) {
        self.conn.close(CloseCode::Normal.varint(), b"viewer left");
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
    conn: quinn::Connection,
    send: quinn::SendStream,
    reader: FrameReader,
    shared: Arc<Mutex<Status>>,
    app_rx: mpsc::Receiver<ClientEvent>,
    report_interval: Duration,
    next_report: tokio::time::Instant,
    done: bool,
    left: bool,
}

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
        if self.done {
            return None;
        }
        loop {
            let (event, timeout, stall) = {
                let mut st = self.lock();
                let stall = st.receiver.poll_stall();
                (st.receiver.poll_event(), st.receiver.poll_timeout(), stall)
            };
            if let Some(stalled) = stall {
                let msg = if stalled {
                    ControlMessage::Stall
                } else {
                    ControlMessage::Resume
                };
                if let Err(e) = control::write(&mut self.send, &msg).await {
                    return Some(Err(self.fail(write_error(&self.conn, e))));
                }
                continue;
            }
            if let Some(event) = event {
                if event == Event::End {
                    self.leave().await;
                    self.done = true;
                }
                return Some(Ok(event));
            }
            let timer = async {
                match timeout {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                dg = self.conn.read_datagram() => match dg {
                    Ok(dg) => self.lock().receiver.handle_datagram(Instant::now(), dg),
                    Err(e) => return Some(Err(self.fail(map_close(e)))),
                },
                msg = self.reader.next() => match msg {
                    Ok(Some(msg)) => {
                        if let Err(e) = self.handle_control(msg) {
                            return Some(Err(self.fail(e)));
                        }
                    }
                    Ok(None) | Err(FrameError::Read(_)) => {
                        let e = closed(&self.conn, "server closed the control stream");
                        return Some(Err(self.fail(e)));
                    }
                    Err(e) => {
                        let e = ClientError::Protocol(e.to_string());
                        self.conn.close(CloseCode::ProtocolViolation.varint(), b"bad control frame");
                        return Some(Err(self.fail(e)));
                    }
                },
                _ = timer => self.lock().receiver.handle_timeout(Instant::now()),
                _ = tokio::time::sleep_until(self.next_report) => {
                    self.next_report += self.report_interval;
                    let report = self.lock().receiver.report(Instant::now());
                    if let Err(e) = control::write(&mut self.send, &ControlMessage::Report(report)).await {
                        return Some(Err(self.fail(write_error(&self.conn, e))));
                    }
                }
                Some(ev) = self.app_rx.recv() => {
                    if let Err(e) = control::write(&mut self.send, &ControlMessage::Event(ev)).await {
                        return Some(Err(self.fail(write_error(&self.conn, e))));
                    }
                }
            }
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
                self.conn
                    .close(CloseCode::ProtocolViolation.varint(), b"unexpected message");
                return Err(ClientError::Protocol(format!(
                    "unexpected {} from server",
                    other.name()
                )));
            }
        }
        Ok(())
    }

    fn fail(&mut self, e: ClientError) -> ClientError {
        self.done = true;
        e
    }

    /// Tells the server we are done, with a final report, then closes.
    async fn leave(&mut self) {
        if std::mem::replace(&mut self.left, true) {
            return;
        }
        let report = self.lock().receiver.report(Instant::now());
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            control::write(&mut self.send, &ControlMessage::Report(report)).await?;
            control::write(&mut self.send, &ControlMessage::Leave).await?;
            let _ = self.send.finish();
            Ok::<_, quinn::WriteError>(())
        })
        .await;
    }
}
