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
//! * Three states per value ([`Tri`]): an empty or missing field is omitted
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

use jiff::tz::TimeZone;
use serde::Serialize;
use serde_json::Number;

use crate::hl7::fields::{Field, Rep, Seg, Segments};
use crate::hl7::header::{Delimiters, parse_header, unescape_noting};
use crate::hl7::nhs::nhs_number_valid;
use crate::hl7::time::{LocalTime, TimeValue, parse_birth, parse_dtm};
use crate::hl7::tri::{HL7_NULL, Tri};

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

/// A timestamp: parsed, or kept as sent and marked invalid.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TimeField {
    /// Read by `crate::hl7::time::parse_dtm`.
    Parsed(TimeValue),
    /// Not a valid HL7 DTM/TS.
    Invalid(InvalidTime),
}

/// A timestamp that could not be read: `{"hl7": ..., "invalid": true}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InvalidTime {
    /// The HL7 text exactly as sent.
    pub hl7: String,
    /// Always true.
    pub invalid: bool,
}

/// An identifier (CX): PID-2/3/4, MRG-1/3/5, PV1-19.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Identifier {
    /// CX.1 identifier.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub value: Tri<String>,
    /// CX.5 identifier type code, e.g. `MR`, `NH`.
    #[serde(rename = "type", skip_serializing_if = "Tri::is_absent")]
    pub id_type: Tri<String>,
    /// CX.4.1 assigning authority namespace id, e.g. `NHS` or a trust code.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub authority: Tri<String>,
    /// CX.4.2 assigning authority universal id (e.g. an OID).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub authority_universal_id: Tri<String>,
    /// CX.4.3 universal id type (e.g. `ISO`).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub authority_universal_id_type: Tri<String>,
    /// `"PID-2"` or `"PID-4"` for identifiers not from PID-3; omitted otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<&'static str>,
}

/// The patient's NHS number, picked from the identifiers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NhsNumber {
    /// The identifier value as sent (escapes decoded).
    pub value: String,
    /// Ten digits, no spaces, Modulus 11 check digit right.
    pub valid: bool,
    /// PID-32 identity reliability / verification status (table 0445), e.g. `01`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub verification_status: Tri<String>,
}

/// A person name (XPN, or PN in v2.2).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Name {
    /// XPN.1.1 surname.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub family: Tri<String>,
    /// XPN.2 given name.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub given: Tri<String>,
    /// XPN.3 further given names or initials.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub middle: Tri<String>,
    /// XPN.4 suffix.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub suffix: Tri<String>,
    /// XPN.5 prefix, e.g. `MR`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub prefix: Tri<String>,
    /// XPN.7 name type code, e.g. `L`.
    #[serde(rename = "type", skip_serializing_if = "Tri::is_absent")]
    pub name_type: Tri<String>,
}

/// A postal address (XAD), first repetition of PID-11.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Address {
    /// XAD.1.1 street address.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub line1: Tri<String>,
    /// XAD.2 other designation (second line, locality).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub line2: Tri<String>,
    /// XAD.3 city.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub city: Tri<String>,
    /// XAD.4 state, province or county.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub county: Tri<String>,
    /// XAD.5 postcode.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub postcode: Tri<String>,
    /// XAD.6 country.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub country: Tri<String>,
    /// XAD.7 address type, e.g. `H`.
    #[serde(rename = "type", skip_serializing_if = "Tri::is_absent")]
    pub address_type: Tri<String>,
}

/// PID-29 and PID-30.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Death {
    /// PID-29 date/time of death.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub date_time: Tri<TimeField>,
    /// PID-30 death indicator (`Y`/`N`).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub indicator: Tri<String>,
}

/// The `patient` section (PID).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Patient {
    /// PID-3 repetitions, then PID-2 and PID-4 (marked with `source`).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub identifiers: Tri<Vec<Identifier>>,
    /// The first identifier whose authority is an NHS authority or whose type is `NH`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub nhs_number: Tri<NhsNumber>,
    /// PID-5 repetitions (demographics only).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub names: Tri<Vec<Name>>,
    /// PID-7's calendar date exactly as sent, never converted to an instant or moved by a
    /// zone (demographics only); `hl7` keeps the whole PID-7.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub birth_date: Tri<TimeField>,
    /// PID-7's time of day when one was sent, as a local time with its precision
    /// (demographics only).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub birth_time: Tri<LocalTime>,
    /// PID-8 administrative sex.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub sex: Tri<String>,
    /// PID-29/PID-30, omitted when both are (demographics only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub death: Option<Death>,
    /// PID-11.5 of the first address (demographics only).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub postcode: Tri<String>,
    /// The first PID-11 repetition (demographics only).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub address: Tri<Address>,
}

/// A location (PL).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Location {
    /// PL.1 point of care (ward, clinic).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub point_of_care: Tri<String>,
    /// PL.2 room.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub room: Tri<String>,
    /// PL.3 bed.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub bed: Tri<String>,
    /// PL.4.1 facility.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub facility: Tri<String>,
}

/// A clinician (XCN, or CN in v2.2).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Provider {
    /// XCN.1 id (e.g. a GMC or local consultant code).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub id: Tri<String>,
    /// XCN.2.1 surname.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub family: Tri<String>,
    /// XCN.3 given name.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub given: Tri<String>,
    /// XCN.6 prefix, e.g. `DR`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub prefix: Tri<String>,
}

/// The `visit` section (PV1, PV2).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Visit {
    /// PV1-2 patient class, e.g. `I`, `O`, `E`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub class: Tri<String>,
    /// PV1-3 assigned location.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub location: Tri<Location>,
    /// PV1-6 prior location.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub prior_location: Tri<Location>,
    /// PV1-7 repetitions.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub attending: Tri<Vec<Provider>>,
    /// PV1-8 repetitions.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub referring: Tri<Vec<Provider>>,
    /// PV1-9 repetitions.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub consulting: Tri<Vec<Provider>>,
    /// PV1-10 hospital service (specialty).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub hospital_service: Tri<String>,
    /// PV1-14 admit source.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub admit_source: Tri<String>,
    /// PV1-19 visit number.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub visit_number: Tri<Identifier>,
    /// PV1-36 discharge disposition.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub discharge_disposition: Tri<String>,
    /// PV1-44 admit date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub admitted_at: Tri<TimeField>,
    /// PV1-45 discharge date/time (first repetition).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub discharged_at: Tri<TimeField>,
    /// PV2-8 expected admit date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub expected_admit_at: Tri<TimeField>,
}

/// The `event` section (EVN).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Event {
    /// EVN-1 event type code (older versions).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub type_code: Tri<String>,
    /// EVN-2 recorded date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub recorded_at: Tri<TimeField>,
    /// EVN-3 planned date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub planned_at: Tri<TimeField>,
    /// EVN-4 event reason code.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub reason: Tri<String>,
    /// EVN-5.1 operator id.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub operator: Tri<String>,
    /// EVN-6 event occurred.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub occurred_at: Tri<TimeField>,
}

/// The `merge` section (MRG).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Merge {
    /// MRG-1 repetitions.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub prior_identifiers: Tri<Vec<Identifier>>,
    /// MRG-3 prior patient account number.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub prior_account: Tri<Identifier>,
    /// MRG-5 prior visit number.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub prior_visit_number: Tri<Identifier>,
    /// MRG-7 repetitions (demographics only).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub prior_names: Tri<Vec<Name>>,
}

/// A coded value (CE/CWE/CNE): the primary triplet, the alternate triplet
/// (components 4 to 6), the CWE/CNE coding system versions and original text.
/// A code sent only in the alternate components keeps it there, so `{}` never
/// stands for a code that was sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Coded {
    /// Identifier (component 1).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub code: Tri<String>,
    /// Text (component 2).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub text: Tri<String>,
    /// Name of coding system (component 3).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub system: Tri<String>,
    /// Alternate identifier (component 4), often a local code.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub alt_code: Tri<String>,
    /// Alternate text (component 5).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub alt_text: Tri<String>,
    /// Name of the alternate coding system (component 6).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub alt_system: Tri<String>,
    /// Coding system version id (CWE/CNE component 7).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub system_version: Tri<String>,
    /// Alternate coding system version id (CWE/CNE component 8).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub alt_system_version: Tri<String>,
    /// Original text (CWE/CNE component 9).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub original_text: Tri<String>,
}

/// An entity identifier (EI): placer, filler and group numbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EntityId {
    /// EI.1 entity identifier.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub value: Tri<String>,
    /// EI.2 namespace id.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub namespace: Tri<String>,
}

/// The parent of a reflex or child order (OBR-26, OBR-29).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Parent {
    /// OBR-26.1 parent observation identifier.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub result_code: Tri<Coded>,
    /// OBR-26.2 parent observation sub-id.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub result_sub_id: Tri<String>,
    /// OBR-29.1 parent placer number.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub placer_number: Tri<EntityId>,
    /// OBR-29.2 parent filler number.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub filler_number: Tri<EntityId>,
}

/// One order: an OBR with the ORC just before it, or an ORC or OBR alone.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Order {
    /// Index into `patients` of the patient group this order belongs to; present only when the
    /// message has more than one patient group (and this order follows a PID).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient_index: Option<usize>,
    /// ORC-1 order control, e.g. `NW`, `RE`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub control: Tri<String>,
    /// The order's placer number: ORC-2 when it carries an identifier (EI.1), else OBR-2 when
    /// that does, else whichever of the two was sent (namespace only, or `""`).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub placer_number: Tri<EntityId>,
    /// The order's filler number, chosen like `placer_number` from ORC-3 and OBR-3.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub filler_number: Tri<EntityId>,
    /// ORC-2 as sent, present only when ORC-2 and OBR-2 are both sent and differ.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub orc_placer_number: Tri<EntityId>,
    /// OBR-2 as sent, present only when ORC-2 and OBR-2 are both sent and differ.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub obr_placer_number: Tri<EntityId>,
    /// ORC-3 as sent, present only when ORC-3 and OBR-3 are both sent and differ.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub orc_filler_number: Tri<EntityId>,
    /// OBR-3 as sent, present only when ORC-3 and OBR-3 are both sent and differ.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub obr_filler_number: Tri<EntityId>,
    /// ORC-4 placer group number.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub group_number: Tri<EntityId>,
    /// ORC-5 order status.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub status: Tri<String>,
    /// OBR-4 universal service identifier.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub universal_service: Tri<Coded>,
    /// OBR-5, else ORC-7.6 (TQ priority).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub priority: Tri<String>,
    /// OBR-6 requested date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub requested_at: Tri<TimeField>,
    /// OBR-7 observation (collection) date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub observed_at: Tri<TimeField>,
    /// OBR-8 observation end date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub observation_end_at: Tri<TimeField>,
    /// OBR-14 specimen received date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub specimen_received_at: Tri<TimeField>,
    /// OBR-16, else ORC-12 (first repetition).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub ordering_provider: Tri<Provider>,
    /// OBR-22 results reported / status change date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub results_reported_at: Tri<TimeField>,
    /// OBR-24 diagnostic service section id.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub diagnostic_service: Tri<String>,
    /// OBR-25 result status.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub result_status: Tri<String>,
    /// OBR-26/OBR-29 parent result and parent order.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub parent: Tri<Parent>,
    /// NTE-3 text of the NTEs that follow the ORC/OBR before any OBX.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// A number where one could be read, otherwise the text as sent.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum NumberOrText {
    /// A finite decimal.
    Number(Number),
    /// Text that is not a finite decimal (escapes decoded).
    Text(String),
}

/// A structured numeric (SN) value, e.g. `<^5` or `^1^:^128`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StructuredNumeric {
    /// SN.1 comparator, e.g. `<`, `>=`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub comparator: Tri<String>,
    /// SN.2 first number.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub num1: Tri<NumberOrText>,
    /// SN.3 separator or suffix, e.g. `-`, `:`, `+`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub separator: Tri<String>,
    /// SN.4 second number.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub num2: Tri<NumberOrText>,
}

/// How many bytes ED.5 holds once decoded: `Base64` (whitespace ignored, padding honoured) or
/// `Hex`; None for other encodings or data that is not well formed.
fn decoded_len(encoding: &str, data: &str) -> Option<usize> {
    let chars = || data.bytes().filter(|b| !b.is_ascii_whitespace());
    if encoding.eq_ignore_ascii_case("Base64") {
        let n = chars().count();
        let b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'+' || b == b'/';
        let pad = chars().rev().take_while(|&b| b == b'=').count();
        let ok = n % 4 == 0 && pad <= 2 && chars().take(n - pad).all(b64);
        ok.then(|| n / 4 * 3 - pad)
    } else if encoding.eq_ignore_ascii_case("Hex") {
        let n = chars().count();
        (n % 2 == 0 && chars().all(|b| b.is_ascii_hexdigit())).then_some(n / 2)
    } else {
        None
    }
}

/// A reference to encapsulated data (ED); the data itself is not copied.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Encapsulated {
    /// Always `"ED"`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// ED.2 type of data as sent, e.g. `AP`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub data_type: Tri<String>,
    /// ED.3 data subtype as sent, e.g. `PDF`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub data_subtype: Tri<String>,
    /// MIME type derived from ED.2/ED.3 (e.g. `application/pdf`) when recognisable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// ED.4 encoding as sent, e.g. `Base64`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub encoding: Tri<String>,
    /// Length in bytes of ED.5 (the data) as sent, still encoded.
    pub size_bytes: usize,
    /// Size of the document itself once decoded, for `Base64` and `Hex` data that is well
    /// formed (counted, never decoded or kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decoded_bytes: Option<usize>,
}

/// An OBX-5 value, typed by OBX-2.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ObsValue {
    /// NM (and SN parts): a finite decimal.
    Number(Number),
    /// ST, TX, FT, an NM that is not a number, and any other type.
    Text(String),
    /// CE, CWE, CNE.
    Coded(Coded),
    /// SN.
    Structured(StructuredNumeric),
    /// DT, DTM, TS.
    Time(TimeField),
    /// ED: a reference, not the data.
    Encapsulated(Encapsulated),
    /// Several repetitions; an empty repetition is `null` (`""` for text types).
    List(Vec<Option<ObsValue>>),
}

/// One OBX.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Observation {
    /// Index into `orders` of the order this OBX follows; omitted outside an order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<usize>,
    /// Index into `patients` of the patient group this OBX belongs to; present only when the
    /// message has more than one patient group (and this OBX follows a PID).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient_index: Option<usize>,
    /// OBX-1 set id.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub set_id: Tri<u32>,
    /// OBX-2 value type as sent.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub value_type: Tri<String>,
    /// OBX-3 observation identifier.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub code: Tri<Coded>,
    /// OBX-4 observation sub-id.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub sub_id: Tri<String>,
    /// OBX-5, typed by OBX-2; several repetitions become a list.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub value: Tri<ObsValue>,
    /// True when OBX-5 did not match its type (kept as text or marked invalid).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub value_invalid: bool,
    /// OBX-6 units.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub units: Tri<Coded>,
    /// OBX-7 reference range as sent.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub reference_range: Tri<String>,
    /// OBX-8 repetitions, e.g. `["H"]`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub abnormal_flags: Tri<Vec<String>>,
    /// OBX-11 observation result status.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub result_status: Tri<String>,
    /// OBX-14 observation date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub observed_at: Tri<TimeField>,
    /// OBX-15.1 producer's id.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub producer_id: Tri<String>,
    /// OBX-23.1 performing organisation name.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub performing_organisation: Tri<String>,
    /// NTE-3 text of the NTEs that follow this OBX.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Which kind of appointment resource a segment describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ResourceKind {
    /// AIS: a service.
    Service,
    /// AIG: a general resource (equipment, a room type, a team).
    General,
    /// AIL: a location.
    Location,
    /// AIP: a person.
    Personnel,
}

/// One appointment resource: an AIS, AIG, AIL or AIP segment. Only the
/// member for its kind (`universal_service`, `resource_id`, `location`,
/// `personnel`) is ever present.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Resource {
    /// Which segment this came from.
    pub kind: ResourceKind,
    /// Field 1, set id.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub set_id: Tri<u32>,
    /// Field 2, segment action code (table 0206), e.g. `A`, `D`, `U`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub segment_action: Tri<String>,
    /// AIS-3 universal service identifier.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub universal_service: Tri<Coded>,
    /// AIG-3 resource id.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub resource_id: Tri<Coded>,
    /// AIL-3 location resource id (first repetition).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub location: Tri<Location>,
    /// AIP-3 personnel resource id (first repetition).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub personnel: Tri<Provider>,
    /// Start date/time: AIS-4, AIG-8, AIL-6, AIP-6.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub start_at: Tri<TimeField>,
    /// Duration: AIS-7, AIG-11, AIL-9, AIP-9.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub duration: Tri<Number>,
    /// Duration units: AIS-8, AIG-12, AIL-10, AIP-10.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub duration_units: Tri<Coded>,
    /// Filler status code (table 0278): AIS-10, AIG-14, AIL-12, AIP-12.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub filler_status: Tri<Coded>,
    /// NTE-3 text of the NTEs that follow this segment.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The `appointment` section (SCH, AIS, AIG, AIL, AIP).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Appointment {
    /// SCH-1 placer appointment id.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub placer_appointment_id: Tri<EntityId>,
    /// SCH-2 filler appointment id.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub filler_appointment_id: Tri<EntityId>,
    /// SCH-3 occurrence number.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub occurrence_number: Tri<Number>,
    /// SCH-6 event reason.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub event_reason: Tri<Coded>,
    /// SCH-7 appointment reason.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub reason: Tri<Coded>,
    /// SCH-8 appointment type.
    #[serde(rename = "type", skip_serializing_if = "Tri::is_absent")]
    pub appointment_type: Tri<Coded>,
    /// SCH-9 appointment duration.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub duration: Tri<Number>,
    /// SCH-10 appointment duration units.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub duration_units: Tri<Coded>,
    /// SCH-11.4 (TQ start date/time, first repetition).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub start_at: Tri<TimeField>,
    /// SCH-11.5 (TQ end date/time, first repetition).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub end_at: Tri<TimeField>,
    /// SCH-12 placer contact person (first repetition).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub placer_contact: Tri<Provider>,
    /// SCH-16 filler contact person (first repetition).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub filler_contact: Tri<Provider>,
    /// SCH-25 filler status code (table 0278), e.g. `Booked`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub filler_status: Tri<Coded>,
    /// One per AIS, AIG, AIL and AIP, in message order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<Resource>,
}

/// The `document` section (TXA).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Document {
    /// TXA-1 set id.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub set_id: Tri<u32>,
    /// TXA-2 document type (IS in v2.5, CWE later: an IS is `{"code": ...}`).
    #[serde(rename = "type", skip_serializing_if = "Tri::is_absent")]
    pub document_type: Tri<Coded>,
    /// TXA-3 document content presentation (table 0191), e.g. `TX`, `FT`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub presentation: Tri<String>,
    /// TXA-4 activity date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub activity_at: Tri<TimeField>,
    /// TXA-6 origination date/time.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub origination_at: Tri<TimeField>,
    /// TXA-8 edit date/time (first repetition).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub edit_at: Tri<TimeField>,
    /// TXA-9 repetitions (originator code/name).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub author: Tri<Vec<Provider>>,
    /// TXA-11 transcriptionist (first repetition).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub transcriptionist: Tri<Provider>,
    /// TXA-12 unique document number.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub unique_document_number: Tri<EntityId>,
    /// TXA-13 parent document number.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub parent_document_number: Tri<EntityId>,
    /// TXA-14 placer order number (first repetition).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub placer_order_number: Tri<EntityId>,
    /// TXA-15 filler order number.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub filler_order_number: Tri<EntityId>,
    /// TXA-16 unique document file name.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub unique_document_file_name: Tri<String>,
    /// TXA-17 document completion status (table 0271), e.g. `AU`, `DI`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub completion_status: Tri<String>,
    /// TXA-18 document confidentiality status (table 0272).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub confidentiality_status: Tri<String>,
    /// TXA-19 document availability status (table 0273), e.g. `AV`.
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub availability_status: Tri<String>,
    /// TXA-20 document storage status (table 0275).
    #[serde(skip_serializing_if = "Tri::is_absent")]
    pub storage_status: Tri<String>,
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

/// Position of a segment in the message (1-based), for warnings.
#[derive(Clone, Copy)]
struct At {
    pos: usize,
}

fn is_null_raw(raw: &str) -> bool {
    raw == HL7_NULL
}

/// A repetition or component used as a composite: `""` is null, all-empty is
/// absent, otherwise `f` reads its parts.
fn composite<'m, T>(r: Option<Rep<'m>>, f: impl FnOnce(Rep<'m>) -> T) -> Tri<T> {
    match r {
        None => Tri::Absent,
        Some(r) if is_null_raw(r.raw()) => Tri::Null,
        Some(r) if r.is_empty() => Tri::Absent,
        Some(r) => Tri::Value(f(r)),
    }
}

/// A repeating field as a list: `""` is null, no non-empty repetition is
/// absent; empty and `""` repetitions are skipped.
fn list<'m, T>(f: Option<Field<'m>>, item: impl FnMut(Rep<'m>) -> T) -> Tri<Vec<T>> {
    let Some(f) = f else {
        return Tri::Absent;
    };
    if is_null_raw(f.raw()) {
        return Tri::Null;
    }
    let v: Vec<T> = f
        .reps()
        .filter(|r| !r.is_empty() && !is_null_raw(r.raw()))
        .map(item)
        .collect();
    if v.is_empty() {
        Tri::Absent
    } else {
        Tri::Value(v)
    }
}

/// Reads fields into the normalised types; collects warnings.
struct Reader<'o> {
    d: Delimiters,
    tz: &'o TimeZone,
    warnings: Vec<String>,
    /// The last timestamp read (text, separator, result), see [`Reader::dtm`].
    last_time: Option<(String, u8, Option<TimeValue>)>,
    /// Set when text of the segment being read held a `\C..\`/`\M..\` escape (removed).
    charset_escape_in: std::cell::Cell<bool>,
}

impl Reader<'_> {
    /// `parse_dtm` in the feed's zone, remembering the last value: a timestamp
    /// repeated down a message (OBX-14 on every result) is read once.
    fn dtm(&mut self, raw: &str, sep: u8) -> Option<TimeValue> {
        if let Some((last, last_sep, tv)) = &self.last_time
            && last == raw
            && *last_sep == sep
        {
            return tv.clone();
        }
        let tv = parse_dtm(raw, self.tz, sep);
        match &mut self.last_time {
            Some((last, last_sep, last_tv)) => {
                last.clear();
                last.push_str(raw);
                *last_sep = sep;
                last_tv.clone_from(&tv);
            }
            None => self.last_time = Some((raw.to_owned(), sep, tv.clone())),
        }
        tv
    }

    /// `seg` and `what` are fixed texts from this module, never message content.
    fn warn(&mut self, seg: &'static str, field: Option<usize>, at: At, what: &str) {
        let w = match field {
            Some(f) => format!("{seg}-{f} (segment {}): {what}", at.pos),
            None => format!("{seg} (segment {}): {what}", at.pos),
        };
        self.warnings.push(w);
    }

    /// Raw text by the three-state rule, escapes decoded.
    fn text(&self, raw: &str) -> Tri<String> {
        Tri::from_hl7(raw).map(|v| self.unescape(v))
    }

    /// `unescape` with the message's delimiters; text without the escape
    /// character (almost all of it) is copied without calling it. A character set
    /// escape removed from the text is remembered for one warning per segment.
    fn unescape(&self, raw: &str) -> String {
        if raw.as_bytes().contains(&self.d.escape) {
            let (text, notes) = unescape_noting(raw, &self.d);
            if notes.charset_escape_removed {
                self.charset_escape_in.set(true);
            }
            text
        } else {
            raw.to_owned()
        }
    }

    fn comp(&self, r: Rep<'_>, c: usize) -> Tri<String> {
        self.text(r.comp(c))
    }

    fn sub(&self, r: Rep<'_>, c: usize, s: usize) -> Tri<String> {
        self.text(r.sub(c, s))
    }

    /// Component 1 of the first repetition of field `n`.
    fn scalar(&self, seg: Seg<'_, '_>, n: usize) -> Tri<String> {
        self.text(seg.rep(n).map_or("", |r| r.comp(1)))
    }

    /// The whole first repetition of field `n` (for ST/TX-like fields).
    fn whole(&self, seg: Seg<'_, '_>, n: usize) -> Tri<String> {
        self.text(seg.rep(n).map_or("", Rep::raw))
    }

    /// A DTM/TS from the first repetition of field `n`.
    fn time(&mut self, seg: Seg<'_, '_>, n: usize, id: &'static str, at: At) -> Tri<TimeField> {
        let Some(r) = seg.rep(n) else {
            return Tri::Absent;
        };
        self.time_raw(r.raw(), r.comp(1), self.d.component, id, n, at)
    }

    /// A date of birth from the first repetition of field `n`: the date as sent, and the time
    /// of day (when sent) on its own. See `crate::hl7::time::parse_birth`.
    fn birth(
        &mut self,
        seg: Seg<'_, '_>,
        n: usize,
        id: &'static str,
        at: At,
    ) -> (Tri<TimeField>, Tri<LocalTime>) {
        let Some(r) = seg.rep(n) else {
            return (Tri::Absent, Tri::Absent);
        };
        match Tri::from_hl7(r.comp(1)) {
            Tri::Absent => (Tri::Absent, Tri::Absent),
            Tri::Null => (Tri::Null, Tri::Null),
            Tri::Value(_) => match parse_birth(r.raw(), self.d.component) {
                Some((date, time)) => (
                    Tri::Value(TimeField::Parsed(date)),
                    time.map_or(Tri::Absent, Tri::Value),
                ),
                None => {
                    self.warn(id, Some(n), at, "invalid timestamp kept as sent");
                    let invalid = InvalidTime {
                        hl7: r.raw().to_owned(),
                        invalid: true,
                    };
                    (Tri::Value(TimeField::Invalid(invalid)), Tri::Absent)
                }
            },
        }
    }

    /// A TS carried in component `c` of `r` (its parts are subcomponents), e.g. TQ.4.
    fn time_in(
        &mut self,
        r: Rep<'_>,
        c: usize,
        id: &'static str,
        n: usize,
        at: At,
    ) -> Tri<TimeField> {
        let sep = self.d.subcomponent;
        self.time_raw(r.comp(c), r.sub(c, 1), sep, id, n, at)
    }

    /// `raw` is the whole TS (TS.2 may follow after `sep`), `first` its first part.
    fn time_raw(
        &mut self,
        raw: &str,
        first: &str,
        sep: u8,
        id: &'static str,
        n: usize,
        at: At,
    ) -> Tri<TimeField> {
        match Tri::from_hl7(first) {
            Tri::Absent => Tri::Absent,
            Tri::Null => Tri::Null,
            Tri::Value(_) => match self.dtm(raw, sep) {
                Some(tv) => Tri::Value(TimeField::Parsed(tv)),
                None => {
                    self.warn(id, Some(n), at, "invalid timestamp kept as sent");
                    Tri::Value(TimeField::Invalid(InvalidTime {
                        hl7: raw.to_owned(),
                        invalid: true,
                    }))
                }
            },
        }
    }

    fn identifier(&self, r: Rep<'_>, source: Option<&'static str>) -> Identifier {
        Identifier {
            value: self.comp(r, 1),
            id_type: self.comp(r, 5),
            authority: self.sub(r, 4, 1),
            authority_universal_id: self.sub(r, 4, 2),
            authority_universal_id_type: self.sub(r, 4, 3),
            source,
        }
    }

    fn name(&self, r: Rep<'_>) -> Name {
        Name {
            family: self.sub(r, 1, 1),
            given: self.comp(r, 2),
            middle: self.comp(r, 3),
            suffix: self.comp(r, 4),
            prefix: self.comp(r, 5),
            name_type: self.comp(r, 7),
        }
    }

    fn provider(&self, r: Rep<'_>) -> Provider {
        Provider {
            id: self.comp(r, 1),
            family: self.sub(r, 2, 1),
            given: self.comp(r, 3),
            prefix: self.comp(r, 6),
        }
    }

    fn location(&self, r: Rep<'_>) -> Location {
        Location {
            point_of_care: self.comp(r, 1),
            room: self.comp(r, 2),
            bed: self.comp(r, 3),
            facility: self.sub(r, 4, 1),
        }
    }

    fn coded(&self, r: Rep<'_>) -> Coded {
        Coded {
            code: self.comp(r, 1),
            text: self.comp(r, 2),
            system: self.comp(r, 3),
            alt_code: self.comp(r, 4),
            alt_text: self.comp(r, 5),
            alt_system: self.comp(r, 6),
            system_version: self.comp(r, 7),
            alt_system_version: self.comp(r, 8),
            original_text: self.comp(r, 9),
        }
    }

    fn entity(&self, r: Rep<'_>) -> EntityId {
        EntityId {
            value: self.comp(r, 1),
            namespace: self.comp(r, 2),
        }
    }

    /// An EI carried as subcomponents of component `c` (EIP, PRL).
    fn entity_in(&self, r: Rep<'_>, c: usize) -> Tri<EntityId> {
        match Tri::from_hl7(r.comp(c)) {
            Tri::Absent => Tri::Absent,
            Tri::Null => Tri::Null,
            Tri::Value(_) => Tri::Value(EntityId {
                value: self.sub(r, c, 1),
                namespace: self.sub(r, c, 2),
            })
            .filter_empty(|e| e.value.is_absent() && e.namespace.is_absent()),
        }
    }

    fn patient(&mut self, seg: Seg<'_, '_>, at: At, opts: &NormaliseOptions) -> Patient {
        let mut ids = Vec::new();
        for (n, source) in [(3, None), (2, Some("PID-2")), (4, Some("PID-4"))] {
            if let Tri::Value(found) = list(seg.field(n), |r| self.identifier(r, source)) {
                ids.extend(found);
            }
        }
        let identifiers = if !ids.is_empty() {
            Tri::Value(ids)
        } else if seg.field(3).is_some_and(|f| is_null_raw(f.raw())) {
            Tri::Null
        } else {
            Tri::Absent
        };
        let nhs_number = self.nhs_number(&identifiers, seg, opts);
        let mut p = Patient {
            identifiers,
            nhs_number,
            sex: self.scalar(seg, 8),
            ..Patient::default()
        };
        if opts.demographics {
            p.names = list(seg.field(5), |r| self.name(r));
            (p.birth_date, p.birth_time) = self.birth(seg, 7, "PID", at);
            let death = Death {
                date_time: self.time(seg, 29, "PID", at),
                indicator: self.scalar(seg, 30),
            };
            if !(death.date_time.is_absent() && death.indicator.is_absent()) {
                p.death = Some(death);
            }
            let addr = seg.rep(11);
            p.address = composite(addr, |r| Address {
                line1: self.sub(r, 1, 1),
                line2: self.comp(r, 2),
                city: self.comp(r, 3),
                county: self.comp(r, 4),
                postcode: self.comp(r, 5),
                country: self.comp(r, 6),
                address_type: self.comp(r, 7),
            });
            p.postcode = match addr {
                Some(r) if is_null_raw(r.raw()) => Tri::Null,
                Some(r) => self.comp(r, 5),
                None => Tri::Absent,
            };
        }
        p
    }

    fn nhs_number(
        &self,
        ids: &Tri<Vec<Identifier>>,
        seg: Seg<'_, '_>,
        opts: &NormaliseOptions,
    ) -> Tri<NhsNumber> {
        let Tri::Value(ids) = ids else {
            return Tri::Absent;
        };
        let is_nhs = |id: &Identifier| {
            id.authority.value().is_some_and(|a| {
                opts.nhs_authorities
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(a))
            }) || id
                .id_type
                .value()
                .is_some_and(|t| t.eq_ignore_ascii_case("NH"))
        };
        let Some(id) = ids.iter().find(|id| is_nhs(id)) else {
            return Tri::Absent;
        };
        match &id.value {
            Tri::Absent => Tri::Absent,
            Tri::Null => Tri::Null,
            Tri::Value(v) => Tri::Value(NhsNumber {
                valid: nhs_number_valid(v),
                value: v.clone(),
                verification_status: self.scalar(seg, 32),
            }),
        }
    }

    fn pv1(&mut self, v: &mut Visit, seg: Seg<'_, '_>, at: At) {
        v.class = self.scalar(seg, 2);
        v.location = composite(seg.rep(3), |r| self.location(r));
        v.prior_location = composite(seg.rep(6), |r| self.location(r));
        v.attending = list(seg.field(7), |r| self.provider(r));
        v.referring = list(seg.field(8), |r| self.provider(r));
        v.consulting = list(seg.field(9), |r| self.provider(r));
        v.hospital_service = self.scalar(seg, 10);
        v.admit_source = self.scalar(seg, 14);
        v.visit_number = composite(seg.rep(19), |r| self.identifier(r, None));
        v.discharge_disposition = self.scalar(seg, 36);
        v.admitted_at = self.time(seg, 44, "PV1", at);
        v.discharged_at = self.time(seg, 45, "PV1", at);
    }

    fn event(&mut self, seg: Seg<'_, '_>, at: At) -> Event {
        Event {
            type_code: self.scalar(seg, 1),
            recorded_at: self.time(seg, 2, "EVN", at),
            planned_at: self.time(seg, 3, "EVN", at),
            reason: self.scalar(seg, 4),
            operator: self.scalar(seg, 5),
            occurred_at: self.time(seg, 6, "EVN", at),
        }
    }

    fn merge(&self, seg: Seg<'_, '_>, opts: &NormaliseOptions) -> Merge {
        Merge {
            prior_identifiers: list(seg.field(1), |r| self.identifier(r, None)),
            prior_account: composite(seg.rep(3), |r| self.identifier(r, None)),
            prior_visit_number: composite(seg.rep(5), |r| self.identifier(r, None)),
            prior_names: if opts.demographics {
                list(seg.field(7), |r| self.name(r))
            } else {
                Tri::Absent
            },
        }
    }

    fn orc(&self, seg: Seg<'_, '_>) -> Order {
        Order {
            control: self.scalar(seg, 1),
            placer_number: composite(seg.rep(2), |r| self.entity(r)),
            filler_number: composite(seg.rep(3), |r| self.entity(r)),
            group_number: composite(seg.rep(4), |r| self.entity(r)),
            status: self.scalar(seg, 5),
            priority: self.text(seg.rep(7).map_or("", |r| r.comp(6))),
            ordering_provider: composite(seg.rep(12), |r| self.provider(r)),
            ..Order::default()
        }
    }

    fn obr(&mut self, o: &mut Order, seg: Seg<'_, '_>, at: At) {
        let placer = composite(seg.rep(2), |r| self.entity(r));
        (o.placer_number, o.orc_placer_number, o.obr_placer_number) =
            order_number(std::mem::take(&mut o.placer_number), placer);
        let filler = composite(seg.rep(3), |r| self.entity(r));
        (o.filler_number, o.orc_filler_number, o.obr_filler_number) =
            order_number(std::mem::take(&mut o.filler_number), filler);
        o.universal_service = composite(seg.rep(4), |r| self.coded(r));
        let priority = self.scalar(seg, 5);
        if !priority.is_absent() {
            o.priority = priority;
        }
        o.requested_at = self.time(seg, 6, "OBR", at);
        o.observed_at = self.time(seg, 7, "OBR", at);
        o.observation_end_at = self.time(seg, 8, "OBR", at);
        o.specimen_received_at = self.time(seg, 14, "OBR", at);
        let provider = composite(seg.rep(16), |r| self.provider(r));
        if !provider.is_absent() {
            o.ordering_provider = provider;
        }
        o.results_reported_at = self.time(seg, 22, "OBR", at);
        o.diagnostic_service = self.scalar(seg, 24);
        o.result_status = self.scalar(seg, 25);
        o.parent = self.parent(seg);
    }

    fn parent(&self, seg: Seg<'_, '_>) -> Tri<Parent> {
        let (r26, r29) = (seg.rep(26), seg.rep(29));
        let (t26, t29) = (
            Tri::from_hl7(r26.map_or("", Rep::raw)),
            Tri::from_hl7(r29.map_or("", Rep::raw)),
        );
        if t26.is_absent() && t29.is_absent() {
            return Tri::Absent;
        }
        if !matches!(t26, Tri::Value(_)) && !matches!(t29, Tri::Value(_)) {
            return Tri::Null;
        }
        let mut p = Parent::default();
        if let Some(r) = r26 {
            p.result_code = match Tri::from_hl7(r.comp(1)) {
                Tri::Absent => Tri::Absent,
                Tri::Null => Tri::Null,
                Tri::Value(_) => Tri::Value(Coded {
                    code: self.sub(r, 1, 1),
                    text: self.sub(r, 1, 2),
                    system: self.sub(r, 1, 3),
                    alt_code: self.sub(r, 1, 4),
                    alt_text: self.sub(r, 1, 5),
                    alt_system: self.sub(r, 1, 6),
                    system_version: self.sub(r, 1, 7),
                    alt_system_version: self.sub(r, 1, 8),
                    original_text: self.sub(r, 1, 9),
                }),
            };
            p.result_sub_id = self.comp(r, 2);
        }
        if let Some(r) = r29 {
            p.placer_number = self.entity_in(r, 1);
            p.filler_number = self.entity_in(r, 2);
        }
        Tri::Value(p)
    }

    /// Field 1 (SI) as a number; anything else is omitted with a warning.
    fn set_id(&mut self, seg: Seg<'_, '_>, id: &'static str, at: At) -> Tri<u32> {
        match Tri::from_hl7(seg.rep(1).map_or("", |r| r.comp(1))) {
            Tri::Absent => Tri::Absent,
            Tri::Null => Tri::Null,
            Tri::Value(s) => match s.trim().parse::<u32>() {
                Ok(n) => Tri::Value(n),
                Err(_) => {
                    self.warn(id, Some(1), at, "set id is not a number; omitted");
                    Tri::Absent
                }
            },
        }
    }

    /// Field `n` (NM) as a number; anything else is omitted with a warning.
    fn nm(&mut self, seg: Seg<'_, '_>, n: usize, id: &'static str, at: At) -> Tri<Number> {
        match Tri::from_hl7(seg.rep(n).map_or("", |r| r.comp(1))) {
            Tri::Absent => Tri::Absent,
            Tri::Null => Tri::Null,
            Tri::Value(s) => match parse_nm(s) {
                Some(v) => Tri::Value(v),
                None => {
                    self.warn(id, Some(n), at, "not a number; omitted");
                    Tri::Absent
                }
            },
        }
    }

    /// Field `n` of `seg` (first repetition) as a coded value.
    fn coded_field(&self, seg: Seg<'_, '_>, n: usize) -> Tri<Coded> {
        composite(seg.rep(n), |r| self.coded(r))
    }

    fn schedule(&mut self, seg: Seg<'_, '_>, at: At) -> Appointment {
        let mut a = Appointment {
            placer_appointment_id: composite(seg.rep(1), |r| self.entity(r)),
            filler_appointment_id: composite(seg.rep(2), |r| self.entity(r)),
            occurrence_number: self.nm(seg, 3, "SCH", at),
            event_reason: self.coded_field(seg, 6),
            reason: self.coded_field(seg, 7),
            appointment_type: self.coded_field(seg, 8),
            duration: self.nm(seg, 9, "SCH", at),
            duration_units: self.coded_field(seg, 10),
            placer_contact: composite(seg.rep(12), |r| self.provider(r)),
            filler_contact: composite(seg.rep(16), |r| self.provider(r)),
            filler_status: self.coded_field(seg, 25),
            ..Appointment::default()
        };
        // SCH-11 (TQ, first repetition): a whole `""` clears both times.
        match seg.rep(11) {
            None => {}
            Some(r) if is_null_raw(r.raw()) => (a.start_at, a.end_at) = (Tri::Null, Tri::Null),
            Some(r) => {
                a.start_at = self.time_in(r, 4, "SCH", 11, at);
                a.end_at = self.time_in(r, 5, "SCH", 11, at);
            }
        }
        a
    }

    /// An AIS, AIG, AIL or AIP (field positions of HL7 v2.5).
    fn resource(&mut self, seg: Seg<'_, '_>, at: At) -> Resource {
        // (kind, segment id, start, duration, duration units, filler status)
        let (kind, id, start, dur, units, status) = match seg.id {
            "AIS" => (ResourceKind::Service, "AIS", 4, 7, 8, 10),
            "AIG" => (ResourceKind::General, "AIG", 8, 11, 12, 14),
            "AIL" => (ResourceKind::Location, "AIL", 6, 9, 10, 12),
            _ => (ResourceKind::Personnel, "AIP", 6, 9, 10, 12),
        };
        let mut r = Resource {
            kind,
            set_id: self.set_id(seg, id, at),
            segment_action: self.scalar(seg, 2),
            universal_service: Tri::Absent,
            resource_id: Tri::Absent,
            location: Tri::Absent,
            personnel: Tri::Absent,
            start_at: self.time(seg, start, id, at),
            duration: self.nm(seg, dur, id, at),
            duration_units: self.coded_field(seg, units),
            filler_status: self.coded_field(seg, status),
            notes: Vec::new(),
        };
        match kind {
            ResourceKind::Service => r.universal_service = self.coded_field(seg, 3),
            ResourceKind::General => r.resource_id = self.coded_field(seg, 3),
            ResourceKind::Location => r.location = composite(seg.rep(3), |x| self.location(x)),
            ResourceKind::Personnel => r.personnel = composite(seg.rep(3), |x| self.provider(x)),
        }
        r
    }

    fn document(&mut self, seg: Seg<'_, '_>, at: At) -> Document {
        Document {
            set_id: self.set_id(seg, "TXA", at),
            document_type: self.coded_field(seg, 2),
            presentation: self.scalar(seg, 3),
            activity_at: self.time(seg, 4, "TXA", at),
            origination_at: self.time(seg, 6, "TXA", at),
            edit_at: self.time(seg, 8, "TXA", at),
            author: list(seg.field(9), |r| self.provider(r)),
            transcriptionist: composite(seg.rep(11), |r| self.provider(r)),
            unique_document_number: composite(seg.rep(12), |r| self.entity(r)),
            parent_document_number: composite(seg.rep(13), |r| self.entity(r)),
            placer_order_number: composite(seg.rep(14), |r| self.entity(r)),
            filler_order_number: composite(seg.rep(15), |r| self.entity(r)),
            unique_document_file_name: self.whole(seg, 16),
            completion_status: self.scalar(seg, 17),
            confidentiality_status: self.scalar(seg, 18),
            availability_status: self.scalar(seg, 19),
            storage_status: self.scalar(seg, 20),
        }
    }

    fn obx(&mut self, seg: Seg<'_, '_>, at: At) -> Observation {
        let set_id = self.set_id(seg, "OBX", at);
        let value_type = self.text(seg.rep(2).map_or("", |r| r.comp(1)));
        let kind = ValueKind::of(value_type.value().map_or("", String::as_str));
        let (value, value_invalid) = self.obs_value(kind, seg.field(5), at);
        Observation {
            order: None,
            patient_index: None,
            set_id,
            value_type,
            code: composite(seg.rep(3), |r| self.coded(r)),
            sub_id: self.scalar(seg, 4),
            value,
            value_invalid,
            units: composite(seg.rep(6), |r| self.coded(r)),
            reference_range: self.whole(seg, 7),
            abnormal_flags: list(seg.field(8), |r| self.unescape(r.comp(1))),
            result_status: self.scalar(seg, 11),
            observed_at: self.time(seg, 14, "OBX", at),
            producer_id: self.scalar(seg, 15),
            performing_organisation: self.scalar(seg, 23),
            notes: Vec::new(),
        }
    }

    /// OBX-5 by value type; the flag says a value did not match its type.
    fn obs_value(
        &mut self,
        kind: ValueKind,
        f: Option<Field<'_>>,
        at: At,
    ) -> (Tri<ObsValue>, bool) {
        let Some(f) = f else {
            return (Tri::Absent, false);
        };
        if is_null_raw(f.raw()) {
            return (Tri::Null, false);
        }
        if f.reps().all(Rep::is_empty) {
            return (Tri::Absent, false);
        }
        let mut invalid = false;
        let value = if f.is_single() {
            self.typed(kind, f.first(), &mut invalid)
        } else {
            let items = f
                .reps()
                .map(|r| {
                    if r.is_empty() || is_null_raw(r.raw()) {
                        (kind == ValueKind::Text).then(|| ObsValue::Text(String::new()))
                    } else {
                        Some(self.typed(kind, r, &mut invalid))
                    }
                })
                .collect();
            ObsValue::List(items)
        };
        if invalid {
            self.warn("OBX", Some(5), at, "value does not match its value type");
        }
        (Tri::Value(value), invalid)
    }

    /// One non-empty OBX-5 repetition.
    fn typed(&mut self, kind: ValueKind, r: Rep<'_>, invalid: &mut bool) -> ObsValue {
        match kind {
            ValueKind::Number => match self.number(r.comp(1)) {
                NumberOrText::Number(n) => ObsValue::Number(n),
                NumberOrText::Text(t) => {
                    *invalid = true;
                    ObsValue::Text(t)
                }
            },
            ValueKind::Structured => {
                let mut num = |c: usize| {
                    Tri::from_hl7(r.comp(c)).map(|raw| {
                        let n = self.number(raw);
                        *invalid |= matches!(n, NumberOrText::Text(_));
                        n
                    })
                };
                let (num1, num2) = (num(2), num(4));
                ObsValue::Structured(StructuredNumeric {
                    comparator: self.comp(r, 1),
                    num1,
                    separator: self.comp(r, 3),
                    num2,
                })
            }
            ValueKind::Coded => ObsValue::Coded(self.coded(r)),
            ValueKind::Encapsulated => ObsValue::Encapsulated(self.encapsulated(r)),
            ValueKind::Time => match self.dtm(r.raw(), self.d.component) {
                Some(tv) => ObsValue::Time(TimeField::Parsed(tv)),
                None => {
                    *invalid = true;
                    ObsValue::Time(TimeField::Invalid(InvalidTime {
                        hl7: r.raw().to_owned(),
                        invalid: true,
                    }))
                }
            },
            ValueKind::Text => ObsValue::Text(self.unescape(r.raw())),
        }
    }

    /// A decimal as HL7 NM allows it (`+1.5`, `-.5`, `5.`, leading zeros,
    /// surrounding spaces): an integer when it fits `i64`, else an `f64` if
    /// finite; anything else is text.
    fn number(&self, raw: &str) -> NumberOrText {
        parse_nm(raw).map_or_else(
            || NumberOrText::Text(self.unescape(raw)),
            NumberOrText::Number,
        )
    }

    fn encapsulated(&self, r: Rep<'_>) -> Encapsulated {
        let (t, st) = (r.comp(2), r.comp(3));
        Encapsulated {
            kind: "ED",
            data_type: self.text(t),
            data_subtype: self.text(st),
            media_type: media_type(t, st),
            encoding: self.comp(r, 4),
            size_bytes: r.comp(5).len(),
            decoded_bytes: decoded_len(r.comp(4), r.comp(5)),
        }
    }

    /// NTE-3 repetitions joined by newlines (an empty or `""` repetition is an empty line
    /// between others); None for a note with no text at all, which is omitted.
    fn note(&self, seg: Seg<'_, '_>) -> Option<String> {
        let f = seg.field(3)?;
        if f.reps().all(|r| r.is_empty() || is_null_raw(r.raw())) {
            return None;
        }
        let mut out = String::new();
        for (i, r) in f.reps().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let raw = r.raw();
            if !is_null_raw(raw) {
                out.push_str(&self.unescape(raw));
            }
        }
        Some(out)
    }
}

/// The order's number from the ORC's and the OBR's (either may be absent), and both as sent
/// when they differ: `(chosen, orc, obr)`. The chosen one is the ORC's when it carries an
/// identifier, else the OBR's when that does, else whichever was sent (the ORC's first).
fn order_number(
    orc: Tri<EntityId>,
    obr: Tri<EntityId>,
) -> (Tri<EntityId>, Tri<EntityId>, Tri<EntityId>) {
    let has_id = |t: &Tri<EntityId>| t.value().is_some_and(|e| matches!(e.value, Tri::Value(_)));
    let differ = !orc.is_absent() && !obr.is_absent() && orc != obr;
    let chosen = if has_id(&orc) {
        orc.clone()
    } else if has_id(&obr) {
        obr.clone()
    } else {
        orc.clone().or_if_absent(|| obr.clone())
    };
    if differ {
        (chosen, orc, obr)
    } else {
        (chosen, Tri::Absent, Tri::Absent)
    }
}

trait FilterEmpty<T> {
    fn filter_empty(self, empty: impl FnOnce(&T) -> bool) -> Tri<T>;
}

impl<T> FilterEmpty<T> for Tri<T> {
    /// A value whose parts are all absent becomes absent.
    fn filter_empty(self, empty: impl FnOnce(&T) -> bool) -> Tri<T> {
        match self {
            Tri::Value(v) if empty(&v) => Tri::Absent,
            other => other,
        }
    }
}

/// How OBX-5 is typed, from OBX-2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    Number,
    Structured,
    Coded,
    Encapsulated,
    Time,
    Text,
}

impl ValueKind {
    fn of(value_type: &str) -> ValueKind {
        let t = value_type.trim();
        let is = |s: &str| t.eq_ignore_ascii_case(s);
        if is("NM") {
            ValueKind::Number
        } else if is("SN") {
            ValueKind::Structured
        } else if is("CE") || is("CWE") || is("CNE") {
            ValueKind::Coded
        } else if is("ED") {
            ValueKind::Encapsulated
        } else if is("DT") || is("DTM") || is("TS") {
            ValueKind::Time
        } else {
            ValueKind::Text
        }
    }
}

/// HL7 NM: optional sign, digits with at most one decimal point, at least one
/// digit, optional surrounding spaces. No exponent, no `inf`/`NaN`.
pub(crate) fn parse_nm(raw: &str) -> Option<Number> {
    let t = raw.trim_matches(' ');
    let unsigned = t.strip_prefix(['+', '-']).unwrap_or(t);
    let mut digits = 0usize;
    let mut points = 0usize;
    for b in unsigned.bytes() {
        match b {
            b'0'..=b'9' => digits += 1,
            b'.' => points += 1,
            _ => return None,
        }
    }
    if digits == 0 || points > 1 {
        return None;
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    if points == 0
        && let Ok(i) = t.parse::<i64>()
    {
        return Some(Number::from(i));
    }
    t.parse::<f64>().ok().and_then(Number::from_f64)
}

/// A MIME type for ED.2 (type of data, table 0191) and ED.3 (subtype, table
/// 0291): well-known subtypes map directly (`PDF` is `application/pdf` whatever
/// ED.2 says), an ED.3 already shaped like a MIME type is lower-cased, other
/// pairs become `<major>/<subtype>` when ED.2 names a MIME major type or its
/// HL7 code (`AP`, `IM`, `AU`, `TEXT`/`TX`); otherwise none.
fn media_type(data_type: &str, subtype: &str) -> Option<String> {
    let st = subtype.trim();
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    };
    let known = [
        ("PDF", "application/pdf"),
        ("JPEG", "image/jpeg"),
        ("JPG", "image/jpeg"),
        ("PNG", "image/png"),
        ("GIF", "image/gif"),
        ("TIFF", "image/tiff"),
        ("TIF", "image/tiff"),
        ("RTF", "application/rtf"),
        ("HTML", "text/html"),
        ("XML", "application/xml"),
        ("DICOM", "application/dicom"),
    ];
    if let Some((_, mime)) = known.iter().find(|(k, _)| st.eq_ignore_ascii_case(k)) {
        return Some((*mime).to_owned());
    }
    if let Some((major, minor)) = st.split_once('/')
        && token(major)
        && token(minor)
    {
        return Some(st.to_ascii_lowercase());
    }
    if !token(st) {
        return None;
    }
    let t = data_type.trim();
    let majors = [
        ("AP", "application"),
        ("APPLICATION", "application"),
        ("IM", "image"),
        ("IMAGE", "image"),
        ("AU", "audio"),
        ("AUDIO", "audio"),
        ("TEXT", "text"),
        ("TX", "text"),
        ("VIDEO", "video"),
        ("MULTIPART", "multipart"),
    ];
    let (_, major) = majors.iter().find(|(k, _)| t.eq_ignore_ascii_case(k))?;
    Some(format!("{major}/{}", st.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const MSH_ADT: &str =
        "MSH|^~\\&|PAS|RXX|SITERELAY|HUB|20260601103000||ADT^A01^ADT_A01|MSG0001|P|2.4";
    const MSH_ORU: &str = "MSH|^~\\&|LAB|RXX|SITERELAY|HUB|20260601120000||ORU^R01^ORU_R01|LAB0001|P|2.5.1|||AL|NE||UNICODE UTF-8";
    #[test]
    fn decoded_sizes_of_encapsulated_data() {
        let table: &[(&str, &str, Option<usize>)] = &[
            ("Base64", "JVBERi0xLjQKJSVFT0YK", Some(15)),
            ("BASE64", "TWE=", Some(2)),
            ("Base64", "TQ==", Some(1)),
            ("Base64", "TW Fu\n", Some(3)),
            ("Base64", "TWF", None),
            ("Base64", "T=Fu", None),
            ("Base64", "", Some(0)),
            ("Hex", "25504446", Some(4)),
            ("Hex", "2550444", None),
            ("Hex", "zz", None),
            ("A", "plain text", None),
        ];
        for (enc, data, want) in table {
            assert_eq!(decoded_len(enc, data), *want, "{enc} {data:?}");
        }
    }

    const PDF_STUB_BASE64: &str = "JVBERi0xLjQKJSVFT0YK"; // "%PDF-1.4\n%%EOF\n"

    /// A message built from (segment id, [(field number, value)]) so field
    /// positions in tests are explicit rather than counted pipes.
    #[derive(Clone)]
    struct Msg {
        msh: &'static str,
        segs: Vec<(String, Vec<String>)>,
    }

    fn msg(msh: &'static str, segs: &[(&str, &[(usize, &str)])]) -> Msg {
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
        fn set(self, id: &str, n: usize, v: &str) -> Msg {
            let i = self.segs.iter().position(|(s, _)| s == id).unwrap();
            self.set_nth(i, n, v)
        }

        fn text(&self) -> String {
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

    fn london() -> TimeZone {
        TimeZone::get("Europe/London").unwrap()
    }

    fn opts(demographics: bool) -> NormaliseOptions {
        NormaliseOptions {
            timezone: london(),
            demographics,
            nhs_authorities: vec!["NHS".into(), "NHSNBR".into()],
        }
    }

    fn json_of(text: &str, o: &NormaliseOptions) -> Value {
        serde_json::to_value(normalise(text, o)).unwrap()
    }

    fn adt() -> Msg {
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

    fn oru() -> Msg {
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

    /// Parent of a JSON pointer, so "absent" is checked where the key would be.
    fn parent(p: &str) -> &str {
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
    fn the_adt_message_normalises_every_section() {
        let v = json_of(&adt().text(), &opts(true));
        assert_eq!(
            v["segments"],
            json!(["MSH", "EVN", "PID", "PV1", "PV2", "OBX", "ZPD"])
        );
        assert_eq!(v.get("warnings"), None);
        let p = &v["patient"];
        assert_eq!(p["sex"], "F");
        assert_eq!(
            p["names"],
            json!([
                {"family": "TEST", "given": "PATIENT", "middle": "MIDDLE", "prefix": "MR", "type": "L"},
                {"family": "TEST", "given": "PAT", "type": "A"}
            ])
        );
        assert_eq!(p["birth_date"]["value"], "1980-06-15");
        assert_eq!(
            p["death"]["date_time"]["value"],
            "2026-01-01T12:00:00+00:00"
        );
        assert_eq!(p["death"]["indicator"], "Y");
        assert_eq!(p["postcode"], "ZZ99 9ZZ");
        assert_eq!(
            p["address"],
            json!({"line1": "1 TEST STREET", "line2": "FLAT 2", "city": "TESTTOWN",
                   "county": "TESTSHIRE", "postcode": "ZZ99 9ZZ", "country": "GBR", "type": "H"})
        );
        let vis = &v["visit"];
        assert_eq!(vis["class"], "I");
        assert_eq!(
            vis["location"],
            json!({"point_of_care": "WARD1", "room": "ROOM2", "bed": "BED3", "facility": "RXX"})
        );
        assert_eq!(
            vis["prior_location"],
            json!({"point_of_care": "WARD0", "facility": "RXX"})
        );
        assert_eq!(
            vis["attending"],
            json!([{"id": "C111", "family": "CONSULTANT", "given": "TEST", "prefix": "DR"}])
        );
        assert_eq!(vis["referring"][0]["id"], "G222");
        assert_eq!(vis.get("consulting"), None);
        assert_eq!(
            vis["hospital_service"], "A&E",
            "an unescaped & in a primitive survives"
        );
        assert_eq!(vis["admit_source"], "19");
        assert_eq!(
            vis["visit_number"],
            json!({"value": "V0001", "type": "VN", "authority": "RXX"})
        );
        assert_eq!(vis["discharge_disposition"], "01");
        assert_eq!(vis["admitted_at"]["value"], "2026-06-01T10:00:00+01:00");
        assert_eq!(vis["discharged_at"]["value"], "2026-06-05T11:00:00+01:00");
        assert_eq!(
            vis["expected_admit_at"]["value"],
            "2026-06-01T09:00:00+01:00"
        );
        let e = &v["event"];
        assert_eq!(e["type_code"], "A01");
        assert_eq!(e["recorded_at"]["value"], "2026-06-01T10:30:00+01:00");
        assert_eq!(e.get("planned_at"), None);
        assert_eq!(e["reason"], "ADM");
        assert_eq!(e["operator"], "OP123");
        assert_eq!(e["occurred_at"]["hl7"], "20260601102500");
        let obx = &v["observations"][0];
        assert_eq!(obx.get("order"), None, "an ADT OBX belongs to no order");
        assert_eq!(obx["value"], json!(172));
        assert_eq!(
            obx["units"],
            json!({"code": "cm", "text": "cm", "system": "UCUM"})
        );
        assert_eq!(v.get("orders"), None);
        assert_eq!(v.get("merge"), None);
    }

    #[test]
    fn a_birth_date_in_summer_time_stays_a_date() {
        let v = json_of(&adt().text(), &opts(true));
        assert_eq!(
            v["patient"]["birth_date"],
            json!({"value": "1980-06-15", "hl7": "19800615", "precision": "day"})
        );
    }

    #[test]
    fn unzoned_admit_times_take_the_right_offset_either_side_of_the_2026_clock_changes() {
        let table: &[(&str, &str, &str)] = &[
            (
                "before spring forward",
                "20260329003000",
                "2026-03-29T00:30:00+00:00",
            ),
            (
                "after spring forward",
                "20260329030000",
                "2026-03-29T03:00:00+01:00",
            ),
            (
                "the day before spring forward",
                "20260328120000",
                "2026-03-28T12:00:00+00:00",
            ),
            (
                "before fall back",
                "20261025003000",
                "2026-10-25T00:30:00+01:00",
            ),
            (
                "after fall back",
                "20261025030000",
                "2026-10-25T03:00:00+00:00",
            ),
            (
                "the day after fall back",
                "20261026120000",
                "2026-10-26T12:00:00+00:00",
            ),
        ];
        for (name, raw, expected) in table {
            let v = json_of(&adt().set("PV1", 44, raw).text(), &opts(false));
            let t = &v["visit"]["admitted_at"];
            assert_eq!(t["value"], *expected, "{name}");
            assert_eq!(t["zone"], "assumed", "{name}");
            assert_eq!(t["hl7"], *raw, "{name}");
            assert_eq!(t["precision"], "second", "{name}");
        }
        let v = json_of(
            &adt().set("PV1", 44, "202603290300+0000").text(),
            &opts(false),
        );
        assert_eq!(
            v["visit"]["admitted_at"]["value"],
            "2026-03-29T03:00:00+00:00"
        );
        assert_eq!(v["visit"]["admitted_at"]["zone"], "given");
    }

    #[test]
    fn an_unreadable_timestamp_is_kept_as_sent_marked_invalid_and_warned_without_content() {
        let v = json_of(&adt().set("PV1", 44, "2026136X").text(), &opts(false));
        assert_eq!(
            v["visit"]["admitted_at"],
            json!({"hl7": "2026136X", "invalid": true})
        );
        let warnings = v["warnings"].as_array().unwrap();
        assert_eq!(warnings.len(), 1);
        let w = warnings[0].as_str().unwrap();
        assert_eq!(w, "PV1-44 (segment 4): invalid timestamp kept as sent");
    }

    #[test]
    fn identifiers_keep_authority_type_and_source_and_the_nhs_number_is_picked_out() {
        let v = json_of(&adt().text(), &opts(true));
        let p = &v["patient"];
        assert_eq!(
            p["identifiers"],
            json!([
                {"value": "9990000018", "type": "NH", "authority": "NHS"},
                {"value": "RXX0001", "type": "MR", "authority": "RXX",
                 "authority_universal_id": "2.16.840.1.113883.2.1.3.2.4.18.48",
                 "authority_universal_id_type": "ISO"},
                {"value": "OLD123", "type": "PI", "authority": "RXX", "source": "PID-2"}
            ])
        );
        assert_eq!(
            p["nhs_number"],
            json!({"value": "9990000018", "valid": true, "verification_status": "01"})
        );
    }

    #[test]
    fn the_nhs_number_is_found_by_authority_or_type_and_checked() {
        type Case = (&'static str, &'static str, &'static str, Option<Value>);
        let table: &[Case] = &[
            (
                "by NHS authority and NH type",
                "9990000018^^^NHS^NH",
                "",
                Some(json!({"value": "9990000018", "valid": true})),
            ),
            (
                "by NHSNBR authority alone",
                "9990000026^^^NHSNBR",
                "",
                Some(json!({"value": "9990000026", "valid": true})),
            ),
            (
                "authority ignores ASCII case",
                "9990000026^^^nhs",
                "",
                Some(json!({"value": "9990000026", "valid": true})),
            ),
            (
                "by NH type with another authority",
                "9990000050^^^RXX^NH",
                "",
                Some(json!({"value": "9990000050", "valid": true})),
            ),
            (
                "a wrong check digit is not valid",
                "9990000019^^^NHS^NH",
                "",
                Some(json!({"value": "9990000019", "valid": false})),
            ),
            (
                "a check digit of ten is not valid",
                "9990000000^^^NHS^NH",
                "",
                Some(json!({"value": "9990000000", "valid": false})),
            ),
            (
                "spaces are kept and not valid",
                "999 000 0018^^^NHS^NH",
                "",
                Some(json!({"value": "999 000 0018", "valid": false})),
            ),
            (
                "the first NHS identifier wins",
                "RXX1^^^RXX^MR~9990000026^^^NHS~9990000018^^^NHS",
                "",
                Some(json!({"value": "9990000026", "valid": true})),
            ),
            (
                "a cleared NHS number is null",
                "\"\"^^^NHS^NH",
                "",
                Some(Value::Null),
            ),
            (
                "no NHS identifier, no NHS number",
                "RXX1^^^RXX^MR",
                "",
                None,
            ),
            (
                "found in PID-2 of older versions",
                "RXX1^^^RXX^MR",
                "9990000018^^^NHS",
                Some(json!({"value": "9990000018", "valid": true})),
            ),
        ];
        for (name, pid3, pid2, expected) in table {
            let m = adt()
                .set("PID", 3, pid3)
                .set("PID", 2, pid2)
                .set("PID", 32, "");
            let v = json_of(&m.text(), &opts(false));
            assert_eq!(v["patient"].get("nhs_number").cloned(), *expected, "{name}");
        }
        let mut custom = opts(false);
        custom.nhs_authorities = vec!["2.16.840.1.113883.2.1.4.1".into()];
        let m = adt().set("PID", 3, "9990000018^^^2.16.840.1.113883.2.1.4.1^XX");
        let v = json_of(&m.text(), &custom);
        assert_eq!(
            v["patient"]["nhs_number"]["valid"], true,
            "configured authorities are used"
        );
    }

    #[test]
    fn pid_4_identifiers_are_marked_with_their_source() {
        let m = adt()
            .set("PID", 2, "")
            .set("PID", 4, "ALT1^^^RYY^PI~ALT2^^^RZZ");
        let v = json_of(&m.text(), &opts(false));
        let ids = v["patient"]["identifiers"].as_array().unwrap();
        assert_eq!(ids.len(), 4);
        assert_eq!(
            ids[2],
            json!({"value": "ALT1", "type": "PI", "authority": "RYY", "source": "PID-4"})
        );
        assert_eq!(
            ids[3],
            json!({"value": "ALT2", "authority": "RZZ", "source": "PID-4"})
        );
    }

    #[test]
    fn an_a40_merge_carries_both_new_and_prior_identifiers() {
        let m = msg(
            "MSH|^~\\&|PAS|RXX|SITERELAY|HUB|20260601103000||ADT^A40^ADT_A39|MSG0002|P|2.4",
            &[
                ("EVN", &[(1, "A40"), (2, "20260601100000")]),
                (
                    "PID",
                    &[
                        (1, "1"),
                        (3, "9990000018^^^NHS^NH~RXX0002^^^RXX^MR"),
                        (5, "TEST^PATIENT"),
                    ],
                ),
                (
                    "MRG",
                    &[
                        (1, "RXX0001^^^RXX^MR~OLD9^^^RYY^PI"),
                        (3, "ACC1^^^RXX^AN"),
                        (5, "V0009^^^RXX^VN"),
                        (7, "TEST^OLDNAME"),
                    ],
                ),
            ],
        );
        let v = json_of(&m.text(), &opts(true));
        assert_eq!(
            v["patient"]["identifiers"],
            json!([
                {"value": "9990000018", "type": "NH", "authority": "NHS"},
                {"value": "RXX0002", "type": "MR", "authority": "RXX"}
            ])
        );
        assert_eq!(
            v["merge"],
            json!({
                "prior_identifiers": [
                    {"value": "RXX0001", "type": "MR", "authority": "RXX"},
                    {"value": "OLD9", "type": "PI", "authority": "RYY"}
                ],
                "prior_account": {"value": "ACC1", "type": "AN", "authority": "RXX"},
                "prior_visit_number": {"value": "V0009", "type": "VN", "authority": "RXX"},
                "prior_names": [{"family": "TEST", "given": "OLDNAME"}]
            })
        );
        let minimal = json_of(&m.text(), &opts(false));
        assert_eq!(minimal["merge"].get("prior_names"), None);
        assert_eq!(
            minimal["merge"]["prior_identifiers"],
            v["merge"]["prior_identifiers"]
        );
    }

    #[test]
    fn an_oru_with_two_orders_types_every_value_and_places_notes() {
        let text = oru().text();
        let v = json_of(&text, &opts(true));
        assert_eq!(v.get("warnings"), None, "{v:#}");
        let orders = v["orders"].as_array().unwrap();
        assert_eq!(orders.len(), 2);
        assert_eq!(
            orders[0],
            json!({
                "control": "RE",
                "placer_number": {"value": "PLC100", "namespace": "PAS"},
                "filler_number": {"value": "FIL200", "namespace": "LAB"},
                "group_number": {"value": "GRP1", "namespace": "PAS"},
                "status": "CM",
                "universal_service": {"code": "FBC", "text": "Full blood count", "system": "LOCAL"},
                "priority": "R",
                "observed_at": {"value": "2026-06-01T09:00:00+01:00", "hl7": "20260601090000",
                                "precision": "second", "zone": "assumed"},
                "specimen_received_at": {"value": "2026-06-01T09:30:00+01:00", "hl7": "20260601093000",
                                         "precision": "second", "zone": "assumed"},
                "ordering_provider": {"id": "C123", "family": "CLINICIAN", "given": "TEST", "prefix": "DR"},
                "results_reported_at": {"value": "2026-06-01T11:00:00+01:00", "hl7": "20260601110000",
                                        "precision": "second", "zone": "assumed"},
                "diagnostic_service": "HM",
                "result_status": "F",
                "notes": ["Sample slightly haemolysed"]
            })
        );
        let second = &orders[1];
        assert_eq!(
            second.get("control"),
            None,
            "an OBR without ORC forms its own order"
        );
        assert_eq!(second.get("placer_number"), None);
        assert_eq!(
            second["filler_number"],
            json!({"value": "FIL201", "namespace": "LAB"})
        );
        assert_eq!(
            second["parent"],
            json!({"placer_number": {"value": "PLC100", "namespace": "PAS"},
                   "filler_number": {"value": "FIL200", "namespace": "LAB"}})
        );
        assert_eq!(second.get("notes"), None);

        let obs = v["observations"].as_array().unwrap();
        assert_eq!(obs.len(), 6);
        let order_of: Vec<Value> = obs.iter().map(|o| o["order"].clone()).collect();
        assert_eq!(
            order_of,
            [json!(0), json!(0), json!(0), json!(1), json!(1), json!(1)]
        );
        let set_ids: Vec<Value> = obs.iter().map(|o| o["set_id"].clone()).collect();
        assert_eq!(
            set_ids,
            [json!(1), json!(2), json!(3), json!(1), json!(2), json!(3)]
        );
        assert_eq!(obs[0]["value"], json!(135));
        assert_eq!(obs[0]["value_type"], "NM");
        assert_eq!(obs[0]["abnormal_flags"], json!(["N"]));
        assert_eq!(obs[1]["value"], json!(11.6));
        assert_eq!(obs[1]["abnormal_flags"], json!(["H"]));
        assert_eq!(obs[1]["reference_range"], "4.0-11.0");
        assert_eq!(obs[2]["value"], json!({"comparator": "<", "num1": 5}));
        assert_eq!(
            obs[3]["value"],
            json!({"code": "NG", "text": "No growth", "system": "LOCAL"})
        );
        assert_eq!(obs[4]["value"], "Line one\nLine two");
        assert_eq!(
            obs[5]["value"],
            json!({"type": "ED", "data_type": "AP", "data_subtype": "PDF",
                   "media_type": "application/pdf", "encoding": "Base64", "size_bytes": 20,
                   "decoded_bytes": 15})
        );
        assert_eq!(obs[5]["performing_organisation"], "LAB");
        assert!(!serde_json::to_string(&v).unwrap().contains(PDF_STUB_BASE64));
        assert!(text.contains(PDF_STUB_BASE64));
        let notes: Vec<Option<&Value>> = obs.iter().map(|o| o.get("notes")).collect();
        assert_eq!(notes[1], Some(&json!(["Repeat advised"])));
        assert_eq!(notes[5], Some(&json!(["Report attached"])));
        assert!(
            notes
                .iter()
                .enumerate()
                .all(|(i, n)| n.is_some() == (i == 1 || i == 5))
        );
        assert!(obs.iter().all(|o| o.get("value_invalid").is_none()));
        assert_eq!(v.get("notes"), None);
    }

    #[test]
    fn observation_values_are_typed_by_value_type() {
        type Case<'a> = (&'a str, &'a str, &'a str, Value, bool);
        let big = "9".repeat(400);
        let table: &[Case] = &[
            ("an integer", "NM", "135", json!(135), false),
            ("a decimal", "NM", "5.25", json!(5.25), false),
            (
                "a signed decimal with a leading point",
                "NM",
                "-.5",
                json!(-0.5),
                false,
            ),
            ("a plus sign and spaces", "NM", " +7 ", json!(7), false),
            ("a trailing point", "NM", "5.", json!(5.0), false),
            (
                "not a number stays text",
                "NM",
                "see report",
                json!("see report"),
                true,
            ),
            ("an exponent is not HL7 NM", "NM", "1e5", json!("1e5"), true),
            ("NaN is not a number", "NM", "NaN", json!("NaN"), true),
            ("too big to be finite", "NM", &big, json!(big), true),
            (
                "repetitions become a list",
                "NM",
                "1~~3",
                json!([1, null, 3]),
                false,
            ),
            (
                "a structured range",
                "SN",
                "^10^-^20",
                json!({"num1": 10, "separator": "-", "num2": 20}),
                false,
            ),
            (
                "a structured ratio",
                "SN",
                "^1^:^128",
                json!({"num1": 1, "separator": ":", "num2": 128}),
                false,
            ),
            (
                "a structured comparator",
                "SN",
                ">=^2.5",
                json!({"comparator": ">=", "num1": 2.5}),
                false,
            ),
            (
                "a structured non-number",
                "SN",
                "<^x",
                json!({"comparator": "<", "num1": "x"}),
                true,
            ),
            (
                "a CWE code",
                "CWE",
                "260385009^Negative^SCT",
                json!({"code": "260385009", "text": "Negative", "system": "SCT"}),
                false,
            ),
            (
                "a CNE code without text",
                "CNE",
                "Y^^HL70136",
                json!({"code": "Y", "system": "HL70136"}),
                false,
            ),
            ("a string", "ST", "Positive", json!("Positive"), false),
            (
                "formatted text with escapes",
                "FT",
                "A\\T\\B\\.br\\C\\F\\D",
                json!("A&B\nC|D"),
                false,
            ),
            (
                "text repetitions are lines",
                "TX",
                "one~~three",
                json!(["one", "", "three"]),
                false,
            ),
            (
                "a date",
                "DT",
                "20260615",
                json!({"value": "2026-06-15", "hl7": "20260615", "precision": "day"}),
                false,
            ),
            (
                "a bad date",
                "DTM",
                "20261345",
                json!({"hl7": "20261345", "invalid": true}),
                true,
            ),
            (
                "an unknown type is text",
                "RP",
                "http://x/y^URI",
                json!("http://x/y^URI"),
                false,
            ),
            ("no type is text", "", "free", json!("free"), false),
        ];
        for (name, vt, raw, expected, invalid) in table {
            let m = adt().set("OBX", 2, vt).set("OBX", 5, raw);
            let v = json_of(&m.text(), &opts(false));
            let o = &v["observations"][0];
            assert_eq!(o["value"], *expected, "{name}");
            assert_eq!(
                o.get("value_invalid") == Some(&json!(true)),
                *invalid,
                "{name}"
            );
            let warned = v.get("warnings").is_some();
            assert_eq!(warned, *invalid, "{name}: {v}");
        }
    }

    #[test]
    fn media_types_come_from_the_ed_type_and_subtype() {
        let table: &[(&str, &str, Option<&str>)] = &[
            ("AP", "PDF", Some("application/pdf")),
            ("Application", "pdf", Some("application/pdf")),
            ("IM", "PDF", Some("application/pdf")),
            ("IM", "JPEG", Some("image/jpeg")),
            ("TEXT", "RTF", Some("application/rtf")),
            ("TX", "plain", Some("text/plain")),
            (
                "application",
                "application/vnd.ms-word",
                Some("application/vnd.ms-word"),
            ),
            ("AP", "octet-stream", Some("application/octet-stream")),
            ("SD", "odd", None),
            ("AP", "", None),
            ("AP", "a b", None),
            ("", "", None),
        ];
        for (t, st, expected) in table {
            assert_eq!(media_type(t, st).as_deref(), *expected, "{t} {st}");
        }
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
    fn escapes_are_decoded_with_the_message_delimiters() {
        let m = adt()
            .set("PID", 5, "SMITH\\T\\JONES^ANN\\S\\MARIE^\\X41\\")
            .set("PV1", 10, "GEN\\E\\MED");
        let v = json_of(&m.text(), &opts(true));
        assert_eq!(
            v["patient"]["names"][0],
            json!({"family": "SMITH&JONES", "given": "ANN^MARIE", "middle": "A"})
        );
        assert_eq!(v["visit"]["hospital_service"], "GEN\\MED");
    }

    fn hash_delimited() -> String {
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

    fn with_truncation_character() -> String {
        [
            "MSH|^~\\&#|PAS|RXX|SITERELAY|HUB|20260601103000||ADT^A08^ADT_A01|MSG0003|P|2.7",
            "PID|1||RXX1^^^RXX^MR||TEST\\P\\HASH^PATIENT||19800615|M",
            "PV1|1|I|WARD1",
        ]
        .join("\r")
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
    fn without_demographics_names_dates_address_and_death_are_left_out() {
        let v = json_of(&adt().text(), &opts(false));
        let p = v["patient"].as_object().unwrap();
        let mut keys: Vec<&str> = p.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["identifiers", "nhs_number", "sex"]);
        let s = serde_json::to_string(&v).unwrap();
        for personal in ["PATIENT", "1980", "ZZ99", "TESTTOWN", "TEST STREET"] {
            assert!(!s.contains(personal), "{personal} leaked: {s}");
        }
        assert_eq!(v["visit"]["class"], "I", "visit content stays");
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

    /// Lines joined with CR, for probes written one segment per line.
    fn lines(segs: &[&str]) -> String {
        segs.join("\r") + "\r"
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

    #[test]
    fn a_birth_date_sent_with_a_time_stays_the_date_sent_and_the_time_is_kept_apart() {
        let text = lines(&[
            "MSH|^~\\&|PAS|RXX|SR|HUB|20260601103000||ADT^A47^ADT_A30|BD1|P|2.4",
            "PID|1||RXX1^^^RXX^MR||TEST^ANN||199909090000|F",
        ]);
        let v = json_of(&text, &opts(true));
        assert_eq!(
            v["patient"]["birth_date"],
            json!({"value": "1999-09-09", "hl7": "199909090000", "precision": "day"})
        );
        assert_eq!(
            v["patient"]["birth_time"],
            json!({"value": "00:00", "precision": "minute"})
        );
        let no_time = lines(&[
            "MSH|^~\\&|PAS|RXX|SR|HUB|20260601103000||ADT^A08|BD2|P|2.4",
            "PID|1||RXX1^^^RXX^MR||TEST^ANN||19990909|F",
        ]);
        let v = json_of(&no_time, &opts(true));
        assert_eq!(v["patient"]["birth_date"]["value"], "1999-09-09");
        assert_eq!(v["patient"].get("birth_time"), None);
        let cleared = no_time.replace("19990909", "\"\"");
        let v = json_of(&cleared, &opts(true));
        assert_eq!(v["patient"]["birth_date"], Value::Null);
        assert_eq!(v["patient"]["birth_time"], Value::Null);
        let bad = no_time.replace("19990909", "19991309");
        let v = json_of(&bad, &opts(true));
        assert_eq!(
            v["patient"]["birth_date"],
            json!({"hl7": "19991309", "invalid": true})
        );
        assert_eq!(
            v["warnings"],
            json!(["PID-7 (segment 2): invalid timestamp kept as sent"])
        );
    }

    #[test]
    fn orc_and_obr_numbers_that_differ_or_are_namespace_only_are_all_kept() {
        // Point-of-care glucose: ORC-2 has only a namespace, the number is in OBR-2.
        let text = lines(&[
            "MSH|^~\\&|POC|RXX|SR|HUB|20260601120000||ORU^R01|N1|P|2.4",
            "PID|1||RXX1^^^RXX^MR",
            "ORC|RE|^HIS",
            "OBR|1|9876543||GLU^Glucose^L",
            "OBX|1|NM|GLU^Glucose^L||5.5|mmol/L",
        ]);
        let v = json_of(&text, &opts(false));
        let o = &v["orders"][0];
        assert_eq!(o["placer_number"], json!({"value": "9876543"}));
        assert_eq!(o["orc_placer_number"], json!({"namespace": "HIS"}));
        assert_eq!(o["obr_placer_number"], json!({"value": "9876543"}));
        // Blood bank: ORC-3 and OBR-3 both have numbers, and they differ.
        let text = lines(&[
            "MSH|^~\\&|BB|RXX|SR|HUB|20260601120000||ORU^R01|N2|P|2.4",
            "PID|1||RXX1^^^RXX^MR",
            "ORC|RE|P1^PAS|541234^BB",
            "OBR|1|P1^PAS|19B44444^BB|XM^Crossmatch^L",
        ]);
        let v = json_of(&text, &opts(false));
        let o = &v["orders"][0];
        assert_eq!(
            o["filler_number"],
            json!({"value": "541234", "namespace": "BB"})
        );
        assert_eq!(o["orc_filler_number"]["value"], "541234");
        assert_eq!(o["obr_filler_number"]["value"], "19B44444");
        // Equal numbers are given once.
        assert_eq!(
            o["placer_number"],
            json!({"value": "P1", "namespace": "PAS"})
        );
        assert_eq!(o.get("orc_placer_number"), None);
        assert_eq!(o.get("obr_placer_number"), None);
    }

    #[test]
    fn coded_values_keep_the_alternate_identifier_text_and_system() {
        let text = lines(&[
            "MSH|^~\\&|EPR|RXX|SR|HUB|20260601120000||ORM^O01|C1|P|2.5",
            "PID|1||RXX1^^^RXX^MR",
            "ORC|NW|P1",
            "OBR|1|P1||^^^^DNACPR",
            "ORC|NW|P2",
            "OBR|2|P2||^^^^IP CON FRAILTY",
            "OBX|1|ST|^^^ABC^Assign Benefits^PLW-HL7||x",
            "OBX|2|CWE|8310-5^Body temperature^LN^BT^Temp^L^2.70^1^Temperature taken||Y^Yes^HL70136",
        ]);
        let v = json_of(&text, &opts(false));
        assert_eq!(
            v["orders"][0]["universal_service"],
            json!({"alt_text": "DNACPR"})
        );
        assert_eq!(
            v["orders"][1]["universal_service"],
            json!({"alt_text": "IP CON FRAILTY"})
        );
        assert_eq!(
            v["observations"][0]["code"],
            json!({"alt_code": "ABC", "alt_text": "Assign Benefits", "alt_system": "PLW-HL7"})
        );
        assert_eq!(
            v["observations"][1]["code"],
            json!({
                "code": "8310-5", "text": "Body temperature", "system": "LN",
                "alt_code": "BT", "alt_text": "Temp", "alt_system": "L",
                "system_version": "2.70", "alt_system_version": "1",
                "original_text": "Temperature taken"
            })
        );
    }

    #[test]
    fn formatting_escapes_are_applied_highlighting_removed_and_charset_escapes_warned() {
        let text = lines(&[
            "MSH|^~\\&|LAB|RXX|SR|HUB|20260601120000||ORU^R01|E1|P|2.5",
            "PID|1||RXX1^^^RXX^MR",
            "OBR|1||F1|X^Test^L",
            "OBX|1|FT|X^Test^L||caf\u{e9} \\H\\bold\\N\\ end\\.sp\\next\\.sp2\\last",
            "NTE|1||",
            "NTE|2||a \\C2842\\b",
        ]);
        let v = json_of(&text, &opts(false));
        assert_eq!(
            v["observations"][0]["value"],
            "caf\u{e9} bold end\nnext\n\nlast"
        );
        assert_eq!(
            v["observations"][0]["notes"],
            json!(["a b"]),
            "empty NTE omitted"
        );
        assert_eq!(
            v["warnings"],
            json!([
                "NTE (segment 6): character set escape (\\C or \\M) removed from text; the characters it selects are not decoded"
            ])
        );
    }

    const MSH_SIU: &str =
        "MSH|^~\\&|PAS|RXX|SITERELAY|HUB|20260328100000||SIU^S12^SIU_S12|SCH0001|P|2.5";
    const MSH_MDM: &str =
        "MSH|^~\\&|EPR|RXX|SITERELAY|HUB|20261026120000||MDM^T02^MDM_T02|DOC0001|P|2.5";

    /// An SIU^S12 booking across the 2026 spring clock change (01:00 UTC on 29 March).
    fn siu() -> Msg {
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
    fn mdm() -> Msg {
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

    #[test]
    fn an_siu_s12_normalises_the_appointment_and_its_resources_in_order() {
        let v = json_of(&siu().text(), &opts(false));
        assert_eq!(v.get("warnings"), None, "{v:#}");
        assert_eq!(
            v["segments"],
            json!([
                "MSH", "SCH", "NTE", "PID", "PV1", "RGS", "AIS", "NTE", "AIL", "AIP", "AIG"
            ])
        );
        let gmt_0030 = json!({"value": "2026-03-29T00:30:00+00:00", "hl7": "20260329003000",
                              "precision": "second", "zone": "assumed"});
        assert_eq!(
            v["appointment"],
            json!({
                "placer_appointment_id": {"value": "PLA100", "namespace": "PAS"},
                "filler_appointment_id": {"value": "FIL100", "namespace": "CLINIC"},
                "occurrence_number": 1,
                "event_reason": {"code": "NEW", "text": "New booking", "system": "LOCAL"},
                "reason": {"code": "FUP", "text": "Follow-up", "system": "LOCAL"},
                "type": {"code": "NORMAL", "text": null, "system": "HL70277"},
                "duration": 60,
                "duration_units": {"code": "min", "text": "minutes", "system": "UCUM"},
                "start_at": gmt_0030,
                "end_at": {"value": "2026-03-29T02:30:00+01:00", "hl7": "20260329023000&S",
                           "precision": "second", "zone": "assumed"},
                "placer_contact": {"id": "C111", "family": "CONSULTANT", "given": "TEST", "prefix": "DR"},
                "filler_contact": null,
                "filler_status": {"code": "Booked", "text": "Booked", "system": "HL70278"},
                "resources": [
                    {
                        "kind": "service",
                        "set_id": 1,
                        "segment_action": "A",
                        "universal_service": {"code": "CARD", "text": "Cardiology outpatient", "system": "LOCAL"},
                        "start_at": gmt_0030,
                        "duration": 60,
                        "duration_units": {"code": "min", "text": "minutes", "system": "UCUM"},
                        "filler_status": {"code": "Booked"},
                        "notes": ["bring previous letters"]
                    },
                    {
                        "kind": "location",
                        "set_id": 2,
                        "segment_action": "A",
                        "location": {"point_of_care": "CLINIC1", "room": null, "facility": "RXX"},
                        "start_at": gmt_0030,
                        "duration": 60,
                        "duration_units": {"code": "min"},
                        "filler_status": {"code": "Booked"}
                    },
                    {
                        "kind": "personnel",
                        "set_id": 3,
                        "segment_action": "A",
                        "personnel": {"id": "C111", "family": "CONSULTANT", "given": "TEST", "prefix": "DR"},
                        "start_at": {"value": "2026-03-29T02:30:00+01:00", "hl7": "20260329023000",
                                     "precision": "second", "zone": "assumed"},
                        "duration": 30,
                        "duration_units": null,
                        "filler_status": {"code": "Pending"}
                    },
                    {
                        "kind": "general",
                        "set_id": 4,
                        "segment_action": "A",
                        "resource_id": {"code": "ECG1", "text": "ECG machine", "system": "LOCAL"},
                        "start_at": {"value": "2026-03-29T02:45:00+01:00", "hl7": "20260329024500",
                                     "precision": "second", "zone": "assumed"},
                        "duration": 15,
                        "duration_units": {"code": "min"},
                        "filler_status": {"code": "Booked"}
                    }
                ]
            })
        );
        assert_eq!(
            v["notes"],
            json!(["appointment note"]),
            "an NTE after SCH attaches to nothing else"
        );
        assert_eq!(v["patient"]["identifiers"][0]["value"], "9990000018");
        assert_eq!(v["visit"]["class"], "O");
        assert_eq!(v.get("orders"), None);
        assert_eq!(v.get("document"), None);
    }

    #[test]
    fn an_mdm_t02_normalises_the_document_header_and_keeps_the_body_as_observations() {
        let v = json_of(&mdm().text(), &opts(false));
        assert_eq!(v.get("warnings"), None, "{v:#}");
        let bst = |raw: &str, value: &str| json!({"value": value, "hl7": raw, "precision": "second", "zone": "assumed"});
        assert_eq!(
            v["document"],
            json!({
                "set_id": 1,
                "type": {"code": "DS"},
                "presentation": "TX",
                "activity_at": bst("20261026093000", "2026-10-26T09:30:00+00:00"),
                "origination_at": bst("20261024153000", "2026-10-24T15:30:00+01:00"),
                "edit_at": bst("20261026100000", "2026-10-26T10:00:00+00:00"),
                "author": [
                    {"id": "C123", "family": "CLINICIAN", "given": "TEST", "prefix": "DR"},
                    {"id": "C124", "family": "REGISTRAR", "given": "TEST"}
                ],
                "transcriptionist": {"id": "T55", "family": "TYPIST", "given": "TEST"},
                "unique_document_number": {"value": "DOC100", "namespace": "EPR"},
                "parent_document_number": null,
                "placer_order_number": {"value": "PLC300", "namespace": "PAS"},
                "unique_document_file_name": "discharge_100.txt",
                "completion_status": "AU",
                "confidentiality_status": null,
                "availability_status": "AV"
            })
        );
        let ds = json!({"code": "DS", "text": "Discharge summary", "system": "LOCAL"});
        assert_eq!(
            v["observations"],
            json!([
                {"set_id": 1, "value_type": "TX", "code": ds, "value": "Discharged home.",
                 "result_status": "F"},
                {"set_id": 2, "value_type": "TX", "code": ds,
                 "value": ["Follow up in clinic & review.", "", "Signed."], "result_status": "F"},
                {"set_id": 3, "value_type": "FT", "code": ds, "value": "Line one\nLine two",
                 "result_status": "F", "notes": ["body note"]}
            ]),
            "the body follows the TXA, so it belongs to no order"
        );
        assert_eq!(v["orders"].as_array().map(Vec::len), Some(1));
        assert_eq!(v.get("appointment"), None);
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
                        c[at] = char::from_u32(u32::try_from(rng.below(0x800)).unwrap_or(0))
                            .unwrap_or('?');
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
    /// (`hl7-parser`); they must not change.
    #[test]
    fn odd_separators_and_line_ends_read_exactly_as_before() {
        let o = opts(true);
        let pretty = |text: &str| serde_json::to_string_pretty(&normalise(text, &o)).unwrap();
        assert_eq!(pretty(&odd_hash_delimited("\n")), ODD_HASH_DELIMITED);
        assert_eq!(pretty(&odd_hash_delimited("\r\n")), ODD_HASH_DELIMITED);
        assert_eq!(pretty(&odd_mixed_line_ends()), ODD_MIXED_LINE_ENDS);
    }

    const ODD_HASH_DELIMITED: &str = r##"{
  "patient": {
    "identifiers": [
      {
        "value": "RXX1",
        "type": "MR",
        "authority": "RXX",
        "authority_universal_id": "1.2.3",
        "authority_universal_id_type": "ISO"
      },
      {
        "value": "9990000018",
        "type": "NH",
        "authority": "NHS"
      },
      {
        "value": "OLD1",
        "type": "PI",
        "authority": "RXX",
        "source": "PID-2"
      }
    ],
    "nhs_number": {
      "value": "9990000018",
      "valid": true
    },
    "names": [
      {
        "family": "SMITH",
        "given": "ANN",
        "middle": "%B",
        "prefix": "MRS",
        "type": "L"
      }
    ],
    "birth_date": {
      "value": "1980-06-15",
      "hl7": "19800615",
      "precision": "day"
    },
    "sex": "F",
    "death": {
      "date_time": null,
      "indicator": "N"
    },
    "postcode": "ZZ99 9ZZ",
    "address": {
      "line1": "12 HIGH ST",
      "line2": "FLAT 2",
      "city": "TOWN",
      "postcode": "ZZ99 9ZZ",
      "country": "GBR",
      "type": "H"
    }
  },
  "visit": {
    "class": "I",
    "location": {
      "point_of_care": "WARD1",
      "room": "ROOM2",
      "bed": "BED3",
      "facility": "RXX01"
    },
    "attending": [
      {
        "id": "C1",
        "family": "DOC",
        "given": "A"
      },
      {
        "id": "C2",
        "family": "DR2"
      }
    ],
    "visit_number": null,
    "admitted_at": {
      "value": "2026-06-01T10:00:00+01:00",
      "hl7": "202606011000",
      "precision": "minute",
      "zone": "assumed"
    }
  },
  "orders": [
    {
      "control": "NW",
      "placer_number": {
        "value": "PL1",
        "namespace": "ICE"
      },
      "filler_number": {
        "value": "FL1",
        "namespace": "LAB"
      },
      "group_number": {
        "value": "GRP1",
        "namespace": "ICE"
      },
      "status": "SC",
      "universal_service": {
        "code": "HB",
        "text": "Hb",
        "system": "L"
      },
      "priority": "R",
      "requested_at": {
        "value": "2026-06-01T09:00:00+01:00",
        "hl7": "20260601090000",
        "precision": "second",
        "zone": "assumed"
      },
      "observed_at": {
        "value": "2026-06-01T09:15:00+01:00",
        "hl7": "20260601091500",
        "precision": "second",
        "zone": "assumed"
      },
      "observation_end_at": null,
      "specimen_received_at": {
        "value": "2026-06-01T10:00:00+01:00",
        "hl7": "20260601100000",
        "precision": "second",
        "zone": "assumed"
      },
      "ordering_provider": {
        "id": "C9",
        "family": "ORD",
        "given": "B"
      },
      "results_reported_at": {
        "value": "2026-06-01T12:00:00+01:00",
        "hl7": "20260601120000+0100",
        "precision": "second",
        "zone": "given"
      },
      "result_status": "F",
      "parent": {
        "result_code": {
          "code": "HB",
          "text": "Hb",
          "system": "L"
        },
        "result_sub_id": "1",
        "placer_number": {
          "value": "PL0",
          "namespace": "ICE"
        },
        "filler_number": {
          "value": "FL0",
          "namespace": "LAB"
        }
      }
    }
  ],
  "observations": [
    {
      "order": 0,
      "set_id": 1,
      "value_type": "NM",
      "code": {
        "code": "HB",
        "text": "Hb",
        "system": "L"
      },
      "value": [
        1,
        null,
        null,
        "x"
      ],
      "value_invalid": true,
      "units": {
        "code": "g/L"
      },
      "reference_range": "10-20",
      "abnormal_flags": [
        "H",
        "L"
      ],
      "result_status": "F",
      "observed_at": {
        "value": "2026-06-01T09:15:00+01:00",
        "hl7": "20260601091500",
        "precision": "second",
        "zone": "assumed"
      }
    },
    {
      "order": 0,
      "set_id": 2,
      "value_type": "TX",
      "code": {
        "code": "C",
        "text": "Comment",
        "system": "L"
      },
      "value": [
        "a\nb",
        "",
        "",
        "c"
      ],
      "producer_id": "LAB"
    },
    {
      "order": 0,
      "set_id": 3,
      "value_type": "ED",
      "code": {
        "code": "PDF",
        "text": "Report",
        "system": "L"
      },
      "value": {
        "type": "ED",
        "data_type": "AP",
        "data_subtype": "PDF",
        "media_type": "application/pdf",
        "encoding": "Base64",
        "size_bytes": 20,
        "decoded_bytes": 15
      }
    },
    {
      "order": 0,
      "set_id": 4,
      "value_type": "SN",
      "code": {
        "code": "EGFR",
        "text": "eGFR",
        "system": "L"
      },
      "value": [
        {
          "comparator": ">",
          "num1": 90
        },
        {
          "num1": 1,
          "separator": ":",
          "num2": 2
        }
      ],
      "notes": [
        "a\n\n\nb!"
      ]
    }
  ],
  "segments": [
    "MSH",
    "PID",
    "PV1",
    "ORC",
    "OBR",
    "OBX",
    "OBX",
    "OBX",
    "OBX",
    "NTE",
    "NTE",
    "ZZ1"
  ],
  "warnings": [
    "unreadable line after segment 11 skipped",
    "OBX-5 (segment 6): value does not match its value type"
  ]
}"##;

    const ODD_MIXED_LINE_ENDS: &str = r##"{
  "appointment": {
    "placer_appointment_id": {
      "value": "PLA1",
      "namespace": "PAS"
    },
    "filler_appointment_id": {
      "value": "FIL1",
      "namespace": "CLINIC"
    },
    "occurrence_number": 1,
    "duration": 60,
    "duration_units": {
      "code": "min"
    },
    "start_at": {
      "value": "2026-03-29T00:30:00+00:00",
      "hl7": "20260329003000&S",
      "precision": "second",
      "zone": "assumed"
    },
    "end_at": {
      "value": "2026-03-29T02:30:00+01:00",
      "hl7": "20260329023000",
      "precision": "second",
      "zone": "assumed"
    },
    "placer_contact": {
      "id": "C1",
      "family": "DOC",
      "given": "A"
    },
    "filler_status": {
      "code": "Booked"
    },
    "resources": [
      {
        "kind": "location",
        "set_id": 1,
        "segment_action": "A",
        "location": {
          "point_of_care": "CLINIC1",
          "room": null,
          "facility": "RXX"
        },
        "start_at": {
          "value": "2026-03-29T00:30:00+00:00",
          "hl7": "20260329003000",
          "precision": "second",
          "zone": "assumed"
        },
        "duration": 60,
        "duration_units": {
          "code": "min",
          "text": "minutes"
        },
        "filler_status": {
          "code": "Booked"
        },
        "notes": [
          "x\n\ny"
        ]
      },
      {
        "kind": "personnel",
        "set_id": 2,
        "personnel": null
      }
    ]
  },
  "document": {
    "set_id": 1,
    "type": {
      "code": "DS"
    },
    "presentation": "TX",
    "activity_at": {
      "value": "2026-06-01T17:55:00+01:00",
      "hl7": "20260601175500^S",
      "precision": "second",
      "zone": "assumed"
    },
    "unique_document_number": {
      "value": "DOC1",
      "namespace": "EPR&X"
    },
    "parent_document_number": null,
    "placer_order_number": {
      "value": "PL1",
      "namespace": "ICE"
    }
  },
  "segments": [
    "MSH",
    "SCH",
    "AIL",
    "NTE",
    "AIP",
    "TXA"
  ]
}"##;

    #[test]
    fn decimals_follow_hl7_nm() {
        let table: &[(&str, Option<Value>)] = &[
            ("0", Some(json!(0))),
            ("007", Some(json!(7))),
            ("-12", Some(json!(-12))),
            ("1.10", Some(json!(1.1))),
            (
                "9223372036854775808",
                Some(json!(9_223_372_036_854_775_808.0_f64)),
            ),
            ("", None),
            ("-", None),
            (".", None),
            ("1.2.3", None),
            ("1,5", None),
            ("inf", None),
            ("0x10", None),
        ];
        for (raw, expected) in table {
            let got = parse_nm(raw).map(Value::Number);
            assert_eq!(got, *expected, "{raw:?}");
        }
    }
}
