//! The `document` section of document management messages (MDM): TXA. The document body
//! (OBX) is read as observations.

use serde::Serialize;

use crate::hl7::fields::Seg;
use crate::hl7::tri::Tri;

use super::datatypes::{Coded, EntityId, Provider, TimeField};
use super::reader::{At, Reader, composite, list};

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

impl Reader<'_> {
    pub(super) fn document(&mut self, seg: Seg<'_, '_>, at: At) -> Document {
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
}

#[cfg(test)]
mod tests {
    use super::super::tests::{json_of, mdm, opts};
    use serde_json::json;

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
}
