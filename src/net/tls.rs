//! TLS 1.3 for QUIC through rustls (ring provider), and dev certificates from rcgen.
//!
//! Verification is always on: the client trusts exactly the roots it is given.
//! There is no switch that turns certificate checks off.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::cc::{FlooredFactory, RateFloor};
use crate::{
    config::{CongestionControl, Identity},
    TlsError,
};

/// ALPN protocol id of quicast version 1.
pub const ALPN: &[u8] = b"quicast/1";

/// File name of the dev certificate (certificate and key, PEM) inside its directory.
pub const DEV_CERT_FILE: &str = "dev.pem";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn pem_err(path: &Path, e: rustls_pki_types::pem::Error) -> TlsError {
    match e {
        rustls_pki_types::pem::Error::Io(source) => TlsError::Io {
            path: path.to_owned(),
            source,
        },
        other => TlsError::Pem(format!("{}: {other:?}", path.display())),
    }
}

/// Every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Empty(path.to_owned()));
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::Empty(path.to_owned()),
        e => pem_err(path, e),
    })
}

/// Path of the dev certificate in `dir`.
pub fn dev_cert_path(dir: &Path) -> PathBuf {
    dir.join(DEV_CERT_FILE)
}

/// Loads the dev certificate from `dir`, generating it first if it is missing.
///
/// The certificate is self-signed for `localhost`, `127.0.0.1` and `::1`. It is
/// written once, atomically (written to a temporary file, then hard-linked into
/// place, which fails if another process won the race; then the winner's file is
/// read), so concurrent first runs agree on one certificate.
pub fn dev_certificate(
    dir: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let path = dev_cert_path(dir);
    if !path.exists() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])?;
        let pem = format!("{}{}", ck.cert.pem(), ck.signing_key.serialize_pem());
        let tmp = dir.join(format!(".{DEV_CERT_FILE}.{}.tmp", std::process::id()));
        write_private(&tmp, pem.as_bytes())?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => tracing::info!(path = %path.display(), "generated dev certificate"),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    Ok((load_certs(&path)?, load_key(&path)?))
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))
}

/// A fresh in-memory self-signed certificate for `localhost`, `127.0.0.1`, `::1`.
///
/// For tests and single-process demos that should not touch the file system.
pub fn self_signed() -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
    let ck = rcgen::generate_simple_self_signed(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])?;
    let key = PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der());
    Ok((ck.cert.der().clone(), key.into()))
}

/// [`self_signed`] as a server [`Identity`], with the certificate a client
/// must trust; for tests, benchmarks and single-process demos.
pub fn self_signed_identity() -> Result<(CertificateDer<'static>, Identity), TlsError> {
    let ck = rcgen::generate_simple_self_signed(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])?;
    let cert = ck.cert.der().clone();
    Ok((
        cert.clone(),
        Identity::Der {
            certs: vec![cert],
            key: Arc::new(ck.signing_key.serialize_der()),
        },
    ))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Resolves an [`Identity`] to a certificate chain and key.
pub(crate) fn identity(
    identity: &Identity,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    match identity {
        Identity::Files { cert, key } => Ok((load_certs(cert)?, load_key(key)?)),
        Identity::DevCertificate { dir } => dev_certificate(dir),
        Identity::Der { certs, key } => Ok((
            certs.clone(),
            PrivatePkcs8KeyDer::from(key.as_slice().to_vec()).into(),
        )),
    }
}

/// rustls server config for QUIC: TLS 1.3 only, ALPN `quicast/1`.
pub(crate) fn server_crypto(identity: &Identity) -> Result<QuicServerConfig, TlsError> {
    let (certs, key) = self::identity(identity)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))
}

/// rustls client config for QUIC trusting exactly `roots`.
pub(crate) fn client_crypto(
    roots: &[CertificateDer<'static>],
) -> Result<QuicClientConfig, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for cert in roots {
        store.add(cert.clone())?;
    }
    if store.is_empty() {
        return Err(TlsError::Quic("no trusted root certificate given".into()));
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(store)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))
}

/// The one place quicast sets quinn's `TransportConfig`.
///
/// Datagrams are enabled with the given receive buffer (None: refuse datagrams,
/// as the server does: viewers have no reason to send any) and send buffer. The
/// congestion controller is a media decision; see [`CongestionControl`]. Its
/// window never falls below `floor` (see [`RateFloor`]); `None`, as on a
/// viewer that sends control traffic only, leaves the controller alone.
pub(crate) fn transport(
    cc: CongestionControl,
    floor: Option<Arc<RateFloor>>,
    idle: Duration,
    keep_alive: Duration,
    datagram_receive: Option<usize>,
    datagram_send: usize,
) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok())
        .keep_alive_interval(Some(keep_alive))
        .datagram_receive_buffer_size(datagram_receive)
        .datagram_send_buffer_size(datagram_send)
        // One control stream per connection; refuse the rest.
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into());
    install_congestion(&mut t, cc, floor);
    Arc::new(t)
}

/// Installs controller `cc` with a window that starts at, and never falls
/// below, a constant `min_window` bytes (0: the controller's own behaviour).
///
/// Public so that benchmarks and apps that build their own quinn endpoints can
/// use the same controllers quicast uses. quicast's own server uses a floor
/// that follows the stream's rate instead (see `ServerConfig::min_window`).
pub fn set_congestion(t: &mut quinn::TransportConfig, cc: CongestionControl, min_window: u64) {
    install_congestion(t, cc, Some(Arc::new(RateFloor::fixed(min_window))));
}

fn install_congestion(
    t: &mut quinn::TransportConfig,
    cc: CongestionControl,
    floor: Option<Arc<RateFloor>>,
) {
    use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
    fn floored<F: quinn::congestion::ControllerFactory + Send + Sync + 'static>(
        t: &mut quinn::TransportConfig,
        mut inner: F,
        initial_window: impl FnOnce(&mut F, u64),
        floor: Option<Arc<RateFloor>>,
    ) {
        match floor {
            Some(floor) => {
                // A zero floor leaves the controller's own initial window alone.
                if floor.initial() > 0 {
                    initial_window(&mut inner, floor.initial());
                }
                t.congestion_controller_factory(Arc::new(FlooredFactory {
                    inner: Arc::new(inner),
                    floor,
                }));
            }
            None => {
                t.congestion_controller_factory(Arc::new(inner));
            }
        }
    }
    match cc {
        CongestionControl::Bbr => floored(
            t,
            BbrConfig::default(),
            |c, w| {
                c.initial_window(w);
            },
            floor,
        ),
        CongestionControl::Cubic => floored(
            t,
            CubicConfig::default(),
            |c, w| {
                c.initial_window(w);
            },
            floor,
        ),
        CongestionControl::NewReno => floored(
            t,
            NewRenoConfig::default(),
            |c, w| {
                c.initial_window(w);
            },
            floor,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certificate_is_generated_once_and_reused() {
        let dir = std::env::temp_dir().join(format!("quicast-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, _) = dev_certificate(&dir).unwrap();
        let (b, _) = dev_certificate(&dir).unwrap();
        assert_eq!(a, b, "second call must reuse the file");
        assert_eq!(load_certs(&dev_cert_path(&dir)).unwrap(), a);
        // The client side accepts it as a root; an empty root set is refused.
        assert!(client_crypto(&a).is_ok());
        assert!(client_crypto(&[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
