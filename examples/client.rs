//! quicast client: watches one stream and writes the media to a file or stdout.
//!
//! ```text
//! cargo run --release --example client -- --output out.ts --duration 10
//! ```

mod common;

use std::{io::IsTerminal, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::Parser;
use quicast::{Client, ClientConfig, Event};
use tokio::io::AsyncWriteExt;

/// Watch a quicast stream: FEC-protected QUIC datagrams, in order, within a latency budget.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Server address, HOST:PORT; HOST is a name (resolved) or an IP address.
    #[arg(long, default_value = "127.0.0.1:4433", value_name = "HOST:PORT")]
    server: String,
    /// Name the server certificate must be valid for. Default: the HOST of
    /// --server when it is a name, else `localhost` (the dev certificate's name).
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
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
    /// Stop after this many seconds and exit 0 (Ctrl-C does the same at any time).
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

/// Splits `HOST:PORT` (`[v6]:PORT` for IPv6) into the host and the port.
fn split_host_port(s: &str) -> anyhow::Result<(&str, u16)> {
    let (host, port) = s
        .rsplit_once(':')
        .with_context(|| format!("--server {s:?}: expected HOST:PORT"))?;
    let port = port
        .parse()
        .with_context(|| format!("--server {s:?}: {port:?} is not a port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    anyhow::ensure!(!host.is_empty(), "--server {s:?}: no host");
    Ok((host, port))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let (host, port) = split_host_port(&args.server)?;
    let literal = host.parse::<std::net::IpAddr>().is_ok();
    let server: SocketAddr = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("--server {}: cannot resolve {host:?}", args.server))?
        // The dev certificate and the default server listen on IPv4.
        .min_by_key(|a| a.is_ipv6())
        .with_context(|| format!("--server {}: {host:?} has no address", args.server))?;
    let server_name = match &args.server_name {
        Some(name) => name.clone(),
        None if literal => "localhost".into(),
        None => host.to_string(),
    };
    let (ca, ca_given) = match &args.ca {
        Some(ca) => (ca.clone(), true),
        None => (
            quicast::net::tls::dev_cert_path(&common::certs_dir()),
            false,
        ),
    };
    let mut config = ClientConfig::new(server, args.stream.clone());
    config
        .server_name(server_name.clone())
        .latency(Duration::from_millis(args.latency));
    if let Err(e) = config.load_roots(&ca) {
        let missing = matches!(&e, quicast::TlsError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound);
        anyhow::bail!(match (ca_given, missing) {
            (true, true) => format!("--ca {}: no such file", ca.display()),
            (true, false) => format!("--ca {}: {e}", ca.display()),
            (false, true) => format!(
                "no dev certificate at {}: run the server example once to generate it, or pass --ca",
                ca.display()
            ),
            (false, false) => format!("dev certificate: {e}"),
        });
    }
    if let Some(token) = &args.token {
        config.token(token.clone());
    }
    let bind: SocketAddr = if server.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()?;
    // Opened first: a bad path fails before the server sees a viewer.
    let mut output: Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> =
        match args.output.as_deref() {
            None => None,
            Some("-") => Some(Box::new(tokio::io::stdout())),
            Some(path) => Some(Box::new(tokio::io::BufWriter::new(
                tokio::fs::File::create(path)
                    .await
                    .with_context(|| format!("--output {path}"))?,
            ))),
        };
    // Installed before connecting and kept, so no signal is lost between polls.
    let mut signals = quicast::net::Signals::new().context("signal handlers")?;
    let endpoint = Client::endpoint(server, args.impair.socket(bind)?)?;
    // Every failure to subscribe names what was tried.
    let tried = format!(
        "stream {:?} at {server} (server name {server_name:?}, trusting {})",
        args.stream,
        ca.display()
    );
    let mut sub = tokio::select! {
        r = Client::connect_with(&endpoint, config) => r.map_err(|e| anyhow::anyhow!("{e}; tried {tried}"))?,
        s = signals.recv() => anyhow::bail!("{s} while connecting to {tried}"),
    };
    // Only stderr: with `--output -` stdout carries the media and nothing else.
    eprintln!("subscribed to {:?} at {server}", args.stream);

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
                        out.write_all(&data).await.context("writing --output")?;
                        if to_stdout {
                            // std's stdout is line buffered: without a flush, the bytes after
                            // the block's last 0x0a would wait for the next block.
                            out.flush().await.context("writing --output")?;
                        }
                    }
                }
                Some(Ok(Event::End)) | None => break,
                Some(Ok(Event::Reconnected { attempts, missed })) => {
                    if live {
                        common::redraw("");
                    }
                    eprintln!("reconnected after {attempts} attempt(s); {missed} block(s) missed meanwhile");
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    failure = Some(e);
                    break;
                }
            },
            _ = &mut stop => break,
            // Ctrl-C or SIGTERM ends the watch like --duration: report, close, exit 0.
            _ = signals.recv() => break,
            _ = redraw.tick(), if live => {
                common::redraw(&common::live_line(&common::Live::new(&sub.stats(), sub.blocks_missed(), started.elapsed(), sub.summary())));
            }
        }
    }
    if let Some(out) = output.as_mut() {
        out.flush().await.context("writing --output")?;
    }
    if live {
        common::redraw(&common::live_line(&common::Live::new(
            &sub.stats(),
            sub.blocks_missed(),
            started.elapsed(),
            sub.summary(),
        )));
        eprintln!();
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
        Some(quicast::ClientError::Goodbye {
            code: quicast::CloseCode::PublisherFailed,
            reason,
        }) => Err(anyhow::anyhow!(
            "the server's publisher failed: {reason} (the stream is incomplete)"
        )),
        Some(e) => Err(anyhow::anyhow!("{e}")),
        None => Ok(()),
    }
}
