//! A connection storm against one server, in its own test binary: it loads
//! both cores with handshakes, and would otherwise starve the latency-sensitive
//! tests that `cargo test` runs beside it.

#[path = "it/util.rs"]
#[allow(dead_code)]
mod util;

use std::{sync::Arc, time::Duration};

use quicast::{ClientError, CloseCode};

use util::{publish, TestServer, PACE};

/// Resident memory of this process, from /proc (Linux).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_storm_leaves_good_viewers_alone() {
    const STORM: usize = 200;
    const LIMIT: usize = 32;
    let srv = TestServer::start(|c| {
        c.max_connections(LIMIT)
            .hello_timeout(Duration::from_millis(500));
    });
    let publisher = srv.server.publish("live", None).unwrap();
    // Attackers, server and viewers share this process's two cores here, and
    // every handshake costs both sides public-key crypto: the viewers get a
    // budget that rides out the CPU spikes, as a real player's buffer would.
    let mut config = srv.client_config("live");
    config.latency(Duration::from_secs(1));
    let mut good = Vec::new();
    for _ in 0..2 {
        good.push(srv.viewer(config.clone(), 0.0, 0).await.unwrap());
    }
    let n = 150; // about 3 s
    let pub_task = tokio::spawn(publish(publisher, 6, n, PACE));
    let watching: Vec<_> = good
        .into_iter()
        .map(|v| tokio::spawn(util::collect(v, Duration::from_secs(20))))
        .collect();
    let rss_before = rss_bytes();

    // Many handshakes at once that never say Hello, from one endpoint.
    let (cert, _) = (srv.cert.clone(), ());
    let addr = srv.server.local_addr().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"quicast/1".to_vec()];
    let client_config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let storm = tokio::time::timeout(Duration::from_secs(15), async {
        let mut attempts = tokio::task::JoinSet::new();
        for _ in 0..STORM {
            let connecting = endpoint
                .connect_with(client_config.clone(), addr, "localhost")
                .unwrap();
            attempts.spawn(async move {
                match tokio::time::timeout(Duration::from_secs(5), connecting).await {
                    // Hold the connection without a Hello until the server drops it.
                    Ok(Ok(conn)) => {
                        let _ = tokio::time::timeout(Duration::from_secs(3), conn.closed()).await;
                        true
                    }
                    _ => false,
                }
            });
        }
        let mut handshakes = 0;
        while let Some(r) = attempts.join_next().await {
            handshakes += usize::from(r.unwrap());
        }
        handshakes
    })
    .await
    .expect("the storm finishes in bounded time");
    let stats = srv.server.stats();
    println!("storm: {storm} handshakes completed, {stats:?}");
    assert!(
        stats.connections_refused > 0,
        "the limit of {LIMIT} must refuse some of {STORM}"
    );
    assert!(stats.connections_accepted <= (STORM + 2) as u64);
    for w in watching {
        let r = w.await.unwrap();
        assert!(r.ended, "good viewer kept its stream to the end");
        assert!(
            r.blocks.len() as f64 >= 0.98 * n as f64,
            "good viewer got {} of {n} blocks (lost {:?})",
            r.blocks.len(),
            r.lost
        );
    }
    if let (Some(before), Some(after)) = (rss_before, rss_bytes()) {
        let grown = after.saturating_sub(before);
        assert!(grown < 200 << 20, "memory grew by {} MB", grown >> 20);
    }
    // Still responsive: a new viewer is served after the storm.
    assert!(srv
        .viewer(srv.client_config("live"), 0.0, 0)
        .await
        .is_err_and(|e| matches!(
            e,
            ClientError::Rejected {
                code: CloseCode::NoSuchStream,
                ..
            }
        )));
    pub_task.abort();
    srv.stop().await;
}
