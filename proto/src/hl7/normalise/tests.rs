//! The test messages the sections' tests build on, and the tests of whole messages: the
//! three-state rule across sections, patient groups, where notes attach, delimiters and line
//! ends, unreadable headers, thousands of mutated messages, and the golden records in
//! `tests/golden/normalise/`.

use super::*;
use serde_json::{Value, json};

pub(super) const MSH_ADT: &str =
    "MSH|^~\\&|PAS|RXX|SITERELAY|HUB|20260601103000||ADT^A01^ADT_A01|MSG0001|P|2.4";
pub(super) const MSH_ORU: &str = "MSH|^~\\&|LAB|RXX|SITERELAY|HUB|20260601120000||ORU^R01^ORU_R01|LAB0001|P|2.5.1|||AL|NE||UNICODE UTF-8";

pub(super) const MSH_SIU: &str =
    "MSH|^~\\&|PAS|RXX|SITERELAY|HUB|20260328100000||SIU^S12^SIU_S12|SCH0001|P|2.5";
pub(super) const MSH_MDM: &str =
    "MSH|^~\\&|EPR|RXX|SITERELAY|HUB|20261026120000||MDM^T02^MDM_T02|DOC0001|P|2.5";

/// A message built from (segment id, [(field number, value)]) so field
/// positions in tests are explicit rather than counted pipes.
#[derive(Clone)]
pub(super) struct Msg {
    msh: &'static str,
    segs: Vec<(String, Vec<String>)>,
}

pub(super) fn msg(msh: &'static str, segs: &[(&str, &[(usize, &str)])]) -> Msg {
    let mut m = Msg {
        msh,
        segs: Vec::new(),
    };
    for (id, fields) in segs {
        m.segs.push((id.to_string(), Vec::new()));
        let i = m.segs.len() - 1;
        for (n, v) in *fields {
            m = m.set_nth(i, *n, v);
        }
    }
    m
}

impl Msg {
    fn set_nth(mut self, i: usize, n: usize, v: &str) -> Msg {
        let fields = &mut self.segs[i].1;
        if fields.len() < n {
            fields.resize(n, String::new());
        }
        fields[n - 1] = v.to_string();
        self
    }

    /// Sets field `n` of the first segment `id`.
    pub(super) fn set(self, id: &str, n: usize, v: &str) -> Msg {
        let i = self.segs.iter().position(|(s, _)| s == id).unwrap();
        self.set_nth(i, n, v)
    }

    pub(super) fn text(&self) -> String {
        let mut out = self.msh.to_string();
        for (id, fields) in &self.segs {
            out.push('\r');
            out.push_str(id);
            for f in fields {
                out.push('|');
                out.push_str(f);
            }
        }
        out.push('\r');
        out
    }
}

pub(super) fn london() -> TimeZone {
    TimeZone::get("Europe/London").unwrap()
}

pub(super) fn opts(demographics: bool) -> NormaliseOptions {
    NormaliseOptions {
        timezone: london(),
        demographics,
        nhs_authorities: vec!["NHS".into(), "NHSNBR".into()],
    }
}

pub(super) fn json_of(text: &str, o: &NormaliseOptions) -> Value {
    serde_json::to_value(normalise(text, o)).unwrap()
}

pub(super) fn adt() -> Msg {
    msg(
        MSH_ADT,
        &[
            (
                "EVN",
                &[
                    (1, "A01"),
                    (2, "20260601103000"),
                    (4, "ADM"),
                    (5, "OP123^OPERATOR^TEST"),
                    (6, "20260601102500"),
                ],
            ),
            (
                "PID",
                &[
                    (1, "1"),
                    (2, "OLD123^^^RXX^PI"),
                    (
                        3,
                        "9990000018^^^NHS^NH~RXX0001^^^RXX&2.16.840.1.113883.2.1.3.2.4.18.48&ISO^MR",
                    ),
                    (5, "TEST^PATIENT^MIDDLE^^MR^^L~TEST^PAT^^^^^A"),
                    (7, "19800615"),
                    (8, "F"),
                    (11, "1 TEST STREET^FLAT 2^TESTTOWN^TESTSHIRE^ZZ99 9ZZ^GBR^H"),
                    (29, "20260101120000"),
                    (30, "Y"),
                    (32, "01"),
                ],
            ),
            (
                "PV1",
                &[
                    (1, "1"),
                    (2, "I"),
                    (3, "WARD1^ROOM2^BED3^RXX"),
                    (6, "WARD0^^^RXX"),
                    (7, "C111^CONSULTANT^TEST^^^DR"),
                    (8, "G222^GP^TEST^^^DR"),
                    (10, "A&E"),
                    (14, "19"),
                    (19, "V0001^^^RXX^VN"),
                    (36, "01"),
                    (44, "20260601100000"),
                    (45, "20260605110000"),
                ],
            ),
            ("PV2", &[(8, "20260601090000")]),
            (
                "OBX",
                &[
                    (1, "1"),
                    (2, "NM"),
                    (3, "HEIGHT^Body height^LOCAL"),
                    (5, "172"),
                    (6, "cm^cm^UCUM"),
                    (7, "150-200"),
                    (8, "N"),
                    (11, "F"),
                    (14, "20260601100000"),
                ],
            ),
            ("ZPD", &[(1, "LOCAL")]),
        ],
    )
}

pub(super) fn oru() -> Msg {
    msg(
        MSH_ORU,
        &[
            (
                "PID",
                &[
                    (1, "1"),
                    (3, "9990000018^^^NHS^NH~LAB123^^^RXX^MR"),
                    (5, "TEST^PATIENT"),
                    (7, "19800615"),
                    (8, "F"),
                ],
            ),
            ("PV1", &[(1, "1"), (2, "O"), (3, "OPD1^^^RXX")]),
            (
                "ORC",
                &[
                    (1, "RE"),
                    (2, "PLC100^PAS"),
                    (3, "FIL200^LAB"),
                    (4, "GRP1^PAS"),
                    (5, "CM"),
                    (7, "^^^^^R"),
                    (12, "C999^ORCONLY^TEST"),
                ],
            ),
            (
                "OBR",
                &[
                    (1, "1"),
                    (2, "PLC100^PAS"),
                    (3, "FIL200^LAB"),
                    (4, "FBC^Full blood count^LOCAL"),
                    (7, "20260601090000"),
                    (14, "20260601093000"),
                    (16, "C123^CLINICIAN^TEST^^^DR"),
                    (22, "20260601110000"),
                    (24, "HM"),
                    (25, "F"),
                ],
            ),
            (
                "NTE",
                &[(1, "1"), (2, "L"), (3, "Sample slightly haemolysed")],
            ),
            (
                "OBX",
                &[
                    (1, "1"),
                    (2, "NM"),
                    (3, "HB^Haemoglobin^LOCAL"),
                    (5, "135"),
                    (6, "g/L^g/L^UCUM"),
                    (7, "115-165"),
                    (8, "N"),
                    (11, "F"),
                    (14, "20260601090000"),
                ],
            ),
            (
                "OBX",
                &[
                    (1, "2"),
                    (2, "NM"),
                    (3, "WBC^White cell count^LOCAL"),
                    (5, "11.6"),
                    (6, "10*9/L^10*9/L^UCUM"),
                    (7, "4.0-11.0"),
                    (8, "H"),
                    (11, "F"),
                    (14, "20260601090000"),
                ],
            ),
            ("NTE", &[(1, "1"), (2, "L"), (3, "Repeat advised")]),
            (
                "OBX",
                &[
                    (1, "3"),
                    (2, "SN"),
                    (3, "CRP^C-reactive protein^LOCAL"),
                    (5, "<^5"),
                    (6, "mg/L^mg/L^UCUM"),
                    (7, "0-5"),
                    (11, "F"),
                ],
            ),
            (
                "OBR",
                &[
                    (1, "2"),
                    (3, "FIL201^LAB"),
                    (4, "MICRO^Microbiology culture^LOCAL"),
                    (7, "20260601090000"),
                    (24, "MB"),
                    (25, "P"),
                    (29, "PLC100&PAS^FIL200&LAB"),
                ],
            ),
            (
                "OBX",
                &[
                    (1, "1"),
                    (2, "CE"),
                    (3, "ORG^Organism^LOCAL"),
                    (5, "NG^No growth^LOCAL"),
                    (11, "P"),
                ],
            ),
            (
                "OBX",
                &[
                    (1, "2"),
                    (2, "TX"),
                    (3, "COMMENT^Comment^LOCAL"),
                    (5, "Line one\\.br\\Line two"),
                    (11, "P"),
                ],
            ),
            (
                "OBX",
                &[
                    (1, "3"),
                    (2, "ED"),
                    (3, "PDF^Report^LOCAL"),
                    (5, "^AP^PDF^Base64^JVBERi0xLjQKJSVFT0YK"),
                    (11, "F"),
                    (23, "LAB^Test Laboratory"),
                ],
            ),
            ("NTE", &[(1, "1"), (2, "L"), (3, "Report attached")]),
        ],
    )
}

/// An SIU^S12 booking across the 2026 spring clock change (01:00 UTC on 29 March).
pub(super) fn siu() -> Msg {
    msg(
        MSH_SIU,
        &[
            (
                "SCH",
                &[
                    (1, "PLA100^PAS"),
                    (2, "FIL100^CLINIC"),
                    (3, "1"),
                    (6, "NEW^New booking^LOCAL"),
                    (7, "FUP^Follow-up^LOCAL"),
                    (8, "NORMAL^\"\"^HL70277"),
                    (9, "60"),
                    (10, "min^minutes^UCUM"),
                    (11, "^^60^20260329003000^20260329023000&S"),
                    (12, "C111^CONSULTANT^TEST^^^DR"),
                    (16, "\"\""),
                    (25, "Booked^Booked^HL70278"),
                ],
            ),
            ("NTE", &[(1, "1"), (3, "appointment note")]),
            (
                "PID",
                &[(1, "1"), (3, "9990000018^^^NHS^NH"), (5, "TEST^PATIENT")],
            ),
            ("PV1", &[(1, "1"), (2, "O"), (3, "CLINIC1^^^RXX")]),
            ("RGS", &[(1, "1"), (2, "A")]),
            (
                "AIS",
                &[
                    (1, "1"),
                    (2, "A"),
                    (3, "CARD^Cardiology outpatient^LOCAL"),
                    (4, "20260329003000"),
                    (7, "60"),
                    (8, "min^minutes^UCUM"),
                    (10, "Booked"),
                ],
            ),
            ("NTE", &[(1, "1"), (3, "bring previous letters")]),
            (
                "AIL",
                &[
                    (1, "2"),
                    (2, "A"),
                    (3, "CLINIC1^\"\"^^RXX"),
                    (6, "20260329003000"),
                    (9, "60"),
                    (10, "min"),
                    (12, "Booked"),
                ],
            ),
            (
                "AIP",
                &[
                    (1, "3"),
                    (2, "A"),
                    (3, "C111^CONSULTANT^TEST^^^DR"),
                    (4, "ATTENDING"),
                    (6, "20260329023000"),
                    (9, "30"),
                    (10, "\"\""),
                    (12, "Pending"),
                ],
            ),
            (
                "AIG",
                &[
                    (1, "4"),
                    (2, "A"),
                    (3, "ECG1^ECG machine^LOCAL"),
                    (4, "EQUIPMENT"),
                    (8, "20260329024500"),
                    (11, "15"),
                    (12, "min"),
                    (14, "Booked"),
                ],
            ),
        ],
    )
}

/// An MDM^T02 with an order group, a TXA and the document body as TX/FT OBX,
/// either side of the 2026 autumn clock change (01:00 UTC on 25 October).
pub(super) fn mdm() -> Msg {
    msg(
        MSH_MDM,
        &[
            ("EVN", &[(1, "T02"), (2, "20261026120000")]),
            (
                "PID",
                &[(1, "1"), (3, "9990000018^^^NHS^NH"), (5, "TEST^PATIENT")],
            ),
            ("PV1", &[(1, "1"), (2, "I"), (3, "WARD1^^^RXX")]),
            ("ORC", &[(1, "RE"), (2, "PLC300^PAS")]),
            (
                "OBR",
                &[(1, "1"), (2, "PLC300^PAS"), (4, "DS^Discharge^LOCAL")],
            ),
            (
                "TXA",
                &[
                    (1, "1"),
                    (2, "DS"),
                    (3, "TX"),
                    (4, "20261026093000"),
                    (5, "C123^CLINICIAN^TEST"),
                    (6, "20261024153000"),
                    (8, "20261026100000~20261026110000"),
                    (9, "C123^CLINICIAN^TEST^^^DR~C124^REGISTRAR^TEST"),
                    (11, "T55^TYPIST^TEST"),
                    (12, "DOC100^EPR"),
                    (13, "\"\""),
                    (14, "PLC300^PAS"),
                    (16, "discharge_100.txt"),
                    (17, "AU"),
                    (18, "\"\""),
                    (19, "AV"),
                ],
            ),
            (
                "OBX",
                &[
                    (1, "1"),
                    (2, "TX"),
                    (3, "DS^Discharge summary^LOCAL"),
                    (5, "Discharged home."),
                    (11, "F"),
                ],
            ),
            (
                "OBX",
                &[
                    (1, "2"),
                    (2, "TX"),
                    (3, "DS^Discharge summary^LOCAL"),
                    (5, "Follow up in clinic \\T\\ review.~~Signed."),
                    (11, "F"),
                ],
            ),
            (
                "OBX",
                &[
                    (1, "3"),
                    (2, "FT"),
                    (3, "DS^Discharge summary^LOCAL"),
                    (5, "Line one\\.br\\Line two"),
                    (11, "F"),
                ],
            ),
            ("NTE", &[(1, "1"), (3, "body note")]),
        ],
    )
}

pub(super) fn hash_delimited() -> String {
    [
        "MSH#*@!%#LAB#RXX#SITERELAY#HUB#20260601120000##ORU*R01*ORU_R01#LAB0002#P#2.5.1",
        "PID#1##9990000018***NHS*NH@RXX0001***RXX%1.2.3%ISO*MR##TEST!F!HASH*PAT!T!IENT!S!X##19800615#M",
        "PV1#1#I#WARD1*ROOM2*BED3",
        "OBR#1#PLC1*PAS##X*Test*LOCAL",
        "OBX#1#TX#C*Comment*LOCAL##Line one!.br!Line two@Second line##########LAB",
        "OBX#2#NM#HB*Hb*LOCAL##135#g/L##H@L",
        "NTE#1#L#a!R!b",
    ]
    .join("\r")
}

pub(super) fn with_truncation_character() -> String {
    [
        "MSH|^~\\&#|PAS|RXX|SITERELAY|HUB|20260601103000||ADT^A08^ADT_A01|MSG0003|P|2.7",
        "PID|1||RXX1^^^RXX^MR||TEST\\P\\HASH^PATIENT||19800615|M",
        "PV1|1|I|WARD1",
    ]
    .join("\r")
}

/// Lines joined with CR, for probes written one segment per line.
pub(super) fn lines(segs: &[&str]) -> String {
    segs.join("\r") + "\r"
}

/// Parent of a JSON pointer, so "absent" is checked where the key would be.
pub(super) fn parent(p: &str) -> &str {
    &p[..p.rfind('/').unwrap_or(0)]
}

#[test]
fn hl7_null_is_json_null_and_empty_is_omitted_across_sections() {
    type Case = (
        &'static str,
        &'static str,
        usize,
        &'static str,
        &'static str,
        Option<Value>,
    );
    let null = Some(Value::Null);
    let table: Vec<Case> = vec![
        (
            "null sex is null",
            "PID",
            8,
            "\"\"",
            "/patient/sex",
            null.clone(),
        ),
        ("empty sex is omitted", "PID", 8, "", "/patient/sex", None),
        (
            "null birth date is null",
            "PID",
            7,
            "\"\"",
            "/patient/birth_date",
            null.clone(),
        ),
        (
            "empty birth date is omitted",
            "PID",
            7,
            "",
            "/patient/birth_date",
            None,
        ),
        (
            "null names are null",
            "PID",
            5,
            "\"\"",
            "/patient/names",
            null.clone(),
        ),
        (
            "empty names are omitted",
            "PID",
            5,
            "",
            "/patient/names",
            None,
        ),
        (
            "a null given name is null",
            "PID",
            5,
            "TEST^\"\"",
            "/patient/names/0/given",
            null.clone(),
        ),
        (
            "an empty given name is omitted",
            "PID",
            5,
            "TEST",
            "/patient/names/0/given",
            None,
        ),
        (
            "a null address is null",
            "PID",
            11,
            "\"\"",
            "/patient/address",
            null.clone(),
        ),
        (
            "a null address clears the postcode",
            "PID",
            11,
            "\"\"",
            "/patient/postcode",
            null.clone(),
        ),
        (
            "a null postcode is null",
            "PID",
            11,
            "1 TEST ST^^TESTTOWN^^\"\"",
            "/patient/postcode",
            null.clone(),
        ),
        (
            "an empty postcode is omitted",
            "PID",
            11,
            "1 TEST ST^^TESTTOWN",
            "/patient/address/postcode",
            None,
        ),
        (
            "a null authority is null",
            "PID",
            3,
            "9990000018^^^\"\"^NH",
            "/patient/identifiers/0/authority",
            null.clone(),
        ),
        (
            "an empty authority is omitted",
            "PID",
            3,
            "9990000018^^^^NH",
            "/patient/identifiers/0/authority",
            None,
        ),
        (
            "a null death time is null",
            "PID",
            29,
            "\"\"",
            "/patient/death/date_time",
            null.clone(),
        ),
        (
            "a null class is null",
            "PV1",
            2,
            "\"\"",
            "/visit/class",
            null.clone(),
        ),
        (
            "an empty class is omitted",
            "PV1",
            2,
            "",
            "/visit/class",
            None,
        ),
        (
            "a null location is null",
            "PV1",
            3,
            "\"\"",
            "/visit/location",
            null.clone(),
        ),
        (
            "a null room is null",
            "PV1",
            3,
            "WARD1^\"\"^BED3",
            "/visit/location/room",
            null.clone(),
        ),
        (
            "an empty room is omitted",
            "PV1",
            3,
            "WARD1^^BED3",
            "/visit/location/room",
            None,
        ),
        (
            "null attending is null",
            "PV1",
            7,
            "\"\"",
            "/visit/attending",
            null.clone(),
        ),
        (
            "a null visit number is null",
            "PV1",
            19,
            "\"\"",
            "/visit/visit_number",
            null.clone(),
        ),
        (
            "a null admit time is null",
            "PV1",
            44,
            "\"\"",
            "/visit/admitted_at",
            null.clone(),
        ),
        (
            "an empty admit time is omitted",
            "PV1",
            44,
            "",
            "/visit/admitted_at",
            None,
        ),
        (
            "a null expected admit time is null",
            "PV2",
            8,
            "\"\"",
            "/visit/expected_admit_at",
            null.clone(),
        ),
        (
            "a null event reason is null",
            "EVN",
            4,
            "\"\"",
            "/event/reason",
            null.clone(),
        ),
        (
            "a null observation value is null",
            "OBX",
            5,
            "\"\"",
            "/observations/0/value",
            null.clone(),
        ),
        (
            "an empty observation value is omitted",
            "OBX",
            5,
            "",
            "/observations/0/value",
            None,
        ),
        (
            "null units are null",
            "OBX",
            6,
            "\"\"",
            "/observations/0/units",
            null.clone(),
        ),
        (
            "empty units are omitted",
            "OBX",
            6,
            "",
            "/observations/0/units",
            None,
        ),
        (
            "a null reference range is null",
            "OBX",
            7,
            "\"\"",
            "/observations/0/reference_range",
            null.clone(),
        ),
        (
            "null abnormal flags are null",
            "OBX",
            8,
            "\"\"",
            "/observations/0/abnormal_flags",
            null.clone(),
        ),
        (
            "empty abnormal flags are omitted",
            "OBX",
            8,
            "",
            "/observations/0/abnormal_flags",
            None,
        ),
        (
            "a null result status is null",
            "OBX",
            11,
            "\"\"",
            "/observations/0/result_status",
            null.clone(),
        ),
        (
            "a null observation time is null",
            "OBX",
            14,
            "\"\"",
            "/observations/0/observed_at",
            null.clone(),
        ),
    ];
    let o = opts(true);
    let base = json_of(&adt().text(), &o);
    for (name, seg, field, value, pointer, expected) in table {
        assert!(
            base.pointer(pointer).is_some(),
            "{name}: base lacks {pointer}"
        );
        let got = json_of(&adt().set(seg, field, value).text(), &o);
        assert!(
            got.pointer(parent(pointer)).is_some(),
            "{name}: no {}",
            parent(pointer)
        );
        assert_eq!(got.pointer(pointer).cloned(), expected, "{name}");
    }
}

#[test]
fn hl7_null_is_json_null_and_empty_is_omitted_in_appointments_and_documents() {
    type Case = (
        &'static str,
        fn() -> Msg,
        &'static str,
        usize,
        &'static str,
        &'static str,
        Option<Value>,
    );
    let null = Some(Value::Null);
    let table: Vec<Case> = vec![
        (
            "a null placer id is null",
            siu,
            "SCH",
            1,
            "\"\"",
            "/appointment/placer_appointment_id",
            null.clone(),
        ),
        (
            "an empty placer id is omitted",
            siu,
            "SCH",
            1,
            "",
            "/appointment/placer_appointment_id",
            None,
        ),
        (
            "a null occurrence number is null",
            siu,
            "SCH",
            3,
            "\"\"",
            "/appointment/occurrence_number",
            null.clone(),
        ),
        (
            "a null duration is null",
            siu,
            "SCH",
            9,
            "\"\"",
            "/appointment/duration",
            null.clone(),
        ),
        (
            "a null timing clears the start",
            siu,
            "SCH",
            11,
            "\"\"",
            "/appointment/start_at",
            null.clone(),
        ),
        (
            "a null timing clears the end",
            siu,
            "SCH",
            11,
            "\"\"",
            "/appointment/end_at",
            null.clone(),
        ),
        (
            "a null start component is null",
            siu,
            "SCH",
            11,
            "^^60^\"\"^20260329023000",
            "/appointment/start_at",
            null.clone(),
        ),
        (
            "an empty end component is omitted",
            siu,
            "SCH",
            11,
            "^^60^20260329003000",
            "/appointment/end_at",
            None,
        ),
        (
            "a null filler status is null",
            siu,
            "SCH",
            25,
            "\"\"",
            "/appointment/filler_status",
            null.clone(),
        ),
        (
            "a null service is null",
            siu,
            "AIS",
            3,
            "\"\"",
            "/appointment/resources/0/universal_service",
            null.clone(),
        ),
        (
            "a null resource start is null",
            siu,
            "AIS",
            4,
            "\"\"",
            "/appointment/resources/0/start_at",
            null.clone(),
        ),
        (
            "an empty resource start is omitted",
            siu,
            "AIS",
            4,
            "",
            "/appointment/resources/0/start_at",
            None,
        ),
        (
            "a null location is null",
            siu,
            "AIL",
            3,
            "\"\"",
            "/appointment/resources/1/location",
            null.clone(),
        ),
        (
            "a null person is null",
            siu,
            "AIP",
            3,
            "\"\"",
            "/appointment/resources/2/personnel",
            null.clone(),
        ),
        (
            "a null resource status is null",
            siu,
            "AIG",
            14,
            "\"\"",
            "/appointment/resources/3/filler_status",
            null.clone(),
        ),
        (
            "a null document type is null",
            mdm,
            "TXA",
            2,
            "\"\"",
            "/document/type",
            null.clone(),
        ),
        (
            "null authors are null",
            mdm,
            "TXA",
            9,
            "\"\"",
            "/document/author",
            null.clone(),
        ),
        (
            "empty authors are omitted",
            mdm,
            "TXA",
            9,
            "",
            "/document/author",
            None,
        ),
        (
            "a null activity time is null",
            mdm,
            "TXA",
            4,
            "\"\"",
            "/document/activity_at",
            null.clone(),
        ),
        (
            "a null document number is null",
            mdm,
            "TXA",
            12,
            "\"\"",
            "/document/unique_document_number",
            null.clone(),
        ),
        (
            "a null file name is null",
            mdm,
            "TXA",
            16,
            "\"\"",
            "/document/unique_document_file_name",
            null.clone(),
        ),
        (
            "a null completion status is null",
            mdm,
            "TXA",
            17,
            "\"\"",
            "/document/completion_status",
            null.clone(),
        ),
        (
            "an empty completion status is omitted",
            mdm,
            "TXA",
            17,
            "",
            "/document/completion_status",
            None,
        ),
    ];
    let o = opts(false);
    for (name, base_msg, seg, field, value, pointer, expected) in table {
        let base = json_of(&base_msg().text(), &o);
        assert!(
            base.pointer(pointer).is_some(),
            "{name}: base lacks {pointer}"
        );
        let got = json_of(&base_msg().set(seg, field, value).text(), &o);
        assert!(
            got.pointer(parent(pointer)).is_some(),
            "{name}: no {}",
            parent(pointer)
        );
        assert_eq!(got.pointer(pointer).cloned(), expected, "{name}");
        assert_eq!(got.get("warnings"), None, "{name}: {got:#}");
    }
}

#[test]
fn unreadable_appointment_and_document_values_are_warned_without_content() {
    let m = siu()
        .set("SCH", 11, "^^60^20261345^2026x")
        .set("SCH", 9, "sixty")
        .set("AIS", 1, "first")
        .set("AIL", 6, "tomorrow");
    let v = json_of(&m.text(), &opts(false));
    let a = &v["appointment"];
    assert_eq!(a["start_at"], json!({"hl7": "20261345", "invalid": true}));
    assert_eq!(a["end_at"], json!({"hl7": "2026x", "invalid": true}));
    assert_eq!(a.get("duration"), None);
    assert_eq!(a["resources"][0].get("set_id"), None);
    assert_eq!(
        a["resources"][1]["start_at"],
        json!({"hl7": "tomorrow", "invalid": true})
    );
    assert_eq!(
        v["warnings"],
        json!([
            "SCH-9 (segment 2): not a number; omitted",
            "SCH-11 (segment 2): invalid timestamp kept as sent",
            "SCH-11 (segment 2): invalid timestamp kept as sent",
            "AIS-1 (segment 7): set id is not a number; omitted",
            "AIL-6 (segment 9): invalid timestamp kept as sent"
        ])
    );
    let v = json_of(&mdm().set("TXA", 6, "20260230").text(), &opts(false));
    assert_eq!(
        v["warnings"],
        json!(["TXA-6 (segment 7): invalid timestamp kept as sent"])
    );
    let twice = format!("{}TXA|2|CN\rSCH|PLA2^PAS\r", mdm().text());
    let v = json_of(&twice, &opts(false));
    assert_eq!(v["document"]["set_id"], 1);
    assert_eq!(v["appointment"]["placer_appointment_id"]["value"], "PLA2");
    assert_eq!(
        v["warnings"],
        json!(["TXA (segment 12): repeated segment ignored"])
    );
}

#[test]
fn notes_attach_to_the_nearest_obx_else_the_order_else_the_top_level() {
    let m = msg(
        "MSH|^~\\&|LAB|RXX|SITERELAY|HUB|20260601120000||ORM^O01|LAB0003|P|2.3",
        &[
            ("PID", &[(3, "RXX1^^^RXX^MR")]),
            ("NTE", &[(1, "1"), (3, "patient note")]),
            ("ORC", &[(1, "NW"), (2, "P1^PAS")]),
            ("NTE", &[(1, "1"), (3, "order note~second line")]),
            ("OBR", &[(1, "1"), (4, "X1^Test^L")]),
            ("NTE", &[(1, "1"), (3, "")]),
            ("OBX", &[(1, "1"), (2, "ST"), (5, "a")]),
            ("NTE", &[(1, "1"), (3, "obx note")]),
            ("ORC", &[(1, "CA"), (2, "P2^PAS")]),
            ("ORC", &[(1, "NW"), (2, "P3^PAS")]),
            ("OBR", &[(1, "1"), (2, "P3OBR^PAS"), (4, "X3^Test^L")]),
            ("OBR", &[(1, "2"), (4, "X4^Test^L")]),
            ("NTE", &[(1, "1"), (3, "fourth order note")]),
        ],
    );
    let v = json_of(&m.text(), &opts(false));
    assert_eq!(v["notes"], json!(["patient note"]));
    let orders = v["orders"].as_array().unwrap();
    assert_eq!(orders.len(), 4, "{v:#}");
    assert_eq!(
        orders[0]["notes"],
        json!(["order note\nsecond line"]),
        "an empty NTE is omitted, not an empty string"
    );
    assert_eq!(orders[0]["universal_service"]["code"], "X1");
    assert_eq!(v["observations"][0]["notes"], json!(["obx note"]));
    assert_eq!(v["observations"][0]["order"], 0);
    assert_eq!(orders[1]["control"], "CA", "an ORC without OBR is an order");
    assert_eq!(orders[1].get("universal_service"), None);
    assert_eq!(
        orders[2]["placer_number"]["value"], "P3",
        "ORC-2 wins over OBR-2"
    );
    assert_eq!(orders[2]["universal_service"]["code"], "X3");
    assert_eq!(orders[3].get("control"), None);
    assert_eq!(orders[3]["notes"], json!(["fourth order note"]));
}

#[test]
fn non_default_delimiters_are_honoured() {
    let v = json_of(&hash_delimited(), &opts(true));
    assert_eq!(v.get("warnings"), None, "{v:#}");
    assert_eq!(
        v["patient"]["identifiers"],
        json!([
            {"value": "9990000018", "type": "NH", "authority": "NHS"},
            {"value": "RXX0001", "type": "MR", "authority": "RXX",
             "authority_universal_id": "1.2.3", "authority_universal_id_type": "ISO"}
        ])
    );
    assert_eq!(
        v["patient"]["names"],
        json!([{"family": "TEST#HASH", "given": "PAT%IENT*X"}])
    );
    assert_eq!(v["patient"]["sex"], "M");
    assert_eq!(
        v["visit"]["location"],
        json!({"point_of_care": "WARD1", "room": "ROOM2", "bed": "BED3"})
    );
    let obs = &v["observations"];
    assert_eq!(
        obs[0]["value"],
        json!(["Line one\nLine two", "Second line"])
    );
    assert_eq!(obs[0]["order"], 0);
    assert_eq!(obs[0]["producer_id"], "LAB");
    assert_eq!(obs[1]["value"], json!(135));
    assert_eq!(obs[1]["abnormal_flags"], json!(["H", "L"]));
    assert_eq!(obs[1]["notes"], json!(["a@b"]));
}

#[test]
fn a_v2_7_truncation_character_in_msh_2_is_honoured() {
    let v = json_of(&with_truncation_character(), &opts(true));
    assert_eq!(v.get("warnings"), None, "{v:#}");
    assert_eq!(v["segments"], json!(["MSH", "PID", "PV1"]));
    assert_eq!(v["patient"]["names"][0]["family"], "TEST#HASH");
    assert_eq!(v["patient"]["identifiers"][0]["value"], "RXX1");
    assert_eq!(v["visit"]["location"]["point_of_care"], "WARD1");
}

#[test]
fn the_message_is_read_past_lines_the_parser_stops_at() {
    let text = format!(
        "\u{feff}\r\n{MSH_ADT}\r\nEVN|A01|20260601103000\n\nNTE\r\n??|junk\r\nPID|1||RXX1^^^RXX^MR||TEST^PATIENT||19800615|M\nZZ1|x\r\n"
    );
    let v = json_of(&text, &opts(false));
    assert_eq!(v["segments"], json!(["MSH", "EVN", "NTE", "PID", "ZZ1"]));
    assert_eq!(v["patient"]["sex"], "M");
    assert_eq!(v.get("notes"), None, "an NTE with no text is omitted");
    assert_eq!(
        v["warnings"],
        json!(["unreadable line after segment 3 skipped"])
    );
}

#[test]
fn an_unreadable_header_gives_only_a_warning() {
    for text in [
        "",
        "PID|1||X",
        "MSH|^~\\&|A|B|C|D|20260101||ADT^A01||P|2.4",
        "MSH|^^\\&|",
    ] {
        let n = normalise(text, &opts(true));
        assert_eq!(n.warnings.len(), 1, "{text:?}");
        assert!(n.patient.is_none() && n.segments.is_empty(), "{text:?}");
    }
    let n = normalise("MSH|^~\\&|A|B|C|D|20260101||ADT^A01||P|2.4", &opts(true));
    assert_eq!(
        n.warnings,
        ["MSH-10 (message control id) is required but missing; message not normalised"]
    );
}

#[test]
fn a_second_pid_starts_a_second_patient_group_and_is_never_reduced_to_a_warning() {
    let text = format!("{}\rPID|1||RXX9^^^RXX^MR|||||M\r", adt().text());
    let v = json_of(&text, &opts(false));
    assert_eq!(v["patient"]["sex"], "F", "the first group stays at the top");
    assert_eq!(v["patients"].as_array().unwrap().len(), 2, "{v:#}");
    assert_eq!(v["patients"][0]["patient"], v["patient"]);
    assert_eq!(v["patients"][1]["patient"]["sex"], "M");
    assert_eq!(
        v["patients"][1]["patient"]["identifiers"][0]["value"],
        "RXX9"
    );
    assert_eq!(v.get("warnings"), None, "{v:#}");
}

#[test]
fn an_a17_swap_carries_both_patients_and_both_locations() {
    let text = lines(&[
        "MSH|^~\\&|PAS|RXX|SR|HUB|20260601103000||ADT^A17^ADT_A17|SWAP1|P|2.4",
        "EVN|A17|20260601103000",
        "PID|1||AAA111^^^RXX^MR~9990000018^^^NHS^NH||ALPHA^ANN||19800101|F",
        "PV1|1|I|WARD1^B1^1^RXX|||WARD2^B2^2^RXX",
        "PID|2||BBB222^^^RXX^MR~9990000026^^^NHS^NH||BRAVO^BOB||19700202|M",
        "PV1|1|I|WARD2^B2^2^RXX|||WARD1^B1^1^RXX",
    ]);
    let v = json_of(&text, &opts(true));
    let groups = v["patients"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{v:#}");
    assert_eq!(groups[0]["patient"]["identifiers"][0]["value"], "AAA111");
    assert_eq!(groups[0]["patient"]["nhs_number"]["value"], "9990000018");
    assert_eq!(groups[0]["visit"]["location"]["point_of_care"], "WARD1");
    assert_eq!(groups[1]["patient"]["identifiers"][0]["value"], "BBB222");
    assert_eq!(groups[1]["patient"]["nhs_number"]["value"], "9990000026");
    assert_eq!(groups[1]["patient"]["names"][0]["family"], "BRAVO");
    assert_eq!(groups[1]["visit"]["location"]["point_of_care"], "WARD2");
    assert_eq!(
        groups[1]["visit"]["prior_location"]["point_of_care"],
        "WARD1"
    );
    // The top level is the first group, as for a single-patient message.
    assert_eq!(v["patient"], groups[0]["patient"]);
    assert_eq!(v["visit"], groups[0]["visit"]);
    assert_eq!(v.get("warnings"), None, "{v:#}");
}

#[test]
fn every_pid_mrg_pair_of_a_merge_is_kept() {
    let text = lines(&[
        "MSH|^~\\&|PAS|RXX|SR|HUB|20260601103000||ADT^A40^ADT_A39|MERGE2|P|2.4",
        "EVN|A40|20260601103000",
        "PID|1||KEEP1^^^RXX^MR",
        "MRG|GONE1^^^RXX^MR",
        "PID|2||KEEP2^^^RXX^MR",
        "MRG|GONE2^^^RXX^MR",
        "MRG|GONE3^^^RXX^MR",
    ]);
    let v = json_of(&text, &opts(false));
    let groups = v["patients"].as_array().unwrap();
    assert_eq!(groups.len(), 3, "{v:#}");
    let id = |g: &Value, k: &str| g[k]["identifiers"][0]["value"].clone();
    assert_eq!(id(&groups[0], "patient"), "KEEP1");
    assert_eq!(groups[0]["merge"]["prior_identifiers"][0]["value"], "GONE1");
    assert_eq!(id(&groups[1], "patient"), "KEEP2");
    assert_eq!(groups[1]["merge"]["prior_identifiers"][0]["value"], "GONE2");
    // A second MRG with no PID of its own is a group of its own, not a warning.
    assert_eq!(groups[2].get("patient"), None);
    assert_eq!(groups[2]["merge"]["prior_identifiers"][0]["value"], "GONE3");
    assert_eq!(v["merge"], groups[0]["merge"]);
    assert_eq!(v.get("warnings"), None, "{v:#}");
}

#[test]
fn results_for_two_patients_say_which_patient_each_order_and_result_belongs_to() {
    let text = lines(&[
        "MSH|^~\\&|LAB|RXX|SR|HUB|20260601120000||ORU^R01^ORU_R01|TWO1|P|2.5",
        "PID|1||AAA111^^^RXX^MR",
        "OBR|1||F1|K^Potassium^L",
        "OBX|1|NM|K^Potassium^L||4.1|mmol/L",
        "PID|2||BBB222^^^RXX^MR",
        "OBR|1||F2|K^Potassium^L",
        "OBX|1|NM|K^Potassium^L||6.9|mmol/L||HH",
    ]);
    let v = json_of(&text, &opts(false));
    assert_eq!(v["patients"].as_array().unwrap().len(), 2);
    assert_eq!(v["orders"][0]["patient_index"], 0);
    assert_eq!(v["orders"][1]["patient_index"], 1);
    assert_eq!(v["observations"][0]["patient_index"], 0);
    assert_eq!(v["observations"][1]["patient_index"], 1);
    assert_eq!(v["observations"][1]["value"], 6.9);
    let p = v["observations"][1]["patient_index"].as_u64().unwrap() as usize;
    assert_eq!(
        v["patients"][p]["patient"]["identifiers"][0]["value"], "BBB222",
        "Bravo's critical potassium is filed under Bravo"
    );
    // A single-patient message carries no index (nothing to tell apart).
    let one = json_of(&oru().text(), &opts(false));
    assert_eq!(one.get("patients"), None);
    assert_eq!(one["observations"][0].get("patient_index"), None);
}

/// xorshift64: deterministic pseudo-random numbers without a dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % (n.max(1) as u64)).unwrap_or(0)
    }
}

fn mutate(rng: &mut XorShift, base: &[char]) -> String {
    const POOL: &[char] = &[
        '|',
        '^',
        '~',
        '\\',
        '&',
        '"',
        '\r',
        '\n',
        '#',
        '.',
        '+',
        '-',
        '0',
        '9',
        'X',
        'é',
        '€',
        '\u{1F600}',
        ' ',
    ];
    let mut c = base.to_vec();
    for _ in 0..=rng.below(4) {
        let len = c.len().max(1);
        let at = rng.below(len).min(c.len());
        match rng.below(7) {
            0 => {
                if at < c.len() {
                    c[at] = POOL[rng.below(POOL.len())];
                }
            }
            1 => c.insert(at, POOL[rng.below(POOL.len())]),
            2 => {
                let end = (at + rng.below(20)).min(c.len());
                c.drain(at..end);
            }
            3 => {
                let end = (at + rng.below(40)).min(c.len());
                let dup: Vec<char> = c[at..end].to_vec();
                let to = rng.below(c.len() + 1);
                c.splice(to..to, dup);
            }
            4 => c.truncate(at),
            5 => {
                // Empty or null out a field-sized run.
                let end = (at + rng.below(8)).min(c.len());
                let fill = if rng.below(2) == 0 {
                    vec![]
                } else {
                    vec!['"', '"']
                };
                c.splice(at..end, fill);
            }
            _ => {
                if at < c.len() {
                    c[at] =
                        char::from_u32(u32::try_from(rng.below(0x800)).unwrap_or(0)).unwrap_or('?');
                }
            }
        }
    }
    c.into_iter().collect()
}

#[test]
fn thousands_of_mutated_messages_never_panic_and_warnings_hold_no_content() {
    let bases: Vec<Vec<char>> = [
        oru().text(),
        adt().text(),
        hash_delimited(),
        with_truncation_character(),
        siu().text(),
        mdm().text(),
    ]
    .iter()
    .map(|t| t.chars().collect())
    .collect();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let (o_on, o_off) = (opts(true), opts(false));
    let mut with_patient = 0;
    for i in 0..6000 {
        let base = &bases[i % bases.len()];
        let text = mutate(&mut rng, base);
        let n = normalise(&text, if i % 2 == 0 { &o_on } else { &o_off });
        with_patient += usize::from(n.patient.is_some());
        let json = serde_json::to_string(&n).unwrap();
        assert!(!json.is_empty());
        for w in &n.warnings {
            for content in [
                "TEST",
                "PATIENT",
                "999000",
                "Haemoglobin",
                "JVBER",
                "LAB123",
                "PLA100",
                "CONSULTANT",
                "DOC100",
                "Discharged",
            ] {
                assert!(!w.contains(content), "warning {w:?} carries content");
            }
        }
    }
    assert!(
        with_patient > 3000,
        "most mutations still reach PID: {with_patient}"
    );
}

/// Odd but legal layouts: `#*@!%` delimiters, trailing separators, empty and `""`
/// repetitions, subcomponents, an id alone, an unreadable line.
fn odd_hash_delimited(line_end: &str) -> String {
    let lines = [
        "MSH#*@!%#LAB#RXX#SITERELAY#HUB#20260601120000##ORU*R01*ORU_R01#ODD0001#P#2.5.1",
        "PID#1#OLD1***RXX*PI#@RXX1***RXX%1.2.3%ISO*MR@@\"\"@9990000018***NHS*NH@##SMITH%SM*ANN*!T!B**MRS**L@\"\"@*##19800615#F###12 HIGH ST%X*FLAT 2*TOWN**ZZ99 9ZZ*GBR*H@2ND*##################\"\"#N##",
        "PV1#1#I#WARD1*ROOM2*BED3*RXX01%9.9%ISO####C1*DOC%X*A@@C2*DR2############\"\"#########################202606011000##",
        "ORC#NW#PL1*ICE#FL1*LAB#GRP1*ICE#SC##*****R#####C9*ORD%X*B#",
        "OBR#1###HB*Hb*L##20260601090000#20260601091500#\"\"######20260601100000########20260601120000+0100###F#HB%Hb%L*1###PL0%ICE*FL0%LAB#",
        "OBX#1#NM#HB*Hb*L##1@@\"\"@x#g/L#10-20#H@@L###F###20260601091500#",
        "OBX#2#TX#C*Comment*L##a!.br!b@@\"\"@c##########LAB#",
        "OBX#3#ED#PDF*Report*L##*AP*PDF*Base64*JVBERi0xLjQKJSVFT0YK##",
        "OBX#4#SN#EGFR*eGFR*L##>*90@*1*:*2#",
        "NTE#1#L#a@@\"\"@b!E!",
        "NTE",
        "??#junk",
        "ZZ1#x#",
    ];
    lines.map(|l| format!("{l}{line_end}")).concat()
}

/// v2.7 MSH-2 with a truncation character; CR, CRLF and LF mixed with blank lines;
/// TQ timestamps in subcomponents; nulls in composites.
fn odd_mixed_line_ends() -> String {
    let lines = [
        (
            "MSH|^~\\&#|PAS|RXX|SITERELAY|HUB|20260328100000||SIU^S12^SIU_S12|ODD0003|P|2.7",
            "\r",
        ),
        (
            "SCH|PLA1^PAS|FIL1^CLINIC|1||||||60|min|^^60^20260329003000&S^20260329023000|C1^DOC^A~~|||||||||||||Booked",
            "\r\n\n",
        ),
        (
            "AIL|1|A|CLINIC1^\"\"^^RXX&9.9&ISO|||20260329003000|||60|min^minutes||Booked||",
            "\n",
        ),
        ("NTE|1||x~~y", "\r   \r"),
        ("AIP|2||\"\"|", "\r"),
        (
            "TXA|1|DS|TX|20260601175500^S||||||||DOC1^EPR&X|\"\"|PL1^ICE~PL2||",
            "\r",
        ),
    ];
    lines.map(|(l, end)| format!("{l}{end}")).concat()
}

/// The expected records were captured from the reader this module used before its own
/// (`hl7-parser`); they must not change. Each is kept in `tests/golden/normalise/` exactly as
/// `serde_json::to_string_pretty` writes it, plus a final newline.
#[test]
fn odd_separators_and_line_ends_read_exactly_as_before() {
    let o = opts(true);
    let pretty = |text: &str| serde_json::to_string_pretty(&normalise(text, &o)).unwrap() + "\n";
    assert_eq!(pretty(&odd_hash_delimited("\n")), ODD_HASH_DELIMITED);
    assert_eq!(pretty(&odd_hash_delimited("\r\n")), ODD_HASH_DELIMITED);
    assert_eq!(pretty(&odd_mixed_line_ends()), ODD_MIXED_LINE_ENDS);
}

const ODD_HASH_DELIMITED: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/golden/normalise/odd_hash_delimited.json"
));

const ODD_MIXED_LINE_ENDS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/golden/normalise/odd_mixed_line_ends.json"
));
