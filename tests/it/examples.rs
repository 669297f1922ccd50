//! The `server` and `client` example binaries, run as a user would.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// target/<profile>/examples/<name>, built by `cargo test` alongside the tests.
pub(crate) fn example(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("test binary path");
    dir.pop(); // the test binary
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} missing: run through `cargo test`, which builds the examples",
        path.display()
    );
    path
}

pub(crate) fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the child if the test fails before waiting on it.
pub(crate) struct Guard(pub(crate) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the server example and waits until it listens.
fn start_server(args: &[&str]) -> (Guard, String) {
    let (guard, addr, _) = start_server_lines(args);
    (guard, addr)
}

/// [`start_server`], and the server's stderr lines from then on.
fn start_server_lines(args: &[&str]) -> (Guard, String, std::sync::mpsc::Receiver<String>) {
    let port = free_udp_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(example("server"))
        .args(["--listen", &addr])
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn server example");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[server] {line}");
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("quicast server on") => break,
            Ok(_) => {}
            Err(_) => panic!("server example did not start"),
        }
    }
    (Guard(child), addr, rx)
}

fn wait(mut guard: Guard, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = guard.0.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("quicast-it-{}-{name}", std::process::id()))
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
    let client = Command::new(example("client"))
        .args(["--server", &addr, "--latency", "1000"])
        .args(["--output", output.to_str().unwrap()])
        .args(["--stats-json", stats.to_str().unwrap()])
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn client example");
    let status = wait(Guard(client), Duration::from_secs(60));
    assert!(status.success(), "client exited with {status}");
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
            "--duration",
            "1",
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
