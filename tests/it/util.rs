//! Shared test setup: an in-memory certificate, servers and viewers on loopback.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use quicast::{
    config::FecConfig,
    sim::{Impairment, LinkConfig, LossModel},
    Client, ClientConfig, Event, Identity, Server, ServerConfig, Subscription,
};
use rustls_pki_types::CertificateDer;

/// A fresh self-signed certificate, and the server identity using it.
pub fn identity() -> (CertificateDer<'static>, Identity) {
    quicast::net::tls::self_signed_identity().expect("rcgen")
}

pub struct TestServer {
    pub server: Server,
    pub cert: CertificateDer<'static>,
    driver: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub fn start(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
        let (cert, identity) = identity();
        let mut config = ServerConfig::new(identity);
        config.listen("127.0.0.1:0".parse().unwrap());
        tweak(&mut config);
        let server = Server::bind(config).expect("bind");
        let driver = tokio::spawn(server.run());
        TestServer {
            server,
            cert,
            driver,
        }
    }

    pub fn client_config(&self, stream: &str) -> ClientConfig {
        let mut c = ClientConfig::new(self.server.local_addr().unwrap(), stream);
        c.add_root(self.cert.clone());
        c
    }

    /// A viewer whose socket drops inbound packets with probability `loss`.
    pub async fn viewer(
        &self,
        config: ClientConfig,
        loss: f64,
        seed: u64,
    ) -> Result<Subscription, quicast::ClientError> {
        let socket: Option<Arc<dyn quinn::AsyncUdpSocket>> = if loss > 0.0 {
            let mut inbound = LinkConfig::default();
            inbound.loss(LossModel::iid(loss).unwrap());
            Some(
                quicast::sim::bind(
                    "127.0.0.1:0".parse().unwrap(),
                    Impairment {
                        inbound,
                        outbound: LinkConfig::default(),
                        seed,
                    },
                )
                .unwrap(),
            )
        } else {
            None
        };
        let endpoint = Client::endpoint(self.server.local_addr().unwrap(), socket)?;
        Client::connect_with(&endpoint, config).await
    }

    pub async fn stop(self) {
        self.server.shutdown(Duration::from_secs(1)).await;
        self.driver.abort();
    }
}

pub fn fec(redundancy: f64) -> FecConfig {
    let mut f = FecConfig::default();
    f.set_redundancy(redundancy).unwrap();
    f
}

pub struct Collected {
    pub blocks: Vec<(u64, Bytes)>,
    pub lost: Vec<u64>,
    pub ended: bool,
    pub stats: quicast::ReceiverStats,
}

/// Collects a viewer's events until End, an error, or `limit`.
pub async fn collect(mut sub: Subscription, limit: Duration) -> Collected {
    let mut blocks = Vec::new();
    let mut lost = Vec::new();
    let mut ended = false;
    let _ = tokio::time::timeout(limit, async {
        while let Some(ev) = sub.next().await {
            match ev {
                Ok(Event::Block { seq, data, .. }) => blocks.push((seq, data)),
                Ok(Event::Lost { seq }) => lost.push(seq),
                Ok(Event::End) => {
                    ended = true;
                    break;
                }
                Ok(_) => {}
                Err(e) => panic!("viewer failed: {e}"),
            }
        }
    })
    .await;
    Collected {
        blocks,
        lost,
        ended,
        stats: sub.stats(),
    }
}

/// Bytes per test block: 112 MPEG-TS packets, 20 shards of about 1050 bytes.
pub const BLOCK: usize = 188 * 112;

/// Publishes `n` blocks tagged `tag` (see [`block`]) every `interval`, a sync
/// point every 25, then ends the stream.
pub async fn publish(mut p: quicast::Publisher, tag: u8, n: u64, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    for seq in 0..n {
        tick.tick().await;
        p.send(block(tag, seq, BLOCK), seq % 25 == 0).unwrap();
    }
    p.finish();
}

/// About 8 Mbit/s of [`BLOCK`]s.
pub const PACE: Duration = Duration::from_millis(21);

/// Deterministic block content: stream tag, sequence, then a pattern.
pub fn block(tag: u8, seq: u64, len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len);
    v.push(tag);
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend((9..len).map(|i| (i as u64 * 31 + seq * 7 + u64::from(tag)) as u8));
    v.truncate(len);
    Bytes::from(v)
}

/// A seed for this run, printed so a failure can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("QUICAST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed {seed} (replay with QUICAST_SEED={seed})");
    seed
}

/// `promtool check metrics` on `text`; None when promtool is not installed
/// (CI installs it, and there its absence fails the test).
pub fn promtool(text: &str) -> Option<String> {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(_) if std::env::var_os("CI").is_none() => {
            eprintln!("promtool not installed: format check skipped (apt-get install prometheus)");
            return None;
        }
        Err(e) => panic!("promtool is required in CI: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "promtool failed: {out:?}");
    Some(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}
