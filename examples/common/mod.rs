//! Pieces shared by the example binaries: impairment flags, tracing, the
//! synthetic stream, and the viewer's report.
#![allow(dead_code)] // each example uses a different subset

pub mod metrics;
pub mod ts;

use std::{path::PathBuf, sync::Arc, time::Duration};

use quicast::{
    sim::{Impairment, LinkConfig, LossModel},
    ReceiverStats,
};

/// Simulated impairment of this endpoint's socket (both directions).
#[derive(Debug, Clone, clap::Args)]
pub struct ImpairArgs {
    /// Simulated random packet loss on this endpoint's socket, as a fraction (0.05 = 5%).
    /// Applied to packets arriving at this endpoint.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub loss: f64,
    /// Mean loss burst length in packets; above 1 uses the Gilbert-Elliott bursty model.
    #[arg(long, default_value_t = 1.0, value_name = "PACKETS")]
    pub burst: f64,
    /// Simulated one-way delay added to packets arriving at this endpoint, milliseconds.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub delay: u64,
    /// Seed of the simulated loss, for reproducible runs.
    #[arg(long, default_value_t = 1, value_name = "S")]
    pub seed: u64,
}

impl ImpairArgs {
    /// The impairment to apply, or None for a plain UDP socket.
    pub fn impairment(&self) -> anyhow::Result<Option<Impairment>> {
        if self.loss <= 0.0 && self.delay == 0 {
            return Ok(None);
        }
        let mut inbound = LinkConfig::default();
        let model = if self.loss <= 0.0 {
            LossModel::None
        } else if self.burst > 1.0 {
            LossModel::gilbert_elliott(self.loss, self.burst)?
        } else {
            LossModel::iid(self.loss)?
        };
        inbound.loss(model).delay(Duration::from_millis(self.delay));
        Ok(Some(Impairment {
            inbound,
            outbound: LinkConfig::default(),
            seed: self.seed,
        }))
    }

    /// A UDP socket at `addr`, impaired if asked.
    pub fn socket(
        &self,
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<Option<Arc<dyn quinn::AsyncUdpSocket>>> {
        Ok(match self.impairment()? {
            Some(imp) => Some(quicast::sim::bind(addr, imp)?),
            None => None,
        })
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `warn`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, never into a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Where dev certificates live: certs/ at the repository root.
pub fn certs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("certs")
}

/// MPEG-TS packet size; blocks are multiples of it so packets are never split.
pub const TS_PACKET: usize = 188;

/// A synthetic MPEG-TS-shaped stream: 188-byte packets with a sync byte, a PID,
/// a continuity counter and a running packet number, so any byte is checkable.
pub struct Synthetic {
    packet: u64,
}

impl Synthetic {
    pub fn new() -> Self {
        Synthetic { packet: 0 }
    }

    /// The next `len` bytes (rounded down to whole packets, at least one).
    pub fn block(&mut self, len: usize) -> bytes::Bytes {
        let packets = (len / TS_PACKET).max(1);
        let mut out = Vec::with_capacity(packets * TS_PACKET);
        for _ in 0..packets {
            let n = self.packet;
            self.packet += 1;
            out.push(0x47);
            out.extend_from_slice(&[0x01, 0x00]); // PID 0x100
            out.push(0x10 | (n & 0x0f) as u8); // payload only, continuity counter
            out.extend_from_slice(&n.to_be_bytes());
            out.extend((12..TS_PACKET).map(|i| (n as usize + i) as u8));
        }
        out.into()
    }
}

/// Prints the viewer's final report as a table on stderr.
/// `wire` is (datagram bytes sent, media bytes published), when known.
/// Reconnects and the blocks published while disconnected that never arrived.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outages {
    pub reconnects: u64,
    pub missed: u64,
}

pub fn print_report(
    stats: &ReceiverStats,
    elapsed: Duration,
    wire: Option<(u64, u64)>,
    outages: Outages,
) {
    let lat = stats.latency();
    // Missed blocks are part of the stream too: a percentage without them
    // would call an outage 100% delivered.
    let total = stats.blocks_delivered + stats.blocks_lost + outages.missed;
    let pct = |n: u64| {
        if total == 0 {
            0.0
        } else {
            100.0 * n as f64 / total as f64
        }
    };
    eprintln!();
    eprintln!("  quicast viewer report ({:.1} s)", elapsed.as_secs_f64());
    eprintln!("  ─────────────────────────────────────────────");
    eprintln!(
        "  blocks delivered      {:>10}  {:>7.3} %",
        stats.blocks_delivered,
        pct(stats.blocks_delivered)
    );
    eprintln!(
        "    recovered by FEC    {:>10}  {:>7.3} %",
        stats.blocks_recovered,
        pct(stats.blocks_recovered)
    );
    eprintln!(
        "  blocks lost           {:>10}  {:>7.3} %",
        stats.blocks_lost,
        pct(stats.blocks_lost)
    );
    eprintln!(
        "  blocks missed         {:>10}  {:>7.3} %  (while disconnected; {} reconnect(s))",
        outages.missed,
        pct(outages.missed),
        outages.reconnects
    );
    eprintln!("  blocks late           {:>10}", stats.blocks_late);
    if stats.blocks_before_sync > 0 {
        eprintln!(
            "  before first sync     {:>10}  (joined mid-stream: passed over, not lost)",
            stats.blocks_before_sync
        );
    }
    eprintln!(
        "  media delivered       {:>10.2} MB",
        stats.bytes_delivered as f64 / 1e6
    );
    eprintln!(
        "  shards received       {:>10}  (rebuilt {}, duplicate {}, late {}, malformed {})",
        stats.shards_received,
        stats.shards_rebuilt,
        stats.duplicates,
        stats.shards_late,
        stats.malformed
    );
    eprintln!(
        "  latency p50 / p99     {:>7.2} / {:.2} ms",
        lat.p50, lat.p99
    );
    eprintln!(
        "  latency p99.9 / max   {:>7.2} / {:.2} ms",
        lat.p999, lat.max
    );
    if let Some((wire, media)) = wire {
        if media > 0 {
            eprintln!(
                "  overhead (wire/media) {:>9.1} %",
                100.0 * (wire as f64 / media as f64 - 1.0)
            );
        }
    }
}

/// Columns the live line may take: it must fit an 80-column terminal with
/// the cursor after it, or every redraw scrolls a new line.
pub const LIVE_LINE_MAX: usize = 79;

/// What the live line shows.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    pub elapsed: Duration,
    pub delivered: u64,
    pub recovered: u64,
    pub lost: u64,
    /// Published while disconnected and never seen.
    pub missed: u64,
    /// p99 block latency, ms.
    pub p99_ms: f64,
    pub bytes: u64,
    /// This viewer's QoE from the server's latest summary.
    pub qoe: Option<u8>,
}

impl Live {
    pub fn new(
        stats: &ReceiverStats,
        missed: u64,
        elapsed: Duration,
        summary: Option<quicast::wire::Summary>,
    ) -> Self {
        Live {
            elapsed,
            delivered: stats.blocks_delivered,
            recovered: stats.blocks_recovered,
            lost: stats.blocks_lost,
            missed,
            p99_ms: stats.latency().p99,
            bytes: stats.bytes_delivered,
            qoe: summary.map(|s| s.viewer_qoe),
        }
    }
}

/// The live line, without control characters: elapsed time, the share of
/// the stream delivered on time, blocks rebuilt by FEC, blocks lost, the
/// p99 latency (sender timestamp to delivery, see README), the media rate
/// and this viewer's QoE from the server's latest summary (`-` before one).
/// At most [`LIVE_LINE_MAX`] columns while the run is under 27 hours, the
/// counts under a million rebuilt and 100,000 lost, the p99 under 10 s and
/// the rate under 100 Mbit/s; a wider terminal simply has room left.
pub fn live_line(l: &Live) -> String {
    let total = l.delivered + l.lost + l.missed;
    let ok = if total == 0 {
        0.0
    } else {
        100.0 * l.delivered as f64 / total as f64
    };
    let qoe = l.qoe.map_or("  -".to_string(), |q| format!("{q:>3}"));
    let mbps = l.bytes as f64 * 8.0 / l.elapsed.as_secs_f64().max(1e-3) / 1e6;
    format!(
        "{:>6.1}s  ok {ok:>7.3}%  fec {:>6}  lost {:>5}  p99 {:>6.1}ms  {mbps:>5.2}Mb/s  QoE {qoe}",
        l.elapsed.as_secs_f64(),
        l.recovered,
        l.lost,
        l.p99_ms,
    )
}

/// Redraws the live line in place on a terminal: carriage return, the line,
/// then erase what a longer previous line left.
pub fn redraw(line: &str) {
    eprint!("\r{line}\x1b[K");
}

/// The viewer's final stats as JSON (the keys the docs promise).
pub fn stats_json(stats: &ReceiverStats, outages: Outages) -> serde_json::Value {
    let lat = stats.latency();
    serde_json::json!({
        "reconnects": outages.reconnects,
        "blocks_missed": outages.missed,
        "blocks_delivered": stats.blocks_delivered,
        "blocks_recovered": stats.blocks_recovered,
        "blocks_lost": stats.blocks_lost,
        "blocks_late": stats.blocks_late,
        "blocks_before_sync": stats.blocks_before_sync,
        "bytes_delivered": stats.bytes_delivered,
        "shards_received": stats.shards_received,
        "shards_rebuilt": stats.shards_rebuilt,
        "duplicates": stats.duplicates,
        "malformed": stats.malformed,
        "latency_ms": { "p50": lat.p50, "p99": lat.p99, "p999": lat.p999, "max": lat.max },
    })
}
