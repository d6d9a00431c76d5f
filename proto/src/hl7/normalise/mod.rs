//! Normalised clinical content of an HL7 v2 message, for the JSON record the
//! central integration layer receives, so it can use records without
//! re-parsing HL7.
//!
//! [`normalise`] reads PID, PV1/PV2, EVN, MRG, ORC/OBR, OBX, NTE, SCH with
//! AIS/AIG/AIL/AIP (scheduling) and TXA (documents) (field positions of HL7
//! v2.2 to v2.8, tolerant of missing components) into [`Normalised`], whose
//! members are meant to be flattened into the record's top level. Rules that
//! hold in every section:
//!
//! * Three states per value ([`Tri`](crate::hl7::tri::Tri)): an empty or missing field is omitted
//!   (the sender said nothing), the HL7 null `""` is JSON `null` (explicitly
//!   cleared), anything else is the value. A composite (name, location, code,
//!   identifier) whose whole field or repetition is `""` is `null`; otherwise
//!   each of its components follows the same rule. A composite whose
//!   components are all empty is omitted. A repeating field is a list:
//!   omitted when it has no non-empty repetition, `null` when the whole field
//!   is `""`; empty and `""` repetitions inside it are skipped.
//! * Text has HL7 escapes decoded with the message's own delimiters (MSH-1,
//!   MSH-2). Primitive values are a whole component (so an unescaped `&`, as
//!   in `A&E`, survives); parts that are themselves composite (CX.4 assigning
//!   authority, XPN.1 family name, PL.4 facility) take their subcomponents.
//! * Timestamps are `crate::hl7::time::TimeValue` objects in the feed's zone; a
//!   date stays a date. A timestamp that cannot be read becomes
//!   `{"hl7": <as sent>, "invalid": true}` and a warning. A timestamp inside a
//!   composite (SCH-11 TQ.4/TQ.5) has its parts as subcomponents.
//! * Numbers (set ids, NM durations, occurrence numbers) that cannot be read
//!   are omitted with a warning; OBX-5 is the exception (kept as text and
//!   flagged `value_invalid`).
//! * Identifiers keep value, type and assigning authority exactly as sent;
//!   nothing is resolved, merged or deduplicated here.
//! * Nothing fails: what cannot be read is omitted and described in
//!   `warnings`, which name segment ids and positions only, never content.
//!
//! * Patients are never merged into one: a PID starts a patient group, and
//!   the PV1, PV2 and MRG after it belong to that group. With more than one
//!   group (an A17 swap, several PID/MRG pairs, results for several
//!   patients) every group is in `patients` and orders and observations say
//!   which group they follow (`patient_index`); `patient`, `visit` and
//!   `merge` are the first group's either way.
//! * A date of birth is the calendar date as sent; a time of birth is a
//!   separate local time (`crate::hl7::time::parse_birth`).
//!
//! Deliberately NOT done here: no validation against HL7 message structures
//! (segments are read wherever they appear; the first EVN, SCH and TXA count,
//! later ones are listed in `segments` and warned about; every
//! AIS/AIG/AIL/AIP is a resource of the one appointment, RGS groups are not
//! kept), no TQ1/TQ2, no code translation or terminology mapping, no phone
//! numbers, next of kin, allergies, diagnoses or insurance, no decoding of ED
//! data (only its size is reported), no FT formatting beyond what plain text
//! can hold (`crate::hl7::header::unescape`), no decoding of `\C..\`
//! character set escapes (removed and warned about), no charset handling (the
//! text has already been decoded), no I/O. Two messages in one frame never
//! reach this module (the intake refuses them).
//!
//! The code follows the sections: `reader.rs` reads fields by the rules above (three states,
//! escapes, timestamps, numbers, warnings); `datatypes.rs` holds the composite values several
//! sections share (timestamps, CX, XPN, PL, XCN, CE/CWE/CNE, EI); `patient.rs` (PID, PV1/PV2,
//! EVN, MRG), `orders.rs` (ORC/OBR, OBX and its values, NTE), `scheduling.rs` (SCH,
//! AIS/AIG/AIL/AIP) and `document.rs` (TXA) each hold a section's output types and readers;
//! this file holds the options, [`Normalised`] and the segment loop that groups patients and
//! attaches notes. `tests.rs` has the test messages and the tests of whole messages; the golden
//! records it compares with are in `tests/golden/normalise/`.

mod datatypes;
mod document;
mod orders;
mod patient;
mod reader;
mod scheduling;
#[cfg(test)]
mod tests;

use jiff::tz::TimeZone;
use serde::Serialize;

use crate::hl7::fields::Segments;
use crate::hl7::header::{Delimiters, parse_header};

pub use datatypes::{
    Coded, EntityId, Identifier, InvalidTime, Location, Name, Provider, TimeField,
};
pub use document::Document;
pub use orders::{
    Encapsulated, NumberOrText, ObsValue, Observation, Order, Parent, StructuredNumeric,
};
pub use patient::{Address, Death, Event, Merge, NhsNumber, Patient, Visit};
pub(crate) use reader::parse_nm;
use reader::{At, Reader};
pub use scheduling::{Appointment, Resource, ResourceKind};

/// How to normalise messages from one feed.
#[derive(Debug, Clone)]
pub struct NormaliseOptions {
    /// Zone assumed for timestamps that carry no offset.
    pub timezone: TimeZone,
    /// When false (data minimisation), patient names, birth date, death,
    /// address and postcode and MRG prior names are omitted; identifiers and
    /// sex stay.
    pub demographics: bool,
    /// Assigning authorities (CX.4.1, compared ignoring ASCII case) that mean
    /// "NHS number"; an identifier of type `NH` counts too.
    pub nhs_authorities: Vec<String>,
}

impl Default for NormaliseOptions {
    /// Europe/London (UTC if the bundled database lacked it), demographics
    /// on, authorities `NHS` and `NHSNBR`. These are also the defaults of a
    /// feed's `demographics` and `nhs_authorities` keys (`crate::config` takes
    /// them from here), for `[[mllp]]` feeds and serial HL7 ports alike.
    fn default() -> Self {
        NormaliseOptions {
            timezone: TimeZone::get("Europe/London").unwrap_or(TimeZone::UTC),
            demographics: true,
            nhs_authorities: vec!["NHS".to_owned(), "NHSNBR".to_owned()],
        }
    }
}

/// The normalised content of one message; each member is omitted when absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Normalised {
    /// From the first PID (the first patient group, see `patients`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<Patient>,
    /// From the first patient group's PV1 and PV2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visit: Option<Visit>,
    /// From the first EVN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<Event>,
    /// From the first MRG.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge: Option<Merge>,
    /// Every patient group, in message order, when the message concerns more than one patient
    /// (an A17 swap, several PID/MRG pairs in a merge, results for several patients); `patient`,
    /// `visit` and `merge` above are then the first group's. Empty (omitted) otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub patients: Vec<PatientGroup>,
    /// One per OBR (with the ORC just before it, if any), or per ORC without OBR, in message order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub orders: Vec<Order>,
    /// Every OBX, in message order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub observations: Vec<Observation>,
    /// From the first SCH, with every AIS, AIG, AIL and AIP (scheduling messages, SIU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub appointment: Option<Appointment>,
    /// From the first TXA (document management messages, MDM); the body is in `observations`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<Document>,
    /// NTE-3 text of notes that follow no OBX, ORC, OBR or appointment
    /// resource (e.g. after PID, SCH or TXA).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Segment ids in message order, MSH and Z-segments included.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<String>,
    /// What could not be read, by segment and field position (never content).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One patient's part of a message: a PID with the PV1, PV2 and MRG that follow it before
/// the next PID.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PatientGroup {
    /// The group's PID (absent for segments that came before any PID).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<Patient>,
    /// The group's PV1 and PV2.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visit: Option<Visit>,
    /// The group's MRG.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge: Option<Merge>,
}

/// Normalises one message (the text between the MLLP block characters,
/// already decoded from its charset). Never panics and never fails: an
/// unreadable MSH gives a `Normalised` holding only a warning.
pub fn normalise(message_text: &str, opts: &NormaliseOptions) -> Normalised {
    match parse_header(message_text.as_bytes()) {
        Ok(h) => normalise_with_delimiters(message_text, &h.delimiters, opts),
        Err(e) => Normalised {
            // HeaderError texts name MSH field positions only.
            warnings: vec![format!("{e}; message not normalised")],
            ..Normalised::default()
        },
    }
}

/// Like [`normalise`], for a caller that already holds the message's
/// delimiters from `crate::hl7::header::parse_header` (saves parsing MSH twice).
pub fn normalise_with_delimiters(
    message_text: &str,
    delimiters: &Delimiters,
    opts: &NormaliseOptions,
) -> Normalised {
    let mut rd = Reader {
        d: *delimiters,
        tz: &opts.timezone,
        warnings: Vec::new(),
        last_time: None,
        charset_escape_in: std::cell::Cell::new(false),
    };
    let segs = read_segments(
        skip_leading_noise(message_text),
        delimiters,
        &mut rd.warnings,
    );
    let mut out = Normalised {
        segments: segs.iter().map(|s| s.id.to_owned()).collect(),
        ..Normalised::default()
    };

    // NTE attachment context: the OBX since the last ORC/OBR, else that order.
    let mut cur_order: Option<usize> = None;
    let mut cur_obx: Option<usize> = None;
    // An ORC waiting for its OBR.
    let mut pending_orc: Option<usize> = None;
    // The AIS/AIG/AIL/AIP that NTEs attach to; set only while the two above are None.
    let mut cur_resource: Option<usize> = None;
    let mut seen_sch = false;
    // Patient groups: a PID starts one; PV1, PV2 and MRG belong to the latest. A segment that
    // carries a patient's identity (PID, MRG) is never dropped: a second MRG in a group starts
    // a group of its own.
    let mut groups: Vec<Group> = Vec::new();

    for (i, seg) in segs.iter().enumerate() {
        let at = At { pos: i + 1 };
        match seg.id {
            "PID" => {
                match groups.last_mut() {
                    Some(g) if g.patient.is_none() => g.patient = Some(rd.patient(seg, at, opts)),
                    _ => groups.push(Group {
                        patient: Some(rd.patient(seg, at, opts)),
                        ..Group::default()
                    }),
                }
                cur_order = None;
                cur_obx = None;
                pending_orc = None;
                cur_resource = None;
            }
            "SCH" => {
                if seen_sch {
                    rd.warn("SCH", None, at, "repeated segment ignored");
                } else {
                    seen_sch = true;
                    let resources = out.appointment.take().map(|a| a.resources);
                    let mut a = rd.schedule(seg, at);
                    a.resources = resources.unwrap_or_default();
                    out.appointment = Some(a);
                }
                cur_order = None;
                cur_obx = None;
                pending_orc = None;
                cur_resource = None;
            }
            "AIS" | "AIG" | "AIL" | "AIP" => {
                let r = rd.resource(seg, at);
                let a = out.appointment.get_or_insert_with(Appointment::default);
                a.resources.push(r);
                cur_resource = Some(a.resources.len() - 1);
                cur_order = None;
                cur_obx = None;
                pending_orc = None;
            }
            "TXA" => {
                if out.document.is_some() {
                    rd.warn("TXA", None, at, "repeated segment ignored");
                } else {
                    out.document = Some(rd.document(seg, at));
                }
                // What follows (the OBX body) belongs to the document, not to an order.
                cur_order = None;
                cur_obx = None;
                pending_orc = None;
                cur_resource = None;
            }
            "PV1" | "PV2" => {
                let pv1 = seg.id == "PV1";
                if groups.is_empty() {
                    groups.push(Group::default());
                }
                let g = groups.last_mut().expect("a group exists");
                let seen = if pv1 {
                    &mut g.seen_pv1
                } else {
                    &mut g.seen_pv2
                };
                if *seen {
                    let id = if pv1 { "PV1" } else { "PV2" };
                    rd.warn(id, None, at, "repeated segment ignored");
                    continue;
                }
                *seen = true;
                let visit = g.visit.get_or_insert_with(Visit::default);
                if pv1 {
                    rd.pv1(visit, seg, at);
                } else {
                    visit.expected_admit_at = rd.time(seg, 8, "PV2", at);
                }
            }
            "EVN" => {
                if out.event.is_some() {
                    rd.warn("EVN", None, at, "repeated segment ignored");
                } else {
                    out.event = Some(rd.event(seg, at));
                }
            }
            "MRG" => {
                let merge = rd.merge(seg, opts);
                match groups.last_mut() {
                    Some(g) if g.merge.is_none() => g.merge = Some(merge),
                    _ => groups.push(Group {
                        merge: Some(merge),
                        ..Group::default()
                    }),
                }
            }
            "ORC" => {
                out.orders.push(rd.orc(seg));
                let idx = out.orders.len() - 1;
                out.orders[idx].patient_index = groups.len().checked_sub(1);
                cur_order = Some(idx);
                pending_orc = Some(idx);
                cur_obx = None;
                cur_resource = None;
            }
            "OBR" => {
                let idx = match pending_orc.take() {
                    Some(idx) => idx,
                    None => {
                        out.orders.push(Order {
                            patient_index: groups.len().checked_sub(1),
                            ..Order::default()
                        });
                        out.orders.len() - 1
                    }
                };
                rd.obr(&mut out.orders[idx], seg, at);
                cur_order = Some(idx);
                cur_obx = None;
                cur_resource = None;
            }
            "OBX" => {
                let mut obx = rd.obx(seg, at);
                obx.order = cur_order;
                obx.patient_index = groups.len().checked_sub(1);
                out.observations.push(obx);
                cur_obx = Some(out.observations.len() - 1);
                cur_resource = None;
            }
            "NTE" => {
                let Some(text) = rd.note(seg) else {
                    continue;
                };
                let target = match (cur_obx, cur_order, cur_resource) {
                    (Some(o), _, _) => out.observations.get_mut(o).map(|o| &mut o.notes),
                    (None, Some(o), _) => out.orders.get_mut(o).map(|o| &mut o.notes),
                    (None, None, Some(r)) => out
                        .appointment
                        .as_mut()
                        .and_then(|a| a.resources.get_mut(r))
                        .map(|r| &mut r.notes),
                    (None, None, None) => None,
                };
                target.unwrap_or(&mut out.notes).push(text);
            }
            _ => {}
        }
        if rd.charset_escape_in.replace(false) {
            rd.warnings.push(format!(
                "{} (segment {}): character set escape (\\C or \\M) removed from text; the characters it selects are not decoded",
                if seg.id.bytes().all(|b| b.is_ascii_alphanumeric()) { seg.id } else { "?" },
                at.pos
            ));
        }
    }
    let mut groups: Vec<PatientGroup> = groups.into_iter().map(Group::into_public).collect();
    if groups.len() > 1 {
        let first = &groups[0];
        out.patient = first.patient.clone();
        out.visit = first.visit.clone();
        out.merge = first.merge.clone();
        out.patients = groups;
    } else {
        if let Some(g) = groups.pop() {
            out.patient = g.patient;
            out.visit = g.visit;
            out.merge = g.merge;
        }
        // One group (or none): nothing to tell apart.
        out.orders.iter_mut().for_each(|o| o.patient_index = None);
        out.observations
            .iter_mut()
            .for_each(|o| o.patient_index = None);
    }
    out.warnings = rd.warnings;
    out
}

/// A patient group being read: [`PatientGroup`] plus what the reader needs to know.
#[derive(Default)]
struct Group {
    patient: Option<Patient>,
    visit: Option<Visit>,
    merge: Option<Merge>,
    seen_pv1: bool,
    seen_pv2: bool,
}

impl Group {
    fn into_public(self) -> PatientGroup {
        PatientGroup {
            patient: self.patient,
            visit: self.visit,
            merge: self.merge,
        }
    }
}

/// Skips what `parse_header` skips before `MSH`: a UTF-8 BOM and blank space.
fn skip_leading_noise(text: &str) -> &str {
    text.trim_start_matches(['\u{feff}', ' ', '\t', '\r', '\n'])
}

/// Splits the message into segments. Lines end at CR, LF or CRLF; blank
/// lines are skipped; a line that is not a segment (its id is not three
/// ASCII letters or digits, or the field separator does not follow it) is
/// skipped with a warning. An id alone (`NTE`) is a segment with no fields.
fn read_segments<'m>(body: &'m str, d: &Delimiters, warnings: &mut Vec<String>) -> Segments<'m> {
    Segments::read(body, d, |n| {
        warnings.push(format!("unreadable line after segment {n} skipped"));
    })
}
