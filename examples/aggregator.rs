//! quicast aggregator: one view of every server of a deployment, from NATS JetStream.
//!
//! Servers started with `--nats URL --deployment NAME --server-id ID` publish their viewer
//! events to the deployment's stream; this consumes them with a durable pull consumer into
//! one aggregator and serves its Prometheus metrics, with a `server` label where it matters.
//!
//! ```text
//! nats-server -js -sd /tmp/nats &
//! cargo run --example server -- --listen 127.0.0.1:4433 --nats nats://127.0.0.1:4222 --deployment demo --server-id a &
//! cargo run --example aggregator -- --nats nats://127.0.0.1:4222 --deployment demo --metrics 127.0.0.1:9465
//! curl http://127.0.0.1:9465/metrics
//! ```

mod common;

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use clap::Parser;
use quicast::net::{NatsAggregator, NatsAggregatorConfig};

/// Aggregate the viewer analytics of every quicast server of a deployment.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// NATS server URL.
    #[arg(long, value_name = "URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Deployment name, as given to the servers.
    #[arg(long, value_name = "NAME", default_value = "default")]
    deployment: String,
    /// Durable consumer name (one aggregator per name).
    #[arg(long, value_name = "NAME", default_value = quicast::net::nats::DEFAULT_DURABLE)]
    durable: String,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9465")]
    metrics: SocketAddr,
    /// Print per-server counts this often (seconds; 0 = never).
    #[arg(long, default_value_t = 10)]
    every: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_tracing();
    let args = Args::parse();
    let mut config = NatsAggregatorConfig::new(args.nats.clone(), &args.deployment)?;
    config.durable(&args.durable)?;
    let agg = NatsAggregator::new(config);
    let driver = tokio::spawn(agg.run());

    let listener = tokio::net::TcpListener::bind(args.metrics)
        .await
        .with_context(|| format!("metrics listener on {}", args.metrics))?;
    eprintln!(
        "quicast aggregator: deployment {:?} from {}, metrics on http://{}/metrics",
        args.deployment,
        args.nats,
        listener.local_addr()?
    );
    let metrics = agg.clone();
    let http = tokio::spawn(common::metrics::serve(listener, move || {
        metrics.metrics_text()
    }));

    if args.every > 0 {
        let printer = agg.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(args.every));
            tick.tick().await;
            loop {
                tick.tick().await;
                let stats = printer.stats();
                let servers: Vec<String> = printer
                    .servers()
                    .iter()
                    .map(|(id, f)| format!("{id}: {} events, {} viewers", f.applied, f.viewers))
                    .collect();
                eprintln!(
                    "stream seq {}, {} received, {} acked; {}",
                    stats.stream_sequence,
                    stats.received,
                    stats.acked,
                    servers.join("; ")
                );
            }
        });
    }

    tokio::select! {
        _ = tokio::signal::ctrl_c() => eprintln!("stopping"),
        r = http => { r??; }
        _ = driver => {}
    }
    let s = agg.stats();
    eprintln!(
        "received up to stream seq {}: {} messages, {} acked, {} delivered more than once",
        s.stream_sequence, s.received, s.acked, s.redelivered
    );
    Ok(())
}
