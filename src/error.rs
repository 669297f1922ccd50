//! Errors of the public API, and the one mapping from errors to QUIC close codes.

use crate::wire::DecodeError;

/// Application close codes, sent in QUIC `CONNECTION_CLOSE` frames and in
/// `Reject`/`Goodbye` messages. This enum is the only place they are defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseCode {
    /// Orderly close: the stream ended or a side left on purpose.
    Normal,
    /// The peer broke the control protocol (bad frame, message out of order).
    ProtocolViolation,
    /// A control frame exceeded the size cap.
    FrameTooLarge,
    /// The Hello named a protocol version this server does not speak.
    UnsupportedVersion,
    /// The token was wrong or missing.
    Unauthorized,
    /// The requested stream does not exist (or has ended).
    NoSuchStream,
    /// The server is at its connection limit.
    ServerFull,
    /// The peer sent control messages faster than allowed.
    RateLimited,
    /// The server is shutting down.
    Shutdown,
    /// The peer did not send Hello in time.
    HelloTimeout,
    /// The path cannot carry datagrams of the configured shard size.
    DatagramsUnsupported,
    /// The viewer's control stream did not take the server's messages in
    /// time (it withheld flow-control credit).
    ControlStalled,
    /// The stream's publisher failed (its input broke, or it was dropped
    /// without [`Publisher::finish`](crate::Publisher::finish)): the stream
    /// did not end normally.
    PublisherFailed,
}

impl CloseCode {
    /// The numeric code on the wire.
    pub const fn code(self) -> u64 {
        match self {
            CloseCode::Normal => 0x0,
            CloseCode::ProtocolViolation => 0x1,
            CloseCode::FrameTooLarge => 0x2,
            CloseCode::UnsupportedVersion => 0x3,
            CloseCode::Unauthorized => 0x4,
            CloseCode::NoSuchStream => 0x5,
            CloseCode::ServerFull => 0x6,
            CloseCode::RateLimited => 0x7,
            CloseCode::Shutdown => 0x8,
            CloseCode::HelloTimeout => 0x9,
            CloseCode::DatagramsUnsupported => 0xa,
            CloseCode::ControlStalled => 0xb,
            CloseCode::PublisherFailed => 0xc,
        }
    }

    /// The code for a numeric value, if known.
    pub fn from_code(code: u64) -> Option<Self> {
        use CloseCode::*;
        [
            Normal,
            ProtocolViolation,
            FrameTooLarge,
            UnsupportedVersion,
            Unauthorized,
            NoSuchStream,
            ServerFull,
            RateLimited,
            Shutdown,
            HelloTimeout,
            DatagramsUnsupported,
            ControlStalled,
            PublisherFailed,
        ]
        .into_iter()
        .find(|c| c.code() == code)
    }

    /// The code as a QUIC varint for `Connection::close`.
    pub fn varint(self) -> quinn::VarInt {
        quinn::VarInt::from_u32(self.code() as u32)
    }

    /// Short stable name, used in logs and metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::ProtocolViolation => "protocol_violation",
            CloseCode::FrameTooLarge => "frame_too_large",
            CloseCode::UnsupportedVersion => "unsupported_version",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::NoSuchStream => "no_such_stream",
            CloseCode::ServerFull => "server_full",
            CloseCode::RateLimited => "rate_limited",
            CloseCode::Shutdown => "shutdown",
            CloseCode::HelloTimeout => "hello_timeout",
            CloseCode::DatagramsUnsupported => "datagrams_unsupported",
            CloseCode::ControlStalled => "control_stalled",
            CloseCode::PublisherFailed => "publisher_failed",
        }
    }

    /// The close code a control-frame decode error earns.
    pub fn for_decode_error(e: &DecodeError) -> Self {
        match e {
            DecodeError::TooLong("control frame") => CloseCode::FrameTooLarge,
            DecodeError::Version(_) => CloseCode::UnsupportedVersion,
            _ => CloseCode::ProtocolViolation,
        }
    }
}

impl std::fmt::Display for CloseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:#x})", self.name(), self.code())
    }
}

/// Errors from TLS and certificate setup.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// Reading or writing a certificate or key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A PEM file held no usable certificate or key.
    #[error("{0}: no certificate or private key found")]
    Empty(std::path::PathBuf),
    /// The PEM could not be parsed.
    #[error("invalid PEM: {0}")]
    Pem(String),
    /// rcgen could not generate a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// rustls' config is not usable for QUIC (e.g. missing TLS 1.3).
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

/// Errors of the [`Server`](crate::Server).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    // As in `ClientError`: the io error is in the message, not also
    // `source()`, so a report walking the chain says it once.
    /// Binding the UDP socket or creating the endpoint failed.
    #[error("bind: {0}")]
    Bind(std::io::Error),
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A stream with this name is already published.
    #[error("stream {0:?} already exists")]
    StreamExists(String),
    /// The server's stream limit is reached.
    #[error("stream limit of {0} reached")]
    TooManyStreams(usize),
    /// The stream name is empty or too long.
    #[error("invalid stream name {0:?}")]
    InvalidStreamName(String),
    /// FEC encoding of a block failed (e.g. it is too large).
    #[error(transparent)]
    Fec(#[from] crate::fec::FecError),
}

/// Errors of the [`Client`](crate::Client) and its [`Subscription`](crate::Subscription).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    // The wrapped errors are in the message, not also `source()`: a report
    // that walks the chain (`{:#}`) would print each reason twice.
    /// Creating the local endpoint failed.
    #[error("bind: {0}")]
    Bind(std::io::Error),
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The connection could not be started (bad address or server name).
    #[error("connect: {0}")]
    Connect(quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("connection: {0}")]
    Connection(quinn::ConnectionError),
    /// The server refused the subscription.
    #[error("rejected by server: {reason} [{code}]")]
    Rejected {
        /// Why, as a close code.
        code: CloseCode,
        /// The server's words.
        reason: String,
    },
    /// The server said goodbye.
    #[error("server closed the stream: {reason} [{code}]")]
    Goodbye {
        /// Why, as a close code.
        code: CloseCode,
        /// The server's words.
        reason: String,
    },
    /// The server broke the control protocol.
    #[error("protocol error from server: {0}")]
    Protocol(String),
    /// No Welcome arrived within the handshake timeout.
    #[error("timed out waiting for the server")]
    Timeout,
    /// The control stream failed.
    #[error("control stream: {0}")]
    Stream(String),
}

impl From<quinn::ConnectError> for ClientError {
    fn from(e: quinn::ConnectError) -> Self {
        ClientError::Connect(e)
    }
}

impl From<quinn::ConnectionError> for ClientError {
    fn from(e: quinn::ConnectionError) -> Self {
        ClientError::Connection(e)
    }
}

impl ClientError {
    pub(crate) fn from_code(code: u64, reason: String, rejected: bool) -> Self {
        let code = CloseCode::from_code(code).unwrap_or(CloseCode::ProtocolViolation);
        if rejected {
            ClientError::Rejected { code, reason }
        } else {
            ClientError::Goodbye { code, reason }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_say_each_reason_once() {
        let e = ClientError::from(quinn::ConnectionError::TimedOut);
        let chain = format!("{:#}", anyhow::Error::from(e));
        assert_eq!(chain, "connection: timed out");
        let e = ClientError::Bind(std::io::Error::other("port in use"));
        assert_eq!(format!("{:#}", anyhow::Error::from(e)), "bind: port in use");
    }

    #[test]
    fn close_codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in 0..32 {
            if let Some(c) = CloseCode::from_code(code) {
                assert_eq!(c.code(), code);
                assert!(seen.insert(c.name()));
            }
        }
        assert_eq!(seen.len(), 13);
        assert_eq!(
            CloseCode::for_decode_error(&DecodeError::TooLong("control frame")),
            CloseCode::FrameTooLarge
        );
    }
}
