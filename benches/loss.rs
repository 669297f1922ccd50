//! The loss benchmark: quicast's FEC datagrams against plain datagrams, a QUIC
//! stream per block with a deadline, and one ordered QUIC stream, side by side
//! under the same seeded loss.
//!
//! ```text
//! cargo bench --bench loss                 # full sweep (about 35 minutes)
//! cargo bench --bench loss -- --quick      # 5% iid and bursty, both budgets: under 2 minutes
//! cargo bench --bench loss -- --help
//! ```
//!
//! Every mode runs over the same in-process path. The viewer's socket is a
//! `sim::LossySocket` that delays both directions by the one-way delay and
//! drops packets in both directions with the chosen model and seed (upstream
//! loss hits acknowledgements, reports and repair requests as it would on a
//! real path); with a bottleneck, packets towards the viewer also pass a
//! rate-limited drop-tail queue first. The socket sits below QUIC, so quinn's
//! loss recovery and congestion control react as they would on a real path.
//!
//! Latency is measured the same way for every mode: from the instant the
//! publisher handed the block over to the instant the viewer's application had
//! all of it, on one process clock. Every published block counts: one that
//! arrived within the budget is on time, one that arrived after it is late, one
//! that never arrived is lost, and percentiles are taken over all of them, so a
//! percentile that falls on a late or lost block is beyond the budget (`inf`).
//!
//! Writes a Markdown table to stdout, `target/loss-bench/results.csv` (one row
//! per run and budget) and `target/loss-bench/latency.svg`.

mod common;

use common::median;
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use quicast::{
    config::FecConfig,
    sim::{Impairment, LinkConfig, LossModel, LossySocket},
    Client, ClientConfig, CongestionControl, Event, Parity, Server, ServerConfig,
};

/// quicast FEC datagrams vs plain datagrams vs QUIC streams under seeded loss.
#[derive(Debug, Clone, Parser)]
struct Opts {
    /// A short subset: 5% iid and 5% bursty loss, every budget and mode, the
    /// first seed only, 5 s per run.
    #[arg(long)]
    quick: bool,
    /// Media bitrate, bits per second.
    #[arg(long, default_value_t = 8_000_000)]
    bitrate: u64,
    /// One-way delay of the simulated path, milliseconds (both directions).
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
    /// Viewer latency budgets to sweep, milliseconds, comma separated. The
    /// defaults sit below and above one round trip (2 x 20 ms).
    #[arg(long, value_delimiter = ',', default_value = "30,100")]
    budgets: Vec<u64>,
    /// Seconds of media per run. The default gives 675 blocks per run, so three
    /// seeds pool 2025 blocks per cell.
    #[arg(long, default_value_t = 14.2)]
    seconds: f64,
    /// Bytes per block (multiple of 188).
    #[arg(long, default_value_t = 188 * 112)]
    block_size: usize,
    /// Most parity per data shard encoded for the fec mode (adaptive per viewer).
    #[arg(long, default_value_t = 0.5)]
    redundancy: f64,
    /// Parity ratio of the fec-fixed mode (every viewer gets all of it).
    #[arg(long, default_value_t = 0.25)]
    fixed_redundancy: f64,
    /// Data shards per code group.
    #[arg(long, default_value_t = 32)]
    max_data_shards: usize,
    /// Congestion controller for every mode: bbr, cubic, newreno.
    #[arg(long, default_value = "bbr")]
    cc: CongestionControl,
    /// Congestion window floor (and initial window) for every mode, bytes; 0 = the
    /// controller's own behaviour.
    #[arg(long, default_value_t = quicast::config::DEFAULT_MIN_WINDOW)]
    min_window: u64,
    /// Loss models to sweep, comma separated: iid, bursty.
    #[arg(long, value_delimiter = ',', default_value = "iid,bursty")]
    models: Vec<String>,
    /// Mean burst length of the bursty (Gilbert-Elliott) model, packets.
    #[arg(long, default_value_t = 4.0)]
    burst: f64,
    /// Loss rates of the iid model, comma separated fractions.
    #[arg(long, value_delimiter = ',', default_value = "0,0.01,0.05,0.10")]
    losses: Vec<f64>,
    /// Loss rates of the bursty model, comma separated fractions.
    #[arg(long, value_delimiter = ',', default_value = "0.05")]
    bursty_losses: Vec<f64>,
    /// Loss rate from the viewer towards the server. Default: the same as
    /// towards the viewer, with the same model.
    #[arg(long)]
    loss_up: Option<f64>,
    /// Bottleneck towards the viewer for every run of the loss sweep, Mbit/s.
    /// Default: unlimited.
    #[arg(long)]
    bandwidth_mbps: Option<f64>,
    /// Extra rows of the full sweep: the stream through these bottlenecks,
    /// Mbit/s, comma separated (empty or 0: none), at `--bottleneck-loss` iid
    /// loss.
    #[arg(long, value_delimiter = ',', default_value = "10,6", value_parser = rate_or_none)]
    bottlenecks: Vec<f64>,
    /// iid loss of the bottleneck rows (both directions unless --loss-up).
    #[arg(long, default_value_t = 0.05)]
    bottleneck_loss: f64,
    /// Depth of the bottleneck's drop-tail queue, in milliseconds of its rate.
    #[arg(long, default_value_t = 50.0)]
    queue_ms: f64,
    /// Modes to run, comma separated: fec (adaptive parity, as shipped),
    /// fec-fixed (a fixed parity ratio), datagram (no parity), stream-per-block
    /// (raw quinn, one stream per block reset at its deadline), stream (raw
    /// quinn, one ordered stream).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fec,fec-fixed,datagram,stream-per-block,stream"
    )]
    modes: Vec<Mode>,
    /// Seeds of the loss pattern (each the same for every mode); the table
    /// shows the median over them, the CSV every one.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    seeds: Vec<u64>,
    /// Skip the loopback saturation rows.
    #[arg(long)]
    no_saturation: bool,
    /// Output directory. Default target/loss-bench.
    #[arg(long)]
    out: Option<PathBuf>,
    // `cargo bench` passes --bench to every bench binary.
    #[arg(long, hide = true)]
    bench: bool,
}

/// `--bottlenecks ''` means none.
fn rate_or_none(s: &str) -> Result<f64, String> {
    if s.trim().is_empty() {
        return Ok(0.0);
    }
    s.parse().map_err(|e| format!("{s:?}: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Fec,
    FecFixed,
    Datagram,
    StreamPerBlock,
    Stream,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "fec" => Mode::Fec,
            "fec-fixed" => Mode::FecFixed,
            "datagram" => Mode::Datagram,
            "stream-per-block" => Mode::StreamPerBlock,
            "stream" => Mode::Stream,
            _ => return Err(format!("unknown mode {s:?}")),
        })
    }
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Fec => "fec",
            Mode::FecFixed => "fec-fixed",
            Mode::Datagram => "datagram",
            Mode::StreamPerBlock => "stream-per-block",
            Mode::Stream => "stream",
        }
    }

    /// Whether the sender or receiver acts on the budget. The ordered stream
    /// does not, so one run of it is scored against every budget.
    fn uses_budget(self) -> bool {
        self != Mode::Stream
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Model {
    Iid,
    Bursty(f64),
}

impl Model {
    fn name(self) -> &'static str {
        match self {
            Model::Iid => "iid",
            Model::Bursty(_) => "bursty",
        }
    }

    fn loss(self, p: f64) -> anyhow::Result<LossModel> {
        Ok(match self {
            _ if p <= 0.0 => LossModel::None,
            Model::Iid => LossModel::iid(p)?,
            Model::Bursty(b) => LossModel::gilbert_elliott(p, b)?,
        })
    }
}

/// The simulated path of one run.
#[derive(Debug, Clone, Copy, PartialEq)]
struct PathSpec {
    model: Model,
    /// Towards the viewer.
    loss: f64,
    /// Towards the server.
    loss_up: f64,
    /// Bottleneck towards the viewer, Mbit/s.
    bandwidth_mbps: Option<f64>,
}

impl PathSpec {
    fn model_name(&self) -> &'static str {
        if self.loss > 0.0 || self.loss_up > 0.0 {
            self.model.name()
        } else {
            "none"
        }
    }
}

/// What one run measured, before it is scored against a budget.
struct Outcome {
    /// Per published block: publish-to-application latency in microseconds, or
    /// `None` if it never arrived.
    latency_us: Vec<Option<u64>>,
    /// UDP payload bytes the sender's socket sent.
    wire_bytes: u64,
    /// UDP payload bytes the viewer's socket sent.
    feedback_bytes: u64,
    /// Datagrams quicast's sender discarded itself (`ServerStats::datagrams_dropped`).
    sender_drops: u64,
    /// Packets the bottleneck queue dropped.
    queue_drops: u64,
    /// Blocks whose stream the sender reset at the deadline (stream-per-block).
    streams_reset: u64,
}

/// One run scored against one budget: a CSV row.
#[derive(Debug, Clone)]
struct Row {
    mode: Mode,
    path: PathSpec,
    budget_ms: u64,
    seed: u64,
    blocks: u64,
    on_time: u64,
    late: u64,
    overhead_pct: f64,
    feedback_pct: f64,
    sender_drops: u64,
    queue_drops: u64,
    streams_reset: u64,
    /// Per block: latency in ms if on time, `INFINITY` if late or lost.
    scored_ms: Vec<f64>,
}

impl Row {
    fn score(
        opts: &Opts,
        mode: Mode,
        path: PathSpec,
        budget_ms: u64,
        seed: u64,
        o: &Outcome,
    ) -> Self {
        let budget_us = budget_ms * 1000;
        let mut on_time = 0;
        let mut late = 0;
        let scored_ms = o
            .latency_us
            .iter()
            .map(|l| match *l {
                Some(us) if us <= budget_us => {
                    on_time += 1;
                    us as f64 / 1000.0
                }
                Some(_) => {
                    late += 1;
                    f64::INFINITY
                }
                None => f64::INFINITY,
            })
            .collect();
        let blocks = o.latency_us.len() as u64;
        let media = (blocks * opts.block_size as u64).max(1) as f64;
        Row {
            mode,
            path,
            budget_ms,
            seed,
            blocks,
            on_time,
            late,
            overhead_pct: 100.0 * (o.wire_bytes as f64 / media - 1.0),
            feedback_pct: 100.0 * o.feedback_bytes as f64 / media,
            sender_drops: o.sender_drops,
            queue_drops: o.queue_drops,
            streams_reset: o.streams_reset,
            scored_ms,
        }
    }

    fn pct(&self, n: u64) -> f64 {
        100.0 * n as f64 / self.blocks.max(1) as f64
    }

    fn lost(&self) -> u64 {
        self.blocks - self.on_time - self.late
    }
}

/// The `q` quantile of per-block values (`INFINITY` for a block not on time),
/// nearest rank.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Progress markers, with `LOSS_BENCH_DEBUG` set.
fn debug() -> bool {
    std::env::var_os("LOSS_BENCH_DEBUG").is_some()
}

/// Publish instants and arrival latencies of one run, shared by its sender
/// and viewer tasks.
#[derive(Clone)]
struct Clock {
    published: Arc<Mutex<Vec<Instant>>>,
    latency_us: Arc<Mutex<Vec<Option<u64>>>>,
}

impl Clock {
    fn new(n: u64) -> Self {
        Clock {
            published: Arc::new(Mutex::new(Vec::with_capacity(n as usize))),
            latency_us: Arc::new(Mutex::new(vec![None; n as usize])),
        }
    }

    fn publish(&self) -> Instant {
        let now = Instant::now();
        self.published.lock().unwrap().push(now);
        now
    }

    fn published(&self, seq: u64) -> Option<Instant> {
        self.published.lock().unwrap().get(seq as usize).copied()
    }

    /// Block `seq` is complete at the viewer now. Only its first arrival counts.
    fn arrived(&self, seq: u64) {
        let Some(at) = self.published(seq) else {
            return;
        };
        let us = (at.elapsed().as_micros() as u64).max(1);
        if let Some(slot) = self.latency_us.lock().unwrap().get_mut(seq as usize) {
            slot.get_or_insert(us);
        }
    }

    fn latencies(&self) -> Vec<Option<u64>> {
        self.latency_us.lock().unwrap().clone()
    }
}

/// The server's socket: a perfect link, used to count the bytes on the wire.
fn server_socket() -> anyhow::Result<Arc<LossySocket>> {
    Ok(quicast::sim::bind(
        "127.0.0.1:0".parse()?,
        Impairment::symmetric(LinkConfig::default(), 0),
    )?)
}

/// The viewer's socket: the path's delay and loss both ways and, towards the
/// viewer, the bottleneck.
fn viewer_socket(opts: &Opts, path: PathSpec, seed: u64) -> anyhow::Result<Arc<LossySocket>> {
    let delay = Duration::from_millis(opts.delay_ms);
    let mut inbound = LinkConfig::default();
    inbound.loss(path.model.loss(path.loss)?).delay(delay);
    if let Some(mbps) = path.bandwidth_mbps {
        let rate = (mbps * 1e6) as u64;
        inbound
            .bandwidth(Some(rate))
            .queue_limit(queue_bytes(rate, opts.queue_ms));
    }
    let mut outbound = LinkConfig::default();
    outbound.loss(path.model.loss(path.loss_up)?).delay(delay);
    Ok(quicast::sim::bind(
        "127.0.0.1:0".parse()?,
        Impairment {
            inbound,
            outbound,
            seed,
        },
    )?)
}

/// Bytes a drop-tail queue holds for `ms` of a `rate` bit/s link.
fn queue_bytes(rate: u64, ms: f64) -> usize {
    (rate as f64 / 8.0 * ms / 1000.0) as usize
}

fn blocks(opts: &Opts) -> (u64, Duration) {
    let interval = Duration::from_secs_f64(opts.block_size as f64 * 8.0 / opts.bitrate as f64);
    (
        (opts.seconds / interval.as_secs_f64()).ceil() as u64,
        interval,
    )
}

fn block(seq: u64, len: usize) -> Bytes {
    let mut v = vec![(seq & 0xff) as u8; len];
    v[..8].copy_from_slice(&seq.to_be_bytes());
    Bytes::from(v)
}

/// Time a run may take beyond its media: the viewer's tail, then shutdown.
const TAIL: Duration = Duration::from_secs(5);

/// quicast over datagrams, through its public API only.
async fn run_quicast(
    opts: &Opts,
    mode: Mode,
    path: PathSpec,
    budget: Duration,
    seed: u64,
) -> anyhow::Result<Outcome> {
    let (cert, identity) = quicast::net::tls::self_signed_identity()?;
    let mut fc = FecConfig::default();
    fc.set_redundancy(if mode == Mode::FecFixed {
        opts.fixed_redundancy
    } else {
        opts.redundancy
    })?;
    fc.set_max_data_shards(opts.max_data_shards)?;
    let mut config = ServerConfig::new(identity);
    config
        .fec(fc)
        .congestion(opts.cc)
        .min_window(opts.min_window)
        // Reports twice a second, so the adaptive loop settles early in a run.
        .report_interval(Duration::from_millis(500))
        // Only `fec` is quicast as shipped, with repair on request; `fec-fixed`
        // is proactive parity alone and `datagram` no recovery at all.
        .repair(mode == Mode::Fec)
        .parity(match mode {
            Mode::Fec => Parity::Adaptive,
            Mode::FecFixed => Parity::All,
            _ => Parity::Fixed(0),
        });
    let ssock = server_socket()?;
    let server = Server::bind_socket(config, ssock.clone())?;
    let addr = server.local_addr()?;
    let mut publisher = server.publish("bench", None)?;
    let driver = tokio::spawn(server.run());

    let vsock = viewer_socket(opts, path, seed)?;
    let endpoint = Client::endpoint(addr, Some(vsock.clone()))?;
    let mut cc = ClientConfig::new(addr, "bench");
    cc.add_root(cert).latency(budget).congestion(opts.cc);
    let mut viewer = Client::connect_with(&endpoint, cc).await?;

    let (n, interval) = blocks(opts);
    let clock = Clock::new(n);
    let block_size = opts.block_size;
    let pubs = clock.clone();
    let publishing = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for seq in 0..n {
            tick.tick().await;
            pubs.publish();
            publisher.send(block(seq, block_size), seq % 50 == 0)?;
        }
        publisher.finish();
        anyhow::Ok(())
    });
    let limit = Duration::from_secs_f64(opts.seconds) + TAIL;
    let _ = tokio::time::timeout(limit, async {
        while let Some(ev) = viewer.next().await {
            match ev {
                Ok(Event::Block { seq, .. }) => clock.arrived(seq),
                Ok(Event::End) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    publishing.await??;
    let sstats = server.stats();
    if debug() {
        let v = viewer.stats();
        eprintln!(
            "  sender drops {} skipped {} late shards {} lost {} recovered {} | sent {} expired {} encoded {} | repairs asked {} answered {} expired {} shards {} | viewer asked {} repaired {} too late {}",
            sstats.datagrams_dropped,
            sstats.blocks_skipped,
            v.shards_late,
            v.blocks_lost,
            v.blocks_recovered,
            sstats.datagrams_sent,
            sstats.shards_expired,
            sstats.shards_encoded,
            sstats.repairs_asked,
            sstats.repairs_answered,
            sstats.repairs_expired,
            sstats.repair_shards,
            v.repairs_asked,
            v.blocks_repaired,
            v.repairs_too_late,
        );
    }
    viewer.close();
    server.shutdown(Duration::from_millis(200)).await;
    driver.abort();
    let v = vsock.stats();
    Ok(Outcome {
        latency_us: clock.latencies(),
        wire_bytes: ssock.stats().outbound.bytes_offered,
        feedback_bytes: v.outbound.bytes_offered,
        sender_drops: sstats.datagrams_dropped,
        queue_drops: v.inbound.dropped_queue,
        streams_reset: 0,
    })
}

/// Transport settings of the raw-quinn modes.
///
/// Congestion control, initial window and window floor are quicast's own
/// (`set_congestion`), so the comparison is FEC against retransmission, not
/// one controller against another. quinn paces every connection the same way.
fn raw_transport(opts: &Opts, mode: Mode, datagram_receive: usize) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    quicast::net::tls::set_congestion(&mut t, opts.cc, opts.min_window);
    t.datagram_receive_buffer_size(Some(datagram_receive));
    if mode == Mode::StreamPerBlock {
        // Older blocks are sent (and retransmitted) first: the earliest
        // deadline first, which is what meets most deadlines while the path
        // keeps up. Round-robin between live blocks would make all of them late
        // together.
        t.send_fairness(false);
    }
    t
}

/// quinn server and client configs for the raw-quinn modes: a fresh
/// self-signed certificate the client trusts (verification on).
fn raw_quinn(
    transport: quinn::TransportConfig,
) -> anyhow::Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    let (cert, key) = quicast::net::tls::self_signed()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    tls.alpn_protocols = vec![b"bench".to_vec()];
    let transport = Arc::new(transport);
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));
    sc.transport_config(transport.clone());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let mut ctls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    ctls.alpn_protocols = vec![b"bench".to_vec()];
    let mut cc = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(ctls)?,
    ));
    cc.transport_config(transport);
    Ok((sc, cc))
}

/// A server endpoint on a perfect socket and a client endpoint on the
/// impaired one, both raw quinn.
struct RawPair {
    server: quinn::Endpoint,
    client: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    addr: SocketAddr,
    ssock: Arc<LossySocket>,
    vsock: Arc<LossySocket>,
}

impl RawPair {
    fn new(opts: &Opts, mode: Mode, path: PathSpec, seed: u64) -> anyhow::Result<Self> {
        let (sc, client_config) = raw_quinn(raw_transport(opts, mode, 1 << 20))?;
        let runtime = Arc::new(quinn::TokioRuntime);
        let ssock = server_socket()?;
        let server = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(sc),
            ssock.clone(),
            runtime.clone(),
        )?;
        let addr = server.local_addr()?;
        let vsock = viewer_socket(opts, path, seed)?;
        let client = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            None,
            vsock.clone(),
            runtime,
        )?;
        Ok(RawPair {
            server,
            client,
            client_config,
            addr,
            ssock,
            vsock,
        })
    }

    async fn connect(&self) -> anyhow::Result<quinn::Connection> {
        Ok(self
            .client
            .connect_with(self.client_config.clone(), self.addr, "localhost")?
            .await?)
    }

    fn outcome(&self, clock: &Clock, streams_reset: u64) -> Outcome {
        let v = self.vsock.stats();
        Outcome {
            latency_us: clock.latencies(),
            wire_bytes: self.ssock.stats().outbound.bytes_offered,
            feedback_bytes: v.outbound.bytes_offered,
            sender_drops: 0,
            queue_drops: v.inbound.dropped_queue,
            streams_reset,
        }
    }
}

/// The same blocks written to one reliable, ordered QUIC stream with quinn
/// alone: the weakest reliable baseline, kept for comparison.
async fn run_stream(opts: &Opts, path: PathSpec, seed: u64) -> anyhow::Result<Outcome> {
    let pair = RawPair::new(opts, Mode::Stream, path, seed)?;
    let (n, interval) = blocks(opts);
    let clock = Clock::new(n);
    let block_size = opts.block_size;
    let pubs = clock.clone();
    let server = pair.server.clone();
    let sending = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let mut send = conn.open_uni().await?;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for seq in 0..n {
            tick.tick().await;
            pubs.publish();
            let b = block(seq, block_size);
            send.write_all(&(b.len() as u32).to_be_bytes()).await?;
            send.write_all(&b).await?;
        }
        send.finish()?;
        let _ = tokio::time::timeout(TAIL, conn.closed()).await;
        anyhow::Ok(())
    });
    let conn = pair.connect().await?;
    let mut recv = conn.accept_uni().await?;
    let limit = Duration::from_secs_f64(opts.seconds) + TAIL;
    let _ = tokio::time::timeout(limit, async {
        let mut len = [0u8; 4];
        let mut buf = vec![0u8; block_size];
        for seq in 0..n {
            if recv.read_exact(&mut len).await.is_err() {
                break;
            }
            let l = u32::from_be_bytes(len) as usize;
            if l > block_size {
                break;
            }
            buf.resize(l, 0);
            if recv.read_exact(&mut buf).await.is_err() {
                break;
            }
            clock.arrived(seq);
        }
    })
    .await;
    conn.close(0u32.into(), b"done");
    sending.await??;
    Ok(pair.outcome(&clock, 0))
}

/// Application error code of a stream abandoned at its deadline.
const EXPIRED: u32 = 1;

/// Every block on its own unidirectional QUIC stream with quinn alone, reset by
/// the sender when the block's deadline passes (the MoQ model): a lost packet
/// is retransmitted while the block can still make it, and never after.
///
/// The viewer accepts streams concurrently, so one stuck block never holds up
/// the next. It reads a block until the sender's reset ends it, at most until
/// the deadline plus the one-way delay (the reset's flight time); a block
/// completed after its deadline counts as late.
async fn run_stream_per_block(
    opts: &Opts,
    path: PathSpec,
    budget: Duration,
    seed: u64,
) -> anyhow::Result<Outcome> {
    let pair = RawPair::new(opts, Mode::StreamPerBlock, path, seed)?;
    let (n, interval) = blocks(opts);
    let clock = Clock::new(n);
    let block_size = opts.block_size;
    let pubs = clock.clone();
    let server = pair.server.clone();
    let resets = Arc::new(AtomicU64::new(0));
    let reset_count = resets.clone();
    let sending = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut blocks = tokio::task::JoinSet::new();
        for seq in 0..n {
            tick.tick().await;
            let deadline = pubs.publish() + budget;
            // Opened here, in order, so that stream index = sequence number.
            let mut send = conn.open_uni().await?;
            // The earliest deadline first; see `raw_transport`.
            let _ = send.set_priority(i32::MAX - seq as i32);
            let b = block(seq, block_size);
            let resets = reset_count.clone();
            blocks.spawn(async move {
                let delivered = tokio::time::timeout_at(deadline.into(), async {
                    send.write_all(&b).await?;
                    send.finish()?;
                    // Resolves once the viewer acknowledged every byte.
                    send.stopped().await?;
                    anyhow::Ok(())
                })
                .await;
                if delivered.is_err() && send.reset(EXPIRED.into()).is_ok() {
                    resets.fetch_add(1, Relaxed);
                }
            });
            // Reap finished blocks so the set stays at the blocks in flight.
            while blocks.try_join_next().is_some() {}
        }
        while blocks.join_next().await.is_some() {}
        let _ = tokio::time::timeout(TAIL, conn.closed()).await;
        anyhow::Ok(())
    });
    let conn = pair.connect().await?;
    let one_way = Duration::from_millis(opts.delay_ms);
    let limit = Duration::from_secs_f64(opts.seconds) + TAIL;
    let _ = tokio::time::timeout(limit, async {
        let mut readers = tokio::task::JoinSet::new();
        let mut accepted = 0;
        while accepted < n {
            let Ok(mut recv) = conn.accept_uni().await else {
                break;
            };
            accepted += 1;
            let seq = recv.id().index();
            let Some(published) = clock.published(seq) else {
                let _ = recv.stop(EXPIRED.into());
                continue;
            };
            let give_up = published + budget + one_way;
            let clock = clock.clone();
            readers.spawn(async move {
                let read =
                    tokio::time::timeout_at(give_up.into(), recv.read_to_end(block_size + 1)).await;
                match read {
                    Ok(Ok(data))
                        if data.len() == block_size && data[..8] == seq.to_be_bytes()[..] =>
                    {
                        clock.arrived(seq)
                    }
                    Ok(_) => {}
                    Err(_) => {
                        let _ = recv.stop(EXPIRED.into());
                    }
                }
            });
            while readers.try_join_next().is_some() {}
        }
        while readers.join_next().await.is_some() {}
    })
    .await;
    conn.close(0u32.into(), b"done");
    sending.await??;
    Ok(pair.outcome(&clock, resets.load(Relaxed)))
}

/// Raw quinn datagram throughput on loopback: 1200-byte datagrams, as fast as
/// `send_datagram_wait` allows, for `secs`. Returns (Mbit/s received, % lost).
async fn saturation_raw(opts: &Opts, secs: f64) -> anyhow::Result<(f64, f64)> {
    let (sc, cc) = raw_quinn(raw_transport(opts, Mode::Datagram, 8 << 20))?;
    let server = quinn::Endpoint::server(sc, "127.0.0.1:0".parse()?)?;
    let addr = server.local_addr()?;
    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    client.set_default_client_config(cc);
    let sender = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let size = conn
            .max_datagram_size()
            .context("datagrams unsupported")?
            .min(1200);
        let payload = Bytes::from(vec![0u8; size]);
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut sent = 0u64;
        while Instant::now() < end {
            conn.send_datagram_wait(payload.clone()).await?;
            sent += 1;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
        anyhow::Ok((sent, size))
    });
    let conn = client.connect(addr, "localhost")?.await?;
    let start = Instant::now();
    let mut got = 0u64;
    let _ = tokio::time::timeout(Duration::from_secs_f64(secs + 0.5), async {
        while conn.read_datagram().await.is_ok() {
            got += 1;
        }
    })
    .await;
    let elapsed = start.elapsed().as_secs_f64().min(secs + 0.5);
    conn.close(0u32.into(), b"done");
    let (sent, size) = sender.await??;
    Ok((
        got as f64 * size as f64 * 8.0 / elapsed / 1e6,
        100.0 * (1.0 - got as f64 / sent.max(1) as f64),
    ))
}

/// quicast media goodput at saturation: blocks published as fast as the
/// publisher can encode them, for `secs`, one viewer on loopback. Returns
/// (Mbit/s of media delivered, % of blocks lost, sender drops).
async fn saturation_quicast(opts: &Opts, secs: f64) -> anyhow::Result<(f64, f64, u64)> {
    let (cert, identity) = quicast::net::tls::self_signed_identity()?;
    let mut fc = FecConfig::default();
    fc.set_redundancy(opts.redundancy)?;
    fc.set_max_data_shards(opts.max_data_shards)?;
    let mut config = ServerConfig::new(identity);
    config
        .listen("127.0.0.1:0".parse()?)
        .fec(fc)
        .congestion(opts.cc)
        .datagram_send_buffer(4 << 20)
        .viewer_queue(1024);
    let server = Server::bind(config)?;
    let addr = server.local_addr()?;
    let mut publisher = server.publish("bench", None)?;
    let driver = tokio::spawn(server.run());
    let mut cc = ClientConfig::new(addr, "bench");
    cc.add_root(cert)
        .latency(Duration::from_secs(1))
        .datagram_receive_buffer(64 << 20);
    let mut viewer = Client::connect(cc).await?;
    let block_size = opts.block_size;
    let publishing = tokio::spawn(async move {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        let mut seq = 0u64;
        let data = block(0, block_size);
        while Instant::now() < end {
            // Every block is a start point: the viewer, which may first see
            // a later block when the congested sender dropped the earliest,
            // does not wait for a sync point that never comes.
            publisher.send(data.clone(), true)?;
            seq += 1;
            tokio::task::yield_now().await;
        }
        publisher.finish();
        anyhow::Ok(seq)
    });
    let start = Instant::now();
    let mut bytes = 0u64;
    let _ = tokio::time::timeout(Duration::from_secs_f64(secs + 3.0), async {
        while let Some(ev) = viewer.next().await {
            match ev {
                Ok(Event::Block { data, .. }) => bytes += data.len() as u64,
                Ok(Event::End) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    let elapsed = start.elapsed().as_secs_f64();
    let published = publishing.await??;
    let stats = viewer.stats();
    let sstats = server.stats();
    viewer.close();
    server.shutdown(Duration::from_millis(200)).await;
    driver.abort();
    Ok((
        bytes as f64 * 8.0 / elapsed.min(secs + 3.0) / 1e6,
        100.0 * (1.0 - stats.blocks_delivered as f64 / published.max(1) as f64),
        sstats.datagrams_dropped,
    ))
}

fn fmt(v: f64, digits: usize) -> String {
    if v.is_nan() {
        "–".into()
    } else if v.is_infinite() {
        "inf".into()
    } else {
        format!("{v:.digits$}")
    }
}

fn fmt_bw(b: Option<f64>) -> String {
    b.map_or_else(|| "–".into(), |r| format!("{r}"))
}

/// Rows of one cell (mode, path, budget) over its seeds.
struct Cell<'a> {
    rows: Vec<&'a Row>,
    /// Every block of every seed, sorted (`INFINITY` = not on time).
    pooled: Vec<f64>,
}

impl Cell<'_> {
    fn first(&self) -> &Row {
        self.rows[0]
    }

    fn blocks(&self) -> u64 {
        self.rows.iter().map(|r| r.blocks).sum()
    }

    fn pooled_pct(&self, f: impl Fn(&Row) -> u64) -> f64 {
        100.0 * self.rows.iter().map(|r| f(r)).sum::<u64>() as f64 / self.blocks().max(1) as f64
    }

    fn median(&self, f: impl Fn(&Row) -> f64) -> f64 {
        median(self.rows.iter().map(|r| f(r)).collect())
    }

    fn on_time_pct(&self) -> f64 {
        self.pooled_pct(|r| r.on_time)
    }

    fn p(&self, q: f64) -> f64 {
        quantile(&self.pooled, q)
    }
}

/// Groups rows into cells, in sweep order: bandwidth, budget, model, loss, mode.
fn cells(rows: &[Row]) -> Vec<Cell<'_>> {
    type Key = (u64, u64, u8, u64, u64, Mode);
    let key = |r: &Row| -> Key {
        (
            r.path
                .bandwidth_mbps
                .map_or(0, |b| 1_000_000 - (b * 1000.0) as u64),
            r.budget_ms,
            matches!(r.path.model, Model::Bursty(_)) as u8,
            (r.path.loss * 1e6) as u64,
            (r.path.loss_up * 1e6) as u64,
            r.mode,
        )
    };
    let mut map: BTreeMap<Key, Vec<&Row>> = BTreeMap::new();
    for r in rows {
        map.entry(key(r)).or_default().push(r);
    }
    map.into_values()
        .map(|rows| {
            let mut pooled: Vec<f64> = rows
                .iter()
                .flat_map(|r| r.scored_ms.iter().copied())
                .collect();
            pooled.sort_by(f64::total_cmp);
            Cell { rows, pooled }
        })
        .collect()
}

fn print_table(opts: &Opts, rows: &[Row], failed: &[String]) {
    let cells = cells(rows);
    let most = cells.iter().map(Cell::blocks).max().unwrap_or(0);
    let least = cells.iter().map(Cell::blocks).min().unwrap_or(0);
    println!();
    println!(
        "Loss sweep: {:.1} Mbit/s of {} byte blocks, {} ms one-way delay, loss both ways{}, fec: adaptive parity up to {:.0}%, fec-fixed: {:.0}%, {:?} (window floor {} B) for every mode, seeds {:?}, {} s per run",
        opts.bitrate as f64 / 1e6,
        opts.block_size,
        opts.delay_ms,
        opts.loss_up
            .map_or(String::new(), |u| format!(" (upstream {:.1}%)", u * 100.0)),
        opts.redundancy * 100.0,
        opts.fixed_redundancy * 100.0,
        opts.cc,
        opts.min_window,
        opts.seeds,
        opts.seconds,
    );
    println!(
        "On time, late, lost and the percentiles pool every block of a cell's seeds ({least} to {most} blocks a cell: one block is {:.3}% to {:.3}%); \
         a percentile beyond the budget is inf. \"seeds\" is on time per seed: median [min, max]. Overhead, feedback and drops are medians over seeds; \
         resets: streams not yet acknowledged at their deadline, reset by the sender. Bottleneck rows: drop-tail queue of {} ms of the rate.",
        100.0 / most.max(1) as f64,
        100.0 / least.max(1) as f64,
        opts.queue_ms,
    );
    println!();
    println!("| mode | model | loss % | budget ms | bottleneck Mbit/s | blocks | on time % | seeds | late % | lost % | p50 ms | p99 ms | p99.9 ms | overhead % | feedback % | sender drops | queue drops | resets |");
    println!(
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for c in &cells {
        let r = c.first();
        let per_seed: Vec<f64> = c.rows.iter().map(|r| r.pct(r.on_time)).collect();
        let lo = per_seed.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = per_seed.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        println!(
            "| {} | {} | {}{} | {} | {} | {} | {} | {} [{}, {}] | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.mode.name(),
            r.path.model_name(),
            fmt(r.path.loss * 100.0, 0),
            if r.path.loss_up != r.path.loss {
                format!(" (up {})", fmt(r.path.loss_up * 100.0, 0))
            } else {
                String::new()
            },
            r.budget_ms,
            fmt_bw(r.path.bandwidth_mbps),
            c.blocks(),
            fmt(c.on_time_pct(), 2),
            fmt(median(per_seed.clone()), 2),
            fmt(lo, 2),
            fmt(hi, 2),
            fmt(c.pooled_pct(|r| r.late), 2),
            fmt(c.pooled_pct(Row::lost), 2),
            fmt(c.p(0.5), 1),
            fmt(c.p(0.99), 1),
            fmt(c.p(0.999), 1),
            fmt(c.median(|r| r.overhead_pct), 1),
            fmt(c.median(|r| r.feedback_pct), 2),
            fmt(c.median(|r| r.sender_drops as f64), 0),
            fmt(c.median(|r| r.queue_drops as f64), 0),
            fmt(c.median(|r| r.streams_reset as f64), 0),
        );
    }
    for f in failed {
        println!();
        println!("FAILED: {f}");
    }
}

fn write_csv(path: &Path, opts: &Opts, rows: &[Row]) -> anyhow::Result<()> {
    let mut out = String::from(
        "mode,model,loss,budget_ms,bandwidth_mbps,seed,blocks,on_time_pct,late_pct,lost_pct,p50_ms,p99_ms,p999_ms,overhead_pct,feedback_pct,sender_drops,loss_up,queue_drops,streams_reset,queue_ms,delay_ms,bitrate_mbps,cc\n",
    );
    for r in rows {
        let mut sorted = r.scored_ms.clone();
        sorted.sort_by(f64::total_cmp);
        out += &format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:?}\n",
            r.mode.name(),
            r.path.model_name(),
            r.path.loss,
            r.budget_ms,
            r.path
                .bandwidth_mbps
                .map_or(String::new(), |b| b.to_string()),
            r.seed,
            r.blocks,
            fmt(r.pct(r.on_time), 3),
            fmt(r.pct(r.late), 3),
            fmt(r.pct(r.lost()), 3),
            fmt(quantile(&sorted, 0.5), 3),
            fmt(quantile(&sorted, 0.99), 3),
            fmt(quantile(&sorted, 0.999), 3),
            fmt(r.overhead_pct, 2),
            fmt(r.feedback_pct, 3),
            r.sender_drops,
            r.path.loss_up,
            r.queue_drops,
            r.streams_reset,
            r.path
                .bandwidth_mbps
                .map_or(String::new(), |_| opts.queue_ms.to_string()),
            opts.delay_ms,
            opts.bitrate as f64 / 1e6,
            opts.cc,
        )
        .replace('–', "");
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// Colour of a mode in the plot (Okabe-Ito, readable with colour blindness).
fn colour(mode: Mode) -> plotters::style::RGBColor {
    use plotters::style::RGBColor;
    match mode {
        Mode::Fec => RGBColor(0, 114, 178),
        Mode::FecFixed => RGBColor(204, 121, 167),
        Mode::Datagram => RGBColor(213, 94, 0),
        Mode::StreamPerBlock => RGBColor(0, 158, 115),
        Mode::Stream => RGBColor(230, 159, 0),
    }
}

/// One row of panels per budget: p99 latency and blocks not on time, both on
/// log axes so the FEC series near the floor stay apart, and a legend panel
/// beside them. iid lines are solid with circles, bursty dashed with
/// triangles. Only the sweep without a bottleneck is drawn.
fn plot(path: &Path, opts: &Opts, rows: &[Row]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let cells: Vec<Cell> = cells(rows)
        .into_iter()
        .filter(|c| c.first().path.bandwidth_mbps.is_none())
        .collect();
    let mut budgets: Vec<u64> = cells.iter().map(|c| c.first().budget_ms).collect();
    budgets.sort_unstable();
    budgets.dedup();
    if budgets.is_empty() {
        return Ok(());
    }
    let height = 60 + 380 * budgets.len() as u32;
    let root = SVGBackend::new(path, (1400, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "{:.0} Mbit/s, {} ms one-way, loss both ways, {:?}, no bottleneck; seeds {:?} pooled",
            opts.bitrate as f64 / 1e6,
            opts.delay_ms,
            opts.cc,
            opts.seeds
        ),
        ("sans-serif", 20),
    )?;
    let max_loss = cells
        .iter()
        .map(|c| c.first().path.loss * 100.0)
        .fold(1.0, f64::max);
    let mut modes: Vec<Mode> = cells.iter().map(|c| c.first().mode).collect();
    modes.sort_unstable();
    modes.dedup();
    let bands = root.split_evenly((budgets.len(), 1));
    for (band, &budget) in bands.iter().zip(&budgets) {
        let band = band.titled(&format!("budget {budget} ms"), ("sans-serif", 17))?;
        let (charts, legend) = band.split_horizontally(1120);
        let (left, right) = charts.split_horizontally(560);
        let in_band: Vec<&Cell> = cells
            .iter()
            .filter(|c| c.first().budget_ms == budget)
            .collect();
        // A series per mode and model; a loss-free cell belongs to both.
        let series = |mode: Mode, bursty: bool, y: &dyn Fn(&Cell) -> f64| -> Vec<(f64, f64)> {
            let mut v: Vec<(f64, f64)> = in_band
                .iter()
                .filter(|c| {
                    let r = c.first();
                    r.mode == mode
                        && (r.path.model_name() == "none"
                            || matches!(r.path.model, Model::Bursty(_)) == bursty)
                })
                .map(|c| (c.first().path.loss * 100.0, y(c)))
                .collect();
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            v
        };
        // p99 is either within the budget or inf: inf is drawn on a band above
        // the budget, labelled as such.
        let missed = budget as f64 * 1.6;
        let p99 = |c: &Cell| c.p(0.99).min(missed);
        // 100 - on time, floored at half a block of the cell so 0 has a place
        // on a log axis.
        let floor = 0.01;
        let miss = |c: &Cell| (100.0 - c.on_time_pct()).max(floor);
        for (area, which) in [(&left, 0), (&right, 1)] {
            let (y_desc, lo, hi) = if which == 0 {
                (
                    format!("p99 latency, ms (log; top band = beyond {budget} ms)"),
                    (opts.delay_ms as f64 * 0.8).max(1.0),
                    budget as f64 * 2.0,
                )
            } else {
                (
                    "blocks not on time, % (log; bottom = none)".to_string(),
                    floor * 0.8,
                    100.0,
                )
            };
            let mut chart = ChartBuilder::on(area)
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0..max_loss * 1.05, (lo..hi).log_scale())?;
            chart
                .configure_mesh()
                .x_desc("loss each way (%)")
                .y_desc(y_desc)
                .draw()?;
            if which == 0 {
                chart.draw_series(LineSeries::new(
                    vec![(0.0, budget as f64), (max_loss * 1.05, budget as f64)],
                    BLACK.stroke_width(2),
                ))?;
                chart.draw_series(std::iter::once(Text::new(
                    format!("budget {budget} ms"),
                    (max_loss * 0.02, budget as f64 * 1.06),
                    ("sans-serif", 13),
                )))?;
            }
            for &mode in &modes {
                let col = colour(mode);
                for bursty in [false, true] {
                    let pts = if which == 0 {
                        series(mode, bursty, &p99)
                    } else {
                        series(mode, bursty, &miss)
                    };
                    let pts: Vec<(f64, f64)> =
                        pts.into_iter().filter(|(_, y)| y.is_finite()).collect();
                    let style = col.stroke_width(2);
                    if bursty {
                        chart.draw_series(DashedLineSeries::new(pts.clone(), 6, 4, style))?;
                        chart.draw_series(
                            pts.iter().map(|&p| TriangleMarker::new(p, 5, col.filled())),
                        )?;
                    } else {
                        chart.draw_series(LineSeries::new(pts.clone(), style))?;
                        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, col.filled())))?;
                    }
                }
            }
        }
        // The legend lives in its own panel, never over the data.
        let font = ("sans-serif", 14).into_font();
        let mut y = 30;
        for &mode in &modes {
            let col = colour(mode);
            legend.draw(&PathElement::new(
                vec![(10, y), (40, y)],
                col.stroke_width(3),
            ))?;
            legend.draw(&Text::new(mode.name(), (50, y - 7), font.clone()))?;
            y += 24;
        }
        y += 10;
        legend.draw(&PathElement::new(
            vec![(10, y), (40, y)],
            BLACK.stroke_width(2),
        ))?;
        legend.draw(&Circle::new((25, y), 3, BLACK.filled()))?;
        legend.draw(&Text::new("iid", (50, y - 7), font.clone()))?;
        y += 24;
        legend.draw(&plotters::element::DashedPathElement::new(
            vec![(10, y), (40, y)],
            6,
            4,
            BLACK.stroke_width(2),
        ))?;
        legend.draw(&TriangleMarker::new((25, y), 5, BLACK.filled()))?;
        legend.draw(&Text::new(
            format!("bursty (mean {})", opts.burst),
            (50, y - 7),
            font.clone(),
        ))?;
    }
    root.present()?;
    Ok(())
}

/// The paths of the sweep, in order.
fn sweep(opts: &Opts) -> anyhow::Result<Vec<PathSpec>> {
    let up = |loss: f64| opts.loss_up.unwrap_or(loss);
    let spec = |model, loss, bw| PathSpec {
        model,
        loss,
        loss_up: up(loss),
        bandwidth_mbps: bw,
    };
    let bursty = Model::Bursty(opts.burst);
    let mut paths = Vec::new();
    if opts.quick {
        paths.push(spec(Model::Iid, 0.05, opts.bandwidth_mbps));
        paths.push(spec(bursty, 0.05, opts.bandwidth_mbps));
        return Ok(paths);
    }
    for m in &opts.models {
        match m.as_str() {
            "iid" => paths.extend(
                opts.losses
                    .iter()
                    .map(|&p| spec(Model::Iid, p, opts.bandwidth_mbps)),
            ),
            "bursty" => paths.extend(
                opts.bursty_losses
                    .iter()
                    .map(|&p| spec(bursty, p, opts.bandwidth_mbps)),
            ),
            other => anyhow::bail!("unknown loss model {other:?} (iid, bursty)"),
        }
    }
    for &bw in opts.bottlenecks.iter().filter(|&&b| b > 0.0) {
        paths.push(spec(Model::Iid, opts.bottleneck_loss, Some(bw)));
    }
    Ok(paths)
}

fn main() -> anyhow::Result<()> {
    if std::env::var("RUST_LOG").is_ok() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let mut opts = Opts::parse();
    if opts.quick {
        opts.seconds = opts.seconds.min(5.0);
        opts.seeds.truncate(1);
    }
    anyhow::ensure!(!opts.seeds.is_empty(), "no seeds");
    anyhow::ensure!(!opts.budgets.is_empty(), "no budgets");
    let paths = sweep(&opts)?;
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/loss-bench"));
    std::fs::create_dir_all(&out)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for path in paths {
        // Without loss the seed draws nothing: one run says all there is.
        let seeds = if path.loss <= 0.0 && path.loss_up <= 0.0 {
            &opts.seeds[..1]
        } else {
            &opts.seeds[..]
        };
        for &mode in &opts.modes {
            let budgets: Vec<Option<u64>> = if mode.uses_budget() {
                opts.budgets.iter().map(|&b| Some(b)).collect()
            } else {
                vec![None]
            };
            for budget in budgets {
                for &seed in seeds {
                    let run_started = Instant::now();
                    let b = Duration::from_millis(budget.unwrap_or(0));
                    // Every run is bounded: a stuck run is reported, not waited on.
                    let limit = Duration::from_secs_f64(opts.seconds) + Duration::from_secs(30);
                    let what = format!(
                        "{} {} {:.0}% {} bw {} seed {seed}",
                        mode.name(),
                        path.model_name(),
                        path.loss * 100.0,
                        budget.map_or("any budget".into(), |b| format!("{b} ms")),
                        fmt_bw(path.bandwidth_mbps),
                    );
                    let result = rt.block_on(async {
                        tokio::time::timeout(limit, async {
                            match mode {
                                Mode::Fec | Mode::FecFixed | Mode::Datagram => {
                                    run_quicast(&opts, mode, path, b, seed).await
                                }
                                Mode::StreamPerBlock => {
                                    run_stream_per_block(&opts, path, b, seed).await
                                }
                                Mode::Stream => run_stream(&opts, path, seed).await,
                            }
                        })
                        .await
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("did not finish in {limit:?}")))
                    });
                    let outcome = match result {
                        Ok(o) => o,
                        Err(e) => {
                            eprintln!("{what}: FAILED: {e:#}");
                            failed.push(format!("{what}: {e:#}"));
                            continue;
                        }
                    };
                    let scored: Vec<u64> = budget.map_or(opts.budgets.clone(), |b| vec![b]);
                    for b in scored {
                        let r = Row::score(&opts, mode, path, b, seed, &outcome);
                        let mut sorted = r.scored_ms.clone();
                        sorted.sort_by(f64::total_cmp);
                        eprintln!(
                            "{what} [{b} ms]: on time {:>7.3}%  late {:.2}%  p99 {:>6} ms  overhead {:>5.1}%  feedback {:.2}%  drops {}/{} resets {}  ({:.1} s, {:.0} s total)",
                            r.pct(r.on_time),
                            r.pct(r.late),
                            fmt(quantile(&sorted, 0.99), 1),
                            r.overhead_pct,
                            r.feedback_pct,
                            r.sender_drops,
                            r.queue_drops,
                            r.streams_reset,
                            run_started.elapsed().as_secs_f64(),
                            started.elapsed().as_secs_f64(),
                        );
                        rows.push(r);
                    }
                }
            }
        }
    }
    print_table(&opts, &rows, &failed);
    if !opts.no_saturation {
        let secs = if opts.quick { 1.0 } else { 3.0 };
        let (raw, raw_lost) = rt.block_on(saturation_raw(&opts, secs))?;
        let (fec, fec_lost, fec_drops) = rt.block_on(saturation_quicast(&opts, secs))?;
        println!();
        println!("Saturation on loopback, no impairment, {secs} s each:");
        println!();
        println!("| what | Mbit/s received | lost % | sender drops |");
        println!("|---|---:|---:|---:|");
        println!("| raw quinn, 1200-byte datagrams | {raw:.0} | {raw_lost:.2} | – |");
        println!("| quicast fec, media delivered | {fec:.0} | {fec_lost:.2} | {fec_drops} |");
    }
    let csv = out.join("results.csv");
    write_csv(&csv, &opts, &rows)?;
    let svg = out.join("latency.svg");
    plot(&svg, &opts, &rows)?;
    println!();
    println!(
        "wrote {} and {} ({:.0} s)",
        csv.display(),
        svg.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
