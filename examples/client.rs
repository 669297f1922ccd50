//! quicast client: watches one stream and writes the media to a file or stdout.
//!
//! ```text
//! cargo run --release --example client -- --output out.ts --duration 10
//! ```

mod common;

use std::{io::IsTerminal, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use quicast::{Client, ClientConfig, Event};
use tokio::io::AsyncWriteExt;

/// Watch a quicast stream: FEC-protected QUIC datagrams, in order, within a latency budget.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    server: SocketAddr,
    /// Name the server certificate must be valid for.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// CA or server certificate to trust (PEM). Default: the dev certificate in certs/.
    #[arg(long, value_name = "PATH")]
    ca: Option<PathBuf>,
    /// Stream to watch.
    #[arg(long, default_value = "live")]
    stream: String,
    /// Access token.
    #[arg(long)]
    token: Option<String>,
    /// Write the media here, or `-` for stdout. Lost blocks are skipped.
    #[arg(long, value_name = "PATH")]
    output: Option<String>,
    /// Latency budget in milliseconds, from a block's sender timestamp to delivery.
    #[arg(long, default_value_t = 200, value_name = "MS")]
    latency: u64,
    /// Stop after this many seconds and exit 0.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Write the final stats as JSON here.
    #[arg(long, value_name = "PATH")]
    stats_json: Option<PathBuf>,
    #[command(flatten)]
    impair: common::ImpairArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    common::init_tracing();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let ca = args
        .ca
        .clone()
        .unwrap_or_else(|| quicast::net::tls::dev_cert_path(&common::certs_dir()));
    let mut config = ClientConfig::new(args.server, args.stream.clone());
    config
        .server_name(args.server_name.clone())
        .latency(Duration::from_millis(args.latency));
    config.load_roots(&ca).map_err(|e| {
        anyhow::anyhow!("{e} (run the server once to generate the dev certificate, or pass --ca)")
    })?;
    if let Some(token) = &args.token {
        config.token(token.clone());
    }
    let bind: SocketAddr = if args.server.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()?;
    let endpoint = Client::endpoint(args.server, args.impair.socket(bind)?)?;
    let mut sub = Client::connect_with(&endpoint, config).await?;
    // Only stderr: with `--output -` stdout carries the media and nothing else.
    eprintln!("subscribed to {:?} at {}", args.stream, args.server);

    let mut output: Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> =
        match args.output.as_deref() {
            None => None,
            Some("-") => Some(Box::new(tokio::io::stdout())),
            Some(path) => Some(Box::new(tokio::io::BufWriter::new(
                tokio::fs::File::create(path).await?,
            ))),
        };
    let to_stdout = args.output.as_deref() == Some("-");
    let started = std::time::Instant::now();
    let live = std::io::stderr().is_terminal();
    let stop = tokio::time::sleep(Duration::from_secs_f64(
        args.duration.unwrap_or(f64::MAX / 4.0).min(1e9),
    ));
    tokio::pin!(stop);
    let mut redraw = tokio::time::interval(Duration::from_millis(250));
    let mut failure = None;
    loop {
        tokio::select! {
            ev = sub.next() => match ev {
                Some(Ok(Event::Block { data, .. })) => {
                    if let Some(out) = output.as_mut() {
                        out.write_all(&data).await?;
                        if to_stdout {
                            // std's stdout is line buffered: without a flush, the bytes after
                            // the block's last 0x0a would wait for the next block.
                            out.flush().await?;
                        }
                    }
                }
                Some(Ok(Event::End)) | None => break,
                Some(Ok(Event::Reconnected { attempts, missed })) => {
                    eprintln!("reconnected after {attempts} attempt(s); {missed} block(s) missed meanwhile");
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    failure = Some(e);
                    break;
                }
            },
            _ = &mut stop => break,
            _ = redraw.tick(), if live => {
                eprint!("{}", common::progress_line(&sub.stats(), started.elapsed(), sub.summary()));
            }
        }
    }
    if let Some(out) = output.as_mut() {
        out.flush().await?;
    }
    if live {
        eprintln!(
            "{}",
            common::progress_line(&sub.stats(), started.elapsed(), sub.summary())
        );
    }
    let stats = sub.stats();
    if let Some(summary) = sub.summary() {
        eprintln!(
            "server summary: your QoE {} / stream QoE {} / {} viewer(s) / parity {}",
            summary.viewer_qoe, summary.stream_qoe, summary.stream_viewers, summary.parity
        );
    }
    let outages = common::Outages {
        reconnects: sub.reconnects(),
        missed: sub.blocks_missed(),
    };
    common::print_report(&stats, started.elapsed(), None, outages);
    if let Some(path) = &args.stats_json {
        std::fs::write(
            path,
            serde_json::to_vec_pretty(&common::stats_json(&stats, outages))?,
        )?;
    }
    sub.close();
    endpoint.wait_idle().await;
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
