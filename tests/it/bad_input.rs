//! The bad-input table: every malformed or hostile input, one test each.
//!
//! In every network test a good viewer watches the stream while a publisher
//! sends paced blocks and a raw attacker (a plain quinn client, TLS
//! verification on) misbehaves on its own connection. The test checks the
//! documented outcome for the attacker (counted and dropped, or closed with a
//! code and a reason), the server counter that records it, and that the good
//! viewer received every block, in order, byte for byte.
//!
//! Datagrams arriving at a viewer are tested at the pure level, through
//! `session::Receiver`, with bad datagrams in the middle of good blocks.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes, BytesMut};
use quicast::{
    fec::{Encoder, FecConfig},
    net::tls::ALPN,
    session::{Event, Receiver, ReceiverConfig},
    wire::{
        ControlMessage, Encode, Flags, Report, ShardHeader, VarInt, MAX_CONTROL_FRAME, VERSION,
    },
    ClientConfig, ClientError, CloseCode, Publisher, ServerConfig, ServerStats,
};
use quinn::crypto::rustls::QuicClientConfig;
use tokio::{sync::oneshot, task::JoinHandle};

use crate::util::{block, collect, Collected, TestServer};

const STREAM: &str = "live";
/// 20 TS packets: 4 data and 2 parity shards with the default FEC config.
const BLOCK: usize = 188 * 20;
const TAG: u8 = 0xba;
const INTERVAL: Duration = Duration::from_millis(20);
/// Generous: the good viewer must lose nothing even when tests share the CPU.
const LATENCY: Duration = Duration::from_secs(1);
/// Blocks published after the attack is over, before the stream ends.
const AFTER_ATTACK: u64 = 10;
/// Upper bound on blocks per test, whatever happens.
const MAX_BLOCKS: u64 = 1500;
/// Upper bound on any single wait.
const STEP: Duration = Duration::from_secs(10);
const TOKEN: &[u8] = b"s3cret";

/// `fut`, or a panic naming `what` after [`STEP`].
async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(STEP, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out: {what}"),
    }
}

// ---------------------------------------------------------------------------
// The scene: a server, a publisher and a good viewer.

struct Scene {
    srv: TestServer,
    stop: oneshot::Sender<()>,
    publisher: JoinHandle<u64>,
    viewer: JoinHandle<Collected>,
}

impl Scene {
    async fn start() -> Scene {
        Self::with(|_| {}, |_| {}).await
    }

    /// Starts the server, subscribes the good viewer, and returns once media
    /// is flowing.
    async fn with(
        server: impl FnOnce(&mut ServerConfig),
        viewer: impl FnOnce(&mut ClientConfig),
    ) -> Scene {
        let srv = TestServer::start(server);
        let publisher = srv.server.publish(STREAM, None).unwrap();
        let mut config = srv.client_config(STREAM);
        config.latency(LATENCY);
        viewer(&mut config);
        let sub = within("good viewer joins", srv.viewer(config, 0.0, 0))
            .await
            .expect("good viewer joins");
        let viewer = tokio::spawn(collect(sub, 2 * STEP));
        let (stop, stopped) = oneshot::channel();
        let publisher = tokio::spawn(publish(publisher, stopped));
        let scene = Scene {
            srv,
            stop,
            publisher,
            viewer,
        };
        scene
            .wait_for("media flowing", |s| s.blocks_published >= 3)
            .await;
        scene
    }

    fn stats(&self) -> ServerStats {
        self.srv.server.stats()
    }

    async fn wait_for(&self, what: &str, cond: impl Fn(&ServerStats) -> bool) {
        within(what, async {
            while !cond(&self.stats()) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    }

    /// Ends the stream after [`AFTER_ATTACK`] more blocks, checks that the
    /// good viewer got every block exactly, and returns the server's counters.
    async fn finish(self) -> ServerStats {
        let Scene {
            srv,
            stop,
            publisher,
            viewer,
        } = self;
        let _ = stop.send(());
        let n = within("publisher", publisher).await.expect("publisher");
        let got = within("good viewer", viewer).await.expect("good viewer");
        assert!(got.ended, "good viewer: stream did not end");
        assert!(
            got.lost.is_empty(),
            "good viewer lost blocks {:?}",
            got.lost
        );
        assert_eq!(got.blocks.len() as u64, n, "good viewer: blocks delivered");
        for (i, (seq, data)) in got.blocks.iter().enumerate() {
            assert_eq!(*seq, i as u64, "good viewer: out of order");
            assert!(
                data == &block(TAG, *seq, BLOCK),
                "good viewer: block {seq} corrupted"
            );
        }
        assert_eq!(
            (got.stats.malformed, got.stats.wrong_stream),
            (0, 0),
            "good viewer saw bad datagrams"
        );
        let stats = srv.server.stats();
        srv.stop().await;
        stats
    }
}

/// Publishes paced blocks until told to stop, then [`AFTER_ATTACK`] more, then
/// ends the stream. Returns the number of blocks.
async fn publish(mut p: Publisher, mut stop: oneshot::Receiver<()>) -> u64 {
    let mut tick = tokio::time::interval(INTERVAL);
    let mut left = None;
    let mut seq = 0;
    while seq < MAX_BLOCKS && left != Some(0) {
        tick.tick().await;
        p.send(block(TAG, seq, BLOCK), seq % 25 == 0).unwrap();
        seq += 1;
        left = match left {
            Some(n) => Some(n - 1),
            None => stop.try_recv().is_ok().then_some(AFTER_ATTACK),
        };
    }
    p.finish();
    seq
}

// ---------------------------------------------------------------------------
// The attacker: a raw quinn client that speaks bytes, not the protocol.

struct Attacker {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: BytesMut,
}

impl Attacker {
    /// Completes the QUIC handshake and opens the control stream (which the
    /// server sees only once something is written to it). Nothing is sent.
    async fn connect(srv: &TestServer) -> Attacker {
        Self::connect_tuned(srv, |_| {}).await
    }

    /// [`connect`](Self::connect) with the transport config changed by `tweak`.
    async fn connect_tuned(
        srv: &TestServer,
        tweak: impl FnOnce(&mut quinn::TransportConfig),
    ) -> Attacker {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(srv.cert.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut transport = quinn::TransportConfig::default();
        transport
            .datagram_receive_buffer_size(Some(1 << 20))
            .max_idle_timeout(Some(STEP.try_into().unwrap()));
        tweak(&mut transport);
        let mut config =
            quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap()));
        config.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = endpoint
            .connect_with(config, srv.server.local_addr().unwrap(), "localhost")
            .unwrap();
        let conn = within("attacker handshake", connecting)
            .await
            .expect("attacker handshake");
        let (send, recv) = within("open control stream", conn.open_bi()).await.unwrap();
        Attacker {
            _endpoint: endpoint,
            conn,
            send,
            recv,
            buf: BytesMut::new(),
        }
    }

    /// Connects, says a valid Hello and waits for Welcome: an admitted viewer.
    async fn join(srv: &TestServer) -> (Attacker, u32) {
        let mut a = Self::connect(srv).await;
        a.hello().await;
        let stream_id = a.welcome().await;
        (a, stream_id)
    }

    /// Writes raw bytes to the control stream. The server may close the
    /// connection meanwhile (often the point), so the result is returned.
    async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), quinn::WriteError> {
        within("control write", self.send.write_all(bytes)).await
    }

    async fn hello(&mut self) {
        self.write_raw(&frame(&hello())).await.expect("write hello");
    }

    /// The next control message from the server.
    async fn read(&mut self) -> ControlMessage {
        loop {
            let mut rd = &self.buf[..];
            if let Some(msg) =
                ControlMessage::decode_frame(&mut rd, MAX_CONTROL_FRAME).expect("server frame")
            {
                let used = self.buf.len() - rd.len();
                self.buf.advance(used);
                return msg;
            }
            let chunk = within("control read", self.recv.read_chunk(64 * 1024, true))
                .await
                .expect("control stream")
                .expect("control stream finished early");
            self.buf.extend_from_slice(&chunk.bytes);
        }
    }

    async fn welcome(&mut self) -> u32 {
        match self.read().await {
            ControlMessage::Welcome { stream_id, .. } => stream_id,
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    fn datagram(&self, dg: Bytes) {
        self.conn.send_datagram(dg).expect("send datagram");
    }

    /// Still connected and still served: a shard of a block published after
    /// this call arrives.
    async fn still_served(&self, scene: &Scene) {
        let from = scene.stats().blocks_published;
        within("attacker still served", async {
            loop {
                let dg = self.conn.read_datagram().await.expect("connection up");
                let (h, _) = ShardHeader::decode_datagram(&dg).expect("server sends valid shards");
                if h.seq >= from {
                    break;
                }
            }
        })
        .await;
        assert!(self.conn.close_reason().is_none());
    }

    /// Waits for the server to close the connection, and checks the close
    /// code and that the reason names the problem.
    async fn expect_close(&self, code: CloseCode, words: &[&str]) {
        let (got, reason) = match within("server closes", self.conn.closed()).await {
            quinn::ConnectionError::ApplicationClosed(c) => (
                c.error_code.into_inner(),
                String::from_utf8_lossy(&c.reason).into_owned(),
            ),
            other => panic!("expected an application close with {code}, got {other}"),
        };
        assert_eq!(
            CloseCode::from_code(got),
            Some(code),
            "close code {got:#x}, reason {reason:?}"
        );
        for w in words {
            assert!(
                reason.contains(w),
                "close reason {reason:?} does not name {w:?}"
            );
        }
    }

    fn leave(&self) {
        self.conn.close(0u32.into(), b"done");
    }
}

fn hello() -> ControlMessage {
    ControlMessage::Hello {
        version: VERSION,
        stream: STREAM.into(),
        token: Bytes::new(),
        agent: "attacker".into(),
        latency_ms: 200,
    }
}

fn frame(msg: &ControlMessage) -> Vec<u8> {
    let mut buf = Vec::new();
    msg.encode_frame(&mut buf);
    buf
}

/// A frame from raw parts: length prefix, type byte, body.
fn raw_frame(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    VarInt::write(1 + body.len() as u64, &mut buf);
    buf.push(ty);
    buf.extend_from_slice(body);
    buf
}

// ---------------------------------------------------------------------------
// Bad datagrams, made from the good datagrams of a real block so that
// everything but the flaw is realistic.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bad {
    /// Every cut inside the header: 1 ..= header length - 1 bytes.
    TruncatedHeader,
    /// Version bytes 0, 2 and 255.
    UnknownVersion,
    ZeroK,
    /// k + m = 257.
    KPlusMOver256,
    /// index = k + m and index = 255.
    IndexOutOfRange,
    /// Two shards of a block already begun, each valid alone: one with k + 1
    /// (and a payload size that makes k + 1 right for the block length), one
    /// with m + 1.
    KOrMChanges,
    /// block length = k × shard size + 1.
    BlockLongerThanShards,
    ZeroLength,
    /// A valid shard of another stream id.
    OtherStream,
}

/// The good datagrams of block `seq` (one code group, data shards first).
fn good_block(encoder: &mut Encoder, seq: u64) -> Vec<Bytes> {
    let ts = (seq * INTERVAL.as_micros() as u64) as u32;
    encoder
        .encode(seq, ts, Flags::empty(), &block(TAG, seq, BLOCK))
        .unwrap()
        .datagrams()
        .to_vec()
}

fn with_header(h: ShardHeader, payload: &[u8]) -> Bytes {
    let mut v = Vec::new();
    h.encode(&mut v);
    v.extend_from_slice(payload);
    v.into()
}

/// The datagrams of kind `bad` for the block whose good datagrams are `good`.
fn corrupt(bad: Bad, good: &[Bytes]) -> Vec<Bytes> {
    let template = &good[1];
    let (h, payload) = ShardHeader::decode_datagram(template).unwrap();
    assert_eq!(h.groups, 1, "fixtures assume one code group");
    let dgs = match bad {
        Bad::TruncatedHeader => (1..h.encoded_len()).map(|n| template.slice(..n)).collect(),
        Bad::UnknownVersion => [0u8, VERSION + 1, 0xff]
            .into_iter()
            .map(|v| {
                let mut d = template.to_vec();
                d[0] = v;
                Bytes::from(d)
            })
            .collect(),
        Bad::ZeroK => vec![with_header(
            ShardHeader {
                k: 0,
                index: 0,
                ..h
            },
            &payload,
        )],
        Bad::KPlusMOver256 => {
            let m = (257 - usize::from(h.k)) as u8;
            vec![with_header(ShardHeader { m, ..h }, &payload)]
        }
        Bad::IndexOutOfRange => [h.k + h.m, 255]
            .into_iter()
            .map(|index| with_header(ShardHeader { index, ..h }, &payload))
            .collect(),
        Bad::KOrMChanges => {
            let k = h.k + 1;
            let size = (h.block_len as usize).div_ceil(usize::from(k));
            vec![
                with_header(ShardHeader { k, ..h }, &vec![0x5a; size]),
                with_header(ShardHeader { m: h.m + 1, ..h }, &payload),
            ]
        }
        Bad::BlockLongerThanShards => {
            let block_len = u32::from(h.k) * payload.len() as u32 + 1;
            vec![with_header(ShardHeader { block_len, ..h }, &payload)]
        }
        Bad::ZeroLength => vec![Bytes::new()],
        Bad::OtherStream => vec![with_header(
            ShardHeader {
                stream_id: h.stream_id + 1,
                ..h
            },
            &payload,
        )],
    };
    // The fixture is what it claims: only the block-level flaws and the
    // foreign shard pass the datagram decoder on their own.
    let valid_alone = matches!(bad, Bad::KOrMChanges | Bad::OtherStream);
    for dg in &dgs {
        assert_eq!(
            ShardHeader::decode_datagram(dg).is_ok(),
            valid_alone,
            "{bad:?} fixture {dg:?}"
        );
    }
    dgs
}

// ---------------------------------------------------------------------------
// Datagrams a viewer sends to the server: counted in
// `datagrams_from_viewers`, dropped; the connection stays up.

async fn datagram_to_server(bad: Bad) {
    let scene = Scene::start().await;
    let (a, stream_id) = Attacker::join(&scene.srv).await;
    let dgs = corrupt(
        bad,
        &good_block(&mut Encoder::new(stream_id, FecConfig::default()), 0),
    );
    let n = dgs.len() as u64;
    for dg in dgs {
        a.datagram(dg);
    }
    scene
        .wait_for("bad datagrams counted", |s| s.datagrams_from_viewers >= n)
        .await;
    a.still_served(&scene).await;
    a.leave();
    let stats = scene.finish().await;
    assert_eq!(stats.datagrams_from_viewers, n);
    assert_eq!((stats.control_errors, stats.viewers_rejected), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_to_server_truncated_header() {
    datagram_to_server(Bad::TruncatedHeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_to_server_unknown_version() {
    datagram_to_server(Bad::UnknownVersion).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_to_server_zero_k() {
    datagram_to_server(Bad::ZeroK).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_to_server_k_plus_m_over_256() {
    datagram_to_server(Bad::KPlusMOver256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_to_server_index_out_of_range() {
    datagram_to_server(Bad::IndexOutOfRange).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_to_server_k_or_m_changes_within_block() {
    datagram_to_server(Bad::KOrMChanges).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_to_server_block_longer_than_k_shards() {
    datagram_to_server(Bad::BlockLongerThanShards).await;
}

/// quinn sends an empty DATAGRAM frame as it is; it arrives and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_to_server_zero_length() {
    datagram_to_server(Bad::ZeroLength).await;
}

/// A datagram sent before Hello waits in quinn's receive buffer (16 KiB) and
/// is counted and dropped once the viewer is admitted, never before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_to_server_before_hello() {
    let scene = Scene::start().await;
    let mut a = Attacker::connect(&scene.srv).await;
    // A well-formed shard: viewers may not send even those.
    let dg = good_block(&mut Encoder::new(1, FecConfig::default()), 0).swap_remove(0);
    a.datagram(dg);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        scene.stats().datagrams_from_viewers,
        0,
        "counted before hello"
    );
    a.hello().await;
    a.welcome().await;
    scene
        .wait_for("datagram counted", |s| s.datagrams_from_viewers >= 1)
        .await;
    a.still_served(&scene).await;
    a.leave();
    let stats = scene.finish().await;
    assert_eq!(stats.datagrams_from_viewers, 1);
    assert_eq!((stats.control_errors, stats.viewers_rejected), (0, 0));
}

// ---------------------------------------------------------------------------
// The same datagrams arriving at a viewer: counted (`malformed`, or
// `wrong_stream`) and dropped; every good block is still delivered exactly.

fn datagram_to_viewer(bad: Bad) {
    const STREAM_ID: u32 = 7;
    const BLOCKS: u64 = 30;
    let t0 = Instant::now();
    let mut encoder = Encoder::new(STREAM_ID, FecConfig::default());
    let mut rx = Receiver::new(ReceiverConfig::new(STREAM_ID, Duration::from_millis(200)));
    rx.set_clock(0, t0);
    let (mut good_sent, mut bad_sent) = (0, 0);
    for seq in 0..BLOCKS {
        let good = good_block(&mut encoder, seq);
        let bad = corrupt(bad, &good);
        good_sent += good.len() as u64;
        bad_sent += bad.len() as u64;
        let now = t0 + INTERVAL * seq as u32 + Duration::from_millis(1);
        // The block's first shard, then the bad ones, then the rest.
        rx.handle_datagram(now, good[0].clone());
        for dg in bad {
            rx.handle_datagram(now, dg);
        }
        for dg in &good[1..] {
            rx.handle_datagram(now, dg.clone());
        }
    }
    rx.handle_timeout(t0 + Duration::from_secs(10));
    let events: Vec<Event> = std::iter::from_fn(|| rx.poll_event()).collect();
    assert_eq!(events.len() as u64, BLOCKS, "{bad:?}: {events:?}");
    for (i, ev) in events.iter().enumerate() {
        match ev {
            Event::Block { seq, data, .. } => {
                assert_eq!(*seq, i as u64, "{bad:?}: out of order");
                assert!(
                    data == &block(TAG, *seq, BLOCK),
                    "{bad:?}: block {seq} corrupted"
                );
            }
            other => panic!("{bad:?}: block {i}: {other:?}"),
        }
    }
    let st = rx.stats();
    let (malformed, wrong_stream) = if bad == Bad::OtherStream {
        (0, bad_sent)
    } else {
        (bad_sent, 0)
    };
    assert_eq!(
        (st.malformed, st.wrong_stream),
        (malformed, wrong_stream),
        "{bad:?}"
    );
    assert_eq!(st.datagrams, good_sent + bad_sent);
    // What the server compares with what it sent, to estimate path loss.
    assert_eq!(
        st.shards_received, good_sent,
        "{bad:?}: bad shards counted as received"
    );
    assert_eq!(
        (st.blocks_delivered, st.blocks_lost, st.blocks_recovered),
        (BLOCKS, 0, 0),
        "{bad:?}"
    );
    // Shards that contradict their block are refused by the decoder; the
    // rest never reach it.
    let inconsistent = if bad == Bad::KOrMChanges { bad_sent } else { 0 };
    assert_eq!(
        rx.decoder_stats().shards_inconsistent,
        inconsistent,
        "{bad:?}"
    );
}

#[test]
fn datagram_to_viewer_truncated_header() {
    datagram_to_viewer(Bad::TruncatedHeader);
}

#[test]
fn datagram_to_viewer_unknown_version() {
    datagram_to_viewer(Bad::UnknownVersion);
}

#[test]
fn datagram_to_viewer_zero_k() {
    datagram_to_viewer(Bad::ZeroK);
}

#[test]
fn datagram_to_viewer_k_plus_m_over_256() {
    datagram_to_viewer(Bad::KPlusMOver256);
}

#[test]
fn datagram_to_viewer_index_out_of_range() {
    datagram_to_viewer(Bad::IndexOutOfRange);
}

#[test]
fn datagram_to_viewer_k_or_m_changes_within_block() {
    datagram_to_viewer(Bad::KOrMChanges);
}

#[test]
fn datagram_to_viewer_block_longer_than_k_shards() {
    datagram_to_viewer(Bad::BlockLongerThanShards);
}

#[test]
fn datagram_to_viewer_zero_length() {
    datagram_to_viewer(Bad::ZeroLength);
}

#[test]
fn datagram_to_viewer_other_stream() {
    datagram_to_viewer(Bad::OtherStream);
}

// ---------------------------------------------------------------------------
// Control input: the connection is closed with the documented code and a
// reason naming the problem, and counted in `control_errors`.

/// Sends `input` on the control stream (after a valid Hello and Welcome when
/// `admitted`) and expects the server to close with `code`, giving a reason
/// that contains every one of `words`.
async fn bad_control(
    server: impl FnOnce(&mut ServerConfig),
    admitted: bool,
    input: Vec<u8>,
    code: CloseCode,
    words: &[&str],
) {
    let scene = Scene::with(server, |_| {}).await;
    let mut a = if admitted {
        Attacker::join(&scene.srv).await.0
    } else {
        Attacker::connect(&scene.srv).await
    };
    // The server may close the connection before all of it is written.
    let _ = a.write_raw(&input).await;
    a.expect_close(code, words).await;
    let stats = scene.finish().await;
    assert_eq!(stats.control_errors, 1);
    assert_eq!(
        (stats.viewers_rejected, stats.datagrams_from_viewers),
        (0, 0)
    );
}

/// Only the length prefix and the type byte: the server must refuse the frame
/// from its length, without waiting for the 16 KiB body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_frame_over_size_cap() {
    let mut input = Vec::new();
    VarInt::write(MAX_CONTROL_FRAME as u64 + 1, &mut input);
    input.push(0x07); // Event
    bad_control(
        |_| {},
        true,
        input,
        CloseCode::FrameTooLarge,
        &["control frame", "too long"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_unknown_message_type() {
    bad_control(
        |_| {},
        true,
        raw_frame(0x42, &[]),
        CloseCode::ProtocolViolation,
        &["unknown message type", "0x42"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_hello_stream_name_invalid_utf8() {
    // version, stream name (4 bytes, not UTF-8), empty token, empty agent.
    let body = [VERSION, 4, 0xff, 0xfe, 0x80, b'A', 0, 0];
    bad_control(
        |_| {},
        false,
        raw_frame(0x01, &body),
        CloseCode::ProtocolViolation,
        &["utf-8"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_hello_twice() {
    bad_control(
        |_| {},
        true,
        frame(&hello()),
        CloseCode::ProtocolViolation,
        &["unexpected hello"],
    )
    .await;
}

/// 10 messages/s allows a burst of 20; 200 reports at once exceed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_report_flood() {
    let report = frame(&ControlMessage::Report(Report::default()));
    bad_control(
        |c| {
            c.control_rate(10);
        },
        true,
        report.repeat(200),
        CloseCode::RateLimited,
        &["rate"],
    )
    .await;
}

// ---------------------------------------------------------------------------
// Access control: a server-wide token. A wrong or missing token is refused
// with Reject { unauthorized } and a reason; the right one is served.

async fn bad_token(token: Option<&'static [u8]>, words: &str) {
    let scene = Scene::with(
        |c| {
            c.token(Some(Bytes::from_static(TOKEN)));
        },
        |c| {
            c.token(Bytes::from_static(TOKEN));
        },
    )
    .await;
    let mut config = scene.srv.client_config(STREAM);
    if let Some(t) = token {
        config.token(Bytes::from_static(t));
    }
    match within("rejection", scene.srv.viewer(config, 0.0, 0)).await {
        Err(ClientError::Rejected { code, reason }) => {
            assert_eq!(code, CloseCode::Unauthorized, "reason {reason:?}");
            assert!(
                reason.contains(words),
                "reason {reason:?} should say {words:?}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    // Right after, a viewer with the right token is admitted and served.
    let mut config = scene.srv.client_config(STREAM);
    config.token(Bytes::from_static(TOKEN)).latency(LATENCY);
    let mut late = within("right token", scene.srv.viewer(config, 0.0, 0))
        .await
        .expect("right token admitted");
    within("late viewer served", async {
        loop {
            match late.next().await {
                Some(Ok(Event::Block { seq, data, .. })) => {
                    assert!(data == block(TAG, seq, BLOCK), "block {seq} corrupted");
                    break;
                }
                // It may join in the middle of a block, which it then loses.
                Some(Ok(Event::Lost { .. })) => {}
                other => panic!("late viewer: {other:?}"),
            }
        }
    })
    .await;
    drop(late);
    let stats = scene.finish().await;
    assert_eq!(stats.viewers_rejected, 1);
    assert_eq!(stats.control_errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_wrong() {
    bad_token(Some(b"s3cres"), "invalid token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_missing() {
    bad_token(None, "token required").await;
}

/// Behind a server-wide token, a stranger cannot probe for stream names: an
/// unknown stream without the token is `unauthorized`, not `no_such_stream`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_hides_which_streams_exist() {
    let srv = TestServer::start(|c| {
        c.token(Some(bytes::Bytes::from_static(b"let-me-in")));
    });
    let _live = srv.server.publish("live", None).unwrap();
    let err = srv
        .viewer(srv.client_config("secret"), 0.0, 0)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            quicast::ClientError::Rejected {
                code: CloseCode::Unauthorized,
                ..
            }
        ),
        "{err:?}"
    );
    let mut config = srv.client_config("secret");
    config.token("let-me-in");
    let err = srv.viewer(config, 0.0, 0).await.unwrap_err();
    assert!(
        matches!(
            err,
            quicast::ClientError::Rejected {
                code: CloseCode::NoSuchStream,
                ..
            }
        ),
        "an authorized viewer learns the stream is missing: {err:?}"
    );
    srv.stop().await;
}

// ---------------------------------------------------------------------------
// Limits: viewers that stall, connections that stay silent, a full server.

/// A viewer that never grants control-stream credit (a 64-byte stream window,
/// never read) while asking for Summaries: its control writer stalls, and it
/// is closed within the drain bound and counted; media to the good viewer is
/// untouched, and the stuck viewer's slot is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_credit_withheld() {
    const DRAIN: Duration = Duration::from_millis(500);
    let scene = Scene::with(
        |c| {
            c.control_drain(DRAIN)
                .report_interval(Duration::from_millis(100));
        },
        |_| {},
    )
    .await;
    let mut a = Attacker::connect_tuned(&scene.srv, |t| {
        t.stream_receive_window(64u32.into());
    })
    .await;
    a.hello().await;
    scene
        .wait_for("attacker admitted", |s| s.viewers == 2)
        .await;
    // Honest-looking reports, each answered with a Summary it never reads;
    // slowly enough that the drain bound, not the queue of 16, closes it.
    let conn = a.conn.clone();
    let reports = async {
        for _ in 0..40 {
            let _ = a
                .write_raw(&frame(&ControlMessage::Report(Report::default())))
                .await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let started = Instant::now();
    tokio::select! {
        _ = reports => panic!("stuck viewer was never closed"),
        _ = conn.closed() => {}
    }
    let took = started.elapsed();
    println!("stuck viewer closed after {took:?}");
    a.expect_close(
        CloseCode::ControlStalled,
        &["control", "drained within 500 ms"],
    )
    .await;
    // Summaries start after the first report; the window fills within two;
    // then one drain bound. Generous for a loaded machine, far below forever.
    assert!(took < DRAIN + Duration::from_secs(3), "took {took:?}");
    scene.wait_for("slot given back", |s| s.viewers == 1).await;
    let stats = scene.finish().await;
    assert_eq!(stats.viewers_stalled, 1);
    assert_eq!(stats.closed.get("control_stalled"), Some(&1));
}

/// The hello timeout runs once, from the end of the handshake: opening the
/// control stream late does not start it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_timeout_runs_once() {
    const HELLO: Duration = Duration::from_secs(1);
    let scene = Scene::with(
        |c| {
            c.hello_timeout(HELLO);
        },
        |_| {},
    )
    .await;
    let mut a = Attacker::connect(&scene.srv).await;
    let connected = Instant::now();
    tokio::time::sleep(HELLO * 7 / 10).await;
    // Half a frame: the stream is open, the Hello never completes.
    a.write_raw(&[5]).await.expect("write");
    a.expect_close(CloseCode::HelloTimeout, &["hello"]).await;
    let took = connected.elapsed();
    println!("closed {took:?} after the handshake (hello timeout {HELLO:?})");
    assert!(
        took < HELLO + HELLO * 4 / 10,
        "closed after {took:?}: the timeout restarted when the stream opened"
    );
    let stats = scene.finish().await;
    assert_eq!(stats.closed.get("hello_timeout"), Some(&1));
}

/// With every viewer slot taken, a new viewer is told `server_full` in the
/// documented code, once, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_full_is_answered_with_its_code() {
    let scene = Scene::with(
        |c| {
            c.max_connections(1);
        },
        |_| {},
    )
    .await;
    let err = within(
        "second viewer refused",
        scene.srv.viewer(scene.srv.client_config(STREAM), 0.0, 0),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Rejected {
                code: CloseCode::ServerFull,
                ..
            }
        ),
        "{err:?}"
    );
    let text = format!("{:#}", anyhow::Error::from(err));
    assert_eq!(text.matches("server full").count(), 1, "{text}");
    scene
        .wait_for("close counted", |s| s.refused_server_full == 1)
        .await;
    let metrics = scene.srv.server.metrics_text();
    for line in [
        "quicast_connections_closed_total{reason=\"server_full\"} 1",
        "quicast_connections_refused_by_total{reason=\"server_full\"} 1",
        "quicast_connections{state=\"viewer\"} 1",
        "quicast_connections{state=\"awaiting_hello\"} 0",
    ] {
        assert!(metrics.contains(line), "no {line:?} in\n{metrics}");
    }
    let stats = scene.finish().await;
    assert_eq!(stats.refused_server_full, 1);
    assert_eq!(stats.closed.get("server_full"), Some(&1));
}

/// A report with counters no real viewer can have (more blocks lost than
/// were ever published to it, stalls longer than it has been connected)
/// closes that connection as a protocol violation, is counted, and leaves the
/// stream's figures as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_impossible_counters() {
    let scene = Scene::start().await;
    type Lie = fn(&mut Report);
    let lies: [(&str, Lie); 3] = [
        ("blocks_lost", |r| r.blocks_lost = (1 << 62) - 1),
        ("stalls", |r| r.stalls = 1 << 40),
        ("stall_ms", |r| r.stall_ms = (1 << 62) - 1),
    ];
    for (i, (name, lie)) in lies.into_iter().enumerate() {
        let (mut a, _) = Attacker::join(&scene.srv).await;
        // An honest report first: the lie is not about counters going backwards.
        a.write_raw(&frame(&ControlMessage::Report(Report::default())))
            .await
            .expect("report");
        let mut r = Report::default();
        lie(&mut r);
        let _ = a.write_raw(&frame(&ControlMessage::Report(r))).await;
        a.expect_close(CloseCode::ProtocolViolation, &["impossible", "report"])
            .await;
        scene
            .wait_for(name, |s| s.reports_impossible == i as u64 + 1)
            .await;
    }
    // Let the aggregator apply whatever was queued, then read the figures.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let live = scene.srv.server.analytics().streams[STREAM].clone();
    assert_eq!(live.blocks_lost, 0, "{live:?}");
    assert_eq!(live.stalls, 0, "{live:?}");
    assert!(live.stall_seconds < 1.0, "{live:?}");
    assert!(live.loss_after_fec < 0.01, "{live:?}");
    let stats = scene.finish().await;
    assert_eq!(stats.reports_impossible, 3);
    assert_eq!(stats.closed.get("protocol_violation"), Some(&3));
}

/// App events of control characters, as many as the rate limit allows from
/// several viewers: each is logged in well under twice its size (not six
/// times), and the log stays within its rotation bound on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_log_is_compact_and_bounded() {
    const CAP: u64 = 64 * 1024;
    const KEEP: usize = 2;
    let dir = std::env::temp_dir().join(format!("quicast-it-log-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("events.jsonl");
    let path = log.clone();
    let scene = Scene::with(
        move |c| {
            c.event_log(Some(path)).event_log_rotation(CAP, KEEP);
        },
        |_| {},
    )
    .await;
    let nasty: String = (0..256).map(|i| char::from((i % 32) as u8)).collect();
    let event = frame(&ControlMessage::Event(quicast::wire::ClientEvent {
        name: nasty.clone(),
        value: nasty,
    }));
    let mut attackers = Vec::new();
    for _ in 0..5 {
        let (mut a, _) = Attacker::join(&scene.srv).await;
        // 90 at once: inside the default burst of 100.
        for _ in 0..90 {
            a.write_raw(&event).await.expect("event");
        }
        attackers.push(a);
    }
    scene
        .wait_for("events logged", |s| s.events_logged >= 5 * 90)
        .await;
    let stats = scene.finish().await;
    let mut total = 0;
    let mut longest = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        total += text.len() as u64;
        longest = longest.max(text.lines().map(str::len).max().unwrap_or(0));
    }
    println!(
        "{} events logged, {total} bytes on disk, longest line {longest} bytes",
        stats.events_logged
    );
    assert!(
        longest < 2 * 512 + 200,
        "a 512-byte event became a {longest}-byte line"
    );
    assert!(
        total <= CAP * (KEEP as u64 + 1),
        "{total} bytes on disk, over {CAP} x {}",
        KEEP + 1
    );
    assert!(dir.join("events.jsonl.1").exists(), "the log rotated");
    assert!(!dir.join("events.jsonl.3").exists(), "only {KEEP} kept");
    drop(attackers);
    let _ = std::fs::remove_dir_all(&dir);
}
