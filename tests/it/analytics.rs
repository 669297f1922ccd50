//! Viewer analytics on the server: metrics, the parity decision loop, the event log.

use std::time::Duration;

use quicast::Event;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::util::{collect, promtool, publish, seed, TestServer, PACE};

/// One HTTP/1.1 request, `Connection: close`; the whole response.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("response within 5 s")
        .unwrap();
    out
}

async fn get_metrics(addr: std::net::SocketAddr) -> String {
    let out = http_get(addr, "/metrics").await;
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(
        head.to_ascii_lowercase().contains(&format!(
            "content-type: {}",
            quicast::analytics::CONTENT_TYPE
        )),
        "{head}"
    );
    body.to_string()
}

async fn wait_for_metric(addr: std::net::SocketAddr, line: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = get_metrics(addr).await;
        if body.lines().any(|l| l == line) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no line {line:?} in:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_viewer_and_pass_promtool() {
    let srv = TestServer::start(|c| {
        c.report_interval(Duration::from_millis(100));
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // The server example's own endpoint (examples/common/metrics.rs).
    let server = srv.server.clone();
    let metrics = tokio::spawn(crate::examples::common::metrics::serve(
        listener,
        move || server.metrics_text(),
    ));
    let publisher = srv.server.publish("live", None).unwrap();
    let pub_task = tokio::spawn(publish(publisher, 1, 100, PACE));

    let mut viewer = srv.viewer(srv.client_config("live"), 0.0, 0).await.unwrap();
    // Watch for a while, so reports flow.
    for _ in 0..20 {
        match viewer.next().await {
            Some(Ok(Event::Block { .. })) => {}
            other => panic!("{other:?}"),
        }
    }
    let body = wait_for_metric(addr, r#"quicast_viewers{stream="live"} 1"#).await;
    if let Some(problems) = promtool(&body) {
        assert_eq!(problems.trim(), "", "promtool: {problems}\n{body}");
    }
    assert!(body.contains("quicast_datagrams_sent_total"), "{body}");
    viewer.close();
    drop(viewer);
    assert!(
        body.contains(r#"quicast_qoe_score{stream="live"}"#),
        "{body}"
    );
    let body = wait_for_metric(addr, r#"quicast_viewers{stream="live"} 0"#).await;
    if let Some(problems) = promtool(&body) {
        assert_eq!(problems.trim(), "", "promtool: {problems}");
    }
    // No viewer, no score: absent, not a 0 that reads as quality collapsing.
    assert!(!body.contains("quicast_qoe_score{"), "{body}");
    // The endpoint's text is the library's.
    assert!(srv
        .server
        .metrics_text()
        .contains("# TYPE quicast_qoe_score gauge"));
    // Only /metrics is served.
    let out = http_get(addr, "/other").await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    pub_task.abort();
    metrics.abort();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossier_viewer_gets_more_parity_and_both_stay_on_time() {
    let seed = seed();
    let srv = TestServer::start(|c| {
        c.report_interval(Duration::from_millis(200));
    });
    let publisher = srv.server.publish("live", None).unwrap();
    let mut config = srv.client_config("live");
    config.latency(Duration::from_millis(150));
    let low = srv.viewer(config.clone(), 0.01, seed).await.unwrap();
    let high = srv.viewer(config, 0.10, seed ^ 1).await.unwrap();
    let n = 480; // about 10 s
    let pub_task = tokio::spawn(publish(publisher, 1, n, PACE));
    let (low, high) = tokio::join!(
        tokio::spawn(async move {
            let mut low = low;
            // Read the summary while still connected: after the end the
            // server forgets the viewer.
            let mut parity = None;
            let r = tokio::time::timeout(Duration::from_secs(30), async {
                let mut blocks = 0u64;
                while let Some(Ok(ev)) = low.next().await {
                    match ev {
                        Event::Block { .. } => blocks += 1,
                        Event::End => break,
                        _ => {}
                    }
                    parity = low.summary().map(|s| s.parity).or(parity);
                }
                blocks
            })
            .await;
            (r, parity, low.stats())
        }),
        tokio::spawn(async move {
            let mut high = high;
            let mut parity = None;
            let r = tokio::time::timeout(Duration::from_secs(30), async {
                let mut blocks = 0u64;
                while let Some(Ok(ev)) = high.next().await {
                    match ev {
                        Event::Block { .. } => blocks += 1,
                        Event::End => break,
                        _ => {}
                    }
                    parity = high.summary().map(|s| s.parity).or(parity);
                }
                blocks
            })
            .await;
            (r, parity, high.stats())
        })
    );
    pub_task.await.unwrap();
    let (low_blocks, low_parity, low_stats) = low.unwrap();
    let (high_blocks, high_parity, high_stats) = high.unwrap();
    let (low_parity, high_parity) = (low_parity.unwrap(), high_parity.unwrap());
    println!("parity at 1%: {low_parity}, at 10%: {high_parity}");
    println!("1%: {low_stats:?}\n10%: {high_stats:?}");
    assert!(
        high_parity > low_parity,
        "seed {seed}: 10% loss got {high_parity} parity, 1% got {low_parity}"
    );
    for (name, blocks, stats) in [
        ("1%", low_blocks, &low_stats),
        ("10%", high_blocks, &high_stats),
    ] {
        let blocks = blocks.unwrap_or(0);
        assert!(
            blocks as f64 >= 0.995 * n as f64,
            "seed {seed}: viewer at {name} got {blocks} of {n} blocks on time ({stats:?})"
        );
    }
    assert!(
        high_stats.blocks_recovered > low_stats.blocks_recovered,
        "seed {seed}"
    );
    // On loopback a 150 ms budget leaves time for two repair rounds, so at 1%
    // nothing should be lost. The client once judged repairs without an RTT
    // until its timer happened to fire, which a steady stream never lets it
    // do: the first short block of every viewer was lost unasked.
    assert_eq!(
        low_stats.blocks_lost, 0,
        "seed {seed}: a block lost at 1% loss with repair ({low_stats:?})"
    );
    assert!(
        low_stats.repairs_asked > 0,
        "seed {seed}: never asked for repair"
    );
    // The snapshot shows the choice too.
    let snap = srv.server.analytics();
    assert!(snap.overall.joins >= 2, "{snap:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_applies_and_logs_every_accepted_event() {
    let log = std::env::temp_dir().join(format!("quicast-events-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let path = log.clone();
    let srv = TestServer::start(move |c| {
        c.report_interval(Duration::from_millis(50))
            .event_log(Some(path));
    });
    let publisher = srv.server.publish("live", None).unwrap();
    let pub_task = tokio::spawn(publish(publisher, 1, 1_000, PACE));
    let mut viewers = Vec::new();
    for _ in 0..3 {
        viewers.push(srv.viewer(srv.client_config("live"), 0.0, 0).await.unwrap());
    }
    for v in &viewers {
        assert!(v.send_event("quality", "720p"));
    }
    let watching: Vec<_> = viewers
        .into_iter()
        .map(|v| tokio::spawn(collect(v, Duration::from_millis(1500))))
        .collect();
    // Shut down while the viewers are still watching and reporting.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    srv.server.shutdown(Duration::from_secs(3)).await;
    let stats = srv.server.stats();
    for w in watching {
        let _ = w.await;
    }
    pub_task.abort();
    let lines = std::fs::read_to_string(&log).unwrap().lines().count() as u64;
    println!("{stats:?}");
    assert!(
        stats.events_accepted >= 3 * 10,
        "too few events to mean anything: {stats:?}"
    );
    assert_eq!(stats.events_accepted, stats.events_applied, "{stats:?}");
    assert_eq!(stats.events_applied, lines, "{stats:?}");
    assert_eq!(stats.events_logged, lines);
    // Every viewer that joined also left.
    let snap = srv.server.analytics();
    assert_eq!(snap.overall.joins, 3);
    assert_eq!(snap.overall.viewers, 0, "{snap:?}");
    let _ = std::fs::remove_file(&log);
    srv.stop().await;
}
