//! The loss benchmark: quicast's FEC datagrams vs plain datagrams vs one
//! reliable QUIC stream, side by side, under the same seeded loss.
//!
//! ```text
//! cargo bench --bench loss                 # full sweep
//! cargo bench --bench loss -- --quick      # 0% and 5% iid, 5% bursty: about a minute
//! cargo bench --bench loss -- --help
//! ```
//!
//! Every mode runs over the same in-process path: the viewer's socket is a
//! `sim::LossySocket` that delays both directions by the one-way delay and
//! drops packets towards the viewer with the chosen model and seed. It sits
//! below QUIC, so quinn's loss recovery and congestion control react as they
//! would on a real path. Latency is measured the same way for every mode: from
//! the instant the publisher handed the block over to the instant the viewer's
//! application got it, on one process clock.
//!
//! Writes a Markdown table to stdout, `target/loss-bench/results.csv` and
//! `target/loss-bench/latency.svg`.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use quicast::{
    config::FecConfig,
    sim::{Impairment, LinkConfig, LossModel, LossySocket},
    Client, ClientConfig, CongestionControl, Event, Parity, Server, ServerConfig,
};

/// FEC datagrams vs plain datagrams vs a reliable QUIC stream under seeded loss.
#[derive(Debug, Clone, Parser)]
struct Opts {
    /// A short subset: 0% and 5% iid loss and 5% bursty loss, all three modes.
    #[arg(long)]
    quick: bool,
    /// Media bitrate, bits per second.
    #[arg(long, default_value_t = 8_000_000)]
    bitrate: u64,
    /// One-way delay of the simulated path, milliseconds (both directions).
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
    /// Latency budget, milliseconds. Default: one-way delay + 10.
    #[arg(long)]
    budget_ms: Option<u64>,
    /// Seconds of media per run.
    #[arg(long, default_value_t = 8.0)]
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
    /// Mean burst length of the bursty (Gilbert-Elliott) model, packets.
    #[arg(long, default_value_t = 4.0)]
    burst: f64,
    /// Loss rates to sweep, comma separated fractions.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,0.01,0.02,0.05,0.10,0.20"
    )]
    losses: Vec<f64>,
    /// Modes to run, comma separated: fec (adaptive parity, as shipped),
    /// fec-fixed (a fixed parity ratio), datagram, stream.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fec,fec-fixed,datagram,stream"
    )]
    modes: Vec<String>,
    /// Seed of the loss pattern (the same for every mode).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Skip the saturation rows.
    #[arg(long)]
    no_saturation: bool,
    /// Output directory. Default target/loss-bench.
    #[arg(long)]
    out: Option<PathBuf>,
    // `cargo bench` passes --bench to every bench binary.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Opts {
    fn budget(&self) -> Duration {
        Duration::from_millis(self.budget_ms.unwrap_or(self.delay_ms + 10))
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

#[derive(Debug, Clone)]
struct Row {
    mode: String,
    model: String,
    loss: f64,
    delay_ms: u64,
    bitrate_mbps: f64,
    on_time_pct: f64,
    lost_pct: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    overhead_pct: f64,
    goodput_mbps: f64,
    sender_dropped: u64,
}

/// Progress markers, with `LOSS_BENCH_DEBUG` set.
fn stage(what: &str) {
    if std::env::var_os("LOSS_BENCH_DEBUG").is_some() {
        eprintln!("  [{what}]");
    }
}

/// When each block was handed to the sender, by sequence number.
type Published = Arc<Mutex<Vec<Instant>>>;

/// What the viewer side measured.
struct Received {
    latency: Histogram<u64>,
    on_time: u64,
    on_time_bytes: u64,
    delivered: u64,
    seen: std::collections::HashSet<u64>,
}

impl Received {
    fn new() -> Self {
        Received {
            latency: Histogram::new_with_bounds(1, 600_000_000, 3).unwrap(),
            on_time: 0,
            on_time_bytes: 0,
            delivered: 0,
            seen: Default::default(),
        }
    }

    fn missing(&self, n: u64) -> Vec<u64> {
        (0..n).filter(|s| !self.seen.contains(s)).collect()
    }

    fn record(&mut self, published: &Published, seq: u64, len: usize, budget: Duration) {
        let Some(at) = published.lock().unwrap().get(seq as usize).copied() else {
            return;
        };
        let latency = at.elapsed();
        self.seen.insert(seq);
        self.latency
            .saturating_record((latency.as_micros() as u64).max(1));
        self.delivered += 1;
        if latency <= budget {
            self.on_time += 1;
            self.on_time_bytes += len as u64;
        }
    }
}

/// The server's socket: a perfect link, used to count the bytes on the wire.
fn server_socket() -> anyhow::Result<Arc<LossySocket>> {
    Ok(quicast::sim::bind(
        "127.0.0.1:0".parse()?,
        Impairment::symmetric(LinkConfig::default(), 0),
    )?)
}

/// The viewer's socket: the path's delay both ways, loss towards the viewer.
fn viewer_socket(opts: &Opts, model: Model, loss: f64) -> anyhow::Result<Arc<LossySocket>> {
    let delay = Duration::from_millis(opts.delay_ms);
    let mut inbound = LinkConfig::default();
    inbound.loss(model.loss(loss)?).delay(delay);
    let mut outbound = LinkConfig::default();
    outbound.delay(delay);
    Ok(quicast::sim::bind(
        "127.0.0.1:0".parse()?,
        Impairment {
            inbound,
            outbound,
            seed: opts.seed,
        },
    )?)
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

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dgram {
    /// As shipped: parity per viewer from its reported loss.
    Adaptive,
    /// Every viewer gets `fixed_redundancy` parity.
    Fixed,
    /// No parity at all.
    Plain,
}

/// quicast over datagrams.
async fn run_quicast(opts: &Opts, model: Model, loss: f64, mode: Dgram) -> anyhow::Result<Row> {
    let (cert, identity) = quicast::net::tls::self_signed_identity()?;
    let mut fc = FecConfig::default();
    fc.set_redundancy(if mode == Dgram::Fixed {
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
        .parity(match mode {
            Dgram::Adaptive => Parity::Adaptive,
            Dgram::Fixed => Parity::All,
            Dgram::Plain => Parity::Fixed(0),
        });
    let ssock = server_socket()?;
    let server = Server::bind_socket(config, ssock.clone())?;
    let addr = server.local_addr()?;
    let mut publisher = server.publish("bench", None)?;
    let driver = tokio::spawn(server.run());

    let vsock = viewer_socket(opts, model, loss)?;
    let endpoint = Client::endpoint(addr, Some(vsock.clone()))?;
    let mut cc = ClientConfig::new(addr, "bench");
    cc.add_root(cert).latency(opts.budget()).congestion(opts.cc);
    let mut viewer = Client::connect_with(&endpoint, cc).await?;
    stage("connected");

    let (n, interval) = blocks(opts);
    let published: Published = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
    let block_size = opts.block_size;
    let pubs = published.clone();
    let publishing = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for seq in 0..n {
            tick.tick().await;
            pubs.lock().unwrap().push(Instant::now());
            publisher.send(block(seq, block_size), seq % 50 == 0)?;
        }
        publisher.finish();
        anyhow::Ok(())
    });
    let budget = opts.budget();
    let mut rx = Received::new();
    let limit = Duration::from_secs_f64(opts.seconds) + Duration::from_secs(5);
    let _ = tokio::time::timeout(limit, async {
        while let Some(ev) = viewer.next().await {
            match ev {
                Ok(Event::Block { seq, data, .. }) => {
                    rx.record(&published, seq, data.len(), budget)
                }
                Ok(Event::End) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    stage("viewed");
    publishing.await??;
    stage("published");
    let sstats = server.stats();
    if std::env::var("LOSS_BENCH_DEBUG").is_ok() {
        let v = viewer.stats();
        eprintln!(
            "sender drops {} late shards {} lost {} missing {:?}",
            sstats.datagrams_dropped,
            v.shards_late,
            v.blocks_lost,
            rx.missing(n)
        );
    }
    viewer.close();
    server.shutdown(Duration::from_millis(200)).await;
    stage("shut down");
    driver.abort();
    Ok(row(
        opts,
        match mode {
            Dgram::Adaptive => "fec",
            Dgram::Fixed => "fec-fixed",
            Dgram::Plain => "datagram",
        },
        model,
        loss,
        n,
        &rx,
        ssock.stats().outbound.bytes_delivered,
        sstats.datagrams_dropped,
    ))
}

/// quinn server and client configs for the raw-quinn modes: a fresh
/// self-signed certificate the client trusts (verification on), quicast's
/// congestion settings, and `datagram_receive` bytes of datagram buffer.
fn raw_quinn(
    opts: &Opts,
    datagram_receive: usize,
) -> anyhow::Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    let (cert, key) = quicast::net::tls::self_signed()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    tls.alpn_protocols = vec![b"bench".to_vec()];
    let mut transport = quinn::TransportConfig::default();
    set_cc(&mut transport, opts);
    transport.datagram_receive_buffer_size(Some(datagram_receive));
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

/// The same blocks written to one reliable QUIC stream with quinn alone.
async fn run_stream(opts: &Opts, model: Model, loss: f64) -> anyhow::Result<Row> {
    let (sc, cc) = raw_quinn(opts, 1 << 20)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let ssock = server_socket()?;
    let server = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(sc),
        ssock.clone(),
        runtime.clone(),
    )?;
    let addr: SocketAddr = server.local_addr()?;
    let vsock = viewer_socket(opts, model, loss)?;
    let client = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        vsock,
        runtime,
    )?;

    let (n, interval) = blocks(opts);
    let published: Published = Arc::new(Mutex::new(Vec::with_capacity(n as usize)));
    let block_size = opts.block_size;
    let pubs = published.clone();
    let sending = tokio::spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let mut send = conn.open_uni().await?;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for seq in 0..n {
            tick.tick().await;
            pubs.lock().unwrap().push(Instant::now());
            let b = block(seq, block_size);
            send.write_all(&(b.len() as u32).to_be_bytes()).await?;
            send.write_all(&b).await?;
        }
        send.finish()?;
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        anyhow::Ok(server)
    });
    let conn = client.connect_with(cc, addr, "localhost")?.await?;
    let mut recv = conn.accept_uni().await?;
    let budget = opts.budget();
    let mut rx = Received::new();
    let limit = Duration::from_secs_f64(opts.seconds) + Duration::from_secs(5);
    let _ = tokio::time::timeout(limit, async {
        let mut len = [0u8; 4];
        let mut buf = vec![0u8; block_size];
        for seq in 0..n {
            if recv.read_exact(&mut len).await.is_err() {
                break;
            }
            let l = u32::from_be_bytes(len) as usize;
            buf.resize(l, 0);
            if recv.read_exact(&mut buf).await.is_err() {
                break;
            }
            rx.record(&published, seq, l, budget);
        }
    })
    .await;
    conn.close(0u32.into(), b"done");
    let server = sending.await??;
    server.close(0u32.into(), b"done");
    Ok(row(
        opts,
        "stream",
        model,
        loss,
        n,
        &rx,
        ssock.stats().outbound.bytes_delivered,
        0,
    ))
}

/// The stream mode gets the same congestion controller and initial window as
/// quicast, so the comparison isolates FEC against retransmission.
fn set_cc(t: &mut quinn::TransportConfig, opts: &Opts) {
    quicast::net::tls::set_congestion(t, opts.cc, opts.min_window);
}

#[allow(clippy::too_many_arguments)]
fn row(
    opts: &Opts,
    mode: &str,
    model: Model,
    loss: f64,
    published: u64,
    rx: &Received,
    wire_bytes: u64,
    sender_dropped: u64,
) -> Row {
    let media = published * opts.block_size as u64;
    let q = |q: f64| {
        if rx.latency.is_empty() {
            f64::NAN
        } else {
            rx.latency.value_at_quantile(q) as f64 / 1000.0
        }
    };
    let pct = |n: u64| 100.0 * n as f64 / published.max(1) as f64;
    Row {
        mode: mode.into(),
        model: if loss > 0.0 { model.name() } else { "none" }.into(),
        loss,
        delay_ms: opts.delay_ms,
        bitrate_mbps: opts.bitrate as f64 / 1e6,
        on_time_pct: pct(rx.on_time),
        lost_pct: pct(published - rx.delivered.min(published)),
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        max_ms: if rx.latency.is_empty() {
            f64::NAN
        } else {
            rx.latency.max() as f64 / 1000.0
        },
        overhead_pct: 100.0 * (wire_bytes as f64 / media.max(1) as f64 - 1.0),
        goodput_mbps: rx.on_time_bytes as f64 * 8.0 / opts.seconds / 1e6,
        sender_dropped,
    }
}

/// Raw quinn datagram throughput on loopback: 1200-byte datagrams, as fast as
/// `send_datagram_wait` allows, for `secs`.
async fn saturation_raw(opts: &Opts, secs: f64) -> anyhow::Result<Row> {
    let (sc, cc) = raw_quinn(opts, 8 << 20)?;
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
    Ok(Row {
        mode: "raw-datagram-saturation".into(),
        model: "none".into(),
        loss: 0.0,
        delay_ms: 0,
        bitrate_mbps: f64::NAN,
        on_time_pct: f64::NAN,
        lost_pct: 100.0 * (1.0 - got as f64 / sent.max(1) as f64),
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        p999_ms: f64::NAN,
        max_ms: f64::NAN,
        overhead_pct: f64::NAN,
        goodput_mbps: got as f64 * size as f64 * 8.0 / elapsed / 1e6,
        sender_dropped: 0,
    })
}

/// quicast media goodput at saturation: blocks published as fast as the
/// publisher can encode them, for `secs`, one viewer on loopback.
async fn saturation_quicast(opts: &Opts, secs: f64) -> anyhow::Result<Row> {
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
            publisher.send(data.clone(), false)?;
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
    Ok(Row {
        mode: "fec-saturation".into(),
        model: "none".into(),
        loss: 0.0,
        delay_ms: 0,
        bitrate_mbps: published as f64 * block_size as f64 * 8.0 / secs / 1e6,
        on_time_pct: f64::NAN,
        lost_pct: 100.0 * (1.0 - stats.blocks_delivered as f64 / published.max(1) as f64),
        p50_ms: stats.latency().p50,
        p99_ms: stats.latency().p99,
        p999_ms: stats.latency().p999,
        max_ms: stats.latency().max,
        overhead_pct: 100.0 * (sstats.bytes_sent as f64 / sstats.media_bytes.max(1) as f64 - 1.0),
        goodput_mbps: bytes as f64 * 8.0 / elapsed.min(secs + 3.0) / 1e6,
        sender_dropped: sstats.datagrams_dropped,
    })
}

fn fmt(v: f64, digits: usize) -> String {
    if v.is_nan() {
        "–".into()
    } else {
        format!("{v:.digits$}")
    }
}

fn print_table(opts: &Opts, rows: &[Row]) {
    println!();
    println!(
        "Loss sweep: {:.1} Mbit/s, {} ms one-way delay, {} ms budget, {} byte blocks, fec: adaptive parity up to {:.0}%, fec-fixed: {:.0}%, {:?}, seed {}, {} s per run",
        opts.bitrate as f64 / 1e6,
        opts.delay_ms,
        opts.budget().as_millis(),
        opts.block_size,
        opts.redundancy * 100.0,
        opts.fixed_redundancy * 100.0,
        opts.cc,
        opts.seed,
        opts.seconds
    );
    println!();
    println!("| mode | model | loss % | on time % | lost % | p50 ms | p99 ms | p99.9 ms | max ms | overhead % | goodput Mbit/s | sender drops |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.mode,
            r.model,
            fmt(r.loss * 100.0, 0),
            fmt(r.on_time_pct, 2),
            fmt(r.lost_pct, 2),
            fmt(r.p50_ms, 1),
            fmt(r.p99_ms, 1),
            fmt(r.p999_ms, 1),
            fmt(r.max_ms, 1),
            fmt(r.overhead_pct, 1),
            fmt(r.goodput_mbps, 2),
            r.sender_dropped
        );
    }
}

fn write_csv(path: &std::path::Path, rows: &[Row]) -> anyhow::Result<()> {
    let mut out = String::from("mode,model,loss,delay_ms,bitrate_mbps,on_time_pct,lost_pct,p50_ms,p99_ms,p999_ms,max_ms,overhead_pct,goodput_mbps,sender_dropped\n");
    for r in rows {
        out += &format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.mode,
            r.model,
            r.loss,
            r.delay_ms,
            fmt(r.bitrate_mbps, 3),
            fmt(r.on_time_pct, 3),
            fmt(r.lost_pct, 3),
            fmt(r.p50_ms, 3),
            fmt(r.p99_ms, 3),
            fmt(r.p999_ms, 3),
            fmt(r.max_ms, 3),
            fmt(r.overhead_pct, 2),
            fmt(r.goodput_mbps, 3),
            r.sender_dropped
        )
        .replace('–', "");
    }
    std::fs::write(path, out)?;
    Ok(())
}

fn plot(path: &std::path::Path, opts: &Opts, rows: &[Row]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "{:.0} Mbit/s, {} ms one-way, budget {} ms ({:?})",
        opts.bitrate as f64 / 1e6,
        opts.delay_ms,
        opts.budget().as_millis(),
        opts.cc
    );
    let root = root.titled(&title, ("sans-serif", 20))?;
    let (left, right) = root.split_horizontally(600);
    let sweep: Vec<&Row> = rows
        .iter()
        .filter(|r| !r.mode.contains("saturation"))
        .collect();
    let max_loss = sweep.iter().map(|r| r.loss * 100.0).fold(1.0, f64::max);
    let max_p99 = sweep
        .iter()
        .filter(|r| !r.p99_ms.is_nan())
        .map(|r| r.p99_ms)
        .fold(opts.budget().as_millis() as f64 * 1.5, f64::max);
    let series = |mode: &str, model: &str| -> Vec<&Row> {
        let mut v: Vec<&Row> = sweep
            .iter()
            .copied()
            .filter(|r| r.mode == mode && (r.model == model || r.model == "none"))
            .collect();
        v.sort_by(|a, b| a.loss.total_cmp(&b.loss));
        v
    };
    let lines = [
        ("fec", "iid", RGBColor(0, 114, 178)),
        ("fec", "bursty", RGBColor(86, 180, 233)),
        ("fec-fixed", "iid", RGBColor(204, 121, 167)),
        ("fec-fixed", "bursty", RGBColor(230, 170, 200)),
        ("datagram", "iid", RGBColor(213, 94, 0)),
        ("datagram", "bursty", RGBColor(230, 159, 0)),
        ("stream", "iid", RGBColor(0, 158, 115)),
        ("stream", "bursty", RGBColor(120, 200, 160)),
    ];
    for (area, metric) in [(&left, "p99"), (&right, "ontime")] {
        let (y_desc, y_max) = if metric == "p99" {
            ("p99 block latency (ms)", max_p99)
        } else {
            ("blocks on time (%)", 100.0)
        };
        let mut chart = ChartBuilder::on(area)
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..max_loss, 0.0..y_max * 1.05)?;
        chart
            .configure_mesh()
            .x_desc("loss (%)")
            .y_desc(y_desc)
            .draw()?;
        for (mode, model, color) in lines {
            let pts: Vec<(f64, f64)> = series(mode, model)
                .iter()
                .map(|r| {
                    (
                        r.loss * 100.0,
                        if metric == "p99" {
                            r.p99_ms
                        } else {
                            r.on_time_pct
                        },
                    )
                })
                .filter(|(_, y)| !y.is_nan())
                .collect();
            if pts.len() < 2 {
                continue;
            }
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(format!("{mode} ({model})"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        }
        if metric == "p99" {
            let budget = opts.budget().as_millis() as f64;
            chart
                .draw_series(LineSeries::new(
                    vec![(0.0, budget), (max_loss, budget)],
                    BLACK.mix(0.4),
                ))?
                .label("latency budget")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK.mix(0.3))
            .position(if metric == "p99" {
                SeriesLabelPosition::UpperLeft
            } else {
                SeriesLabelPosition::LowerLeft
            })
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::var("RUST_LOG").is_ok() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let mut opts = Opts::parse();
    let runs: Vec<(Model, f64)> = if opts.quick {
        opts.seconds = opts.seconds.min(5.0);
        vec![
            (Model::Iid, 0.0),
            (Model::Iid, 0.05),
            (Model::Bursty(opts.burst), 0.05),
        ]
    } else {
        let mut v: Vec<(Model, f64)> = opts.losses.iter().map(|&p| (Model::Iid, p)).collect();
        v.extend(
            opts.losses
                .iter()
                .filter(|&&p| p > 0.0)
                .map(|&p| (Model::Bursty(opts.burst), p)),
        );
        v
    };
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/loss-bench"));
    std::fs::create_dir_all(&out)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows = Vec::new();
    for (model, loss) in runs {
        for mode in &opts.modes {
            let started = Instant::now();
            // Every run is bounded: a stuck run is reported, not waited on.
            let limit = Duration::from_secs_f64(opts.seconds) + Duration::from_secs(30);
            let r = rt.block_on(async {
                tokio::time::timeout(limit, async {
                    match mode.as_str() {
                        "fec" => run_quicast(&opts, model, loss, Dgram::Adaptive).await,
                        "fec-fixed" => run_quicast(&opts, model, loss, Dgram::Fixed).await,
                        "datagram" => run_quicast(&opts, model, loss, Dgram::Plain).await,
                        "stream" => run_stream(&opts, model, loss).await,
                        other => anyhow::bail!("unknown mode {other}"),
                    }
                })
                .await
                .map_err(|_| {
                    anyhow::anyhow!(
                        "{mode} {} {loss}: run did not finish in {limit:?}",
                        model.name()
                    )
                })?
            })?;
            eprintln!(
                "{:>8} {:>6} {:>5.1}%: on time {:>7.3}%  p99 {:>7.1} ms  overhead {:>5.1}%  ({:.1} s)",
                r.mode,
                r.model,
                loss * 100.0,
                r.on_time_pct,
                r.p99_ms,
                r.overhead_pct,
                started.elapsed().as_secs_f64()
            );
            rows.push(r);
        }
    }
    if !opts.no_saturation {
        let secs = if opts.quick { 2.0 } else { 4.0 };
        rows.push(rt.block_on(saturation_raw(&opts, secs))?);
        rows.push(rt.block_on(saturation_quicast(&opts, secs))?);
    }
    print_table(&opts, &rows);
    let csv = out.join("results.csv");
    write_csv(&csv, &rows)?;
    let svg = out.join("latency.svg");
    plot(&svg, &opts, &rows)?;
    println!();
    println!("wrote {} and {}", csv.display(), svg.display());
    Ok(())
}
