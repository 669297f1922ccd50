//! Server and viewers through the library API, on loopback.

use std::time::Duration;

use quicast::{ClientError, CloseCode};

use crate::util::{block, collect, fec, publish, seed, Collected, TestServer, BLOCK};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_percent_loss_is_recovered_by_fec() {
    let seed = seed();
    let srv = TestServer::start(|c| {
        c.fec(fec(0.5));
    });
    let publisher = srv.server.publish("live", None).unwrap();
    let mut config = srv.client_config("live");
    config.latency(Duration::from_millis(150));
    let viewer = srv.viewer(config, 0.05, seed).await.unwrap();
    let n = 300;
    let pub_task = tokio::spawn(publish(publisher, 1, n, Duration::from_millis(10)));
    let Collected {
        blocks,
        lost,
        ended,
        stats,
    } = collect(viewer, Duration::from_secs(30)).await;
    pub_task.await.unwrap();
    println!("{stats:?}");
    assert!(ended, "seed {seed}: stream did not end");
    assert!(
        stats.blocks_recovered > 0,
        "seed {seed}: nothing recovered by FEC at 5% loss"
    );
    assert!(
        blocks.len() as f64 >= 0.99 * n as f64,
        "seed {seed}: delivered {} of {n} (lost {:?})",
        blocks.len(),
        lost
    );
    // Every delivered block is the one sent, in order.
    for w in blocks.windows(2) {
        assert!(w[0].0 < w[1].0, "seed {seed}: out of order");
    }
    for (seq, data) in &blocks {
        assert_eq!(
            data,
            &block(1, *seq, BLOCK),
            "seed {seed}: block {seq} corrupted"
        );
    }
    assert_eq!(
        blocks.len() + lost.len(),
        n as usize,
        "seed {seed}: every block has one outcome"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_viewers_receive_the_same_bytes() {
    let srv = TestServer::start(|_| {});
    let publisher = srv.server.publish("live", None).unwrap();
    let mut viewers = Vec::new();
    for _ in 0..3 {
        viewers.push(srv.viewer(srv.client_config("live"), 0.0, 0).await.unwrap());
    }
    let n = 100;
    let pub_task = tokio::spawn(publish(publisher, 7, n, Duration::from_millis(5)));
    let tasks: Vec<_> = viewers
        .into_iter()
        .map(|v| tokio::spawn(collect(v, Duration::from_secs(20))))
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    pub_task.await.unwrap();
    for r in &results {
        assert!(r.ended);
        assert!(
            r.lost.is_empty(),
            "no loss configured, yet lost {:?}",
            r.lost
        );
        assert_eq!(r.blocks.len(), n as usize);
    }
    assert_eq!(results[0].blocks, results[1].blocks);
    assert_eq!(results[1].blocks, results[2].blocks);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_never_mix() {
    let srv = TestServer::start(|_| {});
    let a = srv.server.publish("a", None).unwrap();
    let b = srv.server.publish("b", None).unwrap();
    let va = srv.viewer(srv.client_config("a"), 0.0, 0).await.unwrap();
    let vb = srv.viewer(srv.client_config("b"), 0.0, 0).await.unwrap();
    let ta = tokio::spawn(publish(a, 0xa, 60, Duration::from_millis(5)));
    let tb = tokio::spawn(publish(b, 0xb, 40, Duration::from_millis(7)));
    let (ra, rb) = tokio::join!(
        collect(va, Duration::from_secs(20)),
        collect(vb, Duration::from_secs(20))
    );
    ta.await.unwrap();
    tb.await.unwrap();
    assert_eq!(ra.blocks.len(), 60);
    assert_eq!(rb.blocks.len(), 40);
    assert!(ra
        .blocks
        .iter()
        .all(|(seq, d)| d == &block(0xa, *seq, BLOCK)));
    assert!(rb
        .blocks
        .iter()
        .all(|(seq, d)| d == &block(0xb, *seq, BLOCK)));
    assert_eq!(ra.stats.wrong_stream + rb.stats.wrong_stream, 0);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_stream_is_rejected_with_a_reason() {
    let srv = TestServer::start(|_| {});
    let _live = srv.server.publish("live", None).unwrap();
    let err = srv
        .viewer(srv.client_config("nope"), 0.0, 0)
        .await
        .unwrap_err();
    match &err {
        ClientError::Rejected { code, reason } => {
            assert_eq!(*code, CloseCode::NoSuchStream);
            assert!(reason.contains("nope"), "reason names the stream: {reason}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(srv.server.stats().viewers_rejected, 1);
    // The server still serves the stream that exists.
    assert!(srv.viewer(srv.client_config("live"), 0.0, 0).await.is_ok());
    srv.stop().await;
}

/// With no parity sent up front, only repair on request can save a block: at
/// 5% loss it must, and without repair the same path loses blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_on_request_recovers_what_no_parity_covered() {
    let seed = seed();
    let mut delivered = Vec::new();
    for repair in [true, false] {
        let srv = TestServer::start(|c| {
            c.fec(fec(0.5))
                .parity(quicast::Parity::Fixed(0))
                .repair(repair);
        });
        let publisher = srv.server.publish("live", None).unwrap();
        let mut config = srv.client_config("live");
        config.latency(Duration::from_millis(200));
        let viewer = srv.viewer(config, 0.05, seed).await.unwrap();
        let n = 200;
        let pub_task = tokio::spawn(publish(publisher, 1, n, Duration::from_millis(10)));
        let Collected { blocks, stats, .. } = collect(viewer, Duration::from_secs(30)).await;
        pub_task.await.unwrap();
        let server = srv.server.stats();
        println!("repair {repair}: {stats:?}\n{server:?}");
        if repair {
            assert!(
                blocks.len() as f64 >= 0.99 * n as f64,
                "seed {seed}: delivered {} of {n} with repair",
                blocks.len()
            );
            assert!(stats.blocks_repaired > 0, "seed {seed}: {stats:?}");
            assert!(
                server.repairs_answered > 0 && server.repair_shards > 0,
                "seed {seed}"
            );
        } else {
            assert_eq!(server.repair_shards, 0, "seed {seed}");
        }
        delivered.push(blocks.len());
        srv.stop().await;
    }
    assert!(
        delivered[1] < delivered[0],
        "seed {seed}: repair made no difference: {delivered:?}"
    );
}

/// Blocks far above one burst cross a clean path whole: the sender paces
/// them into quinn's buffer instead of handing over one burst that overflows
/// it (with one burst, 4 of 4 100 KB blocks were lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_blocks_cross_a_clean_path_intact() {
    let srv = TestServer::start(|_| {});
    let mut publisher = srv.server.publish("live", None).unwrap();
    let mut config = srv.client_config("live");
    config.latency(Duration::from_secs(2));
    let viewer = srv.viewer(config, 0.0, 0).await.unwrap();
    // 100 KB blocks every 40 ms (20 Mbit/s), then 1 MB blocks every 400 ms.
    let sizes: Vec<usize> = std::iter::repeat_n(100_000, 10)
        .chain(std::iter::repeat_n(1_000_000, 4))
        .collect();
    let plan = sizes.clone();
    let pub_task = tokio::spawn(async move {
        for (seq, len) in plan.into_iter().enumerate() {
            publisher.send(block(3, seq as u64, len), seq == 0).unwrap();
            let pause = if len > 100_000 { 400 } else { 40 };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        publisher.finish();
    });
    let r = collect(viewer, Duration::from_secs(30)).await;
    pub_task.await.unwrap();
    let st = &r.stats;
    let got: Vec<u64> = r.blocks.iter().map(|(s, _)| *s).collect();
    println!(
        "delivered {got:?}, lost {:?}, late {}, repaired {}, ended {}",
        r.lost, st.blocks_late, st.blocks_repaired, r.ended
    );
    assert!(r.ended, "stream did not end");
    assert!(r.lost.is_empty(), "lost {:?} on a clean path", r.lost);
    // Every block the receiver counted reached the app (a block taken
    // alongside a stall change used to be dropped between the two).
    assert_eq!(got.len() as u64, st.blocks_delivered);
    assert_eq!(got, (0..sizes.len() as u64).collect::<Vec<_>>());
    for ((seq, data), &len) in r.blocks.iter().zip(&sizes) {
        assert_eq!(data.len(), len, "block {seq}");
        assert_eq!(data, &block(3, *seq, len), "block {seq} corrupted");
    }
    srv.stop().await;
}
