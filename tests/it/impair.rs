//! `examples/impair` checked against its own settings: loss rate, burst length and delay,
//! measured by this test on real loopback UDP through the relay.
//!
//! `cargo test` builds the examples (in the test's profile) before it runs the tests, and
//! the binary is found next to the test executable (`target/<profile>/examples/impair`).
//! `cargo test --test it` alone does not rebuild them: run `cargo build --examples` first.

use std::{
    net::UdpSocket,
    process::{Command, Stdio},
    sync::{mpsc, Mutex},
    time::{Duration, Instant},
};

use super::procs::{example, free_udp_port, Guard};

/// One-way delay the relay is asked for.
const DELAY_MS: f64 = 20.0;
/// A median delay error beyond this is a systematic offset, not noise: the test fails.
const MAX_OFFSET_MS: f64 = 2.0;
/// How far from the setting a measured rate may be, in standard deviations.
const SIGMAS: f64 = 5.0;

/// The two checks run one after the other: two relays spinning at once on a small
/// machine would measure each other.
static SERIAL: Mutex<()> = Mutex::new(());

/// What the test measured through the relay.
struct Measured {
    sent: usize,
    lost: usize,
    /// Lengths of the runs of consecutive lost packets.
    bursts: Vec<usize>,
    /// Receive time minus send time minus the set delay, milliseconds, per received packet.
    delay_error_ms: Vec<f64>,
}

/// Sends `count` paced datagrams through a fresh relay with `loss`, `burst` and the delay,
/// and records which arrived and when.
fn run(loss: f64, burst: f64, seed: u64, count: usize) -> Measured {
    let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
    let relay = free_udp_port();
    let mut child = Command::new(example("impair"))
        .args([
            "--listen",
            &format!("127.0.0.1:{relay}"),
            "--upstream",
            &receiver.local_addr().unwrap().to_string(),
            "--loss",
            &loss.to_string(),
            "--burst",
            &burst.to_string(),
            "--delay-ms",
            &DELAY_MS.to_string(),
            "--seed",
            &seed.to_string(),
            // Longer than the run: ends it if this test dies before the guard can.
            "--duration",
            "60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn impair example");
    // Wait for the relay to be bound before sending: its first stderr line.
    let stderr = child.stderr.take().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = ready_tx.send(());
            eprintln!("[impair] {line}");
        }
    });
    let _guard = Guard(child);
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("impair did not start");

    let start = Instant::now();
    receiver
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let listen = std::thread::spawn(move || {
        let mut arrivals = Vec::with_capacity(count);
        let mut buf = [0u8; 64];
        let mut idle_since = None;
        // Bounded: stops after 1 s without a datagram once sending has begun, or at 30 s.
        while start.elapsed() < Duration::from_secs(30) {
            match receiver.recv(&mut buf) {
                Ok(16) => {
                    let at = start.elapsed();
                    let seq = u64::from_be_bytes(buf[..8].try_into().unwrap());
                    let sent = u64::from_be_bytes(buf[8..16].try_into().unwrap());
                    arrivals.push((seq, sent, at.as_nanos() as u64));
                    idle_since = None;
                }
                Ok(_) => {}
                Err(_) => {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(1) {
                        break;
                    }
                }
            }
        }
        arrivals
    });

    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    sender.connect(("127.0.0.1", relay)).unwrap();
    // 5000 datagrams a second: enough packets in a few seconds, well below what the relay
    // and loopback carry.
    let spacing = Duration::from_micros(200);
    for seq in 0..count as u64 {
        let due = start + spacing * seq as u32;
        while Instant::now() < due {
            std::thread::sleep(Duration::from_micros(50));
        }
        let mut packet = [0u8; 16];
        packet[..8].copy_from_slice(&seq.to_be_bytes());
        packet[8..].copy_from_slice(&(start.elapsed().as_nanos() as u64).to_be_bytes());
        sender.send(&packet).unwrap();
    }
    let arrivals = listen.join().unwrap();

    let mut got = vec![false; count];
    let mut delay_error_ms = Vec::with_capacity(arrivals.len());
    for &(seq, sent, at) in &arrivals {
        if let Some(slot) = got.get_mut(seq as usize) {
            *slot = true;
        }
        delay_error_ms.push((at as f64 - sent as f64) / 1e6 - DELAY_MS);
    }
    let mut bursts = Vec::new();
    let mut run = 0;
    for &g in &got {
        if g {
            if run > 0 {
                bursts.push(run);
            }
            run = 0;
        } else {
            run += 1;
        }
    }
    if run > 0 {
        bursts.push(run);
    }
    delay_error_ms.sort_by(f64::total_cmp);
    Measured {
        sent: count,
        lost: got.iter().filter(|g| !**g).count(),
        bursts,
        delay_error_ms,
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Checks one setting. `inflation` is the variance factor of the loss count over
/// independent loss: (1 + l) / (1 - l) for the two-state chain, l = 1 - p_gb - p_bg.
fn check(loss: f64, burst: f64, seed: u64, count: usize) {
    let m = {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        run(loss, burst, seed, count)
    };
    let n = m.sent as f64;
    let rate = m.lost as f64 / n;
    let (inflation, mean_burst, burst_var) = if burst > 1.0 {
        let p_bg = 1.0 / burst;
        let p_gb = loss / (1.0 - loss) * p_bg;
        let l = 1.0 - p_gb - p_bg;
        // Bursts are geometric with mean `burst`.
        ((1.0 + l) / (1.0 - l), burst, burst * (burst - 1.0))
    } else {
        // Independent loss: runs of losses are geometric with continuation `loss`.
        (1.0, 1.0 / (1.0 - loss), loss / (1.0 - loss).powi(2))
    };
    let rate_bound = SIGMAS * (loss * (1.0 - loss) / n * inflation).sqrt();
    let measured_burst = m.bursts.iter().sum::<usize>() as f64 / m.bursts.len().max(1) as f64;
    let burst_bound = SIGMAS * (burst_var / m.bursts.len().max(1) as f64).sqrt();
    let e = &m.delay_error_ms;
    assert!(!e.is_empty(), "seed {seed}: nothing came through the relay");
    let (median, p99, max) = (quantile(e, 0.5), quantile(e, 0.99), e[e.len() - 1]);
    eprintln!(
        "impair loss {loss} burst {burst} seed {seed}: {} of {} lost ({:.3}%, bound {:.3} +- {:.3}%), \
         {} bursts of mean {measured_burst:.2} (bound {mean_burst:.2} +- {burst_bound:.2}), \
         delay error median {median:.3} ms, p99 {p99:.3} ms, max {max:.3} ms",
        m.lost,
        m.sent,
        rate * 100.0,
        loss * 100.0,
        rate_bound * 100.0,
        m.bursts.len(),
    );
    assert!(
        (rate - loss).abs() <= rate_bound,
        "seed {seed}: loss rate {rate:.4} not within {rate_bound:.4} of {loss}"
    );
    assert!(
        (measured_burst - mean_burst).abs() <= burst_bound,
        "seed {seed}: mean burst {measured_burst:.2} not within {burst_bound:.2} of {mean_burst:.2}"
    );
    // Early delivery would be a bug at any load; lateness beyond the offset is systematic.
    assert!(
        median > -0.5 && median < MAX_OFFSET_MS,
        "seed {seed}: median delay error {median:.3} ms (set {DELAY_MS} ms): a systematic offset"
    );
    // p99 is printed above, not asserted: on a loaded CI machine it measures the machine.
}

#[test]
fn impair_iid_loss_and_delay_match_the_settings() {
    check(0.05, 1.0, 11, 10_000);
}

#[test]
fn impair_gilbert_elliott_bursts_match_the_settings() {
    check(0.05, 4.0, 12, 10_000);
}
