//! A small MLLP client: `siterelay send`, the load generator and the tests use it.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::sources::mllp::framing::{FrameEvent, Framer, encode};

/// An ACK received in answer to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckSummary {
    /// MSA-1, e.g. `AA`.
    pub code: String,
    /// MSA-2 (the control id acknowledged).
    pub control_id: String,
    /// MSA-3 text, if any.
    pub text: String,
    /// The whole ACK message.
    pub raw: Vec<u8>,
}

/// Client-side failure.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// No ACK within the timeout.
    #[error("no ACK within {0:?}")]
    Timeout(Duration),
    /// The peer closed the connection without answering.
    #[error("connection closed before an ACK arrived")]
    Closed,
    /// The answer had no MSA segment.
    #[error("the answer is not an HL7 ACK (no MSA segment)")]
    NotAnAck,
}

/// An MLLP connection that sends messages one at a time and reads each ACK.
pub struct MllpClient<S> {
    stream: S,
    framer: Framer,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> MllpClient<S> {
    /// Wrap a connected stream.
    pub fn new(stream: S) -> Self {
        MllpClient {
            stream,
            framer: Framer::new(16 * 1024 * 1024),
            buf: vec![0; 16 * 1024],
        }
    }

    /// Send one message (unframed HL7) and wait for its ACK.
    pub async fn send(
        &mut self,
        message: &[u8],
        timeout: Duration,
    ) -> Result<AckSummary, ClientError> {
        self.stream.write_all(&encode(message)).await?;
        self.stream.flush().await?;
        let ack = self.read_frame(timeout).await?;
        parse_ack(&ack)
    }

    /// Send a batch frame (`FHS`/`BHS` ... `BTS`/`FTS`) and wait for the batch acknowledgement;
    /// returns the acknowledgements it lists (only messages that were not accepted: empty means
    /// every message was).
    pub async fn send_batch(
        &mut self,
        batch: &[u8],
        timeout: Duration,
    ) -> Result<Vec<AckSummary>, ClientError> {
        self.stream.write_all(&encode(batch)).await?;
        self.stream.flush().await?;
        let ack = self.read_frame(timeout).await?;
        parse_batch_ack(&ack)
    }

    /// Write raw bytes (for tests of malformed framing).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Read the next complete frame.
    pub async fn read_frame(&mut self, timeout: Duration) -> Result<Vec<u8>, ClientError> {
        let fut = async {
            loop {
                while let Some(ev) = self.framer.next_event() {
                    if let FrameEvent::Message(m) = ev {
                        return Ok(m);
                    }
                }
                let n = self.stream.read(&mut self.buf).await?;
                if n == 0 {
                    return Err(ClientError::Closed);
                }
                self.framer.push(&self.buf[..n]);
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
    }

    /// Read until the peer closes; true if it closed within `timeout`.
    pub async fn closed_within(&mut self, timeout: Duration) -> bool {
        let fut = async {
            loop {
                match self.stream.read(&mut self.buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(timeout, fut).await.is_ok()
    }

    /// The underlying stream.
    pub fn into_inner(self) -> S {
        self.stream
    }
}

/// Read MSA-1..3 from an ACK (delimiters from its MSH).
pub fn parse_ack(ack: &[u8]) -> Result<AckSummary, ClientError> {
    let text = String::from_utf8_lossy(ack);
    let field_sep = if text.starts_with("MSH") && text.len() > 3 {
        text.as_bytes()[3] as char
    } else {
        '|'
    };
    let msa = text
        .split(['\r', '\n'])
        .find(|s| s.starts_with("MSA"))
        .ok_or(ClientError::NotAnAck)?;
    let fields: Vec<&str> = msa.split(field_sep).collect();
    // MSA-3 is HL7 text: decode its escapes (`\S\` for `^`...) with the ACK's own delimiters.
    let text = fields.get(3).copied().unwrap_or("");
    let text = match crate::hl7::header::parse_header(ack) {
        Ok(h) => crate::hl7::header::unescape(text, &h.delimiters),
        Err(_) => text.to_string(),
    };
    Ok(AckSummary {
        code: fields.get(1).copied().unwrap_or("").to_string(),
        control_id: fields.get(2).copied().unwrap_or("").to_string(),
        text,
        raw: ack.to_vec(),
    })
}

/// The acknowledgements listed in a batch acknowledgement (an `FHS`/`BHS` frame holding `ACK`
/// messages for the messages that were not accepted).
pub fn parse_batch_ack(frame: &[u8]) -> Result<Vec<AckSummary>, ClientError> {
    if !crate::hl7::batch::is_batch(frame) {
        // A batch refused as a whole is answered with a single ACK.
        return parse_ack(frame).map(|a| vec![a]);
    }
    let mut out = Vec::new();
    let mut cur: Option<Vec<u8>> = None;
    for line in frame.split(|&b| b == b'\r' || b == b'\n') {
        let id = line.get(..3).unwrap_or(line);
        if matches!(id, b"MSH" | b"BHS" | b"BTS" | b"FHS" | b"FTS")
            && let Some(m) = cur.take()
        {
            out.push(parse_ack(&m)?);
        }
        if id == b"MSH" {
            cur = Some(Vec::new());
        }
        if let Some(m) = cur.as_mut() {
            m.extend_from_slice(line);
            m.push(b'\r');
        }
    }
    if let Some(m) = cur {
        out.push(parse_ack(&m)?);
    }
    Ok(out)
}

/// Split a file's contents into HL7 messages: each starts at a line beginning with `MSH`.
/// Lines may end in CR, LF or CRLF; segments are re-joined with CR as HL7 requires. A batch file
/// (first segment `FHS` or `BHS`) stays whole: it is sent as one frame, as the batch protocol
/// says. Bytes already framed with MLLP (0x0B ... 0x1C 0x0D) are accepted too.
pub fn split_messages(content: &[u8]) -> Vec<Vec<u8>> {
    if content.contains(&0x0b) {
        let mut f = Framer::new(usize::MAX / 2);
        f.push(content);
        let mut out = Vec::new();
        while let Some(ev) = f.next_event() {
            if let FrameEvent::Message(m) = ev {
                out.push(m);
            }
        }
        return out;
    }
    let batch = crate::hl7::batch::is_batch(content);
    let mut out: Vec<Vec<u8>> = Vec::new();
    for line in content.split(|&b| b == b'\r' || b == b'\n') {
        if line.is_empty() {
            continue;
        }
        if (line.starts_with(b"MSH") && !batch) || out.is_empty() {
            out.push(Vec::new());
        }
        let cur = out.last_mut().expect("pushed above");
        cur.extend_from_slice(line);
        cur.push(b'\r');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_split_into_messages_at_each_msh_whatever_the_line_endings() {
        let file = b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.4\r\nPID|1\nMSH|^~\\&|A|B|C|D|20260101||ADT^A01|2|P|2.4\rPID|2\r\n\r\n";
        let msgs = split_messages(file);
        assert_eq!(msgs.len(), 2);
        assert_eq!(
            msgs[0],
            b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.4\rPID|1\r"
        );
        assert!(msgs[1].ends_with(b"PID|2\r"));
    }

    #[test]
    fn a_batch_file_stays_one_frame_and_its_ack_lists_the_refused_messages() {
        let file = b"BHS|^~\\&\nMSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.4\nPID|1\nMSH|^~\\&|A|B|C|D|20260101||ADT^A01|2|P|2.4\nBTS|2\n";
        let msgs = split_messages(file);
        assert_eq!(msgs.len(), 1);
        assert!(msgs[0].starts_with(b"BHS|^~\\&\rMSH|"));
        assert!(msgs[0].ends_with(b"\rBTS|2\r"));

        let ack = b"BHS|^~\\&|||||20260101||||X1|B1\rMSH|^~\\&|C|D|A|B|20260101||ACK^A01^ACK|X2|P|2.4\rMSA|AE|2|required segment PID is missing\rERR||PID^1|100\rBTS|1\r";
        let naks = parse_batch_ack(ack).unwrap();
        assert_eq!(naks.len(), 1);
        assert_eq!(
            (naks[0].code.as_str(), naks[0].control_id.as_str()),
            ("AE", "2")
        );
        assert!(parse_batch_ack(b"BHS|^~\\&\rBTS|0\r").unwrap().is_empty());
    }

    #[test]
    fn ack_fields_are_read_with_the_ack_delimiters() {
        let a = parse_ack(b"MSH#^~\\&#X\rMSA#AE#CTRL1#bad thing\r").unwrap();
        assert_eq!(
            (a.code.as_str(), a.control_id.as_str(), a.text.as_str()),
            ("AE", "CTRL1", "bad thing")
        );
    }
}

/// `siterelay send` over TLS, for feeds with an `[mllp.tls]` table.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SendTlsArgs {
    /// Connect with TLS (a feed with [mllp.tls]). Implied by --ca, --cert or --server-name.
    #[arg(long)]
    pub tls: bool,
    /// CA certificate(s) the feed's certificate must chain to (PEM); required with --tls (no
    /// system trust store is consulted).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate to present (PEM), for a feed with tls.client_ca_file.
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// Private key of --cert (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
    /// Name the feed's certificate must carry (DNS name or IP address). Default: the host
    /// part of --to.
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
}

impl SendTlsArgs {
    /// Whether TLS was asked for.
    pub fn wanted(&self) -> bool {
        self.tls || self.ca.is_some() || self.cert.is_some() || self.server_name.is_some()
    }

    /// The connector and the name to verify, for a connection to `to` (`HOST:PORT`).
    pub fn connector(
        &self,
        to: &str,
    ) -> Result<
        (
            tokio_rustls::TlsConnector,
            rustls_pki_types::ServerName<'static>,
        ),
        String,
    > {
        let Some(ca) = &self.ca else {
            return Err(
                "--tls needs --ca FILE: the CA certificate the feed's certificate chains to".into(),
            );
        };
        let host = match &self.server_name {
            Some(n) => n.clone(),
            None => host_of(to).to_string(),
        };
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|_| format!("'{host}' is not a DNS name or IP address (--server-name)"))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in crate::tls::load_certs(ca).map_err(|e| e.to_string())? {
            roots
                .add(c)
                .map_err(|e| format!("{}: not a usable CA certificate: {e}", ca.display()))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
        let config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(
                    crate::tls::load_certs(cert).map_err(|e| e.to_string())?,
                    crate::tls::load_key(key).map_err(|e| e.to_string())?,
                )
                .map_err(|e| match e {
                    rustls::Error::InconsistentKeys(_) => format!(
                        "--cert {} and --key {} are not a pair: the certificate was issued for another key",
                        cert.display(),
                        key.display()
                    ),
                    other => other.to_string(),
                })?,
            _ => builder.with_no_client_auth(),
        };
        Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
    }
}

/// `host` of `host:port`, `[v6]:port` or `v6` alone.
fn host_of(to: &str) -> &str {
    if let Some(rest) = to.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match to.rsplit_once(':') {
        Some((h, _)) if !h.contains(':') => h,
        _ => to,
    }
}

/// A TLS failure seen by `siterelay send` (at the handshake or, with TLS 1.3, on the first
/// read after it), in an installer's words: what the feed's certificate or the feed said.
pub fn describe_tls_error(e: &std::io::Error, server_name: &str) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    let d = |t: rustls_pki_types::UnixTime| crate::tls::date(t.as_secs() as i64);
    match r {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => {
                "the feed's certificate does not chain to the CA given with --ca".into()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                "the feed's certificate does not name '{server_name}': connect by a name in it, or give that name with --server-name"
            ),
            C::ExpiredContext { time, not_after } => format!(
                "the feed's certificate expired on {} (this machine's clock says {})",
                d(*not_after),
                d(*time)
            ),
            C::NotValidYetContext { time, not_before } => format!(
                "the feed's certificate is not valid until {} (this machine's clock says {})",
                d(*not_before),
                d(*time)
            ),
            other => format!("the feed's certificate was not accepted: {other:?}"),
        },
        E::AlertReceived(a) => match a {
            A::CertificateRequired => {
                "the feed requires a client certificate: give --cert and --key".into()
            }
            A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::AccessDenied => format!(
                "the feed refused this client's certificate ({a:?}): it accepts certificates issued by its tls.client_ca_file CA (and, with allow_names, only those names)"
            ),
            A::CertificateExpired => {
                "the feed refused this client's certificate: it has expired".into()
            }
            A::CertificateRevoked => {
                "the feed refused this client's certificate: it is revoked".into()
            }
            other => format!("the feed ended the TLS handshake ({other:?})"),
        },
        other => other.to_string(),
    }
}
