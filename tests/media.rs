//! Real media through the examples: an ffmpeg MPEG-TS stream piped into
//! `server --input -` and watched with `client --output`, checked with
//! ffmpeg's own decoder. Skips, saying so, where ffmpeg is not installed
//! (`.ci/run` installs it).
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
