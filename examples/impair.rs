//! impair: a UDP relay that impairs real kernel traffic with `quicast::sim`'s link model.
//!
//! ```text
//! impair --listen 127.0.0.1:5000 --upstream 127.0.0.1:4433 --loss 0.05 --delay-ms 20 --seed 7
//! ```
//!
//! Datagrams from a client arriving at `--listen` are forwarded to `--upstream` ("up"); replies
//! from upstream go back to that client ("down"). Each direction is its own [`Link`] (loss,
//! Gilbert-Elliott bursts, delay, jitter, a rate-limited drop-tail queue) with its own seed
//! derived from `--seed`. Every flag sets both directions; `-up`/`-down` variants override one.
//!
//! One client is served: the first address that sends to `--listen` owns the relay's upstream
//! socket, and datagrams from any other address are counted and dropped. That is all a
//! point-to-point benchmark needs, and it keeps the relay from mixing two clients' traffic.
//!
//! Timing: tokio's timer wheel has 1 ms resolution, too coarse to hold a 20 ms path to a few
//! hundred microseconds. Each direction has a dedicated std thread that sleeps on a condition
//! variable until shortly before the next packet is due, then spins (yielding) to the due time
//! and sends from a std `UdpSocket`. The lateness of every send against its due time is
//! recorded and printed at exit.
//!
//! At exit (SIGINT, SIGTERM or `--duration`) it prints per-direction counters on stderr and
//! the same as one JSON line on stdout.

use std::{
    collections::BinaryHeap,
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Condvar, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use hdrhistogram::Histogram;
use quicast::sim::{Link, LinkConfig, LossModel, Verdict};

/// Most datagrams held in one direction's delay line; beyond it arrivals are dropped and counted.
/// 16k datagrams is 20 s of an 8 Mbit/s stream at 20 ms delay many times over.
const MAX_HELD: usize = 16 * 1024;
/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// Forward UDP between one client and an upstream address through a simulated lossy path.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Address clients send to.
    #[arg(long)]
    listen: SocketAddr,
    /// Address datagrams are forwarded to.
    #[arg(long)]
    upstream: SocketAddr,
    /// Random loss per datagram, both directions, as a fraction (0.05 = 5%).
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    loss: f64,
    /// Loss client to upstream.
    #[arg(long, value_name = "P")]
    loss_up: Option<f64>,
    /// Loss upstream to client.
    #[arg(long, value_name = "P")]
    loss_down: Option<f64>,
    /// Mean loss burst in datagrams; above 1 selects the Gilbert-Elliott model.
    #[arg(long, default_value_t = 1.0, value_name = "PACKETS")]
    burst: f64,
    /// Mean burst client to upstream.
    #[arg(long, value_name = "PACKETS")]
    burst_up: Option<f64>,
    /// Mean burst upstream to client.
    #[arg(long, value_name = "PACKETS")]
    burst_down: Option<f64>,
    /// One-way delay, both directions, milliseconds.
    #[arg(long, default_value_t = 0.0, value_name = "MS")]
    delay_ms: f64,
    /// Delay client to upstream.
    #[arg(long, value_name = "MS")]
    delay_up_ms: Option<f64>,
    /// Delay upstream to client.
    #[arg(long, value_name = "MS")]
    delay_down_ms: Option<f64>,
    /// Extra delay per datagram drawn from 0..=JITTER, both directions (reorders).
    #[arg(long, default_value_t = 0.0, value_name = "MS")]
    jitter_ms: f64,
    /// Jitter client to upstream.
    #[arg(long, value_name = "MS")]
    jitter_up_ms: Option<f64>,
    /// Jitter upstream to client.
    #[arg(long, value_name = "MS")]
    jitter_down_ms: Option<f64>,
    /// Bottleneck rate in bits per second, both directions; 0 = unlimited.
    #[arg(long, default_value_t = 0, value_name = "BPS")]
    rate: u64,
    /// Rate client to upstream.
    #[arg(long, value_name = "BPS")]
    rate_up: Option<u64>,
    /// Rate upstream to client.
    #[arg(long, value_name = "BPS")]
    rate_down: Option<u64>,
    /// Drop-tail queue of the bottleneck, bytes (only with a rate).
    #[arg(long, default_value_t = 64 * 1024, value_name = "BYTES")]
    queue: usize,
    /// Seed of both directions' random choices (each direction derives its own).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Exit after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    duration: Option<f64>,
    /// Stop sleeping this many microseconds before a datagram is due and spin the rest.
    /// Larger is more exact under load and costs more CPU.
    #[arg(long, default_value_t = 300, value_name = "US")]
    spin_us: u64,
}

/// The settings of one direction.
#[derive(Debug, Clone, Copy)]
struct Leg {
    loss: f64,
    burst: f64,
    delay_ms: f64,
    jitter_ms: f64,
    rate: u64,
}

impl Leg {
    fn config(&self, queue: usize) -> anyhow::Result<LinkConfig> {
        let model = if self.loss <= 0.0 {
            LossModel::None
        } else if self.burst > 1.0 {
            LossModel::gilbert_elliott(self.loss, self.burst)?
        } else {
            LossModel::iid(self.loss)?
        };
        anyhow::ensure!(
            self.delay_ms >= 0.0 && self.jitter_ms >= 0.0,
            "delay and jitter must not be negative"
        );
        let mut config = LinkConfig::default();
        config
            .loss(model)
            .delay(Duration::from_secs_f64(self.delay_ms / 1e3))
            .jitter(Duration::from_secs_f64(self.jitter_ms / 1e3))
            .bandwidth(Some(self.rate))
            .queue_limit(queue);
        Ok(config)
    }
}

impl Args {
    fn legs(&self) -> (Leg, Leg) {
        let leg = |loss: Option<f64>,
                   burst: Option<f64>,
                   delay: Option<f64>,
                   jitter: Option<f64>,
                   rate: Option<u64>| Leg {
            loss: loss.unwrap_or(self.loss),
            burst: burst.unwrap_or(self.burst),
            delay_ms: delay.unwrap_or(self.delay_ms),
            jitter_ms: jitter.unwrap_or(self.jitter_ms),
            rate: rate.unwrap_or(self.rate),
        };
        (
            leg(
                self.loss_up,
                self.burst_up,
                self.delay_up_ms,
                self.jitter_up_ms,
                self.rate_up,
            ),
            leg(
                self.loss_down,
                self.burst_down,
                self.delay_down_ms,
                self.jitter_down_ms,
                self.rate_down,
            ),
        )
    }
}

/// Counters of one direction. Atomics, because the receiving and the sending thread both write.
#[derive(Default)]
struct Counters {
    packets_in: AtomicU64,
    bytes_in: AtomicU64,
    packets_out: AtomicU64,
    bytes_out: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_overflow: AtomicU64,
    send_errors: AtomicU64,
}

/// A datagram waiting for its delivery time.
struct Held {
    due: Instant,
    /// Arrival order, so datagrams due at the same instant leave in the order they came.
    order: u64,
    data: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.order) == (other.due, other.order)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    // Reversed: BinaryHeap is a max-heap and the earliest due must come out first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.order).cmp(&(self.due, self.order))
    }
}

/// One direction: the delay line between its receiving and its sending thread.
struct Direction {
    name: &'static str,
    held: Mutex<BinaryHeap<Held>>,
    ready: Condvar,
    counters: Counters,
    /// How late each datagram left against its due time, microseconds (+1, so 0 fits).
    late_us: Mutex<Histogram<u64>>,
}

impl Direction {
    fn new(name: &'static str) -> Arc<Self> {
        Arc::new(Self {
            name,
            held: Mutex::new(BinaryHeap::new()),
            ready: Condvar::new(),
            counters: Counters::default(),
            late_us: Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds"),
            ),
        })
    }

    /// Runs `link` on every datagram `recv` returns and queues the survivors.
    fn receive(&self, mut link: Link, mut recv: impl FnMut(&mut [u8]) -> Option<usize>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut order = 0u64;
        let c = &self.counters;
        loop {
            let Some(n) = recv(&mut buf) else { continue };
            let now = Instant::now();
            c.packets_in.fetch_add(1, Relaxed);
            c.bytes_in.fetch_add(n as u64, Relaxed);
            match link.offer(now, n) {
                Verdict::Drop(quicast::sim::DropReason::Loss) => {
                    c.dropped_loss.fetch_add(1, Relaxed);
                }
                Verdict::Drop(_) => {
                    c.dropped_queue.fetch_add(1, Relaxed);
                }
                Verdict::Deliver(due) => {
                    let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                    if held.len() >= MAX_HELD {
                        c.dropped_overflow.fetch_add(1, Relaxed);
                        continue;
                    }
                    order += 1;
                    held.push(Held {
                        due,
                        order,
                        data: buf[..n].to_vec(),
                    });
                    drop(held);
                    self.ready.notify_one();
                }
            }
        }
    }

    /// Sends every held datagram at its due time through `send`.
    fn transmit(&self, spin: Duration, send: impl Fn(&[u8]) -> std::io::Result<usize>) {
        let c = &self.counters;
        loop {
            let due = {
                let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                loop {
                    let now = Instant::now();
                    match held.peek().map(|h| h.due) {
                        None => {
                            held = self.ready.wait(held).unwrap_or_else(|e| e.into_inner());
                        }
                        Some(due) if due <= now + spin => break due,
                        Some(due) => {
                            // Woken early by a new arrival, which may be due sooner (jitter).
                            held = self
                                .ready
                                .wait_timeout(held, due - now - spin)
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                        }
                    }
                }
            };
            // The last stretch is spun: a sleep this short would overshoot by more than it
            // waits.
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            let mut late = self.late_us.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                let next = {
                    let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                    match held.peek() {
                        Some(h) if h.due <= Instant::now() => held.pop(),
                        _ => None,
                    }
                };
                let Some(packet) = next else { break };
                let at = Instant::now();
                match send(&packet.data) {
                    Ok(_) => {
                        c.packets_out.fetch_add(1, Relaxed);
                        c.bytes_out.fetch_add(packet.data.len() as u64, Relaxed);
                    }
                    Err(_) => {
                        c.send_errors.fetch_add(1, Relaxed);
                    }
                }
                let us = at.saturating_duration_since(packet.due).as_micros() as u64;
                late.saturating_record(us + 1);
            }
        }
    }

    fn summary(&self) -> serde_json::Value {
        let c = &self.counters;
        let late = self.late_us.lock().unwrap_or_else(|e| e.into_inner());
        let q = |q: f64| {
            if late.is_empty() {
                0
            } else {
                late.value_at_quantile(q) - 1
            }
        };
        serde_json::json!({
            "packets_in": c.packets_in.load(Relaxed),
            "bytes_in": c.bytes_in.load(Relaxed),
            "packets_out": c.packets_out.load(Relaxed),
            "bytes_out": c.bytes_out.load(Relaxed),
            "dropped_loss": c.dropped_loss.load(Relaxed),
            "dropped_queue": c.dropped_queue.load(Relaxed),
            "dropped_overflow": c.dropped_overflow.load(Relaxed),
            "send_errors": c.send_errors.load(Relaxed),
            "late_us": {
                "p50": q(0.5),
                "p99": q(0.99),
                "p999": q(0.999),
                "max": if late.is_empty() { 0 } else { late.max() - 1 },
            },
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (up, down) = args.legs();
    // Distinct streams per direction, so the two legs' losses are independent.
    let up_link = Link::new(up.config(args.queue)?, args.seed.wrapping_mul(2));
    let down_link = Link::new(down.config(args.queue)?, args.seed.wrapping_mul(2) + 1);

    let listen =
        UdpSocket::bind(args.listen).with_context(|| format!("binding {}", args.listen))?;
    let bind: SocketAddr = if args.upstream.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()?;
    let upstream = UdpSocket::bind(bind)?;
    upstream
        .connect(args.upstream)
        .with_context(|| format!("connecting to {}", args.upstream))?;
    eprintln!(
        "impair: {} -> {} (up {up:?}; down {down:?}; seed {})",
        listen.local_addr()?,
        args.upstream,
        args.seed
    );

    let client: Arc<OnceLock<SocketAddr>> = Arc::new(OnceLock::new());
    let foreign = Arc::new(AtomicU64::new(0));
    let up_dir = Direction::new("up");
    let down_dir = Direction::new("down");
    let spin = Duration::from_micros(args.spin_us);

    {
        let (dir, socket, client, foreign) = (
            up_dir.clone(),
            listen.try_clone()?,
            client.clone(),
            foreign.clone(),
        );
        std::thread::Builder::new()
            .name("impair-up-rx".into())
            .spawn(move || {
                dir.receive(up_link, |buf| {
                    let (n, from) = socket.recv_from(buf).ok()?;
                    let owner = *client.get_or_init(|| {
                        eprintln!("impair: client {from}");
                        from
                    });
                    if owner != from {
                        foreign.fetch_add(1, Relaxed);
                        return None;
                    }
                    Some(n)
                })
            })?;
    }
    {
        let (dir, socket) = (up_dir.clone(), upstream.try_clone()?);
        std::thread::Builder::new()
            .name("impair-up-tx".into())
            .spawn(move || dir.transmit(spin, |data| socket.send(data)))?;
    }
    {
        let (dir, socket) = (down_dir.clone(), upstream.try_clone()?);
        std::thread::Builder::new()
            .name("impair-down-rx".into())
            // A connected UDP socket reports ICMP unreachable as an error on the next receive
            // (upstream not listening yet); that is not a datagram, so it is skipped.
            .spawn(move || dir.receive(down_link, |buf| socket.recv(buf).ok()))?;
    }
    {
        let (dir, socket, client) = (down_dir.clone(), listen.try_clone()?, client.clone());
        std::thread::Builder::new()
            .name("impair-down-tx".into())
            .spawn(move || {
                dir.transmit(spin, |data| match client.get() {
                    Some(to) => socket.send_to(data, to),
                    None => Err(std::io::ErrorKind::NotConnected.into()),
                })
            })?;
    }

    wait_for_exit(args.duration)?;

    let summary = serde_json::json!({
        "listen": listen.local_addr()?.to_string(),
        "upstream": args.upstream.to_string(),
        "client": client.get().map(|c| c.to_string()),
        "foreign_packets": foreign.load(Relaxed),
        "up": up_dir.summary(),
        "down": down_dir.summary(),
    });
    for dir in [&up_dir, &down_dir] {
        let s = dir.summary();
        eprintln!(
            "impair {:>4}: in {} pkts / {} B, out {} pkts / {} B, dropped loss {} queue {} overflow {}, send errors {}, late p50/p99/max {}/{}/{} us",
            dir.name,
            s["packets_in"],
            s["bytes_in"],
            s["packets_out"],
            s["bytes_out"],
            s["dropped_loss"],
            s["dropped_queue"],
            s["dropped_overflow"],
            s["send_errors"],
            s["late_us"]["p50"],
            s["late_us"]["p99"],
            s["late_us"]["max"],
        );
    }
    println!("{summary}");
    // The worker threads block in recv and on the delay line; the process exit ends them.
    std::process::exit(0)
}

/// Blocks until SIGINT, SIGTERM or the duration has passed.
fn wait_for_exit(duration: Option<f64>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let limit = Duration::from_secs_f64(duration.unwrap_or(1e9).clamp(0.0, 1e9));
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = tokio::time::sleep(limit) => {}
        }
        Ok(())
    })
}
