//! The `server` and `client` example binaries, run as a user would.

// The examples' shared code (live line, metrics endpoint, dev cert path),
// compiled here too so tests check exactly what the binaries run.
#[path = "../../examples/common/mod.rs"]
pub(crate) mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::procs::{example, free_udp_port, start_server, start_server_lines, temp, wait, Guard};

/// Runs the client example to its end (at most `limit`), its stderr
/// captured so its report does not land in the middle of `cargo test`'s
/// output; returned for the assertions to show.
fn run_client(args: &[&str], limit: Duration) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(example("client"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client example");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut out);
        out
    });
    let status = wait(Guard(child), limit);
    (status, reader.join().unwrap())
}

/// The lines a process wrote until its stderr closed (at most 5 s more).
fn rest(lines: &std::sync::mpsc::Receiver<String>) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = Vec::new();
    while let Ok(line) = lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        out.push(line);
    }
    out
}

#[test]
fn file_through_server_and_client_examples_is_byte_identical() {
    let seed = crate::util::seed();
    let input = temp("input.bin");
    let output = temp("output.bin");
    let stats = temp("stats.json");
    let mut data = vec![0u8; 5 << 20];
    let mut x = seed | 1;
    for b in data.iter_mut() {
        // xorshift: incompressible, reproducible from the seed
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&input, &data).unwrap();

    let (server, addr) = start_server(&[
        "--input",
        input.to_str().unwrap(),
        "--bitrate",
        "40000000",
        "--start-on-viewer",
        "--exit-at-end",
    ]);
    let (status, stderr) = run_client(
        &[
            "--server",
            &addr,
            "--latency",
            "1000",
            "--output",
            output.to_str().unwrap(),
            "--stats-json",
            stats.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert!(status.success(), "client exited with {status}: {stderr}");
    let server_status = wait(server, Duration::from_secs(30));
    assert!(
        server_status.success(),
        "server exited with {server_status}"
    );

    let got = std::fs::read(&output).unwrap();
    assert_eq!(got.len(), data.len(), "seed {seed}: output length");
    assert!(got == data, "seed {seed}: output differs from input");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    for key in [
        "blocks_delivered",
        "blocks_recovered",
        "blocks_lost",
        "blocks_late",
        "bytes_delivered",
        "reconnects",
        "blocks_missed",
    ] {
        assert!(json[key].is_u64(), "stats json lacks {key}: {json}");
    }
    for key in ["p50", "p99", "p999", "max"] {
        assert!(
            json["latency_ms"][key].is_number(),
            "stats json lacks latency_ms.{key}"
        );
    }
    assert_eq!(json["blocks_lost"], 0);
    assert_eq!(
        (&json["reconnects"], &json["blocks_missed"]),
        (&0.into(), &0.into())
    );
    assert_eq!(json["bytes_delivered"], data.len() as u64);
    for p in [input, output, stats] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn client_example_exits_nonzero_naming_the_rejection() {
    let (_server, addr) = start_server(&["--stream", "live"]);
    let out = Command::new(example("client"))
        .args(["--server", &addr, "--stream", "other", "--duration", "5"])
        .output()
        .expect("run client example");
    assert!(
        !out.status.success(),
        "client must fail on a missing stream"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rejected") && stderr.contains("no such stream"),
        "stderr names the reason: {stderr}"
    );
}

#[test]
fn client_example_with_a_wrong_token_fails_and_the_right_one_is_served() {
    let (_server, addr) = start_server(&["--token", "open-sesame"]);
    let out = Command::new(example("client"))
        .args(["--server", &addr, "--token", "guess", "--duration", "5"])
        .output()
        .expect("run client example");
    assert!(!out.status.success(), "a wrong token must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rejected") && stderr.contains("invalid token"),
        "stderr names the reason: {stderr}"
    );
    let good = temp("token-stats.json");
    let out = Command::new(example("client"))
        .args([
            "--server",
            &addr,
            "--token",
            "open-sesame",
            // Joining mid-stream waits up to a second for a sync point.
            "--duration",
            "3",
        ])
        .args(["--stats-json", good.to_str().unwrap()])
        .output()
        .expect("run client example");
    assert!(
        out.status.success(),
        "the right token is served: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&good).unwrap()).unwrap();
    assert!(json["blocks_delivered"].as_u64().unwrap() > 10, "{json}");
    let _ = std::fs::remove_file(good);
}

/// The server example's exit line: `viewer events: A accepted, D dropped,
/// P applied, L logged, E not logged (write errors)`, as numbers by word.
fn event_counts(lines: &std::sync::mpsc::Receiver<String>) -> Option<[(String, u64); 5]> {
    let line = lines
        .recv_timeout(Duration::from_secs(15))
        .into_iter()
        .chain(std::iter::from_fn(|| {
            lines.recv_timeout(Duration::from_secs(15)).ok()
        }))
        .find(|l| l.contains("viewer events:"))?;
    let tail = line.split("viewer events:").nth(1)?;
    let mut counts = tail.split(',').map(|part| {
        let mut words = part.split_whitespace();
        let n = words.next()?.parse().ok()?;
        Some((words.next()?.to_string(), n))
    });
    Some([
        counts.next()??,
        counts.next()??,
        counts.next()??,
        counts.next()??,
        counts.next()??,
    ])
}

fn signal(guard: &Guard, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &guard.0.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// A viewer (the client example) watching for `secs` seconds.
fn watch(addr: &str, secs: &str) -> Guard {
    Guard(
        Command::new(example("client"))
            .args(["--server", addr, "--latency", "1000", "--duration", secs])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn client example"),
    )
}

/// SIGTERM in the middle of a run stops the server gracefully: every
/// accepted event is applied and written, the viewer's leave included, and
/// the exit line says so.
#[test]
fn sigterm_mid_run_logs_every_accepted_event() {
    let log = temp("sigterm-events.jsonl");
    let _ = std::fs::remove_file(&log);
    let (server, addr, lines) = start_server_lines(&["--events", log.to_str().unwrap()]);
    let _viewer = watch(&addr, "30");
    std::thread::sleep(Duration::from_secs(3));
    signal(&server, "TERM");
    let status = wait(server, Duration::from_secs(15));
    let counts = event_counts(&lines).expect("the server printed its exit line");
    println!("{counts:?}");
    assert!(status.success(), "server exited with {status}");
    let [(_, accepted), (_, dropped), (_, applied), (_, logged), (_, errors)] = counts;
    let written = std::fs::read_to_string(&log).unwrap();
    assert!(accepted >= 3, "a join and reports at least: {counts:?}");
    assert_eq!((dropped, errors), (0, 0), "{counts:?}");
    assert_eq!(accepted, applied, "{counts:?}");
    assert_eq!(applied, logged, "{counts:?}");
    assert_eq!(written.lines().count() as u64, logged, "lines in the file");
    assert!(
        written.lines().last().unwrap().contains("\"leave\""),
        "the viewer's leave is the last record: {:?}",
        written.lines().last()
    );
    let _ = std::fs::remove_file(log);
}

/// A log that cannot be written (a full disk) is counted, and the exit line
/// tells the truth: nothing logged, every accepted event a write error.
#[test]
fn full_disk_is_counted_and_reported() {
    let (server, addr, lines) = start_server_lines(&["--events", "/dev/full"]);
    let _viewer = watch(&addr, "30");
    std::thread::sleep(Duration::from_secs(3));
    signal(&server, "INT");
    let status = wait(server, Duration::from_secs(15));
    let counts = event_counts(&lines).expect("the server printed its exit line");
    println!("{counts:?}");
    assert!(status.success(), "server exited with {status}");
    let [(_, accepted), _, (_, applied), (_, logged), (_, errors)] = counts;
    assert!(accepted >= 3, "{counts:?}");
    assert_eq!(applied, accepted, "{counts:?}");
    assert_eq!(logged, 0, "{counts:?}");
    assert_eq!(errors, accepted, "{counts:?}");
}

/// The README's file example with a file that is not there: the server
/// fails at once, naming the file, before any viewer can connect (no
/// backtrace even with `RUST_BACKTRACE=1`), and the client, finding no
/// server, fails too, naming what it tried.
#[test]
fn readme_file_example_with_a_missing_input_fails_on_both_sides() {
    let port = free_udp_port();
    let addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let out = Command::new(example("server"))
        .args(["--listen", &addr, "--input", "no-such-movie.ts"])
        .args(["--start-on-viewer", "--exit-at-end"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run server example");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "server must fail: {stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed at once, not after a viewer came"
    );
    assert!(
        stderr.contains("no-such-movie.ts") && stderr.contains("No such file"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
    let (status, stderr) = run_client(
        &[
            "--server",
            &addr,
            "--output",
            temp("missing-copy.ts").to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert!(!status.success(), "client must fail: {stderr}");
    assert!(stderr.contains(&addr), "names the address: {stderr}");
    let _ = std::fs::remove_file(temp("missing-copy.ts"));
}

/// An input that fails after a viewer joined (a directory: it opens, every
/// read fails): the viewer is told the publisher failed and the client
/// example exits non-zero saying so; the server exits non-zero naming it.
#[test]
fn input_failing_after_a_viewer_joined_fails_the_client_naming_the_publisher() {
    let dir = std::env::temp_dir();
    let (server, addr, lines) = start_server_lines(&[
        "--input",
        dir.to_str().unwrap(),
        "--start-on-viewer",
        "--exit-at-end",
    ]);
    let (status, stderr) = run_client(&["--server", &addr], Duration::from_secs(20));
    assert!(!status.success(), "client must fail: {stderr}");
    let last = stderr.trim().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("publisher failed"),
        "the last line names the publisher failure: {stderr}"
    );
    let status = wait(server, Duration::from_secs(10));
    assert!(!status.success(), "server exited with {status}");
    let said = rest(&lines);
    assert!(
        said.iter()
            .any(|l| l.starts_with("error: ") && l.contains(dir.to_str().unwrap())),
        "{said:?}"
    );
}

/// A publisher dropped without `finish` is a failure, not an end: viewers
/// get `Goodbye` with `publisher_failed` and their subscription that error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_dropped_without_finish_fails_its_viewers() {
    use quicast::{ClientError, CloseCode, Event};
    let srv = crate::util::TestServer::start(|_| {});
    let mut publisher = srv.server.publish("live", None).unwrap();
    let mut config = srv.client_config("live");
    config.reconnect(None);
    let mut viewer = srv.viewer(config, 0.0, 0).await.unwrap();
    for seq in 0..5 {
        publisher
            .send(crate::util::block(1, seq, 4_000), seq == 0)
            .unwrap();
    }
    drop(publisher);
    let mut blocks = 0;
    let error = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match viewer.next().await {
                Some(Ok(Event::Block { .. })) => blocks += 1,
                Some(Ok(Event::End)) | None => panic!("a failed stream must not end normally"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return e,
            }
        }
    })
    .await
    .expect("the viewer is told within 10 s");
    match &error {
        ClientError::Goodbye { code, reason } => {
            assert_eq!(*code, CloseCode::PublisherFailed, "{error}");
            assert!(reason.contains("publisher"), "{reason}");
        }
        other => panic!("expected Goodbye(publisher_failed), got {other:?}"),
    }
    assert_eq!(CloseCode::PublisherFailed.code(), 0xc);
    assert!(error.to_string().contains("publisher_failed"), "{error}");
    println!("{blocks} blocks before: {error}");
    srv.stop().await;
}

/// One SIGINT stops the server example within 2 s, and a connected viewer
/// gets the Goodbye (`shutdown`) rather than a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sigint_stops_the_server_within_two_seconds_with_goodbye() {
    use quicast::{Client, ClientConfig, ClientError, CloseCode, Event};
    let (server, addr, lines) = start_server_lines(&[]);
    let mut config = ClientConfig::new(addr.parse().unwrap(), "live");
    config
        .load_roots(&quicast::net::tls::dev_cert_path(&common::certs_dir()))
        .unwrap()
        .reconnect(None);
    let mut viewer = Client::connect(config).await.expect("viewer connects");
    for _ in 0..10 {
        match viewer.next().await {
            Some(Ok(Event::Block { .. } | Event::Lost { .. })) => {}
            other => panic!("{other:?}"),
        }
    }
    signal(&server, "INT");
    let sent = Instant::now();
    let status = wait(server, Duration::from_secs(2));
    println!("server exited {:?} after SIGINT", sent.elapsed());
    assert!(status.success(), "server exited with {status}");
    let said = rest(&lines);
    assert!(
        said.iter()
            .any(|l| l.contains("SIGINT") && l.contains("Goodbye")),
        "says what happens: {said:?}"
    );
    let error = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match viewer.next().await {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    })
    .await
    .expect("the viewer hears within 5 s");
    assert!(
        matches!(
            error,
            Some(ClientError::Goodbye {
                code: CloseCode::Shutdown,
                ..
            })
        ),
        "{error:?}"
    );
}

/// The client's live line fits an 80-column terminal for a typical run,
/// including the widest usual figures (100.000 %, QoE 100).
#[test]
fn live_line_fits_80_columns() {
    let typical = common::Live {
        elapsed: Duration::from_secs_f64(12.3),
        delivered: 585,
        recovered: 31,
        lost: 0,
        missed: 0,
        p99_ms: 45.6,
        bytes: 585 * 21_056,
        qoe: Some(100),
    };
    let worst = common::Live {
        elapsed: Duration::from_secs(99_999),
        delivered: 4_000_000,
        recovered: 999_999,
        lost: 99_999,
        missed: 5,
        p99_ms: 9_999.9,
        bytes: u64::MAX / 1_000_000_000,
        qoe: Some(100),
    };
    for (what, live) in [
        ("typical", typical),
        (
            "no summary yet",
            common::Live {
                qoe: None,
                ..typical
            },
        ),
        ("at the start", common::Live::default()),
        ("widest", worst),
    ] {
        let line = common::live_line(&live);
        println!("{what}: {line:?}");
        assert!(
            line.chars().count() <= common::LIVE_LINE_MAX,
            "{what}: {} columns: {line:?}",
            line.chars().count()
        );
        assert!(!line.chars().any(char::is_control), "{line:?}");
    }
    let line = common::live_line(&typical);
    assert!(
        line.contains("100.000%") && line.contains("QoE 100"),
        "{line}"
    );
}

/// `--server localhost:PORT`: the name is resolved, and the TLS name
/// defaults to it.
#[test]
fn client_example_accepts_a_host_name() {
    let (_server, addr) = start_server(&[]);
    let port = addr.rsplit_once(':').unwrap().1;
    let stats = temp("hostname-stats.json");
    let (status, stderr) = run_client(
        &[
            "--server",
            &format!("localhost:{port}"),
            // Joining mid-stream waits up to a second for a sync point.
            "--duration",
            "3",
            "--stats-json",
            stats.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert!(status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
    assert!(json["blocks_delivered"].as_u64().unwrap() > 10, "{json}");
    let _ = std::fs::remove_file(stats);
    // A name that does not resolve fails once, naming it.
    let (status, stderr) = run_client(
        &["--server", "no-such-host.invalid:4433"],
        Duration::from_secs(20),
    );
    assert!(!status.success());
    assert!(stderr.contains("no-such-host.invalid"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// `--ca` naming a file that is not there says so (and does not suggest
/// running the server to make the dev certificate).
#[test]
fn client_example_with_a_missing_ca_says_the_file_is_missing() {
    let (status, stderr) = run_client(
        &["--ca", "/nonexistent.pem", "--duration", "1"],
        Duration::from_secs(10),
    );
    assert!(!status.success());
    assert_eq!(stderr.trim(), "error: --ca /nonexistent.pem: no such file");
}

/// A viewer that leaves normally is logged as "viewer left", with the
/// wall-clock time, its address and the run id; a second run starts a new
/// file with a new run id.
#[test]
fn event_log_of_a_normal_leave_says_viewer_left() {
    let log = temp("leave-events.jsonl");
    let _ = std::fs::remove_file(&log);
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (server, addr, _lines) = start_server_lines(&["--events", log.to_str().unwrap()]);
        let (status, stderr) = run_client(
            &["--server", &addr, "--duration", "1"],
            Duration::from_secs(20),
        );
        assert!(status.success(), "{stderr}");
        signal(&server, "INT");
        assert!(wait(server, Duration::from_secs(10)).success());
        let text = std::fs::read_to_string(&log).unwrap();
        let records: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let leave = records
            .iter()
            .find(|r| r["kind"]["type"] == "leave")
            .unwrap_or_else(|| panic!("no leave in {text}"));
        assert_eq!(leave["kind"]["reason"], "viewer left", "{leave}");
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let at = leave["unix_ms"].as_u64().expect("wall-clock time");
        assert!(now_ms.abs_diff(at) < 60_000, "{leave} vs now {now_ms}");
        let peer: std::net::SocketAddr = leave["peer"].as_str().unwrap().parse().unwrap();
        assert!(peer.ip().is_loopback(), "{leave}");
        let run = leave["run"].as_str().expect("run id").to_string();
        assert!(
            records.iter().all(|r| r["run"] == run.as_str()),
            "one run per file: {text}"
        );
        runs.push(run);
    }
    assert_ne!(runs[0], runs[1], "each run has its own id");
    let previous = std::fs::read_to_string(format!("{}.1", log.display())).unwrap();
    assert!(
        previous.contains(&runs[0]),
        "the first run's file is kept as .1"
    );
    let _ = std::fs::remove_file(&log);
    for i in 1..=3 {
        let _ = std::fs::remove_file(format!("{}.{i}", log.display()));
    }
}
