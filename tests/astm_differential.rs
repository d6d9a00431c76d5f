//! The ASTM half of issue 10's differential check. Every fixture under `tests/fixtures/astm`
//! (synthetic, shaped like real analyser output) becomes a record through the real
//! `RecordBuilder`, exactly as a serial port's message would; an independent reading written
//! here (records split on CR/LF, delimiters from the H record, fields, repeats and components
//! split, escapes decoded by its own routine, the contract's rules applied) is compared with
//! every member of every H, P, O, R, C, Q, M and L record in the record's `astm` object. A
//! member the reading does not compare, or an array longer or shorter than the message says, is
//! a disagreement too. The test prints its counts and fails on any disagreement not listed in
//! `EXPLAINED` (each entry quoting docs/contract.md, which must contain the quote).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use jiff::tz::TimeZone;
use serde_json::{Value, json};
use siterelay::hl7::charset::Charset;
use siterelay::outbox::{Format, PendingRow, SourceKind};
use siterelay::record::{DeviceInfo, FeedRecordSettings, RecordBuilder};

const CONTRACT: &str = include_str!("../docs/contract.md");
const SCHEMA: &str = include_str!("../docs/schema/record.v1.schema.json");

/// Disagreements the contract explains: (member, a quote from docs/contract.md saying why).
/// Empty: the normalised records agree with the independent reading everywhere.
const EXPLAINED: &[(&str, &str)] = &[];

struct Fixture {
    name: String,
    bytes: Vec<u8>,
    charset: Charset,
}

/// Every `*.astm` fixture; `*.windows-1252.astm` ones come from a port set to windows-1252, the
/// others from a port with the serial default (8859/1).
fn fixtures() -> Vec<Fixture> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/astm");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "astm"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 10, "fixtures missing in {}", dir.display());
    paths
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let charset = if name.ends_with(".windows-1252.astm") {
                Charset::Windows1252
            } else {
                Charset::Latin1
            };
            Fixture {
                bytes: std::fs::read(&p).unwrap(),
                name,
                charset,
            }
        })
        .collect()
}

fn london() -> TimeZone {
    TimeZone::get("Europe/London").unwrap()
}

/// The record the appliance would publish for a message from a serial port.
fn record(f: &Fixture) -> Value {
    let settings = FeedRecordSettings {
        timezone: london(),
        default_charset: f.charset,
        device: Some(DeviceInfo {
            model: Some("SIMULATED-ANALYSER".into()),
            location: None,
            asset_tag: None,
            protocol: "astm",
        }),
        normalise: None,
    };
    let builder = RecordBuilder {
        appliance: "test-box".into(),
        organisation: Some("RXX".into()),
        include_raw: true,
        feeds: HashMap::from([("chem1".to_owned(), settings.clone())]),
        fallback: settings,
    };
    let row = PendingRow {
        row_id: 1,
        record_id: "019ad3f2-6c1e-7a31-9b4e-2f6d1c0a9e55".into(),
        feed: "chem1".into(),
        seq: 1,
        received_at_us: 1_780_000_000_000_000,
        source_kind: SourceKind::Serial,
        peer: Some("/dev/serial/by-id/usb-SIM-if00".into()),
        peer_certificate: None,
        format: Format::Astm,
        raw: f.bytes.clone(),
        reprocessed: false,
        control_id_reused: false,
        truncated_bytes: 0,
    };
    serde_json::from_slice(&builder.build(&row)).expect("record is JSON")
}

// ---------------------------------------------------------------------------------------------
// The independent reading.

/// Bytes to text, by the oracle's own tables (only the Windows-1252 bytes the fixtures use).
fn oracle_text(f: &Fixture) -> String {
    f.bytes
        .iter()
        .map(|&b| match (f.charset, b) {
            (_, 0x00..=0x7F) | (_, 0xA0..=0xFF) => char::from(b),
            (Charset::Windows1252, 0x80) => '€',
            (Charset::Windows1252, 0x84) => '„',
            (Charset::Windows1252, 0x93) => '“',
            (Charset::Windows1252, 0x96) => '–',
            _ => panic!("{}: byte {b:#04x} unknown to the oracle", f.name),
        })
        .collect()
}

#[derive(Clone, Copy)]
struct Delims {
    field: char,
    repeat: char,
    component: char,
    escape: char,
}

struct Rec {
    line: usize,
    kind: char,
    fields: Vec<String>,
}

impl Rec {
    /// Field `n`, numbered as in the standard (field 1 is the record type).
    fn f(&self, n: usize) -> &str {
        self.fields.get(n - 1).map_or("", String::as_str)
    }
}

/// Records with their line numbers (CR, LF and CRLF each end a line; blank lines skipped), and
/// the delimiters from the header (the four characters after `H`).
fn split_message(text: &str) -> (Delims, Vec<Rec>) {
    let unified = text.replace("\r\n", "\n").replace('\r', "\n");
    let lines: Vec<(usize, &str)> = unified
        .split('\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    let h: Vec<char> = lines[0].1.chars().collect();
    assert_eq!(h[0], 'H');
    let d = Delims {
        field: h[1],
        repeat: h[2],
        component: h[3],
        escape: h[4],
    };
    let recs = lines
        .into_iter()
        .map(|(line, l)| Rec {
            line,
            kind: l.chars().next().unwrap(),
            fields: l.split(d.field).map(String::from).collect(),
        })
        .collect();
    (d, recs)
}

/// `&F&` `&S&` `&R&` `&E&` (with the message's escape character) become the delimiters; an
/// escape character that does not open one of them is text.
fn unescape(s: &str, d: Delims) -> String {
    let c: Vec<char> = s.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < c.len() {
        if c[i] == d.escape && i + 2 < c.len() && c[i + 2] == d.escape {
            let decoded = match c[i + 1] {
                'F' => Some(d.field),
                'S' => Some(d.component),
                'R' => Some(d.repeat),
                'E' => Some(d.escape),
                _ => None,
            };
            if let Some(ch) = decoded {
                out.push(ch);
                i += 3;
                continue;
            }
        }
        out.push(c[i]);
        i += 1;
    }
    out
}

fn parts(raw: &str, d: Delims) -> Vec<Vec<String>> {
    raw.split(d.repeat)
        .map(|r| {
            r.split(d.component)
                .map(|c| unescape(c, d).trim().to_owned())
                .collect()
        })
        .collect()
}

fn has_parts(raw: &str, d: Delims) -> bool {
    raw.contains(d.component) || raw.contains(d.repeat)
}

fn text_or_null(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { json!(s) }
}

/// A scalar member (first component of the first repeat) and its `_repeats` (only with parts).
fn scalar(raw: &str, d: Delims) -> (Value, Option<Value>) {
    let p = parts(raw, d);
    (text_or_null(&p[0][0]), has_parts(raw, d).then(|| json!(p)))
}

/// A plain decimal: optional sign, digits, at most one point.
fn plain_decimal(t: &str) -> Option<Value> {
    let unsigned = t.strip_prefix(['+', '-']).unwrap_or(t);
    let digits = unsigned.chars().filter(char::is_ascii_digit).count();
    let points = unsigned.chars().filter(|&c| c == '.').count();
    if digits == 0 || points > 1 || digits + points != unsigned.chars().count() {
        return None;
    }
    Some(json!(t.parse::<f64>().unwrap()))
}

fn typed(t: &str) -> (Value, Value) {
    match plain_decimal(t) {
        Some(n) => (n, json!("NM")),
        None => (json!(t), json!("ST")),
    }
}

/// (value, value_type, value_repeats).
fn value(raw: &str, d: Delims) -> (Value, Value, Option<Value>) {
    if !has_parts(raw, d) {
        let t = unescape(raw, d);
        let t = t.trim();
        return if t.is_empty() {
            (Value::Null, Value::Null, None)
        } else {
            let (v, ty) = typed(t);
            (v, ty, None)
        };
    }
    let p = parts(raw, d);
    let filled: Vec<(usize, usize)> = p
        .iter()
        .enumerate()
        .flat_map(|(r, comps)| {
            comps
                .iter()
                .enumerate()
                .filter(|(_, c)| !c.is_empty())
                .map(move |(i, _)| (r, i))
        })
        .collect();
    let (v, ty) = match filled.as_slice() {
        [] => (Value::Null, Value::Null),
        [(0, 0)] => typed(&p[0][0]),
        _ => (Value::Null, json!("CM")),
    };
    (v, ty, Some(json!(p)))
}

/// The canonical local code: parts written with the default delimiters, joined by `^`.
fn canonical(local: &[String]) -> String {
    local
        .iter()
        .map(|p| {
            p.replace('&', "&E&")
                .replace('|', "&F&")
                .replace('\\', "&R&")
                .replace('^', "&S&")
        })
        .collect::<Vec<_>>()
        .join("^")
}

/// A universal test ID repeat, or `None` when all its components are empty.
fn code(repeat: &str, d: Delims) -> Option<Value> {
    let comps: Vec<String> = repeat
        .split(d.component)
        .map(|c| unescape(c, d).trim().to_owned())
        .collect();
    if comps.iter().all(String::is_empty) {
        return None;
    }
    let at = |i: usize| text_or_null(comps.get(i).map_or("", String::as_str));
    let mut local: Vec<String> = comps.iter().skip(3).cloned().collect();
    while local.last().is_some_and(String::is_empty) {
        local.pop();
    }
    let local_code = if local.is_empty() {
        Value::Null
    } else {
        json!(canonical(&local))
    };
    let panel = if local.len() > 1 && !local[0].is_empty() {
        json!(local[0])
    } else {
        Value::Null
    };
    let (code, from, system) = if comps[0].is_empty() {
        let from = if local_code.is_null() {
            Value::Null
        } else {
            json!("local")
        };
        (local_code.clone(), from, Value::Null)
    } else {
        (json!(comps[0]), json!("universal"), at(2))
    };
    Some(json!({
        "code": code, "code_from": from, "text": at(1), "system": system,
        "universal_id": at(0), "universal_system": at(2), "local_code": local_code,
        "local": local, "panel": panel, "components": comps,
    }))
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// A timestamp: the first component of the first repeat, as sent (escapes not decoded).
/// P-8 as the contract reads it: the calendar date as sent (never an instant), and the time of
/// day apart, as a local time with the offset sent (never applied).
fn birth(raw: &str, d: Delims) -> (Value, Value) {
    let t = time(raw, d);
    if t.is_null() || t["value"].is_null() {
        return (t, Value::Null);
    }
    let first = t["astm"].as_str().unwrap().to_owned();
    let body: String = first.chars().take_while(char::is_ascii_digit).collect();
    if body.len() <= 8 {
        return (t, Value::Null);
    }
    let value = t["value"].as_str().unwrap();
    let date = json!({"value": &value[..10], "astm": first, "precision": "day", "zone": null});
    let (shown, precision) = match body.len() {
        10 => (body[8..10].to_owned(), "hour"),
        12 => (format!("{}:{}", &body[8..10], &body[10..12]), "minute"),
        _ => (
            format!("{}:{}:{}", &body[8..10], &body[10..12], &body[12..14]),
            "second",
        ),
    };
    let mut time = json!({"value": shown, "precision": precision});
    if let Some(i) = first.find(['+', '-']) {
        let o = &first[i..];
        time["offset"] = json!(format!("{}:{}", &o[..3], &o[3..]));
    }
    (date, time)
}

fn time(raw: &str, d: Delims) -> Value {
    let first = raw
        .split(d.repeat)
        .next()
        .unwrap()
        .split(d.component)
        .next()
        .unwrap()
        .trim();
    if first.is_empty() {
        return Value::Null;
    }
    let invalid = json!({"value": null, "astm": first, "precision": null, "zone": null});
    let (body, offset) = match first.find(['+', '-']) {
        Some(i) => (&first[..i], Some(&first[i..])),
        None => (first, None),
    };
    if !body.chars().all(|c| c.is_ascii_digit()) {
        return invalid;
    }
    let n = |from: usize, len: usize| {
        body.get(from..from + len)
            .map(|s| s.parse::<u32>().unwrap())
    };
    let precision = match body.len() {
        4 => "year",
        6 => "month",
        8 => "day",
        10 => "hour",
        12 => "minute",
        14 => "second",
        _ => return invalid,
    };
    let y = n(0, 4).unwrap() as i32;
    let (mo, day) = (n(4, 2).unwrap_or(1), n(6, 2).unwrap_or(1));
    if !(1..=12).contains(&mo) || day == 0 || day > days_in_month(y, mo) {
        return invalid;
    }
    let (h, mi, s) = (
        n(8, 2).unwrap_or(0),
        n(10, 2).unwrap_or(0),
        n(12, 2).unwrap_or(0),
    );
    if h > 23 || mi > 59 || s > 59 {
        return invalid;
    }
    let value = match body.len() {
        4 => format!("{y:04}"),
        6 => format!("{y:04}-{mo:02}"),
        8 => format!("{y:04}-{mo:02}-{day:02}"),
        _ => {
            let local = format!("{y:04}-{mo:02}-{day:02}T{h:02}:{mi:02}:{s:02}");
            let off = match offset {
                Some(o) => format!("{}:{}", &o[..3], &o[3..]),
                None => {
                    let dt: jiff::civil::DateTime = local.parse().unwrap();
                    let secs = dt.to_zoned_datetime(london()).unwrap().offset().seconds();
                    format!("+{:02}:{:02}", secs / 3600, secs % 3600 / 60)
                }
            };
            format!("{local}{off}")
        }
    };
    let zone = match (body.len() > 8, offset) {
        (false, _) => Value::Null,
        (true, Some(_)) => json!("given"),
        (true, None) => json!("assumed"),
    };
    json!({"value": value, "astm": first, "precision": precision, "zone": zone})
}

fn sequence(raw: &str) -> Value {
    raw.trim().parse::<u32>().map_or(Value::Null, |n| json!(n))
}

/// C-4 for reading: each repeat's non-empty components joined by a space, repeats by a newline.
fn comment_text(raw: &str, d: Delims) -> Value {
    let text = parts(raw, d)
        .into_iter()
        .map(|r| {
            r.into_iter()
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|r| !r.is_empty())
        .collect::<Vec<_>>()
        .join("\n");
    text_or_null(&text)
}

/// The text with the header's H-4 replaced by `***` (when not empty).
fn masked(text: &str, d: Delims) -> String {
    let end = text.find(['\r', '\n']).unwrap_or(text.len());
    let mut fields: Vec<&str> = text[..end].split(d.field).collect();
    if fields.len() > 3 && !fields[3].is_empty() {
        fields[3] = "***";
    }
    format!("{}{}", fields.join(&d.field.to_string()), &text[end..])
}

// ---------------------------------------------------------------------------------------------
// Comparison.

#[derive(Default)]
struct Tally {
    records: BTreeMap<char, usize>,
    fields: usize,
    disagreements: Vec<String>,
    explained: usize,
    raw_only: BTreeMap<String, usize>,
}

/// Numbers compare by value (5 and 5.0 are the same JSON number).
fn norm(v: &Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64().unwrap()),
        Value::Array(a) => Value::Array(a.iter().map(norm).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), norm(v))).collect()),
        v => v.clone(),
    }
}

impl Tally {
    fn disagree(&mut self, fixture: &str, at: &str, member: &str, detail: String) {
        if let Some((_, quote)) = EXPLAINED.iter().find(|(m, _)| *m == member) {
            assert!(
                CONTRACT.contains(quote),
                "EXPLAINED quotes text not in docs/contract.md: {quote:?}"
            );
            self.explained += 1;
        } else {
            self.disagreements
                .push(format!("{fixture} {at} {member}: {detail}"));
        }
    }
}

/// One output object being compared: every member must be compared exactly once.
struct Obj<'t, 'v> {
    t: &'t mut Tally,
    fixture: &'t str,
    at: String,
    v: &'v Value,
    seen: BTreeSet<String>,
}

impl<'t, 'v> Obj<'t, 'v> {
    fn new(t: &'t mut Tally, fixture: &'t str, at: String, v: &'v Value) -> Self {
        if !v.is_object() {
            t.disagree(fixture, &at, "(object)", format!("missing: {v}"));
        }
        Obj {
            t,
            fixture,
            at,
            v,
            seen: BTreeSet::new(),
        }
    }

    /// `want: None` means the member must be absent.
    fn m(&mut self, member: &str, want: Option<Value>) {
        self.t.fields += 1;
        self.seen.insert(member.to_owned());
        let got = self.v.get(member).map(norm);
        let want = want.as_ref().map(norm);
        if got != want {
            let detail = format!("want {want:?}, got {got:?}");
            self.t.disagree(self.fixture, &self.at, member, detail);
        }
    }

    fn v(&mut self, member: &str, want: Value) {
        self.m(member, Some(want));
    }

    fn scalar(&mut self, member: &str, raw: &str, d: Delims) {
        let (v, reps) = scalar(raw, d);
        self.v(member, v);
        self.m(&format!("{member}_repeats"), reps);
    }

    /// A member compared elsewhere (a child array walked record by record).
    fn walked(&mut self, member: &str) {
        self.seen.insert(member.to_owned());
    }

    fn finish(self) {
        if let Some(o) = self.v.as_object() {
            for k in o.keys().filter(|k| !self.seen.contains(*k)) {
                self.t
                    .disagree(self.fixture, &self.at, k, "member not compared".into());
            }
        }
    }
}

/// Compares one message's `astm` object (and the record's ASTM members) with the reading.
/// Comments go to the comments array of the last record that is not a comment.
fn compare_message(t: &mut Tally, fixture: &Fixture, rec: &Value) {
    let name = fixture.name.as_str();
    let text = oracle_text(fixture);
    let (d, recs) = split_message(&text);
    let astm = &rec["astm"];
    // Array pointer -> number of elements the message implies.
    let mut lengths: BTreeMap<String, usize> = BTreeMap::new();
    let next = |lengths: &mut BTreeMap<String, usize>, array: String| -> String {
        let n = lengths.entry(array.clone()).or_insert(0);
        *n += 1;
        format!("{array}/{}", *n - 1)
    };
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut attach = "/comments".to_owned();
    let mut patient: Option<String> = None;
    let mut order: Option<String> = None;
    for arr in [
        "/comments",
        "/patients",
        "/queries",
        "/manufacturer_records",
        "/other_records",
    ] {
        lengths.insert(arr.into(), 0);
    }

    let at_ptr = |ptr: &str| astm.pointer(ptr).unwrap_or(&Value::Null);
    let new_patient = |lengths: &mut BTreeMap<String, usize>, ptr: &str| {
        lengths.insert(format!("{ptr}/comments"), 0);
        lengths.insert(format!("{ptr}/orders"), 0);
    };
    let new_order = |lengths: &mut BTreeMap<String, usize>, ptr: &str| {
        lengths.insert(format!("{ptr}/comments"), 0);
        lengths.insert(format!("{ptr}/observations"), 0);
    };

    for r in &recs {
        *counts.entry(r.kind.to_string()).or_insert(0) += 1;
        *t.records.entry(r.kind).or_insert(0) += 1;
        let at = format!("line {} ({})", r.line, r.kind);
        match r.kind {
            'H' => {
                let v = &astm["instrument"];
                let mut o = Obj::new(t, name, at, v);
                let sender = &parts(r.f(5), d)[0];
                let get = |i: usize| text_or_null(sender.get(i).map_or("", String::as_str));
                o.v("name", get(0));
                o.v("software_version", get(1));
                o.v("serial_number", get(2));
                o.v(
                    "sender",
                    if sender.iter().all(String::is_empty) {
                        json!([])
                    } else {
                        json!(sender)
                    },
                );
                o.scalar("message_control_id", r.f(3), d);
                o.scalar("receiver_id", r.f(10), d);
                o.scalar("processing_id", r.f(12), d);
                o.scalar("version", r.f(13), d);
                o.v("message_datetime", time(r.f(14), d));
                o.finish();
            }
            'P' => {
                let ptr = next(&mut lengths, "/patients".into());
                new_patient(&mut lengths, &ptr);
                let mut o = Obj::new(t, name, at, at_ptr(&ptr));
                o.v("sequence", sequence(r.f(2)));
                o.scalar("practice_patient_id", r.f(3), d);
                o.scalar("laboratory_patient_id", r.f(4), d);
                o.scalar("patient_id_3", r.f(5), d);
                let n = &parts(r.f(6), d)[0];
                let get = |i: usize| text_or_null(n.get(i).map_or("", String::as_str));
                let name_v = if n.iter().take(5).all(String::is_empty) {
                    Value::Null
                } else {
                    json!({"family": get(0), "given": get(1), "middle": get(2),
                           "suffix": get(3), "title": get(4)})
                };
                o.v("name", name_v);
                let (birth_date, birth_time) = birth(r.f(8), d);
                o.v("birth_date", birth_date);
                o.v("birth_time", birth_time);
                o.scalar("sex", r.f(9), d);
                o.m("implied", None);
                o.walked("comments");
                o.walked("orders");
                o.finish();
                for (n, _) in r.fields.iter().enumerate().filter(|(_, f)| !f.is_empty()) {
                    if n + 1 == 7 || n + 1 > 9 {
                        *t.raw_only.entry(format!("P-{}", n + 1)).or_insert(0) += 1;
                    }
                }
                patient = Some(ptr.clone());
                order = None;
                attach = format!("{ptr}/comments");
            }
            'O' => {
                let p = match &patient {
                    Some(p) => p.clone(),
                    None => {
                        let ptr = next(&mut lengths, "/patients".into());
                        new_patient(&mut lengths, &ptr);
                        implied(
                            t,
                            name,
                            &format!("{at} implied patient"),
                            at_ptr(&ptr),
                            true,
                        );
                        patient = Some(ptr.clone());
                        ptr
                    }
                };
                let ptr = next(&mut lengths, format!("{p}/orders"));
                new_order(&mut lengths, &ptr);
                let mut o = Obj::new(t, name, at, at_ptr(&ptr));
                o.v("sequence", sequence(r.f(2)));
                o.scalar("specimen_id", r.f(3), d);
                o.scalar("instrument_specimen_id", r.f(4), d);
                let codes: Vec<Value> = r.f(5).split(d.repeat).filter_map(|c| code(c, d)).collect();
                o.v("universal_test_id", json!(codes));
                o.scalar("priority", r.f(6), d);
                o.v("requested_at", time(r.f(7), d));
                o.v("collected_at", time(r.f(8), d));
                o.scalar("action_code", r.f(12), d);
                o.scalar("report_type", r.f(26), d);
                o.m("implied", None);
                o.walked("comments");
                o.walked("observations");
                o.finish();
                for (n, _) in r.fields.iter().enumerate().filter(|(_, f)| !f.is_empty()) {
                    let n = n + 1;
                    if (9..=11).contains(&n) || (13..=25).contains(&n) || n > 26 {
                        *t.raw_only.entry(format!("O-{n}")).or_insert(0) += 1;
                    }
                }
                order = Some(ptr.clone());
                attach = format!("{ptr}/comments");
            }
            'R' => {
                let p = match &patient {
                    Some(p) => p.clone(),
                    None => {
                        let ptr = next(&mut lengths, "/patients".into());
                        new_patient(&mut lengths, &ptr);
                        implied(
                            t,
                            name,
                            &format!("{at} implied patient"),
                            at_ptr(&ptr),
                            true,
                        );
                        patient = Some(ptr.clone());
                        ptr
                    }
                };
                let o_ptr = match &order {
                    Some(o) => o.clone(),
                    None => {
                        let ptr = next(&mut lengths, format!("{p}/orders"));
                        new_order(&mut lengths, &ptr);
                        implied(t, name, &format!("{at} implied order"), at_ptr(&ptr), false);
                        order = Some(ptr.clone());
                        ptr
                    }
                };
                let ptr = next(&mut lengths, format!("{o_ptr}/observations"));
                lengths.insert(format!("{ptr}/comments"), 0);
                let mut o = Obj::new(t, name, at, at_ptr(&ptr));
                o.v("set_id", sequence(r.f(2)));
                o.v(
                    "code",
                    code(r.f(3).split(d.repeat).next().unwrap(), d).unwrap_or(Value::Null),
                );
                let (v, ty, reps) = value(r.f(4), d);
                o.v("value", v);
                o.v("value_type", ty);
                o.v("value_text", text_or_null(r.f(4)));
                o.m("value_repeats", reps);
                o.scalar("units", r.f(5), d);
                o.scalar("reference_range", r.f(6), d);
                let flags = parts(r.f(7), d);
                let firsts: Vec<&String> = flags
                    .iter()
                    .map(|f| &f[0])
                    .filter(|f| !f.is_empty())
                    .collect();
                o.v("abnormal_flags", json!(firsts));
                o.m(
                    "abnormal_flags_repeats",
                    r.f(7).contains(d.component).then(|| json!(flags)),
                );
                o.scalar("result_status", r.f(9), d);
                o.scalar("operator", r.f(11), d);
                o.v("started_at", time(r.f(12), d));
                o.v("completed_at", time(r.f(13), d));
                o.scalar("instrument_id", r.f(14), d);
                o.walked("comments");
                o.finish();
                for (n, _) in r.fields.iter().enumerate().filter(|(_, f)| !f.is_empty()) {
                    let n = n + 1;
                    if n == 8 || n == 10 || n > 14 {
                        *t.raw_only.entry(format!("R-{n}")).or_insert(0) += 1;
                    }
                }
                attach = format!("{ptr}/comments");
            }
            'C' => {
                let ptr = next(&mut lengths, attach.clone());
                let mut o = Obj::new(t, name, at, at_ptr(&ptr));
                o.v("sequence", sequence(r.f(2)));
                o.scalar("source", r.f(3), d);
                o.v("text", comment_text(r.f(4), d));
                o.m(
                    "text_repeats",
                    has_parts(r.f(4), d).then(|| json!(parts(r.f(4), d))),
                );
                o.scalar("comment_type", r.f(5), d);
                o.finish();
                for (n, _) in r.fields.iter().enumerate().filter(|(_, f)| !f.is_empty()) {
                    if n + 1 > 5 {
                        *t.raw_only.entry(format!("C-{}", n + 1)).or_insert(0) += 1;
                    }
                }
            }
            'L' => {
                let mut o = Obj::new(t, name, at, astm);
                o.scalar("termination_code", r.f(3), d);
                o.v("complete", json!(true));
                o.finish_partial();
            }
            kind => {
                let array = match kind {
                    'Q' => "/queries",
                    'M' => "/manufacturer_records",
                    _ => "/other_records",
                };
                let ptr = next(&mut lengths, array.into());
                lengths.insert(format!("{ptr}/comments"), 0);
                let mut o = Obj::new(t, name, at, at_ptr(&ptr));
                o.v("line", json!(r.line));
                o.v("record_type", json!(kind.to_string()));
                o.v("fields", json!(r.fields));
                o.walked("comments");
                o.finish();
                attach = format!("{ptr}/comments");
            }
        }
    }

    // The message as a whole.
    let mut o = Obj::new(t, name, "message".into(), astm);
    o.v(
        "delimiters",
        json!({"field": d.field.to_string(), "repeat": d.repeat.to_string(),
               "component": d.component.to_string(), "escape": d.escape.to_string()}),
    );
    o.v("record_counts", json!(counts));
    if !counts.contains_key("L") {
        o.v("complete", json!(false));
        o.v("termination_code", Value::Null);
        o.m("termination_code_repeats", None);
    } else {
        for m in ["complete", "termination_code", "termination_code_repeats"] {
            o.walked(m);
        }
    }
    for m in [
        "instrument",
        "comments",
        "patients",
        "queries",
        "manufacturer_records",
        "other_records",
    ] {
        o.walked(m);
    }
    o.finish();

    // Every array exactly as long as the message implies.
    for (ptr, want) in &lengths {
        t.fields += 1;
        let got = astm.pointer(ptr).and_then(Value::as_array).map(Vec::len);
        if got != Some(*want) {
            t.disagree(name, ptr, "(length)", format!("want {want}, got {got:?}"));
        }
    }

    // The record around it.
    let mut o = Obj::new(t, name, "record".into(), rec);
    o.v("format", json!("astm"));
    o.v("charset", json!(fixture.charset.charset_name()));
    o.v("complete", json!(counts.contains_key("L")));
    o.v("raw", json!(masked(&text, d)));
    o.finish_partial();
}

impl Obj<'_, '_> {
    /// For objects compared in several places (the message object's L members, the record's
    /// ASTM members): no check for uncompared members here.
    fn finish_partial(self) {}
}

/// A placeholder patient or order: nothing but `implied: true` and empty lists.
fn implied(t: &mut Tally, fixture: &str, at: &str, v: &Value, patient: bool) {
    let mut o = Obj::new(t, fixture, at.to_owned(), v);
    let nulls: &[&str] = if patient {
        &[
            "sequence",
            "practice_patient_id",
            "laboratory_patient_id",
            "patient_id_3",
            "name",
            "birth_date",
            "birth_time",
            "sex",
        ]
    } else {
        &[
            "sequence",
            "specimen_id",
            "instrument_specimen_id",
            "priority",
            "requested_at",
            "collected_at",
            "action_code",
            "report_type",
        ]
    };
    for m in nulls {
        o.v(m, Value::Null);
    }
    if !patient {
        o.v("universal_test_id", json!([]));
        o.walked("observations");
    } else {
        o.walked("orders");
    }
    o.walked("comments");
    o.v("implied", json!(true));
    o.finish();
}

#[test]
fn every_astm_member_agrees_with_an_independent_reading_of_the_fixtures() {
    let mut t = Tally::default();
    let fixtures = fixtures();
    for f in &fixtures {
        let rec = record(f);
        assert!(rec["astm"].is_object(), "{}: not parsed: {rec:#}", f.name);
        compare_message(&mut t, f, &rec);
    }
    let records: usize = t.records.values().sum();
    let by_type: Vec<String> = t.records.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let raw_only: Vec<String> = t
        .raw_only
        .iter()
        .map(|(k, v)| format!("{k} x{v}"))
        .collect();
    println!(
        "ASTM differential: {} fixtures, {records} records ({}), {} fields compared, {} disagreements ({} explained in docs/contract.md, {} unexplained)",
        fixtures.len(),
        by_type.join(", "),
        t.fields,
        t.disagreements.len() + t.explained,
        t.explained,
        t.disagreements.len(),
    );
    println!(
        "non-empty P/O/R/C fields the record carries only in raw (contract: \"Fields not listed\"): {}",
        raw_only.join(", ")
    );
    assert!(
        t.disagreements.is_empty(),
        "{} disagreements not explained in docs/contract.md:\n{}",
        t.disagreements.len(),
        t.disagreements.join("\n")
    );
    for kind in ['P', 'O', 'R', 'C', 'Q', 'M', 'L'] {
        assert!(
            t.records.get(&kind).is_some_and(|n| *n > 0),
            "no {kind} record compared"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The schema.

/// Property names per definition of the `astm` part of the record schema.
fn schema_members() -> BTreeMap<String, BTreeSet<String>> {
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    let astm = &schema["properties"]["astm"];
    let mut out = BTreeMap::new();
    let names = |v: &Value| -> BTreeSet<String> {
        v["properties"]
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    out.insert("astm".to_owned(), names(astm));
    out.insert(
        "instrument".to_owned(),
        names(&astm["properties"]["instrument"]),
    );
    out.insert(
        "delimiters".to_owned(),
        names(&astm["properties"]["delimiters"]),
    );
    out.insert(
        "name".to_owned(),
        names(&astm["$defs"]["patient"]["properties"]["name"]),
    );
    for (k, v) in astm["$defs"].as_object().unwrap() {
        if v.get("properties").is_some() {
            out.insert(k.clone(), names(v));
        }
    }
    out
}

/// Property names per definition that the records actually carry.
fn produced(v: &Value, def: &str, out: &mut BTreeMap<String, BTreeSet<String>>) {
    let Some(o) = v.as_object() else { return };
    for (k, child) in o {
        out.entry(def.to_owned()).or_default().insert(k.clone());
        let child_def = match (def, k.as_str()) {
            ("astm", "instrument") => "instrument",
            ("astm", "delimiters") => "delimiters",
            (_, "comments") => "comment",
            ("astm", "patients") => "patient",
            ("astm", "queries" | "manufacturer_records" | "other_records") => "raw_record",
            ("patient", "name") => "name",
            ("patient", "orders") => "order",
            ("order", "observations") => "observation",
            ("order", "universal_test_id") | ("observation", "code") => "code",
            (
                _,
                "birth_date" | "requested_at" | "collected_at" | "started_at" | "completed_at"
                | "message_datetime",
            ) => "time",
            _ => continue,
        };
        match child {
            Value::Array(items) => items.iter().for_each(|i| produced(i, child_def, out)),
            other => produced(other, child_def, out),
        }
    }
}

#[test]
fn the_schema_defines_every_astm_member_and_the_fixtures_produce_every_one() {
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    let mut seen = BTreeMap::new();
    for f in fixtures() {
        let rec = record(&f);
        let errors: Vec<String> = validator.iter_errors(&rec).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{}: {errors:?}\n{rec:#}", f.name);
        produced(&rec["astm"], "astm", &mut seen);
    }
    let defined = schema_members();
    for (def, members) in &defined {
        let got = seen.get(def).cloned().unwrap_or_default();
        let missing: Vec<_> = members.difference(&got).collect();
        assert!(missing.is_empty(), "no fixture produces {def}.{missing:?}");
    }
    // And an undocumented member is refused (additionalProperties: false throughout).
    let mut rec = record(&fixtures()[0]);
    rec["astm"]["patients"][0]["orders"][0]["observations"][0]["x"] = json!(1);
    assert!(!validator.is_valid(&rec));
}

// ---------------------------------------------------------------------------------------------
// What a user would notice, fixture by fixture.

fn by_name(name: &str) -> Value {
    let f = fixtures().into_iter().find(|f| f.name == name).unwrap();
    record(&f)
}

#[test]
fn the_header_password_appears_nowhere_in_any_record() {
    for f in fixtures() {
        let json = String::from_utf8(serde_json::to_vec(&record(&f)).unwrap()).unwrap();
        for secret in ["PSWD", "Password1"] {
            assert!(!json.contains(secret), "{}: {secret} in {json}", f.name);
        }
    }
    let r = by_name("header_password.astm");
    assert!(
        r["raw"]
            .as_str()
            .unwrap()
            .starts_with("H|\\^&|PWD0001|***|POCSIM")
    );
    let r = by_name("other_delimiters_password.astm");
    assert!(
        r["raw"]
            .as_str()
            .unwrap()
            .starts_with("H!@#$!PWD0002!***!NEUTSIM")
    );
    // The stored bytes keep it (exports and audit on the box), the record does not.
    let f = fixtures()
        .into_iter()
        .find(|f| f.name == "header_password.astm")
        .unwrap();
    assert!(String::from_utf8_lossy(&f.bytes).contains("|PSWD|"));
}

#[test]
fn analytes_of_one_panel_get_distinct_codes_in_real_shaped_messages() {
    let r = by_name("chemistry_ise_chem12.astm");
    let obs = r["astm"]["patients"][0]["orders"][0]["observations"]
        .as_array()
        .unwrap();
    let codes: Vec<&str> = obs
        .iter()
        .map(|o| o["code"]["code"].as_str().unwrap())
        .collect();
    assert_eq!(&codes[..4], ["ISE^NA", "ISE^K", "ISE^CL", "CHEM12^GLU"]);
    assert_eq!(codes.iter().collect::<BTreeSet<_>>().len(), 15, "{codes:?}");
    let r = by_name("microbiology_mic.astm");
    let obs = &r["astm"]["patients"][0]["orders"][0]["observations"];
    assert_eq!(obs[1]["code"]["code"], "AM^MIC");
    assert_eq!(obs[2]["code"]["code"], "AM^DOSAGE1^COSTCODE");
    let r = by_name("lis2a2_results_and_query.astm");
    let code = &r["astm"]["patients"][0]["orders"][0]["observations"][2]["code"];
    assert_eq!(
        (&code["code"], &code["system"]),
        (&json!("2951-2"), &json!("LN"))
    );
}

#[test]
fn the_tube_barcode_matches_and_multi_part_values_stay_parts() {
    let r = by_name("biorad_style_hba1c.astm");
    let o = &r["astm"]["patients"][0]["orders"][0];
    assert_eq!(o["instrument_specimen_id"], "1122206642");
    assert_eq!(o["instrument_specimen_id_repeats"][1][0], "1122206642");
    assert_eq!(o["observations"][0]["code"]["code"], "A1c");
    assert_eq!(o["observations"][0]["units"], "%");
    let r = by_name("serology_titres.astm");
    let o = &r["astm"]["patients"][0]["orders"][0];
    assert_eq!(
        (&o["specimen_id"], &o["specimen_id_repeats"]),
        (&json!("5762"), &json!([["5762", "01"]]))
    );
    let obs = &o["observations"];
    assert_eq!(
        (&obs[0]["value"], &obs[0]["value_text"]),
        (&json!(40), &json!("40^^"))
    );
    assert_eq!(
        (&obs[1]["value"], &obs[1]["value_type"]),
        (&Value::Null, &json!("CM"))
    );
    assert_eq!(obs[1]["value_repeats"], json!([["0", "0", "3.0"]]));
    let r = by_name("other_delimiters_password.astm");
    let obs = &r["astm"]["patients"][0]["orders"][0]["observations"];
    assert_eq!(
        (&obs[0]["value"], &obs[0]["value_text"]),
        (&json!(40), &json!("40##"))
    );
    assert_eq!(
        (&obs[1]["value"], &obs[1]["value_text"]),
        (&json!("40##"), &json!("40$S$$S$"))
    );
}

#[test]
fn a_windows_1252_analyser_comment_reads_as_written() {
    let r = by_name("windows_1252_comment.windows-1252.astm");
    assert_eq!(r["charset"], "windows-1252");
    let obs = &r["astm"]["patients"][0]["orders"][0]["observations"];
    assert_eq!(obs[0]["reference_range"], "3.5–5.0");
    assert_eq!(obs[0]["comments"][0]["text"], "„Probe hämolytisch“ €");
    assert_eq!(obs[1]["comments"][0]["text"], "Wert „geschätzt“ – Hämolyse");
    assert!(r["raw"].as_str().unwrap().contains("„Probe hämolytisch“ €"));
}
