//! The appliance's control plane over MQTT, as pure functions: topics, birth and death
//! certificates, and command parsing and replies. The MQTT session in [`super::mqtt`] publishes
//! what these build.
//!
//! Lifecycle (after Sparkplug / Homie, in JSON): every connection gets a new birth sequence
//! number `bdseq`, persisted in the outbox so it keeps increasing across restarts. The Last Will
//! registered at CONNECT is a retained `offline`/`lost` status carrying that `bdseq`; after the
//! CONNACK the appliance publishes a retained `online` birth with the same `bdseq`; a clean
//! shutdown publishes `offline`/`shutdown` itself before disconnecting. A consumer tells a stale
//! death from a current one by comparing `bdseq`.

use serde::{Deserialize, Serialize};

use crate::health::{FeedInfo, HostFacts};

/// Schema of status payloads.
pub const STATUS_SCHEMA: &str = "siterelay.status.v1";
/// Schema of inventory payloads.
pub const INVENTORY_SCHEMA: &str = "siterelay.inventory.v1";
/// Schema of command replies.
pub const REPLY_SCHEMA: &str = "siterelay.cmd-reply.v1";
/// Most records one replay command may resend.
pub const MAX_REPLAY: usize = 100_000;
/// Largest MQTT packet the appliance accepts from the broker. It only receives commands (a
/// few hundred bytes of JSON) and acknowledgements; anything larger is refused by the client
/// (MQTT 5: announced at CONNECT, so the broker does not send it; 3.1.1: the connection is
/// dropped and made again).
pub const MAX_INCOMING_PACKET_BYTES: usize = 64 * 1024;

/// Replays started in the last hour, against `mqtt.replays_per_hour`; and only one at a time.
/// A replay resends up to [`MAX_REPLAY`] records of patient data: a compromised broker account
/// or a careless operator must not be able to loop it.
#[derive(Debug)]
pub struct ReplayLimit {
    per_hour: u32,
    started: std::collections::VecDeque<std::time::Instant>,
}

impl ReplayLimit {
    /// At most `per_hour` replays started in any hour.
    pub fn new(per_hour: u32) -> ReplayLimit {
        ReplayLimit {
            per_hour,
            started: Default::default(),
        }
    }

    /// May a replay start at `now`? `running` is the replay in progress, if any (its feed and
    /// the records it still has to send). `Ok` counts it as started; `Err` says why not.
    pub fn admit(
        &mut self,
        now: std::time::Instant,
        running: Option<(&str, usize)>,
    ) -> Result<(), String> {
        if let Some((feed, left)) = running {
            return Err(format!(
                "refused: a replay of feed '{feed}' is still running ({left} records to send);                  one replay at a time, send this again when it has finished"
            ));
        }
        let hour = std::time::Duration::from_secs(3600);
        while self
            .started
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= hour)
        {
            self.started.pop_front();
        }
        if self.started.len() >= self.per_hour as usize {
            let wait = self
                .started
                .front()
                .map(|&t| {
                    hour.saturating_sub(now.saturating_duration_since(t))
                        .as_secs()
                        .div_ceil(60)
                })
                .unwrap_or(60);
            return Err(format!(
                "refused: {} replays started in the last hour (mqtt.replays_per_hour = {}); \
                 the next one is possible in {wait} min",
                self.started.len(),
                self.per_hour
            ));
        }
        self.started.push_back(now);
        Ok(())
    }
}

/// Topics of one appliance.
#[derive(Debug, Clone)]
pub struct Topics {
    /// `{prefix}/{appliance}/status` (retained).
    pub status: String,
    /// `{prefix}/{appliance}/health`.
    pub health: String,
    /// `{prefix}/{appliance}/inventory` (retained).
    pub inventory: String,
    /// `{prefix}/{appliance}/cmd/+` (subscribed).
    pub commands: String,
    /// `{prefix}/{appliance}/cmd-reply`.
    pub replies: String,
    cmd_prefix: String,
}

impl Topics {
    /// Topics under `prefix` for `appliance`.
    pub fn new(prefix: &str, appliance: &str) -> Topics {
        let base = format!("{prefix}/{appliance}");
        Topics {
            status: format!("{base}/status"),
            health: format!("{base}/health"),
            inventory: format!("{base}/inventory"),
            commands: format!("{base}/cmd/+"),
            replies: format!("{base}/cmd-reply"),
            cmd_prefix: format!("{base}/cmd/"),
        }
    }

    /// The command name of a topic under `cmd/`, if it is one of ours.
    pub fn command_name<'a>(&self, topic: &'a str) -> Option<&'a str> {
        topic.strip_prefix(&self.cmd_prefix)
    }
}

/// The retained status message (birth or death).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// `siterelay.status.v1`.
    pub schema: String,
    /// Appliance id.
    pub appliance: String,
    /// `online` or `offline`.
    pub state: String,
    /// For `offline`: `lost` (Last Will: the broker lost the connection) or `shutdown`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// Birth sequence number of the connection this status belongs to.
    pub bdseq: i64,
    /// When the status was published (absent in the Last Will, which the broker sends later).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub at: Option<String>,
    /// siterelay version (birth only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub version: Option<String>,
    /// Process start time (birth only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub started_at: Option<String>,
    /// Host facts (birth only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub host: Option<serde_json::Value>,
    /// Configured feeds (birth only; no secrets).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub feeds: Option<serde_json::Value>,
}

/// Birth certificate.
pub fn birth(
    appliance: &str,
    bdseq: i64,
    started_at: &str,
    host: &HostFacts,
    feeds: &[FeedInfo],
    now: &str,
) -> Vec<u8> {
    let s = Status {
        schema: STATUS_SCHEMA.into(),
        appliance: appliance.into(),
        state: "online".into(),
        reason: None,
        bdseq,
        at: Some(now.into()),
        version: Some(env!("CARGO_PKG_VERSION").into()),
        started_at: Some(started_at.into()),
        host: serde_json::to_value(host).ok(),
        feeds: serde_json::to_value(feeds).ok(),
    };
    serde_json::to_vec(&s).expect("status serialises")
}

/// Death certificate: `reason` is `lost` (the Last Will) or `shutdown`.
pub fn death(appliance: &str, bdseq: i64, reason: &str, now: Option<&str>) -> Vec<u8> {
    let s = Status {
        schema: STATUS_SCHEMA.into(),
        appliance: appliance.into(),
        state: "offline".into(),
        reason: Some(reason.into()),
        bdseq,
        at: now.map(str::to_string),
        version: None,
        started_at: None,
        host: None,
        feeds: None,
    };
    serde_json::to_vec(&s).expect("status serialises")
}

/// A command from the central side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Answer at once.
    Ping,
    /// Republish birth and inventory.
    Rebirth,
    /// Publish a health report now.
    Health,
    /// Resend a feed's retained records from `from_seq`.
    Replay {
        /// Feed name.
        feed: String,
        /// First seq to resend.
        from_seq: u64,
        /// Most records to resend.
        limit: usize,
    },
}

/// A parsed command with the caller's correlation id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `id` from the payload, echoed in the reply.
    pub id: Option<String>,
    /// The command name from the topic.
    pub name: String,
    /// What to do, or why not.
    pub command: Result<Command, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayArgs {
    #[serde(default)]
    id: Option<String>,
    feed: String,
    from_seq: u64,
    #[serde(default)]
    limit: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoArgs {
    #[serde(default)]
    id: Option<String>,
}

/// Parse a command. The payload is a JSON object (`{}` or empty for commands without
/// arguments); anything else is an error that changes nothing.
pub fn parse_command(name: &str, payload: &[u8], feeds: &[String]) -> Request {
    let text = std::str::from_utf8(payload).unwrap_or("\u{fffd}").trim();
    let text = if text.is_empty() { "{}" } else { text };
    let id_only = || serde_json::from_str::<NoArgs>(text).map(|a| a.id);
    let fail = |id, e: String| Request {
        id,
        name: name.to_string(),
        command: Err(e),
    };
    let loose_id = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string));
    let simple = |c: Command| match id_only() {
        Ok(id) => Request {
            id,
            name: name.to_string(),
            command: Ok(c),
        },
        Err(e) => fail(loose_id.clone(), format!("malformed payload: {e}")),
    };
    match name {
        "ping" => simple(Command::Ping),
        "rebirth" => simple(Command::Rebirth),
        "health" => simple(Command::Health),
        "replay" => match serde_json::from_str::<ReplayArgs>(text) {
            Ok(a) if !feeds.contains(&a.feed) => fail(a.id, format!("unknown feed '{}'", a.feed)),
            Ok(a) if a.from_seq == 0 => fail(a.id, "from_seq starts at 1".into()),
            Ok(a) => Request {
                id: a.id,
                name: name.to_string(),
                command: Ok(Command::Replay {
                    feed: a.feed,
                    from_seq: a.from_seq,
                    limit: a.limit.unwrap_or(MAX_REPLAY).min(MAX_REPLAY),
                }),
            },
            Err(e) => fail(
                loose_id,
                format!(
                    "malformed replay payload (expected {{\"feed\": \"...\", \"from_seq\": N}}): {e}"
                ),
            ),
        },
        other => fail(
            loose_id,
            format!("unknown command '{other}' (ping, rebirth, health, replay)"),
        ),
    }
}

/// The reply to a command.
pub fn reply(
    appliance: &str,
    req: &Request,
    result: Result<serde_json::Value, String>,
    now: &str,
) -> Vec<u8> {
    let mut v = serde_json::json!({
        "schema": REPLY_SCHEMA,
        "appliance": appliance,
        "command": req.name,
        "at": now,
    });
    if let Some(id) = &req.id {
        v["id"] = id.clone().into();
    }
    match result {
        Ok(r) => {
            v["ok"] = true.into();
            v["result"] = r;
        }
        Err(e) => {
            v["ok"] = false.into();
            v["error"] = e.into();
        }
    }
    serde_json::to_vec(&v).expect("reply serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feeds() -> Vec<String> {
        vec!["adt".into()]
    }

    #[test]
    fn commands_parse_with_and_without_payloads() {
        assert_eq!(
            parse_command("ping", b"", &feeds()).command,
            Ok(Command::Ping)
        );
        let r = parse_command("health", br#"{"id":"h1"}"#, &feeds());
        assert_eq!(
            (r.id.as_deref(), r.command),
            (Some("h1"), Ok(Command::Health))
        );
        let r = parse_command(
            "replay",
            br#"{"id":"r1","feed":"adt","from_seq":5}"#,
            &feeds(),
        );
        assert_eq!(
            r.command,
            Ok(Command::Replay {
                feed: "adt".into(),
                from_seq: 5,
                limit: MAX_REPLAY
            })
        );
    }

    #[test]
    fn malformed_and_unknown_commands_are_errors_that_keep_the_id() {
        for (name, payload) in [
            ("reboot", &br#"{"id":"x"}"#[..]),
            ("ping", br#"{"id":"x","extra":1}"#),
            ("replay", br#"{"id":"x","feed":"adt"}"#),
            ("replay", br#"{"id":"x","feed":"nope","from_seq":1}"#),
            ("replay", br#"{"id":"x","feed":"adt","from_seq":0}"#),
        ] {
            let r = parse_command(name, payload, &feeds());
            assert!(r.command.is_err(), "{name} {:?}", r);
            assert_eq!(r.id.as_deref(), Some("x"), "{name}");
        }
        let r = parse_command("ping", b"not json", &feeds());
        assert!(r.command.is_err());
        assert_eq!(r.id, None);
    }

    #[test]
    fn replays_run_one_at_a_time_and_at_most_n_an_hour() {
        let t0 = std::time::Instant::now();
        let min = std::time::Duration::from_secs(60);
        let mut l = ReplayLimit::new(2);
        assert_eq!(l.admit(t0, None), Ok(()));
        let busy = l.admit(t0 + min, Some(("adt", 40))).unwrap_err();
        assert!(
            busy.contains("still running") && busy.contains("40 records"),
            "{busy}"
        );
        assert_eq!(l.admit(t0 + 10 * min, None), Ok(()));
        let capped = l.admit(t0 + 20 * min, None).unwrap_err();
        assert!(
            capped.contains("mqtt.replays_per_hour = 2") && capped.contains("in 40 min"),
            "{capped}"
        );
        // An hour after the first, one more is allowed; then the cap again.
        assert_eq!(l.admit(t0 + 60 * min, None), Ok(()));
        assert!(l.admit(t0 + 61 * min, None).is_err());
        assert!(
            ReplayLimit::new(0).admit(t0, None).is_err(),
            "0 turns replay off"
        );
    }

    #[test]
    fn death_certificates_carry_the_connection_bdseq() {
        let d: Status = serde_json::from_slice(&death("box", 7, "lost", None)).unwrap();
        assert_eq!(
            (d.state.as_str(), d.reason.as_deref(), d.bdseq),
            ("offline", Some("lost"), 7)
        );
        assert!(d.at.is_none());
    }

    #[test]
    fn command_names_come_from_our_own_topics_only() {
        let t = Topics::new("siterelay", "box");
        assert_eq!(t.command_name("siterelay/box/cmd/ping"), Some("ping"));
        assert_eq!(t.command_name("siterelay/other/cmd/ping"), None);
        assert_eq!(t.commands, "siterelay/box/cmd/+");
    }
}
