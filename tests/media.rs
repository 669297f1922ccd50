//! Live input through the examples: an ffmpeg MPEG-TS stream piped into
//! `server --input -` and watched with `client --output`, checked with
//! ffmpeg's own decoder (skips, saying so, where ffmpeg is not installed;
//! `.ci/run` installs it), and a paced pipe that stalls.
//!
//! In its own test binary: five processes for half a minute would otherwise
//! load the cores under the latency-sensitive tests `cargo test` runs beside
//! them (test binaries run one after another).

#[path = "it/util.rs"]
#[allow(dead_code)]
mod util;

#[path = "it/procs.rs"]
#[allow(dead_code)]
mod procs;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use procs::{example, free_udp_port, start_server_stdin, temp, wait, Guard};

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Video frames ffmpeg decodes from `file`, and every error line it prints.
fn decode(file: &Path) -> (u64, Vec<String>) {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args(["-map", "0:v:0", "-f", "framemd5", "-"])
        .output()
        .expect("run ffmpeg");
    let frames = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count() as u64;
    let errors = String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::to_owned)
        .collect();
    (frames, errors)
}

/// `key_frame,pict_type` of the first video frame ffprobe finds in `file`
/// (without the side data ffprobe appends to the line).
fn first_frame(file: &Path) -> String {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_frames"])
        .args([
            "-show_entries",
            "frame=key_frame,pict_type",
            "-of",
            "csv=p=0",
        ])
        .args(["-read_intervals", "%+#1"])
        .arg(file)
        .output()
        .expect("run ffprobe");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .split(',')
        .take(2)
        .collect::<Vec<_>>()
        .join(",")
}

/// A viewer (the client example) writing the stream to `output`.
fn viewer(server: &str, output: &Path, name: &'static str) -> Guard {
    let mut child = Command::new(example("client"))
        .args(["--server", server, "--latency", "500", "--output"])
        .arg(output)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client example");
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[{name}] {line}");
        }
    });
    Guard(child)
}

/// The impair example between a viewer and `upstream`: `loss` both ways,
/// 10 ms each way. Returns it and the address to connect to.
fn impair(upstream: &str, loss: f64, seed: u64) -> (Guard, String) {
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut child = Command::new(example("impair"))
        .args(["--listen", &listen, "--upstream", upstream])
        .args(["--loss", &loss.to_string(), "--delay-ms", "10"])
        .args(["--seed", &seed.to_string(), "--duration", "120"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn impair example");
    let stderr = child.stderr.take().unwrap();
    let (ready, started) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = ready.send(());
            eprintln!("[impair] {line}");
        }
    });
    started
        .recv_timeout(Duration::from_secs(10))
        .expect("impair example started");
    (Guard(child), listen)
}

/// 30 s of MPEG-2 video (a key frame a second) and MP2 audio, as TS,
/// piped by ffmpeg at its real pace into the server example. One viewer
/// watches from the start through 3% loss both ways and gets every frame
/// with no decoder error; one joins at 10 s and its file starts on a key
/// frame, the server having cut a block at each key frame and marked it.
#[test]
fn ffmpeg_ts_through_server_and_client_decodes_whole_and_a_late_joiner_starts_on_a_key_frame() {
    if !have("ffmpeg") || !have("ffprobe") {
        eprintln!("SKIPPED: ffmpeg/ffprobe not installed (Debian: apt-get install ffmpeg)");
        return;
    }
    let seed = util::seed();
    let (src, a, b) = (temp("src.ts"), temp("from-start.ts"), temp("late.ts"));
    let made = Command::new("ffmpeg")
        .args(["-v", "error", "-y"])
        .args(["-f", "lavfi", "-i", "testsrc=size=320x240:rate=25"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args(["-t", "30", "-c:v", "mpeg2video", "-g", "25", "-b:v", "1M"])
        .args(["-c:a", "mp2", "-f", "mpegts"])
        .arg(&src)
        .status()
        .expect("run ffmpeg");
    assert!(made.success(), "ffmpeg made the source");
    let (frames, errors) = decode(&src);
    assert_eq!((frames, errors.len()), (750, 0), "the source: {errors:?}");

    let (mut server, addr, _lines) = start_server_stdin(
        &["--input", "-", "--start-on-viewer", "--exit-at-end"],
        Stdio::piped(),
    );
    let mut stdin = server.0.stdin.take().unwrap();
    let (_impair, lossy) = impair(&addr, 0.03, seed);
    let from_start = viewer(&lossy, &a, "from start");
    // ffmpeg starts once the viewer is in: the server reads from then on.
    std::thread::sleep(Duration::from_secs(2));
    let mut ffmpeg = Command::new("ffmpeg")
        .args(["-v", "error", "-re", "-i"])
        .arg(&src)
        .args(["-c", "copy", "-f", "mpegts", "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn ffmpeg");
    let mut ts = ffmpeg.stdout.take().unwrap();
    let pipe = std::thread::spawn(move || std::io::copy(&mut ts, &mut stdin));
    let ffmpeg = Guard(ffmpeg);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let late = viewer(&addr, &b, "late");
    let status = wait(ffmpeg, Duration::from_secs(60));
    assert!(status.success(), "ffmpeg exited with {status}");
    let _ = pipe.join();
    println!("ffmpeg ran {:?}", started.elapsed());
    for (guard, name) in [(from_start, "from start"), (late, "late")] {
        let status = wait(guard, Duration::from_secs(30));
        assert!(status.success(), "viewer {name} exited with {status}");
    }
    assert!(wait(server, Duration::from_secs(30)).success());

    let (got, errors) = decode(&a);
    assert!(
        errors.is_empty(),
        "seed {seed}: decoding what the viewer got at 3% loss: {errors:?}"
    );
    assert_eq!(got, frames, "seed {seed}: frames at 3% loss");
    let (late_frames, _) = decode(&b);
    assert!(
        late_frames > 0 && late_frames < frames - 200,
        "seed {seed}: the late joiner got {late_frames} frames"
    );
    assert_eq!(
        first_frame(&b),
        "1,I",
        "seed {seed}: the late joiner's first frame"
    );
    for f in [src, a, b] {
        let _ = std::fs::remove_file(f);
    }
}

/// A paced pipe that stalls for 50 ms in the middle: the server reads the
/// pipe as it comes (it never re-paces it), so once the backlog of the stall
/// has gone out, latency is back where it was. A server that paced stdin by
/// its own ticks kept the stall as a standing delay for the rest of the run.
#[test]
fn latency_after_a_stall_in_the_pipe_returns_to_its_level_before() {
    const CHUNK: usize = 1316;
    const EVERY: Duration = Duration::from_micros(2632); // 4 Mbit/s
    const CHUNKS: u64 = 2280; // 6 s
    const STALL_AT: u64 = 1140;
    let (mut server, addr, _lines) =
        start_server_stdin(&["--input", "-", "--exit-at-end"], Stdio::piped());
    let mut stdin = server.0.stdin.take().unwrap();
    let mut child = Command::new(example("client"))
        .args(["--server", &addr, "--latency", "300", "--output", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client example");
    let (mut out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (subscribed, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if line.contains("subscribed to") {
                let _ = subscribed.send(());
            }
            eprintln!("[viewer] {line}");
        }
    });
    let client = Guard(child);
    ready
        .recv_timeout(Duration::from_secs(20))
        .expect("the viewer subscribed");
    let epoch = Instant::now();
    // Each chunk: its number and when it was written, µs since `epoch`.
    let reader = std::thread::spawn(move || {
        let mut latency = vec![None; CHUNKS as usize];
        let mut buf = [0u8; CHUNK];
        while std::io::Read::read_exact(&mut out, &mut buf).is_ok() {
            let n = u64::from_be_bytes(buf[..8].try_into().unwrap());
            let sent = u64::from_be_bytes(buf[8..16].try_into().unwrap());
            if let Some(slot) = latency.get_mut(n as usize) {
                let now = epoch.elapsed().as_micros() as u64;
                *slot = Some(now.saturating_sub(sent) as f64 / 1000.0);
            }
        }
        latency
    });
    for n in 0..CHUNKS {
        let due = epoch + EVERY * n as u32;
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        if n == STALL_AT {
            // The source stalls, then writes what it owes at once.
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut chunk = vec![0u8; CHUNK];
        chunk[..8].copy_from_slice(&n.to_be_bytes());
        let sent = epoch.elapsed().as_micros() as u64;
        chunk[8..16].copy_from_slice(&sent.to_be_bytes());
        std::io::Write::write_all(&mut stdin, &chunk).expect("write to the server");
    }
    drop(stdin);
    assert!(wait(client, Duration::from_secs(30)).success());
    assert!(wait(server, Duration::from_secs(30)).success());
    let latency = reader.join().unwrap();
    let median = |range: std::ops::Range<u64>| {
        let mut v: Vec<f64> = range.filter_map(|n| latency[n as usize]).collect();
        assert!(v.len() > 300, "{} chunks arrived in the window", v.len());
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // One second before the stall, and from one second after it to the end.
    let (before, after) = (median(380..STALL_AT), median(STALL_AT + 380..CHUNKS));
    let arrived = latency.iter().flatten().count();
    println!("chunks arrived {arrived} of {CHUNKS}; median latency before the stall {before:.2} ms, after {after:.2} ms");
    assert_eq!(
        arrived as u64, CHUNKS,
        "every chunk arrived on a clean path"
    );
    assert!(
        (after - before).abs() < 3.0,
        "latency before the stall {before:.2} ms, after it {after:.2} ms"
    );
}
