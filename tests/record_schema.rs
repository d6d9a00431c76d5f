//! `docs/schema/record.v1.schema.json` against what the code emits: records built by the real
//! `RecordBuilder` from synthetic HL7 (every normalised section, every OBX value type, HL7 nulls,
//! unreadable values) must validate, and a record with a member the schema does not document
//! must not. No broker, no I/O beyond reading the schema at compile time.

use std::collections::{BTreeSet, HashMap};

use jiff::tz::TimeZone;
use serde_json::{Value, json};
use siterelay::hl7::charset::Charset;
use siterelay::hl7::normalise::{NormaliseOptions, normalise};
use siterelay::outbox::{Format, PendingRow, SourceKind};
use siterelay::record::{DeviceInfo, FeedRecordSettings, RecordBuilder};

const SCHEMA: &str = include_str!("../docs/schema/record.v1.schema.json");

fn validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(SCHEMA).expect("schema is JSON");
    jsonschema::validator_for(&schema).expect("schema compiles")
}

fn errors(v: &Value) -> Vec<String> {
    validator().iter_errors(v).map(|e| e.to_string()).collect()
}

fn assert_valid(name: &str, v: &Value) {
    let e = errors(v);
    assert!(
        e.is_empty(),
        "{name}: record violates its schema: {e:?}\n{v:#}"
    );
}

fn opts(demographics: bool) -> NormaliseOptions {
    NormaliseOptions {
        timezone: TimeZone::get("Europe/London").unwrap(),
        demographics,
        nhs_authorities: vec!["NHS".into()],
    }
}

/// The record the appliance would publish for `text`, built by the real builder.
fn record(text: &str, demographics: bool) -> Value {
    let settings = FeedRecordSettings {
        timezone: TimeZone::get("Europe/London").unwrap(),
        default_charset: Charset::Utf8,
        device: None,
        normalise: Some(opts(demographics)),
    };
    let builder = RecordBuilder {
        appliance: "test-box".into(),
        organisation: Some("RXX".into()),
        include_raw: true,
        feeds: HashMap::from([("pas".to_owned(), settings.clone())]),
        fallback: settings,
    };
    let row = PendingRow {
        row_id: 1,
        record_id: "019ad3f2-6c1e-7a31-9b4e-2f6d1c0a9e55".into(),
        feed: "pas".into(),
        seq: 1,
        received_at_us: 1_780_000_000_000_000,
        source_kind: SourceKind::Mllp,
        peer: Some("127.0.0.1:5000".into()),
        peer_certificate: None,
        format: Format::Hl7v2,
        raw: text.as_bytes().to_vec(),
        reprocessed: false,
        control_id_reused: false,
        truncated_bytes: 0,
    };
    let v: Value = serde_json::from_slice(&builder.build(&row)).expect("record is JSON");
    // The sections are exactly `Normalised` flattened.
    let n = serde_json::to_value(normalise(text, &opts(demographics))).unwrap();
    for (k, section) in n.as_object().unwrap() {
        assert_eq!(&v[k], section, "{k} is flattened as serialised");
    }
    v
}

fn hl7(segments: &[&str]) -> String {
    let mut s = segments.join("\r");
    s.push('\r');
    s
}

fn adt() -> String {
    hl7(&[
        "MSH|^~\\&|PAS|RXX|SITERELAY|HUB|20260601103000||ADT^A01^ADT_A01|MSG0001|P|2.4",
        "EVN|A01|20260601103000||ADM|OP1^OPERATOR|20260601102500",
        "PID|1|OLD1^^^RXX^PI|9990000018^^^NHS^NH~RXX0001^^^RXX&1.2.3&ISO^MR|ALT1^^^RYY|TEST^PATIENT^M^JR^MR^^L||19800615|F|||1 TEST STREET^FLAT 2^TESTTOWN^TESTSHIRE^ZZ99 9ZZ^GBR^H||||||||||||||||||20260101120000|Y|01",
        "PV1|1|I|WARD1^ROOM2^BED3^RXX|||WARD0^^^RXX|C111^CONSULTANT^TEST^^^DR|G222^GP^TEST|C333^OTHER^TEST|GEN||||19|||||V0001^^^RXX^VN|||||||||||||||||01||||||||20260601100000|20260605110000",
        "PV2|||||||20260601090000",
        "NTE|1||patient note",
    ])
}

/// Every OBX value type the normaliser types, with repetitions and unreadable values.
fn oru() -> String {
    hl7(&[
        "MSH|^~\\&|LAB|RXX|SITERELAY|HUB|20260601120000||ORU^R01^ORU_R01|LAB0001|P|2.5.1",
        "PID|1||LAB123^^^RXX^MR",
        "ORC|RE|PLC100^PAS|FIL200^LAB|GRP1^PAS|CM||^^^^^R||||||C999^ORC^TEST",
        "OBR|1|PLC100^PAS|FIL200^LAB|FBC^Full blood count^LOCAL|R|20260601080000|20260601090000|20260601091000||||||20260601093000||C123^CLINICIAN^TEST^^^DR||||||20260601110000||HM|F|HB&Haemoglobin&LOCAL^1|||PLC9&PAS^FIL9&LAB",
        "NTE|1||order note",
        "OBX|1|NM|HB^Haemoglobin^LOCAL||135|g/L^g/L^UCUM|115-165|N~L|||F|||20260601090000|LAB|||||||||LAB^Test Laboratory",
        "NTE|1||obx note",
        "OBX|2|NM|WBC^White cells^LOCAL||see report||||||F",
        "OBX|3|NM|PLT^Platelets^LOCAL||150~~170||||||F",
        "OBX|4|SN|CRP^CRP^LOCAL||<^5||||||F",
        "OBX|5|SN|RATIO^Ratio^LOCAL||^1^:^x~^2^:^3||||||F",
        "OBX|6|CE|ORG^Organism^LOCAL||NG^No growth^LOCAL||||||F",
        "OBX|7|CWE|RES^Result^LOCAL||260385009^Negative^SCT~^^||||||F",
        "OBX|8|CNE|YN^Yes no^LOCAL||Y^^HL70136||||||F",
        "OBX|9|TX|COMMENT^Comment^LOCAL||Line one~~Line three||||||F",
        "OBX|10|ST|STR^String^LOCAL||Positive||||||F",
        "OBX|11|FT|FMT^Formatted^LOCAL||A\\T\\B\\.br\\C||||||F",
        "OBX|12|DT|DATE^Date^LOCAL||20260615||||||F",
        "OBX|13|TS|TIME^Time^LOCAL||202606151030+0100||||||F",
        "OBX|14|DTM|BAD^Bad time^LOCAL||20261345||||||F",
        "OBX|15|TS|TIMES^Times^LOCAL||20260615~~20260616||||||F",
        "OBX|16|ED|PDF^Report^LOCAL||^AP^PDF^Base64^JVBERi0xLjQKJSVFT0YK||||||F",
        "OBX|17|ED|BIN^Binary^LOCAL||^XX^^^QUJD||||||F",
        "OBX|18|RP|URI^Link^LOCAL||http://x/y^URI||||||F",
        "OBX|19||FREE^Free^LOCAL||free text||||||F",
        "OBX|20| nm |LOW^Lower case type^LOCAL||7||||||F",
        "OBX|x|ST|BADSET^Bad set id^LOCAL||x||||||F",
    ])
}

fn a40() -> String {
    hl7(&[
        "MSH|^~\\&|PAS|RXX|SITERELAY|HUB|20260601103000||ADT^A40^ADT_A39|MSG0002|P|2.4",
        "EVN|A40|20260601100000",
        "PID|1||9990000018^^^NHS^NH~RXX0002^^^RXX^MR||TEST^PATIENT",
        "MRG|RXX0001^^^RXX^MR~OLD9^^^RYY^PI||ACC1^^^RXX^AN||V0009^^^RXX^VN||TEST^OLDNAME",
    ])
}

fn siu() -> String {
    hl7(&[
        "MSH|^~\\&|PAS|RXX|SITERELAY|HUB|20260328100000||SIU^S12^SIU_S12|SCH0001|P|2.5",
        "SCH|PLA100^PAS|FIL100^CLINIC|1|||NEW^New booking^LOCAL|FUP^Follow-up^LOCAL|NORMAL^\"\"^HL70277|60|min^minutes^UCUM|^^60^20260329003000^20260329023000&S|C111^CONSULTANT^TEST^^^DR||||\"\"|||||||||Booked^Booked^HL70278",
        "NTE|1||appointment note",
        "PID|1||9990000018^^^NHS^NH||TEST^PATIENT",
        "PV1|1|O|CLINIC1^^^RXX",
        "RGS|1|A",
        "AIS|1|A|CARD^Cardiology outpatient^LOCAL|20260329003000|||60|min^minutes^UCUM||Booked",
        "NTE|1||bring previous letters",
        "AIG|2|A|ECG1^ECG machine^LOCAL|EQUIPMENT||||20260329024500|||15|min||Booked",
        "AIL|3|A|CLINIC1^\"\"^^RXX|||20260329003000|||60|min||Booked",
        "AIP|4|A|C111^CONSULTANT^TEST^^^DR|ATTENDING||20260329023000|||30|\"\"||Pending",
    ])
}

fn mdm() -> String {
    hl7(&[
        "MSH|^~\\&|EPR|RXX|SITERELAY|HUB|20261026120000||MDM^T02^MDM_T02|DOC0001|P|2.5",
        "EVN|T02|20261026120000",
        "PID|1||9990000018^^^NHS^NH||TEST^PATIENT",
        "PV1|1|I|WARD1^^^RXX",
        "TXA|1|DS|TX|20261026093000|C123^CLINICIAN^TEST|20261024153000||20261026100000~20261026110000|C123^CLINICIAN^TEST^^^DR~C124^REGISTRAR^TEST||T55^TYPIST^TEST|DOC100^EPR|\"\"|PLC300^PAS|FIL300^LAB|discharge_100.txt|AU|\"\"|AV|AC",
        "OBX|1|TX|DS^Discharge summary^LOCAL||Discharged home.||||||F",
        "OBX|2|TX|DS^Discharge summary^LOCAL||Follow up in clinic.~~Signed.||||||F",
        "OBX|3|FT|DS^Discharge summary^LOCAL||Line one\\.br\\Line two||||||F",
    ])
}

/// HL7 nulls and unreadable values in every section.
fn nulls() -> String {
    hl7(&[
        "MSH|^~\\&|PAS|RXX|SITERELAY|HUB|20260601103000||ADT^A08^ADT_A01|MSG0003|P|2.5",
        "EVN|\"\"|\"\"|2026x|\"\"|\"\"|\"\"",
        "PID|1||\"\"^^^NHS^NH~RXX1^^^\"\"^\"\"||\"\"||\"\"|\"\"|||\"\"||||||||||||||||||\"\"|\"\"|\"\"",
        "PV1|1|\"\"|\"\"|||WARD0^\"\"|\"\"|C1^\"\"|||||||||||\"\"|||||||||||||||||\"\"||||||||\"\"|\"\"",
        "PV2|||||||\"\"",
        "MRG|\"\"||\"\"||RXX^\"\"||\"\"",
        "ORC|\"\"|\"\"|\"\"|\"\"|\"\"||^^^^^\"\"||||||\"\"",
        "OBR|1|||\"\"|\"\"|\"\"|\"\"|\"\"||||||\"\"||\"\"||||||\"\"||\"\"|\"\"|\"\"|||\"\"",
        "OBX|\"\"|\"\"|\"\"|\"\"|\"\"|\"\"|\"\"|\"\"|||\"\"|||\"\"|\"\"||||||||\"\"",
        "OBX|2|NM|X^X^L||\"\"",
        "OBX|3|CE|X^X^L||\"\"~A^B^C~",
        "SCH|\"\"|\"\"|\"\"|||\"\"|\"\"|\"\"|\"\"|\"\"|\"\"|\"\"||||\"\"|||||||||\"\"",
        "AIS|\"\"|\"\"|\"\"|\"\"|||\"\"|\"\"||\"\"",
        "AIG|x||\"\"||||||||ten",
        "AIL|2||\"\"|||\"\"",
        "AIP|3||\"\"|||bad",
        "TXA|\"\"|\"\"|\"\"|\"\"||\"\"||\"\"|\"\"||\"\"|\"\"|\"\"|\"\"|\"\"|\"\"|\"\"|\"\"|\"\"|\"\"",
    ])
}

fn all_messages() -> Vec<(&'static str, String)> {
    vec![
        ("adt", adt()),
        ("oru", oru()),
        ("a40", a40()),
        ("siu", siu()),
        ("mdm", mdm()),
        ("nulls", nulls()),
    ]
}

#[test]
fn the_schema_accepts_every_section_the_normaliser_emits() {
    for (name, text) in all_messages() {
        for demographics in [true, false] {
            let v = record(&text, demographics);
            assert_valid(&format!("{name} (demographics {demographics})"), &v);
        }
    }
    // The messages above do reach every section and value shape.
    let oru = record(&oru(), true);
    let values: Vec<&Value> = oru["observations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| &o["value"])
        .collect();
    assert!(values.iter().any(|v| v.is_number()));
    assert!(values.iter().any(|v| v.get("comparator").is_some()));
    assert!(values.iter().any(|v| v.get("system").is_some()));
    assert!(values.iter().any(|v| v.get("size_bytes").is_some()));
    assert!(values.iter().any(|v| v.get("precision").is_some()));
    assert!(values.iter().any(|v| v.get("invalid").is_some()));
    assert!(values.iter().any(|v| v.is_array()));
    assert!(oru["orders"][0]["parent"].is_object());
    let adt = record(&adt(), true);
    for section in ["patient", "visit", "event", "notes"] {
        assert!(adt.get(section).is_some(), "adt has {section}");
    }
    assert!(adt["patient"]["death"].is_object());
    assert!(record(&a40(), true)["merge"]["prior_names"].is_array());
    assert_eq!(
        record(&siu(), false)["appointment"]["resources"]
            .as_array()
            .map(Vec::len),
        Some(4)
    );
    assert!(record(&mdm(), false)["document"].is_object());
    let n = record(&nulls(), true);
    assert!(
        n["warnings"].as_array().is_some_and(|w| w.len() >= 4),
        "{n:#}"
    );
    for pointer in [
        "/patient/names",
        "/patient/nhs_number",
        "/visit/location",
        "/merge/prior_identifiers",
        "/orders/0/parent",
        "/observations/0/value",
        "/appointment/placer_appointment_id",
        "/appointment/start_at",
        "/appointment/resources/0/universal_service",
        "/document/author",
    ] {
        assert_eq!(n.pointer(pointer), Some(&Value::Null), "{pointer}");
    }
}

#[test]
fn the_schema_rejects_undocumented_members_and_wrong_shapes() {
    type Case = (
        &'static str,
        fn() -> String,
        &'static str,
        &'static str,
        Value,
    );
    let table: &[Case] = &[
        (
            "an unknown member in patient",
            adt,
            "/patient",
            "favourite_colour",
            json!("blue"),
        ),
        (
            "an unknown member in a name",
            adt,
            "/patient/names/0",
            "nickname",
            json!("x"),
        ),
        (
            "an unknown member in visit",
            adt,
            "/visit",
            "bed_manager",
            json!("x"),
        ),
        ("an unknown member in event", adt, "/event", "x", json!(1)),
        ("an unknown member in merge", a40, "/merge", "x", json!(1)),
        (
            "an unknown member in an order",
            oru,
            "/orders/0",
            "x",
            json!(1),
        ),
        (
            "an unknown member in an observation",
            oru,
            "/observations/0",
            "x",
            json!(1),
        ),
        (
            "a numeric value that is an object",
            oru,
            "/observations/0",
            "value",
            json!({"a": 1}),
        ),
        (
            "a coded value that is a number",
            oru,
            "/observations/5",
            "value",
            json!(5),
        ),
        (
            "a text value that is a number",
            oru,
            "/observations/8",
            "value",
            json!(5),
        ),
        (
            "a time with an unknown member",
            oru,
            "/observations/11/value",
            "tz",
            json!("x"),
        ),
        (
            "an invalid time with a value",
            oru,
            "/observations/13/value",
            "value",
            json!("2026"),
        ),
        (
            "an unknown member in appointment",
            siu,
            "/appointment",
            "x",
            json!(1),
        ),
        (
            "an unknown member in a resource",
            siu,
            "/appointment/resources/0",
            "x",
            json!(1),
        ),
        (
            "a service with a location",
            siu,
            "/appointment/resources/0",
            "location",
            json!({}),
        ),
        (
            "an unknown resource kind",
            siu,
            "/appointment/resources/0",
            "kind",
            json!("room"),
        ),
        (
            "an unknown member in document",
            mdm,
            "/document",
            "x",
            json!(1),
        ),
        (
            "a text document status",
            mdm,
            "/document",
            "completion_status",
            json!(1),
        ),
    ];
    for (name, msg, pointer, key, value) in table {
        let mut v = record(&msg(), true);
        assert_valid(name, &v);
        let target = v
            .pointer_mut(pointer)
            .and_then(Value::as_object_mut)
            .unwrap_or_else(|| panic!("{name}: no object at {pointer}"));
        target.insert((*key).to_owned(), value.clone());
        assert!(!errors(&v).is_empty(), "{name}: accepted\n{v:#}");
    }
}

/// Every member the schema documents, as `owner.member` where the owner is the `$defs` entry
/// that declares it (`coded.alt_code`, `patient.birth_time`) or the path from the nearest one
/// for inline objects (`record.source.kind`, `patient.death.date_time`); arrays add `.*`. Also
/// the members whose schema allows `null`. A definition used in several places (a coded value
/// in OBR-4 and in SCH-7) counts once: a fixture anywhere covers it.
fn documented(schema: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    fn walk(
        root: &Value,
        node: &Value,
        owner: &str,
        visited: &mut BTreeSet<String>,
        out: &mut BTreeSet<String>,
        nullable: &mut BTreeSet<String>,
    ) {
        if let Some(r) = node.get("$ref").and_then(Value::as_str) {
            let name = r.trim_start_matches("#/$defs/").to_owned();
            if visited.insert(name.clone()) {
                walk(root, &root["$defs"][&name], &name, visited, out, nullable);
            }
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            for sub in node
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                walk(root, sub, owner, visited, out, nullable);
            }
        }
        for key in ["then", "else"] {
            if let Some(sub) = node.get(key) {
                walk(root, sub, owner, visited, out, nullable);
            }
        }
        if let Some(items) = node.get("items") {
            walk(root, items, &format!("{owner}.*"), visited, out, nullable);
        }
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (k, sub) in props {
                let member = format!("{owner}.{k}");
                // A property that only narrows a referenced definition (birth_date narrows
                // `time`) declares nothing new.
                if node.get("$ref").is_none() {
                    out.insert(member.clone());
                    if allows_null(root, sub) {
                        nullable.insert(member.clone());
                    }
                }
                walk(root, sub, &member, visited, out, nullable);
            }
        }
    }
    let (mut out, mut nullable, mut visited) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    walk(
        schema,
        schema,
        "record",
        &mut visited,
        &mut out,
        &mut nullable,
    );
    (out, nullable)
}

/// Whether a schema node accepts JSON `null` (directly, or through `anyOf`/`oneOf`/`$ref`).
fn allows_null(root: &Value, node: &Value) -> bool {
    let direct = match node.get("type") {
        Some(Value::String(t)) => t == "null",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "null"),
        _ => false,
    };
    direct
        || node
            .get("$ref")
            .and_then(Value::as_str)
            .is_some_and(|r| allows_null(root, &root["$defs"][r.trim_start_matches("#/$defs/")]))
        || ["anyOf", "oneOf"].iter().any(|k| {
            node.get(*k)
                .and_then(Value::as_array)
                .is_some_and(|subs| subs.iter().any(|s| allows_null(root, s)))
        })
}

/// Marks the members of `value` (read against `node`, named as in [`documented`]) as seen,
/// and those that are `null`.
fn produced(
    root: &Value,
    node: &Value,
    owner: &str,
    value: &Value,
    seen: &mut BTreeSet<String>,
    nulls: &mut BTreeSet<String>,
) {
    // Every schema node that applies here, with its owner.
    fn branches<'s>(
        root: &'s Value,
        node: &'s Value,
        owner: &str,
        out: &mut Vec<(&'s Value, String)>,
    ) {
        out.push((node, owner.to_owned()));
        if let Some(r) = node.get("$ref").and_then(Value::as_str) {
            let name = r.trim_start_matches("#/$defs/");
            branches(root, &root["$defs"][name], name, out);
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            for sub in node
                .get(key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                branches(root, sub, owner, out);
            }
        }
        for key in ["then", "else"] {
            if let Some(sub) = node.get(key) {
                branches(root, sub, owner, out);
            }
        }
    }
    let mut all = Vec::new();
    branches(root, node, owner, &mut all);
    match value {
        Value::Object(m) => {
            for (k, v) in m {
                for (n, o) in &all {
                    if n.get("$ref").is_some() {
                        continue;
                    }
                    if let Some(sub) = n.get("properties").and_then(|p| p.get(k)) {
                        let member = format!("{o}.{k}");
                        seen.insert(member.clone());
                        if v.is_null() {
                            nulls.insert(member.clone());
                        }
                        produced(root, sub, &member, v, seen, nulls);
                    }
                }
            }
        }
        Value::Array(a) => {
            for (n, o) in &all {
                if let Some(items) = n.get("items") {
                    for x in a {
                        produced(root, items, &format!("{o}.*"), x, seen, nulls);
                    }
                }
            }
        }
        _ => {}
    }
}

/// Records built by the real builder from every fixture file: HL7 (`tests/fixtures/hl7`, every
/// message of a batch), ASTM (`tests/fixtures/astm`) and line-oriented output, with and without
/// the per-row flags and device metadata.
fn fixture_records() -> Vec<(String, Value)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut out = Vec::new();
    let settings = |device: Option<DeviceInfo>| FeedRecordSettings {
        timezone: TimeZone::get("Europe/London").unwrap(),
        default_charset: Charset::Latin1,
        device,
        normalise: Some(opts(true)),
    };
    let build = |format: Format, raw: Vec<u8>, device: Option<DeviceInfo>, flags: bool| {
        let serial = device.is_some();
        let s = settings(device);
        let builder = RecordBuilder {
            appliance: "test-box".into(),
            organisation: Some("RXX".into()),
            include_raw: true,
            feeds: HashMap::from([("f".to_owned(), s.clone())]),
            fallback: s,
        };
        let row = PendingRow {
            row_id: 1,
            record_id: "019ad3f2-6c1e-7a31-9b4e-2f6d1c0a9e55".into(),
            feed: "f".into(),
            seq: 1,
            received_at_us: 1_780_000_000_000_000,
            source_kind: if serial {
                SourceKind::Serial
            } else {
                SourceKind::Mllp
            },
            peer: Some("127.0.0.1:5000".into()),
            // A TLS sender's certificate, on the records that carry every optional flag.
            peer_certificate: (flags && !serial)
                .then(|| "CN=pas.trust.nhs.uk, O=Example NHS Trust".into()),
            format,
            raw,
            reprocessed: flags,
            control_id_reused: flags,
            // A device line cut at max_message_bytes, on the lines record with every flag.
            truncated_bytes: if flags && format == Format::Lines {
                300
            } else {
                0
            },
        };
        let v: Value = serde_json::from_slice(&builder.build_with(&row, flags)).unwrap();
        v
    };
    let mut files: Vec<_> = ["hl7", "astm"]
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(format!("{root}/tests/fixtures/{d}"))
                .into_iter()
                .flatten()
        })
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut bytes = std::fs::read(&path).unwrap();
        if name.ends_with(".hl7") {
            // The radiology report's PDF is made by the corpus test; a tiny one does here.
            bytes = String::from_utf8_lossy(&bytes)
                .replace("{PDF_BASE64}", "JVBERi0xLjQKJSVFT0YK")
                .into_bytes();
            for (i, m) in siterelay::client::split_messages(&bytes)
                .into_iter()
                .enumerate()
            {
                let m: Vec<u8> = if m.starts_with(b"MSH") {
                    m
                } else {
                    continue;
                };
                out.push((format!("{name}#{i}"), build(Format::Hl7v2, m, None, i == 0)));
            }
        } else {
            let device = DeviceInfo {
                model: Some("Analyser 1".into()),
                location: Some("Lab bench 2".into()),
                asset_tag: Some("RXX-0001".into()),
                protocol: "astm",
            };
            out.push((name, build(Format::Astm, bytes, Some(device), false)));
        }
    }
    let device = DeviceInfo {
        protocol: "lines",
        ..DeviceInfo::default()
    };
    out.push((
        "lines".into(),
        build(
            Format::Lines,
            b"HR 72\nSPO2 98\n".to_vec(),
            Some(device.clone()),
            false,
        ),
    ));
    out.push((
        "lines, cut".into(),
        build(
            Format::Lines,
            b"WAVEFORM 0102030405".to_vec(),
            Some(device),
            true,
        ),
    ));
    out
}

#[test]
fn every_schema_member_and_null_state_is_produced_by_some_fixture() {
    let schema: Value = serde_json::from_str(SCHEMA).unwrap();
    let (members, nullable) = documented(&schema);
    let (mut seen, mut nulls) = (BTreeSet::new(), BTreeSet::new());
    let records = fixture_records();
    for (name, v) in &records {
        assert_valid(name, v);
        produced(&schema, &schema, "record", v, &mut seen, &mut nulls);
    }
    let never: Vec<&String> = members.difference(&seen).collect();
    let never_null: Vec<&String> = nullable.difference(&nulls).collect();
    println!(
        "schema coverage: {} records, {} documented members ({} produced), {} nullable ({} seen null)",
        records.len(),
        members.len(),
        members.intersection(&seen).count(),
        nullable.len(),
        nullable.intersection(&nulls).count()
    );
    if std::env::var_os("SHOW_NULLS").is_some() {
        println!("never null: {never_null:?}");
    }
    assert!(
        never.is_empty(),
        "schema members no fixture produces ({}): {never:#?}",
        never.len()
    );
    assert!(
        never_null.is_empty(),
        "nullable members no fixture sends as HL7 null ({}): {never_null:#?}",
        never_null.len()
    );
}
