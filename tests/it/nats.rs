//! Analytics across servers through a real `nats-server -js` on loopback.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use quicast::net::{NatsAggregator, NatsAggregatorConfig};

use crate::util::{block, collect, promtool, TestServer};

/// A `nats-server -js` on a loopback port of its own, with its own store directory.
struct NatsServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl NatsServer {
    /// Starts one, or `None` (with a message) when `nats-server` is not installed; in CI
    /// (which installs it) its absence fails the test.
    fn start() -> Option<NatsServer> {
        if Command::new("nats-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            assert!(
                std::env::var_os("CI").is_none(),
                "nats-server is required in CI (apt-get install nats-server)"
            );
            println!("SKIPPED: nats-server is not on PATH (apt-get install nats-server)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("quicast-nats-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = NatsServer {
            child: None,
            port,
            dir,
        };
        s.spawn();
        Some(s)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        // Ready once it accepts connections (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it the way an operator restarts it (SIGTERM: a clean shutdown), waiting
    /// at most 10 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn aggregator(url: &str) -> (NatsAggregator, tokio::task::JoinHandle<()>) {
    let agg = NatsAggregator::new(NatsAggregatorConfig::new(url, "it").unwrap());
    let task = tokio::spawn(agg.run());
    (agg, task)
}

/// Waits (bounded) until `f` holds, polling.
async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The issue's done-means: three servers with viewers publish to JetStream, and the
/// aggregator's counts equal the sum of the events the servers accepted, exactly, across a
/// restart of nats-server (the servers buffer and resend) and a restart of the aggregator
/// (it replays the stream) in the middle of the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_count_exactly_across_nats_and_aggregator_restarts() {
    let Some(mut nats) = NatsServer::start() else {
        return;
    };
    let started = Instant::now();
    let url = nats.url();
    let (agg, agg_task) = aggregator(&url);

    // Server i has i + 1 viewers: 6 viewers in all.
    let ids = ["s1", "s2", "s3"];
    let mut servers = Vec::new();
    for id in ids {
        servers.push(TestServer::start(|c| {
            c.report_interval(Duration::from_millis(100));
            c.nats(Some(url.clone()), "it").unwrap();
            c.server_id(id).unwrap();
        }));
    }
    // 2 KB blocks every 20 ms for 8 s: the run spans both restarts below.
    const BLOCKS: u64 = 400;
    let mut publishers = Vec::new();
    for (i, srv) in servers.iter().enumerate() {
        let mut p = srv.server.publish("live", None).unwrap();
        publishers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            for seq in 0..BLOCKS {
                tick.tick().await;
                p.send(block(i as u8, seq, 2_000), seq % 25 == 0).unwrap();
            }
            p.finish();
        }));
    }
    let mut viewers = Vec::new();
    for (i, srv) in servers.iter().enumerate() {
        for _ in 0..=i {
            let sub = srv.viewer(srv.client_config("live"), 0.0, 0).await.unwrap();
            viewers.push(tokio::spawn(collect(sub, Duration::from_secs(30))));
        }
    }

    // The aggregator sees every server's viewers, by server.
    until("viewers per server", Duration::from_secs(10), || {
        let s = agg.servers();
        ids.iter()
            .enumerate()
            .all(|(i, id)| s.get(*id).is_some_and(|f| f.viewers == i as u64 + 1))
    })
    .await;
    let text = agg.metrics_text();
    for (i, id) in ids.iter().enumerate() {
        // Extra metrics are rendered as floats.
        let line = format!("quicast_server_viewers{{server=\"{id}\"}} {}.0", i + 1);
        assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
    }
    assert!(
        text.contains("quicast_viewers{stream=\"live\"} 6"),
        "{text}"
    );

    // nats-server goes away for 2 s while viewers keep reporting: servers buffer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_outage = agg.stats();
    tokio::task::block_in_place(|| nats.stop());
    let down_at = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let buffered: u64 = servers
        .iter()
        .map(|s| s.server.nats_stats().unwrap().buffered)
        .sum();
    tokio::task::block_in_place(|| nats.spawn());
    println!(
        "nats-server stopped at {:.1} s for 2 s; {buffered} events buffered by the servers",
        down_at.as_secs_f64()
    );
    assert!(buffered > 0, "servers buffered nothing while NATS was down");

    // Once the servers have resent, the aggregator restarts and rebuilds from the stream.
    until("buffers drained", Duration::from_secs(10), || {
        servers
            .iter()
            .all(|s| s.server.nats_stats().unwrap().buffered < 20)
    })
    .await;
    // The first aggregator's durable consumer resumes after the NATS restart.
    let before_outage = before_outage.stream_sequence;
    until("aggregator resumed", Duration::from_secs(10), || {
        agg.stats().stream_sequence > before_outage + buffered
    })
    .await;
    let _ = promtool(&servers[0].server.metrics_text());
    agg_task.abort();
    let before_restart = agg.stats();
    let (agg, agg_task) = aggregator(&url);
    println!(
        "aggregator received up to stream seq {} before the outage and resumed to {} after it; restarted at {:.1} s",
        before_outage,
        before_restart.stream_sequence,
        started.elapsed().as_secs_f64(),
    );

    for v in viewers {
        let got = v.await.unwrap();
        assert!(got.ended, "viewer saw the end of the stream");
    }
    for p in publishers {
        p.await.unwrap();
    }
    let mut accepted = Vec::new();
    for srv in servers {
        let server = srv.server.clone();
        srv.stop().await;
        let stats = server.stats();
        let nats_stats = server.nats_stats().unwrap();
        accepted.push((stats, nats_stats));
    }

    let total: u64 = accepted.iter().map(|(s, _)| s.events_accepted).sum();
    until("aggregator caught up", Duration::from_secs(15), || {
        agg.snapshot().applied >= total
    })
    .await;
    // Anything still in flight would show here.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let figures = agg.servers();
    let snap = agg.snapshot();
    let stats = agg.stats();
    println!("server  accepted  applied  published  resent-dups  errors  aggregator");
    for ((s, n), id) in accepted.iter().zip(ids) {
        let f = &figures[id];
        println!(
            "{id:6}  {:8}  {:7}  {:9}  {:11}  {:6}  {:10}",
            s.events_accepted, s.events_applied, n.published, n.duplicates, n.errors, f.applied
        );
    }
    println!(
        "total accepted {total}, aggregator applied {} (stream seq {}, {} received, {} redelivered, {} skipped as duplicate); took {:.1} s",
        snap.applied,
        stats.stream_sequence,
        stats.received,
        stats.redelivered,
        figures.values().map(|f| f.duplicates).sum::<u64>(),
        started.elapsed().as_secs_f64()
    );
    for ((s, n), id) in accepted.iter().zip(ids) {
        let f = &figures[id];
        assert_eq!(s.events_dropped, 0, "{id}: local queue dropped events");
        assert_eq!(s.events_accepted, s.events_applied, "{id}");
        assert_eq!(
            n.published, s.events_applied,
            "{id}: every event published once"
        );
        assert_eq!(n.buffered, 0, "{id}");
        assert_eq!(
            (
                n.dropped_queue_full,
                n.dropped_buffer_full,
                n.dropped_unsent
            ),
            (0, 0, 0),
            "{id}: NATS drops"
        );
        assert_eq!(f.applied, s.events_accepted, "{id}: aggregator count");
        assert_eq!((f.gaps, f.viewers), (0, 0), "{id}");
    }
    assert!(
        accepted.iter().any(|(_, n)| n.errors > 0),
        "no server saw the NATS outage"
    );
    assert_eq!(snap.applied, total, "deployment total");
    let live = &snap.streams["live"];
    assert_eq!((live.joins, live.leaves, live.viewers), (6, 6, 0));
    let joins: Vec<u64> = ids.iter().map(|id| figures[*id].joins).collect();
    assert_eq!(joins, [1, 2, 3]);
    assert_eq!(
        snap.ignored.unknown_viewer, 0,
        "every event found its viewer"
    );
    assert!(
        stats.received >= total,
        "the restarted aggregator replayed the whole stream"
    );
    let _ = promtool(&agg.metrics_text());
    agg_task.abort();
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// What JetStream's duplicate window cannot catch, the aggregator does: a copy of an event
/// stored twice (resent after the window), events stored out of their order, and messages
/// that are not quicast events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aggregator_applies_each_event_once_in_order_and_skips_junk() {
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    // The stream as a server creates it, with a window short enough to outlive here.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "QUICAST_dup".into(),
        subjects: vec!["quicast.dup.events.>".into()],
        duplicate_window: Duration::from_millis(100),
        ..Default::default()
    })
    .await
    .unwrap();
    let publish = |id: Option<&str>, body: String| {
        let js = js.clone();
        let id = id.map(str::to_owned);
        async move {
            let mut msg = async_nats::jetstream::message::PublishMessage::build()
                .payload(body.into_bytes().into());
            if let Some(id) = id {
                msg = msg.message_id(id);
            }
            js.send_publish("quicast.dup.events.live", msg)
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    let line = |kind: &str| {
        format!(
            r#"{{"server":"x","unix_ms":1764700000000,"at_ms":1000,"viewer":1,"stream":"live","kind":{kind}}}"#
        )
    };
    let join = line(r#"{"type":"join","agent":"t"}"#);
    publish(Some("x:1:1"), join.clone()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Resent after the window: JetStream stores a second copy.
    let ack = publish(Some("x:1:1"), join.clone()).await;
    assert!(!ack.duplicate, "the window had passed: stored twice");
    // 3 is stored before 2.
    publish(Some("x:1:3"), line(r#"{"type":"resume"}"#)).await;
    publish(Some("x:1:2"), line(r#"{"type":"stall"}"#)).await;
    publish(None, join.clone()).await;
    publish(Some("x:1:5"), "not json".into()).await;
    publish(Some("y:1:1"), join.clone()).await; // body says server x
    publish(Some("x:1:4"), line(r#"{"type":"leave","reason":"bye"}"#)).await;
    // A restart of server x: a new run, viewer ids from 1 again.
    publish(Some("x:2:1"), join.clone()).await;

    let mut config = NatsAggregatorConfig::new(nats.url(), "dup").unwrap();
    config.durable("check").unwrap();
    let agg = NatsAggregator::new(config);
    let task = tokio::spawn(agg.run());
    until("all received", Duration::from_secs(10), || {
        agg.stats().received == 9
    })
    .await;
    task.abort();
    let x = &agg.servers()["x"];
    println!("server x: {x:?}");
    assert_eq!(
        x.applied, 5,
        "join, stall, resume, leave, and the new run's join"
    );
    assert_eq!(x.duplicates, 1, "the second copy of x:1:1");
    assert_eq!((x.joins, x.viewers, x.runs, x.gaps), (2, 1, 2, 0));
    assert!(!agg.servers().contains_key("y"));
    let snap = agg.snapshot();
    let live = &snap.streams["live"];
    assert_eq!(
        (live.joins, live.leaves, live.viewers, live.stalls),
        (2, 1, 1, 1)
    );
    assert_eq!(
        snap.ignored.unknown_viewer, 0,
        "the stall came after its join"
    );
    let text = agg.metrics_text();
    assert!(
        text.lines()
            .any(|l| l == "quicast_deployment_events_malformed_total 3.0"),
        "{text}"
    );
}

/// With NATS unreachable, the server's own analytics go on untouched, the outbox stays at
/// its limit, and every event is accounted for: buffered, or dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_nats_buffers_to_its_limit_and_counts_the_rest() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let srv = TestServer::start(|c| {
        c.report_interval(Duration::from_millis(100));
        c.nats(Some(format!("nats://127.0.0.1:{port}")), "gone")
            .unwrap();
        c.nats_buffer(5);
    });
    let mut p = srv.server.publish("live", None).unwrap();
    let feed = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for seq in 0..75 {
            tick.tick().await;
            p.send(block(0, seq, 2_000), seq % 25 == 0).unwrap();
        }
        p.finish();
    });
    let sub = srv.viewer(srv.client_config("live"), 0.0, 0).await.unwrap();
    let got = collect(sub, Duration::from_secs(10)).await;
    assert!(got.ended);
    feed.await.unwrap();
    let server = srv.server.clone();
    let mid = server.nats_stats().unwrap();
    assert_eq!(mid.buffered, 5, "the outbox holds its limit: {mid:?}");
    srv.stop().await;
    let stats = server.stats();
    let n = server.nats_stats().unwrap();
    println!(
        "{} events applied locally; NATS: {n:?}",
        stats.events_applied
    );
    assert_eq!(stats.events_dropped, 0, "the local pipeline never waited");
    assert!(stats.events_applied > 10, "{stats:?}");
    assert_eq!(n.published, 0);
    assert!(!n.connected);
    assert_eq!(
        n.buffered + n.dropped_queue_full + n.dropped_buffer_full + n.dropped_unsent,
        stats.events_applied,
        "every event accounted for"
    );
    assert_eq!(n.dropped_unsent, 5, "the outbox, given up at shutdown");
}

/// GET /metrics over plain HTTP/1.1; `None` until something answers.
async fn get_metrics(addr: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    Some(out.split_once("\r\n\r\n")?.1.to_string())
}

/// The example binaries as a user runs them: `server --nats --deployment --server-id`,
/// a `client`, and `aggregator`, whose `/metrics` shows the viewer under its server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_and_aggregator_examples_show_the_viewer_by_server() {
    use crate::procs::{example, free_udp_port, Guard};
    let Some(nats) = NatsServer::start() else {
        return;
    };
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let server = Guard(
        Command::new(example("server"))
            .args(["--listen", &addr, "--nats", &nats.url()])
            .args(["--deployment", "ex", "--server-id", "edge-1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn server example"),
    );
    let metrics = format!(
        "127.0.0.1:{}",
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    );
    let aggregator = Guard(
        Command::new(example("aggregator"))
            .args(["--nats", &nats.url(), "--deployment", "ex"])
            .args(["--metrics", &metrics, "--every", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn aggregator example"),
    );
    // The server may still be starting: the client retries within its own budget.
    let mut client = None;
    for _ in 0..50 {
        let mut c = Command::new(example("client"))
            .args(["--server", &addr, "--duration", "3"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn client example");
        tokio::time::sleep(Duration::from_millis(300)).await;
        if c.try_wait().unwrap().is_none() {
            client = Some(Guard(c));
            break;
        }
    }
    let mut client = client.expect("client connects");
    let wanted = "quicast_server_viewers{server=\"edge-1\"} 1.0";
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        if let Some(body) = get_metrics(&metrics).await {
            if body.lines().any(|l| l == wanted) {
                break body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {wanted:?} from the aggregator"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = promtool(&body);
    let status = tokio::task::block_in_place(|| client.0.wait().unwrap());
    assert!(status.success(), "client exited with {status}");
    // The client left: its Leave reaches the aggregator too.
    let gone = "quicast_server_viewers{server=\"edge-1\"} 0.0";
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let body = get_metrics(&metrics).await.unwrap_or_default();
        if body.lines().any(|l| l == gone) {
            assert!(
                body.lines()
                    .any(|l| l == "quicast_server_joins_total{server=\"edge-1\"} 1.0"),
                "{body}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no {gone:?}:\n{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((aggregator, server));
}
