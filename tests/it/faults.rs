//! Faults: server restart, blackout, dead server, shutdown, connection storm.

use std::{sync::Arc, time::Duration};

use quicast::{
    sim::{Impairment, LinkConfig, LossModel, LossySocket},
    Client, ClientError, CloseCode, Event, Identity, Server, ServerConfig,
};

use crate::util::{block, identity, publish, TestServer, BLOCK, PACE};

/// The viewer's first error, within `limit`; panics if it ends without one.
async fn next_error(viewer: &mut quicast::Subscription, limit: Duration) -> ClientError {
    tokio::time::timeout(limit, async {
        loop {
            match viewer.next().await {
                Some(Err(e)) => return e,
                None => panic!("ended without an error"),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("an error within the limit")
}

fn lossy(addr: &str) -> Arc<LossySocket> {
    quicast::sim::bind(
        addr.parse().unwrap(),
        Impairment::symmetric(LinkConfig::default(), 1),
    )
    .unwrap()
}

fn cut(socket: &LossySocket, cut: bool) {
    let mut link = LinkConfig::default();
    if cut {
        link.loss(LossModel::iid(1.0).unwrap());
    }
    socket.set_inbound(link.clone());
    socket.set_outbound(link);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_reconnects_after_a_server_restart_and_resumes_live() {
    let (cert, identity) = identity();
    let start = |identity: Identity, addr: std::net::SocketAddr| {
        let mut c = ServerConfig::new(identity);
        c.listen(addr);
        Server::bind(c).unwrap()
    };
    let first = start(identity.clone(), "127.0.0.1:0".parse().unwrap());
    let addr = first.local_addr().unwrap();
    let driver = tokio::spawn(first.run());
    let pub_task = tokio::spawn(publish(
        first.publish("live", None).unwrap(),
        1,
        10_000,
        PACE,
    ));

    let mut config = quicast::ClientConfig::new(addr, "live");
    config
        .add_root(cert)
        .reconnect(Some(Duration::from_secs(10)));
    let mut viewer = Client::connect(config).await.unwrap();
    let mut before = 0;
    while before < 20 {
        match viewer.next().await {
            Some(Ok(Event::Block { data, seq, .. })) => {
                assert_eq!(data, block(1, seq, BLOCK));
                before += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    // Restart: the first server says Goodbye and goes away; a new one takes
    // the same address with a new stream clock and sequence numbers.
    first.shutdown(Duration::from_secs(1)).await;
    pub_task.abort();
    driver.abort();
    drop(first);
    // quinn releases the old socket once its endpoint driver has wound down;
    // a restarted process would find the port free at once.
    let second = {
        let mut tries = 0;
        loop {
            let mut c = ServerConfig::new(identity.clone());
            c.listen(addr);
            match Server::bind(c) {
                Ok(s) => break s,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("could not rebind {addr}: {e}"),
            }
        }
    };
    let driver = tokio::spawn(second.run());
    let pub_task = tokio::spawn(publish(
        second.publish("live", None).unwrap(),
        2,
        10_000,
        PACE,
    ));

    let result = tokio::time::timeout(Duration::from_secs(15), async {
        let mut reconnected = None;
        let mut after = 0;
        while after < 20 {
            match viewer.next().await {
                Some(Ok(Event::Reconnected { attempts, .. })) => reconnected = Some(attempts),
                Some(Ok(Event::Block { data, seq, .. })) if reconnected.is_some() => {
                    assert_eq!(
                        data,
                        block(2, seq, BLOCK),
                        "blocks come from the new server"
                    );
                    after += 1;
                }
                Some(Ok(_)) => {}
                other => panic!("viewer ended instead of reconnecting: {other:?}"),
            }
        }
        reconnected
    })
    .await
    .expect("viewer resumed within 15 s");
    assert!(result.is_some());
    assert!(viewer.stats().blocks_delivered >= 40);
    pub_task.abort();
    second.shutdown(Duration::from_secs(1)).await;
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_second_blackout_is_a_stall_then_recovery() {
    let srv = TestServer::start(|c| {
        c.report_interval(Duration::from_millis(200));
    });
    let pub_task = tokio::spawn(publish(
        srv.server.publish("live", None).unwrap(),
        3,
        10_000,
        PACE,
    ));
    let socket = lossy("127.0.0.1:0");
    let endpoint =
        Client::endpoint(srv.server.local_addr().unwrap(), Some(socket.clone())).unwrap();
    let mut config = srv.client_config("live");
    config.latency(Duration::from_millis(100));
    let mut viewer = Client::connect_with(&endpoint, config).await.unwrap();
    let mut seen = 0;
    while seen < 30 {
        if let Some(Ok(Event::Block { .. })) = viewer.next().await {
            seen += 1;
        }
    }
    cut(&socket, true);
    let outage = tokio::time::Instant::now();
    // Keep polling through the outage: deadlines expire, the stall is noticed.
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while let Some(ev) = viewer.next().await {
            assert!(
                ev.is_ok(),
                "a 3 s outage must not end the subscription: {ev:?}"
            );
        }
    })
    .await;
    cut(&socket, false);
    let delivered_at_restore = viewer.stats().blocks_delivered;
    let recovered = tokio::time::timeout(Duration::from_secs(10), async {
        let mut after = 0;
        while after < 30 {
            match viewer.next().await {
                Some(Ok(Event::Block { .. })) => after += 1,
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    })
    .await;
    assert!(
        recovered.is_ok(),
        "no recovery within 10 s of the path coming back"
    );
    let stats = viewer.stats();
    println!("{stats:?} outage {:?}", outage.elapsed());
    assert!(stats.stalls >= 1, "the outage must show as a stall");
    assert!(
        stats.stalled >= Duration::from_secs(2),
        "stalled only {:?}",
        stats.stalled
    );
    // 3 s is past the viewer's 2 s idle timeout: it reconnects, and the
    // blocks of the outage are missed (never seen) or lost, never late.
    assert!(
        stats.blocks_lost + viewer.blocks_missed() > 50,
        "blocks during the outage are lost or missed, not late-delivered"
    );
    assert!(stats.blocks_delivered >= delivered_at_restore + 30);
    // The server heard about it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let snap = srv.server.analytics();
        if snap.overall.stalls >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server saw no stall: {snap:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pub_task.abort();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_detects_a_dead_server() {
    let srv = TestServer::start(|c| {
        c.idle_timeout(Duration::from_secs(1))
            .keep_alive(Duration::from_millis(250));
    });
    let pub_task = tokio::spawn(publish(
        srv.server.publish("live", None).unwrap(),
        4,
        10_000,
        PACE,
    ));
    let socket = lossy("127.0.0.1:0");
    let endpoint =
        Client::endpoint(srv.server.local_addr().unwrap(), Some(socket.clone())).unwrap();
    let mut config = srv.client_config("live");
    config
        .idle_timeout(Duration::from_secs(1))
        .keep_alive(Duration::from_millis(250))
        .reconnect(None);
    let mut viewer = Client::connect_with(&endpoint, config).await.unwrap();
    assert!(matches!(viewer.next().await, Some(Ok(_))));
    // The server falls silent for good.
    cut(&socket, true);
    let dead = tokio::time::Instant::now();
    let err = next_error(&mut viewer, Duration::from_secs(5)).await;
    let took = dead.elapsed();
    assert!(
        matches!(
            err,
            ClientError::Connection(quinn::ConnectionError::TimedOut)
        ),
        "{err:?}"
    );
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(3),
        "{took:?}"
    );
    pub_task.abort();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_says_goodbye_to_viewers() {
    let srv = TestServer::start(|_| {});
    let pub_task = tokio::spawn(publish(
        srv.server.publish("live", None).unwrap(),
        5,
        10_000,
        PACE,
    ));
    let mut config = srv.client_config("live");
    config.reconnect(None);
    let mut viewer = srv.viewer(config, 0.0, 0).await.unwrap();
    assert!(matches!(viewer.next().await, Some(Ok(_))));
    let server = srv.server.clone();
    let shutdown = tokio::spawn(async move { server.shutdown(Duration::from_secs(2)).await });
    let err = next_error(&mut viewer, Duration::from_secs(5)).await;
    match err {
        ClientError::Goodbye { code, reason } => {
            assert_eq!(code, CloseCode::Shutdown);
            assert!(reason.contains("shutting down"), "{reason}");
        }
        other => panic!("expected Goodbye, got {other:?}"),
    }
    shutdown.await.unwrap();
    pub_task.abort();
    srv.stop().await;
}

/// With the default config a viewer notices a dead server in about 2 s (its
/// idle timeout), not the 10 s it once took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_viewer_notices_a_dead_server_in_about_two_seconds() {
    let srv = TestServer::start(|_| {});
    let pub_task = tokio::spawn(publish(
        srv.server.publish("live", None).unwrap(),
        6,
        10_000,
        PACE,
    ));
    let socket = lossy("127.0.0.1:0");
    let endpoint =
        Client::endpoint(srv.server.local_addr().unwrap(), Some(socket.clone())).unwrap();
    let mut config = srv.client_config("live");
    config.reconnect(None);
    let mut viewer = Client::connect_with(&endpoint, config).await.unwrap();
    assert!(matches!(viewer.next().await, Some(Ok(_))));
    cut(&socket, true);
    let dead = tokio::time::Instant::now();
    let err = next_error(&mut viewer, Duration::from_secs(8)).await;
    let took = dead.elapsed();
    println!("dead server noticed after {took:?}: {err}");
    assert!(
        matches!(
            err,
            ClientError::Connection(quinn::ConnectionError::TimedOut)
        ),
        "{err:?}"
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(3500),
        "{took:?}"
    );
    pub_task.abort();
    srv.stop().await;
}

/// After an outage long enough to lose the connection, the viewer's own
/// figures show it: one reconnect, and the blocks published meanwhile as
/// missed, so delivered + lost + missed accounts for every block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_shows_the_reconnect_and_the_missed_blocks() {
    let srv = TestServer::start(|_| {});
    let pub_task = tokio::spawn(publish(
        srv.server.publish("live", None).unwrap(),
        7,
        10_000,
        PACE,
    ));
    let socket = lossy("127.0.0.1:0");
    let endpoint =
        Client::endpoint(srv.server.local_addr().unwrap(), Some(socket.clone())).unwrap();
    let mut config = srv.client_config("live");
    config.latency(Duration::from_millis(300));
    let mut viewer = Client::connect_with(&endpoint, config).await.unwrap();
    let (mut first, mut last) = (None, 0);
    let mut note = |seq: u64| {
        first.get_or_insert(seq);
        last = seq;
    };
    let mut seen = 0;
    while seen < 30 {
        match viewer.next().await {
            Some(Ok(Event::Block { seq, .. })) => {
                note(seq);
                seen += 1;
            }
            Some(Ok(Event::Lost { seq })) => note(seq),
            other => assert!(matches!(other, Some(Ok(_))), "{other:?}"),
        }
    }
    cut(&socket, true);
    let _ = tokio::time::timeout(Duration::from_secs(4), async {
        while let Some(ev) = viewer.next().await {
            assert!(ev.is_ok(), "{ev:?}");
        }
    })
    .await;
    cut(&socket, false);
    let mut reconnected = None;
    let resumed = tokio::time::timeout(Duration::from_secs(15), async {
        let mut after = 0;
        while after < 30 {
            match viewer.next().await {
                Some(Ok(Event::Reconnected { attempts, missed })) => {
                    reconnected = Some((attempts, missed))
                }
                Some(Ok(Event::Block { seq, .. })) => {
                    note(seq);
                    after += 1;
                }
                Some(Ok(Event::Lost { seq })) => note(seq),
                Some(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        }
    })
    .await;
    assert!(resumed.is_ok(), "no recovery after the path came back");
    let stats = viewer.stats();
    let (missed, reconnects) = (viewer.blocks_missed(), viewer.reconnects());
    println!(
        "reconnected {reconnected:?}; {reconnects} reconnect(s), {missed} missed, {} delivered, {} lost, seqs {first:?}..={last}",
        stats.blocks_delivered, stats.blocks_lost
    );
    let (_, event_missed) = reconnected.expect("an Event::Reconnected");
    assert_eq!(reconnects, 1);
    assert_eq!(event_missed, missed);
    // About 4 s of blocks at 21 ms each; some of them are lost, not missed.
    assert!(missed > 100, "missed {missed}");
    let outcomes = stats.blocks_delivered + stats.blocks_lost + missed;
    let range = last - first.unwrap() + 1;
    assert!(
        outcomes.abs_diff(range) <= 2,
        "every block has one outcome: {outcomes} for {range} blocks"
    );
    pub_task.abort();
    srv.stop().await;
}
