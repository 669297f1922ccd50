//! quicast server: publishes one live stream from a file, stdin or a built-in
//! synthetic source, as FEC-protected QUIC datagrams.
//!
//! ```text
//! cargo run --release --example server -- --input movie.ts --bitrate 8000000
//! ```

mod common;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use quicast::{
    config::FecConfig, net::Stopped, CongestionControl, Identity, Parity, Publisher, Server,
    ServerConfig,
};
use tokio::io::AsyncReadExt;

/// Serve a live stream to quicast viewers over QUIC datagrams with Reed-Solomon FEC.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// UDP address to listen on.
    #[arg(long, default_value = "127.0.0.1:4433")]
    listen: SocketAddr,
    /// Media to send: a file, or `-` for stdin. Default: a built-in synthetic stream.
    #[arg(long, value_name = "PATH")]
    input: Option<String>,
    /// Pace of a file input in bits per second (also the synthetic stream's rate). Not
    /// applied to stdin, which is sent as fast as it arrives: a live source paces itself.
    #[arg(long, default_value_t = 8_000_000)]
    bitrate: u64,
    /// With `--input -`, publish a partial block once its first byte has waited this long.
    /// Lower adds less latency but makes smaller blocks, which FEC protects less efficiently.
    #[arg(long, default_value_t = 5.0, value_name = "MS")]
    flush_ms: f64,
    /// Bytes per block. Default 112 MPEG-TS packets (21056 bytes, 20 shards of 1100 bytes);
    /// keep it a multiple of 188 so TS packets are never split. From stdin a block is also
    /// published early when `--flush-ms` has passed.
    #[arg(long, default_value_t = 188 * 112)]
    block_size: usize,
    /// Name of the stream viewers subscribe to.
    #[arg(long, default_value = "live")]
    stream: String,
    /// Most parity shards per data shard, encoded once for every block (0.5 = 50%).
    #[arg(long, default_value_t = 0.5)]
    redundancy: f64,
    /// Parity each viewer is sent: `auto` (from its reported loss), `all`, or a count per group.
    #[arg(long, default_value = "auto", value_parser = parse_parity)]
    parity: Parity,
    /// Serve Prometheus metrics at http://ADDR/metrics (axum over the library's
    /// `Server::metrics_text`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Write every accepted viewer event to PATH as JSON lines; each run starts a new
    /// file (the previous run's becomes PATH.1).
    #[arg(long, value_name = "PATH")]
    events: Option<PathBuf>,
    /// Most data shards per code group; larger groups protect better against random loss.
    #[arg(long, default_value_t = 32)]
    max_data_shards: usize,
    /// Access token viewers must present. Default: open.
    #[arg(long)]
    token: Option<String>,
    /// Certificate chain (PEM). Default: a dev certificate generated into certs/.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) for --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// Congestion controller: bbr, cubic or newreno.
    #[arg(long, default_value = "bbr")]
    congestion: CongestionControl,
    /// Start reading the input when the first viewer subscribes.
    #[arg(long)]
    start_on_viewer: bool,
    /// Exit 0 once the input has ended and every viewer has been told.
    #[arg(long)]
    exit_at_end: bool,
    /// Also publish viewer events to NATS JetStream at this URL (e.g. nats://127.0.0.1:4222).
    #[arg(long, value_name = "URL")]
    nats: Option<String>,
    /// Deployment name: events go to subject quicast.<NAME>.events.<stream>.
    #[arg(long, value_name = "NAME", default_value = "default")]
    deployment: String,
    /// This server's id in its NATS events (the aggregator's `server` label).
    #[arg(long, value_name = "ID", default_value = quicast::config::DEFAULT_SERVER_ID)]
    server_id: String,
    #[command(flatten)]
    impair: common::ImpairArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::init_tracing();
    // One line naming the cause, no backtrace, and a non-zero exit.
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Everything that can fail at start fails before a viewer can connect.
    let mut file = match args.input.as_deref() {
        Some("-") | None => None,
        Some(path) => Some(
            tokio::fs::File::open(path)
                .await
                .with_context(|| format!("--input {path}"))?,
        ),
    };
    let metrics = match args.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--metrics {addr}"))?,
        ),
        None => None,
    };
    let identity = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Identity::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => Identity::DevCertificate {
            dir: common::certs_dir(),
        },
    };
    let mut fec = FecConfig::default();
    fec.set_redundancy(args.redundancy)?;
    fec.set_max_data_shards(args.max_data_shards)?;
    let mut config = ServerConfig::new(identity);
    config
        .listen(args.listen)
        .fec(fec)
        .congestion(args.congestion)
        .parity(args.parity)
        .event_log(args.events.clone())
        .token(args.token.clone().map(Bytes::from));
    config
        .nats(args.nats.clone(), &args.deployment)?
        .server_id(&args.server_id)?;
    let server = match args.impair.socket(args.listen)? {
        Some(socket) => Server::bind_socket(config, socket),
        None => Server::bind(config),
    }
    .with_context(|| format!("listening on {}", args.listen))?;
    let mut publisher = server.publish(&args.stream, None)?;
    // A pipe is read as fast as its source writes: no bitrate applies.
    let pace = match args.input.as_deref() {
        Some("-") => "as the input comes".to_owned(),
        _ => format!("{} kbit/s", args.bitrate / 1000),
    };
    eprintln!(
        "quicast server on {} stream {:?} ({pace}, {} byte blocks)",
        server.local_addr()?,
        args.stream,
        args.block_size
    );
    let driver = tokio::spawn(server.run());
    if let Some(listener) = metrics {
        eprintln!("metrics on http://{}/metrics", listener.local_addr()?);
        let server = server.clone();
        tokio::spawn(async move {
            if let Err(e) = common::metrics::serve(listener, move || server.metrics_text()).await {
                eprintln!("metrics endpoint stopped: {e}");
            }
        });
    }

    // SIGINT or SIGTERM stops gracefully; a second one exits at once.
    let mut signals = quicast::net::Signals::new().context("signal handlers")?;
    let mut signalled = None;
    if args.start_on_viewer {
        eprintln!("waiting for the first viewer...");
        tokio::select! {
            _ = publisher.wait_for_viewers(1) => {}
            s = signals.recv() => signalled = Some(s),
        }
    }
    let block_size = args.block_size.max(1);
    let sent = match args.input.as_deref() {
        _ if signalled.is_some() => Ok(0),
        Some("-") => {
            let flush = Duration::from_secs_f64(args.flush_ms.max(0.0) / 1e3);
            let stdin = tokio::io::stdin();
            tokio::select! {
                r = forward_pipe(stdin, &mut publisher, block_size, flush) => r,
                s = signals.recv() => {
                    signalled = Some(s);
                    Ok(publisher.next_seq())
                }
            }
        }
        _ => {
            tokio::select! {
                r = paced(file.as_mut(), &mut publisher, block_size, args.bitrate) => match args.input.as_deref() {
                    Some(path) => r.with_context(|| format!("reading --input {path}")),
                    None => r,
                },
                s = signals.recv() => {
                    signalled = Some(s);
                    Ok(publisher.next_seq())
                }
            }
        }
    };
    let viewers = publisher.viewers();
    let sent = match sent {
        Ok(sent) => sent,
        Err(e) => {
            // Viewers are told the stream failed (Goodbye, publisher_failed),
            // never that it ended.
            let reason = format!("{e:#}");
            publisher.fail(reason.clone());
            eprintln!(
                "input failed after {} blocks; telling {viewers} viewer(s) the publisher failed",
                server.stats().blocks_published
            );
            // Let the Goodbye (publisher_failed) reach them before the
            // shutdown's own (shutdown) could overtake it; bounded.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while server.stats().viewers > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            server.shutdown(Duration::from_secs(2)).await;
            driver.abort();
            return Err(e);
        }
    };
    let publisher = match signalled {
        Some(s) => {
            eprintln!(
                "{s}: stopping after {sent} blocks: Goodbye to {viewers} viewer(s), then every accepted event applied and logged (again to exit at once)"
            );
            // Ended by the server going away (Goodbye, shutdown), not by
            // the input: finished after the viewers are gone.
            Some(publisher)
        }
        None => {
            publisher.finish();
            eprintln!("input ended after {sent} blocks; {viewers} viewer(s) connected");
            None
        }
    };
    if signalled.is_none() {
        if args.exit_at_end {
            // Viewers get EndOfStream after the last block, then leave; wait for
            // them (bounded), then close.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while server.stats().viewers > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } else {
            eprintln!("the stream has ended; Ctrl-C (SIGINT) or SIGTERM stops the server");
            let s = signals.recv().await;
            eprintln!(
                "{s}: stopping: every accepted event applied and logged (again to exit at once)"
            );
            signalled = Some(s);
        }
    }
    // Goodbye to every viewer, every accepted event applied, logged and
    // flushed; a (further) signal meanwhile exits at once.
    let grace = Duration::from_secs(2);
    let forced = match signalled {
        Some(first) => match server
            .shutdown_after_signal(&mut signals, first, grace)
            .await
        {
            Stopped::Forced(s) => Some(s),
            _ => None,
        },
        None => tokio::select! {
            _ = server.shutdown(grace) => None,
            s = signals.recv() => Some(s),
        },
    };
    if let Some(s) = forced {
        let stats = server.stats();
        eprintln!(
            "{s} again: exiting without finishing the shutdown; {} viewer events accepted, {} logged so far",
            stats.events_accepted, stats.events_logged
        );
        std::process::exit(130);
    }
    if let Some(publisher) = publisher {
        publisher.finish();
    }
    driver.abort();
    let stats = server.stats();
    eprintln!(
        "sent {} datagrams ({:.2} MB), dropped at sender {}, expired {}, too large {}; repairs asked {}, answered {}, {} shards; congestion events {}; viewer events: {} accepted, {} dropped, {} applied, {} logged, {} not logged (write errors)",
        stats.datagrams_sent,
        stats.bytes_sent as f64 / 1e6,
        stats.datagrams_dropped,
        stats.shards_expired,
        stats.datagrams_too_large,
        stats.repairs_asked,
        stats.repairs_answered,
        stats.repair_shards,
        stats.congestion_events,
        stats.events_accepted,
        stats.events_dropped,
        stats.events_applied,
        stats.events_logged,
        stats.events_log_errors,
    );
    if let Some(n) = server.nats_stats() {
        eprintln!(
            "NATS: {} events published, {} still unsent at exit, {} dropped (queue or buffer full), {} errors",
            n.published,
            n.dropped_unsent,
            n.dropped_queue_full + n.dropped_buffer_full,
            n.errors
        );
    }
    Ok(())
}

fn parse_parity(s: &str) -> Result<Parity, String> {
    match s {
        "auto" => Ok(Parity::Adaptive),
        "all" => Ok(Parity::All),
        n => n
            .parse()
            .map(Parity::Fixed)
            .map_err(|_| format!("{s:?}: expected auto, all or a number")),
    }
}

/// Publishes `file` at `bitrate`, or the synthetic stream. Returns the blocks sent.
///
/// Reading is tied to elapsed time (chunk `n` is due when `n` chunks' worth of bits have had
/// their time since the start), so a late wake-up is caught up instead of shifting every later
/// chunk. A file is cut into blocks as a pipe is ([`common::ts::Blocker`]): for MPEG-TS, a new
/// block, marked as a sync point, at every key frame.
async fn paced(
    file: Option<&mut tokio::fs::File>,
    publisher: &mut Publisher,
    block_size: usize,
    bitrate: u64,
) -> anyhow::Result<u64> {
    let interval = Duration::from_secs_f64(block_size as f64 * 8.0 / bitrate.max(1) as f64);
    let start = tokio::time::Instant::now();
    let Some(reader) = file else {
        // Mark a sync point about once a second.
        let sync_every = (1.0 / interval.as_secs_f64()).ceil().max(1.0) as u64;
        let mut synthetic = common::Synthetic::new();
        let mut sent = 0u64;
        loop {
            tokio::time::sleep_until(start + interval.mul_f64(sent as f64)).await;
            publisher.send(synthetic.block(block_size), sent % sync_every == 0)?;
            sent += 1;
        }
    };
    let mut blocker = common::ts::Blocker::new(block_size);
    let mut cuts = Vec::new();
    let mut buf = vec![0u8; block_size];
    for n in 0u64.. {
        tokio::time::sleep_until(start + interval.mul_f64(n as f64)).await;
        let got = read_full(reader, &mut buf).await?;
        if got == 0 {
            blocker.finish(&mut cuts);
        } else {
            blocker.push(&buf[..got], std::time::Instant::now(), &mut cuts);
        }
        for cut in cuts.drain(..) {
            publisher.send_taken(cut.data, cut.sync, cut.taken)?;
        }
        if got == 0 {
            break;
        }
    }
    Ok(publisher.next_seq())
}

/// Publishes a pipe's bytes as they arrive: a block when `block_size` bytes are in, at every
/// MPEG-TS key frame, or when the oldest buffered byte has waited `flush`, whichever comes
/// first. Returns the blocks sent.
///
/// The pipe is never re-paced: the source's own pace is the stream's, and reading it promptly
/// keeps the source from blocking on a full pipe. Each block is stamped with its first byte's
/// arrival, so the wait for the rest of it counts in every latency figure. An early block is cut
/// at whole TS packets, so TS packets are not split across blocks.
async fn forward_pipe(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    publisher: &mut Publisher,
    block_size: usize,
    flush: Duration,
) -> anyhow::Result<u64> {
    let mut blocker = common::ts::Blocker::new(block_size);
    let mut cuts = Vec::new();
    let mut read_buf = vec![0u8; block_size.max(64 * 1024)];
    loop {
        let deadline = blocker
            .oldest()
            .map(|t| tokio::time::Instant::from_std(t) + flush);
        tokio::select! {
            // Cancel safe: a read cut short by the deadline hands its bytes to the next call.
            r = reader.read(&mut read_buf) => {
                let n = r.context("reading stdin")?;
                if n == 0 {
                    blocker.finish(&mut cuts);
                } else {
                    blocker.push(&read_buf[..n], std::time::Instant::now(), &mut cuts);
                }
                for cut in cuts.drain(..) {
                    publisher.send_taken(cut.data, cut.sync, cut.taken)?;
                }
                if n == 0 {
                    return Ok(publisher.next_seq());
                }
            }
            _ = sleep_until_opt(deadline) => {
                blocker.flush(&mut cuts);
                for cut in cuts.drain(..) {
                    publisher.send_taken(cut.data, cut.sync, cut.taken)?;
                }
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
async fn read_full(
    reader: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = reader.read(&mut buf[n..]).await?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}
