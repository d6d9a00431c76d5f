//! The `orders` and `observations` sections: ORC and OBR (an order's numbers, service,
//! times, parent), OBX with OBX-5 typed by OBX-2 (numbers as HL7 NM, structured numerics,
//! codes, timestamps, ED references with their media type and decoded size, text), and the
//! text of NTE notes. Which order, patient group or resource a note or result follows is
//! decided by the segment loop in `mod.rs`.

use serde::Serialize;
use serde_json::Number;

use crate::hl7::fields::{Field, Rep, Seg};
use crate::hl7::tri::Tri;

use super::datatypes::{Coded, EntityId, InvalidTime, Provider, TimeField};
use super::reader::{At, Reader, composite, is_null_raw, list, parse_nm};

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

impl Reader<'_> {
    pub(super) fn orc(&self, seg: Seg<'_, '_>) -> Order {
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

    pub(super) fn obr(&mut self, o: &mut Order, seg: Seg<'_, '_>, at: At) {
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

    pub(super) fn obx(&mut self, seg: Seg<'_, '_>, at: At) -> Observation {
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
    pub(super) fn note(&self, seg: Seg<'_, '_>) -> Option<String> {
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
    use super::super::tests::{adt, json_of, lines, opts, oru};
    use super::*;
    use serde_json::{Value, json};

    const PDF_STUB_BASE64: &str = "JVBERi0xLjQKJSVFT0YK"; // "%PDF-1.4\n%%EOF\n"

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
}
