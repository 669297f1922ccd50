//! quicast demo: a server and a viewer in one process over loopback, a
//! synthetic 8 Mbit/s stream, and 5% simulated packet loss on the viewer's
//! socket. Shows a live line, then the viewer's report.
//!
//! ```text
//! cargo run --release --example demo
//! cargo run --release --example demo -- --loss 0.10 --burst 4 --delay 20 --seconds 20
//! ```

mod common;

use std::{io::IsTerminal, time::Duration};

use clap::Parser;
use quicast::{config::FecConfig, Client, ClientConfig, Event, Identity, Server, ServerConfig};

/// Server and viewer in one process, over loopback with simulated loss.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// How long to stream, seconds.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Media bitrate, bits per second.
    #[arg(long, default_value_t = 8_000_000)]
    bitrate: u64,
    /// Bytes per block (a multiple of 188).
    #[arg(long, default_value_t = 188 * 112)]
    block_size: usize,
    /// Most parity shards per data shard encoded (0.5 = 50%); each viewer gets what its loss needs.
    #[arg(long, default_value_t = 0.5)]
    redundancy: f64,
    /// Viewer's latency budget, milliseconds (sender timestamp to delivery).
    #[arg(long, default_value_t = 100)]
    latency: u64,
    /// Simulated random packet loss on the viewer's socket (0.05 = 5%).
    #[arg(long, default_value_t = 0.05)]
    loss: f64,
    /// Mean loss burst length in packets (1 = independent loss).
    #[arg(long, default_value_t = 1.0)]
    burst: f64,
    /// Simulated one-way delay to the viewer, milliseconds.
    #[arg(long, default_value_t = 0)]
    delay: u64,
    /// Seed of the simulated loss.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    common::init_tracing();
    // One line naming the cause, no backtrace, and a non-zero exit.
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut fec = FecConfig::default();
    fec.set_redundancy(args.redundancy)?;
    let mut config = ServerConfig::new(Identity::DevCertificate {
        dir: common::certs_dir(),
    });
    config.listen("127.0.0.1:0".parse()?).fec(fec);
    let server = Server::bind(config)?;
    let addr = server.local_addr()?;
    let mut publisher = server.publish("live", None)?;
    let driver = tokio::spawn(server.run());

    let impair = common::ImpairArgs {
        loss: args.loss,
        burst: args.burst,
        delay: args.delay,
        seed: args.seed,
    };
    let endpoint = Client::endpoint(addr, impair.socket("127.0.0.1:0".parse()?)?)?;
    let mut config = ClientConfig::new(addr, "live");
    config
        .load_roots(&quicast::net::tls::dev_cert_path(&common::certs_dir()))?
        .latency(Duration::from_millis(args.latency));
    let mut viewer = Client::connect_with(&endpoint, config).await?;
    eprintln!(
        "quicast demo: {:.1} Mbit/s for {} s, {} byte blocks, up to {:.0}% parity, {:.1}% loss{}, {} ms delay, {} ms budget",
        args.bitrate as f64 / 1e6,
        args.seconds,
        args.block_size,
        args.redundancy * 100.0,
        args.loss * 100.0,
        if args.burst > 1.0 { format!(" (bursts of {})", args.burst) } else { String::new() },
        args.delay,
        args.latency
    );

    // The publisher: paced synthetic blocks, then the end of the stream.
    let block_size = args.block_size;
    let interval = Duration::from_secs_f64(block_size as f64 * 8.0 / args.bitrate as f64);
    let blocks = (args.seconds / interval.as_secs_f64()).ceil() as u64;
    let publishing = tokio::spawn(async move {
        let mut synthetic = common::Synthetic::new();
        let mut tick = tokio::time::interval(interval);
        for i in 0..blocks {
            tick.tick().await;
            publisher.send(synthetic.block(block_size), i % 50 == 0)?;
        }
        publisher.finish();
        anyhow::Ok(())
    });

    let started = std::time::Instant::now();
    let live = std::io::stderr().is_terminal();
    let mut redraw = tokio::time::interval(Duration::from_millis(250));
    let limit = tokio::time::sleep(Duration::from_secs_f64(args.seconds + 5.0));
    tokio::pin!(limit);
    loop {
        tokio::select! {
            ev = viewer.next() => match ev {
                Some(Ok(Event::End)) | None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            },
            _ = redraw.tick(), if live => common::redraw(&common::live_line(&common::Live::new(&viewer.stats(), viewer.blocks_missed(), started.elapsed(), viewer.summary()))),
            _ = &mut limit => break,
        }
    }
    publishing.await??;
    let stats = viewer.stats();
    if live {
        common::redraw(&common::live_line(&common::Live::new(
            &stats,
            viewer.blocks_missed(),
            started.elapsed(),
            viewer.summary(),
        )));
        eprintln!();
    }
    let sent = server.stats();
    common::print_report(
        &stats,
        started.elapsed(),
        Some((sent.bytes_sent, sent.media_bytes)),
        common::Outages {
            reconnects: viewer.reconnects(),
            missed: viewer.blocks_missed(),
        },
    );
    if let Some(s) = viewer.summary() {
        eprintln!(
            "  server's view         QoE {} (stream {}), parity {} per 32 data shards, loss {:.2} % before FEC",
            s.viewer_qoe,
            s.stream_qoe,
            s.parity,
            s.loss_ppm as f64 / 1e4
        );
    }
    eprintln!(
        "  sender                {:>10} datagrams, {} dropped at sender",
        sent.datagrams_sent, sent.datagrams_dropped
    );
    viewer.close();
    server.shutdown(Duration::from_secs(1)).await;
    driver.abort();
    Ok(())
}
