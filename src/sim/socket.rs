//! [`LossySocket`]: a quinn [`AsyncUdpSocket`] that impairs both directions with a [`Link`].

use std::{
    cmp::Ordering,
    collections::BinaryHeap,
    fmt,
    future::{poll_fn, Future},
    io::{self, IoSliceMut},
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use quinn::{
    udp::{EcnCodepoint, RecvMeta, Transmit},
    AsyncUdpSocket, UdpPoller,
};
use tokio::{sync::mpsc, time::Sleep};
use tracing::{debug, trace};

use super::model::{DropReason, Link, LinkConfig, LinkStats, Verdict};

/// Most datagrams one direction holds between their link verdict and their delivery time.
///
/// This is the capacity of the simulated wire, not a bottleneck queue (that is
/// [`LinkConfig::queue_limit`]): 16 Ki datagrams cover 30 ms of delay at about 5 Gbit/s of
/// 1200-byte packets. Beyond it packets are dropped and counted as `dropped_queue`.
const DELAY_LINE_CAPACITY: usize = 16 * 1024;

/// Hand-off channel between [`LossySocket::try_send`] and the outbound task.
const OUTBOUND_CHANNEL: usize = 1024;

/// Receive buffers used to drain the inner socket. 64 KiB holds the largest GRO batch.
const DRAIN_SLOTS: usize = 4;
const DRAIN_SLOT_SIZE: usize = 64 * 1024;

/// Inner receive calls per `poll_recv`, so a flood cannot hold the endpoint driver.
const DRAIN_ROUNDS: usize = 16;

/// What to do to the traffic of one [`LossySocket`].
///
/// The default impairs nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Impairment {
    /// Applied to datagrams arriving at this endpoint.
    pub inbound: LinkConfig,
    /// Applied to datagrams this endpoint sends.
    pub outbound: LinkConfig,
    /// Seed for both directions; each direction derives its own independent stream from it.
    pub seed: u64,
}

impl Impairment {
    /// The same link behaviour in both directions (with independent random draws).
    pub fn symmetric(link: LinkConfig, seed: u64) -> Self {
        Self {
            inbound: link.clone(),
            outbound: link,
            seed,
        }
    }
}

/// Counters of a [`LossySocket`], per direction.
///
/// In each direction `offered = dropped_loss + dropped_queue + delivered + in flight`, where
/// in flight are packets waiting for their delivery time; outbound, packets the inner socket
/// failed to send are counted in `send_errors` instead of `delivered`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SimStats {
    /// Datagrams arriving at this endpoint; `delivered` counts those handed to quinn.
    pub inbound: LinkStats,
    /// Datagrams this endpoint sent; `delivered` counts those the inner socket accepted.
    pub outbound: LinkStats,
    /// Outbound datagrams the inner socket rejected with an error after they were delayed.
    pub send_errors: u64,
}

/// Binds a UDP socket on `addr` and wraps it in a [`LossySocket`].
///
/// Must be called inside a tokio runtime with the time driver enabled (as quinn itself
/// needs); outside one this returns an error. Pass the result to
/// [`quinn::Endpoint::new_with_abstract_socket`] with [`quinn::TokioRuntime`], and keep a
/// clone to read [`LossySocket::stats`].
pub fn bind(addr: SocketAddr, impairment: Impairment) -> io::Result<Arc<LossySocket>> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other(
            "sim::bind must be called inside a tokio runtime",
        ));
    }
    let socket = std::net::UdpSocket::bind(addr)?;
    let inner = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)?;
    Ok(Arc::new(LossySocket::new(inner, impairment)))
}

/// A UDP socket for quinn that drops, delays and rate-limits datagrams in both directions.
///
/// It sits below QUIC, so quinn's loss detection, retransmission and congestion control see
/// the impairment as they would on a real path. Each direction runs its own [`Link`]; a link
/// decision applies to exactly one UDP datagram, because the socket tells quinn it supports
/// neither GSO nor GRO and splits any multi-segment [`Transmit`] it still gets.
///
/// Inbound, datagrams are drained from the inner socket as soon as they arrive, judged, and
/// handed to quinn from `poll_recv` once their delivery time has come; a timer wakes the
/// endpoint driver for the next one. Outbound, a dropped datagram is reported as sent and
/// discarded, a datagram due now goes straight to the inner socket, and a delayed one is
/// queued for a task that sends it on time.
///
/// Delivery times come from the [`Link`] exactly, but delayed datagrams are released by tokio
/// timers, which have millisecond resolution and round up: a 30 ms delay adds 30 to 32 ms.
pub struct LossySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    shared: Arc<Shared>,
    inbound: Mutex<Inbound>,
    outbound: Mutex<Outbound>,
    /// Closing this channel (by dropping the socket) ends the outbound task.
    delayed: mpsc::Sender<Delayed>,
}

impl LossySocket {
    /// Wraps `inner`, impairing it as `impairment` says.
    ///
    /// This spawns one tokio task, the only one: it holds delayed outbound datagrams until
    /// their time and sends them, because `try_send` is synchronous and nothing else would
    /// poll at that instant. The task ends when the socket is dropped, discarding what is
    /// still in flight.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime with the time driver enabled.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, impairment: Impairment) -> Self {
        let shared = Arc::new(Shared::default());
        let (delayed, rx) = mpsc::channel(OUTBOUND_CHANNEL);
        tokio::spawn(run_outbound(inner.clone(), rx, shared.clone()));
        let now = now();
        Self {
            inner,
            shared,
            inbound: Mutex::new(Inbound {
                link: Link::new(impairment.inbound, splitmix64(impairment.seed)),
                line: BinaryHeap::new(),
                seq: 0,
                timer: Box::pin(tokio::time::sleep_until(now.into())),
                buf: Box::new([[0; DRAIN_SLOT_SIZE]; DRAIN_SLOTS]),
            }),
            outbound: Mutex::new(Outbound {
                link: Link::new(
                    impairment.outbound,
                    splitmix64(impairment.seed.wrapping_add(1)),
                ),
                seq: 0,
            }),
            delayed,
        }
    }

    /// Changes the inbound link from now on (see [`Link::reconfigure`]); for
    /// example a blackout with `LossModel::iid(1.0)`, then back.
    pub fn set_inbound(&self, config: LinkConfig) {
        lock(&self.inbound).link.reconfigure(config);
    }

    /// Changes the outbound link from now on (see [`Link::reconfigure`]).
    pub fn set_outbound(&self, config: LinkConfig) {
        lock(&self.outbound).link.reconfigure(config);
    }

    /// Counters since the socket was created.
    pub fn stats(&self) -> SimStats {
        SimStats {
            inbound: self.shared.inbound.snapshot(),
            outbound: self.shared.outbound.snapshot(),
            send_errors: self.shared.send_errors.load(Relaxed),
        }
    }

    /// Judges one outbound datagram and sends, queues or discards it.
    fn send_one(&self, now: Instant, transmit: &Transmit, contents: &[u8]) -> io::Result<()> {
        let counters = &self.shared.outbound;
        let (at, seq) = {
            let mut outbound = lock(&self.outbound);
            let verdict = outbound.link.offer(now, contents.len());
            let Some(at) = counters.judged(verdict, contents.len()) else {
                trace!(
                    len = contents.len(),
                    ?verdict,
                    "sim: outbound datagram dropped"
                );
                return Ok(());
            };
            outbound.seq += 1;
            (at, outbound.seq)
        };
        // Sending directly keeps a perfect link free of task hops; it is only allowed when
        // nothing is queued, so it cannot overtake a datagram the task still holds.
        if at <= now && self.shared.outbound_queued.load(Relaxed) == 0 {
            let single = Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents,
                segment_size: None,
                src_ip: transmit.src_ip,
            };
            match self.inner.try_send(&single) {
                Ok(()) => {
                    counters.delivered(contents.len());
                    return Ok(());
                }
                // quinn would retry the whole transmit and draw a second verdict; the task
                // waits for writability instead.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let packet = Delayed {
            at,
            seq,
            addr: transmit.destination,
            ecn: transmit.ecn,
            ip: transmit.src_ip,
            data: Bytes::copy_from_slice(contents),
        };
        self.shared.outbound_queued.fetch_add(1, Relaxed);
        match self.delayed.try_send(packet) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.outbound_queued.fetch_sub(1, Relaxed);
                counters.dropped_queue.fetch_add(1, Relaxed);
                trace!(len = contents.len(), "sim: outbound delay line full");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.shared.outbound_queued.fetch_sub(1, Relaxed);
                self.shared.send_errors.fetch_add(1, Relaxed);
            }
        }
        Ok(())
    }
}

impl AsyncUdpSocket for LossySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        // Writability is the inner socket's: the delay line never pushes back, it drops.
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let now = now();
        let contents = transmit.contents;
        let segment = match transmit.segment_size {
            Some(size) if size > 0 && size < contents.len() => size,
            _ => {
                return self.send_one(now, transmit, contents);
            }
        };
        for chunk in contents.chunks(segment) {
            self.send_one(now, transmit, chunk)?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let max = bufs.len().min(meta.len());
        if max == 0 {
            return Poll::Ready(Ok(0));
        }
        let mut guard = lock(&self.inbound);
        let inbound = &mut *guard;
        // A second pass only follows a timer that already expired, so it finds a due packet
        // unless the clocks disagree by a tick.
        for _ in 0..2 {
            let inner_pending = match self.drain_inner(cx, inbound) {
                Ok(pending) => pending,
                Err(e) => return Poll::Ready(Err(e)),
            };

            let now = now();
            let mut n = 0;
            while n < max && inbound.line.peek().is_some_and(|p| p.at <= now) {
                let Some(packet) = inbound.line.pop() else {
                    break;
                };
                let len = packet.data.len().min(bufs[n].len());
                if len < packet.data.len() {
                    trace!(len = packet.data.len(), "sim: datagram truncated to buffer");
                }
                bufs[n][..len].copy_from_slice(&packet.data[..len]);
                meta[n] = RecvMeta {
                    addr: packet.addr,
                    len,
                    stride: len,
                    ecn: packet.ecn,
                    dst_ip: packet.ip,
                };
                self.shared.inbound.delivered(len);
                n += 1;
            }
            if n > 0 {
                return Poll::Ready(Ok(n));
            }
            if !inner_pending {
                // Stopped draining early: the inner socket has not registered our waker.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let Some(next) = inbound.line.peek().map(|p| p.at) else {
                return Poll::Pending;
            };
            inbound.timer.as_mut().reset(next.into());
            if inbound.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        1
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

impl LossySocket {
    /// Moves everything the inner socket has into the inbound delay line.
    ///
    /// Returns whether the inner socket returned `Pending` (and so will wake `cx`).
    fn drain_inner(&self, cx: &mut Context, inbound: &mut Inbound) -> io::Result<bool> {
        let Inbound {
            link,
            line,
            seq,
            buf,
            ..
        } = inbound;
        let counters = &self.shared.inbound;
        for _ in 0..DRAIN_ROUNDS {
            let mut metas = [RecvMeta::default(); DRAIN_SLOTS];
            let mut iovs = buf.each_mut().map(|slot| IoSliceMut::new(slot));
            let n = match self.inner.poll_recv(cx, &mut iovs, &mut metas) {
                Poll::Pending => return Ok(true),
                Poll::Ready(result) => result?,
            };
            let now = now();
            for (meta, iov) in metas.iter().zip(iovs.iter()).take(n) {
                let data = &iov[..meta.len.min(iov.len())];
                // With GRO one buffer holds several datagrams, `stride` bytes apart. An empty
                // datagram yields no chunk and is skipped, as quinn's own receive loop does.
                let stride = if meta.stride == 0 {
                    data.len().max(1)
                } else {
                    meta.stride
                };
                for datagram in data.chunks(stride) {
                    let verdict = link.offer(now, datagram.len());
                    let Some(at) = counters.judged(verdict, datagram.len()) else {
                        trace!(
                            len = datagram.len(),
                            ?verdict,
                            "sim: inbound datagram dropped"
                        );
                        continue;
                    };
                    if line.len() >= DELAY_LINE_CAPACITY {
                        counters.dropped_queue.fetch_add(1, Relaxed);
                        trace!(len = datagram.len(), "sim: inbound delay line full");
                        continue;
                    }
                    *seq += 1;
                    line.push(Delayed {
                        at,
                        seq: *seq,
                        addr: meta.addr,
                        ecn: meta.ecn,
                        ip: meta.dst_ip,
                        data: Bytes::copy_from_slice(datagram),
                    });
                }
            }
        }
        Ok(false)
    }
}

impl fmt::Debug for LossySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LossySocket")
            .field("inner", &self.inner)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Sends delayed outbound datagrams at their delivery time, until the socket is dropped.
async fn run_outbound(
    inner: Arc<dyn AsyncUdpSocket>,
    mut rx: mpsc::Receiver<Delayed>,
    shared: Arc<Shared>,
) {
    let mut poller = inner.clone().create_io_poller();
    let mut line = BinaryHeap::<Delayed>::new();
    loop {
        let now = now();
        while let Some(packet) = line.peek().filter(|p| p.at <= now) {
            let transmit = Transmit {
                destination: packet.addr,
                ecn: packet.ecn,
                contents: &packet.data,
                segment_size: None,
                src_ip: packet.ip,
            };
            match inner.try_send(&transmit) {
                Ok(()) => shared.outbound.delivered(packet.data.len()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = poll_fn(|cx| poller.as_mut().poll_writable(cx)).await {
                        debug!(error = %e, "sim: inner socket failed, outbound task ends");
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    debug!(error = %e, "sim: delayed datagram not sent");
                    shared.send_errors.fetch_add(1, Relaxed);
                }
            }
            line.pop();
            shared.outbound_queued.fetch_sub(1, Relaxed);
        }

        let next = line.peek().map(|p| p.at);
        tokio::select! {
            packet = rx.recv(), if line.len() < DELAY_LINE_CAPACITY => match packet {
                Some(packet) => line.push(packet),
                None => return,
            },
            () = tokio::time::sleep_until(next.unwrap_or(now).into()), if next.is_some() => {}
            else => return,
        }
    }
}

/// State shared by the socket and its outbound task; holds nothing that keeps either alive.
#[derive(Debug, Default)]
struct Shared {
    inbound: Counters,
    outbound: Counters,
    send_errors: AtomicU64,
    /// Outbound datagrams handed to the task and not yet sent or discarded.
    outbound_queued: AtomicUsize,
}

#[derive(Debug, Default)]
struct Counters {
    offered: AtomicU64,
    bytes_offered: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    delivered: AtomicU64,
    bytes_delivered: AtomicU64,
}

impl Counters {
    /// Counts a verdict; returns the delivery time unless the datagram was dropped.
    fn judged(&self, verdict: Verdict, len: usize) -> Option<Instant> {
        self.offered.fetch_add(1, Relaxed);
        self.bytes_offered.fetch_add(len as u64, Relaxed);
        match verdict {
            Verdict::Deliver(at) => return Some(at),
            Verdict::Drop(DropReason::Loss) => &self.dropped_loss,
            Verdict::Drop(_) => &self.dropped_queue,
        }
        .fetch_add(1, Relaxed);
        None
    }

    fn delivered(&self, len: usize) {
        self.delivered.fetch_add(1, Relaxed);
        self.bytes_delivered.fetch_add(len as u64, Relaxed);
    }

    fn snapshot(&self) -> LinkStats {
        LinkStats {
            offered: self.offered.load(Relaxed),
            bytes_offered: self.bytes_offered.load(Relaxed),
            dropped_loss: self.dropped_loss.load(Relaxed),
            dropped_queue: self.dropped_queue.load(Relaxed),
            delivered: self.delivered.load(Relaxed),
            bytes_delivered: self.bytes_delivered.load(Relaxed),
        }
    }
}

struct Inbound {
    link: Link,
    line: BinaryHeap<Delayed>,
    seq: u64,
    timer: Pin<Box<Sleep>>,
    buf: Box<[[u8; DRAIN_SLOT_SIZE]; DRAIN_SLOTS]>,
}

struct Outbound {
    link: Link,
    seq: u64,
}

/// A datagram waiting for its delivery time.
#[derive(Debug)]
struct Delayed {
    at: Instant,
    /// Breaks ties in arrival order, so equal delivery times never reorder.
    seq: u64,
    /// Source inbound, destination outbound.
    addr: SocketAddr,
    ecn: Option<EcnCodepoint>,
    /// Local address: `dst_ip` inbound, `src_ip` outbound.
    ip: Option<IpAddr>,
    data: Bytes,
}

// `BinaryHeap` is a max-heap: order reversed so the earliest delivery is on top.
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Delayed {}

/// The clock quinn's tokio runtime uses, so paused test time applies here too.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave the link in a state worse than a dropped packet.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Spreads one seed into well-separated per-direction seeds (SplitMix64 finalizer).
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use anyhow::{bail, Context as _};
    use quinn::{
        crypto::rustls::{QuicClientConfig, QuicServerConfig},
        Connection, Endpoint, EndpointConfig, TokioRuntime,
    };
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use tokio::time::timeout;

    use super::*;
    use crate::sim::LossModel;

    const SEED: u64 = 0x5eed_0002;
    const ALPN: &[u8] = b"quicast/1";
    const LOCALHOST: &str = "127.0.0.1:0";

    /// Server and client configs that trust exactly one fresh self-signed certificate.
    fn configs() -> anyhow::Result<(quinn::ServerConfig, quinn::ClientConfig)> {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
        let cert = certified.cert.der().clone();
        let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key.into())?;
        server.alpn_protocols = vec![ALPN.to_vec()];

        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert)?;
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![ALPN.to_vec()];

        let mut transport = quinn::TransportConfig::default();
        transport
            .datagram_receive_buffer_size(Some(4 << 20))
            .datagram_send_buffer_size(4 << 20);
        let transport = Arc::new(transport);
        let mut server =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server)?));
        server.transport_config(transport.clone());
        let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client)?));
        client.transport_config(transport);
        Ok((server, client))
    }

    struct Pair {
        // Endpoints are kept so their drivers outlive the connections.
        _server: Endpoint,
        _client: Endpoint,
        socket: Arc<LossySocket>,
        client_conn: Connection,
        server_conn: Connection,
    }

    /// A plain server endpoint and a client endpoint behind an impaired socket, connected.
    async fn pair(impairment: Impairment) -> anyhow::Result<Pair> {
        let (server_config, client_config) = configs()?;
        let server = Endpoint::server(server_config, LOCALHOST.parse()?)?;
        let socket = bind(LOCALHOST.parse()?, impairment)?;
        let mut client = Endpoint::new_with_abstract_socket(
            EndpointConfig::default(),
            None,
            socket.clone(),
            Arc::new(TokioRuntime),
        )?;
        client.set_default_client_config(client_config);
        let connecting = client.connect(server.local_addr()?, "localhost")?;
        let accepting = async {
            let incoming = server.accept().await.context("server endpoint closed")?;
            anyhow::Ok(incoming.await?)
        };
        let (client_conn, server_conn) = timeout(Duration::from_secs(10), async {
            tokio::try_join!(async { anyhow::Ok(connecting.await?) }, accepting)
        })
        .await
        .context("handshake timed out")??;
        Ok(Pair {
            _server: server,
            _client: client,
            socket,
            client_conn,
            server_conn,
        })
    }

    #[tokio::test]
    async fn inbound_iid_loss_drops_datagrams() -> anyhow::Result<()> {
        const N: usize = 2000;
        let mut inbound = LinkConfig::default();
        inbound.loss(LossModel::iid(0.1)?);
        let impairment = Impairment {
            inbound,
            seed: SEED,
            ..Impairment::default()
        };
        let pair = pair(impairment).await?;
        // One datagram per QUIC packet, so one packet loss is one datagram loss.
        let size = pair
            .server_conn
            .max_datagram_size()
            .context("datagrams disabled")?
            .min(1000);
        let payload = Bytes::from(vec![0x5a; size]);

        let mut received = 0usize;
        let receive = async {
            while received < N {
                pair.client_conn.read_datagram().await?;
                received += 1;
            }
            anyhow::Ok(())
        };
        let send = async {
            for i in 0..N {
                pair.server_conn.send_datagram_wait(payload.clone()).await?;
                // Pacing: about 10 datagrams per ms stays far below what loopback carries.
                if i % 10 == 9 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            // Let the tail arrive; losses mean `receive` never reaches N on its own.
            tokio::time::sleep(Duration::from_millis(500)).await;
            anyhow::Ok(())
        };
        timeout(Duration::from_secs(30), async {
            tokio::select! {
                result = receive => result,
                result = send => result,
            }
        })
        .await
        .context("datagram exchange timed out")??;

        let fraction = received as f64 / N as f64;
        let stats = pair.socket.stats();
        assert!(
            (fraction - 0.9).abs() < 0.03,
            "seed {SEED:#x}: received {received}/{N}, stats {stats:?}"
        );
        let inbound = stats.inbound;
        let loss = inbound.dropped_loss as f64 / inbound.offered as f64;
        assert!(
            (loss - 0.1).abs() < 0.03,
            "seed {SEED:#x}: counted loss {loss}, stats {stats:?}"
        );
        assert!(inbound.delivered >= received as u64, "{stats:?}");
        assert!(
            inbound.dropped_loss + inbound.delivered <= inbound.offered,
            "{stats:?}"
        );
        assert_eq!(inbound.dropped_queue, 0, "{stats:?}");
        assert_eq!(
            stats.outbound.dropped_loss + stats.outbound.dropped_queue,
            0
        );
        assert!(stats.outbound.delivered > 0, "{stats:?}");
        Ok(())
    }

    /// Smoothed RTT after some datagram ping-pong through a client with `impairment`.
    async fn rtt_with(impairment: Impairment) -> anyhow::Result<Duration> {
        let pair = pair(impairment).await?;
        let echo = async {
            loop {
                let datagram = pair.server_conn.read_datagram().await?;
                pair.server_conn.send_datagram(datagram)?;
            }
        };
        let ping = async {
            for i in 0..20u32 {
                pair.client_conn
                    .send_datagram(Bytes::copy_from_slice(&i.to_be_bytes()))?;
                let pong = pair.client_conn.read_datagram().await?;
                if pong[..] != i.to_be_bytes() {
                    bail!("ping {i} answered with {pong:?}");
                }
            }
            anyhow::Ok(())
        };
        timeout(Duration::from_secs(20), async {
            tokio::select! {
                result = ping => result,
                result = echo => result,
            }
        })
        .await
        .context("ping-pong timed out")??;
        Ok(pair.client_conn.rtt())
    }

    #[tokio::test]
    async fn delay_raises_rtt() -> anyhow::Result<()> {
        let delay = Duration::from_millis(30);
        let mut delayed = LinkConfig::default();
        delayed.delay(delay);
        let base = rtt_with(Impairment::default()).await?;
        let inbound = rtt_with(Impairment {
            inbound: delayed.clone(),
            ..Impairment::default()
        })
        .await?;
        let outbound = rtt_with(Impairment {
            outbound: delayed,
            ..Impairment::default()
        })
        .await?;
        for (direction, rtt) in [("inbound", inbound), ("outbound", outbound)] {
            let added = rtt.saturating_sub(base);
            assert!(
                added >= Duration::from_millis(25) && added <= Duration::from_millis(45),
                "{direction} delay {delay:?}: rtt {rtt:?} vs base {base:?}"
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn inbound_delay_keeps_recv_meta() -> anyhow::Result<()> {
        let delay = Duration::from_millis(20);
        let mut inbound = LinkConfig::default();
        inbound.delay(delay);
        let socket = bind(
            LOCALHOST.parse()?,
            Impairment {
                inbound,
                ..Impairment::default()
            },
        )?;
        let peer = tokio::net::UdpSocket::bind(LOCALHOST).await?;
        let sent_at = Instant::now();
        for len in [1usize, 700, 1400] {
            peer.send_to(&vec![len as u8; len], socket.local_addr()?)
                .await?;
        }

        let mut storage = [[0u8; 2048]; 2];
        let mut got = Vec::new();
        timeout(Duration::from_secs(5), async {
            while got.len() < 3 {
                let [a, b] = &mut storage;
                let mut bufs = [IoSliceMut::new(a), IoSliceMut::new(b)];
                let mut meta = [RecvMeta::default(); 2];
                let n = poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta)).await?;
                assert!(n > 0 && n <= 2);
                for (m, buf) in meta.iter().zip(bufs.iter()).take(n) {
                    assert_eq!(m.addr, peer.local_addr()?);
                    assert_eq!(m.stride, m.len);
                    assert!(buf[..m.len].iter().all(|&b| b == m.len as u8));
                    got.push((m.len, sent_at.elapsed()));
                }
            }
            anyhow::Ok(())
        })
        .await
        .context("delayed datagrams never arrived")??;

        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [1, 700, 1400]);
        assert!(got.iter().all(|g| g.1 >= delay), "{got:?}");
        let stats = socket.stats().inbound;
        assert_eq!((stats.offered, stats.delivered), (3, 3));
        assert_eq!(stats.bytes_delivered, 2101);
        Ok(())
    }

    #[tokio::test]
    async fn outbound_splits_segments_delays_and_task_ends() -> anyhow::Result<()> {
        let delay = Duration::from_millis(20);
        let mut outbound = LinkConfig::default();
        outbound.delay(delay);
        let socket = bind(
            LOCALHOST.parse()?,
            Impairment {
                outbound,
                ..Impairment::default()
            },
        )?;
        let peer = tokio::net::UdpSocket::bind(LOCALHOST).await?;
        let contents: Vec<u8> = (0..2500u32).map(|i| (i / 1000) as u8).collect();
        let sent_at = Instant::now();
        socket.try_send(&Transmit {
            destination: peer.local_addr()?,
            ecn: None,
            contents: &contents,
            segment_size: Some(1000),
            src_ip: None,
        })?;

        let mut buf = [0u8; 4096];
        let mut lens = Vec::new();
        for _ in 0..3 {
            let (len, from) = timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
                .await
                .context("delayed segment never arrived")??;
            assert!(sent_at.elapsed() >= delay);
            assert_eq!(from, socket.local_addr()?);
            assert!(buf[..len].iter().all(|&b| b == lens.len() as u8));
            lens.push(len);
        }
        assert_eq!(lens, [1000, 1000, 500]);
        let stats = socket.stats().outbound;
        assert_eq!((stats.offered, stats.delivered), (3, 3));

        // The task holds the shared counters; they are freed once it has ended.
        let shared = Arc::downgrade(&socket.shared);
        drop(socket);
        for _ in 0..100 {
            if shared.upgrade().is_none() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("outbound task still running after the socket was dropped")
    }
}
