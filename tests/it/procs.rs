//! Running the example binaries from tests: finding them, ports, a guard
//! that kills a child the test no longer waits for.

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
pub(crate) fn start_server(args: &[&str]) -> (Guard, String) {
    let (guard, addr, _) = start_server_lines(args);
    (guard, addr)
}

/// [`start_server`], and the server's stderr lines from then on.
pub(crate) fn start_server_lines(
    args: &[&str],
) -> (Guard, String, std::sync::mpsc::Receiver<String>) {
    start_server_stdin(args, Stdio::null())
}

/// [`start_server_lines`] with `stdin` as the server's standard input.
pub(crate) fn start_server_stdin(
    args: &[&str],
    stdin: Stdio,
) -> (Guard, String, std::sync::mpsc::Receiver<String>) {
    let port = free_udp_port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(example("server"))
        .args(["--listen", &addr])
        .args(args)
        .stdin(stdin)
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

pub(crate) fn wait(mut guard: Guard, limit: Duration) -> std::process::ExitStatus {
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

pub(crate) fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("quicast-it-{}-{name}", std::process::id()))
}
