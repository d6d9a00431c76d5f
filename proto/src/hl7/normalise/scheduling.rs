//! The `appointment` section of scheduling messages (SIU): SCH, and every AIS, AIG, AIL and
//! AIP as a resource of the one appointment.

use serde::Serialize;
use serde_json::Number;

use crate::hl7::fields::Seg;
use crate::hl7::tri::Tri;

use super::datatypes::{Coded, EntityId, Location, Provider, TimeField};
use super::reader::{At, Reader, composite, is_null_raw};

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

impl Reader<'_> {
    pub(super) fn schedule(&mut self, seg: Seg<'_, '_>, at: At) -> Appointment {
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
    pub(super) fn resource(&mut self, seg: Seg<'_, '_>, at: At) -> Resource {
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
}

#[cfg(test)]
mod tests {
    use super::super::tests::{json_of, opts, siu};
    use serde_json::json;

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
}
