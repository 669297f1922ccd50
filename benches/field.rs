//! The field benchmark: quicast and SRT through one real impaired UDP path, in
//! separate processes.
//!
//! ```text
//! cargo bench --bench field -- --quick     # 5% iid, one seed, both systems: under 3 minutes
//! cargo bench --bench field                # 1, 2, 5, 10% iid and 5% bursty, seeds 1-3
//! cargo bench --bench field -- --help
//! ```
//!
//! Every run starts `examples/impair` between the two ends of one system, with the
//! same settings and seed for both systems: `--delay-ms` each way, the same loss
//! model in both directions (feedback and retransmission requests are lost too) and
//! a rate-limited drop-tail queue of `--path-mbps` per direction. The workload is
//! `examples/chunks`: `gen` writes paced 1316-byte chunks (7 MPEG-TS packets, SRT's
//! live payload) carrying a sequence number and a wall-clock send time; `check`
//! reads the receiver's stdout, counts intact chunks and measures each chunk's
//! latency from `gen`'s write to the receiver's output.
//!
//! - quicast: `chunks gen | server --input -` upstream of the relay, and
//!   `client --server <relay> --latency <budget> --output - | chunks check`. The
//!   media flows upstream to client ("down" in impair's counters).
//! - SRT (`srt-live-transmit`, Debian `srt-tools`): `chunks gen | srt-live-transmit
//!   file://con srt://<relay>?mode=caller` and `srt-live-transmit
//!   srt://127.0.0.1:<port>?mode=listener file://con | chunks check`. The media
//!   flows client to upstream ("up").
//!
//! SRT is run as a live contribution link would be configured: `latency` (both
//! ends, so the negotiated value is the one named in the row) is swept, because it
//! is SRT's only knob between loss and delay, and the table names the smallest value
//! that reached 99.9% in every seed. `-chunk:1316` makes one chunk one SRT packet
//! (SRT's default live payload size). Everything else is SRT's default: live
//! transmission type, too-late packet drop on, periodic NAK reports on, `maxbw` and
//! `oheadbw` untouched (retransmissions are not rate-capped below the path), `-a:no`
//! so a broken connection ends the process instead of waiting for a new one, and an
//! exit timer `-t` far beyond the run, so an orphan ends if the harness is killed.
//!
//! Ending cleanly: `srt-live-transmit` does not exit at the end of its stdin, so the
//! harness sends SIGINT to the SRT sender once `gen` has finished and the latency has
//! passed; the listener then sees the connection close and exits (`-a:no`), which
//! closes the checker's stdin. If it does not within a bound it gets SIGINT, then
//! SIGKILL; its output was written as it went, so the checker loses nothing but the
//! uncounted tail. quicast's server ends the stream at EOF and the client exits on
//! the end of stream.
//!
//! Figures per run: delivered % = intact chunks / chunks generated (the uncounted
//! `--tail-seconds` keep the last counted chunks live); e2e p50/p99/max over the
//! delivered chunks (a lost chunk has no latency; delivered % shows it); overhead %
//! = UDP payload bytes the media sender put on the wire (impair's bytes in, media
//! direction) / chunk bytes - 1; feedback % = UDP payload bytes the receiver sent /
//! chunk bytes; and impair's own delay error p99 (how late the relay released
//! datagrams against their due time) in the media direction.
//!
//! Writes Markdown tables to stdout, `target/field-bench/results.csv` (one row per
//! run), `target/field-bench/field.svg` and the children's logs under
//! `target/field-bench/logs/`. All sockets are on 127.0.0.1; every child is killed
//! when its run ends, also on error or panic.

mod common;

use common::median;
use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read, Write},
    net::UdpSocket,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Parser;

/// Bytes per chunk, as `examples/chunks` writes them.
const CHUNK: u64 = 7 * 188;
/// Delivery that counts as "reached" for SRT's latency choice.
const TARGET_PCT: f64 = 99.9;

/// quicast vs SRT through one impaired UDP relay, in separate processes.
#[derive(Debug, Clone, Parser)]
struct Opts {
    /// 5% iid loss, the first seed, SRT latencies 120 and 240: under 3 minutes.
    #[arg(long)]
    quick: bool,
    /// Media rate, bits per second.
    #[arg(long, default_value_t = 8_000_000)]
    bitrate: u64,
    /// Bottleneck rate of the relay, each direction, Mbit/s. Twice the media rate by
    /// default, so either system's overhead fits and loss, not the queue, decides.
    #[arg(long, default_value_t = 16.0)]
    path_mbps: f64,
    /// One-way delay of the relay, milliseconds (both directions).
    #[arg(long, default_value_t = 20.0)]
    delay_ms: f64,
    /// Seconds of counted media per run.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Uncounted media after the counted seconds, so the last counted chunks cross
    /// the path as live data rather than as the end of a stream.
    #[arg(long, default_value_t = 1.0)]
    tail_seconds: f64,
    /// iid loss rates, comma separated fractions (each direction).
    #[arg(long, value_delimiter = ',', default_value = "0.01,0.02,0.05,0.10")]
    losses: Vec<f64>,
    /// Gilbert-Elliott loss rates, comma separated fractions (empty: none).
    #[arg(long, value_delimiter = ',', default_value = "0.05", value_parser = fraction_or_none)]
    bursty_losses: Vec<f64>,
    /// Mean burst length of the bursty model, packets.
    #[arg(long, default_value_t = 4.0)]
    burst: f64,
    /// Seeds of the relay's loss pattern, the same for both systems.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    seeds: Vec<u64>,
    /// quicast viewer latency budgets, milliseconds (the client's `--latency`).
    #[arg(long, value_delimiter = ',', default_value = "100")]
    budgets: Vec<u64>,
    /// SRT `latency` settings to sweep, milliseconds. `--quick` default: 120,240.
    #[arg(long, value_delimiter = ',')]
    srt_latencies: Option<Vec<u64>>,
    /// Skip SRT even when srt-live-transmit is installed.
    #[arg(long)]
    no_srt: bool,
    /// Skip quicast.
    #[arg(long)]
    no_quicast: bool,
    /// Run nothing: read the rows of an earlier run's results.csv and print its tables
    /// and plot again (into the output directory). The sweep flags must match that run.
    #[arg(long, value_name = "CSV")]
    from_csv: Option<PathBuf>,
    /// Output directory. Default target/field-bench.
    #[arg(long)]
    out: Option<PathBuf>,
    // `cargo bench` passes --bench to every bench binary.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Opts {
    fn srt_latencies(&self) -> Vec<u64> {
        match &self.srt_latencies {
            Some(l) => l.clone(),
            None if self.quick => vec![120, 240],
            None => vec![60, 80, 120, 160, 240, 360],
        }
    }

    fn chunks(&self) -> u64 {
        chunk_count(self.seconds, self.bitrate)
    }
}

/// `--bursty-losses ''` means none: an empty item parses as a negative rate, dropped later.
fn fraction_or_none(s: &str) -> Result<f64, String> {
    if s.trim().is_empty() {
        return Ok(-1.0);
    }
    s.parse().map_err(|e| format!("{s:?}: {e}"))
}

/// Chunks `chunks gen` writes in `seconds` (the same rounding as `gen`).
fn chunk_count(seconds: f64, bitrate: u64) -> u64 {
    (seconds.max(0.0) * bitrate as f64 / (CHUNK as f64 * 8.0)).ceil() as u64
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct PathSpec {
    loss: f64,
    /// Mean burst; 1 = iid.
    burst: f64,
}

impl PathSpec {
    fn model(&self) -> &'static str {
        if self.burst > 1.0 {
            "bursty"
        } else {
            "iid"
        }
    }

    fn label(&self) -> String {
        if self.burst > 1.0 {
            format!(
                "{:.0}% Gilbert-Elliott, mean burst {}",
                self.loss * 100.0,
                self.burst
            )
        } else {
            format!("{:.0}% iid", self.loss * 100.0)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum System {
    Quicast,
    Srt,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Quicast => "quicast",
            System::Srt => "srt",
        }
    }

    /// The setting's name in tables: the viewer's budget, or SRT's latency.
    fn setting(self, ms: u64) -> String {
        match self {
            System::Quicast => format!("budget {ms} ms"),
            System::Srt => format!("latency {ms} ms"),
        }
    }
}

/// One run's figures.
#[derive(Debug, Clone)]
struct Row {
    system: System,
    path: PathSpec,
    seed: u64,
    setting_ms: u64,
    chunks: u64,
    intact: u64,
    delivered_pct: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    overhead_pct: f64,
    feedback_pct: f64,
    damaged: u64,
    duplicates: u64,
    media_dropped_queue: u64,
    media_late_p99_us: u64,
    feedback_late_p99_us: u64,
}

/// Children of one run, killed (and reaped) when it is dropped, whatever way the run ends.
#[derive(Default)]
struct Children(Vec<(&'static str, Child)>);

impl Children {
    fn add(&mut self, name: &'static str, child: Child) -> usize {
        self.0.push((name, child));
        self.0.len() - 1
    }

    fn pid(&self, i: usize) -> u32 {
        self.0[i].1.id()
    }

    /// Waits up to `limit` for child `i` to exit.
    fn wait(&mut self, i: usize, limit: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0[i].1.try_wait()? {
                return Ok(Some(status));
            }
            if start.elapsed() >= limit {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT, then up to `grace` to exit, then SIGKILL. True if it exited by itself.
    fn stop(&mut self, i: usize, grace: Duration) -> anyhow::Result<bool> {
        if self.0[i].1.try_wait()?.is_some() {
            return Ok(true);
        }
        interrupt(self.pid(i));
        if self.wait(i, grace)?.is_some() {
            return Ok(true);
        }
        eprintln!("  {} did not exit on SIGINT; killed", self.0[i].0);
        let _ = self.0[i].1.kill();
        let _ = self.0[i].1.wait();
        Ok(false)
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in self.0.iter_mut().rev() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Sends SIGINT: the signal every child here ends cleanly on (std can only SIGKILL).
fn interrupt(pid: u32) {
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A free UDP port on 127.0.0.1 (free when asked; the child binds it moments later).
fn free_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `path` until it contains `needle`, up to `limit`.
fn wait_for_text(path: &Path, needle: &str, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
            return Ok(());
        }
        if start.elapsed() >= limit {
            bail!(
                "{needle:?} did not appear in {} within {limit:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last line of `path` that parses as a JSON object.
fn last_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .filter(|v| v.is_object())
        })
        .with_context(|| format!("no JSON line in {}", path.display()))
}

/// Where the example binaries are: `<target>/release/examples`, next to this bench's
/// `<target>/release/deps`.
fn target_release_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .context("bench executable has no target directory")
}

/// Builds the example binaries (cargo only rebuilds what is stale).
fn build_examples(release: &Path) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = release.parent().context("release dir has no parent")?;
    eprintln!("building examples into {}", release.display());
    let mut command = Command::new(cargo);
    // cargo runs this bench with the package's CARGO_PKG_*, CARGO_MANIFEST_* and the
    // like set; build scripts that watch them would see a changed environment and
    // rebuild everything that the same command from a shell just built.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR")
            || key == "OUT_DIR"
        {
            command.env_remove(key.as_ref());
        }
    }
    let status = command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", target)
        .args([
            "build",
            "--release",
            "--example",
            "impair",
            "--example",
            "chunks",
            "--example",
            "server",
            "--example",
            "client",
        ])
        .status()
        .context("running cargo build")?;
    anyhow::ensure!(status.success(), "building the examples failed: {status}");
    Ok(())
}

fn have_srt() -> bool {
    Command::new("srt-live-transmit")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Everything one run needs to know.
struct Bench {
    opts: Opts,
    bin: PathBuf,
    logs: PathBuf,
}

impl Bench {
    fn example(&self, name: &str) -> Command {
        Command::new(self.bin.join(name))
    }

    /// Seconds after which a child ends by itself: longer than every bounded wait of a
    /// run added up, so it only matters when the harness was killed (SIGKILL runs no
    /// destructor).
    fn orphan_limit(&self) -> u64 {
        (self.opts.seconds + self.opts.tail_seconds + 120.0).ceil() as u64
    }

    fn log(&self, run: &str, what: &str) -> PathBuf {
        self.logs.join(format!("{run}-{what}"))
    }

    /// Starts the relay: `listen` (where the client side sends) to `upstream`.
    fn impair(
        &self,
        children: &mut Children,
        run: &str,
        path: PathSpec,
        seed: u64,
        listen: u16,
        upstream: u16,
    ) -> anyhow::Result<usize> {
        let o = &self.opts;
        let err = self.log(run, "impair.err");
        let child = self
            .example("impair")
            .args([
                "--listen",
                &format!("127.0.0.1:{listen}"),
                "--upstream",
                &format!("127.0.0.1:{upstream}"),
                "--loss",
                &path.loss.to_string(),
                "--burst",
                &path.burst.to_string(),
                "--delay-ms",
                &o.delay_ms.to_string(),
                "--rate",
                &((o.path_mbps * 1e6) as u64).to_string(),
                "--seed",
                &seed.to_string(),
                // Ends the relay by itself if this harness is killed before its guard runs.
                "--duration",
                &self.orphan_limit().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(File::create(self.log(run, "impair.json"))?)
            .stderr(File::create(&err)?)
            .spawn()
            .context("starting impair")?;
        let i = children.add("impair", child);
        wait_for_text(&err, "impair: 127.0.0.1", Duration::from_secs(5))?;
        Ok(i)
    }

    /// Starts `chunks check` reading `input`.
    fn checker(&self, children: &mut Children, run: &str, input: Stdio) -> anyhow::Result<usize> {
        let child = self
            .example("chunks")
            .args([
                "check",
                "--expect",
                &self.opts.chunks().to_string(),
                "--bitrate",
                &self.opts.bitrate.to_string(),
            ])
            .stdin(input)
            .stdout(File::create(self.log(run, "check.json"))?)
            .stderr(File::create(self.log(run, "check.err"))?)
            .spawn()
            .context("starting chunks check")?;
        Ok(children.add("check", child))
    }

    /// Runs `chunks gen` into `sink` to the end; returns gen's summary.
    ///
    /// gen starts only now, when the receiver is connected, so its first chunks are
    /// not held in a pipe while the two ends meet. The copy thread closes `sink` at
    /// gen's EOF, which is how quicast's server learns the stream has ended.
    fn generate(
        &self,
        children: &mut Children,
        run: &str,
        mut sink: ChildStdin,
    ) -> anyhow::Result<serde_json::Value> {
        let o = &self.opts;
        let err = self.log(run, "gen.err");
        let mut child = self
            .example("chunks")
            .args([
                "gen",
                "--bitrate",
                &o.bitrate.to_string(),
                "--seconds",
                &o.seconds.to_string(),
                "--tail-seconds",
                &o.tail_seconds.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&err)?)
            .spawn()
            .context("starting chunks gen")?;
        let mut out = child.stdout.take().context("gen stdout")?;
        let i = children.add("gen", child);
        let copier = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if sink.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let limit = Duration::from_secs_f64(o.seconds + o.tail_seconds + 15.0);
        let status = children.wait(i, limit)?;
        let _ = copier.join();
        match status {
            Some(s) if s.success() => last_json(&err),
            Some(s) => bail!("chunks gen failed: {s}"),
            None => bail!("chunks gen did not finish within {limit:?}"),
        }
    }

    fn quicast(&self, path: PathSpec, seed: u64, budget: u64) -> anyhow::Result<Row> {
        let o = &self.opts;
        let run = format!("quicast-{}-{}-s{seed}-b{budget}", path.model(), path.loss);
        let mut children = Children::default();
        let (relay, server_port) = (free_port()?, free_port()?);
        let impair = self.impair(&mut children, &run, path, seed, relay, server_port)?;

        let server_err = self.log(&run, "server.err");
        let mut server = self
            .example("server")
            .args([
                "--listen",
                &format!("127.0.0.1:{server_port}"),
                "--input",
                "-",
                "--exit-at-end",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(File::create(&server_err)?)
            .spawn()
            .context("starting server")?;
        let server_in = server.stdin.take().context("server stdin")?;
        let server = children.add("server", server);
        wait_for_text(&server_err, "quicast server on", Duration::from_secs(10))?;

        let client_err = self.log(&run, "client.err");
        let run_limit = o.seconds + o.tail_seconds + 20.0;
        let mut client = self
            .example("client")
            .args([
                "--server",
                &format!("127.0.0.1:{relay}"),
                "--output",
                "-",
                "--latency",
                &budget.to_string(),
                "--duration",
                &run_limit.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&client_err)?)
            .spawn()
            .context("starting client")?;
        let client_out = client.stdout.take().context("client stdout")?;
        let client = children.add("client", client);
        let check = self.checker(&mut children, &run, Stdio::from(client_out))?;
        wait_for_text(&client_err, "subscribed to", Duration::from_secs(10))?;

        let gen = self.generate(&mut children, &run, server_in)?;
        // The server publishes the last block at EOF and ends the stream; the client
        // exits on the end of stream, which closes the checker's input.
        if children.wait(client, Duration::from_secs(10))?.is_none() {
            eprintln!("  client did not see the end of stream; interrupting it");
        }
        children.stop(client, Duration::from_secs(5))?;
        children.stop(server, Duration::from_secs(5))?;
        self.finish(
            children,
            &run,
            (impair, check),
            gen,
            Media::Down,
            (System::Quicast, path, seed, budget),
        )
    }

    fn srt(&self, path: PathSpec, seed: u64, latency: u64) -> anyhow::Result<Row> {
        let run = format!("srt-{}-{}-s{seed}-l{latency}", path.model(), path.loss);
        let mut children = Children::default();
        let (relay, listener_port) = (free_port()?, free_port()?);
        let impair = self.impair(&mut children, &run, path, seed, relay, listener_port)?;

        let listener_err = self.log(&run, "listener.err");
        let mut listener = Command::new("srt-live-transmit")
            .args([
                "-a:no",
                "-chunk:1316",
                &format!("-t:{}", self.orphan_limit()),
                &format!("srt://127.0.0.1:{listener_port}?mode=listener&latency={latency}"),
                "file://con",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&listener_err)?)
            .spawn()
            .context("starting the SRT listener")?;
        let listener_out = listener.stdout.take().context("listener stdout")?;
        let listener = children.add("srt listener", listener);
        let check = self.checker(&mut children, &run, Stdio::from(listener_out))?;
        // The listener binds before it prints its media path; give it a moment more.
        wait_for_text(&listener_err, "Media path", Duration::from_secs(5))?;
        std::thread::sleep(Duration::from_millis(100));

        let caller_err = self.log(&run, "caller.err");
        let mut caller = Command::new("srt-live-transmit")
            .args([
                "-a:no",
                "-chunk:1316",
                &format!("-t:{}", self.orphan_limit()),
                "file://con",
                &format!("srt://127.0.0.1:{relay}?mode=caller&latency={latency}"),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(File::create(&caller_err)?)
            .spawn()
            .context("starting the SRT caller")?;
        let caller_in = caller.stdin.take().context("caller stdin")?;
        let caller = children.add("srt caller", caller);
        wait_for_text(&caller_err, "SRT target connected", Duration::from_secs(10))?;

        let gen = self.generate(&mut children, &run, caller_in)?;
        // srt-live-transmit does not exit at the end of stdin. Let the last chunks
        // through the receiver's latency buffer, then end the sender: the listener
        // sees the connection close and exits (-a:no), closing the checker's input.
        std::thread::sleep(Duration::from_millis(latency + 500));
        children.stop(caller, Duration::from_secs(3))?;
        if children.wait(listener, Duration::from_secs(5))?.is_none() {
            eprintln!("  SRT listener did not exit after the caller; interrupting it");
        }
        children.stop(listener, Duration::from_secs(3))?;
        self.finish(
            children,
            &run,
            (impair, check),
            gen,
            Media::Up,
            (System::Srt, path, seed, latency),
        )
    }

    /// Collects the checker's and the relay's summaries into a row.
    fn finish(
        &self,
        mut children: Children,
        run: &str,
        (impair, check): (usize, usize),
        gen: serde_json::Value,
        media: Media,
        (system, path, seed, setting_ms): (System, PathSpec, u64, u64),
    ) -> anyhow::Result<Row> {
        if children.wait(check, Duration::from_secs(10))?.is_none() {
            children.stop(check, Duration::from_secs(2))?;
            bail!("chunks check did not get EOF");
        }
        children.stop(impair, Duration::from_secs(3))?;
        drop(children);
        let c = last_json(&self.log(run, "check.json"))?;
        let relay = last_json(&self.log(run, "impair.json"))?;
        let (media, feedback) = match media {
            Media::Up => (&relay["up"], &relay["down"]),
            Media::Down => (&relay["down"], &relay["up"]),
        };
        let u = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        let payload = (u(&gen["chunks"]) + u(&gen["tail_chunks"])) * CHUNK;
        let payload = payload.max(1) as f64;
        Ok(Row {
            system,
            path,
            seed,
            setting_ms,
            chunks: u(&c["chunks_expected"]),
            intact: u(&c["chunks_intact_expected"]),
            delivered_pct: f(&c["delivered_pct"]),
            p50_ms: f(&c["latency_ms"]["p50"]),
            p99_ms: f(&c["latency_ms"]["p99"]),
            max_ms: f(&c["latency_ms"]["max"]),
            overhead_pct: 100.0 * (u(&media["bytes_in"]) as f64 / payload - 1.0),
            feedback_pct: 100.0 * u(&feedback["bytes_in"]) as f64 / payload,
            damaged: u(&c["damaged"]),
            duplicates: u(&c["duplicates"]),
            media_dropped_queue: u(&media["dropped_queue"]),
            media_late_p99_us: u(&media["late_us"]["p99"]),
            feedback_late_p99_us: u(&feedback["late_us"]["p99"]),
        })
    }
}

/// Which of impair's directions carries a system's media.
#[derive(Debug, Clone, Copy)]
enum Media {
    /// Client side to upstream (SRT's caller sends).
    Up,
    /// Upstream to client side (quicast's server sends).
    Down,
}

/// The runs of one system, path and setting, over seeds.
struct Cell<'a>(Vec<&'a Row>);

impl Cell<'_> {
    fn med(&self, f: impl Fn(&Row) -> f64) -> f64 {
        median(self.0.iter().map(|r| f(r)).collect())
    }
    fn min_delivered(&self) -> f64 {
        self.0
            .iter()
            .map(|r| r.delivered_pct)
            .fold(f64::INFINITY, f64::min)
    }
    fn max_of(&self, f: impl Fn(&Row) -> f64) -> f64 {
        self.0.iter().map(|r| f(r)).fold(f64::NAN, f64::max)
    }
    /// Delivered >= 99.9% in every seed.
    fn reached(&self) -> bool {
        self.min_delivered() >= TARGET_PCT
    }
}

/// Cells keyed by (path index, system, setting).
fn cells<'a>(paths: &[PathSpec], rows: &'a [Row]) -> BTreeMap<(usize, System, u64), Cell<'a>> {
    let mut out: BTreeMap<(usize, System, u64), Cell<'a>> = BTreeMap::new();
    for r in rows {
        let Some(p) = paths.iter().position(|p| *p == r.path) else {
            continue;
        };
        out.entry((p, r.system, r.setting_ms))
            .or_insert_with(|| Cell(Vec::new()))
            .0
            .push(r);
    }
    out
}

/// SRT's chosen setting on a path: the smallest latency that reached the target in
/// every seed, or (when none did) the one that delivered most. The flag says which.
fn srt_choice<'a, 'b>(
    cells: &'b BTreeMap<(usize, System, u64), Cell<'a>>,
    path: usize,
) -> Option<(&'b Cell<'a>, bool)> {
    let srt: Vec<&Cell> = cells
        .iter()
        .filter(|((p, s, _), _)| *p == path && *s == System::Srt)
        .map(|(_, c)| c)
        .collect();
    if let Some(c) = srt.iter().find(|c| c.reached()) {
        return Some((c, true));
    }
    srt.into_iter()
        .max_by(|a, b| a.min_delivered().total_cmp(&b.min_delivered()))
        .map(|c| (c, false))
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.1}")
    }
}

fn table(opts: &Opts, paths: &[PathSpec], rows: &[Row]) -> String {
    let cells = cells(paths, rows);
    let mut s = String::new();
    let per_run = opts.chunks();
    s.push_str(&format!(
        "Field bench: {:.0} Mbit/s of 1316-byte chunks, {} s per run ({} chunks, 1 chunk = {:.4}%), \
         relay {} Mbit/s each way, {} ms each way, loss both ways; seeds {:?}; \
         figures are medians over seeds, \"min\" the worst seed; e2e over delivered chunks.\n",
        opts.bitrate as f64 / 1e6,
        opts.seconds,
        per_run,
        100.0 / per_run.max(1) as f64,
        opts.path_mbps,
        opts.delay_ms,
        opts.seeds,
    ));
    for (pi, path) in paths.iter().enumerate() {
        s.push_str(&format!("\n### {}\n\n", path.label()));
        s.push_str("| system | setting | delivered % | min % | e2e p50 ms | e2e p99 ms | e2e max ms | overhead % | feedback % | relay late p99 us |\n");
        s.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        let choice = srt_choice(&cells, pi);
        for ((p, system, setting), cell) in &cells {
            if *p != pi {
                continue;
            }
            let chosen = choice.is_some_and(|(c, _)| std::ptr::eq(c, cell));
            let mark = match (chosen, choice.map(|(_, reached)| reached)) {
                (true, Some(true)) => " **(smallest >= 99.9%)**",
                (true, Some(false)) => " **(none >= 99.9%; best)**",
                _ => "",
            };
            s.push_str(&format!(
                "| {} | {}{} | {:.3} | {:.3} | {} | {} | {} | {:.1} | {:.1} | {:.0} |\n",
                system.name(),
                system.setting(*setting),
                mark,
                cell.med(|r| r.delivered_pct),
                cell.min_delivered(),
                ms(cell.med(|r| r.p50_ms)),
                ms(cell.med(|r| r.p99_ms)),
                ms(cell.max_of(|r| r.max_ms)),
                cell.med(|r| r.overhead_pct),
                cell.med(|r| r.feedback_pct),
                cell.med(|r| r.media_late_p99_us as f64),
            ));
        }
    }
    s
}

fn write_csv(path: &Path, opts: &Opts, rows: &[Row]) -> anyhow::Result<()> {
    let mut f = File::create(path)?;
    writeln!(
        f,
        "system,model,loss,burst,seed,setting,setting_ms,bitrate,path_mbps,delay_ms,chunks,intact,delivered_pct,p50_ms,p99_ms,max_ms,overhead_pct,feedback_pct,damaged,duplicates,media_dropped_queue,media_late_p99_us,feedback_late_p99_us"
    )?;
    for r in rows {
        writeln!(
            f,
            "{},{},{},{},{},{},{},{},{},{},{},{},{:.6},{:.3},{:.3},{:.3},{:.2},{:.2},{},{},{},{},{}",
            r.system.name(),
            r.path.model(),
            r.path.loss,
            r.path.burst,
            r.seed,
            match r.system {
                System::Quicast => "budget",
                System::Srt => "latency",
            },
            r.setting_ms,
            opts.bitrate,
            opts.path_mbps,
            opts.delay_ms,
            r.chunks,
            r.intact,
            r.delivered_pct,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.overhead_pct,
            r.feedback_pct,
            r.damaged,
            r.duplicates,
            r.media_dropped_queue,
            r.media_late_p99_us,
            r.feedback_late_p99_us,
        )?;
    }
    Ok(())
}

/// Reads rows written by [`write_csv`].
fn read_csv(path: &Path) -> anyhow::Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().context("empty CSV")?.split(',').collect();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .context(name.to_string())
    };
    let mut rows = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let v: Vec<&str> = line.split(',').collect();
        let get = |name: &str| -> anyhow::Result<&str> {
            v.get(col(name)?).copied().context("short CSV line")
        };
        let f = |name: &str| -> anyhow::Result<f64> { Ok(get(name)?.parse()?) };
        let u = |name: &str| -> anyhow::Result<u64> { Ok(get(name)?.parse()?) };
        rows.push(Row {
            system: match get("system")? {
                "quicast" => System::Quicast,
                "srt" => System::Srt,
                other => bail!("unknown system {other:?}"),
            },
            path: PathSpec {
                loss: f("loss")?,
                burst: f("burst")?,
            },
            seed: u("seed")?,
            setting_ms: u("setting_ms")?,
            chunks: u("chunks")?,
            intact: u("intact")?,
            delivered_pct: f("delivered_pct")?,
            p50_ms: f("p50_ms")?,
            p99_ms: f("p99_ms")?,
            max_ms: f("max_ms")?,
            overhead_pct: f("overhead_pct")?,
            feedback_pct: f("feedback_pct")?,
            damaged: u("damaged")?,
            duplicates: u("duplicates")?,
            media_dropped_queue: u("media_dropped_queue")?,
            media_late_p99_us: u("media_late_p99_us")?,
            feedback_late_p99_us: u("feedback_late_p99_us")?,
        });
    }
    Ok(rows)
}

/// A plotted series: label, colour index, bursty (markers only) or iid (a line).
type SeriesKey = (String, usize, bool);
/// Loss %, delivered % and e2e p99 ms (medians over seeds).
type Point = (f64, f64, f64);

/// Two panels: delivered % and e2e p99 (medians over seeds) against loss, for every
/// quicast budget and for SRT at its chosen latency per loss level.
fn plot(path: &Path, opts: &Opts, paths: &[PathSpec], rows: &[Row]) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let cells = cells(paths, rows);
    let mut series: BTreeMap<SeriesKey, Vec<Point>> = BTreeMap::new();
    let budgets: Vec<u64> = {
        let mut b: Vec<u64> = cells
            .keys()
            .filter(|(_, s, _)| *s == System::Quicast)
            .map(|k| k.2)
            .collect();
        b.sort_unstable();
        b.dedup();
        b
    };
    for ((pi, system, setting), cell) in &cells {
        let bursty = paths[*pi].burst > 1.0;
        let x = paths[*pi].loss * 100.0;
        // The median, like the table: one failed seed must not flatten every other point.
        let point = (x, cell.med(|r| r.delivered_pct), cell.med(|r| r.p99_ms));
        match system {
            System::Quicast => {
                let idx = budgets.iter().position(|b| b == setting).unwrap_or(0);
                series
                    .entry((format!("quicast, budget {setting} ms"), idx, bursty))
                    .or_default()
                    .push(point);
            }
            System::Srt => {
                if srt_choice(&cells, *pi).is_some_and(|(c, _)| std::ptr::eq(c, cell)) {
                    series
                        .entry((
                            "SRT, smallest latency >= 99.9% (or best)".into(),
                            budgets.len(),
                            bursty,
                        ))
                        .or_default()
                        .push(point);
                }
            }
        }
    }
    if series.is_empty() {
        return Ok(());
    }
    let max_loss = paths.iter().map(|p| p.loss * 100.0).fold(1.0, f64::max) * 1.1;
    let lowest = series.values().flatten().map(|p| p.1).fold(100.0, f64::min);
    let d_lo = (lowest - 0.5).clamp(0.0, 99.0).floor();
    let p99_hi = series
        .values()
        .flatten()
        .map(|p| p.2)
        .filter(|v| v.is_finite())
        .fold(50.0, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (1300, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "quicast vs SRT 1.5: {:.0} Mbit/s, relay {} Mbit/s, {} ms each way, loss both ways, seeds {:?}",
            opts.bitrate as f64 / 1e6,
            opts.path_mbps,
            opts.delay_ms,
            opts.seeds
        ),
        ("sans-serif", 18),
    )?;
    let (charts, legend) = root.split_horizontally(1000);
    let (left, right) = charts.split_horizontally(500);
    let colours = [BLUE, GREEN, MAGENTA, CYAN];
    let colour = |i: usize, srt: bool| if srt { RED } else { colours[i % colours.len()] };
    for (area, which) in [(&left, 0), (&right, 1)] {
        let (desc, lo, hi) = if which == 0 {
            ("delivered %, median over seeds", d_lo, 100.05)
        } else {
            ("e2e p99 ms, median over seeds", 0.0, p99_hi)
        };
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_loss, lo..hi)?;
        chart
            .configure_mesh()
            .x_desc("loss each way (%)")
            .y_desc(desc)
            .draw()?;
        if which == 0 {
            chart.draw_series(DashedLineSeries::new(
                vec![(0.0, TARGET_PCT), (max_loss, TARGET_PCT)],
                4,
                4,
                BLACK.stroke_width(1),
            ))?;
        }
        for ((label, idx, bursty), pts) in &series {
            let col = colour(*idx, label.starts_with("SRT"));
            let mut pts: Vec<(f64, f64)> = pts
                .iter()
                .map(|p| (p.0, if which == 0 { p.1 } else { p.2 }))
                .filter(|p| p.1.is_finite())
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            if *bursty {
                chart.draw_series(pts.iter().map(|&p| TriangleMarker::new(p, 7, col.filled())))?;
            } else {
                chart.draw_series(LineSeries::new(pts.clone(), col.stroke_width(2)))?;
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, col.filled())))?;
            }
        }
    }
    let font = ("sans-serif", 13).into_font();
    let mut y = 40;
    let mut seen = Vec::new();
    for (label, idx, _) in series.keys() {
        if seen.contains(label) {
            continue;
        }
        seen.push(label.clone());
        let col = colour(*idx, label.starts_with("SRT"));
        legend.draw(&PathElement::new(
            vec![(10, y), (40, y)],
            col.stroke_width(3),
        ))?;
        legend.draw(&Text::new(label.clone(), (48, y - 7), font.clone()))?;
        y += 24;
    }
    y += 10;
    legend.draw(&Circle::new((25, y), 4, BLACK.filled()))?;
    legend.draw(&Text::new("iid (line)", (48, y - 7), font.clone()))?;
    y += 24;
    legend.draw(&TriangleMarker::new((25, y), 7, BLACK.filled()))?;
    legend.draw(&Text::new(
        format!("Gilbert-Elliott, burst {}", opts.burst),
        (48, y - 7),
        font.clone(),
    ))?;
    y += 24;
    legend.draw(&plotters::element::DashedPathElement::new(
        vec![(10, y), (40, y)],
        4,
        4,
        BLACK.stroke_width(1),
    ))?;
    legend.draw(&Text::new("99.9% delivered", (48, y - 7), font))?;
    root.present()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut opts = Opts::parse();
    if opts.quick {
        opts.losses = vec![0.05];
        opts.bursty_losses = Vec::new();
        opts.seeds.truncate(1);
    }
    let mut paths: Vec<PathSpec> = opts
        .losses
        .iter()
        .map(|&loss| PathSpec { loss, burst: 1.0 })
        .collect();
    paths.extend(
        opts.bursty_losses
            .iter()
            .filter(|&&l| l >= 0.0)
            .map(|&loss| PathSpec {
                loss,
                burst: opts.burst,
            }),
    );
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/field-bench"));
    std::fs::create_dir_all(&out)?;
    if let Some(csv) = &opts.from_csv {
        let rows = read_csv(csv)?;
        print!("{}", table(&opts, &paths, &rows));
        let svg = out.join("field.svg");
        plot(&svg, &opts, &paths, &rows)?;
        eprintln!("wrote {}", svg.display());
        return Ok(());
    }
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs)?;
    let release = target_release_dir()?;
    build_examples(&release)?;
    let srt = !opts.no_srt && have_srt();
    let bench = Bench {
        bin: release.join("examples"),
        logs,
        opts: opts.clone(),
    };
    let latencies = opts.srt_latencies();
    let per_path = opts.seeds.len()
        * (if opts.no_quicast {
            0
        } else {
            opts.budgets.len()
        } + if srt { latencies.len() } else { 0 });
    let total = per_path * paths.len();
    eprintln!(
        "{total} runs of about {:.0} s each",
        opts.seconds + opts.tail_seconds + 2.0
    );
    let mut rows = Vec::new();
    let mut n = 0;
    let started = Instant::now();
    for &path in &paths {
        for &seed in &opts.seeds {
            let mut runs: Vec<(System, u64)> = Vec::new();
            if !opts.no_quicast {
                runs.extend(opts.budgets.iter().map(|&b| (System::Quicast, b)));
            }
            if srt {
                runs.extend(latencies.iter().map(|&l| (System::Srt, l)));
            }
            for (system, setting) in runs {
                n += 1;
                let result = match system {
                    System::Quicast => bench.quicast(path, seed, setting),
                    System::Srt => bench.srt(path, seed, setting),
                };
                match result {
                    Ok(row) => {
                        eprintln!(
                            "[{n}/{total} {:.0}s] {} {} seed {seed} {}: delivered {:.3}%, e2e p50/p99/max {}/{}/{} ms, overhead {:.1}%, feedback {:.1}%, relay late p99 {} us",
                            started.elapsed().as_secs_f64(),
                            system.name(),
                            path.label(),
                            system.setting(setting),
                            row.delivered_pct,
                            ms(row.p50_ms),
                            ms(row.p99_ms),
                            ms(row.max_ms),
                            row.overhead_pct,
                            row.feedback_pct,
                            row.media_late_p99_us,
                        );
                        rows.push(row);
                    }
                    Err(e) => eprintln!(
                        "[{n}/{total}] {} {} seed {seed} {}: FAILED: {e:#}",
                        system.name(),
                        path.label(),
                        system.setting(setting)
                    ),
                }
            }
        }
    }
    print!("{}", table(&opts, &paths, &rows));
    if !srt {
        println!(
            "\nSRT skipped: {}",
            if opts.no_srt {
                "--no-srt"
            } else {
                "apt-get install srt-tools"
            }
        );
    }
    let csv = out.join("results.csv");
    write_csv(&csv, &opts, &rows)?;
    let svg = out.join("field.svg");
    plot(&svg, &opts, &paths, &rows)?;
    eprintln!("wrote {} and {}", csv.display(), svg.display());
    Ok(())
}
