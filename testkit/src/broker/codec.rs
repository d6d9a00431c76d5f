//! Glue between the wire and the broker: rumqttc's v4 (MQTT 3.1.1) and v5 packet codecs
//! decoded into one protocol-neutral [`In`] and encoded from one [`Out`].

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::mqttbytes::{Error as V4Error, QoS as V4QoS};
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::{Error as V5Error, QoS as V5QoS};

/// Largest packet (remaining length) accepted from or sent to a client.
pub const MAX_PACKET_SIZE: usize = 64 * 1024 * 1024;

/// A message as routed between connections.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
}

/// What a CONNECT asked for.
#[derive(Debug)]
pub struct ConnectInfo {
    pub v5: bool,
    pub client_id: String,
    pub keep_alive: u16,
    pub will: Option<Message>,
    /// v5 only: the client's Maximum Packet Size property.
    pub max_packet_size: Option<u32>,
}

/// One topic filter of a SUBSCRIBE.
#[derive(Debug)]
pub struct SubReq {
    pub filter: String,
    pub qos: u8,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0 = send retained on every subscribe, 1 = only for a new subscription, 2 = never.
    pub retain_handling: u8,
}

/// A decoded packet from a connected client.
#[derive(Debug)]
pub enum In {
    Connect,
    Publish {
        topic: String,
        topic_alias: Option<u16>,
        payload: Bytes,
        qos: u8,
        retain: bool,
        pkid: u16,
    },
    PubAck,
    PubRec,
    PubRel(u16),
    PubComp,
    Subscribe {
        pkid: u16,
        filters: Vec<SubReq>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    /// `with_will`: v5 reason 0x04 "disconnect with will message".
    Disconnect {
        with_will: bool,
    },
    /// Anything a client must not send (CONNACK, SUBACK, AUTH, ...).
    Unexpected,
}

/// A packet to send to a client.
#[derive(Debug)]
pub enum Out {
    ConnAck {
        assigned_client_id: Option<String>,
        /// v5: the Maximum Packet Size property (what this broker accepts).
        max_packet_size: Option<u32>,
    },
    /// CONNACK refusing the connection: "server unavailable" (v3.1.1 code 3, v5 0x88).
    ConnRefused,
    /// Packet id is assigned by the connection writer for QoS > 0.
    Publish(Message),
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PubRec {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
    },
    /// Codes: granted QoS (0/1/2) or a failure code (0x80, 0x8F).
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    UnsubAck {
        pkid: u16,
        existed: Vec<bool>,
    },
    PingResp,
    /// v5 only (dropped for v3.1.1 clients).
    Disconnect {
        reason: u8,
    },
    /// Close the connection after everything queued before it was written.
    Close,
}

/// Outcome of looking at the start of the first packet.
pub enum ConnectPeek {
    NeedMore,
    Level(u8),
    NotConnect,
}

/// Finds the protocol level of a CONNECT at the start of `buf` without consuming anything.
pub fn peek_connect_level(buf: &[u8]) -> ConnectPeek {
    if buf.is_empty() {
        return ConnectPeek::NeedMore;
    }
    if buf[0] != 0x10 {
        return ConnectPeek::NotConnect;
    }
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return ConnectPeek::NeedMore;
        };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return ConnectPeek::NotConnect;
        }
    }
    if buf.len() < i + 2 {
        return ConnectPeek::NeedMore;
    }
    let name_len = usize::from(u16::from_be_bytes([buf[i], buf[i + 1]]));
    match buf.get(i + 2 + name_len) {
        Some(&level) if &buf[i + 2..i + 2 + name_len] == b"MQTT" => ConnectPeek::Level(level),
        Some(_) => ConnectPeek::NotConnect,
        None => ConnectPeek::NeedMore,
    }
}

/// Decodes the CONNECT at the start of `buf`; `Ok(None)` means more bytes are needed.
pub fn read_connect(buf: &mut BytesMut, v5: bool) -> Result<Option<ConnectInfo>, String> {
    if v5 {
        match v5::Packet::read(buf, Some(MAX_PACKET_SIZE as u32)) {
            Ok(v5::Packet::Connect(connect, will, _login)) => {
                let will = match will {
                    Some(w) => Some(Message {
                        topic: String::from_utf8(w.topic.to_vec())
                            .map_err(|_| "will topic is not UTF-8".to_string())?,
                        payload: w.message,
                        qos: w.qos as u8,
                        retain: w.retain,
                    }),
                    None => None,
                };
                Ok(Some(ConnectInfo {
                    v5: true,
                    client_id: connect.client_id,
                    keep_alive: connect.keep_alive,
                    will,
                    max_packet_size: connect.properties.and_then(|p| p.max_packet_size),
                }))
            }
            Ok(other) => Err(format!("expected CONNECT, got {}", v5_name(&other))),
            Err(V5Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(format!("bad CONNECT: {e}")),
        }
    } else {
        match v4::Packet::read(buf, MAX_PACKET_SIZE) {
            Ok(v4::Packet::Connect(connect)) => Ok(Some(ConnectInfo {
                v5: false,
                client_id: connect.client_id,
                keep_alive: connect.keep_alive,
                will: connect.last_will.map(|w| Message {
                    topic: w.topic,
                    payload: w.message,
                    qos: w.qos as u8,
                    retain: w.retain,
                }),
                max_packet_size: None,
            })),
            Ok(_) => Err("expected CONNECT".to_string()),
            Err(V4Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(format!("bad CONNECT: {e}")),
        }
    }
}

/// The whole size of the packet starting `buf` (fixed header included), once its fixed header
/// is buffered; and whether it is a PUBLISH.
pub fn peek_packet_size(buf: &[u8]) -> Option<(usize, bool)> {
    let first = *buf.first()?;
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Some((1 + i + 1 + len, first >> 4 == 3));
        }
    }
    None
}

/// Decodes the next packet at the start of `buf`; `Ok(None)` means more bytes are needed.
pub fn read_packet(buf: &mut BytesMut, v5: bool) -> Result<Option<In>, String> {
    if v5 { read_v5(buf) } else { read_v4(buf) }
}

fn read_v4(buf: &mut BytesMut) -> Result<Option<In>, String> {
    let packet = match v4::Packet::read(buf, MAX_PACKET_SIZE) {
        Ok(p) => p,
        Err(V4Error::InsufficientBytes(_)) => return Ok(None),
        Err(e) => return Err(format!("bad packet: {e}")),
    };
    Ok(Some(match packet {
        v4::Packet::Connect(_) => In::Connect,
        v4::Packet::Publish(p) => In::Publish {
            topic: p.topic,
            topic_alias: None,
            payload: p.payload,
            qos: p.qos as u8,
            retain: p.retain,
            pkid: p.pkid,
        },
        v4::Packet::PubAck(_) => In::PubAck,
        v4::Packet::PubRec(_) => In::PubRec,
        v4::Packet::PubRel(p) => In::PubRel(p.pkid),
        v4::Packet::PubComp(_) => In::PubComp,
        v4::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubReq {
                    filter: f.path,
                    qos: f.qos as u8,
                    no_local: false,
                    retain_as_published: false,
                    retain_handling: 0,
                })
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => In::PingReq,
        v4::Packet::Disconnect => In::Disconnect { with_will: false },
        _ => In::Unexpected,
    }))
}

fn read_v5(buf: &mut BytesMut) -> Result<Option<In>, String> {
    // rumqttc's v5 reader rejects a DISCONNECT with remaining length 0 ("payload required"),
    // which is the normal form (reason 0x00, no properties) sent by rumqttc itself.
    if buf.len() >= 2 && buf[1] == 0 && (buf[0] == 0xE0 || buf[0] == 0xF0) {
        let first = buf[0];
        buf.advance(2);
        return Ok(Some(if first == 0xE0 {
            In::Disconnect { with_will: false }
        } else {
            In::Unexpected
        }));
    }
    let packet = match v5::Packet::read(buf, Some(MAX_PACKET_SIZE as u32)) {
        Ok(p) => p,
        Err(V5Error::InsufficientBytes(_)) => return Ok(None),
        Err(e) => return Err(format!("bad packet: {e}")),
    };
    Ok(Some(match packet {
        v5::Packet::Connect(..) => In::Connect,
        v5::Packet::Publish(p) => In::Publish {
            topic: String::from_utf8(p.topic.to_vec())
                .map_err(|_| "publish topic is not UTF-8".to_string())?,
            topic_alias: p.properties.as_ref().and_then(|pr| pr.topic_alias),
            payload: p.payload,
            qos: p.qos as u8,
            retain: p.retain,
            pkid: p.pkid,
        },
        v5::Packet::PubAck(_) => In::PubAck,
        v5::Packet::PubRec(_) => In::PubRec,
        v5::Packet::PubRel(p) => In::PubRel(p.pkid),
        v5::Packet::PubComp(_) => In::PubComp,
        v5::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| SubReq {
                    filter: f.path,
                    qos: f.qos as u8,
                    no_local: f.nolocal,
                    retain_as_published: f.preserve_retain,
                    retain_handling: match f.retain_forward_rule {
                        v5::RetainForwardRule::OnEverySubscribe => 0,
                        v5::RetainForwardRule::OnNewSubscribe => 1,
                        v5::RetainForwardRule::Never => 2,
                    },
                })
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => In::PingReq,
        v5::Packet::Disconnect(d) => In::Disconnect {
            with_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
        },
        _ => In::Unexpected,
    }))
}

fn v5_name(p: &v5::Packet) -> &'static str {
    match p {
        v5::Packet::Auth(_) => "AUTH",
        v5::Packet::Connect(..) => "CONNECT",
        v5::Packet::ConnAck(_) => "CONNACK",
        v5::Packet::Publish(_) => "PUBLISH",
        v5::Packet::PubAck(_) => "PUBACK",
        v5::Packet::PingReq(_) => "PINGREQ",
        v5::Packet::PingResp(_) => "PINGRESP",
        v5::Packet::Subscribe(_) => "SUBSCRIBE",
        v5::Packet::SubAck(_) => "SUBACK",
        v5::Packet::PubRec(_) => "PUBREC",
        v5::Packet::PubRel(_) => "PUBREL",
        v5::Packet::PubComp(_) => "PUBCOMP",
        v5::Packet::Unsubscribe(_) => "UNSUBSCRIBE",
        v5::Packet::UnsubAck(_) => "UNSUBACK",
        v5::Packet::Disconnect(_) => "DISCONNECT",
    }
}

fn v4_qos(q: u8) -> V4QoS {
    match q {
        0 => V4QoS::AtMostOnce,
        1 => V4QoS::AtLeastOnce,
        _ => V4QoS::ExactlyOnce,
    }
}

fn v5_qos(q: u8) -> V5QoS {
    match q {
        0 => V5QoS::AtMostOnce,
        1 => V5QoS::AtLeastOnce,
        _ => V5QoS::ExactlyOnce,
    }
}

fn v5_puback_reason(code: u8) -> Option<v5::PubAckReason> {
    use v5::PubAckReason as R;
    Some(match code {
        0x00 => R::Success,
        0x10 => R::NoMatchingSubscribers,
        0x80 => R::UnspecifiedError,
        0x83 => R::ImplementationSpecificError,
        0x87 => R::NotAuthorized,
        0x90 => R::TopicNameInvalid,
        0x91 => R::PacketIdentifierInUse,
        0x97 => R::QuotaExceeded,
        0x99 => R::PayloadFormatInvalid,
        _ => return None,
    })
}

fn v5_suback_code(code: u8) -> v5::SubscribeReasonCode {
    use v5::SubscribeReasonCode as R;
    match code {
        0..=2 => R::Success(v5_qos(code)),
        0x87 => R::NotAuthorized,
        0x8F => R::TopicFilterInvalid,
        0x97 => R::QuotaExceeded,
        _ => R::Unspecified,
    }
}

/// Encodes `out` for a client of the given protocol version, appending to `buf`.
///
/// `pkid` is used for QoS > 0 publishes. Returns `Ok(false)` when the packet was skipped
/// (v5-only packet for a v3.1.1 client, or larger than the client's `max_packet_size`).
pub fn write_packet(
    out: &Out,
    v5: bool,
    pkid: u16,
    max_packet_size: Option<u32>,
    buf: &mut BytesMut,
) -> Result<bool, String> {
    if v5 {
        write_v5(out, pkid, max_packet_size, buf)
    } else {
        write_v4(out, pkid, buf)
    }
}

fn write_v4(out: &Out, pkid: u16, buf: &mut BytesMut) -> Result<bool, String> {
    let packet = match out {
        Out::ConnAck { .. } => {
            v4::Packet::ConnAck(v4::ConnAck::new(v4::ConnectReturnCode::Success, false))
        }
        Out::ConnRefused => v4::Packet::ConnAck(v4::ConnAck::new(
            v4::ConnectReturnCode::ServiceUnavailable,
            false,
        )),
        Out::Publish(m) => v4::Packet::Publish(v4::Publish {
            dup: false,
            qos: v4_qos(m.qos),
            retain: m.retain,
            topic: m.topic.clone(),
            pkid: if m.qos > 0 { pkid } else { 0 },
            payload: m.payload.clone(),
        }),
        Out::PubAck { pkid, .. } => v4::Packet::PubAck(v4::PubAck::new(*pkid)),
        Out::PubRec { pkid } => v4::Packet::PubRec(v4::PubRec::new(*pkid)),
        Out::PubComp { pkid } => v4::Packet::PubComp(v4::PubComp::new(*pkid)),
        Out::SubAck { pkid, codes } => v4::Packet::SubAck(v4::SubAck::new(
            *pkid,
            codes
                .iter()
                .map(|&c| match c {
                    0..=2 => v4::SubscribeReasonCode::Success(v4_qos(c)),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Out::UnsubAck { pkid, .. } => v4::Packet::UnsubAck(v4::UnsubAck::new(*pkid)),
        Out::PingResp => v4::Packet::PingResp,
        Out::Disconnect { .. } | Out::Close => return Ok(false),
    };
    packet
        .write(buf, MAX_PACKET_SIZE + 5)
        .map_err(|e| format!("encoding: {e}"))?;
    Ok(true)
}

fn write_v5(
    out: &Out,
    pkid: u16,
    max_packet_size: Option<u32>,
    buf: &mut BytesMut,
) -> Result<bool, String> {
    let packet = match out {
        Out::ConnAck {
            assigned_client_id,
            max_packet_size,
        } => v5::Packet::ConnAck(v5::ConnAck {
            session_present: false,
            code: v5::ConnectReturnCode::Success,
            properties: (assigned_client_id.is_some() || max_packet_size.is_some()).then(|| {
                v5::ConnAckProperties {
                    session_expiry_interval: None,
                    receive_max: None,
                    max_qos: None,
                    retain_available: None,
                    max_packet_size: *max_packet_size,
                    assigned_client_identifier: assigned_client_id.clone(),
                    topic_alias_max: None,
                    reason_string: None,
                    user_properties: Vec::new(),
                    wildcard_subscription_available: None,
                    subscription_identifiers_available: None,
                    shared_subscription_available: None,
                    server_keep_alive: None,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                }
            }),
        }),
        Out::ConnRefused => v5::Packet::ConnAck(v5::ConnAck {
            session_present: false,
            code: v5::ConnectReturnCode::ServerUnavailable,
            properties: None,
        }),
        Out::Publish(m) => v5::Packet::Publish(v5::Publish {
            dup: false,
            qos: v5_qos(m.qos),
            retain: m.retain,
            topic: Bytes::copy_from_slice(m.topic.as_bytes()),
            pkid: if m.qos > 0 { pkid } else { 0 },
            payload: m.payload.clone(),
            properties: None,
        }),
        Out::PubAck { pkid, reason } => match v5_puback_reason(*reason) {
            Some(r) => v5::Packet::PubAck(v5::PubAck {
                pkid: *pkid,
                reason: r,
                properties: None,
            }),
            None => {
                // A code rumqttc has no name for: write it by hand (remaining length 3:
                // packet id + reason code, no properties).
                let [hi, lo] = pkid.to_be_bytes();
                buf.extend_from_slice(&[0x40, 0x03, hi, lo, *reason]);
                return Ok(true);
            }
        },
        Out::PubRec { pkid } => v5::Packet::PubRec(v5::PubRec::new(*pkid, None)),
        Out::PubComp { pkid } => v5::Packet::PubComp(v5::PubComp::new(*pkid, None)),
        Out::SubAck { pkid, codes } => v5::Packet::SubAck(v5::SubAck {
            pkid: *pkid,
            return_codes: codes.iter().map(|&c| v5_suback_code(c)).collect(),
            properties: None,
        }),
        Out::UnsubAck { pkid, existed } => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid: *pkid,
            reasons: existed
                .iter()
                .map(|&e| {
                    if e {
                        v5::UnsubAckReason::Success
                    } else {
                        v5::UnsubAckReason::NoSubscriptionExisted
                    }
                })
                .collect(),
            properties: None,
        }),
        Out::PingResp => v5::Packet::PingResp(v5::PingResp),
        Out::Disconnect { reason } => {
            let code = v5::DisconnectReasonCode::try_from(*reason)
                .unwrap_or(v5::DisconnectReasonCode::UnspecifiedError);
            v5::Packet::Disconnect(v5::Disconnect::new(code))
        }
        Out::Close => return Ok(false),
    };
    if let (Some(max), Out::Publish(_)) = (max_packet_size, out)
        && packet.size() > max as usize
    {
        return Ok(false);
    }
    packet
        .write(buf, Some(MAX_PACKET_SIZE as u32 + 5))
        .map_err(|e| format!("encoding: {e}"))?;
    Ok(true)
}

/// Whether `topic` matches the subscription `filter` (`+`, `#`; `$`-topics are not matched
/// by a leading wildcard).
pub fn topic_matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut t = topic.split('/');
    let mut f = filter.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether a SUBSCRIBE filter is well formed.
pub fn valid_filter(filter: &str) -> bool {
    rumqttc::mqttbytes::valid_filter(filter)
}

/// Whether a PUBLISH topic name is well formed (non-empty, no wildcards).
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && rumqttc::mqttbytes::valid_topic(topic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching() {
        assert!(topic_matches("a/b/c", "a/b/c"));
        assert!(topic_matches("a/b/c", "a/+/c"));
        assert!(topic_matches("a/b/c", "a/#"));
        assert!(topic_matches("a", "a/#"));
        assert!(topic_matches("a/b/c", "#"));
        assert!(!topic_matches("a/b", "a/b/c"));
        assert!(!topic_matches("a/b/c", "a/b"));
        assert!(!topic_matches("a/b/c", "a/+"));
        assert!(topic_matches("a//c", "a/+/c"));
        assert!(!topic_matches("$SYS/x", "#"));
        assert!(!topic_matches("$SYS/x", "+/x"));
        assert!(topic_matches("$SYS/x", "$SYS/#"));
        assert!(topic_matches("$SYS/x", "$SYS/x"));
    }

    #[test]
    fn peek_level() {
        let mut buf = BytesMut::new();
        v4::Packet::Connect(v4::Connect::new("x"))
            .write(&mut buf, 1024)
            .unwrap();
        assert!(matches!(peek_connect_level(&buf), ConnectPeek::Level(4)));
        assert!(matches!(
            peek_connect_level(&buf[..5]),
            ConnectPeek::NeedMore
        ));
        assert!(matches!(
            peek_connect_level(&[0x30, 0]),
            ConnectPeek::NotConnect
        ));
    }

    #[test]
    fn v5_zero_length_disconnect() {
        let mut buf = BytesMut::from(&[0xE0u8, 0x00, 0xC0][..]);
        assert!(matches!(
            read_packet(&mut buf, true),
            Ok(Some(In::Disconnect { with_will: false }))
        ));
        assert!(matches!(read_packet(&mut buf, true), Ok(None)));
    }
}
